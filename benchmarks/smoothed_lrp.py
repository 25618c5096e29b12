"""LRP of beta-smoothed networks: how far relevance grows, and how faithful the maps stay.

A softplus unit never outputs 0, so a beta-smoothed network passes relevance
to units whose pre-activation (a dense layer's, or a residual addition's sum)
is near 0; the epsilon rule then divides by that sum plus ``epsilon``. For
each model, epsilon and beta this prints, over a few images:

- ``growth``: the largest total |relevance| at the input over the explained
  |logit| (about 1 where the rules conserve relevance; ``lrp`` warns above
  ``betasmooth.explain.propagation.AMPLIFIED``);
- ``fidelity``: the median PCC of the heatmap of ``beta_smooth`` with base
  ``lrp`` against the heatmap of ``lrp`` on the ReLU network, both with the
  same epsilon (the sweep's fidelity).

Models: the built-in ``photos-cnn`` (photos test images) and torchvision's
VGG16 and ResNet-18 on the built-in photographs, resized and normalised by
their presets, with random weights (seeded; no download) or, with
``--imagenet``, the ImageNet weights of torchvision's weights API (a download
on first use). Float64 throughout.

Examples
--------
    python benchmarks/smoothed_lrp.py --threads 2 -n 4 --image-size 112
"""

from __future__ import annotations

import argparse
import warnings

import torch

import betasmooth as bs
from arguments import append_json, json_lines
from betasmooth.cli import positive_integer
from betasmooth.distributed import device_argument

MODELS = ("photos-cnn", "torchvision:vgg16", "torchvision:resnet18")
EPSILONS = (1e-6, 1e-2, 0.25)
BETAS = (1.0, 5.0, 20.0, 50.0)


def load(name: str, n: int, image_size: int, imagenet: bool) -> tuple:
    """The model in float64, ``n`` test images and their data range."""
    if name == "photos-cnn":
        model, data = bs.load_model(name), bs.load_data("photos")
    else:
        import torchvision

        torch.manual_seed(0)
        random = torchvision.models.get_model(name.split(":")[1], weights=None)
        model = bs.load_model(name) if imagenet else random
        data = bs.load_data("photos", preset=name, image_size=image_size)
    return model.double().eval(), data.x[:n].double(), data.low.double(), data.high.double()


def measure(model, x, low, high, epsilon: float, beta: float) -> dict[str, float]:
    target = model(x).argmax(1)
    box = {"low": low, "high": high, "epsilon": epsilon}
    plain = bs.heatmap(bs.explain(model, x, "lrp", target, **box))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the growth is what is measured
        smoothed = bs.explain(
            model, x, "beta_smooth", target, beta=beta, base="lrp", base_options=box
        )
    with bs.smoothed(model, beta), torch.no_grad():
        logit = model(x).gather(1, target[:, None]).flatten()
    growth = smoothed.abs().flatten(1).sum(1) / logit.abs()
    fidelity = bs.compare(bs.heatmap(smoothed), plain)["pcc"]
    return {"growth": float(growth.max()), "fidelity": float(fidelity.median())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=positive_integer, default=4, help="images (default 4)")
    parser.add_argument("--image-size", type=positive_integer, default=112)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--imagenet", action="store_true", help="torchvision's ImageNet weights")
    parser.add_argument("--device", type=device_argument, default="cpu")
    parser.add_argument("--threads", type=positive_integer, default=None)
    parser.add_argument("--json", type=json_lines, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'model':22} {'epsilon':>8} " + " ".join(f"{'beta=' + f'{b:g}':>17}" for b in BETAS))
    print(f"{'':22} {'':>8} " + " ".join(f"{'growth / fidelity':>17}" for _ in BETAS))
    for name in args.models.split(","):
        loaded = load(name, args.n, args.image_size, args.imagenet)
        model, x, low, high = (t.to(args.device) for t in loaded)
        for epsilon in EPSILONS:
            cells = {b: measure(model, x, low, high, epsilon, b) for b in BETAS}
            row = " ".join(f"{c['growth']:>9.3g} / {c['fidelity']:5.2f}" for c in cells.values())
            print(f"{name:22} {epsilon:>8g} {row}", flush=True)
            if args.json:
                record = {"model": name, "imagenet": args.imagenet, "epsilon": epsilon}
                append_json(args.json, record | {"cells": cells}, args.device)


if __name__ == "__main__":
    main()
