"""Captum methods by name, under beta-smoothing, against Captum on a hand-built softplus copy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import DeepLift, GradientShap, IntegratedGradients, LayerGradCam, Occlusion
from torch import nn

import betasmooth as bs
from nets import TARGET, ResidualNet, plain_cnn, residual_net

# Above beta x = 40 float64 softplus is x to the last bit, as in bs.softplus.
THRESHOLD = 40.0


class SoftplusResidualNet(ResidualNet):
    """ResidualNet with its functional ReLUs written as F.softplus(beta)."""

    def __init__(self, net: ResidualNet, beta: float) -> None:
        super().__init__()
        self.load_state_dict(net.state_dict())
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def act(t):
            return F.softplus(t, self.beta, THRESHOLD)

        a = act(self.bn1(self.conv1(x)))
        b = act(self.bn2(self.conv2(a)))
        return self.head(act(self.pool(a + b)))


def softplus_copy(net: nn.Module, beta: float) -> nn.Module:
    if isinstance(net, ResidualNet):
        return SoftplusResidualNet(net, beta).double().eval()
    twin = copy.deepcopy(net)
    for i, m in enumerate(twin):
        if isinstance(m, nn.ReLU):
            twin[i] = nn.Softplus(beta, THRESHOLD)
    return twin.eval()


NETS = {"plain_cnn": (plain_cnn, "3"), "residual_net": (residual_net, "conv2")}


def _case(name, layer, x):
    """(Captum class, constructor args after the model, attribute options) per method."""
    baselines = torch.rand(
        3, *x.shape[1:], dtype=x.dtype, generator=torch.Generator().manual_seed(1)
    )
    return {
        "DeepLift": (DeepLift, {}, {"baselines": 0.1}),
        "GradientShap": (GradientShap, {}, {"baselines": baselines, "n_samples": 4}),
        "Occlusion": (Occlusion, {}, {"sliding_window_shapes": (1, 4, 4), "strides": 2}),
        "LayerGradCam": (LayerGradCam, {"layer": layer}, {}),
        "IntegratedGradients": (IntegratedGradients, {}, {"n_steps": 8}),
    }[name]


def _seed():
    # GradientShap draws baselines and alphas from numpy, its noise from torch.
    torch.manual_seed(7)
    np.random.seed(7)


def _captum(cls, model, layer, options, x, target):
    args = (model.get_submodule(layer),) if layer else ()
    _seed()
    return cls(model, *args).attribute(x, target=target, **options)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", sorted(NETS))
@pytest.mark.parametrize(
    "name", ["DeepLift", "GradientShap", "Occlusion", "LayerGradCam", "IntegratedGradients"]
)
@pytest.mark.parametrize("beta", [0.5, 3.0])
def test_beta_smooth_captum_equals_captum_on_softplus_copy(arch, name, beta, x):
    factory, layer_name = NETS[arch]
    net = factory().double()
    cls, ctor, options = _case(name, layer_name, x)
    _seed()
    ours = bs.explain(net, x, "beta_smooth", TARGET, beta=beta, base=f"captum:{name}",
                      **ctor, **options)  # fmt: skip
    twin = softplus_copy(net, beta)
    theirs = _captum(cls, twin, ctor.get("layer"), options, x, TARGET)
    assert ours.shape == theirs.shape
    # bs.explain answers in x's dtype; Captum's Occlusion accumulates in float32.
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-10, atol=1e-10)
    # The smoothed map differs from the unsmoothed one: the model was really smoothed.
    plain = _captum(cls, net, ctor.get("layer"), options, x, TARGET)
    assert (ours - plain).abs().max() > 1e-4


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_captum_method_passes_options_and_defaults_target_to_prediction(x):
    net = plain_cnn().double()
    ours = bs.explain(net, x, "captum:DeepLift", baselines=0.2, multiply_by_inputs=False)
    theirs = DeepLift(net, multiply_by_inputs=False).attribute(
        x, target=net(x).argmax(1), baselines=0.2
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    layer = bs.explain(net, x, "captum:LayerGradCam", TARGET, layer=net[3])
    theirs = LayerGradCam(net, net[3]).attribute(x, target=TARGET)
    torch.testing.assert_close(layer, theirs, rtol=1e-12, atol=1e-12)
    # A Sequential's layer by its index, as the command line's --option layer=3 gives it.
    by_index = bs.explain(net, x, "captum:LayerGradCam", TARGET, layer=3)
    torch.testing.assert_close(by_index, theirs, rtol=1e-12, atol=1e-12)


def test_captums_method_option_is_given_as_rule(x):
    # explain's third argument is the explanation method, so Captum's quadrature
    # option ``method`` is named ``rule``, as for the built-in integrated_gradients.
    net = plain_cnn().double()
    ours = bs.explain(net, x, "captum:IntegratedGradients", TARGET, n_steps=7, rule="gausslegendre")
    theirs = IntegratedGradients(net).attribute(x, target=TARGET, n_steps=7, method="gausslegendre")
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    native = bs.explain(net, x, "integrated_gradients", TARGET, steps=7, rule="riemann_trapezoid")
    theirs = IntegratedGradients(net).attribute(
        x, target=TARGET, n_steps=7, method="riemann_trapezoid"
    )
    torch.testing.assert_close(native, theirs, rtol=1e-6, atol=1e-9)
    through = bs.explain(
        net,
        x,
        "beta_smooth",
        TARGET,
        beta=1e6,
        base="captum:IntegratedGradients",
        base_options={"n_steps": 7, "rule": "gausslegendre"},
    )
    torch.testing.assert_close(through, ours, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "options", "error", "fragments"),
    [
        ("captum:Saliencey", {}, ValueError, ["unknown Captum method 'Saliencey'", "captum.attr"]),
        ("captum:NoiseTunnel", {}, ValueError, ["not from a model", "smoothgrad"]),
        ("captum:LayerGradCam", {}, TypeError, ["needs the option layer", "'features.28'"]),
        ("captum:LayerGradCam", {"layer": "conv9"}, ValueError,
         ["no submodule 'conv9'", "named_modules"]),
        ("captum:Saliency", {"layer": "0"}, ValueError, ["captum:Saliency has no layer"]),
        ("captum:LayerGradCam", {"layer": True}, TypeError, ["needs the option layer", "got bool"]),
        # A neuron-wise method: its attribute takes no target, named before any work.
        ("captum:LayerActivation", {"layer": "0"}, ValueError,
         ["captum:LayerActivation.attribute takes no target", "class-wise"]),
        ("captum:Saliency", {"create_graph": True}, ValueError, ["not differentiable"]),
        ("sal:Saliency", {}, ValueError, ["unknown method 'sal:Saliency'", "captum:NAME"]),
        # Captum's own refusals by TypeError and AttributeError were raw tracebacks.
        ("captum:LRP", {}, ValueError,
         ["captum:LRP failed on this model: Module of type", "Flatten", "has no rule"]),
        ("captum:KernelShap", {"feature_mask": (1, 2), "n_samples": 4}, ValueError,
         ["captum:KernelShap failed on this model: 'int' object has no attribute 'numel'"]),
        # Its attribute(**kwargs) ignores what lands there: a misspelt option vanished.
        ("captum:FeatureAblation", {"feature_maks": None}, ValueError,
         ["unknown option 'feature_maks'", "feature_mask, layer, perturbations_per_eval"]),
        ("captum:FeaturePermutation", {"perturbation_per_eval": 4}, ValueError,
         ["unknown option 'perturbation_per_eval'", "perturbations_per_eval"]),
        # A class of captum.attr without attribute (an abstract base) is no method.
        ("captum:GradientAttribution", {}, ValueError,
         ["unknown Captum method 'GradientAttribution'", "captum:DeepLift"]),
        # The first eight names of the model's submodules, as a start to choose from.
        ("captum:LayerGradCam", {"layer": "conv9"}, ValueError,
         ["expected a name from model.named_modules(), e.g. 0, 1, 2, 3, 4, 5, 6, 7"]),
    ],
)  # fmt: skip
def test_bad_captum_method(x, method, options, error, fragments):
    with pytest.raises(error) as info:
        bs.explain(plain_cnn().double(), x, method, TARGET, **options)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_check_model_names_a_layer_method_without_its_layer():
    # Found only at the first map, after the command line had written its run directory.
    from betasmooth.explain import check_model

    net = plain_cnn()
    with pytest.raises(bs.InputError, match=r"^captum:LayerGradCam needs the option layer, a sub"):
        check_model(net, "captum:LayerGradCam")
    check_model(net, "captum:LayerGradCam", layer=next(n for n, _ in net.named_modules() if n))


def test_command_line_tries_a_captum_method_before_writing(tmp_path, capsys):
    from betasmooth.cli import main

    out = tmp_path / "run"
    argv = ["explain", "--model", "digits-cnn", "--data", "digits", "-n", "2"]
    assert main([*argv, "--method", "gradient,captum:LRP", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "betasmooth: error: captum:LRP failed on this model: Module of type <class "
        "'torch.nn.modules.flatten.Flatten'> has no rule defined and nodefault rule exists for "
        "this module type. Please, set a ruleexplicitly for this module and assure that it is "
        "appropriatefor this type of layer."
    ]
    assert not out.exists()


def test_missing_captum_names_the_extra(x, monkeypatch):
    import sys

    from betasmooth.explain.captum import captum_method

    captum_method.cache_clear()
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ValueError, match=r"pip install 'betasmooth\[captum\]'"):
        bs.explain(plain_cnn().double(), x, "captum:Saliency", TARGET)
    captum_method.cache_clear()


@pytest.mark.parametrize("wrapper", ["beta_smooth", "smoothgrad"])
def test_check_model_passes_a_wrappers_options_on_to_its_captum_base(wrapper):
    # As the call does: options that are not the smoothing's own go to the base.
    from betasmooth.explain import check_model

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    check_model(net, wrapper, base="captum:Occlusion", sliding_window_shapes=(1, 1, 1))
    with pytest.raises(bs.InputError, match=r"captum:Occlusion needs the option sliding_window"):
        check_model(net, wrapper, base="captum:Occlusion")


class _OutOfMemoryInCaptum(nn.Module):
    """plain_cnn that runs out of memory on the input Captum differentiates."""

    def __init__(self) -> None:
        super().__init__()
        self.net = plain_cnn().double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_out_of_memory_inside_captum_is_not_called_a_failure_of_the_model(x):
    # The runs halve the batch on out of memory: it must stay itself, not become
    # "captum:NAME failed on this model".
    with pytest.raises(RuntimeError, match="out of memory") as info:
        bs.explain(_OutOfMemoryInCaptum(), x, "captum:Saliency", TARGET)
    assert "failed on this model" not in str(info.value)


def test_options_for_the_keyword_arguments_of_a_captum_attribute_reach_it():
    # LimeBase.attribute takes **kwargs and hands them to its perturbation and
    # transform functions: feature_mask, baselines and num_interp_features are no
    # option betasmooth knows by name, and must reach Captum, not be refused.
    from captum._utils.models.linear_model import SkLearnLinearRegression
    from captum.attr import LimeBase
    from captum.attr._core.lime import (
        default_from_interp_rep_transform,
        default_perturb_func,
        get_exp_kernel_similarity_function,
    )

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double().eval()
    x = torch.rand(1, 1, 2, 2, dtype=torch.float64)
    built = {
        "interpretable_model": SkLearnLinearRegression(),
        "similarity_func": get_exp_kernel_similarity_function(),
        "perturb_func": default_perturb_func,
        "perturb_interpretable_space": True,
        "from_interp_rep_transform": default_from_interp_rep_transform,
        "to_interp_rep_transform": None,
    }
    passed = {"feature_mask": torch.arange(4).view(1, 1, 2, 2), "baselines": 0.0}
    passed["num_interp_features"] = 4
    torch.manual_seed(1)
    ours = bs.explain(net, x, "captum:LimeBase", 2, n_samples=40, **built, **passed)
    torch.manual_seed(1)
    expected = LimeBase(net, **built).attribute(x, target=2, n_samples=40, **passed)
    torch.testing.assert_close(ours, expected.to(ours.dtype), rtol=1e-5, atol=1e-6)
    # A linear model with the features switched off to 0: Lime's linear fit is w * x exactly.
    w = net[1].weight[2].detach()
    torch.testing.assert_close(ours.flatten(), w * x.flatten(), rtol=1e-4, atol=1e-5)


def test_a_float64_baseline_of_a_float32_model_is_taken_in_the_models_dtype():
    # A baseline array made by numpy is float64: it is cast to x's dtype, and the
    # map equals Captum's own with the float32 baseline.
    net = plain_cnn(seed=1)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    base = torch.full((1, 1, 16, 16), 0.25, dtype=torch.float64)
    ours = bs.explain(net, x, "captum:IntegratedGradients", baselines=base)
    theirs = IntegratedGradients(net).attribute(x, target=net(x).argmax(1), baselines=base.float())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.detach())


def test_a_baseline_in_captums_tuple_form_is_the_same_baseline():
    # Captum's (baseline,) for a model of one input, one colour per channel too.
    net = plain_cnn(seed=1)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    target = net(x).argmax(1)
    for base in (
        torch.rand(x.shape, generator=torch.Generator().manual_seed(1)),
        torch.tensor(0.25),
    ):
        ours = bs.explain(net, x, "captum:IntegratedGradients", baselines=(base,))
        theirs = IntegratedGradients(net).attribute(x, target=target, baselines=base.expand_as(x))
        torch.testing.assert_close(ours, theirs.detach())


def test_return_convergence_delta_is_one_line() -> None:
    model = plain_cnn()
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(bs.InputError, match="return_convergence_delta=True is not supported"):
        bs.explain(model, x, "captum:IntegratedGradients", n_steps=4, return_convergence_delta=True)
    # False is Captum's default and keeps working: Captum's own map.
    ours = bs.explain(
        model, x, "captum:IntegratedGradients", TARGET, n_steps=4, return_convergence_delta=False
    )
    theirs = IntegratedGradients(model).attribute(x, target=TARGET, n_steps=4)
    torch.testing.assert_close(ours, theirs)


def test_a_baseline_of_one_colour_per_channel_is_captums_own_in_the_item_shape():
    # (C, 1, 1) is one colour per channel; GradientShap draws from baselines of
    # the item shape (C, H, W) only, so explain gives it them so.
    net = plain_cnn(channels=3).double()
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2])
    colour = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    full = colour[None, :, None, None].expand(1, 3, 16, 16)
    _seed()
    theirs = GradientShap(net).attribute(x, target=target, baselines=full, n_samples=4)
    for given in (colour[:, None, None], colour[None, :, None, None]):
        _seed()
        ours = bs.explain(net, x, "captum:GradientShap", target, baselines=given, n_samples=4)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_a_baseline_given_as_a_0d_tensor_is_that_number_for_every_pixel():
    # Captum itself fails on a 0-d tensor (IndexError, a raw traceback before).
    net = plain_cnn().double()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2])
    zero_d = torch.tensor(0.25)
    ours = bs.explain(net, x, "captum:IntegratedGradients", target, baselines=zero_d)
    theirs = IntegratedGradients(net).attribute(x, target=target, baselines=0.25)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["DeepLift", "GuidedBackprop"])
def test_captums_notice_of_its_hooks_is_not_passed_on(name, x):
    # Captum announces at every call that it hooks the activations; run by a command
    # (its probe, then every batch) the notice came twice, in three ragged lines.
    # The maps stay Captum's own, which the notice still accompanies there.
    import warnings

    from captum import attr

    net = plain_cnn(seed=1).double()
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        expected = getattr(attr, name)(net).attribute(x.clone().requires_grad_(True), target=TARGET)
    assert any("hooks" in str(w.message) for w in theirs)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        found = bs.explain(net, x, f"captum:{name}", TARGET)
    assert not [str(w.message) for w in ours if "hooks" in str(w.message)]
    torch.testing.assert_close(found, expected.detach(), rtol=0, atol=0)


def test_calls_that_overlap_in_two_threads_give_the_warning_display_back():
    # Call A enters, call B enters, A leaves, B leaves (two models in two threads):
    # each put back the display it had found, so B restored A's filter for good and
    # every later hook notice of the process was dropped.
    import warnings

    from betasmooth.explain.captum import _without_hook_notice

    original = warnings.showwarning
    first, second = _without_hook_notice(), _without_hook_notice()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert warnings.showwarning is not original  # B still runs: the notice stays dropped
    second.__exit__(None, None, None)
    assert warnings.showwarning is original


class _Warns(nn.Module):
    """A network whose forward warns, as a model file's library may."""

    def __init__(self) -> None:
        super().__init__()
        self.net = plain_cnn(seed=1).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import warnings

        warnings.warn("the model's own notice", UserWarning, stacklevel=1)
        return self.net(x)


def test_the_models_own_warning_is_still_shown_once_over_many_calls(x):
    # Dropping Captum's notice inside warnings.catch_warnings reset Python's record of
    # the warnings already shown: under the default filter a model's own warning came
    # again at every call (every batch of a run), where plain gradients show it once.
    import warnings

    net = _Warns()
    for method in ("gradient", "captum:Saliency", "captum:DeepLift"):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            for _ in range(3):
                bs.explain(net, x, method, TARGET)
        own = [w for w in seen if "model's own notice" in str(w.message)]
        assert len(own) == 1, method
        assert not [w for w in seen if "hooks" in str(w.message)]


def test_the_warning_display_is_given_back_after_each_call(x):
    # Replaced for each Captum call only: left in place, every batch wrapped it once more
    # (a chain as deep as the batches run), and Captum's notices stayed dropped for the
    # user's own Captum calls after betasmooth's.
    import warnings

    net = plain_cnn(seed=1).double()
    before = warnings.showwarning
    for _ in range(2):
        bs.explain(net, x, "captum:DeepLift", TARGET)
    assert warnings.showwarning is before


class _Raises(nn.Module):
    """A network whose forward under Captum (its input requiring grad) raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.net = plain_cnn().double()
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            raise self.error
        return self.net(x)


_LONG = "x" * 300


@pytest.mark.parametrize(
    ("error", "said"),
    [
        # The first line only: the rest of Captum's messages is a stack or a hint.
        (RuntimeError("the first line\nthe second line"), "the first line"),
        # Captum prints whole tensors into some messages: the tensor is elided.
        (RuntimeError(f"got {torch.arange(3)} here"), "got tensor(...)"),
        # A longer first line is cut at 240 characters.
        (ValueError(_LONG), "x" * 240 + " ..."),
        (AssertionError(), "AssertionError"),
    ],
)
def test_a_failure_inside_captum_is_said_in_one_short_line(x, error, said):
    with pytest.raises(bs.InputError) as info:
        bs.explain(_Raises(error), x, "captum:Saliency", TARGET)
    assert str(info.value) == f"captum:Saliency failed on this model: {said}"


def test_out_of_memory_of_the_cpu_inside_captum_stays_out_of_memory(x):
    # The CPU's allocator says "can't allocate memory", not "out of memory"; taken
    # for a failure of the model, the runs did not halve the batch and retry.
    from betasmooth.validate import is_oom

    class Allocates(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = plain_cnn().double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.requires_grad:
                torch.empty(2**62, dtype=torch.uint8)
            return self.net(x)

    with pytest.raises(RuntimeError) as info:
        bs.explain(Allocates(), x, "captum:Saliency", TARGET)
    assert is_oom(info.value)
    assert "failed on this model" not in str(info.value)


def test_a_0d_baseline_of_gradient_shap_is_one_item_of_that_number():
    # GradientShap draws from its baselines: the number is one baseline of the item
    # shape, as Captum's own (1, C, H, W), which gives its draws the same random numbers.
    net = plain_cnn().double()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2])
    full = torch.full((1, 1, 16, 16), 0.25, dtype=torch.float64)
    _seed()
    theirs = GradientShap(net).attribute(x, target=target, baselines=full, n_samples=4)
    _seed()
    ours = bs.explain(
        net, x, "captum:GradientShap", target, baselines=torch.tensor(0.25), n_samples=4
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_a_layer_map_comes_back_without_its_graph(x):
    # LayerGradCam multiplies the layer's activations, which hold the forward's graph:
    # returned so, the map kept the whole graph of the batch alive.
    net = plain_cnn().double()
    ours = bs.explain(net, x, "captum:LayerGradCam", TARGET, layer="0")
    assert not ours.requires_grad and ours.grad_fn is None
    theirs = LayerGradCam(net, net[0]).attribute(x, target=TARGET)
    torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["Saliency", "IntegratedGradients", "InputXGradient"])
def test_a_gradient_method_of_captum_warns_nothing_of_its_input(x, name):
    # Captum warns "Input Tensor 0 did not already require gradients" where the
    # input does not: at every batch of a run, about nothing the user did.
    import warnings

    from captum import attr

    net = plain_cnn(seed=1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = bs.explain(net, x, f"captum:{name}", TARGET)
    theirs = getattr(attr, name)(net).attribute(x.clone().requires_grad_(True), target=TARGET)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-12)


def test_the_shap_methods_baselines_are_a_set_and_the_others_one_per_image():
    """GradientShap and DeepLiftShap draw from their baselines for every image: a batch
    of them is never cut to the images explained; IntegratedGradients' are per image."""
    from betasmooth.explain import select_items

    shape = (3, 1, 4, 4)
    rows = torch.arange(3.0).view(3, 1, 1, 1)
    for name in ("GradientShap", "DeepLiftShap"):
        kept = select_items(f"captum:{name}", {"baselines": rows}, [2], shape)
        assert torch.equal(kept["baselines"], rows)
    cut = select_items("captum:IntegratedGradients", {"baselines": rows}, [2], shape)
    assert cut["baselines"].flatten().tolist() == [2.0]


def test_betasmooths_own_error_inside_captums_call_is_passed_on_as_it_is():
    """An InputError raised inside the forward that Captum runs (a smoothing's override
    says what is wrong) is not rewrapped as a failure of Captum on the model."""

    class Refuses(nn.Module):
        def forward(self, x):
            if x.requires_grad:  # Captum's call; explain's own check of x runs without
                raise bs.InputError("the override refuses this x")
            return x.flatten(1)[:, :2]

    with pytest.raises(bs.InputError, match=r"^the override refuses this x$"):
        bs.explain(Refuses(), torch.rand(2, 1, 2, 2), "captum:Saliency", 0)


class _WithRequiredRule:
    """A Captum-like class whose ``attribute`` takes ``*args``, and requires its target
    and its quadrature ``method``: ``inputs * scale + shift``, to see the options arrive."""

    def __init__(self, forward_func, scale=1.0):
        self.scale = scale

    def attribute(self, inputs, target, *more, method, shift=0.0):
        assert method == "riemann_left" and more == ()
        return inputs * self.scale + shift


class _WithConstructorKwargs:
    """A Captum-like class whose constructor takes ``**kwargs``: only Captum knows them."""

    def __init__(self, forward_func, **kwargs):
        pass

    def attribute(self, inputs, target=None):
        return inputs


def test_a_classs_own_options_are_its_signatures_without_what_explain_fills(monkeypatch):
    """The accepted options are the constructor's and ``attribute``'s names, ``method`` as
    ``rule``, less the model, ``target`` and ``*args``; the required ones are those without
    a default, less ``target`` (explain gives it) and ``*args`` (it takes nothing). A
    constructor's ``**kwargs`` leaves the options to Captum (``None``)."""
    import captum.attr

    from betasmooth.explain.captum import captum_method

    monkeypatch.setattr(captum.attr, "BsTestRequiredRule", _WithRequiredRule, raising=False)
    monkeypatch.setattr(
        captum.attr, "BsTestConstructorKwargs", _WithConstructorKwargs, raising=False
    )
    captum_method.cache_clear()
    try:
        method = captum_method("BsTestRequiredRule")
        assert method.accepted_options == {"scale", "shift", "rule", "layer"}
        net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).double()
        x = torch.rand(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with pytest.raises(bs.InputError, match=r"needs the option rule \(Captum requires it\)"):
            bs.explain(net, x, "captum:BsTestRequiredRule", 1)
        got = bs.explain(
            net, x, "captum:BsTestRequiredRule", 1, rule="riemann_left", scale=2.0, shift=0.5
        )
        torch.testing.assert_close(got, 2.0 * x + 0.5, rtol=0, atol=0)
        assert captum_method("BsTestConstructorKwargs").accepted_options is None
    finally:
        captum_method.cache_clear()


def test_a_name_of_captum_attr_that_is_no_class_is_an_unknown_method(monkeypatch, x):
    """An object with an ``attribute`` that is no class (an instance, here) cannot be
    built on the model: named as an unknown method, as a name Captum lacks is."""
    import types

    import captum.attr

    from betasmooth.explain.captum import captum_method

    instance = types.SimpleNamespace(attribute=lambda inputs, target=None: inputs)
    monkeypatch.setattr(captum.attr, "BsTestInstance", instance, raising=False)
    captum_method.cache_clear()
    try:
        with pytest.raises(bs.InputError, match=r"unknown Captum method 'BsTestInstance'"):
            bs.explain(plain_cnn().double(), x, "captum:BsTestInstance", TARGET)
    finally:
        captum_method.cache_clear()


def test_a_captum_method_called_itself_names_a_missing_required_option(x):
    """Called without explain (as a wrapper calls its base), the method still checks
    first: the option named, not Captum's TypeError passed on as the model's failure."""
    from betasmooth.explain.captum import captum_method

    with pytest.raises(bs.InputError, match="captum:Occlusion needs the option sliding_window"):
        captum_method("Occlusion")(plain_cnn().double(), x, TARGET)


def test_a_baseline_tuple_of_two_is_not_cut_to_its_first(x):
    """Captum's one-element tuple is one baseline; a tuple of two is for a model of two
    inputs, which Captum refuses, not a baseline whose second half is silently dropped."""
    net = plain_cnn().double()
    with pytest.raises(bs.InputError, match="captum:DeepLift failed on this model"):
        bs.explain(net, x, "captum:DeepLift", TARGET, baselines=(0.1, 0.2))


class _WarnsOfHooks(nn.Module):
    """A model whose own forward warns, in a RuntimeWarning, words like Captum's notice."""

    def __init__(self) -> None:
        super().__init__()
        self.net = plain_cnn().double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import warnings

        warnings.warn(
            "Setting backward hooks of the model's own failed", RuntimeWarning, stacklevel=2
        )
        return self.net(x)


def test_only_captums_user_warning_of_hooks_is_dropped(x):
    """Captum's notice is a UserWarning; a warning of another category that starts with
    the same words is the model's own and is shown."""
    import warnings

    from betasmooth.explain.captum import captum_method

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        # The method itself, not explain: its one forward is Captum's, under the filter.
        captum_method("Saliency")(_WarnsOfHooks(), x, TARGET)
    own = [str(w.message) for w in seen if w.category is RuntimeWarning]
    assert len(own) == 1 and "model's own failed" in own[0]


def test_a_captum_method_with_baselines_starts_from_the_datas_low_end():
    """On data in ``[low, high]`` a Captum method whose ``attribute`` takes baselines gets
    ``low`` (the black image) as its baseline, as the built-in integrated gradients."""
    from betasmooth.explain import range_options

    low = torch.tensor([-2.0]).view(1, 1, 1, 1)
    got = range_options(low, 2.0, ["captum:IntegratedGradients"])["captum:IntegratedGradients"]
    assert set(got) == {"baselines"} and torch.equal(got["baselines"], low)


@pytest.mark.parametrize(
    ("name", "options"),
    [("IntegratedGradients", {"n_steps": 2}), ("Occlusion", {"sliding_window_shapes": (1, 4, 4)})],
)
def test_baselines_of_another_image_size_are_named_with_the_form_expected(x, name, options):
    """A ``baselines`` tensor of another image size is refused by naming it and its shape.

    Captum's own message ("The size of tensor a (16) must match the size of tensor b
    (8) at non-singleton dimension 3"), passed on as "failed on this model", names
    neither the option nor the shapes it takes, while the built-in
    ``integrated_gradients`` says both for its ``baseline``.
    """
    net = plain_cnn().double()
    wrong = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(bs.InputError) as info:
        bs.explain(net, x, f"captum:{name}", TARGET, baselines=wrong, **options)
    message = str(info.value)
    assert "\n" not in message
    assert "baselines" in message
    assert str(tuple(wrong.shape)) in message
    assert "expected" in message


class _WarnsOfHooksMidText(nn.Module):
    """A model whose forward warns a UserWarning with Captum's words after its own."""

    def __init__(self) -> None:
        super().__init__()
        self.net = plain_cnn().double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import warnings

        warnings.warn("model: Setting backward hooks failed", UserWarning, stacklevel=2)
        return self.net(x)


def test_a_user_warning_that_only_contains_captums_words_is_shown(x):
    """Captum's notice starts with its words; a model's own UserWarning that has them
    later in its text is not Captum's notice and is shown."""
    import warnings

    from betasmooth.explain.captum import captum_method

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        captum_method("Saliency")(_WarnsOfHooksMidText(), x, TARGET)
    own = [str(w.message) for w in seen if w.category is UserWarning]
    assert own == ["model: Setting backward hooks failed"]


def test_the_display_in_place_during_a_call_passes_file_and_line_on():
    """``warnings.showwarning(message, category, filename, lineno, file, line)``: called so
    while a Captum call runs, a warning that is no hook notice reaches the display found
    before with all six arguments, ``file`` (where to write) and ``line`` included."""
    import warnings

    from betasmooth.explain.captum import _without_hook_notice

    got = []

    def display(message, category, filename, lineno, file=None, line=None):
        got.append((str(message), category, filename, lineno, file, line))

    sink = object()
    with warnings.catch_warnings():
        warnings.showwarning = display
        with _without_hook_notice():
            warnings.showwarning("a note", UserWarning, "f.py", 3, sink, "src = 1")
            warnings.showwarning("Setting backward hooks on ReLU", UserWarning, "c.py", 1)
    assert got == [("a note", UserWarning, "f.py", 3, sink, "src = 1")]


def test_a_call_that_fails_inside_captum_gives_the_warning_display_back(x):
    """A Captum failure leaves the call by an exception: the display is put back all
    the same, and the next call still drops Captum's notice (the count of calls in
    is back to zero), or every later notice of the process went wrong."""
    import warnings

    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *args, **kwargs: seen.append(str(message))
        before = warnings.showwarning
        with pytest.raises(bs.InputError, match="failed on this model"):
            bs.explain(_Raises(RuntimeError("boom")), x, "captum:Saliency", TARGET)
        assert warnings.showwarning is before
        bs.explain(plain_cnn().double(), x, "captum:DeepLift", TARGET)
        assert warnings.showwarning is before
    assert not [text for text in seen if "hooks" in text]


@pytest.mark.parametrize(
    ("error", "said"),
    [
        # 240 characters are kept whole, the 241st is cut: the limit itself is no cut.
        (RuntimeError("y" * 240), "y" * 240),
        (RuntimeError("y" * 241), "y" * 240 + " ..."),
        # Cut at a space: the space goes, one space before the dots.
        (RuntimeError("y" * 239 + " " + "z" * 9), "y" * 239 + " ..."),
        # A message that starts with a line break: its first line is the first with text.
        (RuntimeError("\n  the text after a break\nmore"), "the text after a break"),
    ],
)
def test_a_failure_inside_captum_is_cut_after_240_characters_only(x, error, said):
    with pytest.raises(bs.InputError) as info:
        bs.explain(_Raises(error), x, "captum:Saliency", TARGET)
    assert str(info.value) == f"captum:Saliency failed on this model: {said}"


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 1, 1, 1, 1)])
def test_baselines_that_do_not_broadcast_are_named_as_given(shape):
    """The message names the shape the user gave, not the one explain made of it, and
    the per-channel form of x's rank, (1, 3, 1, 1); one number in more dimensions than
    x has is no number of a 0-d tensor, and is refused so too."""
    net = plain_cnn(channels=3).double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(bs.InputError) as info:
        bs.explain(net, x, "captum:IntegratedGradients", 0, baselines=torch.zeros(shape))
    assert str(info.value) == (
        f"captum:IntegratedGradients: baselines of shape {shape} do not broadcast to x of "
        "shape (2, 3, 16, 16); expected a number, one colour per channel (1, 3, 1, 1), one "
        "baseline (3, 16, 16) or one per image (2, 3, 16, 16)"
    )


def test_a_baseline_image_without_its_channel_is_one_baseline():
    """A one-channel baseline given as (H, W) is one baseline, Captum's (1, 1, H, W); its
    rows are not taken for H baselines."""
    net = plain_cnn().double()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64, generator=gen)
    image = torch.rand(16, 16, dtype=torch.float64, generator=gen)
    target = torch.tensor([0, 1, 2])
    ours = bs.explain(net, x, "captum:IntegratedGradients", target, baselines=image, n_steps=8)
    theirs = IntegratedGradients(net).attribute(
        x, target=target, baselines=image[None, None], n_steps=8
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_a_list_of_one_baseline_is_refused_as_captum_refuses_it(x):
    """Captum's form for a model's inputs is a tuple; it refuses a list of baselines, and
    explain passes that refusal on rather than taking the list for a tuple."""
    net = plain_cnn().double()
    base = torch.full((1, 1, 16, 16), 0.3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="must be either a torch.Tensor or a number"):
        IntegratedGradients(net).attribute(x, target=TARGET, baselines=[base])
    with pytest.raises(bs.InputError, match="must be either a torch.Tensor or a number"):
        bs.explain(net, x, "captum:IntegratedGradients", TARGET, baselines=[base])


class _GradientOfTheOutput:
    """A Captum-like class that differentiates its model in the caller's grad mode, as
    Captum's own classes assume of their caller where they do not enable it."""

    def __init__(self, forward_func):
        self.forward_func = forward_func

    def attribute(self, inputs, target=None):
        out = self.forward_func(inputs)[torch.arange(len(inputs)), target].sum()
        return torch.autograd.grad(out, inputs)[0]


def test_a_captum_method_called_under_no_grad_still_differentiates(monkeypatch):
    """Under ``torch.no_grad()`` (a user's evaluation loop) the method enables gradients
    for Captum's call: a linear model's gradient is its weight row, the closed form."""
    import captum.attr

    from betasmooth.explain.captum import captum_method

    monkeypatch.setattr(captum.attr, "BsTestGradient", _GradientOfTheOutput, raising=False)
    captum_method.cache_clear()
    try:
        net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
        x = torch.rand(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = captum_method("BsTestGradient")(net, x, torch.tensor([2, 0]))
        weight = net[1].weight.detach()
        torch.testing.assert_close(got.flatten(1), weight[[2, 0]], rtol=0, atol=0)
    finally:
        captum_method.cache_clear()


def test_the_layer_shap_methods_baselines_are_a_set_too():
    """LayerGradientShap and LayerDeepLiftShap draw from their baselines as GradientShap
    does (Captum's own docstrings): a batch of them is never cut to the images explained."""
    from betasmooth.explain import select_items

    rows = torch.arange(3.0).view(3, 1, 1, 1)
    for name in ("LayerGradientShap", "LayerDeepLiftShap"):
        kept = select_items(f"captum:{name}", {"baselines": rows}, [2], (3, 1, 4, 4))
        assert torch.equal(kept["baselines"], rows)
