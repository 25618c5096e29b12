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
