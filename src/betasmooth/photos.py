"""Built-in photographs: which photograph a crop comes from, and a VGG-style network for it.

The data set ``"photos"`` is made of ten colour photographs that ship inside
scikit-image and scikit-learn, so nothing is downloaded:

=====================  ==================  ==============================================
class                  source              what it shows
=====================  ==================  ==============================================
0 astronaut            ``skimage.data``    portrait of astronaut Eileen Collins, flag
1 chelsea              ``skimage.data``    a tabby cat
2 china                scikit-learn        a Chinese temple roof, trees, sky
3 coffee               ``skimage.data``    a cup of coffee on a saucer
4 flower               scikit-learn        a dahlia, leaves
5 hubble_deep_field    ``skimage.data``    galaxies on a black sky
6 immunohistochemistry ``skimage.data``    stained tissue under a microscope
7 motorcycle           ``skimage.data``    a motorcycle in a studio (left stereo view)
8 retina               ``skimage.data``    a human retina, blood vessels
9 rocket               ``skimage.data``    a rocket on its launch pad
=====================  ==================  ==============================================

The task is to tell which photograph a random square crop comes from. Each
photograph is cut into a 4 x 4 checkerboard of cells: training crops lie
wholly inside one "white" cell, test crops wholly inside one "black" cell, so
no test pixel is ever seen in training, while both splits sample every part of
the photograph. A crop has a side of 15, 20 or 25 % of the photograph's
shorter side (at most one cell), is flipped left-right with
probability one half and is resized to ``size x size`` pixels (bilinear,
antialiased); crops of almost uniform colour (standard deviation below 0.02
after resizing, such as the black border of the retina) are drawn again, as they show nothing
of their photograph. Seeds are fixed per split, so the crops are the same on
every machine. The split ``"train"`` has 300 crops per photograph, ``"test"``
50 and ``"all"`` both; the images are RGB in [0, 1], shape ``(N, 3, 64, 64)``,
in turns over the photographs (labels 0, 1, ..., 9, 0, 1, ...), so that the
first ten test images show all ten. For choosing a training recipe without
the test cells, :func:`photo_crops` also serves ``"fit"`` and
``"validation"``, which divide the training cells (every fourth held out).

Why it serves: the manipulation of explanations is a claim about natural
images of many pixels, and the built-in digits (8 x 8 pixels upsampled) are
neither. These crops are natural photographs in colour, with textures, edges
and objects, and a network must look at them to tell them apart; yet the task
is small enough to train on a CPU in minutes. It is not a benchmark of image
recognition: ten classes are ten photographs, and a crop of a region the
network has not seen must be recognised from colour and texture.
(``motorcycle_right`` is left out: it is the same scene from a viewpoint a few
centimetres away, and no crop could tell the two apart.)

The model ``"photos-cnn"`` (:func:`photos_cnn`) is a VGG-style ReLU network
trained by ``scripts/train_photos_cnn.py`` with plain cross-entropy on 2000
crops per photograph drawn from the training cells as above (the ``"train"``
split's 300 per photograph are a smaller draw from the same cells), with
BatchNorm after each convolution during training, folded into the
convolutions afterwards; its weights ship with the package. Test accuracy
91.6 %.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_shipped, shipped_file
from .validate import InputError, check_count

__all__ = [
    "PHOTOS",
    "SIZE",
    "photo_crops",
    "photos",
    "photos_cnn",
    "split_cells",
    "trained_photos_cnn",
]

#: Side in pixels of the built-in crops.
SIZE = 64
#: Crops per photograph in each split. ``"fit"`` and ``"validation"`` divide
#: the training cells, for choosing a training recipe without the test cells.
COUNTS = {"train": 300, "test": 50, "fit": 300, "validation": 50}
#: Each photograph is cut into a GRID x GRID checkerboard of training and test cells.
GRID = 4
#: Crop sides as fractions of the photograph's shorter side.
SCALES = (0.15, 0.2, 0.25)
#: Crops whose standard deviation is below this are drawn again.
MIN_STD = 0.02
SEEDS = {"train": 0, "test": 1, "fit": 0, "validation": 1}


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _motorcycle() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


#: The photographs, in class order: name -> ``loader() -> uint8 array (H, W, 3)``.
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "china": _sklearn("china.jpg"),
    "coffee": _skimage("coffee"),
    "flower": _sklearn("flower.jpg"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "motorcycle": _motorcycle,
    "retina": _skimage("retina"),
    "rocket": _skimage("rocket"),
}


@functools.lru_cache(maxsize=1)
def _photographs() -> tuple[torch.Tensor, ...]:
    return tuple(
        torch.from_numpy(np.array(load()[..., :3])).permute(2, 0, 1).float() / 255.0
        for load in PHOTOS.values()
    )


def _check_split(split: str) -> None:
    if split not in COUNTS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(COUNTS)}")


def split_cells(height: int, width: int, split: str) -> list[tuple[int, int, int, int]]:
    """The cells of a photograph that a split's crops come from.

    The photograph is cut into a :data:`GRID` x :data:`GRID` checkerboard;
    training crops lie in the cells with an even ``row + column``, test crops
    in those with an odd one. ``"validation"`` takes every fourth training
    cell (row by row), ``"fit"`` the other training cells.

    Parameters
    ----------
    height, width : int
        Size of the photograph in pixels.
    split : str
        ``"train"``, ``"test"``, ``"fit"`` or ``"validation"``.

    Returns
    -------
    list of tuple of int
        ``(top, left, bottom, right)`` of each cell, bottom and right exclusive.

    Examples
    --------
    >>> split_cells(300, 451, "test")[:2]
    [(0, 113, 75, 226), (0, 338, 75, 451)]
    """
    _check_split(split)
    if split in ("fit", "validation"):
        train = split_cells(height, width, "train")
        return [c for k, c in enumerate(train) if (k % 4 == 3) == (split == "validation")]
    rows = [round(k * height / GRID) for k in range(GRID + 1)]
    cols = [round(k * width / GRID) for k in range(GRID + 1)]
    parity = 0 if split == "train" else 1
    return [
        (rows[r], cols[c], rows[r + 1], cols[c + 1])
        for r in range(GRID)
        for c in range(GRID)
        if (r + c) % 2 == parity
    ]


def _place(height: int, width: int, split: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """Top, left and side of a square crop wholly inside one cell of the split."""
    cells = split_cells(height, width, split)
    top0, left0, bottom, right = cells[int(rng.integers(len(cells)))]
    side = min(round(rng.choice(SCALES) * min(height, width)), bottom - top0, right - left0)
    top = int(rng.integers(top0, bottom - side + 1))
    left = int(rng.integers(left0, right - side + 1))
    return top, left, side


def _draw(
    photo: torch.Tensor, split: str, rng: np.random.Generator, size: int
) -> tuple[torch.Tensor, tuple[int, int, int, int, bool]]:
    while True:
        top, left, side = _place(photo.shape[1], photo.shape[2], split, rng)
        flip = bool(rng.integers(0, 2))
        crop = F.interpolate(
            photo[None, :, top : top + side, left : left + side],
            size=(size, size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )[0].clamp(0.0, 1.0)
        if float(crop.std()) >= MIN_STD:
            break
    return (crop.flip(-1) if flip else crop), (top, left, side, side, flip)


@functools.lru_cache(maxsize=4)
def _crops(split: str, size: int, per_photo: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(SEEDS[split])
    images, labels, boxes = [], [], []
    for label, photo in enumerate(_photographs()):
        for _ in range(per_photo):
            crop, box = _draw(photo, split, rng, size)
            images.append(crop)
            labels.append(label)
            boxes.append(box)
    # Round robin over the photographs, so that the first k crops show min(k, 10) of them.
    order = np.arange(len(labels)).reshape(-1, per_photo).T.ravel()
    return (
        torch.stack(images)[order],
        torch.tensor(labels)[order],
        np.array(boxes, dtype=np.int64)[order],
    )


def photo_crops(
    split: str = "test", size: int = SIZE, per_photo: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Crops of the built-in photographs, their labels and where they were cut.

    Parameters
    ----------
    split : str
        ``"train"`` or ``"test"``; ``"fit"`` and ``"validation"`` divide the
        training cells (see :func:`split_cells`).
    size : int
        Side of the returned crops in pixels.
    per_photo : int, optional
        Crops per photograph (default 300 for training and fit, 50 for test
        and validation).

    Returns
    -------
    tuple
        ``x`` float32 ``(N, 3, size, size)`` in [0, 1], ``y`` long ``(N,)``
        (the index of the photograph in :data:`PHOTOS`) and ``boxes`` int64
        ``(N, 5)``: top, left, height, width of the crop in the photograph and
        1 where it was flipped. Labels take turns: 0, 1, ..., 9, 0, 1, ...

    Examples
    --------
    >>> x, y, boxes = photo_crops("test", size=32, per_photo=2)
    >>> tuple(x.shape), y.tolist()[:4], boxes.shape
    ((20, 3, 32, 32), [0, 1, 2, 3], (20, 5))
    """
    _check_split(split)
    count = COUNTS[split] if per_photo is None else check_count("per_photo", per_photo)
    x, y, boxes = _crops(split, check_count("size", size), count)
    return x.clone(), y.clone(), boxes.copy()


def photos(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in data set ``"photos"`` at 64 x 64 pixels.

    Parameters
    ----------
    split : str
        ``"train"`` (3000 crops), ``"test"`` (500) or ``"all"`` (both, training first).

    Returns
    -------
    tuple of torch.Tensor
        ``x`` of shape ``(N, 3, 64, 64)`` in [0, 1] and ``y`` of shape ``(N,)``.

    Examples
    --------
    >>> x, y = photos("test")
    >>> tuple(x.shape), int(y.max())
    ((500, 3, 64, 64), 9)
    """
    if split not in ("train", "test", "all"):
        raise InputError(f"unknown split {split!r}; expected train, test or all")
    if split == "all":
        parts = [photos("train"), photos("test")]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    x, y, _ = photo_crops(split)
    return x, y


def photos_cnn(size: int = SIZE, classes: int = len(PHOTOS)) -> nn.Sequential:
    """The architecture of ``"photos-cnn"``, untrained.

    VGG-style: two 3 x 3 convolutions with ReLU then 2 x 2 max-pooling at 16
    and at 32 channels, one convolution with pooling at 64 channels twice
    (``size`` -> ``size / 16``), then a dense layer of 128 ReLU units and the
    logits. A plain ``nn.Sequential`` so that rule-based explanations see
    every layer. ``size`` must be a multiple of 16.

    Parameters
    ----------
    size : int
        Side of the input images in pixels.
    classes : int
        Number of logits.

    Returns
    -------
    nn.Sequential
        Randomly initialised network for inputs ``(B, 3, size, size)``.

    Examples
    --------
    >>> photos_cnn()(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (size // 16) ** 2, 128),
        nn.ReLU(),
        nn.Linear(128, classes),
    )


def weights_path() -> Path:
    """Where the weights of ``"photos-cnn"`` ship."""
    return shipped_file("photos_cnn.pt")


def trained_photos_cnn() -> nn.Module:
    """``"photos-cnn"``: :func:`photos_cnn` with the weights that ship with the package.

    Examples
    --------
    >>> x, y = photos("test")
    >>> bool((trained_photos_cnn()(x[:50]).argmax(1) == y[:50]).float().mean() > 0.5)
    True
    """
    return load_shipped(photos_cnn(), "photos_cnn.pt", "scripts/train_photos_cnn.py")
