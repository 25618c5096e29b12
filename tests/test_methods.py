"""What every built-in method promises, whatever it computes: the contract of ``register``.

A map is shaped like ``x`` and comes back in its dtype; an item's map does not
depend on the batch it is explained in; no target is the prediction; and a map
kept with ``create_graph`` is the same map, differentiable w.r.t. ``x``.
"""

from __future__ import annotations

import pytest
import torch

import betasmooth as bs
from betasmooth.explain import is_differentiable
from nets import plain_cnn

# Options that make each method quick and its draws one seed per item.
OPTIONS = {
    "integrated_gradients": {"steps": 8},
    "smoothgrad": {"n": 3, "seed": [11, 12, 13]},
}


@pytest.fixture(scope="module")
def model_and_x() -> tuple[torch.nn.Module, torch.Tensor]:
    net = plain_cnn(seed=5).double()
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return net, x


def _options(method: str, items: slice = slice(None)) -> dict[str, object]:
    options = dict(OPTIONS.get(method, {}))
    if "seed" in options:
        options["seed"] = options["seed"][items]
    return options


@pytest.mark.parametrize("method", sorted(bs.METHODS))
def test_every_method_keeps_the_contract_of_register(method, model_and_x):
    net, x = model_and_x
    target = torch.tensor([0, 3, 1])
    maps = bs.explain(net, x, method, target, **_options(method))
    assert maps.shape == x.shape and maps.dtype == torch.float64
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0
    # One item at a time: the same maps.
    for i in range(len(x)):
        alone = bs.explain(
            net, x[i : i + 1], method, target[i : i + 1], **_options(method, slice(i, i + 1))
        )
        torch.testing.assert_close(alone, maps[i : i + 1], rtol=1e-9, atol=1e-12)
    # No target: the predicted class.
    predicted = net(x).argmax(1)
    torch.testing.assert_close(
        bs.explain(net, x, method, **_options(method)),
        bs.explain(net, x, method, predicted, **_options(method)),
        rtol=0,
        atol=0,
    )
    # With the graph kept: the same map, with a graph back to x (zero second
    # derivatives are fine: a ReLU network's gradient is piecewise constant).
    xg = x.clone().requires_grad_(True)
    kept = bs.explain(net, xg, method, target, create_graph=True, **_options(method))
    torch.testing.assert_close(kept.detach(), maps, rtol=1e-9, atol=1e-12)
    assert is_differentiable(method) and kept.requires_grad
    (grad,) = torch.autograd.grad(
        (kept * torch.linspace(-1, 1, kept.numel()).view_as(kept)).sum(), xg
    )
    assert grad.shape == x.shape and torch.isfinite(grad).all()


def test_a_smoothing_whose_default_base_has_range_options_gets_them_unnamed():
    # The base of a smoothing is its option base, else that option's default:
    # a smoothing registered with base="lrp" by default gets lrp's box and has
    # lrp's per-image bounds cut, as if base="lrp" had been given.
    from betasmooth.explain import METHODS, register, select_items, with_base_range

    @register("smooths_lrp_by_default")
    def smooths_lrp(model, x, target, *, create_graph=False, base="lrp", base_options=None):
        return METHODS[base](model, x, target, create_graph=create_graph, **(base_options or {}))

    try:
        filled = with_base_range("smooths_lrp_by_default", {}, -1.0, 2.0)
        assert filled == {"base_options": {"low": -1.0, "high": 2.0}}
        rows = torch.arange(3.0).view(3, 1, 1, 1)
        options = {"base_options": {"low": rows - 5, "high": rows + 5}}
        cut = select_items("smooths_lrp_by_default", options, [2, 0], (3, 1, 4, 4))
        assert cut["base_options"]["low"].flatten().tolist() == [-3.0, -5.0]
        assert cut["base_options"]["high"].flatten().tolist() == [7.0, 5.0]
    finally:
        del METHODS["smooths_lrp_by_default"]


def test_with_base_range_fills_only_the_bounds_of_the_base_not_given():
    # DESIGN of with_base_range: an option already given, in base_options or
    # among the smoothing's own options, wins; only the missing bound is filled.
    from betasmooth.explain import with_base_range

    one = {"base": "lrp", "base_options": {"low": 0.25}}
    assert with_base_range("smoothgrad", one, -1.0, 2.0)["base_options"] == {
        "low": 0.25,
        "high": 2.0,
    }
    # A keyword option of smoothgrad goes to its base: the box's low is not filled.
    keyword = {"base": "lrp", "low": 0.5}
    assert with_base_range("smoothgrad", keyword, -1.0, 2.0) == {
        **keyword,
        "base_options": {"high": 2.0},
    }
    # A base_options that is no dict is left for smoothgrad to name, not read here.
    wrong = {"base": "lrp", "base_options": "low=0"}
    assert with_base_range("smoothgrad", wrong, -1.0, 2.0) == wrong


def test_a_kept_map_of_a_hardsigmoid_model_can_be_differentiated_again():
    # Hardsigmoid's backward has no derivative in torch; explain with
    # create_graph computes it by a form that has one (second_order). Where
    # every unit is in hardsigmoid's linear part, z / 6 + 1 / 2, the gradient
    # g = W1^T (W2[t] / 6) is constant, so the derivative of sum(x * g) is g.
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Hardsigmoid(), torch.nn.Linear(3, 2)
    ).double()
    x = (0.1 * torch.rand(2, 4, dtype=torch.float64)).requires_grad_(True)
    first, _, second = net
    assert (first(x).abs() < 3).all()  # the linear part: the closed form holds
    kept = bs.explain(net, x, "input_x_gradient", 1, create_graph=True)
    g = first.weight.T @ (second.weight[1] / 6)
    torch.testing.assert_close(kept.detach(), x.detach() * g, rtol=1e-12, atol=1e-14)
    (again,) = torch.autograd.grad(kept.sum(), x)
    torch.testing.assert_close(again, g.expand(2, 4), rtol=1e-12, atol=1e-14)
