"""LRP against zennit, conservation, differentiability and bad input."""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import SpecialFirstLayerMapComposite, layer_map_base
from zennit.layer import Sum
from zennit.rules import Epsilon, ZBox, ZPlus
from zennit.types import Convolution

import betasmooth as bs
from betasmooth.explain import check_method_input, check_model
from betasmooth.explain.propagation import AMPLIFIED, Composite, lrp_graph
from betasmooth.validate import InputError
from nets import ResidualNet, residual_net, vgg_small


def zennit_lrp(net, x, target, low=0.0, high=1.0, epsilon=1e-6, canonizers=None):
    """ZBox first layer, ZPlus convolutions, Epsilon dense layers; output relevance = logit."""
    composite = SpecialFirstLayerMapComposite(
        layer_map=layer_map_base() + [(Convolution, ZPlus()), (nn.Linear, Epsilon(epsilon))],
        first_map=[(Convolution, ZBox(low, high)), (nn.Linear, ZBox(low, high))],
        canonizers=canonizers,
    )
    with Gradient(net, composite) as attributor:
        _, relevance = attributor(x, lambda out: F.one_hot(target, out.shape[1]) * out)
    return relevance


def assert_lrp_is_zennits(net, x, target, twin=None, **options):
    """betasmooth's LRP of ``net`` equals zennit_lrp of ``twin`` (default ``net``) and is not 0."""
    ours = bs.explain(net, x, "lrp", target, **options)
    theirs = zennit_lrp(net if twin is None else twin, x, target, **options)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0


def with_batchnorm(bn_eps: float) -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8, eps=bn_eps),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8, eps=bn_eps),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 5),
    )
    for bn in (net[1], net[4]):
        _random_statistics(bn)
    return net.double().eval()


def _random_statistics(bn: nn.Module) -> None:
    """Statistics and affine parameters away from the identity, so that folding shows."""
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)


def mlp() -> nn.Module:
    torch.manual_seed(2)
    return (
        nn.Sequential(nn.Flatten(), nn.Linear(256, 20), nn.ReLU(), nn.Dropout(), nn.Linear(20, 5))
        .double()
        .eval()
    )


def signed_conv_input() -> nn.Module:
    """The second convolution sees negative inputs: both halves of the z+ rule count."""
    torch.manual_seed(4)
    return (
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Flatten(),
            nn.Linear(64, 5),
        )
        .double()
        .eval()
    )


@pytest.mark.parametrize(
    ("build", "low", "high", "epsilon"),
    [
        (lambda: vgg_small().double(), 0.0, 1.0, 1e-6),
        (lambda: vgg_small().double(), -0.5, 1.5, 0.1),
        (lambda: vgg_small(channels=3).double(), "per-channel", None, 1e-6),
        (mlp, 0.0, 1.0, 1e-3),
        (signed_conv_input, 0.0, 1.0, 1e-6),
    ],
    ids=["vgg", "vgg-bounds-eps", "vgg-rgb-tensor-bounds", "mlp-first-linear", "signed-zplus"],
)
def test_lrp_matches_zennit(build, low, high, epsilon):
    net = build()
    channels = net[0].in_channels if isinstance(net[0], nn.Conv2d) else 1
    if low == "per-channel":
        low = torch.tensor([-1.0, 0.0, -0.5], dtype=torch.float64).view(1, 3, 1, 1)
        high = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    x = torch.rand(4, channels, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3])
    assert_lrp_is_zennits(net, x, target, low=low, high=high, epsilon=epsilon)


def test_lrp_takes_a_perturbed_copy_just_outside_its_box():
    # Robustness metrics (Quantus) explain copies of x with Gaussian noise of
    # std 0.1, which leave [low, high] by up to about 0.4: still z^B, as Zennit
    # computes it.
    net = vgg_small(channels=3).double()
    g = torch.Generator().manual_seed(0)
    # Black and white pixels (as the digits' background and strokes), then the noise.
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64, generator=g).round()
    x = x + 0.1 * torch.randn(x.shape, dtype=torch.float64, generator=g)
    assert x.min() < -0.3 and x.max() > 1.3
    target = torch.tensor([0, 1, 2, 3])
    theirs = zennit_lrp(net, x, target)
    torch.testing.assert_close(bs.explain(net, x, "lrp", target), theirs, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("per_channel", [False, True])
def test_lrp_box_slack_is_one_box_width(per_channel):
    # BOX_SLACK counts in widths of the box: [-2, 2] lets x reach 2 + 4 = 6 on
    # either side, so that noisy copies of normalised images pass.
    low, high = -2.0, 2.0
    if per_channel:
        low, high = torch.tensor([low]).view(1, 1, 1, 1), torch.tensor([high]).view(1, 1, 1, 1)
    x = torch.zeros(2, 1, 4, 4)
    x[0, 0, 0, 0], x[1, 0, 1, 1] = 5.9, -5.9
    check_method_input(x, "lrp", low=low, high=high)
    # Exactly one width outside is not more than one: still taken, on either side.
    x[0, 0, 0, 0], x[1, 0, 1, 1] = 6.0, -6.0
    check_method_input(x, "lrp", low=low, high=high)
    x[1, 0, 1, 1] = -6.1
    with pytest.raises(InputError, match="outside the lrp input box"):
        check_method_input(x, "lrp", low=low, high=high)


def test_lrp_predicted_class_is_default():
    net = vgg_small().double()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    theirs = zennit_lrp(net, x, net(x).argmax(1))
    torch.testing.assert_close(bs.explain(net, x, "lrp"), theirs, rtol=1e-10, atol=1e-14)


def test_lrp_folds_batchnorm_like_zennit():
    # zennit's merged BatchNorm still divides by sqrt(1 + eps); a tiny eps makes
    # that identity exact, so the comparison can be tight.
    net = with_batchnorm(bn_eps=1e-12)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([4, 0, 2])
    ours = bs.explain(net, x, "lrp", target)
    theirs = zennit_lrp(net, x, target, canonizers=[SequentialMergeBatchNorm()])
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-14)


def test_lrp_batchnorm_default_eps_within_zennit_identity_error():
    net = with_batchnorm(bn_eps=1e-5)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 3])
    ours = bs.explain(net, x, "lrp", target)
    theirs = zennit_lrp(net, x, target, canonizers=[SequentialMergeBatchNorm()])
    # Two merged BatchNorms each scale by 1 / sqrt(1 + 1e-5) in zennit.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=3e-5 * theirs.abs().max().item())


def transposed_first() -> nn.Module:
    """A ConvTranspose2d as first layer (z^B): stride 2, padding, output padding, groups,
    dilation; 8 px in, 16 out."""
    torch.manual_seed(11)
    return (
        nn.Sequential(
            nn.ConvTranspose2d(
                2, 4, 3, stride=2, padding=2, output_padding=1, groups=2, dilation=2
            ),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Flatten(),
            nn.Linear(64, 5),
        )
        .double()
        .eval()
    )


def transposed_middle(groups: int = 2, batchnorm: bool = False) -> nn.Module:
    """A ConvTranspose2d after the first layer (z+), optionally with a BatchNorm after it;
    any image size."""
    torch.manual_seed(12)
    layers = [
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=groups),
        *([nn.BatchNorm2d(4, eps=1e-12)] if batchnorm else []),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(4),
        nn.Flatten(),
        nn.Linear(64, 5),
    ]
    net = nn.Sequential(*layers)
    if batchnorm:
        _random_statistics(net[3])
    return net.double().eval()


def transposed_1d() -> nn.Module:
    """ConvTranspose1d first, then one fed its signed output directly (both halves of z+)."""
    torch.manual_seed(13)
    return (
        nn.Sequential(
            nn.ConvTranspose1d(1, 4, 5, stride=2, padding=2, output_padding=1),
            nn.ConvTranspose1d(4, 4, 3, padding=2, groups=2, dilation=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 5),
        )
        .double()
        .eval()
    )


def fold_by_hand(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """The ConvTranspose that computes ``bn(conv(x))`` in eval mode, output channel by
    output channel: channel ``o`` of group ``g`` is column ``o - g * out/groups`` of the
    weights of that group's inputs."""
    folded = copy.deepcopy(conv)
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    per_group = conv.out_channels // conv.groups
    size = conv.in_channels // conv.groups
    with torch.no_grad():
        for o in range(conv.out_channels):
            g, j = divmod(o, per_group)
            folded.weight[g * size : (g + 1) * size, j] *= scale[o]
        folded.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
    return folded


def folded_twin(net: nn.Sequential) -> nn.Sequential:
    """``net`` with its ConvTranspose + BatchNorm folded by hand; checked to compute ``net``."""
    index = next(i for i, m in enumerate(net) if isinstance(m, nn.BatchNorm2d))
    twin = nn.Sequential(
        *net[: index - 1], fold_by_hand(net[index - 1], net[index]), *net[index + 1 :]
    ).eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(twin(x), net(x), rtol=1e-12, atol=1e-14)
    return twin


@pytest.mark.parametrize(
    ("build", "shape"),
    [(transposed_first, (3, 2, 8, 8)), (transposed_middle, (3, 1, 8, 8)),
     (transposed_1d, (3, 1, 8))],
    ids=["first-2d", "middle-2d", "1d"],
)  # fmt: skip
def test_lrp_on_conv_transpose_matches_zennit(build, shape):
    # Zennit's types.Convolution holds the transposed convolutions: z^B first, z+ after.
    net = build()
    x = torch.rand(*shape, dtype=torch.float64)
    assert_lrp_is_zennits(net, x, torch.tensor([0, 2, 4]))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_lrp_folds_batchnorm_after_conv_transpose(groups):
    # A ConvTranspose weight is (in, out / groups, k, k): the BatchNorm's scale is per
    # output channel, so along dim 1 within each group. Zennit's SequentialMergeBatchNorm
    # scales dim 1 by all out channels, which fails for groups > 1; the oracle is zennit on
    # the model folded by hand (checked to compute the same logits).
    net = transposed_middle(groups, batchnorm=True)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([1, 3, 4])
    ours = bs.explain(net, x, "lrp", target)
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, zennit_lrp(folded_twin(net), x, target), rtol=1e-9, atol=1e-14)
    if groups == 1:
        theirs = zennit_lrp(net, x, target, canonizers=[SequentialMergeBatchNorm()])
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-14)


class OutputSize(nn.Module):
    """A ConvTranspose called with forward's ``output_size``: 8 px to 16 (output padding 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(1, 4, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(64, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(x, output_size=[2 * x.shape[-2], 2 * x.shape[-1]]))


def test_lrp_of_conv_transpose_with_output_size_is_that_of_its_output_padding():
    torch.manual_seed(14)
    net = OutputSize().double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 3])
    padded = nn.Sequential(
        nn.ConvTranspose2d(1, 4, 3, stride=2, padding=1, output_padding=1), *net.head
    ).double()
    padded[0].load_state_dict(net.up.state_dict())
    torch.testing.assert_close(padded(x), net(x), rtol=0, atol=0)
    assert_lrp_is_zennits(net, x, target, twin=padded)


def test_beta_smooth_over_lrp_on_conv_transpose():
    # beta_smooth over lrp is lrp of the smoothed model; at a large beta softplus is ReLU
    # to within log(2) / beta, and the map nears plain LRP's (1.4e-4 of its largest value
    # at beta 1e3, 1.4e-5 at 1e4): a limit, not a ground truth for the beta in between.
    net = transposed_middle(batchnorm=True)
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    target = net(x).argmax(1)
    ours = bs.explain(net, x, "beta_smooth", base="lrp", beta=3.0)
    torch.testing.assert_close(ours, bs.explain(bs.smooth(net, 3.0), x, "lrp", target))
    plain = bs.explain(net, x, "lrp", target)
    assert (ours - plain).abs().max() > 0.1 * plain.abs().max()
    sharp = bs.explain(net, x, "beta_smooth", base="lrp", beta=1e4)
    torch.testing.assert_close(sharp, plain, rtol=0, atol=1e-4 * plain.abs().max().item())


class ZennitResidual(ResidualNet):
    """:class:`ResidualNet` with module ReLUs and zennit's ``Sum`` for the residual addition."""

    def __init__(self) -> None:
        super().__init__()
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.sum = Sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(self.conv1(x)))
        b = self.relu2(self.bn2(self.conv2(a)))
        return self.head(self.relu3(self.pool(self.sum(torch.stack([a, b], dim=-1)))))


def _residual_twins() -> tuple[nn.Module, nn.Module]:
    """A residual net and its ZennitResidual twin, same weights, BatchNorm eps 1e-12 (so
    that zennit's merged BatchNorm is exact)."""
    net = residual_net().double()
    twin = ZennitResidual().double().eval()
    twin.load_state_dict(net.state_dict())
    for bn in (net.bn1, net.bn2, twin.bn1, twin.bn2):
        bn.eps = 1e-12
    return net, twin


def test_lrp_on_residual_net_matches_zennit():
    # F.relu, torch.relu, Tensor.relu and `a + b` in forward code against the
    # same weights written with modules that zennit can hook.
    net, twin = _residual_twins()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 2, 4])
    ours = bs.explain(net, x, "lrp", target)
    theirs = zennit_lrp(twin, x, target, canonizers=[SequentialMergeBatchNorm()])
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-14)


class _AddSpelled(ResidualNet):
    """:class:`ResidualNet` with its residual sum written ``add(a, b)``, spelled as given."""

    def __init__(self, add: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.add = add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.bn2(self.conv2(a)))
        return self.head(self.pool(self.add(a, b)).relu())


@pytest.mark.parametrize(
    "add",
    [
        lambda a, b: a.add(b),
        # operands by keyword: read where the rules read them, not an IndexError
        lambda a, b: a.add(other=b),
        lambda a, b: torch.add(a, other=b),
        lambda a, b: torch.add(input=a, other=b),
    ],
    ids=["method", "method-other", "function-other", "function-input-other"],
)
def test_lrp_of_a_residual_sum_by_tensor_add_matches_zennit(add):
    # Tensor.add and torch.add are `+`: relevance shared in proportion to the summands
    # (zennit's Sum), however the operands are passed.
    net, twin = _residual_twins()
    spelled = _AddSpelled(add).double().eval()
    spelled.load_state_dict(net.state_dict())
    for bn in (spelled.bn1, spelled.bn2):
        bn.eps = 1e-12
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 3, 0])
    ours = bs.explain(spelled, x, "lrp", target)
    theirs = zennit_lrp(twin, x, target, canonizers=[SequentialMergeBatchNorm()])
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-14)
    assert ours.abs().sum() > 0


def test_lrp_standalone_batchnorm_by_hand():
    # A BatchNorm after a ReLU cannot be folded: relevance passes through it
    # unchanged (zennit's Pass), while the next layer sees its output y.
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.BatchNorm1d(3), nn.Linear(3, 2)
    ).double()
    bn = net[3]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.2, 0.2)
    net.eval()
    x = torch.rand(3, 1, 2, 2, dtype=torch.float64)
    target = torch.tensor([0, 1, 1])

    def stab(z, eps):
        return z + eps * torch.where(z >= 0, 1.0, -1.0).double()

    w1, b1, w2, b2 = net[1].weight, net[1].bias, net[4].weight, net[4].bias
    with torch.no_grad():
        x0 = x.flatten(1)
        a = (x0 @ w1.T + b1).clamp(min=0)
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        y = a * scale + bn.bias - bn.running_mean * scale
        z2 = y @ w2.T + b2
        r2 = F.one_hot(target, 2) * z2
        r_a = y * ((r2 / stab(z2, 0.01)) @ w2)
        low, high = torch.zeros_like(x0), torch.ones_like(x0)
        wp, wn, bp, bn_ = w1.clamp(min=0), w1.clamp(max=0), b1.clamp(min=0), b1.clamp(max=0)
        z1 = (x0 @ w1.T + b1) - (low @ wp.T + bp) - (high @ wn.T + bn_)
        s1 = r_a / stab(z1, 1e-6)
        expected = x0 * (s1 @ w1) - low * (s1 @ wp) - high * (s1 @ wn)
    ours = bs.explain(net, x, "lrp", target, epsilon=0.01)
    torch.testing.assert_close(ours, expected.view_as(x), rtol=1e-12, atol=1e-15)


def preactivation() -> nn.Module:
    """BatchNorm after a ReLU (DenseNet's after each cat, pre-activation ResNets): not foldable.

    The shift is large against the scaled input, as in trained networks, where
    it nearly cancels the mean: an epsilon rule on the BatchNorm's affine map
    would then multiply the relevance.
    """
    torch.manual_seed(9)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )
    bn = net[2]
    bn.running_mean.uniform_(0.2, 0.6)
    bn.running_var.uniform_(0.05, 0.2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    return net.double().eval()


def test_lrp_passes_relevance_through_an_unfolded_batchnorm_as_zennit():
    net = preactivation()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    assert_lrp_is_zennits(net, x, torch.tensor([0, 2, 4]))


def test_lrp_float32_matches_zennit():
    net = vgg_small()
    x = torch.rand(2, 1, 16, 16)
    target = torch.tensor([1, 2])
    ours = bs.explain(net, x, "lrp", target)
    theirs = zennit_lrp(net, x, target)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)


def test_lrp_conserves_the_logit_without_bias():
    net = vgg_small(bias=False).double()
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    logits = net(x)
    h = bs.explain(net, x, "lrp", epsilon=0.0)
    expected = logits.max(1).values.detach()
    assert torch.all(((h.sum((1, 2, 3)) - expected) / expected).abs() < 1e-4)


def bias_free_residual() -> nn.Module:
    torch.manual_seed(3)
    net = ResidualNet()
    net.conv1.bias = None
    net.conv2.bias = None
    net.head[2].bias = None
    for bn in (net.bn1, net.bn2):
        bn.running_mean.zero_()
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.zero_()
    return net.double().eval()


def test_lrp_conserves_through_residual_and_average_pools():
    net = bias_free_residual()
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    logit = net(x).max(1).values.detach()
    h = bs.explain(net, x, "lrp", epsilon=0.0)
    assert torch.all(((h.sum((1, 2, 3)) - logit) / logit).abs() < 1e-4)


def test_lrp_on_smoothed_model_explains_the_softplus_forward():
    # Conservation pins the forward that was recorded: the relevances sum to
    # the smoothed model's logit, not the ReLU model's.
    net = vgg_small(bias=False).double()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    soft = bs.smooth(net, beta=2.0)
    soft_logit = soft(x).gather(1, target[:, None])[:, 0].detach()
    relu_logit = net(x).gather(1, target[:, None])[:, 0].detach()
    h = bs.explain(soft, x, "lrp", target, epsilon=0.0)
    torch.testing.assert_close(h.sum((1, 2, 3)), soft_logit, rtol=1e-4, atol=0)
    assert ((soft_logit - relu_logit).abs() > 0.01).all()
    with bs.smoothed(net, 2.0):
        h_in_place = bs.explain(net, x, "lrp", target, epsilon=0.0)
    torch.testing.assert_close(h_in_place, h, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        bs.explain(net, x, "lrp", target, epsilon=0.0).sum((1, 2, 3)), relu_logit, rtol=1e-4, atol=0
    )


def test_beta_smooth_over_lrp_is_lrp_of_the_smoothed_model():
    net = vgg_small().double()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    target = net(x).argmax(1)
    ours = bs.explain(net, x, "beta_smooth", base="lrp", beta=3.0)
    torch.testing.assert_close(ours, bs.explain(bs.smooth(net, 3.0), x, "lrp", target))
    assert not torch.allclose(ours, bs.explain(net, x, "lrp", target))


def _relu_pattern(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    masks = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: masks.append(o > 0))
        for m in net.modules()
        if isinstance(m, nn.ReLU)
    ]
    hooks += [
        m.register_forward_hook(
            lambda m, i, o: masks.append(F.max_pool2d(i[0], 2, return_indices=True)[1])
        )
        for m in net.modules()
        if isinstance(m, nn.MaxPool2d)
    ]
    net(x)
    for h in hooks:
        h.remove()
    return masks


def _check_lrp_derivative(net, x, v, u, pattern) -> None:
    """d/dx of sum(LRP map * v) along u, by create_graph, against a central finite
    difference whose step flips none of the activations ``pattern(z)`` records."""
    target = torch.tensor([1, 3])
    xg = x.clone().requires_grad_(True)
    h = bs.explain(net, xg, "lrp", target, create_graph=True, epsilon=1e-3)
    (grad,) = torch.autograd.grad((h * v).sum(), xg)
    step = 1e-6
    for sign in (1, -1):
        flipped = map(torch.equal, pattern(x), pattern(x + sign * step * u))
        assert all(flipped), "an activation flipped inside the finite-difference step"

    def f(z):
        return (bs.explain(net, z, "lrp", target, epsilon=1e-3) * v).sum()

    numeric = (f(x + step * u) - f(x - step * u)) / (2 * step)
    analytic = (grad * u).sum()
    assert analytic.abs() > 1e-3
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-9)


def test_lrp_input_derivative_matches_finite_difference_on_relu_net():
    net = vgg_small().double()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    v = torch.randn_like(x)
    u = torch.randn_like(x)
    _check_lrp_derivative(net, x, v, u, lambda z: _relu_pattern(net, z))


def test_lrp_input_derivative_matches_finite_difference_through_pools_and_sums():
    # The rules of the average pools and of the residual sum divide by their
    # outputs: with create_graph the map is differentiated through those ratios.
    net = residual_net().double()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, generator=gen, dtype=torch.float64)
    v, u = torch.randn(2, 2, 1, 16, 16, generator=gen, dtype=torch.float64)

    def signs(z):
        # The inputs of the model's three ReLUs (F.relu, torch.relu, Tensor.relu).
        seen = []
        hooks = [
            m.register_forward_hook(lambda m, i, o: seen.append(o > 0))
            for m in (net.bn1, net.bn2, net.pool)
        ]
        net(z)
        for hook in hooks:
            hook.remove()
        return seen

    _check_lrp_derivative(net, x, v, u, signs)


def test_lrp_of_a_data_parallel_model_is_lrp_of_its_module():
    # torch.fx cannot trace DataParallel's forward; on one device it runs its module.
    net = vgg_small().double()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = bs.explain(nn.DataParallel(net), x, "lrp", epsilon=1e-3)
    torch.testing.assert_close(ours, bs.explain(net, x, "lrp", epsilon=1e-3), rtol=0, atol=0)
    # A wrapper of a wrapper is unwrapped to the module as well.
    twice = bs.explain(nn.DataParallel(nn.DataParallel(net)), x, "lrp", epsilon=1e-3)
    torch.testing.assert_close(twice, ours, rtol=0, atol=0)
    # The checks before a run (the command line's, the attack's) take it too.
    from betasmooth.explain import check_model

    check_model(nn.DataParallel(net), "lrp")


def test_lrp_graph_is_traced_once_per_model():
    net = vgg_small().double()
    graph = lrp_graph(net)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    before = bs.explain(net, x, "lrp", 0)
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    after = bs.explain(net, x, "lrp", 0)
    assert lrp_graph(net) is graph
    # The cached graph reads the current weights.
    assert not torch.allclose(after, before)
    torch.testing.assert_close(
        after, zennit_lrp(net, x, torch.tensor([0, 0])), rtol=1e-10, atol=1e-14
    )
    # A replaced submodule is seen: the graph is traced again.
    net[-1] = nn.Linear(32, 5).double()
    torch.testing.assert_close(
        bs.explain(net, x, "lrp", 0),
        zennit_lrp(net, x, torch.tensor([0, 0])),
        rtol=1e-10,
        atol=1e-14,
    )
    assert lrp_graph(net) is not graph


class Shifted(nn.Module):
    """vgg_small on ``x + shift``: a tensor attribute of the root that the trace reads."""

    def __init__(self) -> None:
        super().__init__()
        self.net = vgg_small().double()
        self.register_buffer("shift", torch.zeros(1, 1, 16, 16, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.shift)


def test_a_replaced_tensor_attribute_is_traced_again():
    # The oracle: the map of a copy, which has never been traced.
    model = Shifted()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    bs.explain(model, x, "lrp", 0, low=-1.0, high=1.0)
    model.shift = torch.full((1, 1, 16, 16), 0.3, dtype=torch.float64)
    fresh = copy.deepcopy(model)
    expected = bs.explain(fresh, x, "lrp", 0, low=-1.0, high=1.0)
    got = bs.explain(model, x, "lrp", 0, low=-1.0, high=1.0)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_a_forward_set_on_the_instance_is_refused():
    # torch.fx traces the class's forward: the map would be of the skipped-over function.
    net = vgg_small().double()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    bs.explain(net, x, "lrp", 0)
    net.forward = lambda z: nn.Sequential.forward(net, z) * 2
    with pytest.raises(InputError, match=r"forward set on the instance \(model.forward = ...\)"):
        bs.explain(net, x, "lrp", 0)
    # A smoothed copy runs its class's forward, smoothed as the model is inside smoothed().
    del net.forward
    with bs.smoothed(net, 2.0):
        expected = bs.explain(net, x, "lrp", 0)
    got = bs.explain(bs.smooth(net, 2.0), x, "lrp", 0)
    assert not torch.allclose(expected, bs.explain(net, x, "lrp", 0))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


def test_untraceable_model_is_an_input_error():
    with pytest.raises(InputError, match="symbolic_trace.*DataDependent"):
        bs.explain(DataDependent(), torch.rand(2, 1, 2, 2), "lrp")


def test_unsupported_layer_is_named():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LocalResponseNorm(2), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(InputError, match=r"module LocalResponseNorm \(1\).*supported: Conv") as err:
        bs.explain(net, torch.rand(2, 1, 4, 4), "lrp")
    assert len(str(err.value)) < 250 and "\n" not in str(err.value)


class _Cumulative(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, 1)


def test_unsupported_function_names_its_module_path():
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU(), _Cumulative()), nn.Flatten(), nn.Linear(8, 2)
    )
    with pytest.raises(InputError, match=r"function cumsum in module 1\.1 \(_Cumulative\)") as e:
        bs.explain(net, torch.rand(2, 1, 4, 4), "lrp")
    assert len(str(e.value)) < 250


class _Shuffled(nn.Module):
    """ShuffleNet V2's unit: half the channels through a branch (chunk), then a shuffle."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(24, 5),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        kept, through = h.chunk(2, dim=1)
        h = torch.cat((kept, self.branch(through)), dim=1)
        b, c, height, width = h.size()
        h = torch.transpose(h.view(b, 2, c // 2, height, width), 1, 2).contiguous()
        left, right = torch.split(h.view(b, -1, height, width), [1, 3], dim=1)
        return self.head(torch.cat((right, left), dim=1))


def test_lrp_routes_relevance_through_chunk_split_and_a_channel_shuffle_as_zennit():
    # Zennit leaves chunk, split, cat, view and transpose to autograd: the gradient routes
    # each part's relevance back to its channels.
    net = _Shuffled().double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    assert_lrp_is_zennits(net, x, torch.tensor([0, 3, 4]))
    # Differentiable through the parts (the attack on LRP needs it).
    gen = torch.Generator().manual_seed(1)
    x2, v, u = torch.rand(3, 2, 1, 8, 8, generator=gen, dtype=torch.float64)
    _check_lrp_derivative(net, x2, v - 0.5, u - 0.5, lambda z: _relu_pattern(net, z))


def test_every_kind_of_layer_without_a_rule_is_named_not_only_the_first():
    # A model may stop LRP at several layers: all kinds are named, not only the first.
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.LocalResponseNorm(2), _Cumulative(), nn.LocalResponseNorm(2),
        nn.Flatten(), nn.Linear(8, 2),
    )  # fmt: skip
    with pytest.raises(InputError) as err:
        bs.explain(net, torch.rand(2, 1, 4, 4), "lrp")
    assert str(err.value).startswith(
        "lrp has no rule for module LocalResponseNorm (1) (node '_1') (also function cumsum); "
        "supported:"
    )


class _MeanPooled(nn.Module):
    """A small CNN with global average pooling as ``Tensor.mean``, ``torch.mean``, ``F``'s pools
    or modules."""

    def __init__(self, pooling: str) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()
        )
        self.pooling = pooling
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        if self.pooling == "method":
            return self.fc(h.mean((2, 3)))
        if self.pooling == "function":
            return self.fc(torch.mean(h, dim=(2, 3), keepdim=True).flatten(1))
        if self.pooling == "avg_pool2d":
            return self.fc(F.avg_pool2d(h, 8).flatten(1))
        if self.pooling == "adaptive_avg_pool2d":
            return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))
        if self.pooling == "sum-method":
            return self.fc(h.sum((2, 3)))
        if self.pooling == "sum-function":
            return self.fc(torch.sum(h, dim=(2, 3)))
        return self.fc(self.pool(h))


@pytest.mark.parametrize("pooling", ["method", "function", "avg_pool2d", "adaptive_avg_pool2d"])
def test_lrp_of_mean_equals_zennit_on_adaptive_avg_pool(pooling):
    net, twin = _MeanPooled(pooling).double().eval(), _MeanPooled("modules").double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 2, 3])
    assert_lrp_is_zennits(net, x, target, twin=twin)


@pytest.mark.parametrize("pooling", ["sum-method", "sum-function"])
def test_lrp_of_a_spatial_sum_equals_zennit_on_average_pool_with_the_size_in_the_weights(pooling):
    # A sum over 8 x 8 pixels is 64 times their mean: the next layer's z and each
    # pixel's share of the pooled value are those of the mean-pooled twin whose fc
    # weights are 64 times larger, so relevance is that twin's under zennit's Norm, up
    # to Norm's stabiliser 1e-6, added to a pooled value 64 times smaller in the twin
    # (7e-5 of the largest relevance here; routing like the gradient is off by 100%).
    net, twin = _MeanPooled(pooling).double().eval(), _MeanPooled("modules").double().eval()
    with torch.no_grad():
        twin.fc.weight *= 64
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([1, 0, 3])
    torch.testing.assert_close(twin(x), net(x), rtol=1e-12, atol=1e-14)
    ours, theirs = bs.explain(net, x, "lrp", target), zennit_lrp(twin, x, target)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3 * float(theirs.abs().max()))
    assert theirs.abs().sum() > 0


def test_unsupported_function_is_named():
    class Sub(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.exp(x.flatten(1)))

    with pytest.raises(InputError, match="function exp"):
        bs.explain(Sub(), torch.rand(2, 1, 2, 2), "lrp")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epsilon": -1.0}, "epsilon"),
        ({"low": "zero"}, "low"),
        ({"high": torch.zeros(5, 1, 1)}, "high"),
    ],
)
def test_bad_lrp_options(options, message):
    with pytest.raises(InputError, match=message):
        bs.explain(vgg_small(), torch.rand(2, 1, 16, 16), "lrp", **options)


def test_lrp_refuses_bounds_with_one_empty_channel():
    # Per-channel bounds: one channel of three with low == high is refused.
    low = torch.tensor([0.0, 0.5, 0.0]).view(1, 3, 1, 1)
    high = torch.tensor([1.0, 0.5, 1.0]).view(1, 3, 1, 1)
    x = torch.full((2, 3, 16, 16), 0.5)
    with pytest.raises(InputError, match="lrp options must have low < high"):
        bs.explain(vgg_small(channels=3), x, "lrp", low=low, high=high)


@pytest.mark.parametrize("activation", [nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.Hardswish])
def test_lrp_passes_relevance_through_other_activations_like_zennit(activation):
    torch.manual_seed(8)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), activation(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), activation(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5),
    ).double().eval()  # fmt: skip
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 4, 0])
    assert_lrp_is_zennits(net, x, target)


def test_lrp_on_squeezenet_concatenations_matches_zennit():
    # SqueezeNet's Fire modules join two branches with torch.cat; zennit lets
    # autograd route the relevance, which gives each branch its own slice.
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(9)
    net = torchvision.models.squeezenet1_1(num_classes=10).double().eval()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    target = torch.tensor([3, 7])
    ours = bs.explain(net, x, "lrp", target)
    theirs = zennit_lrp(net, x, target)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-13)
    assert ours.abs().sum() > 0


def test_per_channel_bounds_reach_a_first_dense_layer_flattened_like_zennit():
    # An MLP on images: the first layer sees x flattened, so (1, C, 1, 1)
    # bounds (a normalised data set's) must be spelled out per pixel.
    torch.manual_seed(10)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 12), nn.ReLU(), nn.Linear(12, 4))
    net = net.double().eval()
    low = torch.tensor([-2.0, -1.5, -1.0], dtype=torch.float64).view(1, 3, 1, 1)
    high = torch.tensor([2.5, 2.0, 1.5], dtype=torch.float64).view(1, 3, 1, 1)
    x = low + (high - low) * torch.rand(2, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([1, 3])
    ours = bs.explain(net, x, "lrp", target, low=low, high=high)
    flat_low, flat_high = low.expand_as(x).flatten(1), high.expand_as(x).flatten(1)
    theirs = zennit_lrp(net, x, target, flat_low, flat_high).view_as(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)


class _WithDropout(nn.Module):
    """vgg_small with functional dropout before its head and an auxiliary output in training."""

    def __init__(self, aux: bool) -> None:
        super().__init__()
        self.net = vgg_small().double()
        self.body, self.head, self.aux = self.net[:-1], self.net[-1], aux

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        out = self.head(F.dropout(h, 0.5, training=self.training))
        if self.training and self.aux:
            return out, h.mean(1)
        return out


@pytest.mark.parametrize("aux", [False, True])
def test_lrp_checked_in_training_mode_explains_the_deployed_model(aux):
    # check_model in training mode (as the command line's pre-flight check may
    # meet a model) once traced the training branch: random dropout masks, and
    # a tuple output that no rule takes, were kept for every later map.
    model = _WithDropout(aux).train()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 3])
    check_model(model, "lrp")
    assert model.training
    model.eval()
    first, second = bs.explain(model, x, "lrp", target), bs.explain(model, x, "lrp", target)
    expected = zennit_lrp(model.net, x, target)
    torch.testing.assert_close(first, expected, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(second, expected, rtol=1e-10, atol=1e-14)


def test_lrp_keeps_its_graph_under_no_grad_when_asked():
    # As the gradient methods: create_graph=True is a request, whatever the caller's mode.
    net = vgg_small().double()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    v = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 3])
    with torch.no_grad():
        inside = bs.explain(net, x, "lrp", target, create_graph=True)
    outside = bs.explain(net, x, "lrp", target, create_graph=True)
    (expected,) = torch.autograd.grad((outside * v).sum(), x)
    (got,) = torch.autograd.grad((inside * v).sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert expected.abs().max() > 0


class _ReadBeforeInplace(nn.Module):
    """``conv2`` reads ``h`` before a ReLU overwrites it in place (``inplace``), or
    with module ReLUs and zennit's ``Sum`` for zennit (``"zennit"``)."""

    def __init__(self, inplace: str) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=inplace == "module")
        self.relu2 = nn.ReLU()
        self.head = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(16, 3))
        self.sum = Sum()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        g = self.conv2(h)  # signed input: the z+ rule's negative half counts
        if self.inplace == "method":
            a = h.relu_()
        elif self.inplace == "function":
            a = torch.relu_(h)
        elif self.inplace == "keyword":
            a = F.relu(h, inplace=True)
        else:
            a = self.relu1(h)
        if self.inplace == "zennit":
            return self.head(self.relu2(self.sum(torch.stack([g, self.conv3(a)], dim=-1))))
        return self.head(self.relu2(g + self.conv3(a)))


@pytest.mark.parametrize("inplace", ["method", "function", "keyword", "module"])
def test_lrp_reads_the_values_before_an_inplace_relu_like_zennit(inplace):
    # The relevance of conv2 needs h as it was made, before the ReLU wrote into it.
    net = _ReadBeforeInplace(inplace).double().eval()
    twin = _ReadBeforeInplace("zennit").double().eval()
    twin.load_state_dict(net.state_dict())
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    assert_lrp_is_zennits(net, x, target, twin=twin)


class _BroadcastSum(nn.Module):
    """``h + mean(h)`` over the pixels: a sum whose summands have different shapes."""

    def __init__(self, zennit: bool) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(16, 3))
        self.sum = Sum()
        self.zennit = zennit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.conv1(x))
        if self.zennit:
            s = self.sum(torch.stack([h, self.gap(h).expand_as(h)], dim=-1))
        else:
            s = h + self.gap(h)
        return self.head(self.relu2(self.conv2(s)))


def test_lrp_of_a_broadcast_sum_matches_zennit():
    # The broadcast summand's share is summed back to its own shape, as the
    # gradient of zennit's expand does.
    net, twin = _BroadcastSum(False).double().eval(), _BroadcastSum(True).double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([2, 0, 1])
    assert_lrp_is_zennits(net, x, target, twin=twin)


class _SkipFromInput(nn.Module):
    """``x + relu(conv1(x))`` feeds conv2, which is therefore no first layer."""

    def __init__(self, zennit: bool) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.conv1 = nn.Conv2d(1, 1, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.head = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(16, 3))
        self.sum = Sum()
        self.zennit = zennit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.relu1(self.conv1(x))
        s = self.sum(torch.stack([x, r], dim=-1)) if self.zennit else x + r
        return self.head(self.relu2(self.conv2(s)))


def test_lrp_first_layer_is_only_the_one_fed_by_the_input_alone():
    # conv2 sees x plus an activation: z+, as in zennit, not the z^B rule.
    net, twin = _SkipFromInput(False).double().eval(), _SkipFromInput(True).double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([1, 2, 0])
    assert_lrp_is_zennits(net, x, target, twin=twin)


class _UnevenCat(nn.Module):
    """Two branches of 3 and 5 channels joined with ``torch.cat``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(14)
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(4, 3, 1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(torch.cat([self.left(h), self.right(h)], 1))


def test_lrp_of_an_uneven_concatenation_matches_zennit():
    net = _UnevenCat().double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    assert_lrp_is_zennits(net, x, target)


class _InTwoChunks(nn.Module):
    """``net`` on the batch in two chunks, their logits joined by ``torch.cat`` on its
    default dim 0."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(x[:1]), self.net(x[1:])])


def test_lrp_of_a_concatenation_on_its_default_dim_matches_zennit():
    # torch.cat without a dim joins the chunks' logits on dim 0: each chunk takes its own
    # rows of the relevance, and the map is zennit's of net on the whole batch.
    net = vgg_small().double()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    assert_lrp_is_zennits(_InTwoChunks(net), x, torch.tensor([0, 1, 2]), twin=net)


class _SharedConvOutput(nn.Module):
    """A BatchNorm that is not its convolution's only reader (``tap`` adds an Identity)."""

    def __init__(self, tap: bool) -> None:
        super().__init__()
        torch.manual_seed(15)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.tap = nn.Identity() if tap else None
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(16, 3))
        self.bn.running_mean.uniform_(-0.2, 0.2)
        self.bn.running_var.uniform_(0.5, 1.5)
        self.bn.weight.data.uniform_(0.5, 1.5)
        self.bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        b = self.bn(self.tap(h) if self.tap is not None else h)
        return self.head(self.relu2(self.conv2(self.relu1(b) + self.relu1(h))))


def test_lrp_does_not_fold_a_batchnorm_whose_convolution_has_another_reader():
    # Folded, conv1 would pass the other reader's relevance through the BatchNorm
    # too; unfolded it equals the same net with an Identity before the BatchNorm,
    # whose source is then no Conv (the standalone rule, checked by hand above).
    net = _SharedConvOutput(False).double().eval()
    twin = _SharedConvOutput(True).double().eval()
    twin.load_state_dict(net.state_dict())
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([2, 1, 0])
    ours = bs.explain(net, x, "lrp", target)
    expected = bs.explain(twin, x, "lrp", target)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-15)
    assert ours.abs().sum() > 0


def test_lrp_gives_torchs_subclasses_of_linear_the_linear_rules_like_zennit():
    # nn.MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear, a
    # subclass of Linear that torch.fx keeps as a module.
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    torch.manual_seed(16)
    net = nn.Sequential(
        nn.Flatten(),
        NonDynamicallyQuantizableLinear(64, 12),
        nn.ReLU(),
        NonDynamicallyQuantizableLinear(12, 3),
    )
    net = net.double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([2, 0, 1])
    assert_lrp_is_zennits(net, x, target, epsilon=0.01)


def test_lrp_of_one_dimensional_convolutions_matches_zennit():
    # Conv1d layers take the rules of Conv2d: z^B first, z+ after (zennit's Convolution).
    torch.manual_seed(13)
    net = (
        nn.Sequential(
            nn.Conv1d(2, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv1d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64, 3),
        )
        .double()
        .eval()
    )
    x = torch.rand(3, 2, 16, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    assert_lrp_is_zennits(net, x, target)


class _SizedView(nn.Module):
    """vgg_small's body, then ``h.view(h.size(0), -1)``: a reshape fed by x and by a shape."""

    def __init__(self) -> None:
        super().__init__()
        self.net = vgg_small().double()
        self.body, self.head = self.net[:8], self.net[9:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(h.view(h.size(0), -1))


class _SizedInputView(nn.Module):
    """mlp() with x flattened by ``x.view(x.size(0), -1)``: the first Linear is still first."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.head = self.net[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.view(x.size(0), -1))


def test_lrp_first_dense_layer_fed_by_a_view_sized_by_the_batch_takes_the_box_rule():
    # The view reads x and x.size(0), a shape: the Linear it feeds is the first
    # layer (z^B), as Zennit's first layer and as with nn.Flatten.
    net = _SizedInputView().eval()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([4, 0, 2])
    assert_lrp_is_zennits(net, x, target, epsilon=1e-3)
    torch.testing.assert_close(
        bs.explain(net, x, "lrp", target), bs.explain(net.net, x, "lrp", target), rtol=0, atol=0
    )


def test_lrp_routes_relevance_through_a_view_sized_by_the_batch_like_zennit():
    net = _SizedView().eval()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([4, 0, 2])
    assert_lrp_is_zennits(net, x, target)


@pytest.mark.parametrize("aux", [False, True])
def test_lrp_graph_traced_in_training_mode_is_of_the_deployed_model(aux):
    # lrp_graph (public) on a model in training mode traces, and caches, the
    # deployed branch: no auxiliary output, no random dropout.
    model = _WithDropout(aux).train()
    lrp_graph(model)
    assert model.training
    model.eval()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 3])
    ours = bs.explain(model, x, "lrp", target)
    torch.testing.assert_close(ours, zennit_lrp(model.net, x, target), rtol=1e-10, atol=1e-14)


def test_lrp_does_not_run_forward_hooks_again_while_it_sends_relevance_back():
    # The rules re-evaluate pools and reshapes with forward, not __call__: a
    # user's hook sees the model run as often as for the gradient (one map, one forward).
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    calls = {}
    for method in ("gradient", "lrp"):
        net = vgg_small().double()
        calls[method] = []
        for m in net.modules():
            if isinstance(m, (nn.MaxPool2d, nn.Flatten)):
                m.register_forward_hook(lambda module, i, o, seen=calls[method]: seen.append(1))
        bs.explain(net, x, method, torch.tensor([1, 3]))
    assert len(calls["lrp"]) == len(calls["gradient"]) > 0


class NormalisedInside(nn.Module):
    """``net`` on ``(x - mean) / std``: the normalisation inside forward, on [0, 1] images."""

    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@pytest.mark.parametrize(
    "composite", ["epsilon_plus_box", "epsilon_gamma_box", "epsilon_plus_flat"]
)
def test_lrp_of_a_model_that_normalises_inside_is_lrp_of_normalised_data(composite):
    # A change of coordinates moves no relevance; the z^B box [0, 1] of the raw
    # image is the box [(0 - mean) / std, (1 - mean) / std] of what the first
    # convolution sees (zennit on the normalised data is the oracle).
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 4),
    ).double().eval()  # fmt: skip
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 3, 1])
    inside = bs.explain(NormalisedInside(net, mean, std), x, "lrp", target, composite=composite)
    low, high = (0 - mean) / std, (1 - mean) / std
    outside = bs.explain(
        net, (x - mean) / std, "lrp", target, low=low, high=high, composite=composite
    )
    torch.testing.assert_close(inside, outside, rtol=1e-10, atol=1e-14)
    assert inside.abs().sum() > 0
    if composite == "epsilon_plus_box":
        theirs = zennit_lrp(net, (x - mean) / std, target, low=low, high=high)
        torch.testing.assert_close(inside, theirs, rtol=1e-10, atol=1e-14)


class _NormalisedByKeyword(NormalisedInside):
    """:class:`NormalisedInside` with its operands passed by keyword."""

    def __init__(self, *args: object, method: bool) -> None:
        super().__init__(*args)
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.method:
            return self.net(x.sub(other=self.mean).div(other=self.std))
        return self.net(torch.div(input=torch.sub(x, other=self.mean), other=self.std))


@pytest.mark.parametrize("method", [False, True], ids=["function", "method"])
def test_lrp_maps_the_box_through_a_normalisation_whose_operands_are_keywords(method):
    # torch.sub(x, other=mean) is x - mean: the same change of coordinates, the same box
    # (zennit on the normalised data is the oracle, as above).
    torch.manual_seed(3)
    net = (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 4)
        )
        .double()
        .eval()
    )
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 3, 1])
    ours = bs.explain(_NormalisedByKeyword(net, mean, std, method=method), x, "lrp", target)
    low, high = (0 - mean) / std, (1 - mean) / std
    theirs = zennit_lrp(net, (x - mean) / std, target, low=low, high=high)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0


class _RawAndNormalised(nn.Module):
    """Two first convolutions, one on x, one on ``(x - 0.5) / 0.25``; ``folded`` moves that
    normalisation into the second's weights (``4 W``, ``b - 2 sum(W)``), on x too."""

    def __init__(self, folded: bool) -> None:
        super().__init__()
        torch.manual_seed(16)
        self.raw, self.normalised = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3)
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
        self.folded = folded
        self.double().eval()
        if folded:
            with torch.no_grad():
                self.normalised.bias -= 2 * self.normalised.weight.sum((1, 2, 3))
                self.normalised.weight *= 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        other = x if self.folded else (x - 0.5) / 0.25
        return self.head(self.raw(x) + self.normalised(other))


def test_lrp_maps_the_box_of_a_first_layer_beside_one_that_sees_the_input_itself():
    # The normalised branch's z^B rule takes [-2, 2], the image of [0, 1], though the
    # other first layer sees x itself and keeps [0, 1]. z^B cancels the bias, and without
    # padding the rule with [-2, 2] on (x - 0.5) / 0.25 is the rule with [0, 1] on x of
    # the folded weights (closed form): the folded twin's map.
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    ours = bs.explain(_RawAndNormalised(False), x, "lrp", target)
    theirs = bs.explain(_RawAndNormalised(True), x, "lrp", target)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0


def test_lrp_through_torchvisions_normalize_module_is_lrp_of_normalised_data():
    # nn.Sequential(T.Normalize(mean, std), net), the usual way to fold ImageNet
    # preprocessing into a model: T.Normalize cannot be traced by torch.fx.
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).double().eval()  # fmt: skip
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    model = nn.Sequential(tv.transforms.Normalize(mean, std), net).eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    target = torch.tensor([2, 0])
    ours = bs.explain(model, x, "lrp", target)
    theirs = zennit_lrp(net, (x - m) / s, target, low=(0 - m) / s, high=(1 - m) / s)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0


def test_lrp_of_googlenet_with_transform_input_is_lrp_of_its_own_coordinates():
    # torchvision's pretrained GoogLeNet maps ImageNet-normalised input to
    # (raw - 0.5) / 0.5 inside forward (transform_input=True), with indexing,
    # unsqueeze, * and + before its first convolution. The twin without the
    # transform, fed (raw - 0.5) / 0.5 with the box [-1, 1], is the same LRP.
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    net = net.double().eval()
    twin = copy.deepcopy(net)
    net.transform_input, twin.transform_input = True, False
    raw = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    target = net((raw - mean) / std).argmax(1)
    ours = bs.explain(
        net, (raw - mean) / std, "lrp", target, low=(0 - mean) / std, high=(1 - mean) / std
    )
    expected = bs.explain(twin, (raw - 0.5) / 0.5, "lrp", target, low=-1.0, high=1.0)
    torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-12 * expected.abs().max())
    assert ours.abs().sum() > 0


def test_lrp_refuses_a_product_of_two_activations_without_a_gate():
    # x * c before the first layer is a change of coordinates, g * h with a sigmoid
    # gate passes to h (as nn.SiLU, which h * sigmoid(h) is); h * tanh(h) multiplies
    # two things that depend on the input, neither a gate, and has no rule.
    class Product(nn.Module):
        def __init__(self, other) -> None:
            super().__init__()
            torch.manual_seed(14)
            self.conv = nn.Conv2d(1, 2, 3)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 14 * 14, 3))
            self.other = other

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.head(h * self.other(h))

    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    with pytest.raises(InputError, match=r"lrp has no rule for function mul .*\(node 'mul'\)"):
        bs.explain(Product(torch.tanh).double(), x, "lrp")
    gated = Product(torch.sigmoid).double().eval()
    silu = nn.Sequential(gated.conv, nn.SiLU(), gated.head).eval()
    expected = bs.explain(silu, x, "lrp", 1)
    torch.testing.assert_close(bs.explain(gated, x, "lrp", 1), expected, rtol=1e-12, atol=0)
    assert expected.abs().sum() > 0


class _Reordered(nn.Module):
    """``net`` on the input's channels reordered (RGB to BGR) by indexing, no arithmetic."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, [2, 1, 0]])


def test_lrp_box_per_channel_follows_channels_reordered_by_indexing():
    # Indexing moves the z^B box with the input even with no x * c before the
    # first layer: the first convolution sees BGR, so its box is the BGR box.
    torch.manual_seed(6)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).double().eval()  # fmt: skip
    low = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64).view(1, 3, 1, 1)
    high = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    x = low + (high - low) * torch.rand(2, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 2])
    ours = bs.explain(_Reordered(net), x, "lrp", target, low=low, high=high)
    bgr = [2, 1, 0]
    theirs = zennit_lrp(net, x[:, bgr], target, low=low[:, bgr], high=high[:, bgr])
    torch.testing.assert_close(ours[:, bgr], theirs, rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0


class _ChannelsLast(nn.Module):
    """A dense layer over each pixel's channels, after ``permute`` to channels last."""

    def __init__(self) -> None:
        super().__init__()
        self.pixel = nn.Linear(3, 4)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.pixel(x.permute(0, 2, 3, 1))).flatten(1))


def test_lrp_box_per_channel_follows_a_permute_to_channels_last():
    # The first layer sees (N, H, W, C): the box per channel is permuted with
    # the input, not reshaped to that shape (which would mix channels).
    torch.manual_seed(7)
    net = _ChannelsLast().double().eval()
    low = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64).view(1, 3, 1, 1)
    high = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).view(1, 3, 1, 1)
    x = low + (high - low) * torch.rand(2, 3, 4, 4, dtype=torch.float64)
    target = torch.tensor([1, 2])
    ours = bs.explain(net, x, "lrp", target, low=low, high=high)

    class Twin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pixel, self.head = net.pixel, net.head

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.pixel(z)).flatten(1))

    def last(t: torch.Tensor) -> torch.Tensor:
        return t.expand_as(x).permute(0, 2, 3, 1).contiguous()

    theirs = zennit_lrp(Twin(), last(x), target, low=last(low), high=last(high))
    torch.testing.assert_close(ours, theirs.permute(0, 3, 1, 2), rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0


def test_lrp_through_a_relu_on_the_input_before_a_normalisation():
    # relu on the input, then x * c: the box's corners are mapped through both,
    # and the caller's bounds are left as they were. Written relu_, it would clip
    # the caller's x: refused, with x as it was.
    torch.manual_seed(8)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)
    ).double().eval()  # fmt: skip

    class Clipped(nn.Module):
        def __init__(self, relu) -> None:
            super().__init__()
            self.net, self.relu = net, relu

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(self.relu(x) * 2.0)

    x = torch.rand(2, 1, 6, 6, dtype=torch.float64) * 2 - 1
    low = torch.full((2, 1, 6, 6), -1.0, dtype=torch.float64)
    target = torch.tensor([0, 2])
    given = x.clone()
    with pytest.raises(bs.InputError, match=r"^Clipped changes its input in place "):
        bs.explain(Clipped(torch.relu_), x, "lrp", target, low=low, high=1.0)
    assert torch.equal(x, given)
    ours = bs.explain(Clipped(torch.relu), x, "lrp", target, low=low, high=1.0)
    assert bool((low == -1.0).all())
    theirs = zennit_lrp(
        net, 2 * x.clamp(min=0), target, low=torch.zeros_like(x), high=torch.full_like(x, 2.0)
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0


class _Mapped(nn.Module):
    """``net`` on ``f(x)`` for an element-wise map ``f`` written in forward."""

    def __init__(self, net: nn.Module, f) -> None:
        super().__init__()
        self.net, self.f = net, f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.f(x))


_SIGNED = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64).view(1, 3, 1, 1)


@pytest.mark.parametrize(
    ("f", "channels"),
    [
        (lambda x: 1 - x, 3),  # the input second, scale -1
        (lambda x: torch.sub(0.5, x, alpha=2.0), 3),
        (lambda x: x * _SIGNED, 3),  # a negative scale in one channel
        (lambda x: x.mul(_SIGNED).add(1.0), 3),
        (lambda x: x * _SIGNED, 1),  # grey broadcast to three channels
    ],
    ids=["one-minus", "sub-alpha", "signed-scale", "methods", "broadcast"],
)
def test_lrp_through_maps_that_flip_or_broadcast_the_input_is_lrp_of_their_image(f, channels):
    # A negative scale swaps the box's ends; the input as the second operand is
    # still the input; a grey input broadcast to RGB gets the sum of the relevance
    # of its three images. The oracle is zennit on f(x) with the box [f(0), f(1)]
    # put in order.
    torch.manual_seed(10)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).double().eval()  # fmt: skip
    x = torch.rand(2, channels, 6, 6, dtype=torch.float64)
    target = torch.tensor([2, 1])
    ours = bs.explain(_Mapped(net, f), x, "lrp", target)
    ends = f(torch.zeros_like(x)), f(torch.ones_like(x))
    low, high = torch.minimum(*ends), torch.maximum(*ends)
    theirs = zennit_lrp(net, f(x), target, low=low, high=high)
    torch.testing.assert_close(ours, theirs.sum(1, keepdim=True) if channels == 1 else theirs,
                               rtol=1e-10, atol=1e-14)  # fmt: skip
    assert ours.abs().sum() > 0


@pytest.mark.parametrize(
    "transpose", [lambda x: x.transpose(2, 3), lambda x: torch.transpose(x, 2, 3)]
)
def test_lrp_routes_relevance_back_through_a_transpose_before_the_first_layer(transpose):
    torch.manual_seed(11)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double().eval()  # fmt: skip
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    target = torch.tensor([0, 1])
    ours = bs.explain(_Mapped(net, transpose), x, "lrp", target)
    theirs = zennit_lrp(net, x.transpose(2, 3), target)
    torch.testing.assert_close(ours, theirs.transpose(2, 3), rtol=1e-10, atol=1e-14)
    assert not torch.allclose(ours, theirs)  # the images are not symmetric


class _ScaledAfter(nn.Module):
    def __init__(self, scale) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.scale = scale
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale(self.conv(x)))


@pytest.mark.parametrize(
    ("model", "refused"),
    [
        (_Mapped(nn.Identity(), lambda x: 2 / x), "function truediv"),
        (_Mapped(nn.Identity(), lambda x: torch.div(2.0, x)), "function div"),
        (_Mapped(nn.Identity(), lambda x: x * x), "function mul"),
        (_ScaledAfter(lambda h: h.sub(0.5)), "method Tensor.sub"),
    ],
    ids=["c-over-x", "div-c-x", "x-times-x", "sub-after-conv"],
)
def test_lrp_refuses_maps_that_are_no_change_of_the_inputs_coordinates(model, refused):
    # c / x is no affine map; x * x multiplies the input by itself; after the first
    # layer x - c is a layer of the model, which has no rule: all are refused. (x * c
    # there is a layer scale, which passes relevance: test_explain_transformer.)
    if isinstance(model, _Mapped):
        model.net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with pytest.raises(InputError, match=f"lrp has no rule for {refused}"):
        bs.explain(model, torch.rand(1, 3, 6, 6) + 0.5, "lrp", torch.tensor([0]), high=1.5)


def test_lrp_refuses_a_normalize_module_after_the_first_layer():
    tv = pytest.importorskip("torchvision")
    model = nn.Sequential(
        nn.Conv2d(3, 3, 3), tv.transforms.Normalize((0.5,) * 3, (0.2,) * 3), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 2),
    )  # fmt: skip
    with pytest.raises(InputError, match="lrp has no rule for module Normalize"):
        bs.explain(model, torch.rand(1, 3, 6, 6), "lrp", torch.tensor([0]))


class _Squeezed(nn.Module):
    """A dense network on ``(N, 1, D)`` signals, squeezed to ``(N, D)`` first."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.squeeze(1))


def test_lrp_routes_relevance_back_through_a_squeeze_before_the_first_layer():
    torch.manual_seed(12)
    model = _Squeezed().double().eval()
    x = torch.rand(3, 1, 5, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    ours = bs.explain(model, x, "lrp", target)
    theirs = zennit_lrp(model.net, x.squeeze(1), target)
    torch.testing.assert_close(ours, theirs[:, None], rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0


class _Excited(nn.Module):
    """Squeeze-and-excitation as EfficientNet's: ``sigmoid(fc2(relu(fc1(pool(h))))) * h``."""

    def __init__(self, excite: bool = True, depth=None, gate=None) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.excite = excite
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)
        self.gate = nn.Sigmoid() if gate is None else gate
        self.depth = depth
        self.head = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16, 3),
        )  # fmt: skip

    def scale(self, h: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc2(torch.relu(self.fc1(self.pool(h)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.excite:
            h = self.scale(h) * h
        if self.depth is not None:
            h = h + self.depth(h, 0.2, "row", False)
        return self.head(h)


@pytest.mark.parametrize(
    "gate", [None, nn.Hardsigmoid(), F.hardsigmoid], ids=["sigmoid", "hardsigmoid", "function"]
)
def test_lrp_gives_a_gated_product_all_its_relevance_to_the_signal(gate):
    # Signal takes all: relevance passes through g * h to h as through a diagonal layer
    # with the gate's values as weights (a sigmoid gate as EfficientNet's, a hard one as
    # MobileNetV3's). The oracle: zennit on the network without the excitation whose
    # next convolution has the gate of each image folded into its weights
    # (W[:, c] * g[c]), image by image.
    net = _Excited(gate=gate).double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 2])
    ours = bs.explain(net, x, "lrp", target)
    for i in range(2):
        folded = _Excited(excite=False).double().eval()
        folded.load_state_dict(net.state_dict())
        with torch.no_grad():
            folded.head[0].weight.mul_(net.scale(net.stem(x[i : i + 1])).view(1, 4, 1, 1))
        theirs = zennit_lrp(folded, x[i : i + 1], target[i : i + 1])
        torch.testing.assert_close(ours[i : i + 1], theirs, rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0


def test_lrp_passes_torchvisions_stochastic_depth_in_evaluation_mode():
    # EfficientNet's residual branches: the identity in evaluation mode.
    tv = pytest.importorskip("torchvision")
    net = _Excited(excite=False, depth=tv.ops.stochastic_depth).double().eval()
    twin = _Excited(excite=False, depth=lambda h, *a: h).double().eval()
    twin.load_state_dict(net.state_dict())
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([1, 2])
    expected = bs.explain(twin, x, "lrp", target)
    torch.testing.assert_close(bs.explain(net, x, "lrp", target), expected, rtol=0, atol=0)
    assert expected.abs().sum() > 0


def _cancelling_net(logits: int = 1) -> nn.Module:
    """x -> identity -> ReLU -> x1 - x2 -> ReLU -> 1 x (to each logit): the second layer's
    sum is 0 at x1 = x2."""
    net = nn.Sequential(
        nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False), nn.ReLU(),
        nn.Linear(1, logits, bias=False),
    ).double()  # fmt: skip
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        net[4].weight.fill_(1.0)
    return net


@pytest.mark.parametrize("epsilon", [1e-6, 0.25])
def test_lrp_warns_where_relevance_grows_by_dividing_by_a_sum_near_zero(epsilon):
    # Beta-smoothed, the unit whose sum is 0 outputs log 2 / beta and keeps relevance,
    # which the epsilon rule divides by 0 + epsilon. By hand: the first units output
    # h = softplus(0.5) each, the last layer's epsilon rule leaves R_a = a a / (a + eps)
    # with a = log 2, the middle one gives +-h R_a / eps to the two units, and the box
    # rule of the first layer (identity weights, box [0, 1]) x / (x + 1e-6) of that to x.
    net, x = _cancelling_net(), torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    a, h = math.log(2.0), math.log1p(math.exp(0.5))
    r_out = a * a / (a + epsilon)
    expected = torch.tensor([[h, -h]], dtype=torch.float64) * r_out / epsilon * 0.5 / (0.5 + 1e-6)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = bs.explain(net, x, "beta_smooth", 0, beta=1.0, base="lrp", epsilon=epsilon)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=0)
    amplified = [str(w.message) for w in seen if "sums in absolute value" in str(w.message)]
    ratio = float(ours.abs().sum()) / a  # 1.9e6 with epsilon 1e-6, 5.7 with 0.25
    assert (ratio > AMPLIFIED) == (epsilon == 1e-6)
    assert amplified == (
        [
            "lrp: the relevance at the input sums in absolute value to more than 100 times "
            "the largest logit (about 1 where the rules conserve it): the stabiliser "
            "epsilon=1e-06 lets it grow where a dense layer's pre-activation or a residual "
            "addition's sum is near 0 but its unit still gets relevance (as a beta-smoothed "
            "network's softplus units do), and the map is a few spikes; a larger epsilon "
            "(lrp's option epsilon, 0.01 to 0.25; on the command line attack's or explain's "
            "--option lrp.epsilon=0.25, which a sweep of that attack takes, or --option "
            "beta_smooth.epsilon=0.25 where lrp is the base of beta_smooth, as "
            "smoothgrad.epsilon of smoothgrad) bounds it"
        ]
        if epsilon == 1e-6
        else []
    )


def test_lrp_of_a_relu_network_whose_sum_is_near_zero_does_not_warn():
    # With ReLU the unit at sum 0.1 passes relevance in proportion to its output 0.1.
    net, x = _cancelling_net(), torch.tensor([[0.6, 0.5]], dtype=torch.float64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = bs.explain(net, x, "lrp", 0)
    z = 0.1
    r_out = z * z / (z + 1e-6)
    box = x / (x + 1e-6)  # the first layer's z^B rule on identity weights
    expected = torch.tensor([[0.6, -0.5]], dtype=torch.float64) * r_out / (z + 1e-6) * box
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=0)
    assert not [w for w in seen if "sums in absolute value" in str(w.message)]


def test_lrp_judges_the_growth_of_each_image_against_its_own_logit_of_either_sign():
    # The last weight -1 makes the logits negative. The warning compares each image's
    # total |relevance| with its own |logit|: one amplified image of two is warned of,
    # and two conserving images of very different logits are not.
    def ratios(maps, logits):
        return (maps.abs().sum(1) / logits.abs()).tolist()

    def amplified(x, method, **options):
        net = _cancelling_net()  # a new model each time: lrp warns once per model
        with torch.no_grad():
            net[4].weight.fill_(-1.0)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            maps = bs.explain(net, x, method, 0, **options)
        return maps, [w for w in seen if "sums in absolute value" in str(w.message)]

    # Beta-smoothed (beta 1): the second image's middle unit sums to 0, the first's does not.
    x = torch.tensor([[1.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    h = F.softplus(x)
    logits = -F.softplus(h[:, 0] - h[:, 1])
    maps, warned = amplified(x, "beta_smooth", beta=1.0, base="lrp")
    first, second = ratios(maps, logits)
    assert first < 10 and second > 1e5 and len(warned) == 1
    # ReLU: logits -0.001 and -0.2, each image's relevance about 11 and 1.05 times its
    # logit (their sum is 221 times the first logit).
    x = torch.tensor([[0.006, 0.005], [0.205, 0.005]], dtype=torch.float64)
    maps, warned = amplified(x, "lrp")
    logits = -(x[:, 0] - x[:, 1])
    assert ratios(maps, logits) == pytest.approx([0.011 / 0.001, 0.21 / 0.2], rel=1e-2)
    assert not warned


def test_a_residual_addition_is_stabilised_by_epsilon_as_zennits_norm_with_it():
    # The addition divides by its sum + epsilon (zennit's Norm, whose default 1e-6 is
    # lrp's default epsilon): a larger epsilon bounds it where the summands cancel.
    from zennit.rules import Norm

    net, twin = _residual_twins()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 2, 4])
    epsilon = 0.05

    def zennit_with(norm):
        composite = SpecialFirstLayerMapComposite(
            layer_map=[(Sum, norm)]
            + layer_map_base()
            + [(Convolution, ZPlus()), (nn.Linear, Epsilon(epsilon))],
            first_map=[(Convolution, ZBox(0.0, 1.0)), (nn.Linear, ZBox(0.0, 1.0))],
            canonizers=[SequentialMergeBatchNorm()],
        )
        with Gradient(twin, composite) as attributor:
            _, relevance = attributor(x, lambda out: F.one_hot(target, out.shape[1]) * out)
        return relevance

    ours = bs.explain(net, x, "lrp", target, epsilon=epsilon)
    torch.testing.assert_close(ours, zennit_with(Norm(stabilizer=epsilon)), rtol=1e-9, atol=1e-14)
    assert (ours - zennit_with(Norm())).abs().max() > 1e-6 * ours.abs().max()


class _AddWithAlpha(nn.Module):
    """``a(h) + 2 b(h)`` written as ``torch.add(a, b, alpha=2)``, or with the 2 folded into b."""

    def __init__(self, folded: bool) -> None:
        super().__init__()
        torch.manual_seed(21)
        self.first = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        self.a, self.b, self.head = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(6, 3)
        self.folded = folded
        if folded:
            with torch.no_grad():
                self.b.weight *= 2.0
                self.b.bias *= 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        s = self.a(h) + self.b(h) if self.folded else torch.add(self.a(h), self.b(h), alpha=2.0)
        return self.head(torch.relu(s))


def test_a_sum_scaled_by_alpha_shares_relevance_as_the_sum_with_the_factor_folded_in():
    # torch.add(a, b, alpha=2) is a + 2 b: the summand 2 b takes the share 2 b / (a + 2 b),
    # as b does in the same network with the 2 folded into b's weights and bias; the
    # epsilon rule of b's layer then splits it alike (its ratios do not change with the 2).
    net, twin = _AddWithAlpha(False).double().eval(), _AddWithAlpha(True).double().eval()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(net(x), twin(x))
    target = torch.tensor([0, 1, 2])
    ours = bs.explain(net, x, "lrp", target, epsilon=1e-12)
    folded = bs.explain(twin, x, "lrp", target, epsilon=1e-12)
    torch.testing.assert_close(ours, folded, rtol=1e-8, atol=1e-12)
    assert ours.abs().sum() > 0


def test_lrp_of_a_class_whose_logit_is_near_zero_is_no_growth(digits, digits_cnn):
    # Relevance conserved to a logit near 0 is small against the image's largest logit:
    # measured against the explained logit, 64 digits' least likely classes read as
    # growth (over 100 times on image 35), with nothing grown.
    x = digits[0][:64].double()
    net = copy.deepcopy(digits_cnn).double()
    logits = net(x).detach()
    least = logits.abs().argmin(1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        maps = bs.explain(net, x, "lrp", least)
    explained = logits.gather(1, least[:, None]).flatten().abs()
    total = maps.abs().flatten(1).sum(1)
    assert float((total / explained).max()) > AMPLIFIED  # the old measure would warn
    assert float((total / logits.abs().amax(1)).max()) < AMPLIFIED
    assert not [w for w in seen if "sums in absolute value" in str(w.message)]


def test_lrp_folds_batchnorm_with_its_eps_as_torchs_conv_bn_fusion():
    """A BatchNorm of large eps is folded with ``gamma / sqrt(var + eps)``: the map equals
    zennit's on the network that torch's ``fuse_conv_bn_eval`` fuses (no BatchNorm left)."""
    net = with_batchnorm(bn_eps=0.5)
    fused = copy.deepcopy(net)
    for conv, bn in ((0, 1), (3, 4)):
        fused[conv] = fuse_conv_bn_eval(net[conv], net[bn])
        fused[bn] = nn.Identity()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 3])
    torch.testing.assert_close(fused(x), net(x), rtol=1e-12, atol=1e-14)
    ours = bs.explain(net, x, "lrp", target)
    torch.testing.assert_close(ours, zennit_lrp(fused, x, target), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("x2", [0.597, 0.58])
def test_lrp_warns_once_the_growth_passes_the_documented_threshold(x2):
    """ReLU net whose unit sums to ``z = 0.6 - x2``: by hand the input relevance is
    ``(0.6, -x2) z / (z + eps)^2 z * box``, about ``(0.6 + x2) / z`` times the logit ``z``:
    399 for ``x2 = 0.597`` (warned: above AMPLIFIED = 100), 59 for ``x2 = 0.58`` (not)."""
    net, x = _cancelling_net(), torch.tensor([[0.6, x2]], dtype=torch.float64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = bs.explain(net, x, "lrp", 0)
    z = 0.6 - x2
    r_out = z * z / (z + 1e-6)
    box = x / (x + 1e-6)  # the first layer's z^B rule on identity weights
    expected = torch.tensor([[0.6, -x2]], dtype=torch.float64) * r_out / (z + 1e-6) * box
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=0)
    ratio = float(expected.abs().sum()) / z
    assert 50 < ratio < 1000
    warned = [w for w in seen if "sums in absolute value" in str(w.message)]
    assert len(warned) == (1 if ratio > AMPLIFIED else 0)


def test_lrp_refuses_bounds_with_the_values_of_x_in_another_layout():
    """Bounds of shape ``(B, H, W, C)`` for an ``x`` of ``(B, C, H, W)`` have as many values
    as x but do not broadcast to it: refused, not reshaped into a box of mixed-up pixels."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    low = -torch.rand(2, 4, 4, 3, dtype=torch.float64)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(48, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    conv = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).double()
    for net in (flat, conv):
        # Named against x, which the user passed, not the flattened first layer's input.
        said = r"lrp option 'low' of shape \(2, 4, 4, 3\) does not broadcast to x of shape \(2, 3"
        with pytest.raises(InputError, match=said):
            bs.explain(net, x, "lrp", 0, low=low, high=low + 2)


class _CatByAxis(_UnevenCat):
    """:class:`_UnevenCat` joining its branches with ``torch.cat(..., axis=1)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(torch.cat([self.left(h), self.right(h)], axis=1))


def test_lrp_of_a_concatenation_by_axis_matches_zennit():
    # torch.cat takes NumPy's axis for dim: the rule split the relevance on dim 0 and
    # failed with torch's RuntimeError.
    net, twin = _CatByAxis().double().eval(), _UnevenCat().double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    assert_lrp_is_zennits(net, x, torch.tensor([0, 1, 2]), twin=twin)


def test_lrp_names_float_and_per_channel_bounds_of_its_box_in_one_line():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    x = torch.full((1, 3, 4, 4), 5.0)
    for low, high, shown in [
        (0.0, torch.ones(1, 3, 1, 1), "per channel"),
        (torch.zeros(1, 1, 4, 4), 1.0, "per pixel"),
        (torch.zeros(4, 4), 1.0, "per pixel"),  # (H, W): a box per pixel too
        (torch.tensor(0.0), torch.tensor(1.0), "[0.0, 1.0]"),
    ]:
        with pytest.raises(
            InputError, match=f"^x lies outside the lrp input box {re.escape(shown)} of"
        ):
            bs.explain(net, x, "lrp", low=low, high=high)


class _FourWithoutRules(nn.Module):
    def __init__(self, more: bool = False):
        super().__init__()
        self.linear, self.more = nn.Linear(4, 2), more

    def forward(self, x):
        h = self.linear(x.flatten(1))
        out = h.sin() + torch.cos(h) + torch.exp(h) + torch.abs(h)
        return out + torch.atan(h) if self.more else out


def test_lrp_names_up_to_three_other_kinds_without_a_rule_and_marks_more():
    """The first node without a rule is named in full, three other kinds follow, and
    " ..." marks a fourth: exactly three others get no mark."""
    x = torch.rand(2, 1, 2, 2)
    first = "lrp has no rule for method Tensor.sin in the model's own forward (node 'sin') "
    with pytest.raises(
        InputError,
        match=re.escape(first + "(also function cos, function exp, function abs); supported: "),
    ):
        bs.explain(_FourWithoutRules(), x, "lrp", 0)
    with pytest.raises(
        InputError,
        match=re.escape(first + "(also function cos, function exp, function abs ...); "),
    ):
        bs.explain(_FourWithoutRules(more=True), x, "lrp", 0)


def test_lrp_judges_the_growth_against_the_largest_logit_not_the_sum_of_all():
    # _cancelling_net with ten equal logits a = log 2: the relevance grows about 475
    # times the largest (warned); over the sum of the ten |logits| it would be 47.5.
    net = _cancelling_net(logits=10)
    x = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ours = bs.explain(net, x, "beta_smooth", 0, beta=1.0, base="lrp", epsilon=0.004)
    ratio = float(ours.abs().sum()) / math.log(2.0)
    assert 10 * AMPLIFIED > ratio > AMPLIFIED
    assert sum("sums in absolute value" in str(w.message) for w in seen) == 1


@pytest.mark.parametrize("mapped", [False, True], ids=["direct", "normalised-inside"])
def test_lrp_bounds_of_shape_b_c_h_w_hold_one_box_per_item(mapped):
    # lrp.per_item_options: low/high of shape (B, C, 1, 1) are a box per image, also
    # when the box is carried through a normalisation written in forward. The oracle
    # is zennit item by item, each with its own box (of the normalised data if mapped).
    torch.manual_seed(21)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    ).double().eval()  # fmt: skip
    low = torch.tensor([[-1.0, 0.0], [-0.5, -2.0], [0.0, -0.25]], dtype=torch.float64)
    low = low.view(3, 2, 1, 1)
    high = low + torch.tensor([2.0, 1.5, 3.0], dtype=torch.float64).view(3, 1, 1, 1)
    x = low + (high - low) * torch.rand(3, 2, 5, 5, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    f = (lambda t: (t - 0.25) / 0.5) if mapped else (lambda t: t)
    ours = bs.explain(_Mapped(net, f) if mapped else net, x, "lrp", target, low=low, high=high)
    for i in range(3):
        one = slice(i, i + 1)
        theirs = zennit_lrp(net, f(x[one]), target[one], low=f(low[one]), high=f(high[one]))
        torch.testing.assert_close(ours[one], theirs, rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0


def volumetric() -> nn.Module:
    """Conv3d first (z^B), then ConvTranspose3d and Conv3d (z+), average pools of 3-d data."""
    torch.manual_seed(22)
    return nn.Sequential(
        nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose3d(3, 3, 2, stride=2), nn.ReLU(),
        nn.AvgPool3d(2), nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(2), nn.Flatten(), nn.Linear(4 * 8, 3),
    ).double().eval()  # fmt: skip


def sequence() -> nn.Module:
    """Conv1d first, a ConvTranspose1d after it, one-dimensional average pools."""
    torch.manual_seed(23)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
        nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(3), nn.Flatten(), nn.Linear(4 * 3, 3),
    ).double().eval()  # fmt: skip


@pytest.mark.parametrize(
    ("build", "shape"), [(volumetric, (2, 1, 4, 4, 4)), (sequence, (2, 2, 12))], ids=["3d", "1d"]
)
def test_lrp_of_three_and_one_dimensional_layers_and_average_pools_matches_zennit(build, shape):
    # zennit's types.Convolution holds Conv3d and every ConvTranspose (z+ after the
    # first layer) and types.AvgPool the 1-d and 3-d (adaptive) average pools (Norm).
    x = torch.rand(*shape, dtype=torch.float64)
    assert_lrp_is_zennits(build(), x, torch.tensor([2, 0]))


def test_lrp_folds_a_batchnorm_without_affine_parameters_as_torchs_fusion():
    # BatchNorm2d(affine=False) is (x - mean) / sqrt(var + eps) alone; torch's
    # fuse_conv_bn_eval takes its missing weight as 1 and bias as 0, and zennit on the
    # fused twin is the oracle.
    torch.manual_seed(24)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    ).double().eval()  # fmt: skip
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 1.5)
    twin = nn.Sequential(fuse_conv_bn_eval(net[0], net[1]), *net[2:]).eval()
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(twin(x), net(x), rtol=1e-12, atol=1e-14)
    assert_lrp_is_zennits(net, x, torch.tensor([0, 2, 1]), twin=twin)


def test_lrp_refuses_to_fold_a_batchnorm_without_running_statistics():
    # Without running statistics a BatchNorm normalises by the batch's own, even in
    # evaluation mode: no fixed affine map to fold into the convolution.
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    ).eval()  # fmt: skip
    with pytest.raises(InputError, match=r"running statistics; BatchNorm2d has track_running"):
        bs.explain(net, torch.rand(2, 1, 6, 6), "lrp", torch.tensor([0, 1]))


def test_lrp_checks_the_box_of_a_first_layer_that_takes_z_b_from_the_layers_map():
    # A composite whose ``first`` is empty gives the first layer the rule of ``layers``:
    # z^B here, so x far outside its box [0, 1] is refused as with the default composite.
    chosen = Composite(layers={nn.Conv2d: "zbox", nn.Linear: "epsilon"})
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = 5 + torch.rand(2, 1, 6, 6)
    with pytest.raises(InputError, match=r"x lies outside the lrp input box \[0.0, 1.0\]"):
        bs.explain(net, x, "lrp", torch.tensor([0, 1]), composite=chosen)


def _conv_head(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).double().eval()  # fmt: skip


def test_lrp_carries_the_box_through_an_average_pool_before_the_first_layer():
    # An average of values in [0, 1] lies in [0, 1]: the first convolution keeps the box
    # [0, 1], and the pool shares relevance as zennit's Norm; zennit on the whole model
    # (its first layer is the convolution) is the oracle.
    net = nn.Sequential(nn.AvgPool2d(2), *_conv_head(25)).double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    assert_lrp_is_zennits(net, x, torch.tensor([2, 0, 1]))


class _ChannelSum(nn.Module):
    """``head(x[:, :1] + x[:, 1:])``: the first layer sees a sum of two input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.head = _conv_head(26)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, :1] + x[:, 1:])


def test_lrp_carries_the_box_through_a_sum_of_inputs_before_the_first_layer():
    # The sum of two channels in [0, 1] lies in [0, 2]: zennit on the sum with that box
    # gives its relevance, which the addition shares in proportion to the summands
    # (Norm, stabilised by 1e-6 as zennit's), worked out here by hand.
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    target = torch.tensor([1, 2, 0])
    model = _ChannelSum()
    ours = bs.explain(model, x, "lrp", target)
    total = x[:, :1] + x[:, 1:]
    r_sum = zennit_lrp(model.head, total, target, low=0.0, high=2.0)
    torch.testing.assert_close(ours, x * r_sum / (total + 1e-6), rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0


class _AfterConv(nn.Module):
    """``head(f(conv(x)))`` for a map ``f`` of the first layer's output."""

    def __init__(self, f) -> None:
        super().__init__()
        self.conv, self.f = nn.Conv2d(1, 2, 3), f
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.f(self.conv(x)))


@pytest.mark.parametrize(
    ("f", "named"),
    [
        (lambda h: torch.mul(h, other=torch.tanh(h)), "function mul"),
        (
            lambda h: torch.div(h, 2.0, rounding_mode="floor"),
            "function div with rounding_mode='floor'",
        ),
    ],
    ids=["product-by-keyword", "rounded-quotient"],
)
def test_lrp_refuses_products_and_quotients_that_scale_by_no_constant(f, named):
    # h * c and h / c pass relevance; a second factor that depends on the input (also
    # when passed by keyword) or a rounded quotient (floor(h / 2) is piecewise constant,
    # no scaling of h) has no rule.
    with pytest.raises(InputError, match=rf"lrp has no rule for {named}"):
        bs.explain(_AfterConv(f), torch.rand(2, 1, 6, 6), "lrp", torch.tensor([0, 1]))


class _RoundedInput(nn.Module):
    """``conv(q(x))`` for a quotient ``q`` of the input by 0.25."""

    def __init__(self, q) -> None:
        super().__init__()
        self.q, self.conv = q, nn.Conv2d(1, 2, 3)
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.q(x)))


@pytest.mark.parametrize(
    ("q", "named"),
    [
        (
            lambda x: torch.div(x, 0.25, rounding_mode="floor"),
            "function div with rounding_mode='floor'",
        ),
        (
            lambda x: x.div(0.25, rounding_mode="trunc"),
            "method Tensor.div with rounding_mode='trunc'",
        ),
        (lambda x: x // 0.25, "function floordiv"),
    ],
    ids=["function", "method", "operator"],
)
def test_lrp_refuses_a_rounded_quotient_of_the_input_as_after_the_first_layer(q, named):
    # x / c is a change of coordinates before the first layer; floor(x / c) is none (it
    # quantises x), whichever way it is spelled.
    with pytest.raises(InputError, match=rf"lrp has no rule for {named} in the model's own"):
        bs.explain(_RoundedInput(q), torch.rand(2, 1, 6, 6), "lrp", torch.tensor([0, 1]))


def test_lrp_passes_through_an_unrounded_quotient_of_the_input():
    # rounding_mode=None is the true quotient: the map of conv(4 x) on x, which is the map
    # of conv on 4 x with the box [0, 4] (zennit the oracle).
    torch.manual_seed(5)
    model = _RoundedInput(lambda x: torch.div(x, 0.25, rounding_mode=None)).double().eval()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    target = torch.tensor([0, 2])
    ours = bs.explain(model, x, "lrp", target)
    net = nn.Sequential(model.conv, *model.head)
    theirs = zennit_lrp(net, x / 0.25, target, low=0.0, high=4.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-14)
    assert ours.abs().sum() > 0


def test_lrp_refuses_a_bool_epsilon():
    # True is an int to Python, but no stabiliser: refused as gamma=True is.
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(InputError, match=r"lrp option 'epsilon' must be a float >= 0; got True"):
        bs.explain(net, torch.rand(1, 1, 2, 2), "lrp", torch.tensor([0]), epsilon=True)


def test_lrp_folds_the_shift_of_a_batchnorm_into_a_convolution_without_bias():
    # A bias-free convolution takes the BatchNorm's shift as its bias: after the first
    # layer z+ keeps its positive part in the denominator. Oracle: zennit on the fused twin.
    torch.manual_seed(27)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    ).double().eval()  # fmt: skip
    _random_statistics(net[3])
    twin = nn.Sequential(*net[:2], fuse_conv_bn_eval(net[2], net[3]), *net[4:]).eval()
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(twin(x), net(x), rtol=1e-12, atol=1e-14)
    assert_lrp_is_zennits(net, x, torch.tensor([2, 1, 0]), twin=twin)
