"""Absolute beta against beta relative to each layer's pre-activation scale.

Beta-smoothing replaces every ReLU by ``softplus_beta`` with one beta for the
whole network. A layer whose pre-activations spread over ``std_i`` sees the
kink smoothed over ``1 / (beta std_i)`` of its own scale, so one beta means
different things in different layers and models. The relative
parametrisation gives layer ``i`` the sharpness ``beta_i = beta_rel / std_i``,
with ``std_i`` the standard deviation of its pre-activations on training
images. The question measured here: does the recommended ``beta_rel`` vary
less across models than the recommended absolute beta?

For each model: attack a few test images on the gradient map (targets from
``random_targets``), then for each beta of the sweep compute median
robustness (PCC of the defended map of ``x_adv`` against the defended map of
``x``) and fidelity (PCC of the defended map of ``x`` against the undefended
map of ``x``), as :func:`betasmooth.defense_sweep` and
:mod:`betasmooth.recommend` define them; the recommended beta is the most
robust one with median fidelity >= 0.9. The absolute row is
``defense_sweep``'s own; the relative row uses the same definitions on a copy
of the model whose ReLU modules compute ``softplus(x, beta_rel / std_i)``.
The spread of log10 of the recommended beta across models is printed for
both parametrisations.

Usage::

    python benchmarks/relative_beta.py [-n 8] [--steps 100] [--std-images 64]
                                       [--device cpu] [--json FILE] [--no-progress]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import betasmooth as bs
from arguments import append_json, json_lines
from betasmooth.attack import random_targets
from betasmooth.cli import positive_integer
from betasmooth.distributed import device_argument
from betasmooth.explain.gradient import predict
from betasmooth.recommend import MIN_FIDELITY, recommend_beta
from betasmooth.smooth import softplus

ROOT = Path(__file__).resolve().parents[1]
BETAS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
IMAGENET = {"channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# Model name -> (model spec, data spec, load_data options).
MODELS = {
    "digits-cnn": ("digits-cnn", "digits", {}),
    "photos-cnn": ("photos-cnn", "photos", {}),
    # Found from the repository root, wherever the script is run from.
    "normalised-digits": (
        f"{ROOT / 'scripts' / 'normalised_digits_cnn.py'}:model",
        "digits",
        IMAGENET,
    ),
}


class LayerSoftplus(nn.Module):
    """``softplus_beta`` with this layer's own beta."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softplus(x, self.beta)


def relu_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]


def preactivation_stds(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Standard deviation of each ReLU's input over all its units and images."""
    stds: list[float] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, args: stds.append(float(args[0].std())))
        for m in model.modules()
        if isinstance(m, nn.ReLU)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return stds


def per_layer_softplus(model: nn.Module, betas: list[float]) -> nn.Module:
    """A copy of ``model`` whose i-th ReLU module computes ``softplus(x, betas[i])``."""
    smoothed = copy.deepcopy(model)
    for name, beta in zip(relu_names(model), betas, strict=True):
        parent, _, leaf = name.rpartition(".")
        owner = smoothed.get_submodule(parent) if parent else smoothed
        setattr(owner, leaf, LayerSoftplus(beta))
    return smoothed


def pcc_median(a: torch.Tensor, b: torch.Tensor) -> float:
    # The median of an even count is the mean of the middle two, as metrics.medians has it.
    return statistics.median(bs.compare(a, b)["pcc"].tolist())


def relative_cells(
    model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, stds: list[float], scale: bool
) -> dict[str, dict[str, float]]:
    """Median robustness and fidelity per beta; betas divided by the layer stds if ``scale``.

    Robustness over the images the attack changed, fidelity over all, as the sweep's
    summary takes them.
    """
    label = predict(model, x)
    map_orig = bs.heatmap(bs.explain(model, x, "gradient", label)).detach()
    both = torch.cat([x_adv, x])
    changed = (x_adv != x).flatten(1).any(1)
    if not changed.any():
        changed = torch.ones_like(changed)
    cells = {}
    for beta in BETAS:
        layer_betas = [beta / s if scale else beta for s in stds]
        smoothed = per_layer_softplus(model, layer_betas)
        maps = bs.heatmap(bs.explain(smoothed, both, "gradient", label.repeat(2))).detach()
        adv, clean = maps.chunk(2)
        cells[f"{beta:g}"] = {
            "robustness_pcc": pcc_median(adv[changed], clean[changed]),
            "fidelity_pcc": pcc_median(clean, map_orig),
        }
    return cells


def measure(name: str, args: argparse.Namespace) -> dict[str, object]:
    spec, data_spec, options = MODELS[name]
    model = bs.load_model(spec).eval().to(args.device)
    train = bs.load_data(data_spec, "train", **options)
    test = bs.load_data(data_spec, "test", **options)
    stds = preactivation_stds(model, train.x[: args.std_images].to(args.device))
    images = test.x[: 2 * args.n].to(args.device)
    x = images[: args.n]
    maps = bs.heatmap(bs.explain(model, images, "gradient")).detach()
    targets = random_targets(maps, torch.Generator().manual_seed(0))[: args.n]
    bounds = (test.low.to(args.device), test.high.to(args.device))
    start = time.perf_counter()
    attacked = bs.manipulate(
        model, x, targets, "gradient", steps=args.steps, data_range=bounds, progress=args.progress
    )
    sweep = bs.defense_sweep(
        model,
        x,
        attacked.x_adv,
        targets,
        "gradient",
        list(BETAS),
        defenses=("beta_smooth",),
        data_range=bounds,
    )
    summary = sweep.summary(min_fidelity=MIN_FIDELITY)
    absolute = {k: dict(v) for k, v in summary["betas"].items()}
    # The same computation with one beta everywhere must reproduce defense_sweep's numbers.
    check = relative_cells(model, x, attacked.x_adv, [1.0] * len(stds), scale=False)
    for key, cell in check.items():
        for m in ("robustness_pcc", "fidelity_pcc"):
            if not math.isclose(cell[m], absolute[key][m], abs_tol=1e-4):
                raise RuntimeError(f"{name} beta {key} {m}: {cell[m]} vs {absolute[key][m]}")
    relative = relative_cells(model, x, attacked.x_adv, stds, scale=True)
    return {
        "stds": stds,
        "undefended": summary["undefended"]["robustness_pcc"],
        "absolute": absolute,
        "relative": relative,
        "rec_absolute": recommend_beta(absolute),
        "rec_relative": recommend_beta(relative),
        "seconds": time.perf_counter() - start,
    }


def print_model(name: str, r: dict[str, object]) -> None:
    stds = ", ".join(f"{s:.3g}" for s in r["stds"])
    print(f"\n{name}: pre-activation std per ReLU: {stds}")
    print(f"undefended robustness (median PCC): {r['undefended']:.3f}")
    head = ("abs robust", "abs fidel", "rel robust", "rel fidel")
    print(f"{'beta':>6}  {head[0]:>10} {head[1]:>10}  {head[2]:>10} {head[3]:>10}")
    for beta in BETAS:
        a, b = r["absolute"][f"{beta:g}"], r["relative"][f"{beta:g}"]
        marks = ["*" if r[f"rec_{kind}"] == beta else " " for kind in ("absolute", "relative")]
        print(
            f"{beta:>6g}  {a['robustness_pcc']:>10.3f} {a['fidelity_pcc']:>9.3f}{marks[0]}"
            f"  {b['robustness_pcc']:>10.3f} {b['fidelity_pcc']:>9.3f}{marks[1]}"
        )
    print(f"recommended: absolute {r['rec_absolute']}, relative {r['rec_relative']}")


def spread(values: list[float | None]) -> str:
    found = [math.log10(v) for v in values if v is not None]
    if len(found) < 2:
        return "undefined (fewer than two models have a recommended beta)"
    return f"{max(found) - min(found):.2f} decades (sd {statistics.pstdev(found):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "-n", type=positive_integer, default=8, help="attacked test images per model"
    )
    parser.add_argument("--steps", type=positive_integer, default=100, help="attack steps")
    parser.add_argument(
        "--std-images", type=positive_integer, default=64, help="training images for the stds"
    )
    parser.add_argument("--device", default="cpu", type=device_argument, help="cpu or cuda")
    parser.add_argument(
        "--threads", type=positive_integer, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--json", type=json_lines, help="append the results as a JSON line to FILE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.progress = not args.no_progress and sys.stderr.isatty()
    torch.manual_seed(0)
    results = {name: measure(name, args) for name in MODELS}
    for name, r in results.items():
        print_model(name, r)
    print(f"\n{args.n} images, {args.steps} steps, gradient; * = recommended (fidelity >= 0.9)")
    for kind in ("absolute", "relative"):
        recs = [r[f"rec_{kind}"] for r in results.values()]
        print(f"{kind:>8}: recommended {recs}; spread of log10 beta {spread(recs)}")
    record = {"benchmark": "relative_beta", **vars(args), "results": results}
    append_json(args.json, record, args.device)


if __name__ == "__main__":
    main()
