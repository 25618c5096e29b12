"""Explanation speed and agreement against Captum, and beta_smooth against SmoothGrad.

Every ratio is measured in one run on the built-in model and data: warm-up,
then the best of ``--repeats`` timings of each method on the same batch.

- smoothgrad (n=50) against Captum ``NoiseTunnel(Saliency)``, nt_type
  "smoothgrad", nt_samples=50, the same noise level, Captum's defaults
  otherwise; agreement is the mean PCC of the heatmaps (the draws differ, so
  it is compared with the PCC between two of our own runs with other seeds);
- integrated_gradients (steps=50) against Captum ``IntegratedGradients``
  (n_steps=50, gausslegendre): maximum absolute difference of the maps;
- beta_smooth against smoothgrad n=50 with logistic noise of the matched
  standard deviation ``pi / (sqrt(3) beta)``, i.e. scale ``1 / beta`` (Theorem 2
  matches ``1 / (beta |w|)``; deep networks have no single ``|w|``): time
  ratio and PCC, beside the PCC of two SmoothGrad runs with other draws;
- peak memory of integrated_gradients and smoothgrad with the default chunk
  and without chunking (all points in one pass): on CUDA
  ``torch.cuda.max_memory_allocated``, on CPU the growth of the peak resident
  set (``VmHWM``, reset first) in a fresh process per configuration.

Examples
--------
    python benchmarks/explain.py --device cpu --batch 64 --json results.jsonl
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial

import torch

import betasmooth as bs
from arguments import append_json, json_lines
from betasmooth.cli import positive_integer
from betasmooth.distributed import device_argument
from betasmooth.metrics import pcc

SIGMA = 0.15  # SmoothGrad noise level, fraction of the [0, 1] input range
BETAS = (3.0, 10.0, 30.0)

# Memory configurations: label -> (method, options); chunk=50 puts all 50
# interpolation points or noisy copies into one pass, as Captum does by default.
MEMORY = {
    "ig_chunked": ("integrated_gradients", {"steps": 50}),
    "ig_one_pass": ("integrated_gradients", {"steps": 50, "chunk": 50}),
    "sg_chunked": ("smoothgrad", {"n": 50, "input_range": 1.0, "seed": 0}),
    "sg_one_pass": ("smoothgrad", {"n": 50, "input_range": 1.0, "seed": 0, "chunk": 50}),
    "captum_ig": ("captum_ig", {}),
    "captum_sg": ("captum_sg", {}),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(fns, device, repeats):
    """Best time of each function; repeats interleave them so that load on the machine hits all."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def agreement(a, b):
    return pcc(bs.heatmap(a), bs.heatmap(b)).mean().item()


def setup(device, batch):
    model = bs.load_model("digits-cnn").to(device)
    x, _ = bs.load_data("digits")
    x = x[:batch].to(device)
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, target


def runners(model, x, target):
    """The methods compared, each returning a map; ours take the method's options as keywords."""
    # Imported here, not at the top: it takes seconds, which a bad argument should not wait.
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    saliency = NoiseTunnel(Saliency(model))
    ig = IntegratedGradients(model)
    return {
        "integrated_gradients": lambda **o: bs.explain(
            model, x, "integrated_gradients", target, **o
        ),
        "smoothgrad": lambda **o: bs.explain(model, x, "smoothgrad", target, **o),
        "captum_ig": lambda: ig.attribute(x, target=target, n_steps=50, method="gausslegendre"),
        "captum_sg": lambda: saliency.attribute(
            x, nt_type="smoothgrad", nt_samples=50, stdevs=SIGMA, target=target, abs=False
        ),
    }


def memory_child(device, batch_file, label):
    """Peak memory of one configuration, in MiB over what set-up used."""
    model = bs.load_model("digits-cnn").to(device)
    x, target = (t.to(device) for t in torch.load(batch_file, weights_only=True))
    run = runners(model, x, target)
    method, options = MEMORY[label]
    # One image first: the one-time allocations of a first call (autograd's and
    # the kernels' workspaces) then fall into the base, not into the peak.
    runners(model, x[:1], target[:1])[method](**options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run[method](**options)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base = _reset_peak_rss()
    run[method](**options)
    return (_peak_rss() - base) / 2**10


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _reset_peak_rss():
    """The resident set now, in KiB, after resetting the peak where Linux allows it."""
    # ru_maxrss survives exec (a child starts with its parent's peak), so the
    # peak is read from /proc and reset there.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS:")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss():
    try:
        return _status_kib("VmHWM:")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory(args, x, target):
    # The batch goes through a file: loading the data set in each child would
    # set a peak of its own, above that of the smaller configurations.
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = os.path.join(tmp, "batch.pt")
        torch.save((x.cpu(), target.cpu()), batch_file)
        for label in MEMORY:
            out = subprocess.run(
                [sys.executable, __file__, "--device", args.device, "--threads",
                 str(torch.get_num_threads()), "--memory-child", label, "--batch-file", batch_file],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            peaks[label] = float(out.stdout.strip().splitlines()[-1])
    return peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", type=device_argument, help="cpu or cuda")
    parser.add_argument(
        "--batch", type=positive_integer, default=64, help="images per batch (default 64)"
    )
    parser.add_argument(
        "--repeats", type=positive_integer, default=3, help="timings per method, the fastest kept"
    )
    parser.add_argument(
        "--threads", type=positive_integer, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--json", type=json_lines, help="append the results as a JSON line to FILE")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(memory_child(device, args.batch_file, args.memory_child))
        return

    torch.manual_seed(0)
    model, x, target = setup(device, args.batch)
    run = runners(model, x, target)
    k = args.repeats
    sg = {"n": 50, "sigma": SIGMA, "input_range": 1.0}
    # The data set may hold fewer images than --batch: report the batch measured.
    res = {"device": args.device, "batch": len(x), "threads": torch.get_num_threads()}
    ig_ours = partial(run["integrated_gradients"], steps=50)
    sg_ours = partial(run["smoothgrad"], **sg, seed=0)

    times = race(
        {
            "sg": sg_ours,
            "captum_sg": run["captum_sg"],
            "ig": ig_ours,
            "captum_ig": run["captum_ig"],
        },
        device,
        k,
    )
    res.update({f"t_{name}": t for name, t in times.items()})
    ours = sg_ours()
    res["pcc_sg_captum"] = agreement(ours, run["captum_sg"]())
    res["pcc_sg_ours_other_seed"] = agreement(ours, run["smoothgrad"](**sg, seed=1))
    ours, theirs = ig_ours(), run["captum_ig"]()
    res["ig_max_abs_diff"] = (ours - theirs).abs().max().item()
    res["ig_max_abs"] = theirs.abs().max().item()

    for beta in BETAS:
        sigma = math.pi / (math.sqrt(3) * beta)  # logistic std at scale 1 / beta
        logistic = partial(run["smoothgrad"], **{**sg, "sigma": sigma, "noise": "logistic"})
        smooth = partial(bs.explain, model, x, "beta_smooth", target, beta=beta)
        times = race({"bs": smooth, "sg": partial(logistic, seed=0)}, device, k)
        sg_map, bs_map = logistic(seed=0), smooth()
        res[f"beta{beta:g}"] = {
            "sigma": sigma,
            "t_beta_smooth": times["bs"],
            "t_smoothgrad": times["sg"],
            "pcc": agreement(bs_map, sg_map),
            "pcc_sg_other_seed": agreement(sg_map, logistic(seed=1)),
            "pcc_plain_gradient": agreement(bs_map, bs.explain(model, x, "gradient", target)),
        }

    if not args.no_memory:
        res["peak_mib"] = peak_memory(args, x, target)
    report(res)
    append_json(args.json, {"benchmark": "explain", **res}, args.device)


def report(r):
    print(f"device {r['device']}, batch {r['batch']}, {r['threads']} threads; best of repeats")
    print(f"{'comparison':44s} {'ours s':>8s} {'base s':>8s} {'ratio':>6s}  agreement")
    print(
        f"{'smoothgrad n=50 vs Captum NoiseTunnel':44s} {r['t_sg']:8.3f} {r['t_captum_sg']:8.3f} "
        f"{r['t_sg'] / r['t_captum_sg']:6.2f}  PCC {r['pcc_sg_captum']:.3f} "
        f"(ours, other seed: {r['pcc_sg_ours_other_seed']:.3f})"
    )
    print(
        f"{'integrated_gradients 50 vs Captum IG':44s} {r['t_ig']:8.3f} {r['t_captum_ig']:8.3f} "
        f"{r['t_ig'] / r['t_captum_ig']:6.2f}  max|diff| {r['ig_max_abs_diff']:.1e} "
        f"(max|map| {r['ig_max_abs']:.1e})"
    )
    for beta in BETAS:
        b = r[f"beta{beta:g}"]
        name = f"beta_smooth b={beta:g} vs smoothgrad logistic s={b['sigma']:.3f}"
        print(
            f"{name:44s} {b['t_beta_smooth']:8.3f} {b['t_smoothgrad']:8.3f} "
            f"{b['t_beta_smooth'] / b['t_smoothgrad']:6.3f}  PCC {b['pcc']:.3f} "
            f"(sg other seed {b['pcc_sg_other_seed']:.3f}, "
            f"plain gradient {b['pcc_plain_gradient']:.3f})"
        )
    if "peak_mib" in r:
        cuda = torch.device(r["device"]).type == "cuda"
        unit = "max_memory_allocated" if cuda else "peak RSS growth"
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_mib"].items())
        print(f"peak memory MiB ({unit}): {peaks}")


if __name__ == "__main__":
    main()
