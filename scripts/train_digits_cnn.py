"""Retrain the built-in ``digits-cnn`` and write its weights.

Reproducible: seeded, deterministic algorithms, one CPU thread. Trains on the
digits training split with random shifts of up to two pixels, then prints the
accuracy on the test split, which is never used for training or selection.

    python scripts/train_digits_cnn.py [--out src/betasmooth/weights/digits_cnn.pt]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from training import output_file, report_and_save

from betasmooth.cli import positive_integer
from betasmooth.zoo import digits_cnn, load_data

OUT = Path(__file__).resolve().parents[1] / "src" / "betasmooth" / "weights" / "digits_cnn.pt"


def shift(x, generator, pixels=2):
    """Move each image by a random offset of up to ``pixels`` in each direction."""
    padded = F.pad(x, (pixels,) * 4)
    offsets = torch.randint(0, 2 * pixels + 1, (len(x), 2), generator=generator)
    size = x.shape[-1]
    return torch.stack(
        [padded[i, :, r : r + size, c : c + size] for i, (r, c) in enumerate(offsets.tolist())]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=output_file, default=OUT)
    parser.add_argument("--epochs", type=positive_integer, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    x, y = load_data("digits", split="train")
    x_test, y_test = load_data("digits", split="test")
    model = digits_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for batch in order.split(64):
            loss = F.cross_entropy(model(shift(x[batch], generator)), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            model.eval()
            print(f"epoch {epoch + 1}: train loss {loss.item():.4f}")
    model.eval()
    seconds = time.perf_counter() - start
    report_and_save(model, (x, y), (x_test, y_test), seconds, args.out)


if __name__ == "__main__":
    main()
