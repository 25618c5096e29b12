"""LRP speed against Zennit on torchvision CNNs, and against one gradient on transformers.

Every ratio is measured in one run, on one batch of random images and
torchvision architectures with random weights (no download): warm-up, then
the best of ``--repeats`` interleaved timings.

- VGG16 and ResNet-18: ``bs.explain(..., "lrp", composite="epsilon_plus_flat")``
  against Zennit's ``EpsilonPlusFlat`` (with ``ResNetCanonizer`` for the
  ResNet) and its ``Gradient`` attributor; agreement is the largest
  difference of the maps relative to the largest map value;
- ViT-B/16, ConvNeXt-T, MaxViT-T and Swin-T, which Zennit has no rules for: the same
  LRP against one plain gradient (``torch.autograd.grad``) of the target
  logit, the cost of one backward pass.

Examples
--------
    python benchmarks/lrp.py --threads 2 --batch 4 --json results.jsonl
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

import betasmooth as bs
from arguments import append_json, json_lines
from betasmooth.cli import positive_integer
from betasmooth.distributed import device_argument
from explain import race

# name: (image size, Zennit canonizers or None where Zennit has no rules)
MODELS = {
    "vgg16": (64, []),
    "resnet18": (64, [ResNetCanonizer]),
    "vit_b_16": (224, None),
    "convnext_tiny": (64, None),
    "maxvit_t": (224, None),
    "swin_t": (224, None),
}


def zennit(model, x, target, canonizers):
    composite = EpsilonPlusFlat(canonizers=[c() for c in canonizers])
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(x, lambda out: F.one_hot(target, out.shape[1]) * out)
    return relevance


def gradient(model, x, target):
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
    return grad


def build(name, device):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=1000).eval()
    for module in model.modules():
        # Random weights as torchvision initialises them leave some maps zero: a
        # zero ViT head, ConvNeXt's layer scales of 1e-6.
        if name == "vit_b_16" and module is model.heads.head:
            torch.nn.init.normal_(module.weight, std=0.02)
        if hasattr(module, "layer_scale"):
            torch.nn.init.constant_(module.layer_scale, 0.1)
    return model.to(device)


def measure(name, batch, device, repeats):
    size, canonizers = MODELS[name]
    model = build(name, device)
    x = torch.rand(batch, 3, size, size, device=device)
    with torch.no_grad():
        target = model(x).argmax(1)

    def ours():
        return bs.explain(model, x, "lrp", target, composite="epsilon_plus_flat")

    if canonizers is None:
        baseline, label = (lambda: gradient(model, x, target)), "one gradient"
    else:
        baseline, label = (lambda: zennit(model, x, target, canonizers)), "Zennit EpsilonPlusFlat"
    times = race({"ours": ours, "base": baseline}, device, repeats)
    row = {"model": name, "size": size, "baseline": label, "t_ours": times["ours"]}
    row["t_base"] = times["base"]
    if canonizers is not None:
        mine, theirs = ours(), baseline()
        row["max_rel_diff"] = ((mine - theirs).abs().max() / theirs.abs().max()).item()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", type=device_argument, help="cpu or cuda")
    parser.add_argument("--batch", type=positive_integer, default=4, help="images (default 4)")
    parser.add_argument(
        "--repeats", type=positive_integer, default=3, help="timings per method, the fastest kept"
    )
    parser.add_argument(
        "--threads", type=positive_integer, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}"
    )
    parser.add_argument("--json", type=json_lines, help="append the results as a JSON line to FILE")
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        parser.error(
            f"--models: unknown {', '.join(unknown) or '(none)'}; expected of {', '.join(MODELS)}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(args.device)
    print(
        f"device {device}, batch {args.batch}, {torch.get_num_threads()} threads; best of repeats"
    )
    print(f"{'model':14s} {'px':>4s} {'lrp s':>8s} {'base s':>8s} {'ratio':>6s}  baseline")
    rows = []
    for name in names:
        row = measure(name, args.batch, torch.device(device), args.repeats)
        rows.append(row)
        agree = f", max rel diff {row['max_rel_diff']:.1e}" if "max_rel_diff" in row else ""
        print(
            f"{name:14s} {row['size']:4d} {row['t_ours']:8.3f} {row['t_base']:8.3f} "
            f"{row['t_ours'] / row['t_base']:6.2f}  {row['baseline']}{agree}"
        )
    append_json(args.json, {"benchmark": "lrp", "batch": args.batch, "rows": rows}, device)


if __name__ == "__main__":
    main()
