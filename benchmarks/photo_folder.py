"""Write the built-in photographs to a folder, as a user's own images would be.

The benchmarks of torchvision models (``gpu.sh``) attack whole photographs
through the same path as a user's folder: resize, centre crop and the
weights' normalisation. Without network access, ``--weights`` puts random
weights where torchvision's cache expects that model's file, unless the file
is there already; the cost of an attack does not depend on the weights'
values, its maps do. Since every later load would take those random weights
for the pretrained ones, it writes them only into a cache named by
``TORCH_HOME``, to be kept apart from the one real experiments use.

    TORCH_HOME=/tmp/random-weights python benchmarks/photo_folder.py photos/ \
        --weights torchvision:vgg16
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from PIL import Image

from betasmooth.photos import PHOTOS
from betasmooth.pretrained import checkpoint_path


def write_photos(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, load in PHOTOS.items():
        Image.fromarray(load()).convert("RGB").save(folder / f"{name}.png")
    print(f"{len(PHOTOS)} photographs in {folder}")


def seed_weights(spec: str) -> None:
    from torchvision.models import get_model

    path = checkpoint_path(spec)
    if path.is_file():
        print(f"{spec}: weights from {path}")
        return
    if not os.environ.get("TORCH_HOME"):
        sys.exit(
            f"{spec}: no cached weights in {path.parent}; random weights go only into a cache "
            "of their own: set TORCH_HOME to a folder that real experiments do not use"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(get_model(spec.split(":")[1]).state_dict(), path)
    print(f"{spec}: RANDOM weights written to {path} (no cached weights, no network)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--weights", help="a torchvision model spec whose cache to seed")
    args = parser.parse_args()
    write_photos(args.folder)
    if args.weights:
        seed_weights(args.weights)


if __name__ == "__main__":
    main()
