"""Gradient-based methods: gradient, input_x_gradient, integrated_gradients."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..progress import passes
from ..validate import InputError, InputTypeError, check_choice, check_classes, check_count
from . import register, register_input_check

__all__ = [
    "ITEMS_PER_PASS",
    "VALUES_PER_PASS",
    "QUADRATURE_RULES",
    "auto_chunk",
    "input_gradient",
    "predict",
    "quadrature",
    "select_logit",
]

# Items (interpolation points or noisy copies times batch size) per forward
# pass when no chunk is given: large enough to amortise the per-call overhead
# of small networks, small enough to stay in cache on CPU.
ITEMS_PER_PASS = 256
#: Input values per pass, which bounds the items of large inputs: 256 RGB images
#: of 64 px, 20 of 224 px (a VGG16 run with passes of 100 such items peaked at 8.6 GB).
VALUES_PER_PASS = 256 * 3 * 64 * 64


def select_logit(
    logits: torch.Tensor, target: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit of ``target`` per item, and the target (the argmax where ``None``).

    Parameters
    ----------
    logits : torch.Tensor
        Model output of shape ``(B, classes)``.
    target : torch.Tensor or None
        Class per item, ``(B,)``.

    Returns
    -------
    tuple of torch.Tensor
        ``(logit, target)``, both of shape ``(B,)``.

    Examples
    --------
    >>> select_logit(torch.tensor([[1.0, 3.0], [2.0, 0.5]]), None)
    (tensor([3., 2.]), tensor([1, 0]))
    """
    if logits.dim() != 2:
        raise InputError(
            f"the model must return logits of shape (B, classes); got {tuple(logits.shape)}"
            + (" (a squeeze() in forward drops the batch of one)" if logits.dim() == 1 else "")
        )
    if target is None:
        target = logits.detach().argmax(1)
    check_classes(target, logits.shape[1])
    return logits.gather(1, target[:, None])[:, 0], target


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The predicted class of each item, ``(B,)``.

    Examples
    --------
    >>> net = nn.Linear(3, 2)
    >>> with torch.no_grad():
    ...     _ = net.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
    ...     _ = net.bias.zero_()
    >>> predict(net, torch.tensor([[1.0, 1.0, 0.0], [3.0, 1.0, 0.0]]))
    tensor([1, 0])
    """
    return model(x).argmax(1)


def _leaf(x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    # With create_graph the gradient is taken w.r.t. x itself, so that the map
    # stays a function of x; otherwise w.r.t. a detached copy.
    if create_graph and x.requires_grad:
        return x
    return x.detach().requires_grad_(True)


def input_gradient(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None,
    create_graph: bool = False,
) -> torch.Tensor:
    """Gradient of the target logit w.r.t. the input, batched.

    Parameters
    ----------
    model : nn.Module
        Classifier.
    x : torch.Tensor
        Input batch.
    target : torch.Tensor or None
        Class per item; ``None`` for the predicted class.
    create_graph : bool
        Keep the graph for a derivative of the gradient.

    Returns
    -------
    torch.Tensor
        ``d logit_target / d x``, shaped like ``x``.

    Examples
    --------
    >>> net = nn.Linear(3, 2)
    >>> x = torch.ones(2, 3)
    >>> torch.equal(input_gradient(net, x, torch.tensor([0, 1])), net.weight.detach())
    True
    """
    xg = _leaf(x, create_graph)
    with torch.enable_grad():
        logit, _ = select_logit(model(xg), target)
        if not logit.requires_grad:
            grad = None
        else:
            (grad,) = torch.autograd.grad(
                logit.sum(), xg, create_graph=create_graph, allow_unused=True
            )
    if grad is None:
        raise InputError(detached_message(model))
    return grad


def detached_message(model: nn.Module) -> str:
    """The one line that names a model whose output has no graph back to its input."""
    return (
        f"{type(model).__name__}'s output does not depend on x: its forward detaches the "
        "input or runs under torch.no_grad(); expected a forward that keeps x in the graph"
    )


@register("gradient")
def gradient(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None, *, create_graph: bool = False
) -> torch.Tensor:
    """Saliency: the gradient of the target logit (Simonyan et al. 2014).

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, _ = bs.load_data("digits")
    >>> h = bs.explain(model, x[:4], "gradient")
    """
    return input_gradient(model, x, target, create_graph)


@register("input_x_gradient")
def input_x_gradient(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None, *, create_graph: bool = False
) -> torch.Tensor:
    """Input times gradient (Shrikumar et al. 2016).

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, _ = bs.load_data("digits")
    >>> h = bs.explain(model, x[:4], "input_x_gradient")
    """
    gradient = input_gradient(model, x, target, create_graph)
    # Without create_graph the map is a value: x's graph would make it half a derivative.
    return (x if create_graph else x.detach()) * gradient


# Both maps come from one plain forward on x itself (see forwards_once).
gradient.own_forward = input_x_gradient.own_forward = True


def auto_chunk(chunk: int | None, total: int, batch: int, item_values: int = 1) -> int:
    """Points per forward pass: ``chunk``, or when ``None`` about :data:`ITEMS_PER_PASS`
    items of ``item_values`` input values each, and about :data:`VALUES_PER_PASS` values
    at most, but never fewer than one point per item of the batch.

    Examples
    --------
    >>> auto_chunk(None, total=50, batch=64)
    4
    >>> auto_chunk(None, total=50, batch=2, item_values=3 * 224 * 224)
    10
    >>> auto_chunk(100, total=50, batch=64)
    50
    """
    if chunk is None:
        items = max(1, min(ITEMS_PER_PASS, VALUES_PER_PASS // max(1, item_values)))
        return max(1, min(total, items // batch))
    return min(check_count("chunk", chunk), total)


def _riemann_left(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.linspace(0.0, 1.0 - 1.0 / n, n), np.full(n, 1.0 / n)


def _riemann_right(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.linspace(1.0 / n, 1.0, n), np.full(n, 1.0 / n)


def _riemann_middle(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.linspace(0.5 / n, 1.0 - 0.5 / n, n), np.full(n, 1.0 / n)


def _riemann_trapezoid(n: int) -> tuple[np.ndarray, np.ndarray]:
    # Captum's convention, kept so that maps agree with it: nodes 1 / (n - 1)
    # apart but weights 1 / n, halved at both ends (they sum to 1 - 1 / n).
    weights = np.full(n, 1.0 / n)
    weights[[0, -1]] /= 2
    return np.linspace(0.0, 1.0, n), weights


def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return 0.5 * (nodes + 1.0), 0.5 * weights


QUADRATURE_RULES: dict[str, Callable[[int], tuple[np.ndarray, np.ndarray]]] = {
    "gausslegendre": _gauss_legendre,
    "riemann_left": _riemann_left,
    "riemann_right": _riemann_right,
    "riemann_middle": _riemann_middle,
    "riemann_trapezoid": _riemann_trapezoid,
}


def quadrature(
    rule: str, steps: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes in [0, 1] and weights of the path integral's quadrature ``rule``.

    The nodes and weights are those of Captum's ``approximation_methods``,
    computed in float64.

    Parameters
    ----------
    rule : str
        A name of :data:`QUADRATURE_RULES`: ``gausslegendre``, ``riemann_left``,
        ``riemann_right``, ``riemann_middle`` or ``riemann_trapezoid``.
    steps : int
        Number of nodes, >= 2.
    dtype, device
        Of the returned tensors.

    Returns
    -------
    tuple of torch.Tensor
        ``(alphas, weights)``, both of shape ``(steps,)``.

    Examples
    --------
    >>> alphas, weights = quadrature("riemann_middle", 4)
    >>> alphas
    tensor([0.1250, 0.3750, 0.6250, 0.8750], dtype=torch.float64)
    """
    check_choice("rule", rule, QUADRATURE_RULES)
    steps = check_count("steps", steps, 2)
    alphas, weights = QUADRATURE_RULES[rule](steps)
    return (
        torch.as_tensor(alphas, dtype=dtype, device=device),
        torch.as_tensor(weights, dtype=dtype, device=device),
    )


def _baseline(baseline: float | torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if baseline is None:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    if isinstance(baseline, bool) or not isinstance(baseline, (numbers.Real, torch.Tensor)):
        raise InputTypeError(
            "baseline must be None, a number or a tensor broadcastable to x; "
            f"got {type(baseline).__name__}"
        )
    if isinstance(baseline, torch.Tensor):
        try:
            fits = torch.broadcast_shapes(baseline.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise InputError(
                f"baseline of shape {tuple(baseline.shape)} does not broadcast to "
                f"x of shape {tuple(x.shape)}; expected e.g. {tuple(x.shape[1:])} or a number"
            )
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    if not bool(torch.isfinite(base).all()):
        raise InputError("baseline contains NaN or inf; expected finite values")
    return base


@register("integrated_gradients")
def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None,
    *,
    create_graph: bool = False,
    steps: int = 50,
    baseline: float | torch.Tensor | None = None,
    rule: str = "gausslegendre",
    chunk: int | None = None,
) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al. 2017).

    ``(x - x0) * integral_0^1 grad f(x0 + a (x - x0)) da``, the integral taken
    by the quadrature ``rule``; the maps equal Captum's
    ``IntegratedGradients`` with ``n_steps=steps`` and ``method=rule``.

    Parameters
    ----------
    steps : int
        Number of quadrature nodes, >= 2.
    baseline : None, float or torch.Tensor
        The path's start ``x0``: zeros when ``None``, a number, or a tensor
        broadcastable to ``x``.
    rule : str
        ``gausslegendre`` (default), ``riemann_left``, ``riemann_right``,
        ``riemann_middle`` or ``riemann_trapezoid`` (see :func:`quadrature`).
    chunk : int or None
        Nodes per forward pass (each pass holds ``chunk * B`` items), which
        bounds memory; ``None`` picks about :data:`ITEMS_PER_PASS` items,
        fewer for large inputs (:func:`auto_chunk`).

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, _ = bs.load_data("digits")
    >>> h = bs.explain(model, x[:4], "integrated_gradients", steps=32, rule="riemann_middle")
    """
    alphas, weights = quadrature(rule, steps, x.dtype, x.device)
    x0 = _baseline(baseline, x)
    chunk = auto_chunk(chunk, steps, x.shape[0], x[0].numel())
    if target is None:
        target = predict(model, x)
    x_in = x if create_graph and x.requires_grad else x.detach()
    delta = x_in - x0
    span = (-1,) + (1,) * x.dim()
    total = torch.zeros_like(delta)
    for start in passes(range(0, steps, chunk), "integrated_gradients"):
        a = alphas[start : start + chunk].view(span)
        w = weights[start : start + chunk].view(span)
        points = (x0 + a * delta).flatten(0, 1)
        grad = input_gradient(model, points, target.repeat(a.shape[0]), create_graph)
        total = total + (w * grad.view(a.shape[0], *x.shape)).sum(0)
    return delta * total


# The path starts at the data's black, as zero is on [0, 1] data (see range_options).
integrated_gradients.range_options = lambda low, high: {"baseline": low}
# A (B, C, H, W) baseline holds one start per image (see per_item_options).
integrated_gradients.per_item_options = frozenset({"baseline"})


@register_input_check("integrated_gradients")
def _check_baseline(x: torch.Tensor, *, baseline: object = None, **options: object) -> None:
    """Refuse a baseline that does not fit ``x``: also where SmoothGrad, which stacks
    noisy copies of ``x``, would broadcast one of another batch's size over them."""
    _baseline(baseline, x)
