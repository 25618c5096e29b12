"""The ``betasmooth`` command: demo, attack, sweep, explain, theorem, curvature, report.

Every subcommand is a function ``cmd_<name>(args) -> int`` registered in
:data:`COMMANDS`. Problems with user input end in one line on stderr,
``betasmooth: error: ...``, and exit status 2; inputs are checked before the
run directory is created or written to, so nothing already there is lost.

Examples
--------
>>> main(["demo", "--out", "/tmp/demo", "--quick"])  # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

# Not imported here: report and figures, which load matplotlib. The functions
# that use them import them, so that `betasmooth --help` and a failed input
# check answer without that wait.
from . import runs, theory
from .attack import ATTACK_DEFAULTS
from .runs import RunDir
from .validate import InputError
from .zoo import BUILTIN_DATA, BUILTIN_MODELS, data_range

__all__ = ["COMMANDS", "build_parser", "main", "summary_table"]

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Command] = {}

# Columns of the summary table of an attack run: (field, header).
ATTACK_COLUMNS = (
    ("label_kept", "kept"),
    ("expl_pcc_target_before", "pcc tgt0"),
    ("expl_pcc_target", "pcc tgt"),
    ("expl_ssim_target_before", "ssim tgt0"),
    ("expl_ssim_target", "ssim tgt"),
    ("expl_pcc_orig", "pcc orig"),
    ("input_mse", "input mse"),
    ("input_max_change", "max |dx|"),
    ("output_change", "d output"),
    ("seconds", "s/img"),
)
SWEEP_COLUMNS = (
    ("adv_vs_orig_pcc", "pcc adv/orig"),
    ("adv_vs_target_pcc", "pcc adv/tgt"),
    ("clean_vs_orig_pcc", "pcc clean/orig"),
    ("seconds", "s/img"),
)

# Sizes of the demo: every loop is bounded so that the default run on digits
# takes at most 10 minutes and --quick at most one minute on 2 CPU cores.
DEMO_SIZES: dict[str, dict[str, object]] = {
    "default": {
        "n": 32,
        "steps": 200,
        "batch_size": 16,
        "betas": [0.5, 1.0, 2.0, 5.0, 10.0, 20.0],
        "smoothgrad_n": 16,
        "smoothgrad_attack_n": 8,
        "ig_steps": 16,
        "quick_theory": False,
    },
    "quick": {
        "n": 8,
        "steps": 60,
        "batch_size": 8,
        "betas": [1.0, 5.0, 20.0],
        "smoothgrad_n": 8,
        "smoothgrad_attack_n": 4,
        "ig_steps": 8,
        "quick_theory": True,
    },
}
# The photographs are larger (3 x 64 x 64) and photos-cnn is deeper: fewer
# images and steps keep the default under 15 minutes and --quick under 90 s.
PHOTO_DEMO_SIZES: dict[str, dict[str, object]] = {
    "default": {**DEMO_SIZES["default"], "n": 8, "steps": 200, "batch_size": 8, "smoothgrad_n": 8},
    "quick": {**DEMO_SIZES["quick"], "n": 4, "steps": 30, "batch_size": 4},
}
# Demo sizes by data; any other data takes those of the photographs.
DEMO_SIZES_BY_DATA = {"digits": DEMO_SIZES, "photos": PHOTO_DEMO_SIZES}


def command(name: str) -> Callable[[Command], Command]:
    """Register a subcommand function under ``name``."""

    def decorate(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn

    return decorate


# ----------------------------------------------------------------------------- parsing


def _floats(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of numbers, e.g. 0.5,1,2,5; got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number, e.g. 0.5,1,2,5")
    return values


def _betas(text: str) -> list[float | None]:
    # "relu" stands for the network itself (beta = infinity).
    return [None if t.strip() == "relu" else _floats(t)[0] for t in text.split(",") if t.strip()]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="digits-cnn, path/to/file.py:factory or pkg.mod:factory"
    )
    p.add_argument(
        "--weights", help="state dict file for the model (loaded with weights_only=True)"
    )
    p.add_argument(
        "--data", required=True, help="digits, a folder of images or an .npz with x (and y)"
    )
    p.add_argument("--image-size", type=_positive, help="resize images to this size")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 (grey) or 3 (RGB)")
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean (one or per channel)")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std (one or per channel)")


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bars (default: shown on a terminal)",
    )


def _add_run(p: argparse.ArgumentParser, n: int | None = 16) -> None:
    p.add_argument("--out", required=True, help="run directory")
    # -n is the spelling to use under torchrun, whose own parser takes --n for an
    # abbreviation of its --nnodes / --nproc-per-node.
    p.add_argument(
        "-n", "--n", type=_positive, default=n, help=f"number of test images (default {n})"
    )
    p.add_argument("--batch-size", type=_positive, default=16, help="images per batch (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    _add_progress(p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``betasmooth`` command."""
    parser = argparse.ArgumentParser(
        prog="betasmooth",
        description="Explain, attack and defend explanation maps of PyTorch models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole pipeline on built-in photographs, with a report")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--model", default="photos-cnn", help="model (default photos-cnn)")
    p.add_argument("--data", default="photos", help="its data (default photos; digits-cnn: digits)")
    p.add_argument("--quick", action="store_true", help="a first look in about 90 s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the demo in --out")
    _add_progress(p)
    # Smaller sizes for tests; not part of the documented interface.
    p.add_argument("--n", type=_positive, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=_positive, help=argparse.SUPPRESS)

    p = sub.add_parser("attack", help="manipulate explanations of a model's inputs")
    _add_inputs(p)
    p.add_argument("--method", required=True, help="comma list of methods, or all")
    p.add_argument("--steps", type=_positive, help="attack steps (default: per method)")
    p.add_argument("--goal", choices=("targeted", "topk", "center"), default="targeted")
    _add_run(p)

    p = sub.add_parser("sweep", help="defense sweep over beta on a finished attack run")
    p.add_argument("dir", help="run directory of an attack")
    p.add_argument("--betas", type=_floats, default=[0.5, 1.0, 2.0, 5.0], help="e.g. 0.5,1,2,5")
    p.add_argument("--smoothgrad-n", type=_positive, default=20, help="SmoothGrad samples")
    p.add_argument("--device", default="cpu")
    _add_progress(p)

    p = sub.add_parser("explain", help="explanation maps of a model's inputs")
    _add_inputs(p)
    p.add_argument("--method", required=True, help="comma list of methods, or all")
    _add_run(p)

    p = sub.add_parser("theorem", help="check softplus = E[relu] and Theorem 2 numerically")
    p.add_argument("--out", required=True, help="directory for theory.json and figures")
    p.add_argument("--quick", action="store_true", help="fewer samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary (without curves)")
    p.add_argument("--resume", action="store_true", help="write into a non-empty --out")
    _add_progress(p)

    p = sub.add_parser("curvature", help="curvature of the model and its beta-smoothed versions")
    _add_inputs(p)
    p.add_argument(
        "--betas",
        type=_betas,
        default=[1.0, 2.0, 5.0, 10.0, 20.0],
        help="comma list, 'relu' for the network itself (default 1,2,5,10,20)",
    )
    p.add_argument("--iterations", type=_positive, default=20, help="Lanczos iterations")
    _add_run(p)

    p = sub.add_parser("report", help="(re)build report.html of a run directory")
    p.add_argument("dir", help="run directory")

    for name, p in sub.choices.items():
        p.set_defaults(run=COMMANDS[name])
    return parser


# ----------------------------------------------------------------------------- helpers


def _absolute(spec: str | None) -> str | None:
    """A spec naming a file, made absolute, so that the run can be reopened from elsewhere."""
    if spec is None or spec in BUILTIN_DATA or spec in BUILTIN_MODELS:
        return spec
    path, sep, factory = spec.rpartition(":")
    if sep and path.endswith(".py") and Path(path).exists():
        return f"{Path(path).resolve()}:{factory}"
    if Path(spec).exists():
        return str(Path(spec).resolve())
    return spec


def _config(args: argparse.Namespace, **settings: object) -> dict[str, object]:
    """The config of a command: its name, its settings and the command line."""
    return {"command": args.command, **settings, "argv": ["betasmooth", *args.argv]}


def _run_config(
    args: argparse.Namespace, device: torch.device, **settings: object
) -> dict[str, object]:
    """The config of a command that works on ``--n`` images of ``--model`` and ``--data``."""
    return _config(
        args,
        model=_absolute(args.model),
        weights=_absolute(args.weights),
        data=_absolute(args.data),
        image_size=args.image_size,
        channels=args.channels,
        mean=args.mean,
        std=args.std,
        **settings,
        n=args.n,
        batch_size=args.batch_size,
        seed=args.seed,
        device=str(device),
    )


def _load(
    settings: Mapping[str, object], n: int | None
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Model and data as named by the arguments (``vars(args)``) or by a stored config."""
    return runs.load_inputs(
        settings["model"],
        settings["data"],
        weights=settings.get("weights"),
        n=n,
        image_size=settings.get("image_size"),
        channels=settings.get("channels"),
        mean=settings.get("mean"),
        std=settings.get("std"),
    )


def _data_range(settings: Mapping[str, object]) -> tuple[float, float]:
    return data_range(settings["data"], mean=settings.get("mean"), std=settings.get("std"))


def _say(text: str = "") -> None:
    print(text, flush=True)


def _cell(value: float | None, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.2e}".rjust(width)
    return f"{value:.3f}".rjust(width)


def _order(key: tuple) -> tuple:
    # Numbers in numeric order, before names in alphabetical order.
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in key)


def summary_table(
    records: Sequence[Mapping[str, object]],
    columns: Sequence[tuple[str, str]],
    group: Sequence[str] = ("method",),
) -> str:
    """Medians of ``columns`` per group of records, as a plain-text table.

    Booleans (such as ``label_kept``) count as 0/1, so their median column is
    replaced by the mean: the fraction of items where it holds (as in
    :func:`betasmooth.report.medians`).

    Examples
    --------
    >>> print(summary_table([{"method": "gradient", "seconds": 0.5}], [("seconds", "s")]))
    method      n        s
    gradient    1    0.500
    """
    from .report import medians

    groups: dict[tuple, list[Mapping[str, object]]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(g) for g in group), []).append(r)
    groups = {key: groups[key] for key in sorted(groups, key=_order)}
    names = [
        " ".join("-" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in key)
        for key in groups
    ]
    first = max([len(" ".join(group)), *map(len, names)]) + 2
    widths = [max(len(h), 7) + 2 for _, h in columns]
    lines = [
        " ".join(group).ljust(first)
        + "n".rjust(3)
        + "".join(h.rjust(w) for (_, h), w in zip(columns, widths))
    ]
    for name, rows in zip(names, groups.values()):
        stats = medians(rows, [field for field, _ in columns])
        cells = "".join(_cell(stats[field], w) for (field, _), w in zip(columns, widths))
        lines.append(name.ljust(first) + str(len(rows)).rjust(3) + cells)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands


@command("attack")
def cmd_attack(args: argparse.Namespace) -> int:
    """Attack the explanations of ``--n`` test images by every ``--method``."""
    methods = runs.attack_methods(args.method)
    device = runs.resolve_device(args.device)
    model, x, y = _load(vars(args), args.n)
    config = _run_config(args, device, methods=methods, steps=args.steps, goal=args.goal)
    low_high = _data_range(config)
    with runs.distributed(device) as (dist, dev):
        run = RunDir.create(args.out, config, resume=args.resume, dist=dist)
        records = runs.attack_run(
            run,
            model,
            x,
            y,
            methods,
            steps=args.steps,
            batch_size=args.batch_size,
            goal=args.goal,
            seed=args.seed,
            data_range=low_high,
            device=dev,
            dist=dist,
            progress=args.progress,
        )
    if dist.rank == 0:
        _say(summary_table(records, ATTACK_COLUMNS))
        _say(f"results: {run.results}")
    return 0


@command("explain")
def cmd_explain(args: argparse.Namespace) -> int:
    """Explain ``--n`` test images by every ``--method``."""
    methods = runs.explain_methods(args.method)
    device = runs.resolve_device(args.device)
    model, x, y = _load(vars(args), args.n)
    config = _run_config(args, device, methods=methods)
    with runs.distributed(device) as (dist, dev):
        run = RunDir.create(args.out, config, resume=args.resume, dist=dist)
        records = runs.explain_run(
            run,
            model,
            x,
            y,
            methods,
            batch_size=args.batch_size,
            seed=args.seed,
            device=dev,
            dist=dist,
            progress=args.progress,
        )
    if dist.rank == 0:
        columns = (
            ("map_max", "max"),
            ("map_entropy", "entropy"),
            ("map_top10_mass", "top10%"),
            ("seconds", "s/img"),
        )
        _say(summary_table(records, columns))
        _say(f"results: {run.results}")
    return 0


def _check_betas(betas: Sequence[float | None]) -> None:
    bad = [b for b in betas if b is not None and not (0 < b < float("inf"))]
    if bad:
        raise InputError(f"--betas must be positive finite numbers, e.g. 0.5,1,2,5; got {bad[0]:g}")


@command("sweep")
def cmd_sweep(args: argparse.Namespace) -> int:
    """Defense sweep over ``--betas`` on the attacked batches of a run directory."""
    run = RunDir(args.dir)
    if not Path(args.dir).is_dir():
        raise InputError(f"{args.dir} is not a directory; expected the --out of an attack run")
    config = run.config()
    if not run.results.exists() and not list(run.path.glob("results-rank*.jsonl")):
        raise InputError(f"{args.dir} holds no results.jsonl; run betasmooth attack into it first")
    device = runs.resolve_device(args.device)
    _check_betas(args.betas)
    settings = {"betas": args.betas, "smoothgrad_n": args.smoothgrad_n}
    stored = config.get("sweep")
    if stored not in (None, settings) and run.read("sweep"):
        raise InputError(
            f"{args.dir}/sweep.jsonl holds a sweep with {stored}; sweep again with those "
            "settings, or delete sweep.jsonl to start a new one"
        )
    model = _load(config, 1)[0]
    with runs.distributed(device) as (dist, dev):
        if dist.rank == 0 and stored != settings:
            runs.write_json(run.config_path, {**config, "sweep": settings})
        dist.barrier()
        run = RunDir(args.dir, dist.rank, dist.world_size)
        records = runs.sweep_run(
            run,
            model,
            args.betas,
            smoothgrad_n=args.smoothgrad_n,
            seed=int(config.get("seed", 0)),
            data_range=_data_range(config),
            device=dev,
            dist=dist,
            progress=args.progress,
        )
    if dist.rank == 0:
        _say(summary_table(records, SWEEP_COLUMNS, ("defense", "beta")))
        _say(f"sweep: {run.path / 'sweep.jsonl'}")
    return 0


@command("curvature")
def cmd_curvature(args: argparse.Namespace) -> int:
    """Curvature of the model and its beta-smoothed versions at ``--n`` test images."""
    _check_betas(args.betas)
    device = runs.resolve_device(args.device)
    model, x, y = _load(vars(args), args.n)
    config = _run_config(args, device, betas=args.betas, iterations=args.iterations)
    with runs.distributed(device) as (dist, dev):
        run = RunDir.create(args.out, config, resume=args.resume, dist=dist)
        records = runs.curvature_run(
            run,
            model,
            x,
            y,
            args.betas,
            batch_size=args.batch_size,
            seed=args.seed,
            options={"iterations": args.iterations},
            device=dev,
            dist=dist,
            progress=args.progress,
        )
    if dist.rank == 0:
        keys = [
            k
            for k in ("hessian_norm", "principal_curvature", "hessian_frobenius", "gradient_norm")
            if records and k in records[0]
        ]
        _say(summary_table(records, [(k, k.replace("_", " ")) for k in keys]))
        _say(f"results: {run.results}")
    return 0


def _theory(run: RunDir, quick: bool, seed: int, progress: bool | None) -> dict:
    summary = theory.run(
        quick=quick,
        seed=seed,
        progress=bool(progress if progress is not None else sys.stderr.isatty()),
    )
    runs.write_json(run.theory, summary)
    return summary


@command("theorem")
def cmd_theorem(args: argparse.Namespace) -> int:
    """Numerical checks of the 1-D identity and Theorem 2, with figures."""
    from .figures import theorem_figures

    config = _config(args, quick=args.quick, seed=args.seed)
    run = RunDir.create(args.out, config, resume=args.resume)
    summary = _theory(run, args.quick, args.seed, args.progress)
    theorem_figures(summary, run.figures)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "curves"}, indent=2))
    else:
        _say(f"theory: {run.theory}")
        _say(f"figures: {run.figures}")
    return 0


@command("report")
def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild ``report.html`` from a run directory."""
    from .report import build_report

    if not Path(args.dir).is_dir():
        raise InputError(f"{args.dir} is not a directory; expected a betasmooth run directory")
    _say(f"report: {build_report(args.dir)}")
    return 0


def _demo_steps(methods: Sequence[str], budget: int) -> dict[str, int]:
    """Steps per method: ``budget`` for the longest, the others in the paper's proportions."""
    paper = {m: int(ATTACK_DEFAULTS[m]["steps"]) for m in methods}
    longest = max(paper.values())
    return {m: max(1, round(budget * s / longest)) for m, s in paper.items()}


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    """Explain, attack, defend and check the theory on a built-in model; write a report."""
    from .report import build_report

    table = DEMO_SIZES_BY_DATA.get(args.data, PHOTO_DEMO_SIZES)
    sizes = dict(table["quick" if args.quick else "default"])
    if args.n is not None:
        sizes["n"] = args.n
    if args.steps is not None:
        sizes["steps"] = args.steps
    config = _config(
        args, model=args.model, data=args.data, quick=args.quick, seed=args.seed, **sizes
    )
    start = time.perf_counter()
    # The demo's tensors are small: one thread computes them about as fast as
    # several, and does not stall when other processes hold the cores.
    torch.set_num_threads(1)
    model, x, y = runs.load_inputs(args.model, args.data, n=int(sizes["n"]))
    run = RunDir.create(args.out, config, resume=args.resume)
    progress = args.progress
    explain_methods = runs.explain_methods("all")
    # Inside an attack every step pays for all samples of SmoothGrad and all
    # points of integrated gradients: fewer of both keep the demo in budget.
    options = {
        "smoothgrad": {"n": sizes["smoothgrad_attack_n"]},
        "integrated_gradients": {"steps": sizes["ig_steps"]},
    }
    _say(f"explaining {len(x)} images of {args.data} with {len(explain_methods)} methods")
    runs.explain_run(
        run,
        model,
        x,
        y,
        explain_methods,
        batch_size=int(sizes["batch_size"]),
        seed=args.seed,
        method_options=options,
        name="explain",
        progress=progress,
    )
    methods = runs.attack_methods("all")
    steps = _demo_steps(methods, int(sizes["steps"]))
    _say(f"attacking them with {len(methods)} methods, up to {max(steps.values())} steps")
    records = runs.attack_run(
        run,
        model,
        x,
        y,
        methods,
        steps=steps,
        batch_size=int(sizes["batch_size"]),
        seed=args.seed,
        method_options=options,
        progress=progress,
    )
    _say(f"defense sweep over beta = {', '.join(f'{b:g}' for b in sizes['betas'])}")
    sweep = runs.sweep_run(
        run,
        model,
        sizes["betas"],
        smoothgrad_n=int(sizes["smoothgrad_n"]),
        seed=args.seed,
        progress=progress,
    )
    if not run.theory.exists():
        _say("checking the theory")
        _theory(run, bool(sizes["quick_theory"]), args.seed, progress)
    report = build_report(run.path)
    _say()
    _say("attacks: medians over images; kept = fraction of labels kept; pcc/ssim tgt, orig =")
    _say("similarity of the attacked map to the target map, to the original map")
    _say(summary_table(records, ATTACK_COLUMNS))
    _say()
    _say("defenses: medians over images and attacked methods; pcc adv/orig = defended map")
    _say("of the attacked image against the original map (higher: the defense holds)")
    _say(summary_table(sweep, SWEEP_COLUMNS, ("defense", "beta")))
    _say()
    _say(f"done in {time.perf_counter() - start:.0f} s; report: {report}")
    return 0


# ----------------------------------------------------------------------------- entry point


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.strerror or 'cannot open'}: {err.filename}"
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``betasmooth`` command; returns the exit status.

    Examples
    --------
    >>> main(["theorem", "--out", "/tmp/theory", "--quick", "--json"])  # doctest: +SKIP
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except (
        InputError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    ) as err:
        print(f"betasmooth: error: {_one_line(err)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("betasmooth: interrupted; run again with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
