"""Throughput of `betasmooth attack` with 1 and 2 processes under torchrun.

Runs the same attack three ways on the same cores and prints images per
second and the ratios:

- one process, one thread (the baseline);
- one process, two threads (intra-op parallelism);
- two processes under torchrun (gloo), one thread each (sharded work units).

Each mode is timed twice, a full run of n images and a start-up run (2 images,
1 step), and throughput is n / (t_full - t_start): the difference is the attack
of the n images without interpreter start, imports and process-group set-up
(less one step of one batch, under 1 % of 200 steps). A run of 2 images with
all the steps would not serve as the start-up: a batch costs about the same
whether it holds 2 or 8 images on a small network, and under torchrun one
rank would do it alone. Each mode's two runs follow each other; on a machine
shared with other jobs, run it twice and compare.

Usage::

    python benchmarks/scale.py [-n 32] [--steps 200] [--method gradient]
                               [--batch-size 8] [--device cpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from arguments import append_json, json_lines
from betasmooth.cli import positive_integer
from betasmooth.distributed import device_argument

# Mode -> (processes, threads per process).
MODES = {
    "1 process x 1 thread": (1, 1),
    "1 process x 2 threads": (1, 2),
    "2 processes x 1 thread": (2, 1),
}


def _command(mode: str, args: argparse.Namespace, n: int, steps: int, out: str) -> list[str]:
    attack = ["attack", "--model", "digits-cnn", "--data", "digits", "--method", args.method]
    attack += ["-n", str(n), "--steps", str(steps), "--batch-size", str(args.batch_size)]
    attack += ["--device", args.device, "--no-progress", "--out", out]
    processes = MODES[mode][0]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        return [*launcher, "--nproc-per-node", str(processes), "-m", "betasmooth", *attack]
    return [sys.executable, "-m", "betasmooth", *attack]


def _time(mode: str, args: argparse.Namespace, n: int, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(MODES[mode][1])}
    if torch.device(args.device).type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = _command(mode, args, n, steps, os.path.join(tmp, "run"))
        start = time.perf_counter()
        status = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode
        if status:
            # betasmooth has printed why (e.g. an unknown --method); no traceback on top.
            message = f"scale.py: error: {mode}: betasmooth attack exited with status {status}"
            print(message, file=sys.stderr)
            sys.exit(status)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-n", "--images", dest="n", type=positive_integer, default=32, help="images (default 32)"
    )
    parser.add_argument(
        "--steps", type=positive_integer, default=200, help="attack steps (default 200)"
    )
    parser.add_argument("--method", default="gradient", help="attacked method (default gradient)")
    parser.add_argument(
        "--batch-size", type=positive_integer, default=8, help="images per batch (default 8)"
    )
    parser.add_argument("--device", default="cpu", type=device_argument, help="cpu or cuda")
    parser.add_argument("--json", type=json_lines, help="append the results as a JSON line to FILE")
    args = parser.parse_args()
    if args.n <= 2:
        parser.error("-n must exceed 2: the start-up run already takes 2 images")

    rates = {}
    for mode in MODES:
        base = _time(mode, args, 2, 1)
        full = _time(mode, args, args.n, args.steps)
        if full <= base:
            raise SystemExit(
                f"{mode}: the full run ({full:.1f} s) was no slower than start-up ({base:.1f} s); "
                "raise -n or --steps so that the attack dominates"
            )
        rates[mode] = args.n / (full - base)
        print(f"{mode:24s} {rates[mode]:8.2f} images/s  (run {full:.1f} s, start-up {base:.1f} s)")
    one = rates["1 process x 1 thread"]
    two_threads = rates["1 process x 2 threads"]
    two_procs = rates["2 processes x 1 thread"]
    print(f"2 threads in 1 process / 1 thread:     {two_threads / one:.2f}")
    print(f"2 processes x 1 thread / 1 thread:     {two_procs / one:.2f}")
    print(f"2 processes x 1 thread / 2 threads:    {two_procs / two_threads:.2f}")
    append_json(
        args.json,
        {
            "benchmark": "scale",
            "n": args.n,
            "steps": args.steps,
            "method": args.method,
            "batch_size": args.batch_size,
            "images_per_s": rates,
            "ratio_2threads_vs_1": two_threads / one,
            "ratio_2procs_vs_1": two_procs / one,
            "ratio_2procs_vs_2threads": two_procs / two_threads,
        },
        args.device,
    )


if __name__ == "__main__":
    main()
