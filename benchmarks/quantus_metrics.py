"""Beta-smoothing measured by Quantus: robustness and faithfulness of each method, with times.

Quantus' robustness metrics (MaxSensitivity, LocalLipschitzEstimate,
RelativeInputStability; lower is more robust) and FaithfulnessCorrelation
(higher is more faithful) on the built-in digits-cnn and digits test images,
for gradient, smoothgrad (n=50), beta_smooth, lrp and lrp under
beta-smoothing (beta 1 and 10), each called by Quantus through ``bs.quantus_explain``. The
metrics run with Quantus' defaults except the number of samples (``--samples``
perturbations per image, ``--runs`` subsets for FaithfulnessCorrelation) and
FaithfulnessCorrelation's subset of 128 pixels (Quantus' default is 224), each
with numpy seeded alike. Each cell is the median over the images (NaN where
Quantus returns NaN, e.g. RelativeInputStability when the prediction flips,
left out). "explain s" is one explanation of the batch (best of 3) and
"x gradient" its ratio to the gradient's, both measured in this run; "metrics
s" is the time of the four metrics.

Examples
--------
    python benchmarks/quantus_metrics.py -n 32 --samples 10 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm

import betasmooth as bs
from arguments import append_json, json_lines
from betasmooth.cli import positive_integer
from betasmooth.distributed import device_argument

BETA = 1.0  # the beta that undoes the attacks on digits-cnn (README, attack table)
METHODS = {
    "gradient": {"method": "gradient"},
    "smoothgrad n=50": {"method": "smoothgrad", "n": 50, "sigma": 0.15, "input_range": 1.0},
    f"beta_smooth beta={BETA:g}": {"method": "beta_smooth", "beta": BETA},
    "lrp": {"method": "lrp"},
    f"lrp + beta_smooth beta={BETA:g}": {"method": "beta_smooth", "beta": BETA, "base": "lrp"},
    # LRP's rules divide by pre-activations; softplus keeps units near z = 0
    # alive, so LRP needs a larger beta than the gradient.
    "lrp + beta_smooth beta=10": {"method": "beta_smooth", "beta": 10.0, "base": "lrp"},
}


def metrics(samples: int, runs: int) -> dict[str, object]:
    import quantus

    common = {"disable_warnings": True, "display_progressbar": False}
    return {
        "MaxSensitivity": quantus.MaxSensitivity(nr_samples=samples, **common),
        "LocalLipschitz": quantus.LocalLipschitzEstimate(nr_samples=samples, **common),
        "RelInputStability": quantus.RelativeInputStability(nr_samples=samples, **common),
        "FaithfulnessCorr": quantus.FaithfulnessCorrelation(
            nr_runs=runs, subset_size=128, return_aggregate=False, **common
        ),
    }


def explain_seconds(model, x, y, kwargs, repeats=3):
    bs.quantus_explain(model, x, y, **kwargs)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        bs.quantus_explain(model, x, y, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best


def evaluate(model, x, y, kwargs, samples, runs, seed, device):
    scores, start = {}, time.perf_counter()
    for name, metric in metrics(samples, runs).items():
        np.random.seed(seed)
        torch.manual_seed(seed)
        values = metric(
            model=model, x_batch=x, y_batch=y, a_batch=None, device=device,
            explain_func=bs.quantus_explain, explain_func_kwargs=kwargs,
        )  # fmt: skip
        scores[name] = float(np.nanmedian(np.asarray(values, dtype=float)))
    return scores, time.perf_counter() - start


def table(rows):
    names = list(next(iter(rows.values()))["scores"])
    head = ["method", *names, "explain s", "x gradient", "metrics s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows["gradient"]["explain_s"]
    for method, row in rows.items():
        cells = [f"{row['scores'][n]:.3g}" for n in names]
        cells += [f"{row['explain_s']:.3f}", f"{row['explain_s'] / base:.1f}"]
        cells += [f"{row['metrics_s']:.1f}"]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-n", "--images", dest="n", type=positive_integer, default=32, help="test images"
    )
    parser.add_argument(
        "--samples", type=positive_integer, default=10, help="perturbations per image"
    )
    parser.add_argument(
        "--runs", type=positive_integer, default=50, help="FaithfulnessCorrelation runs"
    )
    parser.add_argument("--seed", type=int, default=0, help="numpy's seed for every metric")
    parser.add_argument("--device", default="cpu", type=device_argument, help="cpu or cuda")
    parser.add_argument(
        "--threads", type=positive_integer, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--json", type=json_lines, help="append the results as a JSON line to FILE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args()
    # Imported once the arguments are read: it takes seconds, which a bad argument should not wait.
    import quantus

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model = bs.load_model("digits-cnn").to(args.device)
    x, y = bs.load_data("digits")
    x, y = x[: args.n].numpy(), y[: args.n].numpy()
    args.n = len(x)  # the data set may hold fewer than -n images: report those measured
    rows = {}
    quiet = args.no_progress or not sys.stderr.isatty()
    for method, kwargs in tqdm(METHODS.items(), desc="methods", disable=quiet):
        kwargs = {**kwargs, "device": args.device}
        scores, seconds = evaluate(
            model, x, y, kwargs, args.samples, args.runs, args.seed, args.device
        )
        rows[method] = {
            "scores": scores,
            "metrics_s": seconds,
            "explain_s": explain_seconds(model, x, y, kwargs),
        }
    print(
        f"digits-cnn, {args.n} test images, {args.samples} samples per image, "
        f"{args.runs} faithfulness runs, {args.device}, torch threads {torch.get_num_threads()}"
    )
    print(table(rows))
    record = {"benchmark": "quantus", "args": vars(args), "rows": rows,
              "quantus": quantus.__version__}  # fmt: skip
    append_json(args.json, record, args.device)


if __name__ == "__main__":
    main()
