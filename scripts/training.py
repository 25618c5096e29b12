"""What the training scripts share: accuracy, and the report and file that end a run."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn


def output_file(text: str) -> Path:
    """``type=`` of ``--out``: a file path whose folder can be written, checked before training.

    A wrong path found only when the weights are saved would lose the whole run.
    """
    path = Path(text)
    expected = "expected a file path in a writable folder, such as weights/model.pt"
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; {expected}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise argparse.ArgumentTypeError(f"{path.parent} is not a folder; {expected}") from None
    except OSError as error:
        problem = f"cannot create the folder {path.parent} ({error.strerror})"
        raise argparse.ArgumentTypeError(f"{problem}; {expected}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text} cannot be written; {expected}")
    return path


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(b).argmax(1) == t).sum()) for b, t in zip(x.split(250), y.split(250)))
    return hits / len(y)


def report_and_save(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    seconds: float,
    out: Path,
) -> None:
    """Print training and test accuracy and the time, and write the state dict to ``out``."""
    print(f"train accuracy {accuracy(model, *train):.4f}")
    print(f"test accuracy {accuracy(model, *test):.4f} ({len(test[1])} images)")
    print(f"trained in {seconds:.1f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
