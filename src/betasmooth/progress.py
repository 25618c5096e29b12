"""Progress bars for the passes inside one batch: integration steps, noise
copies, Lanczos products.

A batch of a large model on a CPU can take minutes (VGG16's integrated
gradients at 224 px: half a minute per image), during which the job's bar
stands still. The loops inside a batch therefore iterate through
:func:`passes`, which shows a transient bar below the job's bar while a job
that shows its own bar runs (:func:`shown`), and only once a loop has run
longer than :data:`DELAY` seconds, so that fast batches do not flicker.

Examples
--------
>>> with shown():
...     sum(passes(range(4), "integrated_gradients"))
6
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

__all__ = ["DELAY", "passes", "shown"]

#: Seconds a loop runs before its bar appears.
DELAY = 2.0

_SHOWN: contextvars.ContextVar[bool] = contextvars.ContextVar("betasmooth_passes", default=False)


@contextlib.contextmanager
def shown(on: bool = True) -> Iterator[None]:
    """Show the bars of :func:`passes` inside this block (``on=False`` hides them).

    :func:`betasmooth.units.execute` opens this block while its own bar is
    shown; in Python, open it around a call to see the passes of a long one.

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, _ = bs.load_data("digits")
    >>> with shown():
    ...     h = bs.explain(model, x[:2], "integrated_gradients", chunk=5)
    """
    token = _SHOWN.set(bool(on))
    try:
        yield
    finally:
        _SHOWN.reset(token)


def passes(
    iterable: Iterable[T], desc: str, total: int | None = None, show: bool | None = None
) -> Iterable[T]:
    """``iterable``, with a transient bar labelled ``desc`` inside a :func:`shown` block.

    Parameters
    ----------
    iterable : iterable
        The passes of one loop.
    desc : str
        Label of the bar, e.g. the method's name.
    total : int or None
        Number of passes, where ``len(iterable)`` does not tell it.
    show : bool or None
        ``True`` shows the bar at once, ``False`` never; ``None`` leaves it to
        the :func:`shown` block around the call, which shows it after :data:`DELAY`.

    Examples
    --------
    >>> list(passes(range(0, 50, 20), "integrated_gradients"))
    [0, 20, 40]
    """
    if not (_SHOWN.get() if show is None else show):
        return iterable
    delay = 0.0 if show else DELAY
    return tqdm(iterable, desc=desc, total=total, unit="pass", leave=False, delay=delay)
