"""LRP composites against Zennit's composites of the same name, and their input derivative."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    SpecialFirstLayerMapComposite,
    layer_map_base,
)
from zennit.rules import AlphaBeta, Epsilon, Gamma, WSquare, ZPlus
from zennit.types import Convolution

import betasmooth as bs
from betasmooth.explain.composites import alpha_beta
from betasmooth.explain.propagation import Composite
from nets import plain_cnn, residual_net, vgg_small
from test_explain_lrp import (
    ZennitResidual,
    _relu_pattern,
    folded_twin,
    mlp,
    preactivation,
    signed_conv_input,
    transposed_middle,
    with_batchnorm,
)

ZENNIT = {
    "epsilon_gamma_box": lambda: EpsilonGammaBox(low=0.0, high=1.0, canonizers=_canon()),
    "epsilon_plus": lambda: EpsilonPlus(canonizers=_canon()),
    "epsilon_plus_flat": lambda: EpsilonPlusFlat(canonizers=_canon()),
    "epsilon_alpha2_beta1": lambda: EpsilonAlpha2Beta1(canonizers=_canon()),
    "epsilon_alpha2_beta1_flat": lambda: EpsilonAlpha2Beta1Flat(canonizers=_canon()),
}


def _canon():
    return [SequentialMergeBatchNorm()]


def _residual():
    """The residual net and a twin zennit can hook; tiny BatchNorm eps, as in test_explain_lrp."""
    net = residual_net().double()
    twin = ZennitResidual().double().eval()
    twin.load_state_dict(net.state_dict())
    for bn in (net.bn1, net.bn2, twin.bn1, twin.bn2):
        bn.eps = 1e-12
    return net, twin


def _same(build):
    def pair():
        net = build()
        return net, net

    return pair


def signed_middle() -> nn.Module:
    """A convolution after the first that feeds another one directly: its negative
    outputs get relevance (a ReLU after it would give them none)."""
    torch.manual_seed(6)
    return (
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Flatten(),
            nn.Linear(64, 5),
        )
        .double()
        .eval()
    )


def transposed_net() -> nn.Module:
    """ConvTranspose2d first (16 px to 32; stride, padding, output padding) and in the
    middle (groups, dilation), fed the first one's signed output."""
    torch.manual_seed(7)
    return (
        nn.Sequential(
            nn.ConvTranspose2d(1, 4, 3, stride=2, padding=1, output_padding=1),
            nn.ConvTranspose2d(4, 4, 3, padding=2, groups=2, dilation=2),
            nn.ReLU(),
            nn.MaxPool2d(8),
            nn.Flatten(),
            nn.Linear(64, 5),
        )
        .double()
        .eval()
    )


def _transposed_batchnorm():
    net = transposed_middle(groups=2, batchnorm=True)
    return net, folded_twin(net)


NETS = {
    "plain": _same(lambda: plain_cnn().double()),
    "batchnorm": _same(lambda: with_batchnorm(bn_eps=1e-12)),
    # A BatchNorm after a ReLU, not foldable: zennit's Pass.
    "preactivation": _same(preactivation),
    "residual": _residual,
    "signed": _same(signed_conv_input),
    "signed-middle": _same(signed_middle),
    # A first layer that is dense: the flat composites make it flat too.
    "mlp": _same(mlp),
    # Zennit's composites give ConvTranspose the rules of Conv (types.Convolution).
    "transposed-first": _same(transposed_net),
    # A BatchNorm after a ConvTranspose of 2 groups, which zennit's canonizer cannot
    # merge: the twin has it folded by hand.
    "transposed-batchnorm": _transposed_batchnorm,
}


def zennit_map(net, composite, x, target):
    with Gradient(net, composite) as attributor:
        _, relevance = attributor(x, lambda out: F.one_hot(target, out.shape[1]) * out)
    return relevance


@pytest.mark.parametrize("arch", sorted(NETS))
@pytest.mark.parametrize("name", sorted(ZENNIT))
def test_composite_equals_zennit(arch, name):
    net, twin = NETS[arch]()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 2, 4])
    ours = bs.explain(net, x, "lrp", target, composite=name)
    theirs = zennit_map(twin, ZENNIT[name](), x, target)
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_composites_differ_from_each_other():
    net = vgg_small().double()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    maps = [bs.explain(net, x, "lrp", 1, composite=name) for name in (*ZENNIT, "epsilon_plus_box")]
    for i, a in enumerate(maps):
        for b in maps[i + 1 :]:
            assert (a - b).abs().max() > 1e-6 * a.abs().max()


@pytest.mark.parametrize("gamma", [0.5, 0.0])
def test_custom_composite_with_gamma_and_w_square_equals_zennit(gamma):
    # gamma 0 is allowed: the gamma rule is then LRP-0 (zennit's Gamma(0.0)).
    net = vgg_small().double()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 0, 3])
    ours = bs.explain(
        net, x, "lrp", target, gamma=gamma, epsilon=0.01,
        composite=Composite({nn.Conv2d: "gamma", nn.Linear: "epsilon"}, {nn.Conv2d: "w_square"}),
    )  # fmt: skip
    composite = SpecialFirstLayerMapComposite(
        layer_map=layer_map_base() + [(Convolution, Gamma(gamma)), (nn.Linear, Epsilon(0.01))],
        first_map=[(Convolution, WSquare())],
    )
    torch.testing.assert_close(ours, zennit_map(net, composite, x, target), rtol=1e-9, atol=1e-12)


def test_alpha1_beta0_is_zplus():
    net = signed_conv_input()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    ab = Composite({nn.Conv2d: alpha_beta(1.0, 0.0), nn.Linear: "epsilon"})
    plus = bs.explain(net, x, "lrp", 1, composite="epsilon_plus")
    torch.testing.assert_close(bs.explain(net, x, "lrp", 1, composite=ab), plus)
    composite = SpecialFirstLayerMapComposite(
        layer_map=layer_map_base() + [(Convolution, ZPlus()), (nn.Linear, Epsilon())], first_map=[]
    )
    torch.testing.assert_close(plus, zennit_map(net, composite, x, torch.tensor([1, 1])))


@pytest.mark.parametrize(("alpha", "beta"), [(3.0, 1.0), (1.5, 1.0), (0.5, -0.5), (-1.0, -2.0)])
def test_alpha_beta_refuses_what_zennits_alpha_beta_refuses(alpha, beta):
    # Zennit's AlphaBeta takes alpha, beta >= 0 with alpha - beta = 1 only: the rule scales
    # the relevance it passes on by alpha - beta (bias aside), so (3, 1) would double it.
    with pytest.raises(ValueError):
        AlphaBeta(alpha, beta)
    # The message names the pair as given, alpha first.
    with pytest.raises(
        ValueError,
        match=rf"^alpha-beta needs alpha, beta >= 0 and alpha - beta = 1; got {alpha}, {beta}$",
    ):
        alpha_beta(alpha, beta)


@pytest.mark.parametrize("name", ["epsilon_gamma_box", "epsilon_alpha2_beta1", "epsilon_plus_flat"])
def test_composite_input_derivative_matches_finite_difference(name):
    net = vgg_small().double()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 3])
    v, u = torch.randn_like(x), torch.randn_like(x)
    xg = x.clone().requires_grad_(True)
    h = bs.explain(net, xg, "lrp", target, create_graph=True, composite=name, epsilon=1e-3)
    (grad,) = torch.autograd.grad((h * v).sum(), xg)
    step = 1e-6
    pattern = _relu_pattern(net, x)
    for sign in (1, -1):
        flipped = _relu_pattern(net, x + sign * step * u)
        assert all(torch.equal(a, b) for a, b in zip(pattern, flipped))

    def f(z):
        return (bs.explain(net, z, "lrp", target, composite=name, epsilon=1e-3) * v).sum()

    numeric = (f(x + step * u) - f(x - step * u)) / (2 * step)
    analytic = (grad * u).sum()
    assert analytic.abs() > 1e-3
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    ("options", "error", "fragments"),
    [
        ({"composite": "epsilon_gamma"}, ValueError,
         ["unknown lrp composite 'epsilon_gamma'; expected", "epsilon_gamma_box",
          "epsilon_plus_flat"]),
        ({"composite": "EpsilonAlpha2Beta1Flat"}, ValueError,
         ["unknown lrp composite 'EpsilonAlpha2Beta1Flat' (Zennit's EpsilonAlpha2Beta1Flat is "
          "'epsilon_alpha2_beta1_flat' here); expected"]),
        ({"composite": Composite({nn.Linear: "epsilon"})}, ValueError,
         ["no rule for Conv2d", "nn.Conv2d"]),
        ({"gamma": -1.0}, ValueError, ["'gamma' must be a float >= 0"]),
    ],
)  # fmt: skip
def test_bad_composite(options, error, fragments):
    with pytest.raises(error) as info:
        bs.explain(vgg_small().double(), torch.rand(1, 1, 16, 16).double(), "lrp", 0, **options)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_epsilon_gamma_box_on_a_first_dense_layer_is_zennits():
    # Zennit gives the box rule to a first convolution only; a first Linear keeps epsilon.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    with Gradient(net, EpsilonGammaBox(low=0.0, high=1.0)) as attributor:
        _, theirs = attributor(x.clone().requires_grad_(True), lambda y: F.one_hot(target, 3) * y)
    ours = bs.explain(net, x, "lrp", target, composite="epsilon_gamma_box")
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)


class _AddWithAlpha(nn.Module):
    """ReLU branches summed by ``torch.add(a, b, alpha=alpha)``; branch b scaled by ``scale``."""

    def __init__(self, alpha: float = 1.0, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.out = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 3)
        self.alpha = alpha
        with torch.no_grad():
            self.b.weight.mul_(scale)
            self.b.bias.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.a(x)), torch.relu(self.b(x))
        return self.out(torch.add(a, b, alpha=self.alpha))


def test_lrp_splits_a_sum_with_alpha_as_the_sum_of_the_scaled_branch():
    x = torch.rand(4, 6, dtype=torch.float64)
    with_alpha, scaled = _AddWithAlpha(alpha=2.0).double(), _AddWithAlpha(scale=2.0).double()
    torch.testing.assert_close(with_alpha(x), scaled(x))
    options = {"composite": "epsilon_plus", "epsilon": 0.0}
    torch.testing.assert_close(
        bs.explain(with_alpha, x, "lrp", 0, **options),
        bs.explain(scaled, x, "lrp", 0, **options),
        rtol=1e-5,
        atol=1e-8,
    )


def _conv_nd(dims: int, side: int) -> nn.Module:
    # A transposed convolution in the middle too: zennit's types.Convolution holds
    # ConvTranspose1d and ConvTranspose3d, so its composites give them the rules of Conv.
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    transposed = {1: nn.ConvTranspose1d, 3: nn.ConvTranspose3d}[dims]
    pool = {1: nn.MaxPool1d, 3: nn.MaxPool3d}[dims]
    # A seed whose net gives no image an all-zero map (the test refuses one: it compares nothing).
    torch.manual_seed(dims + 1)
    return nn.Sequential(
        conv(2, 3, 3, padding=1), nn.ReLU(), transposed(3, 3, 3, padding=1), nn.ReLU(),
        conv(3, 3, 3, padding=1), nn.ReLU(), pool(2),
        nn.Flatten(), nn.Linear(3 * (side // 2) ** dims, 4),
    ).double().eval()  # fmt: skip


@pytest.mark.parametrize(("dims", "side"), [(1, 16), (3, 4)])
@pytest.mark.parametrize("name", sorted(ZENNIT))
def test_composites_on_signals_and_volumes_equal_zennit(dims, side, name):
    # Zennit's composites give Conv1d, Conv3d and their transposed ones the rules of Conv2d.
    net = _conv_nd(dims, side)
    x = torch.rand(
        2, 2, *[side] * dims, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    target = torch.tensor([0, 3])
    ours = bs.explain(net, x, "lrp", target, composite=name)
    assert (ours.flatten(1).abs().sum(1) > 0).all()
    theirs = zennit_map(net, ZENNIT[name](), x, target)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1"])
def test_a_composite_without_a_box_explains_inputs_of_any_range_as_zennit(name):
    """Without the z^B rule no box bounds x: inputs in [-3, 3], which the default composite
    refuses for its box [0, 1], are explained, and the map is zennit's."""
    net = plain_cnn().double()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64) * 6 - 3
    target = torch.tensor([0, 3])
    with pytest.raises(bs.InputError, match="outside the lrp input box"):
        bs.explain(net, x, "lrp", target)
    ours = bs.explain(net, x, "lrp", target, composite=name)
    theirs = zennit_map(net, ZENNIT[name](), x, target)
    assert ours.abs().sum() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_gamma_gives_an_output_of_exactly_zero_no_relevance_as_zennit():
    # Zennit's Gamma shares relevance by z > 0 and z < 0 alone: an output with z = 0 passes
    # none on. A flat rule above it sends it relevance all the same (flat ignores its input).
    # Output 3 = 2 * 0 + 3 * 1: flat gives each hidden unit 1.5; unit 0 (z = 0) drops its
    # share and unit 1 (z = 0.5 + 0.5, weights lifted to 1.25 alike) splits its 1.5 evenly.
    from zennit.rules import Flat

    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 1.0]]))
        net[1].weight.copy_(torch.tensor([[2.0, 3.0]]))
        net[0].bias.zero_()
        net[1].bias.zero_()
    x = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    assert net[0](x)[0, 0] == 0
    ours = bs.explain(
        net, x, "lrp", 0, composite=Composite({nn.Linear: "flat"}, {nn.Linear: "gamma"})
    )
    composite = SpecialFirstLayerMapComposite(
        layer_map=[(nn.Linear, Flat())], first_map=[(nn.Linear, Gamma(0.25))]
    )
    theirs = zennit_map(net, composite, x, torch.tensor([0]))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    expected = torch.tensor([[0.75, 0.75]], dtype=torch.float64)  # stabiliser 1e-6 aside
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
