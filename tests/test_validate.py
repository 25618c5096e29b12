"""The input-checking layer: dtype casts, data ranges, model outputs, warnings at the
user's call, integer .npz scaling, the image-count notice and the attack's progress."""

from __future__ import annotations

import copy
import functools
import json
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import betasmooth as bs
from betasmooth.attack import random_targets
from betasmooth.cli import main
from betasmooth.validate import InputError, InputTypeError, OutOfMemory, check_in_range, is_oom
from nets import plain_cnn


def _gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    model(x).gather(1, target[:, None]).sum().backward()
    return x.grad


def test_float64_input_on_float32_model_is_cast_and_comes_back_float64() -> None:
    net, x = plain_cnn(), torch.rand(3, 1, 16, 16, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    h = bs.explain(net, x, "gradient", target)
    assert h.dtype == torch.float64
    torch.testing.assert_close(h, _gradient(net, x.float(), target).double())


def test_float32_input_on_float64_model_is_cast_to_float64() -> None:
    net, x = plain_cnn().double(), torch.rand(3, 1, 16, 16)
    target = torch.tensor([4, 3, 2])
    h = bs.explain(net, x, "gradient", target)
    assert h.dtype == torch.float32
    expected = _gradient(net, x.double(), target)
    torch.testing.assert_close(h, expected.float(), rtol=0, atol=0)


def test_per_channel_range() -> None:
    low = torch.tensor([0.0, -1.0]).view(1, 2, 1, 1)
    high = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    x = torch.stack([torch.full((4, 4), 0.5), torch.full((4, 4), -0.5)])[None]
    assert check_in_range(x, low, high) is x
    with pytest.raises(InputError, match=r"outside data_range \[\(0, -1\), \(1, 0\)\]"):
        check_in_range(x.flip(1), low, high)


def _first_user_warning(record: list[warnings.WarningMessage]) -> warnings.WarningMessage:
    mine = [w for w in record if issubclass(w.category, UserWarning)]
    assert len(mine) == 1, [str(w.message) for w in mine]
    return mine[0]


def test_probabilities_warn_once_per_model_at_the_users_line() -> None:
    net = nn.Sequential(plain_cnn(), nn.Softmax(1)).eval()
    x = torch.rand(2, 1, 16, 16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        h = bs.explain(net, x, "gradient")
        bs.explain(net, x, "gradient")
        bs.explain(net, torch.rand(2, 1, 16, 16), "input_x_gradient")
        # Its smoothed copies are the same model (betasmooth curvature makes one per beta).
        bs.explain(bs.smooth(net, 1.0), x, "gradient")
        bs.explain(bs.smooth(net, 5.0), x, "gradient")
    said = [w for w in record if "seems to return probabilities" in str(w.message)]
    assert len(said) == 1
    w = _first_user_warning(record)
    assert "seems to return probabilities" in str(w.message)
    assert w.filename == __file__
    # The map is still the gradient of what the model returns.
    torch.testing.assert_close(h, _gradient(net, x, net(x).argmax(1)))


def test_one_logit_of_one_is_no_sign_of_probabilities() -> None:
    # A binary classifier's single score can be 1.0: a softmax over one class would be
    # 1 whatever the input, so only two or more columns that sum to 1 look like one.
    from betasmooth.validate import check_logits

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = check_logits(torch.ones(3, 1), 3, nn.Linear(2, 1))
        check_logits(torch.full((3, 2), 0.5), 3, nn.Linear(2, 2))
    assert out.shape == (3, 1)
    said = [str(w.message) for w in record if "seems to return probabilities" in str(w.message)]
    assert len(said) == 1


class SmoothActivations(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.GELU()
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.silu(self.act(self.conv(x))).flatten(1))


@pytest.mark.parametrize(
    ("method", "says"),
    [("guided_backprop", "guided_backprop changed nothing"), ("beta_smooth", "beta-smoothing")],
)
def test_no_relu_network_warns_that_the_method_changes_nothing(method, says) -> None:
    net, x = SmoothActivations().double(), torch.rand(2, 1, 8, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        h = bs.explain(net, x, method)
        bs.explain(net, x, method)
    w = _first_user_warning(record)
    assert str(w.message) == (
        f"SmoothActivations: no ReLU was called in forward (its activations: GELU, silu); "
        f"{says.split(' changed')[0]} changed nothing"
    )
    assert w.filename == __file__
    torch.testing.assert_close(h, _gradient(net, x, net(x).argmax(1)))


def test_attack_warns_nothing_where_no_smoothing_was_asked_for() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Hardshrink(), nn.Flatten(), nn.Linear(4 * 64, 3)
    ).eval()
    x = torch.rand(2, 1, 8, 8)
    target = random_targets(bs.heatmap(bs.explain(net, x, "gradient")))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bs.manipulate(net, x, target, "gradient", steps=3)
    # Hardshrink's gradient has no derivative to steer: the attack only says that it
    # changed no image, nothing of smoothing.
    said = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert said == [
        "gradient: the attack changed no image (no step improved the map and kept the "
        "label); more steps or a smaller lr may move it"
    ]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bs.explain(net, x, "beta_smooth")
    assert sorted(str(w.message) for w in record) == [
        "Sequential: beta-smoothing replaces ReLU and the activations made of it; these "
        "piecewise-linear activations stay non-smooth: Hardshrink",
        "Sequential: no ReLU was called in forward; beta-smoothing changed nothing",
    ]
    assert {w.filename for w in record} == {__file__}


class _Clamped(nn.Module):
    """A ReLU written as a clamp at 0, beside a clamp that is no activation."""

    def __init__(self, spelling) -> None:
        super().__init__()
        self.conv, self.linear, self.spelling = (
            nn.Conv2d(1, 4, 3, padding=1),
            nn.Linear(256, 3),
            spelling,
        )

    def forward(self, x):
        h = self.spelling(self.conv(x)).clamp(-5.0, 5.0)
        return self.linear(torch.relu(h).flatten(1))


@pytest.mark.parametrize(
    "spelling",
    [
        lambda h: h.clamp(min=0),
        lambda h: torch.clamp(h, 0),
        lambda h: h.clamp_min(0.0),
        lambda h: torch.clip(h, min=0),
        lambda h: h.clone().clamp_(0),
        lambda h: h.clamp(min=torch.tensor(0.0)),
        lambda h: torch.clamp_min(h, torch.tensor(0.0)),
        lambda h: h.clamp(min=np.float32(0)),
        lambda h: h.clamp(min=0, max=float("inf")),
    ],
)
def test_beta_smoothing_names_a_relu_written_as_a_clamp(spelling) -> None:
    torch.manual_seed(0)
    net, x = _Clamped(spelling).eval(), torch.rand(2, 1, 8, 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        smoothed_map = bs.explain(net, x, "beta_smooth", beta=2.0)
    assert [str(w.message) for w in record] == [
        "_Clamped: beta-smoothing replaces ReLU and the activations made of it; these "
        "piecewise-linear activations stay non-smooth: clamp(min=0)"
    ]
    # The clamp stays a clamp: only the ReLU after it is smoothed.
    manual = copy.deepcopy(net)
    manual.spelling = spelling
    xg = x.clone().requires_grad_(True)
    h = spelling(manual.conv(xg)).clamp(-5.0, 5.0)
    logits = manual.linear(F.softplus(h, beta=2.0).flatten(1))
    label = net(x).argmax(1)
    (grad,) = torch.autograd.grad(logits.gather(1, label[:, None]).sum(), xg)
    torch.testing.assert_close(smoothed_map, grad, rtol=1e-5, atol=1e-7)


MAXIMUM_WARNING = (
    "_Clamped: beta-smoothing replaces ReLU and the activations made of it; these "
    "piecewise-linear activations stay non-smooth: maximum(x, 0)"
)


@pytest.mark.parametrize(
    ("spelling", "warned"),
    [
        (lambda h: torch.maximum(h, torch.zeros_like(h)), True),
        (lambda h: h.maximum(torch.tensor(0.0)), True),
        (lambda h: torch.fmax(torch.zeros_like(h), h), True),
        (lambda h: torch.max(h, torch.zeros(1)), True),
        (lambda h: torch.maximum(input=h, other=torch.zeros_like(h)), True),
        (lambda h: torch.maximum(h, torch.tensor(0)), True),  # an integer zero
        (lambda h: torch.maximum(h, torch.ones_like(h)), False),
        (lambda h: h + h.max() * 0, False),
        (lambda h: h + torch.max(h, 1, keepdim=True)[0] * 0, False),
        # Indices and masks: integer and bool maxima and clamps are no activations.
        (lambda h: h[:, torch.maximum(torch.arange(4), torch.zeros(4, dtype=torch.long))], False),
        (lambda h: h * torch.maximum(h > 0.5, torch.zeros_like(h, dtype=torch.bool)), False),
        (lambda h: h[:, torch.arange(4).clamp(min=0)], False),
    ],
)
def test_beta_smoothing_names_a_relu_written_as_a_maximum_with_zero(spelling, warned) -> None:
    torch.manual_seed(0)
    net, x = _Clamped(spelling).eval(), torch.rand(2, 1, 8, 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bs.explain(net, x, "beta_smooth", beta=2.0)
    # maximum(h, 1) is 1 wherever h < 1, so that map is zero, and said to be: here only
    # the activations' warning is looked at.
    said = [str(w.message) for w in record if "zero everywhere" not in str(w.message)]
    assert said == ([MAXIMUM_WARNING] if warned else [])


def test_beta_smoothing_is_silent_about_clamps_that_are_no_relu() -> None:
    torch.manual_seed(0)
    net, x = _Clamped(lambda h: torch.relu(h).clamp(0, 1)).eval(), torch.rand(2, 1, 8, 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        bs.explain(net, x, "beta_smooth", beta=2.0)
    assert [str(w.message) for w in record] == []


@pytest.mark.parametrize(
    ("values", "dtype", "scale"),
    [
        ([0, 100, 65535], np.uint16, 65535),
        ([0, 7, 200], np.uint16, 65535),
        ([0, 7, 200], np.uint8, 255),
        ([0, 7, 255], np.int64, 255),
        ([0, 7, 1000], np.int64, 65535),
        ([0, 3, 60000], np.int32, 65535),
        ([0, 3, 65535], np.int32, 65535),
    ],
)
def test_integer_npz_scaled_like_images(tmp_path, values, dtype, scale) -> None:
    raw = np.array(values, dtype=dtype).reshape(3, 1, 1, 1).repeat(2, 2).repeat(2, 3)
    np.savez(tmp_path / "x.npz", x=raw)
    x, _ = bs.load_data(str(tmp_path / "x.npz"))
    np.testing.assert_array_equal(x.numpy(), raw.astype(np.float32) / np.float32(scale))


def test_fewer_images_than_asked_are_said_and_recorded(tmp_path, capsys) -> None:
    np.savez(tmp_path / "three.npz", x=np.random.rand(3, 1, 32, 32).astype(np.float32))
    argv = ["explain", "--model", "digits-cnn", "--data", str(tmp_path / "three.npz")]
    argv += ["--method", "gradient", "-n", "100000", "--out", str(tmp_path / "run")]
    assert main([*argv, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "three.npz holds only 3 images; using all 3 (asked for 100000)" in err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["n"] == 3
    assert len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) == 3
    # Without -n nothing was asked for: the notice names the default (explain's is 16).
    assert main([*argv[:-4], "--out", str(tmp_path / "default"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "three.npz holds only 3 images; using all 3 (-n defaults to 16)" in err


@pytest.mark.parametrize(
    ("command", "bad", "message"),
    [
        ("explain", ["--method", "lrp", "--option", "lrp.bogus=1"], "unknown option 'bogus'"),
        ("explain", ["--method", "gradint"], "unknown method 'gradint'"),
        ("attack", ["--method", "lrp", "--k", "5000"], "32x32 map's 1024 pixels"),
        ("curvature", ["--out", "FILE"], "is a file"),
    ],
)
def test_fewer_images_are_said_only_when_the_run_starts(tmp_path, capsys, command, bad, message):
    # Bad input found after the images are read stays one line: the notice that the
    # data hold fewer images than -n waits for the run.
    np.savez(tmp_path / "three.npz", x=np.random.rand(3, 1, 32, 32).astype(np.float32))
    (tmp_path / "FILE").write_text("")
    bad = [str(tmp_path / b) if b == "FILE" else b for b in bad]
    argv = [
        command,
        "--model",
        "digits-cnn",
        "--data",
        str(tmp_path / "three.npz"),
        "--no-progress",
    ]
    argv += ["--out", str(tmp_path / "run"), *bad]
    try:
        status = main(argv)
    except SystemExit as stop:
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "holds only" not in err


def test_attack_progress_shows_steps_and_loss_on_stderr(capsys) -> None:
    net, x = plain_cnn(), torch.rand(2, 1, 16, 16)
    target = random_targets(bs.heatmap(bs.explain(net, x, "gradient")))
    result = bs.manipulate(net, x, target, "gradient", steps=4, check_every=2, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "/4 [" in err and "step/s" in err
    shown = float(err.rsplit("loss=", 1)[1].split("]")[0])
    assert shown == pytest.approx(float(result.history[-1].mean()), rel=1e-3)
    bs.manipulate(net, x, target, "gradient", steps=4, progress=False)
    assert capsys.readouterr().err == ""


def test_registrar_refuses_bad_names_taken_names_and_non_callables():
    from betasmooth.validate import registrar

    table = {}
    registrar(table, "my-method_2", "example")(abs)
    assert table == {"my-method_2": abs}
    for name in ["a,b", "all", "", "2x", 3, "captum:X"]:
        with pytest.raises(InputError, match=r"^example name"):
            registrar(table, name, "example")
    with pytest.raises(InputError, match=r"^example 'my-method_2' is registered already"):
        registrar(table, "my-method_2", "example")(round)
    # The same definition run again (a module reloaded) takes its own place back;
    # another lambda of the same file, or another partial, is another definition.
    registrar(table, "my-method_2", "example")(abs)
    registrar(table, "lam", "example")(lambda v: v)
    with pytest.raises(InputError, match="^example 'lam' is registered already"):
        registrar(table, "lam", "example")(lambda v: -v)
    registrar(table, "part", "example")(functools.partial(round, ndigits=1))
    with pytest.raises(InputError, match="^example 'part' is registered already"):
        registrar(table, "part", "example")(functools.partial(round, ndigits=2))
    registrar(table, "my-method_2", "example", replace=True)(round)
    assert table["my-method_2"] is round
    with pytest.raises(InputTypeError, match=r"^example 'n' must be callable; got int"):
        registrar(table, "n", "example")(42)
    assert "n" not in table
    from betasmooth.explain import PREFIXES, register_prefix

    with pytest.raises(InputError, match="^method prefix 'captum' is registered already"):
        register_prefix("captum")(lambda name: None)
    assert PREFIXES["captum"] is not None
    # The error's own advice, replace=True, is an option of register_prefix too.
    captum = PREFIXES["captum"]
    try:
        register_prefix("captum", replace=True)(lambda name: lambda m, x, t, **k: 2 * x)
        x = torch.ones(1, 3)
        assert torch.equal(bs.explain(nn.Flatten(), x, "captum:Saliency", 0), 2 * x)
    finally:
        PREFIXES["captum"] = captum
    saliency = bs.explain(nn.Flatten(), x, "captum:Saliency", 0)
    assert torch.equal(saliency, bs.explain(nn.Flatten(), x, "gradient", 0))


def test_built_in_registries_survive_a_reload():
    # Notebooks reload modules (autoreload): their methods define themselves again.
    # In a process of its own, so that the reloaded modules stay out of the other tests.
    import subprocess

    code = (
        "import importlib, torch, betasmooth as bs\n"
        "for name in ('gradient', 'noise', 'propagation', 'composites', 'captum'):\n"
        "    importlib.reload(importlib.import_module('betasmooth.explain.' + name))\n"
        "net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).double()\n"
        "h = bs.explain(net, torch.rand(2, 1, 4, 4, dtype=torch.float64), 'beta_smooth', 1)\n"
        "assert torch.equal(h[0].flatten(), net[1].weight[1]), h\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_images_of_other_channels_or_too_small_say_what_fits(tmp_path, capsys) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, size in (("colour", 32), ("tiny", 4)):
        for i in range(2):
            (tmp_path / name).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png"
            )
    argv = ["explain", "--model", "digits-cnn", "--method", "gradient", "--no-progress"]
    assert main([*argv, "--data", str(tmp_path / "colour"), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "the model's first convolution takes 1 channel: load the images with --channels 1" in err
    tiny = ["--data", str(tmp_path / "tiny"), "--channels", "1", "--out", str(tmp_path / "b")]
    assert main([*argv, *tiny]) == 2
    assert "too small for the model: give a larger --image-size" in capsys.readouterr().err
    # With what the hints say, the same images run.
    assert main([*argv, *tiny[:-1], str(tmp_path / "c"), "--image-size", "32"]) == 0
    # Two channels: no --channels converts them, so none is advised, and one given is
    # refused naming the data.
    two = tmp_path / "two.npz"
    np.savez(two, x=rng.random((2, 2, 32, 32), dtype=np.float32))
    assert main([*argv, "--data", str(two), "--out", str(tmp_path / "e")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("the model's first convolution takes 1 channel: give images of 1 channel")
    )
    assert main([*argv, "--data", str(two), "--channels", "1", "--out", str(tmp_path / "f")]) == 2
    said = capsys.readouterr().err.strip()
    assert said.endswith(
        f"data {str(two)!r} has 2 channels, which cannot be converted to 1; channels= "
        "(--channels) converts grey to RGB and RGB to grey only"
    )
    # A dense layer after the convolutions: photos-cnn at 32 px instead of 64.
    small = ["--model", "photos-cnn", "--data", "photos", "--image-size", "32", "-n", "2"]
    plain = ["explain", "--method", "gradient", "--no-progress", *small]
    assert main([*plain, "--out", str(tmp_path / "d")]) == 2
    assert "give the size it was trained on with --image-size" in capsys.readouterr().err
    # A kernel larger than the image, and a grey-taking model that fails on size alone.
    wide = nn.Sequential(nn.Conv2d(3, 2, 7), nn.Flatten(), nn.Linear(2, 3))
    with pytest.raises(InputError, match=r"too small for the model: give a larger --image-size"):
        bs.explain(wide, torch.rand(2, 3, 5, 5), "gradient")


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)
    ).eval()


class _Normalise(nn.Module):
    """A preprocessing step without a ReLU, scripted on its own."""

    def forward(self, x):
        return (x - 0.5) / 0.25


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_is_refused_where_no_relu_can_be_reached(how):
    # A traced model's beta_smooth map was the plain gradient, and its attack
    # never moved x, both without a word.
    net, x = _tiny(), torch.rand(2, 1, 8, 8)
    ts = torch.jit.script(net) if how == "script" else torch.jit.trace(net, x)
    message = r"(cannot work on \w+|cannot reach the ReLUs of its submodule 0), a TorchScript mod"
    for call in (
        lambda: bs.explain(ts, x, "beta_smooth", beta=2.0),
        lambda: bs.explain(ts, x, "guided_backprop"),
        lambda: bs.smooth(ts, 2.0),
        lambda: bs.manipulate(ts, x, bs.heatmap(torch.rand(2, 1, 8, 8)), "gradient", steps=1),
        lambda: bs.explain(nn.Sequential(ts), x, "beta_smooth"),
    ):
        with pytest.raises(InputError, match=message):
            call()
    # The methods that need no hook stay the eager model's, differentiable too.
    torch.testing.assert_close(bs.explain(ts, x, "gradient"), bs.explain(net, x, "gradient"))
    xg = x.clone().requires_grad_(True)
    (second,) = torch.autograd.grad(
        bs.explain(ts, xg, "gradient", create_graph=True).square().sum(), xg
    )
    (expected,) = torch.autograd.grad(
        bs.explain(net, xg, "gradient", create_graph=True).square().sum(), xg
    )
    torch.testing.assert_close(second, expected)
    # A scripted part without a ReLU leaves the eager ReLUs to smooth.
    both = nn.Sequential(torch.jit.script(_Normalise()), net).eval()
    plain = nn.Sequential(_Normalise(), net).eval()
    torch.testing.assert_close(
        bs.explain(both, x, "beta_smooth", beta=2.0), bs.explain(plain, x, "beta_smooth", beta=2.0)
    )


def test_torchscript_is_refused_by_the_checks_that_run_before_any_map():
    # check_model passed a scripted model that beta_smooth and guided_backprop
    # then refused at their first map, after the command line had written results.
    from betasmooth.attack import check_attack_model
    from betasmooth.explain import check_model

    net, x = _tiny(), torch.rand(2, 1, 8, 8)
    ts = torch.jit.trace(net, x)
    for method, what in [("beta_smooth", "beta-smoothing"), ("guided_backprop", "guided_backprop")]:
        with pytest.raises(
            InputError, match=rf"^{what} cannot work on TopLevelTracedModule, a Tor"
        ):
            check_model(ts, method)
    with pytest.raises(InputError, match=r"^the attack's softplus surrogate cannot work on Top"):
        check_attack_model(ts, ["lrp", "gradient"])
    # What needs no override takes the scripted model, as explain and manipulate do.
    check_model(ts, "gradient")
    check_model(ts, "smoothgrad")
    check_attack_model(ts, ["lrp"])
    check_attack_model(net, ["gradient"])


@pytest.mark.parametrize(
    "command",
    [
        ["attack", "--method", "gradient", "--steps", "2"],
        ["explain", "--method", "gradient,beta_smooth"],
        ["explain", "--method", "guided_backprop"],
        ["curvature", "--betas", "1", "--iterations", "2"],
    ],
)
def test_command_line_refuses_torchscript_before_writing(command, tmp_path, capsys):
    spec = tmp_path / "scripted.py"
    spec.write_text(
        "import torch\nfrom torch import nn\n\n\ndef build():\n"
        "    torch.manual_seed(0)\n"
        "    net = nn.Sequential(\n"
        "        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(1800, 10)\n"
        "    )\n"
        "    return torch.jit.trace(net.eval(), torch.zeros(1, 1, 32, 32))\n"
    )
    out = tmp_path / "run"
    argv = [*command, "--model", f"{spec}:build", "--data", "digits", "-n", "2", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "a TorchScript module" in err[-1] and err[-1].startswith("betasmooth: error: ")
    assert not out.exists()


def test_sweep_refuses_a_torchscript_model_before_it_records_or_writes(tmp_path, capsys):
    # An attack run made with the eager model, swept with the same weights traced:
    # beta-smoothing cannot reach the traced model's ReLUs. The refusal comes before
    # the sweep's settings enter config.json and before sweep.jsonl is written.
    spec = tmp_path / "net.py"
    body = (
        "import torch\nfrom torch import nn\n\n\ndef build():\n"
        "    torch.manual_seed(0)\n"
        "    net = nn.Sequential(\n"
        "        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(1800, 10)\n"
        "    ).eval()\n"
        "    return {}\n"
    )
    spec.write_text(body.format("net"))
    out = tmp_path / "run"
    attack = ["attack", "--model", f"{spec}:build", "--data", "digits", "-n", "2"]
    argv = [*attack, "--method", "gradient", "--steps", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    spec.write_text(body.format("torch.jit.trace(net, torch.zeros(1, 1, 32, 32))"))
    config = (out / "config.json").read_bytes()
    capsys.readouterr()
    assert main(["sweep", str(out), "--betas", "1", "--smoothgrad-n", "2", "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "betasmooth: error: beta-smoothing cannot work on TopLevelTracedModule, a TorchScript "
        "module (torch.jit.script or torch.jit.trace) that runs its own graph and takes no "
        "forward hooks; expected the nn.Module it was made from; of the defenses asked for, "
        "smoothgrad can run"
    )
    assert (out / "config.json").read_bytes() == config
    assert not (out / "sweep.jsonl").exists()
    assert not list((out / "arrays").glob("sweep-*"))
    # As the refusal says: a sweep of SmoothGrad alone runs on the traced model.
    only = ["--defenses", "smoothgrad", "--no-progress"]
    assert main(["sweep", str(out), "--betas", "1", "--smoothgrad-n", "2", *only]) == 0
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert sorted((r["index"], r["defense"]) for r in rows) == [(i, "smoothgrad") for i in (0, 1)]


def test_curvature_names_a_forward_that_detaches_x():
    # The Hessian's autograd call raised torch's "appears to not have been used in the graph".
    class Detaching(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _tiny()

        def forward(self, x):
            return self.net(x.detach())

    with pytest.raises(InputError, match=r"^Detaching's output does not depend on x: its forward"):
        bs.curvature(Detaching().eval(), torch.rand(2, 1, 8, 8), iterations=2)


DETACHING_MODEL = """
import torch

import betasmooth as bs


class Detaching(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = bs.load_model("digits-cnn")

    def forward(self, x):
        return self.net(x.detach())


def build():
    return Detaching()
"""


def test_attack_names_a_forward_that_detaches_x_before_it_writes(tmp_path, capsys):
    # The weights require grad, so the output has a graph: only one back to x counts.
    (tmp_path / "detaching.py").write_text(DETACHING_MODEL)
    out = tmp_path / "run"
    argv = ["attack", "--model", f"{tmp_path / 'detaching.py'}:build", "--data", "digits"]
    argv += ["-n", "2", "--steps", "2", "--method", "gradient", "--no-progress", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "betasmooth: error: Detaching's output does not depend on x: its forward detaches the "
        "input or runs under torch.no_grad(); expected a forward that keeps x in the graph\n"
    )
    assert not out.exists()


def test_a_compiled_model_is_refused_where_its_graph_is_differentiated_again():
    # torch.compile's graphs give no second derivative: the attack's maps
    # stayed without one (PCC to the target 0.48 against 0.88 uncompiled).
    from betasmooth.geometry import curvature

    compiled, x = torch.compile(_tiny(), backend="eager"), torch.rand(2, 1, 8, 8)
    target = bs.heatmap(torch.rand(2, 1, 8, 8))
    fix = r"does not work through a graph made by torch.compile; expected the module itself, "
    with pytest.raises(InputError, match="create_graph=True " + fix + r"model\._orig_mod"):
        bs.explain(compiled, x, "gradient", create_graph=True)
    with pytest.raises(InputError, match="the attack " + fix):
        bs.manipulate(compiled, x, target, "gradient", steps=1)
    with pytest.raises(InputError, match="curvature " + fix):
        curvature(compiled, x)
    # The wrapper sets a forward on itself, which was named instead.
    with pytest.raises(InputError, match="^lrp " + fix + r"model\._orig_mod"):
        bs.explain(compiled, x, "lrp")
    # A compiled part is named by its path.
    with pytest.raises(InputError, match=r"model\.1\._orig_mod \(the same weights\)"):
        bs.manipulate(nn.Sequential(nn.Identity(), compiled), x, target, "gradient", steps=1)
    # nn.Module.compile compiles in place, with no wrapper to see: the double backward
    # ended in torch's own error (inductor) or lost a smoothed copy's smoothing (eager).
    in_place = _tiny()
    in_place.compile(backend="eager")
    in_place_fix = fix + r"model not compiled in place by nn\.Module\.compile"
    with pytest.raises(InputError, match="the attack " + in_place_fix):
        bs.manipulate(in_place, x, target, "gradient", steps=1)
    with pytest.raises(InputError, match="curvature " + in_place_fix):
        curvature(in_place, x)


def test_a_compiled_graph_around_a_smoothed_module_is_refused():
    # torch's compiled graphs skip a module's hooks when one was compiled before
    # for its class: the smoothed copy computed the ReLU network, silently.
    torch.manual_seed(0)
    net, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval(), torch.randn(3, 4)
    by_hand = nn.Sequential(net[0], nn.Softplus(beta=5.0), net[2])
    torch.compile(net, backend="eager")(x)
    # Called, it gives the ReLU network's output on torch 2.14 (and fails on 2.3).
    compiled = torch.compile(bs.smooth(net, 5.0), backend="eager")
    refusal = (
        r"^model is a torch\.compile graph around a beta-.*; expected model\._orig_mod \(the "
        r"same weights\), "
        r"or the compiled module smoothed: bs\.smooth\(torch\.compile"
    )
    for method in ("gradient", "guided_backprop", "beta_smooth"):
        with pytest.raises(InputError, match=refusal):
            bs.explain(compiled, x, method)
    with pytest.raises(InputError, match=r"^model\.1 is a torch\.compile graph"):
        bs.explain(nn.Sequential(nn.Identity(), compiled), x, "gradient")
    # nn.Module.compile compiles in place, with no wrapper.
    in_place = nn.Sequential(bs.smooth(net, 5.0))
    in_place.compile(backend="eager")
    with pytest.raises(InputError, match=r"expected model not compiled in place by nn\.Module"):
        bs.explain(in_place, x, "gradient")
    plain = torch.compile(net, backend="eager")
    with bs.smoothed(net, 5.0), pytest.raises(InputError, match="around a beta-smoothed module"):
        bs.explain(plain, x, "gradient")
    # Smoothing the compiled module keeps the hooks outside its graph: the softplus network.
    smoothed = bs.smooth(plain, 5.0)
    assert torch.allclose(smoothed(x), by_hand(x), atol=1e-6)
    for method in ("gradient", "beta_smooth"):
        options = {"beta": 2.0} if method == "beta_smooth" else {}
        expected = bs.explain(bs.smooth(net, 5.0), x, method, target=0, **options)
        got = bs.explain(smoothed, x, method, target=0, **options)
        assert torch.allclose(got, expected, atol=1e-6)


def test_a_call_under_inference_mode_names_the_caller_not_the_model():
    from betasmooth.geometry import curvature

    x, target = torch.rand(2, 1, 8, 8), bs.heatmap(torch.rand(2, 1, 8, 8))
    for call in (
        lambda: bs.explain(_tiny(), x, "gradient"),
        lambda: bs.explain(_tiny(), x, "lrp"),
        lambda: bs.manipulate(_tiny(), x, target, "gradient", steps=1),
        lambda: curvature(_tiny(), x),
    ):
        with torch.inference_mode(), pytest.raises(InputError, match=r"^betasmooth was called "):
            call()


def test_a_tensor_made_under_inference_mode_is_explained_as_any_other():
    # Data prepared under inference_mode and explained outside it: the gradient by hand.
    net = _tiny()
    with torch.inference_mode():
        x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    leaf = x.clone().requires_grad_(True)
    out = net(leaf)
    (expected,) = torch.autograd.grad(out[:, 1].sum(), leaf)
    torch.testing.assert_close(bs.explain(net, x, "gradient", target=1), expected)
    assert bs.explain(net, x, "lrp", target=1).shape == x.shape


class _SubtractsInPlace(nn.Module):
    """A normalising wrapper written with ``x -= mean``: it changes the tensor it is given."""

    def __init__(self, net: nn.Module, through_data: bool) -> None:
        super().__init__()
        self.net, self.through_data = net, through_data

    def forward(self, x):
        if self.through_data:
            x.data.sub_(0.5)  # unseen by x's version counter
        else:
            x -= 0.5
        return self.net(x)


@pytest.mark.parametrize("through_data", [False, True])
@pytest.mark.parametrize("method", ["gradient", "lrp"])
def test_a_model_that_changes_its_input_in_place_is_refused_and_leaves_x_as_it_was(
    method, through_data
):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    given = x.clone()
    with pytest.raises(InputError, match=r"^_SubtractsInPlace changes its input in place "):
        bs.explain(_SubtractsInPlace(_tiny(), through_data), x, method)
    assert torch.equal(x, given)


class _Gelu(nn.Module):
    """A network without a ReLU, scripted whole."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 3)

    def forward(self, x):
        return self.linear(torch.nn.functional.gelu(x.flatten(1)))


class _Parts(nn.Module):
    """A scripted ModuleList: TorchScript gives it no forward graph."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleList([nn.Identity()])

    def forward(self, x):
        for part in self.parts:
            x = part(x)
        return x


def test_torchscript_without_relu_is_named_or_passed_through():
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(InputError, match=r"cannot work on RecursiveScriptModule, a TorchScript"):
        bs.smooth(torch.jit.script(_Gelu()), 1.0)
    # A scripted part whose ModuleList has no forward graph of its own: no ReLU to miss.
    net = nn.Sequential(torch.jit.script(_Parts()), _tiny())
    torch.testing.assert_close(
        bs.explain(net, x, "beta_smooth", beta=2.0),
        bs.explain(nn.Sequential(_tiny()), x, "beta_smooth", beta=2.0),
    )


class _Wrapped(nn.Module):
    """The tiny network, called by ``call(net, x)`` in forward."""

    def __init__(self, call) -> None:
        super().__init__()
        self.net, self.call = _tiny(), call

    def forward(self, x):
        return self.call(self.net, x)


def test_a_forward_that_cuts_x_out_of_the_graph_is_named():
    x, detached = torch.rand(2, 1, 8, 8), _Wrapped(lambda net, x: net(x.detach()))
    for method in ("gradient", "integrated_gradients", "beta_smooth", "guided_backprop"):
        with pytest.raises(InputError, match="^_Wrapped's output does not depend on x: its"):
            bs.explain(detached, x, method)
    # Frozen weights (a pretrained model's usual state) leave an output without a
    # graph at all, as does a forward under torch.no_grad().
    frozen = _Wrapped(lambda net, x: net(x.detach())).requires_grad_(False)
    silent = _Wrapped(lambda net, x: torch.no_grad()(net)(x))
    for model in (frozen, silent):
        with pytest.raises(InputError, match="^_Wrapped's output does not depend on x: its"):
            bs.explain(model, x, "gradient")


def test_messages_name_the_right_form_for_maps_squeezed_outputs_and_meta_models():
    net, x = _Wrapped(lambda net, x: net(x).squeeze()), torch.rand(3, 1, 8, 8)
    bs.explain(net, x, "gradient")  # the probe of this item shape passes with 3 items
    with pytest.raises(InputError, match=r"got \(3,\) \(a squeeze\(\) in forward drops"):
        bs.explain(net, x[:1], "gradient")
    maps = bs.heatmap(torch.rand(3, 1, 8, 8)).numpy()
    with pytest.raises(InputTypeError, match=r"target_map must be a torch.Tensor .* \(B, H, W\)"):
        bs.manipulate(_tiny(), x, maps, "gradient", steps=1)
    with torch.device("meta"):
        meta = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(InputError, match="parameters are on the meta device and hold no values"):
        bs.explain(meta, x, "gradient")


def test_an_input_beyond_a_float16_models_range_is_refused_also_after_a_first_call():
    # 7e4 is a finite float32 but inf in float16; a cached probe skipped the check.
    net = plain_cnn(seed=1).half()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(bs.explain(net, x, "gradient", 0)).all())
    big = x * 7e4
    with pytest.raises(InputError, match=r"^x has values beyond the range of float16, .*65504"):
        bs.explain(net, big, "gradient", 0)
    assert bool(torch.isfinite(bs.explain(net, big / 2, "gradient", 0)).all())  # below 65504


def test_a_float16_map_with_nan_or_inf_is_refused_naming_its_items(monkeypatch):
    # LRP's stabiliser 1e-6 divides float16 relevances past 65504: NaN maps, no error.
    model, (x, y) = bs.load_model("digits-cnn").half(), bs.load_data("digits")
    x, y = x[:8], y[:8]
    options = {"beta": 0.1, "base": "lrp"}
    with pytest.raises(InputError) as refused:
        bs.explain(model, x, "beta_smooth", y, **options)
    monkeypatch.setattr(sys.modules["betasmooth.explain"], "_check_finite", lambda out, m: None)
    raw = bs.explain(model, x, "beta_smooth", y, **options)
    bad = (~torch.isfinite(raw)).flatten(1).any(1).nonzero().flatten().tolist()
    assert 0 < len(bad) < 8
    named = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    assert str(refused.value) == (
        f"beta_smooth gave NaN or inf in the map of {len(bad)} of 8 item(s) (index {named}) in "
        "float16; float16's largest value, 65504, is too small for the method's arithmetic: "
        "expected model.float() or model.bfloat16()"
    )
    # The same model in float32 and bfloat16 (float32's range) gives finite maps.
    for dtype in (torch.float32, torch.bfloat16):
        maps = bs.explain(model.to(dtype), x, "beta_smooth", y, **options)
        assert bool(torch.isfinite(maps).all())


class _Sqrt(nn.Module):
    def forward(self, x):
        return x.sqrt()


@pytest.mark.parametrize(("bad", "named"), [(5, "0, 1, 2, 3, 4"), (6, "0, 1, 2, 3, 4, ...")])
def test_a_map_with_inf_names_five_items_and_marks_more(bad, named):
    # d sqrt(x) / dx is inf at 0: the items holding a 0 have inf maps.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), _Sqrt(), nn.Linear(4, 2))
    x = torch.rand(7, 4) + 0.5
    x[:bad, 0] = 0.0
    with pytest.raises(InputError) as refused:
        bs.explain(net, x, "gradient", 0)
    assert str(refused.value) == (
        f"gradient gave NaN or inf in the map of {bad} of 7 item(s) (index {named}) in "
        "float32; expected a model whose outputs and gradients are finite on x"
    )


def test_out_of_memory_in_the_first_forward_is_named_as_such():
    # The probe of two items blamed a forward that folds the batch.
    class Hungry(nn.Sequential):
        def forward(self, x):
            if len(x) > 1:
                torch.empty(2**62, dtype=torch.uint8)  # torch's own CPU allocator error
            return super().forward(x)

    net = Hungry(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(OutOfMemory) as refused:
        bs.explain(net, torch.rand(2, 1, 4, 4), "gradient")
    assert str(refused.value).startswith(
        "out of memory in the model's forward of 2 items of x ([enforce fail"
    )
    assert "can't allocate memory" in str(refused.value)


def test_a_forward_error_that_mentions_memory_is_the_models_own_not_out_of_memory():
    # Only torch's RuntimeError (and MemoryError) is out of memory: a model's own error
    # whose text says "out of memory" is named as its error, not retried in smaller batches.
    class Budget(nn.Sequential):
        def forward(self, x):
            raise ValueError("feature cache out of memory budget")

    net = Budget(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(InputError) as refused:
        bs.explain(net, torch.rand(2, 1, 4, 4), "gradient")
    assert not isinstance(refused.value, OutOfMemory)
    assert str(refused.value) == (
        "model's forward raised ValueError on input of shape (1, 4, 4) (2 items of x, whose "
        "shape is (2, 1, 4, 4)): feature cache out of memory budget"
    )


@pytest.mark.parametrize(
    ("error", "oom"),
    [
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"), True),
        (MemoryError(), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x16 and 4x3)"), False),
        (ValueError("feature cache out of memory budget"), False),
        (KeyError("can't allocate memory"), False),
    ],
)
def test_is_oom_reads_the_allocators_words_only_in_a_runtime_error(error, oom):
    assert is_oom(error) is oom


def test_a_zero_width_data_range_is_refused():
    # A channel with low == high has span 0,
    # and measuring per unit of it divides by zero.
    from betasmooth.validate import check_bounds

    x = torch.zeros(1, 2, 3, 3)
    with pytest.raises(bs.InputError, match="low < high in every channel"):
        check_bounds(torch.zeros(1, 2, 1, 1), torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), x)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(bs.InputError, match="low < high in every channel"):
        bs.curvature(net, torch.full((1, 1, 2, 2), 0.5), data_range=(0.5, 0.5))


def test_in_range_tolerance_is_1e4_of_the_width():
    # The slack is the documented 1e-4 of the range's width.

    ok = torch.full((1, 1, 2, 2), 2.0 + 0.5e-4 * 2)
    assert check_in_range(ok, 0.0, 2.0) is ok
    # Relative, not absolute: on a range 100 wide, 0.005 beyond the top is within it.
    wide = torch.full((1, 1, 2, 2), 100.0 + 0.5e-4 * 100)
    assert check_in_range(wide, 0.0, 100.0) is wide
    with pytest.raises(bs.InputError, match="outside data_range"):
        check_in_range(torch.full((1, 1, 2, 2), 2.0 + 3e-4 * 2), 0.0, 2.0)
    with pytest.raises(bs.InputError, match="outside data_range"):
        check_in_range(torch.full((1, 1, 2, 2), -0.002), 0.0, 2.0)


@pytest.mark.parametrize("beta", [float("inf"), float("nan")])
def test_an_infinite_or_nan_beta_or_sigma_is_refused(beta):
    # An infinite sigma would give SmoothGrad a finite, meaningless map.
    from betasmooth.validate import check_positive

    with pytest.raises(bs.InputError, match="positive finite number"):
        check_positive("beta", beta)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(bs.InputError, match="sigma must be a positive finite number"):
        bs.explain(net, torch.rand(2, 1, 2, 2), "smoothgrad", sigma=beta, n=2)


def test_counts_and_seeds_beyond_their_maximum_are_refused():
    # torch's generator takes
    # seeds up to 2**64 - 1 only (oracle: torch itself), counts stop at 2**31 - 1.
    from betasmooth.validate import MAX_COUNT, MAX_SEED, check_count, check_seed

    torch.Generator().manual_seed(MAX_SEED)
    with pytest.raises((RuntimeError, ValueError, OverflowError)):
        torch.Generator().manual_seed(MAX_SEED + 1)
    with pytest.raises(bs.InputError, match="seed must be an integer from 0 to"):
        check_seed("seed", MAX_SEED + 1)
    with pytest.raises(bs.InputError, match="steps must be an integer from 1 to"):
        check_count("steps", MAX_COUNT + 1)
    # The maximum itself is taken.
    assert check_seed("seed", MAX_SEED) == MAX_SEED
    assert check_count("steps", MAX_COUNT) == MAX_COUNT


def test_an_infinite_input_is_named_as_nan_or_inf_before_the_model_runs():
    # inf, not only NaN, is refused by the batch check itself.
    from betasmooth.validate import check_batch

    x = torch.zeros(2, 1, 4, 4)
    x[1, 0, 2, 3] = float("inf")
    for bad in (x, -x):
        with pytest.raises(InputError, match="x contains NaN or inf; expected finite values"):
            check_batch(bad)


def test_a_zero_dimensional_tensor_target_is_one_class_for_the_whole_batch():
    # A 0-d tensor (y[0] of a label tensor) is taken as the int it holds.
    from betasmooth.validate import check_target

    assert check_target(torch.tensor(3), batch=2).tolist() == [3, 3]
    net = plain_cnn()
    x = torch.rand(3, 1, 16, 16)
    expected = _gradient(net, x, torch.full((3,), 2))
    got = bs.explain(net, x, "gradient", torch.tensor(2))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_seeds_per_item_as_an_integer_tensor_or_array_are_the_list_they_hold():
    # Documented: a sequence, or a 1-D integer tensor, gives each item its own seed.
    from betasmooth.validate import item_seeds

    for seeds in (torch.tensor([3, 4, 2**40]), np.array([3, 4, 2**40], dtype=np.uint64)):
        assert item_seeds(seeds, 3) == [3, 4, 2**40]
    # The curvature's random probes are drawn from these seeds: the same draws either way.
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64)
    listed = bs.curvature(net, x, target=0, seed=[5, 6], iterations=2, probes=2)
    tensor = bs.curvature(net, x, target=0, seed=torch.tensor([5, 6]), iterations=2, probes=2)
    torch.testing.assert_close(tensor, listed, rtol=0, atol=0)


def test_in_range_refuses_a_range_of_zero_width_even_where_x_lies_on_it():
    # x equal to both bounds is inside [low, high], but low == high is no range.
    x = torch.full((1, 2, 2, 2), 0.5)
    with pytest.raises(bs.InputError, match="data_range must have low < high; got low 0.5"):
        check_in_range(x, 0.5, 0.5)
    low = torch.tensor([0.0, 0.5]).view(1, 2, 1, 1)
    with pytest.raises(bs.InputError, match="low < high"):
        check_in_range(x, low, torch.full((1, 2, 1, 1), 0.5))


@pytest.mark.parametrize("bad", ["low", "high"])
def test_check_bounds_refuses_one_infinite_bound(bad):
    # One bound finite does not make the other one so.
    from betasmooth.validate import check_bounds

    x = torch.zeros(1, 2, 3, 3)
    low, high = torch.zeros(1, 2, 1, 1), torch.ones(1, 2, 1, 1)
    if bad == "low":
        low[0, 1] = -float("inf")
    else:
        high[0, 0] = float("inf")
    with pytest.raises(bs.InputError, match="data_range bounds must be finite"):
        check_bounds(low, high, x)


def test_a_new_item_shape_is_probed_again_after_a_first_call():
    # The probe's cache is per item shape: a model that took 8 x 8 items is still
    # asked about 6 x 6 ones, and the error names their shape.
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert bs.explain(net, x, "gradient", 0).shape == (2, 1, 8, 8)
    with pytest.raises(
        InputError,
        match=r"^model does not accept input of shape \(1, 6, 6\) \(2 items of x, whose shape "
        r"is \(2, 1, 6, 6\)\): mat1 and mat2",
    ):
        bs.explain(net, x[..., :6, :6], "gradient", 0)


def test_labels_of_any_integer_dtype_become_long_class_indices():
    # Documented: a (batch,) long tensor, from int or unsigned labels (uint8 as images store them).
    from betasmooth.validate import check_target

    for labels in (
        np.array([0, 4], dtype=np.uint8),
        np.array([0, 4], dtype=np.uint16),
        np.array([0, 4], dtype=np.uint64),
        torch.tensor([0, 4], dtype=torch.int32),
        torch.tensor([0, 4], dtype=torch.uint8),
    ):
        got = check_target(labels, batch=2)
        assert got.dtype == torch.long and got.tolist() == [0, 4], labels


def test_targets_beyond_int64_are_named_not_wrapped_or_raised_by_torch():
    # uint64 labels of 2**63 or more would wrap round to negative classes in the cast
    # to int64, and Python ints beyond int64 overflow inside torch: one line each.
    from betasmooth.validate import check_target

    big = 2**63 + 5
    many = np.array([2**63 + 1, big], dtype=np.uint64)  # the largest is named
    for target in (np.array([1, big], dtype=np.uint64), big, [1, 2**64], np.uint64(big), many):
        value = int(np.max(target))
        with pytest.raises(InputError, match=rf"^target class {value} is out of range; expected"):
            check_target(target, batch=2)
    with pytest.raises(InputError, match=rf"^target class must be >= 0; got {-(2**70)}$"):
        check_target([1, -(2**70)], batch=2)
    # 2**63 itself is the first class that int64 does not hold.
    for target in (2**63, [0, 2**63]):
        with pytest.raises(InputError, match=rf"^target class {2**63} is out of range; expected"):
            check_target(target, batch=2)
    top = np.array([2**63 - 1, 0], dtype=np.uint64)  # the largest that int64 holds
    assert check_target(top, batch=2).tolist() == [2**63 - 1, 0]


def test_target_errors_name_the_class_that_is_out_of_range():
    # The message names the offending class, not the first or the smallest of the batch.
    from betasmooth.validate import check_classes, check_target

    with pytest.raises(InputError, match=r"^target class must be >= 0; got -2$"):
        check_target([3, -2, 1], batch=3)
    with pytest.raises(
        InputError, match=r"^target class 7 is out of range; the model has 5 outputs \(classes 0"
    ):
        check_classes(torch.tensor([0, 7, 2]), 5)


def test_negative_seeds_are_refused_whole_or_per_item():
    # torch's manual_seed takes -1 (as 2**64 - 1) silently; the documented range is 0 to 2**64 - 1.
    from betasmooth.validate import item_seeds

    torch.Generator().manual_seed(-1)
    with pytest.raises(InputError, match=r"^seed must be an integer >= 0; got -1$"):
        item_seeds(-1, 2)
    with pytest.raises(InputError, match=r"^seed must be an integer >= 0; got -3$"):
        item_seeds([4, -3], 2)
    with pytest.raises(InputError, match="seed must be an integer >= 0"):
        bs.explain(plain_cnn(), torch.rand(2, 1, 16, 16), "smoothgrad", 0, n=2, seed=[1, -1])


def test_out_of_range_values_are_named_lowest_first():
    x = torch.zeros(2, 1, 2, 2)
    x[0, 0, 1, 1], x[1, 0, 0, 0] = -0.5, 2.0
    named = r"^x has values in \[-0\.5, 2\], outside data_range \[0, 1\]"
    with pytest.raises(InputError, match=named):
        check_in_range(x, 0.0, 1.0)


def test_a_model_with_buffers_only_takes_inputs_in_their_dtype():
    # Frozen weights kept as buffers: the model has no parameters, its buffers give its dtype.
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.register_buffer("weight", torch.randn(3, 4, generator=gen, dtype=torch.float64))

        def forward(self, x):
            return x.flatten(1) @ self.weight.T

    model, x = Frozen(), torch.rand(2, 1, 2, 2)
    got = bs.explain(model, x, "gradient", torch.tensor([0, 2]))
    # The gradient of a linear map is its weight row (closed form), in float64.
    assert got.dtype == torch.float32
    expected = model.weight[[0, 2]].view(2, 1, 2, 2).float()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_an_input_beyond_a_float16_models_range_names_its_largest_finite_value():
    # The largest |x| as given (7e4), not as the cast to float16 made it (inf).
    net = plain_cnn(seed=1).half()
    big = torch.zeros(2, 1, 16, 16)
    big[1, 0, 3, 4] = -7e4
    with pytest.raises(InputError, match=r"\(largest \|x\| 7e\+04\); expected values within"):
        bs.explain(net, big, "gradient", 0)


def test_a_value_just_past_the_bound_is_not_shown_as_the_bound():
    # The tolerance is 1e-4 of the range: 1.0004 is refused, and the message must
    # show it as past 1 (it printed "[0, 1], outside data_range [0, 1]").
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0004
    with pytest.raises(InputError, match=r"^x has values in \[0, 1\.0004\], outside"):
        check_in_range(x, 0.0, 1.0)


@pytest.mark.parametrize(
    ("low", "high", "value", "shown"),
    [
        (1000.0, 1001.0, 1001.0002, "1001.0002"),
        (-1e6, 1.0, 1.0 + 200.0, "201"),
        # 1e-4 of a width of 3 is 3e-4: seven digits at 1001 step by 1e-3, the bound itself.
        (998.0, 1001.0, 1001.0004, "1001.0004"),
    ],
)
def test_a_value_just_past_a_bound_far_from_zero_is_not_shown_as_the_bound(low, high, value, shown):
    # Six digits do not reach 1e-4 of a range of 1 at 1001: the message read
    # "[1000, 1001], outside data_range [1000, 1001]".
    x = torch.full((1, 1, 2, 2), low, dtype=torch.float64)
    x[0, 0, 0, 0] = value
    with pytest.raises(InputError) as err:
        check_in_range(x, low, high)
    assert str(err.value).startswith(f"x has values in [{low:g}, {shown}], outside")


def test_a_value_past_a_narrow_channels_bound_is_shown_with_that_channels_digits():
    # Per-channel bounds: the narrowest channel's tolerance (1e-4 of [1000, 1001]) sets
    # the digits, not the widest's (1e-4 of [0, 2000], 0.2), which would show 1001.
    low = torch.tensor([1000.0, 0.0], dtype=torch.float64).view(1, 2, 1, 1)
    high = torch.tensor([1001.0, 2000.0], dtype=torch.float64).view(1, 2, 1, 1)
    x = torch.cat([torch.full((1, 1, 2, 2), 1000.5), torch.full((1, 1, 2, 2), 5.0)], 1).double()
    x[0, 0, 0, 0] = 1001.0002
    with pytest.raises(InputError) as err:
        check_in_range(x, low, high)
    assert str(err.value).startswith("x has values in [5, 1001.0002], outside data_range")


def test_an_infinite_value_is_named_as_outside_the_range():
    # log10 of an infinite largest value has no digits: the message says inf, as before.
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(
        InputError, match=r"^x has values in \[0, inf\], outside data_range \[0, 1\]"
    ):
        check_in_range(x, 0.0, 1.0)


WRAPPED = """
import torch
from torch import nn


class InPlaceNormalize(nn.Module):
    # As a model that normalises its input itself, in place on a copy.
    def forward(self, x):
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        return x.clone().sub_(mean)


class FixedSize(nn.Module):
    # As torchvision's ViT, which checks the size it was built for.
    def forward(self, x):
        torch._assert(x.shape[2] == 32, f"Wrong image height! Expected 32 but got {x.shape[2]}!")
        return x.mean((2, 3))[:, :2]


def wrapped():
    return nn.Sequential(InPlaceNormalize(), nn.Conv2d(3, 2, 3), nn.Flatten(1), nn.LazyLinear(3))


def fixed():
    return FixedSize()
"""


def test_a_model_that_normalises_or_checks_its_size_gets_the_option_that_fits(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "models.py").write_text(WRAPPED)
    grey = tmp_path / "grey"
    grey.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(grey / f"{i}.png")
    argv = ["explain", "--method", "gradient", "--no-progress", "--data", str(grey)]
    model = ["--model", f"{tmp_path / 'models.py'}:wrapped"]
    assert main([*argv, *model, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.endswith("; the model works on 3 channels: load the images with --channels 3 "
                        "(channels= of bs.load_data)\n") and err.count("\n") == 1  # fmt: skip
    assert main([*argv, *model, "--channels", "3", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    fixed = ["--model", f"{tmp_path / 'models.py'}:fixed", "--channels", "3"]
    assert main([*argv, *fixed, "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.endswith(
        "Wrong image height! Expected 32 but got 16!; the model takes images of 32 px: give "
        "--image-size 32 (image_size=)\n"
    )
    assert main([*argv, *fixed, "--image-size", "32", "--out", str(tmp_path / "d")]) == 0
    # Three means for grey images: --channels 3 loads them as RGB.
    stats = ["--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]
    assert main([*argv, *model, *stats, "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.endswith(
        "mean has 3 values but the images have 1 channels; expected one number or one per "
        "channel (for a model that takes RGB, --channels 3, channels=3, loads them so)\n"
    )
    # Two means fit no image: no such hint.
    two = ["--mean", "0.5", "0.5", "--std", "0.5", "0.5"]
    assert main([*argv, *model, *two, "--out", str(tmp_path / "f")]) == 2
    assert capsys.readouterr().err.endswith("expected one number or one per channel\n")


OTHER_ERRORS = """
import torch
from torch import nn


class Widened(nn.Module):
    # A broadcast that fails in width, not in channels.
    def forward(self, x):
        return x.clone()[..., :1].add_(torch.zeros(1, 1, 1, 5)).flatten(1)[:, :2]


class Counted(nn.Module):
    # "Expected ... but got ..." of something other than the image's size.
    def forward(self, x):
        torch._assert(False, "Expected 5 but got 7 heads")
        return x


def widened():
    return Widened()


def counted():
    return Counted()
"""


def test_rgba_images_for_a_model_that_normalises_rgb_are_told_the_channels_it_takes():
    """An RGBA batch (a PNG with alpha, read as 4 channels) given to
    ``Sequential(Normalize(mean, std), net)``, as torchvision users wrap their models.

    The 1-channel case gets "the model works on 3 channels"; 4 channels fail in the same
    Normalize with torch's other wording ("The size of tensor a (4) must match the size of
    tensor b (3)"), which the hint does not recognise, so the error names neither the
    expected channel count nor the fix. The oracle is the model itself: its Normalize holds
    3 means and its first convolution takes 3 channels.
    """
    transforms = pytest.importorskip("torchvision.transforms")
    torch.manual_seed(0)
    model = nn.Sequential(
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        nn.Conv2d(3, 2, 3),
        nn.Flatten(1),
        nn.Linear(2 * 14 * 14, 3),
    ).eval()
    rgba = torch.rand(2, 4, 16, 16)
    with pytest.raises(InputError) as info:
        bs.explain(model, rgba, "gradient")
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith("; the model works on 3 channels: give images of 3 channels")


class _InnerMismatch(nn.Module):
    """Takes x's 4 channels; a bias of 5 channels inside fails to broadcast."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bias = nn.Parameter(torch.zeros(1, 5, 1, 1))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.conv(x) + self.bias).mean((2, 3)))


def test_a_mismatch_inside_a_model_whose_first_convolution_fits_gets_no_channels_hint():
    # torch says "size of tensor a (4) must match the size of tensor b (5) at dimension 1",
    # as for a normalisation of 5 channels; but the first convolution takes x's 4.
    with pytest.raises(InputError) as info:
        bs.explain(_InnerMismatch().eval(), torch.rand(2, 4, 8, 8), "gradient")
    assert str(info.value).endswith(
        "The size of tensor a (4) must match the size of tensor b (5) at non-singleton dimension 1"
    )


@pytest.mark.parametrize("factory", ["widened", "counted"])
def test_errors_of_other_causes_get_no_channels_or_size_hint(factory, tmp_path, capsys):
    (tmp_path / "models.py").write_text(OTHER_ERRORS)
    argv = ["explain", "--method", "gradient", "--no-progress", "--data", "digits", "-n", "2"]
    model = ["--model", f"{tmp_path / 'models.py'}:{factory}"]
    assert main([*argv, *model, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    said = {"widened": "doesn't match the broadcast shape [2, 1, 32, 5]", "counted": "got 7 heads"}
    assert err.endswith(said[factory] + "\n") and err.count("\n") == 1


@pytest.mark.parametrize("target", [torch.tensor([0, -1]), np.array([-1, 2])])
def test_a_target_of_minus_one_as_a_tensor_or_array_is_refused(target):
    """An unknown label (-1, as a flat folder gives) is no class, whatever holds it."""
    from betasmooth.validate import check_target

    with pytest.raises(InputError, match=r"^target class must be >= 0; got -1$"):
        check_target(target, batch=2)


def test_a_target_equal_to_the_number_of_classes_is_out_of_range():
    """Classes run from 0 to n - 1: a target of n is refused by name, n - 1 is taken."""
    net, x = plain_cnn(), torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(
        InputError,
        match=r"^target class 5 is out of range; the model has 5 outputs \(classes 0 to 4\)$",
    ):
        bs.explain(net, x, "gradient", target=5)
    expected = _gradient(net, x, torch.tensor([4, 4]))
    torch.testing.assert_close(bs.explain(net, x, "gradient", target=4), expected)


def test_check_instance_counts_no_bool_as_an_int():
    """``True`` is an int to Python, never to an option that asks for an int."""
    from betasmooth.validate import check_instance

    with pytest.raises(InputTypeError, match=r"^count must be an int; got bool True$"):
        check_instance("count", True, int, "an int")
    check_instance("count", 3, int, "an int")
    check_instance("flag", True, bool, "True or False")


def test_an_input_with_a_dimension_too_many_names_the_first_layers_layout():
    """A 5-D batch for a Conv2d model is named by the layout its first layer takes."""
    with pytest.raises(
        InputError,
        match=r"^x has shape \(2, 1, 1, 16, 16\) but the model's first layer Conv2d takes "
        r"\(B, C, H, W\)$",
    ):
        bs.explain(plain_cnn(), torch.rand(2, 1, 1, 16, 16), "gradient")


@pytest.mark.parametrize("shape", [(2, 5, 1), (2, 1, 5)])
def test_logits_of_three_dimensions_are_refused(shape):
    """A model output of three dimensions is no ``(B, classes)`` logits, even of B rows."""
    from betasmooth.validate import check_logits

    with pytest.raises(
        InputError,
        match=rf"^the model returned shape \({shape[0]}, {shape[1]}, {shape[2]}\) for 2 input "
        r"item\(s\); expected logits of shape \(2, classes\)$",
    ):
        check_logits(torch.zeros(shape), 2)


def test_maps_with_a_channel_dimension_are_refused_by_shape():
    """Maps are ``(B, H, W)``: a ``(B, 1, H, W)`` explanation must go through heatmap first."""
    maps = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(
        InputError,
        match=r"^map a must have shape \(B, H, W\), one map per batch item; got shape "
        r"\(2, 1, 4, 4\)$",
    ):
        bs.compare(maps, maps)


def test_a_number_given_as_a_one_element_tensor_or_array_is_told_to_take_item():
    net, x = _tiny(), torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    beta = torch.tensor(2.0)
    told = r"a one-element (tensor|array); pass its number, (beta|n|tol|eps)\.item\(\)$"
    with pytest.raises(InputTypeError, match=r"^beta .* got tensor\(2\.\), " + told):
        bs.explain(net, x, "beta_smooth", beta=beta)
    with pytest.raises(InputTypeError, match=r"^n .* got array\(3\), " + told):
        bs.explain(net, x, "smoothgrad", n=np.array(3))
    with pytest.raises(InputError, match=r"^tol .* got tensor\(0\.1000\), " + told):
        bs.curvature(net, x, tol=torch.tensor(0.1))
    with pytest.raises(InputError, match=r"^eps .* got tensor\(\[0\.\]\), " + told):
        bs.heatmap(x, eps=torch.tensor([0.0]))
    with pytest.raises(InputTypeError, match=r"^sigma .* got \[0\.1\]$"):  # a list: no number
        bs.explain(net, x, "smoothgrad", sigma=[0.1])
    # What .item() gives is the number: the maps of beta 2 given as a float.
    expected = bs.explain(bs.smooth(net, 2.0), x, "gradient")
    torch.testing.assert_close(bs.explain(net, x, "beta_smooth", beta=beta.item()), expected)


def test_a_target_list_of_bools_is_no_list_of_classes():
    """``True`` is an int to Python, never a class index: a list of bools is refused by type."""
    from betasmooth.validate import check_target

    with pytest.raises(
        InputTypeError,
        match=r"^target must be None, an int or a \(B,\) integer tensor, array or list; "
        r"got list$",
    ):
        check_target([True, False], batch=2)
    assert check_target([1, 0], batch=2).tolist() == [1, 0]


class _ClampsInPlace(nn.Module):
    """``x.clamp_(0, 1)`` on inputs already in [0, 1]: no value changes, the tensor does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _tiny()

    def forward(self, x):
        x.clamp_(0, 1)
        return self.net(x)


def test_an_in_place_change_that_keeps_every_value_is_refused_too():
    # The values are the same, but an in-place op on the leaf that a gradient needs
    # fails inside autograd: the version counter tells it, not the values.
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    given = x.clone()
    with pytest.raises(InputError, match=r"^_ClampsInPlace changes its input in place "):
        bs.explain(_ClampsInPlace(), x, "gradient")
    assert torch.equal(x, given)


def test_rows_that_sum_to_one_with_a_negative_logit_are_no_probabilities():
    from betasmooth.validate import check_logits

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        check_logits(torch.tensor([[2.0, -1.0], [0.5, 0.5]]), 2)
    assert [str(w.message) for w in record] == []


def test_out_of_range_values_show_enough_digits_and_equal_bounds_once():
    # 1001.00015 is past [1000, 1001] by 1.5e-4 of the range: nine digits tell it from 1001.0002.
    x = torch.full((1, 1, 1, 1), 1001.00015, dtype=torch.float64)
    with pytest.raises(
        InputError,
        match=r"^x has values in \[1001\.00015, 1001\.00015\], outside data_range "
        r"\[1000, 1001\]; expected",
    ):
        check_in_range(x, 1000.0, 1001.0)
    # Per-channel bounds that are all equal are shown as one number.
    x = torch.full((1, 2, 1, 1), 2.0)
    with pytest.raises(InputError, match=r"outside data_range \[0, 1\]; expected"):
        check_in_range(x, torch.zeros(1, 2, 1, 1), torch.ones(1, 2, 1, 1))


def test_one_unbatched_image_whose_width_equals_the_channels_gets_the_batch_hint():
    # (3, 5, 3) for a 3-channel Conv2d: (C, H, W) = (3, 5, 3) fits, (H, W, C) would too but
    # its first dimension equals the channels as well, so it is read as channels-first.
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(30, 2))
    with pytest.raises(
        InputError,
        match=r"^x has shape \(3, 5, 3\) but the model's first layer Conv2d takes "
        r"\(B, C, H, W\); add the batch dimension with x\[None\]$",
    ):
        bs.explain(net, torch.rand(3, 5, 3), "gradient")


def test_a_channel_count_that_load_data_cannot_make_is_not_offered_as_channels():
    # load_data converts 1 and 3 channels into each other, never into 4.
    net = nn.Sequential(nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(128, 2))
    with pytest.raises(InputError) as err:
        bs.explain(net, torch.rand(2, 3, 8, 8), "gradient")
    assert str(err.value).endswith(
        "; the model's first convolution takes 4 channels: give images of 4 channels"
    )


def test_option_checks_take_their_edges_and_refuse_what_is_no_option():
    from betasmooth.validate import check_choice, check_count, check_form, check_positive

    assert check_count("steps", 2, 2) == 2 and check_count("n", 1) == 1
    with pytest.raises(InputTypeError, match=r"^sigma must be a positive number; got None$"):
        check_positive("sigma", None)
    assert check_positive("sigma", None, optional=True) is None
    with pytest.raises(
        InputError, match=r"^unknown noise \['gaussian'\]; expected one of: gaussian, logistic$"
    ):
        check_choice("noise", ["gaussian"], {"gaussian", "logistic"})
    # A parameter that the form leaves out may come as an option: the form still fits.
    check_form("m", lambda a, b, option: a, 2, [], "f(a, b)")
    with pytest.raises(InputTypeError, match=r"^m cannot be called as f\(a, b\) \(too many"):
        check_form("m", lambda a: a, 2, [], "f(a, b)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_gpu_is_named_in_the_callers_own_words():
    from betasmooth.validate import resolve_device

    with pytest.raises(
        InputError,
        match=r"^CUDA is not available on this machine \(device='cuda'\); use device='cpu'$",
    ):
        resolve_device("cuda", option="device")
    with pytest.raises(
        InputError,
        match=r"^CUDA is not available on this machine \(--device cuda\); use "
        r"--device cpu$",
    ):
        resolve_device("cuda")


def test_values_past_either_bound_by_less_than_the_tolerance_are_inside():
    # Rounding in a normalisation: 1e-4 of the width is slack on both sides, no more.
    x = torch.tensor([-0.5e-4, 1.0 + 0.5e-4], dtype=torch.float64).view(1, 1, 1, 2)
    assert check_in_range(x, 0.0, 1.0) is x
    with pytest.raises(InputError, match=r"^x has values in \[-0\.0002, 1\], outside"):
        check_in_range(torch.tensor([-2e-4, 1.0], dtype=torch.float64).view(1, 1, 1, 2), 0.0, 1.0)


class _FixedFloat32(nn.Module):
    """No parameters: a constant float32 matrix that takes float32 inputs only."""

    def forward(self, x):
        return x.flatten(1) @ torch.ones(4, 2)


def test_a_model_without_parameters_is_probed_again_for_another_input_dtype():
    # The probe's cache is per dtype as well: float32 passing says nothing of float64.
    net, x = _FixedFloat32(), torch.rand(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    assert bs.explain(net, x, "gradient", 0).shape == (2, 1, 2, 2)
    with pytest.raises(
        InputError,
        match=r"^model does not accept input of shape \(1, 2, 2\) \(2 items of x, whose shape "
        r"is \(2, 1, 2, 2\)\): .*dtype",
    ):
        bs.explain(net, x.double(), "gradient", 0)


def test_registry_names_refuse_all_and_offer_underscores_for_dashes():
    from betasmooth.validate import registrar

    with pytest.raises(
        InputError, match=r"^example name 'all' is taken by the command line; expected another$"
    ):
        registrar({}, "all", "example")
    with pytest.raises(
        InputError,
        match=r"^example names are letters, digits and '_', starting with a letter or '_' \(they "
        r"are written in comma lists on the command line and in file names\); got 'my-method', "
        r"expected e.g. 'my_method'$",
    ):
        registrar({}, "my-method", "example", dash=False)
    # No hint where no underscore would make a name.
    with pytest.raises(InputError, match=r"; got 'my method'$"):
        registrar({}, "my method", "example")


def _unnormalised(model: nn.Module, x: torch.Tensor, name: str = "x") -> list[str]:
    """The messages of the UnnormalisedWarnings that checking ``x`` gives."""
    from betasmooth.validate import UnnormalisedWarning, check_input

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        check_input(model, x, name)
    return [str(w.message) for w in seen if issubclass(w.category, UnnormalisedWarning)]


def _expecting(mean: list[float], std: list[float]) -> nn.Module:
    """A fresh model (warned of at most once) that expects ``(x - mean) / std``."""
    from betasmooth.validate import expect_normalised

    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    expect_normalised(net, "mine", mean, std)
    return net


def _items(*colours: list[float]) -> torch.Tensor:
    """A batch of 1x1 RGB images of the given colours."""
    return torch.tensor(colours)[:, :, None, None]


@pytest.mark.parametrize(
    ("colours", "warned"),
    [
        ([[0.0, 0.5, 1.0], [0.25, 0.25, 0.25]], True),  # both ends of [0, 1] are in it
        ([[0.0, 0.5, 1.0], [0.25, -1e-3, 0.25]], False),  # a pixel below 0: normalised
        ([[0.0, 0.5, 1.0], [0.25, 1.001, 0.25]], False),  # a pixel above 1: not pixels
        ([[-0.5, 0.5, 0.5], [2.0, 0.5, 0.5]], False),  # below 0 and above 1
        ([[0.5, 0.5, 0.5], [0.5, 0.5, -0.2]], False),  # only the second item is out of it
    ],
)
def test_unnormalised_input_is_warned_of_where_every_pixel_of_the_batch_is_in_0_1(colours, warned):
    # The rule is closed form: the whole batch lies in [0, 1], ends included; one pixel
    # of any item outside it (below 0: normalised, as pixels below the mean are) clears it.
    said = _unnormalised(_expecting([0.5, 0.4, 0.3], [0.2, 0.25, 0.5]), _items(*colours))
    assert len(said) == int(warned)


def test_the_unnormalised_warning_names_the_argument_the_mean_and_the_std():
    from betasmooth.validate import UnnormalisedWarning

    assert issubclass(UnnormalisedWarning, UserWarning)  # shown by a default filter
    net = _expecting([0.5, 0.4, 0.3], [0.2, 0.25, 0.5])
    (said,) = _unnormalised(net, _items([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]), "images")
    assert said.startswith(
        "images lies in [0, 1], as unnormalised pixels do, but mine expects pixels normalised "
        "by mean [0.5, 0.4, 0.3] and std [0.2, 0.25, 0.5]: "
    )
    # Once per model: a second input of pixels says nothing.
    assert _unnormalised(net, _items([0.7, 0.2, 0.3], [0.4, 0.5, 0.6]), "images") == []


@pytest.mark.parametrize("mean", [[0.0, 0.0, 0.0], [-0.5, 0.0, -0.1]])
def test_a_model_whose_mean_has_no_positive_channel_is_not_warned_of(mean):
    # With no mean above 0, (x - mean) / std of pixels is never negative: normalised input
    # may then lie wholly in [0, 1], and [0, 1] says nothing of whether it is normalised.
    net = _expecting(mean, [0.5, 0.5, 0.5])
    assert _unnormalised(net, _items([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])) == []
    # One channel above 0 is enough for pixels below it to be negative once normalised.
    assert len(_unnormalised(_expecting([0.0, 0.0, 0.1], [0.5] * 3), _items([0.5] * 3))) == 1


@pytest.mark.parametrize("flag", [True, False])
def test_a_count_given_as_a_boolean_is_refused_not_taken_for_1_or_0(flag):
    # bool is an int to Python (True == 1): a count of True is a slip, never one step.
    from betasmooth.validate import check_count

    with pytest.raises(InputTypeError, match=r"^steps must be an integer >= 0; got "):
        check_count("steps", flag, 0)
