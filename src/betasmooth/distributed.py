"""torchrun: joining the job, the device of each rank, and barriers.

Under ``torchrun`` every rank joins one process group (gloo on CPU, nccl
with one GPU per rank); :class:`Dist` tells a rank where it stands, and a
single process is rank 0 of 1, so the same code serves both.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from .validate import InputError, is_oom, resolve_device

T = TypeVar("T")

__all__ = [
    "Dist",
    "RankLost",
    "device_argument",
    "distributed",
    "init_distributed",
    "launched",
    "rank_device",
    "resolve_device",
    "shutdown_distributed",
]


class RankLost(RuntimeError):
    """Another rank of the torchrun job stopped while this one waited for it.

    That rank says why in its own line; this one names what it lost, so that
    every rank ends with one line instead of a collective's traceback.

    Examples
    --------
    >>> err = RuntimeError("[pair.cc:561] Connection closed by peer. Check the logs.")
    >>> print(RankLost(0, err))  # doctest: +NORMALIZE_WHITESPACE
    rank 0 lost another rank of the torchrun job (Connection closed by peer); the rank that
    stopped first says why
    """

    def __init__(self, rank: int, err: BaseException) -> None:
        # gloo and nccl start with the C++ source line and add advice: the first sentence
        # after them is what happened.
        said = re.sub(r"^\s*\[[^\]]*\]\s*", "", str(err)).split(". ")[0].strip().rstrip(".")
        super().__init__(
            f"rank {rank} lost another rank of the torchrun job ({said or type(err).__name__}); "
            "the rank that stopped first says why"
        )


@contextlib.contextmanager
def _collective(rank: int) -> Iterator[None]:
    """Turn the failure of a collective (a rank gone, a timeout) into :class:`RankLost`."""
    try:
        yield
    except RuntimeError as err:
        if is_oom(err):  # this rank's own failure, said as such
            raise
        raise RankLost(rank, err) from err


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
            with _collective(self.rank):
                torch.distributed.barrier()

    def broadcast(self, value: object) -> object:
        """Rank 0's JSON-ready ``value`` on every rank, as JSON gives it back (tuples become
        lists), rank 0 included, so that all ranks hold the same; every rank must call it.

        Other ranks may pass anything (``None``). JSON, not pickle: nothing a rank
        receives is unpickled.

        Examples
        --------
        >>> Dist().broadcast({"beta": 10.0, "betas": (1.0, 10.0)})
        {'beta': 10.0, 'betas': [1.0, 10.0]}
        """
        if not self.active:
            return json.loads(json.dumps(value))
        with _collective(self.rank):
            return self._broadcast(value)

    def _broadcast(self, value: object) -> object:
        nccl = torch.distributed.get_backend() == "nccl"
        device = torch.device("cuda", self.local_rank) if nccl else torch.device("cpu")
        data = json.dumps(value).encode() if self.rank == 0 else b""
        size = torch.tensor([len(data)], device=device)
        torch.distributed.broadcast(size, src=0)
        buffer = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
        if self.rank == 0:
            buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        torch.distributed.broadcast(buffer, src=0)
        return json.loads(bytes(buffer.cpu().numpy()))

    def first(self, work: Callable[[], T]) -> T | None:
        """Run ``work`` on rank 0 alone while the other ranks wait, and return what it
        returns there (``None`` on other ranks); every rank must call it.

        When ``work`` fails on what it was given (an ``InputError``, or an
        ``OSError`` such as a read-only folder), every rank raises that error's
        message, so that each ends with one line instead of waiting for a rank
        that is gone. In one process this is ``work()``.

        Examples
        --------
        >>> Dist().first(lambda: 42)
        42
        """
        if not self.active:
            return work() if self.rank == 0 else None
        value, failure = None, None
        if self.rank == 0:
            try:
                value = work()
            except (InputError, OSError) as err:
                failure = err
        said = self.broadcast(None if failure is None else _said(failure))
        if failure is not None:
            raise failure
        if said is not None:
            kind, *args = said
            raise InputError(*args) if kind == "input" else OSError(*args)
        return value

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank; every rank must call it (one process: ``flag``)."""
        if not self.active:
            return bool(flag)
        nccl = torch.distributed.get_backend() == "nccl"
        device = torch.device("cuda", self.local_rank) if nccl else torch.device("cpu")
        value = torch.tensor([int(bool(flag))], device=device)
        with _collective(self.rank):
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())


def _said(err: Exception) -> list[object]:
    """What another rank needs to raise ``err`` as this one does: an ``OSError`` keeps its
    number, reason and file, which the one-line message names."""
    if isinstance(err, InputError):
        return ["input", str(err)]
    if isinstance(err, OSError) and err.errno is not None:
        named = [] if err.filename is None else [str(err.filename)]
        return ["os", err.errno, err.strerror, *named]
    return ["os", str(err)]


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK).

    Examples
    --------
    >>> import os
    >>> launched() == ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
    True
    """
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def device_argument(name: str) -> str:
    """``type=`` of an argparse ``--device`` option: the name when :func:`resolve_device`
    takes it, else argparse's one-line usage error with the reason.

    Examples
    --------
    >>> parser = argparse.ArgumentParser()
    >>> parser.add_argument("--device", type=device_argument, default="cpu").dest
    'device'
    >>> parser.parse_args(["--device", "cpu"]).device
    'cpu'
    """
    try:
        return str(resolve_device(name))
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def rank_device(device: torch.device) -> torch.device:
    """The device this process computes on: ``cuda:LOCAL_RANK`` for a CUDA torchrun job,
    else ``device``; known before the job's processes join.

    Raises
    ------
    InputError
        For a CUDA job with more ranks on this machine than it has GPUs.

    Examples
    --------
    >>> rank_device(torch.device("cpu"))
    device(type='cpu')
    """
    if device.type != "cuda" or not launched() or int(os.environ["WORLD_SIZE"]) <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    count = torch.cuda.device_count()
    # torchrun says how many ranks run on this machine: where it does, every one of them
    # refuses alike, not only those past the last GPU (whose torch.cuda.set_device would
    # fail with a bare "invalid device ordinal").
    last = max(int(os.environ.get("LOCAL_WORLD_SIZE", 0)) - 1, local)
    if last >= count:
        raise InputError(
            f"--device cuda under torchrun takes one GPU per rank, but local rank {last} "
            f"has none of this machine's {count} CUDA device(s); expected --nproc-per-node "
            f"{count} or fewer"
        )
    return torch.device("cuda", local)


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
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch.distributed.is_initialized():
        # torch.distributed.nn.functional binds the WORLD group as the default argument of
        # its collectives when it is first imported. Imported once the group exists (torch
        # imports torch._dynamo, and with it that module, on the first torch.optim
        # optimizer), it holds the group past destroy_process_group: gloo's threads live on
        # into the interpreter's finalization, where they can abort the process ("terminate
        # called without an active exception"). Imported first, it binds None.
        importlib.import_module("torch.distributed.nn.functional")

        kwargs = {"device_id": device} if backend == "nccl" else {}
        torch.distributed.init_process_group(backend, **kwargs)
    return Dist(rank, world, local, active=True), device


def shutdown_distributed(dist: Dist) -> None:
    """Leave the torchrun job.

    Examples
    --------
    >>> dist, _ = init_distributed(torch.device("cpu"))  # outside torchrun: nothing to leave
    >>> shutdown_distributed(dist)
    """
    if dist.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[tuple[Dist, torch.device]]:
    """Context manager around :func:`init_distributed` and :func:`shutdown_distributed`.

    Examples
    --------
    >>> with distributed(torch.device("cpu")) as (dist, device):  # outside torchrun
    ...     dist.world_size, dist.active, device.type
    (1, False, 'cpu')
    """
    dist, dev = init_distributed(device)
    try:
        yield dist, dev
    finally:
        shutdown_distributed(dist)
