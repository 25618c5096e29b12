"""Files read safely: state dicts fitted to a model, and arrays of ``.npz`` archives.

Weights are only ever read with ``torch.load(..., weights_only=True)``, which
restores tensors and plain containers and refuses to unpickle anything else,
so a weights file cannot run code; ``.npz`` archives are read with
``allow_pickle=False`` for the same reason.
"""

from __future__ import annotations

import importlib.resources
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .validate import InputError, OutOfMemory, is_oom

__all__ = [
    "LOADING",
    "STATE_DICT_HINT",
    "apply_weights",
    "load_shipped",
    "load_state_dict",
    "read_npz",
    "reason",
    "shipped_file",
]

STATE_DICT_HINT = "expected a file written by torch.save(model.state_dict(), ...)"
#: What to try when a model's weights do not fit in memory.
LOADING = "expected more free memory: the model's weights alone do not fit"


def reason(err: BaseException) -> str:
    """The first line of an error, with its type, for a one-line message.

    Examples
    --------
    >>> reason(ValueError("bad value\\nand a second line"))
    'ValueError: bad value'
    """
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= 200 else line[:197] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _unreadable(path: Path, err: BaseException) -> str:
    """Why ``torch.load`` could not read ``path``, in the file's terms where they are clear."""
    with open(path, "rb") as file:
        start = file.read(9)
    head = start[:4]
    if not head:
        return "the file is empty"
    if zipfile.is_zipfile(path):
        names = zipfile.ZipFile(path).namelist()
        if all(n.endswith(".npy") for n in names):
            return "it is a NumPy .npz archive, not a file of torch.save"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return (
                "it is a TorchScript archive (torch.jit.save), which holds code; save its "
                "weights with torch.save(torch.jit.load(path).state_dict(), 'weights.pt')"
            )
        return reason(err)
    if len(start) == 9 and start[8:] == b"{":
        # safetensors: an 8-byte little-endian header length, then the JSON header.
        return (
            "it is a safetensors file; save its tensors with "
            "torch.save(safetensors.torch.load_file(path), 'weights.pt')"
        )
    if head == b"PK\x03\x04":
        # torch.save writes a zip archive; one without its end was cut short.
        return "it is damaged or cut short (a zip archive without its end)"
    if head[:1] != b"\x80":  # every pickle of protocol 2 or later starts so
        return f"it is not a file written by torch.save (it starts with {head!r})"
    return reason(err)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict with ``torch.load(weights_only=True)`` onto the CPU.

    Parameters
    ----------
    path : str or Path
        A file written by ``torch.save(model.state_dict(), path)``.

    Returns
    -------
    dict of str to torch.Tensor
        The state dict.

    Raises
    ------
    InputError
        The file is missing, unreadable, or holds anything but a mapping from
        names to tensors (pickled objects are refused, never run).

    Examples
    --------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
    >>> torch.save(nn.Linear(2, 1).state_dict(), path)
    >>> sorted(load_state_dict(path))
    ['bias', 'weight']
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise InputError(f"weights file {path} {problem}; {STATE_DICT_HINT}")
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of foreign files before refusing them.
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        with open(path, "rb") as file:
            pickled = file.read(1) == b"\x80" or zipfile.is_zipfile(path)
        if found is None and not pickled:
            # No pickle at all (a text file, another format): nothing unsafe was refused.
            raise InputError(
                f"cannot read weights file {path}: {_unreadable(path, err)}; {STATE_DICT_HINT}"
            ) from err
        what = f"the pickled object {found.group(1)}" if found else "its content"
        raise InputError(
            f"{path} is not a state dict (torch.load with weights_only=True refused {what} "
            f"without running it; {STATE_DICT_HINT})"
        ) from err
    except Exception as err:
        if is_oom(err):
            raise OutOfMemory(err, f"reading weights file {path}", LOADING) from None
        raise InputError(
            f"cannot read weights file {path}: {_unreadable(path, err)}; {STATE_DICT_HINT}"
        ) from err
    if not isinstance(state, Mapping):
        raise InputError(
            f"{path} is not a state dict (it holds a {type(state).__name__}; {STATE_DICT_HINT})"
        )
    wrong = [k for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if wrong:
        nested = [k for k in ("state_dict", "model_state_dict", "model") if k in state]
        hint = f"; the model's weights may be under key {nested[0]!r}" if nested else ""
        key = wrong[0]
        what = "is not a tensor" if isinstance(key, str) else "has a key that is not a name"
        raise InputError(
            f"{path} is not a state dict (entry {key!r} {what}{hint}; {STATE_DICT_HINT})"
        )
    return dict(state)


def shipped_file(name: str) -> Path:
    """The weights file ``name`` that ships inside the package (``betasmooth/weights``).

    Examples
    --------
    >>> shipped_file("digits_cnn.pt").name
    'digits_cnn.pt'
    """
    return Path(str(importlib.resources.files(__package__) / "weights" / name))


def load_shipped(model: nn.Module, name: str, script: str) -> nn.Module:
    """``model`` in evaluation mode with the shipped weights ``name``.

    A missing file names ``script``, the training script that recreates it.

    Examples
    --------
    >>> from betasmooth.zoo import digits_cnn
    >>> load_shipped(digits_cnn(), "digits_cnn.pt", "scripts/train_digits_cnn.py").training
    False
    """
    path = shipped_file(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"the weights {name} are missing at {path}; recreate them with python {script}"
        )
    model.load_state_dict(load_state_dict(path))
    return model.eval()


def _unprefixed(
    state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` without the first name that every key shares, as often as that makes
    keys of ``own`` of them (a wrapper's prefix); else ``state`` as it is."""
    stripped = state
    for _ in range(3):
        if not stripped or any(k in own for k in stripped):
            break
        heads = {k.partition(".")[0] for k in stripped}
        if len(heads) != 1 or not all("." in k for k in stripped):
            break
        stripped = {k.partition(".")[2]: v for k, v in stripped.items()}
    return stripped if any(k in own for k in stripped) else state


def apply_weights(model: nn.Module, path: str | Path) -> None:
    """Load the state dict at ``path`` into ``model``; keys and shapes must match exactly.

    As ``nn.Module.load_state_dict`` does, BatchNorm's ``num_batches_tracked``
    may be absent (older checkpoints). Weights saved from a model wrapped in
    ``DataParallel`` (every key prefixed ``module.``), ``torch.compile``
    (``_orig_mod.``) or held by a training framework's module (``model.`` in a
    Lightning checkpoint's ``state_dict``) are read without that prefix.

    Examples
    --------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
    >>> torch.save(nn.Linear(2, 1).state_dict(), path)
    >>> model = nn.Linear(2, 1)
    >>> apply_weights(model, path)
    >>> torch.equal(model.weight, torch.load(path, weights_only=True)["weight"])
    True
    """
    own = model.state_dict()
    state = _unprefixed(load_state_dict(path), own)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", shapes),
        )
        if items
    ]
    if problems:
        names = [name for name, _ in model.named_parameters()]
        hint = (
            _classes_hint(state, own, names[-1])
            if names and shapes and not missing + unexpected
            else ""
        )
        raise InputError(
            f"weights in {path} do not fit the model ({'; '.join(problems)}); expected the "
            f"state dict of the same architecture{hint or _inner_hint(state, own)}"
        )
    model.load_state_dict(state)


def _classes_hint(
    state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], last_parameter: str
) -> str:
    """Where only the model's last layer (that of its last parameter) differs, in its
    number of outputs (weights fine-tuned to other classes), say which model fits them.

    Examples
    --------
    >>> own = {"f.weight": torch.zeros(4, 3), "fc.weight": torch.zeros(1000, 4),
    ...        "fc.bias": torch.zeros(1000)}
    >>> print(_classes_hint({**own, "fc.weight": torch.zeros(10, 4),
    ...                      "fc.bias": torch.zeros(10)}, own, "fc.bias"))
    ; the file's last layer (fc) has 10 outputs, the model's 1000: for weights fine-tuned \
to 10 classes, build the model with a last layer of 10 outputs (a model file, file.py:build; \
for a torchvision network, torchvision.models.<name>(num_classes=10))
    """
    layer = last_parameter.rpartition(".")[0]
    last = [k for k in own if k.rpartition(".")[0] == layer]
    if any(k not in state or own[k].dim() == 0 or state[k].dim() == 0 for k in last):
        return ""
    differ = {k for k in own if k in state and state[k].shape != own[k].shape}
    outputs = {int(state[k].shape[0]) for k in last}
    n, wanted = outputs.pop(), int(own[last[0]].shape[0])
    fits = all(state[k].shape[1:] == own[k].shape[1:] for k in last)
    if not differ or not differ <= set(last) or outputs or not fits or n == wanted:
        return ""
    named = f" ({layer})" if layer else ""
    return (
        f"; the file's last layer{named} has {n} outputs, the model's {wanted}: for weights "
        f"fine-tuned to {n} classes, build the model with a last layer of {n} outputs (a model "
        f"file, file.py:build; for a torchvision network, "
        f"torchvision.models.<name>(num_classes={n}))"
    )


def _inner_hint(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str:
    """Where the file's keys are all those of one submodule of the model (a network the
    model wraps, e.g. after a normalisation), name it."""
    wanted = {k for k in state if not k.endswith("num_batches_tracked")}
    for head in dict.fromkeys(k.partition(".")[0] for k in own if "." in k):
        inner = {k.partition(".")[2] for k in own if k.startswith(head + ".")}
        if wanted and wanted <= inner and not (wanted & own.keys()):
            return (
                f" (the file's keys are those of the model's submodule {head!r}: the network "
                f"it wraps; save the whole model's state_dict, or load the file into "
                f"that submodule in the model file)"
            )
    return ""


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive, read whole, never unpickling objects.

    Raises
    ------
    InputError
        One line naming the file and what is wrong with it: missing, not an
        archive, damaged (e.g. truncated), or holding pickled objects.

    Examples
    --------
    >>> import tempfile
    >>> path = tempfile.mkdtemp() + "/a.npz"
    >>> np.savez(path, x=np.zeros(3))
    >>> {k: v.shape for k, v in read_npz(path).items()}
    {'x': (3,)}
    """
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise InputError(f"{path} holds a single .npy array; expected an .npz (np.savez)")
        with archive:
            return {key: archive[key] for key in archive.files}
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; expected an .npz file (np.savez)") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory; expected an .npz file (np.savez)") from None
    except (zipfile.BadZipFile, EOFError) as err:
        raise InputError(f"{path} is a damaged .npz archive ({reason(err)})") from None
    except (ValueError, OSError, pickle.UnpicklingError) as err:
        if "allow_pickle" in str(err) and zipfile.is_zipfile(path):
            problem = "holds pickled objects, which are never loaded; expected numeric arrays"
        elif not zipfile.is_zipfile(path):
            problem = "is not an .npz archive; expected a file written by np.savez"
        else:
            problem = f"cannot be read ({reason(err)}); expected numeric arrays (np.savez)"
        raise InputError(f"{path} {problem}") from None
