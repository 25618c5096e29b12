"""Work units: batches of one method's items, run with resume, sharding and memory care.

The unit of work is one batch of indices for one method. :func:`execute`
runs a rank's share of the units (every ``world_size``-th one under
torchrun), skips what the run directory already holds, retries a batch that
runs out of memory in halves, and lets rank 0 merge every rank's records at
the end. Each item draws its randomness from the seed and its own index
(:func:`unit_seed`), and the attack target of image ``i`` comes from a
derangement of the whole index set, so the values do not depend on how the
work is split into ranks. The attack's own draws (restarts, EOT) and the
methods that draw from the global generators (Captum's GradientShap, Lime,
...; :func:`seeded`) are the exception: one seed per batch, from its first
index, so they follow the batch size, and the halves of a batch that ran out
of memory draw anew.

Examples
--------
>>> [u.indices for u in plan(["gradient"], range(5), 2)]
[(0, 1), (2, 3), (4,)]
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import Dist
from .progress import shown
from .store import Arrays, Batch, Record, RunDir, record_key
from .validate import InputError, OutOfMemory, is_oom, tell

__all__ = ["Unit", "execute", "plan", "unit_seed"]


@dataclasses.dataclass(frozen=True)
class Unit:
    """One batch of work: a method (or label) and the indices it covers.

    Examples
    --------
    >>> Unit("gradient", (4, 5, 6))
    Unit(method='gradient', indices=(4, 5, 6))
    """

    method: str
    indices: tuple[int, ...]


def plan(methods: Sequence[str], indices: Sequence[int], batch_size: int) -> list[Unit]:
    """Split the work into units: for each method, consecutive batches of indices.

    Examples
    --------
    >>> [u.indices for u in plan(["gradient"], range(5), 2)]
    [(0, 1), (2, 3), (4,)]
    """
    if batch_size < 1:
        raise InputError(f"batch size must be a positive integer; got {batch_size}")
    indices = list(indices)
    return [
        Unit(m, tuple(indices[i : i + batch_size]))
        for m in methods
        for i in range(0, len(indices), batch_size)
    ]


def unit_seed(seed: int, method: str, first: int) -> int:
    """Seed of the item at index ``first``, or of the batch it starts: independent of the shard.

    The jobs seed SmoothGrad's draws per item with it, and the attack's
    restarts per batch.

    Examples
    --------
    >>> unit_seed(0, "gradient", 4) == unit_seed(0, "gradient", 4)
    True
    """
    return (seed * 1_000_003 + zlib.crc32(method.encode()) * 7919 + first) % (2**31 - 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's and numpy's global generators seeded with ``seed`` inside, as they were after.

    For draws that take no generator: Captum's sampling methods (GradientShap
    draws from numpy's too, Lime and KernelShap from torch's) and a model
    file's methods.

    Examples
    --------
    >>> with seeded(3, torch.device("cpu")):
    ...     a = torch.rand(2)
    >>> with seeded(3, torch.device("cpu")):
    ...     b = torch.rand(2)
    >>> torch.equal(a, b)
    True
    """
    cuda = [device] if device.type == "cuda" else []
    state = np.random.get_state()
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            np.random.set_state(state)


Work = Callable[[Unit], tuple[list[Record], Batch | Arrays | None]]


def execute(
    run: RunDir,
    units: Sequence[Unit],
    work: Work,
    *,
    name: str = "results",
    dist: Dist | None = None,
    progress: bool | None = None,
    desc: str = "batches",
    message: Callable[[str], None] | None = None,
    keeps_arrays: bool = True,
    rows_per_item: int = 1,
) -> list[Record]:
    """Do this rank's share of ``units``, skip what is done, and merge at the end.

    ``work(unit)`` returns the unit's records (one per index, each with
    ``index`` and ``method``) and its arrays (or ``None``). Records get a
    ``seconds`` field (the batch time per item) when they have none; arrays
    are written to ``arrays/<method>-<first index>.npz``, with a ``<name>-``
    prefix for records other than ``results``.

    A batch that runs out of memory is retried in halves, and later batches
    keep the smaller size.

    Parameters
    ----------
    run : RunDir
        The run directory (already created).
    units : sequence of Unit
        All the work of the run, in the same order on every rank.
    work : callable
        ``work(unit) -> (records, arrays)``.
    name : str
        Records go to ``name.jsonl`` (``results``, ``sweep`` or ``explain``).
    dist : Dist, optional
        The torchrun job; ``None`` for one process.
    progress : bool or None
        Progress bar: ``None`` shows it only on a terminal.
    desc : str
        Label of the progress bar.
    message : callable, optional
        Where one-line notices (such as a halved batch) go; stderr by default.
    keeps_arrays : bool
        Whether ``work`` returns arrays. Then a finished item whose arrays
        file is missing or corrupt is computed again (see :meth:`RunDir.repair`).
    rows_per_item : int
        Records per (index, method) (a sweep writes one per defense and beta).
        A unit counts as done when every item has them all; otherwise it is
        computed again whole (a kill can cut the write of a batch's records
        after some of its lines), and only the records still missing are
        added, so that every record is written once and the arrays of the
        unit stay in one file.

    Returns
    -------
    list of dict
        On rank 0, every record of the run, sorted by (index, method); on
        other ranks, an empty list.

    Examples
    --------
    >>> import tempfile
    >>> run = RunDir.create(tempfile.mkdtemp() + "/run", {"command": "test"})
    >>> def work(unit):
    ...     return [{"index": i, "method": unit.method} for i in unit.indices], None
    >>> records = execute(run, plan(["a"], range(3), 2), work, keeps_arrays=False)
    >>> [(r["index"], r["method"]) for r in records]
    [(0, 'a'), (1, 'a'), (2, 'a')]
    """
    dist = dist or Dist()
    say = message or tell
    # The job holds the directory while the work runs (a whole command holds it longer).
    with run.held(dist):
        left_units, written = _unfinished(run, units, name, dist, say, keeps_arrays, rows_per_item)
        # One bar per job, shown by rank 0 only and, by default, only on a terminal; the
        # passes inside a long batch get transient bars below it (progress.passes).
        hide = True if dist.rank != 0 else (None if progress is None else not progress)
        total = sum(len(u.indices) for u in left_units)
        with tqdm(total=total, desc=desc, unit="item", disable=hide) as bar, shown(not bar.disable):
            for unit, records, arrays in _finished(left_units, work, say):
                if arrays is not None:
                    run.save_arrays(unit.method, unit.indices[0], arrays, name, unit.indices)
                run.append([r for r in records if record_key(r) not in written], name)
                bar.update(len(unit.indices))
        dist.barrier()
        return dist.first(lambda: run.merge(name)) or []


def _unfinished(
    run: RunDir,
    units: Sequence[Unit],
    name: str,
    dist: Dist,
    say: Callable[[str], None],
    keeps_arrays: bool,
    rows_per_item: int,
) -> tuple[list[Unit], set[tuple]]:
    """This rank's units not yet done (after repairing lost arrays), and the records' keys."""

    def tidy() -> None:
        # A sweep adds to a finished run without writing its config again.
        run.remove_temporary()
        if keeps_arrays:
            run.repair(name, say)

    dist.first(tidy)
    records = run.read(name)
    rows = Counter((int(r["index"]), str(r["method"])) for r in records)
    mine = [u for k, u in enumerate(units) if k % dist.world_size == dist.rank]
    left_units = [u for u in mine if any(rows[(i, u.method)] < rows_per_item for i in u.indices)]
    # Every rank must have read the finished work before any rank adds to it.
    dist.barrier()
    return left_units, {record_key(r) for r in records}


def _finished(
    left_units: Sequence[Unit], work: Work, say: Callable[[str], None]
) -> Iterator[tuple[Unit, list[Record], Batch | Arrays | None]]:
    """Work through the units, halving the batches after an out-of-memory error."""
    limit = max((len(u.indices) for u in left_units), default=1)
    queue = list(left_units)
    while queue:
        unit = queue.pop(0)
        if len(unit.indices) > limit:
            queue[:0] = _split(unit, limit)
            continue
        start = time.perf_counter()
        try:
            records, arrays = work(unit)
        except Exception as exc:
            if not is_oom(exc):
                raise
            if len(unit.indices) == 1:
                raise OutOfMemory(exc, "with a batch of 1") from None
            records = None
        if records is None:
            # Outside the except block, so that the failed batch's tensors,
            # held by the traceback, are freed before the cache is emptied.
            limit = max(1, len(unit.indices) // 2)
            say(
                f"betasmooth: out of memory with a batch of {len(unit.indices)}; "
                f"retrying with batches of {limit}"
            )
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            queue[:0] = _split(unit, limit)
            continue
        per_item = (time.perf_counter() - start) / len(unit.indices)
        for r in records:
            r.setdefault("seconds", per_item)
        yield unit, records, arrays


def _split(unit: Unit, size: int) -> list[Unit]:
    return [
        Unit(unit.method, unit.indices[i : i + size]) for i in range(0, len(unit.indices), size)
    ]
