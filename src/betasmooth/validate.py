"""Checks of user input that end in one clear line.

Every problem with what a user passed in raises :class:`InputError` (a
``ValueError``) or :class:`InputTypeError` (also a ``TypeError``); the
command line turns both into one line on stderr and exit status 2.

The module also holds what every other module needs when it meets a user:
the registries' mechanism (:func:`registrar`, which refuses a name that is
taken), warnings that point at the user's own call (:func:`warn_user`), and
:func:`evaluating`, the evaluation mode that every map is computed in.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import numbers
import re
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import ParamSpec, TypeVar

import numpy as np
import torch
from torch import nn

__all__ = [
    "EXPECTS",
    "InputError",
    "InputTypeError",
    "OutOfMemory",
    "UnnormalisedWarning",
    "as_bound",
    "check_batch",
    "check_bounds",
    "check_choice",
    "check_classes",
    "check_count",
    "check_in_range",
    "check_input",
    "check_instance",
    "check_logits",
    "check_map_batch",
    "check_positive",
    "check_seed",
    "check_target",
    "check_uncompiled",
    "compiled_parts",
    "expect_normalised",
    "given",
    "is_oom",
    "one_at_a_time",
    "registrar",
    "resolve_device",
    "silenced",
    "tell",
    "to_numpy",
    "warn_user",
]


class InputError(ValueError):
    """A problem with user input: the message names it and the expected form.

    A ``ValueError``; the command line prints its message as one line on
    stderr and exits with status 2.

    Examples
    --------
    >>> import betasmooth as bs
    >>> try:
    ...     bs.heatmap(torch.ones(2, 8, 8))
    ... except bs.InputError as error:
    ...     print(error)
    explanation must have at least 4 dimensions with the batch first, e.g. (B, C, H, W); \
got shape (2, 8, 8)
    """


class InputTypeError(InputError, TypeError):
    """User input of the wrong type: both an :class:`InputError` and a ``TypeError``.

    Examples
    --------
    >>> import betasmooth as bs
    >>> try:
    ...     bs.explain(torch.nn.Linear(4, 2), torch.ones(1, 4, dtype=torch.uint8), "gradient")
    ... except bs.InputTypeError as error:
    ...     print(error, isinstance(error, bs.InputError), isinstance(error, TypeError))
    x must be a floating tensor (float16 to float64); got dtype torch.uint8 True True
    """


class OutOfMemory(InputError):
    """Out of memory where no smaller batch helps: inputs too large for the machine.

    ``what`` says where and why; the message adds what to try: ``hint``
    where given (loading a model, which smaller inputs do not help), else
    smaller inputs, which the command line words for each command.

    Examples
    --------
    >>> str(OutOfMemory(RuntimeError("CUDA out of memory."), "with a batch of 1"))[:46]
    'out of memory with a batch of 1 (CUDA out of m'
    """

    def __init__(self, exc: BaseException, where: str = "", hint: str | None = None) -> None:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        self.what = " ".join(filter(None, ("out of memory", where, f"({reason})")))
        self.hint = hint
        super().__init__(
            f"{self.what}; "
            + (
                hint
                or "expected smaller inputs or, for integrated_gradients and smoothgrad, "
                "fewer points per pass (chunk=)"
            )
        )


#: What torch's allocators say: CUDA and MPS "out of memory", the CPU's
#: DefaultCPUAllocator "can't allocate memory".
_OOM_SAYS = ("out of memory", "can't allocate memory")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of torch (GPU or CPU) or of numpy.

    Examples
    --------
    >>> try:
    ...     torch.empty(2**62, dtype=torch.uint8)
    ... except RuntimeError as err:
    ...     is_oom(err)
    True
    """
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(exc, MemoryError) or (oom and isinstance(exc, oom)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _OOM_SAYS)


def check_batch(x: object, name: str = "x", min_dim: int = 2) -> torch.Tensor:
    """Check that ``x`` is a finite floating tensor batched over dim 0.

    Parameters
    ----------
    x : object
        The candidate input.
    name : str
        Name used in the error message.
    min_dim : int
        Least number of dimensions, the batch dimension included.

    Returns
    -------
    torch.Tensor
        ``x`` itself.

    Examples
    --------
    >>> check_batch(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 1, 8, 8])
    """
    example = "(B, H, W)" if min_dim == 3 else "(B, C, H, W)"
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(
            f"{name} must be a torch.Tensor batched over dim 0, e.g. shape {example}; "
            f"got {type(x).__name__}"
        )
    if not x.is_floating_point():
        raise InputTypeError(
            f"{name} must be a floating tensor (float16 to float64); got dtype {x.dtype}"
        )
    if x.dim() < min_dim:
        raise InputError(
            f"{name} must have at least {min_dim} dimensions with the batch first, "
            f"e.g. {example}; got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise InputError(f"{name} is an empty batch; expected at least one item in dim 0")
    if x.is_meta:
        raise InputError(
            f"{name} is on the meta device and holds no values; expected a tensor on the "
            "model's device (cpu or cuda)"
        )
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} contains NaN or inf; expected finite values")
    return x


def check_target(target: object, batch: int) -> torch.Tensor | None:
    """Normalise a target class to ``None`` or a ``(batch,)`` long tensor.

    Parameters
    ----------
    target : None, int, sequence of int, torch.Tensor or numpy.ndarray
        ``None`` (the predicted class), one class for the whole batch, or one
        per item (integers, e.g. ``np.int64`` labels, or a list as Captum takes).
    batch : int
        Batch size.

    Returns
    -------
    torch.Tensor or None
        Class indices of shape ``(batch,)``, not yet checked against the
        number of classes (see :func:`check_classes`).

    Examples
    --------
    >>> check_target(3, batch=2)
    tensor([3, 3])
    >>> check_target([0, 4], batch=2)
    tensor([0, 4])
    """
    if target is None:
        return None
    if isinstance(target, (list, tuple)) and all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in target
    ):
        target = torch.tensor([_class_index(t) for t in target], dtype=torch.long)
    if isinstance(target, np.ndarray) and target.dtype.kind in "iu":
        # Labels of a numpy pipeline (np.int64 scalars become ints below).
        target = torch.from_numpy(target)
    if isinstance(target, bool) or not isinstance(target, (numbers.Integral, torch.Tensor)):
        kind = type(target).__name__
        if isinstance(target, np.ndarray):
            kind += f" of dtype {target.dtype}"
        raise InputTypeError(
            f"target must be None, an int or a (B,) integer tensor, array or list; got {kind}"
        )
    if isinstance(target, numbers.Integral):
        target = torch.full((batch,), _class_index(target), dtype=torch.long)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise InputTypeError(f"target must hold integer class indices; got dtype {target.dtype}")
    if target.dim() == 0:
        target = target.expand(batch)
    if target.shape != (batch,):
        raise InputError(
            f"target must be an int or have shape ({batch},) to match the batch; "
            f"got shape {tuple(target.shape)}"
        )
    # As int64 first: torch compares no uint16, uint32 or uint64 tensor (numpy labels of them).
    unsigned = not target.dtype.is_signed
    target = target.long()
    if bool((target < 0).any()):
        if unsigned:  # a uint64 of 2**63 or more, wrapped round by the cast
            raise _out_of_range(target[target < 0].max().item() + 2**64)
        raise _negative(target.min().item())
    return target


def _class_index(value: numbers.Integral) -> int:
    """``value`` as an int that int64 holds; one line naming it otherwise."""
    value = int(value)
    if value < 0:
        raise _negative(value)
    if value >= 2**63:
        raise _out_of_range(value)
    return value


def _negative(value: int) -> InputError:
    return InputError(f"target class must be >= 0; got {value}")


def _out_of_range(value: int) -> InputError:
    return InputError(
        f"target class {value} is out of range; expected a class index below the model's "
        "number of outputs"
    )


def check_classes(target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Check that every class index is a class of the model: from 0 to its outputs - 1.

    Examples
    --------
    >>> check_classes(torch.tensor([3, 9]), 10)
    tensor([3, 9])
    """
    if bool((target < 0).any()):
        # Else torch's gather says it with a RuntimeError of its own, or an index wraps.
        raise _negative(target.min().item())
    if bool((target >= n_classes).any()):
        raise InputError(
            f"target class {target.max().item()} is out of range; "
            f"the model has {n_classes} outputs (classes 0 to {n_classes - 1})"
        )
    return target


#: Largest count an option takes: beyond it torch and tqdm overflow, and no run would end.
MAX_COUNT = 2**31 - 1


def check_count(name: str, value: object, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """Check that the option ``name`` is an integer ``>= minimum`` (and at most ``maximum``).

    Examples
    --------
    >>> check_count("steps", 32, 2)
    32
    >>> check_count("steps", 1, 2)
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: steps must be an integer >= 2; got 1
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name} must be an integer >= {minimum}; got {given(name, value)}")
    if value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}; got {value}")
    if value > maximum:
        raise InputError(f"{name} must be an integer from {minimum} to {maximum}; got {value}")
    return int(value)


#: Largest seed that ``torch.Generator.manual_seed`` takes.
MAX_SEED = 2**64 - 1


def check_seed(name: str, value: object, maximum: int = MAX_SEED) -> int:
    """Check that the option ``name`` is an integer seed in ``[0, maximum]``.

    ``torch.Generator.manual_seed`` refuses floats and overflows above ``2**64 - 1``.

    Examples
    --------
    >>> check_seed("seed", 7)
    7
    >>> check_seed("seed", 2**70)
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: seed must be an integer from 0 to 18446744073709551615; \
got 1180591620717411303424
    """
    return check_count(name, value, 0, maximum)


def item_seeds(seed: object, batch: int, name: str = "seed") -> list[int]:
    """One seed per item of a batch: from one seed, or checked when given per item.

    An int seeds a generator that draws the items' seeds, so that item ``i``
    gets the same seed in any batch of at least ``i + 1`` items; a sequence
    (or 1-D integer tensor) gives each item its own.

    Examples
    --------
    >>> item_seeds([3, 4], 2)
    [3, 4]
    >>> item_seeds(0, 3)[:2] == item_seeds(0, 2)
    True
    """
    integers = (isinstance(seed, torch.Tensor) and not seed.is_floating_point()) or (
        isinstance(seed, np.ndarray) and seed.dtype.kind in "iu"
    )
    if integers and seed.ndim == 1:
        seed = seed.tolist()
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        generator = torch.Generator().manual_seed(check_seed(name, int(seed)))
        return torch.randint(0, 2**62, (batch,), generator=generator).tolist()
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        raise InputTypeError(
            f"{name} must be an int or one int per item of x ({batch}); "
            f"got {type(seed).__name__} {seed!r}"
        )
    if len(seed) != batch:
        raise InputError(
            f"{name} must be an int or one int per item of x ({batch}); got {len(seed)}: {seed!r}"
        )
    return [check_seed(name, s) for s in seed]


def check_choice(name: str, value: object, choices: Collection[str]) -> str:
    """Check that the option ``name`` is one of ``choices`` (names).

    Examples
    --------
    >>> check_choice("noise", "gaussian", {"gaussian", "logistic"})
    'gaussian'
    """
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"unknown {name} {value!r}; expected one of: {', '.join(sorted(choices))}")
    return value


def check_positive(name: str, value: object, optional: bool = False) -> float | None:
    """Check that the option ``name`` is a positive finite number (or ``None`` if ``optional``).

    Examples
    --------
    >>> check_positive("sigma", 0.15)
    0.15
    >>> check_positive("sigma", 0.0)
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: sigma must be a positive finite number; got 0.0
    """
    if optional and value is None:
        return None
    if not is_number(value):
        raise InputTypeError(f"{name} must be a positive number; got {given(name, value)}")
    if not (value > 0 and math.isfinite(value)):
        raise InputError(f"{name} must be a positive finite number; got {value!r}")
    return float(value)


def given(name: str, value: object) -> str:
    """``value`` as an error that expects a number shows it: a one-element tensor or array
    with the call that gives its number.

    Examples
    --------
    >>> given("beta", torch.tensor(2.0))
    'tensor(2.), a one-element tensor; pass its number, beta.item()'
    >>> given("beta", "2")
    "'2'"
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return f"{value!r}, a one-element tensor; pass its number, {name}.item()"
    if isinstance(value, np.ndarray) and value.size == 1:
        return f"{value!r}, a one-element array; pass its number, {name}.item()"
    return repr(value)


def is_number(value: object) -> bool:
    """A real number that is not a bool (``True`` is an int to Python, never to an option).

    Examples
    --------
    >>> is_number(0.5), is_number(True), is_number("1")
    (True, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_instance(name: str, value: object, kinds: type | tuple[type, ...], expected: str) -> None:
    """Check that the option ``name`` is an instance of ``kinds`` (``bool`` never counts as int).

    Examples
    --------
    >>> check_instance("weights", 123, (str, Path), "a path to a state dict file")
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputTypeError: weights must be a path to a state dict file; got int 123
    """
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise InputTypeError(f"{name} must be {expected}; got {type(value).__name__} {value!r}")


def check_form(what: str, fn: object, positional: int, keywords: Sequence[str], form: str) -> None:
    """Check that ``fn`` is callable with ``positional`` arguments and the ``keywords``.

    A plugin of another form would fail at its first use, deep inside a run.

    Examples
    --------
    >>> try:
    ...     check_form("m", lambda a: a, 2, [], "f(a, b)")
    ... except InputTypeError as err:
    ...     print(err)
    m cannot be called as f(a, b) (too many positional arguments); expected that form
    """
    if not callable(fn):
        raise InputTypeError(f"{what} must be callable; got {type(fn).__name__}")
    with contextlib.suppress(TypeError):  # an object that takes no weak reference
        if form in _FORM_CHECKED.get(fn, ()):
            return
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: only a call can tell
    try:
        # Partial: a parameter the form leaves out may come as an option.
        signature.bind_partial(*(None,) * positional, **dict.fromkeys(keywords))
    except TypeError as err:
        raise InputTypeError(
            f"{what} cannot be called as {form} ({err}); expected that form"
        ) from None
    with contextlib.suppress(TypeError):
        _FORM_CHECKED.setdefault(fn, set()).add(form)


# The forms each callable has passed check_form in: a method is looked up at every call.
_FORM_CHECKED: weakref.WeakKeyDictionary[object, set[str]] = weakref.WeakKeyDictionary()


def check_module(model: object) -> nn.Module:
    """Check that ``model`` is a ``torch.nn.Module``.

    Examples
    --------
    >>> check_module(None)
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputTypeError: model must be a torch.nn.Module; got NoneType None
    """
    check_instance("model", model, nn.Module, "a torch.nn.Module")
    return model


def resolve_device(device: str | torch.device | None, option: str = "--device") -> torch.device:
    """The torch device named on the command line; ``None`` picks CPU.

    ``option`` is how the caller names the setting: a command-line option
    (``--device cuda``) or a keyword of a Python function (``device='cuda'``).

    Raises
    ------
    InputError
        For an unknown device name, or CUDA where there is no GPU.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    name = str(device or "cpu")
    flag = option.startswith("--")
    given = f"{option} {name}" if flag else f"{option}={name!r}"
    cpu = f"{option} cpu" if flag else f"{option}='cpu'"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"CUDA is not available on this machine ({given}); use {cpu}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"{given}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device {name!r}; expected cpu or cuda")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"MPS is not available on this machine ({given}); use {cpu}")
    return dev


def tell(text: str) -> None:
    """Write a line to stderr in one write, so that the lines of torchrun's ranks stay whole.

    ``print`` writes the text and its newline in two calls, which another
    rank's line can come between.
    """
    stream = sys.stderr or sys.stdout  # None under pythonw, as print falls back
    if stream is not None:
        stream.write(f"{text}\n")
        stream.flush()


def compiled_parts(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """The parts of ``model`` that ``torch.compile`` runs as graphs.

    Yields
    ------
    tuple of (str, nn.Module, str)
        Where the part is (``model.path``), the module its graph runs, and the
        uncompiled form to name in an error: a wrapper made by ``torch.compile(m)``
        holds ``m`` as ``_orig_mod``; ``m.compile()`` (``nn.Module.compile``)
        compiles ``m`` in place.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    >>> list(compiled_parts(net))
    []
    """
    for path, module in model.named_modules():
        where = "model" if not path else f"model.{path}"
        # torch._dynamo's OptimizedModule, named so that torch._dynamo need not load.
        inner = getattr(module, "_orig_mod", None)
        if type(module).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
            yield where, inner, f"{where}._orig_mod (the same weights)"
        elif getattr(module, "_compiled_call_impl", None) is not None:
            yield (
                where,
                module,
                (
                    f"{where} not compiled in place by nn.Module.compile "
                    "(torch.compile(m) keeps m itself as ._orig_mod)"
                ),
            )


def check_uncompiled(model: nn.Module, need: str) -> None:
    """Refuse a model made (in whole or in part) by ``torch.compile`` where ``need`` cannot use it.

    Its graphs cannot be differentiated a second time (a map under
    ``create_graph``, an attack, a curvature) or traced for LRP. The message
    names the uncompiled form: the compiled module's own ``_orig_mod``, which
    holds the same weights, or the module without ``nn.Module.compile``.

    Examples
    --------
    >>> check_uncompiled(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "the attack")
    """
    check_module(model)
    for _, _, original in compiled_parts(model):
        raise InputError(
            f"{need} does not work through a graph made by torch.compile; expected the "
            f"module itself, {original}"
        )


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` detached, on the CPU, as a numpy array; bfloat16, which numpy lacks, is
    widened to float32 (exactly).

    Examples
    --------
    >>> to_numpy(torch.tensor([0.5, 1.5], dtype=torch.bfloat16)).dtype
    dtype('float32')
    """
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


_HELD: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_HELD_LOCK = threading.Lock()

#: Seconds a call waits for its turn on a model before it says that it waits.
WAIT_NOTICE = 30.0

P = ParamSpec("P")
R = TypeVar("R")


def one_at_a_time(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn(model, ...)`` while no other thread runs such a call on the same ``model``.

    Explaining, attacking and smoothing change the model while they run (ReLU
    overrides in its hooks, LRP's recording forward, evaluation mode), so two
    such calls on one model object from two threads would mix their states:
    they take turns instead. A call inside another on the same thread (the
    attack explains) goes on. A plain ``model(x)`` from another thread is not
    held back and sees those changes while they last.

    Examples
    --------
    >>> @one_at_a_time
    ... def forward(model, x):
    ...     return model(x)
    >>> forward(nn.Identity(), 3)
    3
    """

    @functools.wraps(fn)
    def held(*args: P.args, **kwargs: P.kwargs) -> R:
        model = args[0] if args else kwargs.get("model")
        if not isinstance(model, nn.Module):
            return fn(*args, **kwargs)
        with _HELD_LOCK:
            lock = _HELD.setdefault(model, threading.RLock())
        if not lock.acquire(timeout=WAIT_NOTICE):
            # A long wait is another call's turn, or a call that waits for its own
            # workers, which would wait for ever: said once, then waited for.
            warn_user(
                f"waiting for another thread's betasmooth call on this {type(model).__name__} "
                "to end (calls on one model take turns); a method that calls betasmooth on "
                "the same model from worker threads of its own waits for itself: give the "
                "workers copy.deepcopy(model)",
                model,
            )
            lock.acquire()
        try:
            return fn(*args, **kwargs)
        finally:
            lock.release()

    return held


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in evaluation mode for the block, and restore every module's mode afterwards.

    Each submodule gets its own mode back: a model in training with frozen
    BatchNorm layers (in evaluation mode) keeps them frozen.

    Examples
    --------
    >>> net = nn.Sequential(nn.Dropout(), nn.BatchNorm1d(2)).train()
    >>> _ = net[1].eval()
    >>> with evaluating(net):
    ...     net.training, net[1].training
    (False, False)
    >>> net.training, net[0].training, net[1].training
    (True, True, False)
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        # Parents first (modules() is pre-order), so that each module's own
        # train() runs last for it: a train() that keeps other state in step does so.
        for module, training in modes:
            module.train(training)


def check_in_range(
    x: torch.Tensor,
    low: float | torch.Tensor,
    high: float | torch.Tensor,
    name: str = "x",
    tolerance: float = 1e-4,
) -> torch.Tensor:
    """Check that every value of ``x`` lies in ``[low, high]``.

    ``low`` and ``high`` are numbers or tensors that broadcast against ``x``,
    e.g. per-channel bounds of shape ``(1, C, 1, 1)``. Values outside by less
    than ``tolerance`` times the width of the range are accepted, so that
    rounding in a normalisation does not count.

    Returns
    -------
    torch.Tensor
        ``x`` itself.

    Examples
    --------
    >>> check_in_range(torch.full((1, 1, 2, 2), 0.5), 0.0, 1.0).shape
    torch.Size([1, 1, 2, 2])
    >>> check_in_range(torch.full((1, 1, 2, 2), 5.0), 0.0, 1.0)
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: x has values in [5, 5], outside data_range [0, 1]; \
expected inputs inside the data range (normalised images: pass data_range=data.bounds of \
bs.load_data's result)
    """
    lo = torch.as_tensor(low, dtype=x.dtype, device=x.device)
    hi = torch.as_tensor(high, dtype=x.dtype, device=x.device)
    if bool((lo >= hi).any()):
        raise InputError(f"data_range must have low < high; got low {_show(lo)}, high {_show(hi)}")
    slack = tolerance * (hi - lo)
    if bool(((x < lo - slack) | (x > hi + slack)).any()):
        # Enough digits to show the tolerance, 1e-4 of the range, at the largest value:
        # a value just past a bound (1.0004 for [0, 1], 1001.0002 for [1000, 1001])
        # must not print as the bound itself. Six at least.
        largest, least = float(x.abs().max()), float(slack.min())
        digits = 6
        if least > 0 and math.isfinite(largest) and largest > least:
            digits = min(17, max(6, math.ceil(math.log10(largest / least)) + 1))
        shown = f"[{float(x.min()):.{digits}g}, {float(x.max()):.{digits}g}]"
        raise InputError(
            f"{name} has values in {shown}, outside "
            f"data_range [{_show(lo)}, {_show(hi)}]; expected inputs inside the data range "
            "(normalised images: pass data_range=data.bounds of bs.load_data's result)"
        )
    return x


def as_bound(value: object, x: torch.Tensor) -> torch.Tensor:
    """One bound of a data range as a tensor in ``x``'s dtype and on its device.

    Examples
    --------
    >>> as_bound(0.5, torch.zeros(1, 3, 2, 2))
    tensor(0.5000)
    >>> as_bound(None, torch.zeros(1))
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputTypeError: data_range bounds must be numbers or tensors (e.g. \
data.bounds); got NoneType
    """
    try:
        return torch.as_tensor(value, dtype=x.dtype, device=x.device)
    except (TypeError, ValueError, RuntimeError):
        raise InputTypeError(
            "data_range bounds must be numbers or tensors (e.g. data.bounds); got "
            f"{type(value).__name__}"
        ) from None


def check_bounds(low: object, high: object, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds of the data range as tensors on ``x``'s dtype and device, checked.

    ``low`` and ``high`` are numbers or tensors that broadcast to ``x``'s shape
    without changing it, e.g. per-channel bounds ``(1, C, 1, 1)``; finite,
    with ``low < high`` everywhere.

    Examples
    --------
    >>> low, high = check_bounds(0.0, torch.ones(1, 3, 1, 1), torch.zeros(2, 3, 4, 4))
    >>> low.shape, high.shape
    (torch.Size([]), torch.Size([1, 3, 1, 1]))
    >>> check_bounds(torch.zeros(1, 3, 1, 1), 1.0, torch.zeros(2, 1, 4, 4))
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: data_range bounds of shapes (1, 3, 1, 1), () do not \
broadcast to x of shape (2, 1, 4, 4); expected numbers or (1, 1, 1, 1) tensors, one bound \
per channel
    """
    lo, hi = as_bound(low, x), as_bound(high, x)
    # The bounds must keep x's shape: (1, 3, 1, 1) bounds would broadcast a
    # 1-channel x to 3 channels, which the model cannot take.
    try:
        fits = torch.broadcast_shapes(lo.shape, hi.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise InputError(
            f"data_range bounds of shapes {tuple(lo.shape)}, {tuple(hi.shape)} do not "
            f"broadcast to x of shape {tuple(x.shape)}; expected numbers or "
            f"(1, {x.shape[1]}, 1, 1) tensors, one bound per channel"
        )
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise InputError("data_range bounds must be finite; got NaN or inf in low or high")
    if not bool((lo < hi).all()):
        raise InputError("data_range must have low < high in every channel")
    return lo, hi


def check_map_batch(m: object, name: str) -> torch.Tensor:
    """Check that ``m`` is a finite floating batch of maps ``(B, H, W)``, none of them empty.

    Examples
    --------
    >>> check_map_batch(torch.zeros(2, 4, 4), "map a").shape
    torch.Size([2, 4, 4])
    >>> check_map_batch(torch.zeros(4, 4), "map a")
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: map a must have shape (B, H, W), one map per batch item; \
got shape (4, 4)
    """
    # The shape first: check_batch's hint names the (B, C, H, W) of inputs.
    if isinstance(m, torch.Tensor) and m.dim() != 3:
        raise InputError(
            f"{name} must have shape (B, H, W), one map per batch item; got shape {tuple(m.shape)}"
        )
    check_batch(m, name, min_dim=3)
    if 0 in m.shape[1:]:
        raise InputError(
            f"{name} holds empty maps, shape {tuple(m.shape)}; expected (B, H, W) with H, W >= 1"
        )
    return m


def _show(t: torch.Tensor) -> str:
    values = t.flatten().tolist()
    return (
        f"{values[0]:g}"
        if len(set(values)) == 1
        else "(" + ", ".join(f"{v:g}" for v in values) + ")"
    )


def _model_place(model: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    first = next(model.parameters(), None)
    if first is None:
        first = next(model.buffers(), None)
    return (None, None) if first is None else (first.dtype, first.device)


#: Input kinds already checked per model, so that an attack loop checks once.
_CHECKED: weakref.WeakKeyDictionary[nn.Module, set[tuple]] = weakref.WeakKeyDictionary()
_CASTABLE = (torch.float32, torch.float64)


def check_input(model: nn.Module, x: object, name: str = "x") -> torch.Tensor:
    """Check ``x`` against ``model`` and return it in the model's dtype.

    ``x`` must be a finite floating batch on the model's device. float32 and
    float64 inputs are cast to the dtype of the model's parameters; other
    dtypes (float16, bfloat16) must equal it. The first time a model meets an
    input of a given item shape, dtype and device, the first two items (one
    where there is one) are run through it: an error in its forward is
    reported with the shape it was given, and the output must be finite
    floating logits of shape ``(2, classes)`` (see :func:`check_logits`).

    Returns
    -------
    torch.Tensor
        ``x``, cast to the model's dtype where needed (the graph is kept).

    Examples
    --------
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> check_input(net, torch.zeros(2, 1, 2, 2, dtype=torch.float64)).dtype
    torch.float32
    """
    check_module(model)
    if torch.is_inference_mode_enabled():
        # Its tensors never take a gradient: every map, attack and curvature needs one.
        raise InputError(
            "betasmooth was called under torch.inference_mode(), where no gradient can be "
            "taken; expected a call outside it"
        )
    x = check_batch(x, name)
    if x.is_inference():
        # Made under inference_mode (a common way to prepare data), it can never take a
        # gradient; a copy made outside it can.
        x = x.clone()
    dtype, device = _model_place(model)
    if device is not None and device.type == "meta":
        raise InputError(
            f"{type(model).__name__}'s parameters are on the meta device and hold no values; "
            "expected a model with its weights (model.to_empty(device='cpu'), then "
            "load_state_dict)"
        )
    if device is not None and x.device != device:
        raise InputError(
            f"{name} is on {x.device} but the model is on {device}; expected both on one "
            f"device, e.g. {name}.to('{device}')"
        )
    if dtype is not None and x.dtype != dtype:
        if x.dtype not in _CASTABLE or not dtype.is_floating_point:
            usable = sorted({str(t).removeprefix("torch.") for t in (dtype, *_CASTABLE)})
            raise InputTypeError(
                f"{name} has dtype {x.dtype} but the model's parameters are {dtype}; expected "
                f"{' or '.join(usable)} (cast with {name}.to({dtype}))"
            )
        x, given = x.to(dtype), x
        if not bool(torch.isfinite(x).all()):
            # Finite as given, but beyond the model's dtype (float16 ends at 65504).
            kind = str(dtype).removeprefix("torch.")
            raise InputError(
                f"{name} has values beyond the range of {kind}, in which the model computes "
                f"(largest |{name}| {float(given.abs().max()):.4g}); expected values within "
                f"+-{torch.finfo(dtype).max:.6g}"
            )
    _check_dims(model, x, name)
    key = (tuple(x.shape[1:]), x.dtype, x.device)
    seen = _CHECKED.setdefault(model, set())
    if key not in seen:
        # Two items where there are two: a forward that folds the batch into
        # one row (x.view(1, -1)) passes with one item and fails only later.
        _probe(model, x[:2], name, tuple(x.shape))
        seen.add(key)
    _check_normalised(model, x, name)
    return x


class UnnormalisedWarning(UserWarning):
    """Pixels in [0, 1] given to a model whose weights expect them normalised."""


#: The attribute by which a model says how its weights expect their input:
#: ``(name, mean, std)``; an attribute, so that copies and pickles keep it.
EXPECTS = "_betasmooth_expects"


def expect_normalised(
    model: nn.Module, what: str, mean: Sequence[float], std: Sequence[float]
) -> None:
    """Record that ``model`` (named ``what``) expects pixels in [0, 1] as ``(x - mean) / std``.

    An input that lies wholly in [0, 1] is then warned of, once per model (and
    its smoothed copies), as :class:`UnnormalisedWarning`: normalised pixels
    below the mean are negative, so such an input is most likely
    unnormalised, and the maps and attacks would be of the model on input it
    was not trained on. A normalised image with no pixel below the mean
    colour lies in [0, 1] too: then the warning is wrong and may be ignored.

    Examples
    --------
    >>> import warnings
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    >>> expect_normalised(net, "net", [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     _ = check_input(net, torch.full((2, 3, 1, 1), 0.75))
    >>> str(seen[0].message)[:40]
    'x lies in [0, 1], as unnormalised pixels'
    """
    setattr(model, EXPECTS, (what, tuple(float(m) for m in mean), tuple(float(s) for s in std)))


def _check_normalised(model: nn.Module, x: torch.Tensor, name: str) -> None:
    expected = getattr(model, EXPECTS, None)
    if expected is None or not any(m > 0 for m in expected[1]):
        return
    what, mean, std = expected
    low, high = torch.aminmax(x.detach())
    if bool((low >= 0) & (high <= 1)):  # one reduction and one wait for a GPU
        warn_user(
            f"{name} lies in [0, 1], as unnormalised pixels do, but {what} expects pixels "
            f"normalised by mean {list(mean)} and std {list(std)}: the maps and attacks are "
            "then of the model on input it was not trained on; expected normalised input, "
            f'e.g. load_data(..., preset="{what}") and data_range=data.bounds (ignore this '
            "where the images are normalised and have no pixel below the mean colour)",
            model,
            UnnormalisedWarning,
        )


_CONVOLUTIONS = {
    nn.Conv1d: "(B, C, L)",
    nn.Conv2d: "(B, C, H, W)",
    nn.Conv3d: "(B, C, D, H, W)",
    nn.ConvTranspose1d: "(B, C, L)",
    nn.ConvTranspose2d: "(B, C, H, W)",
    nn.ConvTranspose3d: "(B, C, D, H, W)",
}


def _check_dims(model: nn.Module, x: torch.Tensor, name: str) -> None:
    # A convolution also takes an unbatched item, which would turn a single
    # image into a batch of its channels: the first layer tells the layout.
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, *_CONVOLUTIONS))), None)
    layout = next((v for k, v in _CONVOLUTIONS.items() if isinstance(first, k)), None)
    if layout is not None and x.dim() != layout.count(",") + 1:
        hint = ""
        if x.dim() == layout.count(","):
            channels = first.in_channels
            # One image as PIL and numpy lay it out, (H, W, C): [None] alone would not fit.
            last = x.dim() == 3 and x.shape[-1] == channels != x.shape[0]
            hint = (
                f"; {name} looks like one channels-last image (H, W, C): "
                f"{name}.permute(2, 0, 1)[None]"
                if last
                else f"; add the batch dimension with {name}[None]"
            )
        raise InputError(
            f"{name} has shape {tuple(x.shape)} but the model's first layer "
            f"{type(first).__name__} takes {layout}{hint}"
        )


def _probe(model: nn.Module, items: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    what = "one item" if len(items) == 1 else f"{len(items)} items"
    # A copy: a forward that changes its input in place must not change the caller's x.
    items = items.detach().clone()
    version, before = items._version, items.clone()
    try:
        out = _forward(model, items)
    except InputError:
        raise
    except Exception as err:
        if is_oom(err):
            raise OutOfMemory(err, f"in the model's forward of {what} of {name}") from None
        reason = " ".join(str(err).split()) or type(err).__name__
        if len(items) > 1 and _accepts(model, items[:1]):
            raise InputError(
                f"model takes one item of shape {shape[1:]} but fails on a batch of "
                f"{len(items)} ({name} has shape {shape}): {reason[:300]}; expected a forward "
                "that keeps the batch dimension (x.flatten(1), not x.view(1, -1))"
            ) from None
        # torch reports a shape that does not fit as a RuntimeError; any other error is
        # the forward's own, named by its type rather than blamed on the shape.
        failed = (
            "model does not accept input of shape"
            if type(err) is RuntimeError
            else f"model's forward raised {type(err).__name__} on input of shape"
        )
        raise InputError(
            f"{failed} {shape[1:]} ({what} of {name}, whose shape is {shape}): "
            f"{reason[:300]}{_input_hint(model, shape, reason)}"
        ) from None
    if items._version != version or not torch.equal(items, before):
        # It would change the caller's x, fail on the leaf that a gradient needs, and
        # give LRP the changed input instead of the given one. The values too: a write
        # through x.data leaves x's version as it was.
        raise InputError(
            f"{type(model).__name__} changes its input in place (e.g. x -= mean, x.clamp_(), "
            "ReLU(inplace=True) on the input); expected a forward that leaves its input as "
            "it is (x = x - mean)"
        )
    check_logits(out, len(items), model)
    if not bool(torch.isfinite(out).all()):
        # NaN weights would otherwise surface as NaN maps, far from their cause.
        raise InputError(
            f"{type(model).__name__} returns NaN or inf on {what} of {name}; expected finite "
            "logits (are the weights finite, and the inputs prepared as in training?)"
        )


def _channels_hint(what: str, wanted: int, given: int) -> str:
    said = f"; {what} {wanted} channel{'s' if wanted != 1 else ''}"
    # load_data converts grey and RGB into each other, nothing else.
    if {wanted, given} <= {1, 3}:
        return f"{said}: load the images with --channels {wanted} (channels= of bs.load_data)"
    return f"{said}: give images of {wanted} channel{'s' if wanted != 1 else ''}"


def _input_hint(model: nn.Module, shape: tuple[int, ...], reason: str) -> str:
    """What would fit the model where its error says it plainly: channels, or a larger size."""
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    said = "channels" in reason  # torch: "expected input ... to have 1 channels"
    if len(shape) == 4 and first is not None and first.in_channels != shape[1]:
        if shape[-1] == first.in_channels:
            # (B, H, W, C), as PIL, numpy and TensorFlow lay images out; also where a
            # normalisation before the convolution fails first, with its own words.
            return (
                f"; x looks channels-last (B, H, W, C) with C = {shape[-1]}; expected "
                f"(B, C, H, W): x.permute(0, 3, 1, 2)"
            )
        if said:
            return _channels_hint(
                "the model's first convolution takes", first.in_channels, shape[1]
            )
    # A normalisation inside the model holds one mean per channel it expects; torch
    # words the mismatch by whether x could broadcast to the model's channels.
    broadcast = re.search(r"broadcast shape \[\d+, (\d+),", reason)
    sizes = re.search(
        r"tensor a \((\d+)\) must match the size of tensor b \((\d+)\) at "
        r"non-singleton dimension 1\b",
        reason,
    )
    # Where the first convolution takes x's channels, the mismatch is inside the model.
    fits = (first is not None and first.in_channels == shape[1]) if len(shape) == 4 else True
    if broadcast and not fits and int(broadcast.group(1)) != shape[1]:
        return _channels_hint("the model works on", int(broadcast.group(1)), shape[1])
    if sizes and not fits and str(shape[1]) in sizes.groups():
        wanted = sizes.group(2) if sizes.group(1) == str(shape[1]) else sizes.group(1)
        return _channels_hint("the model works on", int(wanted), shape[1])
    fixed = re.search(r"Expected (\d+) but got (\d+)", reason)
    if fixed and len(shape) == 4 and int(fixed.group(2)) in shape[2:]:
        # torchvision's ViT checks the size it was built for.
        size = fixed.group(1)
        return f"; the model takes images of {size} px: give --image-size {size} (image_size=)"
    if "too small" in reason or "can't be greater than actual input size" in reason:
        return "; the images are too small for the model: give a larger --image-size (image_size=)"
    if "mat1 and mat2 shapes cannot be multiplied" in reason and len(shape) == 4:
        # A dense layer after the convolutions fixes the image size it takes.
        return (
            "; a dense layer of the model takes features of images of another size: give the "
            "size it was trained on with --image-size (image_size=)"
        )
    return ""


def _forward(model: nn.Module, items: torch.Tensor) -> object:
    """The model's output on ``items`` in evaluation mode, without a graph."""
    with evaluating(model), torch.no_grad():
        return model(items.detach())


def _accepts(model: nn.Module, item: torch.Tensor) -> bool:
    """Whether ``model`` runs on ``item`` without an error."""
    try:
        _forward(model, item)
    except Exception:
        return False
    return True


def check_logits(out: object, batch: int, model: nn.Module | None = None) -> torch.Tensor:
    """Check that a model output is floating logits of shape ``(batch, classes)``.

    Rows that are non-negative and sum to one look like probabilities: a
    warning (once per model) says that the explanations then explain the
    probabilities, not the logits.

    Examples
    --------
    >>> check_logits(torch.zeros(2, 10), 2).shape
    torch.Size([2, 10])
    >>> check_logits((torch.zeros(2, 10),), 2)
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputTypeError: the model returned a tuple; expected one tensor of logits \
of shape (B, classes), e.g. a wrapper whose forward returns only the logits
    """
    if not isinstance(out, torch.Tensor):
        raise InputTypeError(
            f"the model returned a {type(out).__name__}; expected one tensor of logits of shape "
            "(B, classes), e.g. a wrapper whose forward returns only the logits"
        )
    if not out.is_floating_point():
        raise InputTypeError(
            f"the model returned a tensor of dtype {out.dtype}; expected floating logits of "
            "shape (B, classes), not class indices"
        )
    if out.dim() != 2 or out.shape[0] != batch:
        raise InputError(
            f"the model returned shape {tuple(out.shape)} for {batch} input item(s); expected "
            f"logits of shape ({batch}, classes)"
        )
    looks_normalised = bool((out >= 0).all()) and bool(
        torch.allclose(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-4)
    )
    if looks_normalised and out.shape[1] > 1:
        warn_user(
            "the model's outputs are non-negative and sum to 1: it seems to return "
            "probabilities; the explanations are of the logits it returns, so remove a final "
            "softmax to explain the logits",
            model,
        )
    return out


_WARNED: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()
_INTERNAL = (
    str(Path(__file__).resolve().parent),
    str(Path(torch.__file__).resolve().parent),
    str(Path(warnings.__file__).resolve().parent / "contextlib.py"),
)


def origin(model: nn.Module) -> nn.Module:
    """The model that ``model`` is a copy of (see :func:`set_origin`), else itself."""
    ref = _ORIGINS.get(model)
    found = ref() if ref is not None else None
    return model if found is None else found


def set_origin(copy: nn.Module, model: nn.Module) -> None:
    """Record that ``copy`` (e.g. :func:`betasmooth.smooth`'s) is ``model``: warnings about
    the one are given once for both. Weak both ways, and outside the copy, which pickles."""
    _ORIGINS[copy] = weakref.ref(origin(model))


_ORIGINS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


_SILENCED: contextvars.ContextVar[tuple[type[Warning], ...]] = contextvars.ContextVar(
    "betasmooth_silenced", default=()
)


@contextlib.contextmanager
def silenced(category: type[Warning]) -> Iterator[None]:
    """Within, :func:`warn_user` drops warnings of ``category`` without counting them as given.

    A ``warnings`` filter would hide the warning, and the next call on the same
    model would skip it as given once already; a caller that says the same in
    its own words (a run's table) silences it here instead.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     with silenced(UserWarning):
    ...         warn_user("look here")
    >>> seen
    []
    """
    token = _SILENCED.set((*_SILENCED.get(), category))
    try:
        yield
    finally:
        _SILENCED.reset(token)


def warn_user(
    message: str, model: nn.Module | None = None, category: type[Warning] = UserWarning
) -> None:
    """Warn once per ``model`` (every time without one), pointing at the user's call.

    The warning's location is the first frame of the call stack outside
    betasmooth, torch and contextlib: the line of the user's code that led here.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     warn_user("look here")
    >>> str(seen[0].message)
    'look here'
    """
    if issubclass(category, _SILENCED.get()):
        return
    if model is not None:
        seen = _WARNED.setdefault(origin(model), set())
        if message in seen:
            return
        seen.add(message)
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(
        _INTERNAL
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def registrar(
    table: dict[str, Callable[..., object]],
    name: object,
    what: str,
    *,
    replace: bool = False,
    dash: bool = True,
) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """A decorator that enters a function into ``table`` under ``name``, checked first.

    A name is letters, digits, ``_`` and, unless ``dash`` is false (a method's
    name, which run directories write in file names ``<method>-<index>``),
    ``-``: it is written in comma lists on the command line; not ``all``. A
    taken name is refused unless
    ``replace``, so that a built-in is not shadowed by accident, except by
    the same definition run again (a module reloaded, a model file imported
    twice); the entry must be callable. ``what`` names the kind of entry in
    the errors.

    Examples
    --------
    >>> table = {}
    >>> registrar(table, "double", "example")(lambda v: 2 * v)(3)
    6
    >>> "double" in table
    True
    """
    pattern = r"[A-Za-z_][A-Za-z0-9_\-]*" if dash else r"[A-Za-z_][A-Za-z0-9_]*"
    if not isinstance(name, str) or not re.fullmatch(pattern, name):
        chars = "letters, digits, '_' and '-'" if dash else "letters, digits and '_'"
        where = "comma lists on the command line" + ("" if dash else " and in file names")
        fixed = name.replace("-", "_") if isinstance(name, str) else ""
        hint = f", expected e.g. {fixed!r}" if re.fullmatch(pattern, fixed) else ""
        raise InputError(
            f"{what} names are {chars}, starting with a letter or '_' (they are written "
            f"in {where}); got {name!r}{hint}"
        )
    if name == "all":
        raise InputError(f"{what} name 'all' is taken by the command line; expected another")

    def enter(fn: Callable[..., object]) -> Callable[..., object]:
        if not callable(fn):
            raise InputTypeError(f"{what} {name!r} must be callable; got {type(fn).__name__}")
        if not replace and name in table and _origin(table[name]) != _origin(fn):
            raise InputError(
                f"{what} {name!r} is registered already; expected a new name, or "
                "replace=True to replace it"
            )
        table[name] = fn
        return fn

    return enter


def _origin(fn: Callable[..., object]) -> tuple[object, ...]:
    """Where ``fn`` is defined: the same when that definition runs again.

    A module reloaded, or a model file imported both as a module and by
    :func:`betasmooth.load_model` (under another module name), defines its
    functions again in the same file under the same name. A lambda or a
    local function is known by its line too (two in one file are two
    definitions); anything without code of its own (a partial, an
    instance) only by itself.
    """
    code = getattr(inspect.unwrap(fn), "__code__", None)
    if code is None:
        return (id(fn),)
    name = getattr(fn, "__qualname__", code.co_name)
    line = code.co_firstlineno if "<" in name else None
    return code.co_filename, name, line
