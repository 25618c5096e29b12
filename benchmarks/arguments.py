"""Command-line argument types shared by the benchmark scripts."""

from __future__ import annotations

import argparse


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
