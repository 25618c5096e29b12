"""betasmooth: explanation maps that cannot be steered.

Explain any PyTorch classifier with the classic attribution methods, attack
the explanations (Dombrowski et al. 2019; Ghorbani et al. 2019), defend them
by beta-smoothing (ReLU -> softplus_beta), and measure the geometry and the
theory behind it.

Examples
--------
>>> import betasmooth as bs
>>> model = bs.load_model("digits-cnn")
>>> x, y = bs.load_data("digits")
>>> maps = bs.heatmap(bs.explain(model, x[:4], "beta_smooth", beta=1.0))
"""

from __future__ import annotations

from .explain import METHODS, explain, register
from .metrics import heatmap
from .smooth import LogisticNoise, smooth, smoothed, softplus
from .validate import InputError, InputTypeError

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "InputError",
    "InputTypeError",
    "LogisticNoise",
    "explain",
    "heatmap",
    "register",
    "smooth",
    "smoothed",
    "softplus",
]
