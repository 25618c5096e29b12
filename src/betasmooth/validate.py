"""Checks of user input that end in one clear line.

Every problem with what a user passed in raises :class:`InputError` (a
``ValueError``) or :class:`InputTypeError` (also a ``TypeError``); the
command line turns both into one line on stderr and exit status 2.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection

import torch

__all__ = [
    "InputError",
    "InputTypeError",
    "check_batch",
    "check_choice",
    "check_classes",
    "check_count",
    "check_positive",
    "check_target",
]


class InputError(ValueError):
    """A problem with user input: the message names it and the expected form."""


class InputTypeError(InputError, TypeError):
    """User input of the wrong type."""


def check_batch(x: object, name: str = "x", min_dim: int = 2) -> torch.Tensor:
    """Check that ``x`` is a finite floating tensor batched over dim 0.

    Parameters
    ----------
    x : object
        The candidate input.
    name : str
        Name used in the error message.
    min_dim : int
        Least number of dimensions, the batch dimension included.

    Returns
    -------
    torch.Tensor
        ``x`` itself.

    Examples
    --------
    >>> check_batch(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 1, 8, 8])
    """
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(
            f"{name} must be a torch.Tensor batched over dim 0, e.g. shape (B, C, H, W); "
            f"got {type(x).__name__}"
        )
    if not x.is_floating_point():
        raise InputTypeError(
            f"{name} must be a floating tensor (float32 or float64); got dtype {x.dtype}"
        )
    if x.dim() < min_dim:
        raise InputError(
            f"{name} must have at least {min_dim} dimensions with the batch first, "
            f"e.g. (B, C, H, W); got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise InputError(f"{name} is an empty batch; expected at least one item in dim 0")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} contains NaN or inf; expected finite values")
    return x


def check_target(target: object, batch: int) -> torch.Tensor | None:
    """Normalise a target class to ``None`` or a ``(batch,)`` long tensor.

    Parameters
    ----------
    target : None, int or torch.Tensor
        ``None`` (the predicted class), one class for the whole batch, or one per item.
    batch : int
        Batch size.

    Returns
    -------
    torch.Tensor or None
        Class indices of shape ``(batch,)``, not yet checked against the
        number of classes (see :func:`check_classes`).

    Examples
    --------
    >>> check_target(3, batch=2)
    tensor([3, 3])
    """
    if target is None:
        return None
    if isinstance(target, bool) or not isinstance(target, (int, torch.Tensor)):
        raise InputTypeError(
            f"target must be None, an int or a (B,) integer tensor; got {type(target).__name__}"
        )
    if isinstance(target, int):
        target = torch.full((batch,), target, dtype=torch.long)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise InputTypeError(f"target must hold integer class indices; got dtype {target.dtype}")
    if target.dim() == 0:
        target = target.expand(batch)
    if target.shape != (batch,):
        raise InputError(
            f"target must be an int or have shape ({batch},) to match the batch; "
            f"got shape {tuple(target.shape)}"
        )
    if bool((target < 0).any()):
        raise InputError(f"target class must be >= 0; got {target.min().item()}")
    return target.long()


def check_classes(target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Check that every class index is below the model's number of outputs.

    Examples
    --------
    >>> check_classes(torch.tensor([3, 9]), 10)
    tensor([3, 9])
    """
    if bool((target >= n_classes).any()):
        raise InputError(
            f"target class {target.max().item()} is out of range; "
            f"the model has {n_classes} outputs (classes 0 to {n_classes - 1})"
        )
    return target


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """Check that the option ``name`` is an integer ``>= minimum``.

    Examples
    --------
    >>> check_count("steps", 32, 2)
    32
    >>> check_count("steps", 1, 2)
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: steps must be an integer >= 2; got 1
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}; got {value}")
    return int(value)


def check_choice(name: str, value: object, choices: Collection[str]) -> str:
    """Check that the option ``name`` is one of ``choices`` (names).

    Examples
    --------
    >>> check_choice("noise", "gaussian", {"gaussian", "logistic"})
    'gaussian'
    """
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"unknown {name} {value!r}; expected one of: {', '.join(sorted(choices))}")
    return value


def check_positive(name: str, value: object, optional: bool = False) -> float | None:
    """Check that the option ``name`` is a positive finite number (or ``None`` if ``optional``).

    Examples
    --------
    >>> check_positive("sigma", 0.15)
    0.15
    >>> check_positive("sigma", 0.0)
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: sigma must be a positive finite number; got 0.0
    """
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be a positive number; got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise InputError(f"{name} must be a positive finite number; got {value!r}")
    return float(value)
