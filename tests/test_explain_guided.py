"""Guided backprop against captum, also for functional ReLUs and beta-smoothed models."""

from __future__ import annotations

import pytest
import torch
from captum.attr import GuidedBackprop
from torch import nn
from torch.nn import functional as F

import betasmooth as bs
from nets import ResidualNet, plain_cnn, residual_net, vgg_small

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum.*")


def captum_guided(net, x, target):
    return GuidedBackprop(net).attribute(x, target=target)


@pytest.mark.parametrize("build", [plain_cnn, vgg_small], ids=["plain_cnn", "vgg_small"])
def test_guided_backprop_matches_captum(build):
    net = build().double()
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3])
    ours = bs.explain(net, x, "guided_backprop", target)
    torch.testing.assert_close(ours, captum_guided(net, x, target), rtol=1e-12, atol=1e-15)
    # Guided backprop differs from the plain gradient on these nets.
    assert not torch.allclose(ours, bs.explain(net, x, "gradient", target))


def test_guided_backprop_leaves_relu6_alone_like_captum():
    # Captum's rule applies to ReLU modules only; ReLU6 passes the gradient.
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU6(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 16 * 16, 3),
    ).double().eval()  # fmt: skip
    x = 4 * torch.rand(3, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    ours = bs.explain(net, x, "guided_backprop", target)
    torch.testing.assert_close(ours, captum_guided(net, x, target), rtol=1e-12, atol=1e-15)


class Clamped(nn.Module):
    """A ReLU module, then activations that guided backprop leaves to the plain gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.relu, self.relu6, self.leaky = nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1)
        self.hardswish = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.clamp(self.b(self.relu(self.a(x))), min=0)
        return self.c(self.hardswish(self.leaky(self.relu6(h))))


class Direct(nn.Module):
    """Activation modules it holds but does not run; their functions called directly."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)
        self.relu, self.relu6, self.gelu = nn.ReLU(), nn.ReLU6(), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.hardtanh(self.relu(self.a(x)), 0.0, 6.0))


def test_the_warnings_name_what_ran_not_the_modules_that_sit_unused():
    # Direct runs hardtanh by itself: named so, not as its unused ReLU6; a model with
    # no ReLU names the activation it ran (silu), not its unused GELU.
    x = torch.rand(2, 6, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning) as caught:
        bs.explain(Direct(), x, "guided_backprop", torch.tensor([0, 1]))
    assert [str(w.message) for w in caught if str(w.message).startswith("Direct")] == [
        "Direct: guided_backprop acts on ReLU only; these activations pass "
        "their plain gradient: hardtanh"
    ]
    net = Direct()
    net.forward = lambda h: net.b(F.silu(net.a(h)))
    with pytest.warns(UserWarning) as caught:
        bs.explain(net, x, "beta_smooth", torch.tensor([0, 1]), beta=2.0)
    assert [str(w.message) for w in caught if str(w.message).startswith("Direct")] == [
        "Direct: no ReLU was called in forward (its activations: silu); "
        "beta-smoothing changed nothing"
    ]


def test_guided_backprop_names_the_activations_it_leaves_alone():
    # A clamp, ReLU6, LeakyReLU and Hardswish pass their plain gradient, as in Captum,
    # which guides nn.ReLU only; the user learns which, by the names of the modules
    # (ReLU6 runs hardtanh), as beta_smooth says what stays kinked.
    torch.manual_seed(2)
    net = Clamped().double()
    x = 2 * torch.rand(4, 6, dtype=torch.float64) - 0.5
    target = torch.tensor([0, 1, 2, 0])
    with pytest.warns(UserWarning) as caught:
        ours = bs.explain(net, x, "guided_backprop", target)
    said = [str(w.message) for w in caught if "pass their plain gradient" in str(w.message)]
    assert said == [
        "Clamped: guided_backprop acts on ReLU only; these activations pass "
        "their plain gradient: Hardswish, LeakyReLU, ReLU6, clamp(min=0)"
    ]
    torch.testing.assert_close(ours, captum_guided(net, x, target), rtol=1e-12, atol=1e-15)
    assert not torch.allclose(ours, bs.explain(net, x, "gradient", target))


class ModuleReluResidual(ResidualNet):
    """:class:`ResidualNet` with its three functional ReLUs as ``nn.ReLU`` modules."""

    def __init__(self) -> None:
        super().__init__()
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu1(self.bn1(self.conv1(x)))
        b = self.relu2(self.bn2(self.conv2(a)))
        return self.head(self.relu3(self.pool(a + b)))


def test_guided_backprop_covers_functional_relu():
    # residual_net calls F.relu, torch.relu and Tensor.relu, which captum's
    # module hooks cannot see; the same weights with nn.ReLU modules can.
    net = residual_net().double()
    twin = ModuleReluResidual().double().eval()
    twin.load_state_dict(net.state_dict())
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([4, 3, 2, 1])
    ours = bs.explain(net, x, "guided_backprop", target)
    torch.testing.assert_close(ours, captum_guided(twin, x, target), rtol=1e-12, atol=1e-15)
    assert not torch.allclose(captum_guided(net, x, target), ours)


class SoftplusReLU(nn.ReLU):
    """An ``nn.ReLU`` (so captum hooks it) whose forward is softplus_beta."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(x, self.beta)


def softplus_twin(net: nn.Sequential, beta: float) -> nn.Sequential:
    return nn.Sequential(*(SoftplusReLU(beta) if isinstance(m, nn.ReLU) else m for m in net)).eval()


def test_guided_backprop_on_smoothed_model_masks_with_sigmoid():
    net = plain_cnn().double()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 2, 4])
    ours = bs.explain(bs.smooth(net, 3.0), x, "guided_backprop", target)
    expected = captum_guided(softplus_twin(net, 3.0), x, target)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-14)


def test_guided_backprop_create_graph_matches_finite_difference():
    net = bs.smooth(vgg_small().double(), 5.0)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 2])
    v, u = torch.randn_like(x), torch.randn_like(x)
    xg = x.clone().requires_grad_(True)
    h = bs.explain(net, xg, "guided_backprop", target, create_graph=True)
    torch.testing.assert_close(h, bs.explain(net, x, "guided_backprop", target))
    (grad,) = torch.autograd.grad((h * v).sum(), xg)

    def f(z):
        return (bs.explain(net, z, "guided_backprop", target) * v).sum()

    step = 1e-5
    numeric = (f(x + step * u) - f(x - step * u)) / (2 * step)
    analytic = (grad * u).sum()
    assert analytic.abs() > 1e-3
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-9)
