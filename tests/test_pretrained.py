"""torchvision models by spec, from a hub cache seeded with random weights: no network."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import GuidedBackprop, InputXGradient, IntegratedGradients, Saliency
from PIL import Image
from torch import nn
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import betasmooth as bs
from betasmooth import pretrained
from betasmooth.cli import main
from betasmooth.store import read_jsonl
from betasmooth.validate import InputError, OutOfMemory
from test_explain_lrp import zennit_lrp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum.*")

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
LOW, HIGH = (0 - MEAN) / STD, (1 - MEAN) / STD
SPECS = {"vgg11": "torchvision:vgg11", "resnet18": "torchvision:resnet18"}
VITS = ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"]
CANONIZERS = {"vgg11": VGGCanonizer, "resnet18": ResNetCanonizer}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds random weights under torchvision's file names."""
    home = tmp_path_factory.mktemp("torch_home")
    patch = pytest.MonkeyPatch()
    patch.setenv("TORCH_HOME", str(home))
    saved = {}
    for seed, (name, spec) in enumerate(SPECS.items()):
        torch.manual_seed(seed)
        net = torchvision.models.get_model(name, weights=None).eval()
        path = pretrained.checkpoint_path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
        saved[name] = net
    yield saved
    patch.undo()


#: The module's own download, before the autouse fixture below stubs it.
DOWNLOAD = pretrained.download


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any download is a failure: the cache must be used, and a missing file reported."""

    def refuse(url, path):
        raise OSError(f"no network for {url}")

    monkeypatch.setattr(pretrained, "download", refuse)


def _photo_folder(folder, seed):
    """Two random 48 x 40 RGB photographs, as a user's folder holds them."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return folder


def normalised(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) - MEAN) / STD


def test_cached_weights_are_loaded_into_the_architecture(hub):
    for name, spec in SPECS.items():
        ours = bs.load_model(spec)
        assert type(ours) is type(hub[name]) and not ours.training
        theirs = hub[name].state_dict()
        assert ours.state_dict().keys() == theirs.keys()
        for key, value in ours.state_dict().items():
            assert torch.equal(value, theirs[key]), key
    named = bs.load_model("torchvision:resnet18:IMAGENET1K_V1")
    assert torch.equal(named.fc.weight, hub["resnet18"].fc.weight)


def test_unknown_name_and_weights_are_one_line_errors(hub):
    with pytest.raises(InputError, match="unknown torchvision model 'vgg99'"):
        bs.load_model("torchvision:vgg99")
    with pytest.raises(InputError, match="unknown weights 'V9' for resnet18; expected one of"):
        bs.load_model("torchvision:resnet18:V9")
    # DEFAULT first, then torchvision's members in their order, DEFAULT (an alias) once.
    with pytest.raises(InputError) as err:
        pretrained.weights_of("torchvision:resnet50:V9")
    assert str(err.value) == (
        "unknown weights 'V9' for resnet50; expected one of DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"
    )


@pytest.mark.parametrize(
    "spec",
    [
        "torchvision:resnet18:IMAGENET1K_V1:extra",
        "torchvision:",
        "torchvision:resnet18:",
        # Another scheme's spec is no torchvision spec: not read as torchvision's resnet18.
        "timm:resnet18",
    ],
)
def test_a_malformed_torchvision_spec_is_refused_not_read_in_part(spec):
    # A fourth part is no weights name to drop: DEFAULT in its place would be another network.
    with pytest.raises(InputError, match=f"^model spec '{spec}' is malformed; expected"):
        pretrained.weights_of(spec)
    assert pretrained.weights_of("torchvision:resnet18:IMAGENET1K_V1").name == "IMAGENET1K_V1"


def test_a_model_file_whose_name_starts_with_torchvision_is_no_torchvision_spec(
    tmp_path, monkeypatch
):
    # The prefix is the spec's first part, up to its colon: torchvision_net.py:build
    # names a function in a file, which loads as any other model file.
    path = tmp_path / "torchvision_net.py"
    path.write_text(
        "import torch\n\n\ndef build():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))\n"
    )
    monkeypatch.chdir(tmp_path)
    assert not pretrained.is_pretrained("torchvision_net.py:build")
    model = bs.load_model("torchvision_net.py:build")
    torch.manual_seed(0)
    expected = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(3, 1, 2, 2)
    torch.testing.assert_close(model(x), expected(x))


@pytest.mark.parametrize("name", ["fcn_resnet50", "raft_small", "quantized_resnet18", "r3d_18"])
def test_a_torchvision_model_that_is_no_image_classifier_is_refused(name, tmp_path, monkeypatch):
    # Refused by name, before torchvision builds it (fcn_resnet50 would fetch a backbone).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(InputError, match=f"^torchvision model '{name}' is not an image classifier"):
        bs.load_model(f"torchvision:{name}")
    assert not any(tmp_path.rglob("*.pth"))


def test_the_fetch_hint_names_the_weights_asked_for_not_the_default(tmp_path, monkeypatch):
    # resnet50's DEFAULT is IMAGENET1K_V2: a hint that fetched it would leave V1's file missing.
    import torchvision

    def offline(url, path):
        raise OSError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(pretrained, "download", offline)
    with pytest.raises(InputError) as err:
        bs.load_model("torchvision:resnet50:IMAGENET1K_V1")
    file = torchvision.models.get_model_weights("resnet50")["IMAGENET1K_V1"].url.rsplit("/", 1)[1]
    assert f"expected the file {file} in" in str(err.value)
    assert "get_model('resnet50', weights='IMAGENET1K_V1')" in str(err.value)


def test_missing_cache_names_the_file_and_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(InputError) as err:
        bs.load_model("torchvision:vgg11")
    text = str(err.value)
    assert "vgg11-8a719046.pth" in text and str(tmp_path / "empty" / "hub" / "checkpoints") in text
    assert "get_model('vgg11', weights='IMAGENET1K_V1')" in text
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((2, 3, 32, 32), np.float32))
    argv = ["explain", "--model", "torchvision:vgg11", "--data", str(data), "--method", "gradient"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "vgg11-8a719046.pth" in err_lines[0]
    assert not (tmp_path / "run").exists()


def test_own_weights_need_no_cached_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    torch.manual_seed(3)
    mine = torchvision.models.resnet18()
    torch.save(mine.state_dict(), tmp_path / "mine.pt")
    model = bs.load_model("torchvision:resnet18", weights=str(tmp_path / "mine.pt"))
    for key, value in mine.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert not (tmp_path / "empty").exists()


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen if issubclass(w.category, UserWarning)]


def test_pixels_in_zero_one_given_to_a_torchvision_model_are_warned_of_once(hub, tmp_path):
    # Its weights expect ImageNet-normalised input; pixels in [0, 1] are not, and the
    # maps would be of the model off its data. Said once per model, its smoothed and
    # deep copies, with torchvision's own statistics, whenever such an input comes
    # (not only the first of its shape); normalised input, weights of one's own and
    # a model of one's own say nothing.
    stats = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    said = (
        "x lies in [0, 1], as unnormalised pixels do, but torchvision:resnet18 expects "
        f"pixels normalised by mean {list(stats.mean)} and std {list(stats.std)}: the maps "
        "and attacks are then of the model on input it was not trained on; expected "
        'normalised input, e.g. load_data(..., preset="torchvision:resnet18") and '
        "data_range=data.bounds (ignore this where the images are normalised and have no "
        "pixel below the mean colour)"
    )
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = bs.load_model("torchvision:resnet18")
    assert _warnings_of(lambda: bs.explain(model, (pixels - MEAN) / STD, "gradient")) == []
    assert _warnings_of(lambda: bs.explain(model, pixels, "gradient")) == [said]
    assert _warnings_of(lambda: bs.explain(model, pixels[:1, :, :16], "gradient")) == []
    assert _warnings_of(lambda: bs.explain(bs.smooth(model, 5.0), pixels, "gradient")) == []
    copied = copy.deepcopy(bs.load_model("torchvision:resnet18"))
    assert _warnings_of(lambda: bs.explain(copied, pixels, "gradient")) == [said]

    torch.save(hub["resnet18"].state_dict(), tmp_path / "mine.pt")
    own = bs.load_model("torchvision:resnet18", weights=str(tmp_path / "mine.pt"))
    assert _warnings_of(lambda: bs.explain(own, pixels, "gradient")) == []
    plain = torchvision.models.resnet18().eval()
    assert _warnings_of(lambda: bs.explain(plain, pixels, "gradient")) == []


def test_the_command_line_says_nothing_of_a_bright_image_it_normalised(hub, tmp_path, capsys):
    # Pixels in [0.5, 0.6] lie in [0, 1] also once normalised ((0.5 - 0.485) / 0.229 =
    # 0.066 to 0.50): the command line normalised them itself and does not warn.
    folder = tmp_path / "bright"
    folder.mkdir()
    rng = np.random.default_rng(0)
    grey = rng.integers(128, 153, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(grey).save(folder / "0.png")
    out = tmp_path / "run"
    argv = ["explain", "--model", "torchvision:resnet18", "--data", str(folder)]
    argv += ["--image-size", "32", "--method", "gradient", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    x = bs.load_data(str(folder), preset="torchvision:resnet18", image_size=32).x
    assert 0 <= x.min() and x.max() <= 1  # normalised, and in [0, 1]
    assert "warning" not in capsys.readouterr().err
    assert not (out / "warnings.jsonl").exists()


def test_weights_fine_tuned_to_other_classes_say_how_to_build_their_model(tmp_path, monkeypatch):
    # A resnet18 fine-tuned to 10 classes under torchvision:resnet18 (1000): only fc
    # differs, and the line says how to build the model the file fits; that model file
    # then loads every tensor of it.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    torch.manual_seed(3)
    mine = torchvision.models.resnet18(num_classes=10)
    torch.save(mine.state_dict(), tmp_path / "tuned.pt")
    with pytest.raises(InputError) as err:
        bs.load_model("torchvision:resnet18", weights=str(tmp_path / "tuned.pt"))
    assert str(err.value).endswith(
        "(shape mismatch: fc.weight (10, 512) vs model (1000, 512), fc.bias (10,) vs model "
        "(1000,)); expected the state dict of the same architecture; the file's last layer "
        "(fc) has 10 outputs, the model's 1000: for weights fine-tuned to 10 classes, build "
        "the model with a last layer of 10 outputs (a model file, file.py:build; for a "
        "torchvision network, torchvision.models.<name>(num_classes=10))"
    )
    (tmp_path / "tuned.py").write_text(
        "import torchvision\n\n\ndef build():\n"
        "    return torchvision.models.resnet18(num_classes=10)\n"
    )
    model = bs.load_model(f"{tmp_path / 'tuned.py'}:build", weights=str(tmp_path / "tuned.pt"))
    for key, value in mine.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_only_a_weights_name_that_is_no_file_is_pointed_to_the_spec(tmp_path, monkeypatch):
    # A file named like a weights name ("mine") is a file and loads; a missing path that
    # is no name ("lost.pt") is just missing, with the state-dict hint.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(3)
    mine = torchvision.models.squeezenet1_1()
    torch.save(mine.state_dict(), tmp_path / "mine")
    model = bs.load_model("torchvision:squeezenet1_1", weights="mine")
    for key, value in mine.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    with pytest.raises(InputError) as err:
        bs.load_model("torchvision:squeezenet1_1", weights="lost.pt")
    assert str(err.value).startswith(
        "weights file lost.pt does not exist; expected a file written by torch.save("
    )


def test_a_weights_enum_name_as_weights_file_points_to_the_spec(tmp_path, monkeypatch, capsys):
    # torchvision's reflex, weights="DEFAULT": no such file, and the spec is where it goes;
    # refused before the network is built or any file fetched.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as err:
        bs.load_model("torchvision:resnet18:IMAGENET1K_V1", weights="DEFAULT")
    assert str(err.value) == (
        "weights file DEFAULT does not exist; expected torchvision's weights named in the "
        "model spec ('torchvision:resnet18:DEFAULT') or a file written by "
        "torch.save(model.state_dict(), ...)"
    )
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((2, 3, 32, 32), np.float32))
    argv = ["explain", "--model", "torchvision:vgg11", "--weights", "IMAGENET1K_V1"]
    argv += ["--method", "gradient", "--data", str(data), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "('torchvision:vgg11:IMAGENET1K_V1')" in err_lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "empty").exists()


@pytest.mark.parametrize(("name", "size"), [("googlenet", 64), ("inception_v3", 80)])
def test_own_weights_fine_tuned_from_the_pretrained_model_compute_what_it_computed(
    name, size, tmp_path, monkeypatch
):
    # Fine-tuned from get_model(name, weights="DEFAULT"), the model re-normalises
    # its input (transform_input) and has no auxiliary heads. --weights built
    # the bare architecture, without the transform: the same state dict
    # computed another function (a first convolution's input off by up to 2.5).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    torch.manual_seed(5)
    mine = torchvision.models.get_model(
        name, weights=None, transform_input=True, aux_logits=False, init_weights=False
    ).eval()
    torch.save(mine.state_dict(), tmp_path / "mine.pt")
    model = bs.load_model(f"torchvision:{name}", weights=str(tmp_path / "mine.pt"))
    assert model.transform_input is True
    x = normalised(2, size)
    with torch.no_grad():
        assert torch.equal(model(x), mine(x))
    assert not (tmp_path / "empty").exists()


class _Built(Exception):
    """A recording stand-in for a torchvision model class ends the build with its arguments."""


_SIZED = [
    (f"torchvision:{name}:{weights.name}", module, cls)
    for name, module, cls in [
        *[(n, "vision_transformer", "VisionTransformer") for n in VITS],
        ("maxvit_t", "maxvit", "MaxVit"),
    ]
    for weights in torchvision.models.get_model_weights(name)
]


@pytest.mark.parametrize(("spec", "module", "cls"), _SIZED, ids=[s for s, _, _ in _SIZED])
def test_own_weights_get_the_input_size_torchvision_builds_for_the_pretrained_ones(
    spec, module, cls, monkeypatch
):
    # Oracle: the arguments that torchvision's own builder, get_model(name,
    # weights=...), hands the model class, as a ViT's image size (518 for vit_h_14's
    # default weights, whose position embedding is sized by it). The class records
    # them and stops the build, so nothing is built, read or fetched.
    def record(*args, **kwargs):
        raise _Built(kwargs)

    monkeypatch.setattr(getattr(torchvision.models, module), cls, record)
    name, weights = spec.split(":")[1:]
    with pytest.raises(_Built) as theirs:
        torchvision.models.get_model(name, weights=weights)
    with pytest.raises(_Built) as ours:
        pretrained.load_pretrained(spec, pretrained=False)
    # The class count, which torchvision passes by name, is the classes' default, 1000.
    expected = {k: v for k, v in theirs.value.args[0].items() if k != "num_classes"}
    assert ours.value.args[0] == expected and theirs.value.args[0]["num_classes"] == 1000


@pytest.mark.parametrize(
    ("name", "module", "cls"),
    [("googlenet", "googlenet", "GoogLeNet"), ("inception_v3", "inception", "Inception3")],
)
def test_own_weights_get_the_arguments_torchvision_builds_the_pretrained_ones_with(
    name, module, cls, monkeypatch
):
    # Oracle: the arguments torchvision's own builder, get_model(name, weights=...),
    # hands the model class (transform_input, init_weights), recorded as above so that
    # nothing is built; but for aux_logits, which it sets only to load the published
    # file's auxiliary heads and drops after loading: the model it returns has none.
    def record(*args, **kwargs):
        raise _Built(kwargs)

    # torchvision.models.googlenet is the builder function, its module is in sys.modules.
    monkeypatch.setattr(sys.modules[f"torchvision.models.{module}"], cls, record)
    with pytest.raises(_Built) as theirs:
        torchvision.models.get_model(name, weights="DEFAULT")
    with pytest.raises(_Built) as ours:
        pretrained.load_pretrained(f"torchvision:{name}", pretrained=False)
    expected = {k: v for k, v in theirs.value.args[0].items() if k != "num_classes"}
    assert ours.value.args[0] == {**expected, "aux_logits": False}
    assert theirs.value.args[0]["aux_logits"] is True


def test_damaged_cache_file_says_to_delete_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = pretrained.checkpoint_path(SPECS["resnet18"])
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"resnet18-f37072fd.pth.*delete it so that it is down"):
        bs.load_model(SPECS["resnet18"])


def test_a_cache_file_of_other_weights_names_the_missing_keys(tmp_path, monkeypatch):
    # A state dict that loads but is not these weights: torch's first two lines, the
    # second naming the keys.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = pretrained.checkpoint_path(SPECS["resnet18"])
    path.parent.mkdir(parents=True)
    state = torchvision.models.resnet18().state_dict()
    del state["fc.bias"]
    torch.save(state, path)
    with pytest.raises(InputError) as err:
        bs.load_model(SPECS["resnet18"])
    said = str(err.value)
    assert said.startswith(f"{path} does not hold the weights ResNet18_Weights.IMAGENET1K_V1 (")
    assert '"fc.bias"' in said and said.endswith("); delete it so that it is downloaded again")


def test_a_cache_file_with_every_key_renamed_is_named_in_a_short_line(tmp_path, monkeypatch):
    # nn.DataParallel's file ("module." before every key): torch's error lists every
    # key, its first two lines alone thousands of characters; the line gives the start
    # of torch's own text (oracle: torch's load_state_dict error on the same dict), cut
    # and marked as cut.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = pretrained.checkpoint_path(SPECS["resnet18"])
    path.parent.mkdir(parents=True)
    net = torchvision.models.resnet18()
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save(state, path)
    with pytest.raises(RuntimeError) as torch_said:
        net.load_state_dict(state)
    full = " ".join(line.strip() for line in str(torch_said.value).splitlines()[:2])
    with pytest.raises(InputError) as err:
        bs.load_model(SPECS["resnet18"])
    said = str(err.value)
    head = f"{path} does not hold the weights ResNet18_Weights.IMAGENET1K_V1 ("
    tail = "); delete it so that it is downloaded again"
    assert said.startswith(head) and said.endswith(tail) and "\n" not in said
    detail = said[len(head) : -len(tail)]
    assert len(full) > 1000 and detail.endswith(" ...") and len(detail) < 300
    assert full.startswith(detail.removesuffix(" ...")) and '"conv1.weight"' in detail


def test_missing_torchvision_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(InputError, match=r'pip install -e "\.\[vision\]"'):
        bs.load_model("torchvision:vgg16")
    argv = ["attack", "--model", "torchvision:vgg16", "--data", "digits", "--method", "gradient"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and '".[vision]"' in err_lines[0]


def test_grey_channels_with_an_rgb_preset_is_a_one_line_error(hub, tmp_path, capsys):
    with pytest.raises(InputError, match="channels=1 does not fit torchvision:resnet18"):
        bs.load_data("digits", preset="torchvision:resnet18", channels=1)
    argv = ["explain", "--model", SPECS["resnet18"], "--data", "digits", "--channels", "1"]
    assert main([*argv, "--method", "gradient", "--out", str(tmp_path / "run")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "takes RGB images" in err_lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("given", [["--mean", "0.5"], ["--std", "0.2"]])
def test_one_of_mean_and_std_next_to_a_preset_is_refused(hub, tmp_path, capsys, given):
    # It would pair the user's mean with the weights' std, or the other way round.
    argv = ["explain", "--model", SPECS["resnet18"], "--data", "digits", "--image-size", "32"]
    out = tmp_path / "run"
    assert main([*argv, *given, "--method", "gradient", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{given[0]} without --" in err[0]
    assert "expected both --mean and --std, or neither" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("given", ["mean", "std"])
def test_one_of_mean_and_std_next_to_a_preset_is_refused_in_python_too(hub, given):
    other = {"mean": "std", "std": "mean"}[given]
    with pytest.raises(InputError, match=rf"^{given} without {other}: torchvision:resnet18 brings"):
        bs.load_data("digits", preset=SPECS["resnet18"], image_size=32, **{given: [0.5] * 3})
    both = bs.load_data(
        "digits", preset=SPECS["resnet18"], image_size=32, mean=[0.5] * 3, std=[0.25] * 3
    )
    assert both.mean.flatten().tolist() == [0.5] * 3 and both.std.flatten().tolist() == [0.25] * 3


def test_preset_prepares_images_as_torchvision_transforms_do(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(300, 260), (250, 340)]
    for k, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{k}.png")
    data = bs.load_data(str(tmp_path), preset="torchvision:vgg16")
    transform = torchvision.models.VGG16_Weights.DEFAULT.transforms()
    for k in range(len(sizes)):
        raw = np.asarray(Image.open(tmp_path / f"{k}.png"), dtype=np.float32) / 255
        expected = transform(torch.from_numpy(raw).permute(2, 0, 1))
        torch.testing.assert_close(data.x[k], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(data.low, LOW)
    torch.testing.assert_close(data.high, HIGH)


@pytest.mark.parametrize("name", ["vgg11", "resnet18"])
def test_lrp_with_the_data_bounds_is_zennit_zbox(hub, name):
    net = bs.load_model(SPECS[name]).double()
    # zennit's merged BatchNorm still divides by sqrt(1 + eps); a tiny eps makes
    # that identity exact, so the comparison can be tight.
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.eps = 1e-12
    x = normalised(2, 32).double()
    target = net(x).argmax(1)
    ours = bs.explain(net, x, "lrp", target, low=LOW.double(), high=HIGH.double())
    low, high = LOW.double().expand_as(x), HIGH.double().expand_as(x)
    theirs = zennit_lrp(net, x.clone(), target, low, high, canonizers=[CANONIZERS[name]()])
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9 * float(theirs.abs().max()))


def _softplus_copy(spec, beta, dtype):
    twin = bs.load_model(spec).to(dtype)
    for parent in twin.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, nn.Softplus(beta))
    return twin


@pytest.mark.parametrize(
    "name, dtype, tol",
    [("resnet18", torch.float64, 1e-7), ("vgg11", torch.float32, 1e-4)],
)
def test_every_method_against_its_oracle(hub, name, dtype, tol):
    net = bs.load_model(SPECS[name]).to(dtype)
    x = normalised(2, 32, seed=1).to(dtype)
    t = net(x).argmax(1)
    scale = float(Saliency(net).attribute(x, target=t).abs().max())
    checks = {
        "gradient": ({}, Saliency(net).attribute(x, target=t, abs=False)),
        "input_x_gradient": ({}, InputXGradient(net).attribute(x, target=t)),
        "integrated_gradients": (
            {"steps": 6},
            IntegratedGradients(net).attribute(x, target=t, n_steps=6),
        ),
        "guided_backprop": ({}, GuidedBackprop(net).attribute(x, target=t)),
    }
    for method, (options, theirs) in checks.items():
        ours = bs.explain(net, x, method, t, **options)
        atol = tol * scale * (x.abs().max() if method != "gradient" else 1)
        # Captum 0.7's integrated gradients come back in float64 for a float32 input.
        theirs = theirs.to(ours.dtype)
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=float(atol), msg=method)
    twin = _softplus_copy(SPECS[name], 3.0, dtype)
    smooth = Saliency(twin).attribute(x, target=t, abs=False)
    ours = bs.explain(net, x, "beta_smooth", t, beta=3.0)
    torch.testing.assert_close(ours, smooth, rtol=tol, atol=tol * float(smooth.abs().max()))
    # SmoothGrad with one noise range per channel: the same seeded draws, scaled per channel.
    span = (HIGH - LOW).to(dtype)
    g = torch.Generator().manual_seed(5)
    draws = [0.1 * span * torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(3)]
    hand = torch.stack([Saliency(net).attribute(x + e, target=t, abs=False) for e in draws])
    sg = bs.explain(net, x, "smoothgrad", t, n=3, sigma=0.1, input_range=span, seed=5)
    torch.testing.assert_close(sg, hand.mean(0), rtol=tol, atol=tol * float(hand.abs().max()))


@pytest.mark.parametrize("name", ["vgg11", "resnet18"])
def test_short_attack_stays_in_the_per_channel_box(hub, name):
    net = bs.load_model(SPECS[name])
    x = normalised(2, 32, seed=2)
    maps = bs.heatmap(bs.explain(net, x, "gradient"))
    result = bs.manipulate(
        net, x, maps.flip(0), "gradient", steps=2, lr=0.05, data_range=(LOW, HIGH), check_every=1
    )
    assert bool(result.label_kept.all())
    assert bool((result.x_adv >= LOW).all()) and bool((result.x_adv <= HIGH).all())
    # Adam steps of about 0.05 push the pixels near a bound past it: each channel stops at its own.
    assert not torch.equal(result.x_adv, x)
    for c in range(3):
        channel = result.x_adv[:, c]
        assert bool(channel.eq(HIGH[0, c]).any() or channel.eq(LOW[0, c]).any())


def test_cli_explain_lrp_on_a_torchvision_preset_is_zennit(hub, tmp_path):
    folder = _photo_folder(tmp_path / "photos", seed=1)
    out = tmp_path / "run"
    argv = ["explain", "--model", SPECS["resnet18"], "--data", str(folder), "--method", "lrp"]
    assert main([*argv, "--image-size", "32", "--out", str(out), "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["mean"] == pytest.approx(MEAN.flatten().tolist())
    assert config["std"] == pytest.approx(STD.flatten().tolist())
    with np.load(out / "arrays" / "lrp-0.npz") as saved:
        x, saved_map = torch.from_numpy(saved["x"]).double(), torch.from_numpy(saved["map"])
    # --image-size replaces the preset's resize and crop; mean and std stay the weights' own.
    resized = [
        Image.open(folder / f"{k}.png").resize((32, 32), Image.Resampling.BILINEAR)
        for k in range(2)
    ]
    raw = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 255 for im in resized]))
    expected_x = (raw.permute(0, 3, 1, 2) - MEAN) / STD
    torch.testing.assert_close(x.float(), expected_x, rtol=1e-5, atol=1e-5)
    net = bs.load_model(SPECS["resnet18"]).double()
    target = net(x).argmax(1)
    # zennit's merged BatchNorm divides by sqrt(1 + eps) more: 1e-5 relative per layer.
    low, high = LOW.double().expand_as(x), HIGH.double().expand_as(x)
    r = zennit_lrp(net, x.clone(), target, low, high, canonizers=[ResNetCanonizer()])
    expected = r.abs().sum(1) / r.abs().sum((1, 2, 3)).view(-1, 1, 1)
    torch.testing.assert_close(saved_map.double(), expected, rtol=1e-4, atol=1e-7)
    records = read_jsonl(out / "results.jsonl")
    names = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
    assert [r["label_name"] for r in records] == [names[r["label"]] for r in records]


def test_the_model_is_the_one_torchvision_builds_with_its_weights(tmp_path, monkeypatch):
    # GoogLeNet takes ImageNet-normalised input and re-normalises it itself
    # (transform_input) only when built with weights; DenseNet's published
    # files hold older key names that its builder renames. Both are as
    # torchvision's own get_model(name, weights=...) makes them from the same file.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    x = normalised(2, 96)
    for seed, name in enumerate(["googlenet", "densenet121"]):
        torch.manual_seed(seed)
        state = torchvision.models.get_model(name, weights=None).state_dict()
        if name == "densenet121":
            # The published file predates BatchNorm's num_batches_tracked.
            state = {
                re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
                for k, v in state.items()
                if not k.endswith("num_batches_tracked")
            }
            assert any(".norm.1." in k for k in state)
        spec = f"torchvision:{name}"
        path = pretrained.checkpoint_path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        ours = bs.load_model(spec)
        theirs = torchvision.models.get_model(name, weights="DEFAULT").eval()
        assert getattr(ours, "transform_input", None) == getattr(theirs, "transform_input", None)
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x)), name
        # torchvision's own loading is left as it was (their model above read the file).
        weights = pretrained.weights_of(spec)
        assert "get_state_dict" not in vars(weights) and "get_state_dict" not in vars(type(weights))


def test_resume_and_sweep_refuse_a_checkpoint_changed_under_its_name(tmp_path, monkeypatch, capsys):
    # torchvision's file name stays when the weights change (random for real ones, a
    # fine-tuned file): a run must not mix two networks under one name.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    path = pretrained.checkpoint_path(SPECS["resnet18"])
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    first = path.read_bytes()
    folder = _photo_folder(tmp_path / "photos", seed=2)
    out = tmp_path / "run"
    argv = ["attack", "--model", SPECS["resnet18"], "--data", str(folder), "--image-size", "32"]
    argv += ["--method", "gradient", "-n", "2", "--steps", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["weights_sha256"] == hashlib.sha256(first).hexdigest()
    torch.manual_seed(5)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    capsys.readouterr()
    for command in (["sweep", str(out), "--betas", "5"], [*argv, "--resume"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "with another model: its weights file differs" in err[0]
        assert err[0].endswith(
            "put that file back, or run betasmooth attack again with a new --out"
        )
    assert not (out / "sweep.jsonl").exists()
    path.write_bytes(first)
    assert main(["sweep", str(out), "--betas", "5", "--no-progress"]) == 0


@pytest.mark.parametrize("where", ["torch.load", "get_model"])
def test_out_of_memory_while_loading_does_not_blame_the_cache_file(hub, monkeypatch, where):
    # Both were named a damaged file, "delete it so that it is downloaded again":
    # advice that loses good weights, offline for good.
    def hungry(*args, **kwargs):
        torch.empty(2**62, dtype=torch.uint8)  # torch's own CPU allocator error

    owner = torch if where == "torch.load" else torchvision.models
    monkeypatch.setattr(owner, where.split(".")[-1], hungry)
    with pytest.raises(OutOfMemory) as refused:
        bs.load_model(SPECS["resnet18"])
    message = str(refused.value)
    assert message.startswith("out of memory ") and "can't allocate memory" in message
    assert message.endswith("; expected more free memory: the model's weights alone do not fit")
    assert "delete" not in message
    assert pretrained.checkpoint_path(SPECS["resnet18"]).exists()


def test_a_spec_without_weights_is_torchvisions_default_not_the_first_weights():
    # resnet50's DEFAULT is IMAGENET1K_V2, with its own file and preprocessing (resize 232).
    expected = torchvision.models.get_model_weights("resnet50").DEFAULT
    assert expected.name == "IMAGENET1K_V2"
    assert pretrained.weights_of("torchvision:resnet50") is expected
    assert pretrained.checkpoint_path("torchvision:resnet50").name == expected.url.rsplit("/", 1)[1]
    prep = pretrained.preprocessing("torchvision:resnet50")
    assert (prep.resize, prep.crop) == (expected.transforms().resize_size[0], 224) == (232, 224)


def test_load_pretrained_gives_the_model_in_evaluation_mode(hub):
    # As torchvision's weights are meant to be used: BatchNorm on its running statistics.
    for weights in (False, True):
        model = pretrained.load_pretrained(SPECS["resnet18"], pretrained=weights)
        assert not any(m.training for m in model.modules()), weights
    x = normalised(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hub["resnet18"](x), rtol=0, atol=0)


def test_a_missing_file_is_downloaded_where_torchvision_keeps_it(tmp_path, monkeypatch):
    # Oracle: torchvision's own hub cache, <torch.hub.get_dir()>/checkpoints/<file name of
    # the weights' url>, for the weights asked for (mobilenet_v2's DEFAULT is V2, not V1),
    # into a cache folder that does not exist yet; torch.hub's fetch is stubbed (no
    # network), the module's download above it is the real one.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(pretrained, "download", DOWNLOAD)
    spec = "torchvision:mobilenet_v2:IMAGENET1K_V1"
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    expected = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[1]
    torch.manual_seed(4)
    net = torchvision.models.mobilenet_v2().eval()
    asked = []

    def unreachable(url, dst, *args, **kwargs):
        raise OSError("no network")

    def serve(url, dst, *args, **kwargs):
        asked.append((url, dst))
        torch.save(net.state_dict(), dst)  # fails where the folder was not made

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(InputError) as err:
        bs.load_model(spec)
    assert f"expected the file {expected.name} in {expected.parent} (torch hub cache" in str(
        err.value
    )
    monkeypatch.setattr(torch.hub, "download_url_to_file", serve)
    model = bs.load_model(spec)
    assert asked == [(weights.url, str(expected))] and expected.is_file()
    for key, value in net.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_categories_are_a_copy_of_the_weights_class_names():
    # Oracle: torchvision's weights meta. A caller that edits the list it was given
    # (relabels a class for a report) must not rename the class in torchvision's
    # enum, for every later model and call in the process.
    own = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    names = pretrained.categories("torchvision:resnet18")
    assert names == own and len(names) == 1000
    names[0] = "relabelled"
    assert own[0] == "tench" and pretrained.categories("torchvision:resnet18")[0] == "tench"
    # Weights without class names (VGG-16's feature extractor) have none.
    assert torchvision.models.VGG16_Weights.IMAGENET1K_FEATURES.meta["categories"] is None
    assert pretrained.categories("torchvision:vgg16:IMAGENET1K_FEATURES") is None


def test_the_cache_file_is_read_once_and_with_weights_only(hub, monkeypatch):
    # torchvision's own get_state_dict reads the hub file with weights_only=False; the
    # model must be built from the state read safely, so torch.load is called once per
    # load, on the cached file, with weights_only=True (oracle: the calls recorded).
    calls = []
    load = torch.load

    def recording(path, *args, **kwargs):
        calls.append((str(path), kwargs.get("weights_only")))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    for name, spec in SPECS.items():
        calls.clear()
        model = bs.load_model(spec)
        assert calls == [(str(pretrained.checkpoint_path(spec)), True)], name
        for key, value in hub[name].state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
