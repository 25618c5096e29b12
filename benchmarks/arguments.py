"""Command-line argument types and the JSON output shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch


def json_lines(text: str) -> str:
    """``--json FILE``: a file the results are appended to, checked before any measurement.

    A path that cannot be written (a missing folder, no permission) is refused
    when the arguments are parsed, not after minutes of measurement whose
    results it would lose.

    Examples
    --------
    >>> json_lines("/no/such/dir/x.jsonl")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: cannot append to /no/such/dir/x.jsonl: No such file or directory
    """
    try:
        with open(text, "a"):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot append to {text}: {err.strerror}") from None
    return text


def machine(device: str) -> dict[str, object]:
    """Where a measurement ran, so that JSON lines from different machines are told apart.

    Examples
    --------
    >>> facts = machine("cpu")
    >>> facts["device"], facts["threads"] == torch.get_num_threads()
    ('cpu', True)
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if cuda
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def append_json(path: str | None, record: dict[str, object], device: str) -> None:
    """Append ``record`` and the :func:`machine` it ran on as one JSON line to ``path``.

    Nothing is written when ``path`` is ``None`` (no ``--json`` given). The
    machine's facts sit under ``"machine"``, apart from the record's own keys.
    """
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({**record, "machine": machine(device)}) + "\n")
