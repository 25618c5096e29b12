"""Bad input to bs.explain: one clear error naming the problem and the expected form."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import betasmooth as bs
from nets import plain_cnn, residual_net

METHODS = ["gradient", "integrated_gradients", "smoothgrad", "beta_smooth"]


@pytest.fixture
def net():
    return plain_cnn()


@pytest.fixture
def x():
    return torch.rand(4, 1, 16, 16)


def _raises(error, fragments, *args, **kwargs):
    with pytest.raises(error) as info:
        bs.explain(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, bs.InputError)


@pytest.mark.parametrize(
    ("bad", "error", "fragments"),
    [
        ([[0.5]], TypeError, ["torch.Tensor", "(B, C, H, W)", "list"]),
        (torch.ones(4, 1, 16, 16, dtype=torch.int64), TypeError, ["floating", "int64"]),
        (torch.rand(16), ValueError, ["at least 2 dimensions", "(16,)"]),
        (torch.rand(0, 1, 16, 16), ValueError, ["empty batch", "at least one item"]),
    ],
)
def test_bad_x(net, bad, error, fragments):
    _raises(error, fragments, net, bad, "gradient")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["gradient", "integrated_gradients", "smoothgrad"])
def test_non_finite_x(net, x, value, method):
    x[1, 0, 3, 3] = value
    _raises(ValueError, ["NaN or inf", "finite"], net, x, method)


@pytest.mark.parametrize(
    ("target", "error", "fragments"),
    [
        (5, ValueError, ["target class 5 is out of range", "5 outputs", "0 to 4"]),
        (torch.tensor([0, 1, 9, 2]), ValueError, ["out of range", "0 to 4"]),
        (-1, ValueError, ["target class must be >= 0", "-1"]),
        (torch.tensor([0, 1]), ValueError, ["shape (4,)", "(2,)"]),
        (torch.zeros(4, 1, dtype=torch.long), ValueError, ["shape (4,)", "(4, 1)"]),
        (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, ["integer class indices", "float32"]),
        ("cat", TypeError, ["target must be None, an int or a (B,) integer tensor", "str"]),
        (
            np.array([0.0, 1.0, 2.0, 3.0]),
            TypeError,
            ["tensor, array or list", "ndarray of dtype float64"],
        ),
        (np.array([0, 1, 9, 2]), ValueError, ["out of range", "0 to 4"]),
        ([0, 1, 9, 2], ValueError, ["out of range", "0 to 4"]),
        ([0, 1, 2.0, 3], TypeError, ["tensor, array or list", "got list"]),
        ([0, 1], ValueError, ["shape (4,)", "(2,)"]),
    ],
)
@pytest.mark.parametrize(
    "method", ["gradient", "integrated_gradients", "smoothgrad", "beta_smooth"]
)
def test_bad_target(net, x, target, error, fragments, method):
    _raises(error, fragments, net, x, method, target)


@pytest.mark.parametrize(
    ("given", "same"),
    [
        (np.int64(3), 3),
        (np.array([0, 3, 1, 2], dtype=np.int32), torch.tensor([0, 3, 1, 2])),
        (np.uint8(2), torch.tensor(2)),
        ([0, 3, 1, 2], torch.tensor([0, 3, 1, 2])),
        ((0, 3, np.int64(1), 2), torch.tensor([0, 3, 1, 2])),
    ],
)
def test_numpy_targets_are_the_same_classes(net, x, given, same):
    # Labels from a numpy pipeline, or a list as Captum takes, explain the same
    # classes as ints and tensors.
    torch.testing.assert_close(
        bs.explain(net, x, "gradient", given), bs.explain(net, x, "gradient", same), rtol=0, atol=0
    )


def test_unknown_method(net, x):
    _raises(ValueError, ["unknown method 'saliency'", "gradient", "smoothgrad"], net, x, "saliency")


def test_a_prefix_without_a_name_is_no_method(net, x):
    """``captum`` alone names a prefix, not a method: unknown, not a resolver's failure."""
    from betasmooth.explain import is_method

    assert not is_method("captum") and is_method("captum:Saliency")
    with pytest.raises(bs.InputError, match=r"^unknown method 'captum'; expected one of: "):
        bs.explain(net, x, "captum")


# A baseline with one inf pixel among finite ones.
ONE_INF_PIXEL = torch.zeros(1, 16, 16).index_put((torch.tensor([0]),) * 3, torch.tensor(math.inf))


@pytest.mark.parametrize(
    ("method", "options", "error", "fragments"),
    [
        ("gradient", {"steps": 3}, TypeError, ["unknown option 'steps'", "'gradient'"]),
        ("integrated_gradients", {"step": 3}, TypeError, ["unknown option 'step'", "steps"]),
        ("integrated_gradients", {"steps": -3}, ValueError, ["steps must be an integer >= 2"]),
        ("integrated_gradients", {"steps": 1}, ValueError, ["steps must be an integer >= 2"]),
        ("integrated_gradients", {"steps": 2.5}, TypeError, ["steps must be an integer", "2.5"]),
        ("integrated_gradients", {"rule": "simpson"}, ValueError,
         ["unknown rule 'simpson'", "gausslegendre", "riemann_left"]),
        ("integrated_gradients", {"baseline": torch.zeros(3, 16, 16)}, ValueError,
         ["baseline of shape (3, 16, 16) does not broadcast", "(1, 16, 16)"]),
        ("integrated_gradients", {"baseline": torch.tensor(float("nan"))}, ValueError,
         ["baseline contains NaN", "finite"]),
        ("integrated_gradients", {"baseline": ONE_INF_PIXEL}, ValueError,
         ["baseline contains NaN or inf", "finite"]),
        ("integrated_gradients", {"baseline": "black"}, TypeError,
         ["baseline must be None, a number or a tensor", "str"]),
        ("integrated_gradients", {"chunk": 0}, ValueError, ["chunk must be an integer >= 1"]),
        ("smoothgrad", {"sigma": 0.0}, ValueError, ["sigma must be a positive", "0.0"]),
        ("smoothgrad", {"sigma": -0.1}, ValueError, ["sigma must be a positive"]),
        ("smoothgrad", {"sigma": "big"}, TypeError, ["sigma must be a positive number"]),
        ("smoothgrad", {"sigma": None}, TypeError, ["sigma must be a positive number; got None"]),
        ("smoothgrad", {"n": 0}, ValueError, ["n must be an integer >= 1", "0"]),
        ("smoothgrad", {"noise": "uniform"}, ValueError,
         ["unknown noise 'uniform'", "gaussian, logistic"]),
        ("smoothgrad", {"input_range": 0}, ValueError, ["input_range must be a positive"]),
        ("smoothgrad", {"seed": -1}, ValueError, ["seed must be an integer >= 0"]),
        ("smoothgrad", {"base": "saliency"}, ValueError,
         ["unknown base method 'saliency' for smoothgrad", "gradient", "integrated_gradients"]),
        ("smoothgrad", {"base": "beta_smooth"}, ValueError,
         ["base method 'beta_smooth' for smoothgrad smooths a base method itself", "lrp"]),
        ("smoothgrad", {"base_options": {"beta": 1.0}}, TypeError,
         ["unknown option 'beta' for method 'smoothgrad'", "or of its base 'gradient' (none)"]),
        ("smoothgrad", {"sigmaa": 0.1}, TypeError,
         ["unknown option 'sigmaa' for method 'smoothgrad'", "own (", "sigma)", "'gradient'"]),
        ("beta_smooth", {"base": "integrated_gradients", "step": 3}, TypeError,
         ["unknown option 'step' for method 'beta_smooth'", "own (base, base_options, beta)",
          "base 'integrated_gradients' (", "steps"]),
        ("smoothgrad", {"base_options": [("steps", 3)]}, TypeError,
         ["base_options must be a dict", "list"]),
        ("beta_smooth", {"beta": 0}, ValueError, ["beta must be a positive", "0"]),
        ("beta_smooth", {"beta": float("inf")}, ValueError, ["beta must be a positive finite"]),
        ("beta_smooth", {"base": "smoothgrad"}, ValueError,
         ["base method 'smoothgrad' for beta_smooth smooths a base method itself",
          "input_x_gradient"]),
        ("beta_smooth", {"base": "integrated_gradients", "base_options": {"rule": "x"}},
         ValueError, ["unknown rule 'x'"]),
    ],
)  # fmt: skip
def test_bad_option(net, x, method, options, error, fragments):
    _raises(error, fragments, net, x, method, **options)


@pytest.mark.parametrize(
    "method", ["gradient", "integrated_gradients", "smoothgrad", "beta_smooth"]
)
def test_mode_is_restored_and_eval_is_used(x, method):
    # Dropout makes a training-mode forward random; explain must use eval mode.
    net = plain_cnn().train()
    options = {"seed": 0, "n": 3} if method == "smoothgrad" else {}
    ours = bs.explain(net, x, method, 1, **options)
    assert net.training and all(m.training for m in net.modules())
    torch.testing.assert_close(ours, bs.explain(plain_cnn().eval(), x, method, 1, **options))
    evaluated = residual_net().eval()
    bs.explain(evaluated, x, method, 1, **options)
    assert not any(m.training for m in evaluated.modules())


def test_each_module_gets_its_own_mode_back(x):
    # Fine-tuning freezes BatchNorm (eval) inside a model in training: it stays frozen.
    net = residual_net().train()
    frozen = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert frozen
    for module in frozen:
        module.eval()
    modes = {name: m.training for name, m in net.named_modules()}
    bs.explain(net, x, "lrp", 1)
    bs.manipulate(
        net, x, bs.heatmap(bs.explain(net, x.flip(0), "gradient", 1)), "gradient", steps=1
    )
    bs.curvature(net, x[:1], 1, iterations=1)
    assert {name: m.training for name, m in net.named_modules()} == modes


def test_a_modules_own_train_runs_when_its_mode_comes_back(x):
    # A train() that keeps other state in step with the mode.
    class Switching(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = residual_net()
            self.drop_p = 0.5

        def train(self, mode: bool = True) -> Switching:
            self.drop_p = 0.5 if mode else 0.0
            return super().train(mode)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(torch.nn.functional.dropout(x, self.drop_p, self.training))

    net = Switching().train()
    bs.explain(net, x, "gradient", 1)
    assert net.training and net.drop_p == 0.5


def test_mode_and_relu_are_restored_when_the_method_raises(x):
    net = residual_net()
    before = net(x)
    net.train()
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        bs.explain(net, x, "beta_smooth", base="integrated_gradients", base_options={"steps": 0})
    assert net.training
    torch.testing.assert_close(net.eval()(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lrp", "smoothgrad", "gradient"])
def test_check_model_names_a_model_that_is_no_module(method):
    from betasmooth.explain import check_model

    with pytest.raises(bs.InputTypeError, match="^model must be a torch.nn.Module; got function"):
        check_model(lambda x: x, method)


def test_an_unknown_option_of_a_smoothing_names_the_smoothing_and_its_base(net, x):
    """An option that neither SmoothGrad nor its base takes is named for the method the
    user called, also where the base takes no options at all, and Captum's ``method``
    is said to be written ``rule``."""
    own = "base, base_options, chunk, input_range, n, noise, seed, sigma"
    with pytest.raises(
        TypeError,
        match=re.escape(
            f"unknown option 'sharpness' for method 'smoothgrad'; expected some of its own "
            f"({own}) or of its base 'gradient' (none)"
        )
        + "$",
    ):
        bs.explain(net, x, "smoothgrad", 0, n=2, seed=0, sharpness=2.0)
    with pytest.raises(
        TypeError,
        match=r"^unknown option 'method' for method 'smoothgrad'; .* of its base "
        r"'captum:IntegratedGradients' \(.*\) \(Captum's option method is written rule\)$",
    ):
        base = {"base": "captum:IntegratedGradients", "base_options": {"method": "riemann_left"}}
        bs.explain(net, x, "smoothgrad", 0, n=2, seed=0, **base)


def test_a_method_that_smooths_no_base_refuses_the_option_base(net, x):
    # base is an option of smoothgrad and beta_smooth only: given to gradient it is
    # an unknown option named before any work, not passed on to the method.
    with pytest.raises(
        bs.InputTypeError,
        match=r"^unknown option 'base' for method 'gradient', which takes no options$",
    ):
        bs.explain(net, x, "gradient", 0, base="lrp")
    with pytest.raises(
        bs.InputTypeError, match=r"^unknown option 'base' for method 'integrated_gradients';"
    ):
        bs.explain(net, x, "integrated_gradients", 0, base="lrp")


def test_check_model_refuses_an_option_the_method_does_not_take(net):
    # check_model checks the options as explain does, before the structural
    # check: a run fails at its start on a typo, not after its other methods.
    from betasmooth.explain import check_model

    with pytest.raises(
        bs.InputTypeError,
        match=r"^unknown option 'stepz' for method 'integrated_gradients'; expected some of: ",
    ):
        check_model(net, "integrated_gradients", stepz=8)


def test_check_model_checks_in_evaluation_mode_and_gives_the_mode_back():
    # A structural check sees the model as explain runs it (a trace fixes
    # self.training: a Dropout in training mode is another graph).
    from betasmooth.explain import CHECKS, METHODS, check_model, register, register_check

    seen = []
    register("mode_seeing")(lambda model, x, target, *, create_graph=False: x)
    register_check("mode_seeing")(lambda model: seen.append(model.training))
    net = plain_cnn().train()
    try:
        check_model(net, "mode_seeing")
    finally:
        del METHODS["mode_seeing"], CHECKS["mode_seeing"]
    assert seen == [False] and net.training
