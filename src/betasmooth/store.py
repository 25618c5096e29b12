"""The run directory: its layout, durable writes, and reading it back.

A run directory holds everything a command produced::

    DIR/config.json          every setting, the seed, package versions, command line, world size
    DIR/results.jsonl        one JSON object per (index, method), sorted by (index, method)
    DIR/results-rank<r>.jsonl  a rank's results while a torchrun job is running
    DIR/arrays/<method>-<first index>.npz   arrays of one batch (x, x_adv, maps, ...;
                             with save_attributions also the signed attributions)
    DIR/sweep.jsonl          defense sweep records, each with its index and method
    DIR/sweep_summary.json   median robustness and fidelity per beta, the recommended beta
    DIR/explain.jsonl        the demo's explanation records
    DIR/arrays/<name>-<method>-<first index>.npz   arrays of the sweep and explain batches
    DIR/theory.json          Theorem 2 checks
    DIR/warnings.jsonl       the warnings said (rank 0's), {"command", "warning"} a line
    DIR/warnings-rank<r>.jsonl  the warnings another torchrun rank said of its own items
    DIR/figures/*.png, DIR/report.html

Results of a batch are appended with a flush and an fsync once the batch is
finished, and its arrays are written to a temporary file that is then
renamed, so a run killed at any moment loses at most the batch in flight;
:func:`read_jsonl` ignores a partial last line. A write that fails (no space,
a read-only folder) raises an ``OSError`` that names the file, and leaves
what was written before intact. On ``--resume`` a finished item whose arrays
file is missing or corrupt is forgotten and computed again
(:meth:`RunDir.repair`).

Examples
--------
>>> import tempfile
>>> run = RunDir.create(tempfile.mkdtemp() + "/run", {"command": "attack", "seed": 0})
>>> run.append([{"index": 0, "method": "gradient", "label": 3}])
>>> run.read()
[{'index': 0, 'method': 'gradient', 'label': 3}]
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: runs are not locked
    fcntl = None

from .checkpoint import read_npz
from .distributed import Dist
from .recommend import PAPER_DEFENSES, beta_key
from .validate import InputError

__all__ = [
    "OPTIONAL_PACKAGES",
    "RUN_ARRAYS",
    "VOLATILE",
    "Arrays",
    "Record",
    "RunDir",
    "AttackBatch",
    "Batch",
    "ExplainBatch",
    "SweepBatch",
    "append_jsonl",
    "check_batch_file",
    "holding_locks",
    "read_jsonl",
    "record_key",
    "versions",
    "write_bytes",
    "write_json",
    "write_jsonl",
    "write_npz",
]

Record = dict[str, object]
Arrays = dict[str, np.ndarray]
# Settings that describe where and how a run was executed, not what it computes:
# they may change between a run and its resumption.
VOLATILE = ("argv", "versions", "world_size", "process_group", "device", "created", "resume")
# Settings that a later step adds to a run (betasmooth sweep), which checks them itself.
LATER = ("sweep",)
#: Settings that runs made by older versions lack: compared only where recorded.
NEWER = ("inputs_sha256", "weights_sha256", "goal_targeted", "goal_measure")
#: Settings that are sets written as lists: the same betas in another order are the same run.
UNORDERED = ("betas",)
#: Settings given once or per channel: one value and the same value for every channel agree.
PER_CHANNEL = ("mean", "std")


# Run directories this process holds (see RunDir.lock): resolved path -> [descriptor, count].
_LOCKS: dict[Path, list[int]] = {}
# Inside holding_locks(): a run stays held after its work, until the block ends.
_HOLDING = [False]


@contextlib.contextmanager
def holding_locks() -> Iterator[None]:
    """Keep every run directory locked in the block until its end (a whole command).

    Outside such a block (the Python API) a run is held only while its work runs.
    """
    before, previous = set(_LOCKS), _HOLDING[0]
    _HOLDING[0] = True
    try:
        yield
    finally:
        _HOLDING[0] = previous
        # Only what the block took: locks held before it stay with their holders.
        for key in [k for k in _LOCKS if k not in before]:
            os.close(_LOCKS.pop(key)[0])


def _read_object(path: Path, remedy: str, what: str) -> dict:
    """The JSON object in ``path``; one line naming the file where it is damaged."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" (line {err.lineno})" if isinstance(err, json.JSONDecodeError) else ""
        raise InputError(
            f"{path} is corrupt{where}; expected the JSON object a betasmooth run writes: {remedy}"
        ) from err
    if not isinstance(value, dict):
        raise InputError(f"{path} holds no JSON object; expected {what}")
    return value


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
    return [obj for _, obj in _numbered_lines(Path(path))]


#: What is left after the place where JSON fails on a record cut short: nothing, or a
#: number's sign, point or exponent, a literal begun, or a \uXXXX escape begun.
_CUT_TAIL = re.compile(r"|-|\.|[eE][-+]?|t(ru?)?|f(a(ls?)?)?|n(ul?)?|u[0-9a-fA-F]{0,4}")


def _numbered_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) of every complete line that parses.

    A line that does not parse is skipped where a kill cut it (and the next
    append terminated it): the start of an object that JSON finds wanting only
    at its end. Any other is damage, refused with its line.
    """
    if not path.exists():
        return
    for number, line in enumerate(path.read_text(errors="replace").splitlines(keepends=True), 1):
        if not line.endswith("\n") or not line.strip():
            continue
        text = line.strip()
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as err:
            # Cut short, the text runs out where JSON found it wanting (_CUT_TAIL), or
            # inside a string, which JSON names by where the string starts.
            cut = err.msg.startswith("Unterminated string") or _CUT_TAIL.fullmatch(text[err.pos :])
            if text.startswith("{") and cut:
                continue
            raise InputError(
                f"{path}, line {number}, is not JSON, nor a record cut short by a kill; "
                "expected one JSON object a line, as betasmooth writes them: remove that line"
            ) from None


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
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "r.jsonl")
    >>> append_jsonl(path, [{"index": 0}])
    >>> read_jsonl(path)
    [{'index': 0}]
    """
    text = "".join(_line(r) for r in records).encode()
    if not text:
        return
    with _naming(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                text = b"\n" + text
            _write_all(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``: at a file-size limit (``ulimit -f``) or a full quota, ``write``
    writes a part and says so by its count alone; the next call then raises the error."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _same_setting(key: str, stored: object, given: object) -> bool:
    if key in PER_CHANNEL and isinstance(stored, list) and isinstance(given, list):
        stored, given = _one_if_alike(stored), _one_if_alike(given)
    if key in UNORDERED and isinstance(stored, list) and isinstance(given, list):
        # The same values in any order (1 and 1.0 alike); None (relu) sorts last.
        def order(values: list) -> list:
            return sorted(values, key=lambda v: (v is None, 0 if v is None else v))

        try:
            return order(stored) == order(given)
        except TypeError:  # values that do not sort (a hand-written config): as given
            return stored == given
    return stored == given


def _one_if_alike(values: list) -> list:
    """``values`` as one value where every channel has the same (0.5 for 0.5 0.5 0.5)."""
    return values[:1] if values and all(v == values[0] for v in values) else values


def _setting(value: object) -> str:
    """A run's setting as a refusal shows it: one that a command leaves out is not given."""
    return "not given" if value is None else repr(value)


@contextlib.contextmanager
def _naming(path: str | os.PathLike) -> Iterator[None]:
    """Give an OSError raised while writing ``path`` (no space, read-only) that path's name."""
    try:
        yield
    except OSError as err:
        # A temporary file of the atomic write (.NAME.XXXX.tmp) is named by what it becomes.
        temporary = Path(str(err.filename)).name.startswith(f".{Path(path).name}.")
        if err.filename is not None and not temporary:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


def _replace_atomically(path: Path, write: Callable[[object], None], suffix: str) -> None:
    with _naming(path):
        _replace(path, write, suffix)


def _replace(path: Path, write: Callable[[object], None], suffix: str) -> None:
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
    """Write a JSON-lines file atomically (temporary file, then rename).

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp(), "results.jsonl")
    >>> write_jsonl(path, [{"index": 0}, {"index": 1}])
    >>> path.read_text().splitlines()
    ['{"index": 0}', '{"index": 1}']
    """
    text = "".join(_line(r) for r in records).encode()
    _replace_atomically(Path(path), lambda f: f.write(text), ".tmp")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically: a kill leaves the old file or the new one, never half of one.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp(), "figure.png")
    >>> write_bytes(path, b"new")
    >>> path.read_bytes()
    b'new'
    >>> sorted(p.name for p in path.parent.iterdir())  # no temporary file is left
    ['figure.png']
    """
    _replace_atomically(Path(path), lambda f: f.write(data), ".tmp")


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write a JSON file atomically.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp(), "config.json")
    >>> write_json(path, {"seed": 0})
    >>> json.loads(path.read_text())
    {'seed': 0}
    """
    text = (json.dumps(obj, indent=2, default=_json_default) + "\n").encode()
    _replace_atomically(Path(path), lambda f: f.write(text), ".tmp")


def write_npz(path: str | os.PathLike, arrays: Arrays) -> None:
    """Write an ``.npz`` atomically, so that a kill never leaves half a file.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "a.npz")
    >>> write_npz(path, {"x": np.zeros(3)})
    >>> np.load(path)["x"].shape
    (3,)
    """
    _replace_atomically(Path(path), lambda f: np.savez_compressed(f, **arrays), ".npz")


def _process_group() -> str | None:
    """The torch.distributed backend the run's ranks share (gloo, nccl), or None."""
    dist = torch.distributed
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None


#: Optional packages that shape a run's results where they are installed: torchvision's
#: architectures, weights and preprocessing, Captum's and Quantus's methods.
OPTIONAL_PACKAGES = ("torchvision", "captum", "quantus")


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages that shape the results.

    The optional packages (:data:`OPTIONAL_PACKAGES`) are named where installed.

    Examples
    --------
    >>> {"python", "platform", "betasmooth", "torch", "numpy"} <= set(versions())
    True
    """
    from . import __version__

    found = {"python": platform.python_version(), "platform": platform.platform()}
    found["betasmooth"] = __version__
    found["torch"] = torch.__version__
    found["numpy"] = np.__version__
    for name in OPTIONAL_PACKAGES:
        # From the installed metadata: importing torchvision or quantus takes seconds.
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
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
        return self.merged("results")

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

    @property
    def sweep_summary(self) -> Path:
        """Medians of the sweep per beta and the recommended beta, beside ``sweep.jsonl``."""
        return self.path / "sweep_summary.json"

    def write_sweep_summary(self, summary: Mapping[str, object]) -> None:
        """Write :attr:`sweep_summary` atomically."""
        write_json(self.sweep_summary, summary)

    def read_sweep_summary(self) -> dict | None:
        """The stored sweep summary, or ``None`` where the run has none."""
        if not self.sweep_summary.is_file():
            return None
        return _read_object(
            self.sweep_summary, "delete it and run betasmooth sweep again", "the sweep's summary"
        )

    @property
    def warnings(self) -> Path:
        """What the commands that wrote the run warned, one ``{command, warning}`` a line."""
        return self.path / "warnings.jsonl"

    def add_warnings(self, command: str, messages: Iterable[str]) -> None:
        """Keep what ``command`` warned for the report, each warning once per command
        (a resumed run warns again what it warned before).

        Rank 0 writes ``warnings.jsonl``; another torchrun rank, which warns only of
        its own items, ``warnings-rank<r>.jsonl``, so no two processes append to
        one file.
        """
        held = {(r.get("command"), r.get("warning")) for r in self.read_warnings()}
        fresh = [m for m in dict.fromkeys(messages) if (command, m) not in held]
        mine = self.warnings if self.rank == 0 else self.file("warnings")
        append_jsonl(mine, [{"command": command, "warning": m} for m in fresh])

    def read_warnings(self) -> list[Record]:
        """The warnings kept by :meth:`add_warnings`: rank 0's, then each other rank's,
        each in the order it said them, each once per command."""
        # A warning whose newline a kill cut off is not read until the next append ends
        # its line, which may be the same warning said again on --resume.
        kept: dict[tuple[object, object], Record] = {}
        for f in self._files("warnings"):
            for number, r in _numbered_lines(f):
                if not (isinstance(r, dict) and "warning" in r):
                    raise InputError(
                        f"{f}, line {number}, is not a betasmooth warning; expected a JSON "
                        "object with command and warning: remove that line"
                    )
                kept.setdefault((r.get("command"), r["warning"]), r)
        return list(kept.values())

    def file(self, name: str = "results") -> Path:
        """The JSON-lines file this rank appends ``name`` records to."""
        if self.world_size > 1:
            return self.path / f"{name}-rank{self.rank}.jsonl"
        return self.merged(name)

    def merged(self, name: str = "results") -> Path:
        """The JSON-lines file of every record of ``name``, once a run has finished."""
        return self.path / f"{name}.jsonl"

    def config(self) -> dict[str, object]:
        """The stored configuration.

        Raises
        ------
        InputError
            The directory has no ``config.json``, or one that is not a JSON object.
        """
        if not self.config_path.is_file():
            raise InputError(
                f"{self.path} has no config.json; expected a directory written by betasmooth "
                "demo, attack, explain, sweep, curvature or theorem"
            )
        remedy = "restore it, or start the run again in a new --out"
        return _with_both_statistics(_read_object(self.config_path, remedy, "a run's settings"))

    def lock(self, dist: Dist | None = None) -> None:
        """Hold the directory for this job, until as many :meth:`unlock` calls.

        A second betasmooth process that would write into the same directory at
        the same time (two commands with one ``--out``, a ``--resume`` started
        while the first run, or a surviving rank of its torchrun job, still
        works) is refused on every rank; a killed process holds nothing. Rank
        0 (or the one process) holds an exclusive ``flock`` on the directory,
        the other ranks a shared one on its ``arrays/``, which rank 0 of a new
        job must also get alone; without ``fcntl`` (Windows) nothing is
        locked. Every rank must call it. Holding it again in one process only
        counts.

        Raises
        ------
        InputError
            When another process holds the directory.
        """
        dist = dist or Dist()
        key = self.path.resolve()
        mine = _LOCKS.get(key)
        taken = False
        if fcntl is not None and mine is None and dist.rank == 0:
            self.arrays.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDONLY)
            ranks = os.open(self.arrays, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # No rank of an earlier job holds arrays/ either.
                fcntl.flock(ranks, fcntl.LOCK_EX | fcntl.LOCK_NB)
                mine = _LOCKS[key] = [fd, 0]
            except OSError:
                os.close(fd)
                taken = True
            finally:
                os.close(ranks)
        if dist.any(taken):
            raise InputError(
                f"another betasmooth process is writing to {self.path}; wait until it has "
                "finished, or stop it, and run the command again"
            )
        if fcntl is not None and mine is None:
            fd = os.open(self.arrays, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)
            mine = _LOCKS[key] = [fd, 0]
        if mine is not None:
            mine[1] += 1

    def unlock(self) -> None:
        """Undo one :meth:`lock`; the last lets others write (see :func:`holding_locks`)."""
        key = self.path.resolve()
        mine = _LOCKS.get(key)
        if mine is None:
            return
        mine[1] -= 1
        if mine[1] <= 0 and not _HOLDING[0]:
            os.close(_LOCKS.pop(key)[0])

    @contextlib.contextmanager
    def held(self, dist: Dist | None = None) -> Iterator[None]:
        """:meth:`lock` for the block (every rank of ``dist``), then :meth:`unlock`."""
        self.lock(dist)
        try:
            yield
        finally:
            self.unlock()

    def started(self) -> bool:
        """Whether the directory holds anything but what :meth:`create` writes first.

        A run that failed before its first result leaves only ``config.json``,
        an empty ``arrays/`` and what it warned: such a directory is started
        afresh without ``--resume``, whatever its settings.
        """
        if not self.path.is_dir():
            return False
        first = {
            self.config_path.name,
            self.arrays.name,
            *(f.name for f in self._files("warnings")),
        }
        if any(p.name not in first and not _temporary(p) for p in self.path.iterdir()):
            return True
        return self.arrays.is_dir() and any(not _temporary(p) for p in self.arrays.iterdir())

    # -- validation and creation

    def check_out(self, resume: bool) -> None:
        """Refuse a file, and without ``resume`` a directory that holds a run: what
        :meth:`check` refuses before it reads the config, so that a command can say it
        before it loads a model and data.

        Examples
        --------
        >>> import tempfile
        >>> RunDir(tempfile.mkdtemp()).check_out(resume=False)
        """
        if self.path.is_symlink() and not self.path.exists():
            raise InputError(
                f"{self.path} is a link to {os.readlink(self.path)}, which does not exist; "
                "expected a directory for --out"
            )
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path} is a file; expected a directory for --out")
        # The folder that will hold the run: said now, not after the model has run.
        folder = self.path
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(
                f"{folder} is not writable; expected --out in a folder this user can write to"
            )
        if self.config_path.exists() and not _written_here(self.config_path):
            # Someone's own folder: not a run that failed early, to start afresh over it.
            raise InputError(
                f"{self.config_path} was not written by betasmooth (it names no betasmooth "
                "version); expected a run directory, or choose a new --out"
            )
        if self.config_path.exists():
            self.config()  # a run's config that does not parse is named, never written over
        if self.started() and not resume:
            raise InputError(
                f"{self.path} is not empty; pass --resume to continue the run in it, "
                "or choose a new --out"
            )

    def check(self, config: dict[str, object], resume: bool, unknown: Collection[str] = ()) -> None:
        """Refuse to start where it would mix runs.

        ``unknown`` names settings that are not known yet (a beta still to be
        calibrated), left out of the comparison with a resumed run's.

        Raises
        ------
        InputError
            Without ``resume`` when the directory is not empty; with
            ``resume`` when its config differs in a setting.
        """
        self.check_out(resume)
        if not self.started():
            return
        stored = self.config()
        # Both ways: a setting the run was made with and the command now omits
        # (an option left out on --resume) differs as much as a changed one.
        for key in [*config, *(k for k in stored if k not in config and k not in LATER)]:
            if key in VOLATILE or key in unknown or (key in NEWER and key not in stored):
                continue
            if key == "inputs_sha256" and stored[key] != config.get(key):
                raise InputError(
                    f"--resume with other inputs: the images, labels or weights file differ from "
                    f"those the run in {self.path} was made with (inputs_sha256 in "
                    f"{self.config_path}); use the same data and weights or choose a new --out"
                )
            if key == "weights_sha256" and stored[key] != config.get(key):
                raise InputError(self.other_weights("--resume"))
            if not _same_setting(key, stored.get(key), config.get(key)):
                raise InputError(
                    f"--resume with a different setting: {key} is {_setting(stored.get(key))} "
                    f"in {self.config_path} but {_setting(config.get(key))} now; use the same "
                    "settings or choose a new --out"
                )

    def other_weights(self, command: str) -> str:
        """What a ``command`` on this run says when the model's weights file has changed."""
        made_by = self.config().get("command") if self.started() else None
        again = f"betasmooth {made_by}" if isinstance(made_by, str) else "the run"
        return (
            f"{command} with another model: its weights file differs from the one the run in "
            f"{self.path} was made with (weights_sha256 in {self.config_path}); put that file "
            f"back, or run {again} again with a new --out"
        )

    def write_config(self, config: dict[str, object]) -> None:
        """Create the directory and write ``config.json`` with the run's provenance."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.arrays.mkdir(exist_ok=True)
        self.remove_temporary()
        full = dict(config)
        full.setdefault("argv", list(sys.argv))
        full["versions"] = versions()
        full["world_size"] = self.world_size
        full["process_group"] = _process_group()
        full["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if self.started():
            # A resumed run keeps its original creation record, and the settings
            # of what was added to it later (a sweep), which a later call checks.
            stored = self.config()
            full["created"] = stored.get("created", full["created"])
            full.update({k: stored[k] for k in LATER if k in stored and k not in config})
        else:
            # Said by a run that failed before its first result, perhaps with other settings.
            for said in self._files("warnings"):
                said.unlink(missing_ok=True)
        write_json(self.config_path, full)

    def remove_temporary(self) -> None:
        """Delete the temporary files of writes that a kill interrupted.

        Only while no other process writes to the run: before its work starts.
        """
        folders = [f for f in (self.path, self.arrays, self.figures) if f.is_dir()]
        for stale in [p for folder in folders for p in folder.iterdir()]:
            if _temporary(stale):
                stale.unlink(missing_ok=True)

    def start_sweep(self, settings: dict[str, object], dist: Dist | None = None) -> None:
        """Record the settings of a defense sweep in ``config.json`` (rank 0).

        Raises
        ------
        InputError
            When the run already holds sweep rows made with other settings:
            one sweep per run, so that its rows and summary agree.
        """
        dist = dist or Dist()
        self.check_sweep(settings)

        def record() -> None:
            if self.config().get("sweep") != settings:
                self.update_config(sweep=settings)

        # Every rank waits for rank 0, whatever config.json says when it looks.
        dist.first(record)

    def check_sweep(self, settings: dict[str, object]) -> None:
        """Refuse a sweep with ``settings`` where the run holds sweep rows of other settings."""
        stored = self.config().get("sweep")
        if stored is not None and _sweep_key(stored) != _sweep_key(settings) and self.read("sweep"):
            # A killed torchrun sweep leaves its rows in the rank files.
            held = [p.name for p in [self.merged("sweep"), *self.rank_files("sweep")] if p.exists()]
            raise InputError(
                f"{self.path} holds a sweep {_sweep_differences(stored, settings)} in "
                f"{', '.join(held)}; sweep again with those settings, or delete "
                f"{' and '.join(held)} to start a new one"
            )

    def update_config(self, **settings: object) -> None:
        """Add or replace settings in ``config.json`` (e.g. those of a later sweep)."""
        write_json(self.config_path, {**self.config(), **settings})

    def write_theory(self, summary: Mapping[str, object]) -> None:
        """Write the Theorem 2 checks to ``theory.json``."""
        write_json(self.theory, summary)

    def read_theory(self) -> dict | None:
        """The stored Theorem 2 checks, or ``None`` where the run has none."""
        if not self.theory.is_file():
            return None
        return _read_object(
            self.theory, "delete it and run the command that wrote it again", "Theorem 2's checks"
        )

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
        >>> import tempfile
        >>> run = RunDir.create(tempfile.mkdtemp() + "/new", {"command": "demo", "seed": 0})
        >>> run.config()["seed"], run.started()
        (0, False)
        """
        dist = dist or Dist()
        run = cls(path, dist.rank, dist.world_size)
        run.check(config, resume)
        dist.barrier()
        with run.held(dist):
            dist.first(lambda: run.write_config(config))
        return run

    # -- results

    def read(self, name: str = "results") -> list[Record]:
        """Every record of ``name``: the merged file and all ranks' files, deduplicated."""
        seen: dict[tuple, Record] = {}
        for f in self._files(name):
            for number, r in _numbered_lines(f):
                index = r.get("index") if isinstance(r, dict) else None
                # JSON's true is an int to Python, never an index.
                if not (isinstance(index, int) and not isinstance(index, bool) and "method" in r):
                    raise InputError(
                        f"{f}, line {number}, is not a betasmooth record; expected a JSON object "
                        "with index and method: remove that line, or start a new --out"
                    )
                seen.setdefault(record_key(r), r)
        return sorted(seen.values(), key=record_key)

    def _files(self, name: str) -> list[Path]:
        return [self.merged(name), *self.rank_files(name)]

    def rank_files(self, name: str = "results") -> list[Path]:
        """The files of ``name`` that ranks of a torchrun job write until it has finished."""
        found = self.path.glob(f"{name}-rank*.jsonl")
        return sorted(found, key=lambda f: (len(f.name), f.name))  # rank 2 before rank 10

    def append(self, records: Sequence[Record], name: str = "results") -> None:
        """Append finished records of this rank, durably."""
        append_jsonl(self.file(name), records)

    def merge(self, name: str = "results") -> list[Record]:
        """Merge every rank's records into ``name.jsonl``, sorted by (index, method).

        Called by rank 0 after the barrier that ends a run, and by a single
        process at the end, so both write the same file.
        """
        records = self.read(name)
        write_jsonl(self.merged(name), records)
        for f in self.rank_files(name):
            f.unlink()
        return records

    def arrays_file(self, method: str, first: int, name: str = "results") -> Path:
        """The arrays file of the batch of ``method`` from index ``first``.

        ``arrays/<method>-<first>.npz`` for results, ``arrays/<name>-<method>-<first>.npz``
        for the records ``name`` (``sweep``, ``explain``); a ``:`` in the method's
        name is written ``~`` (``captum~Occlusion-0.npz``).

        Examples
        --------
        >>> RunDir("run").arrays_file("lrp", 16, "sweep").as_posix()
        'run/arrays/sweep-lrp-16.npz'
        """
        return self.arrays / f"{_arrays_prefix(name)}{_in_file_name(method)}-{first}.npz"

    def batch_files(self, name: str = "results") -> dict[str, dict[int, Path]]:
        """The arrays files of the records ``name``: ``{method: {first index: path}}``."""
        prefix = _arrays_prefix(name)
        found: dict[str, dict[int, Path]] = {}
        for f in sorted(self.arrays.glob(f"{prefix}*.npz")) if self.arrays.is_dir() else []:
            stem, _, first = f.stem[len(prefix) :].rpartition("-")
            method = _from_file_name(stem)
            # Method names have no "-"; a longer head is another kind's file (sweep-lrp-0).
            if method and "-" not in method and first.isdigit():
                found.setdefault(method, {})[int(first)] = f
        return {m: dict(sorted(files.items())) for m, files in sorted(found.items())}

    def save_arrays(
        self,
        method: str,
        first: int,
        arrays: Batch | Arrays,
        name: str = "results",
        indices: Sequence[int] = (),
    ) -> Path:
        """Write a batch's arrays, atomically, to :meth:`arrays_file`.

        Files of the same kind whose first index is another of this batch's
        ``indices`` are removed first (the halves of a batch that is computed
        again whole): each item stays in one file.
        """
        # Halves first: a kill in between leaves items without arrays, which a
        # resumed run computes again (never an item in two files).
        for other in indices:
            if other != first:
                self.arrays_file(method, other, name).unlink(missing_ok=True)
        path = self.arrays_file(method, first, name)
        write_npz(path, arrays.to_npz() if isinstance(arrays, Batch) else arrays)
        return path

    def covered(self, name: str = "results") -> set[tuple[int, str]]:
        """The (index, method) pairs that a sound arrays file of ``name`` holds.

        A file is sound when it loads whole (every array, so that its
        checksums are read), has an integer ``index`` and no per-item array of
        another length. Files that are not sound are deleted.
        """
        found: set[tuple[int, str]] = set()
        for method, files in self.batch_files(name).items():
            for f in files.values():
                index = _sound_index(f)
                if index is None:
                    f.unlink(missing_ok=True)
                    continue
                found.update((int(i), method) for i in index)
        return found

    def repair(self, name: str = "results", say: Callable[[str], None] = print) -> int:
        """Forget the records of ``name`` whose arrays file is missing or corrupt.

        They are then computed again by a resumed run. Returns how many
        (index, method) pairs were forgotten.
        """
        records = self.read(name)
        covered = self.covered(name)
        lost = {(int(r["index"]), str(r["method"])) for r in records} - covered
        if not lost:
            return 0
        for f in self._files(name):
            if f.exists():
                kept = [r for r in read_jsonl(f) if (r["index"], r["method"]) not in lost]
                write_jsonl(f, kept)
        methods = ", ".join(sorted({m for _, m in lost}))
        say(
            f"betasmooth: {len(lost)} finished items of {methods} have a missing or corrupt "
            f"arrays file in {self.arrays}; computing them again"
        )
        return len(lost)

    def check_attacked(self) -> dict[str, object]:
        """The config of a finished attack, or one line saying why a sweep cannot use the run.

        Raises
        ------
        InputError
            The directory is not a run, is a run of another command, or its
            attack has not finished every (index, method).
        """
        config = self.config()
        command = config.get("command")
        if command not in ("attack", "demo"):
            raise InputError(
                f"{self.path} holds the output of betasmooth {command}; a sweep needs the --out "
                "of betasmooth attack (or demo)"
            )
        for key, kind in (("model", str), ("data", str), ("seed", int), ("n", int)):
            value = config.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise InputError(
                    f"{self.config_path} has {key} = {value!r}; expected the {kind.__name__} "
                    "that betasmooth attack wrote there"
                )
        done = self.read()
        wanted = config["n"] * len(config.get("methods") or ())
        # Rank files remain until the last rank of a torchrun job has finished.
        ranks = bool(self.rank_files())
        if not done or len(done) < wanted or ranks:
            state = (
                f"unfinished ({len(done)} of {wanted or '?'} items)"
                if not done or len(done) < wanted
                else "finished, but its processes' results are not merged yet"
            )
            raise InputError(
                f"the attack in {self.path} is {state}; let it finish, or finish it with the "
                "same betasmooth attack command and --resume, then sweep"
            )
        files = self.batch_files()
        missing = sorted({str(r.get("method")) for r in done} - set(files))
        if missing:
            raise InputError(
                f"{self.path} has results but no arrays of {missing[0]} in {self.arrays}; "
                f"expected the files {missing[0]}-<first index>.npz that its attack wrote"
            )
        return config

    def load_arrays(self, method: str, name: str = "results") -> list[Arrays]:
        """Every batch's arrays of ``method`` in the records ``name``, by first index."""
        return [read_npz(f) for f in self.batch_files(name).get(method, {}).values()]

    def read_arrays(self, method: str, name: str = "results") -> Arrays:
        """The batches of ``method`` joined along the items, sorted by index.

        Arrays of one value per run (:data:`RUN_ARRAYS`) and scalars are kept once;
        batches that disagree on one of the former are refused. An array of one row
        per item that some batches lack (e.g. the maps of a defense that an earlier
        sweep did not run) is left out: it has no rows for their items.
        """
        parts: dict[str, list[np.ndarray]] = {}
        batches = 0
        for arrays in self.load_arrays(method, name):
            batches += 1
            for key, array in arrays.items():
                parts.setdefault(key, []).append(array)
        parts = {
            k: v for k, v in parts.items() if len(v) == batches or k in RUN_ARRAYS or not v[0].ndim
        }
        for key in RUN_ARRAYS & parts.keys():
            other = next((a for a in parts[key] if not np.array_equal(a, parts[key][0])), None)
            if other is not None:
                # Columns follow these values: joined, they would sit under the wrong ones.
                raise InputError(
                    f"the {name} arrays of {method} in {self.path} hold {key} "
                    f"{np.ravel(parts[key][0]).tolist()} in one batch and "
                    f"{np.ravel(other).tolist()} in another; expected the same {key} in "
                    "every batch (rerun into a new directory)"
                )
        out = {
            k: v[0] if v[0].ndim == 0 or k in RUN_ARRAYS else np.concatenate(v)
            for k, v in parts.items()
        }
        if "index" in out:
            order = np.argsort(out["index"], kind="stable")
            n = len(order)
            out = {k: v[order] if v.ndim and len(v) == n and k not in RUN_ARRAYS else v
                   for k, v in out.items()}  # fmt: skip
        return out


@dataclasses.dataclass
class Batch:
    """The arrays of one batch, as its arrays file holds them: one row per item.

    Subclasses name the arrays of each kind of run; :meth:`to_npz` and
    :meth:`from_npz` are the only places where those names become file keys.
    """

    index: np.ndarray

    def to_npz(self) -> Arrays:
        """The arrays by name, leaving out those that are ``None``."""
        return {
            f.name: np.asarray(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    @classmethod
    def from_npz(cls, arrays: Mapping[str, np.ndarray], source: object = "arrays") -> Batch:
        """The batch held by ``arrays``; one line naming what is missing otherwise.

        Examples
        --------
        >>> b = ExplainBatch(np.arange(2), np.zeros((2, 1, 4, 4)), np.zeros((2, 4, 4)))
        >>> ExplainBatch.from_npz(b.to_npz()).map.shape
        (2, 4, 4)
        """
        fields = dataclasses.fields(cls)
        missing = [
            f.name for f in fields if f.default is dataclasses.MISSING and f.name not in arrays
        ]
        if missing:
            raise InputError(
                f"{source} lacks {', '.join(missing)}; expected the arrays of a betasmooth "
                f"{cls.__name__}"
            )
        return cls(**{f.name: arrays[f.name] for f in fields if f.name in arrays})


@dataclasses.dataclass
class AttackBatch(Batch):
    """An attacked batch: inputs, maps and labels before and after the attack.

    Examples
    --------
    >>> z, maps = np.zeros((2, 1, 4, 4)), np.full((2, 4, 4), 1 / 16)
    >>> b = AttackBatch(np.arange(2), z, z, maps, maps, maps, np.zeros(2), np.zeros(2))
    >>> AttackBatch.from_npz(b.to_npz()).x_adv.shape
    (2, 1, 4, 4)
    """

    x: np.ndarray
    x_adv: np.ndarray
    map_orig: np.ndarray
    map_adv: np.ndarray
    map_target: np.ndarray
    label: np.ndarray
    label_adv: np.ndarray
    target_index: np.ndarray | None = None
    attr_orig: np.ndarray | None = None
    attr_adv: np.ndarray | None = None


@dataclasses.dataclass
class ExplainBatch(Batch):
    """An explained batch: inputs, maps and, if kept, the signed attributions.

    Examples
    --------
    >>> b = ExplainBatch(np.arange(3, 5), np.zeros((2, 1, 4, 4)), np.full((2, 4, 4), 1 / 16))
    >>> sorted(b.to_npz())  # the attributions were not kept
    ['index', 'map', 'x']
    """

    x: np.ndarray
    map: np.ndarray
    attribution: np.ndarray | None = None


@dataclasses.dataclass
class SweepBatch(Batch):
    """The defended maps of the attacked images, ``(B, len(betas), H, W)`` per defense.

    ``maps`` holds them by the defense's name (:data:`~betasmooth.defense.DEFENSES`);
    the file keys are ``maps_<defense>``, ``maps_beta`` for ``beta_smooth``.

    Examples
    --------
    >>> b = SweepBatch(np.arange(2), np.array([1.0, 10.0]), {"beta_smooth": np.zeros((2, 2, 4, 4))})
    >>> sorted(b.to_npz())  # beta-smoothing swept alone
    ['betas', 'index', 'maps_beta']
    >>> sorted(SweepBatch.from_npz(b.to_npz() | {"maps_median": np.ones((2, 2, 4, 4))}).maps)
    ['beta_smooth', 'median']
    """

    betas: np.ndarray
    maps: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.maps, Mapping):
            raise InputError(
                f"SweepBatch's maps must be a dict of defense name to maps (B, len(betas), H, W); "
                f"got {type(self.maps).__name__}"
            )

    @property
    def maps_beta(self) -> np.ndarray | None:
        """Beta-smoothing's maps (``maps["beta_smooth"]``), ``None`` where not swept."""
        return self.maps.get("beta_smooth")

    @property
    def maps_smoothgrad(self) -> np.ndarray | None:
        """SmoothGrad's maps (``maps["smoothgrad"]``), ``None`` where not swept."""
        return self.maps.get("smoothgrad")

    def to_npz(self) -> Arrays:
        """The arrays by name, each defense's maps as ``maps_<defense>``."""
        own = {"index": np.asarray(self.index), "betas": np.asarray(self.betas)}
        return own | {_maps_key(d): np.asarray(m) for d, m in self.maps.items()}

    @classmethod
    def from_npz(cls, arrays: Mapping[str, np.ndarray], source: object = "arrays") -> SweepBatch:
        """The sweep batch held by ``arrays``; one line naming what is missing otherwise."""
        missing = [k for k in ("index", "betas") if k not in arrays]
        if missing:
            raise InputError(
                f"{source} lacks {', '.join(missing)}; expected the arrays of a betasmooth "
                f"{cls.__name__}"
            )
        maps = {_defense_of(k): v for k, v in arrays.items() if k.startswith(MAPS_PREFIX)}
        return cls(arrays["index"], arrays["betas"], maps)


#: The prefix of a defense's maps in a sweep's arrays file.
MAPS_PREFIX = "maps_"


def _maps_key(defense: str) -> str:
    # Beta-smoothing's maps have been maps_beta since the first version: kept.
    return MAPS_PREFIX + ("beta" if defense == "beta_smooth" else defense)


def _defense_of(key: str) -> str:
    return "beta_smooth" if key == _maps_key("beta_smooth") else key.removeprefix(MAPS_PREFIX)


def _in_file_name(method: str) -> str:
    # Windows allows no ":" in a file name (captum:NAME); "~" is in no method's name.
    return method.replace(":", "~")


def _from_file_name(stem: str) -> str:
    # Runs before 0.7.0 wrote the ":" itself: both read back.
    return stem.replace("~", ":")


def _arrays_prefix(name: str) -> str:
    return "" if name == "results" else f"{name}-"


#: The temporary file of an atomic write of NAME, as :func:`tempfile.mkstemp` names it
#: (``.NAME.`` + 8 random characters + the suffix): another hidden file is not ours.
_TEMPORARY = re.compile(r"\.[^/]+\.[a-z0-9_]{8}\.(tmp|npz)")


def _temporary(path: Path) -> bool:
    """A temporary file of a write that a kill interrupted (see :func:`write_npz`)."""
    return _TEMPORARY.fullmatch(path.name) is not None


def _written_here(config: Path) -> bool:
    """Whether ``config`` is a run's ``config.json``: every version has named itself there.

    One that does not parse beside a run's ``arrays/`` is taken for that run's,
    damaged (betasmooth writes it whole, by a rename), which :meth:`RunDir.check_out`
    refuses with its line.
    """
    try:
        stored = json.loads(config.read_bytes())
    except OSError:
        return False
    except ValueError:
        return (config.parent / "arrays").is_dir()
    versions = stored.get("versions") if isinstance(stored, dict) else None
    return isinstance(versions, dict) and "betasmooth" in versions


#: Arrays that hold one value per run, not one per item.
RUN_ARRAYS = frozenset({"betas"})


def _sound_index(path: Path) -> np.ndarray | None:
    """The ``index`` array of a batch's arrays file, or ``None`` if the file is not sound."""
    try:
        arrays = read_npz(path)
    except Exception:
        return None
    index = arrays.get("index")
    if index is None or index.ndim != 1 or index.dtype.kind not in "iu":
        return None
    lengths = {len(v) for k, v in arrays.items() if v.ndim and k not in RUN_ARRAYS}
    return index if lengths == {len(index)} else None


def _sweep_key(settings: object) -> object:
    # What the sweep's rows depend on. The betas as a set: --betas 10,1 is the
    # sweep --betas 1,10; min_fidelity picks the summary's beta, not the rows.
    if isinstance(settings, dict) and isinstance(settings.get("betas"), list):
        rows = {k: v for k, v in settings.items() if k != "min_fidelity"}
        return {**rows, "betas": sorted(set(settings["betas"]), key=float)}
    return settings


def _sweep_differences(stored: object, settings: object) -> str:
    """How a held sweep's settings differ from those asked for, for the refusal.

    Examples
    --------
    >>> _sweep_differences({"betas": [1.0, 5.0], "smoothgrad_n": 2},
    ...                    {"betas": [5.0, 1.0], "smoothgrad_n": 3})
    'whose smoothgrad_n is 2 (3 now)'
    >>> _sweep_differences({"betas": [3.14159265]}, {"betas": [3.1415926]})
    'whose betas is 3.14159265 (3.1415926 now)'
    """
    held, now = _sweep_key(stored), _sweep_key(settings)
    if not (isinstance(held, dict) and isinstance(now, dict)):
        return f"with {held}"

    def shown(key: str, value: object) -> str:
        if value is None and key == "defenses":  # recorded only where not the paper's two
            value = list(PAPER_DEFENSES)
        if isinstance(value, list):
            return ",".join(beta_key(v) if isinstance(v, float) else str(v) for v in value)
        return "not set" if value is None else str(value)

    keys = [k for k in dict.fromkeys([*held, *now]) if held.get(k) != now.get(k)]
    parts = [f"{k} is {shown(k, held.get(k))} ({shown(k, now.get(k))} now)" for k in keys]
    return "whose " + ", ".join(parts)


def check_batch_file(path: Path, first: int, index: np.ndarray | None) -> list[int]:
    """The items of a batch's arrays file, checked against its name ``<method>-<first>.npz``.

    Raises
    ------
    InputError
        When the file holds no items or items from another first index: it was altered.

    Examples
    --------
    >>> check_batch_file(Path("gradient-4.npz"), 4, np.array([4, 5]))
    [4, 5]
    >>> check_batch_file(Path("gradient-4.npz"), 4, np.array([0, 1]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: gradient-4.npz holds items [0, 1]..., not from 4 ...
    """
    items = [] if index is None else np.asarray(index).ravel().tolist()
    if not items or int(items[0]) != first:
        raise InputError(
            f"{path} holds items {items[:3]}..., not from {first} as its name says; "
            "expected the arrays its attack wrote"
        )
    return [int(i) for i in items]


def record_key(record: Record) -> tuple:
    """What tells a record apart: (index, method) and, for sweep rows, defense and beta.

    Examples
    --------
    >>> record_key({"index": 2, "method": "lrp", "defense": "smoothgrad", "beta": 1.0})
    (2, 'lrp', 'smoothgrad', '1.0')
    """
    return (int(record["index"]), str(record["method"]), *_extra_key(record))


def _extra_key(record: Record) -> tuple:
    # Sweep and curvature records hold several rows per (index, method), one per beta
    # and defense; they are told apart by those fields.
    return tuple(str(record.get(k)) for k in ("defense", "beta") if k in record)


def _with_both_statistics(config: dict[str, object]) -> dict[str, object]:
    """``config`` with a normalisation mean and std both given or neither: up to 0.9.0
    one could be given alone (the other was then 0 or 1), which is now refused, so
    such a run is read, swept and resumed (with ``--mean 0`` or ``--std 1``) as that."""
    if "mean" in config and "std" in config and (config["mean"] is None) != (config["std"] is None):
        config["mean" if config["mean"] is None else "std"] = [
            0.0 if config["mean"] is None else 1.0
        ]
    return config
