"""Run directories that survive a crash, batched work units, and torchrun sharding.

A run directory holds everything a command produced::

    DIR/config.json          every setting, the seed, package versions, command line, world size
    DIR/results.jsonl        one JSON object per (index, method), sorted by (index, method)
    DIR/results-rank<r>.jsonl  a rank's results while a torchrun job is running
    DIR/arrays/<method>-<first index>.npz   arrays of one batch (x, x_adv, maps, ...)
    DIR/sweep.jsonl          defense sweep records, each with its index and method
    DIR/sweep_summary.json   median robustness and fidelity per beta, the recommended beta
    DIR/explain.jsonl        the demo's explanation records
    DIR/arrays/<name>-<method>-<first index>.npz   arrays of the sweep and explain batches
    DIR/theory.json          Theorem 2 checks
    DIR/figures/*.png, DIR/report.html

The unit of work is one batch of indices for one method. Results of a batch
are appended with a flush and an fsync once the batch is finished, and its
arrays are written to a temporary file that is then renamed, so a run killed
at any moment loses at most the batch in flight; :func:`read_jsonl` ignores a
partial last line. ``--resume`` skips every (index, method) already written.

Under torchrun every rank takes every ``world_size``-th unit, writes its own
``results-rank<r>.jsonl``, and rank 0 merges all of them into
``results.jsonl`` after a barrier. Each unit draws its randomness from the
seed and its first index, and the attack target of image ``i`` comes from a
derangement of the whole index set, so the values do not depend on how the
work is split.

Examples
--------
>>> run = RunDir.create("/tmp/run", {"command": "attack", "seed": 0})  # doctest: +SKIP
>>> run.append([{"index": 0, "method": "gradient", "label": 3}])  # doctest: +SKIP
>>> run.done()  # doctest: +SKIP
{(0, 'gradient')}
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .attack import ATTACK_DEFAULTS, defense_sweep, manipulate
from .explain import METHODS, explain
from .explain import method_options as options_of
from .geometry import curvature
from .metrics import heatmap
from .recommend import MIN_FIDELITY, sweep_summary
from .smooth import smooth
from .validate import InputError
from .zoo import check_compatible, load_data, load_model

__all__ = [
    "Dist",
    "RunDir",
    "Unit",
    "append_jsonl",
    "attack_methods",
    "attack_run",
    "curvature_run",
    "derangement",
    "distributed",
    "execute",
    "explain_methods",
    "explain_run",
    "init_distributed",
    "is_oom",
    "load_inputs",
    "plan",
    "read_jsonl",
    "resolve_device",
    "shutdown_distributed",
    "sweep_run",
    "unit_seed",
    "versions",
    "write_json",
    "write_jsonl",
    "write_npz",
]

Record = dict[str, object]
Arrays = dict[str, np.ndarray]
# Settings that describe where and how a run was executed, not what it computes:
# they may change between a run and its resumption.
VOLATILE = ("argv", "versions", "world_size", "device", "created", "resume")


# ----------------------------------------------------------------------------- files


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """Read a JSON-lines file, ignoring a partial last line.

    A line counts only when it ends with a newline and parses, so a writer
    killed in the middle of a line leaves no trace.

    Parameters
    ----------
    path : str or os.PathLike
        File to read; a missing file reads as empty.

    Returns
    -------
    list of dict
        One dict per complete line.

    Examples
    --------
    >>> read_jsonl("/nonexistent.jsonl")
    []
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n") or not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _json_default(value: object) -> object:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _line(record: Record) -> str:
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
    return json.dumps(clean, default=_json_default, allow_nan=False) + "\n"


def append_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Append records to a JSON-lines file and make them durable (fsync).

    The records go out in one ``write`` call, so a kill leaves either all of
    them or a partial last line; a partial line left by an earlier crash is
    first terminated, so that the new records start on a line of their own.

    Examples
    --------
    >>> append_jsonl("/tmp/x.jsonl", [{"index": 0}])  # doctest: +SKIP
    """
    text = "".join(_line(r) for r in records).encode()
    if not text:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            text = b"\n" + text
        os.write(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(path: Path, write: Callable[[object], None], suffix: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        # mkstemp makes the file private; a run's files get the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Write a JSON-lines file atomically (temporary file, then rename)."""
    text = "".join(_line(r) for r in records).encode()
    _replace_atomically(Path(path), lambda f: f.write(text), ".tmp")


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write a JSON file atomically."""
    text = (json.dumps(obj, indent=2, default=_json_default) + "\n").encode()
    _replace_atomically(Path(path), lambda f: f.write(text), ".tmp")


def write_npz(path: str | os.PathLike, arrays: Arrays) -> None:
    """Write an ``.npz`` atomically, so that a kill never leaves half a file.

    Examples
    --------
    >>> write_npz("/tmp/a.npz", {"x": np.zeros(3)})  # doctest: +SKIP
    """
    _replace_atomically(Path(path), lambda f: np.savez_compressed(f, **arrays), ".npz")


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages that shape the results."""
    from . import __version__

    found = {"python": platform.python_version(), "platform": platform.platform()}
    found["betasmooth"] = __version__
    found["torch"] = torch.__version__
    found["numpy"] = np.__version__
    return found


# ----------------------------------------------------------------------------- run directory


class RunDir:
    """A run directory: config, results, arrays, sweep, theory and report files.

    Parameters
    ----------
    path : str or os.PathLike
        The directory.
    rank, world_size : int
        Position of this process in a torchrun job; each rank appends to its
        own results file while more than one process works.

    Examples
    --------
    >>> run = RunDir("/tmp/run")
    >>> run.results.name
    'results.jsonl'
    """

    def __init__(self, path: str | os.PathLike, rank: int = 0, world_size: int = 1) -> None:
        self.path = Path(path)
        self.rank = rank
        self.world_size = world_size

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def results(self) -> Path:
        return self.path / "results.jsonl"

    @property
    def arrays(self) -> Path:
        return self.path / "arrays"

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @property
    def theory(self) -> Path:
        return self.path / "theory.json"

    def file(self, name: str = "results") -> Path:
        """The JSON-lines file this rank appends ``name`` records to."""
        if self.world_size > 1:
            return self.path / f"{name}-rank{self.rank}.jsonl"
        return self.path / f"{name}.jsonl"

    def config(self) -> dict[str, object]:
        """The stored configuration."""
        if not self.config_path.exists():
            raise InputError(f"{self.path} has no config.json; expected a betasmooth run directory")
        return json.loads(self.config_path.read_text())

    # -- validation and creation

    def check(self, config: dict[str, object], resume: bool) -> None:
        """Refuse to start where it would mix runs.

        Raises
        ------
        InputError
            Without ``resume`` when the directory is not empty; with
            ``resume`` when its config differs in a setting.
        """
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path} is a file; expected a directory for --out")
        if not self.path.exists() or not any(self.path.iterdir()):
            return
        if not resume:
            raise InputError(
                f"{self.path} is not empty; pass --resume to continue the run in it, "
                "or choose a new --out"
            )
        stored = self.config()
        for key in config:
            if key in VOLATILE:
                continue
            if stored.get(key) != config.get(key):
                raise InputError(
                    f"--resume with a different setting: {key} is {stored.get(key)!r} in "
                    f"{self.config_path} but {config.get(key)!r} now; use the same settings "
                    "or choose a new --out"
                )

    def write_config(self, config: dict[str, object]) -> None:
        """Create the directory and write ``config.json`` with the run's provenance."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.arrays.mkdir(exist_ok=True)
        # Temporary files of a batch whose process was killed while writing it.
        for stale in [*self.path.glob(".*.tmp"), *self.arrays.glob(".*.npz")]:
            stale.unlink(missing_ok=True)
        full = dict(config)
        full.setdefault("argv", list(sys.argv))
        full["versions"] = versions()
        full["world_size"] = self.world_size
        full["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if self.config_path.exists():
            # A resumed run keeps its original creation record.
            old = json.loads(self.config_path.read_text())
            full["created"] = old.get("created", full["created"])
        write_json(self.config_path, full)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        config: dict[str, object],
        *,
        resume: bool = False,
        dist: Dist | None = None,
    ) -> RunDir:
        """Check the directory, then write its config (rank 0).

        Every rank checks before any rank writes, so all ranks agree.

        Examples
        --------
        >>> run = RunDir.create("/tmp/new-run", {"command": "demo", "seed": 0})  # doctest: +SKIP
        """
        dist = dist or Dist()
        run = cls(path, dist.rank, dist.world_size)
        run.check(config, resume)
        dist.barrier()
        if dist.rank == 0:
            run.write_config(config)
        dist.barrier()
        return run

    # -- results

    def read(self, name: str = "results") -> list[Record]:
        """Every record of ``name``: the merged file and all ranks' files, deduplicated."""
        files = [self.path / f"{name}.jsonl", *sorted(self.path.glob(f"{name}-rank*.jsonl"))]
        seen: dict[tuple, Record] = {}
        for f in files:
            for r in read_jsonl(f):
                seen.setdefault(_key(r), r)
        return sorted(seen.values(), key=_key)

    def done(self, name: str = "results") -> set[tuple[int, str]]:
        """The (index, method) pairs already written."""
        return {(int(r["index"]), str(r["method"])) for r in self.read(name)}

    def append(self, records: Sequence[Record], name: str = "results") -> None:
        """Append finished records of this rank, durably."""
        append_jsonl(self.file(name), records)

    def merge(self, name: str = "results") -> list[Record]:
        """Merge every rank's records into ``name.jsonl``, sorted by (index, method).

        Called by rank 0 after the barrier that ends a run, and by a single
        process at the end, so both write the same file.
        """
        records = self.read(name)
        write_jsonl(self.path / f"{name}.jsonl", records)
        for f in self.path.glob(f"{name}-rank*.jsonl"):
            f.unlink()
        return records

    def save_arrays(self, method: str, first: int, arrays: Arrays) -> Path:
        """Write a batch's arrays to ``arrays/<method>-<first index>.npz``."""
        path = self.arrays / f"{method}-{first}.npz"
        write_npz(path, arrays)
        return path

    def batches(self, method: str) -> list[Path]:
        """The arrays files ``arrays/<method>-<first index>.npz``, by first index."""
        found = []
        for f in self.arrays.glob(f"{method}-*.npz"):
            head, _, first = f.stem.rpartition("-")
            if head == method and first.isdigit():
                found.append((int(first), f))
        return [f for _, f in sorted(found)]

    def load_arrays(self, method: str) -> list[Arrays]:
        """Every batch's arrays of ``method``, by first index."""
        out = []
        for f in self.batches(method):
            with np.load(f) as data:
                out.append({k: data[k] for k in data.files})
        return out


def _key(record: Record) -> tuple:
    return (int(record["index"]), str(record["method"]), *_extra_key(record))


def _extra_key(record: Record) -> tuple:
    # Sweep and curvature records hold several rows per (index, method), one per beta
    # and defense; they are told apart by those fields.
    return tuple(str(record.get(k)) for k in ("defense", "beta") if k in record)


# ----------------------------------------------------------------------------- work units


@dataclasses.dataclass(frozen=True)
class Unit:
    """One batch of work: a method (or label) and the indices it covers."""

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


def derangement(n: int, seed: int) -> torch.Tensor:
    """A seeded permutation of ``range(n)`` without fixed points.

    Item ``i`` is sent to the next item on one random cycle through all ``n``,
    so it never maps to itself and the result depends only on ``n`` and
    ``seed``, not on batches or ranks.

    Examples
    --------
    >>> p = derangement(5, seed=0)
    >>> bool((p != torch.arange(5)).all())
    True
    """
    if n < 2:
        raise InputError(
            f"an attack needs at least 2 images, one to attack and one for the target map; got {n}"
        )
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(-1)
    return out


def unit_seed(seed: int, method: str, first: int) -> int:
    """Seed of the batch starting at index ``first``: independent of the shard.

    Examples
    --------
    >>> unit_seed(0, "gradient", 4) == unit_seed(0, "gradient", 4)
    True
    """
    return (seed * 1_000_003 + zlib.crc32(method.encode()) * 7919 + first) % (2**31 - 1)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of torch."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    if oom and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


Work = Callable[[Unit], tuple[list[Record], Arrays | None]]


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

    Returns
    -------
    list of dict
        On rank 0, every record of the run, sorted by (index, method); on
        other ranks, an empty list.

    Examples
    --------
    >>> def work(unit):
    ...     return [{"index": i, "method": unit.method} for i in unit.indices], None
    >>> execute(RunDir("/tmp/r"), plan(["a"], range(3), 2), work)  # doctest: +SKIP
    """
    dist = dist or Dist()
    say = message or (lambda text: print(text, file=sys.stderr, flush=True))
    done = run.done(name)
    mine = [u for k, u in enumerate(units) if k % dist.world_size == dist.rank]
    todo = []
    for u in mine:
        left = tuple(i for i in u.indices if (i, u.method) not in done)
        if left:
            todo.append(Unit(u.method, left))
    # Every rank must have read the finished work before any rank adds to it.
    dist.barrier()
    limit = max((len(u.indices) for u in todo), default=1)
    # One bar per job, shown by rank 0 only and, by default, only on a terminal.
    hide = True if dist.rank != 0 else (None if progress is None else not progress)
    bar = tqdm(total=sum(len(u.indices) for u in todo), desc=desc, unit="item", disable=hide)
    with bar:
        queue = list(todo)
        while queue:
            unit = queue.pop(0)
            if len(unit.indices) > limit:
                queue[:0] = _split(unit, limit)
                continue
            start = time.perf_counter()
            try:
                records, arrays = work(unit)
            except Exception as exc:
                if not is_oom(exc) or len(unit.indices) == 1:
                    raise
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
            if arrays is not None:
                prefix = "" if name == "results" else f"{name}-"
                run.save_arrays(prefix + unit.method, unit.indices[0], arrays)
            run.append(records, name)
            bar.update(len(unit.indices))
    dist.barrier()
    merged = run.merge(name) if dist.rank == 0 else []
    dist.barrier()
    return merged


def _split(unit: Unit, size: int) -> list[Unit]:
    return [
        Unit(unit.method, unit.indices[i : i + size]) for i in range(0, len(unit.indices), size)
    ]


# ----------------------------------------------------------------------------- torchrun


@dataclasses.dataclass
class Dist:
    """Where this process stands in a torchrun job (one process: rank 0 of 1).

    Examples
    --------
    >>> Dist().world_size
    1
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        if self.active:
            torch.distributed.barrier()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(device: str | None) -> torch.device:
    """The torch device named on the command line; ``None`` picks CPU.

    Raises
    ------
    InputError
        For an unknown device name, or CUDA where there is no GPU.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    name = device or "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"CUDA is not available on this machine (--device {name}); use --device cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device {name!r}; expected cpu or cuda")
    return dev


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun job if there is one: gloo on CPU, nccl with one GPU per rank.

    Returns
    -------
    tuple
        The :class:`Dist` of this process and the device it computes on
        (``cuda:LOCAL_RANK`` for a CUDA job).

    Examples
    --------
    >>> dist, dev = init_distributed(torch.device("cpu"))  # doctest: +SKIP
    """
    if not launched() or int(os.environ["WORLD_SIZE"]) <= 1:
        return Dist(), device
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch.distributed.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        torch.distributed.init_process_group(backend, **kwargs)
    return Dist(rank, world, local, active=True), device


def shutdown_distributed(dist: Dist) -> None:
    """Leave the torchrun job."""
    if dist.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[tuple[Dist, torch.device]]:
    """Context manager around :func:`init_distributed` and :func:`shutdown_distributed`."""
    dist, dev = init_distributed(device)
    try:
        yield dist, dev
    finally:
        shutdown_distributed(dist)


# ----------------------------------------------------------------------------- jobs


def load_inputs(
    model: str,
    data: str,
    *,
    weights: str | None = None,
    n: int | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    preset: str | None = None,
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Load a model and the first ``n`` test items, and check that they fit together.

    ``preset`` (a ``torchvision:...`` model spec) prepares the images as those
    weights require; see :func:`betasmooth.zoo.load_data`.

    Everything that can be wrong with user input fails here, before a run
    directory is touched.

    Returns
    -------
    tuple
        ``(model, x, y)``; ``y`` is -1 where the label is unknown.

    Examples
    --------
    >>> model, x, y = load_inputs("digits-cnn", "digits", n=4)
    >>> tuple(x.shape)
    (4, 1, 32, 32)
    """
    if n is not None and n < 1:
        raise InputError(f"--n must be a positive number of images; got {n}")
    net = load_model(model, weights=weights)
    x, y = load_data(
        data, "test", image_size=image_size, channels=channels, mean=mean, std=std, preset=preset
    )
    if n is not None:
        x, y = x[:n], y[:n]
    check_compatible(net, x)
    return net, x, y


def _split_methods(methods: str | Sequence[str], choices: Sequence[str]) -> list[str]:
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [m.strip() for m in names if m.strip()]
    if names == ["all"]:
        return list(choices)
    unknown = [m for m in names if m not in choices]
    if unknown or not names:
        raise InputError(
            f"unknown method {(unknown or [''])[0]!r}; expected a comma list of "
            f"{', '.join(choices)}, or all"
        )
    return list(dict.fromkeys(names))


def attack_methods(methods: str | Sequence[str]) -> list[str]:
    """Check a method list (a comma list or ``all``) against the attackable methods.

    Examples
    --------
    >>> attack_methods("gradient,lrp")
    ['gradient', 'lrp']
    """
    return _split_methods(methods, list(ATTACK_DEFAULTS))


def explain_methods(methods: str | Sequence[str]) -> list[str]:
    """Check a method list (a comma list or ``all``) against the registered methods."""
    return _split_methods(methods, list(METHODS))


def range_options(
    low: torch.Tensor | float, high: torch.Tensor | float
) -> dict[str, dict[str, object]]:
    """Options that make the methods respect the data's range ``[low, high]`` (per channel).

    LRP's z^B rule takes the bounds, SmoothGrad's noise level is relative to
    ``high - low``. Pass the result as ``method_options`` of the runs.

    Examples
    --------
    >>> opts = range_options(torch.tensor([-2.0]).view(1, 1, 1, 1), 2.0)
    >>> sorted(opts), float(opts["smoothgrad"]["input_range"])
    (['lrp', 'smoothgrad'], 4.0)
    """
    span = high - low
    return {"lrp": {"low": low, "high": high}, "smoothgrad": {"input_range": span}}


def _named(record: Record, classes: Sequence[str] | None) -> Record:
    """The record with the class names of its predicted labels, where the model has them."""
    if classes:
        for key in ("label", "label_adv"):
            if isinstance(record.get(key), int) and 0 <= record[key] < len(classes):
                record[f"{key}_name"] = classes[record[key]]
    return record


def _options(
    unit: Unit,
    given: dict[str, dict[str, object]] | None,
    seed: int,
    defaults: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """Options of the unit's method: ``defaults``, those ``given``, and the unit's seed
    for a method that draws noise and has been given no seed."""
    options = {**(defaults or {}), **(given or {}).get(unit.method, {})}
    if "seed" in options_of(unit.method):
        options.setdefault("seed", unit_seed(seed, unit.method, unit.indices[0]))
    return options


def attack_run(
    run: RunDir,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    methods: Sequence[str],
    *,
    steps: int | Mapping[str, int] | None = None,
    batch_size: int = 16,
    goal: str = "targeted",
    seed: int = 0,
    data_range: tuple[float, float] | None = (0.0, 1.0),
    method_options: dict[str, dict[str, object]] | None = None,
    check_every: int | None = None,
    device: torch.device | str = "cpu",
    dist: Dist | None = None,
    progress: bool | None = None,
    classes: Sequence[str] | None = None,
) -> list[Record]:
    """Attack every item of ``x`` with every method, batch by batch, into ``run``.

    The target map of item ``i`` is the map (by the same method) of item
    ``derangement(len(x), seed)[i]``. Records are those of
    :meth:`betasmooth.attack.ManipulationResult.records` plus ``index``,
    ``target_index``, ``true_label`` and ``seconds``; the arrays of a batch are
    those of :meth:`~betasmooth.attack.ManipulationResult.arrays` plus
    ``index`` and ``target_index``. ``steps`` is one budget for all methods,
    one per method, or ``None`` for the attack's defaults. With ``classes``
    (the model's class names) records also hold ``label_name`` and
    ``label_adv_name``.

    Returns
    -------
    list of dict
        On rank 0 every record of the run, sorted by (index, method).

    Examples
    --------
    >>> model, x, y = load_inputs("digits-cnn", "digits", n=4)  # doctest: +SKIP
    >>> run = RunDir.create("/tmp/attack", {"command": "attack"})  # doctest: +SKIP
    >>> records = attack_run(run, model, x, y, ["gradient"], steps=20)  # doctest: +SKIP
    """
    device = torch.device(device)
    model = model.to(device)
    targets = derangement(x.shape[0], seed) if goal == "targeted" else None

    def work(unit: Unit) -> tuple[list[Record], Arrays]:
        idx = torch.tensor(unit.indices)
        s = unit_seed(seed, unit.method, unit.indices[0])
        defaults = ATTACK_DEFAULTS.get(unit.method, {}).get("options")
        options = _options(unit, method_options, seed, defaults)
        xb = x[idx].to(device)
        target_map = None
        if targets is not None:
            xt = x[targets[idx]].to(device)
            target_map = heatmap(explain(model, xt, unit.method, **options)).detach()
        result = manipulate(
            model,
            xb,
            target_map,
            unit.method,
            goal=goal,
            steps=steps.get(unit.method) if isinstance(steps, Mapping) else steps,
            data_range=data_range,
            method_options=options,
            check_every=check_every,
            seed=s,
        )
        records = []
        for i, r in zip(unit.indices, result.records()):
            head = {"index": i, "method": unit.method}
            if targets is not None:
                head["target_index"] = int(targets[i])
            head["true_label"] = int(y[i])
            row = {**head, **{key: v for key, v in r.items() if key not in head}}
            records.append(_named(row, classes))
        arrays = result.arrays()
        arrays["index"] = np.asarray(unit.indices)
        if targets is not None:
            arrays["target_index"] = targets[idx].numpy()
        return records, arrays

    units = plan(methods, range(x.shape[0]), batch_size)
    return execute(run, units, work, dist=dist, progress=progress, desc="attack")


def explain_run(
    run: RunDir,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    methods: Sequence[str],
    *,
    batch_size: int = 16,
    seed: int = 0,
    method_options: dict[str, dict[str, object]] | None = None,
    name: str = "results",
    device: torch.device | str = "cpu",
    dist: Dist | None = None,
    progress: bool | None = None,
    classes: Sequence[str] | None = None,
) -> list[Record]:
    """Explain every item with every method; one record per (index, method).

    Records hold ``index``, ``method``, ``true_label``, ``label`` (the
    predicted class, which is explained), ``logit`` and statistics of the
    heatmap: ``map_max``, ``map_entropy`` (in nats, of the map as a
    distribution over pixels) and ``map_top10_mass`` (mass on the top 10 % of
    pixels); with ``classes`` (the model's class names) also ``label_name``.
    Arrays: ``index``, ``x``, ``map`` ``(B, H, W)``.

    Examples
    --------
    >>> records = explain_run(run, model, x, y, ["gradient", "lrp"])  # doctest: +SKIP
    """
    device = torch.device(device)
    model = model.to(device)

    def work(unit: Unit) -> tuple[list[Record], Arrays]:
        idx = torch.tensor(unit.indices)
        xb = x[idx].to(device)
        options = _options(unit, method_options, seed)
        with torch.no_grad():
            logits = model(xb)
        label = logits.argmax(1)
        maps = heatmap(explain(model, xb, unit.method, label, **options)).detach()
        flat = maps.flatten(1)
        k = max(1, flat.shape[1] // 10)
        entropy = -(flat * flat.clamp_min(1e-30).log()).sum(1)
        top = flat.topk(k, dim=1).values.sum(1)
        records = [
            _named(
                {
                    "index": i,
                    "method": unit.method,
                    "true_label": int(y[i]),
                    "label": int(label[j]),
                    "logit": float(logits[j, label[j]]),
                    "map_max": float(flat[j].max()),
                    "map_entropy": float(entropy[j]),
                    "map_top10_mass": float(top[j]),
                },
                classes,
            )
            for j, i in enumerate(unit.indices)
        ]
        arrays = {
            "index": np.asarray(unit.indices),
            "x": xb.cpu().numpy(),
            "map": maps.cpu().numpy(),
        }
        return records, arrays

    units = plan(methods, range(x.shape[0]), batch_size)
    return execute(run, units, work, name=name, dist=dist, progress=progress, desc="explain")


# Methods that are themselves defenses: their attacks are the adaptive ones, and
# their sweep runs the defenses on the method they smooth.
NOISE_METHODS = ("smoothgrad", "beta_smooth")


def sweep_run(
    run: RunDir,
    model: torch.nn.Module,
    betas: Sequence[float],
    *,
    methods: Sequence[str] | None = None,
    smoothgrad_n: int = 20,
    seed: int = 0,
    data_range: tuple[float, float] | None = (0.0, 1.0),
    method_options: dict[str, dict[str, object]] | None = None,
    min_fidelity: float = MIN_FIDELITY,
    device: torch.device | str = "cpu",
    dist: Dist | None = None,
    progress: bool | None = None,
) -> list[Record]:
    """Defense sweep over ``betas`` on every attacked batch of ``run``, into ``sweep.jsonl``.

    Reads ``arrays/<method>-<first>.npz`` (``x``, ``x_adv``, ``map_target``,
    ``index``); records are those of
    :meth:`betasmooth.attack.SweepResult.records` with the run's ``index``,
    the attacked ``method`` and the ``base`` method the defenses smooth.
    Arrays ``arrays/sweep-<method>-<first>.npz`` hold ``index``, ``betas`` and
    the defended maps of ``x_adv``: ``maps_beta`` and ``maps_smoothgrad``,
    each ``(B, len(betas), H, W)``. Batches already in ``sweep.jsonl`` are
    skipped, so the sweep is resumable and running it twice adds nothing.
    ``method_options`` holds the options of each base method (e.g. LRP's
    bounds, :func:`range_options`). Rank 0 writes ``sweep_summary.json``:
    median robustness and fidelity per method, defense and beta and the
    recommended beta (:func:`betasmooth.recommend.sweep_summary`).

    Examples
    --------
    >>> sweep_run(RunDir("/tmp/attack"), model, [0.5, 1, 2, 5])  # doctest: +SKIP
    """
    device = torch.device(device)
    model = model.to(device)
    if methods is None:
        methods = sorted({r["method"] for r in read_jsonl(run.results)})
    files = {(m, int(f.stem.rpartition("-")[2])): f for m in methods for f in run.batches(m)}
    units = []
    for (m, _), f in sorted(files.items()):
        with np.load(f) as data:
            units.append(Unit(m, tuple(int(i) for i in data["index"])))

    def work(unit: Unit) -> tuple[list[Record], Arrays]:
        with np.load(files[(unit.method, unit.indices[0])]) as data:
            index = [int(i) for i in data["index"]]
            rows = [index.index(i) for i in unit.indices]
            x = torch.from_numpy(data["x"][rows]).to(device)
            x_adv = torch.from_numpy(data["x_adv"][rows]).to(device)
            target_map = torch.from_numpy(data["map_target"][rows]).to(device)
        base = "gradient" if unit.method in NOISE_METHODS else unit.method
        result = defense_sweep(
            model,
            x,
            x_adv,
            target_map,
            base,
            betas,
            smoothgrad_n=smoothgrad_n,
            data_range=data_range,
            method_options=(method_options or {}).get(base),
            seed=unit_seed(seed, unit.method, unit.indices[0]),
        )
        records = [
            {"index": unit.indices[r["index"]], "method": unit.method, "base": base}
            | {k: v for k, v in r.items() if k != "index"}
            for r in result.records()
        ]
        arrays: Arrays = {"index": np.asarray(unit.indices), "betas": np.asarray(betas, float)}
        for defense, key in (("beta_smooth", "maps_beta"), ("smoothgrad", "maps_smoothgrad")):
            maps = [
                result.maps[(defense, float(b))][0]
                for b in betas
                if (defense, float(b)) in result.maps
            ]
            if maps:
                arrays[key] = torch.stack(maps, 1).numpy()
        return records, arrays

    records = execute(run, units, work, name="sweep", dist=dist, progress=progress, desc="sweep")
    if records:
        write_json(run.path / SUMMARY, sweep_summary(records, min_fidelity))
    return records


#: File of the sweep's medians and recommended beta, beside ``sweep.jsonl``.
SUMMARY = "sweep_summary.json"


def curvature_run(
    run: RunDir,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    betas: Sequence[float | None],
    *,
    batch_size: int = 16,
    seed: int = 0,
    options: dict[str, object] | None = None,
    device: torch.device | str = "cpu",
    dist: Dist | None = None,
    progress: bool | None = None,
) -> list[Record]:
    """Curvature of the model and its beta-smoothed versions at every item.

    ``None`` in ``betas`` stands for the original ReLU network. One record
    per (index, beta): ``index``, ``method`` (``relu`` or ``beta=<b>``),
    ``beta``, ``true_label`` and every estimate of
    :func:`betasmooth.geometry.curvature`.

    Examples
    --------
    >>> curvature_run(run, model, x, y, [None, 1.0, 5.0])  # doctest: +SKIP
    """
    device = torch.device(device)
    model = model.to(device)
    nets = {_beta_label(b): (b, model if b is None else smooth(model, b)) for b in betas}

    def work(unit: Unit) -> tuple[list[Record], None]:
        beta, net = nets[unit.method]
        xb = x[torch.tensor(unit.indices)].to(device)
        with torch.no_grad():
            # Every version explains the class the original network predicts.
            label = model(xb).argmax(1)
        s = unit_seed(seed, unit.method, unit.indices[0])
        found = curvature(net, xb, label, seed=s, **(options or {}))
        records = []
        for j, i in enumerate(unit.indices):
            row: Record = {"index": i, "method": unit.method, "beta": beta}
            row["true_label"] = int(y[i])
            row.update({k: float(v[j]) for k, v in found.items() if torch.is_tensor(v)})
            records.append(row)
        return records, None

    units = plan(list(nets), range(x.shape[0]), batch_size)
    return execute(run, units, work, dist=dist, progress=progress, desc="curvature")


def _beta_label(beta: float | None) -> str:
    return "relu" if beta is None else f"beta={beta:g}"
