"""Run directory: durable results, atomic arrays, resume, sharding and out-of-memory halving."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import zlib
from collections import Counter

import numpy as np
import pytest
import torch

import betasmooth as bs
from betasmooth.attack import derangement
from betasmooth.checkpoint import read_npz
from betasmooth.distributed import Dist
from betasmooth.store import RunDir, SweepBatch, append_jsonl, read_jsonl, write_npz
from betasmooth.units import Unit, execute, plan, unit_seed
from betasmooth.validate import InputError, OutOfMemory


def _square(unit: Unit) -> tuple[list[dict], dict]:
    # A deterministic stand-in for an attack: value = index squared, plus a method offset.
    offset = {"a": 0.0, "b": 0.5}[unit.method]
    records = [{"index": i, "method": unit.method, "value": i * i + offset} for i in unit.indices]
    return records, {
        "index": np.asarray(unit.indices),
        "value": np.asarray([r["value"] for r in records]),
    }


def test_partial_last_line_is_ignored_and_terminated(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"index": 0, "method": "a"}, {"index": 1, "method": "a"}])
    with open(path, "a") as f:  # a writer killed in the middle of a line
        f.write('{"index": 2, "meth')
    assert [r["index"] for r in read_jsonl(path)] == [0, 1]
    append_jsonl(path, [{"index": 3, "method": "a"}])
    assert [r["index"] for r in read_jsonl(path)] == [0, 1, 3]
    assert path.read_text().count("\n") == 4


@pytest.mark.parametrize(
    "record",
    [
        {"index": 3, "method": "gradient", "file": "caf\u00e9.png", "pcc": -0.1234567}
        | {"x": {"a": [1, 2.5e-07, True, None]}, "s": 'quote"d'},
        # "false" cut after "f" to "fals", "1e+20" after "1e" or "1e+".
        {"index": 3, "ok": False, "big": 1e20, "v": [False]},
    ],
    ids=["strings, numbers, true, null", "false, exponent with +"],
)
def test_every_cut_of_a_record_that_the_next_append_terminates_is_skipped(tmp_path, record):
    # A kill may cut a record after any of its characters; the next append ends the
    # line, which is then skipped wherever it was cut (inside a string, a number, a
    # literal, an escape, a nested object), and the records around it are read.
    text = json.dumps(record)
    for k in range(1, len(text)):
        path = tmp_path / f"r{k}.jsonl"
        append_jsonl(path, [{"index": 0, "method": "a"}])
        with open(path, "a") as f:
            f.write(text[:k])
        append_jsonl(path, [{"index": 1, "method": "a"}])
        assert [r["index"] for r in read_jsonl(path)] == [0, 1], text[:k]


def test_blank_lines_between_records_are_skipped_not_refused(tmp_path):
    # A file joined by hand (cat, an editor's last newline) may hold empty or white lines:
    # they hold no record, so the records around them are read and nothing is refused.
    path = tmp_path / "results.jsonl"
    append_jsonl(path, [{"index": 0, "method": "a"}])
    with open(path, "a") as f:
        f.write("\n   \n\t\r\n")
    append_jsonl(path, [{"index": 1, "method": "a"}])
    assert [r["index"] for r in read_jsonl(path)] == [0, 1]


@pytest.mark.parametrize(
    "damage",
    [
        "garbage line",
        '{"index": 1, garbage}',
        '{"index": 1} 2',
        '{"index": 0, "v": 1.5]',
        '{"index": 0, "v": 1 2}',
        '{"index": 0, "v": [1, 2}',
        '{"index": 0, "v": 1e5x}',
        # Cut short, but no cut of a record: betasmooth writes one object a line.
        '[{"index": 1, "method": "a"}',
        '"index',
    ],
)
def test_a_damaged_line_that_no_kill_could_cut_is_refused_with_its_line(tmp_path, damage):
    # Not a record cut short: skipping it would drop a damaged record without a word.
    path = tmp_path / "results.jsonl"
    append_jsonl(path, [{"index": 0, "method": "a"}])
    with open(path, "a") as f:
        f.write(damage + "\n")
    append_jsonl(path, [{"index": 1, "method": "a"}])
    with pytest.raises(InputError) as err:
        read_jsonl(path)
    assert str(err.value) == (
        f"{path}, line 2, is not JSON, nor a record cut short by a kill; expected one JSON "
        "object a line, as betasmooth writes them: remove that line"
    )


def test_appends_write_one_line_per_record_and_no_blank_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    first, second = [{"index": 0, "method": "a"}], [{"index": 1, "method": "a", "pcc": 0.5}]
    append_jsonl(path, first)
    append_jsonl(path, second)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in first + second)


def test_appending_no_records_leaves_no_file_and_the_run_unstarted(tmp_path):
    # A run whose config alone was written is started afresh without --resume.
    run = RunDir.create(tmp_path / "run", {"command": "attack", "seed": 0})
    run.append([])
    assert not run.results.exists() and not run.started()
    RunDir.create(run.path, {"command": "attack", "seed": 1})


def test_records_keep_numpy_numbers_and_write_non_finite_floats_as_null(tmp_path):
    path = tmp_path / "r.jsonl"
    record = {"index": np.int64(3), "method": "a", "pcc": np.float32(0.25)}
    record |= {"up": float("inf"), "down": float("-inf"), "none": float("nan")}
    append_jsonl(path, [record])
    (back,) = read_jsonl(path)
    assert back == {"index": 3, "method": "a", "pcc": 0.25, "up": None, "down": None, "none": None}
    assert isinstance(back["pcc"], float)


def test_a_complete_record_without_its_newline_does_not_count_until_terminated(tmp_path):
    # A line counts only once it ends with a newline, even where its text parses.
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"index": 0, "method": "a"}])
    with open(path, "a") as f:  # killed after the record's text, before its newline
        f.write('{"index": 1, "method": "a"}')
    assert read_jsonl(path) == [{"index": 0, "method": "a"}]
    append_jsonl(path, [{"index": 2, "method": "a"}])
    assert [r["index"] for r in read_jsonl(path)] == [0, 1, 2]


def test_an_append_is_fsynced_once_every_byte_is_written(tmp_path, monkeypatch):
    from betasmooth import store

    synced = []
    real = store.os.fsync

    def fsync(fd):
        synced.append(store.os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(store.os, "fsync", fsync)
    path = tmp_path / "r.jsonl"
    records = [{"index": i, "method": "a"} for i in range(3)]
    append_jsonl(path, records)
    assert synced == [len("".join(json.dumps(r) + "\n" for r in records))]


@pytest.mark.parametrize("index", ['"0"', "1.5", "null", "true"])
def test_a_record_whose_index_is_no_integer_is_refused_by_line(tmp_path, index):
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    run.append([{"index": 0, "method": "a"}])
    with open(run.results, "a") as f:
        f.write(f'{{"index": {index}, "method": "a"}}\n')
    with pytest.raises(InputError, match=r"results.jsonl, line 2, is not a betasmooth record"):
        run.read()


@pytest.mark.parametrize("size", [0, -1])
def test_a_batch_size_below_one_is_refused(size):
    with pytest.raises(InputError, match=f"batch size must be a positive integer; got {size}$"):
        plan(["a"], range(3), size)


def test_an_append_cut_by_a_file_size_limit_raises_naming_the_file(tmp_path):
    # At the limit, write() wrote part of the records and said so by its count alone:
    # the lost records went unnoticed, and the run ended with status 0.
    code = (
        "import resource, sys\n"
        "from betasmooth.store import append_jsonl\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    append_jsonl(sys.argv[1], [{'index': i, 'pad': 'x' * 80} for i in range(20)])\n"
        "except OSError as err:\n"
        "    print(err.strerror, err.filename)\n"
    )
    path = tmp_path / "r.jsonl"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"File too large {path}\n"
    assert path.stat().st_size == 1000
    assert [r["index"] for r in read_jsonl(path)] == list(range(9))  # the partial line dropped


def test_files_of_a_run_get_the_permissions_of_the_umask(tmp_path):
    import os

    from betasmooth.store import write_json

    old = os.umask(0o027)
    try:
        write_json(tmp_path / "config.json", {"seed": 0})
        write_npz(tmp_path / "a.npz", {"x": np.zeros(2)})
    finally:
        os.umask(old)
    for name in ("config.json", "a.npz"):
        # Not the private 0o600 of a temporary file: as open() would create it.
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~0o027, name


def test_npz_write_is_atomic(tmp_path):
    path = tmp_path / "a.npz"
    write_npz(path, {"x": np.arange(3)})

    class Broken:
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        write_npz(path, {"x": np.arange(5), "y": Broken()})
    with np.load(path) as data:
        np.testing.assert_array_equal(data["x"], np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]


def test_derangement_is_one_cycle_without_fixed_points():
    for n in (2, 3, 10, 57):
        p = derangement(n, 3)
        assert sorted(p.tolist()) == list(range(n))
        assert bool((p != torch.arange(n)).all())
        # Following the map from 0 visits every item before returning: one cycle.
        seen, i = set(), 0
        while i not in seen:
            seen.add(i)
            i = int(p[i])
        assert len(seen) == n
    assert torch.equal(derangement(20, 1), derangement(20, 1))
    assert not torch.equal(derangement(20, 1), derangement(20, 2))
    with pytest.raises(InputError, match="at least 2 images"):
        derangement(1, 0)


def test_plan_and_unit_seed():
    units = plan(["a", "b"], range(5), 2)
    assert [(u.method, u.indices) for u in units] == [
        ("a", (0, 1)),
        ("a", (2, 3)),
        ("a", (4,)),
        ("b", (0, 1)),
        ("b", (2, 3)),
        ("b", (4,)),
    ]
    assert unit_seed(0, "a", 2) == unit_seed(0, "a", 2)
    assert len({unit_seed(0, m, i) for m in "ab" for i in range(50)}) == 100


def test_resume_skips_done_work_and_sorts(tmp_path):
    run = RunDir.create(tmp_path / "run", {"command": "test", "seed": 0})
    calls = []

    def work(unit):
        calls.append(unit)
        return _square(unit)

    units = plan(["b", "a"], range(5), 2)
    write_npz(run.arrays / "a-2.npz", {"index": np.asarray([2]), "value": np.asarray([-1.0])})
    append_jsonl(run.results, [{"index": 2, "method": "a", "value": -1.0}])
    records = execute(run, units, work, progress=False)
    # (2, "a") was done before, (3, "a") of its batch not: a kill cut the batch's
    # write. The batch is computed again whole, so that its arrays stay one file,
    # and only the missing record is added: the old value stays, written once.
    assert Unit("a", (2, 3)) in calls
    assert read_npz(run.arrays / "a-2.npz")["index"].tolist() == [2, 3]
    lines = [r for r in map(json.loads, run.results.read_text().splitlines())]
    assert [r["value"] for r in lines if (r["index"], r["method"]) == (2, "a")] == [-1.0]
    assert [(r["index"], r["method"]) for r in records] == sorted(
        (i, m) for i in range(5) for m in "ab"
    )
    assert {(r["index"], r["method"]): r["value"] for r in records}[(2, "a")] == -1.0
    assert read_jsonl(run.results) == records
    calls.clear()
    assert execute(run, units, work, progress=False) == records
    assert calls == []


def test_ranks_write_their_shards_and_rank0_merges_like_one_process(tmp_path):
    units = plan(["a", "b"], range(7), 2)
    single = RunDir.create(tmp_path / "one", {"command": "test"})
    expected = execute(single, units, _square, progress=False)
    run = RunDir.create(tmp_path / "two", {"command": "test"})
    # The ranks of a torchrun job, one after the other (barriers are no-ops here).
    rank1 = RunDir(run.path, 1, 2)
    assert execute(rank1, units, _square, dist=Dist(1, 2), progress=False) == []
    shard = read_jsonl(run.path / "results-rank1.jsonl")
    # Units a:(0,1) a:(2,3) a:(4,5) a:(6,) b:(0,1) ...; rank 1 takes every second one.
    assert sorted({r["index"] for r in shard if r["method"] == "a"}) == [2, 3, 6]
    merged = execute(RunDir(run.path, 0, 2), units, _square, dist=Dist(0, 2), progress=False)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in merged]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in expected]
    assert not list(run.path.glob("results-rank*.jsonl"))
    names = sorted(p.name for p in run.arrays.iterdir())
    assert names == sorted(p.name for p in single.arrays.iterdir())


def _halved(path, n: int, batch: int) -> tuple[RunDir, list[dict], list[int], list[str]]:
    """Items 0..n-1 in batches of ``batch``, on a device that holds at most 2 per batch."""
    run = RunDir.create(path, {"command": "test"})
    sizes, messages = [], []

    def work(unit):
        sizes.append(len(unit.indices))
        if len(unit.indices) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return _square(unit)

    records = execute(
        run, plan(["a"], range(n), batch), work, progress=False, message=messages.append
    )
    return run, records, sizes, messages


def test_out_of_memory_halves_the_batch(tmp_path):
    run, records, sizes, messages = _halved(tmp_path / "run", 10, 8)
    assert [r["index"] for r in records] == list(range(10))
    assert sizes == [8, 4, 2, 2, 2, 2, 2]
    assert messages == [
        "betasmooth: out of memory with a batch of 8; retrying with batches of 4",
        "betasmooth: out of memory with a batch of 4; retrying with batches of 2",
    ]
    assert sorted(int(p.stem.split("-")[1]) for p in run.arrays.iterdir()) == [0, 2, 4, 6, 8]
    with np.load(run.arrays / "a-4.npz") as data:
        np.testing.assert_array_equal(data["value"], [16.0, 25.0])


def test_a_cpu_allocation_failure_halves_the_batch_and_ends_in_one_line(tmp_path):
    # The CPU allocator's error does not say "out of memory": it was raised as is.
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    sizes, messages = [], []

    def work(unit):
        sizes.append(len(unit.indices))
        if len(unit.indices) > 2:
            torch.empty(2**62, dtype=torch.uint8)  # torch's own error, on any machine
        return _square(unit)

    records = execute(run, plan(["a"], range(6), 4), work, progress=False, message=messages.append)
    assert [r["index"] for r in records] == list(range(6))
    assert sizes == [4, 2, 2, 2]
    assert messages == ["betasmooth: out of memory with a batch of 4; retrying with batches of 2"]

    def never(unit):
        torch.empty(2**62, dtype=torch.uint8)

    other = RunDir.create(tmp_path / "other", {"command": "test"})
    with pytest.raises(OutOfMemory) as refused:
        execute(other, plan(["a"], range(2), 2), never, progress=False, message=messages.append)
    assert str(refused.value).startswith("out of memory with a batch of 1 (")
    assert "can't allocate memory" in str(refused.value) and "\n" not in str(refused.value)
    assert str(refused.value).endswith("fewer points per pass (chunk=)")


def test_other_errors_are_not_retried(tmp_path):
    run = RunDir.create(tmp_path / "run", {"command": "test"})

    def work(unit):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        execute(run, plan(["a"], range(4), 4), work, progress=False)


def test_the_config_names_the_optional_packages_installed_and_their_versions(monkeypatch):
    # torchvision's architectures and preprocessing, Captum's and Quantus's methods shape
    # a run's results: each is named with its installed version, and none that is missing.
    import importlib.metadata

    import captum
    import torchvision

    from betasmooth import store

    # The release, without a local build tag such as +cu130.
    assert store.versions()["torchvision"] == torchvision.__version__.split("+")[0]
    assert store.versions()["captum"] == captum.__version__
    installed = importlib.metadata.version

    def without_quantus(name):
        if name == "quantus":
            raise importlib.metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(importlib.metadata, "version", without_quantus)
    found = store.versions()
    assert "quantus" not in found and found["captum"] == captum.__version__


def test_directory_checks(tmp_path):
    config = {"command": "attack", "steps": 10, "seed": 0, "argv": ["x"]}
    run = RunDir.create(tmp_path / "run", config)
    stored = json.loads(run.config_path.read_text())
    assert stored["steps"] == 10 and stored["world_size"] == 1
    assert stored["versions"]["torch"] == torch.__version__
    # A run that failed before its first result is started again, with any settings.
    assert not run.started()
    RunDir.create(run.path, {**config, "steps": 30})
    assert json.loads(run.config_path.read_text())["steps"] == 30
    RunDir.create(run.path, config)
    run.append([{"index": 0, "method": "gradient"}])
    assert run.started()
    with pytest.raises(InputError, match="is not empty; pass --resume"):
        RunDir.create(run.path, config)
    with pytest.raises(InputError, match="steps is 10 .* but 20 now"):
        RunDir.create(run.path, {**config, "steps": 20}, resume=True)
    # A setting the run was made with and the resumed command leaves out differs too.
    with pytest.raises(InputError, match="seed is 0 .* but not given now"):
        RunDir.create(run.path, {k: v for k, v in config.items() if k != "seed"}, resume=True)
    # Where and how it runs may change between a run and its resumption, and
    # a later sweep's settings belong to the sweep.
    run.update_config(sweep={"betas": [1.0]})
    RunDir.create(run.path, {**config, "argv": ["y"], "device": "cuda"}, resume=True)
    # Betas are a set: the same values in another order (1 and 1.0 alike) are the same run.
    curvature = RunDir.create(tmp_path / "curvature", {**config, "betas": [None, 1, 5.0]})
    curvature.append([{"index": 0, "method": "relu"}])
    RunDir.create(curvature.path, {**config, "betas": [5, 1.0, None]}, resume=True)
    with pytest.raises(InputError, match=r"betas is \[5, 1.0, None\] .* but \[5, 2, None\] now"):
        RunDir.create(curvature.path, {**config, "betas": [5, 2, None]}, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="no config.json"):
        RunDir.create(tmp_path / "other", config, resume=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "text", ["my notes", '{"lr": 0.1}', '{"versions": "1.0"}', '{"versions": {"torch": "2.3"}}']
)
def test_a_folder_with_someone_elses_config_json_is_not_taken_for_a_run(tmp_path, text):
    # It was taken for a run that failed before its first result and overwritten.
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    for resume in (False, True):
        with pytest.raises(InputError, match="config.json was not written by betasmooth"):
            RunDir.create(folder, {"command": "attack"}, resume=resume)
    assert (folder / "config.json").read_text() == text


def test_resume_takes_one_mean_for_the_same_mean_of_every_channel_but_no_other(tmp_path):
    # --mean 0.5 and --mean 0.5 0.5 0.5 normalise alike; a mean that differs in any
    # channel normalises otherwise, even where its first channel agrees.
    config = {"command": "attack", "seed": 0, "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.3, 0.4]}
    run = RunDir.create(tmp_path / "run", config)
    run.append([{"index": 0, "method": "gradient"}])
    RunDir.create(run.path, {**config, "mean": [0.5]}, resume=True)
    with pytest.raises(InputError, match=r"mean is \[0.5[^]]*\] .* but \[0.5, 0.1, 0.1\] now"):
        RunDir.create(run.path, {**config, "mean": [0.5, 0.1, 0.1]}, resume=True)
    with pytest.raises(InputError, match=r"std is \[0.2, 0.3, 0.4\] .* but \[0.2\] now"):
        RunDir.create(run.path, {**config, "std": [0.2]}, resume=True)


def test_betas_that_do_not_sort_are_compared_as_given_on_resume(tmp_path):
    # A hand-written config's betas may not sort (a name among numbers): compared as
    # written, the same list resumes and another is refused, never taken as the same.
    config = {"command": "curvature", "seed": 0, "betas": [1, "x"]}
    run = RunDir.create(tmp_path / "run", config)
    run.append([{"index": 0, "method": "relu"}])
    RunDir.create(run.path, config, resume=True)
    with pytest.raises(InputError, match=r"betas is \[1, 'x'\] .* but \[1, 2\] now"):
        RunDir.create(run.path, {**config, "betas": [1, 2]}, resume=True)


def test_a_config_json_that_cannot_be_read_as_a_file_is_not_taken_for_a_run(tmp_path):
    # A folder named config.json raises an OSError when read: betasmooth, which writes it
    # as a file, did not make it, so it is someone else's and left as it is.
    folder = tmp_path / "mine"
    (folder / "config.json").mkdir(parents=True)
    for resume in (False, True):
        with pytest.raises(InputError, match="config.json was not written by betasmooth"):
            RunDir.create(folder, {"command": "attack"}, resume=resume)
    assert (folder / "config.json").is_dir()


def test_a_runs_config_json_that_does_not_parse_is_named_corrupt_with_its_line(tmp_path):
    # Beside the run's arrays/ it is that run's, damaged: not someone else's file.
    # Refused with or without --resume, begun or not: never written over.
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    run.arrays.mkdir(parents=True, exist_ok=True)
    damaged = '{\n"command": "attack",\n"n": }\n'
    run.config_path.write_text(damaged)
    for begun in (False, True):
        if begun:
            run.append([{"index": 0, "method": "gradient"}])
        for resume in (False, True):
            with pytest.raises(InputError) as err:
                RunDir.create(run.path, {"command": "attack"}, resume=resume)
            assert str(err.value) == (
                f"{run.config_path} is corrupt (line 3); expected the JSON object a "
                "betasmooth run writes: restore it, or start the run again in a new --out"
            )
            assert run.config_path.read_text() == damaged


def test_a_broken_link_as_out_is_named_as_such(tmp_path):
    # Said "File exists: <link>" before.
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with pytest.raises(InputError, match=r"out is a link to .*gone, which does not exist; expe"):
        RunDir.create(tmp_path / "out", {"command": "attack"})


def test_hidden_files_that_are_no_temporary_file_of_ours_are_kept(tmp_path):
    # Any hidden .tmp or .npz was taken for a write cut by a kill: deleted, and the
    # folder counted as empty.
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / ".backup.tmp").write_text("keep")
    (folder / ".old.npz").write_text("keep")
    with pytest.raises(InputError, match="is not empty"):
        RunDir.create(folder, {"command": "attack"})
    assert sorted(p.name for p in folder.iterdir()) == [".backup.tmp", ".old.npz"]
    # mkstemp's names carry exactly 8 random characters; this one has 10.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / ".notes.final_copy.tmp").write_text("keep")
    with pytest.raises(InputError, match="is not empty"):
        RunDir.create(alone, {"command": "attack"})
    assert (alone / ".notes.final_copy.tmp").read_text() == "keep"
    # A write that a kill cut, named as mkstemp names it, is removed on the next start.
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    cut = run.arrays / ".gradient-0.npz.k2j4x_9q.npz"
    cut.write_bytes(b"half")
    assert not run.started()
    RunDir.create(run.path, {"command": "attack"})
    assert not cut.exists()


def test_sweep_records_do_not_depend_on_the_attack_batch_size(tmp_path, digits, digits_cnn):
    # The sweep's SmoothGrad draws per image from (run seed, method, index), so an
    # attack run in batches of 2 and one in a batch of 5 sweep to the same numbers.
    from betasmooth.runs import attack_run, sweep_run

    # In float64: float32 convolutions round differently for another batch size
    # (by which CPU kernel they take), a PCC near 0 by up to 5e-6.
    x, y = digits[0][:5].double(), digits[1][:5]
    model = copy.deepcopy(digits_cnn).double()
    rows = {}
    for size in (2, 5):
        run = RunDir.create(tmp_path / f"s{size}", {"command": "test"})
        attack_run(run, model, x, y, ["gradient"], steps=3, lr=1e-3, batch_size=size)
        found = sweep_run(run, model, [1.0, 5.0], smoothgrad_n=4, seed=3)
        rows[size] = {(r["index"], r["defense"], r["beta"]): r for r in found}
    assert sorted(rows[2]) == sorted(rows[5]) and len(rows[2]) == 5 * 2 * 2
    for key, a in rows[2].items():
        for name, value in a.items():
            if isinstance(value, float) and name != "seconds":
                assert value == pytest.approx(rows[5][key][name], rel=1e-9, abs=1e-12), (key, name)


def test_the_sweep_of_an_attacked_smoothgrad_draws_from_the_attacked_methods_name(
    tmp_path, digits, digits_cnn
):
    # The sweep smooths the base (gradient) of an attacked smoothgrad, but seeds its
    # draws with the attacked method's name, the record's "method": the seed of
    # (run seed, "smoothgrad", index), not of (run seed, "gradient", index).
    from betasmooth.defense import defense_sweep
    from betasmooth.runs import attack_run, sweep_run

    x, y = digits[0][:2], digits[1][:2]
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    attack_run(run, digits_cnn, x, y, ["smoothgrad"], steps=1, batch_size=2)
    rows = sweep_run(run, digits_cnn, [2.0], smoothgrad_n=2, seed=3)
    assert {(r["method"], r["base"]) for r in rows} == {("smoothgrad", "gradient")}
    attacked = run.read_arrays("smoothgrad")
    found = run.read_arrays("smoothgrad", "sweep")["maps_smoothgrad"][:, 0]
    x_adv, target = (torch.from_numpy(attacked[k]) for k in ("x_adv", "map_target"))
    for name, close in (("smoothgrad", True), ("gradient", False)):
        drawn = [unit_seed(3, name, i) for i in range(2)]
        result = defense_sweep(
            digits_cnn, x, x_adv, target, "gradient", [2.0], smoothgrad_n=2,
            defenses=["smoothgrad"], data_range=(0.0, 1.0), seed=drawn,
        )  # fmt: skip
        expected = result.maps[("smoothgrad", 2.0)][0].numpy()
        assert np.allclose(found, expected, rtol=1e-5, atol=1e-7) == close, name


def test_a_sweep_of_some_methods_needs_only_their_arrays(tmp_path, digits, digits_cnn):
    # Lost arrays of a method not swept do not stop the sweep of the others.
    from betasmooth.runs import attack_run, sweep_run

    x, y = digits[0][:2], digits[1][:2]
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    attack_run(run, digits_cnn, x, y, ["gradient", "input_x_gradient"], steps=1)
    (run.arrays / "input_x_gradient-0.npz").unlink()
    rows = sweep_run(run, digits_cnn, [1.0], methods=["gradient"], smoothgrad_n=2)
    assert sorted({(r["index"], r["method"]) for r in rows}) == [(0, "gradient"), (1, "gradient")]
    with pytest.raises(InputError, match=r"^the arrays of 2 finished items .* input_x_gradient"):
        sweep_run(run, digits_cnn, [1.0], smoothgrad_n=2)


def test_swept_maps_are_the_defended_maps_of_the_attacked_images(tmp_path, digits, digits_cnn):
    from scipy.stats import pearsonr

    from betasmooth.runs import attack_run, sweep_run

    x, y = digits[0][:3], digits[1][:3]
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    attack_run(run, digits_cnn, x, y, ["gradient"], steps=1, batch_size=2)
    betas = [2.0, 10.0]
    rows = sweep_run(run, digits_cnn, betas, smoothgrad_n=2)
    target = run.read_arrays("gradient")["map_target"]
    swept = run.read_arrays("gradient", "sweep")
    assert swept["maps_beta"].shape == swept["maps_smoothgrad"].shape == (3, 2, 32, 32)
    # Each stored map is the one the row measured: the defended map of x_adv, whose PCC
    # with the target map is adv_vs_target_pcc (that of the clean image's is not).
    for r in rows:
        key = "maps_beta" if r["defense"] == "beta_smooth" else "maps_smoothgrad"
        stored = swept[key][r["index"], betas.index(r["beta"])]
        pcc = pearsonr(stored.ravel(), target[r["index"]].ravel())[0]
        assert pcc == pytest.approx(r["adv_vs_target_pcc"], abs=1e-4), (r["index"], key)


def test_maps_that_some_sweep_batches_lack_are_left_out_when_joined(tmp_path):
    # A sweep resumed with a defense the first batches lack: its maps have no rows for
    # their items, and joined they would sit under other indices.
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    betas, maps = np.array([1.0, 4.0]), np.arange(3 * 2 * 4.0).reshape(3, 2, 1, 4)
    first = SweepBatch(np.array([0, 1]), betas, {"beta_smooth": maps[:2]})
    run.save_arrays("gradient", 0, first, "sweep")
    later = {"beta_smooth": maps[2:], "box_blur": -maps[2:]}
    run.save_arrays("gradient", 2, SweepBatch(np.array([2]), betas, later), "sweep")
    joined = SweepBatch.from_npz(run.read_arrays("gradient", "sweep"))
    assert sorted(joined.maps) == ["beta_smooth"]
    np.testing.assert_array_equal(joined.maps_beta, maps)
    assert joined.maps_smoothgrad is None
    with pytest.raises(InputError, match="^SweepBatch's maps must be a dict of defense name"):
        SweepBatch(np.array([0]), betas, maps[:1])


def test_a_sweep_scores_top_k_with_the_size_its_attack_took(tmp_path, digits, digits_cnn):
    # attack_run(k=40): the sweep's topk scores are the intersections of numpy's top
    # 40 pixels of the stored defended map and the original map, not the default 102.
    from betasmooth.runs import attack_run, sweep_run

    x, y = digits[0][:3], digits[1][:3]
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    attack_run(run, digits_cnn, x, y, ["gradient"], goal="topk", steps=3, eps=0.05, k=40)
    assert {r["attack_k"] for r in run.read()} == {40}
    rows = sweep_run(run, digits_cnn, [1.0, 5.0], smoothgrad_n=2)
    orig = run.read_arrays("gradient")["map_orig"]
    swept = run.read_arrays("gradient", "sweep")

    def top(m, k):
        return set(np.argsort(-m.ravel(), kind="stable")[:k].tolist())

    checked = 0
    for r in rows:
        key = "maps_beta" if r["defense"] == "beta_smooth" else "maps_smoothgrad"
        stored = swept[key][r["index"], [1.0, 5.0].index(r["beta"])]
        both = top(stored, 40) & top(orig[r["index"]], 40)
        assert r["adv_vs_orig_topk"] == pytest.approx(len(both) / 40, abs=1e-6)
        checked += len(both) / 40 != len(top(stored, 102) & top(orig[r["index"]], 102)) / 102
    assert checked  # the two sizes give other scores on these maps


def test_the_target_map_is_explained_with_the_attacks_box_of_the_data(tmp_path, digits, digits_cnn):
    from betasmooth.attack import attack_options
    from betasmooth.metrics import heatmap
    from betasmooth.runs import attack_run

    # Data in [-1, 1]: LRP's z^B box is the data's, not explain's default [0, 1].
    x, y = digits[0][:3] * 2 - 1, digits[1][:3]
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    attack_run(run, digits_cnn, x, y, ["lrp"], steps=1, seed=2, data_range=(-1.0, 1.0))
    xt = x[derangement(3, 2)]
    boxed = attack_options("lrp", xt, data_range=(-1.0, 1.0))
    expected = heatmap(bs.explain(digits_cnn, xt, "lrp", **boxed)).detach().numpy()
    plain = heatmap(bs.explain(digits_cnn, xt, "lrp")).detach().numpy()
    assert np.abs(expected - plain).max() > 1e-3  # the box changes the map
    target = run.read_arrays("lrp")["map_target"]
    np.testing.assert_allclose(target, expected, rtol=1e-4, atol=1e-7)


def test_smoothgrad_results_do_not_depend_on_the_batch_size(tmp_path, digits, digits_cnn):
    # SmoothGrad draws per item from a seed of (run seed, method, index): the same
    # image gets the same noise, and so the same attack, in any batch.
    from betasmooth.runs import attack_run, explain_run

    x, y = digits[0][:5], digits[1][:5]
    out = {}
    for size in (2, 5):
        run = RunDir.create(tmp_path / f"b{size}", {"command": "test"})
        out[size] = (
            # A short step: 3 steps of the default (500 times the paper's) would
            # turn float noise in near-zero gradients into whole Adam steps.
            attack_run(
                run, digits_cnn, x, y, ["smoothgrad"], steps=3, lr=1e-3, batch_size=size, seed=1
            ),
            explain_run(run, digits_cnn, x, y, ["smoothgrad"], batch_size=size, name="explain"),
        )
    for records_a, records_b in zip(out[2], out[5]):
        assert [r["index"] for r in records_a] == [r["index"] for r in records_b] == list(range(5))
        for a, b in zip(records_a, records_b):
            for key, value in a.items():
                if isinstance(value, float) and key != "seconds":
                    assert value == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_arrays_files_of_captum_methods_have_no_colon_and_old_names_are_read(tmp_path):
    # Windows allows no ":" in a file name; runs of earlier versions wrote it.
    run = RunDir(tmp_path / "run")
    run.arrays.mkdir(parents=True)
    batch = {"index": np.array([0, 1]), "map": np.zeros((2, 4, 4), dtype=np.float32)}
    path = run.save_arrays("captum:Saliency", 0, batch)
    assert path.name == "captum~Saliency-0.npz"
    write_npz(run.arrays / "captum:Occlusion-2.npz", {**batch, "index": np.array([2, 3])})
    files = run.batch_files()
    assert sorted(files) == ["captum:Occlusion", "captum:Saliency"]
    assert files["captum:Saliency"] == {0: path}
    assert run.covered() == {(0, "captum:Saliency"), (1, "captum:Saliency"),
                             (2, "captum:Occlusion"), (3, "captum:Occlusion")}  # fmt: skip


@pytest.mark.parametrize("seed", [0, 5])
def test_the_run_seed_draws_the_noise_of_the_attacked_smoothgrad(
    tmp_path, digits, digits_cnn, seed
):
    # The attack's default options carry seed 0, which took the place of the run's seed:
    # every --seed attacked SmoothGrad with the same draws.
    from betasmooth.runs import attack_run

    x, y = digits[0][:3], digits[1][:3]
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    attack_run(
        run, digits_cnn, x, y, ["smoothgrad"], steps=1, batch_size=3, seed=seed,
        save_attributions=True,
    )  # fmt: skip
    drawn = [unit_seed(seed, "smoothgrad", i) for i in range(3)]
    arrays = run.read_arrays("smoothgrad")

    def maps(images, seeds):
        return bs.heatmap(bs.explain(digits_cnn, images, "smoothgrad", n=10, seed=seeds)).numpy()

    # Scored on draws the attack did not see: seed crc32("scored <the attack's seed>").
    scored = [zlib.crc32(f"scored {s}".encode()) for s in drawn]
    np.testing.assert_allclose(arrays["map_orig"], maps(x, scored), rtol=1e-5, atol=1e-7)
    # The signed attributions are those of the recorded maps.
    for kind in ("orig", "adv"):
        attributions = torch.from_numpy(arrays[f"attr_{kind}"])
        np.testing.assert_allclose(
            bs.heatmap(attributions).numpy(), arrays[f"map_{kind}"], rtol=1e-5, atol=1e-7
        )
    # The target is the other image's map under the draws of that image's own attack.
    others = arrays["target_index"].tolist()
    expected = maps(x[others], [drawn[j] for j in others])
    np.testing.assert_allclose(arrays["map_target"], expected, rtol=1e-5, atol=1e-7)


def test_seconds_is_the_batch_time_divided_by_its_items(tmp_path, monkeypatch):
    # A clock that advances 0.8 s per batch: 0.2 s per item in batches of 4.
    from types import SimpleNamespace

    import betasmooth.units as units

    ticks = iter([0.0, 0.8, 10.0, 10.8])
    monkeypatch.setattr(units, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    records = execute(run, plan(["a"], range(8), 4), _square, progress=False)
    assert [r["seconds"] for r in records] == [pytest.approx(0.2)] * 8


def test_an_odd_batch_that_runs_out_of_memory_is_halved_down(tmp_path):
    _, records, sizes, messages = _halved(tmp_path / "run", 5, 5)
    assert [r["index"] for r in records] == list(range(5))
    # Hand computation: 5 // 2 = 2, so the halves are (0, 1), (2, 3), (4,).
    assert sizes == [5, 2, 2, 1]
    assert messages == ["betasmooth: out of memory with a batch of 5; retrying with batches of 2"]


def test_a_halved_batch_computed_again_whole_keeps_each_item_in_one_file(tmp_path):
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    done = []

    def first(unit):
        if len(unit.indices) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        if len(done) == 2:
            raise KeyboardInterrupt  # killed after two halves
        done.append(unit.indices)
        return _square(unit)

    with pytest.raises(KeyboardInterrupt):
        execute(run, plan(["a"], range(8), 8), first, progress=False, message=lambda s: None)
    assert sorted(p.name for p in run.arrays.glob("*.npz")) == ["a-0.npz", "a-2.npz"]
    records = execute(run, plan(["a"], range(8), 8), _square, progress=False)
    assert [r["index"] for r in records] == list(range(8))
    files = sorted(p.name for p in run.arrays.glob("*.npz"))
    assert files == ["a-0.npz"]
    np.testing.assert_array_equal(run.read_arrays("a")["index"], np.arange(8))


def test_attack_run_takes_steps_and_lr_as_one_value_or_one_per_method(tmp_path):
    from betasmooth.runs import attack_run, load_inputs

    model, x, y = load_inputs("digits-cnn", "digits", n=2)
    methods = ["gradient", "input_x_gradient"]
    for k, (steps, lr) in enumerate([(2, 0.0123), ({"gradient": 1, "input_x_gradient": 3}, None)]):
        if lr is None:
            lr = {"gradient": 0.02, "input_x_gradient": 0.005}
        run = RunDir.create(tmp_path / f"run{k}", {"command": "attack"})
        for r in attack_run(run, model, x, y, methods, steps=steps, lr=lr):
            m = r["method"]
            assert r["attack_steps"] == (steps[m] if isinstance(steps, dict) else steps)
            assert r["attack_lr"] == pytest.approx(lr[m] if isinstance(lr, dict) else lr)


def test_records_of_every_batch_carry_their_items_target_and_labels(tmp_path):
    from betasmooth.runs import attack_run, curvature_run, explain_run, load_inputs

    model, x, y = load_inputs("digits-cnn", "digits", n=5)
    assert len(set(y.tolist())) > 2  # labels differ, so a wrong item shows
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    records = attack_run(run, model, x, y, ["gradient"], steps=1, batch_size=2, seed=3)
    targets = derangement(5, 3).tolist()
    assert [r["target_index"] for r in records] == targets
    assert [r["true_label"] for r in records] == y.tolist()
    np.testing.assert_array_equal(run.read_arrays("gradient")["target_index"], targets)
    explained = explain_run(run, model, x, y, ["gradient"], batch_size=2, name="explain")
    assert [r["true_label"] for r in explained] == y.tolist()
    assert [r["label"] for r in explained] == model(x).argmax(1).tolist()
    other = RunDir.create(tmp_path / "curv", {"command": "curvature"})
    rows = curvature_run(
        other, model, x, y, [None], batch_size=2, options={"iterations": 2, "probes": 1}
    )
    assert [r["true_label"] for r in rows] == y.tolist()


def test_explain_records_and_maps_are_of_the_predicted_class_not_the_true_one(tmp_path):
    from betasmooth.metrics import heatmap
    from betasmooth.runs import explain_run, load_inputs

    model, x, _ = load_inputs("digits-cnn", "digits", n=3)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    wrong = (predicted + 1) % 10  # true labels that the model does not predict
    run = RunDir.create(tmp_path / "run", {"command": "explain"})
    records = explain_run(run, model, x, wrong, ["gradient"])
    assert [r["label"] for r in records] == predicted.tolist()
    assert [r["true_label"] for r in records] == wrong.tolist()
    expected = heatmap(bs.explain(model, x, "gradient", predicted)).detach().numpy()
    np.testing.assert_allclose(run.read_arrays("gradient")["map"], expected, atol=1e-6)


def test_a_run_gives_each_batch_the_baselines_of_its_own_images(tmp_path):
    # One IG baseline per image of the run, explained in batches of 2 (the last of 1):
    # each image's map is Captum's with that image's baseline, also where the
    # baseline goes to smoothgrad's base, whose maps do not depend on the batches.
    from captum.attr import IntegratedGradients

    from betasmooth.runs import explain_run, load_inputs

    model, x, y = load_inputs("digits-cnn", "digits", n=5)
    model = model.double()
    x = x.double()
    baseline = torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    options = {
        "integrated_gradients": {"baseline": baseline, "steps": 4, "rule": "riemann_middle"},
        "smoothgrad": {"base": "integrated_gradients", "n": 2, "steps": 4, "baseline": baseline},
    }
    maps = {}
    for size in (2, 5):
        run = RunDir.create(tmp_path / f"run{size}", {"command": "explain"})
        methods = ["integrated_gradients", "smoothgrad"]
        explain_run(run, model, x, y, methods, batch_size=size, method_options=options,
                    save_attributions=True)  # fmt: skip
        maps[size] = {m: run.read_arrays(m)["attribution"] for m in methods}
    predicted = model(x).argmax(1)
    captum = IntegratedGradients(model).attribute(
        x, baselines=baseline, target=predicted, n_steps=4, method="riemann_middle"
    )
    np.testing.assert_allclose(maps[2]["integrated_gradients"], captum.detach().numpy(),
                               rtol=1e-6, atol=1e-12)  # fmt: skip
    np.testing.assert_allclose(maps[2]["smoothgrad"], maps[5]["smoothgrad"], rtol=1e-9, atol=1e-15)
    # An attack and its sweep in batches of 2 give each batch its images' baselines: the
    # targeted attack's map of the other images too, and beta-smoothing's maps are the
    # same as of one batch of 5.
    from betasmooth.runs import attack_run, sweep_run

    swept = {}
    for size in (2, 5):
        run = RunDir.create(tmp_path / f"attack{size}", {"command": "attack"})
        ig = {"integrated_gradients": options["integrated_gradients"]}
        attack_run(run, model, x, y, ["integrated_gradients"], steps=1, batch_size=size,
                   method_options=ig)  # fmt: skip
        np.testing.assert_allclose(
            run.read_arrays("integrated_gradients")["map_target"],
            bs.heatmap(bs.explain(model, x[derangement(5, 0)], "integrated_gradients",
                       baseline=baseline[derangement(5, 0)], steps=4, rule="riemann_middle"))
            .detach().numpy(), rtol=1e-6, atol=1e-12,
        )  # fmt: skip
        sweep_run(run, model, [2.0], smoothgrad_n=2, defenses=["beta_smooth"], method_options=ig)
        swept[size] = run.read_arrays("integrated_gradients", name="sweep")
    np.testing.assert_allclose(swept[2]["maps_beta"], swept[5]["maps_beta"], rtol=1e-9, atol=1e-15)


def test_class_names_of_the_prediction_before_and_after_the_attack(tmp_path):
    from betasmooth.runs import attack_run, load_inputs

    model, x, y = load_inputs("digits-cnn", "digits", n=20)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    # Class 0 among the items: its name is classes[0], as every other class's.
    keep = [int(torch.nonzero(predicted == 0)[0]), int(torch.nonzero(predicted != 0)[0])]
    classes = [f"class {k}" for k in range(10)]
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    records = attack_run(run, model, x[keep], y[keep], ["gradient"], steps=2, classes=classes)
    assert sorted(r["label"] for r in records) == sorted(predicted[keep].tolist())
    for r in records:
        assert r["label_name"] == classes[r["label"]]
        assert r["label_adv_name"] == classes[r["label_adv"]]


def test_labels_from_minus_one_to_the_last_class_are_taken_and_no_other(tmp_path, digits):
    from betasmooth.runs import load_inputs

    x = digits[0][:2].numpy()
    np.savez(tmp_path / "ok.npz", x=x, y=np.array([9, -1]))
    assert load_inputs("digits-cnn", str(tmp_path / "ok.npz"))[2].tolist() == [9, -1]
    # digits-cnn has 10 classes: 0 to 9.
    np.savez(tmp_path / "ten.npz", x=x, y=np.array([9, 10]))
    with pytest.raises(InputError, match="has label 10, but the model has 10 classes"):
        load_inputs("digits-cnn", str(tmp_path / "ten.npz"))
    # One logit: one class, and the two logits a binary classifier needs.
    (tmp_path / "one.py").write_text(
        "import torch\n\n\ndef build():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 1))\n"
    )
    with pytest.raises(InputError) as one:
        load_inputs(f"{tmp_path / 'one.py'}:build", str(tmp_path / "ten.npz"))
    assert str(one.value) == (
        f"{tmp_path / 'ten.npz'} has label 9, but the model has 1 class; expected labels 0 to 0 "
        "(or -1 for unknown), or a model of two logits, e.g. torch.cat([-z, z], 1) / 2 for its "
        "logit z"
    )


def test_load_inputs_refuses_a_count_of_zero_images():
    from betasmooth.runs import load_inputs

    assert len(load_inputs("digits-cnn", "digits", n=1)[1]) == 1
    with pytest.raises(InputError, match="-n must be a positive number of images; got 0"):
        load_inputs("digits-cnn", "digits", n=0)


def test_a_method_named_twice_is_refused_as_a_beta_named_twice_is():
    from betasmooth.runs import attack_methods, explain_methods

    with pytest.raises(InputError, match="^methods must differ; 'gradient' is given more than"):
        attack_methods("gradient,lrp,gradient")
    with pytest.raises(InputError, match="^methods must differ; 'lrp' is given more than once$"):
        explain_methods(["lrp", "gradient", " lrp"])
    # The order given is the order run.
    assert explain_methods(["lrp", "gradient"]) == ["lrp", "gradient"]


def test_method_lists_take_spaces_around_names_and_refuse_an_empty_list():
    from betasmooth.runs import attack_methods, explain_methods

    # As a shell user writes a list: "gradient, lrp".
    assert attack_methods("gradient, lrp") == ["gradient", "lrp"]
    assert explain_methods([" gradient ", "captum:Saliency "]) == ["gradient", "captum:Saliency"]
    assert explain_methods(" all ") == list(bs.METHODS)
    # No name at all runs nothing: refused, not a run without work.
    for empty in ("", ",", " , ", []):
        for parse in (attack_methods, explain_methods):
            with pytest.raises(InputError, match=r"^unknown method ''; expected a comma list"):
                parse(empty)


def test_check_methods_checks_the_images_against_each_methods_options():
    # Before a run: images outside LRP's box are refused, with x given, not at a batch.
    from betasmooth.runs import check_methods, load_inputs

    model, x, _ = load_inputs("digits-cnn", "digits", n=4)
    # Beyond the box's slack (its own width) past 0.2: so the check bites.
    assert float(x.max()) > 0.4
    check_methods(model, ["gradient", "lrp"], {"lrp": {"low": 0.0, "high": 1.0}}, x)
    check_methods(model, ["lrp"], {"lrp": {"low": 0.0, "high": 0.2}})  # no images, no check
    with pytest.raises(InputError, match=r"^x lies outside the lrp input box \[0.0, 0.2\]"):
        check_methods(model, ["gradient", "lrp"], {"lrp": {"low": 0.0, "high": 0.2}}, x)


def test_curvature_rows_measure_the_original_networks_class(tmp_path):
    from betasmooth.runs import curvature_run, load_inputs
    from betasmooth.smooth import smooth

    model, x, y = load_inputs("digits-cnn", "digits", n=16)
    beta = 0.2
    original = model(x).argmax(1)
    smoothed = smooth(model, beta)(x).argmax(1)
    assert (original != smoothed).any()  # so the check bites
    run = RunDir.create(tmp_path / "curv", {"command": "curvature"})
    rows = curvature_run(
        run, model, x, y, [None, beta], batch_size=8, options={"iterations": 2, "probes": 1}
    )
    for name in ("relu", f"beta={beta:g}"):
        mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["index"])
        assert [r["label"] for r in mine] == original.tolist(), name


def test_curvature_draws_the_same_probes_for_every_beta_and_its_own_per_image(
    tmp_path, monkeypatch
):
    # The rows of one image differ by the network, not by the draw: every beta gets
    # the seeds of (run seed, "curvature", index), whatever the batch.
    import betasmooth.runs as runs

    model, x, y = runs.load_inputs("digits-cnn", "digits", n=3)
    seen: dict[tuple[int, ...], list] = {}
    measure = runs.curvature

    def curvature(net, xb, label, *, seed, **options):
        seen.setdefault(tuple(seed), []).append(net)
        return measure(net, xb, label, seed=seed, **options)

    monkeypatch.setattr(runs, "curvature", curvature)
    run = RunDir.create(tmp_path / "curv", {"command": "curvature"})
    options = {"iterations": 2, "probes": 1}
    runs.curvature_run(run, model, x, y, [None, 2.0], batch_size=2, seed=4, options=options)
    first, last = ([unit_seed(4, "curvature", i) for i in b] for b in ((0, 1), (2,)))
    assert sorted(seen) == sorted([tuple(first), tuple(last)])
    assert all(len(nets) == 2 and nets[0] is not nets[1] for nets in seen.values())


def test_a_seed_given_as_an_option_draws_the_noise(tmp_path):
    from betasmooth.runs import explain_run, load_inputs

    model, x, y = load_inputs("digits-cnn", "digits", n=3)
    label = model(x).argmax(1)
    run = RunDir.create(tmp_path / "run", {"command": "explain"})
    explain_run(
        run,
        model,
        x,
        y,
        ["smoothgrad"],
        seed=0,
        batch_size=2,
        method_options={"smoothgrad": {"seed": 7, "n": 4}},
    )
    found = run.read_arrays("smoothgrad")["map"]
    for base, close in ((7, True), (0, False)):
        drawn = [unit_seed(base, "smoothgrad", i) for i in range(3)]
        expected = bs.heatmap(bs.explain(model, x, "smoothgrad", label, n=4, seed=drawn))
        same = np.allclose(found, expected.detach().numpy(), rtol=1e-5, atol=1e-7)
        assert same == close, base


def test_read_arrays_of_a_sweep_keeps_its_betas_once(tmp_path):
    from betasmooth.runs import attack_run, load_inputs, sweep_run

    model, x, y = load_inputs("digits-cnn", "digits", n=3)
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    attack_run(run, model, x, y, ["gradient"], steps=1, batch_size=2)
    sweep_run(run, model, [1.0, 5.0], smoothgrad_n=2)
    arrays = run.read_arrays("gradient", "sweep")
    np.testing.assert_array_equal(arrays["betas"], [1.0, 5.0])
    np.testing.assert_array_equal(arrays["index"], [0, 1, 2])
    assert arrays["maps_beta"].shape[:2] == (3, 2)


def test_read_arrays_refuses_batches_whose_betas_disagree(tmp_path):
    # Columns follow the betas: batches that name them in other orders cannot be joined.
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    for first, betas in ((0, [1.0, 5.0]), (2, [5.0, 1.0])):
        maps = np.zeros((2, 2, 4, 4))
        arrays = {"index": np.arange(first, first + 2), "betas": np.array(betas), "maps_beta": maps}
        run.save_arrays("gradient", first, arrays, "sweep")
    with pytest.raises(InputError, match=r"hold betas \[1.0, 5.0\] in one batch and \[5.0, 1.0\]"):
        run.read_arrays("gradient", "sweep")
    run.save_arrays("gradient", 2, {**arrays, "betas": np.array([1.0, 5.0])}, "sweep")
    assert run.read_arrays("gradient", "sweep")["maps_beta"].shape == (4, 2, 4, 4)


def test_read_arrays_sorts_the_items_and_keeps_the_betas_as_they_are(tmp_path):
    # A resumed run's batch may hold items that are not contiguous (1 and 3); the items
    # are put in order, the betas (one per run, here as many as the items) are not.
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    betas = np.array([1.0, 2.0, 5.0, 10.0])
    for first, index in ((0, [0, 2]), (1, [1, 3])):
        maps = np.stack([np.full((4, 3, 3), float(i)) for i in index])
        run.save_arrays(
            "gradient",
            first,
            {"index": np.array(index), "betas": betas, "maps_beta": maps},
            "sweep",
        )
    arrays = run.read_arrays("gradient", "sweep")
    np.testing.assert_array_equal(arrays["index"], [0, 1, 2, 3])
    np.testing.assert_array_equal(arrays["betas"], betas)
    np.testing.assert_array_equal(arrays["maps_beta"][:, 0, 0, 0], [0.0, 1.0, 2.0, 3.0])


def test_a_sweep_of_other_settings_is_refused_only_while_sweep_rows_are_kept(tmp_path):
    # The refusal says to delete sweep.jsonl to start a new sweep: once it is gone, the
    # new settings are taken and recorded.
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    run.start_sweep({"betas": [1.0], "smoothgrad_n": 2})
    run.append([{"index": 0, "method": "gradient", "defense": "beta_smooth", "beta": 1.0}], "sweep")
    with pytest.raises(InputError, match=r"holds a sweep whose betas is 1 \(2 now\) in sweep"):
        run.start_sweep({"betas": [2.0], "smoothgrad_n": 2})
    # A setting that only the new sweep names, held as the default.
    now = {"betas": [1.0], "smoothgrad_n": 2, "defenses": ["box_blur", "smoothgrad"]}
    message = (
        r"holds a sweep whose defenses is beta_smooth,smoothgrad \(box_blur,smoothgrad now\) in "
    )
    with pytest.raises(InputError, match=message):
        run.start_sweep(now)
    run.merged("sweep").unlink()
    run.start_sweep({"betas": [2.0], "smoothgrad_n": 2})
    assert run.config()["sweep"] == {"betas": [2.0], "smoothgrad_n": 2}


def test_the_results_arrays_are_not_confused_with_the_sweep_and_explain_ones(tmp_path):
    # results use arrays/<method>-<first>.npz; sweep-<method>-<first>.npz is another kind's.
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    batch = {"index": np.array([0, 1]), "map": np.zeros((2, 4, 4))}
    mine = run.save_arrays("gradient", 0, batch)
    sweep = run.save_arrays("gradient", 0, {**batch, "betas": np.array([1.0])}, "sweep")
    explained = run.save_arrays("lrp", 2, {**batch, "index": np.array([2, 3])}, "explain")
    assert run.batch_files() == {"gradient": {0: mine}}
    assert run.batch_files("sweep") == {"gradient": {0: sweep}}
    assert run.batch_files("explain") == {"lrp": {2: explained}}
    assert run.covered() == {(0, "gradient"), (1, "gradient")}


@pytest.mark.parametrize(
    # A column of the items' indices or one index alone is no list of the file's items either.
    "index",
    [np.array([0.0, 1.0]), np.array([[0, 1]]), np.array([[0], [1]]), np.array(0), None],
)
def test_an_arrays_file_without_an_integer_index_is_not_sound(tmp_path, index):
    # Its items cannot be told: the file is deleted and its records computed again.
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    arrays = {"map": np.zeros((2, 4, 4))} | ({} if index is None else {"index": index})
    path = run.save_arrays("gradient", 0, arrays)
    run.append([{"index": i, "method": "gradient"} for i in (0, 1)])
    said = []
    assert run.covered() == set() and not path.exists()
    assert run.repair(say=said.append) == 2 and run.read() == [] and len(said) == 1


def test_an_arrays_file_with_a_per_item_array_of_another_length_is_not_sound(tmp_path):
    # Three maps for two indices: which map is whose cannot be told, so neither item counts.
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    path = run.save_arrays("gradient", 0, {"index": np.arange(2), "map": np.zeros((3, 4, 4))})
    run.append([{"index": i, "method": "gradient"} for i in (0, 1)])
    said = []
    assert run.repair(say=said.append) == 2 and run.read() == [] and not path.exists()
    assert said == [
        f"betasmooth: 2 finished items of gradient have a missing or corrupt arrays file in "
        f"{run.arrays}; computing them again"
    ]


def test_a_sweep_arrays_file_with_more_betas_than_items_is_sound(tmp_path):
    # betas holds one value per beta, not one per item: a batch of two items swept at
    # three betas is whole, and resuming the sweep keeps it.
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    arrays = {"index": np.arange(2), "betas": np.array([1.0, 5.0, 10.0])}
    path = run.save_arrays("gradient", 0, {**arrays, "maps_beta": np.zeros((2, 3, 4, 4))}, "sweep")
    rows = [
        {"index": i, "method": "gradient", "defense": "beta_smooth", "beta": 1.0} for i in (0, 1)
    ]
    run.append(rows, "sweep")
    said = []
    assert run.repair("sweep", said.append) == 0 and said == []
    assert run.covered("sweep") == {(0, "gradient"), (1, "gradient")} and path.exists()


def test_the_bar_of_a_resumed_run_counts_the_items_still_to_do(tmp_path, capsys):
    # 2 methods x 5 items in batches of 2; a:(0,1) and b:(2,3) are done, so 6 of the
    # 10 items are left (a:2,3,4 and b:0,1,4), and the bar goes from 0 to 6 of 6.
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    done = [Unit("a", (0, 1)), Unit("b", (2, 3))]
    for unit in done:
        records, arrays = _square(unit)
        run.save_arrays(unit.method, unit.indices[0], arrays)
        run.append(records)
    capsys.readouterr()
    execute(run, plan(["a", "b"], range(5), 2), _square, progress=True, desc="batches")
    counts = re.findall(r"batches: +\d+%\|[^|]*\| *(\d+)/(\d+)", capsys.readouterr().err)
    assert counts and counts[-1] == ("6", "6")


def test_a_sweep_resumed_with_its_betas_in_another_order_keeps_each_map_under_its_beta(
    tmp_path, digits, digits_cnn
):
    # --betas 10,2 is the sweep --betas 2,10 (it may resume it), so a batch computed
    # on resumption stores its maps in the order of the betas the arrays name.
    from scipy.stats import pearsonr

    from betasmooth.runs import attack_run, sweep_run
    from betasmooth.store import write_jsonl

    x, y = digits[0][:3], digits[1][:3]
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    attack_run(run, digits_cnn, x, y, ["gradient"], steps=1, batch_size=2)
    sweep_run(run, digits_cnn, [2.0, 10.0], smoothgrad_n=2)
    # A kill after the first batch of the sweep: the second one left nothing.
    kept = [r for r in read_jsonl(run.merged("sweep")) if r["index"] < 2]
    write_jsonl(run.merged("sweep"), kept)
    run.arrays_file("gradient", 2, "sweep").unlink()
    rows = sweep_run(run, digits_cnn, [10.0, 2.0], smoothgrad_n=2)
    target = run.read_arrays("gradient")["map_target"]
    swept = run.read_arrays("gradient", "sweep")
    betas = [float(b) for b in swept["betas"]]
    assert sorted(betas) == [2.0, 10.0] and len(rows) == 3 * 2 * 2
    for r in rows:
        key = "maps_beta" if r["defense"] == "beta_smooth" else "maps_smoothgrad"
        stored = swept[key][r["index"], betas.index(r["beta"])]
        pcc = pearsonr(stored.ravel(), target[r["index"]].ravel())[0]
        assert pcc == pytest.approx(r["adv_vs_target_pcc"], abs=1e-4), (r["index"], key, r["beta"])


def test_only_rank_0_of_a_torchrun_job_shows_the_bar(tmp_path, capsys):
    # Rank 1 works on its share in silence, even when asked for progress: one bar per job.
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    units = plan(["a"], range(4), 2)
    capsys.readouterr()
    execute(RunDir(run.path, 1, 2), units, _square, dist=Dist(1, 2), progress=True, desc="batches")
    assert "batches" not in capsys.readouterr().err
    execute(RunDir(run.path, 0, 2), units, _square, dist=Dist(0, 2), progress=True, desc="batches")
    counts = re.findall(r"batches: +\d+%\|[^|]*\| *(\d+)/(\d+)", capsys.readouterr().err)
    assert counts and counts[-1] == ("2", "2")


def _two_rows_per_item(calls):
    """Sweep-like work: two rows (defenses p and q) per item, each call noted in ``calls``."""

    def work(unit):
        calls.append(unit)
        rows = [
            {"index": i, "method": unit.method, "defense": d, "value": i + k}
            for i in unit.indices
            for k, d in enumerate(("p", "q"))
        ]
        return rows, None

    return work


def test_a_unit_whose_items_have_all_their_rows_is_not_computed_again(tmp_path):
    # Sweep-like records, one per (index, method, defense): a unit counts as done
    # once every item has its rows_per_item rows, and a second run computes nothing.
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    calls = []
    work = _two_rows_per_item(calls)
    units = plan(["a"], range(3), 2)
    first = execute(run, units, work, name="sweep", keeps_arrays=False, rows_per_item=2)
    assert len(first) == 6 and calls == units
    calls.clear()
    assert execute(run, units, work, name="sweep", keeps_arrays=False, rows_per_item=2) == first
    assert calls == []


def test_a_unit_with_an_item_short_of_its_rows_is_computed_again_adding_only_those(tmp_path):
    # Item 0 has one of its two rows (a kill cut the batch's write): its unit (0, 1) is
    # computed again, and only the missing row is added; the unit (2,) is done.
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    calls = []
    work = _two_rows_per_item(calls)
    units = plan(["a"], range(3), 2)
    done = [{"index": 0, "method": "a", "defense": "p", "value": -1.0}] + [
        {"index": i, "method": "a", "defense": d, "value": -1.0} for i in (1, 2) for d in "pq"
    ]
    append_jsonl(run.file("sweep"), done)
    records = execute(run, units, work, name="sweep", keeps_arrays=False, rows_per_item=2)
    assert calls == [Unit("a", (0, 1))]
    values = {(r["index"], r["defense"]): r["value"] for r in records}
    assert len(records) == 6 and values[(0, "q")] == 1 and values[(0, "p")] == -1.0


def test_a_unit_computed_again_appends_only_its_missing_records(tmp_path):
    # Before the merge (here a kill in the next unit), results.jsonl holds each
    # record once: item 0 of the recomputed unit (0, 1) is not appended again.
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    append_jsonl(run.results, [{"index": 0, "method": "a", "value": -1.0}])

    def work(unit):
        if unit.indices[0] == 2:
            raise KeyboardInterrupt
        return [{"index": i, "method": "a", "value": float(i)} for i in unit.indices], None

    with pytest.raises(KeyboardInterrupt):
        execute(run, plan(["a"], range(4), 2), work, keeps_arrays=False, progress=False)
    lines = [json.loads(line) for line in run.results.read_text().splitlines()]
    assert [(r["index"], r["value"]) for r in lines] == [(0, -1.0), (1, 1.0)]


@pytest.mark.parametrize(
    ("seed", "method", "index", "crc"),
    [(0, "gradient", 4, 3485858037), (7, "smoothgrad", 2, 3651223933),
     (2**64 - 1, "saliency", 0, 2828059825)],
)  # fmt: skip
def test_unit_seed_values_are_those_of_earlier_runs(seed, method, index, crc):
    # (seed * 1_000_003 + crc32(method) * 7919 + index) mod (2^31 - 1), the CRC-32 of
    # each name worked out by hand: a resumed run draws its new items as the earlier
    # ones were drawn, and methods of one initial draw apart.
    assert unit_seed(seed, method, index) == (seed * 1_000_003 + crc * 7919 + index) % (2**31 - 1)


def test_a_record_that_times_itself_keeps_its_own_seconds(tmp_path):
    run = RunDir.create(tmp_path / "run", {"command": "test"})

    def work(unit):
        return [{"index": i, "method": "a", "seconds": 100.0 + i} for i in unit.indices], None

    records = execute(run, plan(["a"], range(3), 2), work, keeps_arrays=False)
    assert [r["seconds"] for r in records] == [100.0, 101.0, 102.0]


def test_the_sweep_explains_with_the_options_the_method_was_attacked_with(
    tmp_path, digits, digits_cnn
):
    # LRP attacked with epsilon = 0.5 is swept with it: the stored defended maps are
    # defense_sweep's with those options (and differ from those of the default epsilon).
    from betasmooth.defense import defense_sweep
    from betasmooth.runs import attack_run, sweep_run

    x, y = digits[0][:2], digits[1][:2]
    given = {"lrp": {"epsilon": 0.5}}
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    attack_run(run, digits_cnn, x, y, ["lrp"], steps=1, method_options=given)
    sweep_run(run, digits_cnn, [2.0], smoothgrad_n=2, seed=1, method_options=given)
    attacked = run.read_arrays("lrp")
    found = run.read_arrays("lrp", "sweep")["maps_beta"][:, 0]
    x_adv, target = (torch.from_numpy(attacked[k]) for k in ("x_adv", "map_target"))
    seeds = [unit_seed(1, "lrp", i) for i in range(2)]
    maps = {}
    for options in (given["lrp"], None):
        result = defense_sweep(
            digits_cnn, x, x_adv, target, "lrp", [2.0], smoothgrad_n=2,
            defenses=["beta_smooth"], data_range=(0.0, 1.0), method_options=options, seed=seeds,
        )  # fmt: skip
        maps[options is None] = result.maps[("beta_smooth", 2.0)][0].numpy()
    assert np.abs(maps[True] - maps[False]).max() > 1e-4  # epsilon changes the map
    np.testing.assert_allclose(found, maps[False], rtol=1e-5, atol=1e-7)


def test_check_methods_names_no_methods_that_can_run_where_none_can():
    # Every method asked for fails: the error is the first one's, as it was.
    from betasmooth.runs import check_methods

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2), torch.nn.Softmax(1))
    with pytest.raises(InputError) as err:
        check_methods(net, ["lrp"])
    assert str(err.value).startswith("lrp has no rule for module Softmax (2)")
    assert "can run" not in str(err.value)


def test_captum_sampling_methods_are_seeded_per_batch_and_restore_the_generators(tmp_path):
    # GradientShap draws its baselines from numpy's global generator and its noise
    # from torch's: without a seed a rerun, --resume or torchrun gave other maps.
    from captum.attr import GradientShap

    from betasmooth.metrics import heatmap
    from betasmooth.runs import explain_run, load_inputs
    from betasmooth.units import unit_seed

    model, x, y = load_inputs("digits-cnn", "digits", n=3)
    black = torch.zeros(1, *x.shape[1:])
    method, options = "captum:GradientShap", {"n_samples": 3, "stdevs": 0.1, "baselines": black}
    np.random.seed(123)
    torch.manual_seed(456)
    before = (np.random.rand(), torch.rand(1).item())
    np.random.seed(123)
    torch.manual_seed(456)
    maps = []
    for name in ("a", "b"):
        run = RunDir.create(tmp_path / name, {"command": "explain"})
        explain_run(
            run, model, x, y, [method], method_options={method: options}, batch_size=2, seed=7
        )
        maps.append(run.read_arrays(method)["map"])
    np.testing.assert_array_equal(maps[0], maps[1])
    # The caller's generators go on as if nothing had drawn from them.
    assert (np.random.rand(), torch.rand(1).item()) == before
    # Captum by hand, under the seed of each batch (from its first index).
    with torch.no_grad():
        label = model(x).argmax(1)
    for first, stop in ((0, 2), (2, 3)):
        seed = unit_seed(7, method, first)
        torch.manual_seed(seed)
        np.random.seed(seed)
        expected = GradientShap(model).attribute(x[first:stop], target=label[first:stop], **options)
        np.testing.assert_allclose(
            maps[0][first:stop], heatmap(expected).detach().numpy(), rtol=1e-5, atol=1e-7
        )


def test_attack_runs_seed_a_method_that_draws_from_the_global_generator(tmp_path, monkeypatch):
    # A model file's method drawing torch.randn gave other maps and attacks on a rerun.
    from betasmooth.explain import METHODS, register
    from betasmooth.runs import attack_run, load_inputs, sweep_run

    @register("noisy_gradient_test")
    def noisy(model, x, target, *, create_graph=False):
        with torch.enable_grad():
            noisy_x = x + 0.05 * torch.randn_like(x)
            if not create_graph:
                noisy_x = noisy_x.detach().requires_grad_(True)
            logits = model(noisy_x)
            target = logits.argmax(1) if target is None else target
            out = logits.gather(1, target[:, None]).sum()
            return torch.autograd.grad(out, noisy_x, create_graph=create_graph)[0]

    monkeypatch.setitem(METHODS, "noisy_gradient_test", METHODS.pop("noisy_gradient_test"))
    model, x, y = load_inputs("digits-cnn", "digits", n=2)
    arrays = []
    for name, torch_seed in (("a", 1), ("b", 2)):
        torch.manual_seed(torch_seed)  # the caller's generator differs between the runs
        run = RunDir.create(tmp_path / name, {"command": "attack"})
        attack_run(run, model, x, y, ["noisy_gradient_test"], steps=2, seed=3)
        arrays.append(run.read_arrays("noisy_gradient_test"))
    for key in ("map_orig", "map_adv", "map_target", "x_adv"):
        np.testing.assert_array_equal(arrays[0][key], arrays[1][key])
    # Their sweeps too: the undefended and defended maps draw from the generator.
    swept = []
    for name, torch_seed in (("a", 4), ("b", 5)):
        torch.manual_seed(torch_seed)
        rows = sweep_run(RunDir(tmp_path / name), model, [1.0], smoothgrad_n=2, seed=3)
        swept.append(sorted(rows, key=lambda r: (r["index"], r["defense"])))
    keys = [k for k in swept[0][0] if k != "seconds"]
    assert [[r[k] for k in keys] for r in swept[0]] == [[r[k] for k in keys] for r in swept[1]]


def _attacked_and_counted(tmp_path, digits, digits_cnn, monkeypatch, steps):
    """A gradient attack of three digits in batches of 2 and 1, and the defenses each
    later call of defense_sweep in betasmooth.runs is given."""
    import betasmooth.runs as runs_module
    from betasmooth.runs import attack_run

    x, y = digits[0][:3], digits[1][:3]
    run = RunDir.create(tmp_path / "run", {"command": "test", "n": 3})
    attack_run(run, digits_cnn, x, y, ["gradient"], steps=steps, batch_size=2)
    calls = []
    real = runs_module.defense_sweep

    def counted(*args, **kwargs):
        calls.append(list(kwargs["defenses"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(runs_module, "defense_sweep", counted)
    return run, calls


def test_a_defense_registered_beside_the_two_leaves_a_finished_sweep_finished(
    tmp_path, digits, digits_cnn, monkeypatch
):
    # betasmooth sweep runs SWEPT_DEFENSES; a unit counted as done at
    # len(DEFENSES) rows per beta was computed again on every later sweep once a
    # model file had added a defense to DEFENSES (which it then never ran).
    from betasmooth.defense import DEFENSES
    from betasmooth.runs import sweep_run

    monkeypatch.setitem(DEFENSES, "extra", DEFENSES["smoothgrad"])
    run, calls = _attacked_and_counted(tmp_path, digits, digits_cnn, monkeypatch, steps=1)
    rows = sweep_run(run, digits_cnn, [2.0], smoothgrad_n=2)
    # Two batches (of 2 and 1 images), each swept once, with the two defenses.
    assert len(calls) == 2
    assert sorted((r["index"], r["defense"]) for r in rows) == [
        (i, d) for i in range(3) for d in ("beta_smooth", "smoothgrad")
    ]
    stamps = {f: f.stat().st_mtime_ns for f in run.path.glob("arrays/sweep-*")}
    assert len(stamps) == 2
    assert sweep_run(run, digits_cnn, [2.0], smoothgrad_n=2) == rows
    assert len(calls) == 2  # the second sweep computed nothing
    assert {f: f.stat().st_mtime_ns for f in run.path.glob("arrays/sweep-*")} == stamps


def test_the_paper_defenses_in_any_order_or_twice_are_the_settings_of_a_default_sweep():
    from betasmooth.runs import sweep_settings, swept_defenses

    default = {"betas": [1.0, 5.0], "smoothgrad_n": 2, "min_fidelity": 0.9}
    for defenses in (["smoothgrad", "beta_smooth"], ["beta_smooth", "smoothgrad", "smoothgrad"]):
        assert sweep_settings([1, 5], 2, 0.9, defenses) == default
    other = sweep_settings([1, 5], 2, 0.9, ["smoothgrad", "box_blur", "smoothgrad"])
    assert other == default | {"defenses": ["box_blur", "smoothgrad"]}
    assert swept_defenses(other) == ["box_blur", "smoothgrad"]
    assert swept_defenses(default) == ["beta_smooth", "smoothgrad"]
    # A config.json whose defenses are no list of names, or none, is the default sweep's.
    for given in ([], None, "box_blur"):
        assert swept_defenses(default | {"defenses": given}) == ["beta_smooth", "smoothgrad"]


def test_a_sweep_of_one_defense_is_checked_first_and_finished_at_one_row_per_beta(
    tmp_path, digits, digits_cnn, monkeypatch
):
    # --defenses beta_smooth: an image is done at one row per beta, not at the two of
    # the default sweep (counted so, each resume swept it again and the report called
    # the sweep unfinished).
    import betasmooth.runs as runs_module
    from betasmooth.report import build_report
    from betasmooth.runs import attack_run, sweep_run

    x, y = digits[0][:3], digits[1][:3]
    run = RunDir.create(tmp_path / "run", {"command": "test", "n": 3})  # the report counts n
    attack_run(run, digits_cnn, x, y, ["gradient"], steps=1, batch_size=2)
    calls = []
    real = runs_module.defense_sweep

    def counted(*args, **kwargs):
        calls.append(kwargs["defenses"])
        return real(*args, **kwargs)

    monkeypatch.setattr(runs_module, "defense_sweep", counted)
    # A misspelt defense is refused before the sweep records its settings.
    with pytest.raises(InputError, match="^unknown defense 'beta_smoth'"):
        sweep_run(run, digits_cnn, [0.5, 2.0], smoothgrad_n=2, defenses=["beta_smoth"])
    assert "sweep" not in run.config() and not calls
    rows = sweep_run(run, digits_cnn, [0.5, 2.0], smoothgrad_n=2, defenses=["beta_smooth"])
    assert calls == [["beta_smooth"], ["beta_smooth"]]  # two batches
    assert run.config()["sweep"]["defenses"] == ["beta_smooth"]
    assert sorted((r["index"], r["beta"]) for r in rows) == [
        (i, b) for i in range(3) for b in (0.5, 2.0)
    ]
    # The same sweep, the defense named twice: it computes nothing.
    twice = ["beta_smooth", "beta_smooth"]
    assert sweep_run(run, digits_cnn, [0.5, 2.0], smoothgrad_n=2, defenses=twice) == rows
    assert len(calls) == 2
    assert "not finished" not in build_report(run.path).read_text()


def _blurred_maps(model, xs, method, label, beta, *, sigma, n, seed, input_range, base_options):
    """A defense beside the paper's: the base map of the images blurred over 1 + 2 / beta pixels."""
    k = 1 + 2 * round(2 / beta)
    blurred = torch.nn.functional.avg_pool2d(xs, k, 1, k // 2, count_include_pad=False)
    return bs.heatmap(bs.explain(model, blurred, method, label, **(base_options or {})))


def test_a_registered_defense_is_swept_summarised_resumed_and_reported(
    tmp_path, digits, digits_cnn, monkeypatch
):
    from betasmooth.defense import DEFENSES
    from betasmooth.report import build_report
    from betasmooth.runs import sweep_run

    monkeypatch.setitem(DEFENSES, "box_blur", _blurred_maps)
    run, calls = _attacked_and_counted(tmp_path, digits, digits_cnn, monkeypatch, steps=3)
    x = digits[0][:3]
    defenses = ["beta_smooth", "smoothgrad", "box_blur"]
    rows = sweep_run(run, digits_cnn, [0.5, 2.0], smoothgrad_n=2, defenses=defenses)
    assert calls == [defenses, defenses]  # two batches
    assert run.config()["sweep"]["defenses"] == sorted(defenses)
    mine = [r for r in rows if r["defense"] == "box_blur"]
    assert sorted((r["index"], r["beta"]) for r in mine) == [
        (i, b) for i in range(3) for b in (0.5, 2.0)
    ]
    # Each row against the defense called by hand on the attacked and the clean images.
    arrays = [read_npz(f) for f in sorted(run.path.glob("arrays/gradient-*.npz"))]
    x_adv = torch.from_numpy(np.concatenate([a["x_adv"] for a in arrays]))
    label = digits_cnn(x).argmax(1)
    orig = bs.heatmap(bs.explain(digits_cnn, x, "gradient", label))
    for beta in (0.5, 2.0):
        both = _blurred_maps(
            digits_cnn, torch.cat([x_adv, x]), "gradient", label.repeat(2), beta,
            sigma=None, n=None, seed=None, input_range=None, base_options=None,
        )  # fmt: skip
        adv, clean = both.chunk(2)
        # The sweep's arrays hold its maps of x_adv as maps_box_blur, beside beta_smooth's.
        swept = run.read_arrays("gradient", "sweep")
        assert swept["index"].tolist() == [0, 1, 2]
        column = swept["maps_box_blur"][:, [0.5, 2.0].index(beta)]
        np.testing.assert_allclose(column, adv.detach().numpy(), atol=1e-6)
        robust, fidel = bs.compare(adv, clean)["pcc"], bs.compare(clean, orig)["pcc"]
        for r in (r for r in mine if r["beta"] == beta):
            assert r["adv_vs_clean_pcc"] == pytest.approx(float(robust[r["index"]]), abs=1e-5)
            assert r["clean_vs_orig_pcc"] == pytest.approx(float(fidel[r["index"]]), abs=1e-5)
    # Its own table in the summary, of the medians of its rows.
    summary = json.loads((run.path / "sweep_summary.json").read_text())["gradient"]
    assert summary["defenses"] == ["beta_smooth", "smoothgrad", "box_blur"]
    for beta in (0.5, 2.0):
        values = [r["adv_vs_clean_pcc"] for r in mine if r["beta"] == beta]
        cell = summary["box_blur"][f"{beta:g}"]
        assert (cell["n"], cell["robustness_pcc"]) == (3, pytest.approx(np.median(values)))
    # Done at three rows per beta: a second sweep computes nothing, and the report
    # counts the sweep as finished and shows the defense's row.
    assert sweep_run(run, digits_cnn, [0.5, 2.0], smoothgrad_n=2, defenses=defenses) == rows
    assert len(calls) == 2
    page = build_report(run.path).read_text()
    assert "not finished" not in page
    cell = summary["box_blur"]["2"]
    shown = re.search(r'box_blur β=2</th><td data-value="3.0">3</td><td data-value="([^"]+)"', page)
    assert float(shown.group(1)) == pytest.approx(cell["robustness_pcc"])
    # Another selection of defenses is another sweep.
    with pytest.raises(InputError, match="holds a sweep whose defenses is beta_smooth,box_blur,"):
        sweep_run(run, digits_cnn, [0.5, 2.0], smoothgrad_n=2)


def test_a_sweep_of_one_defense_is_finished_and_one_cut_short_is_not(
    tmp_path, digits, digits_cnn, monkeypatch
):
    # The report counts an image as swept at one row per defense the sweep ran and beta:
    # beta-smoothing alone, listed twice, is one defense (two rows per image at two
    # betas); rows of an image removed make it unfinished. A sweep of beta-smoothing
    # alone draws no samples: it records no smoothgrad_n, and another is no other sweep.
    from betasmooth.report import build_report
    from betasmooth.runs import sweep_run

    run, calls = _attacked_and_counted(tmp_path, digits, digits_cnn, monkeypatch, steps=1)
    alone = ["beta_smooth", "beta_smooth"]
    sweep_run(run, digits_cnn, [1.0, 4.0], smoothgrad_n=2, defenses=alone)
    assert calls == [["beta_smooth"], ["beta_smooth"]]
    rows = run.read("sweep")
    assert sorted((r["index"], r["beta"]) for r in rows) == [
        (i, b) for i in range(3) for b in (1.0, 4.0)
    ]
    assert run.config()["sweep"] == {
        "betas": [1.0, 4.0],
        "min_fidelity": 0.9,
        "defenses": ["beta_smooth"],
    }
    summary = json.loads((run.path / "sweep_summary.json").read_text())["gradient"]
    assert summary["betas"]["4"]["n"] == 3
    assert "not finished" not in build_report(run.path).read_text()
    sweep_run(run, digits_cnn, [4.0, 1.0], smoothgrad_n=3, defenses=["beta_smooth"])
    assert len(calls) == 2  # the same sweep: nothing computed again
    kept = [r for r in rows if not (r["index"] == 2 and r["beta"] == 4.0)]
    (run.path / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert "sweep of gradient 2 of 3 images" in build_report(run.path).read_text()
    # Resumed, the image short of one beta's row is swept again, though it still holds
    # one row per defense: its batch adds only the row it lacked.
    sweep_run(run, digits_cnn, [1.0, 4.0], smoothgrad_n=2, defenses=alone)
    assert len(calls) == 3
    assert sorted((r["index"], r["beta"]) for r in run.read("sweep")) == [
        (i, b) for i in range(3) for b in (1.0, 4.0)
    ]


def test_the_report_names_a_registered_defense_once_escaped(
    tmp_path, digits, digits_cnn, monkeypatch
):
    from betasmooth.defense import DEFENSES
    from betasmooth.report import build_report
    from betasmooth.runs import sweep_run

    monkeypatch.setitem(DEFENSES, "m&f", _blurred_maps)
    run, _ = _attacked_and_counted(tmp_path, digits, digits_cnn, monkeypatch, steps=1)
    sweep_run(run, digits_cnn, [2.0], defenses=["beta_smooth", "m&f"])
    page = build_report(run.path).read_text()
    assert "other line styles: m&amp;f (see the legend)" in page
    assert "&amp;amp;" not in page


def test_batch_files_and_their_arrays_come_by_first_index_not_by_file_name(tmp_path):
    # "a-10.npz" sorts before "a-2.npz" by name; the batches are in the order of their items.
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    for first in (10, 0, 2):
        run.save_arrays("a", first, {"index": np.array([first, first + 1])})
    assert list(run.batch_files()["a"]) == [0, 2, 10]
    assert [a["index"].tolist() for a in run.load_arrays("a")] == [[0, 1], [2, 3], [10, 11]]


def _lrp_attack(tmp_path, digits, model, moved=None, batch=0, **options) -> RunDir:
    """A run of one-step LRP attacks on two digits, the arrays of its batch ``batch``
    updated by ``moved(arrays)`` (images moved out of or into a box)."""
    from betasmooth.runs import attack_run

    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    attack_run(run, model, digits[0][:2], digits[1][:2], ["lrp"], steps=1, **options)
    if moved is not None:
        path = run.arrays_file("lrp", batch)
        arrays = read_npz(path)
        write_npz(path, arrays | moved(arrays))
    return run


def _refused_before_writing(run: RunDir, match: str, *args, **kwargs) -> None:
    """``sweep_run(run, *args, **kwargs)`` is refused with ``match`` before it records its
    settings or writes a batch."""
    from betasmooth.runs import sweep_run

    config = run.config_path.read_text()
    with pytest.raises(InputError, match=match):
        sweep_run(run, *args, **kwargs)
    assert run.config_path.read_text() == config  # no sweep settings recorded
    assert not run.merged("sweep").exists() and run.batch_files("sweep") == {}


def test_a_sweep_checks_the_attacked_images_before_it_records_its_settings(
    tmp_path, digits, digits_cnn
):
    # Attacked images far outside LRP's box of [0, 1] (as an attack with other data
    # bounds leaves them), the clean ones inside: refused before the sweep writes.
    run = _lrp_attack(tmp_path, digits, digits_cnn, lambda a: {"x_adv": a["x_adv"] + 5.0})
    box = r"^x lies outside the lrp input box \[0\.0, 1\.0\]"
    _refused_before_writing(run, box, digits_cnn, [1.0], smoothgrad_n=2)


def test_a_sweep_batch_halved_on_out_of_memory_sweeps_each_half_on_its_own_images(
    tmp_path, digits, digits_cnn, monkeypatch
):
    # The attack's batch of 4 is swept in halves, then quarters, on a device that holds
    # one image: each part takes its own rows of the batch's arrays, and the rows are
    # those of the sweep of the whole batch.
    import shutil

    import betasmooth.runs as runs_module
    from betasmooth.runs import attack_run, sweep_run

    x, y = digits[0][:4], digits[1][:4]
    whole = RunDir.create(tmp_path / "whole", {"command": "test"})
    attack_run(whole, digits_cnn, x, y, ["gradient"], steps=2, batch_size=4)
    halved = RunDir(shutil.copytree(whole.path, tmp_path / "halved"))
    expected = sweep_run(whole, digits_cnn, [1.0, 4.0], smoothgrad_n=2, seed=1)
    real, sizes = runs_module.defense_sweep, []

    def small_device(model, x, *args, **kwargs):
        sizes.append(len(x))
        if len(x) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return real(model, x, *args, **kwargs)

    monkeypatch.setattr(runs_module, "defense_sweep", small_device)
    found = sweep_run(halved, digits_cnn, [1.0, 4.0], smoothgrad_n=2, seed=1)
    assert sizes == [4, 2, 1, 1, 1, 1]
    assert len(found) == len(expected) == 4 * 2 * 2
    for a, b in zip(found, expected):
        assert {k: v for k, v in a.items() if k != "seconds"} == pytest.approx(
            {k: v for k, v in b.items() if k != "seconds"}, rel=1e-4, abs=1e-5
        )
    swept, kept = halved.read_arrays("gradient", "sweep"), whole.read_arrays("gradient", "sweep")
    np.testing.assert_array_equal(swept["index"], [0, 1, 2, 3])
    np.testing.assert_allclose(swept["maps_beta"], kept["maps_beta"], rtol=1e-4, atol=1e-7)


def test_explain_records_hold_the_statistics_of_their_stored_maps(tmp_path, digits, digits_cnn):
    # map_max, map_entropy (nats) and map_top10_mass recomputed in numpy from the stored
    # maps: the top 10 % of a 32 x 32 map are its 102 largest pixels.
    from betasmooth.runs import explain_run

    x, y = digits[0][:2], digits[1][:2]
    run = RunDir.create(tmp_path / "run", {"command": "explain"})
    records = explain_run(run, digits_cnn, x, y, ["gradient"])
    maps = run.read_arrays("gradient")["map"].reshape(2, -1).astype(np.float64)
    for r, m in zip(records, maps):
        assert r["map_max"] == pytest.approx(m.max(), rel=1e-6)
        positive = m[m > 0]
        assert r["map_entropy"] == pytest.approx(-(positive * np.log(positive)).sum(), rel=1e-5)
        assert r["map_top10_mass"] == pytest.approx(np.sort(m)[::-1][:102].sum(), rel=1e-5)


def test_a_label_beyond_the_class_names_given_gets_no_name(tmp_path, digits, digits_cnn):
    # Names for the classes up to the predicted one only: the items predicted past them
    # keep their records, without label_name.
    from betasmooth.runs import explain_run

    x, y = digits[0][:4], digits[1][:4]
    with torch.no_grad():
        predicted = digits_cnn(x).argmax(1).tolist()
    last = max(predicted)
    classes = [f"c{k}" for k in range(last)]  # the classes 0 .. last - 1
    run = RunDir.create(tmp_path / "run", {"command": "explain"})
    records = explain_run(run, digits_cnn, x, y, ["gradient"], classes=classes)
    assert [r["label"] for r in records] == predicted
    for r in records:
        assert r.get("label_name") == (f"c{r['label']}" if r["label"] < last else None)


def test_an_append_that_the_disk_stops_taking_raises_and_names_the_file(tmp_path, monkeypatch):
    # A write that takes 0 bytes (a full quota) must not end the append silently short.
    import errno
    import os

    from betasmooth import store

    class FiveBytesThenNothing:
        """store's os, whose write takes 5 bytes once and then none; os for the rest
        (store's own name is replaced: other threads keep writing)."""

        calls = 0

        def write(self, fd, data):
            self.calls += 1
            return os.write(fd, bytes(data[:5])) if self.calls == 1 else 0

        def __getattr__(self, name):
            return getattr(os, name)

    path = tmp_path / "r.jsonl"
    monkeypatch.setattr(store, "os", FiveBytesThenNothing())
    with pytest.raises(OSError) as err:
        append_jsonl(path, [{"index": 0, "method": "gradient"}])
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(path))
    monkeypatch.setattr(store, "os", os)
    assert path.read_bytes() == b'{"ind'
    assert read_jsonl(path) == []


def test_a_run_killed_while_writing_its_config_is_started_afresh(tmp_path):
    # A kill during the first write of config.json leaves its temporary file beside it:
    # no result yet, so the directory is not a started run and needs no --resume.
    run = RunDir.create(tmp_path / "run", {"command": "attack", "seed": 0})
    (run.path / ".config.json.k1ll3d0x.tmp").write_text('{"comm')
    assert not run.started()
    again = RunDir.create(tmp_path / "run", {"command": "attack", "seed": 1})
    assert again.config()["seed"] == 1
    assert sorted(p.name for p in run.path.iterdir()) == ["arrays", "config.json"]


def test_a_sweep_again_with_another_min_fidelity_is_the_same_sweep(tmp_path):
    # min_fidelity picks the summary's beta, not the rows: the rows stay valid for it.
    run = RunDir.create(tmp_path / "run", {"command": "attack", "seed": 0})
    held = {"betas": [1.0, 10.0], "smoothgrad_n": 2, "min_fidelity": 0.5}
    run.start_sweep(held)
    run.append([{"index": 0, "method": "gradient", "defense": "beta_smooth", "beta": 1.0}], "sweep")
    run.check_sweep({**held, "betas": [10.0, 1.0], "min_fidelity": 0.9})
    with pytest.raises(InputError) as err:
        run.check_sweep({**held, "smoothgrad_n": 3})
    assert str(err.value) == (
        f"{run.path} holds a sweep whose smoothgrad_n is 2 (3 now) in sweep.jsonl; sweep again "
        "with those settings, or delete sweep.jsonl to start a new one"
    )


def test_read_arrays_names_a_damaged_arrays_file_in_one_line(tmp_path):
    # A file cut short after the run (a copy, a full disk elsewhere) is named, not a raw
    # zipfile error; read_npz reads every array, so the damage is found on loading.
    run = RunDir.create(tmp_path / "run", {"command": "attack", "seed": 0})
    path = run.save_arrays("gradient", 0, {"index": np.arange(2), "x": np.zeros((2, 3))})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))} is a damaged \.npz archive"):
        run.read_arrays("gradient")


def test_settings_that_older_runs_lack_are_compared_only_where_recorded(tmp_path):
    old = RunDir.create(tmp_path / "old", {"command": "attack", "seed": 0})
    old.append([{"index": 0, "method": "a"}])
    RunDir.create(old.path, {"command": "attack", "seed": 0, "goal_targeted": True}, resume=True)
    config = {"command": "attack", "seed": 0, "goal_targeted": False, "inputs_sha256": "aa"}
    new = RunDir.create(tmp_path / "new", config)
    new.append([{"index": 0, "method": "a"}])
    with pytest.raises(InputError) as info:
        RunDir.create(new.path, {**config, "goal_targeted": True}, resume=True)
    assert str(info.value) == (
        f"--resume with a different setting: goal_targeted is False in {new.config_path} "
        "but True now; use the same settings or choose a new --out"
    )
    with pytest.raises(InputError, match=r"^--resume with other inputs: the images, labels"):
        RunDir.create(new.path, {**config, "inputs_sha256": "bb"}, resume=True)


def test_an_out_that_is_a_file_is_refused_and_left_as_it_is(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    for resume in (False, True):
        with pytest.raises(InputError) as info:
            RunDir.create(path, {"command": "attack", "seed": 0}, resume=resume)
        assert str(info.value) == f"{path} is a file; expected a directory for --out"
    assert path.read_text() == "mine"


@pytest.mark.parametrize(
    ("mean", "std", "read"),
    [(None, [0.5], ([0.0], [0.5])), ([0.2], None, ([0.2], [1.0])), (None, None, (None, None))],
)
def test_a_run_with_one_normalisation_statistic_reads_with_the_other_at_its_old_default(
    tmp_path, mean, std, read
):
    # Up to 0.9.0 --mean or --std could be given alone; the other was 0 or 1.
    run = RunDir.create(tmp_path / "run", {"command": "attack", "mean": mean, "std": std})
    assert (run.config()["mean"], run.config()["std"]) == read


def test_a_sweep_arrays_file_without_its_betas_is_named_in_one_line():
    with pytest.raises(InputError) as info:
        SweepBatch.from_npz({"index": np.arange(2)}, "arrays/sweep-a-0.npz")
    assert str(info.value) == (
        "arrays/sweep-a-0.npz lacks betas; expected the arrays of a betasmooth SweepBatch"
    )


def test_the_config_keeps_the_command_line_it_is_given_else_the_processs(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["python", "-c"])
    given = ["betasmooth", "attack", "--n", "2"]
    run = RunDir.create(tmp_path / "given", {"command": "attack", "argv": given})
    assert run.config()["argv"] == given
    assert RunDir.create(tmp_path / "api", {"command": "attack"}).config()["argv"] == [
        "python",
        "-c",
    ]


def test_check_methods_names_the_first_method_asked_for_that_fails():
    # Two methods fail for different reasons: the error is that of the first in the
    # order given (the order a run takes them), the others that can run listed after.
    from betasmooth.runs import check_methods

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2), torch.nn.Softmax(1))
    bogus = {"gradient": {"bogus": 1}}  # gradient takes no options; lrp has no Softmax rule
    with pytest.raises(InputError) as err:
        check_methods(net, ["gradient", "lrp", "input_x_gradient"], bogus)
    assert str(err.value).startswith("unknown option 'bogus' for method 'gradient'")
    assert str(err.value).endswith("; of the methods asked for, input_x_gradient can run")
    with pytest.raises(InputError) as err:
        check_methods(net, ["lrp", "gradient", "input_x_gradient"], bogus)
    assert str(err.value).startswith("lrp has no rule for module Softmax (2)")
    assert str(err.value).endswith("; of the methods asked for, input_x_gradient can run")


def test_attack_methods_refuses_a_method_whose_maps_are_not_differentiable():
    # Captum's maps carry no graph to x: the list is refused as it is parsed, before a
    # run directory is made, not at the first batch; explain takes the same name.
    from betasmooth.runs import attack_methods, explain_methods

    with pytest.raises(InputError, match=r"^captum:Saliency cannot be attacked: its maps are not"):
        attack_methods("gradient,captum:Saliency")
    assert explain_methods("gradient,captum:Saliency") == ["gradient", "captum:Saliency"]


def test_attack_run_keeps_each_image_within_the_eps_it_is_given(tmp_path, digits, digits_cnn):
    # eps bounds the L-inf distance of x_adv from x (the attack's projection); a run must
    # hand it on, and a step of lr 0.05 would go past it at the first step.
    from betasmooth.runs import attack_run

    x, y = digits
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    eps = 0.004
    attack_run(run, digits_cnn, x[:2], y[:2], ["gradient"], steps=3, lr=0.05, eps=eps)
    (file,) = run.batch_files()["gradient"].values()
    with np.load(file) as saved:
        moved = np.abs(saved["x_adv"] - saved["x"]).max()
    assert 0 < moved <= eps + 1e-6


def test_an_attack_run_asked_for_no_progress_writes_no_bar(tmp_path, capsys, digits, digits_cnn):
    # progress=False hides the batches' bar and the bar of each batch's steps below it.
    from betasmooth.runs import attack_run

    x, y = digits
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    capsys.readouterr()
    attack_run(run, digits_cnn, x[:2], y[:2], ["gradient"], steps=2, progress=False)
    assert capsys.readouterr().err == ""


def test_explain_records_hold_the_predicted_logit_and_the_arrays_the_images(
    tmp_path, digits, digits_cnn
):
    # The oracle is the model called here: the logit of the class it predicts, and the
    # images stored are those explained, not copies of some other tensor.
    from betasmooth.runs import explain_run

    x, y = digits
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    records = explain_run(run, digits_cnn, x[:3], y[:3], ["gradient"])
    with torch.no_grad():
        logits = digits_cnn(x[:3])
    assert [r["index"] for r in records] == [0, 1, 2]
    for r, row in zip(records, logits):
        assert r["label"] == int(row.argmax())
        assert r["logit"] == pytest.approx(float(row.max()), rel=1e-6)
    # Three images whose predictions differ: a logit of a fixed class would not pass.
    assert len({int(row.argmax()) for row in logits}) > 1
    (file,) = run.batch_files()["gradient"].values()
    with np.load(file) as saved:
        np.testing.assert_array_equal(saved["x"], x[:3].numpy())


def test_curvature_rows_carry_the_true_label_given_not_the_prediction(tmp_path, digits_cnn):
    # Labels chosen to differ from every prediction: a row must carry the one given.
    from betasmooth.runs import curvature_run

    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        predicted = digits_cnn(x).argmax(1)
    y = (predicted + 1) % 10
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    rows = curvature_run(run, digits_cnn, x, y, [None], options={"iterations": 2, "probes": 1})
    assert [(r["index"], r["label"], r["true_label"]) for r in rows] == [
        (i, int(predicted[i]), int(y[i])) for i in range(2)
    ]


def test_a_warning_whose_newline_a_kill_cut_off_is_kept_once_when_said_again(tmp_path):
    # The last line has no newline, so it is read as cut and the warning said again on
    # --resume is appended; the append ends that line, and both copies parse.
    (tmp_path / "warnings.jsonl").write_text('{"command": "attack", "warning": "w"}')
    run = RunDir(tmp_path)
    run.add_warnings("attack", ["w"])
    run.add_warnings("explain", ["w"])  # another command's is another warning
    assert run.read_warnings() == [
        {"command": "attack", "warning": "w"},
        {"command": "explain", "warning": "w"},
    ]


@pytest.mark.parametrize("line", ["[1]", '"look here"', '{"command": "attack"}'])
def test_a_line_of_warnings_that_is_no_warning_is_named_with_its_line(tmp_path, line):
    # Read for the report and before each warning is kept: a foreign line would have
    # ended either with a traceback.
    (tmp_path / "warnings.jsonl").write_text(f'{{"command": "attack", "warning": "w"}}\n{line}\n')
    with pytest.raises(InputError) as err:
        RunDir(tmp_path).read_warnings()
    assert str(err.value) == (
        f"{tmp_path / 'warnings.jsonl'}, line 2, is not a betasmooth warning; expected a JSON "
        "object with command and warning: remove that line"
    )


def test_a_sweep_checks_the_clean_images_in_the_lrp_box_of_its_data_range(
    tmp_path, digits, digits_cnn
):
    # LRP's z^B box is the sweep's data_range (here [0, 2.5]), not [0, 1]: attacked
    # images moved to [2, 2.5] lie inside it, and clean ones moved to [5, 6] outside:
    # refused, naming that box and the clean images, before the sweep writes.
    run = _lrp_attack(
        tmp_path, digits, digits_cnn, lambda a: {"x": a["x"] + 5.0, "x_adv": 2.0 + 0.5 * a["x_adv"]}
    )
    box = r"^x lies outside the lrp input box \[0\.0, 2\.5\]"
    _refused_before_writing(run, box, digits_cnn, [1.0], smoothgrad_n=2, data_range=(0.0, 2.5))


def test_a_sweep_checks_that_its_defenses_can_explain_the_model_before_it_writes(
    tmp_path, digits, digits_cnn
):
    # An LRP attack swept with the model given a Softmax head (which LRP has no rule
    # for): both smoothing defenses of LRP are refused at once, naming the module,
    # before the sweep records its settings or computes a batch.
    run = _lrp_attack(tmp_path, digits, digits_cnn)
    head = torch.nn.Sequential(digits_cnn, torch.nn.Softmax(1)).eval()
    _refused_before_writing(
        run, r"^lrp has no rule for module Softmax", head, [1.0], smoothgrad_n=2
    )


def _guided_maps(model, xs, method, label, beta, *, sigma, n, seed, input_range, base_options):
    """A registered defense named as a method that smooths no base: guided backprop."""
    return bs.heatmap(bs.explain(model, xs, "guided_backprop", label))


def test_a_registered_defense_named_as_a_method_without_a_base_is_not_checked_as_one(
    tmp_path, digits, digits_cnn, monkeypatch
):
    # Only the defenses that smooth a base (beta_smooth, smoothgrad) are checked as
    # methods given a base: a registered defense named guided_backprop, a method that
    # takes no base, is swept, and its stored maps are guided backprop's of x_adv.
    from betasmooth.defense import DEFENSES
    from betasmooth.runs import attack_run, sweep_run

    monkeypatch.setitem(DEFENSES, "guided_backprop", _guided_maps)
    x, y = digits[0][:2], digits[1][:2]
    run = RunDir.create(tmp_path / "run", {"command": "attack"})
    attack_run(run, digits_cnn, x, y, ["gradient"], steps=1)
    rows = sweep_run(run, digits_cnn, [1.0], smoothgrad_n=2, defenses=["guided_backprop"])
    assert sorted((r["index"], r["defense"]) for r in rows) == [
        (0, "guided_backprop"),
        (1, "guided_backprop"),
    ]
    x_adv = torch.from_numpy(read_npz(run.arrays_file("gradient", 0))["x_adv"])
    label = digits_cnn(x).argmax(1)
    want = bs.heatmap(bs.explain(digits_cnn, x_adv, "guided_backprop", label))
    swept = run.read_arrays("gradient", "sweep")["maps_guided_backprop"][:, 0]
    np.testing.assert_allclose(swept, want.detach().numpy(), atol=1e-6)


def test_a_sweep_checks_each_batch_in_its_own_images_lrp_boxes(tmp_path, digits, digits_cnn):
    # Per-image LRP boxes given as the attack's options, [0, 1] for image 0 and [2, 3]
    # for image 1, whose arrays (a batch of its own) are moved into [2, 3]: each batch
    # is checked in its images' rows of the boxes given, so the sweep runs; the same
    # boxes swapped leave image 1 outside its box, refused before the sweep writes
    # (the data's range, [0, 3], holds both: the boxes given are what refuses).
    from betasmooth.runs import sweep_run

    def moved(arrays):
        return {"x": arrays["x"] + 2.0, "x_adv": arrays["x_adv"] + 2.0}

    run = _lrp_attack(tmp_path, digits, digits_cnn, moved, batch=1, batch_size=1)
    low = torch.tensor([0.0, 2.0], dtype=torch.float32).view(2, 1, 1, 1)
    swapped = {"lrp": {"low": low.flip(0), "high": low.flip(0) + 1.0}}
    box = r"^x lies outside the lrp input box"
    _refused_before_writing(
        run, box, digits_cnn, [1.0], method_options=swapped, data_range=(0.0, 3.0)
    )
    boxes = {"lrp": {"low": low, "high": low + 1.0}}
    rows = sweep_run(
        run, digits_cnn, [1.0], defenses=["beta_smooth"], method_options=boxes, data_range=(0, 3)
    )
    assert sorted(r["index"] for r in rows) == [0, 1]


def test_seeded_draws_from_the_seed_and_restores_both_global_generators():
    # Oracle: fresh generators seeded by hand. Inside, torch's generator is seeded with
    # the seed and numpy's with the seed mod 2^32; after, both draw on as if the block
    # had never run (the caller's own draws are not disturbed).
    from betasmooth.units import seeded

    seed = 2**32 + 7
    torch.manual_seed(123)
    np.random.seed(5)
    with seeded(seed, torch.device("cpu")):
        inside_torch, inside_numpy = torch.rand(3), np.random.rand(3)
    after_torch, after_numpy = torch.rand(3), np.random.rand(3)
    torch.testing.assert_close(
        inside_torch, torch.rand(3, generator=torch.Generator().manual_seed(seed)), rtol=0, atol=0
    )
    np.testing.assert_array_equal(inside_numpy, np.random.RandomState(7).rand(3))
    torch.testing.assert_close(
        after_torch, torch.rand(3, generator=torch.Generator().manual_seed(123)), rtol=0, atol=0
    )
    np.testing.assert_array_equal(after_numpy, np.random.RandomState(5).rand(3))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_unit_is_done_by_exactly_one_rank_whatever_the_batch_size(tmp_path, world):
    # Each rank records which units it ran: together they cover the plan once, rank r
    # taking every world-th unit from the r-th, and the merged records hold every
    # (index, method) once, for every batch size and rank count.
    run = RunDir.create(tmp_path / "run", {"command": "test"})
    for batch in (1, 2, 3):
        units = plan(["a", "b"], range(7), batch)
        done: list[tuple[int, Unit]] = []
        # Rank 0 last: it merges every rank's records at its end (barriers are no-ops here).
        for rank in reversed(range(world)):

            def work(unit, rank=rank, done=done):
                done.append((rank, unit))
                return [{"index": i, "method": unit.method} for i in unit.indices], None

            shard = RunDir(run.path, rank, world) if world > 1 else run
            name = f"w{batch}"
            execute(shard, units, work, name=name, dist=Dist(rank, world), keeps_arrays=False,
                    progress=False)  # fmt: skip
        assert Counter(u for _, u in done) == Counter(units)
        assert all(units.index(u) % world == rank for rank, u in done)
        merged = read_jsonl(run.path / f"w{batch}.jsonl")
        assert [(r["index"], r["method"]) for r in merged] == sorted(
            (i, m) for i in range(7) for m in "ab"
        )


def test_plan_keeps_the_order_of_the_indices_it_is_given():
    # Consecutive batches of the indices as given (here not sorted), method by method.
    units = plan(["a", "b"], [5, 3, 9, 1, 0], 2)
    assert [(u.method, u.indices) for u in units] == [
        ("a", (5, 3)), ("a", (9, 1)), ("a", (0,)), ("b", (5, 3)), ("b", (9, 1)), ("b", (0,)),
    ]  # fmt: skip


def test_a_rank_waits_for_every_rank_after_reading_and_after_writing(tmp_path):
    # The protocol of a torchrun job (barriers are no-ops in one process, so they are
    # recorded here): the run folder is tidied by rank 0 alone (Dist.first) before anything
    # is read, every rank reads the finished work before any rank adds to it, and rank 0
    # merges (Dist.first again) only after every rank has written its last batch.
    events: list[str] = []

    class Recorded(Dist):
        def barrier(self):
            events.append("barrier")

        def first(self, work):
            events.append("first")
            return super().first(work)

    def work(unit):
        events.append(f"work {unit.indices}")
        return [{"index": i, "method": unit.method} for i in unit.indices], None

    run = RunDir.create(tmp_path / "run", {"command": "test"})
    execute(run, plan(["a"], range(3), 2), work, dist=Recorded(), keeps_arrays=False,
            progress=False)  # fmt: skip
    assert events == [
        "first", "barrier", "work (0, 1)", "work (2,)", "barrier", "first",
    ]  # fmt: skip


def test_the_bar_by_default_is_shown_on_a_terminal_alone(tmp_path, monkeypatch):
    # progress=None (the default) shows the bar where stderr is a terminal, and only
    # there: a log file gets none. Oracle: the items counted, 3 of 3.
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        run = RunDir.create(tmp_path / f"run{shown}", {"command": "test"})
        execute(run, plan(["a"], range(3), 2), _square, desc="batches")
        counts = re.findall(r"batches: +\d+%\|[^|]*\| *(\d+)/(\d+)", stream.getvalue())
        assert (counts[-1:] == [("3", "3")]) if shown else ("batches" not in stream.getvalue())


def test_work_on_a_finished_run_first_deletes_the_temporary_files_a_kill_left(tmp_path):
    # A sweep adds to a finished run without writing its config (which tidies too): the
    # temporary files of writes that a kill cut (mkstemp's ".<name>.<8 chars><suffix>")
    # go before the work starts; other files stay.
    import os
    import tempfile
    from pathlib import Path

    run = RunDir.create(tmp_path / "run", {"command": "test"})
    stale = []
    temporary = ((run.path, "results.jsonl", ".tmp"), (run.arrays, "a-0.npz", ".npz"))
    for folder, name, suffix in temporary:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=suffix)
        os.close(fd)
        stale.append(Path(tmp))
    (run.path / "notes.txt").write_text("kept")
    execute(run, plan(["a"], range(2), 2), _square, progress=False)
    assert [p.exists() for p in stale] == [False, False]
    assert (run.path / "notes.txt").read_text() == "kept"
