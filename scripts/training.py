"""What the training scripts share: accuracy, and the report and file that end a run."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


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
