"""The passes inside a batch: a bar of their own while a job shows its bar."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

import betasmooth as bs
import betasmooth.progress as progress
from betasmooth.runs import curvature_run, explain_run
from betasmooth.store import RunDir


class Recorder:
    """Stands in for tqdm: what each bar was told and how far it went."""

    bars: list[Recorder] = []

    def __init__(self, iterable, desc, total, unit, leave, delay):
        self.iterable, self.desc, self.leave, self.delay = iterable, desc, leave, delay
        self.unit = unit
        self.total = len(iterable) if total is None else total
        self.done = 0
        Recorder.bars.append(self)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.done += 1


@pytest.fixture
def bars(monkeypatch):
    Recorder.bars = []
    monkeypatch.setattr(progress, "tqdm", Recorder)
    return Recorder.bars


@pytest.mark.parametrize(
    ("method", "options", "desc", "count"),
    [
        ("integrated_gradients", {"steps": 20, "chunk": 6}, "integrated_gradients", 20),
        ("smoothgrad", {"n": 10, "chunk": 4, "seed": 0}, "smoothgrad", 10),
    ],
)
def test_each_pass_of_a_long_method_ticks_a_bar_inside_a_shown_block(
    bars, digits, digits_cnn, method, options, desc, count
):
    x = digits[0][:2]
    expected = bs.explain(digits_cnn, x, method, **options)
    assert bars == []  # outside a shown block: no bar, the loop as it is
    with progress.shown():
        h = bs.explain(digits_cnn, x, method, **options)
    torch.testing.assert_close(h, expected, rtol=0, atol=0)
    passes = math.ceil(count / options["chunk"])
    assert [(b.desc, b.total, b.done, b.leave) for b in bars] == [(desc, passes, passes, False)]
    # Shown only once a loop has run that long, so that fast batches do not flicker.
    assert bars[0].delay == progress.DELAY > 0


@pytest.mark.parametrize("shown", [True, False])
def test_a_job_shows_the_passes_of_its_batches_when_it_shows_its_own_bar(
    bars, tmp_path, digits, digits_cnn, shown
):
    x, y = digits[0][:3], digits[1][:3]
    run = RunDir.create(tmp_path / "run", {"command": "explain"})
    explain_run(
        run,
        digits_cnn,
        x,
        y,
        ["integrated_gradients"],
        batch_size=2,
        method_options={"integrated_gradients": {"steps": 8, "chunk": 4}},
        progress=shown,
    )
    # Two batches (2 and 1 items) of 8 / 4 = 2 passes each.
    found = [(b.desc, b.total, b.done) for b in bars]
    assert found == ([("integrated_gradients", 2, 2)] * 2 if shown else [])


def test_curvature_asked_for_progress_shows_lanczos_at_once_and_a_job_after_a_delay(
    bars, tmp_path, digits, digits_cnn
):
    x, model = digits[0][:1].double(), copy.deepcopy(digits_cnn).double()
    bs.curvature(model, x, iterations=3, probes=2, progress=True)
    assert {(b.desc, b.delay) for b in bars} == {("lanczos", 0.0)}
    bars.clear()
    run = RunDir.create(tmp_path / "run", {"command": "curvature"})
    curvature_run(
        run,
        model,
        x,
        digits[1][:1],
        [None],
        progress=True,
        options={"iterations": 3, "probes": 2},
    )
    assert bars and {(b.desc, b.delay) for b in bars} == {("lanczos", progress.DELAY)}


def test_show_false_hides_the_bar_even_inside_a_shown_block(bars):
    loop = range(3)
    with progress.shown():
        assert progress.passes(loop, "smoothgrad", show=False) is loop
        assert progress.passes(loop, "smoothgrad") is not loop  # the block shows it
    assert [(b.desc, b.delay) for b in bars] == [("smoothgrad", progress.DELAY)]


def test_a_bar_over_passes_without_a_length_is_told_their_number(bars):
    # A generator has no len: the bar learns how many passes come from total.
    passes = progress.passes((i * i for i in range(4)), "lanczos", total=4, show=True)
    assert list(passes) == [0, 1, 4, 9]
    assert [(b.desc, b.total, b.done, b.delay) for b in bars] == [("lanczos", 4, 4, 0.0)]


def test_a_bar_counts_passes_not_items(bars):
    # The rate reads "pass/s" (one forward-backward of a chunk), not tqdm's "it/s".
    list(progress.passes(range(2), "smoothgrad", show=True))
    assert [(b.desc, b.unit, b.done) for b in bars] == [("smoothgrad", "pass", 2)]


def test_a_block_left_by_an_exception_hides_the_bars_again(bars):
    # shown() restores the state it found even when its block raises: a failed
    # call must not leave every later loop of the process with a bar.
    loop = range(3)
    with pytest.raises(RuntimeError), progress.shown():
        raise RuntimeError("a batch failed")
    assert progress.passes(loop, "smoothgrad") is loop
    with progress.shown():
        with pytest.raises(RuntimeError), progress.shown(False):
            raise RuntimeError("a batch failed")
        assert progress.passes(loop, "smoothgrad") is not loop  # the outer block shows it
    assert [b.desc for b in bars] == ["smoothgrad"]


@pytest.mark.parametrize("terminal", [True, False])
def test_a_job_by_default_shows_its_bar_and_its_passes_on_a_terminal_alone(
    bars, monkeypatch, tmp_path, digits, digits_cnn, terminal
):
    # progress=None: tqdm itself decides from stderr (disable=None), and the passes
    # follow the job's bar. Oracle: tqdm's own state, total, n, unit and disable.
    import io

    import betasmooth.units as units

    class Terminal(io.StringIO):
        def isatty(self):
            return terminal

    jobs = []

    class Job(units.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # close() sets disable: read it as the job opened the bar.
            jobs.append((self, kwargs["unit"], bool(self.disable)))

    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setattr(units, "tqdm", Job)
    run = RunDir.create(tmp_path / "run", {"command": "explain"})
    explain_run(
        run,
        digits_cnn,
        digits[0][:3],
        digits[1][:3],
        ["integrated_gradients"],
        batch_size=2,
        method_options={"integrated_gradients": {"steps": 8, "chunk": 4}},
    )
    # 3 items in batches of 2 and 1; each batch 8 / 4 = 2 passes.
    # A disabled bar counts nothing: n stays 0 off a terminal.
    found = [(j.total, j.n, unit, off) for j, unit, off in jobs]
    assert found == [(3, 3 if terminal else 0, "item", not terminal)]
    found = [(b.desc, b.total, b.done) for b in bars]
    assert found == ([("integrated_gradients", 2, 2)] * 2 if terminal else [])
