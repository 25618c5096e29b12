"""LRP rules for the layers of transformers: normalisation and attention.

The rules are those of conservative propagation (CP-LRP, Ali et al. 2022,
"XAI for Transformers: Better Explanations through Conservative
Propagation"): the statistics that a normalisation divides by and the
attention weights are held constant, which leaves a linear map of the
signal, and the epsilon rule (``epsilon``) runs through it. With
``epsilon -> 0`` the map of a network made of these layers, linear layers
and element-wise activations is gradient times input of the same network
with the attention weights, the normalisers and the activations' gates
detached: the closed form the tests hold it to.

==========================================  ===============================================
layer                                       rule
==========================================  ===============================================
LayerNorm, GroupNorm (module or ``F.``)     epsilon rule of ``(x - mean) / sigma * w + b``,
                                            ``sigma`` held constant (Ali et al.'s LN-rule)
RMSNorm (module or ``F.``)                  relevance passes (``x / rms * w``, ``rms`` held)
``nn.MultiheadAttention``                   attention weights held (AH-rule): epsilon rule
                                            through value projection, ``A @ V`` and output
                                            projection; query and key get none
``softmax(...) @ v``, ``einsum``            epsilon rule of ``v -> A @ v``, ``A`` held
``F.scaled_dot_product_attention``          the same, ``A`` computed from ``q`` and ``k``
``x * c``, ``x / c`` by a constant          relevance passes (a layer scale)
``nn.TransformerEncoder(Layer)``            traced through (its fast path left out), so
                                            the rules above apply to its parts
torchvision's ``shifted_window_attention``  its softmaxes held, the epsilon rule of the
(Swin)                                      whole function as one affine map
==========================================  ===============================================

Relevance reaches neither the queries nor the keys, so the layers that only
compute them (``q @ k.T``, the softmax, a relative position bias, a scale)
need no rule. With ``epsilon -> 0`` the epsilon rule of a composition of
linear maps as one map equals the rule applied layer by layer, so Swin's
window attention also gets the AH-rule there.

Examples
--------
>>> import betasmooth as bs
>>> class Encoder(nn.Module):
...     def __init__(self) -> None:
...         super().__init__()
...         self.embed, self.norm = nn.Linear(4, 8), nn.LayerNorm(8)
...         self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
...         self.head = nn.Linear(8, 3)
...     def forward(self, x: torch.Tensor) -> torch.Tensor:
...         h = self.norm(self.embed(x))
...         h = h + self.attention(h, h, h, need_weights=False)[0]
...         return self.head(h.mean(1))
>>> bs.explain(Encoder(), torch.rand(2, 5, 4), "lrp", composite="epsilon_plus_flat").shape
torch.Size([2, 5, 4])
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from ..validate import InputError
from .propagation import (
    CALL_CHECKS,
    FACTORS,
    FORWARDS,
    FUNCTION_RULES,
    MODULE_RULES,
    NAMED_FUNCTION_RULES,
    PARTS,
    ROUTES,
    Factor,
    _epsilon_of,
    _first_arg,
    _gradient,
    _Layer,
    _one_arg,
    _pass,
    _Step,
    _vjp,
    stabilize,
)

__all__: list[str] = []  # rules enter the registries of propagation on import

Relevance = list[tuple[fx.Node, torch.Tensor]]


def _bind(signature: Callable, step: _Step, attributes: tuple[str, ...] = ()) -> dict:
    """The call's arguments by name; for a module, the input and then ``attributes`` of it
    (a LayerNorm's ``normalized_shape``, ...) where its function takes them as arguments."""
    if step.module is not None and attributes:
        return signature(step.args[0], *(getattr(step.module, name) for name in attributes))
    return signature(*step.args, **step.kwargs)


def _held_epsilon(
    linear: Callable[[torch.Tensor], torch.Tensor],
    shift: torch.Tensor | None,
    a: torch.Tensor,
    relevance: torch.Tensor,
    epsilon: float,
) -> torch.Tensor:
    """Epsilon rule of the affine map ``linear(a) + shift``: ``a * J^T (R / stab(z))``."""
    z = linear(a) if shift is None else linear(a) + shift
    return a * _vjp(linear, a, relevance / stabilize(z, epsilon))


def _normalised(
    a: torch.Tensor,
    relevance: torch.Tensor,
    epsilon: float,
    groups: Callable[[torch.Tensor], torch.Tensor],
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """The LN-rule: ``groups`` views ``a`` with one normalised group per row of its last axis."""
    sigma = (groups(a).var(-1, unbiased=False, keepdim=True) + eps).sqrt()

    def linear(t: torch.Tensor) -> torch.Tensor:
        g = groups(t)
        out = ((g - g.mean(-1, keepdim=True)) / sigma).reshape(t.shape)
        return out if scale is None else out * scale

    return _held_epsilon(linear, shift, a, relevance, epsilon)


def _layer_norm_args(
    input: torch.Tensor,
    normalized_shape: tuple[int, ...] | list[int] | int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> dict:
    return {"shape": normalized_shape, "weight": weight, "bias": bias, "eps": eps}


def _layer_norm_rule(step: _Step, relevance: torch.Tensor) -> Relevance:
    """LayerNorm with its standard deviation held: the epsilon rule of the centring map.

    ``R_i = x_i sum_j J_ji R_j / stab(y_j)`` with ``J`` the Jacobian of
    ``(x - mean(x)) / sigma * w`` at fixed ``sigma`` (Ali et al.'s LN-rule).
    """
    args = _bind(_layer_norm_args, step, ("normalized_shape", "weight", "bias", "eps"))
    a = step.args[0]
    shape = args["shape"]
    count = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    lead = a.shape[: a.dim() - count]
    r = _normalised(
        a,
        relevance,
        step.options["epsilon"],
        lambda t: t.reshape(*lead, -1),
        args["weight"],
        args["bias"],
        args["eps"],
    )
    return _first_arg(step, r)


def _group_norm_args(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> dict:
    return {"groups": num_groups, "weight": weight, "bias": bias, "eps": eps}


def _group_norm_rule(step: _Step, relevance: torch.Tensor) -> Relevance:
    """GroupNorm with each group's standard deviation held (the LN-rule per group)."""
    args = _bind(_group_norm_args, step, ("num_groups", "weight", "bias", "eps"))
    a = step.args[0]
    per_channel = (1, -1) + (1,) * (a.dim() - 2)
    weight, bias = args["weight"], args["bias"]
    r = _normalised(
        a,
        relevance,
        step.options["epsilon"],
        lambda t: t.reshape(t.shape[0], args["groups"], -1),
        None if weight is None else weight.view(per_channel),
        None if bias is None else bias.view(per_channel),
        args["eps"],
    )
    return _first_arg(step, r)


def _rms_norm_rule(step: _Step, relevance: torch.Tensor) -> Relevance:
    """RMSNorm, ``x / rms(x) * w`` with ``rms`` held: an element-wise scaling, through which
    relevance passes (``R = x c R / (x c)``). Unlike an activation's, the z^B box does not
    pass through it: ``rms`` is of each input."""
    return _pass(step, relevance)


# --------------------------------------------------------------------------- attention


def _attended_values(
    weights: torch.Tensor, values: torch.Tensor, relevance: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """Epsilon rule of ``v -> weights @ v``."""
    return _held_epsilon(lambda t: torch.matmul(weights, t), None, values, relevance, epsilon)


def _attention_rule(index: int, step: _Step, relevance: torch.Tensor) -> Relevance:
    """``A @ v`` (or ``einsum(eq, A, v)``) with ``A`` from a softmax: the epsilon rule of
    ``v -> A @ v``, ``A`` held (Ali et al.'s AH-rule); ``index`` is the argument that
    holds ``v``."""
    values = step.args[index]
    r = _held_epsilon(
        lambda t: step.call(t, index), None, values, relevance, step.options["epsilon"]
    )
    return [(step.node.args[index], r)]


#: What may stand between a softmax and the product it weights: a dropout, or a
#: rearrangement of the weights (``A.transpose(-2, -1)``, a reshape for ``bmm``).
_THROUGH_FUNCTIONS = frozenset(
    {F.dropout, torch.transpose, torch.permute, torch.reshape, torch.swapaxes, torch.flatten}
)
_THROUGH_METHODS = frozenset(
    {"transpose", "permute", "reshape", "view", "contiguous", "swapaxes", "flatten"}
)


def _is_attention(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` is attention weights: a softmax, perhaps through a dropout or a
    rearrangement."""
    while True:
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.Softmax):
                return True
            if not isinstance(module, (nn.Dropout, nn.Identity)):
                return False
        elif node.op == "call_function" and node.target in (F.softmax, torch.softmax):
            return True
        elif node.op == "call_method" and node.target == "softmax":
            return True
        elif not (
            (node.op == "call_function" and node.target in _THROUGH_FUNCTIONS)
            or (node.op == "call_method" and node.target in _THROUGH_METHODS)
        ):
            return False
        source = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(source, fx.Node):
            return False
        node = source


def _sdpa_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> dict:
    return {
        "query": query,
        "key": key,
        "value": value,
        "mask": attn_mask,
        "causal": is_causal,
        "scale": scale,
        "gqa": enable_gqa,
        "dropout": dropout_p,
    }


def _sdpa_weights(args: dict) -> torch.Tensor:
    """The attention weights of ``F.scaled_dot_product_attention``, as its docs define them."""
    q, k = args["query"], args["key"]
    if args["gqa"]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
    scale = args["scale"] if args["scale"] is not None else q.shape[-1] ** -0.5
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale
    length, source = q.shape[-2], k.shape[-2]
    if args["causal"]:
        keep = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    mask = args["mask"]
    if mask is not None:
        logits = (
            logits.masked_fill(~mask, float("-inf"))
            if mask.dtype == torch.bool
            else (logits + mask)
        )
    return logits.softmax(-1)


def _check_sdpa_call(node: fx.Node) -> None:
    """Refuse attention that drops weights in evaluation: no held weights are the ones
    the forward pass drew at random. The trace fixes ``self.training`` and with it
    ``dropout_p``, a number here."""
    p = _sdpa_args(*node.args, **node.kwargs)["dropout"]
    if isinstance(p, (int, float)) and p > 0:
        raise InputError(
            "lrp holds the attention weights of scaled_dot_product_attention, but the model "
            f"calls it with dropout_p={p:g} when it is evaluated (node {node.name!r}); "
            "expected dropout_p=0 outside training (dropout_p=p if self.training else 0.0)"
        )


def _scaled_dot_product_attention_rule(step: _Step, relevance: torch.Tensor) -> Relevance:
    """``F.scaled_dot_product_attention``: the attention weights held, relevance to the values."""
    args = _bind(_sdpa_args, step)
    weights, values = _sdpa_weights(args), args["value"]
    if args["gqa"]:
        repeat = weights.shape[-3] // values.shape[-3]
        r = _attended_values(
            weights, values.repeat_interleave(repeat, -3), relevance, step.options["epsilon"]
        )
        r = r.unflatten(-3, (values.shape[-3], repeat)).sum(-3)
    else:
        r = _attended_values(weights, values, relevance, step.options["epsilon"])
    return [(_value_node(step.node), r)]


class _Softmaxes(TorchFunctionMode):
    """Records the softmaxes computed inside a function, or gives back recorded ones in
    their order in place of computing them: the function with its attention held."""

    def __init__(self, held: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.held, self.seen = held, []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func not in _SOFTMAXES:
            return func(*args, **kwargs)
        if self.held is None:
            out = func(*args, **kwargs)
            self.seen.append(out)
            return out
        if len(self.seen) == len(self.held):
            raise InputError(
                "lrp holds the softmaxes of a function with attention, but it computed more "
                f"than the {len(self.held)} it did on the recorded input; expected a function "
                "whose softmaxes do not depend on its input's values"
            )
        out = self.held[len(self.seen)]
        self.seen.append(out)
        return out


_SOFTMAXES = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax})


def _held_softmax_rule(step: _Step, relevance: torch.Tensor) -> Relevance:
    """A function that computes attention inside (Swin's ``shifted_window_attention``):
    its softmaxes held, it is an affine map of its first argument, whose epsilon rule
    this is, as one map. With ``epsilon -> 0`` that is the AH-rule layer by layer."""
    a = step.args[0]
    with _Softmaxes() as recorded:
        z = step.call(a)

    def held(t: torch.Tensor) -> torch.Tensor:
        with _Softmaxes(recorded.seen):
            return step.call(t)

    s = relevance / stabilize(z, step.options["epsilon"])
    return _first_arg(step, a * _vjp(held, a, s))


def _value_node(node: fx.Node) -> object:
    return node.kwargs["value"] if "value" in node.kwargs else node.args[2]


def _mha_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> dict:
    return {
        "query": query,
        "key": key,
        "value": value,
        "key_padding_mask": key_padding_mask,
        "attn_mask": attn_mask,
        "is_causal": is_causal,
    }


def _multihead_attention_rule(step: _Step, relevance: tuple) -> Relevance:
    """``nn.MultiheadAttention`` with its attention weights held (Ali et al.'s AH-rule).

    The epsilon rule runs layer by layer through the output projection, the
    weighted sum of the values (``A`` held) and the value projection, whose
    bias (and ``bias_v``, a zero attention) absorbs its share. The query and
    key get no relevance.
    """
    mha, epsilon = step.module, step.options["epsilon"]
    args = _bind(_mha_args, step)
    value = args.pop("value")
    if value.dim() != 3:
        raise InputError(
            "lrp needs nn.MultiheadAttention on batched inputs (3 dimensions); got "
            f"a value of shape {tuple(value.shape)}"
        )
    _, weights = mha.forward(
        value=value, need_weights=True, average_attn_weights=False, **args
    )  # (N, heads, L, S), the weights of the forward pass
    v = value if mha.batch_first else value.transpose(0, 1)
    n, embed = v.shape[0], mha.embed_dim  # the value's own width may be vdim
    heads, width = mha.num_heads, mha.head_dim
    v_weight = mha.in_proj_weight[2 * embed :] if mha._qkv_same_embed_dim else mha.v_proj_weight
    v_bias = None if mha.in_proj_bias is None else mha.in_proj_bias[2 * embed :]
    projected = F.linear(v, v_weight, v_bias)
    extra = []
    if mha.bias_v is not None:
        extra.append(mha.bias_v.reshape(1, 1, embed).expand(n, 1, embed))
    if mha.add_zero_attn:
        extra.append(projected.new_zeros(n, 1, embed))

    def split(t: torch.Tensor) -> torch.Tensor:  # (N, S, E) -> (N, heads, S, width)
        return t.unflatten(-1, (heads, width)).transpose(1, 2)

    def attend(t: torch.Tensor) -> torch.Tensor:  # (N, S, E) -> (N, L, E)
        return torch.matmul(weights, split(torch.cat([t, *extra], 1))).transpose(1, 2).flatten(2)

    out_r = relevance[0] if mha.batch_first else relevance[0].transpose(0, 1)
    mixed = attend(projected)
    out = _Layer(F.linear, mha.out_proj.weight, mha.out_proj.bias)
    r = _epsilon_of(out, mixed, out_r, epsilon)
    r = _held_epsilon(attend, None, projected, r, epsilon)
    r = _epsilon_of(_Layer(F.linear, v_weight, v_bias), v, r, epsilon)
    return [(_value_node(step.node), r if mha.batch_first else r.transpose(0, 1))]


def _value_route(node: fx.Node, rule: Callable) -> list[object]:
    return [_value_node(node)]


def _encoder_layer_forward(
    layer: nn.TransformerEncoderLayer,
    src: torch.Tensor,
    src_mask: torch.Tensor | None = None,
    src_key_padding_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """``nn.TransformerEncoderLayer.forward`` without its fast path, which torch.fx cannot
    trace: the same function, from the same submodules."""
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal))
    return layer.norm2(x + layer._ff_block(x))


def _encoder_forward(
    encoder: nn.TransformerEncoder,
    src: torch.Tensor,
    mask: torch.Tensor | None = None,
    src_key_padding_mask: torch.Tensor | None = None,
    is_causal: bool | None = None,
) -> torch.Tensor:
    """``nn.TransformerEncoder.forward`` without its fast path (nested tensors)."""
    out = src
    for layer in encoder.layers:
        out = layer(
            out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal)
        )
    return out if encoder.norm is None else encoder.norm(out)


MATMULS: frozenset[object] = frozenset(
    {operator.matmul, torch.matmul, torch.bmm, torch.einsum, "matmul", "bmm"}
)

MODULE_RULES.update(
    {
        nn.LayerNorm: _layer_norm_rule,
        nn.GroupNorm: _group_norm_rule,
        nn.MultiheadAttention: _multihead_attention_rule,
    }
)
FUNCTION_RULES.update(
    {
        F.layer_norm: _layer_norm_rule,
        F.group_norm: _group_norm_rule,
        F.scaled_dot_product_attention: _scaled_dot_product_attention_rule,
    }
)
if hasattr(nn, "RMSNorm"):
    MODULE_RULES[nn.RMSNorm] = _rms_norm_rule
if hasattr(F, "rms_norm"):
    FUNCTION_RULES[F.rms_norm] = _rms_norm_rule
NAMED_FUNCTION_RULES.update(
    {
        "torchvision.models.swin_transformer.shifted_window_attention": _held_softmax_rule,
        "torchvision.models.swin_transformer._patch_merging_pad": _gradient,
    }
)
CALL_CHECKS[_scaled_dot_product_attention_rule] = _check_sdpa_call
PARTS[_multihead_attention_rule] = (
    frozenset({0}),
    "the attention weights; the logits may use attention(...)[0] only",
)
FORWARDS.update(
    {nn.TransformerEncoderLayer: _encoder_layer_forward, nn.TransformerEncoder: _encoder_forward}
)
FACTORS.append(
    Factor(MATMULS, _is_attention, lambda index: functools.partial(_attention_rule, index))
)
ROUTES.update(
    {
        _attention_rule: _one_arg,
        _multihead_attention_rule: _value_route,
        _scaled_dot_product_attention_rule: _value_route,
    }
)
