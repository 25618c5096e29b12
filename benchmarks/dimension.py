"""How the manipulation of explanations grows with the input size.

The same architecture family (:func:`betasmooth.photos.photos_cnn`, VGG-style
ReLU) is trained on the built-in photographs cropped at several sizes, by the
same recipe (``scripts/train_photos_cnn.py``'s ``train``: plain cross-entropy,
seeded; 12 epochs on the data set's 300 crops per photograph, the shipped
photos-cnn's first recipe, unless ``MODES`` says otherwise; with
``--batch-norm`` trained as the shipped photos-cnn is, BatchNorm folded
afterwards), and attacked on
the first ``--n`` test crops, the target of each being the map of another
test crop. Two attacks per method:

- ``paper``: the paper's recipe (:data:`betasmooth.attack.ATTACK_DEFAULTS`:
  its weights, learning rate and number of steps, no budget); with ``--steps``
  below the paper's, each step is longer by the paper's steps over
  ``--steps`` (:func:`betasmooth.attack.default_lr`, the ``lr`` column);
- ``eps``: the same with a fixed budget on the largest change of one pixel
  value, ``--eps`` (default 8/255), the same for every size.

Per size, method and attack: the median PCC of the map to the target before
and after, its gain, the median input MSE, the median largest pixel change and
the labels kept. Trained models are cached in ``--cache`` (one file per size
and training setting), so a second run only attacks. Prints the table, writes
it as JSON lines and a plot.

    python benchmarks/dimension.py                 # 32, 64, 128 px on the CPU
    python benchmarks/dimension.py --quick         # 32 and 64 px, fewer steps: a few minutes
    python benchmarks/dimension.py --device cuda   # adds 224 px
    python benchmarks/dimension.py --batch-norm    # the family trained as photos-cnn 0.8.0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import betasmooth as bs
from arguments import append_json, json_lines
from betasmooth.attack import ATTACK_DEFAULTS, default_lr
from betasmooth.checkpoint import load_state_dict
from betasmooth.cli import positive_integer
from betasmooth.distributed import device_argument
from betasmooth.explain import method_options
from betasmooth.photos import COUNTS, PHOTOS, photo_crops, photos_cnn
from betasmooth.validate import check_positive

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from train_photos_cnn import train  # noqa: E402
from training import accuracy  # noqa: E402

# Settings of a full run and of --quick: sizes, training and attack.
MODES = {
    "full": {"sizes": [32, 64, 128], "epochs": 12, "per_photo": 300, "n": 8, "steps": None},
    "quick": {"sizes": [32, 64], "epochs": 10, "per_photo": 150, "n": 4, "steps": 100},
}


def median(values: torch.Tensor) -> float:
    return float(statistics.median(float(v) for v in values))


def trained(
    size: int, epochs: int, per_photo: int, cache: Path, device: str, batch_norm: bool = False
) -> torch.nn.Module:
    """The model for ``size`` pixels, from the cache or trained on ``device`` (and cached)."""
    # Trained on a GPU the weights differ from the CPU's (see train): cached apart.
    where = "" if device == "cpu" else f"_{device}"
    recipe = "_bn" if batch_norm else ""
    path = cache / f"photos_cnn_{size}px_{epochs}ep_{per_photo}pp{recipe}{where}.pt"
    model = photos_cnn(size)
    if path.is_file():
        model.load_state_dict(load_state_dict(path))
        return model.eval()
    start = time.perf_counter()
    model = train(
        epochs,
        size=size,
        per_photo=per_photo,
        threads=torch.get_num_threads(),
        device=device,
        batch_norm=batch_norm,
    )
    print(f"trained {size} px on {device} in {time.perf_counter() - start:.0f} s", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model


def attack_row(model, x, target, method, attack, options, steps) -> dict[str, object]:
    """One attack on ``x``: medians of its effect."""
    before = bs.compare(bs.heatmap(bs.explain(model, x, method)), target)
    steps = steps or int(ATTACK_DEFAULTS[method]["steps"])
    start = time.perf_counter()
    result = bs.manipulate(model, x, target, method, steps=steps, **options)
    m = result.metrics
    pcc_before, pcc_after = median(before["pcc"]), median(m["expl_pcc_target"])
    return {
        "method": method,
        "attack": attack,
        "steps": steps,
        # The attack's default on [0, 1] inputs: the paper's path in ``steps`` steps.
        "lr": default_lr(method, span=1.0, steps=steps),
        "pcc_before": pcc_before,
        "pcc_after": pcc_after,
        "pcc_gain": pcc_after - pcc_before,
        "input_mse": median(m["input_mse"]),
        "input_max_change": median(m["input_max_change"]),
        "labels_kept": f"{int(result.label_kept.sum())}/{len(x)}",
        "seconds": time.perf_counter() - start,
    }


def measure(size: int, settings: dict, args: argparse.Namespace) -> Iterator[dict[str, object]]:
    """Train or load the model for ``size`` pixels and attack it, one row at a time."""
    model = trained(
        size, settings["epochs"], settings["per_photo"], args.cache, args.device, args.batch_norm
    )
    model = model.to(args.device)
    x_test, y_test, _ = photo_crops("test", size=size)
    acc = accuracy(model, x_test.to(args.device), y_test.to(args.device))
    n = settings["n"]
    x, others = x_test[:n].to(args.device), x_test[n : 2 * n].to(args.device)
    for method in args.methods.split(","):
        target = bs.heatmap(bs.explain(model, others, method))
        for attack, options in (("paper", {}), ("eps", {"eps": args.eps})):
            row = attack_row(model, x, target, method, attack, options, settings["steps"])
            yield {
                "size": size,
                "inputs": 3 * size * size,
                "accuracy": acc,
                "batch_norm": args.batch_norm,
                **row,
            }


HEADER = (
    f"{'size':>5} {'acc':>6} {'method':>9} {'attack':>6} {'steps':>6} {'lr':>8} {'pcc before':>10} "
    f"{'pcc after':>9} {'gain':>7} {'input mse':>10} {'max |dx|':>9} {'kept':>6} {'s':>6}"
)


def format_row(r: dict[str, object]) -> str:
    return (
        f"{r['size']:>5} {r['accuracy']:6.3f} {r['method']:>9} {r['attack']:>6} {r['steps']:>6} "
        f"{r['lr']:8.2e} "
        f"{r['pcc_before']:10.3f} {r['pcc_after']:9.3f} {r['pcc_gain']:+7.3f} "
        f"{r['input_mse']:10.2e} {r['input_max_change']:9.3f} {r['labels_kept']:>6} "
        f"{r['seconds']:6.0f}"
    )


def plot(rows: list[dict[str, object]], path: Path) -> None:
    """PCC gain and input MSE against the input size, one line per method and attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in sorted({(r["method"], r["attack"]) for r in rows}):
        mine = [r for r in rows if (r["method"], r["attack"]) == key]
        sizes = [r["size"] for r in mine]
        label = f"{key[0]} ({key[1]})"
        axes[0].plot(sizes, [r["pcc_gain"] for r in mine], "o-", label=label)
        axes[1].plot(sizes, [r["input_mse"] for r in mine], "o-", label=label)
    axes[0].set(xlabel="input size (px)", ylabel="median PCC gain to target", xscale="log")
    axes[1].set(xlabel="input size (px)", ylabel="median input MSE", xscale="log", yscale="log")
    sizes = sorted({r["size"] for r in rows})
    for ax in axes:
        ax.minorticks_off()
        ax.set_xticks(sizes, [str(s) for s in sizes])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sizes(text: str) -> list[int]:
    """``type=`` of --sizes: positive multiples of 16 (photos_cnn halves the side four times)."""
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(s <= 0 or s % 16 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"expected positive multiples of 16, e.g. 32,64; got {text!r}"
        )
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 and 64 px, short training")
    parser.add_argument("--sizes", type=_sizes, help="comma list of sizes, multiples of 16")
    parser.add_argument("--methods", default="gradient,lrp", help="comma list of attacked methods")
    parser.add_argument(
        "-n", "--images", dest="n", type=positive_integer, help="images attacked per size"
    )
    parser.add_argument(
        "--steps", type=positive_integer, help="attack steps (default: the paper's)"
    )
    parser.add_argument("--eps", type=float, default=8 / 255, help="budget of the eps attack")
    parser.add_argument("--device", default="cpu", type=device_argument, help="cpu or cuda")
    parser.add_argument(
        "--threads", type=positive_integer, default=1, help="torch threads on the CPU (default 1)"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / "runs" / "dimension-cache",
        help="trained models, reused by later runs (default: runs/dimension-cache)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "runs" / "dimension",
        help="the table, its JSON lines and the plot (default: runs/dimension)",
    )
    parser.add_argument("--json", type=json_lines, help="append one JSON line per row to this file")
    parser.add_argument(
        "--batch-norm",
        action="store_true",
        help="train with BatchNorm, folded afterwards, as the shipped photos-cnn (default: "
        "the plain network of the README's table)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    settings = dict(MODES["quick" if args.quick else "full"])
    if torch.device(args.device).type == "cuda" and not args.quick:
        settings["sizes"] = [*settings["sizes"], 224]
    for key in ("n", "steps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.sizes:
        settings["sizes"] = args.sizes
    try:
        for method in args.methods.split(","):
            method_options(method)  # a misspelt method fails before minutes of training
        check_positive("eps", args.eps)
        # Each attacked crop takes another's map as its target: found out after training.
        crops = COUNTS["test"] * len(PHOTOS)
        if 2 * settings["n"] > crops:
            raise bs.InputError(
                f"-n {settings['n']} needs {2 * settings['n']} test crops ({settings['n']} "
                f"attacked, {settings['n']} whose maps are the targets); photos has {crops}"
            )
        args.out.mkdir(parents=True, exist_ok=True)
        run(args, settings)
    except bs.InputError as err:
        parser.error(str(err))
    except OSError as err:
        parser.error(f"{err.filename}: {err.strerror}" if err.filename else str(err))


def run(args: argparse.Namespace, settings: dict) -> None:
    print(HEADER, flush=True)
    rows = []
    # Each row is written as soon as it is measured: a run cut short keeps its rows.
    with open(args.out / "dimension.jsonl", "w") as f:
        for size in settings["sizes"]:
            for row in measure(size, settings, args):
                rows.append(row)
                print(format_row(row), flush=True)
                f.write(json.dumps(row) + "\n")
                f.flush()
                append_json(args.json, {"benchmark": "dimension", **row}, args.device)
    print("\n" + HEADER + "\n" + "\n".join(format_row(r) for r in rows))
    plot(rows, args.out / "dimension.png")
    print(f"wrote {args.out / 'dimension.jsonl'} and {args.out / 'dimension.png'}")


if __name__ == "__main__":
    main()
