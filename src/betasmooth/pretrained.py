"""Pretrained torchvision classifiers by spec: ``torchvision:NAME[:WEIGHTS]``.

``torchvision:vgg16`` is VGG-16 with its ``DEFAULT`` weights,
``torchvision:resnet50:IMAGENET1K_V2`` names a member of the weights enum.
Names and weights are torchvision's own (:func:`torchvision.models.get_model`,
:func:`torchvision.models.get_model_weights`). The weights file is the one
torchvision downloads into the torch hub cache,
``torch.hub.get_dir()/checkpoints/<file name of weights.url>`` (``TORCH_HOME``
moves it): a cached file is read with ``torch.load(weights_only=True)`` and
the state dict handed to torchvision's own builder,
``get_model(name, weights=...)``, in place of its unpickling load; a
missing one is downloaded once, and without network the error says which
file is missing, where it is expected and how to get it.

The weights come with their preprocessing (resize of the shorter side, centre
crop, mean, std) and class names: :func:`preprocessing` and
:func:`categories` give them, and ``load_data(..., preset=spec)`` prepares
images as the weights require.

torchvision is an optional dependency: ``pip install -e ".[vision]"``.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .checkpoint import LOADING, load_state_dict
from .validate import InputError, OutOfMemory, expect_normalised, is_oom

__all__ = [
    "BUILT_WITH_WEIGHTS",
    "PREFIX",
    "Preprocessing",
    "categories",
    "checkpoint_path",
    "download",
    "is_pretrained",
    "load_pretrained",
    "preprocessing",
    "weights_of",
]

#: Spec prefix of the pretrained torchvision models.
PREFIX = "torchvision"
EXTRA = 'pip install -e ".[vision]"'


@dataclass(frozen=True)
class Preprocessing:
    """How a model's weights expect its input: resize, crop, then normalise.

    Attributes
    ----------
    resize : int
        Length the shorter image side is resized to (antialiased).
    crop : int
        Side of the centre crop taken after resizing.
    mean, std : tuple of float
        Per-channel normalisation ``(x - mean) / std`` of images in [0, 1].
    interpolation : str
        ``"bilinear"``, or ``"bicubic"`` where the weights ask for it (Swin,
        most EfficientNets, MaxViT, ``vit_h_14``): the resize of the weights'
        ``transforms()``.

    Examples
    --------
    >>> p = preprocessing("torchvision:resnet18")  # read from torchvision, no download
    >>> p.resize, p.crop, p.mean
    (256, 224, (0.485, 0.456, 0.406))
    """

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"


def is_pretrained(spec: object) -> bool:
    """Whether ``spec`` names a torchvision model (``torchvision:NAME[:WEIGHTS]``).

    Examples
    --------
    >>> is_pretrained("torchvision:vgg16"), is_pretrained("digits-cnn")
    (True, False)
    """
    return isinstance(spec, str) and spec.partition(":")[0] == PREFIX


def _torchvision() -> types.ModuleType:
    try:
        import torchvision.models
    except ImportError as err:
        raise InputError(
            f"torchvision models need the optional torchvision package ({err}); "
            f"install the extra with {EXTRA}"
        ) from err
    return torchvision.models


def _parse(spec: str) -> tuple[str, str]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != PREFIX or not all(parts[1:]):
        raise InputError(
            f"model spec {spec!r} is malformed; expected torchvision:NAME or "
            "torchvision:NAME:WEIGHTS, e.g. torchvision:vgg16 or torchvision:resnet50:IMAGENET1K_V2"
        )
    return parts[1], parts[2] if len(parts) == 3 else "DEFAULT"


def weights_of(spec: str) -> object:
    """The torchvision weights enum member that ``spec`` names.

    Raises
    ------
    InputError
        torchvision is missing, or the model or weights name is unknown.

    Examples
    --------
    >>> weights_of("torchvision:vgg16").name
    'IMAGENET1K_V1'
    """
    models = _torchvision()
    name, member = _parse(spec)
    if name not in models.list_models():
        raise InputError(
            f"unknown torchvision model {name!r}; expected an image classifier from "
            "torchvision.models.list_models(module=torchvision.models), e.g. vgg16, resnet50"
        )
    # Detection, segmentation, video, optical flow and quantized (int8, not
    # differentiable) models take other inputs or give no class logits.
    if name not in models.list_models(module=models):
        raise InputError(
            f"torchvision model {name!r} is not an image classifier; expected one from "
            "torchvision.models.list_models(module=torchvision.models), e.g. vgg16, resnet50"
        )
    enum = models.get_model_weights(name)
    if member == "DEFAULT":
        return enum.DEFAULT
    if member not in enum.__members__:
        # The enum lists DEFAULT among its members already (an alias of one of them).
        known = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))
        raise InputError(f"unknown weights {member!r} for {name}; expected one of {known}")
    return enum[member]


def checkpoint_path(spec: str) -> Path:
    """Where torchvision keeps the weights file of ``spec``: the torch hub cache.

    Examples
    --------
    >>> checkpoint_path("torchvision:vgg16").name
    'vgg16-397923af.pth'
    """
    url = weights_of(spec).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def download(url: str, path: Path) -> None:
    """Fetch ``url`` into ``path`` (the hub cache) as torchvision itself would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=True)


def _fetch(spec: str, path: Path) -> None:
    name = _parse(spec)[0]
    try:
        download(weights_of(spec).url, path)
    except (OSError, RuntimeError, ValueError) as err:
        raise InputError(
            f"the weights of {spec} are not cached and could not be downloaded ({err}): "
            f"expected the file {path.name} in {path.parent} (torch hub cache, moved by "
            'TORCH_HOME); run once with network, or python -c "import torchvision; '
            f"torchvision.models.get_model('{name}', weights='{weights_of(spec).name}')\", "
            "or copy the file there"
        ) from err


def _vit_size(weights: object) -> dict[str, object]:
    return {"image_size": weights.meta["min_size"][0]}


def _inputs_in_minus_one_to_one(weights: object) -> dict[str, object]:
    return {"transform_input": True, "aux_logits": False, "init_weights": False}


#: What torchvision's builders set from their weights, ``get_model(name,
#: weights=...)``, beyond the class count: a model built for weights of one's
#: own (``pretrained=False``) is built the same way, so that a state dict
#: fine-tuned from the pretrained model computes the same function. GoogLeNet's
#: and Inception v3's weights expect inputs in [-1, 1], which
#: ``transform_input`` makes of ImageNet-normalised ones; their auxiliary heads
#: (training only) are dropped, as the builder drops them after loading.
BUILT_WITH_WEIGHTS: dict[str, Callable[[object], dict[str, object]]] = {
    "googlenet": _inputs_in_minus_one_to_one,
    "inception_v3": _inputs_in_minus_one_to_one,
    "maxvit_t": lambda w: {"input_size": tuple(w.meta["min_size"])},
    **dict.fromkeys(["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"], _vit_size),
}


def load_pretrained(spec: str, pretrained: bool = True) -> nn.Module:
    """The torchvision model of ``spec`` with its pretrained weights, on the CPU.

    The cached state dict is read with ``torch.load(weights_only=True)`` (a
    missing file is downloaded into the hub cache first) and handed to
    torchvision's own builder, ``get_model(name, weights=...)``: the model is
    the one torchvision makes with these weights (GoogLeNet's
    ``transform_input``, DenseNet's renamed keys, a ViT's image size).
    ``pretrained=False`` returns the architecture alone, built as for these
    weights (:data:`BUILT_WITH_WEIGHTS`: GoogLeNet's ``transform_input``, a
    ViT's image size) but initialised at random, for weights of one's own
    fine-tuned from them (nothing is read or fetched).

    Raises
    ------
    InputError
        torchvision is missing, the spec is unknown, or the file is neither
        cached nor downloadable (the message names the file and where it is
        expected).

    Examples
    --------
    >>> model = load_pretrained("torchvision:vgg16")  # doctest: +SKIP
    """

    weights = weights_of(spec)
    name = _parse(spec)[0]
    if not pretrained:
        built = BUILT_WITH_WEIGHTS.get(name, lambda w: {})(weights)
        return _torchvision().get_model(name, weights=None, **built).eval()
    path = checkpoint_path(spec)
    if not path.is_file():
        _fetch(spec, path)
    try:
        state = load_state_dict(path)
    except OutOfMemory:
        raise  # not the file's fault
    except InputError as err:
        raise InputError(f"{err}; delete it so that it is downloaded again") from None
    try:
        # torchvision's own builder, so that the model is the one its weights
        # make (GoogLeNet's transform_input, DenseNet's renamed keys, a ViT's
        # image size), fed the state dict read with weights_only.
        with _serving(weights, state):
            model = _torchvision().get_model(name, weights=weights)
    except RuntimeError as err:
        if is_oom(err):  # not the file's fault: deleting it would lose good weights
            raise OutOfMemory(err, f"building {name} with the weights {weights}", LOADING) from None
        detail = " ".join(line.strip() for line in str(err).splitlines()[:2])
        raise InputError(
            f"{path} does not hold the weights {weights} ({_brief(detail)}); "
            "delete it so that it is downloaded again"
        ) from err
    return _expecting(spec, model.eval())


def _expecting(spec: str, model: nn.Module) -> nn.Module:
    """``model``, known to expect input normalised as the weights of ``spec`` say
    (:func:`~betasmooth.validate.expect_normalised`); not said of weights of one's own,
    which may have been trained on other statistics."""
    with contextlib.suppress(InputError):  # weights without an image preprocessing
        prep = preprocessing(spec)
        expect_normalised(model, spec, prep.mean, prep.std)
    return model


@contextlib.contextmanager
def _serving(weights: object, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Make ``weights.get_state_dict()`` return ``state`` instead of unpickling its file.

    Only this member of the weights enum is changed, and one load at a time:
    another thread's load of other weights of the class is not affected.
    """
    with _SERVING:
        vars(weights)["get_state_dict"] = lambda *args, **kwargs: state
        try:
            yield
        finally:
            del vars(weights)["get_state_dict"]


_SERVING = threading.Lock()


def _brief(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + " ..."


def preprocessing(spec: str) -> Preprocessing:
    """Resize, crop, mean, std and interpolation that the weights of ``spec`` expect.

    Read from ``weights.transforms()``.

    Examples
    --------
    >>> preprocessing("torchvision:vgg16")  # doctest: +NORMALIZE_WHITESPACE
    Preprocessing(resize=256, crop=224, mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225), interpolation='bilinear')
    >>> preprocessing("torchvision:swin_t").interpolation
    'bicubic'
    """
    t = weights_of(spec).transforms()
    if not all(hasattr(t, a) for a in ("resize_size", "crop_size", "mean", "std")):
        raise InputError(
            f"the weights of {spec} have no image-classification preprocessing; "
            "expected an image classifier from torchvision.models"
        )
    return Preprocessing(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=tuple(float(m) for m in t.mean),
        std=tuple(float(s) for s in t.std),
        interpolation=str(getattr(t.interpolation, "value", t.interpolation)),
    )


def categories(spec: str) -> list[str] | None:
    """The class names of the weights of ``spec``, by class index (``None`` if unnamed).

    Examples
    --------
    >>> categories("torchvision:vgg16")[:2]
    ['tench', 'goldfish']
    """
    names = weights_of(spec).meta.get("categories")
    return list(names) if names else None
