"""LRP of transformer layers (CP-LRP) against its closed form and hand computations.

With ``epsilon -> 0`` every rule is LRP-0 of a linear map, and LRP-0 through
linear maps and pass-through activations is gradient times input of the
network whose attention weights, normalisers and activation gates are
detached (Ali et al. 2022). :func:`cp_lrp` computes that with plain autograd
on the unmodified model, with torch's own functions patched for the duration.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import betasmooth as bs
from betasmooth.explain.propagation import Composite
from betasmooth.validate import InputError

tv = pytest.importorskip("torchvision")

# LRP-0 everywhere, the first layer included: the closed form's setting.
LRP0 = Composite(
    layers={(nn.Conv2d, nn.Linear): "epsilon"}, first={(nn.Conv2d, nn.Linear): "epsilon"}
)


@pytest.fixture
def no_stabiliser(monkeypatch):
    """The sums' and pools' stabiliser off, so that every rule is exactly LRP-0."""
    monkeypatch.setattr(sys.modules["betasmooth.explain.propagation"], "STABILIZER", 1e-300)


def _layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(shape), 0))
    sigma = (x.var(dims, unbiased=False, keepdim=True) + eps).sqrt().detach()
    y = (x - x.mean(dims, keepdim=True)) / sigma
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def _group_norm(x, groups, weight=None, bias=None, eps=1e-5):
    g = x.reshape(x.shape[0], groups, -1)
    sigma = (g.var(-1, unbiased=False, keepdim=True) + eps).sqrt().detach()
    y = ((g - g.mean(-1, keepdim=True)) / sigma).reshape(x.shape)
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    y = y if weight is None else y * weight.view(per_channel)
    return y if bias is None else y + bias.view(per_channel)


def _rms_norm(x, shape, weight=None, eps=None):
    dims = tuple(range(-len(shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x / (x.square().mean(dims, keepdim=True) + eps).sqrt().detach()
    return y if weight is None else y * weight


def _gelu(x, approximate="none"):
    return x * (0.5 * (1 + torch.erf(x / math.sqrt(2)))).detach()


def _attention(self, query, key, value, key_padding_mask=None, need_weights=True,
               attn_mask=None, average_attn_weights=True, is_causal=False):  # fmt: skip
    """nn.MultiheadAttention from its weights, the attention weights detached."""
    embed, heads = self.embed_dim, self.num_heads
    if not self.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    w, b = self.in_proj_weight, self.in_proj_bias
    q = F.linear(query, w[:embed], b[:embed])
    k = F.linear(key, w[embed : 2 * embed], b[embed : 2 * embed])
    v = F.linear(value, w[2 * embed :], b[2 * embed :])

    def split(t):
        return t.unflatten(-1, (heads, embed // heads)).transpose(1, 2)

    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(embed // heads)
    if key_padding_mask is not None:  # boolean, or additive as torch's encoder makes it
        padding = key_padding_mask[:, None, None, :]
        if padding.dtype == torch.bool:
            padding = torch.zeros_like(padding, dtype=logits.dtype).masked_fill(padding, -math.inf)
        logits = logits + padding
    if attn_mask is not None:  # (L, S), boolean or additive
        is_bool = attn_mask.dtype == torch.bool
        logits = logits.masked_fill(attn_mask, -math.inf) if is_bool else logits + attn_mask
    weights = logits.softmax(-1).detach()
    out = self.out_proj((weights @ split(v)).transpose(1, 2).flatten(2))
    return (out if self.batch_first else out.transpose(0, 1)), None


_TANH, _SIGMOID, _SOFTMAX = torch.tanh, torch.sigmoid, F.softmax


def _tanh(x):
    return x * (_TANH(x) / x).detach()


def _silu(x, inplace=False):
    return x * _SIGMOID(x).detach()


def _gate(x):
    # Every sigmoid of these models is a squeeze-and-excitation gate.
    return _SIGMOID(x).detach()


def _softmax(x, dim=None, **options):
    return _SOFTMAX(x, dim=dim, **options).detach()


PATCHES = [
    (F, "layer_norm", _layer_norm),
    (F, "group_norm", _group_norm),
    (F, "rms_norm", _rms_norm),
    (F, "gelu", _gelu),
    (F, "silu", _silu),
    (F, "softmax", _softmax),
    (torch, "tanh", _tanh),
    (torch, "sigmoid", _gate),
    (nn.MultiheadAttention, "forward", _attention),
]


@contextlib.contextmanager
def _detached():
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in PATCHES]
    for owner, name, patch in PATCHES:
        setattr(owner, name, patch)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def cp_lrp(model, x, target, **forward):
    """Gradient times input of ``model`` with the CP-LRP detachments."""
    x = x.clone().requires_grad_(True)
    with _detached():
        out = model(x, **forward)
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), x)
    return x.detach() * grad


def _assert_cp_lrp(model, x, target, **forward):
    ours = bs.explain(model, x, "lrp", target, composite=LRP0, epsilon=0.0)
    expected = cp_lrp(model, x, target, **forward)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-13)
    assert expected.abs().amax() > 1e-6
    return ours


def _assert_held(net, twin, x, target):
    """LRP-0 of ``net`` is gradient times input of ``twin``, which detaches its attention."""
    ours = bs.explain(net, x, "lrp", target, composite=LRP0, epsilon=0.0)
    torch.testing.assert_close(ours, cp_lrp(twin, x, target), rtol=1e-9, atol=1e-13)


def _vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    )  # fmt: skip
    # torchvision zero-initialises the head: every map would be 0.
    nn.init.normal_(vit.heads.head.weight)
    return vit.double().eval()


def test_lrp_of_torchvisions_vision_transformer_is_cp_lrp(no_stabiliser):
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    _assert_cp_lrp(_vit(), x, torch.tensor([0, 3, 4]))


def test_lrp_of_torchvisions_convnext_is_cp_lrp(no_stabiliser):
    # LayerNorm2d (F.layer_norm between permutes), nn.LayerNorm on channels last,
    # the layer scale (a parameter times x) and stochastic depth.
    from torchvision.models import convnext

    torch.manual_seed(1)
    blocks = [convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 1)]
    net = convnext.ConvNeXt(blocks, num_classes=5, layer_scale=0.5).double().eval()
    for block in net.modules():
        if isinstance(block, convnext.CNBlock):  # else it is one constant for every channel
            nn.init.normal_(block.layer_scale)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    _assert_cp_lrp(net, x, torch.tensor([1, 2, 4]))


def test_lrp_of_torchvisions_maxvit_is_cp_lrp(no_stabiliser):
    # Relative-position attention written with einsum, a scaled key, swapaxes window
    # partitions, squeeze-and-excitation gates, SiLU, Tanh in the head.
    torch.manual_seed(9)
    net = tv.models.MaxVit(
        input_size=(16, 16), stem_channels=8, partition_size=2, block_channels=[8, 16],
        block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=5,
    )  # fmt: skip
    for bn in net.modules():
        # LRP passes relevance through a BatchNorm after no Conv (MBConv's pre-norm);
        # gradient times input sees its affine map: the two agree where it is the identity.
        if isinstance(bn, nn.BatchNorm2d):
            nn.init.ones_(bn.weight)
            nn.init.zeros_(bn.bias)
            bn.running_mean.zero_()
            bn.running_var.fill_(1 - bn.eps)
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    _assert_cp_lrp(net.double().eval(), x, torch.tensor([0, 2, 4]))


class _Encoder(nn.Module):
    """Tokens through an embedding, nn.MultiheadAttention with a residual, GroupNorm, a head."""

    def __init__(self, batch_first: bool = True, norm: str = "layer") -> None:
        super().__init__()
        torch.manual_seed(2)
        self.batch_first = batch_first
        self.embed = nn.Linear(4, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.norm = nn.LayerNorm(8) if norm == "layer" else nn.GroupNorm(2, 6)  # tokens
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x)
        t = h if self.batch_first else h.transpose(0, 1)
        a = self.attention(t, t, t, key_padding_mask=mask, need_weights=False)[0]
        h = h + (a if self.batch_first else a.transpose(0, 1))
        h = self.norm(h)
        h = h + self.mlp(h)
        return self.head(h.mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm", ["layer", "group"])
def test_lrp_of_multihead_attention_and_norms_is_cp_lrp(no_stabiliser, batch_first, norm):
    net = _Encoder(batch_first, norm).double().eval()
    x = torch.rand(3, 6, 4, dtype=torch.float64)
    _assert_cp_lrp(net, x, torch.tensor([0, 2, 1]))


class _Masked(_Encoder):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padding where the input says so: the mask depends on x, but only the
        # attention weights read it, so it needs no rule.
        return super().forward(x, x[:, :, 0] > 0.7)


def test_lrp_of_multihead_attention_keeps_the_key_padding_mask(no_stabiliser):
    net = _Masked().double().eval()
    x = torch.rand(3, 5, 4, dtype=torch.float64)
    _assert_cp_lrp(net, x, torch.tensor([0, 2, 1]))


class _Handwritten(nn.Module):
    """Attention as timm writes it: one qkv projection, a scaled softmax, a dropout."""

    def __init__(self, fused: bool = False, detach: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fused, self.detach = fused, detach
        self.qkv = nn.Linear(4, 24)
        self.drop = nn.Dropout(0.1)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.scale = 0.5  # sdpa's default, 1 / sqrt(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused and not self.detach:
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            logits = (q @ k.transpose(-2, -1)) * self.scale
            if self.fused:
                logits = logits.masked_fill(~torch.ones(length, length).tril().bool(), -math.inf)
            attn = logits.softmax(dim=-1)
            h = self.drop(attn.detach() if self.detach else attn) @ v
        h = self.proj(h.transpose(1, 2).reshape(n, length, 8))
        return self.head(F.gelu(h).mean(1))


@pytest.mark.parametrize("fused", [False, True], ids=["softmax-matmul", "sdpa-causal"])
def test_lrp_of_handwritten_attention_holds_the_softmax_weights(no_stabiliser, fused):
    # q @ k.T, the scale and the softmax carry no relevance, so they need no rule.
    net = _Handwritten(fused).double().eval()
    twin = _Handwritten(fused, detach=True).double().eval()
    x = torch.rand(3, 6, 4, dtype=torch.float64)
    target = torch.tensor([2, 0, 1])
    ours = bs.explain(net, x, "lrp", target, composite=LRP0, epsilon=0.0)
    torch.testing.assert_close(net(x), twin(x))
    torch.testing.assert_close(ours, cp_lrp(twin, x, target), rtol=1e-9, atol=1e-13)


def _epsilon_rule(a, weight, bias, relevance, epsilon):
    z = F.linear(a, weight, bias)
    stab = z + epsilon * torch.where(z >= 0, 1.0, -1.0).double()
    return a * ((relevance / stab) @ weight)


def test_epsilon_of_layer_norm_and_attention_by_hand():
    # One token mixer and one LayerNorm, each with epsilon 0.2, written out: the
    # LN-rule with sigma held and the AH-rule, layer by layer. The attack differentiates
    # the map: sigma and the weights are held in the rule, not in its derivative, so the
    # hand formula's autograd derivative is the oracle for create_graph's.
    torch.manual_seed(4)
    embed, norm, mix, head = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 2)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.norm, self.mix, self.head = embed, norm, mix, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.embed(x))  # (N, 5, 4)
            weights = (self.mix(h) @ h.transpose(1, 2)).softmax(-1)  # (N, 5, 5)
            return self.head((weights @ h).sum(1))

    net = Net().double().eval()
    x = torch.rand(2, 5, 3, dtype=torch.float64).requires_grad_(True)
    target = torch.tensor([1, 0])
    eps = 0.2
    composite = Composite(layers={nn.Linear: "epsilon"}, first={nn.Linear: "epsilon"})
    ours = bs.explain(net, x, "lrp", target, composite=composite, epsilon=eps, create_graph=True)

    e = F.linear(x, embed.weight, embed.bias)
    sigma = (e.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    h = norm(e)
    w = (net.mix(h) @ h.transpose(1, 2)).softmax(-1)
    mixed = w @ h
    pooled = mixed.sum(1)
    logits = F.linear(pooled, head.weight, head.bias)
    r = torch.zeros_like(logits).scatter(1, target[:, None], logits.gather(1, target[:, None]))
    r = _epsilon_rule(pooled, head.weight, head.bias, r, eps)
    stab = pooled + 1e-6 * torch.where(pooled >= 0, 1.0, -1.0).double()
    r = mixed * (r / stab)[:, None, :]  # the sum over tokens: in proportion
    # AH-rule: R_h = h * W^T (R / stab(W h)).
    stab = mixed + eps * torch.where(mixed >= 0, 1.0, -1.0).double()
    r = h * (w.transpose(1, 2) @ (r / stab))
    # LN-rule: y = (e - mean e) / sigma * g + b; R_e = e * (u - mean u), u = g s / sigma.
    stab = h + eps * torch.where(h >= 0, 1.0, -1.0).double()
    u = norm.weight * (r / stab) / sigma
    r = e * (u - u.mean(-1, keepdim=True))
    expected = _epsilon_rule(x, embed.weight, embed.bias, r, eps)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-14)
    v = torch.rand(2, 5, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (grad,) = torch.autograd.grad((ours * v).sum(), x)
    (want,) = torch.autograd.grad((expected * v).sum(), x)
    torch.testing.assert_close(grad, want, rtol=1e-9, atol=1e-13)


def test_epsilon_of_multihead_attention_by_hand():
    # The AH-rule with epsilon 0.2 layer by layer: output projection, A @ V, value projection.
    torch.manual_seed(4)
    embed, head = nn.Linear(4, 8), nn.Linear(8, 3)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    nn.init.normal_(mha.in_proj_bias)
    nn.init.normal_(mha.out_proj.bias)
    net = nn.Sequential(embed, _SelfAttention(mha), _Summed(), head).double().eval()
    x = torch.rand(2, 5, 4, dtype=torch.float64)
    target, eps = torch.tensor([1, 2]), 0.2
    composite = Composite(layers={nn.Linear: "epsilon"}, first={nn.Linear: "epsilon"})
    ours = bs.explain(net, x, "lrp", target, composite=composite, epsilon=eps)

    def split(t):
        return t.unflatten(-1, (2, 4)).transpose(1, 2)

    with torch.no_grad():
        h = embed(x)
        out, w = mha(h, h, h, average_attn_weights=False)
        wv, bv = mha.in_proj_weight[16:], mha.in_proj_bias[16:]
        pv = F.linear(h, wv, bv)
        mixed = (w @ split(pv)).transpose(1, 2).flatten(2)
        pooled = out.sum(1)
        logits = head(pooled)
        r = torch.zeros_like(logits).scatter(1, target[:, None], logits.gather(1, target[:, None]))
        r = _epsilon_rule(pooled, head.weight, head.bias, r, eps)
        stab = pooled + 1e-6 * torch.where(pooled >= 0, 1.0, -1.0).double()
        r = out * (r / stab)[:, None, :]  # the sum over tokens: in proportion
        r = _epsilon_rule(mixed, mha.out_proj.weight, mha.out_proj.bias, r, eps)
        stab = mixed + eps * torch.where(mixed >= 0, 1.0, -1.0).double()
        r = pv * (w.transpose(-2, -1) @ split(r / stab)).transpose(1, 2).flatten(2)
        r = _epsilon_rule(h, wv, bv, r, eps)
        expected = _epsilon_rule(x, embed.weight, embed.bias, r, eps)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-14)


class _SelfAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mha(h, h, h, need_weights=False)[0]


def test_epsilon_of_swins_window_attention_by_hand():
    # shifted_window_attention is one affine map with its softmaxes held; its epsilon
    # rule, with epsilon 0.2, stabilises the function's output: R_x = x * J^T (R / stab(z)),
    # J the Jacobian with the softmax held (detached below).
    from torchvision.models import swin_transformer

    torch.manual_seed(5)
    attention = swin_transformer.ShiftedWindowAttention(4, [2, 2], [1, 1], 2)
    head = nn.Linear(4, 3)
    net = nn.Sequential(attention, nn.Flatten(1, 2), _Summed(), head).double().eval()
    x = torch.rand(2, 4, 4, 4, dtype=torch.float64)
    target = torch.tensor([2, 0])
    eps = 0.2
    composite = Composite(layers={nn.Linear: "epsilon"}, first={nn.Linear: "epsilon"})
    ours = bs.explain(net, x, "lrp", target, composite=composite, epsilon=eps)

    softmax = F.softmax
    xg = x.clone().requires_grad_(True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "softmax", lambda *args, **kwargs: softmax(*args, **kwargs).detach())
        z = attention(xg)
    with torch.no_grad():
        pooled = z.flatten(1, 2).sum(1)
        logits = F.linear(pooled, head.weight, head.bias)
        r = torch.zeros_like(logits).scatter(1, target[:, None], logits.gather(1, target[:, None]))
        r = _epsilon_rule(pooled, head.weight, head.bias, r, eps)
        stab = pooled + 1e-6 * torch.where(pooled >= 0, 1.0, -1.0).double()
        r = z * (r / stab)[:, None, None, :]  # the sum over tokens: in proportion
        stab = z + eps * torch.where(z >= 0, 1.0, -1.0).double()
    (vjp,) = torch.autograd.grad(z, xg, r / stab)
    torch.testing.assert_close(ours, x * vjp, rtol=1e-10, atol=1e-14)


class _Summed(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(1)


def test_rms_norm_passes_relevance(no_stabiliser):
    if not hasattr(nn, "RMSNorm"):
        pytest.skip("torch without nn.RMSNorm")
    torch.manual_seed(5)
    first, second = nn.Linear(4, 6), nn.Linear(6, 3)
    rms = nn.RMSNorm(6)
    nn.init.normal_(rms.weight)
    net = nn.Sequential(first, nn.ReLU(), rms, second).double().eval()
    x = torch.rand(4, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 1])
    ours = bs.explain(net, x, "lrp", target, composite=LRP0, epsilon=0.0)
    # x / rms(x) * w with rms held is an element-wise scaling: LRP-0 passes R through.
    with torch.no_grad():
        a = torch.relu(first(x))
        y = rms(a)
        logits = second(y)
        r = torch.zeros_like(logits).scatter(1, target[:, None], logits.gather(1, target[:, None]))
        r = _epsilon_rule(y, second.weight, second.bias, r, 0.0)
        expected = _epsilon_rule(x, first.weight, first.bias, r, 0.0)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-13)


GAIN = (2.0, -0.5, 3.0)


class _Scaled(nn.Module):
    """A per-channel layer scale ``h * gain / 4`` after the first layer, or folded into the head."""

    def __init__(self, folded: bool) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.conv = nn.Conv2d(1, 3, 3)
        self.head = nn.Linear(12, 2)
        self.register_buffer("gain", torch.tensor(GAIN).view(3, 1, 1))
        self.folded = folded
        if folded:
            with torch.no_grad():
                self.head.weight.mul_(torch.tensor(GAIN).repeat_interleave(4) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if not self.folded:
            h = h * self.gain / 4
        return self.head(F.avg_pool2d(h, 2, 1).flatten(1))


def test_a_constant_scale_after_the_first_layer_passes_relevance(no_stabiliser):
    # A layer scale folded into the next layer's weights gives the same map.
    net, twin = _Scaled(False).double().eval(), _Scaled(True).double().eval()
    x = torch.rand(3, 1, 5, 5, dtype=torch.float64)
    target = torch.tensor([0, 1, 1])
    torch.testing.assert_close(net(x), twin(x))
    ours = bs.explain(net, x, "lrp", target, epsilon=0.0)
    expected = bs.explain(twin, x, "lrp", target, epsilon=0.0)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0


class _Cumulative(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, 1)


class _BlockedValue(_Handwritten):
    """Attention whose values pass a function without a rule: refused."""

    def __init__(self) -> None:
        super().__init__()
        self.cumulative = _Cumulative()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (torch.cumsum(q, 2) @ k.transpose(-2, -1)).softmax(-1)
        h = (attn @ self.cumulative(v)).transpose(1, 2).reshape(n, length, 8)
        return self.head(h.mean(1))


def test_a_blocker_on_the_values_is_refused_one_on_the_queries_is_not():
    with pytest.raises(InputError) as err:
        bs.explain(_BlockedValue(), torch.rand(2, 6, 4), "lrp")
    message = str(err.value)
    # The cumsum on the queries is not named: no relevance reaches it.
    assert message.startswith("lrp has no rule for function cumsum in module cumulative"), message
    assert "(also" not in message


def test_lrp_of_torchvisions_swin_transformer_is_cp_lrp(no_stabiliser):
    # shifted_window_attention is one function, explained with its softmax held;
    # shifted windows (a roll and a mask) in the second block, patch merging between.
    torch.manual_seed(13)
    net = tv.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2, 1], num_heads=[2, 2], window_size=[2, 2],
        num_classes=3, stochastic_depth_prob=0.0,
    ).double().eval()  # fmt: skip
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    _assert_cp_lrp(net, x, torch.tensor([0, 2, 1]))


def _swin():
    torch.manual_seed(14)
    return tv.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2], num_heads=[2], window_size=[2, 2],
        num_classes=3,
    ).double().eval()  # fmt: skip


# The ratios of the epsilon rule curve the map strongly: on the ViT at a step of 1e-6
# the finite difference is still off by 2e-4 (relative), at 1e-8 by 6e-8.
@pytest.mark.parametrize(
    ("build", "size", "step", "rtol"),
    [(_vit, 32, 1e-8, 1e-6), (_swin, 8, 1e-7, 1e-5)],
    ids=["vit", "swin"],
)
def test_lrp_of_a_transformer_is_differentiable_for_the_attack(build, size, step, rtol):
    # The map is smooth in x (no ReLU): create_graph's derivative against a
    # central finite difference.
    net = build()
    gen = torch.Generator().manual_seed(7)
    x, v, u = torch.rand(3, 2, 3, size, size, generator=gen, dtype=torch.float64)
    target = torch.tensor([1, 2])
    xg = x.clone().requires_grad_(True)
    h = bs.explain(net, xg, "lrp", target, create_graph=True, composite="epsilon_plus_flat")
    (grad,) = torch.autograd.grad((h * (v - 0.5)).sum(), xg)

    def f(z):
        return (bs.explain(net, z, "lrp", target, composite="epsilon_plus_flat") * (v - 0.5)).sum()

    numeric = (f(x + step * (u - 0.5)) - f(x - step * (u - 0.5))) / (2 * step)
    analytic = (grad * (u - 0.5)).sum()
    assert analytic.abs() > 1e-4
    torch.testing.assert_close(analytic, numeric, rtol=rtol, atol=1e-12)


class _TorchEncoder(nn.Module):
    """Tokens through torch's own nn.TransformerEncoder, whose fast path fx cannot trace."""

    def __init__(self, norm_first: bool, activation: str | nn.Module, padding: bool) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.embed = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(
            8, 2, 16, dropout=0.1, activation=activation, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(
            layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False
        )
        self.head = nn.Linear(8, 3)
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x[:, :, 0] > 0.8 if self.padding else None
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=mask)[:, 0])


@pytest.mark.parametrize(
    ("norm_first", "activation", "padding"),
    # nn.GELU, not "gelu": the layer keeps F.gelu itself, which the oracle cannot detach.
    [(False, "relu", False), (True, nn.GELU(), True), (False, "relu", True)],
    ids=["post-norm-relu", "pre-norm-gelu-padding", "post-norm-relu-padding"],
)
def test_lrp_of_torchs_transformer_encoder_is_cp_lrp(
    no_stabiliser, norm_first, activation, padding
):
    net = _TorchEncoder(norm_first, activation, padding).double().eval()
    x = torch.rand(3, 6, 4, dtype=torch.float64)
    _assert_cp_lrp(net, x, torch.tensor([2, 0, 1]))


class _MaskedEncoder(nn.Module):
    """nn.TransformerEncoder given an attention mask (causal, as a float mask of -inf)."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.embed = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(
            8, 2, 16, dropout=0.1, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.head(self.encoder(self.embed(x), mask=mask)[:, 1])


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_lrp_of_torchs_transformer_encoder_keeps_its_attention_mask(no_stabiliser, norm_first):
    net = _MaskedEncoder(norm_first).double().eval()
    x = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    ours = _assert_cp_lrp(net, x, torch.tensor([2, 0, 1]))
    # The second token attends to the first two only: the later ones get no relevance.
    assert ours[:, 2:].abs().amax() == 0


# --------------------------------------------------------------------------- options


def _mha_by_hand(mha, query, key, value, key_padding_mask=None, attn_mask=None):
    """nn.MultiheadAttention written out from its parameters, the attention weights detached."""
    embed, heads = mha.embed_dim, mha.num_heads
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq = bk = bv = None
    if mha.in_proj_bias is not None:
        bq, bk, bv = mha.in_proj_bias.chunk(3)
    q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
    n = q.shape[0]
    pad = key_padding_mask
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.expand(n, 1, embed)], 1)
        v = torch.cat([v, mha.bias_v.expand(n, 1, embed)], 1)
        pad = None if pad is None else F.pad(pad, (0, 1))
    if mha.add_zero_attn:
        k, v = (torch.cat([t, t.new_zeros(n, 1, embed)], 1) for t in (k, v))
        pad = None if pad is None else F.pad(pad, (0, 1))

    def split(t):
        return t.unflatten(-1, (heads, embed // heads)).transpose(1, 2)

    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(embed // heads)
    if attn_mask is not None:
        mask = F.pad(attn_mask, (0, logits.shape[-1] - attn_mask.shape[-1]))
        logits = logits.masked_fill(mask, -math.inf) if mask.dtype == torch.bool else logits + mask
    if pad is not None:
        logits = logits.masked_fill(pad[:, None, None, :], -math.inf)
    weights = logits.softmax(-1).detach()
    out = mha.out_proj((weights @ split(v)).transpose(1, 2).flatten(2))
    return out if mha.batch_first else out.transpose(0, 1)


class _Options(nn.Module):
    """Cross attention (separate query, key and value inputs) with nn.MultiheadAttention's options;
    ``by_hand`` computes it with :func:`_mha_by_hand` instead."""

    def __init__(self, by_hand=False, kdim=8, vdim=8, mask=None, padding=False, causal=False,
                 **options):  # fmt: skip
        super().__init__()
        torch.manual_seed(8)
        self.by_hand, self.mask, self.padding, self.causal = by_hand, mask, padding, causal
        self.q, self.k, self.v = nn.Linear(4, 8), nn.Linear(4, kdim), nn.Linear(4, vdim)
        self.attention = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=vdim, **options)
        for name, p in self.attention.named_parameters():
            if "bias" in name:  # torch initialises the projections' biases to zero
                nn.init.normal_(p)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if not self.attention.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        pad = x[:, :, 0] > 0.8 if self.padding else None
        if self.by_hand:
            out = _mha_by_hand(self.attention, q, k, v, pad, self.mask)
        else:
            out = self.attention(
                q, k, v, key_padding_mask=pad, attn_mask=self.mask, is_causal=self.causal
            )[0]
        if not self.attention.batch_first:
            out = out.transpose(0, 1)
        return self.head(out.mean(1))


_CAUSAL = torch.ones(5, 5, dtype=torch.bool).triu(1)
_FLOAT_MASK = torch.randn(5, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
MHA_OPTIONS = {
    "biases": {},
    "kdim": {"kdim": 6},
    "vdim": {"kdim": 6, "vdim": 7 * 2},
    "no-bias": {"bias": False, "kdim": 6, "vdim": 6},
    "bias-kv-zero-attn-seq-first": {
        "add_bias_kv": True,
        "add_zero_attn": True,
        "batch_first": False,
    },
    "bias-kv-padding": {"add_bias_kv": True, "padding": True},
    "zero-attn-float-mask": {"add_zero_attn": True, "mask": _FLOAT_MASK},
    "causal": {"mask": _CAUSAL, "causal": True, "add_bias_kv": True},
}


@pytest.mark.parametrize("options", MHA_OPTIONS.values(), ids=MHA_OPTIONS)
def test_lrp_of_multihead_attention_options_is_cp_lrp(no_stabiliser, options):
    options = {"batch_first": True, **options}
    net, twin = _Options(**options).double().eval(), _Options(True, **options).double().eval()
    x = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    torch.testing.assert_close(net(x), twin(x))
    target = torch.tensor([0, 2, 1])
    ours = bs.explain(net, x, "lrp", target, composite=LRP0, epsilon=0.0)
    expected = cp_lrp(twin, x, target)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-13)
    assert expected.abs().amax() > 1e-4


class _Twice(_Encoder):
    """nn.MultiheadAttention's output read twice (relevance from two readers of its tuple,
    whose weights are None), and torch.sum over the tokens."""

    def forward(self, x):
        h = self.embed(x)
        out = self.attention(h, h, h, need_weights=False)
        h = self.norm(h + out[0] + 0.5 * out[0])
        return self.head(torch.sum(h + self.mlp(h), 1))


def test_lrp_of_multihead_attention_read_twice_and_torch_sum(no_stabiliser):
    net = _Twice().double().eval()
    for name, p in net.attention.named_parameters():
        if "bias" in name:
            nn.init.normal_(p)
    x = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    _assert_cp_lrp(net, x, torch.tensor([2, 0, 1]))


def _sdpa_by_hand(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The attention of F.scaled_dot_product_attention by its docs, the weights detached."""
    if enable_gqa:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, -3), v.repeat_interleave(repeat, -3)
    logits = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        logits = logits.masked_fill(torch.ones(logits.shape[-2:]).tril() == 0, -math.inf)
    if attn_mask is not None:
        logits = (
            logits.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool
            else logits + attn_mask
        )  # fmt: skip
    return logits.softmax(-1).detach() @ v


class _Fused(nn.Module):
    def __init__(self, by_hand=False, heads=2, kv_heads=2, keys=None, **options):
        super().__init__()
        torch.manual_seed(12)
        self.by_hand, self.heads, self.kv_heads, self.options = by_hand, heads, kv_heads, options
        self.keys = keys  # the number of tokens the keys and values come from: all, or the first
        self.q, self.k = nn.Linear(4, 4 * heads), nn.Linear(4, 4 * kv_heads)
        self.v = nn.Linear(4, 4 * kv_heads)
        self.head = nn.Linear(4 * heads, 3)

    def forward(self, x):
        n, length, _ = x.shape
        q = self.q(x).reshape(n, length, self.heads, 4).transpose(1, 2)
        source = x[:, : self.keys]
        k = self.k(source).reshape(n, -1, self.kv_heads, 4).transpose(1, 2)
        v = self.v(source).reshape(n, -1, self.kv_heads, 4).transpose(1, 2)
        attend = _sdpa_by_hand if self.by_hand else F.scaled_dot_product_attention
        h = attend(q, k, v, **self.options)
        return self.head(h.transpose(1, 2).reshape(n, length, -1).mean(1))


_KEEP = torch.rand(5, 5, generator=torch.Generator().manual_seed(13)) > 0.4
_KEEP[:, 0] = True
SDPA_OPTIONS = {
    "bool-mask": {"attn_mask": _KEEP},
    "float-mask": {"attn_mask": _FLOAT_MASK.view(1, 1, 5, 5).expand(1, 2, 5, 5)},
    "scale": {"scale": 0.3},
    "scale-zero": {"scale": 0.0},  # uniform weights: a scale of 0 is not sdpa's default
    "causal-fewer-keys": {"keys": 3, "is_causal": True},  # the mask is (L, S), not (L, L)
    "gqa": {"heads": 4, "kv_heads": 2, "enable_gqa": True},
    "gqa-causal-scale": {
        "heads": 6,
        "kv_heads": 2,
        "enable_gqa": True,
        "is_causal": True,
        "scale": 0.7,
    },  # fmt: skip
}


@pytest.mark.parametrize("options", SDPA_OPTIONS.values(), ids=SDPA_OPTIONS)
def test_lrp_of_scaled_dot_product_attention_options_is_cp_lrp(no_stabiliser, options):
    net, twin = _Fused(**options).double().eval(), _Fused(True, **options).double().eval()
    x = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    torch.testing.assert_close(net(x), twin(x))
    target = torch.tensor([1, 2, 0])
    _assert_held(net, twin, x, target)


def test_lrp_of_scaled_dot_product_attention_with_a_float32_additive_mask(no_stabiliser):
    # In float32 the additive mask is still added, not taken for a boolean one.
    mask = _FLOAT_MASK.float().view(1, 1, 5, 5)
    net, twin = _Fused(attn_mask=mask).eval(), _Fused(True, attn_mask=mask).eval()
    x = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(14))
    target = torch.tensor([1, 2, 0])
    ours = bs.explain(net, x, "lrp", target, composite=LRP0, epsilon=0.0)
    torch.testing.assert_close(ours, cp_lrp(twin, x, target), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("given", [{"dropout_p": 0.25}, {"dropout_p": 0.0}, {}])
def test_lrp_refuses_attention_that_drops_weights_when_evaluated(given):
    # dropout_p given outside training draws other weights at every call: the map of one
    # draw is no explanation of the model, and no held weights are those it used. The
    # model check refuses it before any map, as the command line runs it.
    from betasmooth.explain import check_model

    net = _Fused(**given).double().eval()
    if not given.get("dropout_p"):
        check_model(net, "lrp", composite=LRP0)
        return
    said = (
        r"^lrp holds the attention weights of scaled_dot_product_attention, but the model "
        r"calls it with dropout_p=0\.25 when it is evaluated \(node "
        r"'scaled_dot_product_attention'\); expected dropout_p=0 outside training "
        r"\(dropout_p=p if self\.training else 0\.0\)$"
    )
    with pytest.raises(InputError, match=said):
        check_model(net, "lrp", composite=LRP0)
    x = torch.rand(2, 5, 4, dtype=torch.float64)
    with pytest.raises(InputError, match=said):
        bs.explain(net, x, "lrp", torch.tensor([0, 1]), composite=LRP0)


class _Spelled(nn.Module):
    """Hand-written attention spelled in other ways: F.softmax, nn.Softmax, Tensor.matmul,
    values on the left of the weights (``v^T @ A`` with a softmax over the keys' axis -2)."""

    def __init__(self, spelling, detach=False):
        super().__init__()
        torch.manual_seed(15)
        self.spelling, self.detach = spelling, detach
        self.qkv, self.head = nn.Linear(4, 24), nn.Linear(8, 3)
        self.softmax = nn.Softmax(-1)

    def forward(self, x):
        n, length, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        if self.spelling == "values-left":
            a = (k @ q.transpose(-2, -1)).softmax(-2)
            h = v.transpose(-2, -1) @ (a.detach() if self.detach else a)
            h = h.transpose(-2, -1)
        else:
            softmax = {"F.softmax": F.softmax, "torch.softmax": torch.softmax,
                       "nn.Softmax": lambda t, dim: self.softmax(t)}[self.spelling]  # fmt: skip
            a = softmax(q @ k.transpose(-2, -1), -1)
            h = (a.detach() if self.detach else a).matmul(v)
        return self.head(h.transpose(1, 2).reshape(n, length, 8).mean(1))


@pytest.mark.parametrize("spelling", ["F.softmax", "torch.softmax", "nn.Softmax", "values-left"])
def test_lrp_of_attention_spelled_otherwise_holds_the_weights(no_stabiliser, spelling):
    net = _Spelled(spelling).double().eval()
    twin = _Spelled(spelling, detach=True).double().eval()
    x = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    target = torch.tensor([2, 0, 1])
    _assert_held(net, twin, x, target)


class _Norms(nn.Module):
    """LayerNorm over two axes and GroupNorm, with their own eps and biases; F.rms_norm;
    F.layer_norm and F.group_norm with torch's default eps, a list and a torch.Size shape."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(17)
        self.embed = nn.Linear(4, 60)
        self.layer = nn.LayerNorm((5, 6), eps=0.7)
        self.group = nn.GroupNorm(2, 4, eps=0.4)
        self.rms = nn.Parameter(torch.randn(6, dtype=torch.float64))
        self.shift = nn.Parameter(torch.randn(6, dtype=torch.float64))
        for p in [*self.layer.parameters(), *self.group.parameters()]:
            nn.init.normal_(p)
        self.head = nn.Linear(60, 3)

    def forward(self, x):
        n = x.shape[0]
        h = self.layer(self.embed(x).view(n, 2, 5, 6))
        h = F.layer_norm(h, [5, 6]) + F.layer_norm(h, h.shape[-1:], self.rms, self.shift)
        g = self.group(h.reshape(n, 4, 5, 3))
        g = F.group_norm(g, 2, self.group.bias, self.group.weight)
        if hasattr(F, "rms_norm"):
            g = F.rms_norm(g.reshape(n, 2, 5, 6), (6,), self.rms, 1e-6)
        return self.head(g.flatten(1))


def test_lrp_of_norms_keeps_their_eps_and_all_normalised_axes(no_stabiliser):
    net = _Norms().double().eval()
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    patch = {}
    if hasattr(F, "rms_norm"):

        def rms(x, shape, weight=None, eps=None):
            dims = tuple(range(-len(shape), 0))
            return x / (x.pow(2).mean(dims, keepdim=True) + eps).sqrt().detach() * weight

        patch["rms_norm"] = rms
    saved = {name: getattr(F, name) for name in patch}
    for name, fn in patch.items():
        setattr(F, name, fn)
    try:
        expected = cp_lrp(net, x, torch.tensor([0, 1, 2]))
    finally:
        for name, fn in saved.items():
            setattr(F, name, fn)
    ours = bs.explain(net, x, "lrp", torch.tensor([0, 1, 2]), composite=LRP0, epsilon=0.0)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-13)


class _CrossBlocked(nn.Module):
    """nn.MultiheadAttention whose query or value passes a function without a rule."""

    def __init__(self, where):
        super().__init__()
        torch.manual_seed(19)
        self.where = where
        self.embed, self.attention = nn.Linear(4, 8), nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        q = torch.cumsum(h, 1) if self.where == "query" else h
        v = torch.cumsum(h, 1) if self.where == "value" else h
        return self.head(self.attention(q, h, v, need_weights=False)[0].mean(1))


def test_a_blocker_on_multihead_attentions_value_is_refused_on_its_query_not(no_stabiliser):
    with pytest.raises(InputError, match=r"^lrp has no rule for function cumsum"):
        bs.explain(_CrossBlocked("value").double(), torch.rand(2, 5, 4, dtype=torch.float64), "lrp")
    x = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    _assert_cp_lrp(_CrossBlocked("query").double().eval(), x, torch.tensor([0, 1, 2]))


class _Keywords(nn.Module):
    """Attention called by keywords only: F.scaled_dot_product_attention, nn.MultiheadAttention."""

    def __init__(self, by_hand=False):
        super().__init__()
        torch.manual_seed(21)
        self.by_hand = by_hand
        self.qkv, self.head = nn.Linear(4, 24), nn.Linear(8, 3)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        n, length, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        if self.by_hand:
            h = _sdpa_by_hand(q, k, v, is_causal=True)
        else:
            h = F.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=True)
        h = h.transpose(1, 2).reshape(n, length, 8)
        return self.head(self.attention(query=h, key=h, value=h, need_weights=False)[0].mean(1))


def test_lrp_of_attention_called_by_keywords(no_stabiliser):
    net, twin = _Keywords().double().eval(), _Keywords(True).double().eval()
    x = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    _assert_held(net, twin, x, target)


class _KeywordProduct(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.first(x)
        return self.head(torch.mul(h, other=torch.tanh(h)))  # no layer scale: h * tanh(h)


def test_a_product_with_a_computed_keyword_factor_is_no_layer_scale():
    with pytest.raises(InputError, match=r"^lrp has no rule for function mul"):
        bs.explain(_KeywordProduct(), torch.rand(2, 4), "lrp")


class _Rearranged(nn.Module):
    """Attention whose weights are transposed, or reshaped for bmm, before they weight v:
    by the method, or by ``torch.transpose`` (its input positional or by keyword) and a view.
    """

    def __init__(self, how: str, detach: bool = False) -> None:
        super().__init__()
        torch.manual_seed(10)
        self.how, self.detach = how, detach
        self.qkv, self.head = nn.Linear(4, 24), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (k @ q.transpose(-2, -1)).softmax(dim=-2)  # keys along rows
        attn = attn.detach() if self.detach else attn
        if self.how == "transposed":
            h = (v.transpose(-2, -1) @ attn).transpose(-2, -1)  # v on the left
        else:
            if self.how == "reshaped-bmm":
                weights = attn.transpose(-2, -1).reshape(n * 2, length, length)
            elif self.how == "torch.transpose":
                weights = torch.transpose(attn, -2, -1).contiguous().view(n * 2, length, length)
            elif self.how == "torch.transpose(input=)":
                weights = torch.transpose(input=attn, dim0=-2, dim1=-1)
                weights = weights.contiguous().view(n * 2, length, length)
            elif self.how == "permute-flatten-dropout":
                weights = F.dropout(attn.permute(0, 1, 3, 2).flatten(0, 1), 0.1, self.training)
            elif self.how == "torch.permute-torch.flatten":
                weights = torch.flatten(torch.permute(attn, (0, 1, 3, 2)), 0, 1)
            else:  # swapaxes
                weights = torch.reshape(torch.swapaxes(attn, -2, -1), (n * 2, length, length))
                weights = weights.swapaxes(-2, -1).swapaxes(-1, -2)
            if self.how == "permute-flatten-dropout":  # the product as a method, then matmul
                h = weights.bmm(v.reshape(n * 2, length, 4)).view(n, 2, length, 4)
            elif self.how == "swapaxes":
                h = torch.matmul(weights, v.reshape(n * 2, length, 4)).view(n, 2, length, 4)
            else:
                h = torch.bmm(weights, v.reshape(n * 2, length, 4)).view(n, 2, length, 4)
        return self.head(h.transpose(1, 2).reshape(n, length, 8).mean(1))


@pytest.mark.parametrize(
    "how",
    [
        "transposed",
        "reshaped-bmm",
        "torch.transpose",
        "torch.transpose(input=)",
        "permute-flatten-dropout",
        "torch.permute-torch.flatten",
        "swapaxes",
    ],
)
def test_lrp_holds_attention_weights_through_a_transpose_or_reshape(no_stabiliser, how):
    net, twin = _Rearranged(how).double().eval(), _Rearranged(how, True).double().eval()
    x = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    _assert_held(net, twin, x, torch.tensor([1, 0, 2]))


def test_lrp_holds_attention_weights_through_an_identity(no_stabiliser):
    # nn.Identity between the softmax and the product (timm's attn_drop when its rate is 0)
    # keeps them attention weights, as a dropout does.
    net, twin = _Handwritten().double().eval(), _Handwritten(detach=True).double().eval()
    net.drop = twin.drop = nn.Identity()
    x = torch.rand(3, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _assert_held(net, twin, x, torch.tensor([2, 0, 1]))


class _Unbatched(nn.Module):
    """nn.MultiheadAttention on one sequence ``(L, E)``, without a batch axis."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.attention = nn.MultiheadAttention(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x[0])
        return self.head(self.attention(h, h, h, need_weights=False)[0].mean(0, keepdim=True))


def test_lrp_of_multihead_attention_on_an_unbatched_value_is_refused_by_name():
    with pytest.raises(
        InputError, match=r"^lrp needs nn.MultiheadAttention on batched inputs \(3 dimensions\); "
        r"got a value of shape \(5, 8\)"
    ):  # fmt: skip
        bs.explain(_Unbatched().double().eval(), torch.rand(1, 5, 4, dtype=torch.float64), "lrp", 0)


class _WeightsUsed(nn.Module):
    """nn.MultiheadAttention whose returned weights also feed the logits, or are only returned."""

    def __init__(self, used: bool) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.used = used
        self.embed = nn.Linear(4, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head, self.weights = nn.Linear(8, 3), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        out, weights = self.attention(h, h, h, need_weights=True)
        logits = self.head((h + out).mean(1))
        return logits + self.weights(weights.mean(1)) if self.used else logits


def test_attention_weights_that_feed_the_logits_are_refused(no_stabiliser):
    # The AH-rule holds them constant: the relevance of that path would vanish unsaid.
    with pytest.raises(
        InputError, match=r"^lrp holds part 1 of module MultiheadAttention \(attention\) constant"
    ):
        bs.explain(_WeightsUsed(True), torch.rand(2, 5, 4), "lrp")
    # need_weights=True alone is fine: the weights are computed, not used.
    _assert_cp_lrp(_WeightsUsed(False).double().eval(), torch.rand(3, 5, 4, dtype=torch.float64),
                   torch.tensor([0, 1, 2]))  # fmt: skip


class _MyEncoderLayer(nn.TransformerEncoderLayer):
    """A subclass that keeps the base class's forward (and its untraceable fast path)."""


def test_a_subclass_of_transformer_encoder_layer_is_traced_as_its_base():
    base = _TorchEncoder(False, "relu", False).double().eval()
    sub = copy.deepcopy(base)
    for i, layer in enumerate(sub.encoder.layers):
        mine = _MyEncoderLayer(8, 2, 16, batch_first=True).double()
        mine.load_state_dict(layer.state_dict())
        sub.encoder.layers[i] = mine
    x = torch.rand(3, 6, 4, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    torch.testing.assert_close(
        bs.explain(sub.eval(), x, "lrp", target), bs.explain(base, x, "lrp", target),
        rtol=1e-12, atol=1e-15,
    )  # fmt: skip


@pytest.mark.parametrize(
    "norm",
    [nn.LayerNorm([3, 6, 6]), nn.GroupNorm(1, 3)]
    + ([nn.RMSNorm([3, 6, 6])] if hasattr(nn, "RMSNorm") else []),
    ids=lambda m: type(m).__name__,
)
def test_the_box_rule_after_a_norm_on_the_input_is_refused(norm, no_stabiliser):
    # A norm's output has no bounds that follow from the input's box: the z^B rule
    # got the box collapsed to low == high, a map unrelated to the layer's input.
    net = nn.Sequential(norm, nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    net = net.double().eval()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(InputError, match=r"^lrp's z\^B rule needs the bounds of what its first "):
        bs.explain(net, x, "lrp")
    with pytest.raises(InputError, match=r"before it maps the input's box to none \(node '_0'\)"):
        bs.explain(net, x, "lrp", composite="epsilon_gamma_box")
    # Composites without a box explain it: LRP-0 is CP-LRP's closed form there too.
    _assert_cp_lrp(net, x, torch.tensor([0, 1]))


class _PostNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu",
                                           batch_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)
        # One of the draws (4 of 12 seeds) whose bfloat16 map is far from float64's.
        torch.manual_seed(106)
        for linear in self.modules():
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_lrp_in_bfloat16_warns_that_cancelling_sums_lose_their_digits():
    import warnings

    net = _PostNorm().eval()
    x = torch.rand(4, 5, 4)  # the draw after the weights'
    exact = bs.explain(copy.deepcopy(net).double(), x.double(), "lrp", 0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        half = bs.explain(copy.deepcopy(net).bfloat16(), x.bfloat16(), "lrp", 0)
        single = bs.explain(net, x, "lrp", 0)
    messages = [str(w.message) for w in seen]
    assert sum(m.startswith("lrp in bfloat16 keeps 3 digits of the sums") for m in messages) == 1
    assert not any("float32" in m and m.startswith("lrp in float32") for m in messages)
    # What it warns of: float32 is close to float64, bfloat16 is not.
    assert (single.double() - exact).norm() / exact.norm() < 1e-3
    assert (half.double() - exact).norm() / exact.norm() > 1


class _BySize(nn.Module):
    """A sum over tokens divided by their number, as a mean written out."""

    def __init__(self, written: bool) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.written = written
        self.embed, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))
        return self.head(h.sum(1) / h.shape[1] if self.written else h.mean(1))


def test_a_division_by_a_size_is_a_scaling(no_stabiliser):
    x = torch.rand(3, 5, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    ours = bs.explain(_BySize(True).double().eval(), x, "lrp", target, epsilon=0.0)
    expected = bs.explain(_BySize(False).double().eval(), x, "lrp", target, epsilon=0.0)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-14)


class _Rounded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.div(self.first(x), 0.5, rounding_mode="floor"))


def test_a_rounded_quotient_is_no_scaling():
    with pytest.raises(InputError, match=r"^lrp has no rule for function div"):
        bs.explain(_Rounded(), torch.rand(2, 4), "lrp")


_CALLS = []


def _flaky_attention(h: torch.Tensor) -> torch.Tensor:
    """Attention that computes one more softmax on each call than on the one before."""
    _CALLS.append(1)
    weights = (h @ h.transpose(-2, -1)).softmax(-1)
    for _ in range(len(_CALLS) - 1):
        weights = weights.softmax(-1)
    return weights @ h


torch.fx.wrap("_flaky_attention")


class _Flaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_flaky_attention(self.embed(x)).mean(1))


def test_held_softmaxes_refuse_a_function_that_computes_more_of_them(monkeypatch):
    from betasmooth.explain.propagation import NAMED_FUNCTION_RULES

    held = NAMED_FUNCTION_RULES["torchvision.models.swin_transformer.shifted_window_attention"]
    monkeypatch.setitem(NAMED_FUNCTION_RULES, f"{__name__}._flaky_attention", held)
    _CALLS.clear()
    with pytest.raises(
        InputError,
        match=r"^lrp holds the softmaxes of a function with attention, but it computed more "
        r"than the \d+ it did on the recorded input",
    ):
        bs.explain(_Flaky(), torch.rand(2, 3, 4), "lrp", composite="epsilon_plus_flat")
