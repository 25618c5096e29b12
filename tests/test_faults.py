"""Faults a run survives: lost or corrupt files, a full disk, a read-only folder, a failed start."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from betasmooth import store
from betasmooth.cli import main
from betasmooth.store import RunDir, read_jsonl
from betasmooth.validate import InputError

ATTACK = ["attack", "--model", "digits-cnn", "--data", "digits", "--no-progress", "--steps", "3"]
ARGS = ["--method", "gradient", "-n", "6", "--batch-size", "2", "--seed", "0"]


def _keys(records: list[dict]) -> list[tuple[int, str]]:
    return [(r["index"], r["method"]) for r in records]


def _values(records: list[dict]) -> dict[tuple[int, str], float]:
    return {(r["index"], r["method"]): r["expl_pcc_target"] for r in records}


def _error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main([*ATTACK, *ARGS, "--out", str(out)]) == 0
    return out, read_jsonl(out / "results.jsonl")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_and_corrupt_arrays_are_computed_again(finished, tmp_path, capsys):
    run, expected = _copy(finished[0], tmp_path / "run"), finished[1]
    (run / "arrays" / "gradient-2.npz").unlink()
    corrupt = run / "arrays" / "gradient-4.npz"
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    untouched = (run / "arrays" / "gradient-0.npz").read_bytes()
    assert main([*ATTACK, *ARGS, "--out", str(run), "--resume"]) == 0
    assert "4 finished items of gradient" in capsys.readouterr().err
    records = read_jsonl(run / "results.jsonl")
    assert _keys(records) == _keys(expected) == [(i, "gradient") for i in range(6)]
    # Per-item seeds and a deterministic attack give the same numbers again.
    assert _values(records) == pytest.approx(_values(expected), abs=1e-6)
    assert (run / "arrays" / "gradient-0.npz").read_bytes() == untouched
    for first in (2, 4):
        with np.load(run / "arrays" / f"gradient-{first}.npz") as data:
            assert data["index"].tolist() == [first, first + 1]


def test_corrupt_config_and_foreign_results_line_are_named(finished, tmp_path, capsys):
    run = _copy(finished[0], tmp_path / "run")
    with open(run / "results.jsonl", "a") as f:
        f.write('{"note": "added by hand"}\n')
    assert main([*ATTACK, *ARGS, "--out", str(run), "--resume"]) == 2
    line = _error_line(capsys)
    assert f"{run / 'results.jsonl'}, line 7, is not a betasmooth record" in line
    (run / "config.json").write_text('{"command": "attack",\n "seed": ')
    assert main(["sweep", str(run), "--betas", "1", "--no-progress"]) == 2
    assert f"{run / 'config.json'} is corrupt (line 2)" in _error_line(capsys)


def test_attack_resume_keeps_the_sweep_settings_a_later_sweep_is_checked_against(
    finished, tmp_path, capsys
):
    run = _copy(finished[0], tmp_path / "run")
    sweep = ["sweep", str(run), "--betas", "1", "--smoothgrad-n", "2", "--no-progress"]
    assert main(sweep) == 0
    rows = read_jsonl(run / "sweep.jsonl")
    assert main([*ATTACK, *ARGS, "--out", str(run), "--resume"]) == 0
    capsys.readouterr()
    config = json.loads((run / "config.json").read_text())
    assert config["sweep"] == {"betas": [1.0], "smoothgrad_n": 2, "min_fidelity": 0.9}
    assert main([*sweep[:-2], "3", "--no-progress"]) == 2
    assert "holds a sweep whose smoothgrad_n is 2 (3 now) in sweep.jsonl" in _error_line(capsys)
    assert read_jsonl(run / "sweep.jsonl") == rows


def test_results_and_sweep_rows_left_in_rank_files_are_named_as_such(finished, tmp_path, capsys):
    # What a torchrun job killed before rank 0 merged its files leaves behind.
    run = _copy(finished[0], tmp_path / "run")
    lines = (run / "results.jsonl").read_text().splitlines(keepends=True)
    (run / "results-rank0.jsonl").write_text("".join(lines[::2]))
    (run / "results-rank1.jsonl").write_text("".join(lines[1::2]))
    (run / "results.jsonl").unlink()
    sweep = ["sweep", str(run), "--betas", "1", "--smoothgrad-n", "2", "--no-progress"]
    assert main(sweep) == 2
    assert "is finished, but its processes' results are not merged yet; " in _error_line(capsys)
    assert main([*ATTACK, *ARGS, "--out", str(run), "--resume"]) == 0
    assert main(sweep) == 0
    (run / "sweep.jsonl").rename(run / "sweep-rank0.jsonl")
    capsys.readouterr()
    assert main([*sweep[:-2], "3", "--no-progress"]) == 2
    assert _error_line(capsys).endswith(
        "in sweep-rank0.jsonl; sweep again with those settings, or delete sweep-rank0.jsonl "
        "to start a new one"
    )


def test_an_error_line_without_stderr_goes_to_stdout(monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys, "stderr", None)  # pythonw, a detached service
    assert main(["report", "/nonexistent/run"]) == 2
    assert capsys.readouterr().out.startswith("betasmooth: error: /nonexistent/run is not a")


def test_an_error_line_is_written_whole_in_one_write(monkeypatch):
    # print() writes a line and its newline apart: two ranks' lines ran together.
    import io
    import sys

    class Writes(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def write(self, text: str) -> int:
            self.calls.append(text)
            return len(text)

    stream = Writes()
    monkeypatch.setattr(sys, "stderr", stream)
    assert main(["report", "/nonexistent/run"]) == 2
    assert len(stream.calls) == 1 and stream.calls[0].startswith("betasmooth: error: ")
    assert stream.calls[0].endswith("\n") and stream.calls[0].count("\n") == 1


@pytest.mark.parametrize(
    ("name", "remedy"),
    [
        ("sweep_summary.json", "delete it and run betasmooth sweep again"),
        ("theory.json", "delete it and run the command that wrote it again"),
    ],
)
def test_a_damaged_summary_is_named_in_one_line(finished, tmp_path, capsys, name, remedy):
    run = _copy(finished[0], tmp_path / "run")
    assert main(["sweep", str(run), "--betas", "1", "--smoothgrad-n", "2", "--no-progress"]) == 0
    capsys.readouterr()
    (run / name).write_text('{"betas": [1.0,\n')
    assert main(["report", str(run)]) == 2
    assert _error_line(capsys) == (
        f"betasmooth: error: {run / name} is corrupt (line 2); expected the JSON object a "
        f"betasmooth run writes: {remedy}"
    )
    (run / name).write_text("[1, 2]\n")
    assert main(["report", str(run)]) == 2
    assert f"{run / name} holds no JSON object" in _error_line(capsys)


def test_full_disk_ends_with_one_line_and_resume_finishes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = np.savez_compressed
    calls = []

    def filling(file, **arrays):
        calls.append(file)
        if len(calls) == 2:  # the disk fills while the second batch is written
            raise OSError(errno.ENOSPC, "No space left on device")
        real(file, **arrays)

    monkeypatch.setattr(np, "savez_compressed", filling)
    assert main([*ATTACK, *ARGS, "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert (
        line == f"betasmooth: error: No space left on device: {out / 'arrays' / 'gradient-2.npz'}"
    )
    assert _keys(read_jsonl(out / "results.jsonl")) == [(0, "gradient"), (1, "gradient")]
    assert sorted(p.name for p in (out / "arrays").iterdir()) == ["gradient-0.npz"]
    monkeypatch.setattr(np, "savez_compressed", real)
    assert main([*ATTACK, *ARGS, "--out", str(out), "--resume"]) == 0
    assert _keys(read_jsonl(out / "results.jsonl")) == [(i, "gradient") for i in range(6)]


def test_a_write_error_names_the_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(store.tempfile, "mkstemp", read_only)
    assert main([*ATTACK, *ARGS, "--out", str(out)]) == 2
    assert _error_line(capsys) == (
        f"betasmooth: error: Read-only file system: {out / 'config.json'}"
    )


def test_an_error_on_the_temporary_file_names_the_file_it_becomes(tmp_path):
    # The atomic write's rename onto a directory fails in the system's words, on the
    # temporary file (.figure.png.XXXX.tmp): the line names figure.png instead.
    target = tmp_path / "figure.png"
    target.mkdir()
    with pytest.raises(IsADirectoryError) as failed:
        store.write_bytes(target, b"png")
    assert (failed.value.errno, failed.value.filename) == (errno.EISDIR, str(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]


def test_an_out_folder_that_cannot_be_written_is_refused_before_the_model_loads(
    tmp_path, monkeypatch, capsys
):
    # Root may write anywhere, so the system's answer for the folder is set here.
    from betasmooth import runs

    locked = tmp_path / "locked"
    locked.mkdir()
    real = store.os.access
    monkeypatch.setattr(
        store.os, "access", lambda path, mode: Path(path) != locked and real(path, mode)
    )
    loaded = []
    monkeypatch.setattr(runs, "load_inputs", lambda *a, **k: loaded.append(a))
    assert main([*ATTACK, *ARGS, "--out", str(locked / "new" / "run")]) == 2
    assert _error_line(capsys) == (
        f"betasmooth: error: {locked} is not writable; expected --out in a folder this user "
        "can write to"
    )
    assert loaded == [] and not (locked / "new").exists()


def test_an_os_error_of_no_file_is_said_as_the_system_says_it(tmp_path, monkeypatch, capsys):
    # No file to name: the line is the error itself, not "...: None".
    from betasmooth import runs

    def failing(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(runs, "load_inputs", failing)
    out = tmp_path / "run"
    assert main([*ATTACK, *ARGS, "--out", str(out)]) == 2
    assert _error_line(capsys) == "betasmooth: error: [Errno 5] Input/output error"
    assert not out.exists()


def test_a_report_that_cannot_be_written_leaves_the_old_one_whole(
    finished, tmp_path, monkeypatch, capsys
):
    # The page and the figures are written to a temporary file first: a full
    # disk (or a kill) while rebuilding leaves the previous report as it was.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    before = {p: p.read_bytes() for p in [run / "report.html", *(run / "figures").iterdir()]}
    real = store.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", full)
    assert main(["report", str(run)]) == 2
    assert _error_line(capsys).startswith("betasmooth: error: No space left on device: ")
    monkeypatch.setattr(store.os, "fsync", real)
    assert {p: p.read_bytes() for p in before} == before
    leftovers = [p.name for p in [*run.iterdir(), *(run / "figures").iterdir()]]
    assert not [name for name in leftovers if name.startswith(".")]


@pytest.mark.skipif(store.fcntl is None, reason="needs flock")
def test_a_second_process_writing_the_same_run_is_refused(finished, tmp_path, capsys):
    # Another process holds the directory (a run still working, or its orphaned
    # torchrun workers): attack --resume and sweep are refused and write nothing.
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        expected = (
            f"betasmooth: error: another betasmooth process is writing to {run}; wait until it "
            "has finished, or stop it, and run the command again"
        )
        assert main([*ATTACK, *ARGS, "--out", str(run), "--resume"]) == 2
        assert _error_line(capsys) == expected
        assert main(["sweep", str(run), "--betas", "1", "--smoothgrad-n", "2"]) == 2
        assert _error_line(capsys) == expected
        assert sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*")) == before
    finally:
        holder.communicate("")
    # Once it has exited (even killed), the run is free.
    assert main(["sweep", str(run), "--betas", "1", "--smoothgrad-n", "2", "--no-progress"]) == 0


@pytest.mark.skipif(store.fcntl is None, reason="needs flock")
def test_a_surviving_rank_of_a_torchrun_job_holds_the_run(finished, tmp_path, capsys):
    # The ranks after 0 hold arrays/ shared: a rank whose rank 0 was killed
    # still writes there, and a --resume must wait for it.
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); sys.stdin.read()",
         str(run / "arrays")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        assert main([*ATTACK, *ARGS, "--out", str(run), "--resume"]) == 2
        assert "another betasmooth process is writing to" in _error_line(capsys)
    finally:
        holder.communicate("")
    assert main([*ATTACK, *ARGS, "--out", str(run), "--resume"]) == 0


@pytest.mark.skipif(store.fcntl is None, reason="needs flock")
def test_a_run_held_by_another_betasmooth_process_is_refused(tmp_path):
    # Both processes take the lock the same way: rank 0's hold must exclude another rank 0.
    import subprocess
    import sys

    run = store.RunDir.create(tmp_path / "run", {"command": "attack"})
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from betasmooth.store import RunDir; "
         "RunDir(sys.argv[1]).lock(); print('held', flush=True); sys.stdin.read()", str(run.path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(InputError, match="another betasmooth process is writing to"):
            run.lock()
    finally:
        holder.communicate("")
    with run.held():  # free once the holder has exited
        pass


def _lock_state(path) -> str:
    """``held`` or ``free``: whether another process can take the run's lock now."""
    import subprocess
    import sys

    probe = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
        "except OSError:\n    print('held')"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True)
    return done.stdout.decode().strip()


@pytest.mark.skipif(store.fcntl is None, reason="needs flock")
def test_holding_a_run_twice_in_one_process_counts(tmp_path):
    run = store.RunDir(tmp_path / "run")
    with run.held():
        with run.held():
            assert _lock_state(run.path) == "held"
        # The inner block's end does not free what the outer one holds, nor does
        # a command that ends in the block.
        assert _lock_state(run.path) == "held"
        assert main(["theorem", "--out", str(tmp_path / "t"), "--quick"]) == 0
        assert _lock_state(run.path) == "held"
    assert _lock_state(run.path) == "free"


@pytest.mark.skipif(store.fcntl is None, reason="needs flock")
def test_a_command_holds_its_run_after_the_work_until_it_ends(tmp_path):
    # Inside holding_locks (a whole command) the last unlock of the work keeps the run held.
    run = store.RunDir(tmp_path / "run")
    with store.holding_locks():
        with run.held():
            pass
        assert _lock_state(run.path) == "held"
    assert _lock_state(run.path) == "free"


@pytest.mark.skipif(store.fcntl is None, reason="needs flock")
def test_the_python_api_holds_a_run_only_while_it_works(tmp_path):
    # A notebook that made a run must not keep a command in a terminal from sweeping it.
    from betasmooth.runs import attack_run, load_inputs

    model, x, y = load_inputs("digits-cnn", "digits", n=2)
    run = store.RunDir.create(tmp_path / "run", {"command": "attack", "seed": 0})
    attack_run(run, model, x, y, ["gradient"], steps=2)
    assert _lock_state(run.path) == "free"


def test_report_removes_the_temporary_files_of_a_killed_report(finished, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    stale = [run / ".report.html.x1abcdef.tmp", run / "figures" / ".grid_gradient.png.y2abcdef.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    assert main(["report", str(run)]) == 0
    assert not any(p.exists() for p in stale)
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_a_run_that_fails_before_its_first_result_can_be_started_again(tmp_path, capsys):
    out = tmp_path / "run"
    # One image cannot be attacked (its target map is another image's).
    assert main([*ATTACK, "--method", "gradient", "-n", "1", "--out", str(out)]) == 2
    assert "at least 2 images" in _error_line(capsys)
    assert main([*ATTACK, *ARGS, "--out", str(out)]) == 0
    assert len(read_jsonl(out / "results.jsonl")) == 6
    assert json.loads((out / "config.json").read_text())["n"] == 6


def test_report_and_sweep_refuse_what_they_cannot_use(finished, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    assert main(["report", str(folder)]) == 2
    assert "has no config.json" in _error_line(capsys)
    assert list(folder.iterdir()) == []
    explained = tmp_path / "explained"
    argv = ["explain", "--model", "digits-cnn", "--data", "digits", "--no-progress"]
    assert main([*argv, "--method", "gradient", "-n", "2", "--out", str(explained)]) == 0
    capsys.readouterr()
    assert main(["sweep", str(explained), "--betas", "1", "--no-progress"]) == 2
    assert "holds the output of betasmooth explain; a sweep needs" in _error_line(capsys)
    unfinished = _copy(finished[0], tmp_path / "unfinished")
    lines = (unfinished / "results.jsonl").read_text().splitlines(keepends=True)
    (unfinished / "results.jsonl").write_text("".join(lines[:4]))
    assert main(["sweep", str(unfinished), "--betas", "1", "--no-progress"]) == 2
    assert "is unfinished (4 of 6 items)" in _error_line(capsys)


def test_attack_and_explain_runs_write_a_report_with_their_maps(finished, tmp_path):
    from betasmooth.report import build_report

    html = (finished[0] / "report.html").read_text()
    assert "id='method_gradient'" in html and "grid_gradient.png" not in html  # embedded
    out = tmp_path / "explained"
    argv = ["explain", "--model", "digits-cnn", "--data", "digits", "--no-progress", "-n", "3"]
    assert main([*argv, "--method", "gradient,lrp", "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "<h2 id='explain'>Explanations</h2>" in html and "Attack results" not in html
    assert "First 3 images" in html and "explain-medians" in html
    assert "<th>gradient</th>" in html and "<th>lrp</th>" in html
    assert build_report(out).read_text() == html


def test_a_run_with_arrays_but_no_records_yet_is_not_started_over(tmp_path):

    config = {"command": "attack", "steps": 10, "seed": 0}
    run = RunDir.create(tmp_path / "run", config)
    # execute() writes a batch's arrays before its records: a kill in between leaves this.
    run.save_arrays("gradient", 0, {"index": np.arange(2), "value": np.zeros(2)})
    assert run.started()
    with pytest.raises(InputError, match="is not empty; pass --resume"):
        RunDir.create(run.path, {**config, "steps": 30})
    # Only a temporary file of an interrupted write does not count.
    (run.arrays / "gradient-0.npz").unlink()
    (run.arrays / ".gradient-2.npz.abcd1234.npz").write_bytes(b"")
    assert not run.started()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_run_that_only_warned_before_its_first_result_is_started_again(tmp_path, rank):
    # Warnings are kept as they are said, so a model that warns and then fails on the
    # first batch leaves config.json, arrays/ and a warnings file: the run is started
    # again without --resume (0.20.0 said "not empty"), and what the failed one said,
    # perhaps under other settings, is not the new run's.
    config = {"command": "explain", "steps": 10, "seed": 0}
    run = RunDir.create(tmp_path / "run", config)
    RunDir(run.path, rank=rank, world_size=2).add_warnings("explain", [f"rank {rank}: w"])
    assert not run.read()  # no result of any rank
    assert not run.started()
    again = RunDir.create(run.path, {**config, "steps": 20})
    assert again.config()["steps"] == 20
    assert again.read_warnings() == []
    assert sorted(p.name for p in run.path.iterdir()) == ["arrays", "config.json"]


@pytest.mark.parametrize("left", ["rank file", "theory"])
def test_a_run_without_results_jsonl_yet_is_still_refused_without_resume(tmp_path, left):

    config = {"command": "attack", "steps": 10, "seed": 0}
    run = RunDir.create(tmp_path / "run", config)
    if left == "rank file":
        RunDir(run.path, rank=1, world_size=2).append([{"index": 1, "method": "gradient"}])
    else:
        run.write_theory({"checks": []})
    assert not run.results.exists() and run.started()
    with pytest.raises(InputError, match="is not empty; pass --resume"):
        RunDir.create(run.path, {**config, "steps": 30})


def test_an_arrays_file_with_a_short_per_item_array_is_repaired(tmp_path):
    from betasmooth.store import write_npz

    run = RunDir.create(tmp_path / "run", {"command": "test"})
    run.append([{"index": 0, "method": "a"}, {"index": 1, "method": "a"}])
    write_npz(run.arrays_file("a", 0), {"index": np.arange(2), "value": np.zeros(1)})
    said = []
    assert run.covered() == set()
    assert not run.arrays_file("a", 0).exists()
    write_npz(run.arrays_file("a", 0), {"index": np.arange(2), "value": np.zeros(1)})
    assert run.repair(say=said.append) == 2
    assert run.read() == [] and len(said) == 1


def test_repair_forgets_only_the_items_of_a_lost_arrays_file_and_counts_them(tmp_path):
    from betasmooth.store import write_npz

    run = RunDir.create(tmp_path / "run", {"command": "test"})
    run.append([{"index": i, "method": m} for i in range(3) for m in ("a", "b")])
    write_npz(run.arrays_file("a", 0), {"index": np.arange(3), "value": np.zeros(3)})
    write_npz(run.arrays_file("b", 0), {"index": np.arange(3), "value": np.zeros(3)})
    run.arrays_file("b", 0).unlink()  # the arrays of b's three items are lost
    said = []
    assert run.repair(say=said.append) == 3
    assert [(r["index"], r["method"]) for r in run.read()] == [(0, "a"), (1, "a"), (2, "a")]
    assert said[0].startswith("betasmooth: 3 finished items of b have a missing or corrupt")


def _attack_dir(tmp_path, n, indices, methods=("gradient",)):
    config = {
        "command": "attack",
        "model": "digits-cnn",
        "data": "digits",
        "seed": 0,
        "n": n,
        "methods": list(methods),
    }
    run = RunDir.create(tmp_path / "run", config)
    run.append([{"index": i, "method": m} for m in methods for i in indices])
    for m in methods:
        run.save_arrays(m, 0, {"index": np.asarray(indices)})
    return run


def test_check_attacked_counts_every_item_of_every_method(tmp_path):

    run = _attack_dir(tmp_path, 3, [0, 1])
    with pytest.raises(InputError, match=r"unfinished \(2 of 3 items\)"):
        run.check_attacked()
    run.append([{"index": 2, "method": "gradient"}])
    run.save_arrays("gradient", 0, {"index": np.arange(3)})
    assert run.check_attacked()["n"] == 3


def test_resume_keeps_the_creation_record(tmp_path):
    config = {"command": "attack", "seed": 0}
    run = RunDir.create(tmp_path / "run", config)
    run.append([{"index": 0, "method": "gradient"}])
    run.update_config(created="2020-01-01T00:00:00+00:00")
    RunDir.create(run.path, config, resume=True)
    assert run.config()["created"] == "2020-01-01T00:00:00+00:00"


@pytest.mark.parametrize("key", ["seed", "n"])
def test_a_sweep_refuses_a_run_whose_integer_setting_is_a_boolean(tmp_path, key):
    # JSON true is no seed nor count of images, though Python takes it for the int 1.
    config = {"command": "attack", "model": "digits-cnn", "data": "digits", "seed": 0, "n": 1}
    run = RunDir.create(tmp_path / "run", config | {key: True})
    with pytest.raises(InputError, match=f"has {key} = True; expected the int"):
        run.check_attacked()


def test_lost_arrays_of_items_left_in_a_rank_file_are_computed_again(tmp_path):
    # A torchrun job killed before rank 0 merged leaves rank 1's records in its rank file;
    # their arrays lost, the resumed run forgets them there too and computes them again.
    from betasmooth.distributed import Dist
    from betasmooth.units import execute, plan

    calls = []

    def work(unit):
        calls.append(unit.indices)
        values = [float(i * i) for i in unit.indices]
        records = [{"index": i, "method": "a", "value": v} for i, v in zip(unit.indices, values)]
        return records, {"index": np.asarray(unit.indices), "value": np.asarray(values)}

    run = RunDir.create(tmp_path / "run", {"command": "test"})
    units = plan(["a"], range(4), 2)
    execute(RunDir(run.path, 1, 2), units, work, dist=Dist(1, 2), progress=False)
    rank1 = run.path / "results-rank1.jsonl"
    assert calls == [(2, 3)] and [r["index"] for r in read_jsonl(rank1)] == [2, 3]
    run.arrays_file("a", 2).unlink()
    said = []
    records = execute(run, units, work, progress=False, message=said.append)
    assert calls == [(2, 3), (0, 1), (2, 3)]
    assert said[0].startswith("betasmooth: 2 finished items of a have a missing or corrupt")
    assert [(r["index"], r["value"]) for r in records] == [(i, float(i * i)) for i in range(4)]
    assert read_jsonl(run.results) == records and not rank1.exists()
    assert run.covered() == {(i, "a") for i in range(4)}
