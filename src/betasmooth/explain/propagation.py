"""Propagation methods: guided backprop and layer-wise relevance propagation (LRP).

Guided backprop is the gradient with every ReLU's backward pass modified,
installed by the same mechanism as beta-smoothing (:func:`~betasmooth.smooth.replace_relu`),
so ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` in forward code are covered too.

LRP traces the model once with :func:`torch.fx.symbolic_trace`, runs the
traced graph recording every intermediate value, and sends relevance from the
target logit back through the graph in reverse order. Each kind of node has a
rule in a registry; every rule is made of plain torch operations, so with
``create_graph=True`` the map is differentiable w.r.t. the input through the
rules' ratios. The rules and their zennit equivalents:

=====================================  ===========================  =========================
layer                                  rule                         zennit
=====================================  ===========================  =========================
first Conv/ConvT/Linear (input-fed)    z^B, bounds ``low``/``high``  ``ZBox(low, high)``
Conv1d/2d/3d, ConvTranspose1d/2d/3d    z+                           ``ZPlus()``
Linear                                 epsilon (``epsilon``)        ``Epsilon(epsilon)``
AvgPool, AdaptiveAvgPool, ``mean``     proportional to inputs       ``Norm()``
``x + y`` (residual)                   proportional to summands     ``Norm()`` on ``Sum``
BatchNorm after Conv/ConvT/Linear      folded into that layer       ``SequentialMergeBatchNorm``
BatchNorm elsewhere                    relevance passes unchanged   ``Pass()``
MaxPool                                winner takes all (gradient)  (gradient)
Flatten, view, reshape, Dropout        gradient (reshape/identity)  (gradient)
indexing, permute, chunk, split        gradient (routing)           (gradient)
gate * x, gate from Sigmoid            all to x (signal takes all)  (no rule)
x * c, x / c, x + c, x - c before the  relevance passes unchanged;  (a canonizer's job)
first layer (normalisation inside      the z^B box is mapped
forward, GoogLeNet's transform_input)  through them
ReLU, Softplus, other activations      relevance passes unchanged   ``Pass()``
x * c, x / c after the first layer     relevance passes unchanged   (no rule)
=====================================  ===========================  =========================

Normalisations and attention (transformers) have their rules in
:mod:`~betasmooth.explain.transformer`. Only the nodes that relevance
reaches need a rule: not those that only compute a gate or attention weights.

The table is the default composite, ``epsilon_plus_box``. A composite
(:class:`Composite`, option ``composite`` of :func:`lrp`) chooses the rule of
each layer with weights by its type, with a separate choice for the first
layer; :mod:`~betasmooth.explain.composites` adds Zennit's named composites
(``epsilon_gamma_box``, ``epsilon_plus_flat``, ``epsilon_alpha2_beta1``, ...)
and their rules.

The relevance that enters the graph is the one-hot target times its logit,
``R_out = onehot(target) * logits``; zennit's attributor called with
``attr_output = onehot * output`` gives the same map. For a bias-free network
with ``epsilon -> 0`` the input relevances then sum to the target logit.
"""

from __future__ import annotations

import functools
import operator
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..smooth import check_overridable, replace_relu
from ..validate import InputError, InputTypeError, check_uncompiled, evaluating, warn_user
from . import register, register_check, register_input_check
from .gradient import input_gradient, select_logit

__all__ = [
    "COMPOSITES",
    "RULES",
    "AMPLIFIED",
    "STABILIZER",
    "Composite",
    "guided_backprop",
    "lrp",
    "lrp_graph",
    "stabilize",
]

# zennit's default stabiliser for the rules that have no epsilon option.
STABILIZER = 1e-6


# --------------------------------------------------------------------------- guided backprop


def _positive(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp(min=0)


def _guided_relus(handles: list[torch.utils.hooks.RemovableHandle]) -> Callable:
    # The clamp is a hook on each activation's output rather than a custom
    # backward: the hook is removed once the map is computed, so that a second
    # differentiation (create_graph) follows the true forward Jacobian while
    # the map itself keeps the clamps as graph operations. Because the
    # activation's derivative is never negative, clamp-then-mask equals the
    # guided rule clamp(grad, 0) * (x > 0).
    def guided_relu(x: torch.Tensor) -> torch.Tensor:
        # Inside the override F.relu reaches the next mode down: softplus when
        # the model is beta-smoothed, ReLU otherwise.
        y = F.relu(x)
        if y.requires_grad:
            handles.append(y.register_hook(_positive))
        return y

    return guided_relu


@register("guided_backprop")
def guided_backprop(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None, *, create_graph: bool = False
) -> torch.Tensor:
    """Guided backprop (Springenberg et al. 2015): ReLUs pass back only positive gradients.

    Every ReLU's backward becomes ``clamp(grad, min=0) * (x > 0)``; this covers
    ``nn.ReLU`` and ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` in forward
    code. On a beta-smoothed model the mask is the softplus derivative
    ``sigmoid(beta x)``.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits.
    x : torch.Tensor
        Input batch.
    target : torch.Tensor or None
        Class per item; ``None`` for the predicted class.
    create_graph : bool
        Keep the graph so that the map is differentiable w.r.t. ``x``.

    Returns
    -------
    torch.Tensor
        The guided gradient, shaped like ``x``.

    Examples
    --------
    >>> import betasmooth as bs
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> bs.explain(net, torch.rand(2, 1, 2, 2), "guided_backprop").shape
    torch.Size([2, 1, 2, 2])
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        # ReLU only: guided backprop's rule is defined for ReLU, as in Captum.
        with replace_relu(model, _guided_relus(handles), warn="guided_backprop", through=False):
            return input_gradient(model, x, target, create_graph)
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- LRP: rules


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z + epsilon * sign(z)`` with ``sign(0) = 1``, as zennit's stabiliser.

    Examples
    --------
    >>> stabilize(torch.tensor([-1.0, 0.0, 2.0]), 0.5)
    tensor([-1.5000,  0.5000,  2.5000])
    """
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z)


Affine = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _scale_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Conv and Linear: output channel ``o`` has the weights ``weight[o]``."""
    return weight * scale.view((-1,) + (1,) * (weight.dim() - 1))


@dataclass
class _Layer:
    """A linear layer as ``fn(input, weight, bias)`` with its (possibly folded) parameters.

    ``scaled(weight, scale)`` is the weight with output channel ``o`` multiplied
    by ``scale[o]``: how a BatchNorm after the layer folds into it.
    """

    fn: Affine
    weight: torch.Tensor
    bias: torch.Tensor | None
    scaled: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _scale_rows


@dataclass
class _Step:
    """One node of the traced graph with its recorded argument values."""

    node: fx.Node
    module: nn.Module | None
    args: tuple
    kwargs: dict
    layer: _Layer | None
    options: dict

    def call(self, t: torch.Tensor, index: int = 0) -> torch.Tensor:
        """The node's operation with its argument at ``index`` replaced by ``t``."""
        args = (*self.args[:index], t, *self.args[index + 1 :])
        if self.node.op == "call_module":
            # forward, not __call__: user hooks must not see these re-evaluations.
            return self.module.forward(*args, **self.kwargs)
        if self.node.op == "call_method":
            return getattr(args[0], self.node.target)(*args[1:], **self.kwargs)
        return self.node.target(*args, **self.kwargs)


Rule = Callable[[_Step, torch.Tensor], list[tuple[fx.Node, torch.Tensor]]]


def _vjp(
    fn: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    # Every operation differentiated here is piecewise linear in its input, so
    # the vector-Jacobian product does not depend on the input a.e.: a detached
    # copy is enough, and the result stays differentiable w.r.t. s (and thus
    # w.r.t. the network input) when s carries a graph.
    leaf = a.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(leaf)
        (grad,) = torch.autograd.grad(out, leaf, s, create_graph=s.requires_grad)
    return grad


def _first_arg(step: _Step, relevance: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
    return [(step.node.args[0], relevance)]


def _pass(step: _Step, relevance: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
    """Element-wise activation, unfolded BatchNorm: relevance passes unchanged (zennit ``Pass``)."""
    return _first_arg(step, relevance)


def _gradient(step: _Step, relevance: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
    """Reshapes, identity and max-pool: route relevance like the gradient (winner takes all)."""
    return _first_arg(step, _vjp(step.call, step.args[0], relevance))


def _to_arg(index: int, step: _Step, relevance: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
    """All relevance to the argument at ``index``: ``x * c``, ``x + c``, ... on the input
    before the first layer, ``x * c`` after it, ``gate * x``.

    An element-wise change of coordinates of the input (a normalisation inside
    forward) or a scaling moves no relevance; a constant that broadcasts ``x``
    up sums it back.
    """
    a = step.args[index]
    return [(step.node.args[index], relevance.sum_to_size(a.shape))]


def _item(step: _Step, relevance: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
    """Indexing: of a tensor, routed like the gradient; of the parts of a ``chunk`` or
    ``split``, the relevance of that part, the others' zero."""
    whole = step.args[0]
    if not isinstance(whole, (tuple, list)):
        return _gradient(step, relevance)
    # A part that is not a tensor (the attention weights that nn.MultiheadAttention
    # returns as None) takes none.
    parts = [torch.zeros_like(part) if torch.is_tensor(part) else None for part in whole]
    parts[step.args[1]] = relevance
    return [(step.node.args[0], tuple(parts))]


def _parts(step: _Step, relevance: tuple[torch.Tensor, ...]) -> list[tuple[fx.Node, torch.Tensor]]:
    """``chunk``, ``split``, ``unbind``: each part's relevance back to its place (the gradient)."""
    leaf = step.args[0].detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(
            step.call(leaf), leaf, relevance, create_graph=any(r.requires_grad for r in relevance)
        )
    return _first_arg(step, grad)


def _add(a: object, b: object) -> object:
    """Relevance from two readers: summed, part by part for the parts of a ``chunk``."""
    if isinstance(a, tuple):
        return tuple(y if x is None else x if y is None else x + y for x, y in zip(a, b))
    return a + b


def _norm(step: _Step, relevance: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
    """Average pools: relevance in proportion to each input's contribution (zennit ``Norm``)."""
    a = step.args[0]
    s = relevance / stabilize(step.call(a), STABILIZER)
    return _first_arg(step, a * _vjp(step.call, a, s))


def _sum(step: _Step, relevance: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
    """``x + y``: relevance in proportion to each summand (zennit ``Norm`` on ``Sum``),
    stabilised by ``epsilon`` as the epsilon rule is, at least by :data:`STABILIZER`
    (zennit's ``Norm`` takes 1e-6, the default): where the summands cancel, a larger
    epsilon bounds the division."""
    alpha = step.kwargs.get("alpha", 1)
    terms = [step.args[0], step.args[1] * alpha if alpha != 1 else step.args[1]]
    z = terms[0] + terms[1]
    s = relevance / stabilize(z, max(step.options["epsilon"], STABILIZER))
    return [
        (node, (term * s).sum_to_size(term.shape))
        for node, term in zip(step.node.args[:2], terms)
        if isinstance(node, fx.Node) and isinstance(term, torch.Tensor)
    ]


def _cat(step: _Step, relevance: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
    """``torch.cat``: each input gets its own slice, as the gradient routes it (zennit too)."""
    parts = step.args[0]
    # torch.cat takes its dim also as axis (NumPy's name).
    dim = step.args[1] if len(step.args) > 1 else step.kwargs.get("dim", step.kwargs.get("axis", 0))
    pieces = relevance.split([p.shape[dim] for p in parts], dim)
    return [
        (node, piece) for node, piece in zip(step.node.args[0], pieces) if isinstance(node, fx.Node)
    ]


def _epsilon_of(
    layer: _Layer, a: torch.Tensor, relevance: torch.Tensor, epsilon: float
) -> torch.Tensor:
    z = layer.fn(a, layer.weight, layer.bias)
    s = relevance / stabilize(z, epsilon)
    return a * _vjp(lambda t: layer.fn(t, layer.weight, None), a, s)


def _epsilon(step: _Step, relevance: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
    """Epsilon rule, ``R_i = a_i sum_j w_ij R_j / (z_j + eps sign(z_j))`` (zennit ``Epsilon``)."""
    a = step.args[0]
    return _first_arg(step, _epsilon_of(step.layer, a, relevance, step.options["epsilon"]))


def _positive_part(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(min=0)


def _negative_part(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(max=0)


def _zplus(step: _Step, relevance: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
    """z+ rule (zennit ``ZPlus``: alpha 1, beta 0; positive bias kept in the denominator)."""
    layer, a = step.layer, step.args[0]
    w_pos = layer.weight.clamp(min=0)
    if not bool(a.lt(0).any()):
        # The usual case after a ReLU or softplus: the negative half is zero,
        # and skipping it halves the cost.
        z = layer.fn(a, w_pos, _positive_part(layer.bias))
        s = relevance / stabilize(z, STABILIZER)
        return _first_arg(step, a * _vjp(lambda t: layer.fn(t, w_pos, None), a, s))
    a_pos, a_neg = a.clamp(min=0), a.clamp(max=0)
    w_neg = layer.weight.clamp(max=0)
    z = layer.fn(a_pos, w_pos, _positive_part(layer.bias)) + layer.fn(a_neg, w_neg, None)
    s = relevance / stabilize(z, STABILIZER)
    r_pos = a_pos * _vjp(lambda t: layer.fn(t, w_pos, None), a, s)
    r_neg = a_neg * _vjp(lambda t: layer.fn(t, w_neg, None), a, s)
    return _first_arg(step, r_pos + r_neg)


def _bound(value: float | torch.Tensor, a: torch.Tensor, name: str) -> torch.Tensor:
    # Bounds of a first layer that sees x reshaped (an MLP on images) come mapped
    # through the reshape by _mapped_boxes; a bound that merely has as many values
    # as the layer's input (x's channels last) is no bound of it.
    bound = torch.as_tensor(value).to(a)
    try:
        return torch.broadcast_to(bound, a.shape)
    except RuntimeError:
        raise InputError(
            f"lrp option {name!r} of shape {tuple(bound.shape)} does not broadcast to the first "
            f"layer's input {tuple(a.shape)}; expected a float or e.g. shape (1, C, 1, 1)"
        ) from None


def _zbox(step: _Step, relevance: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
    """z^B rule for inputs in ``[low, high]`` (zennit ``ZBox``)."""
    layer, a = step.layer, step.args[0]
    low = _bound(step.options["low"], a, "low")
    high = _bound(step.options["high"], a, "high")
    w, w_pos, w_neg = layer.weight, layer.weight.clamp(min=0), layer.weight.clamp(max=0)
    z = (
        layer.fn(a, w, layer.bias)
        - layer.fn(low, w_pos, _positive_part(layer.bias))
        - layer.fn(high, w_neg, _negative_part(layer.bias))
    )
    s = relevance / stabilize(z, STABILIZER)
    r = (
        a * _vjp(lambda t: layer.fn(t, w, None), a, s)
        - low * _vjp(lambda t: layer.fn(t, w_pos, None), a, s)
        - high * _vjp(lambda t: layer.fn(t, w_neg, None), a, s)
    )
    return _first_arg(step, r)


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_var is None:
        raise InputError(
            f"lrp needs BatchNorm with running statistics; {type(bn).__name__} has "
            "track_running_stats=False"
        )
    scale = (bn.running_var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _conv_layer(module: nn.Module) -> _Layer:
    return _Layer(module._conv_forward, module.weight, module.bias)


def _linear_layer(module: nn.Module) -> _Layer:
    return _Layer(F.linear, module.weight, module.bias)


_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_transpose_layer(module: nn.Module, output_size: object = None) -> _Layer:
    """ConvTranspose1d/2d/3d as ``F.conv_transposeNd`` with the module's stride, padding,
    output padding (or the one that forward's ``output_size`` asks for), groups, dilation."""
    dims = len(module.kernel_size)
    conv = _TRANSPOSED[dims]

    def fn(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        padding = module._output_padding(
            t, output_size, module.stride, module.padding, module.kernel_size, dims, module.dilation
        )
        return conv(
            t, weight, bias, module.stride, module.padding, padding, module.groups, module.dilation
        )

    return _Layer(
        fn, module.weight, module.bias, functools.partial(_scale_transposed, module.groups)
    )


def _scale_transposed(groups: int, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """ConvTranspose: the weight is ``(in, out / groups, k...)``, and output channel
    ``g * out / groups + j`` of group ``g`` has the weights ``weight[i, j]`` of the inputs
    ``i`` of that group."""
    size, per_group = weight.shape[0] // groups, weight.shape[1]
    grouped = weight.reshape(groups, size, per_group, *weight.shape[2:])
    factors = scale.reshape(groups, 1, per_group, *(1,) * (weight.dim() - 2))
    return (grouped * factors).reshape(weight.shape)


def _folded(layer: _Layer, bn: nn.Module) -> _Layer:
    # As zennit's MergeBatchNorm: W' = W s, b' = (b - mean) s + beta.
    scale, shift = _bn_affine(bn)
    weight = layer.scaled(layer.weight, scale)
    bias = shift if layer.bias is None else layer.bias * scale + shift
    return _Layer(layer.fn, weight, bias, layer.scaled)


# --------------------------------------------------------------------------- LRP: registries

LAYERS: dict[type[nn.Module], tuple[Callable[..., _Layer], Rule]] = {
    nn.Conv1d: (_conv_layer, _zplus),
    nn.Conv2d: (_conv_layer, _zplus),
    nn.Conv3d: (_conv_layer, _zplus),
    # Linear in their input as a Conv is (zennit's types.Convolution holds them too).
    nn.ConvTranspose1d: (_conv_transpose_layer, _zplus),
    nn.ConvTranspose2d: (_conv_transpose_layer, _zplus),
    nn.ConvTranspose3d: (_conv_transpose_layer, _zplus),
    nn.Linear: (_linear_layer, _epsilon),
}
"""Layers with weights: how to evaluate them (``build(module, *args, **kwargs)`` with the
call's arguments after the input, ConvTranspose's ``output_size``), and their rule after
the first layer."""

FIRST_RULE: Rule = _zbox

BATCHNORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

MODULE_RULES: dict[type[nn.Module], Rule] = {
    # A BatchNorm that follows no Conv/Linear (DenseNet's after each cat, a
    # pre-activation network's) passes relevance as zennit's composites do: the
    # epsilon rule of its affine map would let the shift, which nearly cancels
    # the scaled input, multiply the relevance (5x the logit on DenseNet-121).
    **{kind: _pass for kind in BATCHNORMS},
    nn.MaxPool1d: _gradient,
    nn.MaxPool2d: _gradient,
    nn.MaxPool3d: _gradient,
    nn.AdaptiveMaxPool2d: _gradient,
    nn.AvgPool1d: _norm,
    nn.AvgPool2d: _norm,
    nn.AvgPool3d: _norm,
    nn.AdaptiveAvgPool1d: _norm,
    nn.AdaptiveAvgPool2d: _norm,
    nn.AdaptiveAvgPool3d: _norm,
    nn.Flatten: _gradient,
    nn.Unflatten: _gradient,
    nn.Identity: _gradient,
    nn.Dropout: _gradient,
    nn.Dropout2d: _gradient,
    **{
        kind: _pass
        for kind in (
            nn.ReLU,
            nn.ReLU6,
            nn.Hardtanh,
            nn.Softplus,
            nn.LeakyReLU,
            nn.PReLU,
            nn.ELU,
            nn.CELU,
            nn.SELU,
            nn.GELU,
            nn.SiLU,
            nn.Mish,
            nn.Hardswish,
            nn.Hardsigmoid,
            nn.Tanh,
            nn.Sigmoid,
        )
    },
}
"""Rules of modules without their own weights, looked up along the class's MRO."""

FUNCTION_RULES: dict[Callable, Rule] = {
    operator.add: _sum,
    torch.add: _sum,
    torch.flatten: _gradient,
    torch.reshape: _gradient,
    operator.getitem: _item,
    torch.chunk: _parts,
    torch.split: _parts,
    torch.unbind: _parts,
    torch.unsqueeze: _gradient,
    torch.squeeze: _gradient,
    torch.permute: _gradient,
    torch.transpose: _gradient,
    torch.swapaxes: _gradient,
    torch.movedim: _gradient,
    F.dropout: _gradient,
    F.max_pool2d: _gradient,
    F.avg_pool2d: _norm,
    F.adaptive_avg_pool2d: _norm,
    torch.mean: _norm,
    torch.sum: _norm,
    torch.cat: _cat,
    torch.concat: _cat,
    **{
        fn: _pass
        for fn in (
            F.relu,
            F.relu_,
            torch.relu,
            torch.relu_,
            F.relu6,
            F.hardtanh,
            F.softplus,
            F.leaky_relu,
            F.elu,
            F.celu,
            F.selu,
            F.gelu,
            F.silu,
            F.mish,
            F.hardswish,
            F.hardsigmoid,
            torch.tanh,
            torch.sigmoid,
        )
    },
}
"""Rules of functions called in forward code."""

METHOD_RULES: dict[str, Rule] = {
    "add": _sum,
    "mean": _norm,
    "sum": _norm,
    "view": _gradient,
    "reshape": _gradient,
    "flatten": _gradient,
    "contiguous": _gradient,
    "unsqueeze": _gradient,
    "chunk": _parts,
    "split": _parts,
    "unbind": _parts,
    "squeeze": _gradient,
    "permute": _gradient,
    "transpose": _gradient,
    "swapaxes": _gradient,
    "movedim": _gradient,
    "relu": _pass,
    "relu_": _pass,
    "tanh": _pass,
    "sigmoid": _pass,
}
"""Rules of tensor methods called in forward code."""

#: Element-wise maps by a constant, allowed between the input and the first
#: layer (normalisation inside forward): relevance passes, the box is mapped.
INPUT_MAPS: frozenset[object] = frozenset(
    {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
     torch.mul, torch.div, "add", "sub", "mul", "div"}
)  # fmt: skip
#: Gates: a product ``gate * x`` whose one factor comes from one of these
#: (squeeze-and-excitation in EfficientNet and MobileNetV3) passes all its
#: relevance to ``x`` (signal takes all, as LRP for LSTM gates): the map of
#: the network whose next layer has the gate folded into its weights.
GATE_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)
GATE_FUNCTIONS: frozenset[object] = frozenset({torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid"})
PRODUCTS: frozenset[object] = frozenset({operator.mul, torch.mul, "mul"})
#: Divisions: ``x / c`` by a constant scales ``x`` as ``x * c`` does.
QUOTIENTS: frozenset[object] = frozenset({operator.truediv, torch.div, "div"})

#: Rules of functions named by ``module.qualname``, for libraries that need not be
#: imported: torchvision's stochastic depth is the identity in evaluation mode.
NAMED_FUNCTION_RULES: dict[str, Rule] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": _gradient,
}

#: Module classes (``module.qualname``) that normalise the input element-wise by
#: constants, traced as one node: as :data:`INPUT_MAPS` before the first layer.
INPUT_MODULES: frozenset[str] = frozenset({"torchvision.transforms.transforms.Normalize"})

LayerTypes = type[nn.Module] | tuple[type[nn.Module], ...]

RULES: dict[str, Rule] = {"epsilon": _epsilon, "zplus": _zplus, "zbox": _zbox}
"""Rules of layers with weights by name, for :class:`Composite`."""

#: Rules of the nodes through which the z^B box is carried to the first layer, on
#: the images of its corners: element-wise monotone maps, routing, pools, sums. A
#: rule not named here (a LayerNorm's) stops it.
BOX_CARRIERS: set[Rule] = {_pass, _gradient, _item, _parts, _cat, _norm, _sum}
#: How far, in units of the box's width, an input may lie outside LRP's z^B
#: box before it counts as data of another range: perturbed copies (Quantus'
#: Gaussian noise of std 0.1 reaches about 0.5) pass, ImageNet-normalised
#: images (down to -2.1, up to 2.6 for the box [0, 1]) do not.
BOX_SLACK = 1.0


@dataclass(frozen=True)
class Composite:
    """The rule of each layer with weights, by layer type (checked with ``isinstance``, in order).

    ``first`` applies to the layers fed by the input, ``layers`` to all other
    ones (and to first layers of a type ``first`` does not name). A rule is a
    name from :data:`RULES` or a rule function.

    Examples
    --------
    >>> gamma_plus = Composite(
    ...     layers={nn.Conv2d: "gamma", nn.Linear: "epsilon"}, first={nn.Conv2d: "flat"}
    ... )
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    >>> import betasmooth as bs
    >>> bs.explain(net, torch.rand(1, 1, 4, 4), "lrp", composite=gamma_plus).shape
    torch.Size([1, 1, 4, 4])
    """

    layers: dict[LayerTypes, str | Rule]
    first: dict[LayerTypes, str | Rule] = field(default_factory=dict)

    def rule(self, module: nn.Module, first: bool) -> Rule:
        """The rule of ``module``; ``first`` when the input feeds it."""
        maps = (self.first, self.layers) if first else (self.layers,)
        for mapping in maps:
            for kind, rule in mapping.items():
                if isinstance(module, kind):
                    return RULES[rule] if isinstance(rule, str) else rule
        raise InputError(
            f"the lrp composite has no rule for {type(module).__name__}; expected a composite "
            f"whose layers name it, e.g. {{nn.{type(module).__name__}: 'epsilon'}}"
        )


COMPOSITES: dict[str, Composite] = {
    "epsilon_plus_box": Composite(
        layers={kind: rule for kind, (_, rule) in LAYERS.items()},
        first=dict.fromkeys(LAYERS, FIRST_RULE),
    )
}
"""Named composites; :mod:`~betasmooth.explain.composites` adds Zennit's."""

# Nodes that compute shapes, not activations: they carry no relevance.
_SHAPE_METHODS = frozenset({"size", "dim"})
_SHAPE_FUNCTIONS = frozenset({getattr})
_INPLACE_METHODS = frozenset({"relu_", "add_", "mul_", "clamp_"})


#: What the error for a node without a rule names as supported.
SUPPORTED = (
    "Conv, Linear, BatchNorm, LayerNorm, GroupNorm, attention, pooling, activations, +, "
    "cat, reshapes, indexing (tables in betasmooth.explain.propagation)"
)


def _where(node: fx.Node) -> str:
    """The module path whose forward made ``node``, from the trace's module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "in the model's own forward"
    path, kind = list(stack.values())[-1]
    name = getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1].rstrip("'>"))
    return f"in module {path} ({name})"


# --------------------------------------------------------------------------- LRP: the graph


@dataclass
class LRPGraph:
    """A traced model with a rule for each node that carries relevance.

    Built once per model by :func:`lrp_graph`; parameters are read at each
    call, so the graph stays valid while the weights change, and it is built
    again when a submodule is replaced.
    """

    module: fx.GraphModule
    input: fx.Node
    output: fx.Node
    rules: dict[fx.Node, Rule]
    folded: dict[fx.Node, str] = field(default_factory=dict)
    snapshot: frozenset[fx.Node] = frozenset()
    first: frozenset[fx.Node] = frozenset()
    #: Nodes computed from the input alone before the first layers (the z^B
    #: box is carried through them).
    raw: frozenset[fx.Node] = frozenset()
    #: First layers whose input's box cannot be carried (a LayerNorm before them),
    #: with the node that stops it.
    unboxed: dict[fx.Node, fx.Node] = field(default_factory=dict)


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, LRPGraph] = weakref.WeakKeyDictionary()


def _module_rule(module: nn.Module) -> Rule | None:
    for kind in type(module).__mro__:
        if kind in MODULE_RULES:
            return MODULE_RULES[kind]
    return None


def _layer_kind(module: nn.Module | None) -> type[nn.Module] | None:
    if module is None:
        return None
    return next((kind for kind in type(module).__mro__ if kind in LAYERS), None)


def _describe(node: fx.Node, module: nn.Module | None) -> str:
    if node.op == "call_module":
        return f"module {type(module).__name__} ({node.target})"
    if node.op == "call_method":
        return f"method Tensor.{node.target}{_rounding(node)}"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}{_rounding(node)}"
    return f"{node.op} {node.target}"


def _rounding(node: fx.Node) -> str:
    # A rounded quotient is refused where a plain one is not: name the difference.
    mode = node.kwargs.get("rounding_mode")
    return f" with rounding_mode={mode!r}" if mode else ""


def _kind(node: fx.Node, module: nn.Module | None) -> str:
    """What ``node`` calls, without where: ``module LayerNorm``, ``function mul``."""
    if node.op == "call_module":
        return f"module {type(module).__name__}"
    return _describe(node, module)


def _inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.kwargs.get("inplace", False):
        return True
    if node.op == "call_method":
        return node.target in _INPLACE_METHODS
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    return node.target in (F.relu_, torch.relu_)


@register_check("guided_backprop")
def _check_guided(model: nn.Module, **options: object) -> None:
    # Its ReLUs are overridden: a TorchScript model would fail only at its first map.
    check_overridable(model, "guided_backprop")


@register_check("lrp")
def _check_lrp(
    model: nn.Module,
    *,
    composite: object = "epsilon_plus_box",
    gamma: object = 0.25,
    **options: object,
) -> None:
    _check_unboxed(lrp_graph(_unwrapped(model)), _composite(composite, gamma))


def _check_unboxed(graph: LRPGraph, chosen: Composite) -> None:
    """Refuse the z^B rule on a first layer whose input box cannot be known."""
    modules = dict(graph.module.named_modules())
    for first, breaker in graph.unboxed.items():
        if chosen.rule(modules[first.target], True) is _zbox:
            breaking = modules.get(breaker.target) if breaker.op == "call_module" else None
            raise InputError(
                f"lrp's z^B rule needs the bounds of what its first layer {first.target} sees, "
                f"but {_describe(breaker, breaking)} before it maps the input's box to none "
                f"(node {breaker.name!r}); expected a composite without a box, such as "
                "epsilon_plus_flat (on the command line --option lrp.composite=epsilon_plus_flat)"
            )


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module of a data-parallel wrapper, which torch.fx cannot trace; on one device
    the wrapper runs its module on the inputs."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


@register_input_check("lrp")
def _check_box(
    x: torch.Tensor,
    *,
    low: object = 0.0,
    high: object = 1.0,
    epsilon: object = 1e-6,
    composite: object = "epsilon_plus_box",
    gamma: object = 0.25,
) -> None:
    """Refuse an ``x`` far outside the z^B rule's box: the bounds of other data.

    The usual cause is normalised images with the default box [0, 1]. A small
    excursion (a perturbed copy, float rounding) is allowed: the rule stays
    defined there.
    """
    _check_lrp_options(low, high, epsilon)
    chosen = _composite(composite, gamma)
    rules = [*chosen.first.values(), *chosen.layers.values()]
    if not any((RULES.get(r) if isinstance(r, str) else r) is _zbox for r in rules):
        return
    bounds = []
    for name, value in (("low", low), ("high", high)):
        try:
            bounds.append(torch.broadcast_to(torch.as_tensor(value).to(x), x.shape))
        except RuntimeError:
            raise InputError(
                f"lrp option {name!r} of shape {_shape(value)} does not broadcast to x of shape "
                f"{tuple(x.shape)}; expected a float or e.g. shape (1, C, 1, 1)"
            ) from None
    lo, hi = bounds
    slack = BOX_SLACK * (hi - lo).abs()
    if bool(((x < lo - slack) | (x > hi + slack)).any()):
        several = [b for b in (low, high) if torch.is_tensor(b) and b.numel() > 1]
        # Bounds that vary over height or width are a box per pixel, not per channel.
        per_pixel = any(b.dim() >= 2 and b.shape[-2:].numel() > 1 for b in several)
        shown = f"[{_brief(low)}, {_brief(high)}]"
        if several:
            shown = "per pixel" if per_pixel else "per channel"
        raise InputError(
            f"x lies outside the lrp input box {shown} of the z^B rule (x from "
            f"{float(x.min()):.3g} to {float(x.max()):.3g}); pass low= and high=, the bounds "
            "of the data (data.low and data.high of bs.load_data for normalised images; to "
            "manipulate, defense_sweep and calibrate_beta, data_range=data.bounds), "
            "or a composite without a box such as epsilon_plus_flat"
        )


def lrp_graph(model: nn.Module) -> LRPGraph:
    """Trace ``model`` and assign an LRP rule to every node between input and output.

    The result is cached per model instance, so an attack loop traces once.

    Parameters
    ----------
    model : nn.Module
        A model that :func:`torch.fx.symbolic_trace` can trace, built from the
        supported layers and functions.

    Returns
    -------
    LRPGraph
        The traced module and its rules.

    Raises
    ------
    InputError
        If tracing fails, or a node on the way from input to output has no rule.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> len(lrp_graph(net).rules)
    3
    """
    # Before the forward on the instance: torch.compile's wrapper sets one there too.
    check_uncompiled(model, "lrp")
    if "forward" in model.__dict__:
        # torch.fx traces the class's forward: the map would be of another function.
        raise InputError(
            f"lrp traces the forward of the class {type(model).__name__}, but this model has "
            "a forward set on the instance (model.forward = ...), which it would not "
            "explain; expected a module whose class defines the forward it runs"
        )
    cached = _GRAPHS.get(model)
    if cached is not None and _same_modules(cached, model):
        return cached
    try:
        # Tracing fixes every branch on self.training (dropout, auxiliary
        # outputs); maps are of the deployed model, so the trace is too.
        with evaluating(model):
            tracer = _Tracer()
            traced = tracer.trace(model)
            gm = fx.GraphModule(tracer.root, traced, type(model).__name__)
    except Exception as exc:  # any tracing failure is the user's model
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(
            f"lrp needs a model that torch.fx.symbolic_trace can trace (no control flow on "
            f"tensor values); tracing {type(model).__name__} failed: {reason}"
        ) from None
    _operands_by_position(gm)
    graph = _assign_rules(gm)
    _GRAPHS[model] = graph
    return graph


def _operands_by_position(gm: fx.GraphModule) -> None:
    """Move the operands of arithmetic given by keyword (``torch.add(x, other=y)``,
    ``x.mul(other=c)``) to their positions, where the rules read them."""
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or node.target not in INPUT_MAPS:
            continue
        names = ("input", "other") if node.op == "call_function" else ("self", "other")
        given = dict(zip(names, node.args)) | {k: node.kwargs[k] for k in names if k in node.kwargs}
        if len(given) == 2 and len(node.args) < 2:
            node.args = tuple(given[k] for k in names)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k not in names}
    gm.recompile()


def _factored(node: fx.Node, gm: fx.GraphModule, depends: set[fx.Node]) -> Rule | None:
    """The rule of a product of two computed factors, one of which a :data:`FACTORS` entry
    holds constant (a gate, attention weights). Other arguments (an einsum's equation)
    are not tensors."""
    if node.op not in ("call_function", "call_method"):
        return None
    indices = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node)]
    if len(indices) != 2 or any(node.args[i] not in depends for i in indices):
        return None
    for factor in FACTORS:
        if node.target in factor.operations:
            held = [factor.held(node.args[i], gm) for i in indices]
            if held.count(True) == 1:
                return factor.rule(indices[held.index(False)])
    return None


def _is_gate(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), GATE_MODULES)
    return node.op in ("call_function", "call_method") and node.target in GATE_FUNCTIONS


@dataclass(frozen=True)
class Factor:
    """A product ``a * b`` of two computed factors, one of which LRP holds constant.

    ``held(node, gm)`` says whether a factor is the one held (a gate, attention
    weights); ``rule(index)`` is the rule that sends relevance to the other
    factor, the argument at ``index``.
    """

    operations: frozenset[object]
    held: Callable[[fx.Node, fx.GraphModule], bool]
    rule: Callable[[int], Rule]


FACTORS: list[Factor] = [
    Factor(PRODUCTS, _is_gate, lambda index: functools.partial(_to_arg, index))
]
"""Products with a factor held constant; :mod:`~betasmooth.explain.transformer` adds attention."""


def _one_arg(node: fx.Node, rule: functools.partial) -> list[object]:
    return [node.args[rule.args[0]]]


ROUTES: dict[Callable, Callable[[fx.Node, Rule], list[object]]] = {_to_arg: _one_arg}
"""Rules that send relevance to some of a node's inputs: which ones, by rule (or the
function of a :func:`functools.partial` rule). Other rules may send to every input.
Inputs that no relevance reaches need no rule (the query and key of attention)."""

#: Rules of nodes that return a tuple and take relevance of some of its parts only:
#: those parts, and what the others are (held constant by the rule). Indexing another
#: part on the way to the output is refused.
PARTS: dict[Callable, tuple[frozenset[int], str]] = {}

#: Checks of a call's constant arguments that its rule needs, run on every node that
#: relevance reaches before any map is computed: ``check(node)`` raises an
#: ``InputError`` naming the node where the rule cannot explain the call as written.
CALL_CHECKS: dict[Callable, Callable[[fx.Node], None]] = {}


def _sends(node: fx.Node, rule: Rule | None, depends: set[fx.Node]) -> list[fx.Node]:
    route = ROUTES.get(_function_of(rule))
    inputs = route(node, rule) if route is not None else node.all_input_nodes
    return [n for n in inputs if isinstance(n, fx.Node) and n in depends]


def _scaling(node: fx.Node, depends: set[fx.Node], shape: set[fx.Node]) -> int | None:
    """Which argument of ``node`` is scaled, where ``node`` is ``x * c`` or ``x / c`` with a
    constant ``c`` (a layer scale, or a size such as ``h.shape[1]``, one of ``shape``): an
    element-wise linear map, through which LRP's rules pass relevance unchanged
    (``R = x c R / (x c)``)."""
    if node.op not in ("call_function", "call_method"):
        return None
    if node.target not in PRODUCTS and node.target not in QUOTIENTS:
        return None

    def computed(a: object) -> bool:
        return isinstance(a, fx.Node) and a in depends and a not in shape

    indices = [i for i, a in enumerate(node.args) if computed(a)]
    if len(indices) != 1 or any(computed(n) for n in node.kwargs.values()):
        return None
    if node.target in QUOTIENTS and (indices[0] != 0 or node.kwargs.get("rounding_mode")):
        return None  # c / x, and a rounded quotient, are no scaling
    return indices[0]


def _input_module(module: nn.Module | None) -> bool:
    return module is not None and any(
        f"{kind.__module__}.{kind.__qualname__}" in INPUT_MODULES for kind in type(module).__mro__
    )


#: Traceable stand-ins ``fn(module, *args, **kwargs)`` for the forward of modules whose
#: own forward torch.fx cannot trace (a fast path that branches on tensors), by class
#: (subclasses that keep the forward too): :mod:`~betasmooth.explain.transformer` adds
#: ``nn.TransformerEncoder(Layer)``.
FORWARDS: dict[type[nn.Module], Callable[..., object]] = {}


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping :data:`INPUT_MODULES` whole (their forward checks types
    that a traced proxy fails) and tracing :data:`FORWARDS` in place of their forward."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _stand_in(m) is not None:
            return False
        return _input_module(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., object], args: tuple, kwargs: dict
    ) -> object:
        stand_in = _stand_in(m)
        if stand_in is not None:
            forward = functools.partial(stand_in, m)
        return super().call_module(m, forward, args, kwargs)


def _stand_in(m: nn.Module) -> Callable[..., object] | None:
    """The :data:`FORWARDS` entry of ``m``'s class or of a base whose forward it keeps."""
    for kind in type(m).__mro__:
        if kind in FORWARDS:
            return FORWARDS[kind] if type(m).forward is kind.forward else None
    return None


def _same_modules(graph: LRPGraph, model: nn.Module) -> bool:
    """Whether the traced graph still calls the model's modules and reads its tensors:
    a module or a tensor attribute replaced since the trace needs a new one."""
    for node in graph.module.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            get = operator.attrgetter(node.target)
            try:
                if get(model) is not get(graph.module):
                    return False
            except AttributeError:
                return False
    return True


def _assign_rules(gm: fx.GraphModule) -> LRPGraph:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if not placeholders or not isinstance(outputs[0].args[0], fx.Node):
        raise InputError("lrp needs a model with one tensor input that returns one logits tensor")
    source = placeholders[0]
    depends: set[fx.Node] = {source}
    shape: set[fx.Node] = set()
    raw: set[fx.Node] = {source}
    # Nodes before the first layers whose z^B box cannot be mapped: the node that broke it.
    unboxed: dict[fx.Node, fx.Node] = {}
    rules: dict[fx.Node, Rule] = {}
    folded: dict[fx.Node, str] = {}
    firsts: set[fx.Node] = set()
    missing: list[tuple[fx.Node, nn.Module | None]] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        inputs = [n for n in node.all_input_nodes if n in depends]
        if not inputs:
            continue
        depends.add(node)
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if (
            (node.op == "call_method" and node.target in _SHAPE_METHODS)
            or (node.op == "call_function" and node.target in _SHAPE_FUNCTIONS)
            or all(n in shape for n in inputs)
        ):
            shape.add(node)
            continue
        layer_kind = _layer_kind(module)
        if layer_kind is not None:
            first = node.args[0] in raw
            rules[node] = FIRST_RULE if first else LAYERS[layer_kind][1]
            if first:
                firsts.add(node)
            continue
        index = _input_map(node, module, depends, raw)
        if index is not None:
            rules[node] = functools.partial(_to_arg, index)
            raw.add(node)
            if node.args[index] in unboxed:
                unboxed[node] = unboxed[node.args[index]]
            continue
        factored = _factored(node, gm, depends)
        if factored is not None:
            rules[node] = factored
            continue
        index = _scaling(node, depends, shape)
        if index is not None:
            rules[node] = functools.partial(_to_arg, index)
            continue
        rule = _lookup_rule(node, module)
        if rule is None:
            # The first is named in full; the kinds of the others follow, so that a
            # user sees every blocker, not the first of several.
            missing.append((node, module))
            continue
        rules[node] = rule
        if all(n in raw for n in inputs if n not in shape):
            raw.add(node)
            broken = [unboxed[n] for n in inputs if n in unboxed]
            if broken or rule not in BOX_CARRIERS:
                unboxed[node] = broken[0] if broken else node
        if _folds(node, module, gm):
            folded[node.args[0]] = node.target
            rules[node] = _pass
    # Only the nodes that relevance reaches need a rule: not those that compute
    # a factor held constant (a gate, attention weights) and nothing else.
    reached = {outputs[0].args[0]}
    for node in reversed(gm.graph.nodes):
        if node in reached and node not in shape:
            reached.update(_sends(node, rules.get(node), depends))
    missing = [(node, module) for node, module in missing if node in reached]
    _check_calls(gm, rules, reached)
    _check_parts(gm, rules, reached)
    if missing:
        node, module = missing[0]
        where = "" if node.op == "call_module" else f" {_where(node)}"
        first = _kind(node, module)
        others = [k for k in dict.fromkeys(_kind(n, m) for n, m in missing[1:]) if k != first]
        more = " ..." if len(others) > 3 else ""
        also = f" (also {', '.join(others[:3])}{more})" if others else ""
        raise InputError(
            f"lrp has no rule for {_describe(node, module)}{where} (node {node.name!r}){also}; "
            f"supported: {SUPPORTED}"
        )
    snapshot = frozenset(n for n in gm.graph.nodes if any(_inplace(user, gm) for user in n.users))
    return LRPGraph(
        gm,
        source,
        outputs[0].args[0],
        rules,
        folded,
        snapshot,
        frozenset(firsts),
        frozenset(raw),
        {n: unboxed[n.args[0]] for n in firsts if n.args[0] in unboxed},
    )


def _function_of(rule: Rule | None) -> Callable | None:
    """The function of a rule that may be a ``functools.partial`` of it (keys of the tables)."""
    return getattr(rule, "func", rule)


def _check_calls(gm: fx.GraphModule, rules: dict[fx.Node, Rule], reached: set[fx.Node]) -> None:
    """Refuse a call that relevance reaches whose arguments its rule cannot explain
    (:data:`CALL_CHECKS`), the first in the graph's order."""
    for node in gm.graph.nodes:
        check = CALL_CHECKS.get(_function_of(rules.get(node)))
        if check is not None and node in reached:
            check(node)


def _check_parts(gm: fx.GraphModule, rules: dict[fx.Node, Rule], reached: set[fx.Node]) -> None:
    """Refuse a part of a tuple on the way to the output that its rule sends no relevance
    (the attention weights that nn.MultiheadAttention returns, held constant)."""
    for node in gm.graph.nodes:
        if node not in reached or node.op != "call_function" or node.target is not operator.getitem:
            continue
        source, index = node.args[0], node.args[1]
        rule = rules.get(source) if isinstance(source, fx.Node) else None
        entry = PARTS.get(_function_of(rule))
        if entry is not None and index not in entry[0]:
            parts, held = entry
            module = gm.get_submodule(source.target) if source.op == "call_module" else None
            raise InputError(
                f"lrp holds part {index} of {_describe(source, module)} constant ({held}), "
                f"but the output is computed from it (node {node.name!r}); expected a model "
                f"whose logits use only part {', '.join(map(str, sorted(parts)))} of it"
            )


def _input_map(
    node: fx.Node, module: nn.Module | None, depends: set[fx.Node], raw: set[fx.Node]
) -> int | None:
    """Which argument of ``node`` is the input, where ``node`` maps the input by a constant.

    ``None`` unless ``node`` is one of :data:`INPUT_MAPS`, with exactly one
    argument that depends on the input, computed from the input alone (before
    any layer); the others are constants (numbers, buffers). A divisor that
    depends on the input is no change of coordinates.
    """
    if _input_module(module):
        return 0 if node.args and node.args[0] in raw else None
    if node.op not in ("call_function", "call_method") or node.target not in INPUT_MAPS:
        return None
    dependent = [n for n in node.all_input_nodes if n in depends]
    indices = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a in depends]
    if len(dependent) != 1 or len(indices) != 1 or dependent[0] not in raw:
        return None
    if node.target in QUOTIENTS and (indices[0] != 0 or node.kwargs.get("rounding_mode")):
        return None  # c / x, and a rounded quotient (as x // c), are no change of coordinates
    return indices[0]


def _folds(node: fx.Node, module: nn.Module | None, gm: fx.GraphModule) -> bool:
    # Folding treats the Conv/Linear and the BatchNorm after it as one layer,
    # which is right only when the BatchNorm is the only reader of its output.
    source = node.args[0] if node.args else None  # a call by keywords only
    return (
        isinstance(module, BATCHNORMS)
        and isinstance(source, fx.Node)
        and source.op == "call_module"
        and _layer_kind(gm.get_submodule(source.target)) is not None
        and len(source.users) == 1
    )


def _lookup_rule(node: fx.Node, module: nn.Module | None) -> Rule | None:
    if node.op == "call_module":
        return _module_rule(module)
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    if node.op == "call_function":
        fn = node.target
        name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"
        return FUNCTION_RULES.get(fn) or NAMED_FUNCTION_RULES.get(name)
    return None


class _Recorder(fx.Interpreter):
    """Runs the traced graph and keeps every node's value."""

    def __init__(self, graph: LRPGraph) -> None:
        super().__init__(graph.module)
        self.snapshot = graph.snapshot
        self.values: dict[fx.Node, object] = {}

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        # A value that a later in-place op overwrites is kept as it was made.
        self.values[n] = out.clone() if n in self.snapshot and torch.is_tensor(out) else out
        return out


def _record(model: nn.Module, graph: LRPGraph, x: torch.Tensor) -> dict[fx.Node, object]:
    recorder = _Recorder(graph)
    # The traced graph runs as the model's own forward, so that hooks on the
    # model (a beta-smoothing override among them) act as in model(x).
    own = model.__dict__.get("forward")
    object.__setattr__(model, "forward", recorder.run)
    try:
        model(x)
    finally:
        if own is None:
            del model.__dict__["forward"]
        else:
            object.__setattr__(model, "forward", own)
    return recorder.values


def _mapped_boxes(
    graph: LRPGraph, values: dict[fx.Node, object], options: dict, x: torch.Tensor
) -> dict[fx.Node, dict]:
    """The options of each first layer, with the z^B box mapped as the input was before it.

    The nodes before the first layers run on the box's corners in place of
    ``x``; each map there (normalisation, activation) is element-wise and
    monotone, so the two images bound what the layer sees.
    """
    try:
        # Copies: an in-place op before the first layer (relu_) must write neither
        # into a broadcast view nor into the caller's bounds.
        corners = [
            torch.broadcast_to(torch.as_tensor(options[k]).to(x), x.shape).clone()
            for k in ("low", "high")
        ]
    except RuntimeError:
        return {}  # _bound names bounds of the wrong shape
    images = []
    with torch.no_grad():
        for corner in corners:
            env: dict[fx.Node, object] = {graph.input: corner}
            for node in graph.module.graph.nodes:
                if node in graph.raw and node not in env:
                    env[node] = _evaluate(graph, node, env, values)
            images.append(env)
    boxes = {}
    for node in graph.first:
        source = node.args[0]
        if source is graph.input or source not in images[0]:
            continue
        lo, hi = images[0][source], images[1][source]
        boxes[node] = {**options, "low": torch.minimum(lo, hi), "high": torch.maximum(lo, hi)}
    return boxes


def _evaluate(
    graph: LRPGraph, node: fx.Node, env: dict[fx.Node, object], values: dict[fx.Node, object]
) -> object:
    """``node`` on the values of ``env`` where it has them, else on the recorded ones."""
    args, kwargs = (
        fx.node.map_arg(a, lambda n: env[n] if n in env else values[n])
        for a in (node.args, node.kwargs)
    )
    if node.op == "call_module":
        return graph.module.get_submodule(node.target).forward(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _load(arg: object, values: dict[fx.Node, object]) -> object:
    return fx.node.map_arg(arg, lambda n: values[n])


def _check_lrp_options(low: object, high: object, epsilon: object) -> None:
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            raise InputTypeError(
                f"lrp option {name!r} must be a float or a tensor broadcastable to x; "
                f"got {type(value).__name__}"
            )
        # The z^B rule multiplies the weights by the bounds: NaN or inf there
        # would make the whole map NaN without an error.
        if not bool(torch.isfinite(torch.as_tensor(value)).all()):
            raise InputError(
                f"lrp option {name!r} must be finite (a bound of the input domain); "
                f"got {_brief(value)}"
                + (" holding NaN or inf" if torch.is_tensor(value) and value.numel() > 1 else "")
            )
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
        raise InputError(f"lrp option 'epsilon' must be a float >= 0; got {epsilon!r}")
    try:
        torch.broadcast_shapes(_shape(low), _shape(high))
    except RuntimeError:
        raise InputError(
            f"lrp options 'low' of shape {_shape(low)} and 'high' of shape {_shape(high)} "
            "do not broadcast together; expected floats or tensors broadcastable to x, e.g. "
            "shape (1, C, 1, 1)"
        ) from None
    if bool((torch.as_tensor(low) >= torch.as_tensor(high).to(_device(low))).any()):
        raise InputError(
            f"lrp options must have low < high (the bounds of the input domain); "
            f"got low={_brief(low)}, high={_brief(high)}"
        )


def _device(value: object) -> torch.device:
    return value.device if torch.is_tensor(value) else torch.device("cpu")


def _shape(value: object) -> tuple[int, ...]:
    return tuple(torch.as_tensor(value).shape)


def _brief(value: object) -> str:
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(float(value)) if isinstance(value, torch.Tensor) else repr(value)


def _composite(composite: object, gamma: object) -> Composite:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
        raise InputError(f"lrp option 'gamma' must be a float >= 0; got {gamma!r}")
    if isinstance(composite, Composite):
        return composite
    if isinstance(composite, str) and composite in COMPOSITES:
        return COMPOSITES[composite]
    # Zennit names its composites in CamelCase: EpsilonPlusFlat is epsilon_plus_flat here.
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", composite).lower() if isinstance(composite, str) else ""
    named = f" (Zennit's {composite} is {snake!r} here)" if snake in COMPOSITES else ""
    raise InputError(
        f"unknown lrp composite {composite!r}{named}; expected a Composite or one of: "
        f"{', '.join(sorted(COMPOSITES))}"
    )


@register("lrp")
def lrp(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None,
    *,
    create_graph: bool = False,
    low: float | torch.Tensor = 0.0,
    high: float | torch.Tensor = 1.0,
    epsilon: float = 1e-6,
    composite: str | Composite = "epsilon_plus_box",
    gamma: float = 0.25,
) -> torch.Tensor:
    """Layer-wise relevance propagation: z^B first layer, z+ convolutions, epsilon dense layers.

    Relevance starts as the target's logit at the output and is passed back
    node by node through the traced model (see the module docstring for the
    rules). BatchNorm directly after a Conv/ConvTranspose/Linear is folded into it.
    Normalisation and attention layers (ViT, ConvNeXt, ``nn.TransformerEncoder``)
    take the rules of conservative propagation, attention weights and standard
    deviations held (:mod:`~betasmooth.explain.transformer`). On a
    beta-smoothed model the forward activations are those of the smoothed
    model (softplus); the rules are unchanged.

    Parameters
    ----------
    model : nn.Module
        A model that :func:`torch.fx.symbolic_trace` can trace.
    x : torch.Tensor
        Input batch.
    target : torch.Tensor or None
        Class per item; ``None`` for the predicted class.
    create_graph : bool
        Keep the graph: the map is then differentiable w.r.t. ``x`` through the
        rules' ratios, also on a plain ReLU network.
    low, high : float or torch.Tensor
        Bounds of the input domain for the z^B rule, e.g. ``(1, C, 1, 1)``
        tensors; the defaults 0 and 1 are those of [0, 1] images, and
        normalised images need their own (``data.low``, ``data.high`` of
        :func:`betasmooth.load_data`), which the command line passes itself.
        Per-channel bounds also reach a first dense layer that sees ``x``
        flattened. :func:`~betasmooth.explain` refuses an ``x`` that lies
        more than the box's width outside it (:data:`BOX_SLACK`): data of
        another range, most often normalised images with the default box.
    epsilon : float
        Stabiliser of the epsilon rule for dense layers.
    composite : str or Composite
        The rule of each layer with weights: ``epsilon_plus_box`` (the rules
        above, the default), Zennit's ``epsilon_gamma_box``,
        ``epsilon_plus_flat``, ``epsilon_alpha2_beta1``, ``epsilon_plus``,
        ``epsilon_alpha2_beta1_flat`` (:data:`COMPOSITES`), or a :class:`Composite`.
    gamma : float
        Weight of the positive part in the gamma rule.

    Returns
    -------
    torch.Tensor
        Relevance per input element, shaped like ``x``.

    Raises
    ------
    InputError
        If the model cannot be traced or contains a layer without a rule.

    Examples
    --------
    >>> import betasmooth as bs
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    >>> h = bs.explain(net, torch.rand(2, 1, 4, 4), "lrp", epsilon=1e-3)
    >>> h.shape
    torch.Size([2, 1, 4, 4])
    >>> h = bs.explain(net, torch.rand(2, 1, 4, 4), "lrp", composite="epsilon_gamma_box")
    """
    _check_lrp_options(low, high, epsilon)
    chosen = _composite(composite, gamma)
    model = _unwrapped(model)
    graph = lrp_graph(model)
    _check_unboxed(graph, chosen)
    if x.dtype in (torch.float16, torch.bfloat16):
        warn_user(
            f"lrp in {str(x.dtype).removeprefix('torch.')} keeps 3 digits of the sums it "
            "divides by, and where they cancel (residual additions, LayerNorm's centring) "
            "the map can be far off: on 4 of 12 small post-norm transformers it was 12 to "
            "72 times its norm away from float64's; "
            "explain a float32 copy (model.float()) for a map to trust",
            model,
        )
    options = {"low": low, "high": high, "epsilon": float(epsilon), "gamma": float(gamma)}
    modules = dict(graph.module.named_modules())
    # As the gradient methods: create_graph keeps the graph also under torch.no_grad().
    with torch.set_grad_enabled(create_graph):
        values = _record(model, graph, x if create_graph else x.detach())
        logits = values[graph.output]
        # Any node between the input and a first layer (a map, an index, a permute)
        # moves the box's coordinates with the input's.
        routed = any(n.args[0] is not graph.input for n in graph.first)
        boxes = _mapped_boxes(graph, values, options, x) if routed else {}
        logit, target = select_logit(logits, target)
        relevance = {
            graph.output: torch.zeros_like(logits).scatter(1, target[:, None], logit[:, None])
        }
        for node in reversed(graph.module.graph.nodes):
            r = relevance.pop(node, None)
            if r is None or node not in graph.rules:
                if node is graph.input:
                    if r is None:
                        return torch.zeros_like(x)
                    _check_amplification(model, r, logits, epsilon)
                    return r
                continue
            module = modules[node.target] if node.op == "call_module" else None
            layer, rule = None, graph.rules[node]
            args, kwargs = _load(node.args, values), _load(node.kwargs, values)
            kind = _layer_kind(module)
            if kind is not None:
                rule = chosen.rule(module, node in graph.first)
                layer = LAYERS[kind][0](module, *args[1:], **kwargs)
                if node in graph.folded:
                    layer = _folded(layer, modules[graph.folded[node]])
            step = _Step(node, module, args, kwargs, layer, boxes.get(node, options))
            for source, r_in in rule(step, r):
                if source in relevance:
                    relevance[source] = _add(relevance[source], r_in)
                else:
                    relevance[source] = r_in
    return torch.zeros_like(x)


#: Total |relevance| at the input over the image's largest |logit| above which lrp
#: warns. Over the explained logit, rules that conserve relevance keep it near 1 (0.7
#: to 6 on the built-in models and torchvision's VGG16 and ResNet-18, every
#: composite); beta-smoothed, those two reached 1e3 to 6e5 with the default epsilon.
#: The largest logit, not the explained one, so that a class of logit near 0 (the
#: relevance it conserves near 0 too) is no alarm.
AMPLIFIED = 100.0


def _check_amplification(
    model: nn.Module, relevance: torch.Tensor, logits: torch.Tensor, epsilon: float
) -> None:
    """Warn where relevance grew by dividing by sums near 0 (see :data:`AMPLIFIED`)."""
    with torch.no_grad():
        total = relevance.detach().abs().flatten(1).sum(1)
        scale = logits.detach().abs().flatten(1).amax(1).to(total.dtype)
        ratio = total / scale
    if bool((ratio > AMPLIFIED).any()):
        warn_user(
            f"lrp: the relevance at the input sums in absolute value to more than "
            f"{AMPLIFIED:g} times the largest logit (about 1 where the rules conserve "
            f"it): the stabiliser epsilon={epsilon:g} lets it grow where a dense layer's "
            "pre-activation or a residual addition's sum is near 0 but its unit still "
            "gets relevance (as a beta-smoothed network's softplus units do), and the map "
            "is a few spikes; a larger epsilon (lrp's option epsilon, 0.01 to 0.25; on the "
            "command line attack's or explain's --option lrp.epsilon=0.25, which a sweep of "
            "that attack takes, or --option beta_smooth.epsilon=0.25 where lrp is the base "
            "of beta_smooth, as smoothgrad.epsilon of smoothgrad) bounds it",
            model,
        )


# The z^B rule's box is the data's range (see range_options).
lrp.range_options = lambda low, high: {"low": low, "high": high}
# Bounds of shape (B, C, H, W) hold one box per image (see per_item_options).
lrp.per_item_options = frozenset({"low", "high"})
