"""Beta-smoothing: softplus_beta, its noise distribution p_beta, and ReLU -> softplus for any model.

``softplus_beta(x) = log(1 + exp(beta x)) / beta`` is ReLU convolved with the
logistic density ``p_beta`` of scale ``1 / beta``; its derivative is
``sigmoid(beta x)``, the cumulative distribution function of ``p_beta``.

Every ReLU of a model is found by one mechanism: a
:class:`torch.overrides.TorchFunctionMode` that is active while the model's
``forward`` runs and that intercepts ``nn.ReLU``, ``F.relu``, ``torch.relu``
and ``Tensor.relu`` (in-place variants too) wherever they are called.

The piecewise-linear activations that are sums of shifted ReLUs and a linear
term (:data:`THROUGH_RELU`: ``ReLU6``, ``Hardtanh``, ``LeakyReLU``, ``PReLU``,
``Hardsigmoid``) are written that way and each ReLU replaced, so they too
become their exact convolution with ``p_beta``: ``ReLU6(x) = relu(x) -
relu(x - 6)`` becomes ``softplus_beta(x) - softplus_beta(x - 6)``.
``Hardswish(x) = x * Hardsigmoid(x)`` is a product, not a sum: its ReLUs are
replaced the same way, which makes it smooth and keeps it within
``log(2) / (2 beta)`` of Hardswish (at ``x = -3`` and ``3`` for beta of 0.5 or
more; further out, below ``0.28 / beta``, for smaller beta), but the result is
not its convolution with ``p_beta`` (at ``x = 0`` that is about
``pi^2 / (18 beta^2)``, the smoothed value 0).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import re
import sys
import threading
import types
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.distributions import Distribution, constraints
from torch.distributions.utils import broadcast_all
from torch.overrides import TorchFunctionMode

from .validate import (
    InputError,
    InputTypeError,
    check_instance,
    compiled_parts,
    is_number,
    one_at_a_time,
    set_origin,
    warn_user,
)

__all__ = [
    "BETA_RANGE",
    "LogisticNoise",
    "SmoothingHandle",
    "check_beta",
    "check_overridable",
    "check_smoothing_uncompiled",
    "flush_denormals",
    "is_smoothed",
    "logistic_std",
    "math_attention",
    "relu_calls",
    "replace_relu",
    "second_order",
    "smooth",
    "smoothed",
    "softplus",
]

RELU_FUNCTIONS = frozenset(
    {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
)
# The functions that always write into their input; the others do with inplace=True.
IN_PLACE_FUNCTIONS = frozenset(
    {F.relu_, torch.relu_, torch.Tensor.relu_, F.hardtanh_, F.leaky_relu_}
)

# Piecewise-linear activations that beta-smoothing does not replace; named in a
# warning because they keep the output manifold curved.
KINKED_MODULES: tuple[type[nn.Module], ...] = (
    nn.RReLU,
    nn.Threshold,
    nn.Hardshrink,
    nn.Softshrink,
)
# Smooth activations: a network built from them alone has no ReLU to replace,
# so beta-smoothing and guided backprop change nothing; named in that warning.
SMOOTH_MODULES: tuple[type[nn.Module], ...] = (
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Softplus,
    nn.Tanh,
    nn.Sigmoid,
)
SMOOTH_FUNCTIONS = frozenset(
    {F.gelu, F.silu, F.mish, F.elu, F.elu_, F.celu, F.celu_, F.selu, F.selu_, F.softplus}
    | {torch.tanh, torch.sigmoid}
)
KINKED_FUNCTIONS = frozenset(
    {F.rrelu, F.rrelu_, F.threshold, F.threshold_, F.hardshrink, F.softshrink}
)
# Clamps: ``clamp(min=0)`` is a ReLU by another name, which beta-smoothing does
# not replace (a clamp at 0 may be no activation); named in the same warning.
CLAMP_FUNCTIONS = frozenset(
    getattr(owner, name)
    for owner in (torch, torch.Tensor)
    for name in ("clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_")
    if hasattr(owner, name)
)
# ``maximum(x, 0)`` is one more: named when one operand is all zeros.
MAX_FUNCTIONS = frozenset(
    getattr(owner, name)
    for owner in (torch, torch.Tensor)
    for name in ("maximum", "fmax", "max")
    if hasattr(owner, name)
)

Relu = Callable[[torch.Tensor], torch.Tensor]


def _relu(relu: Relu, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return relu(x)


def _hardtanh(
    relu: Relu, x: torch.Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False
) -> torch.Tensor:
    if min_val > max_val:  # torch's own refusal: the form would give a reversed curve
        raise ValueError("min_val cannot be greater than max_val")
    return min_val + relu(x - min_val) - relu(x - max_val)


def _relu6(relu: Relu, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return relu(x) - relu(x - 6.0)


def _leaky_relu(
    relu: Relu, x: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False
) -> torch.Tensor:
    return negative_slope * x + (1 - negative_slope) * relu(x)


def _prelu(relu: Relu, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # One slope, or one per channel (dimension 1), as torch.prelu broadcasts it.
    if weight.numel() > 1:
        channels = x.shape[1] if x.dim() >= 2 else 1
        if channels != weight.numel():  # torch's own refusal, which broadcasting would skip
            raise RuntimeError(
                "Mismatch of parameter numbers and input channel size. Found parameter "
                f"numbers = {weight.numel()} and channel size = {channels}."
            )
        weight = weight.view(1, -1, *([1] * (x.dim() - 2)))
    return weight * x + (1 - weight) * relu(x)


def _hardsigmoid(relu: Relu, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return (relu(x + 3.0) - relu(x - 3.0)) / 6.0


def _hardswish(relu: Relu, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    # A product with x, so smoothed but not convolved: each ReLU of the gate is
    # replaced, and x itself stays as it is.
    return x * _hardsigmoid(relu, x)


#: Activations written as shifted ReLUs plus a linear term, ``(relu, *args) -> Tensor``;
#: replacing each ReLU smooths them exactly as it smooths ReLU. ``hardswish``, the
#: one product (``x * hardsigmoid(x)``), becomes smooth but not its convolution.
THROUGH_RELU: dict[Callable, Callable[..., torch.Tensor]] = {
    F.hardtanh: _hardtanh,
    F.hardtanh_: _hardtanh,
    F.relu6: _relu6,
    F.leaky_relu: _leaky_relu,
    F.leaky_relu_: _leaky_relu,
    F.prelu: _prelu,
    F.hardsigmoid: _hardsigmoid,
    F.hardswish: _hardswish,
}


# The modules that run a function of THROUGH_RELU.
_THROUGH_RELU_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Hardsigmoid,
    nn.Hardswish,
)


def _activation_name(func: Callable, modules: tuple[type[nn.Module], ...]) -> str:
    """The name a warning gives the activation ``func`` that is running: its module's,
    where a module of ``modules`` called it (``nn.ReLU6`` runs ``hardtanh``), else its own.

    Only the forward that called it says so: a module of that type may sit unused in
    the model while its function is called directly.
    """
    frame = sys._getframe(2)
    # Above: torch's dispatch (a Python frame for functions like F.hardtanh), then the
    # caller; the first forward on the way is the caller's.
    for _ in range(6):
        if frame is None:
            break
        if frame.f_code.co_name == "forward":
            owner = frame.f_locals.get("self")
            if isinstance(owner, modules):
                return type(owner).__name__
            break
        frame = frame.f_back
    return getattr(func, "__name__", str(func)).strip("_")


#: The betas softplus takes: float32's normal numbers. Below the smallest,
#: ``1 / beta`` overflows and the maps are inf or NaN; above the largest,
#: beta does not fit the float32 scalar of torch's softplus. Inside the range,
#: float32 maps lose precision below about beta 1e-3 (``log(2) / beta``
#: swamps ``x / 2``): use float64 there.
BETA_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)


def check_beta(beta: object, name: str = "beta") -> None:
    """Check that ``beta`` (a number, or every value of a tensor) lies in :data:`BETA_RANGE`.

    Parameters
    ----------
    beta : object
        The sharpness to check.
    name : str
        Name used in the error message, e.g. ``beta0``.

    Raises
    ------
    InputError
        Naming ``name``, the value and the range.

    Examples
    --------
    >>> check_beta(2.0)
    >>> check_beta(1e39)
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: beta must be between 1.175e-38 and 3.403e+38 (the normal \
range of float32, where softplus_beta is finite); got 1e+39
    """
    if isinstance(beta, torch.Tensor):
        values = _physical(beta.detach())
        inside = (values >= BETA_RANGE[0]) & (values <= BETA_RANGE[1])  # False at NaN
        if bool(inside.all()):
            return
        beta = values[~inside].flatten()[0].item()  # the first bad value, for the message
    elif not is_number(beta):
        raise InputTypeError(f"{name} must be a positive number; got {beta!r}")
    if not (beta > 0 and math.isfinite(beta)):
        raise InputError(f"{name} must be a positive finite number; got {beta!r}")
    if not BETA_RANGE[0] <= beta <= BETA_RANGE[1]:
        raise InputError(
            f"{name} must be between {BETA_RANGE[0]:.4g} and {BETA_RANGE[1]:.4g} (the normal "
            f"range of float32, where softplus_beta is finite); got {beta!r}"
        )


def _threshold(dtype: torch.dtype) -> float:
    # Above beta x = -log(eps), log1p(exp(-beta x)) / beta is below half an ulp
    # of x, so returning x is exact.
    return -math.log(torch.finfo(dtype).eps)


def _physical(t: torch.Tensor) -> torch.Tensor:
    """``t`` with torch.func's wrappers removed: under ``vmap`` the values of
    every batch entry, which can be compared without data-dependent control
    flow inside the transform."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


def _transformed(value: object) -> bool:
    """Whether ``value`` is a tensor wrapped by a torch.func transform (one beta per
    vmap entry), which has no single float."""
    return isinstance(value, torch.Tensor) and _physical(value) is not value


class _Softplus(torch.autograd.Function):
    # A float beta uses torch's fused softplus; a tensor beta computes
    # relu(x) + log1p(exp(-beta |x|)) / beta, which never overflows either.
    # The explicit backward gives exactly sigmoid(beta x) (also at x = 0,
    # where |x| has no derivative) and is itself differentiable, so double
    # backprop works. forward apart from setup_context, and the generated vmap
    # rule, let torch.func transforms (vmap, grad, jacrev) run through it.
    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
        if isinstance(beta, torch.Tensor):
            return x.clamp(min=0) + torch.log1p(torch.exp(-beta * x.abs())) / beta
        return F.softplus(x, beta, _threshold(x.dtype))

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:  # noqa: ANN001
        x, beta = inputs
        saved = (x, beta) if isinstance(beta, torch.Tensor) else (x,)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.beta = beta

    @staticmethod
    def jvp(ctx, x_t: torch.Tensor | None, beta_t: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        x, *saved = ctx.saved_tensors
        beta = saved[0] if saved else ctx.beta
        out = torch.zeros_like(x) if x_t is None else x_t * torch.sigmoid(beta * x)
        if saved and beta_t is not None:
            out = out + beta_t * _d_beta(x, beta)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # noqa: ANN001
        x, *saved = ctx.saved_tensors
        beta = saved[0] if saved else ctx.beta
        grad_beta = grad * _d_beta(x, beta) if ctx.needs_input_grad[1] else None
        return grad * torch.sigmoid(beta * x), grad_beta


def _d_beta(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The derivative of softplus_beta(x) in a tensor ``beta``."""
    # d/dbeta = (z sigmoid(z) - log1p(exp(z))) / beta^2 with z = beta x,
    # written in |z| so that no two large terms cancel.
    z = (beta * x).abs()
    # z sigmoid(-z) -> 0 as z -> inf, where it would compute inf * 0 (also
    # in the second derivative: inf is kept out of the product itself).
    big = torch.isinf(z)
    finite = torch.where(big, 0.0, z)
    tail = torch.where(big, 0.0, finite * torch.sigmoid(-finite))
    return -(tail + torch.log1p(torch.exp(-z))) / beta**2


def softplus(x: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Softplus with sharpness ``beta``: ``log(1 + exp(beta x)) / beta``.

    Finite and accurate to float precision for any ``beta * x``; its gradient
    is ``sigmoid(beta x)`` and it is twice differentiable under autograd.

    Parameters
    ----------
    x : torch.Tensor
        Floating input.
    beta : float or torch.Tensor
        Sharpness in :data:`BETA_RANGE` (float32's normal numbers); a tensor
        broadcasts against ``x``. ``beta -> inf`` gives ReLU.

    Returns
    -------
    torch.Tensor
        ``softplus_beta(x)``, the shape of ``x`` broadcast with ``beta``.

    Examples
    --------
    >>> softplus(torch.tensor([-1e4, 0.0, 1e4]), beta=1.0)
    tensor([0.0000e+00, 6.9315e-01, 1.0000e+04])
    """
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"x must be a floating torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputTypeError(
            f"x must be a floating tensor (e.g. float32 or float64); got dtype {x.dtype}"
        )
    check_beta(beta)
    if isinstance(beta, torch.Tensor):
        try:
            torch.broadcast_shapes(x.shape, beta.shape)
        except RuntimeError:
            raise InputError(
                f"beta of shape {tuple(beta.shape)} does not broadcast against x of shape "
                f"{tuple(x.shape)}; expected a number or a tensor that broadcasts against x"
            ) from None
        # A beta past float16's 65504 would be inf there (and inf * 0 NaN), and
        # bfloat16 keeps 8 bits of beta: both are computed in float32, as torch's
        # fused softplus of a float beta does, and given back in x's dtype.
        work = torch.promote_types(x.dtype, torch.float32)
        out = _Softplus.apply(x.to(work), beta.to(dtype=work, device=x.device))
        return out.to(x.dtype)
    return _Softplus.apply(x, float(beta))


def logistic_std(beta: float | torch.Tensor) -> float | torch.Tensor:
    """Standard deviation of ``p_beta``: ``pi / (sqrt(3) beta)``.

    The map is its own inverse: ``logistic_std(sigma)`` is also the beta whose
    ``p_beta`` has standard deviation ``sigma``.

    Examples
    --------
    >>> round(logistic_std(1.0), 4), round(logistic_std(logistic_std(2.0)), 12)
    (1.8138, 2.0)
    """
    return math.pi / (math.sqrt(3) * beta)


class LogisticNoise(Distribution):
    """The logistic density ``p_beta(e) = beta / (exp(beta e / 2) + exp(-beta e / 2))^2``.

    Mean 0, scale ``1 / beta``, standard deviation ``pi / (sqrt(3) beta)``; its
    cdf is ``sigmoid(beta e)``, so ``E[relu(x - e)] = softplus_beta(x)``.

    Parameters
    ----------
    beta : float or torch.Tensor
        Sharpness (inverse scale), > 0; a tensor gives a batch of distributions.

    Examples
    --------
    >>> noise = LogisticNoise(2.0)
    >>> noise.cdf(torch.tensor(0.0))
    tensor(0.5000)
    >>> e = noise.sample((1000,))
    """

    arg_constraints = {"beta": constraints.positive}
    support = constraints.real
    has_rsample = True

    def __init__(self, beta: float | torch.Tensor, validate_args: bool | None = None) -> None:
        check_beta(beta)
        (self.beta,) = broadcast_all(beta)
        super().__init__(self.beta.shape, validate_args=validate_args)

    def expand(
        self, batch_shape: torch.Size, _instance: LogisticNoise | None = None
    ) -> LogisticNoise:
        new = self._get_checked_instance(LogisticNoise, _instance)
        new.beta = self.beta.expand(batch_shape)
        Distribution.__init__(new, torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return torch.zeros_like(self.beta)

    @property
    def mode(self) -> torch.Tensor:
        return torch.zeros_like(self.beta)

    @property
    def variance(self) -> torch.Tensor:
        return self.stddev**2

    @property
    def stddev(self) -> torch.Tensor:
        return logistic_std(self.beta)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        return self.from_uniform(torch.rand(shape, dtype=self.beta.dtype, device=self.beta.device))

    def from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """The draws for uniform numbers ``u`` in [0, 1) such as ``torch.rand`` gives.

        ``u`` is kept at least half a step of its dtype from 0 and from 1, so
        that both tails end at the same distance (about 9 standard deviations
        in float32, 20 in float64): ``torch.rand``'s exact zeros would
        otherwise land 48 standard deviations out on one side only.

        Examples
        --------
        >>> e = LogisticNoise(1.0).from_uniform(torch.tensor([0.0, 0.5, 1 - 2**-24]))
        >>> bool(e[0] == -e[2]), float(e[1])
        (True, 0.0)
        """
        half_step = torch.finfo(u.dtype).eps / 2
        return self.icdf(u.clamp(half_step, 1 - half_step))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z = self.beta * value
        return torch.log(self.beta) + F.logsigmoid(z) + F.logsigmoid(-z)

    def cdf(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:  # as torch.distributions.Normal.cdf
            self._validate_sample(value)
        return torch.sigmoid(self.beta * value)

    def icdf(self, value: torch.Tensor) -> torch.Tensor:
        return torch.logit(value) / self.beta

    def entropy(self) -> torch.Tensor:
        return 2 - torch.log(self.beta)


class _ReluOverride(TorchFunctionMode):
    """Routes every ReLU call to ``fn``; counts the calls and notes kinked activations."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        through: bool = True,
        inspect: bool = True,
        what: str = "beta-smoothing",
    ) -> None:
        super().__init__()
        self.fn = fn
        self.through = through
        self.what = what
        # Only the first pass feeds the warning: later ones skip the bookkeeping.
        self.inspect = inspect
        self.replaced = 0
        # ReLU calls an override of the same model above this one on torch's stack took
        # (see __torch_function__); the model is set by the hooks that enter this mode.
        self.superseded = 0
        self.model: nn.Module | None = None
        self.kinked: set[str] = set()
        self.smooth: set[str] = set()
        # The forward starts here: a ReLU that runs without gradients inside it
        # runs inside a reentrant checkpoint.
        self.grad_enabled = torch.is_grad_enabled()
        self.failed = False
        # The frame of the forward call that entered this mode (see _ReluHooks._enter).
        self.owner: types.FrameType | None = None
        self.stale = self.left = False

    def leave(self) -> None:
        """Take this mode off torch's stack, once, with the dead overrides above it.

        ``__exit__`` would pop whatever is on top: an override an interrupt left above
        this one, while this one stayed on.
        """
        if self.left:
            return
        self.left, self.owner = True, None  # the frame holds the forward's inputs
        _take_off(self)

    def dead(self) -> bool:
        """Whether this mode has been left, or its forward has ended (see _owner_returned)."""
        return self.left or self.stale or self._owner_returned()

    def _owner_returned(self) -> bool:
        """Whether the forward call that entered this mode has ended without leaving it.

        Torch runs an always-called forward hook after an ``Exception`` only: a
        ``KeyboardInterrupt`` (Ctrl-C) skips the hook that leaves the mode, which would
        then go on replacing every ReLU of the process.
        """
        if self.owner is None:
            return False
        frame = sys._getframe(1)
        while frame is not None:
            if frame is self.owner:
                return False
            frame = frame.f_back
        self.stale, self.owner = True, None
        return True

    def _note(self, func: Callable, args: tuple, kwargs: dict) -> None:
        """Note an activation that is not replaced, for the warning after the pass."""
        if func in KINKED_FUNCTIONS or func in THROUGH_RELU:  # the latter without ``through``
            # F.threshold's function is called _threshold, F.threshold_'s threshold_.
            self.kinked.add(_activation_name(func, (*KINKED_MODULES, *_THROUGH_RELU_MODULES)))
        elif func in CLAMP_FUNCTIONS and _clamps_at_zero(args, kwargs):
            self.kinked.add("clamp(min=0)")
        elif (
            func in MAX_FUNCTIONS
            and "maximum(x, 0)" not in self.kinked
            and _maxes_with_zero(args, kwargs)
        ):
            self.kinked.add("maximum(x, 0)")
        elif func in SMOOTH_FUNCTIONS:
            self.smooth.add(_activation_name(func, SMOOTH_MODULES))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.stale or self.left:
            return func(*args, **kwargs)
        if func in RELU_FUNCTIONS:
            replacement = _relu
        elif self.through and func in THROUGH_RELU:
            replacement = THROUGH_RELU[func]
        else:
            if self.inspect:
                self._note(func, args, kwargs)
            return func(*args, **kwargs)
        if self._owner_returned():
            return func(*args, **kwargs)
        first = args[0] if args else kwargs.get("input")
        if isinstance(first, torch.Tensor) and not first.is_floating_point():
            # Integer bookkeeping (a relu of counts or indices) is no activation.
            return func(*args, **kwargs)
        if self.grad_enabled and _checkpointing():
            self.failed = True
            raise InputError(checkpointed(self.what))
        self.replaced += 1
        # torch runs this with the modes below this one on its stack. An override there
        # (a smoothed model smoothed again) never sees the call, which replaces its ReLU
        # too: it would warn that it changed nothing.
        if torch._C._len_torch_function_stack():
            for below in _function_modes():
                # Of the same model only: one of a model around this one, with no ReLU of
                # its own, did change nothing.
                if isinstance(below, _ReluOverride) and below.model is self.model:
                    below.superseded += 1
        return _by_form(replacement, self.fn, args, kwargs, func in IN_PLACE_FUNCTIONS)


def _by_form(
    form: Callable[..., torch.Tensor],
    relu: Relu,
    args: tuple,
    kwargs: dict,
    in_place: bool = False,
) -> torch.Tensor:
    """An activation's call computed by ``form`` (as in :data:`THROUGH_RELU`) with ``relu``."""
    if not args:  # F.relu(input=h)
        args = (kwargs.pop("input"),)
    if in_place or _writes_in_place(form, args, kwargs):
        # The caller may drop the result (``h.relu_()`` as a statement), so it goes
        # into the input, as the activation's own would; computed from a copy, so
        # that the form's backward keeps the input it saw.
        x = args[0]
        out = form(relu, x.clone(), *args[1:], **kwargs)
        try:
            return x.copy_(out)
        except RuntimeError:
            if not _transformed(getattr(relu, "beta", None)):
                raise
            # vmap cannot write one result per beta into an input that has one.
            raise InputError(
                f"an in-place {form.__name__.strip('_')} (e.g. nn.ReLU(inplace=True), "
                "nn.Hardswish(inplace=True)) cannot take betas batched by torch.func.vmap when "
                "its input does not depend on beta; expected a loop over betas, or the model's "
                "activations set to inplace=False"
            ) from None
    return form(relu, *args, **kwargs)


def checkpointed(what: str) -> str:
    """The refusal of a ReLU under activation checkpointing, naming ``what`` replaces it.

    Activation checkpointing recomputes its block in backward, after the
    replacement has ended: the gradient would mix the replaced forward with
    the ReLU's backward.
    """
    return (
        f"{what} cannot reach a ReLU under activation checkpointing (torch.utils.checkpoint), "
        "which backward recomputes with the plain ReLU; expected a model without it, e.g. "
        "torchvision's densenet121(memory_efficient=False), or a timm model after "
        "set_grad_checkpointing(False)"
    )


def _checkpointing() -> bool:
    """Whether the caller runs inside torch.utils.checkpoint.

    The cheap signs first: the non-reentrant form installs saved-tensor hooks,
    the reentrant one turns gradients off; only then is the stack searched for
    the checkpoint's own frame (a plain ``torch.no_grad()`` block is no checkpoint).
    Torch before 2.8 has no getter of the saved-tensor hooks: there, the stack
    is searched at every call.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is not None:
        hooks = top(False)
        if hooks is not None and "checkpoint" in getattr(hooks[0], "__qualname__", ""):
            return True
        if torch.is_grad_enabled():
            return False
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == _CHECKPOINT_FILE:
            return True
        frame = frame.f_back
    return False


_CHECKPOINT_FILE = torch.utils.checkpoint.__file__


def _clamps_at_zero(args: tuple, kwargs: dict) -> bool:
    """Whether a clamp call is ``clamp(x, min=0)`` with no upper bound: a ReLU."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return False  # a clamp of indices is no activation
    low = args[1] if len(args) > 1 else kwargs.get("min")
    high = args[2] if len(args) > 2 else kwargs.get("max")
    return _number(low) == 0 and (high is None or _number(high) == math.inf)


def _maxes_with_zero(args: tuple, kwargs: dict) -> bool:
    """Whether a two-tensor maximum has one operand all zeros: a ReLU.

    ``torch.max(x)`` and ``torch.max(x, dim)`` reduce and are no ReLU.
    """
    operands = [*args[:2], kwargs.get("input"), kwargs.get("other")]
    tensors = [t for t in operands if isinstance(t, torch.Tensor)]
    # Integer and bool maxima are indices and masks, not activations; a float
    # activation may meet an integer zero (torch.maximum(h, torch.tensor(0))).
    if len(tensors) != 2 or not any(t.is_floating_point() for t in tensors):
        return False
    with torch.no_grad():
        return any(t.numel() > 0 and bool((t == 0).all()) for t in tensors)


def _number(value: object) -> float | None:
    """A bound as a number: int, float, bool, numpy scalar or one-element tensor; else None.

    A bool counts as torch counts it: ``clamp(h, min=False)`` is ``relu(h)``.
    """
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _writes_in_place(replacement: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether the call asks for ``inplace=True``, by keyword or by position."""
    bound = _signature(replacement).bind(None, *args, **kwargs)
    return bool(bound.arguments.get("inplace", False))


# Every ReLU call of every forward asks: the signature is read once per replacement.
_signature = functools.cache(inspect.signature)


# The ReLU family as TorchScript writes it in a graph.
_SCRIPTED_RELUS = re.compile(
    r"aten::(relu|relu6|hardtanh|leaky_relu|prelu|hardsigmoid|hardswish)_?\b"
)


def check_overridable(model: nn.Module, what: str = "beta-smoothing") -> None:
    """Check, without running it, that a ReLU override can reach the ReLUs of ``model``.

    The override (:func:`replace_relu`, used by beta-smoothing, guided
    backprop and the attack's softplus surrogate) lives in forward hooks and
    torch function calls, which a TorchScript module does not take: a
    scripted or traced model is refused, and so is a scripted part that holds
    a ReLU, since its graph runs where no override sees it.

    Parameters
    ----------
    model : nn.Module
        The model to check.
    what : str
        What needs the override, named in the error.

    Raises
    ------
    InputError
        Naming ``what``, the TorchScript module and the expected form.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> check_overridable(net)
    >>> check_overridable(torch.jit.trace(net, torch.zeros(1, 2)), "guided_backprop")
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: guided_backprop cannot work on TopLevelTracedModule, ...
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(
            f"{what} cannot work on {type(model).__name__}, a TorchScript module (torch.jit.script "
            "or torch.jit.trace) that runs its own graph and takes no forward hooks; expected "
            "the nn.Module it was made from"
        )
    for path, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule) and _SCRIPTED_RELUS.search(
            _scripted_graph(module)
        ):
            raise InputError(
                f"{what} cannot reach the ReLUs of its submodule {path}, a TorchScript module "
                "(torch.jit.script or torch.jit.trace) that runs its own graph; expected the "
                "nn.Module it was made from"
            )


def check_smoothing_uncompiled(model: nn.Module) -> None:
    """Refuse a ``torch.compile`` graph around a module whose ReLUs are overridden.

    The override of :func:`smooth`'s copies and of :func:`smoothed` lives in
    forward hooks, and torch's compiled graphs do not check a module's hooks
    (``torch._dynamo.config.skip_nnmodule_hook_guards``): a graph compiled
    earlier for the same class runs in their place, ReLUs and all, and the map
    is silently the ReLU network's. Compiling first and smoothing the compiled
    module, ``smooth(torch.compile(m), beta)``, keeps the hooks outside the
    graph.

    Parameters
    ----------
    model : nn.Module
        The model to check.

    Raises
    ------
    InputError
        Naming the compiled submodule and the expected form.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> check_smoothing_uncompiled(smooth(net, 2.0))
    """
    check_instance("model", model, nn.Module, "a torch.nn.Module")
    for where, compiled, original in compiled_parts(model):
        if any(_overridden(m) for m in compiled.modules()):
            raise InputError(
                f"{where} is a torch.compile graph around a beta-smoothed module (bs.smooth's "
                "copy, or one inside bs.smoothed), whose smoothing the graph can skip; "
                f"expected {original}, or the compiled module smoothed: "
                "bs.smooth(torch.compile(m), beta)"
            )


def is_smoothed(model: nn.Module) -> bool:
    """Whether ``model`` computes softplus in place of its ReLUs by itself: it is a copy
    made by :func:`smooth`, or it runs inside :func:`smoothed`.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> is_smoothed(net), is_smoothed(smooth(net, 2.0))
    (False, True)
    """
    return _overridden(model)


def _overridden(module: nn.Module) -> bool:
    """Whether ``module`` holds the hooks of a ReLU override (see _ReluHooks)."""
    hooks = module._forward_pre_hooks.values()
    return any(isinstance(getattr(h, "__self__", None), _ReluHooks) for h in hooks)


def _scripted_graph(module: torch.jit.ScriptModule) -> str:
    """The forward graph of a TorchScript module as text; empty where it has no forward
    (a scripted ModuleList, a module used through its exported methods)."""
    try:
        return str(module.inlined_graph)
    except (AttributeError, RuntimeError):
        return ""


# Torch's Module._call_impl and the functions nested in it (its inner() runs the hooks
# and the forward in torch 2.x): the frames that call a forward pre-hook.
_CALL_IMPL = frozenset(
    {
        nn.Module._call_impl.__code__,
        *(c for c in nn.Module._call_impl.__code__.co_consts if isinstance(c, types.CodeType)),
    }
)


def _function_modes() -> list[TorchFunctionMode]:
    """Torch's stack of function modes, bottom first."""
    return [torch._C._get_function_stack_at(i) for i in range(torch._C._len_torch_function_stack())]


def _dead(mode: object) -> bool:
    return isinstance(mode, _ReluOverride) and mode.dead()


def _take_off(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off torch's stack of function modes, with the dead overrides above it.

    ``__exit__`` would pop whatever is on top: an override that an interrupt left
    above ``mode``, while ``mode`` stayed on.
    """
    if not any(m is mode for m in _function_modes()):
        return
    kept = []
    while (top := torch._C._pop_torch_function_stack()) is not mode:
        if not _dead(top):
            kept.append(top)
    for above in reversed(kept):
        torch._C._push_on_torch_function_stack(above)


def _drop_stale_modes() -> None:
    """Take the overrides whose forward was interrupted off the top of torch's stack of
    function modes; one lower down passes every call through until it is on top."""
    while torch._C._len_torch_function_stack() > 0:
        top = torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1)
        if not _dead(top):
            return
        torch._C._pop_torch_function_stack()
        top.left, top.owner = True, None


class _ReluHooks:
    """A forward pre-hook and an always-called forward hook that override ReLU during forward."""

    def __init__(
        self,
        model: nn.Module,
        fn: Callable[[torch.Tensor], torch.Tensor],
        warn: bool | str,
        through: bool = True,
    ) -> None:
        self.model, self.fn, self.warn, self.through = model, fn, warn, through
        self.what = warn if isinstance(warn, str) else "beta-smoothing"
        # The modes of the passes under way, by thread: torch's stack of function modes
        # is per thread, and threads may share a copy's hooks (DataParallel's replicas do).
        self.active: dict[int, list[_ReluOverride]] = {}
        self.done: list[_ReluOverride] = []
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.removed = False

    def install(self) -> _ReluHooks:
        check_overridable(self.model, self.what)
        self.handles = [
            self.model.register_forward_pre_hook(self._enter),
            # prepend: hooks installed later leave first, so stacked overrides unwind in order.
            self.model.register_forward_hook(self._leave, always_call=True, prepend=True),
        ]
        return self

    def remove(self) -> None:
        """Take the hooks off. A forward that another thread runs meanwhile keeps its
        override until it ends: only that thread can take it off its own stack of
        function modes, which its leave hook, kept until then, does."""
        if not self.handles:
            return
        enter, leave = self.handles
        enter.remove()
        modes = self.active.pop(threading.get_ident(), [])
        while modes:  # a forward interrupted before its hook could run
            modes.pop().leave()
        self.removed = True
        if not any(self.active.values()):
            leave.remove()
            self.active.clear()

    def _enter(self, module: nn.Module, args: tuple) -> None:
        _drop_stale_modes()
        # An interrupted pass's mode that is no longer on torch's stack (another mode's
        # exit popped it) can never be left, only forgotten.
        stack = _function_modes()
        mine = self.active.setdefault(threading.get_ident(), [])
        mine[:] = [m for m in mine if not m.left and any(m is s for s in stack)]
        mode = _ReluOverride(self.fn, self.through, inspect=not self.done, what=self.what)
        mode.model = self.model
        # The caller is torch's Module._call_impl of this forward: once it is off the
        # stack, the forward has ended, whether or not _leave ran. Where another caller
        # runs the hook (torch.compile resumes it after a graph break), the mode is only
        # left by the hooks.
        caller = sys._getframe(1)
        mode.owner = caller if caller.f_code in _CALL_IMPL else None
        mine.append(mode)
        mode.__enter__()

    def _leave(self, module: nn.Module, args: tuple, output: object) -> None:
        mine = self.active.get(threading.get_ident())
        if not mine:
            return
        mode = mine.pop()
        mode.leave()
        if self.removed and not any(self.active.values()):
            self.handles[1].remove()  # the last forward that ran on after remove()
        # Only the first pass is kept: enough for the warning and for tests,
        # and a long attack does not grow a list. A pass that raised (torch runs
        # this hook from its except block, with no output) may have stopped
        # before any ReLU: it says nothing of the model.
        raised = output is None and sys.exc_info()[1] is not None
        if not self.done and not mode.failed and not raised:
            if self.warn:
                _warn_coverage(self.model, mode, self.warn)
            self.done.append(mode)


@contextlib.contextmanager
def replace_relu(
    model: nn.Module,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    warn: bool | str = False,
    through: bool = True,
) -> Iterator[list[_ReluOverride]]:
    """While active, every ReLU inside ``model.forward`` computes ``fn`` instead.

    The override is a forward pre-hook and an always-called forward hook on
    ``model``: it covers ``nn.ReLU`` and the functional forms in any nested
    module, is active only inside ``model``'s own forward, and the hooks are
    removed on exit, also on an exception.

    Parameters
    ----------
    model : nn.Module
        The model; modified only while the context is active.
    fn : callable
        Replacement, ``Tensor -> Tensor``.
    warn : bool or str
        Warn after the first forward pass if it called no ReLU, or if it
        called other piecewise-linear activations, which ``fn`` does not
        replace. A string names the method in both warnings (default
        ``"beta-smoothing"``).
        Each warning is given once per model and points at the user's call.
    through : bool
        Also rewrite the activations of :data:`THROUGH_RELU` (ReLU6, ...) as
        sums of ReLUs, so that ``fn`` replaces those ReLUs too.

    Yields
    ------
    list
        The override of the first forward pass (``.replaced`` counts ReLU calls).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> with replace_relu(net, torch.tanh):
    ...     y = net(torch.ones(1, 2))
    """
    hooks = _ReluHooks(model, fn, warn, through).install()
    try:
        yield hooks.done
    finally:
        hooks.remove()


def _warn_coverage(model: nn.Module, mode: _ReluOverride, warn: bool | str) -> None:
    what = warn if isinstance(warn, str) else "beta-smoothing"
    name = type(model).__name__
    if mode.replaced == 0 and mode.superseded == 0:
        found = f" (its activations: {', '.join(sorted(mode.smooth))})" if mode.smooth else ""
        warn_user(f"{name}: no ReLU was called in forward{found}; {what} changed nothing", model)
    # Only what ran unreplaced, as its module where one ran it (see _activation_name).
    kinked = sorted(mode.kinked)
    if kinked and isinstance(warn, bool):
        warn_user(
            f"{name}: beta-smoothing replaces ReLU and the activations made of it; these "
            f"piecewise-linear activations stay non-smooth: {', '.join(kinked)}",
            model,
        )
    elif kinked:
        # Not "piecewise-linear": Hardswish, one of them, is piecewise quadratic.
        warn_user(
            f"{name}: {what} acts on ReLU only; these activations pass "
            f"their plain gradient: {', '.join(kinked)}",
            model,
        )


class SmoothingHandle:
    """The sharpness of an active :func:`smoothed` context; set ``.beta`` to change it.

    Examples
    --------
    >>> net = nn.Sequential(nn.ReLU())
    >>> x = torch.zeros(1)
    >>> with smoothed(net, 1.0) as handle:
    ...     before = net(x)
    ...     handle.beta = 10.0
    ...     after = net(x)
    >>> before, after  # softplus_beta(0) = log(2) / beta
    (tensor([0.6931]), tensor([0.0693]))
    """

    def __init__(self, beta: float) -> None:
        self.beta = beta

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise InputTypeError(
                f"beta must be one number, which every ReLU takes; got a tensor of shape "
                f"{tuple(value.shape)}"
            )
        check_beta(value)
        # Under torch.func.vmap over betas, beta is one number per batch entry
        # that has no float: it stays a tensor, which softplus broadcasts.
        self._beta = value.reshape(()) if _transformed(value) else float(value)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return softplus(x, self._beta)


# A float32 subnormal: under flushing, arithmetic on it gives 0.
_SUBNORMAL = 1e-39


def _flushing() -> bool:
    """Whether the CPU treats subnormal floats as zero now (torch has no getter)."""
    return bool((torch.tensor([_SUBNORMAL]) * 1.0 == 0).item())


@contextlib.contextmanager
def math_attention(active: bool = True) -> Iterator[None]:
    """While active, attention (``F.scaled_dot_product_attention``, which
    ``nn.MultiheadAttention`` and torchvision's ViT and Swin call) runs its plain
    math kernel, whose backward can be differentiated again.

    The fused kernels (flash, memory-efficient) have a first derivative but no
    second, which the attack (a derivative of the map, itself a derivative)
    and the curvature (Hessian-vector products) take: without this, they end
    in torch's "derivative ... is not implemented". The math kernel computes
    the same attention, with more memory.

    Examples
    --------
    >>> q = torch.rand(1, 2, 3, 4, requires_grad=True)
    >>> with math_attention():
    ...     out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    ...     (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    ...     (h,) = torch.autograd.grad(g.sum(), q)
    >>> h.shape
    torch.Size([1, 2, 3, 4])
    """
    if not active:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


#: Activations whose torch backward cannot be differentiated again, by a form
#: (``(relu, *args) -> Tensor`` as in :data:`THROUGH_RELU`) with the same values
#: whose backward can.
SECOND_ORDER_FORMS: dict[Callable, Callable[..., torch.Tensor]] = {F.hardsigmoid: _hardsigmoid}


class _SecondOrderForms(TorchFunctionMode):
    """Computes each activation of :data:`SECOND_ORDER_FORMS` by its form."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        form = SECOND_ORDER_FORMS.get(func)
        if form is None:
            return func(*args, **kwargs)
        return _by_form(form, torch.relu, args, kwargs)


@contextlib.contextmanager
def second_order(active: bool = True) -> Iterator[None]:
    """While active, every forward computed can be differentiated twice.

    The attack (a derivative of the map, itself a derivative) and the
    curvature (Hessian-vector products) take second derivatives, which some
    of torch's kernels lack: they would end in torch's "derivative for ... is
    not implemented". Inside, attention runs its math kernel
    (:func:`math_attention`) and the activations of :data:`SECOND_ORDER_FORMS`
    (``Hardsigmoid``, the gate of MobileNetV3's squeeze-excitation blocks)
    compute the same values by a form whose backward has a derivative.

    Examples
    --------
    >>> x = torch.tensor([0.75, 1.5], requires_grad=True)
    >>> with second_order():  # hardsigmoid(x^2) = x^2 / 6 + 1 / 2 for x^2 < 3
    ...     (g,) = torch.autograd.grad(F.hardsigmoid(x * x).sum(), x, create_graph=True)
    ...     (h,) = torch.autograd.grad(g.sum(), x)
    >>> g.tolist(), h.tolist()
    ([0.25, 0.5], [0.3333333432674408, 0.3333333432674408])
    """
    if not active:
        yield
        return
    mode = _SecondOrderForms()
    with math_attention():
        mode.__enter__()
        try:
            yield
        finally:
            _take_off(mode)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """While active, the calling thread counts subnormal floats as zero; its state returns after.

    Softplus at a large beta, as the attack's surrogate (beta up to 100) and
    the defense at beta 20 to 50 use, makes ``sigmoid(beta x)`` and its
    derivatives subnormal (below 1.2e-38 in float32) over most of the
    inactive units, and CPUs compute on subnormals up to a hundred times more
    slowly: unflushed, an attack step on ResNet-18 at 224 px cost 3.4 bare
    double backprops instead of 1.0. Flushing changes only values below the
    smallest normal float. The flag belongs to each thread: torch's CPU worker
    threads keep the state of the thread that started them, so those started
    inside the context go on flushing after it, and those started before it
    do not flush in it. Where the CPU cannot flush, nothing changes; GPUs
    compute subnormals at full speed.

    Examples
    --------
    >>> tiny = torch.tensor([1e-39])  # below float32's smallest normal number
    >>> with flush_denormals():
    ...     y = tiny * 1.0  # 0 where the CPU can flush (x86), 1e-39 elsewhere
    >>> float(tiny * 1.0) > 0  # the previous state is back
    True
    """
    before = _flushing()
    # numpy reads each float type's limits once, on first use; read under flushing,
    # the smallest subnormal is 0 and numpy 1 and 2 (before 2.4) warn. scipy and
    # scikit-learn ask for them as they are imported, which may happen inside.
    for dtype in (np.half, np.single, np.double, np.longdouble):
        np.finfo(dtype)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


@contextlib.contextmanager
def smoothed(model: nn.Module, beta: float) -> Iterator[SmoothingHandle]:
    """Beta-smooth ``model`` in place while the context is active.

    Every ReLU computes ``softplus_beta``; on exit (also on an exception) the
    model computes ReLU again. The yielded handle's ``beta`` may be changed
    inside the context, e.g. for a schedule.

    Parameters
    ----------
    model : nn.Module
        Any model; its parameters and modules are not changed.
    beta : float
        Sharpness, > 0; under ``torch.func.vmap`` over betas, the 0-d tensor
        that vmap gives (all betas in one forward).

    Yields
    ------
    SmoothingHandle
        The active sharpness; set its ``beta`` to change it.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> with smoothed(net, 2.0) as handle:
    ...     y = net(torch.zeros(1, 2))
    ...     handle.beta = 4.0
    """
    check_instance("model", model, nn.Module, "a torch.nn.Module")
    handle = SmoothingHandle(beta)
    with replace_relu(model, handle, warn=True):
        yield handle


def relu_calls(model: nn.Module, x: torch.Tensor) -> int:
    """How many ReLU calls on values computed from ``x`` beta-smoothing replaces in one
    forward pass of ``model`` on ``x``.

    Zero means that beta-smoothing changes nothing that depends on ``x`` (a
    GELU network, attention throughout; Swin V2, whose only ReLUs compute a
    position bias from constant coordinates); the maps of such a model may
    still differ in their last bits with and without it, where the override
    turns off a fused kernel. Which calls depend on ``x`` is autograd's
    answer, with the model's parameters and buffers detached for the pass.

    Examples
    --------
    >>> relu_calls(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)), torch.ones(1, 2))
    1
    >>> relu_calls(nn.Sequential(nn.Linear(2, 2), nn.GELU()), torch.ones(1, 2))
    0
    """
    dependent: list[bool] = []

    def count(t: torch.Tensor) -> torch.Tensor:
        dependent.append(t.requires_grad)
        return t.clamp(min=0)

    constants = {name: t.detach() for name, t in model.named_parameters()}
    constants.update((name, t.detach()) for name, t in model.named_buffers())
    # Not a leaf, so that an in-place ReLU on the input itself is allowed.
    tracked = x.detach().requires_grad_(True) * 1
    with torch.enable_grad(), replace_relu(model, count):
        torch.func.functional_call(model, constants, (tracked,))
    return sum(dependent)


@one_at_a_time
def smooth(model: nn.Module, beta: float) -> nn.Module:
    """A copy of ``model`` in which every ReLU computes ``softplus_beta``.

    ``model`` itself is never changed. The copy keeps the class, parameters and
    state-dict keys of the original. Smoothing a smoothed model replaces its
    beta: ``smooth(smooth(m, 1.0), 5.0)`` computes ``softplus_5``.

    Parameters
    ----------
    model : nn.Module
        Any model.
    beta : float
        Sharpness, > 0. It acts on the pre-activations, not on the input's
        range: around 1 is a strong defense where they are of order 1 (the
        paper's 0.8 on VGG16); :func:`~betasmooth.calibrate.calibrate_beta`
        chooses it for a model and its data.
        Under ``torch.func.vmap`` over betas, the 0-d tensor that vmap gives.

    Returns
    -------
    nn.Module
        The smoothed copy; its ``betasmooth_beta`` attribute holds ``beta``.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> soft = smooth(net, beta=1.0)
    >>> bool(soft(torch.zeros(1, 2)).gt(0).all())
    True
    """
    check_instance("model", model, nn.Module, "a torch.nn.Module")
    handle = SmoothingHandle(beta)  # checks beta before the copy is made
    copied = copy.deepcopy(model)
    # The hooks hold the handle, and the model holds the hooks: they live as
    # long as the copy does.
    _ReluHooks(copied, handle, warn=True).install()
    copied.betasmooth_beta = handle.beta
    set_origin(copied, model)
    return copied
