"""softplus_beta, the logistic noise p_beta, and ReLU -> softplus_beta for any model."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy import stats as sps
from torch import nn

import betasmooth as bs
from betasmooth.smooth import (
    LogisticNoise,
    check_overridable,
    flush_denormals,
    replace_relu,
    smooth,
    smoothed,
    softplus,
)
from betasmooth.validate import InputError, InputTypeError
from nets import FlushSpy, plain_cnn, vgg_small

LD = np.longdouble  # 64-bit mantissa: the oracle carries 11 more bits than float64


def _oracle_softplus(x: np.ndarray, beta: float) -> np.ndarray:
    """log(1 + exp(beta x)) / beta in extended precision, from the rounded inputs."""
    z = LD(beta) * x.astype(LD)
    with np.errstate(over="ignore"):
        f = np.where(z > 0, z + np.log1p(np.exp(-z)), np.log1p(np.exp(z)))
    return f / LD(beta)


def _oracle_sigmoid(x: np.ndarray, beta: float) -> np.ndarray:
    z = LD(beta) * x.astype(LD)
    with np.errstate(over="ignore"):
        return np.where(z > 0, 1 / (1 + np.exp(-z)), np.exp(z) / (1 + np.exp(z)))


def _tolerance(z: np.ndarray, dtype: torch.dtype, beta: float, oracle: np.ndarray) -> np.ndarray:
    """Error of one rounding of z = beta x, propagated (condition number ~ 1 + |z|), plus exp's.

    Below the normal range exp and sigmoid may flush to zero: an absolute error
    up to the smallest normal number (times 1 / beta for softplus).
    """
    info = np.finfo(np.float32 if dtype == torch.float32 else np.float64)
    relative = 8 * float(info.eps) * (1 + np.abs(z))
    return relative * np.abs(oracle) + 2 * float(info.tiny) * max(1.0, 1.0 / beta)


floats = st.sampled_from([torch.float32, torch.float64])
betas = st.floats(-3, 4).map(lambda e: 10.0**e)
products = st.lists(
    st.one_of(st.floats(-1e4, 1e4), st.floats(-40, 40), st.sampled_from([0.0, -1e4, 1e4])),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(dtype=floats, beta=betas, z=products)
def test_softplus_matches_extended_precision(dtype, beta, z):
    x = torch.tensor(z, dtype=torch.float64).div(beta).to(dtype).requires_grad_(True)
    y = softplus(x, beta)
    xs = x.detach().numpy()
    zs = LD(beta) * xs.astype(LD)
    ref = _oracle_softplus(xs, beta)
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    err = np.abs(y.detach().numpy().astype(LD) - ref)
    assert bool((err <= _tolerance(zs, dtype, beta, ref)).all()), float(err.max())
    assert bool((y >= torch.relu(x)).all())

    (grad,) = torch.autograd.grad(y.sum(), x)
    ref_grad = _oracle_sigmoid(xs, beta)
    err = np.abs(grad.numpy().astype(LD) - ref_grad)
    assert bool((err <= _tolerance(zs, dtype, beta, ref_grad)).all()), float(err.max())


@settings(max_examples=40, deadline=None, derandomize=True)
@given(dtype=floats, beta=betas, z=products)
def test_softplus_second_derivative(dtype, beta, z):
    x = torch.tensor(z, dtype=torch.float64).div(beta).to(dtype).requires_grad_(True)
    (grad,) = torch.autograd.grad(softplus(x, beta).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    s = _oracle_sigmoid(x.detach().numpy(), beta)
    ref = LD(beta) * s * (1 - s)
    eps = float(torch.finfo(dtype).eps)
    # sigmoid's backward forms 1 - s, so its error is absolute in units of beta / 4.
    assert np.abs(second.numpy().astype(LD) - ref).max() <= 4 * eps * beta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [1e-3, 1.0, 1e4])
def test_softplus_at_zero(dtype, beta):
    x = torch.zeros(3, dtype=dtype, requires_grad=True)
    y = softplus(x, beta)
    torch.testing.assert_close(y.detach(), torch.full_like(y, math.log(2) / beta))
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert torch.equal(grad.detach(), torch.full_like(y, 0.5))
    (second,) = torch.autograd.grad(grad.sum(), x)
    torch.testing.assert_close(second, torch.full_like(y, beta / 4))


def test_softplus_tensor_beta_broadcasts_and_has_gradient():
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    beta = torch.tensor([[0.5], [2.0], [20.0]], dtype=torch.float64, requires_grad=True)
    y = softplus(x, beta)
    for i, b in enumerate([0.5, 2.0, 20.0]):
        ref = _oracle_softplus(x.numpy(), b).astype(np.float64)
        np.testing.assert_allclose(y[i].detach().numpy(), ref, rtol=1e-14)
    assert torch.autograd.gradcheck(lambda b: softplus(x, b), (beta,))
    assert torch.autograd.gradgradcheck(lambda b: softplus(x, b), (beta,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("beta", [1e5, 1e30, 1e-3, 1.7, 10.0])
def test_softplus_half_with_a_tensor_beta_equals_the_float_beta(dtype, beta):
    # A tensor beta past 65504 was cast to float16's inf: inf * 0 gave NaN at x = 0;
    # bfloat16 rounded beta to 8 bits (1.5 % off at beta 1.7, x = -4).
    x = torch.tensor([-4.0, -1.0, -1e-3, 0.0, 1e-3, 1.0], dtype=dtype, requires_grad=True)
    y = softplus(x, torch.tensor(beta))
    assert y.dtype == dtype
    ref = _oracle_softplus(x.detach().double().numpy(), beta).astype(np.float64)
    rtol = float(torch.finfo(dtype).eps)  # rounded once, to half an ulp
    np.testing.assert_allclose(y.detach().double().numpy(), ref, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(y, softplus(x, beta), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(y.sum(), x)
    with np.errstate(over="ignore", invalid="ignore"):  # np.where computes both sides
        ref_grad = _oracle_sigmoid(x.detach().double().numpy(), beta).astype(np.float64)
    np.testing.assert_allclose(grad.double().numpy(), ref_grad, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_gradient_in_beta_where_beta_x_overflows(dtype):
    # d/dbeta = -(z sigmoid(-z) + log1p(exp(-z))) / beta^2 with z = beta |x|, which
    # tends to 0; at z = inf it computed inf * 0 = NaN.
    x = torch.tensor([-100.0, 0.0, 100.0], dtype=dtype)
    beta = torch.tensor(1e37, dtype=dtype, requires_grad=True)
    (grad,) = torch.autograd.grad(softplus(x, beta).sum(), beta, create_graph=True)
    b, xs = 1e37, x.double().numpy()
    z = np.abs(b * xs)
    ref = -(np.log(2) / b**2 + 2 * (z[0] * np.exp(-z[0]) + np.exp(-z[0])) / b**2)
    torch.testing.assert_close(grad.double(), torch.tensor(ref, dtype=torch.float64))
    (second,) = torch.autograd.grad(grad, beta)
    assert bool(torch.isfinite(second))


def test_smoothing_takes_one_beta():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    for make in (bs.smooth, lambda m, b: bs.smoothed(m, b).__enter__()):
        with pytest.raises(InputTypeError, match=r"^beta must be one number, .* shape \(2,\)$"):
            make(net, torch.tensor([1.0, 2.0]))
        # No number at all is not one number either (its values, none, are all in range).
        with pytest.raises(InputTypeError, match=r"^beta must be one number, .* shape \(0,\)$"):
            make(net, torch.tensor([]))
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bs.smooth(net, torch.tensor(2.0))(x), bs.smooth(net, 2.0)(x))


@pytest.mark.parametrize(
    "beta",
    [
        0.0,
        -1.0,
        math.nan,
        math.inf,
        torch.tensor([1.0, 0.0]),
        torch.tensor(-2.0),
        torch.tensor(math.nan),
        # Outside float32's normal numbers: 1 / beta overflows, or beta does not fit.
        1e-40,
        1e39,
        1e300,
        torch.tensor([1.0, 1e-40], dtype=torch.float64),
        torch.tensor(1e39, dtype=torch.float64),
    ],
)
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must be"):
        softplus(torch.ones(2), beta)
    with pytest.raises(ValueError, match="beta must be"):
        LogisticNoise(beta)
    with pytest.raises(ValueError, match="beta must be"), smoothed(nn.ReLU(), beta):
        pass
    with pytest.raises(ValueError, match="beta must be"):
        smooth(nn.ReLU(), beta)


def test_logistic_noise_validates_the_points_of_its_cdf_and_log_prob_as_torch_normal():
    # torch.distributions validates the value of cdf and log_prob when asked to;
    # the oracle is Normal's own refusal of NaN, and its silence without validation.
    nan = torch.tensor(float("nan"))
    for validate in (True, False):
        reference = torch.distributions.Normal(0.0, 1.0, validate_args=validate)
        noise = LogisticNoise(torch.tensor(2.0), validate_args=validate)
        for method in ("cdf", "log_prob"):
            try:
                getattr(reference, method)(nan)
                refused = False
            except ValueError:
                refused = True
            if refused:
                with pytest.raises(ValueError, match="within the support"):
                    getattr(noise, method)(nan)
            else:
                assert torch.isnan(getattr(noise, method)(nan))


@pytest.mark.parametrize(
    ("beta", "error", "message"),
    [
        (0.0, InputError, r"^beta must be a positive finite number; got 0.0$"),
        (-1.0, InputError, r"^beta must be a positive finite number; got -1.0$"),
        (math.inf, InputError, r"^beta must be a positive finite number; got inf$"),
        (torch.tensor([2.0, 0.0]), InputError, r"^beta must be a positive finite number; got 0.0$"),
        ("2", InputTypeError, r"^beta must be a positive number; got '2'$"),
        (None, InputTypeError, r"^beta must be a positive number; got None$"),
    ],
)
def test_a_bad_beta_is_refused_saying_what_is_wrong(beta, error, message):
    # Zero, a negative or an infinite beta is no sharpness at all, which the message
    # says, rather than naming float32's range as for a positive beta outside it.
    with pytest.raises(error, match=message):
        softplus(torch.ones(2), beta)


def test_a_tensor_beta_with_several_bad_values_names_the_first():
    # The message quotes one value, the first bad one in order: 0.0 here, not -1.0
    # or 1e-40 further on.
    beta = torch.tensor([2.0, 0.0, -1.0, 1e-40], dtype=torch.float64)
    with pytest.raises(InputError, match=r"^beta must be a positive finite number; got 0.0$"):
        softplus(torch.ones(4), beta)


def test_softplus_takes_any_real_number_as_beta():
    # check_beta takes every numbers.Real: a Fraction (which torch's own softplus
    # refuses) computes as its float value. Oracle: the closed form in float64.
    from fractions import Fraction

    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    y = softplus(x, Fraction(3, 2))
    xs = x.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), np.log1p(np.exp(1.5 * xs)) / 1.5, rtol=1e-14)
    (grad,) = torch.autograd.grad(y.sum(), x)
    np.testing.assert_allclose(grad.numpy(), 1 / (1 + np.exp(-1.5 * xs)), rtol=1e-14)


def test_softplus_refuses_integers_and_a_beta_that_does_not_broadcast_in_its_own_words():
    with pytest.raises(
        InputTypeError, match=r"^x must be a floating tensor .*got dtype torch.int64$"
    ):
        softplus(torch.arange(3), 2.0)
    with pytest.raises(
        InputError, match=r"^beta of shape \(2,\) does not broadcast against x of shape \(3,\);"
    ):
        softplus(torch.ones(3), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("end", [0, 1])
def test_beta_range_is_float32_normal_numbers(dtype, end):
    info = np.finfo(np.float32)
    inside = float(info.tiny if end == 0 else info.max)
    outside = float(np.nextafter(inside, 0.0 if end == 0 else math.inf))  # float64 neighbour
    # beta x in [-3, 3]: at the smallest beta, x itself is near the float32 maximum.
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0], dtype=torch.float64).div(inside).to(dtype)
    y = softplus(x, inside)
    xs = x.numpy()
    ref = _oracle_softplus(xs, inside)
    err = np.abs(y.numpy().astype(LD) - ref)
    assert bool(torch.isfinite(y).all())
    assert bool((err <= _tolerance(LD(inside) * xs.astype(LD), dtype, inside, ref)).all())
    with pytest.raises(bs.InputError, match=r"^beta must be between 1.175e-38 and 3.403e\+38"):
        softplus(x, outside)


@pytest.mark.parametrize("end", [0, 1])
def test_a_tensor_beta_takes_both_ends_of_the_range_as_a_number_does(end):
    info = np.finfo(np.float32)
    inside = float(info.tiny if end == 0 else info.max)
    outside = float(np.nextafter(inside, 0.0 if end == 0 else math.inf))
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    beta = torch.tensor(inside, dtype=torch.float64)
    # softplus_beta(0) = log(2) / beta, finite at both ends.
    assert softplus(x, beta)[1].item() == pytest.approx(math.log(2) / inside, rel=1e-12)
    torch.testing.assert_close(softplus(x, beta), softplus(x, inside), rtol=1e-12, atol=0)
    with pytest.raises(bs.InputError, match=r"^beta must be between 1.175e-38 and 3.403e\+38"):
        softplus(x, torch.tensor([inside, outside], dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.1, 1.0, 7.0])
def test_logistic_density_integrates_to_one_and_equals_scipy(beta):
    noise = LogisticNoise(torch.tensor(beta, dtype=torch.float64))
    density = lambda e: math.exp(noise.log_prob(torch.tensor(e, dtype=torch.float64)).item())  # noqa: E731
    total, error = integrate.quad(density, -np.inf, np.inf)
    assert total == pytest.approx(1.0, abs=1e-8)

    ref = sps.logistic(scale=1 / beta)
    e = torch.tensor([-700.0, -30.0, -1.0, 0.0, 0.3, 5.0, 700.0], dtype=torch.float64) / beta
    np.testing.assert_allclose(noise.log_prob(e).numpy(), ref.logpdf(e.numpy()), rtol=1e-12)
    np.testing.assert_allclose(noise.cdf(e).numpy(), ref.cdf(e.numpy()), rtol=1e-12, atol=0)
    torch.testing.assert_close(noise.cdf(e), torch.sigmoid(beta * e), rtol=0, atol=0)
    assert noise.stddev.item() == pytest.approx(math.pi / (math.sqrt(3) * beta), rel=1e-15)
    assert noise.stddev.item() == pytest.approx(ref.std(), rel=1e-12)
    assert noise.variance.item() == pytest.approx(ref.var(), rel=1e-12)
    assert noise.entropy().item() == pytest.approx(ref.entropy(), rel=1e-12)
    assert noise.mean.item() == 0.0
    assert noise.mode.item() == 0.0  # the logistic density peaks at its location


@settings(max_examples=40, deadline=None, derandomize=True)
@given(beta=betas, z=st.lists(st.floats(-30, 30), min_size=1, max_size=20))
def test_icdf_inverts_cdf(beta, z):
    noise = LogisticNoise(torch.tensor(beta, dtype=torch.float64))
    e = torch.tensor(z, dtype=torch.float64) / beta
    # cdf rounds to within eps of 0 or 1 far out: the round trip is as accurate as
    # logit is conditioned there, eps / (s (1 - s)) / beta ~ eps exp(|z|) / beta.
    eps = torch.finfo(torch.float64).eps
    bound = 4 * eps * (2 + torch.tensor(z, dtype=torch.float64).abs().exp()) * (e.abs() + 1 / beta)
    assert bool(((noise.icdf(noise.cdf(e)) - e).abs() <= bound).all())


@pytest.mark.parametrize("beta", [0.5, 3.0])
def test_samples_have_the_right_moments(beta):
    torch.manual_seed(1)
    n = 200_000
    e = LogisticNoise(torch.tensor(beta, dtype=torch.float64)).sample((n,))
    sigma = math.pi / (math.sqrt(3) * beta)
    # Standard errors; the logistic's excess kurtosis is 6/5.
    assert abs(e.mean().item()) <= 4 * sigma / math.sqrt(n)
    assert abs(e.std().item() - sigma) <= 4 * sigma * math.sqrt((1.2 + 2) / (4 * n))
    ks = sps.kstest(e[:20_000].numpy(), sps.logistic(scale=1 / beta).cdf)
    assert ks.pvalue > 1e-3


def test_samples_of_a_float64_beta_come_from_float64_uniforms():
    # The draws are icdf(u) for u of beta's dtype: float32 uniforms would put
    # float64 draws on float32's grid, with tails cut at 9 standard deviations.
    beta = torch.tensor(2.0, dtype=torch.float64)
    torch.manual_seed(3)
    e = LogisticNoise(beta).sample((1000,))
    torch.manual_seed(3)
    u = torch.rand(1000, dtype=torch.float64)
    assert e.dtype == torch.float64
    torch.testing.assert_close(e, torch.logit(u) / beta, rtol=1e-15, atol=0)


def test_expand_gives_beta_and_every_statistic_the_new_batch_shape():
    # Distribution.expand's contract: the statistics take the new batch shape,
    # with beta's values broadcast (scipy's logistic of scale 1 / beta as the oracle).
    beta = torch.tensor([[0.5], [4.0]], dtype=torch.float64)
    noise = LogisticNoise(beta).expand((2, 3))
    assert noise.batch_shape == (2, 3)
    assert noise.beta.shape == noise.mean.shape == noise.entropy().shape == (2, 3)
    ref = sps.logistic(scale=1 / beta.expand(2, 3).numpy())
    np.testing.assert_allclose(noise.stddev.numpy(), ref.std(), rtol=1e-12)
    np.testing.assert_allclose(noise.entropy().numpy(), ref.entropy(), rtol=1e-12)
    e = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    np.testing.assert_allclose(noise.log_prob(e).numpy(), ref.logpdf(e.numpy()), rtol=1e-12)


def test_rsample_is_differentiable_in_beta_and_beta_broadcasts():
    beta = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64, requires_grad=True)
    noise = LogisticNoise(beta)
    assert noise.batch_shape == (3,)
    e = noise.rsample((1000,))
    assert e.shape == (1000, 3)
    (grad,) = torch.autograd.grad(e.sum(), beta)
    # e = logit(u) / beta, so de / dbeta = -e / beta.
    torch.testing.assert_close(grad, (-e / beta).sum(0).detach())

    x = torch.linspace(-2, 2, 5, dtype=torch.float64).unsqueeze(1)
    logp = noise.log_prob(x)
    assert logp.shape == (5, 3)
    ref = sps.logistic(scale=1 / beta.detach().numpy()).logpdf(x.numpy())
    np.testing.assert_allclose(logp.detach().numpy(), ref, rtol=1e-12)


def test_log_prob_validates_its_value_as_torch_distributions_do_also_once_expanded():
    # torch.distributions' contract, with Normal as the reference: with validate_args, a
    # value outside the support (NaN for the real line) is refused, also by an expanded
    # copy; without, it passes through.
    nan = torch.tensor([0.0, float("nan")], dtype=torch.float64)
    beta = torch.tensor(2.0, dtype=torch.float64)
    # validate_args given: a library imported before (a test's) may turn the default off.
    reference = torch.distributions.Normal(
        torch.tensor(0.0, dtype=torch.float64), 1.0 / beta, validate_args=True
    )
    for noise, normal in (
        (LogisticNoise(beta, validate_args=True), reference),
        (LogisticNoise(beta, validate_args=True).expand((2,)), reference.expand((2,))),
    ):
        with pytest.raises(ValueError, match="support"):
            normal.log_prob(nan)
        with pytest.raises(ValueError, match="support"):
            noise.log_prob(nan)
    quiet = LogisticNoise(beta, validate_args=False).expand((2,))
    logp = quiet.log_prob(nan)
    assert logp[0].item() == pytest.approx(sps.logistic(scale=0.5).logpdf(0.0), rel=1e-12)
    assert math.isnan(logp[1].item())


@pytest.mark.parametrize("beta", [0.7, 4.0])
def test_expected_relu_under_noise_is_softplus(beta):
    torch.manual_seed(2)
    n = 200_000
    x = torch.tensor([-1.0, -0.2, 0.0, 0.5, 2.0], dtype=torch.float64)
    e = LogisticNoise(torch.tensor(beta, dtype=torch.float64)).sample((n, 1))
    r = torch.relu(x - e)
    mean, se = r.mean(0), r.std(0) / math.sqrt(n)
    assert bool(((mean - softplus(x, beta)).abs() <= 4 * se).all())


# --- ReLU -> softplus_beta in a model -------------------------------------------------------


def _ref_softplus(x: torch.Tensor, beta: float) -> torch.Tensor:
    # torch's own softplus; a high threshold keeps it exact to float64 precision.
    return F.softplus(x, beta=beta, threshold=40.0)


class Inner(nn.Module):
    def __init__(self, soft: float | None) -> None:
        super().__init__()
        self.soft = soft
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = F.relu(h) if self.soft is None else _ref_softplus(h, self.soft)
        if self.soft is None:
            return x + self.block(h)
        return x + _ref_softplus(self.block[0](h), self.soft)


class Net(nn.Module):
    """Every ReLU spelling, in nested modules; ``soft=beta`` is the hand-written twin."""

    def __init__(self, soft: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.soft = soft
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.inner = Inner(soft)
        self.fc1 = nn.Linear(4 * 6 * 6, 12)
        self.fc2 = nn.Linear(12, 8)
        self.fc3 = nn.Linear(8, 3)

    def _act(self, kind: str, h: torch.Tensor) -> torch.Tensor:
        if self.soft is not None:
            return _ref_softplus(h, self.soft)
        return {
            "module": self.act,
            "torch": torch.relu,
            "method": torch.Tensor.relu,
            "method_": torch.Tensor.relu_,
        }[kind](h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._act("module", self.stem(x))
        h = self.inner(h).flatten(1)
        h = self._act("torch", self.fc1(h))
        h = self._act("method", self.fc2(h))
        return self._act("method_", self.fc3(h))


@pytest.fixture
def net_and_input():
    net = Net().double().eval()
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    return net, x


def _twin(net: Net, beta: float) -> Net:
    twin = Net(soft=beta).double().eval()
    twin.load_state_dict(net.state_dict())
    return twin


@pytest.mark.parametrize("beta", [0.5, 3.0])
def test_smooth_equals_hand_written_softplus_network(net_and_input, beta):
    net, x = net_and_input
    expected = _twin(net, beta)(x)
    torch.testing.assert_close(smooth(net, beta)(x), expected, rtol=1e-12, atol=1e-12)
    with smoothed(net, beta):
        torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bs.smooth(net, beta)(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("factory", [plain_cnn, vgg_small])
def test_smooth_equals_module_swap(factory):
    net = factory().double()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    swapped = copy.deepcopy(net)
    for i, m in enumerate(swapped):
        if isinstance(m, nn.ReLU):
            swapped[i] = nn.Softplus(beta=2.0, threshold=40.0)
    torch.testing.assert_close(smooth(net, 2.0)(x), swapped(x), rtol=1e-12, atol=1e-12)


def test_smooth_never_mutates_its_argument(net_and_input):
    net, x = net_and_input
    before = net(x)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    soft = smooth(net, 1.0)
    soft(x)
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)
    assert state.keys() == net.state_dict().keys() == soft.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert isinstance(net.act, nn.ReLU) and isinstance(net.inner.block[1], nn.ReLU)
    assert not net._forward_pre_hooks and not net._forward_hooks
    assert type(soft) is Net and soft.betasmooth_beta == 1.0
    assert not torch.allclose(soft(x), before)


def test_a_smoothed_copy_records_the_beta_it_was_given(net_and_input):
    net, x = net_and_input
    soft = smooth(net, 2.5)
    assert soft.betasmooth_beta == 2.5 and type(soft.betasmooth_beta) is float
    assert smooth(net, torch.tensor(0.75)).betasmooth_beta == 0.75
    # A number, as the handle keeps it: a tensor's value and an int as floats.
    for value, kept in [(torch.tensor(0.75), 0.75), (2, 2.0), (np.float32(0.5), 0.5)]:
        recorded = smooth(net, value).betasmooth_beta
        assert type(recorded) is float and recorded == kept


def test_smoothed_restores_on_exit_and_on_exceptions(net_and_input):
    net, x = net_and_input
    relu_out = net(x)
    soft_out = _twin(net, 1.0)(x)

    with smoothed(net, 1.0):
        torch.testing.assert_close(net(x), soft_out, rtol=1e-12, atol=1e-12)
        # Outside the model's forward, ReLU is untouched.
        assert torch.relu(torch.tensor(-1.0)).item() == 0.0
    torch.testing.assert_close(net(x), relu_out, rtol=0, atol=0)

    with pytest.raises(KeyError), smoothed(net, 1.0):
        raise KeyError("inside the context")
    torch.testing.assert_close(net(x), relu_out, rtol=0, atol=0)

    with smoothed(net, 1.0):
        with pytest.raises(RuntimeError, match="shape"):
            net(torch.randn(2, 1, 5, 5, dtype=torch.float64))  # fails inside forward
        # The failed pass left no override behind: ReLU outside is ReLU, inside is softplus.
        assert torch.relu(torch.tensor(-1.0)).item() == 0.0
        torch.testing.assert_close(net(x), soft_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net(x), relu_out, rtol=0, atol=0)
    assert torch.relu(torch.tensor(-1.0)).item() == 0.0
    assert not net._forward_pre_hooks and not net._forward_hooks


def test_handle_beta_change_takes_effect(net_and_input):
    net, x = net_and_input
    with smoothed(net, 1.0) as handle:
        torch.testing.assert_close(net(x), _twin(net, 1.0)(x), rtol=1e-12, atol=1e-12)
        handle.beta = 5.0
        torch.testing.assert_close(net(x), _twin(net, 5.0)(x), rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="beta must be"):
            handle.beta = -1.0
        assert handle.beta == 5.0


def test_large_beta_approaches_relu(net_and_input):
    net, x = net_and_input
    relu_out = net(x)
    gap_1 = (smooth(net, 1.0)(x) - relu_out).abs().max().item()
    gap_big = (smooth(net, 1e4)(x) - relu_out).abs().max().item()
    torch.testing.assert_close(smooth(net, 1e4)(x), _twin(net, 1e4)(x), rtol=1e-12, atol=1e-12)
    # Each unit moves by at most log(2) / beta.
    assert gap_big < 1e-3 < gap_1


def test_warning_for_model_without_relu():
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    with pytest.warns(UserWarning, match="no ReLU was called"), smoothed(net, 1.0):
        net(torch.ones(1, 3))

    # In place, a smooth activation is named as the activation.
    class InPlaceElu(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.elu_(super().forward(x))

    net = InPlaceElu(3, 3)
    with pytest.warns(UserWarning, match=r"\(its activations: elu\); beta"), smoothed(net, 1.0):
        net(torch.ones(1, 3))
    # Once per model: its smoothed copies are the same model.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smooth(net, 2.0)(torch.ones(1, 3))
    with pytest.warns(UserWarning, match="no ReLU was called"):
        smooth(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), 1.0)(torch.ones(1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smooth(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), 1.0)(torch.ones(1, 3))


def test_a_smoothed_copy_pickles_and_computes_the_same():
    # As torch.save(model) and multiprocessing pickle it.
    import pickle

    torch.manual_seed(0)
    soft = smooth(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), 2.0)
    x = torch.rand(5, 3)
    again = pickle.loads(pickle.dumps(soft))
    torch.testing.assert_close(again(x), soft(x), rtol=0, atol=0)
    expected = F.softplus(soft[0](x), beta=2.0) @ soft[2].weight.T + soft[2].bias
    torch.testing.assert_close(again(x), expected)


def test_warning_names_other_kinked_activations():
    class Kinked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Linear(3, 3), nn.Softshrink(), nn.Hardswish(), nn.ReLU6(), nn.ReLU()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.threshold(F.hardshrink(F.leaky_relu(self.body(x))), 0.1, 0.0)
            return F.rrelu_(F.threshold_(F.leaky_relu_(h), 0.2, 0.0), training=False)

    net = Kinked()
    with pytest.warns(UserWarning, match="stay non-smooth") as record, smoothed(net, 1.0):
        net(torch.ones(1, 3))
    message = " ".join(str(w.message) for w in record)
    for name in ("Softshrink", "hardshrink", " threshold", "rrelu"):
        assert name in message
    assert "_threshold" not in message and "threshold_" not in message
    # Written through ReLU, hence smoothed: not named.
    for name in ("Hardswish", "ReLU6", "leaky_relu"):
        assert name not in message
    assert "no ReLU" not in message


def test_an_activation_added_through_relu_is_smoothed_and_not_named(monkeypatch):
    # softshrink(x) = relu(x - 1/2) - relu(-x - 1/2), written with relu: smoothed
    # exactly, its module too, so the warning that it stays non-smooth was false.
    from betasmooth.smooth import THROUGH_RELU

    def softshrink(relu, x, lambd=0.5):
        return relu(x - lambd) - relu(-x - lambd)

    monkeypatch.setitem(THROUGH_RELU, F.softshrink, softshrink)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Softshrink(), nn.Linear(4, 2)).double()
    x = 4 * torch.randn(5, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with smoothed(net, 2.0):
            out = net(x)
    h = net[0](x)
    soft = F.softplus(h - 0.5, beta=2.0) - F.softplus(-h - 0.5, beta=2.0)
    torch.testing.assert_close(out, net[2](soft))


@pytest.mark.parametrize(
    ("inplace", "beta"), [(False, 10.0), (True, 10.0), (False, 1.0), (False, 0.1)]
)
def test_hardswish_is_smoothed_through_the_relus_of_its_gate(inplace, beta):
    # hardswish(x) = x relu6(x + 3) / 6: each ReLU replaced, x kept; smooth, so
    # not named as staying non-smooth (MobileNetV3 is made of it).
    net = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Hardswish(inplace=inplace)).double()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    x = torch.linspace(-40.0, 40.0, 8001, dtype=torch.float64)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = smooth(net, beta)(x).detach()

    # log(1 + exp(beta z)) / beta in closed form (F.softplus turns linear above beta z = 20).
    def softplus(z: torch.Tensor) -> torch.Tensor:
        return torch.logaddexp(beta * z, torch.zeros_like(z)) / beta

    gate = (softplus(x + 3.0) - softplus(x - 3.0)) / 6.0
    torch.testing.assert_close(out, x * gate, rtol=1e-14, atol=1e-15)

    # softplus_beta - relu, log(1 + exp(-beta |z|)) / beta, peaks at log(2) / beta at
    # the kinks x = -3 and 3, where the gate's other ReLU is 6 units away: the gap
    # there is 3 (d(0) - d(6)) / 6, the largest for beta >= 0.5. For smaller beta it
    # peaks further out, near x sigmoid(-beta x), whose largest value is 0.278 / beta.
    def d(z: float) -> float:
        return math.log1p(math.exp(-beta * abs(z))) / beta

    gap = (out - F.hardswish(x)).abs()
    at_kinks = gap[(x.abs() - 3).abs() < 1e-9]
    assert at_kinks.numel() == 2
    torch.testing.assert_close(at_kinks, torch.full_like(at_kinks, (d(0) - d(6)) / 2))
    if beta >= 0.5:
        assert float(gap.max()) == pytest.approx((d(0) - d(6)) / 2, rel=1e-9)
    assert float(gap.max()) <= math.log(2) / (2 * beta) * (1 + 1e-12)
    # Its second derivative is finite everywhere, where hardswish's jumps at -3 and 3.
    xs = torch.tensor([[-3.0], [3.0]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(smooth(net, beta)(xs).sum(), xs, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), xs)
    # d2/dx2 [x s(x)] = 2 s'(x) + x s''(x), s = gate: by hand at x = -3 and 3, with
    # sigma(beta z) the derivative of softplus_beta and beta sigma (1 - sigma) its own.
    up, down = torch.sigmoid(beta * (xs + 3)), torch.sigmoid(beta * (xs - 3))
    s1 = (up - down) / 6
    s2 = beta * (up * (1 - up) - down * (1 - down)) / 6
    torch.testing.assert_close(h, (2 * s1 + xs * s2).detach())


THROUGH_RELU_ACTIVATIONS = {
    "ReLU6": nn.ReLU6(),
    "ReLU6 in place": nn.ReLU6(inplace=True),
    "Hardtanh(-2, 0.5)": nn.Hardtanh(-2.0, 0.5),
    "LeakyReLU(0.2)": nn.LeakyReLU(0.2),
    "PReLU per channel": nn.PReLU(3, init=0.3),
    "Hardsigmoid": nn.Hardsigmoid(),
    "F.relu6": lambda x: F.relu6(x),
}


@pytest.mark.parametrize("name", sorted(THROUGH_RELU_ACTIVATIONS))
def test_activations_through_relu_are_exact_and_smoothed_by_their_logistic_mean(name):
    activation = THROUGH_RELU_ACTIVATIONS[name]
    if isinstance(activation, nn.PReLU):
        with torch.no_grad():
            activation.weight.copy_(torch.tensor([0.3, -0.2, 0.1]))
    net = nn.Sequential(nn.Identity(), activation) if isinstance(activation, nn.Module) else None
    net = (net or _Calls(activation)).double()
    x = torch.linspace(-9, 9, 3 * 37, dtype=torch.float64).view(1, 3, 37)
    plain = net(x.clone())
    # With ReLU itself the rewriting is the activation.
    with replace_relu(net, F.relu):
        torch.testing.assert_close(net(x.clone()), plain, rtol=0, atol=1e-12)
    # With softplus_beta it is the activation's mean under logistic noise of
    # scale 1/beta (numerical integration of the activation itself).
    beta = 1.5
    with smoothed(net, beta), torch.no_grad():
        ours = net(x.clone())
    scale = 1 / beta
    for c, i in [(0, 0), (0, 18), (1, 5), (1, 20), (2, 30), (2, 36)]:

        def integrand(e, c=c, i=i):
            point = x.clone()
            point[0, c, i] += e
            with torch.no_grad():
                value = float(net(point)[0, c, i])
            return value * sps.logistic.pdf(e, scale=scale)

        expected, _ = integrate.quad(integrand, -60 * scale, 60 * scale, limit=200)
        assert float(ours[0, c, i]) == pytest.approx(expected, rel=1e-7, abs=1e-9)


class _Calls(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _InPlace(nn.Module):
    """An activation applied in place as a statement, its result dropped."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.l2 = nn.Linear(5, 7), nn.Linear(7, 3)
        self.relu = nn.ReLU(inplace=True)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        if self.how == "Tensor.relu_":
            h.relu_()
        elif self.how == "nn.ReLU(inplace=True)":
            self.relu(h)
        elif self.how == "F.relu(h, True)":
            F.relu(h, True)
        elif self.how == "F.relu6(inplace=True)":
            F.relu6(h, inplace=True)
        elif self.how == "F.hardtanh(h, -0.5, 2.0, True)":
            F.hardtanh(h, -0.5, 2.0, True)
        elif self.how == "F.hardtanh_(h, -0.5, 2.0)":
            F.hardtanh_(h, -0.5, 2.0)
        elif self.how == "F.leaky_relu_(h, 0.2)":
            F.leaky_relu_(h, 0.2)
        elif self.how == "assigned":
            h = self.relu(h)
        elif self.how == "F.relu(input=h)":
            h = F.relu(input=h)
        return self.l2(h)


def _softplus_copy(model: _InPlace, x: torch.Tensor, beta: float) -> torch.Tensor:
    h = model.l1(x)
    if "relu6" in model.how:
        h = F.softplus(h, beta) - F.softplus(h - 6, beta)
    elif "hardtanh" in model.how:
        h = -0.5 + F.softplus(h + 0.5, beta) - F.softplus(h - 2.0, beta)
    elif "leaky" in model.how:
        h = 0.2 * h + 0.8 * F.softplus(h, beta)
    else:
        h = F.softplus(h, beta)
    return model.l2(h)


@pytest.mark.parametrize(
    "how",
    [
        "Tensor.relu_",
        "nn.ReLU(inplace=True)",
        "F.relu(h, True)",
        "F.relu6(inplace=True)",
        "F.hardtanh(h, -0.5, 2.0, True)",
        "F.hardtanh_(h, -0.5, 2.0)",
        "F.leaky_relu_(h, 0.2)",
        "assigned",
        "F.relu(input=h)",
    ],
)
def test_an_in_place_activation_whose_result_is_dropped_is_smoothed(how):
    # Its caller reads the input afterwards: the smoothed value must be written there.
    model = _InPlace(how).double()
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    ours, theirs = smooth(model, 3.0)(x), _softplus_copy(model, x, 3.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours[:, 0].sum(), x)
    (g_theirs,) = torch.autograd.grad(theirs[:, 0].sum(), x)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-12)
    if "relu6" not in how and "hardtanh" not in how and "leaky" not in how:
        # Guided backprop overrides the same calls: the statement is the assigned form.
        assigned = _InPlace("assigned").double()
        guided = bs.explain(model, x.detach(), "guided_backprop", 0)
        torch.testing.assert_close(guided, bs.explain(assigned, x.detach(), "guided_backprop", 0))


@pytest.mark.parametrize("start", [False, True])
def test_flush_denormals_zeroes_subnormals_then_restores_the_state(start):
    tiny = torch.tensor([1e-39])  # below float32's smallest normal, 1.18e-38
    assert float(tiny) > 0
    if not torch.set_flush_denormal(start):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        with flush_denormals():
            assert float(tiny * 1.0) == 0.0
            assert float(torch.tensor([1e-37]) * 1.0) == pytest.approx(1e-37)  # normal: kept
        assert (float(tiny * 1.0) == 0.0) is start
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("method", ["beta_smooth", "gradient", "smoothgrad"])
def test_explain_flushes_subnormals_then_restores(method):
    spy = FlushSpy(plain_cnn(seed=1))
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    options = {"beta": 50.0} if method == "beta_smooth" else {}
    bs.explain(spy, x, method, **options)
    # The first forward is the input check; every forward of the method is flushed.
    assert len(spy.seen) >= 2 and all(spy.seen[1:])
    assert float(torch.tensor([1e-39]) * 1.0) > 0


class _Checkpointed(torch.nn.Module):
    """Linear, ReLU, linear; the first two under torch.utils.checkpoint (or offloading)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.how = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def block(h: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.a(h))

        if self.how == "offloaded":
            with torch.autograd.graph.save_on_cpu():
                return self.b(block(x))
        reentrant = self.how == "reentrant"
        return self.b(torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant))


@pytest.mark.parametrize("how", ["reentrant", "non-reentrant"])
def test_beta_smoothing_refuses_activation_checkpointing(how):
    # Backward recomputes a checkpointed block after the smoothing has ended:
    # softplus forward, ReLU backward, a map that is neither.
    x = torch.rand(2, 4, dtype=torch.float64)
    net = _Checkpointed(how).double()
    with pytest.raises(
        bs.InputError, match=r"^beta-smoothing cannot reach a ReLU under activation"
    ):
        bs.explain(net, x, "beta_smooth", beta=2.0)
    # Guided backprop replaces the ReLUs by the same mechanism, and says so in its own name.
    with pytest.raises(
        bs.InputError, match=r"^guided_backprop cannot reach a ReLU under activation"
    ):
        bs.explain(net, x, "guided_backprop")
    with pytest.raises(bs.InputError, match=r"activation checkpointing"):
        bs.smooth(net, 2.0)(x.clone().requires_grad_(True))


@pytest.mark.parametrize("how", ["reentrant", "non-reentrant"])
def test_a_refused_checkpointed_pass_does_not_also_warn_that_no_relu_ran(how):
    # The refusal is the whole message: the failed pass replaced nothing, which
    # is no model without ReLU.
    x = torch.rand(2, 4, dtype=torch.float64)
    net = _Checkpointed(how).double()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(bs.InputError, match=r"activation checkpointing"):
            bs.explain(net, x, "beta_smooth", beta=2.0)
    assert not [str(w.message) for w in seen if "ReLU" in str(w.message)]


@pytest.mark.parametrize("how", ["reentrant", "non-reentrant"])
def test_a_checkpointed_model_smoothed_without_gradients_is_the_softplus_model(how):
    # Without gradients, backward recomputes nothing: the forward is the softplus network's.
    torch.manual_seed(0)
    x = torch.rand(3, 4, dtype=torch.float64)
    net = _Checkpointed(how).double()
    with torch.no_grad():
        out = bs.smooth(net, 2.0)(x)
        expected = net.b(F.softplus(net.a(x), beta=2.0))
    torch.testing.assert_close(out, expected)


def test_beta_smoothing_of_a_captum_method_names_checkpointing_in_its_own_words():
    # The refusal from inside Captum's forward came back as "captum:Saliency
    # failed on this model: beta-smoothing cannot ...".
    x = torch.rand(2, 4, dtype=torch.float64)
    with pytest.raises(
        bs.InputError, match=r"^beta-smoothing cannot reach a ReLU under activation"
    ):
        bs.explain(
            _Checkpointed("non-reentrant").double(), x, "beta_smooth", base="captum:Saliency"
        )


def test_a_relu_under_no_grad_is_no_checkpoint():
    # A stop-gradient gate: its ReLU runs without gradients, outside any checkpoint.
    class Gated(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                gate = torch.relu(x - 0.5).gt(0).to(x.dtype).sum(1, keepdim=True)
            return self.b(torch.relu(self.a(x)) * gate)

    x = torch.rand(2, 4, dtype=torch.float64)
    net = Gated().double()
    # Smoothed as every ReLU in forward: softplus > 0 everywhere.
    gate = F.softplus(x - 0.5, beta=2.0).gt(0).to(x.dtype).sum(1, keepdim=True)
    twin = torch.nn.Sequential(net.a, torch.nn.Softplus(2.0))
    xg = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(net.b(twin(xg) * gate)[:, 1].sum(), xg)
    torch.testing.assert_close(bs.explain(net, x, "beta_smooth", 1, beta=2.0), expected)


def test_beta_smoothing_of_an_offloading_model_is_the_softplus_model():
    # save_on_cpu hooks saved tensors too, but recomputes nothing: not refused.
    x = torch.rand(2, 4, dtype=torch.float64)
    net = _Checkpointed("offloaded").double()
    twin = torch.nn.Sequential(net.a, torch.nn.Softplus(2.0), net.b)
    expected = bs.explain(twin, x, "gradient", 1)
    torch.testing.assert_close(bs.explain(net, x, "beta_smooth", 1, beta=2.0), expected)


def test_torchvision_memory_efficient_densenet_is_refused_and_the_plain_one_smoothed():
    torchvision = pytest.importorskip("torchvision")
    x = torch.rand(1, 3, 32, 32)
    torch.manual_seed(0)
    efficient = torchvision.models.densenet121(memory_efficient=True).eval()
    with pytest.raises(bs.InputError, match=r"densenet121\(memory_efficient=False\)"):
        bs.explain(efficient, x, "beta_smooth", beta=2.0)
    plain = torchvision.models.densenet121(memory_efficient=False).eval()
    plain.load_state_dict(efficient.state_dict())
    assert torch.isfinite(bs.explain(plain, x, "beta_smooth", beta=2.0)).all()


@pytest.mark.parametrize(
    "count",
    [lambda n: torch.relu(torch.tensor(n)), lambda n: torch.relu(input=torch.tensor(n))],
    ids=["positional", "keyword"],
)
def test_a_relu_of_integers_in_forward_is_left_alone(count):
    # Integer bookkeeping through torch.relu was handed to softplus, which
    # blamed the (floating) input x; also when the input is passed by keyword.
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)

    class Counting(nn.Module):
        def __init__(self, activation):
            super().__init__()
            self.linear, self.activation = linear, activation

        def forward(self, x):
            k = count(x.shape[1] - 2)  # 2, an integer
            return self.activation(self.linear(x)) * k

    x = torch.rand(5, 4, dtype=torch.float64)
    beta = 3.0
    hand = Counting(lambda h: F.softplus(h, beta=beta)).double()
    target = torch.tensor([0, 1, 2, 0, 1])
    expected = bs.explain(hand, x, "gradient", target=target)
    got = bs.explain(Counting(torch.relu).double(), x, "beta_smooth", target=target, beta=beta)
    torch.testing.assert_close(got, expected)
    assert bs.smooth(Counting(torch.relu).double(), beta)(x).equal(hand(x))


def _sp(h):
    return F.softplus(h, beta=2.0)


@pytest.mark.parametrize(
    ("spelling", "by_hand"),
    [
        (lambda h: torch.relu(h), _sp),
        (lambda h: torch.relu(input=h), _sp),
        (lambda h: F.relu(h), _sp),
        (lambda h: F.leaky_relu(h, 0.1), lambda h: 0.1 * h + 0.9 * _sp(h)),
        (lambda h: F.hardtanh(h, -0.5, 0.5), lambda h: -0.5 + _sp(h + 0.5) - _sp(h - 0.5)),
    ],
    ids=["relu", "relu-keyword", "F.relu", "leaky_relu", "hardtanh"],
)
def test_an_activation_that_is_not_in_place_leaves_its_input_for_a_skip(spelling, by_hand):
    # The pre-activation h also feeds a skip connection: smoothing must not write into it.
    torch.manual_seed(0)
    a, b = nn.Linear(4, 5).double(), nn.Linear(5, 3).double()

    class Skip(nn.Module):
        def __init__(self, activation):
            super().__init__()
            self.a, self.b, self.activation = a, b, activation

        def forward(self, x):
            h = self.a(x)
            return self.b(self.activation(h) + h)

    x = torch.rand(6, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    expected = bs.explain(Skip(by_hand), x, "gradient", target=target)
    got = bs.explain(Skip(spelling), x, "beta_smooth", target=target, beta=2.0)
    torch.testing.assert_close(got, expected)
    with torch.no_grad():
        torch.testing.assert_close(bs.smooth(Skip(spelling), 2.0)(x), Skip(by_hand)(x))


def _interrupt(*args: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["submodule", "pre-hook", "backward"])
def test_an_interrupted_smoothed_copy_leaves_relu_as_it_was(where):
    # KeyboardInterrupt is no Exception: torch skips the always-called hook that leaves the
    # override, which then smoothed every ReLU in the process, the original model's too.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    soft = smooth(net, 2.0)
    x = torch.randn(5, 3, requires_grad=True)
    if where == "submodule":
        handle = soft[2].register_forward_hook(_interrupt)
    elif where == "pre-hook":  # a user's hook on the copy, after the one that smooths
        handle = soft.register_forward_pre_hook(_interrupt)
    else:
        handle = soft[2].register_full_backward_hook(_interrupt)
    with pytest.raises(KeyboardInterrupt):
        bs.explain(soft, x, "gradient", 0)
    handle.remove()
    assert torch.relu(torch.tensor(-1.0)).item() == 0.0
    relu_net = F.relu(F.relu(x @ net[0].weight.T + net[0].bias) @ net[2].weight.T + net[2].bias)
    torch.testing.assert_close(net(x), relu_net)
    # The copy still smooths (softplus_2 after both layers), and its next forward leaves
    # no override behind.
    hidden = F.softplus(x @ net[0].weight.T + net[0].bias, beta=2.0)
    torch.testing.assert_close(
        soft(x), F.softplus(hidden @ net[2].weight.T + net[2].bias, beta=2.0)
    )
    assert torch._C._len_torch_function_stack() == 0


def test_relu_stays_relu_at_every_call_after_an_interrupted_smoothed_forward():
    # The override an interrupt left on torch's stack is found stale at the first ReLU
    # after it; each later ReLU, not only that first one, must pass through as ReLU.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    soft = smooth(net, 2.0)
    handle = soft[2].register_forward_hook(_interrupt)
    with pytest.raises(KeyboardInterrupt):
        soft(torch.randn(5, 3))
    handle.remove()
    h = torch.tensor([-1.0, -0.25, 0.0, 0.5])
    for _ in range(3):
        assert torch.relu(h).tolist() == [0.0, 0.0, 0.0, 0.5]
        assert F.relu(h).tolist() == [0.0, 0.0, 0.0, 0.5]
    x = torch.randn(5, 3)
    relu_net = (x @ net[0].weight.T + net[0].bias).clamp(min=0)
    relu_net = (relu_net @ net[2].weight.T + net[2].bias).clamp(min=0)
    torch.testing.assert_close(net(x), relu_net)
    soft(x)  # the copy's next forward takes the stale override off
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("call", ["create_graph", "curvature"])
def test_an_interrupt_inside_a_smoothed_copy_under_second_order_leaves_no_mode(call):
    # second_order's own mode is taken off, not the stale override the interrupt left
    # above it: Hardsigmoid stayed rewritten, and every torch call went through a mode.
    from betasmooth.geometry import curvature
    from betasmooth.smooth import _function_modes, _SecondOrderForms

    def interrupt_under_second_order(*args: object) -> None:
        # Not in the checks' forward before second_order begins.
        if any(isinstance(mode, _SecondOrderForms) for mode in _function_modes()):
            raise KeyboardInterrupt

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    soft = smooth(net, 2.0)
    x = torch.randn(5, 3, requires_grad=True)
    handle = soft[2].register_forward_hook(interrupt_under_second_order)
    with pytest.raises(KeyboardInterrupt):
        if call == "create_graph":
            bs.explain(soft, x, "gradient", 0, create_graph=True)
        else:
            curvature(soft, x.detach(), 0, iterations=2)
    handle.remove()
    assert torch._C._len_torch_function_stack() == 0
    z = torch.zeros(1, requires_grad=True)
    assert type(F.hardsigmoid(z).grad_fn).__name__ == "HardsigmoidBackward0"


def test_an_interrupt_inside_a_smoothed_copy_within_smoothed_leaves_no_override():
    # The context's own override is left, not the stale one the interrupt left above it
    # (TorchFunctionMode.__exit__ pops whatever is on top).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    holder = nn.Sequential(nn.Identity(), smooth(net, 2.0))
    x = torch.randn(5, 3)
    handle = holder[1][2].register_forward_hook(_interrupt)
    with pytest.raises(KeyboardInterrupt), smoothed(holder, 5.0):
        holder(x)
    handle.remove()
    assert torch._C._len_torch_function_stack() == 0
    assert torch.relu(torch.tensor(-1.0)).item() == 0.0
    relu_net = F.relu(F.relu(x @ net[0].weight.T + net[0].bias) @ net[2].weight.T + net[2].bias)
    torch.testing.assert_close(net(x), relu_net)


def test_threads_sharing_a_smoothed_copy_smooth_only_inside_its_forward():
    # Torch's stack of function modes is per thread; DataParallel's replicas share their
    # hooks. A thread must not leave another thread's override, nor keep its own.
    import sys
    import threading

    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.ReLU())])
    soft = smooth(net, 2.0)
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected_soft, expected_net = soft(x), net(x)
    failures: list[str] = []

    def work() -> None:
        with torch.no_grad():
            for i in range(40):
                if not torch.equal(soft(x), expected_soft):
                    failures.append(f"soft {i}")
                if not torch.equal(net(x), expected_net):
                    failures.append(f"net {i}")
        if torch.relu(torch.tensor(-1.0)).item() != 0.0:
            failures.append("relu left smoothed")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []


def test_torch_func_transforms_run_through_a_smoothed_model():
    # vmap/jacrev/hessian raised in the autograd.Function without setup_context and jvp.
    torch.manual_seed(0)
    # Two smoothed layers: the Hessian then takes the forward tangent of the first.
    net = nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)
    ).double()
    soft = smooth(net, 2.0)
    x = torch.randn(4, 5, dtype=torch.float64)

    def by_hand(v: torch.Tensor) -> torch.Tensor:
        return net[4](F.softplus(net[2](F.softplus(net[0](v), 2.0)), 2.0))

    jac = torch.func.vmap(torch.func.jacrev(lambda v: soft(v[None])[0]))(x)
    expected = torch.func.vmap(torch.func.jacrev(lambda v: by_hand(v[None])[0]))(x)
    torch.testing.assert_close(jac, expected, rtol=1e-12, atol=1e-15)
    hess = torch.func.hessian(lambda v: soft(v[None])[0, 0])(x[0])
    expected = torch.func.hessian(lambda v: by_hand(v[None])[0, 0])(x[0])
    assert float(expected.abs().max()) > 1e-3
    torch.testing.assert_close(hess, expected, rtol=1e-10, atol=1e-15)
    # Forward mode in x: sigmoid(beta x), in closed form.
    for b in (0.5, 4.0):
        _, tangent = torch.func.jvp(lambda v, b=b: softplus(v, b), (x,), (torch.ones_like(x),))
        torch.testing.assert_close(tangent, torch.sigmoid(b * x), rtol=1e-14, atol=0)
    # Forward mode in a tensor beta: the closed form's derivative, as reverse mode gives it.
    beta = torch.tensor(2.0, dtype=torch.float64)
    forward = torch.func.jacfwd(lambda b: softplus(x, b).sum())(beta)
    reverse = torch.func.grad(lambda b: softplus(x, b).sum())(beta)
    z = 2.0 * x
    closed = ((z * torch.sigmoid(z) - F.softplus(z)) / 4.0).sum()
    torch.testing.assert_close(forward, closed, rtol=1e-12, atol=0)
    torch.testing.assert_close(reverse, closed, rtol=1e-12, atol=0)


def test_vmap_over_betas_gives_each_beta_as_a_loop_would():
    # check_beta branched on the values of a vmapped beta, which vmap refuses.
    torch.manual_seed(0)
    x = torch.randn(6, dtype=torch.float64)
    betas = torch.tensor([0.5, 4.0, 30.0], dtype=torch.float64)
    values = torch.func.vmap(lambda b: softplus(x, b))(betas)
    closed = torch.log1p(torch.exp(betas[:, None] * x)) / betas[:, None]
    torch.testing.assert_close(values, closed, rtol=1e-12, atol=0)
    grads = torch.func.vmap(lambda b: torch.func.grad(lambda v: softplus(v, b).sum())(x))(betas)
    torch.testing.assert_close(grads, torch.sigmoid(betas[:, None] * x), rtol=1e-14, atol=0)
    cdf = torch.func.vmap(lambda b: LogisticNoise(b).cdf(x))(betas)
    torch.testing.assert_close(cdf, torch.sigmoid(betas[:, None] * x), rtol=1e-14, atol=0)
    # Every batch entry is checked, not only the first.
    with pytest.raises(InputError, match="got -2.0"):
        torch.func.vmap(lambda b: softplus(x, b))(torch.tensor([1.0, -2.0]))


def test_vmap_over_betas_runs_a_smoothed_model_once_for_all_betas():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ReLU6(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    betas = torch.tensor([1.0, 5.0, 20.0], dtype=torch.float64)

    def by_hand(b: float, v: torch.Tensor = x) -> torch.Tensor:
        h = F.softplus(net[0](v), b)
        return net[4](net[3](F.softplus(h, b) - F.softplus(h - 6, b)))

    def logits(b: torch.Tensor) -> torch.Tensor:
        with smoothed(net, b):
            return net(x)

    batched = torch.func.vmap(logits)(betas)
    torch.testing.assert_close(batched, torch.stack([by_hand(float(b)) for b in betas]))
    grads = torch.func.vmap(lambda b: torch.func.grad(lambda v: smooth(net, b)(v)[:, 0].sum())(x))(
        betas
    )
    for b, grad in zip(betas, grads):
        expected = torch.func.grad(lambda v, b=float(b): by_hand(b, v)[:, 0].sum())(x)
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize(
    ("name", "in_place"),
    [
        ("resnet18", [("relu", nn.ReLU)]),
        # Hardswish is smoothed through ReLUs, in place where its module is: the stem's,
        # whose input does not depend on beta (later in-place ReLUs' inputs do).
        ("mobilenet_v3_small", [("hardswish", nn.Hardswish)]),
    ],
)
def test_vmap_over_betas_on_a_torchvision_network_names_its_in_place_activations(name, in_place):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, num_classes=4)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        net(x)  # BatchNorm statistics of these images, so that the logits are not ~0
    net.eval()
    betas = torch.tensor([1.0, 10.0])

    def logits(b: torch.Tensor) -> torch.Tensor:
        with smoothed(net, b):
            return net(x)

    for activation, kind in in_place:
        with pytest.raises(InputError, match=rf"^an in-place {activation} .* inplace=False$"):
            torch.func.vmap(logits)(betas)
        for module in net.modules():
            if isinstance(module, kind):
                module.inplace = False
    with torch.no_grad():
        batched = torch.func.vmap(logits)(betas)
        loop = torch.stack([smooth(net, float(b))(x) for b in betas])
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-6)
    assert float((loop[0] - loop[1]).abs().max()) > 1e-3 * float(loop.abs().max())


@pytest.mark.parametrize("z", [17.0, 25.0, 35.0])
@pytest.mark.parametrize("beta", [1.0, 1e-2])
def test_float64_softplus_is_exact_where_float32_would_return_x(z, beta):
    # Between float32's cut-over (beta x > ~16) and float64's (~36) the
    # log1p(exp(-z)) term still counts in float64.
    x = torch.tensor([z / beta], dtype=torch.float64)
    exact = (z + math.log1p(math.exp(-z))) / beta
    torch.testing.assert_close(
        softplus(x, beta), torch.tensor([exact], dtype=torch.float64), rtol=4e-16, atol=0
    )


class _DefaultInPlace(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        h = x * 3.0
        if self.how == "leaky_relu_":
            F.leaky_relu_(h)  # default negative_slope 0.01
        elif self.how == "hardtanh_":
            F.hardtanh_(h)  # default bounds -1, 1
        return h


@pytest.mark.parametrize("how", ["leaky_relu_", "hardtanh_"])
def test_in_place_forms_with_default_arguments_keep_torchs_defaults(how):
    # With the ReLU itself as the replacement the rewritten activation must equal
    # torch's own, default constants included.
    net = _DefaultInPlace(how)
    x = torch.linspace(-2, 2, 41, dtype=torch.float64).view(1, -1)
    expected = net(x)
    with replace_relu(net, torch.relu) as done:
        got = net(x)
    assert done[0].replaced > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)


def test_a_scripted_part_with_relu6_is_refused():
    class Part(nn.Module):
        def forward(self, x):
            return F.relu6(x)

    net = nn.Sequential(nn.Linear(2, 2), torch.jit.script(Part()))
    with pytest.raises(bs.validate.InputError, match="TorchScript"):
        check_overridable(net)


@pytest.mark.parametrize(
    "part",
    [nn.Hardswish, nn.LeakyReLU, nn.Hardtanh, nn.PReLU, nn.Hardsigmoid, nn.ReLU6, nn.ReLU],
)
def test_a_scripted_part_with_any_activation_made_of_relu_is_refused_by_its_path(part):
    # Every activation of THROUGH_RELU is replaced through its ReLUs: a scripted part
    # that runs one keeps it unsmoothed, so the check names that part (index 1).
    net = nn.Sequential(nn.Linear(2, 2), torch.jit.script(part()))
    with pytest.raises(
        InputError,
        match=r"^beta-smoothing cannot reach the ReLUs of its "
        r"submodule 1, a TorchScript module",
    ):
        check_overridable(net)


def test_a_scripted_part_without_relu_is_accepted():
    # A scripted tanh has no ReLU for the override to miss: nothing to refuse.
    check_overridable(nn.Sequential(nn.Linear(2, 2), torch.jit.script(nn.Tanh())))


def test_replace_relu_counts_every_relu_call_of_the_first_pass():
    class Three(nn.Module):
        def forward(self, x):
            return torch.relu(F.relu(x) - 0.5).relu() + nn.functional.relu6(x)

    net = Three()
    with replace_relu(net, torch.relu) as done:
        net(torch.randn(2, 3))
    # One per activation call replaced: relu, F.relu, Tensor.relu and relu6.
    assert done[0].replaced == 4


def test_replace_relu_without_through_leaves_the_activations_made_of_relu_as_they_are():
    # through=False (guided backprop's): only ReLU itself is replaced; ReLU6 and LeakyReLU
    # keep torch's own values. With it, each is its sum of replaced ReLUs.
    net = nn.Sequential(nn.Identity(), nn.ReLU6(), nn.LeakyReLU(0.2)).double()
    x = torch.linspace(-8.0, 8.0, 33, dtype=torch.float64)

    def soft(h: torch.Tensor) -> torch.Tensor:
        return F.softplus(h, beta=2.0, threshold=40.0)

    with replace_relu(net, soft, through=False) as done:
        out = net(x)
    torch.testing.assert_close(out, F.leaky_relu(F.relu6(x), 0.2), rtol=0, atol=0)
    assert done[0].replaced == 0
    with replace_relu(net, soft) as done:
        out = net(x)
    h = soft(x) - soft(x - 6.0)
    torch.testing.assert_close(out, 0.2 * h + 0.8 * soft(h))
    assert done[0].replaced == 2


def test_replace_relu_warns_only_when_asked():
    # warn=False (the default, as the attack's surrogate uses it): a model without ReLU and
    # with a kinked activation passes in silence; warn=True says both.
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Hardshrink())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with replace_relu(net, torch.relu) as done:
            net(torch.ones(1, 3))
    assert done[0].replaced == 0
    with pytest.warns(UserWarning) as record, replace_relu(net, torch.relu, warn=True):
        net(torch.ones(1, 3))
    said = " ".join(str(w.message) for w in record)
    assert "no ReLU was called" in said and "stay non-smooth: Hardshrink" in said


def test_a_smoothed_forward_that_raises_takes_its_override_off_at_once():
    # The always-called forward hook leaves the override on an exception: nothing is left
    # on torch's stack of function modes for the calls that follow, outside any forward.
    # The failed pass, stopped before any ReLU, says nothing of the model: no "no ReLU"
    # warning, and the first pass that runs through gives the warnings and the count.
    from betasmooth.smooth import replace_relu

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Hardshrink(), nn.Linear(4, 2))

    soft = smooth(build(), 2.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            soft(torch.ones(1, 5))
        assert torch._C._len_torch_function_stack() == 0
        assert torch.relu(torch.tensor([-1.0, 0.5])).tolist() == [0.0, 0.5]
        assert [str(w.message) for w in record] == []
        soft(torch.ones(1, 3))
    assert [str(w.message).split("; ")[-1] for w in record] == [
        "these piecewise-linear activations stay non-smooth: Hardshrink"
    ]
    net = build()
    with replace_relu(net, torch.relu) as done:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            net(torch.ones(1, 5))
        net(torch.ones(1, 3))
    assert done[0].replaced == 1


@pytest.mark.parametrize(
    ("floor", "named"),
    # An integer zero is a ReLU too: torch.maximum(h, torch.tensor(0)) of a float h.
    [([0.0, 0.0, 0.0], True), ([0.0, -1.0, 0.5], False), (0, True), ([0, 0, 0], True)],
)
def test_a_maximum_is_named_as_a_relu_only_where_its_other_operand_is_all_zeros(floor, named):
    # maximum(h, c) is relu(h) for c = 0 everywhere; a floor that is 0 in one place only
    # is another activation, not a ReLU left unsmoothed.
    class Floored(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(torch.maximum(self.linear(x), torch.tensor(floor)))

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        smooth(Floored(), 2.0)(torch.ones(1, 3))
    said = [str(w.message) for w in record]
    assert said == (
        [
            "Floored: beta-smoothing replaces ReLU and the activations made of it; these "
            "piecewise-linear activations stay non-smooth: maximum(x, 0)"
        ]
        if named
        else []
    )


def test_relu_calls_counts_an_in_place_relu_on_the_input_and_leaves_the_input_alone():
    # The first layer an in-place ReLU of x itself: counted, as the later one, and x
    # unchanged (relu_calls tracks a copy of x, which the ReLU may overwrite).
    from betasmooth.smooth import relu_calls

    net = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 2), nn.ReLU())
    x = torch.tensor([[-1.0, 0.5, 2.0], [0.3, -0.2, -4.0]])
    before = x.clone()
    assert relu_calls(net, x) == 2
    assert torch.equal(x, before)


def test_guided_backprop_and_beta_smoothing_name_kinked_activations_each_in_its_words():
    # replace_relu(warn="<what>") names the method in the piecewise-linear warning.

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Hardshrink(0.1), nn.Linear(3, 2)
    )
    x = torch.rand(2, 1, 2, 2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bs.explain(net, x, "guided_backprop", 0)
    assert [str(w.message) for w in record if "plain gradient" in str(w.message)] == [
        "Sequential: guided_backprop acts on ReLU only; these activations "
        "pass their plain gradient: Hardshrink"
    ]
    with pytest.warns(
        UserWarning, match="piecewise-linear activations stay non-smooth: Hardshrink"
    ):
        bs.explain(net, x, "beta_smooth", 0, beta=2.0)


def test_guided_backprop_names_the_activations_made_of_relu_that_it_leaves_alone():
    # Guided backprop (through=False) replaces ReLU only: ReLU6 and LeakyReLU pass
    # their plain gradient, which its warning says, naming each by its module.
    net = nn.Sequential(nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with replace_relu(net, torch.relu, warn="guided_backprop", through=False):
            net(torch.linspace(-8, 8, 5))
    assert [str(w.message) for w in record] == [
        "Sequential: guided_backprop acts on ReLU only; these activations "
        "pass their plain gradient: LeakyReLU, ReLU6"
    ]


def test_a_smoothed_model_smoothed_again_computes_the_new_beta_and_warns_of_nothing():
    # The later smoothing's override is on top of torch's stack: the earlier one never
    # sees a ReLU, yet it did not fail to find one.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    by_hand = net[2](F.softplus(net[0](x), beta=5.0))
    once = bs.smooth(net, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twice = bs.smooth(once, 5.0)(x)
        with bs.smoothed(once, 5.0):
            inside = once(x)
    torch.testing.assert_close(twice, by_hand)
    torch.testing.assert_close(inside, by_hand)
    torch.testing.assert_close(once(x), net[2](F.softplus(net[0](x), beta=1.0)))
    # A model without a ReLU is still told so, also under two smoothings.
    with pytest.warns(UserWarning, match=r"no ReLU was called in forward; beta-smoothing changed"):
        bs.smooth(bs.smooth(nn.Sequential(nn.Linear(3, 2)), 1.0), 5.0)(x)


def test_smoothing_a_model_around_a_smoothed_one_without_a_relu_of_its_own_is_told_so():
    # The inner copy's override takes every ReLU: the outer beta changes nothing.
    torch.manual_seed(0)
    inner = bs.smooth(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), 5.0)
    outer = bs.smooth(nn.Sequential(inner, nn.Tanh()), 1.0)
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"no ReLU was called in forward .* changed nothing"):
        out = outer(x)
    torch.testing.assert_close(out, torch.tanh(inner(x)))


def test_prelu_of_two_channels_is_smoothed_per_channel_with_its_gradient_in_the_slopes():
    # prelu(x) = w x + (1 - w) relu(x), w per channel (dimension 1): with two slopes,
    # too, each channel takes its own, and d/dw = x - softplus_beta(x) by hand.
    act = nn.PReLU(2).double()
    with torch.no_grad():
        act.weight.copy_(torch.tensor([0.25, -0.5]))
    x = torch.linspace(-3, 3, 2 * 4 * 5, dtype=torch.float64).view(4, 2, 5)
    beta = 2.0
    soft = smooth(nn.Sequential(act), beta)
    out = soft(x)
    sp = torch.logaddexp(beta * x, torch.zeros_like(x)) / beta
    w = torch.tensor([0.25, -0.5], dtype=torch.float64).view(1, 2, 1)
    torch.testing.assert_close(out, w * x + (1 - w) * sp, rtol=1e-14, atol=1e-15)
    (grad_w,) = torch.autograd.grad(out.sum(), soft[0].weight)
    torch.testing.assert_close(grad_w, (x - sp).sum(dim=(0, 2)), rtol=1e-12, atol=1e-12)


def test_prelu_of_one_slope_keeps_the_shape_of_a_one_dimensional_input():
    # torch.prelu takes a 1-d input with one slope; smoothed, it is
    # w x + (1 - w) softplus_beta(x) of the same shape, by the closed form.
    act = nn.PReLU().double()
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    out = smooth(act, 2.0)(x)
    sp = np.log1p(np.exp(2.0 * x.numpy())) / 2.0
    assert out.shape == act(x).shape == (7,)
    np.testing.assert_allclose(out.detach().numpy(), 0.25 * x.numpy() + 0.75 * sp, rtol=1e-14)


@pytest.mark.parametrize("beta", [0.5, torch.tensor(3.0, dtype=torch.float64)])
def test_the_forward_tangent_of_softplus_has_its_own_derivative(beta):
    # Reverse mode over forward mode: d/dx of the tangent sigmoid(beta x) is
    # beta sigmoid(beta x) (1 - sigmoid(beta x)), for a float beta and a tensor one.
    x = torch.linspace(-4, 4, 9, dtype=torch.float64, requires_grad=True)
    _, tangent = torch.func.jvp(lambda v: softplus(v, beta), (x,), (torch.ones_like(x),))
    (second,) = torch.autograd.grad(tangent.sum(), x)
    s = torch.sigmoid(float(beta) * x.detach())
    torch.testing.assert_close(second, float(beta) * s * (1 - s), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_uniform_keeps_half_a_step_from_both_ends(dtype):
    # u = 0 and the last value below 1 draw logit(eps / 2) / beta and its opposite.
    half = torch.finfo(dtype).eps / 2
    u = torch.tensor([0.0, 1 - half, 0.5], dtype=dtype)
    e = LogisticNoise(torch.tensor(2.0, dtype=dtype)).from_uniform(u)
    end = math.log(half / (1 - half)) / 2.0
    torch.testing.assert_close(e, torch.tensor([end, -end, 0.0], dtype=dtype))


def test_from_uniform_keeps_an_exact_one_half_a_step_away_too():
    # from_uniform keeps u at least half a step from 1: u = 1 itself (outside
    # torch.rand's range, but a uniform that a caller may pass) draws the same
    # finite end as the last float below 1, logit(1 - eps / 2) / beta, not inf.
    half = torch.finfo(torch.float64).eps / 2
    e = LogisticNoise(torch.tensor(2.0, dtype=torch.float64)).from_uniform(
        torch.tensor([1.0], dtype=torch.float64)
    )
    assert e.item() == pytest.approx(math.log((1 - half) / half) / 2.0, rel=1e-12)


def test_relu_calls_leaves_out_a_relu_of_the_parameters_alone():
    # A ReLU of a constant table (Swin V2's position bias) changes nothing that depends
    # on x: of the three calls only the one on the input's path counts.
    from betasmooth.smooth import relu_calls

    class Biased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
            self.register_buffer("offset", torch.tensor([1.0, -1.0, 0.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x) + torch.relu(self.table) + self.offset.relu()

    assert relu_calls(Biased(), torch.ones(2, 3)) == 1


def test_second_order_differentiates_hardsigmoid_and_attention_twice():
    # Inside second_order, hardsigmoid and attention (whose fused CPU kernel has no
    # second derivative) compute the same values, differentiated twice by hand.
    from betasmooth.smooth import second_order

    x = torch.tensor([0.75, 1.5, 2.0], dtype=torch.float64, requires_grad=True)
    with second_order():
        y = F.hardsigmoid(x * x)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)
    # hardsigmoid(x^2) = x^2 / 6 + 1 / 2 for x^2 < 3, 1 above.
    torch.testing.assert_close(y, F.hardsigmoid(x * x))
    torch.testing.assert_close(g, torch.tensor([0.25, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(h, torch.tensor([1 / 3, 1 / 3, 0.0], dtype=torch.float64))

    def attention(q: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(q @ q.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return weights @ q

    q = torch.rand(1, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q.requires_grad_(True)
    hessian_vector = []
    for context, f in [(second_order, F.scaled_dot_product_attention), (None, attention)]:
        with context() if context else contextlib.nullcontext():
            out = f(q, q, q) if context else f(q)
            (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
            (h,) = torch.autograd.grad(g.sum(), q)
        hessian_vector.append(h)
    torch.testing.assert_close(*hessian_vector, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("floor", "named"),
    [
        (lambda h: torch.maximum(h, other=torch.zeros_like(h)), "maximum(x, 0)"),
        (lambda h: torch.fmax(h, torch.zeros_like(h)), "maximum(x, 0)"),
        (lambda h: h.clamp_min(0.0), "clamp(min=0)"),
        (lambda h: torch.clamp_min(h, 0), "clamp(min=0)"),
        # An upper bound at infinity is no bound: still a ReLU.
        (lambda h: h.clamp(min=0.0, max=math.inf), "clamp(min=0)"),
        # torch reads a bool bound as 0 or 1, a Python bool as a bool tensor.
        (lambda h: torch.clamp(h, min=False), "clamp(min=0)"),
        (lambda h: torch.clamp(h, min=torch.tensor(False)), "clamp(min=0)"),
    ],
)
def test_the_other_spellings_of_a_relu_are_named_as_left_kinked(floor, named):
    net = _Calls(lambda x: torch.relu(floor(x - 0.5)))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        smooth(net, 2.0)(torch.linspace(-1, 1, 5))
    assert [str(w.message) for w in record] == [
        "_Calls: beta-smoothing replaces ReLU and the activations made of it; these "
        f"piecewise-linear activations stay non-smooth: {named}"
    ]


def test_a_float_maximum_with_an_integer_zero_is_named_as_a_relu():
    # torch.maximum(h, torch.tensor(0)) promotes the integer zero: it is a ReLU of h.
    net = _Calls(lambda x: torch.relu(torch.maximum(x - 0.5, torch.tensor(0))))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        smooth(net, 2.0)(torch.linspace(-1, 1, 5))
    assert [str(w.message) for w in record] == [
        "_Calls: beta-smoothing replaces ReLU and the activations made of it; these "
        "piecewise-linear activations stay non-smooth: maximum(x, 0)"
    ]


@pytest.mark.parametrize(
    "floor",
    [
        lambda h: torch.clamp(h, 0.0, 1.0),  # an upper bound, by position: no ReLU
        lambda h: h.clamp(min=0.0, max=1.0),
        lambda h: torch.clamp(h, -1.0),  # a floor below 0
        lambda h: h + torch.arange(h.shape[0]).clamp(min=0),  # integer bookkeeping
        lambda h: h + torch.maximum(torch.arange(h.shape[0]), torch.zeros(1, dtype=torch.long)),
        lambda h: torch.maximum(h, torch.full_like(h, 0.5)),  # a floor that is not 0
        # A floor per element, 0 in one place only: no ReLU, and no single number.
        lambda h: torch.clamp(h, min=torch.linspace(-1.0, 0.0, h.shape[0], dtype=h.dtype)),
    ],
)
def test_clamps_and_maxima_that_are_no_relu_are_not_named(floor):
    # Only clamp(x, min=0) with no upper bound and a float maximum with an all-zero
    # operand are ReLUs; these are not, so smoothing warns of nothing and computes
    # softplus_2 of the floor, as numpy's closed form does.
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    net = _Calls(lambda v: torch.relu(floor(v - 0.5)))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = smooth(net, 2.0)(x)
    assert [str(w.message) for w in record] == []
    h = floor(x - 0.5).numpy()
    np.testing.assert_allclose(got.numpy(), np.log1p(np.exp(2.0 * h)) / 2.0, rtol=1e-14)


def test_smoothing_refuses_what_is_no_module_in_its_own_words():
    # A function that computes like a model is no nn.Module: it has no forward hooks
    # to hold the override, which the refusal says before anything else fails.
    from betasmooth.smooth import check_smoothing_uncompiled

    message = r"^model must be a torch\.nn\.Module; got builtin_function_or_method "
    with pytest.raises(InputTypeError, match=message):
        smooth(torch.relu, 2.0)
    with pytest.raises(InputTypeError, match=message), smoothed(torch.relu, 2.0):
        pass
    with pytest.raises(InputTypeError, match=message):
        check_smoothing_uncompiled(torch.relu)


def test_relu_calls_leaves_out_a_relu_of_a_buffer_that_requires_grad():
    # The parameters and the buffers are detached for the pass: a buffer made from a
    # tensor that requires grad is still a constant, and its ReLU does not count.
    from betasmooth.smooth import relu_calls

    class Offset(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("offset", torch.tensor([1.0, -1.0], requires_grad=True))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x) + self.offset.relu()

    assert relu_calls(Offset(), torch.ones(3, 2)) == 1


def test_is_smoothed_is_false_for_a_model_with_hooks_of_its_own():
    from betasmooth.smooth import is_smoothed

    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    net.register_forward_pre_hook(lambda module, args: None)
    net.register_forward_hook(lambda module, args, out: None)
    assert not is_smoothed(net)
    assert is_smoothed(smooth(net, 2.0))
    with smoothed(net, 2.0):
        assert is_smoothed(net)
    assert not is_smoothed(net)


def test_a_scripted_part_with_an_in_place_relu_is_refused():
    # nn.ReLU(inplace=True) is aten::relu_ in the scripted graph.
    net = nn.Sequential(nn.Linear(2, 2), torch.jit.script(nn.Sequential(nn.ReLU(inplace=True))))
    assert "aten::relu_" in str(net[1].inlined_graph)
    with pytest.raises(
        InputError, match=r"^beta-smoothing cannot reach the ReLUs of its submodule 1,"
    ):
        check_overridable(net)


def test_an_in_place_relu_on_a_leaf_that_requires_grad_fails_as_torchs_own():
    # Only vmap over betas is named in the in-place refusal: any other failure of the
    # in-place write is torch's error, as the plain ReLU gives it.
    net = nn.ReLU(inplace=True)
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad") as plain:
        net(x)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad") as ours:
        smooth(net, 2.0)(x)
    assert type(ours.value) is type(plain.value)


def test_only_the_first_pass_feeds_the_warnings_of_a_smoothed_copy():
    # A forward whose branch depends on its input: the first pass runs a ReLU and a
    # kinked Hardshrink, the second neither. The warnings are about the first pass
    # only, so the second (no ReLU called) must not add "changed nothing", and the
    # recorded override stays the first pass's, with its one replaced ReLU.
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shrink = nn.Hardshrink()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(x.sum() > 0):
                return self.shrink(torch.relu(x))
            return torch.tanh(x)

    net = Branchy()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with replace_relu(net, torch.relu, warn=True) as done:
            net(torch.ones(1, 3))
            net(-torch.ones(1, 3))
            net(-torch.ones(1, 3))
    assert [str(w.message) for w in record] == [
        "Branchy: beta-smoothing replaces ReLU and the activations made of it; these "
        "piecewise-linear activations stay non-smooth: Hardshrink"
    ]
    assert len(done) == 1 and done[0].replaced == 1


def test_a_first_pass_run_inside_an_except_block_still_warns_and_counts():
    # Torch's hook reports a failed forward by giving no output; a forward that returns
    # normally while the caller handles an exception (sys.exc_info() is set there) did
    # run through: its ReLU count and its warnings stand.
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Hardshrink())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with replace_relu(net, torch.relu, warn=True) as done:
            try:
                raise KeyError("the caller's own error")
            except KeyError:
                net(torch.ones(1, 3))
    assert len(done) == 1 and done[0].replaced == 1
    assert [str(w.message).split("; ")[-1] for w in record] == [
        "these piecewise-linear activations stay non-smooth: Hardshrink"
    ]


def test_log_prob_is_finite_and_exact_far_in_the_tails_in_float32():
    # log p_beta(e) = log(beta) - |z| - 2 log1p(exp(-|z|)), z = beta e: linear in |z|
    # in the tails. Written as the log of a product of sigmoids, it underflows to
    # -inf in float32 past |z| ~ 104 (sigmoid(-z) below the smallest subnormal).
    beta = 2.0
    noise = LogisticNoise(torch.tensor(beta))
    e = torch.tensor([-80.0, -60.0, -45.0, 45.0, 60.0, 80.0])
    z = beta * e.double().abs()
    ref = math.log(beta) - z - 2 * torch.log1p(torch.exp(-z))
    got = noise.log_prob(e)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=0)
    scipy_ref = torch.tensor(sps.logistic(scale=1 / beta).logpdf(e.double().numpy()))
    torch.testing.assert_close(got.double(), scipy_ref, rtol=1e-6, atol=0)


def test_second_order_writes_an_in_place_hardsigmoid_into_its_input():
    # F.hardsigmoid(h, inplace=True) as a statement: the caller reads h afterwards, so
    # the form computed under second_order must go into h as torch's own kernel does.
    from betasmooth.smooth import second_order

    def gate(x: torch.Tensor) -> torch.Tensor:
        h = x * 1.0
        F.hardsigmoid(h, inplace=True)
        return h

    x = torch.linspace(-4.0, 4.0, 17, dtype=torch.float64)
    # hardsigmoid(x) = clip(x / 6 + 1 / 2, 0, 1), by hand.
    expected = (x / 6 + 0.5).clamp(0.0, 1.0)
    torch.testing.assert_close(gate(x), expected, rtol=0, atol=1e-15)
    with second_order():
        torch.testing.assert_close(gate(x), expected, rtol=0, atol=1e-15)


def test_a_maximum_over_an_empty_batch_with_a_nonzero_floor_is_not_named():
    # An empty tensor is "all zeros" vacuously; a maximum of an empty batch with a
    # floor of 0.5 is no ReLU and must not be named as one.
    class Floored(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(torch.maximum(x, torch.full((1, 3), 0.5)))

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = smooth(Floored(), 2.0)(torch.ones(0, 3))
    assert out.shape == (0, 3)
    assert [str(w.message) for w in record] == []


@pytest.mark.parametrize(
    "spelling",
    [lambda h: h.clamp_min_(0.0), lambda h: h.clamp_(min=0), lambda h: h.clip_(0.0)],
    ids=["clamp_min_", "clamp_", "clip_"],
)
def test_an_in_place_clamp_at_zero_is_named_as_a_relu_left_kinked(spelling):
    # The in-place clamps are ReLUs too, written into h: named like clamp(min=0),
    # and left as they are, so the output is softplus_2 of relu(x - 0.5) by hand.
    def forward(x: torch.Tensor) -> torch.Tensor:
        h = x - 0.5
        spelling(h)
        return torch.relu(h)

    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = smooth(_Calls(forward), 2.0)(x)
    assert [str(w.message) for w in record] == [
        "_Calls: beta-smoothing replaces ReLU and the activations made of it; these "
        "piecewise-linear activations stay non-smooth: clamp(min=0)"
    ]
    h = np.maximum(x.numpy() - 0.5, 0.0)
    np.testing.assert_allclose(got.numpy(), np.log1p(np.exp(2.0 * h)) / 2.0, rtol=1e-14)


def test_a_refusal_that_the_forward_catches_leaves_no_warning_and_no_recorded_pass():
    # The refusal under checkpointing marks its pass as failed: a forward that catches
    # the InputError and goes on (here to a tanh) did not show which ReLUs the model
    # has, so no "no ReLU was called" warning follows and the pass is not recorded.
    import torch.utils.checkpoint

    class Fallback(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(3, 3), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            try:
                return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
            except InputError:
                return torch.tanh(x)

    net = Fallback()
    x = torch.linspace(-1.0, 1.0, 6).view(2, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with replace_relu(net, torch.relu, warn=True) as done:
            out = net(x)
    torch.testing.assert_close(out, torch.tanh(x), rtol=0, atol=0)
    assert done == []
    assert [str(w.message) for w in record] == []


@pytest.mark.parametrize(
    ("activation", "x"),
    [
        (nn.Hardtanh(1.0, 2.0), torch.linspace(-2, 2, 5)),  # bounds reversed below
        (nn.PReLU(3), torch.linspace(-2, 2, 3)),  # 3 slopes, 1-d input: 1 channel
        (nn.PReLU(3), torch.rand(3, 2)),  # 3 slopes, 2 channels
    ],
)
def test_a_smoothed_activation_refuses_what_torch_refuses_with_torchs_words(activation, x):
    # The forms through ReLU broadcast where torch checks: a reversed hardtanh would give
    # a reversed curve, several PReLU slopes one slope per element.
    if isinstance(activation, nn.Hardtanh):
        activation.min_val, activation.max_val = 1.0, -1.0
    net = nn.Sequential(nn.Identity(), activation)
    with pytest.raises((ValueError, RuntimeError)) as plain:
        net(x)
    with pytest.raises(type(plain.value)) as smoothed:
        bs.smooth(net, 50.0)(x)
    assert str(smoothed.value) == str(plain.value)
