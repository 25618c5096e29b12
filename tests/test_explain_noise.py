"""smoothgrad against a hand loop over the same draws; beta_smooth against autograd on bs.smooth."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from captum.attr import IntegratedGradients, LayerGradCam, Saliency
from torch import nn

import betasmooth as bs
from betasmooth.explain.noise import standard_noise
from betasmooth.smooth import LogisticNoise
from nets import TARGET, plain_cnn, residual_net


def _hand_noise(x, n, sigma, noise, seed, input_range=None):
    """The draws smoothgrad promises: one x.shape draw per copy from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    if input_range is None:
        spread = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    else:
        spread = torch.full((x.shape[0],), float(input_range), dtype=x.dtype)
    std = (sigma * spread).view(-1, 1, 1, 1)
    draws = []
    for _ in range(n):
        if noise == "gaussian":
            draws.append(std * torch.randn(x.shape, generator=g, dtype=x.dtype))
        else:
            u = torch.rand(x.shape, generator=g, dtype=x.dtype).numpy()
            # Logistic of the same standard deviation: scale = std * sqrt(3) / pi.
            unit = scipy.stats.logistic.ppf(u, scale=math.sqrt(3) / math.pi)
            draws.append(std * torch.from_numpy(unit))
    return draws


@pytest.mark.parametrize("noise", ["gaussian", "logistic"])
def test_smoothgrad_is_hand_loop(net, x, noise):
    ours = bs.explain(net, x, "smoothgrad", n=6, sigma=0.2, noise=noise, seed=7)
    pred = net(x).argmax(1)
    saliency = Saliency(net)
    maps = [
        saliency.attribute(x + e, target=pred, abs=False) for e in _hand_noise(x, 6, 0.2, noise, 7)
    ]
    torch.testing.assert_close(ours, torch.stack(maps).mean(0), rtol=1e-10, atol=1e-13)


def test_smoothgrad_base_options_and_input_range(x):
    net = plain_cnn().double()
    ours = bs.explain(
        net,
        x,
        "smoothgrad",
        TARGET,
        base="integrated_gradients",
        base_options={"steps": 4, "rule": "riemann_middle"},
        n=3,
        sigma=0.1,
        input_range=2.5,
        seed=3,
    )
    # A range other than 1 scales the noise: sigma * 2.5.
    ig = IntegratedGradients(net)
    maps = [
        ig.attribute(x + e, target=TARGET, n_steps=4, method="riemann_middle")
        for e in _hand_noise(x, 3, 0.1, "gaussian", 3, input_range=2.5)
    ]
    torch.testing.assert_close(ours, torch.stack(maps).mean(0), rtol=1e-6, atol=1e-9)


# Integrated gradients' baseline, also as Captum's method and in Captum's tuple form
# (one per input of the model).
PER_IMAGE_BASELINES = {
    "integrated_gradients": lambda b: {"steps": 4, "rule": "riemann_middle", "baseline": b},
    "captum:IntegratedGradients": lambda b: {
        "n_steps": 4,
        "rule": "riemann_middle",
        "baselines": (b,),
    },
}


@pytest.mark.parametrize("base", sorted(PER_IMAGE_BASELINES))
def test_smoothgrad_gives_each_noisy_copy_the_baseline_of_its_image(x, base):
    # A per-image option (first dimension the batch) goes with its image into each of
    # the n * B copies: IG against Captum's, given the same per-image baselines.
    net = plain_cnn().double()
    baseline = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    ours = bs.explain(
        net, x, "smoothgrad", TARGET, base=base, base_options=PER_IMAGE_BASELINES[base](baseline),
        n=3, sigma=0.1, input_range=1.0, seed=3, chunk=2,
    )  # fmt: skip
    ig = IntegratedGradients(net)
    maps = [
        ig.attribute(x + e, baselines=baseline, target=TARGET, n_steps=4, method="riemann_middle")
        for e in _hand_noise(x, 3, 0.1, "gaussian", 3, input_range=1.0)
    ]
    torch.testing.assert_close(ours, torch.stack(maps).mean(0), rtol=1e-6, atol=1e-9)


def test_smoothgrad_gives_each_noisy_copy_the_lrp_box_of_its_image(x):
    # LRP's box per image: each image's map as that image's alone with its box.
    net = plain_cnn().double()
    spread = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    low, high = x - 0.5 - spread, x + 0.5 + spread
    seeds = [5, 6, 7, 8]
    both = bs.explain(
        net, x, "smoothgrad", TARGET, base="lrp", low=low, high=high, n=3, sigma=0.1, seed=seeds
    )
    for i, seed in enumerate(seeds):
        one = slice(i, i + 1)
        alone = bs.explain(
            net, x[one], "smoothgrad", TARGET[one], base="lrp", low=low[one], high=high[one],
            n=3, sigma=0.1, seed=seed,
        )  # fmt: skip
        torch.testing.assert_close(both[one], alone, rtol=1e-10, atol=1e-14)


def test_smoothgrad_keeps_deepliftshaps_baseline_set_whole_however_many_images(x):
    # DeepLiftShap explains each input against every baseline of the set, inputs and
    # baselines in one pass: k copies of B images against N = B baselines pass
    # 2 * k * B * N items, not 2 * (k * B)^2 as they would if the set were taken for
    # one baseline per image and tiled.
    net = plain_cnn().double().eval()
    baselines = torch.rand(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    sizes = []
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    hook = first.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        bs.explain(net, x, "smoothgrad", TARGET, base="captum:DeepLiftShap",
                   baselines=baselines, n=3, sigma=0.1, seed=0, chunk=3)  # fmt: skip
    finally:
        hook.remove()
    assert max(sizes) == 2 * 3 * len(x) * len(baselines)


def test_select_items_cuts_the_per_image_options_of_a_method_and_of_its_base():
    from betasmooth.explain import select_items

    shape = (3, 3, 4, 4)
    rows = torch.arange(3.0).view(3, 1, 1, 1)
    per_channel = torch.arange(3.0).view(3, 1, 1)  # x's channels, also 3: no rows
    cut = select_items("lrp", {"low": rows - 5, "high": per_channel + 5}, [2, 0], shape)
    assert cut["low"].flatten().tolist() == [-3.0, -5.0]
    assert torch.equal(cut["high"], per_channel + 5)
    options = {"base": "integrated_gradients", "base_options": {"baseline": rows}, "n": 4}
    cut = select_items("smoothgrad", {**options, "baseline": rows + 1}, [1], shape)
    assert cut["base_options"]["baseline"].flatten().tolist() == [1.0]
    assert cut["baseline"].flatten().tolist() == [2.0]
    assert cut["n"] == 4
    # GradientShap's baselines are a set to draw from, whatever their number.
    cut = select_items("captum:GradientShap", {"baselines": rows}, [0], shape)
    assert torch.equal(cut["baselines"], rows)
    assert select_items("captum:IntegratedGradients", {"baselines": rows}, [0], shape)[
        "baselines"
    ].flatten().tolist() == [0.0]
    # Captum's tuple form, one tensor per input of the model: each is cut alike.
    cut = select_items("captum:IntegratedGradients", {"baselines": (rows, 0.5)}, [2, 1], shape)
    assert cut["baselines"][0].flatten().tolist() == [2.0, 1.0]
    assert cut["baselines"][1] == 0.5


def test_smoothgrad_of_a_layer_method_averages_the_layers_maps(x):
    # A layer method's map has the layer's shape (here 8 x 8 x 8), not the input's.
    net = plain_cnn().double()
    ours = bs.explain(
        net,
        x,
        "smoothgrad",
        TARGET,
        base="captum:LayerGradCam",
        base_options={"layer": "3"},
        n=3,
        sigma=0.1,
        seed=4,
    )
    cam = LayerGradCam(net, net[3])
    maps = [cam.attribute(x + e, target=TARGET) for e in _hand_noise(x, 3, 0.1, "gaussian", 4)]
    assert ours.shape == (4, 1, 8, 8)
    torch.testing.assert_close(ours, torch.stack(maps).mean(0), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("noise", ["gaussian", "logistic"])
def test_standard_noise_law(noise):
    g = torch.Generator().manual_seed(0)
    draws = standard_noise(noise, (20000,), g, torch.zeros((), dtype=torch.float64)).numpy()
    law = {"gaussian": ("norm", (0, 1)), "logistic": ("logistic", (0, math.sqrt(3) / math.pi))}
    name, args = law[noise]
    assert scipy.stats.kstest(draws, name, args=args).pvalue > 0.01
    assert abs(draws.std() - 1) < 0.03


def test_smoothgrad_chunk_invariant_and_seeded(net, x):
    one = bs.explain(net, x, "smoothgrad", n=5, seed=1, chunk=1)
    torch.testing.assert_close(one, bs.explain(net, x, "smoothgrad", n=5, seed=1))
    torch.testing.assert_close(one, bs.explain(net, x, "smoothgrad", n=5, seed=1, chunk=3))
    assert not torch.allclose(one, bs.explain(net, x, "smoothgrad", n=5, seed=2))


def test_smoothgrad_target_is_clean_prediction(net, x):
    pred = net(x).argmax(1)
    torch.testing.assert_close(
        bs.explain(net, x, "smoothgrad", n=4, sigma=0.5, seed=0),
        bs.explain(net, x, "smoothgrad", pred, n=4, sigma=0.5, seed=0),
    )
    torch.testing.assert_close(
        bs.explain(net, x, "smoothgrad", 2, n=4, seed=0),
        bs.explain(net, x, "smoothgrad", torch.full((4,), 2), n=4, seed=0),
    )


def _autograd_gradient(model, x, target):
    x = x.clone().requires_grad_(True)
    logit = model(x).gather(1, target[:, None]).sum()
    return torch.autograd.grad(logit, x)[0]


@pytest.mark.parametrize("beta", [0.5, 5.0])
def test_beta_smooth_is_gradient_of_smoothed_model(net, x, beta):
    soft = bs.smooth(net, beta)
    ours = bs.explain(net, x, "beta_smooth", TARGET, beta=beta)
    torch.testing.assert_close(ours, _autograd_gradient(soft, x, TARGET), rtol=1e-12, atol=1e-14)
    ixg = bs.explain(net, x, "beta_smooth", TARGET, beta=beta, base="input_x_gradient")
    torch.testing.assert_close(ixg, x * ours, rtol=1e-12, atol=1e-14)


def test_beta_smooth_base_options_are_captum_ig_on_smoothed_model(x):
    net = residual_net().double()
    ours = bs.explain(
        net, x, "beta_smooth", TARGET, beta=2.0, base="integrated_gradients",
        base_options={"steps": 6},
    )  # fmt: skip
    theirs = IntegratedGradients(bs.smooth(net, 2.0)).attribute(x, target=TARGET, n_steps=6)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_beta_smooth_large_beta_is_gradient(net, x):
    # softplus_beta -> relu as beta -> inf; units with |pre-activation| below
    # about 1 / beta converge last, so the error shrinks steadily, not at once.
    plain = _autograd_gradient(net, x, TARGET)
    errors = [
        ((bs.explain(net, x, "beta_smooth", TARGET, beta=beta) - plain).norm() / plain.norm())
        for beta in (1e2, 1e4, 1e6)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 0.05 and errors[2] < 1e-2


def test_beta_smooth_target_is_prediction_of_original_model(net, x):
    pred = net(x).argmax(1)
    torch.testing.assert_close(
        bs.explain(net, x, "beta_smooth", beta=0.3),
        _autograd_gradient(bs.smooth(net, 0.3), x, pred),
        rtol=1e-12,
        atol=1e-14,
    )


def test_beta_smooth_restores_relu(net, x):
    before = net(x)
    bs.explain(net, x, "beta_smooth", beta=0.5)
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)


def _double(model, x, method, v, **options):
    x = x.clone().requires_grad_(True)
    h = bs.explain(model, x, method, TARGET, create_graph=True, **options)
    return torch.autograd.grad((h * v).sum(), x)[0]


def test_beta_smooth_double_backprop_on_relu_model(x):
    net = residual_net().double()
    v = torch.randn_like(x)
    ours = _double(net, x, "beta_smooth", v, beta=2.0)
    oracle = _double(bs.smooth(net, 2.0), x, "gradient", v)
    torch.testing.assert_close(ours, oracle, rtol=1e-12, atol=1e-14)
    assert ours.abs().max() > 1e-4


@pytest.mark.parametrize("options", [{}, {"input_range": 1.0, "noise": "logistic"}])
def test_smoothgrad_derivative_is_finite_difference(x, options):
    # Fixed draws make the map a smooth function of x on the smoothed model;
    # with the range taken from x, the noise scale moves with x too.
    model = bs.smooth(plain_cnn().double(), 3.0)
    v, u = torch.randn_like(x), torch.randn_like(x)
    kw = dict(n=4, sigma=0.1, seed=5, **options)
    d = _double(model, x, "smoothgrad", v, **kw)
    step = 1e-5
    plus = (bs.explain(model, x + step * u, "smoothgrad", TARGET, **kw) * v).sum()
    minus = (bs.explain(model, x - step * u, "smoothgrad", TARGET, **kw) * v).sum()
    fd = (plus - minus) / (2 * step)
    torch.testing.assert_close((d * u).sum(), fd, rtol=1e-5, atol=1e-8)
    assert fd.abs() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logistic_tails_end_symmetrically(dtype):
    # torch.rand gives k * 2**-mantissa for k = 0 ... 2**mantissa - 1: an exact 0
    # must land as far out as the largest draw, logit(1 - 2**-mantissa).
    step = torch.finfo(dtype).eps / 2
    u = torch.tensor([0.0, step, 0.5, 1 - step], dtype=dtype)
    ends = LogisticNoise(torch.tensor(2.0, dtype=dtype)).from_uniform(u)
    edge = math.log((1 - step) / step) / 2.0
    torch.testing.assert_close(ends, torch.tensor([-edge, -edge, 0.0, edge], dtype=dtype))
    # The drawn standard noise takes the same path: logistic of std 1 from the generator's rand.
    g = torch.Generator().manual_seed(5)
    draws = standard_noise("logistic", (1000,), g, torch.zeros((), dtype=dtype))
    u = torch.rand(1000, generator=torch.Generator().manual_seed(5), dtype=dtype)
    expected = torch.logit(u.clamp(step, 1 - step)) * math.sqrt(3) / math.pi
    torch.testing.assert_close(draws, expected)


class _FlipsWhenSmoothed(nn.Module):
    """Logits ``[relu(x), 0.1 + 0.01 x]``: at x = -1 class 1; with softplus_1, class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x), 0.1 + 0.01 * x], 1)


def test_beta_smooth_explains_the_class_the_original_model_predicts():
    # The test above holds whichever class is explained where smoothing keeps the prediction.
    model, x = _FlipsWhenSmoothed(), torch.tensor([[-1.0]], dtype=torch.float64)
    assert int(model(x).argmax(1)) == 1 and int(bs.smooth(model, 1.0)(x).argmax(1)) == 0
    expected = torch.tensor([[0.01]], dtype=torch.float64)  # d/dx (0.1 + 0.01 x)
    torch.testing.assert_close(bs.explain(model, x, "beta_smooth", beta=1.0), expected)


def test_smoothgrad_seeds_per_item_give_each_item_its_own_draws():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64).repeat(2, 1, 1, 1)
    both = bs.explain(net, x, "smoothgrad", 0, n=4, sigma=0.3, seed=[11, 12])
    for i, seed in enumerate((11, 12)):
        alone = bs.explain(net, x[:1], "smoothgrad", 0, n=4, sigma=0.3, seed=seed)
        torch.testing.assert_close(both[i : i + 1], alone, rtol=0, atol=0)
    assert not torch.allclose(both[0], both[1])


def test_smoothgrad_noise_per_channel_is_sigma_times_the_channel_range():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    ).double()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    span = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(5)
    by_hand = []
    for _ in range(3):
        noisy = x + 0.1 * span * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        noisy.requires_grad_(True)
        by_hand.append(torch.autograd.grad(net(noisy)[:, 1].sum(), noisy)[0])
    ours = bs.explain(net, x, "smoothgrad", 1, n=3, sigma=0.1, input_range=span, seed=5, chunk=1)
    torch.testing.assert_close(ours, torch.stack(by_hand).mean(0), rtol=1e-12, atol=1e-14)


def test_range_options_give_smoothgrad_the_span_of_each_channel():
    from betasmooth.explain import range_options

    low = torch.tensor([-2.0, -1.0, -1.5]).view(1, 3, 1, 1)
    high = torch.tensor([2.0, 1.5, 2.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(range_options(low, high)["smoothgrad"]["input_range"], high - low)


def test_smoothgrad_takes_a_0d_integer_tensor_seed_as_that_int(net, x):
    # One generator for the batch, as seed=7: a 0-d tensor is no seed per item.
    ours = bs.explain(net, x, "smoothgrad", TARGET, n=3, sigma=0.2, seed=torch.tensor(7))
    saliency = Saliency(net)
    maps = [
        saliency.attribute(x + e, target=TARGET, abs=False)
        for e in _hand_noise(x, 3, 0.2, "gaussian", 7)
    ]
    torch.testing.assert_close(ours, torch.stack(maps).mean(0), rtol=1e-10, atol=1e-13)


def test_smoothgrad_refuses_an_input_range_with_one_bad_channel():
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = torch.rand(2, 3, 6, 6)
    for bad in (0.0, -1.0, math.inf):
        span = torch.tensor([1.0, bad, 1.0]).view(1, 3, 1, 1)
        with pytest.raises(ValueError, match="input_range must be positive and finite in every"):
            bs.explain(net, x, "smoothgrad", n=2, input_range=span, seed=0)


@pytest.mark.parametrize("seed", [[1, 2, 3], [1], True], ids=["3 for 2", "1 for 2", "bool"])
def test_smoothgrad_refuses_a_seed_that_is_no_int_nor_one_int_per_item(net, x, seed):
    # Three seeds for two items would draw from the first two; True is no seed.
    with pytest.raises(bs.InputError, match=r"seed must be an int or one int per item"):
        bs.explain(net, x[:2], "smoothgrad", 0, n=2, seed=seed)


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 1, 3, 1, 1)])
def test_smoothgrad_refuses_an_input_range_that_broadcasts_x_to_a_larger_shape(shape):
    # It broadcasts against x, but to more items or more dimensions than x has.
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = torch.rand(1, 3, 6, 6)
    span = torch.ones(shape)
    with pytest.raises(bs.InputError, match=r"input_range of shape .* does not broadcast to x"):
        bs.explain(net, x, "smoothgrad", 0, n=2, input_range=span, seed=0)


def test_a_keyword_option_is_added_to_base_options_over_the_same_one_there(net, x):
    # "further keyword options are added to them": the keyword's steps, not base_options'.
    common = dict(beta=2.0, base="integrated_gradients")
    both = bs.explain(net, x, "beta_smooth", TARGET, base_options={"steps": 2}, steps=8, **common)
    alone = bs.explain(net, x, "beta_smooth", TARGET, base_options={"steps": 8}, **common)
    torch.testing.assert_close(both, alone, rtol=0, atol=0)
    assert not torch.allclose(
        alone, bs.explain(net, x, "beta_smooth", TARGET, base_options={"steps": 2}, **common)
    )


@pytest.mark.parametrize("method", ["smoothgrad", "beta_smooth"])
def test_the_clean_input_must_suit_the_base_method(method):
    # x in [-2, 2] lies outside LRP's default box [0, 1]: refused as LRP alone refuses it,
    # and explained once the box is the data's.
    net = plain_cnn(seed=3)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 4 - 2
    options = {"n": 2, "seed": 0} if method == "smoothgrad" else {"beta": 2.0}
    message = r"^x lies outside the lrp input box \[0.0, 1.0\] of the z\^B rule"
    with pytest.raises(bs.InputError, match=message):
        bs.explain(net, x, "lrp")
    with pytest.raises(bs.InputError, match=message):
        bs.explain(net, x, method, base="lrp", **options)
    box = {"low": -2.0, "high": 2.0}
    h = bs.explain(net, x, method, base="lrp", base_options=box, **options)
    assert h.shape == x.shape and bool(torch.isfinite(h).all())


@pytest.mark.parametrize("method", ["smoothgrad", "beta_smooth"])
def test_the_base_methods_keyword_options_reach_its_input_check(method):
    """LRP's box given as keyword options of the smoothing is the box the clean x is checked
    against, as one given in ``base_options`` is: x in [-2, 2] with the box [-2, 2] is
    explained, and the map is the one with the same box in ``base_options``."""
    net = plain_cnn(seed=3)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 4 - 2
    options = {"n": 2, "seed": 0} if method == "smoothgrad" else {"beta": 2.0}
    box = {"low": -2.0, "high": 2.0}
    by_keyword = bs.explain(net, x, method, 0, base="lrp", **box, **options)
    in_options = bs.explain(net, x, method, 0, base="lrp", base_options=box, **options)
    torch.testing.assert_close(by_keyword, in_options, rtol=0, atol=0)
    assert by_keyword.abs().sum() > 0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n": 0}, r"^n must be an integer >= 1; got 0$"),
        ({"n": 2.5}, r"^n must be an integer >= 1; got 2.5$"),
        ({"sigma": 0.0}, r"^sigma must be a positive finite number; got 0.0$"),
        ({"sigma": -0.1}, r"^sigma must be a positive finite number; got -0.1$"),
        ({"sigma": math.nan}, r"^sigma must be a positive finite number; got nan$"),
    ],
    ids=["n 0", "n 2.5", "sigma 0", "sigma -0.1", "sigma nan"],
)
def test_smoothgrad_refuses_a_count_or_a_noise_level_it_cannot_draw(net, x, options, message):
    # n = 0 would divide by zero copies; sigma 0 or below is no noise (a negative one
    # draws the same law, so would pass unnoticed); NaN would make every map NaN.
    with pytest.raises(bs.InputError, match=message):
        bs.explain(net, x, "smoothgrad", TARGET, seed=0, **options)


def test_noise_scale_of_a_fixed_range_keeps_the_dtype_of_x():
    # A float64 x gets sigma * range in float64, not rounded to float32 on the way.
    from betasmooth.explain.noise import noise_scale

    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    scale = noise_scale(x, 0.1, 0.3)
    assert scale.dtype == torch.float64 and scale.shape == (2, 1, 1, 1)
    assert scale.flatten().tolist() == [0.1 * 0.3, 0.1 * 0.3]


@pytest.mark.parametrize(
    ("seed", "message"),
    [(-1, "an integer >= 0; got -1"), (2**64, f"an integer from 0 to {2**64 - 1}; got {2**64}")],
)
def test_smoothgrad_refuses_a_seed_a_generator_cannot_take(net, x, seed, message):
    # -1 would wrap around to another seed; 2**64 overflows manual_seed with a raw error.
    with pytest.raises(bs.InputError, match=rf"^seed must be {message}$"):
        bs.explain(net, x[:2], "smoothgrad", 0, n=2, seed=seed)


def test_beta_smooth_refuses_a_beta_in_a_tensor_as_any_other_method_does(net, x):
    # beta is a number of the call: a one-element tensor would pass smoothed()
    # unnoticed, so beta_smooth checks it itself, before the first map.
    with pytest.raises(bs.InputTypeError, match=r"^beta must be a positive number; got tensor"):
        bs.explain(net, x, "beta_smooth", TARGET, beta=torch.tensor(2.0))


def test_smoothgrad_explains_the_class_predicted_at_the_clean_x_whatever_the_noise():
    # A linear model: logit 0 - logit 1 = 2 sum(x) - 24, so the 4 x 4 images in
    # [0, 1) (sum near 8) are class 1, and a shift by 0.5 would make them class 0.
    # Every noisy copy has the gradient of its target's row: -1 everywhere for class 1.
    linear = nn.Linear(16, 2).double()
    with torch.no_grad():
        linear.weight.copy_(torch.stack([torch.ones(16), -torch.ones(16)]))
        linear.bias.copy_(torch.tensor([-24.0, 0.0]))
    model = nn.Sequential(nn.Flatten(), linear)
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert (x.sum((1, 2, 3)) < 12).all() and (x.sum((1, 2, 3)) + 8 > 12).all()
    ours = bs.explain(model, x, "smoothgrad", n=4, sigma=0.5, seed=0)
    torch.testing.assert_close(ours, -torch.ones_like(x), rtol=0, atol=1e-12)
