"""Retrain the built-in ``photos-cnn`` and write its weights.

Reproducible: seeded, deterministic algorithms, a fixed number of CPU threads.
Trains with plain cross-entropy on the training crops of the built-in
photographs (outside their test cells), then prints the accuracy on the test
crops (inside them), which are never used for training or selection.

During training a BatchNorm layer follows every convolution; at the end each
is folded into its convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``),
so the written weights are those of the plain :func:`photos_cnn`, which computes
the same function as the trained network in eval mode.

    python scripts/train_photos_cnn.py [--out src/betasmooth/weights/photos_cnn.pt]
    python scripts/train_photos_cnn.py --validation   # score a recipe without the test cells
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from training import accuracy, output_file, report_and_save

from betasmooth.cli import positive_integer
from betasmooth.photos import SIZE, photo_crops, photos_cnn

OUT = Path(__file__).resolve().parents[1] / "src" / "betasmooth" / "weights" / "photos_cnn.pt"
#: The shipped model's recipe: 2000 training crops per photograph (drawn from
#: the training cells like the data set's 300), seen three times, with
#: BatchNorm during training.
EPOCHS = 3
PER_PHOTO = 2000


def with_batch_norm(model: nn.Sequential) -> nn.Sequential:
    """``model`` with a BatchNorm layer after every 2-D convolution (the same modules)."""
    layers: list[nn.Module] = []
    for layer in model:
        layers.append(layer)
        if isinstance(layer, nn.Conv2d):
            layers.append(nn.BatchNorm2d(layer.out_channels, device=layer.weight.device))
    return nn.Sequential(*layers)


def fold_batch_norm(model: nn.Sequential) -> nn.Sequential:
    """The eval-mode ``model`` with each BatchNorm folded into the convolution before it
    (a model without BatchNorm comes back with the same layers)."""
    model = model.eval()
    layers: list[nn.Module] = []
    for layer in model:
        if isinstance(layer, nn.BatchNorm2d):
            layers[-1] = fuse_conv_bn_eval(layers[-1], layer)
        else:
            layers.append(layer)
    return nn.Sequential(*layers).eval()


def train(
    epochs: int = EPOCHS,
    *,
    size: int = SIZE,
    per_photo: int | None = PER_PHOTO,
    max_steps: int | None = None,
    seed: int = 0,
    threads: int = 1,
    device: str = "cpu",
    batch_norm: bool = True,
    split: str = "train",
) -> nn.Module:
    """Train :func:`photos_cnn` for ``size`` pixels; the same arguments give the same weights.

    ``per_photo`` training crops per photograph (``None``: the data set's
    300); ``max_steps`` stops after that many batches (for checks of determinism);
    ``batch_norm`` trains with BatchNorm after every convolution and folds it
    into the convolutions at the end (:func:`fold_batch_norm`); ``split``
    names the crops to train on (``"fit"``: three quarters of the training
    cells, the rest being the ``"validation"`` split).
    On ``device="cuda"`` the batches, their order and the initial weights are
    the same as on the CPU, but the weights are not bit-reproducible: max
    pooling has no deterministic backward pass on CUDA.
    """
    # The caller's settings come back afterwards: a script that trains and then
    # attacks (benchmarks/dimension.py) must not attack in deterministic mode.
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=device != "cpu")
    try:
        return _train(epochs, size, per_photo, max_steps, seed, device, batch_norm, split)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


def _train(
    epochs: int,
    size: int,
    per_photo: int | None,
    max_steps: int | None,
    seed: int,
    device: str,
    batch_norm: bool,
    split: str,
) -> nn.Module:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y, _ = photo_crops(split, size=size, per_photo=per_photo)
    model = photos_cnn(size).to(device)
    if batch_norm:
        model = with_batch_norm(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    total = epochs * -(-len(x) // 64)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=total)
    step = 0
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=generator).split(64):
            # A random left-right flip: the crops already come at several scales.
            flip = torch.rand(len(batch), generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], x[batch].flip(-1), x[batch])
            loss = F.cross_entropy(model(images.to(device)), y[batch].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if max_steps is not None and step >= max_steps:
                return fold_batch_norm(model)
        print(f"epoch {epoch + 1}: train loss {loss.item():.4f}", flush=True)
    return fold_batch_norm(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=output_file, default=OUT)
    parser.add_argument("--epochs", type=positive_integer, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_integer, default=1)
    parser.add_argument(
        "--per-photo",
        type=positive_integer,
        default=PER_PHOTO,
        help="training crops per photograph",
    )
    parser.add_argument(
        "--no-batch-norm",
        dest="batch_norm",
        action="store_false",
        help="train the plain network, as up to betasmooth 0.7.0",
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help="train on three quarters of the training cells, print the accuracy on the "
        "others and write nothing: compare recipes without the test cells",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = train(
        args.epochs,
        per_photo=args.per_photo,
        seed=args.seed,
        threads=args.threads,
        batch_norm=args.batch_norm,
        split="fit" if args.validation else "train",
    )
    seconds = time.perf_counter() - start
    if args.validation:
        fit = photo_crops("fit", per_photo=args.per_photo)[:2]
        print(f"fit accuracy {accuracy(model, *fit):.4f}")
        valid = photo_crops("validation")[:2]
        print(f"validation accuracy {accuracy(model, *valid):.4f} ({len(valid[1])} images)")
        return
    report_and_save(model, photo_crops("train")[:2], photo_crops("test")[:2], seconds, args.out)


if __name__ == "__main__":
    main()
