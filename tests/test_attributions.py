"""Signed attributions kept in run directories, and the channel reductions of bs.heatmap."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import betasmooth as bs
from betasmooth.cli import main
from betasmooth.runs import RunDir

INPUTS = ["--model", "digits-cnn", "--data", "digits", "--no-progress"]


def _arrays(out, method):
    batches = RunDir(out).load_arrays(method)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("method", ["gradient", "lrp"])
def test_explain_attributions_round_trip(tmp_path, digits, digits_cnn, method):
    out = tmp_path / "run"
    argv = ["explain", *INPUTS, "--method", method, "-n", "3", "--batch-size", "2"]
    assert main([*argv, "--save-attributions", "--out", str(out)]) == 0
    arrays = _arrays(out, method)
    x = digits[0][:3]
    expected = bs.explain(digits_cnn, x, method)
    assert arrays["attribution"].shape == tuple(x.shape)
    np.testing.assert_allclose(arrays["attribution"], expected.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        arrays["map"], bs.heatmap(torch.from_numpy(arrays["attribution"])).numpy(), rtol=1e-6
    )
    plain = tmp_path / "plain"
    assert main([*argv, "--out", str(plain)]) == 0
    assert "attribution" not in _arrays(plain, method)


def test_attack_attributions_round_trip(tmp_path, digits_cnn):
    out = tmp_path / "attack"
    argv = ["attack", *INPUTS, "--method", "gradient", "-n", "2", "--steps", "3"]
    assert main([*argv, "--save-attributions", "--out", str(out)]) == 0
    arrays = _arrays(out, "gradient")
    label = torch.from_numpy(arrays["label"])
    for attr, x, heat in (("attr_orig", "x", "map_orig"), ("attr_adv", "x_adv", "map_adv")):
        xs = torch.from_numpy(arrays[x])
        expected = bs.explain(digits_cnn, xs, "gradient", label)
        assert arrays[attr].shape == tuple(xs.shape)
        np.testing.assert_allclose(arrays[attr], expected.numpy(), rtol=1e-5, atol=1e-7)
        heat_of_attr = bs.heatmap(torch.from_numpy(arrays[attr])).numpy()
        np.testing.assert_allclose(arrays[heat], heat_of_attr, rtol=1e-5, atol=1e-9)
    assert not np.array_equal(arrays["attr_orig"], arrays["attr_adv"])


def test_heatmap_reductions_by_hand():
    # Channels (2, 1, 2): pixel values per channel written out.
    e = torch.tensor([[[[3.0, -1.0]], [[-4.0, 1.0]]]], dtype=torch.float64)
    hand = {
        "abs_sum": [7.0, 2.0],  # |3| + |-4|, |-1| + |1|
        "sum": [-1.0, 0.0],
        "pos": [0.0, 0.0],
        "l2": [5.0, 2**0.5],
    }
    for reduction, values in hand.items():
        raw = torch.tensor([[values]], dtype=torch.float64)
        total = raw.abs().sum()
        expected = raw / total if total > 0 else raw
        torch.testing.assert_close(bs.heatmap(e, reduction=reduction), expected)
    f = torch.tensor([[[[2.0, -1.0, 0.5]], [[1.0, -1.0, 0.5]]]], dtype=torch.float64)
    torch.testing.assert_close(
        bs.heatmap(f, reduction="sum"), torch.tensor([[[3.0, -2.0, 1.0]]]).double() / 6
    )
    torch.testing.assert_close(
        bs.heatmap(f, reduction="pos"), torch.tensor([[[3.0, 0.0, 1.0]]]).double() / 4
    )
    assert torch.equal(bs.heatmap(f), bs.heatmap(f, reduction="abs_sum"))


def test_heatmap_unknown_reduction():
    with pytest.raises(ValueError, match="unknown reduction 'max'.*abs_sum"):
        bs.heatmap(torch.rand(1, 1, 2, 2), reduction="max")


def test_registering_a_taken_method_name_is_refused_and_replace_restores_it():
    from betasmooth.explain import METHODS, register

    builtin = METHODS["gradient"]
    try:
        with pytest.raises(
            bs.InputError, match=r"^explanation method 'gradient' is registered already"
        ):
            register("gradient")(lambda model, x, target, *, create_graph=False: x)
        assert METHODS["gradient"] is builtin
        register("gradient", replace=True)(lambda model, x, target, *, create_graph=False: x)
        x = torch.rand(2, 1, 4, 4)
        assert torch.equal(bs.explain(torch.nn.Flatten(), x, "gradient", 0), x)
    finally:
        METHODS["gradient"] = builtin


@pytest.mark.parametrize(
    ("result", "got"),
    [
        (lambda x: x[:1], r"shape \(1, 1, 4, 4\)"),
        (lambda x: None, "NoneType"),
        (lambda x: x.numpy(), "ndarray"),
        (lambda x: x.flatten(), r"shape \(32,\)"),
        # A batch, but not of maps like x: half the size, or without the channel axis.
        (lambda x: x[..., ::2, ::2], r"shape \(2, 1, 2, 2\)"),
        (lambda x: x[:, 0], r"shape \(2, 4, 4\)"),
    ],
)
def test_a_method_that_returns_no_batch_is_named(result, got):
    from betasmooth.explain import METHODS, register

    register("returns_wrong")(lambda model, x, target, *, create_graph=False: result(x))
    try:
        with pytest.raises(
            bs.InputError, match=rf"^method 'returns_wrong' returned {got}; expected"
        ):
            bs.explain(torch.nn.Flatten(), torch.rand(2, 1, 4, 4), "returns_wrong", 0)
    finally:
        del METHODS["returns_wrong"]


def test_a_method_of_another_form_is_refused_where_it_is_registered_or_resolved():
    # explain calls fn(model, x, target, create_graph=...): a method without
    # create_graph would fail at its first use; so would a resolver's None.
    from betasmooth.explain import METHODS, PREFIXES, register, register_prefix

    with pytest.raises(bs.InputError) as err:
        register("no_graph")(lambda model, x, target: x)
    assert str(err.value) == (
        "explanation method 'no_graph' cannot be called as fn(model, x, target, *, "
        "create_graph=False, **options) (got an unexpected keyword argument 'create_graph'); "
        "expected that form"
    )
    assert "no_graph" not in METHODS
    # An option without a default is the caller's to give: the form leaves it out.
    register("scaled_by")(lambda model, x, target, *, create_graph=False, scale: scale * x)
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bs.explain(torch.nn.Flatten(), x, "scaled_by", 0, scale=2.0), 2 * x)
    del METHODS["scaled_by"]
    register_prefix("nothing")(lambda name: None)
    try:
        with pytest.raises(bs.InputError) as err:
            bs.explain(torch.nn.Flatten(), torch.rand(2, 1, 4, 4), "nothing:1", 0)
    finally:
        del PREFIXES["nothing"]
    assert str(err.value) == (
        "the method that prefix 'nothing' resolves '1' to must be callable; got NoneType"
    )

    # A resolver that refuses a name in its own way: said in one line, naming the prefix.
    @register_prefix("picky")
    def picky(name):
        raise ValueError(f"no method called {name}\nsee the docs")

    try:
        with pytest.raises(bs.InputError) as err:
            bs.explain(torch.nn.Flatten(), torch.rand(2, 1, 4, 4), "picky:c", 0)
    finally:
        del PREFIXES["picky"]
    assert (
        str(err.value) == "method prefix 'picky' cannot resolve 'c': ValueError: no method called c"
    )


def test_a_resolvers_own_input_error_reaches_the_caller_as_it_said_it():
    # An InputError is already a refusal in the library's words (captum's names
    # the Captum classes): it is not wrapped again in "cannot resolve".
    from betasmooth.explain import PREFIXES, register_prefix

    @register_prefix("worded")
    def worded(name):
        raise bs.InputError(f"worded:{name} is not a method; expected worded:a")

    try:
        with pytest.raises(bs.InputError) as err:
            bs.explain(torch.nn.Flatten(), torch.rand(2, 1, 4, 4), "worded:c", 0)
    finally:
        del PREFIXES["worded"]
    assert str(err.value) == "worded:c is not a method; expected worded:a"


def test_a_method_that_says_its_maps_have_other_shapes_returns_them_also_as_a_base():
    # shaped_like_x = False (a layer's maps): a batch of maps of any shape, also through
    # SmoothGrad, which averages them; without a batch, still refused.
    from betasmooth.explain import METHODS, register

    @register("pooled")
    def pooled(model, x, target, *, create_graph=False):
        return torch.nn.functional.avg_pool2d(x, 2)

    pooled.shaped_like_x = False
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    try:
        expected = torch.nn.functional.avg_pool2d(x, 2)
        torch.testing.assert_close(bs.explain(torch.nn.Flatten(), x, "pooled", 0), expected)
        smooth = bs.explain(torch.nn.Flatten(), x, "smoothgrad", 0, base="pooled", n=2, seed=0)
        assert smooth.shape == (2, 1, 2, 2)
        METHODS["pooled"] = lambda model, x, target, *, create_graph=False: x[:1]
        METHODS["pooled"].shaped_like_x = False
        with pytest.raises(
            bs.InputError, match=r"returned shape \(1, 1, 4, 4\); expected a batch of 2 maps"
        ):
            bs.explain(torch.nn.Flatten(), x, "pooled", 0)
        # One number per item is no map: a batch of maps has at least two dimensions.
        METHODS["pooled"] = lambda model, x, target, *, create_graph=False: x.flatten(1)[:, 0]
        METHODS["pooled"].shaped_like_x = False
        with pytest.raises(
            bs.InputError, match=r"returned shape \(2,\); expected a batch of 2 maps"
        ):
            bs.explain(torch.nn.Flatten(), x, "pooled", 0)
    finally:
        del METHODS["pooled"]


@pytest.mark.parametrize("how", ["method", "prefix"])
def test_a_method_name_with_a_dash_is_refused(how):
    # Its arrays file my-grad-0.npz would read back as method "my" of batch "grad-0".
    from betasmooth.explain import METHODS, PREFIXES, register, register_prefix

    with pytest.raises(bs.InputError, match=r"names are letters, digits and '_'.*'my_grad'"):
        (register if how == "method" else register_prefix)("my-grad")(lambda *a, **k: None)
    assert "my-grad" not in METHODS and "my-grad" not in PREFIXES
    # A comma is refused too, and the message no longer offers '-' for a method's name.
    with pytest.raises(bs.InputError, match=r"names are letters, digits and '_', .*got 'a,b'$"):
        (register if how == "method" else register_prefix)("a,b")(lambda *a, **k: None)


def test_a_prefixed_name_with_a_dash_is_refused_before_it_names_a_file(tmp_path):
    # scaled:-3 would be written arrays/scaled~-3-0.npz, which reads back as no method:
    # its arrays were lost to the figures, the report and --resume.
    from betasmooth.explain import PREFIXES, register_prefix

    @register_prefix("scaled")
    def scaled(name):
        return lambda model, x, target, *, create_graph=False: float(name) * x

    try:
        assert bs.explain(torch.nn.Flatten(), torch.ones(1, 2), "scaled:3", 0).tolist() == [
            [3.0, 3.0]
        ]
        with pytest.raises(bs.InputError, match=r"^method names have no '-' .*'scaled:_3'$"):
            bs.explain(torch.nn.Flatten(), torch.ones(1, 2), "scaled:-3", 0)
    finally:
        del PREFIXES["scaled"]


def test_a_map_that_is_zero_everywhere_is_said_once_per_model():
    # A zero-initialised head (torchvision's ViT at random weights): every map is 0,
    # and the attack and the sweep then scored PCC 1, perfect agreement, unsaid.
    import warnings

    from nets import plain_cnn

    net = plain_cnn()
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        live = bs.explain(net, x, "gradient")
    assert float(live.abs().amax((1, 2, 3)).min()) > 0 and record == []
    torch.nn.init.zeros_(net[-1].weight)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            assert bs.explain(net, x, "gradient").abs().max() == 0
    said = [str(w.message) for w in record]
    assert len(said) == 1 and said[0].startswith("gradient gave a map that is zero everywhere")


def test_a_registered_smoothing_is_no_base_and_a_registered_method_is_one():
    # Which methods smooth another is what their options say (a ``base``), not a list
    # of the built-in two: a registered smoothing was taken as a base of SmoothGrad.
    from betasmooth.explain import METHODS, register

    @register("own_smoothing")
    def own_smoothing(model, x, target, *, create_graph=False, base="gradient"):
        return bs.explain(model, x, base, target, create_graph=create_graph)

    @register("doubled")
    def doubled(model, x, target, *, create_graph=False):
        return 2 * bs.explain(model, x, "gradient", target, create_graph=create_graph)

    try:
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        with pytest.raises(bs.InputError) as info:
            bs.explain(net, x, "smoothgrad", 0, base="own_smoothing")
        message = str(info.value)
        assert message.startswith(
            "base method 'own_smoothing' for smoothgrad smooths a base method itself; "
        )
        assert "doubled" in message and "own_smoothing, " not in message.split("; ")[1]
        # A plain registered method is a base: SmoothGrad of 2 x the gradient of a
        # linear model is twice its weight row, whatever the noise.
        maps = bs.explain(net, x, "smoothgrad", 0, base="doubled", n=3)
        expected = 2 * net[1].weight[0].detach().view(1, 1, 4, 4).expand_as(x)
        torch.testing.assert_close(maps, expected)
    finally:
        METHODS.pop("own_smoothing")
        METHODS.pop("doubled")


def test_a_registered_smoothing_is_checked_as_its_base_method_is():
    # The checks of the base (LRP's input box, a layer LRP has no rule for) reach
    # any method that smooths one, not only the built-in smoothgrad and beta_smooth.
    from betasmooth.explain import METHODS, check_model, register

    @register("squared_smoothing")
    def squared_smoothing(model, x, target, *, create_graph=False, base="gradient", **options):
        return bs.explain(model, x, base, target, create_graph=create_graph, **options) ** 2

    try:
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3), torch.nn.ReLU())
        x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        for method in ("smoothgrad", "squared_smoothing"):
            with pytest.raises(
                bs.InputError, match=r"^x lies outside the lrp input box \[0.0, 1.0\]"
            ):
                bs.explain(net, 3 * x, method, base="lrp")
        # Inside the box the map is the square of LRP's (the check passes it through).
        torch.testing.assert_close(
            bs.explain(net, x, "squared_smoothing", base="lrp"), bs.explain(net, x, "lrp") ** 2
        )
        odd = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3), torch.nn.Softsign())
        with pytest.raises(bs.InputError) as plain:
            check_model(odd, "lrp")
        with pytest.raises(bs.InputError) as wrapped:
            check_model(odd, "squared_smoothing", base="lrp")
        assert str(wrapped.value) == str(plain.value)
    finally:
        METHODS.pop("squared_smoothing")


def test_a_base_option_that_names_no_method_is_the_registered_methods_own():
    # Only a base that is a name is checked as a method: a number is the method's own.
    from betasmooth.explain import METHODS, check_model, register

    @register("log_gradient")
    def log_gradient(model, x, target, *, create_graph=False, base=2.0):
        grad = bs.explain(model, x, "gradient", target, create_graph=create_graph)
        return torch.log1p(grad.abs()) / math.log(base)

    try:
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        check_model(net, "log_gradient", base=10.0)
        want = torch.log10(1 + net[1].weight[1].detach().abs()).view(1, 1, 4, 4).expand_as(x)
        torch.testing.assert_close(bs.explain(net, x, "log_gradient", 1, base=10.0), want)
    finally:
        METHODS.pop("log_gradient")


def test_a_base_named_in_place_of_a_default_that_names_none_is_checked_as_that_method():
    # The base given, not the registered default, decides: a smoothing whose default
    # base is None (its own plain map) checks a base 'lrp' given as LRP, box and all.
    from betasmooth.explain import METHODS, check_method_input, check_model, register

    @register("optional_smoothing")
    def optional_smoothing(model, x, target, *, create_graph=False, base=None, **options):
        name = "gradient" if base is None else base
        return bs.explain(model, x, name, target, create_graph=create_graph, **options)

    try:
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        check_method_input(3 * x, "optional_smoothing")  # no base named: nothing to check
        with pytest.raises(bs.InputError, match=r"^x lies outside the lrp input box \[0.0, 1.0\]"):
            check_method_input(3 * x, "optional_smoothing", base="lrp")
        normed = torch.nn.Sequential(torch.nn.LayerNorm([1, 4, 4]), net)
        check_model(normed, "optional_smoothing")
        with pytest.raises(bs.InputError, match=r"^lrp's z\^B rule needs the bounds"):
            check_model(normed, "optional_smoothing", base="lrp")
    finally:
        METHODS.pop("optional_smoothing")


@pytest.mark.parametrize("method", ["smoothgrad", "beta_smooth"])
def test_the_base_method_is_checked_with_the_options_that_reach_it(method):
    # LRP's z^B rule cannot bound the input of a layer after a norm; a composite
    # without a box can. The base's options decide, as they do for LRP alone.
    from betasmooth.explain import check_model

    net = torch.nn.Sequential(
        torch.nn.LayerNorm([1, 4, 4]), torch.nn.Flatten(), torch.nn.Linear(16, 3)
    )
    flat = {"composite": "epsilon_plus_flat"}
    with pytest.raises(bs.InputError) as plain:
        check_model(net, "lrp")
    check_model(net, "lrp", **flat)
    with pytest.raises(bs.InputError) as wrapped:
        check_model(net, method, base="lrp")
    assert str(wrapped.value) == str(plain.value)
    check_model(net, method, base="lrp", base_options=flat)
