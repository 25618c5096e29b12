"""bs.quantus_explain as Quantus' explain_func, against Quantus' own explain and bs.explain."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import quantus
import torch

import betasmooth as bs
from nets import TARGET, plain_cnn


def _max_sensitivity(net, x, y, explain_func, kwargs):
    np.random.seed(0)
    metric = quantus.MaxSensitivity(
        nr_samples=3, lower_bound=0.1, abs=True, normalise=True, disable_warnings=True
    )
    scores = metric(
        model=net, x_batch=x, y_batch=y, a_batch=None, device="cpu",
        explain_func=explain_func, explain_func_kwargs=kwargs,
    )  # fmt: skip
    return np.asarray(scores)


def test_max_sensitivity_with_quantus_explain_equals_quantus_own_saliency():
    # Quantus' Saliency is |gradient|; on one channel, after Quantus' abs, it is
    # betasmooth's gradient summed over channels.
    net = plain_cnn()
    x, y = torch.rand(4, 1, 16, 16).numpy(), TARGET.numpy()
    theirs = _max_sensitivity(net, x, y, quantus.explain, {"method": "Saliency"})
    ours = _max_sensitivity(net, x, y, bs.quantus_explain, {"method": "gradient"})
    assert np.all(theirs > 0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    smooth = _max_sensitivity(
        net, x, y, bs.quantus_explain, {"method": "beta_smooth", "beta": 1.0, "softmax": False}
    )
    assert np.all(np.abs(smooth - theirs) > 1e-3)


def test_gradient_is_quantus_own_signed_gradient_on_colour_images():
    # Quantus' "Gradient" is the signed gradient summed over channels, as
    # quantus_explain's gradient; its "Saliency" is the absolute gradient.
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 14 * 14, 3),
    )
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)).numpy()
    y = np.array([0, 1, 2, 0])
    ours = bs.quantus_explain(net, x, y, method="gradient")
    theirs = quantus.explain(net, x, y, method="Gradient")
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)
    saliency = quantus.explain(net, x, y, method="Saliency")
    assert np.abs(ours - saliency).max() > 1e-3 * np.abs(saliency).max()


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("beta_smooth", {"beta": 2.0, "base": "lrp", "composite": "epsilon_plus_flat"}),
        ("smoothgrad", {"n": 4, "seed": 1}),
        ("captum:DeepLift", {"baselines": 0.0}),
    ],
)
def test_quantus_explain_equals_explain(method, options):
    net = plain_cnn(channels=3)
    x = torch.rand(4, 3, 16, 16)
    expected = bs.explain(net, x, method, TARGET, **options)
    summed = bs.quantus_explain(net, x.numpy(), TARGET.numpy(), method=method, **options)
    assert isinstance(summed, np.ndarray) and summed.shape == (4, 1, 16, 16)
    np.testing.assert_allclose(summed, expected.sum(1, keepdim=True).numpy(), rtol=1e-6, atol=1e-7)
    full = bs.quantus_explain(
        net, x.permute(0, 2, 3, 1), TARGET, method=method, reduce_axes=(), device="cpu", **options
    )
    assert full.shape == (4, 16, 16, 3)
    np.testing.assert_allclose(full, expected.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-7)


def test_quantus_explain_takes_numpy_bounds_and_seeds():
    # Quantus users hold numpy arrays: LRP's per-channel box of normalised data, seeds.
    net = plain_cnn(channels=3)
    gen = torch.Generator().manual_seed(0)
    low, high = -torch.tensor([2.0, 1.5, 1.0]).view(1, 3, 1, 1), torch.full((1, 3, 1, 1), 2.0)
    x = low + (high - low) * torch.rand(4, 3, 16, 16, generator=gen)
    expected = bs.explain(net, x, "lrp", TARGET, low=low, high=high)
    got = bs.quantus_explain(
        net, x.numpy(), TARGET.numpy(), method="lrp", low=low.numpy(), high=high.numpy()
    )
    np.testing.assert_allclose(got, expected.sum(1, keepdim=True).numpy(), rtol=1e-6, atol=1e-7)
    seeds = np.arange(4)
    expected = bs.explain(net, x, "smoothgrad", TARGET, n=2, seed=torch.arange(4))
    got = bs.quantus_explain(net, x.numpy(), TARGET.numpy(), method="smoothgrad", n=2, seed=seeds)
    np.testing.assert_allclose(got, expected.sum(1, keepdim=True).numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "numpy_options", "options"),
    [
        ({"method": "smoothgrad", "n": 2}, {"seed": np.int64(3)}, {"seed": 3}),
        ({"method": "smoothgrad", "n": 2}, {"seed": np.array(3)}, {"seed": 3}),
        ({"method": "beta_smooth"}, {"beta": np.array(2.0)}, {"beta": 2.0}),
        ({}, {"reduce_axes": 1, "keepdims": 0}, {"reduce_axes": (1,), "keepdims": False}),
        ({}, {"reduce_axes": np.array([1])}, {"reduce_axes": (1,)}),
        ({}, {"reduce_axes": np.array([2, 3])}, {"reduce_axes": (2, 3)}),
        ({}, {"keepdims": np.False_}, {"keepdims": False}),
        ({}, {"keepdims": np.True_, "reduce_axes": np.int64(-1)}, {"reduce_axes": (3,)}),
    ],
)
def test_numpy_scalars_are_the_numbers_they_hold(method, numpy_options, options):
    # Quantus users hold numpy numbers: np.int64 seeds, 0-d arrays, numpy's 0 for False.
    net, x = plain_cnn(), torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    expected = bs.quantus_explain(net, x.numpy(), TARGET.numpy(), **method, **options)
    got = bs.quantus_explain(net, x.numpy(), TARGET.numpy(), **method, **numpy_options)
    np.testing.assert_array_equal(got, expected)


def test_read_only_inputs_give_no_warning():
    # Arrays that Quantus or a memory map hand over read-only are read, not shared.
    net = plain_cnn()
    x, y = torch.rand(2, 1, 16, 16).numpy(), np.array([0, 1])
    x.setflags(write=False)
    y.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = bs.quantus_explain(net, x, y)
    np.testing.assert_array_equal(
        got, bs.explain(net, torch.from_numpy(x.copy()), "gradient", torch.tensor([0, 1])).numpy()
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"softmax": True}, ValueError, "explains logits (pre-softmax)"),
        ({"softmax": np.True_}, ValueError, "explains logits (pre-softmax)"),
        ({"keepdims": None}, TypeError, "keepdims must be True or False; got None"),
        ({"keepdims": 2}, TypeError, "keepdims must be True or False; got 2"),
        ({"reduce_axes": "1"}, TypeError, "reduce_axes must be an int or a sequence of ints"),
        ({"method": "saliency"}, ValueError, "unknown method 'saliency'"),
        ({"reduce_axes": (0,)}, ValueError, "batch axis 0"),
        ({"reduce_axes": (-4,)}, ValueError, "batch axis 0"),
        ({"reduce_axes": (1, 5)}, ValueError, "axis 5, outside the 4 axes of the attributions"),
        ({"reduce_axes": (4,)}, ValueError, "axis 4, outside the 4 axes of the attributions"),
        ({"reduce_axes": (-5,)}, ValueError, "axis -5, outside the 4 axes of the attributions"),
        ({"reduce_axes": True}, TypeError, "reduce_axes must be an int or a sequence of ints"),
        ({"reduce_axes": (True,)}, TypeError, "reduce_axes must hold integers, e.g. (1,); got"),
        ({"reduce_axes": (1, -3)}, ValueError, "names an axis twice: (1, -3)"),
        ({"reduce_axes": (1.5,)}, TypeError, "reduce_axes must hold integers, e.g. (1,); got"),
        ({"xai_lib": "captum"}, TypeError, "unknown option 'xai_lib'"),
        ({"model": None}, TypeError, "model must be a torch.nn.Module; got NoneType"),
    ],
)
def test_quantus_explain_bad_input(kwargs, error, fragment):
    x = torch.rand(2, 1, 16, 16).numpy()
    kwargs = {"model": plain_cnn(), **kwargs}
    with pytest.raises(error, match=re.escape(fragment)):
        bs.quantus_explain(inputs=x, targets=np.array([0, 1]), **kwargs)


def test_integer_inputs_and_fractional_targets_are_refused_whole_float_targets_taken():
    net, x = plain_cnn(), torch.rand(2, 1, 16, 16)
    levels = (x * 255).round().to(torch.uint8).numpy()
    with pytest.raises(TypeError, match=r"^quantus_explain inputs must be floating point; got"):
        bs.quantus_explain(net, levels, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"targets must be class indices; got \[0.0, 3.7\]"):
        bs.quantus_explain(net, x.numpy(), np.array([0.0, 3.7]))
    # Labels handed over as whole floats are those classes, as ints are.
    expected = bs.explain(net, x, "gradient", torch.tensor([0, 3])).numpy()
    np.testing.assert_array_equal(
        bs.quantus_explain(net, x.numpy(), np.array([0.0, 3.0])), expected
    )


def test_targets_are_named_by_the_shape_given_and_a_column_is_one_class_per_item():
    net, x = plain_cnn(), torch.rand(2, 1, 16, 16)
    for targets in (np.array([[0, 1], [1, 0]]), np.array([0, 1, 1]), np.array([[0, 1]])):
        said = f"one class per item, shape (2,), or one class; got shape {targets.shape}"
        with pytest.raises(ValueError, match=re.escape(said)):
            bs.quantus_explain(net, x.numpy(), targets)
    expected = bs.explain(net, x, "gradient", torch.tensor([1, 0])).numpy()
    np.testing.assert_array_equal(
        bs.quantus_explain(net, x.numpy(), np.array([[1], [0]])), expected
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    ("device", "said"),
    [
        ("cuda", "quantus_explain: CUDA is not available on this machine (device='cuda'); "
         "use device='cpu'"),
        ("gpu0", "quantus_explain: unknown device 'gpu0'; expected cpu, cuda or cuda:N"),
    ],
)  # fmt: skip
def test_a_device_that_is_not_there_is_named_in_one_line(device, said):
    net = plain_cnn()
    with pytest.raises(ValueError, match=f"^{re.escape(said)}$"):
        bs.quantus_explain(net, torch.rand(2, 1, 16, 16).numpy(), np.array([0, 1]), device=device)
    assert next(net.parameters()).device.type == "cpu"


def test_quantus_explain_one_target_for_all():
    net, x = plain_cnn(), torch.rand(3, 1, 16, 16)
    expected = bs.explain(net, x, "gradient", 2).numpy()
    np.testing.assert_allclose(bs.quantus_explain(net, x.numpy(), 2), expected, rtol=1e-6)


def test_signals_in_either_layout_match_quantus_own_gradient():
    # (B, C, L) and (B, L, C): channels are the shorter axis, as Quantus infers.
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv1d(2, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(56, 3)
    ).eval()
    x = torch.rand(4, 2, 16, generator=torch.Generator().manual_seed(1)).numpy()
    y = np.array([0, 1, 2, 0])
    theirs = quantus.explain(net, x, y, method="Gradient")
    np.testing.assert_allclose(bs.quantus_explain(net, x, y), theirs, rtol=1e-6, atol=1e-9)
    last = bs.quantus_explain(net, np.moveaxis(x, 1, -1), y)
    assert last.shape == (4, 16, 1)
    np.testing.assert_allclose(np.moveaxis(last, -1, 1), theirs, rtol=1e-6, atol=1e-9)
    kept = bs.quantus_explain(net, np.moveaxis(x, 1, -1), y, reduce_axes=())
    expected = bs.explain(net, torch.from_numpy(x), "gradient", torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(kept, np.moveaxis(expected, 1, -1), rtol=1e-6)


def test_channel_last_maps_without_kept_axes_are_not_transposed():
    net, x = plain_cnn(), torch.rand(2, 1, 16, 16)
    first = bs.quantus_explain(net, x.numpy(), np.array([0, 1]), keepdims=False)
    last = bs.quantus_explain(net, x.permute(0, 2, 3, 1).numpy(), np.array([0, 1]), keepdims=False)
    assert first.shape == last.shape == (2, 16, 16)
    np.testing.assert_array_equal(first, last)


def test_channel_last_maps_summed_over_space_keep_the_channel_last():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 5, 3),
    ).eval()
    x, y = torch.rand(2, 3, 6, 5), np.array([0, 1])
    first = bs.quantus_explain(net, x.numpy(), y, reduce_axes=(3,), keepdims=False)
    last = bs.quantus_explain(
        net, x.permute(0, 2, 3, 1).numpy(), y, reduce_axes=(-1,), keepdims=False
    )
    assert first.shape == (2, 3, 6) and last.shape == (2, 6, 3)
    np.testing.assert_array_equal(np.moveaxis(first, 1, -1), last)


def test_quantus_explain_refuses_ambiguous_layout():
    with pytest.raises(ValueError, match="channel_first=True or False"):
        bs.quantus_explain(plain_cnn(), np.zeros((2, 16, 16, 16), np.float32), np.array([0, 1]))


def test_a_layout_given_is_taken_where_quantus_could_not_infer_it():
    # (B, 3, 5, 3): channels could be the first axis or the last; the caller says which.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(45, 4), torch.nn.Tanh()).eval()
    x, y = torch.rand(2, 3, 5, 3), np.array([1, 3])
    for first, as_nchw in ((True, x), (False, x.movedim(-1, 1))):
        got = bs.quantus_explain(net, x.numpy(), y, channel_first=first, reduce_axes=())
        expected = bs.explain(net, as_nchw, "gradient", torch.from_numpy(y))
        np.testing.assert_array_equal(got, (expected if first else expected.movedim(1, -1)).numpy())


def test_float64_inputs_of_a_float64_model_are_explained_in_float64():
    # Quantus' arrays are float64: a float64 model must see them to the last bit.
    net = plain_cnn().double()
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = bs.quantus_explain(net, x.numpy(), np.array([0, 1]), method="integrated_gradients")
    expected = bs.explain(net, x, "integrated_gradients", torch.tensor([0, 1]))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected.sum(1, keepdim=True).numpy(), rtol=1e-13, atol=1e-15)


def test_a_bfloat16_model_gives_its_maps_as_float32():
    # numpy has no bfloat16: the map, computed in bfloat16, comes back widened exactly.
    net = plain_cnn(channels=3).to(torch.bfloat16)
    x = torch.rand(2, 3, 16, 16)
    expected = bs.explain(net, x.to(torch.bfloat16), "gradient", TARGET[:2]).sum(1, keepdim=True)
    got = bs.quantus_explain(net, x.numpy(), TARGET[:2].numpy(), method="gradient")
    assert got.dtype == np.float32 and np.abs(got).max() > 0
    np.testing.assert_array_equal(got, expected.float().numpy())


def test_a_float16_model_names_inputs_beyond_its_range_and_keeps_its_dtype():
    # The numpy inputs were cast to float16 before explain: 7e4 arrived as inf,
    # named "NaN or inf" though the inputs were finite.
    net = plain_cnn(channels=3).half()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(bs.InputError, match=r"^x has values beyond the range of float16"):
        bs.quantus_explain(net, 7e4 * x.numpy(), TARGET[:2].numpy(), method="gradient")
    expected = bs.explain(net, x.half(), "gradient", TARGET[:2]).sum(1, keepdim=True)
    got = bs.quantus_explain(net, x.numpy(), TARGET[:2].numpy(), method="gradient")
    assert got.dtype == np.float16 and np.abs(got).max() > 0
    np.testing.assert_array_equal(got, expected.numpy())


def test_volumes_are_taken_channel_first_as_given():
    # Quantus infers the layout of signals and images only; a volume (B, C, D, H, W) is
    # explained as given. Oracle: autograd's gradient summed over the channels.
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(2, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(96, 3)
    ).eval()
    x = torch.rand(2, 2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    y = np.array([0, 2])
    leaf = x.clone().requires_grad_(True)
    net(leaf).gather(1, torch.from_numpy(y)[:, None]).sum().backward()
    got = bs.quantus_explain(net, x.numpy(), y)
    assert got.shape == (2, 1, 4, 6, 6)
    np.testing.assert_allclose(got, leaf.grad.sum(1, keepdim=True).numpy(), rtol=1e-6, atol=1e-9)


def test_channel_last_maps_summed_over_a_negative_channel_axis_lose_the_channel():
    # reduce_axes=(-3,) names the channel axis of the (channel-first) attributions as (1,)
    # does: nothing of a channel-last layout is left to move back. Oracle: autograd's
    # gradient summed over the channels, on an image wider than high.
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 7, 3)
    ).eval()
    x = torch.rand(2, 3, 6, 9, generator=torch.Generator().manual_seed(1))
    y = np.array([0, 2])
    leaf = x.clone().requires_grad_(True)
    net(leaf).gather(1, torch.from_numpy(y)[:, None]).sum().backward()
    expected = leaf.grad.sum(1).numpy()
    last = x.permute(0, 2, 3, 1).numpy()
    for axes in ((-3,), (1,)):
        got = bs.quantus_explain(net, last, y, reduce_axes=axes, keepdims=False)
        assert got.shape == (2, 6, 9)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 5, 4, 3), (2, 8, 4, 16), (2, 16, 4, 8)])
def test_the_layout_is_inferred_as_quantus_infers_it(shape):
    # Quantus' infer_channel_first is the oracle: channels are the axis shorter than
    # every other, height and width included; where neither end is, it refuses.
    from quantus.helpers.utils import infer_channel_first

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(shape[1:]), 3))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    y = np.array([0, 2])
    try:
        first = infer_channel_first(x.numpy())
    except ValueError:
        with pytest.raises(ValueError, match="expected channel_first=True or False"):
            bs.quantus_explain(net, x.numpy(), y)
        return
    # The model is fed channel-first inputs; the map comes back in the inputs' layout.
    leaf = (x if first else x.movedim(-1, 1)).clone().requires_grad_(True)
    net(leaf).gather(1, torch.from_numpy(y)[:, None]).sum().backward()
    expected = leaf.grad.sum(1, keepdim=True)
    expected = (expected if first else expected.movedim(1, -1)).numpy()
    got = bs.quantus_explain(net, x.numpy(), y)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_a_model_without_parameters_is_explained_on_the_cpu_in_the_default_dtype():
    # Logit c is the mean of channel c: its gradient is 1/(H W) on channel c, 0 elsewhere.
    # With no parameter to tell them, the place is the CPU and the dtype torch's default.
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = np.random.default_rng(0).random((3, 3, 4, 5))  # float64, as Quantus' arrays
    y = np.array([2, 0, 1])
    got = bs.quantus_explain(net, x, y, reduce_axes=())
    expected = np.zeros((3, 3, 4, 5), np.float32)
    expected[np.arange(3), y] = 1 / 20
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("inputs", "targets", "kwargs", "said"),
    [
        ("x", "y", {"reduce_axes": (4,)}, "quantus_explain: reduce_axes has axis 4, outside the "
         "4 axes of the attributions; expected axes from 1 to 3, e.g. (1,)"),
        ("x", "y", {"reduce_axes": (0,)},
         "quantus_explain cannot reduce over the batch axis 0; expected e.g. (1,)"),
        ("x", "y", {"reduce_axes": (1.5,)},
         "quantus_explain: reduce_axes must hold integers, e.g. (1,); got (1.5,)"),
        ("x", "y", {"softmax": True},
         "quantus_explain explains logits (pre-softmax); expected softmax=None or False"),
        ("abc", "y", {}, "quantus_explain inputs must be a numpy array or a torch tensor; got str"),
        ("x", "abc", {},
         "quantus_explain targets must be a numpy array or a torch tensor; got str"),
        ("x", [0.0, np.inf], {}, "quantus_explain targets must be class indices; got [0.0, inf]"),
        ("levels", "y", {}, "quantus_explain inputs must be floating point; got torch.uint8 "
         "(scale the images as the model expects them, e.g. to [0, 1])"),
        ("cube", "y", {}, "cannot tell the channel axis of inputs of shape (2, 16, 16, 16); "
         "expected channel_first=True or False in explain_func_kwargs"),
    ],
)  # fmt: skip
def test_a_refusal_names_what_was_given_and_the_form_expected(inputs, targets, kwargs, said):
    # Quantus hides the traceback of an explain_func: the one line must say it all.
    x = torch.rand(2, 1, 16, 16).numpy()
    given = {
        "x": x,
        "levels": (x * 255).astype(np.uint8),
        "cube": np.zeros((2, 16, 16, 16), np.float32),
    }.get(inputs, inputs)
    targets = np.array([0, 1]) if targets == "y" else targets
    with pytest.raises((TypeError, ValueError), match=f"^{re.escape(said)}$"):
        bs.quantus_explain(plain_cnn(), given, targets, **kwargs)
