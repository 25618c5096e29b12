"""Bad input, one table: each case through the API (exact exception class) or the CLI
(exit status 2), and always one line that names the problem."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
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


def _sweep(betas: object = (1.0,), x: torch.Tensor = X, **kw: object) -> Callable:
    return lambda tmp: bs.defense_sweep(plain_cnn(), x, x, _targets(X), "gradient", betas, **kw)


BETA_RANGE = r"between 1.175e-38 and 3.403e\+38 \(the normal range of float32"


# name: (call(tmp_path), exception class, pattern of the one-line message)
class _Folds(torch.nn.Module):
    """Flattens with x.view(1, -1): right for one item, wrong for a batch."""

    def __init__(self, rows: int = 0) -> None:
        super().__init__()
        self.rows = rows
        self.linear = torch.nn.Linear(256, 5)

    def forward(self, x):
        h = x.view(1, -1)
        # rows=1: the items averaged into one row of logits (the shape check's case).
        return self.linear(h.view(len(x), -1).mean(0, keepdim=True) if self.rows else h)


def _nan_weights() -> torch.nn.Module:
    net = plain_cnn()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.fill_(float("nan"))
    return net


class ReluTwice(nn.Module):
    """One ReLU module used twice in forward, as torchvision's ResNets do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu = nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()
        self.head = nn.Linear(2 * 16 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.relu(self.conv(x))).flatten(1))


class Raises(nn.Module):
    """A forward with a bug of its own, whatever the input's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(256, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("my forward is broken")


class Unfinished(Raises):
    """A forward left to write: NotImplementedError is a RuntimeError, as torch's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("forward is not written yet")


API: dict[str, tuple[Callable[[Path], object], type[Exception], str]] = {
    "manipulate beta_smooth on a Captum base": (
        lambda tmp: bs.manipulate(
            plain_cnn(),
            X,
            torch.rand(2, 16, 16),
            "beta_smooth",
            steps=2,
            method_options={"base": "captum:Saliency"},
        ),
        InputError,
        r"^beta_smooth with base captum:Saliency cannot be attacked: captum:Saliency's maps",
    ),
    "model whose forward raises its own error": (
        _explain(Raises, X),
        InputError,
        r"^model's forward raised ValueError on input of shape \(1, 16, 16\) \(2 items of x, "
        r"whose shape is \(2, 1, 16, 16\)\): my forward is broken$",
    ),
    "model whose forward is not implemented": (
        _explain(Unfinished, X),
        InputError,
        r"^model's forward raised NotImplementedError on input of shape \(1, 16, 16\) \(2 items "
        r"of x, whose shape is \(2, 1, 16, 16\)\): forward is not written yet$",
    ),
    "Captum method that refuses the model": (
        _explain(ReluTwice, X, "captum:DeepLift"),
        InputError,
        r"captum:DeepLift failed on this model: A Module ReLU\(\) was detected",
    ),
    "Captum error that prints a tensor": (
        _explain(plain_cnn, X, "captum:DeepLiftShap", baselines=torch.zeros(1, 1, 16, 16)),
        InputError,
        r"^captum:DeepLiftShap failed on this model: Baselines .* found: tensor\(\.\.\.\)$",
    ),
    "manipulate a Captum method": (
        lambda tmp: bs.manipulate(plain_cnn(), X, _targets(X), "captum:Saliency", steps=2),
        InputError,
        r"captum:Saliency cannot be attacked: .*not differentiable.*such as gradient or lrp",
    ),
    "manipulate with create_graph in method_options": (
        _manipulate(X, method_options={"create_graph": False}),
        InputError,
        r"method_options may not set create_graph",
    ),
    "defense sweep of a defense": (
        lambda tmp: bs.defense_sweep(plain_cnn(), X, X, _targets(X), "smoothgrad", [1.0]),
        InputError,
        r"smoothgrad is itself a smoothing .*expected the base method, such as gradient",
    ),
    "calibrate beta of a defense": (
        lambda tmp: bs.calibrate_beta(plain_cnn(), X, "beta_smooth", betas=[1.0], steps=1),
        InputError,
        r"beta_smooth is itself a smoothing .*expected the base method",
    ),
    "lrp outside its box inside manipulate": (
        lambda tmp: bs.manipulate(plain_cnn(), X * 9 - 4, _targets(X), "lrp", data_range=None),
        InputError,
        r"outside the lrp input box.*data_range=data.bounds",
    ),
    "manipulate steps 10**30": (
        _manipulate(X, steps=10**30),
        InputError,
        r"steps must be an integer from 1 to 2147483647; got 1000000000000000000000000000000",
    ),
    "explain with NaN weights": (
        lambda tmp: bs.explain(_nan_weights(), X, "gradient"),
        InputError,
        r"Sequential returns NaN or inf on 2 items of x; expected finite logits",
    ),
    "curvature with one bound as data_range": (
        lambda tmp: bs.curvature(plain_cnn(), X, data_range=(1.0,)),
        InputError,
        r"^data_range must be \(low, high\), e.g. data.bounds; got tuple \(1.0,\)$",
    ),
    "curvature with per-channel bounds as a vector": (
        lambda tmp: bs.curvature(plain_cnn(), X, data_range=(torch.zeros(1), torch.ones(1))),
        InputError,
        r"^data_range bounds must be numbers or shaped like data.bounds, \(1, C, 1, 1\); got",
    ),
    "curvature with bounds of 3 channels for 1": (
        lambda tmp: bs.curvature(
            plain_cnn(), X, data_range=(torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
        ),
        InputError,
        r"^data_range bounds of shapes \(1, 3, 1, 1\), \(1, 3, 1, 1\) do not broadcast to x of "
        r"shape \(2, 1, 16, 16\); expected numbers or \(1, 1, 1, 1\) tensors",
    ),
    "curvature with high below low": (
        lambda tmp: bs.curvature(plain_cnn(), X, data_range=(1.0, 0.0)),
        InputError,
        r"^data_range must have low < high in every channel$",
    ),
    "curvature with NaN weights": (
        lambda tmp: bs.curvature(_nan_weights(), X, iterations=2),
        InputError,
        r"returns NaN or inf on (2 items|one item) of x",
    ),
    "model that folds the batch into one row": (
        _explain(lambda: _Folds(), X),
        InputError,
        r"model takes one item of shape \(1, 16, 16\) but fails on a batch of 2 \(x has shape "
        r"\(2, 1, 16, 16\)\): mat1 and mat2 shapes cannot be multiplied \(1x512 and 256x5\); "
        r"expected a forward that keeps the batch dimension \(x.flatten\(1\), not "
        r"x.view\(1, -1\)\)",
    ),
    "model that returns one row for a batch": (
        _explain(lambda: _Folds(rows=1), X),
        InputError,
        r"the model returned shape \(1, 5\) for 2 input item\(s\); expected logits of shape "
        r"\(2, classes\)",
    ),
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
        r"x has dtype torch.float16 but the model's parameters are torch.float32; expected "
        r"float32 or float64 \(cast with x.to\(torch.float32\)\)$",
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
    "model on the meta device": (
        _explain(lambda: plain_cnn().to("meta"), X),
        InputError,
        r"Sequential's parameters are on the meta device and hold no values; expected a model "
        r"with its weights",
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
        r"target must be None, an int or a \(B,\) integer tensor, array or list; got float",
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
        r"the model returned shape \(2,\) for 2 input item\(s\); expected logits of shape \(2, ",
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
    "lrp low nan": (
        _explain(plain_cnn, X, "lrp", low=float("nan")),
        InputError,
        r"lrp option 'low' must be finite \(a bound of the input domain\); got nan$",
    ),
    "lrp high an inf tensor": (
        _explain(plain_cnn, X, "lrp", high=torch.tensor([1.0, float("inf")]).view(1, 2, 1, 1)),
        InputError,
        r"lrp option 'high' must be finite .*; got a tensor of shape \(1, 2, 1, 1\) holding NaN",
    ),
    "lrp low and high that do not broadcast together": (
        _explain(plain_cnn, X, "lrp", low=torch.zeros(3, 1, 1), high=torch.ones(2, 1, 1)),
        InputError,
        r"lrp options 'low' of shape \(3, 1, 1\) and 'high' of shape \(2, 1, 1\) do not "
        r"broadcast together; expected floats or tensors broadcastable to x",
    ),
    "lrp low of 3 channels for 1": (
        _explain(plain_cnn, X, "lrp", low=torch.zeros(1, 3, 1, 1)),
        InputError,
        r"lrp option 'low' of shape \(1, 3, 1, 1\) does not broadcast to x of shape "
        r"\(2, 1, 16, 16\); expected a float or e.g. shape \(1, C, 1, 1\)",
    ),
    "beta_smooth beta above float32": (
        _explain(plain_cnn, X, "beta_smooth", beta=1e39),
        InputError,
        rf"beta must be {BETA_RANGE}.*; got 1e\+39$",
    ),
    "smooth beta below float32's normal numbers": (
        lambda tmp: bs.smooth(plain_cnn(), 1e-40),
        InputError,
        rf"beta must be {BETA_RANGE}.*; got 1e-40$",
    ),
    "softplus of an integer tensor": (
        lambda tmp: bs.softplus(torch.arange(3), 1.0),
        InputTypeError,
        r"x must be a floating tensor \(e.g. float32 or float64\); got dtype torch.int64",
    ),
    "softplus of a list": (
        lambda tmp: bs.softplus([1.0], 1.0),
        InputTypeError,
        r"x must be a floating torch.Tensor; got list",
    ),
    "softplus beta that does not broadcast": (
        lambda tmp: bs.softplus(torch.rand(3), torch.ones(2)),
        InputError,
        r"beta of shape \(2,\) does not broadcast against x of shape \(3,\)",
    ),
    "smoothgrad input_range of 3 channels for 1": (
        _explain(plain_cnn, X, "smoothgrad", n=2, input_range=torch.ones(1, 3, 1, 1)),
        InputError,
        r"input_range of shape \(1, 3, 1, 1\) does not broadcast to x of shape \(2, 1, 16, 16\); "
        r"expected a number or a \(1, 1, 1, 1\) tensor",
    ),
    "smoothgrad with an IG baseline of another batch's size": (
        _explain(
            plain_cnn,
            X,
            "smoothgrad",
            n=2,
            base="integrated_gradients",
            baseline=torch.zeros(4, 1, 16, 16),
        ),  # fmt: skip
        InputError,
        r"baseline of shape \(4, 1, 16, 16\) does not broadcast to x of shape \(2, 1, 16, 16\)",
    ),
    "smoothgrad seed 2**70": (
        _explain(plain_cnn, X, "smoothgrad", n=2, seed=2**70),
        InputError,
        r"seed must be an integer from 0 to 18446744073709551615; got 1180591620717411303424",
    ),
    "create_graph a string": (
        _explain(plain_cnn, X, create_graph="yes"),
        InputTypeError,
        r"create_graph must be True or False; got str 'yes'",
    ),
    "captum method with an unknown option": (
        _explain(plain_cnn, X, "captum:Saliency", zzz=1),
        InputTypeError,
        r"unknown option 'zzz' for method 'captum:Saliency'; expected some of: abs, ",
    ),
    "captum method without an option Captum requires": (
        _explain(plain_cnn, X, "captum:Occlusion"),
        InputError,
        r"^captum:Occlusion needs the option sliding_window_shapes \(Captum requires it\); "
        r"expected bs.explain\(model, x, 'captum:Occlusion', sliding_window_shapes=...\)",
    ),
    "pcc of 2-D maps": (
        lambda tmp: bs.metrics.pcc(torch.rand(4, 4), torch.rand(4, 4)),
        InputError,
        r"map a must have shape \(B, H, W\), one map per batch item; got shape \(4, 4\)$",
    ),
    "compare of empty maps": (
        lambda tmp: bs.compare(torch.rand(2, 0, 4), torch.rand(2, 0, 4)),
        InputError,
        r"map a holds empty maps, shape \(2, 0, 4\); expected \(B, H, W\) with H, W >= 1",
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
    "load_data image_size=True": (
        lambda tmp: bs.load_data("digits", image_size=True),
        InputTypeError,
        r"image_size must be a positive int or \(height, width\) of ints; got bool True$",
    ),
    "load_data image_size=0": (
        lambda tmp: bs.load_data("digits", image_size=0),
        InputError,
        r"image_size must be a positive int or \(height, width\) of ints; got 0",
    ),
    "load_data image_size=(32,)": (
        lambda tmp: bs.load_data("digits", image_size=(32,)),
        InputError,
        r"image_size must be a positive int or \(height, width\) of ints; got \(32,\)",
    ),
    "load_data unknown split": (
        lambda tmp: bs.load_data("digits", split="val"),
        InputError,
        r"unknown split 'val'; expected one of",
    ),
    "load_data of an empty spec": (
        lambda tmp: bs.load_data(""),
        InputError,
        r"data spec is empty; expected 'digits' or 'photos'",
    ),
    "load_data split train of an npz": (
        lambda tmp: bs.load_data(_npz(tmp, np.zeros((2, 1, 4, 4), np.float32)), split="train"),
        InputError,
        r"split 'train' exists for the built-in data only; .*data.npz is used whole",
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
    "manipulate eps in 8-bit levels": (
        _manipulate(X, eps=8),
        InputError,
        r"^eps must be at most 1: it is a fraction of each channel's data range .*; got 8$",
    ),
    "manipulate float16 x": (
        _manipulate(X.half()),
        InputTypeError,
        r"x has dtype torch.float16 but the model's parameters are torch.float32",
    ),
    "manipulate beta0 0": (
        _manipulate(X, beta0=0.0),
        InputError,
        r"beta0 must be a positive finite number; got 0.0",
    ),
    "manipulate beta_end above float32": (
        _manipulate(X, beta_end=1e300),
        InputError,
        rf"beta_end must be {BETA_RANGE}.*; got 1e\+300$",
    ),
    "manipulate weights 5": (
        _manipulate(X, weights=5),
        InputTypeError,
        r"weights must be None or \(w_e, w_o\), two numbers >= 0; got int 5",
    ),
    "manipulate weights of three numbers": (
        _manipulate(X, weights=(1.0, 2.0, 3.0)),
        InputError,
        r"^weights must be None or \(w_e, w_o\), two numbers >= 0; got \(1.0, 2.0, 3.0\)$",
    ),
    "manipulate method_options 5": (
        _manipulate(X, method_options=5),
        InputTypeError,
        r"method_options must be a dict of options of 'gradient', .*; got int 5",
    ),
    "manipulate seed 1.5": (
        _manipulate(X, seed=1.5),
        InputTypeError,
        r"seed must be an integer >= 0; got 1.5",
    ),
    "manipulate seed 2**70": (
        _manipulate(X, seed=2**70),
        InputError,
        r"seed must be an integer from 0 to 18446744073709551615; got 1180591620717411303424",
    ),
    "manipulate eot seed whose draws pass 2**64 - 1": (
        lambda tmp: bs.manipulate(
            plain_cnn(),
            X,
            _targets(X),
            "smoothgrad",
            steps=2,
            eot=True,
            seed=2**64 - 1,
            method_options={"n": 2},
        ),
        InputError,
        r"^seed must be an integer from 0 to 18446744073709551613; got 18446744073709551615$",
    ),
    "manipulate data_range of 3 channels for 1": (
        _manipulate(X, data_range=(torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))),
        InputError,
        r"data_range bounds of shapes \(1, 3, 1, 1\), \(1, 3, 1, 1\) do not broadcast to x of "
        r"shape \(2, 1, 16, 16\); expected numbers or \(1, 1, 1, 1\) tensors",
    ),
    "manipulate data_range to inf": (
        _manipulate(X, data_range=(0.0, float("inf"))),
        InputError,
        r"data_range must be None or \(low, high\) with low < high, both finite; got \(0.0, inf\)",
    ),
    "defense_sweep betas a number": (
        _sweep(1.0),
        InputTypeError,
        r"betas must be a sequence of positive numbers, e.g. \[0.5, 1, 2, 5\]; got float 1.0",
    ),
    "defense_sweep beta below float32's normal numbers": (
        _sweep([1.0, 1e-40]),
        InputError,
        rf"beta must be {BETA_RANGE}.*; got 1e-40$",
    ),
    "defense_sweep no defenses": (
        _sweep(defenses=[]),
        InputError,
        r"defenses must name at least one of: beta_smooth, smoothgrad; got none",
    ),
    "defense_sweep defenses a string": (
        _sweep(defenses="beta_smooth"),
        InputTypeError,
        r"defenses must be a sequence of names, .*; got str 'beta_smooth'",
    ),
    "defense_sweep a seed per image, but 3 for 2": (
        _sweep(seed=[1, 2, 3]),
        InputError,
        r"seed must be an int or one int per item of x \(2\); got 3: \[1, 2, 3\]$",
    ),
    "defense_sweep data_range reversed": (
        _sweep(data_range=(1.0, 0.0)),
        InputError,
        r"data_range must be None or \(low, high\) with low < high",
    ),
    "defense_sweep x outside the data range": (
        _sweep(x=X * 5),
        InputError,
        r"x has values in \[.*\], outside data_range \[0, 1\]; expected inputs inside",
    ),
    "defense_sweep x_adv outside the data range": (
        lambda tmp: bs.defense_sweep(plain_cnn(), X, X * 5, _targets(X), "gradient", [1.0]),
        InputError,
        r"x_adv has values in \[.*\], outside data_range \[0, 1\]; expected inputs inside",
    ),
    "defense_sweep more smoothgrad_sigmas than betas": (
        _sweep(smoothgrad_sigmas=[0.1, 0.2]),
        InputError,
        r"smoothgrad_sigmas must hold one value per beta \(1\); got 2$",
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
    np.savez(d / "one.npz", x=np.zeros((1, 1, 32, 32), np.float32))
    np.savez(d / "two.npz", x=np.random.default_rng(0).random((2, 1, 32, 32), np.float32))
    (d / "notadir.txt").write_text("x")
    (d / "normed.py").write_text(NORMED)
    (d / "exits.py").write_text(EXITS)
    (d / "folds.py").write_text(FOLDS)
    (d / "hungry.py").write_text(HUNGRY)
    (d / "binary.py").write_text(
        "from torch import nn\n\n\ndef net():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 1))\n"
    )
    (d / "mixed").mkdir()
    for name, size in (("a.png", (20, 10)), ("b.png", (16, 16))):
        Image.fromarray(np.zeros(size[::-1], np.uint8)).save(d / "mixed" / name)
    return d


# A model file written as a script: its sys.exit() must not end the command silently.
EXITS = """
import sys

sys.exit(0)
"""

# Right for one image, wrong for a batch: refused before the first batch, in one line.
# Runs out of memory in a gradient's forward (torch's own CPU allocator error),
# after the no-grad probe of check_input.
HUNGRY = """
import torch
from torch import nn


class Hungry(nn.Sequential):
    def forward(self, x):
        if torch.is_grad_enabled():
            torch.empty(2**62, dtype=torch.uint8)
        return super().forward(x)


def net():
    return Hungry(nn.Flatten(), nn.Linear(32 * 32, 10))
"""

FOLDS = """
from torch import nn


class Folds(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(32 * 32, 10)

    def forward(self, x):
        return self.linear(x.view(1, -1))


def net():
    return Folds()
"""

# LRP has no rule for LocalResponseNorm: a run with gradient first must still fail before it
# starts.
NORMED = """
from torch import nn


def net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.LocalResponseNorm(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 32 * 32, 10),
    )
"""


INPUTS = ["--model", "digits-cnn", "--data", "digits"]
ATTACK = ["attack", *INPUTS, "--method", "gradient", "--out", "{d}/run"]
EXPLAIN = ["explain", *INPUTS, "--method", "gradient", "--out", "{d}/run"]

# name: (argv, pattern of the one line on stderr)
CLI: dict[str, tuple[list[str], str]] = {
    "-n 0": (
        [*ATTACK, "-n", "0"],
        r"^betasmooth attack: error: argument -n/--images/--n: expected a",
    ),
    "--images abc": ([*EXPLAIN, "--images", "abc"], r"argument -n/--images/--n: .* got 'abc'"),
    "--n -1": ([*ATTACK, "--n", "-1"], r"argument -n/--images/--n: expected a"),
    "-n -1e-3": (
        # argparse took "-1e-3" for an option after -n, where --images -1e-3 was named.
        [*EXPLAIN, "-n", "-1e-3"],
        r"^betasmooth explain: error: argument -n/--images/--n: expected a positive integer "
        r"below 2\*\*31; got '-1e-3' \(see betasmooth explain --help\)$",
    ),
    "unknown option before the command": (
        ["--foo", *EXPLAIN],
        r"^betasmooth: error: unrecognized arguments: --foo \(see betasmooth --help\)$",
    ),
    "unknown option": (
        [*EXPLAIN, "--foo", "1"],
        r"^betasmooth explain: error: unrecognized arguments: --foo 1 \(see betasmooth explain",
    ),
    "--steps -5": (
        [*ATTACK, "--steps", "-5"],
        r"argument --steps: .*positive integer below 2\*\*31; got '-5'",
    ),
    "--batch-size 0": ([*ATTACK, "--batch-size", "0"], r"argument --batch-size: expected a"),
    "--goal away": (
        [*ATTACK, "--goal", "away"],
        r"^betasmooth: error: unknown --goal 'away'; expected one of: center, targeted, topk$",
    ),
    "--out under a file": (
        [*EXPLAIN, "--out", "{d}/notadir.txt/run"],
        r"argument --out: .*notadir.txt is a file, so .*/run cannot be a directory; expected a",
    ),
    "--option of a method without options": (
        [*ATTACK[:5], "--method", "gradient", "--option", "gradient.foo=1", "--out", "{d}/r"],
        r"^betasmooth: error: --option gradient: unknown option 'foo' for method 'gradient', "
        r"which takes no options$",
    ),
    "--channels 2": ([*ATTACK, "--channels", "2"], r"argument --channels: invalid choice: 2"),
    "attack of smoothgrad on a Captum base": (
        [*ATTACK[:5], "--method", "smoothgrad", "--option", "smoothgrad.base=captum:Saliency"]
        + ["--out", "{d}/run"],
        r"^betasmooth: error: smoothgrad with base captum:Saliency cannot be attacked: "
        r"captum:Saliency's maps are not differentiable w.r.t. x; expected a base such as",
    ),
    "Captum layer method on a dense layer": (
        [*EXPLAIN[:5], "--method", "captum:LayerGradCam", "--option"]
        + ["captum:LayerGradCam.layer=10", "--out", "{d}/run"],
        r"^betasmooth: error: --option captum:LayerGradCam gives maps of "
        r"layer 10 of shape \(1,\) per image, not an image \(C, H, W\) that a run can record",
    ),
    "Captum layer method on a layer the model lacks": (
        [*EXPLAIN[:5], "--method", "captum:LayerGradCam", "--option"]
        + ["captum:LayerGradCam.layer=features.3", "--out", "{d}/run"],
        r"^betasmooth: error: --option captum:LayerGradCam: the model has no submodule "
        r"'features.3'; expected a name from model.named_modules\(\), e.g. 0, 1, 2",
    ),
    "--mean without --std": (
        [*ATTACK, "--mean", "0.485", "0.456", "0.406"],
        r"^betasmooth: error: --mean without --std: the --std would be 1; expected both --mean "
        r"and --std \(--std 1 to subtract the mean only\), or neither$",
    ),
    "--std without --mean": (
        [*EXPLAIN, "--std", "0.2"],
        r"^betasmooth: error: --std without --mean: the --mean would be 0; expected both",
    ),
    "--image-size 0": ([*ATTACK, "--image-size", "0"], r"argument --image-size: expected an int"),
    # One pixel's map always equals its target: a perfect attack that says nothing.
    "--image-size 7": (
        [*ATTACK, "--image-size", "7"],
        r"argument --image-size: expected an integer from 8 to 4096 \(smaller images give "
        r"maps of too few pixels to compare\); got '7' \(see betasmooth attack --help\)$",
    ),
    "--mean abc": ([*ATTACK, "--mean", "abc"], r"argument --mean: expected numbers, .* got 'abc'"),
    "--seed x": ([*ATTACK, "--seed", "x"], r"argument --seed: expected an integer from 0 to 2"),
    "theorem --seed -1": (
        ["theorem", "--quick", "--seed", "-1", "--out", "{d}/run"],
        r"^betasmooth theorem: error: argument --seed: expected an integer from 0 to 2\*\*64 - 1",
    ),
    "--seed 2**64": ([*ATTACK, "--seed", str(2**64)], r"argument --seed: expected an integer"),
    "--steps 1e20": ([*ATTACK, "--steps", "1" + "0" * 20], r"positive integer below 2\*\*31"),
    "--image-size 100000": ([*ATTACK, "--image-size", "100000"], r"integer from 8 to 4096"),
    "--method all,gradient": (
        [*ATTACK[:5], "--method", "all,gradient", "--out", "{d}/run"],
        r"^betasmooth: error: method 'all' stands alone; got all,gradient",
    ),
    "--method gradient,lrp,gradient": (
        [*ATTACK[:5], "--method", "gradient,lrp,gradient", "--out", "{d}/run"],
        r"^betasmooth: error: methods must differ; 'gradient' is given more than once$",
    ),
    "explain --method lrp, lrp": (
        [*EXPLAIN[:5], "--method", "lrp, lrp", "--out", "{d}/run"],
        r"^betasmooth: error: methods must differ; 'lrp' is given more than once$",
    ),
    "sweep --betas 1,,2": (["sweep", "{d}", "--betas", "1,,2"], r"comma list of numbers"),
    "sweep --min-fidelity 2": (
        ["sweep", "{d}", "--min-fidelity", "2"],
        r"argument --min-fidelity: expected a number from 0 to 1; got '2'",
    ),
    "curvature --betas ,": (
        ["curvature", *INPUTS, "--betas", ",", "--out", "{d}/run"],
        r"argument --betas: expected a comma list of numbers, e.g. .* relu",
    ),
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
        r"^betasmooth: error: --betas must be positive numbers from 1.18e-38 to 3.4e\+38 "
        r"\(float32's normal range\), e\.g\. 0\.5,1,2,5; got -1$",
    ),
    "curvature --betas -1,1": (
        # argparse took "-1,1" for an option: "argument --betas: expected one argument".
        ["curvature", *INPUTS, "--betas", "-1,1", "--out", "{d}/c"],
        r"^betasmooth: error: --betas must be positive numbers from 1.18e-38 .*got -1$",
    ),
    "curvature --betas -1e-3": (
        ["curvature", *INPUTS, "--betas", "-1e-3", "--out", "{d}/c"],
        r"^betasmooth: error: --betas must be positive numbers from 1.18e-38 .*got -0.001$",
    ),
    "unknown option with a negative list, before the command": (
        ["--bogus", "-1,2", "sweep", "{d}"],
        r"^betasmooth: error: unrecognized arguments: --bogus=-1,2 \(see betasmooth --help\)$",
    ),
    "curvature --betas 1e-50": (
        # Positive and finite, but below float32's normal numbers: the message said "finite".
        ["curvature", *INPUTS, "--betas", "1e-50", "--out", "{d}/c"],
        r"^betasmooth: error: --betas must be positive numbers from 1.18e-38 .*got 1e-50$",
    ),
    "data is a file, not .npz": (
        # Named as a data folder that "does not exist".
        [
            "explain",
            "--model",
            "digits-cnn",
            "--data",
            __file__,
            "--method",
            "gradient",
            "--out",
            "{d}/r",
        ],
        r"^betasmooth: error: data \S+test_bad_input\.py is a file but not an \.npz file; "
        r"expected a folder of images or an \.npz file",
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
    "--out ''": (
        ["explain", *INPUTS, "--method", "gradient", "--out", ""],
        r"argument --out: expected a directory name; got an empty one",
    ),
    "demo --device cuda:7 without a GPU": (
        ["demo", "--quick", "--device", "cuda:7", "--out", "{d}/run"],
        r"^betasmooth: error: CUDA is not available on this machine",
    ),
    "--device cuda:7 without a GPU": (
        [*ATTACK, "--device", "cuda:7"],
        r"^betasmooth: error: CUDA is not available on this machine",
    ),
    "model file that calls sys.exit": (
        ["explain", "--model", "{d}/exits.py:net", "--data", "digits"]
        + ["--method", "gradient", "--out", "{d}/run"],
        r"^betasmooth: error: importing .*exits.py failed: SystemExit: 0",
    ),
    "lrp on a model it has no rule for, after gradient": (
        ["explain", "--model", "{d}/normed.py:net", "--data", "digits"]
        + ["--method", "gradient,lrp", "--out", "{d}/run"],
        r"^betasmooth: error: lrp has no rule for module LocalResponseNorm \(1\)",
    ),
    "lrp on such a model, in an attack": (
        ["attack", "--model", "{d}/normed.py:net", "--data", "digits"]
        + ["--method", "gradient,lrp", "-n", "2", "--steps", "2", "--out", "{d}/run"],
        r"^betasmooth: error: lrp has no rule for module LocalResponseNorm",
    ),
    "model file whose forward folds the batch": (
        ["attack", "--model", "{d}/folds.py:net", "--data", "digits"]
        + ["--method", "gradient", "-n", "4", "--steps", "2", "--out", "{d}/run"],
        r"^betasmooth: error: model takes one item of shape \(1, 32, 32\) but fails on a "
        r"batch of 2",
    ),
    "out of memory in the checks before a run": (
        ["explain", "--model", "{d}/hungry.py:net", "--data", "digits"]
        + ["--method", "integrated_gradients", "--option", "integrated_gradients.steps=2"]
        + ["--out", "{d}/run"],
        r"^betasmooth: error: out of memory \(.*DefaultCPUAllocator: can't allocate memory.*\); "
        r"expected smaller inputs \(--image-size\) or, for integrated_gradients and "
        r"smoothgrad, fewer points per pass \(--option METHOD.chunk=1\)$",
    ),
    "model with one logit, in an attack": (
        # Its argmax is 0 whatever the logit's sign: every label would read as kept.
        ["attack", "--model", "{d}/binary.py:net", "--data", "{d}/two.npz"]
        + ["--method", "gradient", "-n", "2", "--steps", "2", "--out", "{d}/run"],
        r"^betasmooth: error: the attack needs two or more logits per item, but the model "
        r"returns one, of shape \(B, 1\); expected a binary classifier's two logits",
    ),
    "images of different sizes": (
        ["attack", "--model", "digits-cnn", "--data", "{d}/mixed", "--method", "gradient"]
        + ["--out", "{d}/run"],
        r"^betasmooth: error: image .*b.png is 16x16 but .*a.png is 20x10 \(width x height\); "
        r"pass image_size \(--image-size on the command line\) to resize all images",
    ),
    # Fewer images than asked is said in a line of its own, but not before an error:
    # bad input stays one line.
    "one image to attack, more asked": (
        ["attack", "--model", "digits-cnn", "--data", "{d}/one.npz", "-n", "3"]
        + ["--method", "gradient", "--out", "{d}/run"],
        r"^betasmooth: error: an attack needs at least 2 images, one to attack and one for "
        r"the target map; got 1$",
    ),
    "--beta auto on one image, more asked": (
        ["explain", "--model", "digits-cnn", "--data", "{d}/one.npz", "-n", "3"]
        + ["--method", "beta_smooth", "--beta", "auto", "--out", "{d}/run"],
        r"^betasmooth: error: calibrating beta needs at least 2 images; got 1$",
    ),
    "--beta auto on one image": (
        ["explain", "--model", "digits-cnn", "--data", "{d}/one.npz", "-n", "1"]
        + ["--method", "beta_smooth", "--beta", "auto", "--out", "{d}/run"],
        r"^betasmooth: error: calibrating beta needs at least 2 images; got 1$",
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
    assert out == ""
    assert not (files / "run").exists()


def test_method_all_on_a_model_lrp_cannot_explain_names_the_methods_that_can(files, capsys):
    # Models with a layer LRP has no rule for refuse LRP: `all`
    # failed on it alone without saying that every other method would run.
    from betasmooth.runs import explain_methods

    argv = ["explain", "--model", f"{files}/normed.py:net", "--data", "digits", "-n", "2"]
    assert main([*argv, "--method", "all", "--out", f"{files}/run"]) == 2
    err = capsys.readouterr().err
    others = ",".join(m for m in explain_methods("all") if m != "lrp")
    assert err.startswith("betasmooth: error: lrp has no rule for module LocalResponseNorm (1)")
    assert err.endswith(f"; of the methods asked for, {others} can run\n") and err.count("\n") == 1
    assert not (files / "run").exists()
    # The list is right: those methods run on that model.
    assert main([*argv, "--method", others, "--out", f"{files}/run2", "--no-progress"]) == 0


def test_out_of_memory_at_a_batch_of_1_names_what_to_try(files, capsys):
    argv = ["explain", "--model", f"{files}/hungry.py:net", "--data", "digits", "-n", "2"]
    assert main([*argv, "--method", "gradient", "--out", f"{files}/run"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "betasmooth: out of memory with a batch of 2; retrying with batches of 1"
    assert re.fullmatch(
        r"betasmooth: error: out of memory with a batch of 1 \(.*can't allocate memory.*\); "
        r"expected smaller inputs \(--image-size\) or, for integrated_gradients and "
        r"smoothgrad, fewer points per pass \(--option METHOD.chunk=1\)",
        lines[1],
    )
    assert len(lines) == 2


def test_out_of_memory_reading_the_weights_names_its_own_remedy(tmp_path, monkeypatch, capsys):
    # Smaller images do not help weights that do not fit: the line says what does.
    def hungry(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9")

    weights = tmp_path / "w.pt"
    torch.save(bs.load_model("digits-cnn").state_dict(), weights)
    monkeypatch.setattr(torch, "load", hungry)
    argv = ["explain", "--model", "digits-cnn", "--weights", str(weights), "--data", "digits"]
    assert main([*argv, "--method", "gradient", "--out", str(tmp_path / "run")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(
        r"betasmooth: error: out of memory reading weights file \S+ \(.*can't allocate memory.*\); "
        r"expected more free memory: the model's weights alone do not fit",
        lines[0],
    )
    assert not (tmp_path / "run").exists()


def test_out_of_memory_in_curvature_names_curvature_s_own_remedy(tmp_path, monkeypatch, capsys):
    # curvature has no --option: the hint of attack and explain (chunk=1) is not its own.
    from betasmooth import runs
    from betasmooth.validate import OutOfMemory

    def hungry(*args, **kwargs):
        raise OutOfMemory(RuntimeError("CUDA out of memory."), "with a batch of 1")

    monkeypatch.setattr(runs, "curvature_run", hungry)
    argv = ["curvature", "--model", "digits-cnn", "--data", "digits", "-n", "1", "--betas", "1"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        "betasmooth: error: out of memory with a batch of 1 (CUDA out of memory.); "
        "expected smaller inputs (--image-size)\n"
    )


def test_table_has_forty_cases() -> None:
    assert len(API) + len(CLI) >= 40 and len(API) >= 20 and len(CLI) >= 20


def _benchmark_error(script: str, *argv: str, env: dict[str, str] | None = None) -> str:
    """Run ``benchmarks/<script>``; it must exit 2 without a traceback. Its stderr's last line."""
    path = Path(__file__).parents[1] / "benchmarks" / script
    proc = subprocess.run(
        [sys.executable, str(path), *argv], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr.strip().splitlines()[-1]


# The benchmark scripts that take --device.
BENCHMARKS = sorted(
    p.name
    for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py")
    if '"--device"' in p.read_text()
)


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_names_a_device_it_cannot_use_in_one_line(script):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    assert _benchmark_error(script, "--device", "cuda:7", env=env) == (
        f"{script}: error: argument --device: CUDA is not available on this machine "
        "(--device cuda:7); use --device cpu"
    )


# Each benchmark's count of images or batch size, refused at 0 by argparse's type.
BENCHMARK_COUNTS = {
    "attack.py": "-n",
    "dimension.py": "-n",
    "explain.py": "--batch",
    "quantus_metrics.py": "-n",
    "relative_beta.py": "-n",
    "scale.py": "-n",
}


@pytest.mark.parametrize("script", sorted(BENCHMARK_COUNTS))
def test_benchmark_refuses_a_count_of_zero_in_one_line(script):
    option = BENCHMARK_COUNTS[script]
    last = _benchmark_error(script, option, "0")
    assert re.fullmatch(
        rf"{script}: error: argument {option}\S*: expected a positive integer below 2\*\*31; "
        r"got '0'",
        last,
    ), last


SCRIPTS = Path(__file__).parents[1] / "scripts"


def _run_script(name: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run a training script's main() in this process (no interpreter start-up per case)."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    module = importlib.import_module(name.removesuffix(".py"))
    monkeypatch.setattr(sys, "argv", [name, *argv])
    with pytest.raises(SystemExit) as stop:
        module.main()
    out, err = capsys.readouterr()
    return stop.value.code, out, err


@pytest.mark.parametrize(
    "script, option",
    [
        ("train_digits_cnn.py", "--epochs"),
        ("train_photos_cnn.py", "--epochs"),
        ("train_photos_cnn.py", "--threads"),
        ("train_photos_cnn.py", "--per-photo"),
    ],
)
def test_training_script_refuses_a_count_of_zero_before_training(
    script, option, tmp_path, monkeypatch, capsys
):
    # --epochs 0 used to train nothing and write an untrained model over the shipped one.
    out = tmp_path / "model.pt"
    code, printed, err = _run_script(script, [option, "0", "--out", str(out)], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and not printed
    assert err.strip().splitlines()[-1] == (
        f"{script}: error: argument {option}: expected a positive integer below 2**31; got '0'"
    )
    assert not out.exists()


@pytest.mark.parametrize("script", ["train_digits_cnn.py", "train_photos_cnn.py"])
@pytest.mark.parametrize("where", ["folder", "below a file"])
def test_training_script_checks_its_output_path_before_training(
    script, where, tmp_path, monkeypatch, capsys
):
    # A path found wrong only at torch.save lost the whole training run.
    (tmp_path / "file").write_text("")
    out, problem = {
        "folder": (tmp_path, f"{tmp_path} is a folder"),
        "below a file": (tmp_path / "file" / "model.pt", f"{tmp_path / 'file'} is not a folder"),
    }[where]
    code, printed, err = _run_script(script, ["--out", str(out)], monkeypatch, capsys)
    expected = "expected a file path in a writable folder, such as weights/model.pt"
    assert code == 2 and "Traceback" not in err and not printed
    assert err.strip().splitlines()[-1] == f"{script}: error: argument --out: {problem}; {expected}"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"betas": "auto"}, "betas must be a sequence"),
        ({"betas": [0.0, 1.0]}, "beta must be a positive finite number; got 0"),
        ({"min_fidelity": "0.9"}, "min_fidelity must be a number from 0 to 1"),
        ({"min_fidelity": float("nan")}, "min_fidelity must be a number from 0 to 1"),
        ({"min_fidelity": 2.0}, "min_fidelity must be a number from 0 to 1"),
        ({"min_fidelity": -0.5}, "min_fidelity must be a number from 0 to 1"),
        ({"method": "smoothgrad"}, "smoothgrad is itself a smoothing of a base method"),
    ],
)
def test_calibrate_beta_checks_its_arguments_before_the_attack(monkeypatch, options, named) -> None:
    from betasmooth import calibrate

    def no_attack(*args, **kwargs):
        raise AssertionError("the attack ran before the arguments were checked")

    monkeypatch.setattr(calibrate, "manipulate", no_attack)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises((InputError, InputTypeError), match=named):
        calibrate.calibrate_beta(plain_cnn(), x, steps=1, **options)


def test_a_sweep_summary_refuses_a_min_fidelity_that_is_no_fraction() -> None:
    from betasmooth.recommend import sweep_summary

    rows = [{"defense": "beta_smooth", "beta": 1.0, "adv_vs_clean_pcc": 0.8,
             "clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.3}]  # fmt: skip
    for bad in ("0.9", float("nan"), 1.5):
        with pytest.raises(InputError, match=r"^min_fidelity must be a number from 0 to 1"):
            sweep_summary(rows, min_fidelity=bad)
    assert sweep_summary(rows, min_fidelity=0.96)["method"]["recommended_beta"] is None
    assert sweep_summary(rows, min_fidelity=0.95)["method"]["recommended_beta"] == 1.0


def test_numpy_bounds_are_taken_as_the_tensors_they_copy() -> None:
    # data.bounds as numpy arrays (a user who saved them) bound the attack as the tensors do.
    model = plain_cnn(channels=3)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    low, high = torch.zeros(1, 3, 1, 1), torch.tensor([1.0, 0.9, 0.95]).view(1, 3, 1, 1)
    x = x.clamp(max=high)
    results = [
        bs.manipulate(model, x, None, "gradient", goal="topk", steps=3, data_range=bounds)
        for bounds in ((low, high), (low.numpy(), high.numpy()))
    ]
    torch.testing.assert_close(results[0].x_adv, results[1].x_adv)
    assert bool((results[1].x_adv <= high).all())


def test_calibrate_beta_names_a_missing_batch_dimension_not_data_range() -> None:
    x = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(bs.InputError, match=r"add the batch dimension with x\[None\]"):
        bs.calibrate_beta(plain_cnn(), x, steps=1)


def test_channels_last_images_are_named_as_such() -> None:
    model = plain_cnn(channels=3)
    x = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(bs.InputError, match=r"channels-last .*x\.permute\(0, 3, 1, 2\)") as info:
        bs.explain(model, x, "gradient")
    assert "--channels" not in str(info.value)
    # The hint is right: the permuted batch is explained as the channel-first one.
    permuted = bs.explain(model, x.permute(0, 3, 1, 2), "gradient")
    xg = x.permute(0, 3, 1, 2).clone().requires_grad_(True)
    out = model(xg)
    (expected,) = torch.autograd.grad(out.gather(1, out.argmax(1, keepdim=True)).sum(), xg)
    torch.testing.assert_close(permuted, expected)


def test_channels_last_images_are_named_so_where_a_normalisation_fails_first() -> None:
    # The per-channel mean before the first convolution fails on (B, H, W, C) in its own words.
    class Normalise(nn.Module):
        def forward(self, x):
            return (x - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / 0.2

    model = nn.Sequential(Normalise(), plain_cnn(channels=3))
    x = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(bs.InputError, match=r"channels-last .*x\.permute\(0, 3, 1, 2\)$"):
        bs.explain(model, x, "gradient")


def test_one_channels_last_image_is_told_to_permute_then_take_the_batch_dimension() -> None:
    model = plain_cnn(channels=3)
    image = torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(bs.InputError, match=r"\(H, W, C\): x\.permute\(2, 0, 1\)\[None\]$"):
        bs.explain(model, image, "gradient")
    # The hint is right: what it gives is explained as the channel-first batch of one.
    xg = image.permute(2, 0, 1)[None].clone().requires_grad_(True)
    out = model(xg)
    (expected,) = torch.autograd.grad(out[0, out[0].argmax()], xg)
    torch.testing.assert_close(
        bs.explain(model, image.permute(2, 0, 1)[None], "gradient"), expected
    )


@pytest.mark.parametrize("script", sorted(BENCHMARK_COUNTS))
def test_benchmark_refuses_an_unwritable_json_before_measuring(script, tmp_path):
    # The folder does not exist, so the results could never be recorded: refused
    # when parsing (a timeout of 120 s fails a script that measures first).
    target = tmp_path / "missing" / "out.jsonl"
    assert _benchmark_error(script, "--json", str(target)) == (
        f"{script}: error: argument --json: cannot append to {target}: No such file or directory"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "nosuch"], "unknown method 'nosuch'"),
        (["--eps", "-1"], "eps must be a positive"),
    ],
)
def test_dimension_refuses_bad_input_before_training(argv, message, tmp_path):
    cache = tmp_path / "cache"
    last = _benchmark_error(
        "dimension.py", *argv, "--cache", str(cache), "--out", str(tmp_path / "out")
    )
    assert last.startswith("dimension.py: error: ") and message in last, last
    assert not cache.exists()  # nothing was trained


def test_dimension_names_the_crops_a_count_needs_before_training(tmp_path):
    # -n above half the test crops failed as a shape mismatch after training.
    count = bs.load_data("photos", split="test").x.shape[0]
    n = count // 2 + 1
    cache = tmp_path / "cache"
    last = _benchmark_error(
        "dimension.py", "-n", str(n), "--cache", str(cache), "--out", str(tmp_path)
    )
    assert last == (
        f"dimension.py: error: -n {n} needs {2 * n} test crops ({n} attacked, {n} whose maps "
        f"are the targets); photos has {count}"
    )
    assert not cache.exists()  # nothing was trained


def test_attack_benchmark_refuses_betas_that_are_not_numbers():
    assert _benchmark_error("attack.py", "--betas", "a,b") == (
        "attack.py: error: --betas: expected a comma list of numbers; got 'a,b'"
    )


def test_attack_benchmark_names_the_images_a_count_needs():
    # Each attacked image takes another's map as its target: -n 300 needs 600 of
    # the 450 digits, which failed as a shape mismatch deep in the metrics.
    count = bs.load_data("digits", split="test").x.shape[0]
    n = count // 2 + 1
    assert _benchmark_error("attack.py", "-n", str(n)) == (
        f"attack.py: error: -n {n} needs {2 * n} test images ({n} attacked, {n} whose maps "
        f"are the targets); digits has {count}"
    )


def test_one_image_for_a_model_that_starts_with_a_transposed_convolution_is_named_so() -> None:
    # ConvTranspose2d, as Conv2d, also takes an unbatched image: the layer tells the layout.
    model = nn.Sequential(nn.ConvTranspose2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(200, 4))
    with pytest.raises(bs.InputError, match=r"ConvTranspose2d takes \(B, C, H, W\); add the batch"):
        bs.explain(model, torch.rand(3, 8, 8), "gradient")
