"""Built-in data and model, and loading of user data and models, against hand computations."""

from __future__ import annotations

import copy
import io
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.transform import resize
from sklearn.datasets import load_digits
from torch import nn

import betasmooth as bs
from betasmooth.checkpoint import load_state_dict, read_npz
from betasmooth.store import read_jsonl
from betasmooth.validate import InputError, check_bounds
from betasmooth.zoo import BUILTIN_DATA, BUILTIN_MODELS, check_compatible, data_range

# ----------------------------------------------------------------------- digits


def test_digits_is_sklearn_digits_upsampled_bilinearly() -> None:
    x, y = bs.load_data("digits", split="all")
    raw = load_digits()
    assert x.shape == (1797, 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.long and torch.equal(y, torch.from_numpy(raw.target).long())
    expected = np.stack(
        [
            resize(im / 16.0, (32, 32), order=1, mode="edge", anti_aliasing=False)
            for im in raw.images
        ]
    )
    np.testing.assert_allclose(x[:, 0].numpy(), expected, atol=1e-6)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_digits_split_sizes_disjoint_stratified_and_fixed() -> None:
    x_all, y_all = bs.load_data("digits", split="all")
    x_tr, y_tr = bs.load_data("digits", split="train")
    x_te, y_te = bs.load_data("digits", split="test")
    assert (len(y_tr), len(y_te)) == (1347, 450)
    # Every image lands in exactly one split: match rows of the splits to rows of "all".
    flat = x_all.flatten(1)
    rows_tr = torch.cdist(x_tr.flatten(1), flat).argmin(1)
    rows_te = torch.cdist(x_te.flatten(1), flat).argmin(1)
    assert torch.equal(x_all[rows_te], x_te) and torch.equal(y_all[rows_te], y_te)
    assert torch.equal(x_all[rows_tr], x_tr)
    assert sorted(torch.cat([rows_tr, rows_te]).tolist()) == list(range(1797))
    # Stratified: each class is within one image of a quarter in the test split.
    counts_all = torch.bincount(y_all, minlength=10).double()
    assert (torch.bincount(y_te, minlength=10) - counts_all / 4).abs().max() <= 1
    again, _ = bs.load_data("digits", split="test")
    assert torch.equal(again, x_te)
    x_te[0] = 7.0  # an edit by a caller must not reach the cache
    assert float(bs.load_data("digits", split="test")[0].max()) == 1.0


def test_digits_options_resize_channels_normalise() -> None:
    base, _ = bs.load_data("digits", split="test")
    x, _ = bs.load_data("digits", image_size=16, channels=3, mean=0.5, std=0.25)
    assert x.shape == (450, 3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 2])
    small = F.interpolate(base, size=(16, 16), mode="bilinear", antialias=True)
    torch.testing.assert_close(x[:, 1:2], (small - 0.5) / 0.25)
    assert data_range("digits") == (0.0, 1.0)
    assert data_range("digits", mean=[0.5, 0.4, 0.3], std=0.25) == pytest.approx((-2.0, 2.8))


# --------------------------------------------------------------- built-in model


def _reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for i in (0, 3, 6):
        x = F.max_pool2d(
            F.relu(F.conv2d(x, state[f"{i}.weight"], state[f"{i}.bias"], padding=1)), 2
        )
    x = F.relu(F.linear(x.flatten(1), state["10.weight"], state["10.bias"]))
    return F.linear(x, state["12.weight"], state["12.bias"])


def test_digits_cnn_accuracy_and_determinism(digits, digits_cnn) -> None:
    x, y = digits
    assert not digits_cnn.training
    assert isinstance(digits_cnn, nn.Sequential)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in digits_cnn.modules())
    with torch.no_grad():
        logits = digits_cnn(x)
        again = bs.load_model("digits-cnn")(x)
    accuracy = (logits.argmax(1) == y).double().mean().item()
    assert accuracy >= 0.97
    assert torch.equal(logits, again)
    state = {k: v.detach() for k, v in digits_cnn.state_dict().items()}
    torch.testing.assert_close(logits[:32], _reference_forward(state, x[:32]))


# ----------------------------------------------------------------- user models

FACTORY = """
import torch
from torch import nn


def make():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]]))
        model.bias.copy_(torch.tensor([0.5, -0.5]))
    return model.train()


def not_a_model():
    return 42
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "user_net.py"
    path.write_text(FACTORY)
    return path


def test_factory_by_file_path(factory_file) -> None:
    model = bs.load_model(f"{factory_file}:make")
    assert not model.training
    out = model(torch.tensor([[1.0, 1.0, 1.0]]))
    torch.testing.assert_close(out, torch.tensor([[6.5, -0.5]]))


def test_factory_by_module_path(factory_file, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(factory_file.parent))
    monkeypatch.delitem(sys.modules, "user_net", raising=False)
    model = bs.load_model("user_net:make")
    torch.testing.assert_close(model(torch.zeros(1, 3)), torch.tensor([[0.5, -0.5]]))
    with pytest.raises(InputError, match="returned int; expected an nn.Module"):
        bs.load_model("user_net:not_a_model")
    with pytest.raises(InputError, match="'missing' in user_net is not defined"):
        bs.load_model("user_net:missing")


FORM = "expected (x, y): x a floating tensor (N, C, H, W), y integer labels (N,)"


@pytest.mark.parametrize(
    ("loader", "said"),
    [
        (lambda split: torch.rand(3, 1, 8, 8), f"returned Tensor; {FORM}"),
        (
            lambda split: (torch.rand(3, 1, 8, 8), torch.zeros(2, dtype=torch.long)),
            f"returned x of shape (3, 1, 8, 8) (torch.float32) and y of shape (2,) "
            f"(torch.int64); {FORM}",
        ),
        (
            lambda split: (torch.rand(3, 8, 8), torch.zeros(3, dtype=torch.long)),
            f"returned x of shape (3, 8, 8) (torch.float32) and y of shape (3,) "
            f"(torch.int64); {FORM}",
        ),
        (
            lambda: (torch.rand(3, 1, 8, 8), torch.zeros(3)),
            "cannot be called as fn(split) (too many positional arguments); expected that form",
        ),
        (
            lambda split: (torch.rand(3, 1, 8, 8), torch.zeros(3, dtype=torch.bool)),
            f"returned x of shape (3, 1, 8, 8) (torch.float32) and y of shape (3,) "
            f"(torch.bool); {FORM}",
        ),
        (
            lambda split: (torch.rand(3, 1, 8, 8), torch.zeros(3)),
            f"returned x of shape (3, 1, 8, 8) (torch.float32) and y of shape (3,) "
            f"(torch.float32); {FORM}",
        ),
        (
            lambda split: (
                torch.zeros(3, 1, 8, 8, dtype=torch.uint8),
                torch.zeros(3, dtype=torch.long),
            ),
            f"returned x of shape (3, 1, 8, 8) (torch.uint8) and y of shape (3,) "
            f"(torch.int64); {FORM}",
        ),
    ],
    ids=["x alone", "short y", "no channel axis", "no split", "bool y", "float y", "uint8 x"],
)
def test_an_added_model_or_data_entry_of_another_form_is_named(loader, said) -> None:
    # Entries users add to the tables: checked where they are loaded, naming the entry
    # (before, a short y passed and failed later as an IndexError, None as AttributeError).
    BUILTIN_DATA["mine"] = loader
    with pytest.raises(InputError) as err:
        bs.load_data("mine")
    assert str(err.value) == f"the loader of data 'mine' {said}"
    BUILTIN_MODELS["nothing"] = lambda: None
    with pytest.raises(InputError) as err:
        bs.load_model("nothing")
    assert str(err.value) == "model 'nothing' came back as NoneType; expected an nn.Module"


def test_weights_round_trip(factory_file, tmp_path) -> None:
    trained = nn.Linear(3, 2)
    torch.nn.init.constant_(trained.weight, 0.25)
    torch.nn.init.constant_(trained.bias, 1.0)
    path = tmp_path / "w.pt"
    torch.save(trained.state_dict(), path)
    model = bs.load_model(f"{factory_file}:make", weights=path)
    torch.testing.assert_close(model(torch.ones(1, 3)), torch.tensor([[1.75, 1.75]]))


class _Trap:
    """Unpickling this would create a file: the loader must never do it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_unrun(factory_file, tmp_path) -> None:
    marker = tmp_path / "ran"
    trap = tmp_path / "trap.pkl"
    trap.write_bytes(pickle.dumps(_Trap(marker)))
    whole = tmp_path / "module.pt"
    torch.save(nn.Linear(3, 2), whole)
    # torch.save's own archive whose pickle calls print by an opcode (INST) that
    # torch's unpickler refuses without naming a global.
    archive = tmp_path / "inst.pt"
    torch.save(nn.Linear(3, 2).state_dict(), archive)
    with zipfile.ZipFile(archive) as source:
        parts = {n: source.read(n) for n in source.namelist()}
    with zipfile.ZipFile(archive, "w") as target:
        for name, data in parts.items():
            hostile = f"(ibuiltins\nprint\n{marker}\n.".encode()
            target.writestr(name, b"\x80\x02" + hostile if name.endswith("data.pkl") else data)
    for path in (trap, whole, archive):
        with pytest.raises(
            InputError, match=r"is not a state dict .*torch\.save\(model\.state_dict"
        ):
            bs.load_model(f"{factory_file}:make", weights=path)
    assert not marker.exists()
    checkpoint = tmp_path / "checkpoint.pt"
    for key in ("state_dict", "model_state_dict", "model"):
        torch.save({key: nn.Linear(3, 2).state_dict(), "epoch": 3}, checkpoint)
        with pytest.raises(InputError, match=f"not a state dict .*under key '{key}'"):
            load_state_dict(checkpoint)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5, "torch.save"])
def test_a_trap_of_any_pickle_protocol_is_refused_unrun_in_one_line(tmp_path, protocol):
    # A state dict whose tensor is an object that would create a file when unpickled:
    # whatever the pickle's protocol or container, the file is never created and the
    # error is one line naming the file. Where the pickle names its callable by the
    # GLOBAL opcode (protocols 1 to 3 and torch.save's archive), that callable
    # (io.open, which builtins.open is) is named as refused; protocol 0 starts with no
    # protocol byte, so it is no file of torch.save.
    marker = tmp_path / "ran"
    path = tmp_path / "trap.pt"
    state = {"weight": _Trap(marker)}
    if protocol == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=protocol))
    # torch warns of a protocol other than 2 before refusing it: the one line is all
    # the user sees, so no warning may escape (turned into errors here).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError) as info:
            load_state_dict(path)
    message = str(info.value)
    assert not marker.exists()
    assert "\n" not in message and str(path) in message
    assert message.rstrip(")").endswith(
        "expected a file written by torch.save(model.state_dict(), ..."
    )
    if protocol in (1, 2, 3, "torch.save"):
        assert "refused the pickled object io.open without running it" in message
    elif protocol == 0:
        assert message.startswith(f"cannot read weights file {path}: it is not a file written by "
                                  "torch.save (it starts with b'(dp0')")  # fmt: skip
    else:
        # STACK_GLOBAL: torch's words for it vary by version; the refusal is what counts.
        assert "without running it" in message


def test_a_refused_pickle_is_named_by_its_class_and_a_key_must_be_a_name(tmp_path) -> None:
    whole = tmp_path / "module.pt"
    torch.save(nn.Linear(3, 2), whole)
    with pytest.raises(InputError) as info:
        load_state_dict(whole)
    assert str(info.value) == (
        f"{whole} is not a state dict (torch.load with weights_only=True refused the pickled "
        "object torch.nn.modules.linear.Linear without running it; expected a file written by "
        "torch.save(model.state_dict(), ...))"
    )
    # A tensor under a key that is no name (an index) is no state dict either.
    numbered = tmp_path / "numbered.pt"
    torch.save({0: torch.zeros(2)}, numbered)
    with pytest.raises(
        InputError,
        match=r"numbered\.pt is not a state dict \(entry 0 has a key that is not a name; ",
    ):
        load_state_dict(numbered)


def test_a_damaged_pickle_of_any_protocol_or_a_list_says_so_in_one_line(tmp_path) -> None:
    # A pickle of protocol 4 (b"\\x80\\x04") that torch cannot read is a pickle: torch's own
    # reason is given, not "not a file written by torch.save"; a list of tensors is
    # no state dict, said as such rather than raised raw.
    damaged = tmp_path / "p4.pt"
    damaged.write_bytes(b"\x80\x04junkjunkjunk")
    with pytest.raises(InputError) as info:
        load_state_dict(damaged)
    assert str(damaged) in str(info.value)
    assert "it is not a file written by torch.save" not in str(info.value)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(InputError, match=r"list\.pt is not a state dict \(it holds a list; "):
        load_state_dict(listed)


def test_weights_of_the_same_size_but_another_shape_are_refused(tmp_path) -> None:
    from betasmooth.checkpoint import apply_weights

    model = nn.Linear(4, 2)
    path = tmp_path / "transposed.pt"
    state = model.state_dict()
    torch.save({"weight": state["weight"].T.contiguous(), "bias": state["bias"]}, path)
    with pytest.raises(InputError, match=r"shape mismatch: weight \(4, 2\) vs model \(2, 4\)"):
        apply_weights(model, path)


def test_missing_or_mismatched_weights(factory_file, tmp_path) -> None:
    with pytest.raises(InputError, match="weights file .*nope.pt does not exist"):
        bs.load_model(f"{factory_file}:make", weights=tmp_path / "nope.pt")
    path = tmp_path / "other.pt"
    torch.save(nn.Linear(4, 2).state_dict(), path)
    with pytest.raises(InputError, match=r"shape mismatch: weight \(2, 4\) vs model \(2, 3\)"):
        bs.load_model(f"{factory_file}:make", weights=path)
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(InputError, match="missing keys: weight, bias; unexpected keys: w"):
        bs.load_model(f"{factory_file}:make", weights=path)
    # Three names in full; a fourth and more only as "...".
    for n, shown in ((3, "a, b, c)"), (4, "a, b, c ...)")):
        torch.save(
            {**nn.Linear(3, 2).state_dict(), **{k: torch.zeros(1) for k in "abcd"[:n]}}, path
        )
        with pytest.raises(InputError, match=f"unexpected keys: {re.escape(shown)}"):
            bs.load_model(f"{factory_file}:make", weights=path)


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_an_error_is_told_in_one_line_of_at_most_200_characters() -> None:
    from betasmooth.checkpoint import reason

    assert reason(ValueError("y" * 200 + "\nsecond line")) == "ValueError: " + "y" * 200
    assert reason(ValueError("x" * 201)) == "ValueError: " + "x" * 197 + "..."
    assert reason(EOFError()) == "EOFError"
    # Blank lines and indentation before the message are not its first line.
    assert reason(OSError("\n  disk full\n  more")) == "OSError: disk full"


def test_damaged_or_foreign_weights_files_say_what_they_are(factory_file, tmp_path) -> None:
    path = tmp_path / "w.pt"
    torch.save(nn.Linear(50, 50).state_dict(), path)
    whole = path.read_bytes()
    cases = {
        whole[: len(whole) // 2]: r"it is damaged or cut short \(a zip archive without its end\)",
        b"": r"the file is empty",
        b"hello world\n": r"it is not a file written by torch.save \(it starts with b'hell'\)",
        # torch's unpickler refuses this one, which is no pickled object either.
        b"weights\n": r"it is not a file written by torch.save \(it starts with b'weig'\)",
        # A zip that holds an .npy among other files is no .npz: torch's own reason.
        _zip({"a.npy": b"", "notes.txt": b"hi"}): r"RuntimeError: .*not in a subdirectory: a.npy",
    }
    # safetensors: the length of its JSON header (8 bytes, little-endian), then the header.
    header = b'{"weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    cases[len(header).to_bytes(8, "little") + header + bytes(4)] = (
        r"it is a safetensors file; save its tensors with "
        r"torch\.save\(safetensors\.torch\.load_file\(path\), 'weights\.pt'\)"
    )
    for content, message in cases.items():
        path.write_bytes(content)
        with pytest.raises(InputError, match=rf"cannot read weights file .*w.pt: {message}; "):
            bs.load_model(f"{factory_file}:make", weights=path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still written
        torch.jit.save(torch.jit.trace(nn.Linear(3, 2), torch.rand(1, 3)), path)
    with pytest.raises(InputError, match=r"w\.pt: it is a TorchScript archive \(torch\.jit\.save"):
        bs.load_model(f"{factory_file}:make", weights=path)


def test_weights_that_torch_loads_are_loaded(tmp_path) -> None:
    # As nn.Module.load_state_dict(strict=True): an older BatchNorm state dict
    # without num_batches_tracked loads; so do the keys of a DataParallel model.
    (tmp_path / "bn.py").write_text(
        "from torch import nn\n\n\ndef make():\n"
        "    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten())\n"
    )
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten())
    with torch.no_grad():
        trained[1].running_mean.uniform_()
    x = torch.rand(2, 1, 5, 5)
    expected = trained.eval()(x)
    old = {k: v for k, v in trained.state_dict().items() if "num_batches_tracked" not in k}
    # Prefixes of DataParallel, torch.compile, a Lightning module holding self.model,
    # and both of the last two: every key shares them.
    wrapped = [
        {f"{prefix}{k}": v for k, v in trained.state_dict().items()}
        for prefix in ("module.", "_orig_mod.", "model.", "model._orig_mod.")
    ]
    for name, state in (("old.pt", old), *((f"wrapped{i}.pt", w) for i, w in enumerate(wrapped))):
        torch.save(state, tmp_path / name)
        model = bs.load_model(f"{tmp_path / 'bn.py'}:make", weights=tmp_path / name)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    # A prefix that leaves no key of the model is not stripped: the keys are named as found.
    torch.save({f"model.{k}x": v for k, v in old.items()}, tmp_path / "other.pt")
    with pytest.raises(InputError, match=r"\(missing keys: 0\.weight, .*unexpected keys: model\."):
        bs.load_model(f"{tmp_path / 'bn.py'}:make", weights=tmp_path / "other.pt")
    # Other missing keys are still named.
    torch.save({k: v for k, v in old.items() if k != "1.running_var"}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match=r"\(missing keys: 1\.running_var\);"):
        bs.load_model(f"{tmp_path / 'bn.py'}:make", weights=tmp_path / "bad.pt")
    # An .npz given as weights is named as such.
    np.savez(tmp_path / "w.npz", x=np.zeros(3))
    with pytest.raises(InputError, match=r"w\.npz: it is a NumPy \.npz archive, not a file of"):
        bs.load_model(f"{tmp_path / 'bn.py'}:make", weights=tmp_path / "w.npz")


@pytest.mark.parametrize("name", ["w.pt", "w.pth", "w.bin", "w.safetensors", "w.ckpt", "W.CKPT"])
def test_every_weights_file_as_a_model_spec_is_pointed_to_weights(name) -> None:
    # Lightning's .ckpt, and suffixes in capitals, are weights too.
    with pytest.raises(InputError) as err:
        bs.load_model(name)
    assert str(err.value) == (
        f"unknown model spec {name!r}; expected a model built by code, e.g. "
        f"'path/to/file.py:factory'; {name} goes in --weights (weights= of bs.load_model) "
        "as a state dict"
    )


@pytest.mark.parametrize("factory", ["make()", "make-model", ""])
def test_a_factory_that_is_no_name_is_refused_before_the_file_runs(tmp_path, factory) -> None:
    ran = tmp_path / "ran"
    path = tmp_path / "net.py"
    path.write_text(f"open({str(ran)!r}, 'w').close()\ndef make():\n    return None\n")
    spec = f"{path}:{factory}"
    with pytest.raises(InputError) as err:
        bs.load_model(spec)
    assert str(err.value).startswith(
        f"unknown model spec {spec!r}; expected a built-in name ('digits-cnn' or 'photos-cnn')"
    )
    assert not ran.exists()


def test_unknown_model_specs(tmp_path) -> None:
    forms = r"'digits-cnn'.*'torchvision:NAME\[:WEIGHTS\]'.*file.py:factory"
    with pytest.raises(InputError, match=f"unknown model spec 'resnet'.*{forms}"):
        bs.load_model("resnet")
    # A file without its factory, and weights for a model, are told the form that fits them.
    with pytest.raises(InputError, match=r"'net\.py'; expected net\.py:NAME, NAME the function"):
        bs.load_model("net.py")
    with pytest.raises(
        InputError, match=r"'w\.pth'; expected a model built by .*w\.pth goes in --w"
    ):
        bs.load_model("w.pth")
    with pytest.raises(InputError, match="model file .*absent.py does not exist"):
        bs.load_model(f"{tmp_path / 'absent.py'}:make")
    with pytest.raises(InputError, match="cannot import module 'no_such_module_xyz'"):
        bs.load_model("no_such_module_xyz:make")
    broken = tmp_path / "broken.py"
    broken.write_text("def make(:\n")
    with pytest.raises(InputError, match="importing .*broken.py failed: SyntaxError"):
        bs.load_model(f"{broken}:make")


def test_a_model_file_whose_import_failed_is_run_again_not_half_loaded(tmp_path) -> None:
    # The module of a failed import is forgotten: loading the file again runs it again
    # (and fails again), rather than taking the factory it defined before it failed.
    path = tmp_path / "half.py"
    path.write_text(
        "from torch import nn\n\ndef make():\n    return nn.Linear(2, 2)\n\n"
        "raise RuntimeError('needs a GPU')\n"
    )
    for _ in range(2):
        with pytest.raises(InputError, match=r"importing .*half.py failed: RuntimeError"):
            bs.load_model(f"{path}:make")


def test_check_compatible(digits_cnn) -> None:
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = digits_cnn(x[:1])
    torch.testing.assert_close(check_compatible(digits_cnn, x), expected)
    with pytest.raises(InputError, match=r"model does not accept input of shape \(1, 28, 28\)"):
        check_compatible(digits_cnn, torch.rand(2, 1, 28, 28))
    with pytest.raises(InputError, match=r"model does not accept input of shape \(3, 32, 32\)"):
        check_compatible(digits_cnn, torch.rand(2, 3, 32, 32))
    assert not digits_cnn.training


def test_check_compatible_runs_a_training_model_in_evaluation_mode() -> None:
    # Batch norm's running statistics and dropout act as in eval(); the model's
    # mode and buffers come back unchanged. Oracle: a deep copy put in eval().
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5)]
    net = nn.Sequential(*layers, nn.Linear(3 * 6 * 6, 4))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    reference = copy.deepcopy(net).eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        expected = reference(x[:1])
    torch.testing.assert_close(check_compatible(net, x), expected)
    assert net.training
    torch.testing.assert_close(net[1].running_mean, reference[1].running_mean, rtol=0, atol=0)


# ------------------------------------------------------------------- user data


def _png(path, array, mode) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


def test_folder_with_class_subfolders(tmp_path) -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    _png(tmp_path / "b_cat" / "2.png", grey, "L")
    _png(tmp_path / "b_cat" / "1.png", 255 - grey, "L")
    _png(tmp_path / "a_dog" / "x.png", grey[::-1], "L")
    x, y = bs.load_data(str(tmp_path))
    assert x.shape == (3, 1, 3, 4) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 1]  # a_dog, then b_cat/1.png, b_cat/2.png
    torch.testing.assert_close(x[0, 0], torch.from_numpy(grey[::-1] / 255).float())
    torch.testing.assert_close(x[1, 0], torch.from_numpy((255 - grey) / 255).float())
    torch.testing.assert_close(x[2, 0], torch.from_numpy(grey / 255).float())
    normalised, _ = bs.load_data(str(tmp_path), mean=0.5, std=0.25)
    torch.testing.assert_close(normalised, (x - 0.5) / 0.25)


def test_flat_folder_rgb_to_grey_and_resize(tmp_path) -> None:
    red = np.zeros((6, 10, 3), dtype=np.uint8)
    red[..., 0] = 255
    _png(tmp_path / "red.png", red, "RGB")
    _png(tmp_path / "grey.png", np.full((8, 8), 100), "L")
    with pytest.raises(InputError, match=r"image .*red.png is 10x6 but .*grey.png is 8x8"):
        bs.load_data(str(tmp_path))
    # One colour image makes the folder RGB, though the grey one comes first by name;
    # grey repeats to three channels, as Pillow's convert("RGB").
    x, y = bs.load_data(str(tmp_path), image_size=(4, 5))
    assert x.shape == (2, 3, 4, 5) and y.tolist() == [-1, -1]
    torch.testing.assert_close(x[0], torch.full((3, 4, 5), 100 / 255))
    torch.testing.assert_close(x[1], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 4, 5))
    # Pillow's RGB -> L: (299 R + 587 G + 114 B) / 1000, rounded down: 76 for pure red.
    grey, _ = bs.load_data(str(tmp_path), image_size=4, channels=1)
    assert grey.shape == (2, 1, 4, 4)
    torch.testing.assert_close(grey[1], torch.full((1, 4, 4), 76 / 255))
    # Only grey images: grey.
    (tmp_path / "red.png").unlink()
    assert bs.load_data(str(tmp_path)).x.shape == (1, 1, 8, 8)


def test_a_grey_image_after_a_colour_one_takes_the_folders_three_channels(tmp_path) -> None:
    # Every image is read with the folder's channels, not with its own mode:
    # a grey image sorted after a colour one repeats to RGB, as Pillow's convert("RGB").
    rng = np.random.default_rng(5)
    colour = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (4, 5), dtype=np.uint8)
    _png(tmp_path / "a.png", colour, "RGB")
    _png(tmp_path / "b.png", grey, "L")
    x, _ = bs.load_data(str(tmp_path))
    expected = np.stack([colour, np.asarray(Image.open(tmp_path / "b.png").convert("RGB"))])
    np.testing.assert_allclose(x.numpy(), expected.transpose(0, 3, 1, 2) / 255, atol=1e-7)


def test_folder_images_are_laid_out_as_the_arrays_a_run_reads_back(tmp_path) -> None:
    # The oracle: torchvision's PIL-to-tensor, then the contiguous copy a run stores in x.npz.
    # A channels-last batch gives other float32 maps on some convolution kernels.
    from torchvision.transforms.functional import pil_to_tensor

    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        _png(tmp_path / name, rng.integers(0, 256, (5, 7, 3)), "RGB")
    x = bs.load_data(str(tmp_path), mean=0.5, std=0.25).x
    expected = torch.stack([pil_to_tensor(Image.open(tmp_path / n)) for n in ("a.png", "b.png")])
    torch.testing.assert_close(x, (expected / 255 - 0.5) / 0.25)
    assert x.stride() == x.contiguous().stride()


def test_names_that_are_not_utf8_are_written_with_the_replacement_character(tmp_path) -> None:
    # A Latin-1 name from an old archive: its bytes decode as Python's own "replace" decodes
    # them, so that the report, the figures and stdout can write it.
    folder = os.fsencode(tmp_path / "d")
    try:
        os.makedirs(os.path.join(folder, b"c\xfels"))
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    # Saved through an open file: Pillow before 10 takes no bytes path.
    with open(os.path.join(folder, b"c\xfels", b"caf\xe9.png"), "wb") as file:
        Image.new("L", (4, 4)).save(file, format="PNG")
    _png(tmp_path / "d" / "ok" / "b.png", np.zeros((4, 4)), "L")
    data = bs.load_data(str(tmp_path / "d"))
    name = b"c\xfels".decode("utf-8", "replace")
    assert data.classes == [name, "ok"]
    file = b"caf\xe9.png".decode("utf-8", "replace")
    assert data.files == [f"{name}/{file}", "ok/b.png"]
    assert all(n.encode("utf-8") for n in data.files + data.classes)


def test_folder_names_its_classes_and_files(tmp_path) -> None:
    _png(tmp_path / "zebra" / "b.png", np.zeros((4, 4)), "L")
    _png(tmp_path / "zebra" / "a.png", np.zeros((4, 4)), "L")
    _png(tmp_path / "Apple" / "x.png", np.zeros((4, 4)), "L")
    data = bs.load_data(str(tmp_path))
    # Sorted as torchvision's ImageFolder sorts: upper case first.
    assert data.classes == ["Apple", "zebra"] and data.y.tolist() == [0, 1, 1]
    assert data.files == ["Apple/x.png", "zebra/a.png", "zebra/b.png"]
    assert data.about(2) == {"file": "zebra/b.png", "true_label_name": "zebra"}
    again = pickle.loads(pickle.dumps(data))
    assert again.classes == data.classes and again.files == data.files
    assert bs.load_data("digits").about(0) == {} and bs.load_data("digits").files is None


def test_an_unknown_label_is_given_no_class_name():
    # -1 is an unknown label: no class of its own, not the last class counted from the end.
    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([-1, 1, 2])
    low, high = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    data = bs.ImageData(x, y, low, high, low, high, classes=["cat", "dog"])
    assert data.about(0) == {} and data.about(1) == {"true_label_name": "dog"}
    assert data.about(2) == {}


def test_folder_reads_classes_as_torchvision_image_folder(tmp_path) -> None:
    # The oracle: torchvision's ImageFolder, nested folders and their order included.
    from torchvision.datasets import ImageFolder

    for name in ("b/z.png", "b/sub/y.png", "b/sub/deeper/x.png", "a/q.png", "a/a1/p.png"):
        _png(tmp_path / "n" / name, np.zeros((4, 4)), "L")
    data = bs.load_data(str(tmp_path / "n"))
    theirs = ImageFolder(str(tmp_path / "n"))
    assert data.files == [Path(p).relative_to(tmp_path / "n").as_posix() for p, _ in theirs.samples]
    assert data.y.tolist() == [label for _, label in theirs.samples]
    assert data.classes == theirs.classes
    # An empty class folder is refused, as ImageFolder refuses it.
    _png(tmp_path / "c" / "a" / "0.png", np.zeros((4, 4)), "L")
    _png(tmp_path / "c" / "c" / "0.png", np.zeros((4, 4)), "L")
    (tmp_path / "c" / "b").mkdir()
    with pytest.raises(InputError, match=r"class folder .*c/b holds no images; expected images"):
        bs.load_data(str(tmp_path / "c"))
    # Splits taken for classes: read, and said.
    _png(tmp_path / "s" / "train" / "cat" / "0.png", np.zeros((4, 4)), "L")
    _png(tmp_path / "s" / "val" / "cat" / "0.png", np.zeros((4, 4)), "L")
    with pytest.warns(UserWarning, match=r"\(train, val\) hold their images only in subfolders"):
        assert bs.load_data(str(tmp_path / "s")).classes == ["train", "val"]


def test_folder_skips_hidden_files_and_folders_and_run_directories(tmp_path, capsys) -> None:
    from betasmooth.cli import main

    for name in ("cat/0.png", "dog/1.png"):
        _png(tmp_path / "n" / name, np.zeros((4, 4)), "L")
    # A notebook's checkpoints, macOS's resource forks (no images at all) and a
    # hidden class folder.
    _png(tmp_path / "n" / "dog" / ".ipynb_checkpoints" / "1-checkpoint.png", np.zeros((4, 4)), "L")
    (tmp_path / "n" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    _png(tmp_path / "n" / ".trash" / "2.png", np.zeros((4, 4)), "L")
    # A run written into the data folder, with its report's figures (PNG images).
    argv = ["explain", "--model", "digits-cnn", "--data", str(tmp_path / "n"), "--channels", "1"]
    argv += ["--image-size", "32", "--method", "gradient", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "n" / "00run")]) == 0
    assert list((tmp_path / "n" / "00run").rglob("*.png"))
    data = bs.load_data(str(tmp_path / "n"))
    assert data.files == ["cat/0.png", "dog/1.png"] and data.classes == ["cat", "dog"]
    flat = tmp_path / "flat"
    _png(flat / "a.png", np.zeros((4, 4)), "L")
    _png(flat / ".thumb.png", np.ones((4, 4)), "L")
    (flat / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    assert bs.load_data(str(flat)).files == ["a.png"]


def test_folder_order_is_sorted_for_loose_images_and_sibling_subfolders(tmp_path) -> None:
    # The oracle: torchvision's ImageFolder (sorted os.walk) for the class folder, and
    # sorted names for a flat folder, whatever order the file system lists them in.
    from torchvision.datasets import ImageFolder

    names = ["q", "c", "x", "a", "m", "z", "f", "k"]
    for i, name in enumerate(names):
        _png(tmp_path / "flat" / f"{name}.png", np.full((2, 2), i), "L")
        _png(tmp_path / "n" / "cls" / name / "0.png", np.full((2, 2), i), "L")
    _png(tmp_path / "n" / "cls" / "top.png", np.zeros((2, 2)), "L")
    flat = bs.load_data(str(tmp_path / "flat"))
    assert flat.files == [f"{name}.png" for name in sorted(names)]
    values = [names.index(name) / 255 for name in sorted(names)]
    torch.testing.assert_close(flat.x[:, 0, 0, 0], torch.tensor(values))
    data = bs.load_data(str(tmp_path / "n"))
    theirs = ImageFolder(str(tmp_path / "n"))
    assert data.files == [Path(p).relative_to(tmp_path / "n").as_posix() for p, _ in theirs.samples]
    assert data.files == ["cls/top.png"] + [f"cls/{name}/0.png" for name in sorted(names)]


def test_an_npz_file_with_an_upper_case_suffix_is_read(tmp_path) -> None:
    x = np.random.default_rng(0).random((3, 1, 4, 4)).astype(np.float32)
    path = tmp_path / "data.NPZ"
    with path.open("wb") as f:
        np.savez(f, x=x, y=np.array([2, 0, 1]))
    data = bs.load_data(str(path))
    torch.testing.assert_close(data.x, torch.from_numpy(x))
    assert data.y.tolist() == [2, 0, 1]


def test_sixteen_bit_grey_and_bmp(tmp_path) -> None:
    deep = np.array([[0, 4000], [30000, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "a.png")
    _png(tmp_path / "b.bmp", [[0, 51], [102, 255]], "L")
    x, _ = bs.load_data(str(tmp_path))
    assert x.shape == (2, 1, 2, 2)  # 16-bit grey is grey: no colour image in the folder
    torch.testing.assert_close(x[0, 0], torch.from_numpy(deep / 65535).float())
    torch.testing.assert_close(x[1, 0], torch.tensor([[0.0, 0.2], [0.4, 1.0]]))
    x3, _ = bs.load_data(str(tmp_path), channels=3)
    assert x3.shape == (2, 3, 2, 2)
    torch.testing.assert_close(x3, x.expand(-1, 3, -1, -1))


def test_folder_reads_every_format_torchvision_image_folder_reads(tmp_path) -> None:
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert {s.lower() for s in IMG_EXTENSIONS} == set(bs.zoo.IMAGE_SUFFIXES)
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    # Lossless formats only, so that the pixels read back are the pixels written.
    saved = {"a.ppm": rgb, "b.pgm": grey, "c.tif": rgb, "d.TIFF": grey, "e.webp": rgb}
    for name, pixels in saved.items():
        path = tmp_path / "k" / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(path, **({"lossless": True} if name.endswith("webp") else {}))
    data = bs.load_data(str(tmp_path))
    theirs = ImageFolder(str(tmp_path))
    assert data.files == [Path(p).relative_to(tmp_path).as_posix() for p, _ in theirs.samples]
    for image, name in zip(data.x, data.files, strict=True):
        pixels = saved[name.split("/")[1]]
        expected = (
            np.broadcast_to(pixels[..., None], (*pixels.shape[:2], 3))
            if pixels.ndim == 2
            else pixels
        )
        torch.testing.assert_close(
            image, torch.from_numpy(expected.transpose(2, 0, 1) / 255.0).float()
        )


def test_float_images_are_read_as_they_are_and_must_lie_in_zero_one(tmp_path) -> None:
    real = np.array([[0.0, 0.125], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(real).save(tmp_path / "a.tif")  # Pillow mode F: 32-bit float
    _png(tmp_path / "b.png", [[0, 51], [102, 255]], "L")
    x, _ = bs.load_data(str(tmp_path))
    assert x.shape == (2, 1, 2, 2)  # a float image is grey: no colour image in the folder
    torch.testing.assert_close(x[0, 0], torch.from_numpy(real))
    torch.testing.assert_close(x[1, 0], torch.tensor([[0.0, 0.2], [0.4, 1.0]]))
    # Next to a colour image the float grey becomes three equal channels, still unscaled.
    Image.fromarray(np.full((2, 2, 3), 255, dtype=np.uint8)).save(tmp_path / "c.png")
    torch.testing.assert_close(
        bs.load_data(str(tmp_path)).x[0], torch.from_numpy(real).expand(3, 2, 2)
    )
    Image.fromarray(real * 255).save(tmp_path / "d.tif")
    with pytest.raises(
        InputError, match=r"float image .*d\.tif holds values in \[0, 255\]; expected"
    ):
        bs.load_data(str(tmp_path))
    # Below 0 is outside [0, 1] as well.
    (tmp_path / "d.tif").unlink()
    Image.fromarray(real - 0.5).save(tmp_path / "e.tif")
    with pytest.raises(
        InputError, match=r"float image .*e\.tif holds values in \[-0\.5, 0\.5\]; expected"
    ):
        bs.load_data(str(tmp_path))
    # A NaN pixel is named as such: its range read "[nan, nan]".
    (tmp_path / "e.tif").unlink()
    bad = real.copy()
    bad[0, 1] = np.nan
    Image.fromarray(bad).save(tmp_path / "f.tif")
    with pytest.raises(
        InputError,
        match=r"^float image .*f\.tif contains NaN or inf; expected finite values in \[0, 1\]$",
    ):
        bs.load_data(str(tmp_path))


@pytest.mark.parametrize(
    ("mode", "value", "said"), [("F", 1.5, "float"), ("I", 300000, "integer")], ids=["F", "I"]
)
def test_an_image_out_of_range_is_refused_whatever_size_it_is_resized_to(
    tmp_path, mode, value, said
):
    # A resize averages one pixel out of range into its neighbours (300000 of 65535
    # became 0.146): the range is checked on the image as stored.
    pixels = np.zeros((8, 8), np.float32 if mode == "F" else np.int32)
    pixels[0, 0] = value
    Image.fromarray(pixels, mode=mode).save(tmp_path / "a.tif")
    for size in (None, 2):
        with pytest.raises(
            InputError, match=rf"^{said} image .*a\.tif holds values in \[0, {value:g}\]"
        ):
            bs.load_data(str(tmp_path), image_size=size)


def test_integer_images_beyond_sixteen_bits_are_refused_not_scaled_past_one(tmp_path) -> None:
    # Pillow opens a 32-bit integer TIFF in mode I; by 65535 its values would leave [0, 1].
    Image.fromarray(np.array([[0, 4000], [30000, 65535]], dtype=np.int32)).save(tmp_path / "a.tif")
    x, _ = bs.load_data(str(tmp_path))
    torch.testing.assert_close(x[0, 0], torch.tensor([[0, 4000], [30000, 65535]]) / 65535.0)
    wide = np.array([[-5, 4000], [30000, 200000]], dtype=np.int32)
    Image.fromarray(wide).save(tmp_path / "b.tif")
    with pytest.raises(
        InputError, match=r"integer image .*b\.tif holds values in \[-5, 200000\]; expected 16-bit"
    ):
        bs.load_data(str(tmp_path))


def test_folder_with_corrupt_file_names_it(tmp_path) -> None:
    _png(tmp_path / "good.png", np.zeros((4, 4)), "L")
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(InputError, match=r"cannot read image .*bad\.png"):
        bs.load_data(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no images"):
        bs.load_data(str(empty))
    with pytest.raises(InputError, match="mixes images .* with class subfolders"):
        bs.load_data(str(tmp_path))


def test_the_first_n_images_of_a_folder_are_read_alone(tmp_path, monkeypatch) -> None:
    # -n 1 read and decoded the whole folder: a bad file anywhere failed it, and the
    # time and memory grew with the folder. The channels stay the whole folder's.
    from betasmooth import zoo

    rng = np.random.default_rng(8)
    grey = [rng.integers(0, 256, (4, 5), dtype=np.uint8) for _ in range(2)]
    _png(tmp_path / "a.png", grey[0], "L")
    _png(tmp_path / "b.png", grey[1], "L")
    _png(tmp_path / "c.png", rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), "RGB")
    whole = bs.load_data(str(tmp_path))
    # A file that is no image, met before c.png: the headers after it are still read.
    (tmp_path / "bz.png").write_bytes(b"<html>404</html>")
    read, real = [], zoo._read_image
    monkeypatch.setattr(zoo, "_read_image", lambda p, *a: read.append(p.name) or real(p, *a))
    first = bs.load_data(str(tmp_path), n=2)
    assert read == ["a.png", "b.png"]
    assert first.files == ["a.png", "b.png"] and first.y.tolist() == [-1, -1]
    torch.testing.assert_close(first.x, whole.x[:2], rtol=0, atol=0)
    assert first.x.shape[1] == 3  # c.png has colour
    with pytest.raises(InputError, match=r"cannot read image .*bz\.png"):
        bs.load_data(str(tmp_path), n=4)
    # An .npz is cut after loading: its bounds are the whole file's.
    np.savez(tmp_path / "x.npz", x=np.stack([np.full((1, 2, 2), v) for v in (0.5, 0.0, 3.0)]))
    cut = bs.load_data(str(tmp_path / "x.npz"), n=1)
    full = bs.load_data(str(tmp_path / "x.npz"))
    assert cut.x.shape[0] == 1 and float(cut.high) == float(full.high) == 3.0


def test_the_cli_reads_only_the_images_a_run_uses(tmp_path, capsys) -> None:
    from betasmooth.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", "b.png"):
        _png(data / name, np.random.default_rng(1).integers(0, 256, (32, 32)), "L")
    (data / "z.jpg").write_bytes(b"<html>404</html>")  # a download that failed
    argv = ["explain", "--model", "digits-cnn", "--data", str(data), "--method", "gradient"]
    assert main([*argv, "-n", "2", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert [r["file"] for r in read_jsonl(tmp_path / "run" / "results.jsonl")] == ["a.png", "b.png"]
    assert main([*argv, "--out", str(tmp_path / "all"), "--no-progress"]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_images_a_folder_does_not_read_and_broken_links_are_counted_in_a_warning(tmp_path):
    # A .gif among .png files was left out without a word: the run held fewer images.
    _png(tmp_path / "a.png", np.zeros((4, 4)), "L")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "b.gif")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "c.GIF")
    (tmp_path / "d.heic").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image, not counted")
    (tmp_path / "e.png").symlink_to(tmp_path / "gone.png")
    # Hidden files are no data, not even skipped data: macOS's ._b.gif, Emacs's lock
    # .#a.png (a link that leads nowhere).
    (tmp_path / "._b.gif").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / ".#a.png").symlink_to("user@host.1234")
    with pytest.warns(UserWarning) as caught:
        data = bs.load_data(str(tmp_path))
    assert data.files == ["a.png"]
    [message] = [str(w.message) for w in caught]
    assert message == (
        f"data folder {tmp_path}: skipped 4 files (.gif 2, .heic 1, broken links 1); read are "
        "files ending .bmp, .jpeg, .jpg, .pgm, .png, .ppm, .tif, .tiff, .webp"
    )
    # Class folders: one warning for the whole folder, not one per class.
    classes = tmp_path / "classes"
    for name in ("cat", "dog"):
        (classes / name).mkdir(parents=True)
        _png(classes / name / "a.png", np.zeros((4, 4)), "L")
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(classes / name / "b.gif")
    with pytest.warns(UserWarning) as caught:
        bs.load_data(str(classes))
    assert [str(w.message).split(";")[0] for w in caught] == [
        f"data folder {classes}: skipped 2 files (.gif 2)"
    ]
    (classes / "dog" / "b.gif").unlink()
    with pytest.warns(UserWarning) as caught:
        bs.load_data(str(classes))
    assert [str(w.message).split(";")[0] for w in caught] == [
        f"data folder {classes}: skipped 1 file (.gif 1)"
    ]
    # The kinds are named in sorted order, not in the order the files are met (a.heic
    # before b.gif).
    (classes / "cat" / "a.heic").write_bytes(b"")
    with pytest.warns(UserWarning) as caught:
        bs.load_data(str(classes))
    assert [str(w.message).split(";")[0] for w in caught] == [
        f"data folder {classes}: skipped 2 files (.gif 1, .heic 1)"
    ]


def test_a_link_to_an_image_is_read_as_that_image_and_not_counted_as_broken(tmp_path):
    # Only a link that leads nowhere is a broken link: one to an image is read as the
    # image it points to, without a warning that files were skipped.
    _png(tmp_path / "a.png", np.full((4, 4), 255), "L")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = bs.load_data(str(tmp_path))
    assert data.files == ["a.png", "b.png"]
    assert torch.equal(data.x, torch.ones(2, 1, 4, 4))


def test_a_link_to_a_folder_above_is_read_once(tmp_path) -> None:
    # os.walk follows links: cat/self -> cat repeated cat's images (4 became 84).
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        _png(tmp_path / name / "a.png", np.zeros((4, 4)), "L")
    (tmp_path / "cat" / "self").symlink_to(tmp_path / "cat")
    data = bs.load_data(str(tmp_path))
    assert data.files == ["cat/a.png", "dog/a.png"] and data.y.tolist() == [0, 1]


def test_npz(tmp_path) -> None:
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    path = tmp_path / "d.npz"
    np.savez(path, x=images, y=np.array([4, 1]))
    x, y = bs.load_data(str(path))
    assert x.shape == (2, 1, 3, 3) and y.tolist() == [4, 1]
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images / 255).float())
    np.savez(path, x=np.ones((2, 3, 4, 4), dtype=np.float64) * 2.0)
    x, y = bs.load_data(str(path))
    assert x.dtype == torch.float32 and float(x.sum()) == 2.0 * 96 and y.tolist() == [-1, -1]
    assert data_range(str(path)) == (0.0, 2.0)
    # 8-bit levels stored as floats, normalised as if they were [0, 1] pixels: said.
    np.savez(path, x=np.full((2, 3, 4, 4), 200.0))
    with pytest.warns(UserWarning, match=r"holds values up to 200; mean and std apply to pixels"):
        normalised = bs.load_data(str(path), mean=0.5, std=0.25).x
    torch.testing.assert_close(normalised, torch.full((2, 3, 4, 4), (200.0 - 0.5) / 0.25))
    # ... and without mean and std too: the range the attack and LRP take is said.
    with pytest.warns(UserWarning, match=r"up to 200; \[0, 200\] is taken for the pixel range"):
        plain = bs.load_data(str(path))
    assert float(plain.low.min()) == 0.0 and float(plain.high.max()) == 200.0


def test_signed_npz_pixels_under_a_torchvision_models_own_statistics_are_said(
    tmp_path,
) -> None:
    # Pixels in [-1, 1] normalised by ImageNet's statistics of [0, 1] pixels reach
    # (-1 - 0.485) / 0.229 = -6.5 where ImageNet's own stop at -2.1: said, and the
    # normalisation is still the one asked for (oracle: the formula by hand).
    path = tmp_path / "signed.npz"
    x = np.linspace(-1, 1, 3 * 8 * 8, dtype=np.float32).reshape(1, 3, 8, 8)
    np.savez(path, x=x)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    said = r"^x in .*signed\.npz holds values from -1 to 1; torchvision:resnet18's mean and std "
    for given in ({}, {"mean": list(mean), "std": list(std)}):  # the command line fills them
        with pytest.warns(UserWarning, match=said + r"apply to pixels in \[0, 1\]: map x to"):
            data = bs.load_data(str(path), preset="torchvision:resnet18", image_size=8, **given)
        expected = (x - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))
        np.testing.assert_allclose(data.x.numpy(), expected, rtol=1e-6, atol=1e-6)
    # The data's own statistics, or data that do not reach -0.25 (-0.2 here): nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bs.load_data(str(path), preset="torchvision:resnet18", image_size=8, mean=0, std=0.5)
        np.savez(path, x=x * 0.6 + 0.4)
        bs.load_data(str(path), preset="torchvision:resnet18", image_size=8)
        # -0.25 itself is still taken for [0, 1] (exact in float32: -0.625 + 0.375).
        np.savez(path, x=x * 0.625 + 0.375)
        assert float(bs.load_data(str(path), image_size=8).low.min()) == -0.25
        bs.load_data(str(path), preset="torchvision:resnet18", image_size=8)
    # Data normalised already (-2.1 to 2.6): that one warning, not also the one that takes
    # values above 2 for 8-bit levels, whose fix (divide by 255) would be wrong here.
    x01 = np.linspace(0, 1, 3 * 8 * 8, dtype=np.float32).reshape(1, 3, 8, 8)
    np.savez(path, x=(x01 - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1)))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        bs.load_data(str(path), preset="torchvision:resnet18", image_size=8)
    told = [str(w.message) for w in seen]
    assert len(told) == 1 and "x * std + mean for x normalised already" in told[0], told


def test_signed_npz_pixels_with_half_of_a_presets_statistics_are_not_said(tmp_path) -> None:
    """The preset's warning on signed data is for its own mean *and* std only.

    A normalisation that shares the preset's mean but has a std of one's own (or the
    other way round) is the user's own, which may well be of signed pixels: no warning,
    and the normalisation is the one asked for (oracle: the formula by hand).
    """
    path = tmp_path / "signed.npz"
    x = np.linspace(-1, 1, 3 * 8 * 8, dtype=np.float32).reshape(1, 3, 8, 8)
    np.savez(path, x=x)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

    def load(**stats):
        return bs.load_data(str(path), preset="torchvision:resnet18", image_size=8, **stats)

    # Both of the preset's own: the warning (the control, so that silence below means
    # the rule and not a warning that is never given for these data).
    with pytest.warns(UserWarning, match=r"torchvision:resnet18's mean and std apply to pixels"):
        load(mean=mean, std=std)
    for own_mean, own_std in ((mean, [0.5, 0.5, 0.5]), ([0.0, 0.0, 0.0], std)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            data = load(mean=own_mean, std=own_std)
        shift = np.reshape(own_mean, (1, 3, 1, 1))
        expected = (x - shift) / np.reshape(own_std, (1, 3, 1, 1))
        np.testing.assert_allclose(data.x.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_npz_labels_under_another_name_are_said(tmp_path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 1, 4, 4), dtype=np.float32), labels=np.array([3, 1]))
    with pytest.warns(UserWarning, match=r"has no array 'y' \(found labels besides x\); every"):
        assert bs.load_data(str(path)).y.tolist() == [-1, -1]
    np.savez(path, x=np.zeros((2, 1, 4, 4), dtype=np.float32), y=np.array([3, 1]), z=np.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bs.load_data(str(path)).y.tolist() == [3, 1]
    # x alone holds no labels under another name: nothing to say.
    np.savez(path, x=np.zeros((2, 1, 4, 4), dtype=np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bs.load_data(str(path)).y.tolist() == [-1, -1]


def test_a_mean_is_checked_against_the_datas_own_range(tmp_path) -> None:
    # Float .npz data keep their range: here [-1, 1], whose pixels may have mean -0.1.
    path = tmp_path / "signed.npz"
    x = np.linspace(-1, 1, 2 * 16, dtype=np.float32).reshape(2, 1, 4, 4)
    np.savez(path, x=x)
    data = bs.load_data(str(path), mean=-0.1, std=0.5)
    torch.testing.assert_close(data.x, torch.from_numpy((x + 0.1) / 0.5))
    with pytest.raises(InputError, match=r"mean must lie in \[-1, 1\], the range of the pixels"):
        bs.load_data(str(path), mean=-2.0, std=0.5)
    # A std wider than the pixels' range is one of 0-255 levels; 1 (none) is allowed.
    with pytest.raises(InputError, match=r"std must be at most 1, the width of the pixels' range"):
        bs.load_data("photos", mean=[0.485, 0.456, 0.406], std=[58.4, 57.1, 57.4])
    plain = bs.load_data("photos").x
    torch.testing.assert_close(bs.load_data("photos", mean=0.5, std=1.0).x, plain - 0.5)


@pytest.mark.parametrize("mean", [127.5, -0.5, [0.485, 116.3, 0.406]])
def test_a_mean_outside_the_pixels_range_is_refused(tmp_path, capsys, mean) -> None:
    # Caffe's statistics in 0-255 levels would turn every [0, 1] image into about -2.
    with pytest.raises(InputError, match=r"mean must lie in \[0, 1\], the range of the pixels"):
        bs.load_data("photos", mean=mean, std=0.25)
    from betasmooth.cli import main

    means = [str(m) for m in (mean if isinstance(mean, list) else [mean] * 3)]
    argv = ["explain", "--model", "photos-cnn", "--data", "photos", "--method", "gradient"]
    assert main([*argv, "--mean", *means, "--std", "0.25", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mean must lie in [0, 1]" in err
    assert not (tmp_path / "r").exists()


def test_an_npy_array_or_an_empty_file_given_as_an_npz_is_named_in_one_line(tmp_path) -> None:
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(InputError, match=r"a\.npy holds a single \.npy array; expected an \.npz"):
        read_npz(tmp_path / "a.npy")
    (tmp_path / "e.npz").write_bytes(b"")
    with pytest.raises(InputError, match=r"e\.npz is a damaged \.npz archive \(EOFError"):
        read_npz(tmp_path / "e.npz")


def test_npz_bad_input(tmp_path) -> None:
    path = tmp_path / "d.npz"
    bad = np.zeros((3, 1, 4, 4), dtype=np.float32)
    bad[2, 0, 1, 1] = np.nan
    np.savez(path, x=bad)
    with pytest.raises(InputError, match="contains NaN or inf \\(first at item 2\\)"):
        bs.load_data(str(path))
    np.savez(path, images=bad, labels=np.zeros(3))
    with pytest.raises(InputError, match=r"has no array 'x' \(found \['images', 'labels'\]\)"):
        bs.load_data(str(path))
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="d.npz holds pickled objects, which are never loaded"):
        bs.load_data(str(path))
    # An archive whose array has a broken header holds no pickled object.
    path.write_bytes(_zip({"x.npy": b"\x93NUMPY\x01\x00broken"}))
    with pytest.raises(InputError, match=r"d.npz cannot be read \(ValueError: .*header"):
        bs.load_data(str(path))
    path.write_text("hello")
    with pytest.raises(InputError, match="d.npz is not an .npz archive; expected a file written"):
        bs.load_data(str(path))
    np.savez(path, x=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    nhwc = r"shape \(2, 8, 8, 3\), channel-last .*x\.transpose\(0, 3, 1, 2\)"
    with pytest.raises(InputError, match=nhwc):
        bs.load_data(str(path))
    with pytest.raises(InputError, match="data file .*missing.npz does not exist"):
        bs.load_data(str(tmp_path / "missing.npz"))
    # Labels of another length or shape than the images.
    for y in (np.arange(4), np.arange(3)[:, None]):
        np.savez(path, x=np.zeros((3, 1, 4, 4), dtype=np.float32), y=y)
        shape = re.escape(str(y.shape))
        with pytest.raises(InputError, match=rf"array y in .*d.npz has shape {shape}, dtype"):
            bs.load_data(str(path))
    # An empty side, in floats and in integers, as an empty batch.
    for shape, dtype in [((2, 3, 0, 4), np.float32), ((2, 3, 4, 0), np.int32), ((3, 0, 8), bool)]:
        np.savez(path, x=np.zeros(shape, dtype=dtype))
        with pytest.raises(InputError, match=rf"shape {re.escape(str(shape))}; .*none of them 0"):
            bs.load_data(str(path))


def test_unknown_data_spec_and_split() -> None:
    with pytest.raises(
        InputError, match="unknown data spec 'mnist'; expected 'digits' or 'photos', a folder"
    ):
        bs.load_data("mnist")
    with pytest.raises(InputError, match="unknown split 'val'"):
        bs.load_data("digits", split="val")


@pytest.mark.parametrize("split", ["fit", "validation"])
def test_the_photos_own_splits_are_no_splits_of_load_data(tmp_path, split) -> None:
    # photo_crops's "fit" and "validation" are not load_data's, for no data at all.
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 1, 4, 4), dtype=np.float32))
    for spec in ("digits", "photos", str(tmp_path / "d.npz")):
        with pytest.raises(InputError) as err:
            bs.load_data(spec, split=split)
        assert str(err.value) == f"unknown split {split!r}; expected one of train, test, all"


@pytest.mark.parametrize("spec", ["photos2/", "data/photos2", "photos2\\"])
def test_a_missing_folder_written_as_one_is_named_a_folder(spec, tmp_path, monkeypatch):
    # A trailing separator or a path marks a folder: not "unknown data spec".
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as err:
        bs.load_data(spec)
    assert str(err.value) == f"data folder {spec} does not exist; expected a folder of images"


def test_a_folder_named_like_built_in_data_is_named_in_a_warning(tmp_path, monkeypatch):
    # "--data photos" with a photos/ folder here reads the built-in set, silently before.
    (tmp_path / "digits").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"'digits' is the built-in data set, not the digits"):
        x, _ = bs.load_data("digits")
    assert x.shape[1:] == (1, 32, 32)


def test_the_folder_warning_comes_only_where_the_user_named_the_data(tmp_path, monkeypatch, capsys):
    from betasmooth.cli import main

    (tmp_path / "digits").mkdir()
    monkeypatch.chdir(tmp_path)
    argv = ["explain", "--model", "digits-cnn", "-n", "1", "--method", "gradient"]
    assert main([*argv, "--data", "digits", "--out", "named", "--no-progress"]) == 0
    assert "warning: data 'digits' is the built-in data set" in capsys.readouterr().err
    assert main([*argv, "--data=digits", "--out", "spelt", "--no-progress"]) == 0
    assert "warning: data 'digits' is the built-in data set" in capsys.readouterr().err
    # The run's own settings, read back by the next command, were warned about already.
    attack = ["attack", "--model", "digits-cnn", "--data", "digits", "--method", "gradient"]
    assert main([*attack, "-n", "2", "--steps", "2", "--out", "run", "--no-progress"]) == 0
    assert "warning: data 'digits'" in capsys.readouterr().err
    assert main(["sweep", "run", "--betas", "5", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    # theorem takes the built-in digits itself: the folder here is none of its business.
    assert main(["theorem", "--quick", "--out", "theory"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_preset_matches_torchvision_when_the_long_side_rounds_up(tmp_path):
    # The long side is truncated as torchvision truncates it. Oracle:
    # torchvision's own transforms. 256 * 300 / 257 = 298.8: torchvision makes 298.
    torchvision = pytest.importorskip("torchvision")

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (257, 300, 3), dtype=np.uint8)  # h, w
    Image.fromarray(pixels).save(tmp_path / "a.png")
    data = bs.load_data(str(tmp_path), preset="torchvision:vgg16")
    raw = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)
    expected = torchvision.models.VGG16_Weights.DEFAULT.transforms()(raw)
    torch.testing.assert_close(data.x[0], expected, rtol=1e-5, atol=1e-5)
    # A tall image whose crop starts half a pixel off: (259 - 224) / 2 = 17.5 rounds to 18.
    tall = rng.integers(0, 256, (259, 256, 3), dtype=np.uint8)
    Image.fromarray(tall).save(tmp_path / "a.png")
    data = bs.load_data(str(tmp_path), preset="torchvision:vgg16")
    raw = torch.from_numpy(tall.astype(np.float32) / 255).permute(2, 0, 1)
    expected = torchvision.models.VGG16_Weights.DEFAULT.transforms()(raw)
    torch.testing.assert_close(data.x[0], expected, rtol=1e-5, atol=1e-5)


def test_a_bicubic_preset_resizes_as_its_torchvision_transforms_do(tmp_path):
    # Swin's weights resize bicubically. Oracle: torchvision's resize and centre crop
    # with the weights' own interpolation, clipped to [0, 1] (the data bounds; Pillow's
    # 8-bit bicubic clips too), then normalised: transforms() wherever it stays in [0, 1].
    torchvision = pytest.importorskip("torchvision")
    from torchvision.transforms import functional as TF

    weights = torchvision.models.Swin_T_Weights.DEFAULT
    t = weights.transforms()
    assert t.interpolation == TF.InterpolationMode.BICUBIC
    pixels = np.random.default_rng(3).integers(0, 256, (257, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    data = bs.load_data(str(tmp_path), preset="torchvision:swin_t")
    raw = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)
    resized = TF.center_crop(TF.resize(raw, t.resize_size, t.interpolation, antialias=True), 224)
    expected = TF.normalize(resized.clamp(0, 1), t.mean, t.std)
    torch.testing.assert_close(data.x[0], expected, rtol=1e-5, atol=1e-5)
    inside = (resized >= 0) & (resized <= 1)
    assert 0.9 < inside.float().mean() < 1.0  # random pixels overshoot in places
    torch.testing.assert_close(data.x[0][inside], t(raw)[inside], rtol=1e-5, atol=1e-5)
    assert bool((data.x >= data.low).all() and (data.x <= data.high).all())
    # The old bilinear resize is far from it.
    bilinear = TF.normalize(bs.zoo.resize_crop(raw[None], 232, 224)[0], t.mean, t.std)
    assert (bilinear - expected).abs().max() > 0.05


def test_a_slice_of_image_data_is_refused_not_the_pair_itself():
    # x, y = data[:4] would unpack the whole pair: every image, not four.
    data = bs.load_data("digits")
    with pytest.raises(InputError, match=r"expected data\.x\[a:b\] and data\.y\[a:b\]"):
        data[:4]
    x, y = data
    assert data[0] is x and data[-1] is y and len(data) == 2
    assert torch.equal(data.x[:4], x[:4]) and pickle.loads(pickle.dumps(data)).x.shape == x.shape


def test_rgb_to_grey_of_arrays_is_pils_luma(tmp_path):
    # An .npz of RGB images loaded with
    # channels=1 must be what PIL's convert("L") (ITU-R 601-2) makes of them.

    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (2, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=pixels.transpose(0, 3, 1, 2))
    x, _ = bs.load_data(str(tmp_path / "rgb.npz"), channels=1)
    for k in range(2):
        grey = np.asarray(Image.fromarray(pixels[k]).convert("L"), dtype=np.float32) / 255
        np.testing.assert_allclose(x[k, 0].numpy(), grey, atol=0.6 / 255)


def test_preset_prepares_built_in_data_as_torchvision_does():
    # A preset resizes and centre-crops built-in data too (grey
    # digits repeated to RGB). Oracle: torchvision's transforms of the raw images.
    torchvision = pytest.importorskip("torchvision")
    raw, _ = bs.load_data("digits")
    data = bs.load_data("digits", preset="torchvision:vgg16")
    assert tuple(data.x.shape[1:]) == (3, 224, 224)
    transform = torchvision.models.VGG16_Weights.DEFAULT.transforms()
    for k in (0, 1):
        expected = transform(raw[k].expand(3, -1, -1))
        torch.testing.assert_close(data.x[k], expected, rtol=1e-5, atol=1e-5)


def test_a_preset_with_image_size_resizes_without_the_presets_crop():
    # image_size replaces the preset's resize and centre crop by one plain resize;
    # the preset's mean and std stay. Oracle: torchvision's Resize of the raw digits.
    torchvision = pytest.importorskip("torchvision")
    raw, _ = bs.load_data("digits")
    data = bs.load_data("digits", preset="torchvision:vgg16", image_size=(20, 24))
    assert tuple(data.x.shape[1:]) == (3, 20, 24)
    transform = torchvision.models.VGG16_Weights.DEFAULT.transforms()
    resize = torchvision.transforms.Resize((20, 24), antialias=True)
    mean, std = torch.tensor(transform.mean), torch.tensor(transform.std)
    for k in (0, 1):
        expected = (resize(raw[k].expand(3, -1, -1)) - mean[:, None, None]) / std[:, None, None]
        torch.testing.assert_close(data.x[k], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("std", [0.0, [0.2, 0.0, 0.2], [0.2, -0.25, 0.2]])
def test_a_zero_std_is_refused(std):
    # (x - mean) / 0 is inf or NaN in every pixel; a negative std would flip a channel.
    with pytest.raises(bs.InputError, match="std must be > 0"):
        bs.load_data("digits", channels=3, mean=0.5, std=std)
    with pytest.raises(bs.InputError, match="std must be > 0"):
        data_range("digits", mean=0.5, std=std)


def test_folder_image_size_is_height_then_width(tmp_path):
    # --image-size is height then width, where PIL takes width then height;
    # oracle: PIL's own bilinear resize.

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    x, _ = bs.load_data(str(tmp_path), image_size=(12, 20))
    assert tuple(x.shape) == (1, 3, 12, 20)
    want = (
        np.asarray(
            Image.fromarray(pixels).resize((20, 12), Image.Resampling.BILINEAR), dtype=np.float32
        )
        / 255
    )
    np.testing.assert_allclose(x[0].numpy(), want.transpose(2, 0, 1), atol=1e-6)


def test_grey_images_with_alpha_load_as_one_channel(tmp_path):
    # A folder of grey PNGs with an alpha
    # channel is grey, as PIL's convert("L") reads it.

    rng = np.random.default_rng(4)
    grey = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    alpha = np.full((9, 7), 255, dtype=np.uint8)
    Image.fromarray(np.stack([grey, alpha], -1), mode="LA").save(tmp_path / "a.png")
    x, _ = bs.load_data(str(tmp_path))
    assert tuple(x.shape) == (1, 1, 9, 7)
    np.testing.assert_allclose(x[0, 0].numpy(), grey / 255, atol=1e-7)


def test_float_labels_must_be_whole_numbers(tmp_path):
    # y = 1.5 would be truncated to class 1 without a word; whole floats are classes.
    x = np.random.default_rng(0).random((2, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "half.npz", x=x, y=np.array([0.0, 1.5]))
    with pytest.raises(bs.InputError, match="non-integer values"):
        bs.load_data(str(tmp_path / "half.npz"))
    # An infinite label is no class either (it would become int64's smallest).
    np.savez(tmp_path / "inf.npz", x=x, y=np.array([0.0, np.inf]))
    with pytest.raises(bs.InputError, match="non-integer values"):
        bs.load_data(str(tmp_path / "inf.npz"))
    np.savez(tmp_path / "whole.npz", x=x, y=np.array([0.0, 2.0]))
    assert bs.load_data(str(tmp_path / "whole.npz"))[1].tolist() == [0, 2]


def test_digits_splits_are_sklearns_documented_split_in_the_original_order():
    # Oracle: the documented train_test_split(test_size=0.25, stratify=y,
    # random_state=0), each split in the order of "all".
    from sklearn.model_selection import train_test_split

    x_all, y_all = bs.load_data("digits", split="all")
    train, test = train_test_split(
        np.arange(1797), test_size=0.25, stratify=y_all.numpy(), random_state=0
    )
    for split, rows in (("train", np.sort(train)), ("test", np.sort(test))):
        x, y = bs.load_data("digits", split=split)
        assert torch.equal(x, x_all[rows]) and torch.equal(y, y_all[rows]), split


@pytest.mark.parametrize(("top", "scale"), [(255, 255.0), (256, 65535.0)], ids=["8-bit", "16-bit"])
def test_npz_integers_without_a_bit_depth_are_8_bit_up_to_255_inclusive(tmp_path, top, scale):
    # int64 levels (a list of Python ints saved by numpy): their largest value picks the
    # depth, and 255, white in 8 bits, is 8-bit (as "[0, 255] or [0, 65535]" reads).
    levels = np.linspace(0, top, 16).round().astype(np.int64).reshape(1, 1, 4, 4)
    np.savez(tmp_path / "d.npz", x=levels)
    x, _ = bs.load_data(str(tmp_path / "d.npz"))
    torch.testing.assert_close(x, torch.from_numpy(levels / scale).float())


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.int64])
def test_npz_integers_reach_65535_inclusive_and_no_further_nor_below_0(tmp_path, dtype):
    # "[0, 255] or [0, 65535]": 65535, white in 16 bits, is scaled to 1; one more level,
    # or one below black, is no pixel and refused.
    levels = np.linspace(0, 65535, 16).round().astype(dtype).reshape(1, 1, 4, 4)
    np.savez(tmp_path / "d.npz", x=levels)
    x, _ = bs.load_data(str(tmp_path / "d.npz"))
    torch.testing.assert_close(x, torch.from_numpy(levels / 65535.0).float())
    assert float(x.max()) == 1.0
    for value, said in [(65536, r"\[0, 65536\]"), (-1, r"\[-1, 65535\]")]:
        if value < 0 and np.dtype(dtype).kind == "u":
            continue  # an unsigned array holds no -1
        bad = levels.copy()
        bad[0, 0, 0, 0 if value < 0 else 1] = value
        np.savez(tmp_path / "d.npz", x=bad)
        with pytest.raises(InputError, match=rf"has {np.dtype(dtype)} values in {said}"):
            bs.load_data(str(tmp_path / "d.npz"))


def test_npz_uint16_is_16_bit_even_when_its_values_are_small(tmp_path):
    # A uint16 array carries its bit depth: dark 16-bit levels (all at most 255) are
    # scaled by 65535, as a 16-bit image is, not taken for 8-bit levels.
    levels = np.arange(16, dtype=np.uint16).reshape(1, 1, 4, 4) * 17  # 0 .. 255
    np.savez(tmp_path / "d.npz", x=levels)
    x, _ = bs.load_data(str(tmp_path / "d.npz"))
    torch.testing.assert_close(x, torch.from_numpy(levels / 65535.0).float())


def test_npz_channel_last_is_told_by_one_three_or_four_last_against_another_count(tmp_path):
    # (N, H, W, C) with C of 1, 3 or 4 and a second side that is no channel count is
    # refused with its transpose; a second side of 1, 3 or 4 is (N, C, H, W) kept as it is.
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((2, 8, 8, 4), dtype=np.float32))
    with pytest.raises(InputError, match=r"shape \(2, 8, 8, 4\), channel-last"):
        bs.load_data(str(path))
    for channels in (1, 3, 4):
        x = np.random.default_rng(channels).random((2, channels, 5, 3), dtype=np.float32)
        np.savez(path, x=x)
        np.testing.assert_array_equal(bs.load_data(str(path)).x.numpy(), x)


def test_three_statistics_for_four_channels_point_to_no_conversion(tmp_path):
    # The hint "--channels 3" is for grey images under RGB statistics; four channels
    # cannot be converted to three, so three statistics for them get no hint.
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4, 5, 5), dtype=np.float32))
    with pytest.raises(InputError) as err:
        bs.load_data(str(tmp_path / "d.npz"), mean=[0.5] * 3, std=[0.25] * 3)
    assert str(err.value) == (
        "mean has 3 values but the images have 4 channels; expected one number or one per channel"
    )


def test_denormalise_refuses_images_of_another_channel_count():
    # One channel's statistics would broadcast over three channels without a word.
    data = bs.load_data("digits", mean=0.5, std=0.25, n=2)
    with pytest.raises(InputError, match=r"x has shape \(2, 3, 32, 32\); expected images of"):
        data.denormalise(torch.zeros(2, 3, 32, 32))
    torch.testing.assert_close(
        data.denormalise(torch.ones(2, 1, 4, 4)), torch.full((2, 1, 4, 4), 0.75)
    )


def test_npz_of_booleans_is_black_and_white(tmp_path):
    # A boolean mask is taken as the values it holds, 0 and 1, not as 8-bit levels.
    mask = np.arange(2 * 4 * 4).reshape(2, 1, 4, 4) % 3 == 0
    np.savez(tmp_path / "m.npz", x=mask)
    data = bs.load_data(str(tmp_path / "m.npz"))
    np.testing.assert_array_equal(data.x.numpy(), mask.astype(np.float32))
    assert (float(data.low), float(data.high)) == (0.0, 1.0)


def test_data_range_of_per_channel_statistics_is_the_hull_over_channels():
    # Documented: the hull over channels of [(0 - mean) / std, (1 - mean) / std].
    mean, std = np.array([0.2, 0.6, 0.5]), np.array([0.5, 0.25, 0.125])
    low, high = data_range("digits", mean=mean.tolist(), std=std.tolist())
    assert low == pytest.approx(float((-mean / std).min()))
    assert high == pytest.approx(float(((1 - mean) / std).max()))


def test_pickled_image_data_keeps_its_normalisation():
    # A DataLoader worker or a saved copy gets the same mean, std and bounds back.
    data = bs.load_data("digits", mean=[0.2], std=[0.5])
    back = pickle.loads(pickle.dumps(data))
    for name in ("low", "high", "mean", "std"):
        torch.testing.assert_close(getattr(back, name), getattr(data, name), rtol=0, atol=0)
    raw, _ = bs.load_data("digits")
    torch.testing.assert_close(back.denormalise(back.x), raw)


def test_folder_takes_upper_case_suffixes_and_class_folders_holding_a_config_json(tmp_path):
    # The oracle: torchvision's ImageFolder, which reads suffixes in any case and takes
    # every folder as a class; only a run directory (config.json and arrays/) is skipped.
    from torchvision.datasets import ImageFolder

    rng = np.random.default_rng(3)
    for name in ("a/0.PNG", "a/1.png", "b/2.Png", "b/3.BMP"):
        _png(tmp_path / "n" / name, rng.integers(0, 256, (4, 4)), "L")
    (tmp_path / "n" / "b" / "config.json").write_text("{}")
    data = bs.load_data(str(tmp_path / "n"))
    theirs = ImageFolder(str(tmp_path / "n"))
    assert data.files == [Path(p).relative_to(tmp_path / "n").as_posix() for p, _ in theirs.samples]
    assert data.classes == theirs.classes == ["a", "b"]
    assert data.y.tolist() == [label for _, label in theirs.samples] == [0, 0, 1, 1]
    pixels = [
        np.asarray(theirs.loader(p).convert("L"), dtype=np.float32) / 255 for p, _ in theirs.samples
    ]
    torch.testing.assert_close(data.x[:, 0], torch.from_numpy(np.stack(pixels)))


def test_class_folders_with_images_of_their_own_and_in_subfolders_are_no_splits(tmp_path):
    # Only class folders whose images all lie deeper look like train/ and val/ splits.
    for name in ("a/0.png", "a/deep/1.png", "b/2.png", "b/deep/3.png"):
        _png(tmp_path / name, np.zeros((4, 4)), "L")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        data = bs.load_data(str(tmp_path))
    assert data.files == ["a/0.png", "a/deep/1.png", "b/2.png", "b/deep/3.png"]
    assert [str(w.message) for w in seen if "subfolders" in str(w.message)] == []


def test_data_bounds_of_an_npz_are_those_of_its_loaded_data_with_the_channels_asked(tmp_path):
    # Grey images taken as RGB with one mean per channel: the oracle is load_data's own bounds.
    path = tmp_path / "grey.npz"
    np.savez(path, x=np.linspace(0, 1, 2 * 16, dtype=np.float32).reshape(2, 1, 4, 4))
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.5, 0.2]
    data = bs.load_data(str(path), channels=3, mean=mean, std=std)
    low, high = bs.zoo.data_bounds(str(path), channels=3, mean=mean, std=std)
    expected = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(low, (0 - expected[0]) / expected[1])
    torch.testing.assert_close(high, (1 - expected[0]) / expected[1])
    torch.testing.assert_close((low, high), (data.low, data.high))


def test_data_bounds_take_the_channels_asked_with_one_mean_and_std_for_all():
    # Built-in grey digits as RGB with one number each: three channels, not the digits' one.
    # Oracle: load_data's own bounds, and (0 - 0.5) / 0.25 = -2, (1 - 0.5) / 0.25 = 2.
    data = bs.load_data("digits", channels=3, mean=0.5, std=0.25)
    low, high = bs.zoo.data_bounds("digits", channels=3, mean=0.5, std=0.25)
    assert low.shape == high.shape == (1, 3, 1, 1)
    torch.testing.assert_close((low, high), (data.low, data.high))
    torch.testing.assert_close(high, torch.full((1, 3, 1, 1), 2.0))


def test_a_model_file_changed_on_disk_is_imported_again(factory_file):
    # The cache of imported model files is keyed by the file's time and size as well.
    first = bs.load_model(f"{factory_file}:make")
    torch.testing.assert_close(first(torch.zeros(1, 3)), torch.tensor([[0.5, -0.5]]))
    factory_file.write_text(FACTORY.replace("[0.5, -0.5]", "[1.25, -2.75]"))
    stat = factory_file.stat()
    os.utime(factory_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = bs.load_model(f"{factory_file}:make")
    torch.testing.assert_close(again(torch.zeros(1, 3)), torch.tensor([[1.25, -2.75]]))
    # Edited to the same size: its time tells.
    size = factory_file.stat().st_size
    factory_file.write_text(FACTORY.replace("[0.5, -0.5]", "[3.25, -1.75]"))
    assert factory_file.stat().st_size == size
    os.utime(factory_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    third = bs.load_model(f"{factory_file}:make")
    torch.testing.assert_close(third(torch.zeros(1, 3)), torch.tensor([[3.25, -1.75]]))


def test_normalisation_statistics_are_checked_one_by_one():
    # A std wider than the pixels' [0, 1] is refused; mean 0 divides only.
    with pytest.raises(InputError, match=r"^std must be at most 1, the width of the pixels"):
        bs.load_data("digits", mean=0.0, std=2.0)
    torch.testing.assert_close(
        bs.load_data("digits", mean=0.0, std=0.5).x, bs.load_data("digits").x / 0.5
    )
    with pytest.raises(InputError, match=r"^mean has 2 values but the images have 3 channels"):
        bs.load_data("photos", mean=[0.5, 0.4], std=0.25)
    with pytest.raises(InputError, match=r"^mean must be finite; got nan"):
        data_range("digits", mean=float("nan"), std=0.5)
    with pytest.raises(InputError, match=r"^std must be finite; got \[0.5, inf, 0.5\]"):
        data_range("photos", mean=0.5, std=[0.5, float("inf"), 0.5])


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"mean": [0.485, 0.456, 0.406]}, r"^mean without std: the std would be 1; expected"),
        ({"std": 0.5}, r"^std without mean: the mean would be 0; expected both mean and std"),
    ],
)
def test_one_of_mean_and_std_alone_is_refused(given, message):
    # ImageNet's mean without its std would leave inputs 1/0.226 = 4.4 times too wide.
    with pytest.raises(InputError, match=message):
        bs.load_data("photos", **given)
    with pytest.raises(InputError, match=message):
        data_range("photos", **given)
    # Spelled out, the default it would have taken gives the plain arithmetic.
    raw = bs.load_data("photos").x
    torch.testing.assert_close(
        bs.load_data("photos", mean=[0.485, 0.456, 0.406], std=1.0).x,
        raw - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
    )


@pytest.mark.parametrize("shape", [(1, 3, 40, 60), (1, 3, 60, 40)])
def test_a_crop_larger_than_the_resized_image_is_refused_wide_or_tall(shape):
    # The short side is resized to 32: a crop of 36 fits neither image across it.
    size = (32, 48) if shape[2] < shape[3] else (48, 32)
    with pytest.raises(
        InputError, match=rf"^crop 36 is larger than the resized image {re.escape(str(size))}"
    ):
        bs.zoo.resize_crop(torch.rand(shape), 32, 36)
    # Fits: the centre, as torchvision's Resize then CenterCrop (the oracle).
    from torchvision.transforms import v2

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    expected = v2.CenterCrop(28)(v2.Resize(32, antialias=True)(x))
    torch.testing.assert_close(bs.zoo.resize_crop(x, 32, 28), expected, rtol=1e-5, atol=1e-5)


def test_a_bicubic_resize_of_values_beyond_one_is_clipped_to_their_own_range():
    # Data in [0, 2] (an .npz of another range): bicubic overshoot is clipped to [0, 2],
    # not to [0, 1], which would flatten every value above 1. Oracle: torchvision's
    # bicubic Resize and CenterCrop, clipped to [0, 2].
    from torchvision.transforms import InterpolationMode, v2

    x = 2 * torch.rand(1, 1, 40, 50, generator=torch.Generator().manual_seed(1))
    resize = v2.Resize(32, interpolation=InterpolationMode.BICUBIC, antialias=True)
    expected = v2.CenterCrop(28)(resize(x)).clamp(0.0, 2.0)
    got = bs.zoo.resize_crop(x, 32, 28, "bicubic")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert float(got.max()) > 1.5


def test_data_bounds_of_a_colour_folder_are_those_load_data_attaches(tmp_path) -> None:
    # Bounds without reading the images: three channels for a folder of colour images.
    Image.fromarray(np.full((4, 4, 3), 100, dtype=np.uint8)).save(tmp_path / "a.png")
    data = bs.load_data(str(tmp_path), mean=[0.5, 0.4, 0.3], std=0.25)
    low, high = bs.zoo.data_bounds(str(tmp_path), mean=[0.5, 0.4, 0.3], std=0.25)
    assert low.shape == high.shape == data.low.shape == (1, 3, 1, 1)
    torch.testing.assert_close((low, high), (data.low, data.high))
    low, high = bs.zoo.data_bounds(str(tmp_path))
    torch.testing.assert_close((low, high), (torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)))


@pytest.mark.parametrize("spec", ["grey", "photos", "digits"])
def test_data_bounds_have_the_channels_of_the_data_they_bound(tmp_path, spec) -> None:
    # A grey folder's bounds were those of three channels, which its images refuse.
    if spec == "grey":
        _png(tmp_path / "a.png", np.full((4, 4), 100), "L")
        spec = str(tmp_path)
    data = bs.load_data(spec)
    low, high = bs.zoo.data_bounds(spec)
    assert low.shape == high.shape == data.low.shape == (1, data.x.shape[1], 1, 1)
    torch.testing.assert_close((low, high), (data.low, data.high))
    check_bounds(low, high, data.x)


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_channels_other_than_one_or_three_are_refused(tmp_path, channels) -> None:
    _png(tmp_path / "a.png", np.zeros((4, 4)), "L")
    for spec in ("digits", str(tmp_path)):
        with pytest.raises(bs.InputError, match=rf"^channels must be 1 or 3; got {channels}$"):
            bs.load_data(spec, channels=channels)


def test_a_weights_path_that_is_a_directory_is_named_as_such(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        load_state_dict(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        load_state_dict(tmp_path / "none.pt")


def test_weights_under_two_prefixes_are_not_stripped_into_one_another(tmp_path):
    # A checkpoint holding the model twice (Lightning's model. and an EMA copy's
    # ema.) shares no one prefix: stripping would let the later copy's weights
    # overwrite the first's. It is refused with the keys as found.
    (tmp_path / "lin.py").write_text(
        "from torch import nn\n\n\ndef make():\n    return nn.Sequential(nn.Linear(3, 2))\n"
    )
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Linear(3, 2)), nn.Sequential(nn.Linear(3, 2))
    state = {
        **{f"model.{k}": v for k, v in a.state_dict().items()},
        **{f"ema.{k}": v for k, v in b.state_dict().items()},
    }
    torch.save(state, tmp_path / "two.pt")
    with pytest.raises(InputError, match=r"missing keys: 0\.weight, 0\.bias.*unexpected keys: mod"):
        bs.load_model(f"{tmp_path / 'lin.py'}:make", weights=tmp_path / "two.pt")


def test_n_of_an_npz_and_of_built_in_data_cuts_images_and_labels_alike(tmp_path):
    # n keeps the first n images and their labels; bounds stay those of the whole.
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-0.5, 1.0, (6, 1, 4, 4)).astype(np.float32), np.arange(6) % 3
    x[5, 0, 0, 0] = -0.5  # the lowest value lies past the first n
    np.savez(tmp_path / "d.npz", x=x, y=y)
    whole, first = bs.load_data(tmp_path / "d.npz"), bs.load_data(tmp_path / "d.npz", n=4)
    torch.testing.assert_close(first.x, torch.from_numpy(x[:4]), rtol=0, atol=0)
    assert first.y.tolist() == y[:4].tolist()
    assert float(first.low) == float(whole.low) == -0.5
    digits = bs.load_data("digits", n=3)
    assert len(digits.x) == len(digits.y) == 3
    assert digits.y.tolist() == bs.load_data("digits").y[:3].tolist()
    for bad in (0, -1):
        with pytest.raises(InputError, match="n must be"):
            bs.load_data(tmp_path / "d.npz", n=bad)


def test_a_model_file_imports_the_modules_beside_it_as_a_script_does(tmp_path, monkeypatch):
    # `python models/net.py` can import models/blocks.py; the model file could not.
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "betasmooth_test_blocks.py").write_text(
        "from torch import nn\n\ndef head():\n    return nn.Linear(4, 2)\n"
    )
    (folder / "betasmooth_test_lazy.py").write_text("SCALE = 3.0\n")
    (folder / "net.py").write_text(
        "import torch\nfrom torch import nn\n"
        "from betasmooth_test_blocks import head\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, scale):\n"
        "        super().__init__()\n"
        "        self.head, self.scale = head(), scale\n"
        "    def forward(self, x):\n"
        "        return self.head(x) * self.scale\n\n"
        "def build():\n"
        "    from betasmooth_test_lazy import SCALE  # imported when the factory runs\n"
        "    torch.manual_seed(0)\n"
        "    return Net(SCALE)\n"
    )
    monkeypatch.chdir(tmp_path)  # a relative spec, from another folder than the file's
    path = list(sys.path)
    model = bs.load_model("models/net.py:build")
    assert sys.path == path
    torch.manual_seed(0)
    expected = nn.Linear(4, 2)
    x = torch.rand(3, 4)
    torch.testing.assert_close(model(x), expected(x) * 3.0)


def test_two_model_files_with_siblings_of_one_name_each_get_their_own(tmp_path, monkeypatch):
    # a/blocks.py and b/blocks.py: the second model was built from the first one's.
    for folder, width in (("a", 2), ("b", 5)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "betasmooth_test_shared.py").write_text(
            f"from torch import nn\n\ndef head():\n    return nn.Linear(4, {width})\n"
        )
        (tmp_path / folder / "net.py").write_text(
            "from betasmooth_test_shared import head\n\ndef build():\n    return head()\n"
        )
    monkeypatch.chdir(tmp_path)
    assert bs.load_model("a/net.py:build").out_features == 2
    assert bs.load_model("b/net.py:build").out_features == 5
    assert "betasmooth_test_shared" not in sys.modules


def test_a_model_files_sibling_comes_before_a_module_of_its_name_elsewhere(tmp_path, monkeypatch):
    # `python models/net.py` puts models/ first on sys.path: its blocks.py, not another
    # one that the path already reaches, is the one the model file imports.
    elsewhere, folder = tmp_path / "elsewhere", tmp_path / "models"
    for place, width in ((elsewhere, 7), (folder, 2)):
        place.mkdir()
        (place / "betasmooth_test_first.py").write_text(
            f"from torch import nn\n\ndef head():\n    return nn.Linear(4, {width})\n"
        )
    (folder / "net.py").write_text(
        "from betasmooth_test_first import head\n\ndef build():\n    return head()\n"
    )
    monkeypatch.syspath_prepend(str(elsewhere))
    monkeypatch.delitem(sys.modules, "betasmooth_test_first", raising=False)
    assert bs.load_model(f"{folder / 'net.py'}:build").out_features == 2


def test_a_library_of_an_environment_inside_the_model_folder_stays_imported(tmp_path, monkeypatch):
    # A virtual environment inside the project: its libraries are not the folder's own
    # modules, and one dropped from sys.modules breaks on its second import.
    site = tmp_path / ".venv" / "site-packages"
    site.mkdir(parents=True)
    (site / "betasmooth_test_venvlib.py").write_text("WIDTH = 3\n")
    (tmp_path / "net.py").write_text(
        "from torch import nn\nimport betasmooth_test_venvlib as lib\n\n"
        "def build():\n    return nn.Linear(4, lib.WIDTH)\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "betasmooth_test_venvlib", raising=False)
    assert bs.load_model(f"{tmp_path / 'net.py'}:build").out_features == 3
    library = sys.modules["betasmooth_test_venvlib"]
    assert Path(library.__file__).resolve() == (site / "betasmooth_test_venvlib.py").resolve()


def test_a_registered_schemes_missing_weights_file_is_not_sent_to_torchvision(
    tmp_path, monkeypatch
):
    # The pointer to "torchvision:NAME:DEFAULT" is for torchvision's specs: a scheme a
    # user registers takes no weights name in its spec, and its file is just missing.
    from betasmooth.zoo import MODEL_SCHEMES

    monkeypatch.setitem(MODEL_SCHEMES, "mine", lambda spec, pretrained: nn.Linear(2, 2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as err:
        bs.load_model("mine:net", weights="DEFAULT")
    assert str(err.value) == (
        "weights file DEFAULT does not exist; expected a file written by "
        "torch.save(model.state_dict(), ...)"
    )


def test_weights_keyed_by_the_models_own_parameter_name_no_submodule(tmp_path):
    # The file's key "weight" is also that of the wrapped Linear, but it is the model's
    # own: no hint that the file is the submodule's.
    from betasmooth.checkpoint import apply_weights

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1))
            self.net = nn.Linear(2, 1)

    torch.save({"weight": torch.ones(1)}, tmp_path / "own.pt")
    with pytest.raises(InputError) as info:
        apply_weights(Scaled(), tmp_path / "own.pt")
    assert str(info.value).endswith(
        "(missing keys: net.weight, net.bias); expected the state dict of the same architecture"
    )


@pytest.mark.parametrize(
    "case", ["hidden layer too", "last layer's inputs", "ends in batchnorm", "same outputs"]
)
def test_other_classes_are_named_only_where_the_last_layers_outputs_alone_differ(tmp_path, case):
    # The hint about weights fine-tuned to other classes is for a last layer that differs
    # in its outputs alone; a file that differs elsewhere, or a model whose last tensors
    # are BatchNorm's (a count without a shape), gets the plain line.
    from betasmooth.checkpoint import apply_weights

    def net(hidden, classes, inputs=None):
        last = nn.Linear(inputs or hidden, classes)
        return nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), last)

    model, file = {
        "hidden layer too": (net(4, 5), net(6, 2)),
        "last layer's inputs": (net(4, 5), net(4, 2, inputs=6)),
        "ends in batchnorm": (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
                              nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5))),
        "same outputs": (net(4, 5), nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 5))),
    }[case]  # fmt: skip
    torch.save(file.state_dict(), tmp_path / "w.pt")
    with pytest.raises(InputError) as info:
        apply_weights(model, tmp_path / "w.pt")
    assert str(info.value).endswith("); expected the state dict of the same architecture")


def test_no_other_classes_are_named_where_the_last_layers_outputs_are_the_models(tmp_path):
    # A last layer of two tensors of unequal lengths (3 outputs, a scale of 2): the file's
    # scale has 3 entries, as many as the model's outputs, so no other number of classes
    # would fit it; the hint "has 3 outputs, the model's 3" would be wrong: the plain line.
    from betasmooth.checkpoint import apply_weights

    class Last(nn.Module):
        def __init__(self, scales):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(3, 4))
            self.scale = nn.Parameter(torch.zeros(scales))

    torch.save(nn.Sequential(nn.Linear(2, 4), Last(3)).state_dict(), tmp_path / "w.pt")
    with pytest.raises(InputError) as info:
        apply_weights(nn.Sequential(nn.Linear(2, 4), Last(2)), tmp_path / "w.pt")
    assert str(info.value).endswith(
        "(shape mismatch: 1.scale (3,) vs model (2,)); expected the state dict of the same "
        "architecture"
    )


def test_other_classes_are_named_for_the_last_layer_of_a_deeper_network_alone(tmp_path):
    # Only the outputs of the last of three layers differ: the hint names it. Where the
    # first layer differs too, or the file holds a tensor that the model has not,
    # other classes are not the whole story: the plain line.
    from betasmooth.checkpoint import apply_weights

    def net(inputs, classes):
        return nn.Sequential(nn.Linear(inputs, 4), nn.ReLU(), nn.Linear(4, classes))

    torch.save(net(3, 2).state_dict(), tmp_path / "w.pt")
    with pytest.raises(InputError) as info:
        apply_weights(net(3, 5), tmp_path / "w.pt")
    assert str(info.value) == (
        f"weights in {tmp_path / 'w.pt'} do not fit the model (shape mismatch: 2.weight (2, 4) "
        "vs model (5, 4), 2.bias (2,) vs model (5,)); expected the state dict of the same "
        "architecture; the file's last layer (2) has 2 outputs, the model's 5: for weights "
        "fine-tuned to 2 classes, build the model with a last layer of 2 outputs (a model "
        "file, file.py:build; for a torchvision network, torchvision.models.<name>(num_classes=2))"
    )
    extra = net(3, 2)
    extra.register_buffer("scale", torch.ones(1))
    for file in (net(2, 2), extra):
        torch.save(file.state_dict(), tmp_path / "w.pt")
        with pytest.raises(InputError) as info:
            apply_weights(net(3, 5), tmp_path / "w.pt")
        assert str(info.value).endswith("); expected the state dict of the same architecture")


def test_other_classes_are_named_from_the_last_parameter_not_the_last_buffer(tmp_path):
    # A model whose state dict ends in a buffer after its logits (a temperature), and a
    # bare Linear, whose layer has no name: both only differ in their outputs.
    from betasmooth.checkpoint import apply_weights

    class Tempered(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.fc = nn.Linear(4, classes)
            self.register_buffer("temperature", torch.ones(1))

        def forward(self, x):
            return self.fc(x) / self.temperature

    for model, file, layer in (
        (Tempered(5), Tempered(3), " (fc)"),
        (nn.Linear(4, 5), nn.Linear(4, 3), ""),
    ):
        torch.save(file.state_dict(), tmp_path / "w.pt")
        with pytest.raises(InputError) as info:
            apply_weights(model, tmp_path / "w.pt")
        assert str(info.value).endswith(
            f"; the file's last layer{layer} has 3 outputs, the model's 5: for weights "
            "fine-tuned to 3 classes, build the model with a last layer of 3 outputs (a model "
            "file, file.py:build; for a torchvision network, "
            "torchvision.models.<name>(num_classes=3))"
        )


def test_other_classes_are_named_where_a_later_layer_holds_only_a_buffer(tmp_path):
    # The state dict of Sequential(Linear, Temper) ends in the buffer "1.temperature",
    # a layer without parameters after the logits: the last layer is "0", whose outputs
    # alone differ, not "1".
    from betasmooth.checkpoint import apply_weights

    class Temper(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("temperature", torch.ones(1))

        def forward(self, x):
            return x / self.temperature

    def net(classes):
        return nn.Sequential(nn.Linear(4, classes), Temper())

    assert list(net(5).state_dict())[-1] == "1.temperature"
    torch.save(net(3).state_dict(), tmp_path / "w.pt")
    with pytest.raises(InputError) as info:
        apply_weights(net(5), tmp_path / "w.pt")
    assert str(info.value).endswith(
        "; the file's last layer (0) has 3 outputs, the model's 5: for weights fine-tuned to 3 "
        "classes, build the model with a last layer of 3 outputs (a model file, file.py:build; "
        "for a torchvision network, torchvision.models.<name>(num_classes=3))"
    )


def test_a_shared_first_name_is_not_stripped_from_a_key_that_is_that_name_alone(tmp_path):
    # "module" and "module.weight" share their first name, but "module" has no prefix
    # to strip: the keys are named as found, not as an empty one.
    from betasmooth.checkpoint import apply_weights

    linear = nn.Linear(2, 1)
    state = {"module": torch.zeros(1), **{f"module.{k}": v for k, v in linear.state_dict().items()}}
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(InputError) as info:
        apply_weights(nn.Linear(2, 1), tmp_path / "w.pt")
    assert "(missing keys: weight, bias; unexpected keys: module, module.weight, module.bias)" in (
        str(info.value)
    )


def test_weights_of_the_network_a_model_wraps_name_that_submodule(tmp_path):
    # A model that normalises before the network it wraps has that network's keys
    # under "1."; the file of the bare network fits that submodule, which is named.
    (tmp_path / "wrap.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Shift(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.register_buffer('mean', torch.zeros(1))\n\n"
        "    def forward(self, x):\n        return x - self.mean\n\n\n"
        "def make():\n"
        "    return nn.Sequential(Shift(), nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))\n"
    )
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(InputError) as info:
        bs.load_model(f"{tmp_path / 'wrap.py'}:make", weights=tmp_path / "bare.pt")
    assert str(info.value).endswith(
        "expected the state dict of the same architecture (the file's keys are those of the "
        "model's submodule '1': the network it wraps; save the whole model's state_dict, or "
        "load the file into that submodule in the model file)"
    )
    # Keys of no one submodule get no such hint.
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(InputError, match=r"architecture$"):
        bs.load_model(f"{tmp_path / 'wrap.py'}:make", weights=tmp_path / "other.pt")


def test_an_image_size_of_three_sides_is_refused():
    """``image_size`` is one side or ``(height, width)``: a third side is refused, not passed on."""
    with pytest.raises(
        InputError,
        match=r"^image_size must be a positive int or \(height, width\) of ints; got \(8, 8, 8\)$",
    ):
        bs.load_data("digits", image_size=(8, 8, 8))


def test_a_bicubic_resize_of_values_below_zero_is_clipped_to_their_own_range():
    """Data in [-1, 1]: bicubic overshoot is clipped to [-1, 1], not at 0."""
    from torchvision.transforms import InterpolationMode, v2

    x = 2 * torch.rand(1, 1, 40, 50, generator=torch.Generator().manual_seed(1)) - 1
    resize = v2.Resize(32, interpolation=InterpolationMode.BICUBIC, antialias=True)
    expected = v2.CenterCrop(28)(resize(x)).clamp(float(x.min()), 1.0)
    got = bs.zoo.resize_crop(x, 32, 28, "bicubic")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert float(got.min()) < -0.5


@pytest.mark.parametrize("mean", [0.0, 1.0])
def test_a_mean_at_either_end_of_the_pixels_range_is_taken(mean) -> None:
    """The mean of pixels in [0, 1] may be 0 or 1 itself: x and bounds are ``(v - mean) / 0.5``."""
    raw, _ = bs.load_data("digits")
    data = bs.load_data("digits", mean=mean, std=0.5)
    torch.testing.assert_close(data.x, (raw - mean) / 0.5)
    assert data.low.flatten().tolist() == [-2.0 * mean]
    assert data.high.flatten().tolist() == [2.0 - 2.0 * mean]


@pytest.mark.parametrize("sep", ["/", "\\"])
def test_a_model_path_without_the_py_suffix_is_named_as_a_missing_file(sep) -> None:
    """A spec with a path separator is a file, also without ``.py``: its absence is said."""
    where = f"no_such_folder{sep}net"
    with pytest.raises(
        InputError,
        match=rf"^model file {re.escape(where)} does not exist; expected 'path/to/file.py:factory'",
    ):
        bs.load_model(f"{where}:build")


# ----------------------------------------------------------- the model's own code


def _forget(monkeypatch, *names: str) -> None:
    """Drop ``names`` from ``sys.modules`` now and again when the test ends (monkeypatch
    restores what it saw: absent), so that each test imports its files afresh."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)


def test_a_model_file_and_the_modules_beside_it_that_it_imports_are_its_code(tmp_path, monkeypatch):
    # The files that a traceback may point into as the user's: the model file, a module
    # beside it imported at its top, and one its factory imports; a module of another
    # folder on sys.path that it imports (a library) is not.
    from betasmooth import zoo

    monkeypatch.setattr(zoo, "_USER_CODE", set())
    folder, lib = tmp_path / "models", tmp_path / "lib"
    folder.mkdir()
    lib.mkdir()
    (folder / "betasmooth_test_uc_top.py").write_text("WIDTH = 2\n")
    (folder / "betasmooth_test_uc_lazy.py").write_text("SCALE = 1\n")
    (lib / "betasmooth_test_uc_lib.py").write_text("BIAS = True\n")
    (folder / "net.py").write_text(
        "from torch import nn\nimport betasmooth_test_uc_top as top\n"
        "import betasmooth_test_uc_lib as lib\n\n"
        "def build():\n    import betasmooth_test_uc_lazy\n"
        "    return nn.Linear(3, top.WIDTH, bias=lib.BIAS)\n"
    )
    monkeypatch.syspath_prepend(str(lib))
    _forget(
        monkeypatch, "betasmooth_test_uc_top", "betasmooth_test_uc_lazy", "betasmooth_test_uc_lib"
    )
    assert bs.load_model(f"{folder / 'net.py'}:build").out_features == 2
    mine = [folder / "net.py", folder / "betasmooth_test_uc_top.py"]
    mine.append(folder / "betasmooth_test_uc_lazy.py")
    assert all(zoo.is_user_code(str(path)) for path in mine)
    assert not zoo.is_user_code(str(lib / "betasmooth_test_uc_lib.py"))
    assert zoo._USER_CODE == {path.resolve() for path in mine}


def test_a_model_module_and_its_packages_own_modules_are_its_code(tmp_path, monkeypatch):
    # "pkg.sub.net:build": the module, a module of its package elsewhere than its own
    # subpackage (the package is the top one), and one its factory imports are the model's
    # code; a module already imported before is still the module the spec names; a library
    # in an environment inside the package (dist-packages, as Debian names site-packages)
    # and a module outside the package are not.
    from betasmooth import zoo

    monkeypatch.setattr(zoo, "_USER_CODE", set())
    pkg = tmp_path / "betasmooth_test_ucpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "blocks.py").write_text("WIDTH = 3\n")
    (pkg / "lazy.py").write_text("SCALE = 1\n")
    env = pkg / "env" / "dist-packages"
    env.mkdir(parents=True)
    (env / "betasmooth_test_ucenv.py").write_text("BIAS = False\n")
    (tmp_path / "betasmooth_test_ucout.py").write_text("ONE = 1\n")
    (pkg / "sub" / "net.py").write_text(
        "from torch import nn\nfrom betasmooth_test_ucpkg import blocks\n"
        "import betasmooth_test_ucenv as env\nimport betasmooth_test_ucout\n\n"
        "def build():\n    from betasmooth_test_ucpkg import lazy\n"
        "    return nn.Linear(2, blocks.WIDTH, bias=env.BIAS)\n"
    )
    monkeypatch.syspath_prepend(str(env))
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ["betasmooth_test_ucpkg", "betasmooth_test_ucpkg.sub", "betasmooth_test_ucpkg.sub.net"]
    names += ["betasmooth_test_ucpkg.blocks", "betasmooth_test_ucpkg.lazy"]
    _forget(monkeypatch, *names, "betasmooth_test_ucenv", "betasmooth_test_ucout")
    model = bs.load_model("betasmooth_test_ucpkg.sub.net:build")
    assert model.out_features == 3 and model.bias is None
    mine = {(pkg / "sub" / "net.py").resolve(), (pkg / "blocks.py").resolve()}
    mine |= {(pkg / name).resolve() for name in ("__init__.py", "sub/__init__.py", "lazy.py")}
    assert zoo._USER_CODE == mine
    assert not zoo.is_user_code(str(env / "betasmooth_test_ucenv.py"))
    # Imported by the user before the spec named it: still the model's code.
    import importlib

    (tmp_path / "betasmooth_test_ucpre.py").write_text(
        "from torch import nn\n\ndef build():\n    return nn.Linear(1, 1)\n"
    )
    _forget(monkeypatch, "betasmooth_test_ucpre")
    importlib.import_module("betasmooth_test_ucpre")
    assert not zoo.is_user_code(str(tmp_path / "betasmooth_test_ucpre.py"))
    bs.load_model("betasmooth_test_ucpre:build")
    assert zoo.is_user_code(str(tmp_path / "betasmooth_test_ucpre.py"))


@pytest.mark.parametrize(
    ("write", "said"),
    [
        # Only the four bytes of a zip's local header (PK\x03\x04) make a cut-short
        # archive; a text that happens to start with "PK" is named by its first bytes.
        (
            lambda path: path.write_bytes(b"PKG notes, not weights\n"),
            "cannot read weights file {path}: it is not a file written by torch.save (it "
            "starts with b'PKG '); expected a file written by torch.save(model.state_dict(), ...)",
        ),
        # Of two entries that are no tensors, the first in the file's order is named (an
        # epoch counter that precedes a note).
        (
            lambda path: torch.save({"weight": torch.zeros(1), "epoch": 3, "note": "x"}, path),
            "{path} is not a state dict (entry 'epoch' is not a tensor; expected a file "
            "written by torch.save(model.state_dict(), ...))",
        ),
    ],
    ids=["text-starting-with-PK", "first-entry-no-tensor"],
)
def test_a_file_that_is_no_state_dict_is_named_by_what_it_holds(tmp_path, write, said) -> None:
    path = tmp_path / "w.pt"
    write(path)
    with pytest.raises(InputError) as info:
        load_state_dict(path)
    assert str(info.value) == said.format(path=path)


def test_keys_that_name_the_models_tensors_lose_no_prefix(tmp_path) -> None:
    # The file's keys "net.weight", "net.bias" are the model's own (its wrapped Linear):
    # they are taken as they are, not stripped of "net." to fit the model's own
    # "weight", so that the one tensor missing is named: the model's "weight".
    from betasmooth.checkpoint import apply_weights

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1))
            self.net = nn.Linear(2, 1)

    torch.save({f"net.{k}": v for k, v in nn.Linear(2, 1).state_dict().items()}, tmp_path / "w.pt")
    with pytest.raises(InputError) as info:
        apply_weights(Scaled(), tmp_path / "w.pt")
    assert str(info.value) == (
        f"weights in {tmp_path / 'w.pt'} do not fit the model (missing keys: weight); expected "
        "the state dict of the same architecture"
    )


def test_a_wrapped_models_file_with_an_extra_tensor_names_it_without_the_prefix(tmp_path):
    # DataParallel's keys ("module." before each) of a Linear and one tensor more: the
    # prefix goes since it makes keys of the model, and the one extra tensor is named,
    # not every key of the file.
    from betasmooth.checkpoint import apply_weights

    state = {**nn.Linear(2, 1).state_dict(), "extra": torch.zeros(1)}
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "w.pt")
    with pytest.raises(InputError) as info:
        apply_weights(nn.Linear(2, 1), tmp_path / "w.pt")
    assert str(info.value) == (
        f"weights in {tmp_path / 'w.pt'} do not fit the model (unexpected keys: extra); "
        "expected the state dict of the same architecture"
    )


def test_an_npz_whose_array_would_run_code_is_refused_unrun(tmp_path) -> None:
    # np.savez pickles an object array; unpickling this one would create a file. The
    # archive is refused in one line and the file is never created.
    marker = tmp_path / "ran"
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([_Trap(marker)], dtype=object))
    with pytest.raises(InputError) as info:
        read_npz(path)
    assert str(info.value) == (
        f"{path} holds pickled objects, which are never loaded; expected numeric arrays"
    )
    assert not marker.exists()


def test_an_empty_state_dict_is_not_said_to_be_a_submodules(tmp_path) -> None:
    # No keys at all are the keys of no submodule: the plain line, without the hint
    # about the network a model wraps.
    from betasmooth.checkpoint import apply_weights

    torch.save({}, tmp_path / "w.pt")
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.Linear(2, 1)))
    with pytest.raises(InputError) as info:
        apply_weights(model, tmp_path / "w.pt")
    assert str(info.value) == (
        f"weights in {tmp_path / 'w.pt'} do not fit the model (missing keys: 1.0.weight, "
        "1.0.bias); expected the state dict of the same architecture"
    )


def test_no_other_classes_are_named_where_a_key_is_missing_too(tmp_path) -> None:
    # The last layer's outputs differ (2 against 5), but the file also lacks the first
    # layer's bias: other classes are not the whole story, so the plain line.
    from betasmooth.checkpoint import apply_weights

    def net(classes):
        return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, classes))

    torch.save({k: v for k, v in net(2).state_dict().items() if k != "0.bias"}, tmp_path / "w.pt")
    with pytest.raises(InputError) as info:
        apply_weights(net(5), tmp_path / "w.pt")
    assert str(info.value) == (
        f"weights in {tmp_path / 'w.pt'} do not fit the model (missing keys: 0.bias; shape "
        "mismatch: 2.weight (2, 4) vs model (5, 4), 2.bias (2,) vs model (5,)); expected the "
        "state dict of the same architecture"
    )


@pytest.mark.parametrize(("model_scale", "file_scale"), [((5,), ()), ((), (2,))])
def test_no_other_classes_are_named_where_the_last_layer_holds_a_scalar(
    tmp_path, model_scale, file_scale
):
    # A last layer of a weight and a scale, the scale a scalar (no outputs to count) in
    # the model or in the file: the number of classes cannot be read from it, so the
    # plain line, not a hint (nor a crash on the scalar's missing first dimension).
    from betasmooth.checkpoint import apply_weights

    class Last(nn.Module):
        def __init__(self, classes, scale):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(classes, 4))
            self.scale = nn.Parameter(torch.zeros(scale))

    torch.save(Last(2, file_scale).state_dict(), tmp_path / "w.pt")
    with pytest.raises(InputError) as info:
        apply_weights(Last(5, model_scale), tmp_path / "w.pt")
    assert str(info.value) == (
        f"weights in {tmp_path / 'w.pt'} do not fit the model (shape mismatch: weight (2, 4) "
        f"vs model (5, 4), scale {file_scale} vs model {model_scale}); expected the state "
        "dict of the same architecture"
    )


def test_no_other_classes_are_named_where_the_files_last_tensors_disagree(tmp_path):
    # The file's last layer has a weight of 2 rows but a scale of 3: no one number of
    # classes fits it, so the plain line.
    from betasmooth.checkpoint import apply_weights

    class Last(nn.Module):
        def __init__(self, rows, scales):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(rows, 4))
            self.scale = nn.Parameter(torch.zeros(scales))

    torch.save(Last(2, 3).state_dict(), tmp_path / "w.pt")
    with pytest.raises(InputError) as info:
        apply_weights(Last(5, 5), tmp_path / "w.pt")
    assert str(info.value).endswith(
        "scale (3,) vs model (5,)); expected the state dict of the same architecture"
    )


def test_a_folder_given_as_an_npz_is_named_a_directory(tmp_path) -> None:
    with pytest.raises(InputError) as info:
        read_npz(tmp_path)
    assert str(info.value) == f"{tmp_path} is a directory; expected an .npz file (np.savez)"
