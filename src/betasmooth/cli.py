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
import ast
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import textwrap
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import torch

# Not imported here: report and figures, which load matplotlib. The functions
# that use them import them, so that `betasmooth --help` and a failed input
# check answer without that wait.
from . import __version__, runs, theory
from .attack import (
    ATTACK_DEFAULTS,
    GOALS,
    UNTARGETED_EPS,
    UNTARGETED_STEPS,
    Goal,
    attack_defaults,
    check_attack_model,
    check_attackable,
    check_goal,
    derangement,
    recorded_goal,
)
from .calibrate import CANDIDATE_BETAS, calibrate_beta, check_calibration_count
from .defense import SWEPT_DEFENSES, check_defenses
from .distributed import Dist, RankLost, distributed, launched, rank_device, resolve_device
from .explain import (
    METHODS,
    RESERVED,
    explain,
    is_differentiable,
    range_options,
    with_base_range,
)
from .explain.noise import base_call
from .metrics import default_k, group_records, heatmap, medians
from .pretrained import categories, is_pretrained
from .recommend import MIN_FIDELITY, beta_key, format_summary, verdict
from .smooth import BETA_RANGE, check_overridable, flush_denormals
from .store import RunDir, holding_locks
from .validate import (
    MAX_SEED,
    InputError,
    OutOfMemory,
    UnnormalisedWarning,
    check_uncompiled,
    is_number,
    is_oom,
    silenced,
    tell,
)
from .zoo import (
    BUILTIN_DATA,
    BUILTIN_MODELS,
    both_or_neither,
    import_model_code,
    is_user_code,
    preset_mean_std,
    weights_file,
)

__all__ = ["COMMANDS", "build_parser", "goal_columns", "main", "positive_integer", "summary_table"]

Command = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Command] = {}
#: Commands that run in one process (not under torchrun).
ONE_PROCESS: set[str] = set()

# Columns of the summary table of an attack run: (field, header).
#: How large the change of the input was, and what it cost.
INPUT_COLUMNS = (
    ("input_mse", "input mse"),
    ("input_max_change", "max |dx|"),
    ("output_change", "d output"),
    ("seconds", "s/img"),
)
ATTACK_COLUMNS = (
    ("label_kept", "kept"),
    ("expl_pcc_target_before", "pcc tgt0"),
    ("expl_pcc_target", "pcc tgt"),
    ("expl_ssim_target_before", "ssim tgt0"),
    ("expl_ssim_target", "ssim tgt"),
    ("expl_pcc_orig", "pcc orig"),
    *INPUT_COLUMNS,
)
#: Column titles of the records that untargeted goals name as their measure.
MEASURE_TITLES = {"expl_topk_orig": "top-k kept", "expl_com_shift_orig": "com shift"}


def goal_columns(goal: str) -> tuple[tuple[str, str], ...]:
    """The summary table's columns for an attack of ``goal``: an untargeted goal has no target.

    Examples
    --------
    >>> [key for key, _ in goal_columns("topk")][:3]
    ['label_kept', 'expl_topk_orig', 'expl_pcc_orig']
    """
    if GOALS[goal].targeted:
        return ATTACK_COLUMNS
    measure = GOALS[goal].measure
    return (
        ("label_kept", "kept"),
        (measure, MEASURE_TITLES.get(measure, measure)),
        ("expl_pcc_orig", "pcc orig"),
        *INPUT_COLUMNS,
    )


SWEEP_COLUMNS = (
    ("adv_vs_orig_pcc", "pcc adv/orig"),
    ("adv_vs_target_pcc", "pcc adv/tgt"),
    # What adv/tgt starts from under the defense: smoothing moves the map of x too.
    ("clean_vs_target_pcc", "pcc clean/tgt"),
    ("clean_vs_orig_pcc", "pcc clean/orig"),
    ("seconds", "s/img"),
)


def sweep_columns(config: Mapping[str, object]) -> tuple[tuple[str, str], ...]:
    """The sweep table's columns after the attack that ``config`` records: an untargeted
    goal has no target map, so its "target" column would repeat the original's.

    Examples
    --------
    >>> [key for key, _ in sweep_columns({"goal": "topk"})]
    ['adv_vs_orig_pcc', 'clean_vs_orig_pcc', 'seconds']
    """
    if recorded_goal(config)[0]:
        return SWEEP_COLUMNS
    return tuple(c for c in SWEEP_COLUMNS if "_vs_target_" not in c[0])


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
# The default sweep is sweep's own (0.5 to 50): where a model's faithful betas
# lie depends on its training (photos-cnn without BatchNorm: 50 and above).
PHOTO_DEMO_SIZES: dict[str, dict[str, object]] = {
    "default": {
        **DEMO_SIZES["default"],
        "n": 8,
        "steps": 200,
        "batch_size": 8,
        "smoothgrad_n": 8,
        "betas": list(CANDIDATE_BETAS),
    },
    "quick": {
        **DEMO_SIZES["quick"],
        "n": 4,
        # At 30 steps the gradient attack moved 1 photograph of 4 (photos-cnn 0.6.0).
        "steps": 45,
        "batch_size": 4,
        "betas": [1.0, 5.0, 20.0, 50.0],
    },
}
# Demo sizes by data; any other data takes those of the photographs.
DEMO_SIZES_BY_DATA = {"digits": DEMO_SIZES, "photos": PHOTO_DEMO_SIZES}


def command(name: str, sharded: bool = True) -> Callable[[Command], Command]:
    """Register a subcommand function under ``name``.

    ``sharded``: the command shares its work among the processes of a
    torchrun job; the others run in one process and refuse torchrun.
    """

    def decorate(fn: Command) -> Command:
        COMMANDS[name] = fn
        if not sharded:
            ONE_PROCESS.add(name)
        return fn

    return decorate


# ----------------------------------------------------------------------------- parsing


def _floats(text: str, words: Mapping[str, None] | None = None) -> list[float | None]:
    """A comma list of numbers (and of ``words``, which stand for their values)."""
    words = words or {}
    items = [t.strip() for t in text.split(",")]
    try:
        if not all(items):
            raise ValueError(text)
        return [words[t] if t in words else float(t) for t in items]
    except ValueError:
        example = "0.5,1,2,5" + (f" or {','.join(words)},1,2" if words else "")
        raise argparse.ArgumentTypeError(
            f"expected a comma list of numbers, e.g. {example}; got {text!r}"
        ) from None


def _betas(text: str) -> list[float | None]:
    # "relu" stands for the network itself (beta = infinity).
    return _floats(text, {"relu": None})


def _integer(text: str, low: int, high: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}")
    return value


def positive_integer(text: str) -> int:
    """``type=`` of an argparse count: an integer from 1 to 2**31 - 1, else a one-line usage error.

    Examples
    --------
    >>> positive_integer("8")
    8
    """
    # Bounded so that a typo fails here and not as an overflow deep in torch.
    return _integer(text, 1, 2**31 - 1, "a positive integer below 2**31")


def _seed(text: str) -> int:
    return _integer(text, 0, MAX_SEED, "an integer from 0 to 2**64 - 1")


#: Largest --image-size: 16 times ImageNet's 224, far beyond what any explanation needs.
MAX_IMAGE_SIZE = 4096
#: Smallest --image-size, the built-in digits' own size: a map of a few pixels matches
#: any target (one pixel always does), so an attack on it would report a perfect result.
MIN_IMAGE_SIZE = 8


def _image_size(text: str) -> int:
    return _integer(
        text,
        MIN_IMAGE_SIZE,
        MAX_IMAGE_SIZE,
        f"an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} (smaller images give maps of "
        "too few pixels to compare)",
    )


def _directory(text: str) -> str:
    # An empty name would mean the current directory, which is never what was meant.
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a directory name; got an empty one")
    # A file on the way would only be met when the run writes its first file.
    blocking = next((p for p in Path(text).parents if _is_file(p)), None)
    if blocking is not None:
        raise argparse.ArgumentTypeError(
            f"{blocking} is a file, so {text} cannot be a directory; expected a path whose "
            "existing parts are directories"
        )
    return text


def _is_file(path: Path) -> bool:
    """Whether ``path`` is there and no directory; False where it cannot be looked at."""
    try:
        return path.exists() and not path.is_dir()
    except OSError:  # a name too long, a folder not to be entered: said when it is written
        return False


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1; got {text!r}")
    return value


def _budget(text: str) -> float:
    """A fraction of the data range from 0 (excluded) to 1, as a number or ``A/B`` (``8/255``)."""
    try:
        numbers = [float(part) for part in text.split("/")]
    except ValueError:
        numbers = []
    # Each part positive: -8/-255 is no budget anyone means.
    sound = len(numbers) in (1, 2) and all(n > 0 for n in numbers)
    value = numbers[0] / (numbers[1] if len(numbers) == 2 else 1.0) if sound else float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"expected a fraction of the data range above 0 and at most 1, e.g. 0.03 or 8/255; "
            f"got {text!r}"
        )
    return value


OPTION_FORM = "METHOD.NAME=VALUE, e.g. integrated_gradients.steps=16"


def _option(text: str) -> tuple[str, str, object]:
    """``METHOD.NAME=VALUE``: one option of one method; VALUE a Python literal or a word."""
    key, equals, value = text.partition("=")
    method, dot, name = key.strip().rpartition(".")
    value = value.strip()
    if not (equals and dot and method and name.isidentifier() and value):
        raise argparse.ArgumentTypeError(f"expected {OPTION_FORM}; got {text!r}")
    if value.lower() in _WORDS:  # true and false as a shell user writes them
        return method, name, _WORDS[value.lower()]
    try:
        literal = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        # A bare word is a name (composite=epsilon_plus, base=captum:Saliency);
        # anything with brackets or quotes was meant as a literal.
        if re.fullmatch(r"[\w:.+-]+", value) is None:
            raise argparse.ArgumentTypeError(
                f"expected VALUE to be a number, a word, True/False/None or a tuple of "
                f"numbers; got {value!r} in {text!r}"
            ) from None
        return method, name, value
    try:
        return method, name, _plain(literal)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected VALUE to be a finite number, a word, True/False/None or a tuple of "
            f"them; got {value!r} in {text!r}"
        ) from None


_WORDS = {"true": True, "false": False, "none": None, "null": None}
#: bs.explain's own arguments: the command sets them (the target is the predicted class).
_OWN = (*RESERVED, "method")


def _plain(value: object) -> object:
    """``value`` if JSON can hold it, with every list a tuple (as Captum wants shapes)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(value)  # JSON has no inf or nan, and nan != nan on --resume
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    raise TypeError(value)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``PROG: error: ...``, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's paragraphs and the examples' lines as written."""


def _steps_help() -> str:
    per_method = ", ".join(f"{m} {int(d['steps'])}" for m, d in ATTACK_DEFAULTS.items())
    return (
        f"attack steps per image (default per method: {per_method}; "
        f"{UNTARGETED_STEPS} for the untargeted goals topk and center); "
        "a shorter budget takes proportionally longer steps"
    )


def _choices_help(choices: Sequence[str], all_means: str, prefixed: bool = True) -> str:
    others = "captum:NAME or a method" if prefixed else "a method"
    return (
        f"comma list of {', '.join(choices)}, {others} registered in a model file; "
        f"or all ({all_means})"
    )


def _names(text: str) -> list[str]:
    """A comma list of names, e.g. ``beta_smooth,smoothgrad``."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            f"expected names, e.g. beta_smooth,smoothgrad; got {text!r}"
        )
    return names


def _numbers(text: str) -> list[float]:
    """One or more numbers, e.g. ``0.485`` or ``0.485,0.456,0.406`` (as --betas takes a list)."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers, e.g. 0.485 0.456 0.406 or 0.485,0.456,0.406; got {text!r}"
        ) from None


class _Flat(argparse.Action):
    """Store the numbers of every word as one list: spaces and commas both separate them."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, [v for word in values for v in word])


class _Named(argparse.Action):
    """Store the value, and that the user named it (``data_named``): a default or a
    stored config is named by no one."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_named", True)


def _add_inputs(
    p: argparse.ArgumentParser, model: str | None = None, data: str | None = None
) -> None:
    """Model, weights, data and their preparation; ``model`` and ``data`` are defaults."""
    models = ", ".join(BUILTIN_MODELS)
    p.add_argument(
        "--model",
        required=model is None,
        default=model,
        help=f"{models} (built in), path/to/file.py:factory, pkg.mod:factory or "
        "torchvision:NAME[:WEIGHTS] (pretrained, from the torch hub cache)"
        + ("" if model is None else f" (default {model})"),
    )
    p.add_argument(
        "--weights",
        help="state dict file for the model, loaded with weights_only=True "
        "(default: the built-in model's own weights, or the factory's)",
    )
    p.add_argument(
        "--data",
        action=_Named,
        required=data is None,
        default=data,
        help=f"{', '.join(BUILTIN_DATA)} (built in), a folder of images or an .npz with x (and y)"
        + ("" if data is None else f" (default {data})"),
    )
    p.add_argument(
        "--image-size",
        type=_image_size,
        help=f"resize images to this size, {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} px (default: as "
        "stored, or a torchvision model's resize and crop)",
    )
    p.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="1 (grey) or 3 (RGB) (default: as stored)",
    )
    p.add_argument(
        "--mean",
        type=_numbers,
        nargs="+",
        action=_Flat,
        help="normalisation mean, one or per channel, given with --std (default: none, or a "
        "torchvision model's own)",
    )
    p.add_argument(
        "--std",
        type=_numbers,
        nargs="+",
        action=_Flat,
        help="normalisation std, one or per channel, given with --mean (default: none, or a "
        "torchvision model's own)",
    )


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bars (default: shown on stderr when it is a terminal)",
    )


class _Given(argparse.Action):
    """Store the value, and that it was given (``<dest>_given``), as the default was not."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def _add_images(p: argparse.ArgumentParser, n: int | None, hidden: bool = False) -> None:
    # --n is the documented spelling; torchrun's own parser refuses it (an
    # ambiguous abbreviation of its --nnodes ...), so -n and --images come first.
    p.add_argument(
        "-n",
        "--images",
        "--n",
        dest="n",
        action=_Given,
        type=positive_integer,
        default=n,
        metavar="N",
        help=argparse.SUPPRESS if hidden else f"number of test images (default {n})",
    )


def _add_run(p: argparse.ArgumentParser, n: int | None = 16) -> None:
    p.add_argument(
        "--out",
        required=True,
        type=_directory,
        metavar="DIR",
        help="run directory (created; must be new or empty)",
    )
    _add_images(p, n)
    p.add_argument(
        "--batch-size", type=positive_integer, default=16, help="images per batch (default 16)"
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed (default 0)")
    _add_device(p)
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out (default: a new run)"
    )
    _add_progress(p)


def _add_method_option(p: argparse.ArgumentParser, examples: str) -> None:
    p.add_argument(
        "--option",
        type=_option,
        action="append",
        metavar="METHOD.NAME=VALUE",
        help=f"an option of one --method, as in Python: {examples} "
        "(repeatable; default: the method's own)",
    )


def _add_save_attributions(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--save-attributions",
        action="store_true",
        help="also keep the signed attributions (B, C, H, W) in arrays/ (large; default: off)",
    )


def _subcommand(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    text = HELP[name]
    return sub.add_parser(
        name,
        help=text["help"],
        description=textwrap.fill(text["description"], 79, break_on_hyphens=False),
        epilog="examples:\n" + "\n".join(f"  {e}" for e in text["examples"]),
        formatter_class=_Formatter,
        allow_abbrev=False,
    )


#: Per subcommand: the one-line help, a paragraph that says what it does, two examples.
HELP: dict[str, dict[str, object]] = {
    "demo": {
        "help": "the whole pipeline on built-in photographs, with a report",
        "description": "Explain test crops of the built-in photographs with every method "
        "(photos-cnn, a VGG-style network), attack the explanations, test beta-smoothing and "
        "SmoothGrad as defenses, check the theory, and write DIR/report.html. The default run "
        "takes at most 15 minutes on 2 CPU cores, --quick at most 90 seconds; --model "
        "digits-cnn --data digits runs the same on the built-in digits. Nothing is downloaded. "
        "Your own model and data work as in attack (--model, --data, --mean/--std; a "
        "torchvision model brings its preprocessing); the time budget is the built-in models'.",
        "examples": [
            "betasmooth demo --out runs/demo --quick",
            "betasmooth demo --out runs/digits --model digits-cnn --data digits",
        ],
    },
    "attack": {
        "help": "manipulate explanations of a model's inputs",
        "description": "Change each test image slightly and without changing its label, so "
        "that its explanation map moves towards a target (goal targeted: the map of another "
        "image, Dombrowski et al. 2019) or away from the original (goals topk and center, "
        "Ghorbani et al. 2019). Writes results.jsonl, one line per image and method, and the "
        "attacked images and maps under DIR/arrays; --resume continues a killed run. Under "
        "torchrun each process takes a share of the images.",
        "examples": [
            "betasmooth attack --model digits-cnn --data digits --method gradient,lrp "
            "-n 16 --steps 200 --out runs/attack",
            "torchrun --nproc-per-node 2 -m betasmooth attack --model digits-cnn --data digits "
            "--method all -n 64 --out runs/attack-all",
        ],
    },
    "sweep": {
        "help": "defense sweep over beta on a finished attack run",
        "description": "Re-explain the original and attacked images of an attack run with "
        "beta-smoothing at each beta of --betas and with SmoothGrad of matched noise (or the "
        "--defenses given), and "
        "record how close the defended map of each attacked image stays to the defended map "
        "of its clean image (robustness) and how close that stays to the undefended map "
        "(fidelity), beside the undefended maps; names the recommended beta, the most robust "
        "with median fidelity of at least --min-fidelity, unless it is less robust than no "
        "defense. Writes DIR/sweep.jsonl, "
        "DIR/sweep_summary.json and DIR/report.html, and adds the settings to DIR/config.json.",
        "examples": [
            "betasmooth sweep runs/attack",
            "betasmooth sweep runs/attack --betas 0.5,1,2,5,10 --defenses beta_smooth",
        ],
    },
    "explain": {
        "help": "explanation maps of a model's inputs",
        "description": "Explain the target logit (by default the predicted class) of each "
        "test image with every --method, and record the prediction and statistics of each "
        "map (largest value, entropy, mass of the top 10 % of pixels). The maps go to "
        "DIR/arrays, the records to DIR/results.jsonl.",
        "examples": [
            "betasmooth explain --model digits-cnn --data digits --method all -n 32 "
            "--out runs/maps",
            "betasmooth explain --model net.py:build --weights net.pt --data images/ "
            "--image-size 224 --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 "
            "--method lrp --out runs/maps-lrp",
        ],
    },
    "theorem": {
        "help": "check softplus = E[relu] and Theorem 2 numerically",
        "description": "Check numerically that softplus_beta is ReLU averaged over logistic "
        "noise, and Theorem 2: the gradient of the beta-smoothed one-layer network is "
        "SmoothGrad with logistic noise, exactly for noise along w and approximately for iid "
        "noise (the gap is measured). Writes DIR/theory.json and figures.",
        "examples": [
            "betasmooth theorem --out runs/theory --quick --json",
            "betasmooth theorem --out runs/theory --seed 1",
        ],
    },
    "curvature": {
        "help": "curvature of the model and its beta-smoothed versions",
        "description": "Estimate, at each test image, the largest Hessian eigenvalue of the "
        "explained logit (Lanczos), the principal curvature of the output manifold, the "
        "Hessian's Frobenius norm and the gradient norm, for its beta-smoothed versions and, "
        "with 'relu' in --betas, the network itself. A ReLU network has zero Hessian almost "
        "everywhere; smoothing makes its curvature finite and measurable.",
        "examples": [
            "betasmooth curvature --model digits-cnn --data digits -n 16 --out runs/curv",
            "betasmooth curvature --model digits-cnn --data digits --betas relu,1,5,20 "
            "--iterations 30 --out runs/curv2",
        ],
    },
    "report": {
        "help": "(re)build report.html of a run directory",
        "description": "Build DIR/report.html from what the run directory holds: maps, "
        "medians, defense curves, theory figures and settings. The page is self-contained "
        "and the same directory always gives the same bytes.",
        "examples": [
            "betasmooth report runs/demo",
            "betasmooth report runs/attack",
        ],
    },
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``betasmooth`` command.

    Examples
    --------
    >>> build_parser().parse_args(["report", "runs/demo"]).dir
    'runs/demo'
    """
    parser = OneLineParser(
        prog="betasmooth",
        description="Explain, attack and defend explanation maps of PyTorch models. "
        "Run 'betasmooth COMMAND --help' for the options and examples of a command.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"betasmooth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, add in OPTIONS.items():
        p = _subcommand(sub, name)
        add(p)
        p.set_defaults(run=COMMANDS[name], parser=p)
    return parser


#: The options of each subcommand, added to its parser in this order.
OPTIONS: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


def options(name: str) -> Callable[[Callable], Callable]:
    """Register the function that adds the options of the subcommand ``name``."""

    def decorate(fn: Callable[[argparse.ArgumentParser], None]) -> Callable:
        OPTIONS[name] = fn
        return fn

    return decorate


@options("demo")
def _demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        type=_directory,
        metavar="DIR",
        help="run directory (created; must be new or empty)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a first look in at most 90 seconds (default: off)"
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed (default 0)")
    p.add_argument(
        "--resume", action="store_true", help="continue the demo in --out (default: a new run)"
    )
    _add_inputs(p, model="photos-cnn", data="photos")
    _add_device(p)
    _add_progress(p)
    # Smaller sizes for tests; not part of the documented interface.
    _add_images(p, None, hidden=True)
    p.add_argument("--steps", type=positive_integer, help=argparse.SUPPRESS)


@options("attack")
def _attack_options(p: argparse.ArgumentParser) -> None:
    _add_inputs(p)
    p.add_argument(
        "--method",
        required=True,
        help=_choices_help(
            list(ATTACK_DEFAULTS),
            "these, with the paper's budgets, and any the model file registers",
            prefixed=False,
        ),
    )
    p.add_argument("--steps", type=positive_integer, help=_steps_help())
    beta = ATTACK_DEFAULTS["beta_smooth"]["options"]["beta"]
    p.add_argument(
        "--beta",
        type=_beta_value,
        help=f"beta of the attacked beta_smooth (adaptive attack on the defense; default {beta})",
    )
    p.add_argument(
        "--goal",
        default="targeted",
        metavar="GOAL",
        help="targeted: towards the map of another image; topk: move the map off its top "
        "10%% pixels; center: move its centre of mass; or a goal that the --model file "
        "registers (default targeted)",
    )
    p.add_argument(
        "--eps",
        type=_budget,
        help="L-infinity budget of the input change, a fraction of each channel's data range, "
        "e.g. 8/255 (default 8/255 for topk and center, none for targeted)",
    )
    p.add_argument(
        "--k",
        type=positive_integer,
        help="top-k size of the topk goal and of the expl_topk scores (default 10%% of the "
        "pixels; Ghorbani et al. took 1000 on ImageNet)",
    )
    _add_method_option(p, "integrated_gradients.steps=16, lrp.epsilon=0.25, smoothgrad.n=10")
    _add_save_attributions(p)
    _add_run(p)


@options("sweep")
def _sweep_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="run directory of an attack")
    p.add_argument(
        "--betas",
        type=_floats,
        default=list(CANDIDATE_BETAS),
        help=f"comma list of beta values (default {','.join(f'{b:g}' for b in CANDIDATE_BETAS)})",
    )
    p.add_argument(
        "--smoothgrad-n",
        type=positive_integer,
        default=20,
        help="SmoothGrad samples per image (default 20)",
    )
    p.add_argument(
        "--min-fidelity",
        type=_fraction,
        default=MIN_FIDELITY,
        help="least median fidelity (PCC) of a recommended beta (default 0.9)",
    )
    p.add_argument(
        "--defenses",
        type=_names,
        default=list(SWEPT_DEFENSES),
        help=f"comma list of {', '.join(SWEPT_DEFENSES)} or a defense the run's model file "
        f"registers in betasmooth.defense.DEFENSES (default {','.join(SWEPT_DEFENSES)})",
    )
    _add_device(p)
    _add_progress(p)


@options("explain")
def _explain_options(p: argparse.ArgumentParser) -> None:
    _add_inputs(p)
    p.add_argument(
        "--method", required=True, help=_choices_help(list(METHODS), "every registered method")
    )
    _add_save_attributions(p)
    p.add_argument(
        "--beta",
        type=_beta_option,
        help="beta of beta_smooth, or auto: calibrated on a few held-out images "
        "(default: the method's own, 1.0)",
    )
    _add_method_option(
        p,
        "integrated_gradients.steps=100, captum:Occlusion.sliding_window_shapes=(3,8,8), "
        "lrp.composite=epsilon_plus",
    )
    _add_run(p)


@options("theorem")
def _theorem_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        required=True,
        type=_directory,
        metavar="DIR",
        help="directory for theory.json and figures",
    )
    p.add_argument("--quick", action="store_true", help="fewer samples (default: off)")
    p.add_argument("--seed", type=_seed, default=0, help="seed (default 0)")
    p.add_argument(
        "--json", action="store_true", help="print the summary without curves (default: off)"
    )
    p.add_argument(
        "--resume", action="store_true", help="write into a non-empty --out (default: off)"
    )
    _add_progress(p)


@options("curvature")
def _curvature_options(p: argparse.ArgumentParser) -> None:
    _add_inputs(p)
    p.add_argument(
        "--betas",
        type=_betas,
        default=[1.0, 2.0, 5.0, 10.0, 20.0],
        help="comma list, 'relu' for the network itself (default 1,2,5,10,20)",
    )
    p.add_argument(
        "--iterations", type=positive_integer, default=20, help="Lanczos iterations (default 20)"
    )
    _add_run(p)


@options("report")
def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="run directory")


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


def _inputs_config(args: argparse.Namespace) -> dict[str, object]:
    """Model, data and their preparation as given (files made absolute)."""
    return {
        "model": _absolute(args.model),
        "weights": _absolute(args.weights),
        "data": _absolute(args.data),
        "image_size": args.image_size,
        "channels": args.channels,
        "mean": args.mean,
        "std": args.std,
        "preset": args.preset,
    }


def _run_config(
    args: argparse.Namespace, device: torch.device, inputs: runs.Inputs, **settings: object
) -> dict[str, object]:
    """The config of a command that works on ``-n`` images of ``--model`` and ``--data``."""
    return _config(
        args,
        **_inputs_config(args),
        **settings,
        n=args.n,
        batch_size=args.batch_size,
        seed=args.seed,
        device=str(device),
        **_fingerprints(inputs[1], inputs[2], args.model, args.weights),
    )


def _smoothgrad_draws(methods: Sequence[str], seed: int) -> dict[str, int]:
    """``smoothgrad_seed``, where an attacked SmoothGrad draws from a seed other than 0.

    Before 0.8.8 its draws came from seed 0 whatever ``--seed`` said: a run of
    then lacks the key, and ``--resume`` refuses to add draws of another seed to it.
    """
    return {"smoothgrad_seed": seed} if "smoothgrad" in methods and seed != 0 else {}


def _fingerprints(
    x: torch.Tensor, y: torch.Tensor, model: str, weights: str | None
) -> dict[str, str | None]:
    """``inputs_sha256`` and ``weights_sha256`` of a run, reading the weights file once.

    ``inputs_sha256`` hashes the images, labels and ``--weights`` file: --resume
    refuses other contents under the same names (a folder with one image more, a
    rewritten file). ``weights_sha256`` hashes the file the model's weights are
    read from (:func:`~betasmooth.zoo.weights_file`: ``--weights``, a built-in
    model's, a torchvision checkpoint in the hub cache), which a later sweep
    checks too; ``None`` for a factory that makes its own weights.
    """
    inputs = hashlib.sha256()
    for tensor in (x, y):
        inputs.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        inputs.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    path = weights_file(model, weights)
    file = None if path is None else hashlib.sha256()
    for block in () if path is None else _blocks(path):
        file.update(block)
        if weights is not None:  # the --weights file is part of the inputs
            inputs.update(block)
    return {
        "inputs_sha256": inputs.hexdigest(),
        "weights_sha256": None if file is None else file.hexdigest(),
    }


def _blocks(path: Path) -> Iterator[bytes]:
    """The bytes of ``path`` in blocks of 1 MiB; none where it is no file."""
    if path.is_file():
        with open(path, "rb") as file:
            yield from iter(lambda: file.read(1 << 20), b"")


# The start of load_data's warning that data named like a folder is the built-in set.
BUILT_IN_NOT_FOLDER = r"data '.*' is the built-in data set"


def _load(settings: Mapping[str, object], n: int | None) -> runs.Inputs:
    """Model and data as named by the arguments (``vars(args)``) or by a stored config."""
    with warnings.catch_warnings():
        if not settings.get("data_named"):
            # A default (the demo's photos) or a stored config: the user named no
            # data here, so a folder of the built-in's name is no mistake of theirs.
            warnings.filterwarnings("ignore", message=BUILT_IN_NOT_FOLDER)
        return runs.load_inputs(
            settings["model"],
            settings["data"],
            weights=settings.get("weights"),
            n=n,
            image_size=settings.get("image_size"),
            channels=settings.get("channels"),
            mean=settings.get("mean"),
            std=settings.get("std"),
            preset=settings.get("preset"),
        )


def _load_images(
    args: argparse.Namespace, check_count: Callable[[int], object] | None = None
) -> runs.Inputs:
    """Model and the first ``-n`` images; fewer images than asked are recorded.

    ``check_count(len(x))`` refuses too few images. Where there are fewer than
    asked, :func:`_start_run` says so once the run starts: a check between
    would make bad input two lines.
    """
    inputs = _load(vars(args), args.n)
    x = inputs[1]
    if x.dim() == 4 and min(x.shape[-2:]) < MIN_IMAGE_SIZE:
        # As for --image-size: the maps would match any target.
        height, width = x.shape[-2:]
        raise InputError(
            f"{args.data} holds images of {height}x{width} px; expected at least "
            f"{MIN_IMAGE_SIZE} px (--image-size {MIN_IMAGE_SIZE} or more resizes them): a map "
            "of a few pixels matches any target map"
        )
    if check_count is not None:
        check_count(len(x))
    if args.n is not None and len(x) < args.n:
        args.fewer = (
            f"betasmooth {args.command}: {args.data} holds only {len(x)} "
            f"image{'s' if len(x) != 1 else ''}; "
            f"using all {len(x)} "
            + (
                f"(asked for {args.n})"
                if getattr(args, "n_given", False)
                else f"(-n defaults to {args.n})"
            )
        )
        args.n = len(x)
    return inputs


def _start_run(
    args: argparse.Namespace, config: dict[str, object], dist: Dist | None = None
) -> RunDir:
    """The run directory ``--out`` of a command on images, created; fewer images said."""
    run = RunDir.create(args.out, config, resume=args.resume, dist=dist)
    _SAID.keep_in(run)
    if getattr(args, "fewer", None) and _first_rank():
        tell(args.fewer)
    return run


def _apply_preset(args: argparse.Namespace) -> None:
    """A torchvision model brings its preprocessing: mean and std unless given."""
    args.preset = None
    if is_pretrained(getattr(args, "model", None)):
        args.mean, args.std = preset_mean_std(args.model, args.mean, args.std, ("--mean", "--std"))
        args.preset = args.model
    elif hasattr(args, "mean"):
        both_or_neither(args.mean, args.std, ("--mean", "--std"))


def _classes(settings: Mapping[str, object]) -> list[str] | None:
    model = settings.get("model")
    return categories(model) if is_pretrained(model) else None


def _given_options(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """``--option`` as ``{method: {name: value}}``; an option given twice is refused."""
    given: dict[str, dict[str, object]] = {}
    for method, name, value in args.option or ():
        if name in _OWN:
            hint = " (Captum's option method is written rule)" if name == "method" else ""
            raise InputError(
                f"--option {method}.{name}: {name} is set by the command, not an option of "
                f"a method{hint}; expected one of the method's own options"
            )
        if name in given.setdefault(method, {}):
            raise InputError(f"--option {method}.{name} is given twice; expected each option once")
        given[method][name] = value
    if getattr(args, "beta", None) is not None and "beta" in given.get("beta_smooth", {}):
        raise InputError(
            "--beta and --option beta_smooth.beta both give beta_smooth's beta; expected one"
        )
    return given


def _stored(given: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, object]] | None:
    """``given`` as ``config.json`` holds it (tuples as lists), so that --resume compares alike."""
    return json.loads(json.dumps(given)) if given else None


def _with_given(
    options: dict[str, dict[str, object]],
    given: Mapping[str, Mapping[str, object]] | None,
    methods: Sequence[str],
) -> dict[str, dict[str, object]]:
    """``options`` with the options given on the command line (or stored) put over them."""
    for method, chosen in (given or {}).items():
        if method not in methods:
            raise InputError(
                f"--option {method}.{next(iter(chosen))}: {method} is not among --method "
                f"({', '.join(methods)}); expected an option of one of them"
            )
        options[method] = {**options.get(method, {}), **{k: _plain(v) for k, v in chosen.items()}}
    return options


def _command_options(
    args: argparse.Namespace,
    methods: Sequence[str],
    bounds: tuple[torch.Tensor, torch.Tensor],
    given: Mapping[str, Mapping[str, object]],
) -> dict[str, dict[str, object]]:
    """The options of each method of attack and explain: those that follow the data's
    range (a base method's too, inside ``base_options``), ``--option`` over them, and a
    numeric ``--beta`` (``auto`` is calibrated later)."""
    options = _with_given(range_options(*bounds, methods=methods), given, methods)
    for method in methods:  # a base lrp or integrated_gradients of a smoothing method too
        options[method] = with_base_range(method, options.get(method, {}), *bounds)
    if args.beta is not None and "beta_smooth" not in methods:
        raise InputError("--beta applies to --method beta_smooth; add it to --method")
    if args.beta not in (None, "auto"):
        _set_beta(options, args.beta)
    return options


def _set_beta(options: dict[str, dict[str, object]], beta: float) -> None:
    """Put ``--beta`` into beta_smooth's options, next to those ``--option`` gives."""
    options["beta_smooth"] = {**options.get("beta_smooth", {}), "beta": beta}


def _check_given(
    model: torch.nn.Module,
    x: torch.Tensor,
    given: Mapping[str, Mapping[str, object]],
    options: Mapping[str, Mapping[str, object]],
    methods: Sequence[str] = (),
) -> None:
    """Explain one image with each method that ``--option`` gives options to, and with each
    Captum method (which only Captum can check, by running): a name or a value the method
    does not take, or a model it refuses, is named before anything is written."""
    for method in dict.fromkeys([*given, *(m for m in methods if m not in METHODS)]):

        def named(text: str, method: str = method) -> InputError:
            """``text`` under the ``--option`` that caused it, the method named once."""
            if method not in given:
                return InputError(text)
            if text.startswith((f"{method}:", f"{method} ")):
                return InputError(f"--option {text}")
            return InputError(f"--option {method}: {text}")

        try:
            out = explain(model, x[:1], method, **options.get(method, {}))
        except InputError as err:
            raise named(str(err)) from None
        except (TypeError, ValueError) as err:
            raise named(f"{method} refused its options: {err}") from None
        try:
            heatmap(out)  # what the run records of each map: a layer method's must be an image
        except InputError:
            layer = options.get(method, {}).get("layer")
            of_layer = f" of layer {layer!r}" if layer is not None else ""
            raise named(
                f"{method} gives maps{of_layer} of shape {tuple(out.shape[1:])} per image, "
                "not an image (C, H, W) that a run can record; expected a layer with "
                "spatial output (a convolution's, e.g. a ViT's conv_proj)"
            ) from None


def _beta_value(text: str, auto: bool = False) -> float | str:
    if auto and text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not BETA_RANGE[0] <= value <= BETA_RANGE[1]:
        what = "a positive number" + (" or auto" if auto else "")
        raise argparse.ArgumentTypeError(f"expected {what} (a float32 beta); got {text!r}")
    return value


def _beta_option(text: str) -> float | str:
    return _beta_value(text, auto=True)


@dataclasses.dataclass
class _Said:
    """The command running and the warnings it has said, kept in its run for the report.

    Kept as they are said once the run exists, and those said before then when it
    is made: a run that is killed keeps what it warned.
    """

    command: str = ""
    warnings: list[str] = dataclasses.field(default_factory=list)
    run: RunDir | None = None

    def start(self, command: str) -> None:
        self.command, self.warnings, self.run = command, [], None

    def keep_in(self, run: RunDir) -> None:
        self.run = run
        self._keep(self.warnings)

    def say(self, warning: str) -> None:
        self.warnings.append(warning)
        self._keep([warning])

    def _keep(self, warnings: list[str]) -> None:
        # Another rank says only what is about its own items, which rank 0 cannot keep.
        if self.run is not None and warnings:
            self.run.add_warnings(self.command, warnings)


_SAID = _Said()


def _report(run: RunDir) -> Path:
    from .report import build_report

    return build_report(run.path)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _cell(value: float | None, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    # Below 0.01, three decimals keep one digit: input MSEs of 1.4e-3 and 1.9e-3
    # would read 0.001 and 0.002, beside a budget of 2e-3.
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        return f"{value:.2e}".rjust(width)
    return f"{value:.3f}".rjust(width)


def summary_table(
    records: Sequence[Mapping[str, object]],
    columns: Sequence[tuple[str, str]],
    group: Sequence[str] = ("method",),
) -> str:
    """Medians of ``columns`` per group of records, as a plain-text table.

    Booleans (such as ``label_kept``) count as 0/1, so their median column is
    replaced by the mean: the fraction of items where it holds (as in
    :func:`betasmooth.metrics.medians`).

    Examples
    --------
    >>> print(summary_table([{"method": "gradient", "seconds": 0.5}], [("seconds", "s")]))
    method      n        s
    gradient    1    0.500
    """

    groups = group_records(records, group)
    keys = [
        ["-" if v is None else beta_key(v) if isinstance(v, float) else str(v) for v in key]
        for key in groups
    ]
    # One column per grouping field, each as wide as its longest entry.
    firsts = [max([len(g), *(len(k[i]) for k in keys)]) + 2 for i, g in enumerate(group)]
    widths = [max(len(h), 7) + 2 for _, h in columns]
    lines = [
        "".join(g.ljust(w) for g, w in zip(group, firsts))
        + "n".rjust(3)
        + "".join(h.rjust(w) for (_, h), w in zip(columns, widths))
    ]
    for key, rows in zip(keys, groups.values()):
        stats = medians(rows, [field for field, _ in columns])
        cells = "".join(_cell(stats[field], w) for (field, _), w in zip(columns, widths))
        name = "".join(k.ljust(w) for k, w in zip(key, firsts))
        lines.append(name + str(len(rows)).rjust(3) + cells)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- commands


def _may_register(model: str) -> bool:
    """Whether loading ``model`` runs the user's code, which may register methods."""
    return not (model in BUILTIN_MODELS or is_pretrained(model))


def _command_inputs(
    args: argparse.Namespace,
    parse: Callable[[str], list[str]],
    check_count: Callable[[int], object] | None = None,
) -> tuple[list[str], torch.device, runs.Inputs, dict[str, dict[str, object]]]:
    """The methods, device, model and images, and ``--option`` of attack and explain."""
    # A typo is named before a long load, unless the --model file may register
    # methods of its own: then after it.
    early = not _may_register(args.model)
    methods = parse(args.method) if early else []
    device = resolve_device(args.device)
    inputs = _load_images(args, check_count)
    return methods or parse(args.method), device, inputs, _given_options(args)


def _goal(args: argparse.Namespace) -> Goal:
    """The entry of ``--goal`` in :data:`~betasmooth.attack.GOALS` (a model file may add to it)."""
    return GOALS[check_goal(args.goal, "--goal")]


def _budget_settings(args: argparse.Namespace, goal: Goal, x: torch.Tensor) -> dict[str, object]:
    """``--eps`` and ``--k`` for the config, where they differ from the attack's defaults.

    Runs of earlier versions, which had neither, and runs given the defaults are
    then the same attack, and each resumes the other.
    """
    defaults = {
        "eps": None if goal.targeted else UNTARGETED_EPS,
        "k": default_k(*x.shape[-2:]),
    }
    height, width = x.shape[-2:]
    if args.k is not None and args.k >= height * width:
        # A top-k of every pixel is always kept: it would measure nothing.
        raise InputError(
            f"--k must be less than the {height}x{width} map's {height * width} pixels; "
            f"got {args.k}"
        )
    given = {"eps": args.eps, "k": args.k}
    return {name: v for name, v in given.items() if v is not None and v != defaults[name]}


def _resumed_all(args: argparse.Namespace, methods: list[str]) -> list[str]:
    """``--method all`` on ``--resume`` of a run made when ``all`` was the built-in
    methods only (before 0.12.0): the run's own methods, and the others named."""
    named = [m.strip() for m in args.method.split(",") if m.strip()]  # as runs reads it
    if not args.resume or named != ["all"] or not Path(args.out, "config.json").is_file():
        return methods
    recorded = RunDir(args.out).config().get("methods")
    if recorded != list(ATTACK_DEFAULTS) or recorded == methods:
        return methods
    left = ", ".join(m for m in methods if m not in recorded)
    tell(
        f"{args.out} was made when --method all meant the {len(recorded)} built-in methods: "
        f"resuming those; attack {left} with --method in a new --out"
    )
    return list(recorded)


@command("attack")
def cmd_attack(args: argparse.Namespace) -> int:
    """Attack the explanations of ``-n`` test images by every ``--method``."""

    def pairs(n: int) -> None:
        # After the model file is imported, which may register the goal. A target map
        # is another image's map: fewer than 2 images fail before any writing.
        if _goal(args).targeted:
            derangement(n, args.seed)

    if not _may_register(args.model):
        _goal(args)  # a typo is named before a long load
    methods, device, inputs, given = _command_inputs(args, runs.attack_methods, pairs)
    methods = _resumed_all(args, methods)
    model, x, y = inputs
    goal = _goal(args)
    config = _run_config(
        args,
        device,
        inputs,
        methods=methods,
        steps=args.steps,
        goal=args.goal,
        # What the report needs of the goal, which a model file may have registered.
        goal_targeted=goal.targeted,
        goal_measure=goal.measure,
        beta=args.beta,
        save_attributions=args.save_attributions,
        options=_stored(given),
        **_smoothgrad_draws(methods, args.seed),
        **_budget_settings(args, goal, x),
    )
    bounds = inputs.bounds
    options = _command_options(args, methods, bounds, given)
    for method in methods:
        check_attackable(method, options.get(method))
    _check_given(model, x, given, options)
    runs.check_methods(model, methods, options, x)
    check_attack_model(model, methods, x)
    with distributed(device) as (dist, dev):
        run = _start_run(args, config, dist)
        records = runs.attack_run(
            run,
            model,
            x,
            y,
            methods,
            steps=args.steps,
            batch_size=args.batch_size,
            goal=args.goal,
            eps=args.eps,
            k=args.k,
            seed=args.seed,
            data_range=bounds,
            method_options=options,
            device=dev,
            dist=dist,
            progress=args.progress,
            save_attributions=args.save_attributions,
            classes=_classes(config),
            about=inputs.about,
        )
    if dist.rank == 0:
        _say(summary_table(records, goal_columns(args.goal)))
        _say_unmoved(records)
        _say(f"results: {run.results}")
        _say(f"report: {_report(run)}")
    return 0


@command("explain")
def cmd_explain(args: argparse.Namespace) -> int:
    """Explain ``-n`` test images by every ``--method``."""
    methods, device, inputs, given = _command_inputs(
        args, runs.explain_methods, _calibration_count(args)
    )
    model, x, y = inputs
    config = _run_config(
        args,
        device,
        inputs,
        methods=methods,
        save_attributions=args.save_attributions,
        options=_stored(given),
    )
    bounds = inputs.bounds
    options = _command_options(args, methods, bounds, given)
    _check_given(model, x, given, options, methods)
    runs.check_methods(model, methods, options, x)
    if args.beta == "auto":
        # The calibration may take minutes: what the run directory refuses is said first.
        settled = {**config, "beta": args.beta}
        RunDir(args.out).check(settled, args.resume, unknown=("beta_smooth_beta", "beta_auto"))
    chosen = _explain_beta(args, model, bounds, options, rank_device(device))
    with distributed(device) as (dist, dev):
        if chosen is not None:
            # Calibrations on different GPUs may differ: every rank takes rank 0's.
            beta, calibration = dist.broadcast(chosen)
            config.update(beta=args.beta, beta_smooth_beta=beta)
            if calibration is not None:
                config["beta_auto"] = calibration
            _set_beta(options, beta)
        run = _start_run(args, config, dist)
        records = runs.explain_run(
            run,
            model,
            x,
            y,
            methods,
            batch_size=args.batch_size,
            seed=args.seed,
            method_options=options,
            device=dev,
            dist=dist,
            progress=args.progress,
            save_attributions=args.save_attributions,
            classes=_classes(config),
            about=inputs.about,
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
        _say(f"report: {_report(run)}")
    return 0


# Size of the calibration behind --beta auto: held-out images and attack steps.
CALIBRATION = {"n": 8, "steps": 100}


def _held_out(args: argparse.Namespace, k: int) -> tuple[torch.Tensor, str]:
    """``k`` images for the calibration, and what they are: the training split of
    built-in data, else the images after the first ``--n``; when there are none,
    the last ``k``, which are explained too."""
    from .zoo import load_data

    settings = vars(args)
    split = "train" if args.data in BUILTIN_DATA else "all"
    with warnings.catch_warnings():
        # The data's first load said that a folder is named like built-in data.
        warnings.filterwarnings("ignore", message=BUILT_IN_NOT_FOLDER)
        x = load_data(
            args.data,
            split,
            image_size=args.image_size,
            channels=args.channels,
            mean=args.mean,
            std=args.std,
            preset=args.preset,
            # Of the user's data only the first -n and the k after them are read.
            n=k if split == "train" else settings["n"] + k,
        )[0]
    if split == "train":
        return x[:k], "held-out images (the training split)"
    if len(x) >= settings["n"] + 2:
        return x[settings["n"] : settings["n"] + k], "held-out images (after the first -n)"
    return x[-k:], (
        f"images that are also explained: {args.data} has no two images after the first -n "
        f"to hold out"
    )


def _calibration_count(args: argparse.Namespace) -> Callable[[int], None] | None:
    """For ``--beta auto`` on the user's data: a check that it holds the 2 images a
    calibration needs, given the first ``-n`` (all of them where fewer came)."""
    if args.beta != "auto" or args.data in BUILTIN_DATA:
        return None

    def check(n: int) -> None:
        if args.n is None or n < args.n:
            check_calibration_count(n)

    return check


def _calibrated(args: argparse.Namespace) -> tuple[float, dict[str, object]] | None:
    """The beta and record of the ``--beta auto`` run that ``--resume`` continues: its
    finished maps were smoothed with that beta, which a new calibration could miss."""
    run = RunDir(args.out)
    if not (args.resume and run.started()):
        return None
    stored = run.config()
    beta = stored.get("beta_smooth_beta")
    if stored.get("beta") != "auto" or not isinstance(stored.get("beta_auto"), dict):
        return None  # resuming with other settings is refused by the run's own check
    if not is_number(beta):
        return None
    if _first_rank():
        _say(f"beta = {beta:g} (calibrated when the run began)")
    return float(beta), stored["beta_auto"]


def _first_rank() -> bool:
    """Whether this process says what all say alike: one process, or rank 0 of torchrun's."""
    return not launched() or os.environ.get("RANK") == "0"


def _explain_beta(
    args: argparse.Namespace,
    model: torch.nn.Module,
    bounds: tuple[torch.Tensor, torch.Tensor],
    options: Mapping[str, Mapping[str, object]],
    device: torch.device,
) -> tuple[float, dict[str, object] | None] | None:
    """``--beta`` as given, or the one ``--beta auto`` calibrates on the method that
    beta_smooth smooths (its ``base``, with the options ``options`` give it), with the
    calibration's record; ``None`` without ``--beta``.

    Under torchrun every rank calibrates on its own device before the job's processes
    join: rank 0 alone would keep the others waiting at a collective, which may time
    out on a large model. A resumed run keeps the beta it was calibrated to."""
    if args.beta is None:
        return None
    if args.beta != "auto":
        return args.beta, None
    resumed = _calibrated(args)
    if resumed is not None:
        return resumed
    x, which = _held_out(args, CALIBRATION["n"])
    check_calibration_count(len(x))
    shown = sys.stderr.isatty() if args.progress is None else args.progress
    base, base_options = base_call("beta_smooth", options.get("beta_smooth", {}))
    if not is_differentiable(base):
        # The calibration attacks the map, which a method whose maps are detached
        # (captum:NAME) does not allow: the gradient, which beta-smoothing acts on, stands in.
        if _first_rank():
            _say(f"{base}'s maps cannot be attacked: beta is calibrated on the gradient map")
        base, base_options = "gradient", {}
    if _first_rank():
        _say(f"calibrating beta on {len(x)} {which}, on the {base} map")
    found = calibrate_beta(
        model.to(device),
        x.to(device),
        base,
        steps=CALIBRATION["steps"],
        data_range=bounds,
        method_options=base_options,
        seed=args.seed,
        progress=shown and _first_rank(),
    )
    # The whole verdict, also where the recommended beta leaves most of the attack's gain.
    chosen = "" if found.recommended else ", the most faithful"
    if _first_rank():
        _say(f"beta = {found.beta:g}{chosen}: {verdict(found.summary)}")
    return found.beta, {**found.record(), "method": base, "images": which}


def _check_betas(betas: Sequence[float | None]) -> None:
    bad = [b for b in betas if b is not None and not BETA_RANGE[0] <= b <= BETA_RANGE[1]]
    if bad:
        raise InputError(
            f"--betas must be positive numbers from {BETA_RANGE[0]:.3g} to {BETA_RANGE[1]:.3g} "
            f"(float32's normal range), e.g. 0.5,1,2,5; got {bad[0]:g}"
        )
    twice = [b for i, b in enumerate(betas) if b in betas[:i]]
    if twice:
        # A beta given twice would count its images twice in that beta's medians.
        name = "relu" if twice[0] is None else f"{twice[0]:g}"
        raise InputError(f"--betas must differ; {name} is given more than once")


def _attacked_with(
    config: Mapping[str, object], bounds: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, dict[str, object]]:
    """The method options a run attacked with: the data's range, its --option, and the demo's
    smaller sizes."""
    options = _with_given(range_options(*bounds), config.get("options"), config.get("methods", ()))
    # Inside an attack every step pays for all samples of SmoothGrad and all
    # points of integrated gradients: the demo takes fewer of both, and its
    # sweep must explain with the same.
    if "smoothgrad_attack_n" in config:
        options["smoothgrad"]["n"] = int(config["smoothgrad_attack_n"])
    if "ig_steps" in config:
        options["integrated_gradients"]["steps"] = int(config["ig_steps"])
    return options


@command("sweep")
def cmd_sweep(args: argparse.Namespace) -> int:
    """Defense sweep over ``--betas`` on the attacked batches of a run directory."""
    run = RunDir(args.dir)
    if not Path(args.dir).is_dir():
        raise InputError(f"{args.dir} is not a directory; expected the --out of an attack run")
    config = run.check_attacked()
    device = resolve_device(args.device)
    _check_betas(args.betas)
    if _may_register(str(config.get("model"))):
        import_model_code(str(config["model"]))  # the defenses it registers, not the model
    check_defenses(args.defenses)  # a typo is named before a long load
    settings = runs.sweep_settings(args.betas, args.smoothgrad_n, args.min_fidelity, args.defenses)
    run.check_sweep(settings)  # before the model is loaded
    inputs = _load(config, 1)
    model, x, _ = inputs
    made_with = config.get("weights_sha256", "not recorded")  # runs of older versions
    now = _fingerprints(*inputs[1:], config["model"], config.get("weights"))["weights_sha256"]
    if made_with not in ("not recorded", now):
        raise InputError(run.other_weights("sweep"))
    bounds = inputs.bounds
    with distributed(device) as (dist, dev):
        run.lock(dist)
        run = RunDir(args.dir, dist.rank, dist.world_size)
        _SAID.keep_in(run)
        records = runs.sweep_run(
            run,
            model,
            args.betas,
            smoothgrad_n=args.smoothgrad_n,
            defenses=args.defenses,
            seed=int(config.get("seed", 0)),
            data_range=bounds,
            method_options=_attacked_with(config, bounds),
            min_fidelity=args.min_fidelity,
            device=dev,
            dist=dist,
            progress=args.progress,
        )
    if dist.rank == 0:
        _say(summary_table(records, sweep_columns(config), ("method", "defense", "beta")))
        _say()
        _say_recommendation(run)
        _say(f"sweep: {run.merged('sweep')}")
        _say(f"report: {_report(run)}")
    return 0


@command("curvature")
def cmd_curvature(args: argparse.Namespace) -> int:
    """Curvature of the model and its beta-smoothed versions at ``-n`` test images."""
    _check_betas(args.betas)
    device = resolve_device(args.device)
    model, x, y = inputs = _load_images(args)
    config = _run_config(
        args,
        device,
        inputs,
        betas=args.betas,
        iterations=args.iterations,
        probes="the same for every beta",
        units="per pixel value in [0, 1] (per unit of each channel's data range)",
    )
    check_uncompiled(model, "curvature")
    check_overridable(model, "beta-smoothing")
    with distributed(device) as (dist, dev):
        run = _start_run(args, config, dist)
        records = runs.curvature_run(
            run,
            model,
            x,
            y,
            args.betas,
            batch_size=args.batch_size,
            seed=args.seed,
            # The attack's unit of input change: on normalised data one unit
            # of the model's own input is std pixel values.
            options={"iterations": args.iterations, "data_range": inputs.bounds},
            device=dev,
            dist=dist,
            progress=args.progress,
            classes=_classes(config),
            about=inputs.about,
        )
    if dist.rank == 0:
        keys = [
            k
            for k in ("hessian_norm", "principal_curvature", "hessian_frobenius", "gradient_norm")
            if records and k in records[0]
        ]
        _say(summary_table(records, [(k, k.replace("_", " ")) for k in keys]))
        _warn_unconverged(records, args.iterations)
        _say(f"results: {run.results}")
        _say(f"report: {_report(run)}")
    return 0


def _warn_unconverged(records: Sequence[Mapping[str, object]], iterations: int) -> None:
    """Say how many curvature estimates stopped at ``iterations`` before they converged
    (of those that say: records of versions before 0.17.0 do not)."""
    told = [r for r in records if isinstance(r.get("converged"), bool)]
    short = [r for r in told if not r["converged"]]
    if short:
        warnings.warn(
            f"{len(short)} of {len(told)} curvature estimates (e.g. item {short[0]['index']}, "
            f"{short[0]['method']}) did not converge in --iterations {iterations}: each may lie "
            "below the true value (converged false in the results); a larger --iterations "
            "gives them",
            stacklevel=2,
        )


def _theory(run: RunDir, quick: bool, seed: int, progress: bool | None) -> dict:
    summary = theory.run(
        quick=quick,
        seed=seed,
        progress=bool(progress if progress is not None else sys.stderr.isatty()),
    )
    run.write_theory(summary)
    return summary


@command("theorem", sharded=False)
def cmd_theorem(args: argparse.Namespace) -> int:
    """Numerical checks of the 1-D identity and Theorem 2, with figures."""
    from .figures import theorem_figures

    config = _config(args, quick=args.quick, seed=args.seed)
    run = RunDir.create(args.out, config, resume=args.resume)
    _SAID.keep_in(run)
    summary = _theory(run, args.quick, args.seed, args.progress)
    theorem_figures(summary, run.figures)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "curves"}, indent=2))
        _report(run)
    else:
        _say(f"theory: {run.theory}")
        _say(f"figures: {run.figures}")
        _say(f"report: {_report(run)}")
    return 0


def _import_run_code(run: RunDir) -> None:
    """Import the model file of ``run``, as its other commands did: the report sections
    and goals it registers are in the rebuilt report too. One that cannot be imported
    now is said, and the report holds what betasmooth itself registers."""
    try:
        model = run.config().get("model")
    except InputError:
        return  # build_report names what is wrong with the run
    if not isinstance(model, str):
        return
    try:
        import_model_code(model)
    except InputError as err:
        tell(f"betasmooth report: {err}; the report holds only what betasmooth registers")


@command("report", sharded=False)
def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild ``report.html`` from a run directory."""
    from .report import build_report

    if not Path(args.dir).is_dir():
        raise InputError(f"{args.dir} is not a directory; expected a betasmooth run directory")
    run = RunDir(args.dir)
    if run.config_path.is_file() and run.arrays.is_dir():
        try:
            run.lock()
        except InputError:
            pass  # a run still writes here: the report is a look at it, its files are its own
        else:
            run.remove_temporary()  # of writes, a report's own too, that a kill cut
    _import_run_code(run)
    _say(f"report: {build_report(args.dir)}")
    return 0


def _demo_steps(methods: Sequence[str], budget: int) -> dict[str, int]:
    """Steps per method: ``budget`` for the longest, the others in the paper's proportions."""
    paper = {m: int(attack_defaults(m)["steps"]) for m in methods}
    longest = max(paper.values())
    return {m: max(1, round(budget * s / longest)) for m, s in paper.items()}


@command("demo", sharded=False)
def cmd_demo(args: argparse.Namespace) -> int:
    """Explain, attack, defend and check the theory on a model (built-in by default); report."""
    sizes = _demo_sizes(args)
    device = resolve_device(args.device)
    start = time.perf_counter()
    if args.model in BUILTIN_MODELS:
        # The built-in models' tensors are small: one thread computes them about
        # as fast as several, and does not stall when other processes hold the cores.
        torch.set_num_threads(1)
    args.n = int(sizes["n"])
    # Fewer than 2 images fail the derangement, before the notice of fewer images.
    model, x, y = inputs = _load_images(args, lambda count: derangement(count, args.seed))
    sizes["n"] = args.n
    config = _config(
        args,
        **_inputs_config(args),
        quick=args.quick,
        seed=args.seed,
        device=str(device),
        **_fingerprints(x, y, args.model, args.weights),
        **sizes,
        **_smoothgrad_draws(runs.attack_methods("all"), args.seed),
    )
    bounds = inputs.bounds
    explain_methods = runs.explain_methods("all")
    methods = runs.attack_methods("all")
    options = _attacked_with(config, bounds)
    runs.check_methods(model, [*explain_methods, *methods], options, x)
    check_attack_model(model, methods, x)
    run = _start_run(args, config)
    common = {
        "batch_size": int(sizes["batch_size"]),
        "seed": args.seed,
        "method_options": options,
        "progress": args.progress,
        "classes": _classes(config),
        "about": inputs.about,
        "device": device,
    }
    _say(f"explaining {len(x)} images of {args.data} with {len(explain_methods)} methods")
    runs.explain_run(run, model, x, y, explain_methods, name="explain", **common)
    steps = _demo_steps(methods, int(sizes["steps"]))
    _say(
        f"attacking them with {len(methods)} methods, up to {max(steps.values())} steps "
        "(the paper's budget in fewer, longer steps)"
    )
    records = runs.attack_run(run, model, x, y, methods, steps=steps, data_range=bounds, **common)
    _say(f"defense sweep over beta = {', '.join(f'{b:g}' for b in sizes['betas'])}")
    sweep = runs.sweep_run(
        run,
        model,
        sizes["betas"],
        smoothgrad_n=int(sizes["smoothgrad_n"]),
        seed=args.seed,
        data_range=bounds,
        method_options=options,
        device=device,
        progress=args.progress,
    )
    if not run.theory.exists():
        _say("checking the theory")
        _theory(run, bool(sizes["quick_theory"]), args.seed, args.progress)
    report = _report(run)
    _demo_summary(run, records, sweep)
    _say(f"done in {time.perf_counter() - start:.0f} s; report: {report}")
    return 0


def _demo_sizes(args: argparse.Namespace) -> dict[str, object]:
    """The demo's sizes for its data, quick or not, with -n and --steps applied."""
    table = DEMO_SIZES_BY_DATA.get(args.data, PHOTO_DEMO_SIZES)
    sizes = dict(table["quick" if args.quick else "default"])
    if args.n is not None:
        sizes["n"] = args.n
    if args.steps is not None:
        sizes["steps"] = args.steps
    return sizes


def _demo_summary(run: RunDir, records: Sequence[Mapping], sweep: Sequence[Mapping]) -> None:
    _say()
    _say("attacks: medians over images; kept = fraction of labels kept; pcc/ssim tgt0, tgt =")
    _say("similarity of the original map and of the attacked map to the target map; pcc orig =")
    _say("attacked map vs original map; input mse and max |dx| (the largest change of one")
    _say("pixel value) are in units of each channel's data range, as pixels in [0, 1]")
    _say(summary_table(records, ATTACK_COLUMNS))
    _say_unmoved(records)
    _say()
    # Pooled over the seven methods, and said so: the tables per method follow.
    _say("defenses: medians over images and attacked methods; pcc adv/orig = defended map")
    _say("of the attacked image against the original map (higher: the defense holds);")
    _say("pcc adv/tgt less pcc clean/tgt = how far the attack moved the defended map")
    _say(summary_table(sweep, SWEEP_COLUMNS, ("defense", "beta")))
    _say()
    _say_recommendation(run)
    _say()


def _say_unmoved(records: Sequence[Mapping]) -> None:
    """Name the methods whose attack changed no image: their rows measure nothing."""
    methods = sorted({str(r.get("method")) for r in records})
    for method in methods:
        changes = [r.get("input_max_change") for r in records if r.get("method") == method]
        unmoved = sum(c == 0 for c in changes)
        if changes and unmoved == len(changes):
            _say(
                f"{method}: no image changed (no step improved the map and kept the label); "
                "more --steps may move it, and defenses against it measure nothing"
            )
        elif unmoved:
            _say(
                f"{method}: {unmoved} of {len(changes)} images unchanged (no step improved the "
                "map and kept the label); more --steps may move them"
            )


def _say_recommendation(run: RunDir) -> None:
    """Robustness and fidelity per beta of the run's sweep, the recommended beta marked."""
    summary = run.read_sweep_summary()
    if summary:
        _say("robustness: defended map of x_adv vs defended map of x; fidelity: defended map")
        _say("of x vs undefended map of x; medians over images; * recommended beta")
        _say(format_summary(summary))


# ----------------------------------------------------------------------------- entry point


def _raised_in_user_code(err: BaseException) -> str | None:
    """``file, line N, in name`` where a model's own code raised ``err``; ``None`` where
    betasmooth's code lies nearer the raise, whose traceback is then kept."""
    package = Path(__file__).resolve().parent
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if Path(frame.filename).resolve().is_relative_to(package):
            return None
        if is_user_code(frame.filename):
            return f"{frame.filename}, line {frame.lineno}, in {frame.name}"
    return None


def _again(args: argparse.Namespace) -> str:
    # Only once the run has begun: before it, nothing was kept (sweep, without
    # --resume, continues by itself).
    if _SAID.run is not None and "resume" in vars(args):
        return " (finished items are kept: run again with --resume once it is fixed)"
    return ""


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.strerror or 'cannot open'}: {err.filename}"
    return " ".join(str(err).split()) or type(err).__name__


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    # On the command line the warning is about the run, not about a source line; and
    # one line, also where a library wraps its text over several.
    said = " ".join(str(message).split())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # While torchrun's ranks share the items, a warning is about this rank's part.
        said = f"rank {torch.distributed.get_rank()}: {said}"
    elif not _first_rank():
        # Before the ranks join (loading, checks) and after they leave, every rank does
        # what rank 0 does: rank 0 says it for all, instead of once per rank.
        return
    tell(f"betasmooth: warning: {said}")
    _SAID.say(said)


def _check_processes(name: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1) if launched() else 1
    if name in ONE_PROCESS and world > 1:
        sharded = ", ".join(c for c in COMMANDS if c not in ONE_PROCESS)
        raise InputError(
            f"betasmooth {name} runs in one process; start it without torchrun "
            f"({sharded} share their work among torchrun's processes)"
        )


#: What to try when memory runs out at a batch of 1, in each command's own options.
_MEMORY_HINT = (
    "expected smaller inputs (--image-size) or, for integrated_gradients and smoothgrad, "
    "fewer points per pass (--option METHOD.chunk=1)"
)
_MEMORY_HINTS = {
    "sweep": "expected a smaller --smoothgrad-n, or an attack run on smaller images",
    "curvature": "expected smaller inputs (--image-size)",
    "demo": "expected smaller inputs (--image-size)",
}


def _memory_error(command: str, err: OutOfMemory) -> str:
    hint = err.hint or _MEMORY_HINTS.get(command, _MEMORY_HINT)
    return f"betasmooth: error: {err.what}; {hint}"


#: glibc's mallopt parameters, and the size up to which freed blocks stay in the heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _KEEP_FREED = -1, -3, 1 << 30


def _reuse_freed_memory() -> None:
    """Keep the blocks a batch frees, up to 1 GiB each, for the next batch (glibc only).

    glibc maps a block over its mmap threshold (32 MB at most) anew at each
    allocation and unmaps it when freed, so a pass over 256 items of 64 px
    page-faults its activations in again every time: on CPU a third of such a
    pass is spent in the kernel. The values computed do not change; the
    process keeps its peak memory until it ends, as the CUDA allocator does.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no such tuning)
        return
    # Setting either turns off glibc's own threshold, which rises with the blocks freed:
    # the trim threshold alone, where a glibc refuses this mmap threshold (one above its
    # maximum, or mallopt a stub that returns 0), would leave every block over 128 KiB mapped.
    if mallopt(_M_MMAP_THRESHOLD, _KEEP_FREED) == 1:
        mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED)


_NUMBER = r"(?:\.?\d[\d.eE+-]*|inf|nan)"
_NUMBERS = re.compile(rf"[+-]?{_NUMBER}(?:,\s*[+-]?{_NUMBER})*", re.IGNORECASE)
#: What argparse itself reads as a negative number, not as an option.
_ARGPARSE_NEGATIVE = re.compile(r"-\d+|-\d*\.\d+")
#: An option whose value may follow it: a long one not given its value with "=" already
#: (``--betas``), or a short one other than help (``-n``).
_TAKES_VALUE = re.compile(r"--[^=]+|-[A-Za-gi-z]")


def _negative_lists(argv: Sequence[str]) -> list[str]:
    """``argv`` with a negative value that argparse would read as an option joined to the
    option before it: a comma list that starts with a negative number, ``-1e-3``, ``-inf``.
    argparse says only that ``--betas`` expected an argument, where the check of the
    values names the problem. A value that argparse reads (``-0.5``), or the first of
    several (``--mean -1e-3 0.2 0.3``), is left as it is.

    Examples
    --------
    >>> _negative_lists(["sweep", "run", "--betas", "-1,1", "-n", "-5", "--betas", "-1e-3"])
    ['sweep', 'run', '--betas=-1,1', '-n', '-5', '--betas=-1e-3']
    >>> _negative_lists(["explain", "-n", "-1e-3", "-h", "-1e-3"])
    ['explain', '-n=-1e-3', '-h', '-1e-3']
    >>> _negative_lists(["--mean", "-0.5", "-0.5", "--std", "-1e-3", "0.2"])
    ['--mean', '-0.5', '-0.5', '--std', '-1e-3', '0.2']
    """
    out: list[str] = []
    for i, token in enumerate(argv):
        after = argv[i + 1] if i + 1 < len(argv) else ""
        if (
            out
            and _TAKES_VALUE.fullmatch(out[-1])
            and token.startswith("-")
            and _NUMBERS.fullmatch(token)
            and not _ARGPARSE_NEGATIVE.fullmatch(token)
            and not _NUMBERS.fullmatch(after)
        ):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``betasmooth`` command; returns the exit status.

    Examples
    --------
    >>> main(["theorem", "--out", "/tmp/theory", "--quick", "--json"])  # doctest: +SKIP
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(_negative_lists(argv))
    if unknown:
        # Named by the parser they were given to: before the command, the top one.
        before = argv[: argv.index(args.command)] if args.command in argv else []
        owner = parser if any(u.partition("=")[0] in before for u in unknown) else args.parser
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv
    _reuse_freed_memory()
    try:
        return _main(args)
    finally:
        # A warning said after the command (in the same process: a notebook, a test)
        # belongs to no run of it.
        _SAID.start("")


def _main(args: argparse.Namespace) -> int:
    try:
        # Flushing before the first parallel operation reaches torch's CPU
        # worker threads too, which copy the state of the thread that starts them.
        # The command line normalises the data itself, as the weights or --mean/--std say:
        # an image that lies in [0, 1] after that is a bright one, not an unnormalised one.
        with (
            warnings.catch_warnings(),
            holding_locks(),
            flush_denormals(),
            silenced(UnnormalisedWarning),
        ):
            warnings.showwarning = _show_warning
            _SAID.start(args.command)
            _check_processes(args.command)
            _apply_preset(args)
            if getattr(args, "out", None) is not None:
                # Before the model and data load, whose notices would come first.
                RunDir(args.out).check_out(getattr(args, "resume", False))
            return args.run(args)
    except BrokenPipeError:
        # The reader (e.g. head) has gone: nothing more to say to it, and no error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OutOfMemory as err:
        tell(_memory_error(args.command, err))
        return 2
    except (InputError, OSError, RankLost) as err:
        # RankLost: another torchrun rank failed and says why; this one only says so.
        # OSError: no space left, a read-only folder, a missing file. What was
        # written before stays intact: results are appended and arrays renamed whole.
        tell(f"betasmooth: error: {_one_line(err)}")
        return 2
    except Exception as err:
        if is_oom(err):
            # Outside a run's batches, which retry in halves: loading, or a check before the run.
            tell(_memory_error(args.command, OutOfMemory(err)))
            return 2
        where = _raised_in_user_code(err)
        if where is None:
            raise  # betasmooth's own: its traceback says where
        text = " ".join(str(err).split())
        what = f"{type(err).__name__}{': ' + text if text else ''}, raised"
        tell(f"betasmooth: error: {what} in the model's own code at {where}{_again(args)}")
        return 2
    except SystemExit as err:
        # sys.exit() in a model's forward would end the command without a word of why
        # (one on import or in the factory is caught where the model is loaded).
        where = _raised_in_user_code(err)
        if where is None:
            raise
        code = "" if err.code is None else repr(err.code)
        tell(
            f"betasmooth: error: the model's own code exited (sys.exit({code})) at "
            f"{where}; expected it to return or raise{_again(args)}"
        )
        return 2
    except KeyboardInterrupt:
        # Commands without --resume (sweep) continue where they stopped when run again.
        how = " with --resume" if "resume" in vars(args) else ""
        tell(f"betasmooth: interrupted; run again{how} to continue")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
