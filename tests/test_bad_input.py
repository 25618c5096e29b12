"""Bad input, one table: each case through the API (exact exception class) or the CLI
(exit status 2), and always one line that names the problem."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import betasmooth as bs
from betasmooth.attack import random_targets
from betasmooth.cli import main
from betasmooth.validate import InputError, InputTypeError
from nets import plain_cnn


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = plain_cnn()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x)
        return out, out


class IntegerOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = plain_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).argmax(1)


class FlatOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = plain_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).sum(1)


def _x(*shape: int, **kw: object) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0), **kw)


X = _x(2, 1, 16, 16)


def _targets(x: torch.Tensor) -> torch.Tensor:
    return random_targets(bs.heatmap(bs.explain(plain_cnn(), x, "gradient")))


def _npz(tmp: Path, x: np.ndarray) -> str:
    path = tmp / "data.npz"
    np.savez(path, x=x)
    return str(path)


def _manipulate(x: torch.Tensor, **config: object) -> Callable[[Path], object]:
    config = {"steps": 2, **config}
    return lambda tmp: bs.manipulate(plain_cnn(), x, _targets(X), "gradient", **config)


def _explain(model: object, x: object, method: str = "gradient", **kw: object) -> Callable:
    return lambda tmp: bs.explain(model() if callable(model) else model, x, method, **kw)


# name: (call(tmp_path), exception class, pattern of the one-line message)
API: dict[str, tuple[Callable[[Path], object], type[Exception], str]] = {
    "x of one (C, H, W) image": (
        _explain(plain_cnn, X[0]),
        InputError,
        r"x has shape \(1, 16, 16\) but the model's first layer Conv2d takes \(B, C, H, W\); "
        r"add the batch dimension with x\[None\]",
    ),
    "x of 2 dimensions": (
        _explain(plain_cnn, X[0, 0]),
        InputError,
        r"x has shape \(16, 16\) but .* takes \(B, C, H, W\)$",
    ),
    "image size the model does not take": (
        _explain(plain_cnn, _x(2, 1, 12, 12)),
        InputError,
        r"model does not accept input of shape \(1, 12, 12\) .*\(2, 1, 12, 12\)\): mat1 and mat2",
    ),
    "3 channels for a 1-channel model": (
        _explain(plain_cnn, _x(2, 3, 16, 16)),
        InputError,
        r"model does not accept input of shape \(3, 16, 16\).*expected input.* to have 1 channels",
    ),
    "float16 x": (
        _explain(plain_cnn, X.half()),
        InputTypeError,
        r"x has dtype torch.float16 but the model's parameters are torch.float32; expected",
    ),
    "integer x": (
        _explain(plain_cnn, X.long()),
        InputTypeError,
        r"floating tensor .*; got dtype torch.int64",
    ),
    "meta-device x": (
        _explain(plain_cnn, torch.empty(2, 1, 16, 16, device="meta")),
        InputError,
        r"x is on the meta device and holds no values",
    ),
    "x on another device than the model": (
        _explain(lambda: plain_cnn().to("meta"), X),
        InputError,
        r"x is on cpu but the model is on meta; expected both on one device",
    ),
    "NaN in x": (
        _explain(plain_cnn, torch.full((2, 1, 16, 16), float("nan"))),
        InputError,
        r"x contains NaN or inf",
    ),
    "empty batch": (_explain(plain_cnn, X[:0]), InputError, r"x is an empty batch"),
    "x a list": (_explain(plain_cnn, [[0.0]]), InputTypeError, r"x must be a torch.Tensor"),
    "model not a module": (
        _explain(lambda: "digits-cnn", X),
        InputTypeError,
        r"model must be a torch.nn.Module; got str",
    ),
    "unknown method": (
        _explain(plain_cnn, X, "saliency"),
        InputError,
        r"unknown method 'saliency'; expected one of: beta_smooth",
    ),
    "unknown option": (
        _explain(plain_cnn, X, "gradient", beta=1.0),
        InputTypeError,
        r"unknown option 'beta' for method 'gradient'",
    ),
    "target a float": (
        _explain(plain_cnn, X, target=1.5),
        InputTypeError,
        r"target must be None, an int or a \(B,\) integer tensor; got float",
    ),
    "target out of range": (
        _explain(plain_cnn, X, target=7),
        InputError,
        r"target class 7 is out of range; the model has 5 outputs",
    ),
    "model returns a tuple": (
        _explain(TupleOut, X),
        InputTypeError,
        r"the model returned a tuple; expected one tensor of logits of shape \(B, classes\)",
    ),
    "model returns integers": (
        _explain(IntegerOut, X),
        InputTypeError,
        r"the model returned a tensor of dtype torch.int64; expected floating logits",
    ),
    "model returns one number per item": (
        _explain(FlatOut, X),
        InputError,
        r"the model returned shape \(1,\) for 1 input item\(s\); expected logits of shape \(1, ",
    ),
    "lrp low >= high": (
        _explain(plain_cnn, X, "lrp", low=1.0, high=0.0),
        InputError,
        r"lrp options must have low < high .*; got low=1.0, high=0.0",
    ),
    "lrp negative epsilon": (
        _explain(plain_cnn, X, "lrp", epsilon=-1.0),
        InputError,
        r"lrp option 'epsilon' must be a float >= 0; got -1.0",
    ),
    "lrp on an operation without a rule": (
        _explain(lambda: nn.Sequential(nn.Flatten(), nn.Softmax(1), nn.Linear(256, 3)), X, "lrp"),
        InputError,
        r"lrp has no rule for module Softmax \(1\) \(node '_1'\); supported: Conv, Linear",
    ),
    "integrated_gradients steps 0": (
        _explain(plain_cnn, X, "integrated_gradients", steps=0),
        InputError,
        r"steps must be an integer >= \d+; got 0",
    ),
    "beta_smooth beta -1": (
        _explain(plain_cnn, X, "beta_smooth", beta=-1.0),
        InputError,
        r"beta must be a positive finite number; got -1.0",
    ),
    "smooth(None, 1.0)": (
        lambda tmp: bs.smooth(None, 1.0),
        InputTypeError,
        r"model must be a torch.nn.Module; got NoneType None",
    ),
    "smoothed(None, 1.0)": (
        lambda tmp: bs.smoothed(None, 1.0).__enter__(),
        InputTypeError,
        r"model must be a torch.nn.Module; got NoneType None",
    ),
    "smooth beta 0": (
        lambda tmp: bs.smooth(plain_cnn(), 0.0),
        InputError,
        r"beta must be a positive finite number; got 0.0",
    ),
    "load_model weights=123": (
        lambda tmp: bs.load_model("digits-cnn", weights=123),
        InputTypeError,
        r"weights must be None or the path of a state dict file; got int 123",
    ),
    "load_model spec not a string": (
        lambda tmp: bs.load_model(5),
        InputTypeError,
        r"model spec must be a string; got int",
    ),
    "load_model unknown spec": (
        lambda tmp: bs.load_model("no-such-net"),
        InputError,
        r"unknown model spec 'no-such-net'",
    ),
    "load_data image_size=32.0": (
        lambda tmp: bs.load_data("digits", image_size=32.0),
        InputTypeError,
        r"image_size must be a positive int or \(height, width\) of ints; got float 32.0",
    ),
    "load_data image_size=0": (
        lambda tmp: bs.load_data("digits", image_size=0),
        InputError,
        r"image_size must be a positive int or \(height, width\) of ints; got 0",
    ),
    "load_data unknown split": (
        lambda tmp: bs.load_data("digits", split="val"),
        InputError,
        r"unknown split 'val'; expected one of",
    ),
    "load_data channels 2": (
        lambda tmp: bs.load_data("digits", channels=2),
        InputError,
        r"channels must be 1 or 3; got 2",
    ),
    "npz with int64 above 65535": (
        lambda tmp: bs.load_data(_npz(tmp, np.full((2, 1, 4, 4), 70000, np.int64))),
        InputError,
        r"array x in .*data.npz has int64 values in \[70000, 70000\]; expected integer pixel",
    ),
    "npz with negative integers": (
        lambda tmp: bs.load_data(_npz(tmp, np.full((2, 1, 4, 4), -3, np.int32))),
        InputError,
        r"has int32 values in \[-3, -3\]",
    ),
    "manipulate x outside the data range": (
        _manipulate(X * 5),
        InputError,
        r"x has values in \[.*\], outside data_range \[0, 1\]; expected inputs inside",
    ),
    "manipulate data_range reversed": (
        _manipulate(X, data_range=(1.0, 0.0)),
        InputError,
        r"data_range must be None or \(low, high\) with low < high",
    ),
    "manipulate x of 3 dimensions": (
        lambda tmp: bs.manipulate(plain_cnn(), X[0], None, "gradient"),
        InputError,
        r"x must have at least 4 dimensions",
    ),
    "manipulate unknown goal": (
        _manipulate(X, goal="away"),
        InputError,
        r"unknown goal 'away'; expected one of: center, targeted, topk",
    ),
    "manipulate steps 0": (_manipulate(X, steps=0), InputError, r"steps must be an integer >= 1"),
    "manipulate float16 x": (
        _manipulate(X.half()),
        InputTypeError,
        r"x has dtype torch.float16 but the model's parameters are torch.float32",
    ),
    "manipulate target map of the wrong size": (
        lambda tmp: bs.manipulate(plain_cnn(), X, torch.rand(2, 8, 8), "gradient", steps=2),
        InputError,
        r"target_map must have shape \(B, H, W\) = \(2, 16, 16\)",
    ),
}


@pytest.mark.parametrize("case", sorted(API))
def test_api_bad_input_raises_one_line(case, tmp_path):
    call, kind, pattern = API[case]
    with pytest.raises(InputError) as err:
        call(tmp_path)
    assert type(err.value) is kind
    message = str(err.value)
    assert "\n" not in message and len(message) < 400
    assert re.search(pattern, message), message


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli-bad")
    np.savez(d / "wide.npz", x=np.full((2, 1, 32, 32), 70000, np.int64))
    (d / "notadir.txt").write_text("x")
    (d / "normed.py").write_text(NORMED)
    return d


# LRP has no rule for LayerNorm: a run with gradient first must still fail before it starts.
NORMED = """
from torch import nn


def net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.LayerNorm([4, 32, 32]), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 32 * 32, 10),
    )
"""


INPUTS = ["--model", "digits-cnn", "--data", "digits"]
ATTACK = ["attack", *INPUTS, "--method", "gradient", "--out", "{d}/run"]
EXPLAIN = ["explain", *INPUTS, "--method", "gradient", "--out", "{d}/run"]

# name: (argv, pattern of the one line on stderr)
CLI: dict[str, tuple[list[str], str]] = {
    "-n 0": ([*ATTACK, "-n", "0"], r"^betasmooth attack: error: argument -n/--images: expected a"),
    "--images abc": ([*EXPLAIN, "--images", "abc"], r"argument -n/--images: .* got 'abc'"),
    "--n (taken by torchrun)": ([*ATTACK, "--n", "4"], r"unrecognized .*--n.* -n or --images"),
    "--steps -5": ([*ATTACK, "--steps", "-5"], r"argument --steps: .*positive integer; got '-5'"),
    "--batch-size 0": ([*ATTACK, "--batch-size", "0"], r"argument --batch-size: expected a"),
    "--goal away": ([*ATTACK, "--goal", "away"], r"argument --goal: invalid choice: 'away'"),
    "--channels 2": ([*ATTACK, "--channels", "2"], r"argument --channels: invalid choice: 2"),
    "--image-size 0": ([*ATTACK, "--image-size", "0"], r"argument --image-size: expected a pos"),
    "--mean abc": ([*ATTACK, "--mean", "abc"], r"argument --mean: invalid float value: 'abc'"),
    "--seed x": ([*ATTACK, "--seed", "x"], r"argument --seed: invalid int value: 'x'"),
    "missing --model": (
        ["attack", "--data", "digits", "--method", "gradient", "--out", "{d}/r"],
        r"^betasmooth attack: error: the following arguments are required: --model",
    ),
    "unknown command": (["attak"], r"^betasmooth: error: argument COMMAND: invalid choice"),
    "no command": ([], r"^betasmooth: error: the following arguments are required: COMMAND"),
    "sweep --betas abc": (
        ["sweep", "{d}", "--betas", "abc"],
        r"^betasmooth sweep: error: argument --betas: expected a comma list of numbers",
    ),
    "sweep --smoothgrad-n 0": (
        ["sweep", "{d}", "--smoothgrad-n", "0"],
        r"argument --smoothgrad-n: expected a positive integer",
    ),
    "curvature --betas -1": (
        ["curvature", *INPUTS, "--betas", "-1", "--out", "{d}/c"],
        r"^betasmooth: error: --betas must be positive finite numbers.*got -1",
    ),
    "unknown method": (
        [*ATTACK[:5], "--method", "saliency", "--out", "{d}/run"],
        r"^betasmooth: error: unknown method 'saliency'; expected a comma list of gradient",
    ),
    "unknown model spec": (
        ["explain", "--model", "nonet", "--data", "digits", "--method", "gradient", "--out", "o"],
        r"^betasmooth: error: unknown model spec 'nonet'",
    ),
    "npz with int64 above 65535": (
        ["explain", "--model", "digits-cnn", "--data", "{d}/wide.npz", "--method", "lrp"]
        + ["--out", "{d}/run"],
        r"^betasmooth: error: array x in .*wide.npz has int64 values in \[70000, 70000\]",
    ),
    "--device cuda:7 without a GPU": (
        [*ATTACK, "--device", "cuda:7"],
        r"^betasmooth: error: CUDA is not available on this machine",
    ),
    "lrp on a model it has no rule for, after gradient": (
        ["explain", "--model", "{d}/normed.py:net", "--data", "digits"]
        + ["--method", "gradient,lrp", "--out", "{d}/run"],
        r"^betasmooth: error: lrp has no rule for module LayerNorm \(1\)",
    ),
    "lrp on such a model, in an attack": (
        ["attack", "--model", "{d}/normed.py:net", "--data", "digits"]
        + ["--method", "gradient,lrp", "-n", "2", "--steps", "2", "--out", "{d}/run"],
        r"^betasmooth: error: lrp has no rule for module LayerNorm",
    ),
    "report of a file": (["report", "{d}/notadir.txt"], r"notadir.txt is not a directory"),
    "sweep of a file": (["sweep", "{d}/notadir.txt"], r"notadir.txt is not a directory"),
}
if not torch.backends.mps.is_available():
    CLI["--device mps without MPS"] = (
        [*ATTACK, "--device", "mps"],
        r"^betasmooth: error: MPS is not available on this machine \(--device mps\)",
    )


@pytest.mark.parametrize("case", sorted(CLI))
def test_cli_bad_input_exits_2_with_one_line(case, files, capsys):
    argv, pattern = CLI[case]
    try:
        status = main([a.format(d=files) for a in argv])
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    assert status == 2
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert re.search(pattern, err), err
    assert "Traceback" not in out + err and "usage:" not in err
    assert not (files / "run").exists()


def test_table_has_forty_cases() -> None:
    assert len(API) + len(CLI) >= 40 and len(API) >= 20 and len(CLI) >= 20
