"""Calls on one model object from several threads: each as if made alone."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import betasmooth as bs
from nets import plain_cnn


@pytest.fixture
def switching():
    # Threads switch after every few bytecodes, as under load.
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


CALLS = [
    ("lrp", {"low": 0.0, "high": 1.0}),
    ("beta_smooth", {"beta": 1.0}),
    ("guided_backprop", {}),
    ("gradient", {}),
    ("beta_smooth", {"beta": 5.0}),
    ("smoothgrad", {"n": 4, "seed": 0}),
]


def test_explanations_of_one_model_in_several_threads_equal_those_made_alone(switching):
    # Each call put its override in the model's hooks (lrp its recording forward) for
    # every thread: maps of another method's model, KeyErrors from lrp's graph.
    model = plain_cnn(seed=1)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    alone = [bs.explain(model, x, method, **options) for method, options in CALLS]

    def run(k: int) -> float:
        method, options = CALLS[k % len(CALLS)]
        found = bs.explain(model, x, method, **options)
        return float((found - alone[k % len(CALLS)]).abs().max())

    with ThreadPoolExecutor(4) as pool:
        worst = max(pool.map(run, range(12 * len(CALLS))))
    assert worst == 0.0
    # Nothing of the calls is left on the model.
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert "forward" not in model.__dict__


def test_a_model_in_training_gets_its_mode_back_from_explanations_in_two_threads(switching):
    # The second call saved the first one's temporary evaluation mode as the model's own.
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    x = torch.rand(2, 1, 4, 4)
    for _ in range(20):
        model.train()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: bs.explain(model, x, "gradient"), range(2)))
        assert model.training and model[2].training


def _net_and_its_softplus_output() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A ReLU net, an input, and its output with softplus of beta 2 for the ReLU (by hand)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = net[2](torch.nn.functional.softplus(net[0](x), 2.0))
    return net, x, expected


def test_a_forward_running_in_another_thread_keeps_its_override_until_it_ends():
    # The context's exit took the override off its own thread's stack of function modes
    # only: the other thread kept it on its stack for good.
    net, x, expected = _net_and_its_softplus_output()
    inside, leave = threading.Event(), threading.Event()

    def hold(module, args, output):
        inside.set()
        leave.wait(10)

    handle = net[2].register_forward_hook(hold)
    found: dict[str, object] = {}

    def other() -> None:
        with torch.no_grad():
            found["output"] = net(x)
        found["modes"] = torch._C._len_torch_function_stack()

    thread = threading.Thread(target=other)
    with bs.smoothed(net, 2.0):
        thread.start()
        assert inside.wait(10)
    handle.remove()
    leave.set()
    thread.join(10)
    assert found["modes"] == 0
    torch.testing.assert_close(found["output"], expected)  # begun smoothed, ended so
    assert not net._forward_pre_hooks and not net._forward_hooks


def test_two_forwards_running_on_after_the_context_each_leave_their_own_override():
    # The first of two forwards to end after the context's exit took the leave hook off:
    # the second kept its override on its thread's stack of function modes for good.
    net, x, expected = _net_and_its_softplus_output()
    names = ("first", "second")
    inside = {n: threading.Event() for n in names}
    leave = {n: threading.Event() for n in names}

    def hold(module, args, output):
        name = threading.current_thread().name
        inside[name].set()
        leave[name].wait(10)

    handle = net[2].register_forward_hook(hold)
    found: dict[str, dict[str, object]] = {n: {} for n in names}

    def other() -> None:
        mine = found[threading.current_thread().name]
        with torch.no_grad():
            mine["output"] = net(x)
        mine["modes"] = torch._C._len_torch_function_stack()

    threads = [threading.Thread(target=other, name=n) for n in names]
    with bs.smoothed(net, 2.0):
        for t in threads:
            t.start()
        assert all(inside[n].wait(10) for n in names)
    handle.remove()
    for n, t in zip(names, threads):
        leave[n].set()
        t.join(10)
    assert [found[n]["modes"] for n in names] == [0, 0]
    for n in names:
        torch.testing.assert_close(found[n]["output"], expected)
    assert not net._forward_pre_hooks and not net._forward_hooks


def test_attacks_on_one_model_in_two_threads_equal_those_made_alone(switching):
    # The surrogate of one attack replaced the ReLUs of the other's forward passes.
    model = plain_cnn(seed=2)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = bs.heatmap(bs.explain(model, x, "gradient"))
    settings = [("gradient", maps.flip(0)), ("lrp", maps.roll(1, dims=1))]

    def attack(k: int) -> torch.Tensor:
        method, target = settings[k % 2]
        return bs.manipulate(model, x, target, method, steps=4, lr=1e-2).x_adv

    alone = [attack(k) for k in range(2)]
    with ThreadPoolExecutor(2) as pool:
        found = list(pool.map(attack, range(4)))
    for k, x_adv in enumerate(found):
        torch.testing.assert_close(x_adv, alone[k % 2], rtol=0, atol=0)


def test_a_call_that_waits_long_for_its_turn_says_why(monkeypatch):
    # A method that explained its own model from worker threads waited for itself,
    # without a word.
    from betasmooth import validate

    monkeypatch.setattr(validate, "WAIT_NOTICE", 0.05)
    model = nn.Linear(2, 2)
    started, release = threading.Event(), threading.Event()

    @validate.one_at_a_time
    def hold(model: nn.Module) -> None:
        started.set()
        release.wait(10)

    @validate.one_at_a_time
    def turn(model: nn.Module) -> str:
        return "done"

    holder = threading.Thread(target=hold, args=(model,))
    holder.start()
    assert started.wait(10)
    threading.Timer(0.3, release.set).start()
    with pytest.warns(UserWarning, match="waiting for another thread's betasmooth call on this "
                      "Linear .* give the workers copy.deepcopy.model.") as said:  # fmt: skip
        assert turn(model) == "done"
    holder.join(10)
    assert len(said) == 1
    assert turn(nn.Linear(2, 2)) == "done"  # another model: no wait
