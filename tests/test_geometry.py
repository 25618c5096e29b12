"""Curvature estimates against closed forms, dense autograd Hessians and numpy.linalg.eigh."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import betasmooth as bs
from betasmooth.geometry import curvature, theorem1_check
from nets import PatchAttention, SqueezeExcite, plain_cnn, residual_net


def neurons(w: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
    """``g(x) = sum_j relu(w_j.x + b_j)``, one output, float64."""
    k, d = w.shape
    net = nn.Sequential(
        nn.Linear(d, k, bias=bias is not None), nn.ReLU(), nn.Linear(k, 1, bias=False)
    )
    net = net.double()
    with torch.no_grad():
        net[0].weight.copy_(w)
        if bias is not None:
            net[0].bias.copy_(bias)
        net[2].weight.fill_(1.0)
    return net.eval()


def exact_softplus_geometry(w: np.ndarray, b: np.ndarray, x: np.ndarray, beta: float):
    """Gradient and Hessian of ``sum_j softplus_beta(w_j.x + b_j)`` by hand, and its curvatures."""
    s = 1 / (1 + np.exp(-beta * (w @ x + b)))
    grad = s @ w
    hess = (w.T * (beta * s * (1 - s))) @ w
    n = grad / np.linalg.norm(grad)
    proj = np.eye(len(x)) - np.outer(n, n)
    return {
        "hessian_norm": np.abs(np.linalg.eigvalsh(hess)).max(),
        "principal_curvature": np.abs(np.linalg.eigvalsh(proj @ hess @ proj)).max()
        / np.linalg.norm(grad),
        "hessian_frobenius": np.linalg.norm(hess),
        "gradient_norm": np.linalg.norm(grad),
    }


def test_single_softplus_unit_closed_form():
    torch.manual_seed(1)
    d, beta = 7, 3.0
    w = torch.randn(1, d, dtype=torch.float64)
    x = 0.3 * torch.randn(5, d, dtype=torch.float64)
    out = curvature(bs.smooth(neurons(w), beta), x)
    s = torch.sigmoid(beta * (x @ w[0]))
    expected = beta * s * (1 - s) * w.square().sum()
    torch.testing.assert_close(out["hessian_norm"], expected, rtol=1e-10, atol=0)
    assert (out["principal_curvature"] <= 1e-10 * expected).all()
    torch.testing.assert_close(out["gradient_norm"], s * w.norm(), rtol=1e-12, atol=0)


@settings(max_examples=15, deadline=None)
@given(
    beta=st.floats(0.2, 50.0),
    d=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_single_unit_hessian_norm_property(beta, d, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, d, generator=g, dtype=torch.float64)
    x = torch.randn(3, d, generator=g, dtype=torch.float64) / (beta * w.norm())
    out = curvature(bs.smooth(neurons(w), beta), x, iterations=3)
    s = torch.sigmoid(beta * (x @ w[0]))
    torch.testing.assert_close(
        out["hessian_norm"], beta * s * (1 - s) * w.square().sum(), rtol=1e-9, atol=1e-300
    )
    assert (out["principal_curvature"] <= 1e-9 * out["hessian_norm"]).all()


def test_two_neurons_hand_computed():
    torch.manual_seed(2)
    d, beta = 6, 2.0
    w = torch.randn(2, d, dtype=torch.float64)
    b = torch.randn(2, dtype=torch.float64) * 0.2
    x = 0.4 * torch.randn(4, d, dtype=torch.float64)
    out = curvature(bs.smooth(neurons(w, b), beta), x, tol=0, probes=2000, seed=3)
    for i in range(x.shape[0]):
        exact = exact_softplus_geometry(w.numpy(), b.numpy(), x[i].numpy(), beta)
        for key in ("hessian_norm", "principal_curvature", "gradient_norm"):
            assert out[key][i].item() == pytest.approx(exact[key], rel=1e-9), key
        # Hutchinson with 2000 probes: a few percent
        assert out["hessian_frobenius"][i].item() == pytest.approx(
            exact["hessian_frobenius"], rel=0.05
        )


@pytest.mark.parametrize("c", [1e-9, 1e-22, 1e-30, 1e20, 1e-40, 1e-44])
def test_principal_curvature_of_a_float32_logit_with_a_tiny_gradient(c):
    # Scaling the logit by c scales its gradient and Hessian by c and leaves the
    # principal curvature unchanged; at c = 1e-9 the float32 gradient norm lies
    # far below float32's eps (1.2e-7) but far above its smallest normal number;
    # at 1e-22 and 1e-30 its squares are subnormal or zero, at 1e20 infinite. At
    # 1e-40 and 1e-44 the gradient entries themselves are subnormal, with 3 or fewer
    # digits: the rescaling must bring them into normal numbers and stay finite
    # (it needs more than 2^127 at 1e-44).
    torch.manual_seed(2)
    d, beta = 6, 2.0
    w = torch.randn(2, d, dtype=torch.float64)
    b = torch.randn(2, dtype=torch.float64) * 0.2
    x = 0.4 * torch.randn(4, d, dtype=torch.float64)
    net = neurons(w, b)
    with torch.no_grad():
        net[2].weight.fill_(c)
    out = curvature(bs.smooth(net.float(), beta), x.float(), tol=0)
    for i in range(x.shape[0]):
        exact = exact_softplus_geometry(w.numpy(), b.numpy(), x[i].numpy(), beta)
        assert out["principal_curvature"][i].item() == pytest.approx(
            exact["principal_curvature"], rel=1e-4
        )
        # A subnormal c is not itself held in float32 to 1e-4: only the curvature,
        # which does not depend on it, is compared there.
        for key in ("hessian_norm", "gradient_norm") if c > 1e-38 else ():
            # abs=0: the default absolute tolerance, 1e-12, would accept any c * value.
            assert out[key][i].item() == pytest.approx(c * exact[key], rel=1e-4, abs=0), key


class _Square(nn.Module):
    """Logits (|x|^2, -|x|^2): Hessian 2 I, gradient 2 x, level sets spheres of radius |x|."""

    def forward(self, x):
        g = x.flatten(1).square().sum(1)
        return torch.stack([g, -g], 1)


@pytest.mark.parametrize("eps", [1.0, 1e-19, 1e-30])
def test_a_tiny_gradient_beside_a_hessian_of_order_one_in_float32(eps):
    # Near the minimum of |x|^2 the gradient is tiny and the Hessian is not: the
    # scaled products must neither overflow (Frobenius inf) nor lose the gradient.
    # Closed forms: |H| = 2, |H|_F = 2 sqrt(D) (Hutchinson is exact for a multiple of
    # the identity), |grad| = 2 |x|, principal curvature 1 / |x|.
    d = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    x = (eps * d).float()
    radius = eps * float(d.double().norm())
    out = curvature(_Square(), x, target=0)
    assert out["hessian_norm"].item() == pytest.approx(2.0, rel=1e-5)
    assert out["hessian_frobenius"].item() == pytest.approx(4.0, rel=1e-5)
    assert out["gradient_norm"].item() == pytest.approx(2 * radius, rel=1e-5)
    assert out["principal_curvature"].item() == pytest.approx(1 / radius, rel=1e-5)


def test_dense_hessian_of_a_smoothed_mlp():
    torch.manual_seed(3)
    d = 8
    net = nn.Sequential(nn.Linear(d, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
    net = net.double().eval()
    soft = bs.smooth(net, 4.0)
    x = torch.randn(3, d, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    out = curvature(soft, x, target, iterations=d + 1, tol=0, probes=4000, seed=1)
    for i in range(3):

        def logit(v, i=i):
            return soft(v[None])[0, target[i]]

        hess = torch.autograd.functional.hessian(logit, x[i])
        grad = torch.autograd.functional.jacobian(logit, x[i])
        h, gr = hess.numpy(), grad.numpy()
        n = gr / np.linalg.norm(gr)
        p = np.eye(d) - np.outer(n, n)
        assert out["hessian_norm"][i].item() == pytest.approx(
            np.abs(np.linalg.eigvalsh(h)).max(), rel=1e-8
        )
        assert out["principal_curvature"][i].item() == pytest.approx(
            np.abs(np.linalg.eigvalsh(p @ h @ p)).max() / np.linalg.norm(gr), rel=1e-8
        )
        assert out["hessian_frobenius"][i].item() == pytest.approx(np.linalg.norm(h), rel=0.05)


def test_relu_networks_have_zero_hessian():
    x = torch.rand(3, 1, 16, 16)
    for net in (plain_cnn(), residual_net()):
        out = curvature(net, x)
        for key in ("hessian_norm", "principal_curvature", "hessian_frobenius"):
            assert torch.equal(out[key], torch.zeros(3)), key
        grad = bs.explain(net, x, "gradient").flatten(1).norm(dim=1)
        torch.testing.assert_close(out["gradient_norm"], grad)


def test_batch_items_are_independent():
    net = bs.smooth(residual_net().double(), 5.0)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([1, 0, 4])
    # Converged estimates (other start vectors per item) agree
    batched = curvature(net, x, target, tol=0, iterations=40)
    for i in range(3):
        single = curvature(net, x[i : i + 1], target[i : i + 1], tol=0, iterations=40)
        for key in ("hessian_norm", "principal_curvature", "gradient_norm"):
            assert batched[key][i].item() == pytest.approx(single[key][0].item(), rel=1e-6), key


def test_an_item_gets_the_numbers_it_gets_alone():
    # Own seed, own stopping step: with the default tolerance (items stop at
    # different Lanczos steps) and few probes, every number of an item equals
    # its number measured alone, so that runs do not depend on --batch-size.
    net = bs.smooth(residual_net().double(), 5.0)
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1, 0, 4, 2])
    seeds = [11, 12, 13, 14]
    batched = curvature(net, x, target, seed=seeds, probes=3)
    for i in range(4):
        alone = curvature(net, x[i : i + 1], target[i : i + 1], seed=seeds[i : i + 1], probes=3)
        for key, value in alone.items():
            assert batched[key][i].item() == pytest.approx(value[0].item(), rel=1e-12), key
    # One seed: the first items of a larger batch get the numbers of a smaller one.
    four = curvature(net, x, target, seed=5, probes=3)
    two = curvature(net, x[:2], target[:2], seed=5, probes=3)
    for key, value in two.items():
        torch.testing.assert_close(four[key][:2], value, rtol=1e-12, atol=0)


@pytest.mark.parametrize("data_range", [None, (0.0, 1.0)])
@pytest.mark.parametrize("training", [True, False])
def test_curvature_restores_training_mode(training, data_range):
    net = plain_cnn().train(training)
    curvature(net, torch.rand(2, 1, 16, 16), data_range=data_range)
    assert all(m.training == training for m in net.modules())


def test_curvature_of_a_model_in_training_mode_is_that_of_evaluation_mode():
    # The oracle: the same numbers of the model in evaluation mode. Its one-item check ran
    # in training mode: BatchNorm moved its running statistics (BatchNorm1d refused the
    # single item with torch's error).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(3, 4, dtype=torch.float64)
    net = net.double().eval()
    expected = curvature(net, x, probes=2)
    bound = theorem1_check(net, x, x + 0.1, samples=3)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    got = curvature(net, x, probes=2)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-10, atol=0)
    for key, value in theorem1_check(net, x, x + 0.1, samples=3).items():
        torch.testing.assert_close(value, bound[key], rtol=1e-10, atol=0)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert net.training


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"x": np.zeros((2, 4))}, bs.InputTypeError),
        ({"x": torch.zeros(2, 4, dtype=torch.long)}, bs.InputTypeError),
        ({"x": torch.full((2, 4), math.nan)}, bs.InputError),
        ({"iterations": 0}, bs.InputError),
        ({"probes": 1.5}, bs.InputTypeError),
        ({"tol": -1.0}, bs.InputError),
        ({"tol": math.nan}, bs.InputError),
        ({"target": 7}, bs.InputError),
        ({"data_range": (None, 1.0)}, bs.InputTypeError),
        ({"data_range": ("a", "b")}, bs.InputTypeError),
    ],
)
def test_bad_input(kwargs, error):
    net = neurons(torch.ones(1, 4, dtype=torch.float64))
    args = {"x": torch.ones(2, 4, dtype=torch.float64)} | kwargs
    x = args.pop("x")
    with pytest.raises(error):
        curvature(net, x, **args)


class Square(nn.Module):
    """``g(x) = |x|^2``: level sets are spheres, principal curvatures ``1/r``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.square().sum(1, keepdim=True)


@settings(max_examples=10, deadline=None)
@given(radius=st.floats(0.5, 4.0), angle=st.floats(0.05, 2.5), d=st.integers(2, 6))
def test_theorem1_on_a_sphere(radius, angle, d):
    """Normal change 2 sin(a/2), chord 2 r sin(a/2), curvature 1/(r cos(a/2)) at mid-chord."""
    x = torch.zeros(1, d, dtype=torch.float64)
    x[0, 0] = radius
    x_adv = torch.zeros(1, d, dtype=torch.float64)
    x_adv[0, 0], x_adv[0, 1] = radius * math.cos(angle), radius * math.sin(angle)
    out = theorem1_check(Square(), x, x_adv, samples=5)
    half = angle / 2
    assert out["normal_change"].item() == pytest.approx(2 * math.sin(half), rel=1e-9)
    assert out["distance"].item() == pytest.approx(2 * radius * math.sin(half), rel=1e-9)
    kappa = 1 / (radius * math.cos(half))
    assert out["max_principal_curvature"].item() == pytest.approx(kappa, rel=1e-9)
    assert out["bound"].item() == pytest.approx(2 * math.tan(half), rel=1e-9)
    assert out["segment_bound"].item() == pytest.approx(2 * math.tan(half), rel=1e-9)
    # normal_change / bound = 2 sin(a/2) / (2 tan(a/2))
    assert out["ratio"].item() == pytest.approx(math.cos(half), rel=1e-9)
    assert bool(out["holds"])
    assert out["output_change"].item() == pytest.approx(0, abs=1e-9 * radius**2)


def test_theorem1_segment_bound_is_guaranteed_for_softplus():
    torch.manual_seed(4)
    d = 5
    net = neurons(torch.randn(3, d, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    x = torch.randn(4, d, dtype=torch.float64)
    x_adv = x + 0.3 * torch.randn(4, d, dtype=torch.float64)
    out = theorem1_check(net, x, x_adv, beta=2.0, samples=65)
    # n changes along the segment at rate |P H u| / |grad g| <= its sampled maximum
    assert (out["normal_change"] <= out["segment_bound"] * (1 + 1e-3)).all()
    grads = [bs.explain(bs.smooth(net, 2.0), v, "gradient", target=0) for v in (x, x_adv)]
    normals = [g / g.norm(dim=1, keepdim=True) for g in grads]
    torch.testing.assert_close(out["normal_change"], (normals[1] - normals[0]).norm(dim=1))


def test_theorem1_of_an_unmoved_float32_image_is_zero():
    # An attack can leave an image where it was; float32 cannot hold 1e-300.
    torch.manual_seed(5)
    net = neurons(torch.randn(3, 4), torch.randn(3))
    x = torch.randn(2, 4)
    x_adv = torch.cat([x[:1], x[1:] + 0.3 * torch.randn(1, 4)])
    out = theorem1_check(net, x, x_adv, beta=2.0, samples=9)
    alone = theorem1_check(net, x[1:], x_adv[1:], beta=2.0, samples=9)
    for key in ("normal_change", "distance", "ratio", "segment_bound", "output_change"):
        assert out[key][0].item() == 0.0, key
        torch.testing.assert_close(out[key][1:], alone[key], rtol=1e-5, atol=1e-7)
    assert bool(out["holds"][0]) and 0 < alone["ratio"].item() < float("inf")


def test_theorem1_fails_for_relu():
    """Piecewise linear: zero curvature, yet the normal jumps between linear regions."""
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    x_adv = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    out = theorem1_check(neurons(w), x, x_adv)
    assert out["normal_change"].item() == pytest.approx(math.sqrt(2 - math.sqrt(2)))
    assert out["bound"].item() == 0.0
    assert not bool(out["holds"])
    # A change with a zero bound is infinitely far beyond it.
    assert out["ratio"].item() == math.inf


def test_theorem1_bad_input():
    net = neurons(torch.ones(1, 3, dtype=torch.float64))
    x = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(bs.InputError, match="x_adv must have the shape"):
        theorem1_check(net, x, x[:1])
    with pytest.raises(bs.InputError, match="samples"):
        theorem1_check(net, x, x, samples=1)
    for seed, error in (([1, 2], bs.InputTypeError), (1.5, bs.InputTypeError), (-1, bs.InputError)):
        with pytest.raises(error, match="seed must be an integer"):
            theorem1_check(net, x, x + 0.1, seed=seed)
    with pytest.raises(bs.InputError, match="seed must be an integer from 0 to"):
        theorem1_check(net, x, x + 0.1, seed=2**70)


def test_theorem1_refuses_what_would_broadcast_or_measure_nothing():
    # An adaptively pooling CNN takes x_adv of another height, which x_adv - x cannot meet;
    # zero Lanczos steps would give curvature 0 and a bound of 0.
    net = residual_net(channels=3).double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(bs.InputError, match="x_adv must have the shape"):
        theorem1_check(net, x, x[:, :, :4], beta=2.0)
    with pytest.raises(bs.InputError, match="iterations"):
        theorem1_check(net, x, x + 0.1, beta=2.0, iterations=0)


@pytest.mark.parametrize("check", ["curvature", "theorem1"])
def test_a_vector_of_channel_bounds_is_refused_also_where_it_fits_the_width(check):
    # (C,) bounds on (B, C, H, W) with W == C would broadcast against the width.
    net = residual_net(channels=3).double().eval()
    x = torch.rand(2, 3, 3, 3, dtype=torch.float64)
    bounds = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    with pytest.raises(bs.InputError, match="shaped like data.bounds"):
        if check == "curvature":
            curvature(net, x, data_range=bounds)
        else:
            theorem1_check(net, x, x + 0.01, beta=2.0, data_range=bounds)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_before_lanczos(dtype):
    # Lanczos on float16 Hessian-vector products misses the largest eigenvalue
    # by far; eigvalsh has no kernel for them either.
    net = bs.smooth(neurons(torch.ones(2, 3)), 2.0).to(dtype)
    x = torch.ones(2, 3, dtype=dtype)
    with pytest.raises(bs.InputTypeError, match=r"^curvature needs a float32 or float64 model"):
        curvature(net, x)
    with pytest.raises(bs.InputTypeError, match=r"^theorem1_check needs a float32 or float64"):
        theorem1_check(net, x, x + 0.1)


def test_curvature_casts_float64_inputs_to_the_model_dtype():
    net = bs.smooth(plain_cnn(seed=2), 10.0)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = curvature(net, x.double(), iterations=5)
    expected = curvature(net, x, iterations=5)
    for key in ("hessian_norm", "principal_curvature"):
        torch.testing.assert_close(ours[key], expected[key])


def test_curvature_of_a_model_with_fused_attention_equals_attention_by_hand():
    # Hessian-vector products differentiate the gradient again, which the fused
    # attention kernels cannot (a traceback of betasmooth curvature).
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    fused, by_hand = PatchAttention(seed=2), PatchAttention(seed=2, by_hand=True)
    got, want = (curvature(bs.smooth(net, 2.0), x, iterations=6) for net in (fused, by_hand))
    assert float(want["hessian_norm"].min()) > 0
    for key in ("hessian_norm", "hessian_frobenius", "gradient_norm"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-6)


def test_curvature_of_a_model_with_hardsigmoid_equals_the_gate_by_hand():
    # nn.Hardsigmoid's backward has no derivative in torch: curvature and theorem1_check
    # ended in torch's "derivative for aten::hardsigmoid_backward is not implemented".
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    gated, by_hand = SqueezeExcite(), SqueezeExcite(by_hand=True)
    got, want = (curvature(net, x, iterations=6) for net in (gated, by_hand))
    # The gate multiplies two piecewise-linear paths: the ReLU network is curved.
    assert float(want["hessian_norm"].min()) > 0
    for key in ("hessian_norm", "hessian_frobenius", "gradient_norm"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-7)
    x_adv = (x + 0.01).clamp(0, 1)
    got, want = (theorem1_check(net, x, x_adv, iterations=4) for net in (gated, by_hand))
    assert float(want["max_principal_curvature"].min()) > 0
    for key in ("normal_change", "max_principal_curvature", "segment_bound"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-7)


class _Square(nn.Module):
    """g(x) = |x|^2: level sets are spheres about 0, normals radial."""

    def forward(self, x):
        return x.square().sum(1, keepdim=True)


def test_segment_bound_is_zero_along_the_normal():
    # Moving along the normal of a sphere
    # leaves the normal unchanged, and the rate |P H u| / |grad g| is 0 there
    # (closed form), whereas |H u| / |grad g| = 1 / |x|.
    x = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    x_adv = torch.tensor([[3.0, 0.0, 0.0]], dtype=torch.float64)
    out = theorem1_check(_Square(), x, x_adv, samples=5)
    assert out["normal_change"].item() == pytest.approx(0.0, abs=1e-12)
    assert out["segment_bound"].item() == pytest.approx(0.0, abs=1e-12)
    # and a general chord: rate r_perp-component by hand, (t from 0 to 1 on x + t d)
    x = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    x_adv = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    out = theorem1_check(_Square(), x, x_adv, samples=101)
    d = (x_adv - x)[0].numpy()
    u = d / np.linalg.norm(d)
    rates = []
    for t in np.linspace(0, 1, 101):
        p = x[0].numpy() + t * d
        n = p / np.linalg.norm(p)
        # H = 2 I, |grad g| = 2 |p|: rate = |u - (u.n) n| / |p|
        rates.append(np.linalg.norm(u - (u @ n) * n) / np.linalg.norm(p))
    assert out["segment_bound"].item() == pytest.approx(np.linalg.norm(d) * max(rates), rel=1e-9)


def test_principal_curvature_is_nan_where_the_gradient_vanishes():
    # At the centre of g = |x|^2 the gradient is 0 and the level set
    # has no normal: principal_curvature is NaN (documented), the Hessian 2 I
    # has norm 2 (closed form); elsewhere the curvature is 1/r.
    x = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    out = bs.curvature(_Square(), x, iterations=5)
    assert torch.isnan(out["principal_curvature"][0])
    assert out["principal_curvature"][1].item() == pytest.approx(0.5, rel=1e-9)
    torch.testing.assert_close(out["hessian_norm"], torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert out["gradient_norm"][0].item() == 0.0


def test_converged_needs_both_estimates_but_no_curvature_where_the_gradient_vanishes():
    # H = 2 I: one product spans an invariant subspace, so the Hessian norm is exact
    # after one step at both points. The shape operator (2 / |grad g|) P is not a
    # multiple of the identity on the whole space: from a start with a normal component
    # one step neither spans an invariant subspace nor may trust a residual, so at
    # x = (2, 0, 0) the estimate has not converged; at 0, where grad g = 0, there is
    # no curvature to converge to (documented) and the item has converged.
    x = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    out = bs.curvature(_Square(), x, iterations=1)
    torch.testing.assert_close(out["hessian_norm"], torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert out["converged"].tolist() == [True, False]


class _TwoSpheres(nn.Module):
    """Logit 0: |x|^2 (spheres about 0); logit 1: |x - c|^2 (spheres about c)."""

    def forward(self, x):
        c = torch.tensor([4.0, 0.0], dtype=x.dtype)
        return torch.stack([x.square().sum(1), (x - c).square().sum(1)], 1)


def test_theorem1_explains_the_class_predicted_at_x_also_at_x_adv():
    # The class predicted at x is followed to x_adv: x = (3, 1) predicts logit 0, x_adv = (1, 2)
    # logit 1. The normal change of logit 0's level sets is |n(x_adv) - n(x)|
    # with n(p) = p / |p| (closed form).
    x = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    x_adv = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    net = _TwoSpheres()
    assert net(x).argmax(1).item() == 0 and net(x_adv).argmax(1).item() == 1
    out = theorem1_check(net, x, x_adv, samples=3)
    n0, n1 = x[0] / x[0].norm(), x_adv[0] / x_adv[0].norm()
    assert out["normal_change"].item() == pytest.approx((n1 - n0).norm().item(), rel=1e-9)
    assert out["output_change"].item() == pytest.approx(abs(5.0 - 10.0), rel=1e-9)


@pytest.mark.parametrize("probes", [1, 3])
def test_hutchinson_of_a_multiple_of_the_identity_is_exact(probes):
    # H = 2 I in R^3: |H v|^2 = 4 * 3 for every Rademacher v, so the estimate is
    # |H|_F = 2 sqrt(3) whatever the number of probes (closed form).
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    out = bs.curvature(_Square(), x, iterations=3, probes=probes)
    assert out["hessian_frobenius"].item() == pytest.approx(2 * math.sqrt(3), rel=1e-12)


@pytest.mark.parametrize("frozen", [True, False])
def test_a_frozen_affine_model_has_zero_curvature(frozen):
    # Weights without requires_grad (a frozen model): the gradient W[target] has
    # no graph at all, so every Hessian-vector product is 0 (closed form) and the
    # normal never changes; the gradient norm is |W[target]|. Trainable weights give
    # the gradient a graph through W only, in which x is unused: the same zeros.
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double().eval().requires_grad_(not frozen)
    x = torch.randn(2, 5, dtype=torch.float64)
    out = curvature(lin, x, 1)
    for key in ("hessian_norm", "principal_curvature", "hessian_frobenius"):
        assert out[key].tolist() == [0.0, 0.0]
    torch.testing.assert_close(out["gradient_norm"], lin.weight[1].norm().expand(2))
    check = theorem1_check(lin, x, x + 0.1, target=1)
    assert check["normal_change"].tolist() == [0.0, 0.0]
    assert check["segment_bound"].tolist() == [0.0, 0.0]
    want = abs(0.1 * lin.weight[1].sum().item())
    assert check["output_change"].tolist() == pytest.approx([want, want], rel=1e-12)


class _Scaled(nn.Module):
    def __init__(self, model: nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, x):
        return self.model(x) * self.factor


@pytest.mark.parametrize("factor", [1e-6, 1e6])
def test_lanczos_stops_at_a_relative_tolerance(factor):
    # Scaling the logit by c scales H and grad g by c: the Hessian norm scales by
    # c and the principal curvature (P H P / |grad g|) does not change. With the
    # default tolerance, relative to the estimate, Lanczos then takes the same
    # steps at every scale, so the numbers agree to rounding.
    torch.manual_seed(3)
    d = 24
    net = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    soft = bs.smooth(net.double().eval(), 4.0)
    x = torch.randn(3, d, dtype=torch.float64)
    base = curvature(soft, x, 0)
    scaled = curvature(_Scaled(soft, factor), x, 0)
    torch.testing.assert_close(
        scaled["hessian_norm"] / factor, base["hessian_norm"], rtol=1e-9, atol=0
    )
    torch.testing.assert_close(
        scaled["principal_curvature"], base["principal_curvature"], rtol=1e-9, atol=0
    )


def test_lanczos_does_not_stop_where_its_estimate_stalls_next_to_a_lower_eigenvalue():
    # digits-cnn at beta 50, test digit 12, the seed `betasmooth curvature` gives it:
    # the top |eigenvalues| are 5.057, 4.564, 4.425, and the estimate rested at 4.562
    # for a step, which a stall test took for convergence (principal curvature too).
    from betasmooth.units import unit_seed

    net = bs.smooth(bs.load_model("digits-cnn"), 50.0)
    x = bs.load_data("digits").x[12:13]
    found = bs.curvature(net, x, seed=[unit_seed(0, "curvature", 12)])
    double = net.double()
    label = int(double(x.double()).argmax())
    hessian = torch.autograd.functional.hessian(
        lambda z: double(z.view(1, 1, 32, 32))[0, label], x.double().flatten()
    )
    top = torch.linalg.eigvalsh(hessian).abs().max()
    assert float(found["hessian_norm"][0]) == pytest.approx(float(top), rel=1e-3)


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_lanczos_stops_once_the_ritz_residual_is_within_the_tolerance(tol):
    # diag(10, linspace(0, 1)): the top Ritz pair converges in a few steps while the
    # bulk's off-diagonal stays about 0.3, so a stop on a small beta alone would take
    # every product. A Ritz value with residual r <= tol * 10 lies within r^2 / gap
    # (gap 9) of the eigenvalue 10.
    from betasmooth.geometry import _lanczos

    d = 300
    values = torch.cat([torch.tensor([10.0]), torch.linspace(0, 1, d - 1)]).double()
    products = []

    def op(q):
        products.append(q.shape[0])
        return q * values

    start = torch.stack([torch.ones(d), torch.linspace(1, 2, d)]).double()
    estimate, converged = _lanczos(op, start, 40, tol)
    assert len(products) <= 8 and converged.all()
    bound = (tol * 10) ** 2 / 9
    assert (estimate - 10).abs().max() <= bound


def test_lanczos_stops_once_its_krylov_space_is_invariant():
    # tol = 0 leaves only the invariant Krylov space to stop on: of a rank-2 operator
    # (eigenvalues 3 and -5, closed form) it has at most 3 dimensions, the start and
    # two directions in the range, however far rounding keeps beta from exactly 0.
    from betasmooth.geometry import _lanczos

    d = 50
    values = torch.zeros(d, dtype=torch.float64)
    values[7], values[30] = 3.0, -5.0
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)).double())
    matrix = q @ torch.diag(values) @ q.T
    products = []

    def op(v):
        products.append(v.shape[0])
        return v @ matrix

    start = torch.randn(2, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    estimate, converged = _lanczos(op, start, 20, 0.0)
    assert len(products) <= 3 and converged.all()
    torch.testing.assert_close(estimate, torch.full((2,), 5.0, dtype=torch.float64))


def test_lanczos_takes_a_second_step_before_it_trusts_a_residual():
    # diag(10, 1) from a start almost along the eigenvector of 1: the first Ritz pair,
    # about (1, e2), has a residual 9e-4 <= tol * 1, yet the largest |eigenvalue| is 10
    # (closed form), which the second step, spanning the whole space, finds exactly.
    from betasmooth.geometry import _lanczos

    values = torch.tensor([10.0, 1.0], dtype=torch.float64)
    start = torch.tensor([[1e-4, 1.0]], dtype=torch.float64)
    estimate, converged = _lanczos(lambda v: v * values, start, 20, 1e-3)
    assert estimate.item() == pytest.approx(10.0, rel=1e-12) and converged.item()


def test_lanczos_stopped_by_its_iterations_has_not_converged():
    # Eigenvalues 1/1 .. 1/200 (closed form, largest 1) from a start that holds little of
    # the top eigenvector: three products leave the estimate below 1 and unconverged;
    # with room for the whole space it converges to 1.
    from betasmooth.geometry import _lanczos

    d = 200
    values = 1 / torch.arange(1, d + 1, dtype=torch.float64)
    start = torch.ones(1, d, dtype=torch.float64)
    start[0, 0] = 1e-3
    short, converged = _lanczos(lambda v: v * values, start, 3, 1e-3)
    assert not converged.item() and short.item() < 0.99
    full, converged = _lanczos(lambda v: v * values, start, d, 1e-3)
    assert converged.item() and full.item() == pytest.approx(1.0, rel=1e-3)


def test_a_data_range_of_other_than_two_bounds_is_refused_in_one_line():
    net = neurons(torch.ones(1, 4, dtype=torch.float64))
    x = torch.ones(2, 4, dtype=torch.float64)
    with pytest.raises(
        bs.InputError,
        match=r"^data_range must be \(low, high\), e.g. data.bounds; got tuple \(0.0, 0.5, 1.0\)$",
    ):
        curvature(net, x, data_range=(0.0, 0.5, 1.0))


def test_the_default_number_of_probes_is_the_documented_ten():
    # README: Hutchinson's estimate from `probes` (10) random vectors. One probe gives
    # another estimate of the Frobenius norm of this Hessian, which is not a multiple of I.
    torch.manual_seed(2)
    net = bs.smooth(neurons(torch.randn(3, 4, dtype=torch.float64)), 2.0)
    x = torch.randn(2, 4, dtype=torch.float64)
    default = curvature(net, x, seed=4)
    ten, one = (curvature(net, x, seed=4, probes=p) for p in (10, 1))
    for key, value in ten.items():
        torch.testing.assert_close(default[key], value, rtol=0, atol=0)
    assert not torch.equal(one["hessian_frobenius"], ten["hessian_frobenius"])


def test_theorem1_start_vectors_follow_the_seed():
    # One Lanczos step gives the Rayleigh quotient of the start vector: on the sphere
    # g = |x|^2 that is |P q|^2 / |x_t| for a unit start q, below the true curvature
    # 1 / |x_t| (closed form) and different for every seed; 20 steps reach 1 / |x_t|.
    d = 6
    x = torch.zeros(1, d, dtype=torch.float64)
    x[0, 0] = 2.0
    x_adv = x + 0.1 * torch.ones(1, d, dtype=torch.float64)
    exact = 1 / x.norm().item()  # the largest 1 / |x_t| on this segment, at t = 0
    one_step = {
        s: theorem1_check(_Square(), x, x_adv, samples=2, iterations=1, seed=s)[
            "max_principal_curvature"
        ].item()
        for s in (1, 2)
    }
    assert one_step[1] != one_step[2]
    assert all(0 < v < exact for v in one_step.values())
    again = theorem1_check(_Square(), x, x_adv, samples=2, iterations=1, seed=1)
    assert again["max_principal_curvature"].item() == one_step[1]
    full = theorem1_check(_Square(), x, x_adv, samples=2, iterations=20, seed=1)
    assert full["max_principal_curvature"].item() == pytest.approx(exact, rel=1e-12)


def test_curvature_per_unit_of_a_range_that_starts_below_zero_by_hand():
    # x = low + span * p: the gradient in p is span times that in x and the Hessian span^2
    # times, so the principal curvature (H / |grad|) is span times; measured at the same
    # point x, which a range with low != 0 must shift to p = (x - low) / span and back.
    torch.manual_seed(6)
    d, beta, low, high = 5, 2.0, -1.0, 3.0
    span = high - low
    w = torch.randn(2, d, dtype=torch.float64)
    b = torch.randn(2, dtype=torch.float64) * 0.2
    x = 0.4 * torch.randn(2, d, dtype=torch.float64)
    net = bs.smooth(neurons(w, b), beta)
    out = curvature(net, x, tol=0, probes=1, data_range=(low, high))
    for i in range(x.shape[0]):
        exact = exact_softplus_geometry(w.numpy(), b.numpy(), x[i].numpy(), beta)
        assert out["gradient_norm"][i].item() == pytest.approx(span * exact["gradient_norm"])
        assert out["hessian_norm"][i].item() == pytest.approx(span**2 * exact["hessian_norm"])
        assert out["principal_curvature"][i].item() == pytest.approx(
            span * exact["principal_curvature"], rel=1e-9
        )


def test_hutchinson_draws_each_items_probes_from_its_own_seed():
    # The Frobenius estimate by hand: the exact Hessian (closed form) on the Rademacher
    # probes of torch.Generator().manual_seed(s), drawn after the Lanczos start vector.
    torch.manual_seed(4)
    d, beta, probes = 5, 2.0, 3
    w = torch.randn(3, d, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64) * 0.2
    x = 0.4 * torch.randn(2, d, dtype=torch.float64)
    seeds = [11, 12]
    out = curvature(bs.smooth(neurons(w, b), beta), x, seed=seeds, probes=probes)
    for i, s in enumerate(seeds):
        s_ = 1 / (1 + np.exp(-beta * (w.numpy() @ x[i].numpy() + b.numpy())))
        hess = (w.numpy().T * (beta * s_ * (1 - s_))) @ w.numpy()
        g = torch.Generator().manual_seed(s)
        torch.randn(d, generator=g, dtype=torch.float64)  # the start vector
        v = np.stack(
            [(torch.randint(0, 2, (d,), generator=g) * 2 - 1).numpy() for _ in range(probes)]
        )
        expected = math.sqrt(np.mean(np.sum((v @ hess) ** 2, axis=1)))
        assert out["hessian_frobenius"][i].item() == pytest.approx(expected, rel=1e-9)
    # Another seed gives other probes, and here another estimate.
    other = curvature(bs.smooth(neurons(w, b), beta), x, seed=[13, 14], probes=probes)
    assert not torch.equal(other["hessian_frobenius"], out["hessian_frobenius"])


class _Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.detach())


@pytest.mark.parametrize("check", ["curvature", "theorem1_check"])
def test_a_forward_that_detaches_x_is_refused_in_one_line(check):
    # Not the raw error of the Hessian's own autograd call.
    x = torch.randn(2, 4)
    call = {"curvature": lambda: curvature(_Detached(), x),
            "theorem1_check": lambda: theorem1_check(_Detached(), x, x + 0.1)}[check]  # fmt: skip
    with pytest.raises(bs.InputError, match=r"^_Detached's output does not depend on x: its "
                       r"forward detaches the input or runs under torch.no_grad\(\); expected a "
                       r"forward that keeps x in the graph$"):  # fmt: skip
        call()


def _float32_values_near_powers_of_two() -> list[float]:
    """Powers of two over float32's whole range, and the float32 just below each."""
    values = []
    for k in range(-149, 128, 7):
        p = torch.tensor(math.ldexp(1.0, k), dtype=torch.float32)
        values += [float(p), float(torch.nextafter(p, torch.zeros(())))]
    return [v for v in values if v > 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_power_of_two_brings_the_largest_entry_into_one_to_two(dtype):
    # Oracle: math.frexp, v = m 2^e with m in [0.5, 1), so v 2^(1 - e) lies in [1, 2).
    # Values just below a power of two are those where a log2 rounded in float32
    # lands on the power itself and the floor misses by one.
    from betasmooth.geometry import _power_of_two

    generator = torch.Generator().manual_seed(0)
    spread = torch.exp(torch.empty(200, dtype=torch.float64).uniform_(-80, 80, generator=generator))
    values = torch.cat([spread, torch.tensor(_float32_values_near_powers_of_two())]).to(dtype)
    # Where 2^(1 - e) is a finite power of the dtype; the others are checked below.
    top = math.frexp(torch.finfo(dtype).max)[1] - 1
    values = values[[abs(1 - math.frexp(v)[1]) <= top for v in values.tolist()]]
    scale = _power_of_two(values)
    assert scale.dtype == dtype
    want = [math.ldexp(1.0, 1 - math.frexp(v)[1]) for v in values.tolist()]
    assert scale.tolist() == want


@pytest.mark.parametrize(
    ("dtype", "largest_power"), [(torch.float32, 2.0**127), (torch.float64, 2.0**1023)]
)
def test_the_power_of_two_of_a_subnormal_or_non_number_stays_finite(dtype, largest_power):
    # IEEE 754: the largest finite power of two is 2^127 in float32, 2^1023 in float64.
    # The smallest subnormal needs a larger power: it gets the largest finite one; 0,
    # for which no power brings it into [1, 2), gets 1; inf and NaN a finite factor.
    from betasmooth.geometry import _power_of_two

    tiny = float(torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))
    scale = _power_of_two(torch.tensor([tiny, 0.0, math.inf, math.nan], dtype=dtype))
    assert scale[:2].tolist() == [largest_power, 1.0]
    assert bool(scale.isfinite().all())


class _FaintQuadratic(nn.Module):
    """Logit ``a.x + c sum_i d_i x_i^2``: gradient ``a + 2 c d x``, Hessian ``2 c diag(d)``."""

    def __init__(self, a: torch.Tensor, d: torch.Tensor, c: float) -> None:
        super().__init__()
        self.a, self.d, self.c = a, d, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x @ self.a + self.c * (self.d * x.square()).sum(1)
        return torch.stack([g, -g], 1)


@pytest.mark.parametrize("target", [0, 1])
def test_a_hessian_far_below_the_gradient_and_below_eps(target):
    # With a gradient of order 1 the logit needs no rescaling, and the Hessian's
    # entries (2e-20) lie below float64's eps: the Lanczos vectors and the norms must
    # be divided by them as they are, not by eps. Closed forms: |H| = 2 c max |d|,
    # Hutchinson is exact for a diagonal H (|H v| = |2 c d| for every sign vector v),
    # and the principal curvature is that of P H P / |grad| (numpy.linalg.eigvalsh).
    # abs=0: pytest.approx's default absolute tolerance (1e-12) would accept any value.
    # Target 1, -g, has the eigenvalue -6 c beside 5 c: the norm is the largest |eig|.
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(5, generator=generator, dtype=torch.float64)
    d = torch.tensor([3.0, -1.0, 0.5, 2.0, -2.5], dtype=torch.float64)
    x = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    c = 1e-20
    out = curvature(_FaintQuadratic(a, d, c), x, target, tol=0)
    hess = np.diag(2 * c * d.numpy())
    for i in range(x.shape[0]):
        grad = a.numpy() + 2 * c * d.numpy() * x[i].numpy()
        n = grad / np.linalg.norm(grad)
        proj = np.eye(5) - np.outer(n, n)
        kappa = np.abs(np.linalg.eigvalsh(proj @ hess @ proj)).max() / np.linalg.norm(grad)
        assert out["hessian_norm"][i].item() == pytest.approx(2 * c * 3.0, rel=1e-9, abs=0)
        assert out["hessian_frobenius"][i].item() == pytest.approx(
            2 * c * float(d.norm()), rel=1e-9, abs=0
        )
        assert out["principal_curvature"][i].item() == pytest.approx(kappa, rel=1e-9, abs=0)
        assert out["gradient_norm"][i].item() == pytest.approx(
            np.linalg.norm(grad), rel=1e-12, abs=0
        )
