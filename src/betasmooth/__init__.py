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

import importlib
import pkgutil

from .explain import METHODS, explain, register
from .metrics import compare, heatmap
from .smooth import LogisticNoise, smooth, smoothed, softplus
from .validate import InputError, InputTypeError

__version__ = "0.20.5"

# Heavier parts load on first use, so that `import betasmooth` stays quick.
_LAZY = {
    "load_data": "zoo",
    "load_model": "zoo",
    "manipulate": "attack",
    "defense_sweep": "defense",
    "curvature": "geometry",
    "calibrate_beta": "calibrate",
    "ImageData": "zoo",
    "quantus_explain": "quantus_adapter",
}


# Submodules are attributes before their import too (bs.pretrained.checkpoint_path);
# not __main__, whose import runs the command line.
_SUBMODULES = frozenset(m.name for m in pkgutil.iter_modules(__path__) if m.name[0] != "_")


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'betasmooth' has no attribute {name!r}")


def __dir__() -> list[str]:
    # What a notebook's tab completion offers: the lazy names too, not this file's imports.
    return sorted({*globals(), *__all__, *_SUBMODULES} - {"annotations", "importlib", "pkgutil"})


__all__ = [
    "METHODS",
    "ImageData",
    "calibrate_beta",
    "compare",
    "curvature",
    "defense_sweep",
    "load_data",
    "load_model",
    "manipulate",
    "quantus_explain",
    "theory",
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
