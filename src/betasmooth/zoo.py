"""Built-in data and models, and safe loading of a user's own.

Data and models are named by the same spec strings as on the command line.

Data specs
    ``"digits"``
        scikit-learn's handwritten digits (1797 images of 8 x 8 pixels, values
        0..16), scaled to [0, 1] and upsampled to 32 x 32 by bilinear
        interpolation (``align_corners=False``), shape ``(N, 1, 32, 32)``. The
        split is fixed: ``train_test_split`` stratified by label with
        ``test_size=0.25, random_state=0`` gives 1347 training and 450 test
        images; ``"all"`` is every image in the original order.
    ``"photos"``
        Crops of ten photographs that ship with scikit-image and scikit-learn,
        labelled by the photograph they come from, ``(N, 3, 64, 64)``; see
        :mod:`betasmooth.photos`.
    a folder of images
        PNG, JPEG, BMP, PPM/PGM, TIFF or WebP files (the suffixes torchvision's
        ``ImageFolder`` reads) read with Pillow. With class subfolders the label
        of an image is the index of its subfolder among the sorted subfolder
        names; a flat folder has no labels (every label is -1). Images are
        converted to grey (``channels=1``) or RGB (``channels=3``, alpha
        dropped; the default when any image is stored in a colour mode: RGB,
        RGBA, CMYK or a palette, even one of greys) and scaled to [0, 1]
        (8-bit values by 255, 16-bit grey by 65535, and an integer image with
        values outside [0, 65535] is refused; Pillow reads a 16-bit grey PNG
        with alpha as 8-bit RGBA; a float image, such as a 32-bit TIFF, is
        read as it is and must lie in [0, 1]). The class names and the
        file of each image (relative to the folder) come with the images
        (``ImageData.classes``, ``.files``). As torchvision's ``ImageFolder``,
        a class folder's images are read from its subfolders too, in
        ``os.walk`` order, and an empty class folder is refused (a warning
        says when every class folder holds its images in subfolders only, as
        a folder of train/ and val/ splits does). Hidden files and folders
        (``.ipynb_checkpoints``, macOS's ``._*``) and betasmooth run
        directories inside the folder are skipped; images of suffixes that
        are not read (GIF, HEIC, ...) and broken links are skipped with a
        warning that counts them; a folder reached twice through links is
        read once. The whole folder is
        returned, in the order of its sorted class folders, whatever
        ``split`` says.
    a ``.npz`` file
        Array ``x`` of shape ``(N, C, H, W)`` or ``(N, H, W)`` and optionally
        integer labels ``y`` of shape ``(N,)`` (-1 where absent). Integer
        pixels are scaled to [0, 1] like images: ``uint8`` by 255, ``uint16``
        by 65535; other integer types by 255 when their largest value is at
        most 255 and by 65535 when it is at most 65535 (larger or negative
        values are refused). Floats are kept, and booleans read as 0 and 1
        (a binary image). An ``x`` laid out channel-last,
        ``(N, H, W, C)`` with 1, 3 or 4 channels, is refused with the transpose
        that fixes it. Read with ``allow_pickle=False``.

Model specs
    ``"digits-cnn"``
        A small ReLU CNN trained on the digits training split; its weights ship
        with the package (retrain with ``scripts/train_digits_cnn.py``).
    ``"photos-cnn"``
        A VGG-style ReLU network trained on ``"photos"``; see
        :mod:`betasmooth.photos`.
    ``"path/to/file.py:factory"`` or ``"package.module:factory"``
        ``factory()`` is called without arguments and must return an
        ``nn.Module``.
    ``"torchvision:NAME[:WEIGHTS]"``
        A pretrained torchvision classifier, e.g. ``"torchvision:vgg16"`` or
        ``"torchvision:resnet50:IMAGENET1K_V2"``, through torchvision's
        weights API and the torch hub cache; see :mod:`betasmooth.pretrained`.

Normalised data
    ``load_data`` returns an :class:`ImageData`: it unpacks as ``x, y`` and
    carries the value range of ``x`` per channel, ``low = (0 - mean) / std``
    and ``high = (1 - mean) / std`` for images in [0, 1], as ``(1, C, 1, 1)``
    tensors ready for LRP's z^B rule (``low=``, ``high=``), the attack's
    clamp (``data_range=data.bounds``) and SmoothGrad's noise level.

Weights are only ever read with ``torch.load(..., weights_only=True)``, which
restores tensors and plain containers and refuses to unpickle anything else,
so a weights file cannot run code.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import apply_weights, load_shipped, read_npz, reason, shipped_file
from .photos import photos, trained_photos_cnn
from .photos import weights_path as photos_weights
from .pretrained import checkpoint_path, is_pretrained, load_pretrained, preprocessing
from .validate import (
    InputError,
    InputTypeError,
    check_batch,
    check_count,
    check_form,
    check_input,
    check_instance,
    evaluating,
    warn_user,
)

__all__ = [
    "BUILTIN_DATA",
    "BUILTIN_MODELS",
    "DATA_RANGE",
    "IMAGE_SUFFIXES",
    "MODEL_SCHEMES",
    "ImageData",
    "check_compatible",
    "data_bounds",
    "data_range",
    "digits_cnn",
    "import_model_code",
    "is_user_code",
    "load_data",
    "load_model",
]

#: Value range of the built-in data and of images read from a folder.
DATA_RANGE: tuple[float, float] = (0.0, 1.0)

#: File name endings read as images from a data folder (case-insensitive): those of
#: torchvision's ``ImageFolder``, so that a folder it reads is read whole here too.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
)

SPLITS = ("train", "test", "all")
DIGITS_SIZE = 32
# ITU-R 601-2 luma, the weights Pillow uses for RGB -> L.
LUMA = (0.299, 0.587, 0.114)

Size = int | tuple[int, int]
Stats = float | Sequence[float]


# ---------------------------------------------------------------- built-in data


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    small = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
    # Bilinear interpolation is a convex combination of pixels, so [0, 1] is kept.
    x = F.interpolate(
        small, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False
    ).numpy()
    y = bunch.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    index = {"train": np.sort(train), "test": np.sort(test), "all": np.arange(len(y))}
    for arr in (x, y, *index.values()):
        arr.setflags(write=False)
    return x, y, index


def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, index = _digits_arrays()
    rows = index[split]
    # Copies, so that a caller who edits the tensors in place cannot change the cache.
    return torch.tensor(x[rows]), torch.tensor(y[rows])


#: Built-in data sets: name -> ``loader(split) -> (x, y)``.
BUILTIN_DATA: dict[str, Callable[[str], tuple[torch.Tensor, torch.Tensor]]] = {
    "digits": _digits,
    "photos": photos,
}


def _builtin_data(spec: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``BUILTIN_DATA[spec](split)``, refused in one line unless it is of the table's form
    (an entry a user adds would otherwise fail far from its cause)."""
    form = "(x, y): x a floating tensor (N, C, H, W), y integer labels (N,)"
    loader = BUILTIN_DATA[spec]
    check_form(f"the loader of data {spec!r}", loader, 1, [], "fn(split)")
    out = loader(split)
    pair = isinstance(out, tuple) and len(out) == 2 and all(map(torch.is_tensor, out))
    if not pair:
        got = type(out).__name__ + (f" of {len(out)}" if isinstance(out, tuple) else "")
        raise InputError(f"the loader of data {spec!r} returned {got}; expected {form}")
    x, y = out
    if (
        x.dim() != 4
        or not x.is_floating_point()
        or tuple(y.shape) != (len(x),)
        or y.is_floating_point()
        or y.dtype == torch.bool
    ):
        raise InputError(
            f"the loader of data {spec!r} returned x of shape {tuple(x.shape)} ({x.dtype}) "
            f"and y of shape {tuple(y.shape)} ({y.dtype}); expected {form}"
        )
    return x, y


# ------------------------------------------------------------------- user data


def _image_mode(channels: int) -> str:
    return {1: "L", 3: "RGB"}[channels]


def _channels_of(mode: str) -> int:
    return 1 if mode in {"1", "L", "LA", "F"} or mode.startswith("I") else 3


def _read_image(path: Path, channels: int | None, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            channels = channels or _channels_of(image.mode)
            # 16-bit grey would be clipped, not scaled, by Pillow's conversion to 8 bits,
            # and a float image (a 32-bit TIFF) rounded to 0 or 1 of 255.
            deep, real = image.mode.startswith("I"), image.mode == "F"
            image = image.convert("F" if deep or real else _image_mode(channels))
            scale = 1.0 if real else 65535.0 if deep else 255.0
            # Checked before resizing: a resize averages a pixel out of range into it.
            array = np.asarray(image, dtype=np.float32) / scale
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                resized = np.asarray(image, dtype=np.float32) / scale
            else:
                resized = array
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(
            f"cannot read image {path}: {err}; expected a PNG, JPEG, BMP, PPM/PGM, TIFF "
            "or WebP file"
        ) from err
    if real and not np.isfinite(array).all():
        raise InputError(
            f"float image {path} contains NaN or inf; expected finite values in [0, 1]"
        )
    if (deep or real) and not (array.min() >= 0.0 and array.max() <= 1.0):
        kind, expected = (
            ("integer", "16-bit values in [0, 65535]")
            if deep
            else ("float", "values in [0, 1] (float images are read as they are, not scaled)")
        )
        raise InputError(
            f"{kind} image {path} holds values in [{array.min() * scale:.6g}, "
            f"{array.max() * scale:.6g}]; expected {expected}"
        )
    array = resized
    # Copied, not viewed: a transposed view would be stacked channels-last, and some
    # convolution kernels round differently on that layout than on the contiguous arrays
    # a run stores and reads back.
    array = array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))
    return np.repeat(array, channels, axis=0) if array.shape[0] != channels else array


#: Suffixes of images that a folder's reading skips, as torchvision's
#: ``ImageFolder`` does: a warning names them, since they look like data.
SKIPPED_IMAGE_SUFFIXES = frozenset(
    {".gif", ".jfif", ".heic", ".heif", ".avif", ".jp2", ".ico", ".tga", ".svg"}
)


def _skipped(folder: Path, paths: Sequence[Path]) -> None:
    """Warn about images of a suffix that is not read, and links that lead nowhere."""
    counts: dict[str, int] = {}
    for path in paths:
        if path.name.startswith("."):
            continue
        suffix = path.suffix.lower()
        if path.is_symlink() and not path.exists():
            counts["broken links"] = counts.get("broken links", 0) + 1
        elif suffix in SKIPPED_IMAGE_SUFFIXES:
            counts[suffix] = counts.get(suffix, 0) + 1
    if counts:
        said = ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items()))
        warn_user(
            f"data folder {folder}: skipped {sum(counts.values())} "
            f"file{'s' if sum(counts.values()) != 1 else ''} ({said}); read are "
            f"files ending {', '.join(sorted(IMAGE_SUFFIXES))}"
        )


def _is_image(path: Path) -> bool:
    # Hidden files are a system's, not data: macOS's ._a.png is no image at all.
    return (
        not path.name.startswith(".") and path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )


def _is_data_folder(path: Path) -> bool:
    """A folder that may hold data: not hidden (.ipynb_checkpoints), not a run directory
    (one written into the data folder would otherwise become a class of its own)."""
    if path.name.startswith(".") or not path.is_dir():
        return False
    return not ((path / "config.json").is_file() and (path / "arrays").is_dir())


def _folder_files(folder: Path) -> tuple[list[Path], list[int], list[str] | None]:
    """The images of a folder, their labels and the class names (``None`` for a flat folder)."""
    # By name, as ImageFolder sorts: Windows' paths compare without case.
    subfolders = sorted((p for p in folder.iterdir() if _is_data_folder(p)), key=_name)
    loose = sorted((p for p in folder.iterdir() if _is_image(p)), key=_name)
    if not subfolders:
        _skipped(folder, list(folder.iterdir()))
        return loose, [-1] * len(loose), None
    if loose:
        raise InputError(
            f"data folder {folder} mixes images ({loose[0].name}) with class subfolders; "
            "expected either one subfolder per class or images only"
        )
    files, labels, nested_only, seen = [], [], True, []
    for label, sub in enumerate(subfolders):
        # As torchvision's ImageFolder: every image below the class folder, in
        # the order of os.walk's sorted folders, then sorted file names.
        every = [
            Path(root) / name for root, _, names in sorted(_walk(sub)) for name in sorted(names)
        ]
        seen += every
        found = [path for path in every if _is_image(path)]
        if not found:
            raise InputError(
                f"class folder {sub} holds no images; expected images in every class folder "
                "(the labels are the indices of the sorted folder names), or remove it"
            )
        nested_only = nested_only and all(p.parent != sub for p in found)
        files += found
        labels += [label] * len(found)
    _skipped(folder, seen)
    if nested_only:
        warnings.warn(
            f"the class folders of {folder} ({', '.join(p.name for p in subfolders[:3])}) hold "
            "their images only in subfolders; if they are splits such as train/ and val/, "
            "point the data spec at one of them",
            stacklevel=4,
        )
    return files, labels, [_readable(p.name) for p in subfolders]


def _name(path: Path) -> str:
    return path.name


def _readable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (a Latin-1 name from an old archive)
    become U+FFFD, which reports, figures and JSON can write."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _walk(folder: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` of ``folder``, into data folders only (see :func:`_is_data_folder`), each
    folder once: a link to a folder above would repeat its images without end."""
    seen = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        info = os.stat(root)
        if (info.st_dev, info.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirs[:] = [d for d in dirs if _is_data_folder(Path(root) / d)]
        yield root, dirs, names


def _folder_channels(files: Sequence[Path]) -> int:
    """3 when any image has colour (only the headers are read), else 1."""
    from PIL import Image

    for path in files:
        try:
            with Image.open(path) as image:
                if _channels_of(image.mode) == 3:
                    return 3
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue  # named by _read_image
    return 1


def _pair(size: Size | None) -> tuple[int, int] | None:
    if size is None:
        return None
    expected = "a positive int or (height, width) of ints"
    if isinstance(size, (bool, float, str)) or not isinstance(size, (int, tuple, list)):
        raise InputTypeError(f"image_size must be {expected}; got {type(size).__name__} {size!r}")
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair
    ):
        raise InputError(f"image_size must be {expected}; got {size!r}")
    return pair


def _folder(
    folder: Path,
    size: tuple[int, int] | None,
    channels: int | None,
    fit: Callable[[np.ndarray], np.ndarray] | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str] | None, list[str]]:
    files, labels, classes = _folder_files(folder)
    if not files:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise InputError(f"data folder {folder} holds no images; expected files ending {suffixes}")
    fit = fit or (lambda image: image)
    # The channels are the whole folder's (headers only), so that the first n
    # images are the same tensors whatever n.
    channels = channels or _folder_channels(files)
    files, labels = files[:limit], labels[:limit]
    first = fit(_read_image(files[0], channels, size))
    images = [first]
    for path in files[1:]:
        image = fit(_read_image(path, first.shape[0], size))
        if image.shape != first.shape:
            raise InputError(
                f"image {path} is {image.shape[2]}x{image.shape[1]} but {files[0]} is "
                f"{first.shape[2]}x{first.shape[1]} (width x height); pass image_size "
                "(--image-size on the command line) to resize all images to one size"
            )
        images.append(image)
    names = [_readable(p.relative_to(folder).as_posix()) for p in files]
    return (
        torch.from_numpy(np.stack(images)),
        torch.tensor(labels, dtype=torch.long),
        classes,
        names,
    )


def _npz(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = read_npz(path)
    if "x" not in arrays:
        raise InputError(
            f"{path} has no array 'x' (found {sorted(arrays) or 'no arrays'}); "
            "expected x of shape (N, C, H, W) or (N, H, W) and optional labels y"
        )
    x = arrays["x"]
    if x.dtype.kind not in "biuf":
        raise InputError(f"array x in {path} has dtype {x.dtype}; expected a numeric array")
    saved = x.shape
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim == 4 and x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        raise InputError(
            f"array x in {path} has shape {x.shape}, channel-last (N, H, W, C); expected "
            "(N, C, H, W): save x.transpose(0, 3, 1, 2)"
        )
    if x.ndim != 4 or 0 in x.shape:
        raise InputError(
            f"array x in {path} has shape {saved}; expected (N, C, H, W) or (N, H, W), "
            "none of them 0"
        )
    x = _scaled(x, path)
    if not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x))[0][0])
        raise InputError(
            f"array x in {path} contains NaN or inf (first at item {bad}); expected finite values"
        )
    others = sorted(set(arrays) - {"x"})
    if "y" not in arrays and others:
        warnings.warn(
            f"{path} has no array 'y' (found {', '.join(others)} besides x); every label is "
            "-1 (unknown): save the labels as y",
            stacklevel=3,
        )
    return torch.from_numpy(x), _labels(arrays.get("y"), len(x), path)


#: Integer arrays of an .npz file: the divisor that maps their values to [0, 1].
_INTEGER_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def _scaled(x: np.ndarray, path: Path) -> np.ndarray:
    # Unsigned 8 and 16 bit arrays are scaled like 8 and 16 bit images; other
    # integer types carry no bit depth, so their largest value picks it.
    if x.dtype.kind in "fb":
        return x.astype(np.float32)
    scale = _INTEGER_SCALES.get(x.dtype)
    if scale is None:
        low, high = int(x.min()), int(x.max())
        if low < 0 or high > 65535:
            raise InputError(
                f"array x in {path} has {x.dtype} values in [{low}, {high}]; expected integer "
                "pixel values in [0, 255] or [0, 65535], or floats"
            )
        scale = 255.0 if high <= 255 else 65535.0
    return x.astype(np.float32) / np.float32(scale)


def _labels(y: np.ndarray | None, n: int, path: Path) -> torch.Tensor:
    if y is None:
        return torch.full((n,), -1, dtype=torch.long)
    expected = f"expected integer class labels of shape ({n},)"
    if y.shape != (n,) or y.dtype.kind not in "biuf":
        raise InputError(f"array y in {path} has shape {y.shape}, dtype {y.dtype}; {expected}")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise InputError(f"array y in {path} holds non-integer values; {expected}")
    return torch.from_numpy(y.astype(np.int64))


def _stats(value: Stats, name: str, channels: int) -> torch.Tensor:
    try:
        stats = torch.as_tensor(value, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputTypeError(f"{name} must be a number or one number per channel") from err
    if stats.numel() not in (1, channels):
        # Grey images for an RGB model: --channels 3 repeats the grey into three.
        rgb = channels == 1 and stats.numel() == 3
        grey = (
            " (for a model that takes RGB, --channels 3, channels=3, loads them so)" if rgb else ""
        )
        raise InputError(
            f"{name} has {stats.numel()} values but the images have {channels} channels; "
            f"expected one number or one per channel{grey}"
        )
    if not bool(torch.isfinite(stats).all()):
        raise InputError(f"{name} must be finite; got {value!r}")
    return stats.expand(channels).reshape(1, channels, 1, 1)


def _to_channels(x: torch.Tensor, channels: int | None, spec: str) -> torch.Tensor:
    if channels is None or x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if x.shape[1] == 3 and channels == 1:
        return torch.einsum("bchw,c->bhw", x, torch.tensor(LUMA))[:, None]
    raise InputError(
        f"data {spec!r} has {x.shape[1]} channels, which cannot be converted to {channels}; "
        "channels= (--channels) converts grey to RGB and RGB to grey only"
    )


def _resize(x: torch.Tensor, size: tuple[int, int] | None, mode: str = "bilinear") -> torch.Tensor:
    if size is None or tuple(x.shape[-2:]) == size:
        return x
    out = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    if mode != "bicubic":
        return out
    # Bicubic weights go below 0, so the result may leave [0, 1], which the data bounds
    # promise: clipped there, as Pillow's 8-bit bicubic resize clips.
    return out.clamp(min(0.0, float(x.min())), max(1.0, float(x.max())))


def resize_crop(
    x: torch.Tensor, resize: int, crop: int, interpolation: str = "bilinear"
) -> torch.Tensor:
    """Resize the shorter side to ``resize`` (antialiased), then crop the centre.

    The preprocessing of torchvision's image classifiers
    (``Resize(resize)`` then ``CenterCrop(crop)``), on a batch ``(N, C, H, W)``.
    ``interpolation`` is ``"bilinear"`` or ``"bicubic"``; a bicubic result is
    clipped to [0, 1] (or to the range of ``x`` where that is wider).

    Examples
    --------
    >>> resize_crop(torch.rand(2, 3, 40, 60), 32, 28).shape
    torch.Size([2, 3, 28, 28])
    """
    if interpolation not in ("bilinear", "bicubic"):
        raise InputError(
            f"interpolation {interpolation!r} is unknown; expected bilinear or bicubic"
        )
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    other = int(resize * long / short)
    size = (resize, other) if h <= w else (other, resize)
    x = _resize(x, size, interpolation)
    top = int(round((size[0] - crop) / 2.0))
    left = int(round((size[1] - crop) / 2.0))
    if top < 0 or left < 0:
        raise InputError(
            f"crop {crop} is larger than the resized image {size}; expected crop <= {resize}"
        )
    return x[..., top : top + crop, left : left + crop]


class ImageData(tuple):
    """``(x, y)`` as :func:`load_data` returns them, with the value range of ``x`` per channel.

    Unpacks like a pair (``x, y = data``; a slice such as ``data[:4]`` is refused:
    take ``data.x[:4]``). ``low`` and ``high`` are
    ``(1, C, 1, 1)`` tensors: the range of the raw values (``[0, 1]`` for
    images) mapped through the normalisation, ``(0 - mean) / std`` and
    ``(1 - mean) / std``. Pass them to LRP (``low=data.low, high=data.high``),
    to :func:`betasmooth.manipulate` and :func:`betasmooth.defense_sweep`
    (``data_range=data.bounds``); :meth:`denormalise` undoes the
    normalisation for display.

    Attributes
    ----------
    x, y : torch.Tensor
        Inputs ``(N, C, H, W)`` and labels ``(N,)``.
    low, high : torch.Tensor
        Per-channel bounds of ``x``, shape ``(1, C, 1, 1)``.
    mean, std : torch.Tensor
        The normalisation, shape ``(1, C, 1, 1)`` (zeros and ones without one).
    classes : list of str or None
        The name of each label (a folder's class folders); ``None`` where unknown.
    files : list of str or None
        The file of each image, relative to the data folder; ``None`` where
        the images come from no files.

    Examples
    --------
    >>> data = load_data("digits", mean=0.5, std=0.25)
    >>> x, y = data
    >>> data.low.flatten().tolist(), data.high.flatten().tolist()
    ([-2.0], [2.0])
    """

    def __new__(
        cls,
        x: torch.Tensor,
        y: torch.Tensor,
        low: torch.Tensor,
        high: torch.Tensor,
        mean: torch.Tensor,
        std: torch.Tensor,
        classes: Sequence[str] | None = None,
        files: Sequence[str] | None = None,
    ) -> ImageData:
        data = super().__new__(cls, (x, y))
        data.low, data.high, data.mean, data.std = low, high, mean, std
        data.classes = None if classes is None else list(classes)
        data.files = None if files is None else list(files)
        return data

    def __reduce__(self) -> tuple:
        extra = (self.low, self.high, self.mean, self.std, self.classes, self.files)
        return (ImageData, (*self, *extra))

    def __getitem__(self, key: object) -> object:
        # data[:4] reads as "four images" but would slice the pair (x, y) itself.
        if isinstance(key, slice):
            raise InputError(
                "ImageData is the pair (x, y), so a slice of it is no set of images; "
                "expected data.x[a:b] and data.y[a:b] (or x, y = data, then x[a:b])"
            )
        return super().__getitem__(key)

    def about(self, index: int) -> dict[str, str]:
        """What the data say of item ``index`` besides its label: its file and class name.

        Examples
        --------
        >>> load_data("digits").about(0)
        {}
        """
        out = {}
        if self.files is not None:
            out["file"] = self.files[index]
        label = int(self.y[index])
        if self.classes is not None and 0 <= label < len(self.classes):
            out["true_label_name"] = self.classes[label]
        return out

    @property
    def x(self) -> torch.Tensor:
        return self[0]

    @property
    def y(self) -> torch.Tensor:
        return self[1]

    @property
    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low, high)``, each ``(1, C, 1, 1)``."""
        return self.low, self.high

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """``x * std + mean``: inputs back in the raw value range, e.g. for display.

        ``x`` is a floating batch of these data's images, ``(B, C, H, W)``.

        Examples
        --------
        >>> data = load_data("digits", mean=[0.5], std=[0.25], n=2)
        >>> torch.equal(data.denormalise(data.x), load_data("digits", n=2).x)
        True
        """
        x = check_batch(x, "x", 4)
        channels = self.std.shape[1]
        if x.dim() != 4 or x.shape[1] != channels:
            raise InputError(
                f"x has shape {tuple(x.shape)}; expected images of these data, "
                f"(B, {channels}, H, W)"
            )
        return x * self.std.to(x.device, x.dtype) + self.mean.to(x.device, x.dtype)


def _normalisation(
    mean: Stats | None, std: Stats | None, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    both_or_neither(mean, std)
    shift = torch.zeros(1, channels, 1, 1) if mean is None else _stats(mean, "mean", channels)
    scale = torch.ones(1, channels, 1, 1) if std is None else _stats(std, "std", channels)
    if not bool((scale > 0).all()):
        raise InputError(f"std must be > 0; got {std!r}")
    return shift, scale


def _source(spec: str) -> str:
    if spec in BUILTIN_DATA:
        return "builtin"
    path = Path(spec)
    if path.is_dir():
        return "folder"
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise InputError(f"data file {spec} does not exist; expected an existing .npz file")
        return "npz"
    if path.is_file():
        raise InputError(
            f"data {spec} is a file but not an .npz file; expected a folder of images or an .npz "
            "file (images x, labels y)"
        )
    if spec.endswith(("/", "\\")) or len(path.parts) > 1:
        raise InputError(f"data folder {spec} does not exist; expected a folder of images")
    raise InputError(
        f"unknown data spec {spec!r}; expected {_names(BUILTIN_DATA)}, a folder of images "
        "or an .npz file"
    )


def _names(registry: Mapping[str, object]) -> str:
    return " or ".join(repr(name) for name in sorted(registry))


def both_or_neither(
    mean: object, std: object, names: tuple[str, str] = ("mean", "std"), preset: str | None = None
) -> None:
    """Refuse a mean without a std, or the other way round, naming them as ``names``.

    One alone would pair it with a default that the user did not choose
    (std 1, mean 0, or ``preset``'s own): ImageNet's mean without its std
    leaves the inputs 4.4 times too wide, without a word.

    Examples
    --------
    >>> both_or_neither([0.485, 0.456, 0.406], None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: mean without std: the std would be 1; expected both mean ...
    """
    if (mean is None) == (std is None):
        return
    (first, second), given_std = names, std is not None
    given, other = (second, first) if given_std else (first, second)
    if preset is not None:
        why = f"{preset} brings its own mean and std, and one of each would mix two normalisations"
        expected = f"both {first} and {second}, or neither (the model's own)"
    else:
        default, alone = (
            ("0", "divide by the std only") if given_std else ("1", "subtract the mean only")
        )
        why = f"the {other} would be {default}"
        expected = f"both {first} and {second} ({other} {default} to {alone}), or neither"
    raise InputError(f"{given} without {other}: {why}; expected {expected}")


def preset_mean_std(
    preset: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    names: tuple[str, str] = ("mean", "std"),
) -> tuple[Sequence[float], Sequence[float]]:
    """The mean and std of data prepared for ``preset``: both given, or the preset's own.

    One alone is refused, with the options called ``names``: it would pair a
    given mean with the preset's std, or the other way round.

    Examples
    --------
    >>> preset_mean_std("torchvision:resnet18", None, None)
    ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    """
    both_or_neither(mean, std, names, preset)
    prep = _preprocessing(preset)
    return (list(prep.mean), list(prep.std)) if mean is None else (mean, std)


def load_data(
    spec: str,
    split: str = "test",
    *,
    image_size: Size | None = None,
    channels: int | None = None,
    mean: Stats | None = None,
    std: Stats | None = None,
    preset: str | None = None,
    n: int | None = None,
) -> ImageData:
    """Load images and labels by a spec string.

    Parameters
    ----------
    spec : str
        ``"digits"``, a folder of images (class subfolders or flat) or an
        ``.npz`` file with ``x`` and optional ``y``; see the module docstring.
    split : str
        ``"train"``, ``"test"`` or ``"all"`` for built-in data; a folder or an
        ``.npz`` file is returned whole (``"train"`` is refused for them).
    image_size : int or tuple of int, optional
        Resize every image to ``(size, size)`` or ``(height, width)``
        (bilinear, antialiased). Required for a folder of images of
        different sizes.
    channels : int, optional
        1 (grey) or 3 (RGB); by default the built-in data has 1, a folder
        has 3 when any of its images is stored in a colour mode (else 1) and
        an ``.npz`` file keeps its own.
    mean, std : float or sequence of float, optional
        Normalise to ``(x - mean) / std`` after scaling to [0, 1]; one value
        or one per channel.
    preset : str, optional
        A model spec ``"torchvision:NAME[:WEIGHTS]"``: prepare the images as
        those weights require (RGB, shorter side resized, centre crop, mean
        and std). ``image_size`` replaces its resize and crop by a plain
        resize, ``mean`` and ``std`` (both or neither) replace its own.
    n : int, optional
        Only the first ``n`` items: of a folder only their files are read
        (the channels are still the whole folder's); an ``.npz`` file or
        built-in data are cut after loading, their bounds those of the whole.

    Returns
    -------
    ImageData
        A pair ``(x, y)``: ``x`` float32 of shape ``(N, C, H, W)`` and ``y``
        long of shape ``(N,)``, -1 where a label is unknown; with the
        per-channel bounds of ``x`` as ``.low``, ``.high`` (``.bounds``).

    Raises
    ------
    InputError
        An unknown spec or split, an unreadable or corrupt file, images of
        different sizes without ``image_size``, NaN or inf in an ``.npz``.

    Examples
    --------
    >>> x, y = load_data("digits", split="test")
    >>> tuple(x.shape), tuple(y.shape)
    ((450, 1, 32, 32), (450,))
    >>> float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    True
    >>> data = load_data("digits", mean=0.5, std=0.5)
    >>> [t.flatten().tolist() for t in data.bounds]
    [[-1.0], [1.0]]
    """
    if not isinstance(spec, (str, Path)):
        raise InputTypeError(f"data spec must be a string; got {type(spec).__name__}")
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not str(spec).strip():
        raise InputError(f"data spec is empty; expected {_names(BUILTIN_DATA)}, a folder, an .npz")
    if split == "train" and str(spec) not in BUILTIN_DATA:
        raise InputError(
            f"split 'train' exists for the built-in data only; {spec} is used whole "
            "(split 'test' or 'all')"
        )
    if channels not in (None, 1, 3):
        raise InputError(f"channels must be 1 or 3; got {channels!r}")
    if n is not None:
        n = check_count("n", n)
    spec = str(spec)
    size = _pair(image_size)
    fit = None
    if preset is not None:
        prep = _preprocessing(preset)
        if channels not in (None, 3):
            raise InputError(
                f"channels={channels} does not fit {preset}, which takes RGB images; "
                "leave channels unset (grey images are repeated to 3 channels)"
            )
        channels = 3
        mean, std = preset_mean_std(preset, mean, std)
        if size is None:

            def fit(image: np.ndarray) -> np.ndarray:
                image = torch.from_numpy(image)[None]
                return resize_crop(image, prep.resize, prep.crop, prep.interpolation)[0].numpy()

    source = _source(spec)
    classes = files = None
    if source == "builtin":
        if Path(spec).exists():
            warn_user(
                f"data {spec!r} is the built-in data set, not the {spec} in this folder; "
                f"write ./{spec} to read that one"
            )
        x, y = _builtin_data(spec, split)
    elif source == "folder":
        x, y, classes, files = _folder(Path(spec), size, channels, fit, n)
    else:
        x, y = _npz(Path(spec))
    x = _to_channels(x, channels, spec)
    if fit is not None and source != "folder":
        x = resize_crop(x, prep.resize, prep.crop, prep.interpolation)
    x = _resize(x, size)
    raw_low, raw_high = _raw_range(source, x)
    normalised = mean is not None or std is not None
    shift, scale = _normalisation(mean, std, x.shape[1])
    if raw_low < NEGATIVE_PIXELS and _presets(preset, shift, scale):
        # A user's own mean and std may be of signed pixels (checked below against
        # their range); a torchvision preset's are of pixels in [0, 1]. Signed data
        # are no 8-bit levels: the warning below would only add a wrong fix.
        warnings.warn(
            f"x in {spec} holds values from {raw_low:g} to {raw_high:g}; {preset}'s mean "
            "and std apply to pixels in [0, 1]: map x to [0, 1] first ((x + 1) / 2 for x in "
            "[-1, 1]; x * std + mean for x normalised already), or give the data's own mean "
            "and std",
            stacklevel=2,
        )
    elif raw_high > 2.0:
        said = (
            "mean and std apply to pixels in [0, 1]"
            if normalised
            else f"[{raw_low:g}, {raw_high:g}] is taken for the pixel range (the attack's "
            "budget, LRP's box, the black baseline)"
        )
        warnings.warn(
            f"x in {spec} holds values up to {raw_high:g}; {said}: divide x by 255 first if "
            "it holds 8-bit levels",
            stacklevel=2,
        )
    if normalised and bool((scale > raw_high - raw_low).any()):
        raise InputError(
            f"std must be at most {raw_high - raw_low:g}, the width of the pixels' range "
            f"[{raw_low:g}, {raw_high:g}]; got {std!r}: divide statistics of 0-255 levels by "
            "255 (ImageNet's 58.4, 57.1, 57.4 are 0.229, 0.224, 0.225)"
        )
    if not bool(((shift >= raw_low) & (shift <= raw_high)).all()):
        raise InputError(
            f"mean must lie in [{raw_low:g}, {raw_high:g}], the range of the pixels it is the "
            f"mean of; got {mean!r}: divide statistics of 0-255 levels by 255 (ImageNet's "
            "123.7, 116.3, 103.5 are 0.485, 0.456, 0.406)"
        )
    x = (x - shift) / scale
    x, y = x[:n], y[:n]
    low = (torch.full_like(shift, raw_low) - shift) / scale
    high = (torch.full_like(shift, raw_high) - shift) / scale
    return ImageData(x, y, low, high, shift, scale, classes, files)


def _preprocessing(preset: str) -> object:
    if not is_pretrained(preset):
        raise InputError(
            f"preset must be a torchvision model spec such as 'torchvision:vgg16'; got {preset!r}"
        )
    return preprocessing(preset)


def _presets(preset: str | None, shift: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether the normalisation is ``preset``'s own (also where the command line
    filled it in)."""
    if preset is None:
        return False
    prep = _preprocessing(preset)
    own = _normalisation(list(prep.mean), list(prep.std), shift.shape[1])
    return torch.equal(own[0], shift) and torch.equal(own[1], scale)


#: Lowest value of float pixels in an .npz that a torchvision model's mean and std take
#: for [0, 1] without a warning: a little below 0 is the ringing of a sharpening or
#: bicubic filter in a user's own preparation, while data in [-1, 1] or [-0.5, 0.5], or
#: normalised already, reach -0.5 and below.
NEGATIVE_PIXELS = -0.25


def _raw_range(source: str, x: torch.Tensor) -> tuple[float, float]:
    # Images are [0, 1] by construction; an .npz may hold anything, so its own
    # extremes widen the interval.
    if source != "npz":
        return DATA_RANGE
    return min(DATA_RANGE[0], float(x.min())), max(DATA_RANGE[1], float(x.max()))


def data_bounds(
    spec: str,
    *,
    mean: Stats | None = None,
    std: Stats | None = None,
    channels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel bounds ``(low, high)`` of the inputs of a data spec, each ``(1, C, 1, 1)``.

    The bounds :func:`load_data` attaches to its result, without loading a
    folder of images: ``(0 - mean) / std`` and ``(1 - mean) / std`` for
    built-in data and images; an ``.npz`` file is read for its own extremes.

    Examples
    --------
    >>> low, high = data_bounds("digits", mean=[0.5, 0.4, 0.3], std=0.5, channels=3)
    >>> [round(v, 2) for v in low.flatten().tolist()]
    [-1.0, -0.8, -0.6]
    """
    source = _source(str(spec))
    if source == "npz":
        # What the file holds is said once, by load_data of the images themselves.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            data = load_data(spec, channels=channels, mean=mean, std=std)
        return data.low, data.high
    per_channel = max(
        [torch.as_tensor(v, dtype=torch.float32).numel() for v in (mean, std) if v is not None],
        default=1,
    )
    # Data have 1 or 3 channels: statistics of 3 or more fix the count without reading it.
    n = channels or max(
        per_channel, 1 if per_channel >= 3 else _channels_of_source(str(spec), source)
    )
    shift, scale = _normalisation(mean, std, n)
    return (DATA_RANGE[0] - shift) / scale, (DATA_RANGE[1] - shift) / scale


def _channels_of_source(spec: str, source: str) -> int:
    """The channels of built-in data (its small test split) or of a folder (the headers of
    its images: 3 when any has colour), as :func:`load_data` gives them."""
    if source == "builtin":
        return int(_builtin_data(spec, "test")[0].shape[1])
    return _folder_channels(_folder_files(Path(spec))[0])


def data_range(
    spec: str, *, mean: Stats | None = None, std: Stats | None = None
) -> tuple[float, float]:
    """The interval that inputs of a data spec lie in, for clamping.

    Built-in data and image folders lie in [0, 1] before normalisation; with
    ``mean`` and ``std`` the interval is the hull over channels of
    ``[(0 - mean) / std, (1 - mean) / std]``. An ``.npz`` file is read and
    its own ``[min, max]`` widened to contain [0, 1].

    Parameters
    ----------
    spec : str
        A data spec as for :func:`load_data`.
    mean, std : float or sequence of float, optional
        The normalisation passed to :func:`load_data`.

    Returns
    -------
    tuple of float
        ``(low, high)``.

    Examples
    --------
    >>> data_range("digits")
    (0.0, 1.0)
    >>> data_range("digits", mean=0.5, std=0.5)
    (-1.0, 1.0)
    """
    if mean is None and std is None and _source(str(spec)) != "npz":
        return float(DATA_RANGE[0]), float(DATA_RANGE[1])  # no folder needs reading
    low, high = data_bounds(spec, mean=mean, std=std)
    return float(low.min()), float(high.max())


# -------------------------------------------------------------- built-in models


def digits_cnn() -> nn.Sequential:
    """The architecture of ``"digits-cnn"``, untrained.

    Three blocks of 3 x 3 convolution, ReLU and 2 x 2 max-pooling
    (32 -> 16 -> 8 -> 4 pixels), then two dense layers; input
    ``(B, 1, 32, 32)`` in [0, 1], ten logits out. A plain ``nn.Sequential`` so
    that rule-based explanations and tracing see every layer.

    Returns
    -------
    nn.Sequential
        Randomly initialised network.

    Examples
    --------
    >>> digits_cnn()(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _trained_digits_cnn() -> nn.Module:
    return load_shipped(digits_cnn(), "digits_cnn.pt", "scripts/train_digits_cnn.py")


#: Built-in models: name -> ``factory() -> nn.Module`` (trained).
BUILTIN_MODELS: dict[str, Callable[[], nn.Module]] = {
    "digits-cnn": _trained_digits_cnn,
    "photos-cnn": trained_photos_cnn,
}


#: Model spec prefixes: ``"prefix:..."`` -> ``loader(spec, pretrained) -> nn.Module``;
#: ``pretrained=False`` when the user brings weights, so that none are fetched.
MODEL_SCHEMES: dict[str, Callable[[str, bool], nn.Module]] = {
    "torchvision": load_pretrained,
}


#: Where a scheme's models are read from: ``"prefix"`` -> ``file(spec) -> Path``.
SCHEME_WEIGHTS: dict[str, Callable[[str], Path]] = {
    "torchvision": checkpoint_path,
}

#: The weights files that ship with the built-in models.
BUILTIN_WEIGHTS: dict[str, Callable[[], Path]] = {
    "digits-cnn": lambda: shipped_file("digits_cnn.pt"),
    "photos-cnn": photos_weights,
}


def weights_file(spec: str, weights: str | Path | None = None) -> Path | None:
    """The file :func:`load_model` reads the weights of ``spec`` from.

    ``weights`` where given; else a built-in model's shipped file or a
    pretrained model's checkpoint in the torch hub cache; ``None`` for a
    factory that makes its own.

    Examples
    --------
    >>> weights_file("digits-cnn").name
    'digits_cnn.pt'
    >>> weights_file("net.py:build", "net.pt").name
    'net.pt'
    >>> weights_file("net.py:build") is None
    True
    """
    if weights is not None:
        return Path(weights)
    if spec in BUILTIN_WEIGHTS:
        return BUILTIN_WEIGHTS[spec]()
    scheme = SCHEME_WEIGHTS.get(spec.partition(":")[0])
    return scheme(spec) if scheme is not None else None


# ------------------------------------------------------------------ user models

MODEL_FORMS = "'path/to/file.py:factory' or 'package.module:factory'"


def _import_file(path: Path) -> object:
    if not path.is_file():
        raise InputError(f"model file {path} does not exist; expected {MODEL_FORMS}")
    # One module per file and version: loading the same file again (the sweep
    # of a run, a resumed command) does not run the user's code twice, whose
    # side effects (a partial or an instance it registers) may not repeat.
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    name = f"_betasmooth_user_{path.stem}_{abs(hash(key))}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"cannot import {path}; expected a Python source file ending .py")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running, so that dataclasses and pickling inside the file work.
    sys.modules[name] = module
    try:
        with _importable_beside(path):
            module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:  # a script's sys.exit() must not end the caller
        del sys.modules[name]
        raise InputError(f"importing {path} failed: {reason(err)}") from err
    _USER_CODE.add(path.resolve())
    return module


#: The files of users' model code: each model file or module a spec named, and the
#: modules of its own folder or package that importing it or building the model imported.
_USER_CODE: set[Path] = set()


def is_user_code(filename: str) -> bool:
    """Whether ``filename`` is a file of a user's model code that a spec imported.

    Examples
    --------
    >>> is_user_code(__file__), is_user_code("<string>")
    (False, False)
    """
    return not filename.startswith("<") and Path(filename).resolve() in _USER_CODE


def _keep_user_code(names: Iterable[str], place: Path) -> None:
    """Count the files of the modules ``names`` that lie in ``place`` as user code;
    an installed library there (a virtual environment inside it) or betasmooth is not."""
    never = (Path(sysconfig.get_paths()["stdlib"]).resolve(), Path(__file__).resolve().parent)
    for name in names:
        where = getattr(sys.modules.get(name), "__file__", None)
        if where is None:
            continue
        path = Path(where).resolve()
        installed = {"site-packages", "dist-packages"} & set(path.parts)
        if path.is_relative_to(place) and not installed:
            if not any(path.is_relative_to(p) for p in never):
                _USER_CODE.add(path)


@contextlib.contextmanager
def _importable_beside(path: Path) -> Iterator[None]:
    """The modules in the folder of ``path`` importable inside, as ``python path`` makes
    them for a script: a model file imports its siblings (``from resnet import ResNet18``)."""
    folder = str(path.resolve().parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    before = set(sys.modules)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
        # Its siblings leave sys.modules again: another folder's blocks.py, or this
        # one's changed on disk, would else be given the first one imported. Only
        # modules of the folder's own files and packages: not a library that a
        # virtual environment inside it holds, whose second import would break.
        for name in set(sys.modules) - before:
            where = getattr(sys.modules[name], "__file__", None)
            top = name.partition(".")[0]
            mine = (Path(folder, top), Path(folder, f"{top}.py"))
            if where and any(Path(where).resolve().is_relative_to(p) for p in mine):
                _keep_user_code([name], Path(folder))
                del sys.modules[name]


def _looks_like_path(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _import_module(name: str) -> object:
    try:
        with _module_code(name):
            return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise InputError(
            f"cannot import module {name!r} ({err}); expected {MODEL_FORMS} importable "
            "from the current environment"
        ) from err
    except (Exception, SystemExit) as err:
        raise InputError(f"importing module {name!r} failed: {reason(err)}") from err


@contextlib.contextmanager
def _module_code(name: str) -> Iterator[None]:
    """Count module ``name`` and the modules of its own package (or folder, for a
    single-file module) that are imported inside as the model's code."""
    before = set(sys.modules)
    yield
    where = getattr(sys.modules.get(name.partition(".")[0]), "__file__", None)
    if where is not None:
        _keep_user_code({name} | (set(sys.modules) - before), Path(where).resolve().parent)


def _model_forms(spec: str) -> str:
    """The model specs there are, led by the one that the mistaken ``spec`` comes nearest."""
    suffix = Path(spec).suffix.lower()
    if suffix == ".py":
        # The file without the function in it that builds the model.
        return f"{spec}:NAME, NAME the function in it that returns the model"
    if suffix in (".pt", ".pth", ".bin", ".safetensors", ".ckpt"):
        # Weights, or a pickled model, which is never unpickled.
        return (
            f"a model built by code, e.g. 'path/to/file.py:factory'; {spec} goes in "
            "--weights (weights= of bs.load_model) as a state dict"
        )
    return (
        f"a built-in name ({_names(BUILTIN_MODELS)}), 'torchvision:NAME[:WEIGHTS]' or {MODEL_FORMS}"
    )


def _user_module(spec: str) -> tuple[object, str, str]:
    """The imported file or module of a user's model spec, where it is, and the factory's name."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise InputError(f"unknown model spec {spec!r}; expected {_model_forms(spec)}")
    module = _import_file(Path(where)) if _looks_like_path(where) else _import_module(where)
    return module, where, attr


def import_model_code(spec: str) -> bool:
    """Import the file or module that a user's model spec names, without building the
    model: what it registers (methods, goals, metrics, report sections) is then known,
    as when the model was loaded. Nothing for a built-in or ``scheme:`` spec.

    Returns
    -------
    bool
        Whether the spec named user code, which was imported.

    Examples
    --------
    >>> import_model_code("digits-cnn"), import_model_code("torchvision:resnet18")
    (False, False)
    """
    if spec in BUILTIN_MODELS or spec.partition(":")[0] in MODEL_SCHEMES:
        return False
    _user_module(spec)
    return True


def _user_model(spec: str) -> nn.Module:
    module, where, attr = _user_module(spec)
    factory = getattr(module, attr, None)
    if not callable(factory):
        found = "is not callable" if factory is not None else "is not defined"
        raise InputError(f"{attr!r} in {where} {found}; expected a function returning nn.Module")
    path = _looks_like_path(where)
    # A factory may import a module beside it too: that is the model's code as well.
    beside = _importable_beside(Path(where)) if path else _module_code(where)
    try:
        with beside:
            model = factory()
    except (Exception, SystemExit) as err:
        raise InputError(f"{attr}() from {where} failed: {reason(err)}") from err
    if not isinstance(model, nn.Module):
        raise InputError(
            f"{attr}() from {where} returned {type(model).__name__}; expected an nn.Module"
        )
    return model


def load_model(spec: str, weights: str | Path | None = None) -> nn.Module:
    """Load a classifier by a spec string, in evaluation mode.

    Parameters
    ----------
    spec : str
        A built-in name (``"digits-cnn"``), ``"path/to/file.py:factory"`` or
        ``"package.module:factory"``; ``factory()`` is called without
        arguments and must return an ``nn.Module``. ``"torchvision:vgg16"``
        or ``"torchvision:resnet50:IMAGENET1K_V2"`` load a pretrained
        torchvision classifier (:mod:`betasmooth.pretrained`).
    weights : str or Path, optional
        A state dict file to load into the model (also into a built-in one),
        read with ``torch.load(weights_only=True, map_location="cpu")``: no
        pickled object is ever run. Keys and shapes must match exactly.

    Returns
    -------
    nn.Module
        The model, on the CPU's default device as built, in ``eval()`` mode.

    Raises
    ------
    InputError
        An unknown spec, a file or module that cannot be imported, a factory
        that fails or returns no ``nn.Module``, a missing weights file, one
        that is not a plain state dict, or one whose keys or shapes differ.

    Examples
    --------
    >>> model = load_model("digits-cnn")
    >>> model.training
    False
    >>> model(torch.zeros(1, 1, 32, 32)).shape
    torch.Size([1, 10])
    """
    if not isinstance(spec, str):
        raise InputTypeError(f"model spec must be a string; got {type(spec).__name__}")
    if weights is not None:
        check_instance("weights", weights, (str, Path), "None or the path of a state dict file")
    builtin = BUILTIN_MODELS.get(spec)
    scheme = MODEL_SCHEMES.get(spec.partition(":")[0])
    named = isinstance(weights, str) and weights.isidentifier()
    torchvision = spec.partition(":")[0] == "torchvision"
    if torchvision and named and not Path(weights).exists():
        # A torchvision user's reflex (weights="DEFAULT") names no file. Only there: a
        # scheme registered in MODEL_SCHEMES takes no weights name in its spec.
        name = ":".join(spec.split(":")[:2])
        raise InputError(
            f"weights file {weights} does not exist; expected torchvision's weights named in "
            f"the model spec ('{name}:{weights}') or a file written by "
            "torch.save(model.state_dict(), ...)"
        )
    if builtin is not None:
        model = builtin()
    else:
        model = scheme(spec, weights is None) if scheme is not None else _user_model(spec)
    if not isinstance(model, nn.Module):  # an entry of BUILTIN_MODELS or MODEL_SCHEMES
        raise InputError(
            f"model {spec!r} came back as {type(model).__name__}; expected an nn.Module"
        )
    if weights is not None:
        apply_weights(model, weights)
    return model.eval()


def check_compatible(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Check that a model classifies items shaped like those of ``x``.

    Runs one forward pass without gradients on ``x[:1]`` in evaluation mode
    (the model's mode is restored).

    Parameters
    ----------
    model : nn.Module
        The classifier.
    x : torch.Tensor
        A batch ``(N, C, H, W)``.

    Returns
    -------
    torch.Tensor
        The logits of ``x[:1]``, shape ``(1, classes)``.

    Raises
    ------
    InputError
        The forward pass fails, or its output is not finite floating logits
        of shape ``(1, classes)`` (see :func:`betasmooth.validate.check_input`).

    Examples
    --------
    >>> check_compatible(load_model("digits-cnn"), torch.zeros(3, 1, 32, 32)).shape
    torch.Size([1, 10])
    """
    x = check_input(model, x)
    with evaluating(model), torch.no_grad():
        return model(x[:1])
