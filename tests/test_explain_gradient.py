"""Gradient, input x gradient and integrated gradients against Captum; double backprop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import nn

import betasmooth as bs
from betasmooth.explain import range_options, select_items
from betasmooth.explain.gradient import (
    QUADRATURE_RULES,
    auto_chunk,
    input_gradient,
    quadrature,
    select_logit,
)
from nets import CAPTUM_NETS as NETS
from nets import TARGET, residual_net


def test_gradient_is_captum_saliency(net, x):
    ours = bs.explain(net, x, "gradient", TARGET)
    theirs = Saliency(net).attribute(x, target=TARGET, abs=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_input_x_gradient_is_captum(net, x):
    ours = bs.explain(net, x, "input_x_gradient", TARGET)
    theirs = InputXGradient(net).attribute(x, target=TARGET)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_input_x_gradient_without_create_graph_is_a_value_like_every_map(x):
    # On an x that requires grad, a map with half its graph (x's, not the
    # gradient's) would give a wrong derivative without a word: it has none.
    net = _smooth_net()
    x = x.clone().requires_grad_(True)
    for method in ("gradient", "input_x_gradient", "integrated_gradients"):
        assert not bs.explain(net, x, method, TARGET).requires_grad
    # With create_graph, its derivative is the whole one: finite differences.
    point = x[:1].detach()
    h = 1e-6
    direction = torch.randn(
        point.shape, dtype=point.dtype, generator=torch.Generator().manual_seed(0)
    )

    def total(p: torch.Tensor) -> torch.Tensor:
        return bs.explain(net, p, "input_x_gradient", 3, create_graph=True).sum()

    p = point.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(total(p), p)
    numeric = (total(point + h * direction) - total(point - h * direction)) / (2 * h)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-9)


def _smooth_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(16 * 16, 6),
        torch.nn.Softplus(2.0),
        torch.nn.Linear(6, 5),
    ).double()


@pytest.mark.parametrize("rule", sorted(QUADRATURE_RULES))
def test_quadrature_is_captum(rule):
    weights, alphas = approximation_parameters(rule)
    ours_a, ours_w = quadrature(rule, 7)
    np.testing.assert_allclose(ours_a.numpy(), alphas(7), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours_w.numpy(), weights(7), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", sorted(QUADRATURE_RULES))
def test_integrated_gradients_is_captum(net, x, rule):
    baseline = torch.rand(1, 16, 16, dtype=torch.float64) * 0.2
    ours = bs.explain(net, x, "integrated_gradients", TARGET, steps=9, baseline=baseline, rule=rule)
    theirs = IntegratedGradients(net).attribute(
        x, baselines=baseline.expand_as(x), target=TARGET, n_steps=9, method=rule
    )
    # Captum rounds its step sizes (and Riemann nodes) to float32.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_integrated_gradients_default_baseline_and_scalar(net, x):
    zero = IntegratedGradients(net).attribute(x, target=TARGET, n_steps=12)
    torch.testing.assert_close(
        bs.explain(net, x, "integrated_gradients", TARGET, steps=12), zero, rtol=1e-6, atol=1e-9
    )
    half = IntegratedGradients(net).attribute(x, baselines=0.5, target=TARGET, n_steps=12)
    torch.testing.assert_close(
        bs.explain(net, x, "integrated_gradients", TARGET, steps=12, baseline=0.5),
        half,
        rtol=1e-6,
        atol=1e-9,
    )


def test_a_bool_baseline_is_refused(net, x):
    # bool is a numbers.Real: True would silently have been the baseline 1.0.
    with pytest.raises(TypeError, match=r"^baseline must be None, a number or a tensor"):
        bs.explain(net, x, "integrated_gradients", TARGET, steps=4, baseline=True)


def test_integrated_gradients_completeness(net, x):
    baseline = torch.full_like(x, 0.1)
    h = bs.explain(net, x, "integrated_gradients", TARGET, steps=256, baseline=baseline)
    with torch.no_grad():
        gap = (net(x) - net(baseline)).gather(1, TARGET[:, None])[:, 0]
    torch.testing.assert_close(h.flatten(1).sum(1), gap, rtol=1e-2, atol=1e-2 * gap.abs().max())


def test_integrated_gradients_chunk_invariant(net, x):
    one = bs.explain(net, x, "integrated_gradients", steps=10, chunk=1)
    default = bs.explain(net, x, "integrated_gradients", steps=10)
    torch.testing.assert_close(one, default, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["gradient", "integrated_gradients"])
def test_targets(net, x, method):
    oracle = {
        "gradient": lambda t: Saliency(net).attribute(x, target=t, abs=False),
        "integrated_gradients": lambda t: IntegratedGradients(net).attribute(x, target=t),
    }[method]
    pred = net(x).argmax(1)
    tol = {"rtol": 1e-6, "atol": 1e-9}
    torch.testing.assert_close(bs.explain(net, x, method), oracle(pred), **tol)
    torch.testing.assert_close(bs.explain(net, x, method, 2), oracle(2), **tol)
    torch.testing.assert_close(bs.explain(net, x, method, torch.tensor(2)), oracle(2), **tol)


def _second_derivative(model, x, method, v, **options):
    x = x.clone().requires_grad_(True)
    h = bs.explain(model, x, method, TARGET, create_graph=True, **options)
    (d,) = torch.autograd.grad((h * v).sum(), x, allow_unused=True)
    return torch.zeros_like(x) if d is None else d


def test_double_backprop_zero_for_relu_nonzero_when_smoothed(x):
    # Average pooling and eval-mode BatchNorm only: piecewise linear, no ties.
    net = residual_net().double()
    v = torch.randn_like(x)
    assert torch.equal(_second_derivative(net, x, "gradient", v), torch.zeros_like(x))
    d = _second_derivative(bs.smooth(net, 2.0), x, "gradient", v)
    assert d.abs().max() > 1e-4


def _directional_check(model, x, method, **options):
    # d/dx of sum(h(x) * v), along u, against a central finite difference.
    v, u = torch.randn_like(x), torch.randn_like(x)
    d = _second_derivative(model, x, method, v, **options)
    step = 1e-5
    with torch.no_grad():
        plus = (bs.explain(model, x + step * u, method, TARGET, **options) * v).sum()
        minus = (bs.explain(model, x - step * u, method, TARGET, **options) * v).sum()
    fd = (plus - minus) / (2 * step)
    torch.testing.assert_close((d * u).sum(), fd, rtol=1e-5, atol=1e-8)
    assert fd.abs() > 1e-4


@pytest.mark.parametrize("net_name", sorted(NETS))
def test_integrated_gradients_derivative_is_finite_difference(net_name, x):
    model = bs.smooth(NETS[net_name]().double(), 3.0)
    _directional_check(model, x, "integrated_gradients", steps=8, baseline=0.2)


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
def test_passes_of_large_inputs_hold_a_bounded_number_of_values(method):
    # 256 items of 3 x 224 x 224 are 38.5 M input values (VGG16: about 20 GB);
    # the default bounds a pass by 256 RGB images of 64 px, 20 items here.
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 2, 3, stride=8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(3),
    )
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    net(x)
    passes = []
    net.register_forward_pre_hook(lambda m, args: passes.append(len(args[0])))
    options = {"steps": 50} if method == "integrated_gradients" else {"n": 50, "seed": 0}
    default = bs.explain(net, x, method, 0, **options)
    assert max(passes) == 3 * 64 * 64 * 256 // (3 * 224 * 224) // 2 * 2  # 20
    torch.testing.assert_close(default, bs.explain(net, x, method, 0, chunk=50, **options))


def test_a_float64_batch_on_a_float32_model_gets_its_map_back_in_float64():
    # Documented: x is cast to the model's dtype, the map comes back in x's dtype.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    got = bs.explain(net, x, "gradient", 0)
    assert got.dtype == torch.float64
    xf = x.float().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(xf)[:, 0].sum(), xf)
    torch.testing.assert_close(got, grad.double())


def test_a_zero_map_of_one_item_of_the_batch_is_warned_about():
    # Item 1 switches every hidden unit off (relu(-x) of a positive x): its gradient is 0,
    # item 0's is not (recomputed by autograd below).
    class OneOff(nn.Module):
        def forward(self, x):
            h = torch.relu(x.flatten(1) * torch.tensor([[1.0], [-1.0]]))
            return torch.stack([h.sum(1), -h.sum(1)], 1)

    net, x = OneOff(), torch.rand(2, 1, 2, 2) + 0.1
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(xg)[:, 0].sum(), xg)
    assert bool((grad[1] == 0).all()) and bool((grad[0] != 0).all())
    with pytest.warns(UserWarning, match="zero everywhere"):
        got = bs.explain(net, x, "gradient", 0)
    torch.testing.assert_close(got, grad)


def test_integrated_gradients_of_a_batch_larger_than_one_pass_is_the_closed_form():
    """A batch of more items than the default pass holds (300 > 256) still gets one node
    per pass, and its map is the closed form of a linear model, ``(x - x0) * w_target``
    (Gauss-Legendre weights sum to one)."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    x = torch.rand(300, 3, dtype=torch.float64)
    got = bs.explain(net, x, "integrated_gradients", 1, steps=4, baseline=0.25)
    expected = (x - 0.25) * net.weight[1].detach()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_integrated_gradients_default_target_is_the_class_predicted_at_x():
    """Without a target the map is of the class predicted at ``x``, not along the path.

    Logits ``(x_0, 0.6)``: at ``x = (1, 0)`` class 0 wins (1 > 0.6), at half of
    ``x`` class 1 would (0.5 < 0.6). The closed form of the linear model is
    ``(x - 0) * w_0 = (1, 0)``; class 1's map would be zero.
    """
    net = nn.Linear(2, 2).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        net.bias.copy_(torch.tensor([0.0, 0.6]))
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    got = bs.explain(net, x, "integrated_gradients", steps=8)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("method", ["gradient", "input_x_gradient"])
def test_explain_leaves_the_callers_x_as_it_was(method):
    """The map is taken w.r.t. a copy: the caller's ``x`` neither starts to require grad
    nor changes, and the map equals autograd's gradient of the target logit (times x)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    before = x.clone()
    got = bs.explain(net, x, method, 1)
    assert not x.requires_grad and x.grad is None
    assert torch.equal(x, before)
    xg = before.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(xg)[:, 1].sum(), xg)
    if method == "input_x_gradient":
        grad = grad * before
    torch.testing.assert_close(got, grad, rtol=1e-12, atol=1e-14)


def test_select_logit_refuses_logits_of_more_than_two_dimensions():
    """``select_logit`` takes ``(B, classes)`` only: a ``(B, classes, 1)`` output is named
    as such, not left to fail inside ``gather``."""
    with pytest.raises(bs.InputError, match=r"logits of shape \(B, classes\); got \(2, 3, 1\)"):
        select_logit(torch.zeros(2, 3, 1), None)


def test_a_float64_baseline_of_a_float32_model_is_taken_in_the_models_dtype():
    """A baseline tensor of another dtype is cast as ``x`` is: the path stays in the
    model's float32, and the map is the closed form of a linear model, ``(x - x0) * w``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    baseline = torch.full((1, 2, 2), 0.25, dtype=torch.float64)
    got = bs.explain(net, x, "integrated_gradients", 1, steps=6, baseline=baseline)
    assert got.dtype == torch.float32
    want = (x - 0.25) * net[1].weight[1].detach().view(1, 2, 2)
    torch.testing.assert_close(got, want)


def test_select_logit_names_logits_whose_batch_a_squeeze_dropped():
    """A 1-d output, ``(classes,)``, is the batch of one squeezed away: named as such,
    not left to fail inside ``gather``."""
    with pytest.raises(
        bs.InputError,
        match=r"logits of shape \(B, classes\); got \(3,\) "
        r"\(a squeeze\(\) in forward drops the batch of one\)$",
    ):
        select_logit(torch.zeros(3), None)


def test_gradient_and_input_x_gradient_forward_once_and_the_others_do_not():
    """Both maps come from one plain forward on ``x`` (the attack reuses its logits);
    the path, the noisy copies, the modified ReLUs and LRP's pass do not."""
    from betasmooth.explain import forwards_once

    methods = ["gradient", "input_x_gradient", "integrated_gradients", "guided_backprop"]
    methods += ["lrp", "smoothgrad", "beta_smooth"]
    once = {m for m in methods if forwards_once(m)}
    assert once == {"gradient", "input_x_gradient"}


def test_input_gradient_names_a_model_whose_output_is_detached_from_x():
    """Called directly (explain's own check of the model comes before it), a forward
    that detaches the input is named, not left to autograd's error."""
    from betasmooth.explain.gradient import input_gradient

    class Detaching(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            return self.linear(x.detach().flatten(1))

    # Trainable, its output has a graph (to the weights) without x; frozen, it has none.
    for net in (Detaching(), Detaching().requires_grad_(False)):
        with pytest.raises(bs.InputError, match=r"^Detaching's output does not depend on x: "):
            input_gradient(net, torch.rand(2, 1, 2, 2), torch.tensor([0, 1]))


def test_a_zero_map_kept_with_create_graph_is_not_warned_about():
    """The attack's steps (create_graph) are neither checked nor warned about: their maps
    were checked before it. The same zero map without create_graph is."""
    import warnings

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.zero_()
    x = torch.rand(2, 1, 2, 2).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = bs.explain(net, x, "gradient", 0, create_graph=True)
    assert torch.equal(got, torch.zeros_like(x))
    with pytest.warns(UserWarning, match="gradient gave a map that is zero everywhere"):
        bs.explain(net, x.detach(), "gradient", 0)


def test_select_logit_gives_back_the_target_it_was_given():
    """A given target is returned as it is, not the argmax: LRP's pass reads the class
    it explains from it. The logit is the target's column of the logits."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [2.0, 0.5, 4.0]])
    target = torch.tensor([0, 1])
    logit, got = select_logit(logits, target)
    assert torch.equal(got, target)
    assert torch.equal(logit, torch.tensor([1.0, 0.5]))


@pytest.mark.parametrize("target", [3, 4])
def test_input_gradient_names_a_target_beyond_the_models_classes(target):
    """A class index ``>= classes`` (3 is the first past a model of 3 outputs) is named
    by ``input_gradient`` itself, called without explain's checks, not left to
    ``gather``'s RuntimeError."""
    net = nn.Linear(4, 3)
    with pytest.raises(bs.InputError, match=rf"target class {target} is out of range"):
        input_gradient(net, torch.ones(2, 4), torch.tensor([0, target]))


def test_input_gradient_refuses_a_negative_target_as_explain_does():
    """A negative class is named in explain's words, whoever calls, not left to torch's
    gather (a RuntimeError of its own)."""
    net = nn.Linear(4, 3)
    said = r"^target class must be >= 0; got -1$"
    with pytest.raises(bs.InputError, match=said):
        input_gradient(net, torch.ones(2, 4), torch.tensor([0, -1]))
    with pytest.raises(bs.InputError, match=said):
        bs.explain(net, torch.ones(2, 4), "gradient", torch.tensor([0, -1]))


def test_auto_chunk_gives_no_more_points_than_the_path_has():
    """A small batch would fit ``ITEMS_PER_PASS`` points in a pass; a path of 3 nodes
    has 3, and a chunk given larger than the path is cut to it too."""
    assert auto_chunk(None, total=3, batch=1) == 3
    assert auto_chunk(None, total=3, batch=2) == 3
    assert auto_chunk(7, total=3, batch=2) == 3


@pytest.mark.parametrize(
    ("chunk", "error"), [(0, bs.InputError), (-2, bs.InputError), (2.5, bs.InputTypeError)]
)
def test_auto_chunk_refuses_a_chunk_that_is_no_count(chunk, error):
    """A chunk of 0 would step ``range`` by nothing and a negative one run no pass at all
    (a zero map); ``auto_chunk`` names the option itself."""
    with pytest.raises(error, match=rf"chunk must be an integer >= 1; got {chunk}"):
        auto_chunk(chunk, total=3, batch=2)


@pytest.mark.parametrize(
    ("rule", "steps", "error", "said"),
    [
        ("simpson", 4, bs.InputError, "rule"),
        ("riemann_trapezoid", 1, bs.InputError, "steps must be an integer >= 2; got 1"),
        ("riemann_middle", 2.5, bs.InputTypeError, "steps must be an integer >= 2; got 2.5"),
    ],
)
def test_quadrature_refuses_an_unknown_rule_and_fewer_than_two_steps(rule, steps, error, said):
    """A rule of no name would be a KeyError, one trapezoid node a weight of 1/2 at the
    path's start and end at once, a fractional step count numpy's TypeError."""
    with pytest.raises(error, match=said):
        quadrature(rule, steps)


@pytest.mark.parametrize("rule", sorted(QUADRATURE_RULES))
def test_quadrature_weights_are_float64_to_the_last_bit(rule):
    """Nodes and weights come in the dtype asked for, both computed in float64: float32
    weights would put a 1e-8 error into every float64 map."""
    alphas, weights = quadrature(rule, 7, torch.float64)
    step_sizes, points = approximation_parameters(rule)
    assert weights.dtype == alphas.dtype == torch.float64
    np.testing.assert_allclose(weights.numpy(), step_sizes(7), rtol=1e-15, atol=0)


def test_a_complex_baseline_is_refused_as_no_real_number():
    """A complex number is a ``numbers.Number`` but no point of the input space."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(bs.InputTypeError, match="baseline must be None, a number or a tensor"):
        bs.explain(net, torch.rand(2, 1, 2, 2), "integrated_gradients", 1, baseline=1j)


@pytest.mark.parametrize(
    ("baseline", "said"),
    [
        (torch.zeros(3), r"baseline of shape \(3,\) does not broadcast to x of shape"),
        (torch.zeros(3, 1, 2, 2), r"baseline of shape \(3, 1, 2, 2\) does not broadcast to x"),
        (float("nan"), "baseline contains NaN or inf"),
        (torch.tensor([[float("inf")]]), "baseline contains NaN or inf"),
    ],
)
def test_a_baseline_that_is_no_start_for_x_is_named(baseline, said):
    """A baseline that does not broadcast, one that broadcasts only to a larger batch
    (three starts for one image), and a NaN or inf one (a NaN map) are refused by name."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(bs.InputError, match=said):
        bs.explain(net, torch.rand(1, 1, 2, 2), "integrated_gradients", 1, baseline=baseline)


def test_integrated_gradients_starts_from_the_datas_low_end_of_its_range():
    """On data in ``[low, high]`` the path starts at ``low`` (the black image), and a
    linear model's map is then ``(x - low) * w``, not ``x * w``."""
    low = torch.tensor([-2.0]).view(1, 1, 1, 1)
    options = range_options(low, 2.0)["integrated_gradients"]
    assert set(options) == {"baseline"} and torch.equal(options["baseline"], low)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).double()
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = bs.explain(net, x, "integrated_gradients", 1, steps=3, **options)
    torch.testing.assert_close(got, (x + 2.0) * net[1].weight[1].detach().view(1, 1, 2, 2))


def test_a_baseline_of_one_start_per_image_is_cut_to_the_images_explained():
    """A ``(N, C, H, W)`` baseline holds one start per image of the set: the images 2
    and 0 of a set of 3 get rows 2 and 0, in that order."""
    baseline = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    got = select_items("integrated_gradients", {"baseline": baseline}, [2, 0], (3, 1, 2, 2))
    torch.testing.assert_close(got["baseline"], baseline[[2, 0]], rtol=0, atol=0)


def test_smoothgrad_refuses_a_baseline_of_its_noisy_copies_batch():
    """SmoothGrad stacks 3 noisy copies of one image: a baseline of 3 rows would
    broadcast over the copies, one start per copy, where it fits no batch of ``x``."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    options = {"baseline": torch.zeros(3, 1, 2, 2), "steps": 2}
    with pytest.raises(bs.InputError, match=r"baseline of shape \(3, 1, 2, 2\) does not"):
        bs.explain(
            net,
            torch.rand(1, 1, 2, 2),
            "smoothgrad",
            1,
            n=3,
            base="integrated_gradients",
            base_options=options,
        )
