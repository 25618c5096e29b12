"""LRP rules beyond z^B, z+ and epsilon, and Zennit's named composites built from them.

Each rule is written in plain torch operations on the recorded input ``a``
of a layer ``z = layer(a, w, b)``, as Zennit's rule of the same name
(stabiliser :data:`~betasmooth.explain.propagation.STABILIZER`, as Zennit's):

=================  ==============================================================  ===============
rule               relevance of the input                                         zennit
=================  ==============================================================  ===============
``gamma``          weights ``w + gamma w+`` where ``z > 0``, ``w + gamma w-``     ``Gamma``
                   where ``z < 0`` (the generalised rule, negative inputs too)
``alpha2_beta1``   ``2 R(positive contributions) - R(negative contributions)``    ``AlphaBeta``
``flat``           input and weights set to one, bias to zero                     ``Flat``
``w_square``       input set to one, weights (and bias) squared                   ``WSquare``
=================  ==============================================================  ===============

Composites (``bs.explain(model, x, "lrp", composite=NAME)``), all with the
epsilon rule in dense layers after the first:

==============================  =====================  ================  ======================
composite                       first layer            convolutions      zennit
==============================  =====================  ================  ======================
``epsilon_plus_box`` (default)  z^B (Conv or Linear)   z+                (none)
``epsilon_gamma_box``           z^B (Conv only)        gamma (0.25)      ``EpsilonGammaBox``
``epsilon_plus``                as the others          z+                ``EpsilonPlus``
``epsilon_plus_flat``           flat (Conv or Linear)  z+                ``EpsilonPlusFlat``
``epsilon_alpha2_beta1``        as the others          alpha2-beta1      ``EpsilonAlpha2Beta1``
``epsilon_alpha2_beta1_flat``   flat (Conv or Linear)  alpha2-beta1      ``EpsilonAlpha2Beta1Flat``
==============================  =====================  ================  ======================

"Conv" and "convolutions" include the transposed ones (``ConvTranspose1d/2d/3d``), as
Zennit's ``types.Convolution`` does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn

from ..validate import InputError
from .propagation import (
    COMPOSITES,
    RULES,
    STABILIZER,
    Composite,
    _epsilon,
    _first_arg,
    _Layer,
    _Step,
    _vjp,
    _zbox,
    _zplus,
    stabilize,
)

__all__ = ["alpha_beta"]

Relevance = list[tuple[fx.Node, torch.Tensor]]
# Zennit's types.Convolution: its composites give transposed convolutions the rules of the others.
CONVOLUTIONS = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d
)  # fmt: skip


def _back(layer: _Layer, weight: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``s`` sent back through the layer with weights ``weight``: ``W^T s``."""
    return _vjp(lambda t: layer.fn(t, weight, None), a, s)


def _split(
    layer: _Layer, a: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, ...]:
    # The part of z made by positive inputs through w_a (with bias) and negative
    # inputs through w_b; the negative half is skipped where there is none.
    a_pos, a_neg = a.clamp(min=0), a.clamp(max=0)
    z = layer.fn(a_pos, w_a, bias)
    if bool(a.lt(0).any()):
        z = z + layer.fn(a_neg, w_b, None)
    return z, a_pos, a_neg


def _share(
    layer: _Layer,
    a: torch.Tensor,
    w_a: torch.Tensor,
    w_b: torch.Tensor,
    bias: torch.Tensor | None,
    relevance: torch.Tensor,
) -> torch.Tensor:
    """Relevance of positive inputs through ``w_a`` and negative ones through ``w_b``."""
    z, a_pos, a_neg = _split(layer, a, w_a, w_b, bias)
    s = relevance / stabilize(z, STABILIZER)
    return a_pos * _back(layer, w_a, a, s) + a_neg * _back(layer, w_b, a, s)


def _part(t: torch.Tensor | None, positive: bool) -> torch.Tensor | None:
    if t is None:
        return None
    return t.clamp(min=0) if positive else t.clamp(max=0)


def _gamma(step: _Step, relevance: torch.Tensor) -> Relevance:
    """Generalised gamma rule (zennit ``Gamma``); ``gamma`` is the lrp option."""
    layer, a, gamma = step.layer, step.args[0], step.options["gamma"]
    w, b = layer.weight, layer.bias

    def lifted(t: torch.Tensor | None, positive: bool) -> torch.Tensor | None:
        return None if t is None else t + gamma * _part(t, positive)

    z = layer.fn(a, w, b)
    up, down = lifted(w, True), lifted(w, False)
    r_pos = _share(layer, a, up, down, lifted(b, True), relevance * z.gt(0).to(z))
    r_neg = _share(layer, a, down, up, lifted(b, False), relevance * z.lt(0).to(z))
    return _first_arg(step, r_pos + r_neg)


def alpha_beta(alpha: float, beta: float) -> Callable:
    """The alpha-beta rule (zennit ``AlphaBeta(alpha, beta)``), ``alpha - beta = 1``.

    Examples
    --------
    >>> composite = Composite({nn.Conv2d: alpha_beta(3.0, 2.0), nn.Linear: "epsilon"})
    """
    if not (alpha >= 0 and beta >= 0 and alpha - beta == 1):
        raise InputError(
            f"alpha-beta needs alpha, beta >= 0 and alpha - beta = 1; got {alpha}, {beta}"
        )

    def rule(step: _Step, relevance: torch.Tensor) -> Relevance:
        layer, a = step.layer, step.args[0]
        w_pos, w_neg = layer.weight.clamp(min=0), layer.weight.clamp(max=0)
        r_pos = _share(layer, a, w_pos, w_neg, _part(layer.bias, True), relevance)
        r_neg = _share(layer, a, w_neg, w_pos, _part(layer.bias, False), relevance)
        return _first_arg(step, alpha * r_pos - beta * r_neg)

    rule.__doc__ = f"alpha-beta rule, alpha {alpha:g}, beta {beta:g} (zennit ``AlphaBeta``)."
    return rule


def _from_ones(
    step: _Step, relevance: torch.Tensor, weight: torch.Tensor, bias: object
) -> Relevance:
    layer, a = step.layer, step.args[0]
    z = layer.fn(torch.ones_like(a), weight, bias)
    return _first_arg(step, _back(layer, weight, a, relevance / stabilize(z, STABILIZER)))


def _flat(step: _Step, relevance: torch.Tensor) -> Relevance:
    """Flat rule (zennit ``Flat``): relevance spread evenly over each output's receptive field."""
    return _from_ones(step, relevance, torch.ones_like(step.layer.weight), None)


def _w_square(step: _Step, relevance: torch.Tensor) -> Relevance:
    """w^2 rule (zennit ``WSquare``): relevance in proportion to the squared weights."""
    bias = step.layer.bias
    return _from_ones(step, relevance, step.layer.weight**2, None if bias is None else bias**2)


RULES.update(
    {"gamma": _gamma, "alpha2_beta1": alpha_beta(2.0, 1.0), "flat": _flat, "w_square": _w_square}
)

_DENSE = {nn.Linear: _epsilon}
_ANY_LAYER = (*CONVOLUTIONS, nn.Linear)
COMPOSITES.update(
    {
        "epsilon_gamma_box": Composite({CONVOLUTIONS: _gamma, **_DENSE}, {CONVOLUTIONS: _zbox}),
        "epsilon_plus": Composite({CONVOLUTIONS: _zplus, **_DENSE}),
        "epsilon_plus_flat": Composite({CONVOLUTIONS: _zplus, **_DENSE}, {_ANY_LAYER: _flat}),
        "epsilon_alpha2_beta1": Composite({CONVOLUTIONS: RULES["alpha2_beta1"], **_DENSE}),
        "epsilon_alpha2_beta1_flat": Composite(
            {CONVOLUTIONS: RULES["alpha2_beta1"], **_DENSE}, {_ANY_LAYER: _flat}
        ),
    }
)
