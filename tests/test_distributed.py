"""torchrun: two gloo ranks write what one process writes; a killed rank is finished by --resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import betasmooth as bs
from betasmooth.cli import main
from betasmooth.store import read_jsonl

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
ARGS = ["attack", "--model", "digits-cnn", "--data", "digits", "--method", "gradient,lrp"]
ARGS += ["--no-progress"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _torchrun(argv: list[str], stderr: Path | None = None) -> subprocess.Popen:
    """torchrun in its own session; its stderr into the file ``stderr`` where one is given."""
    with open(stderr or os.devnull, "wb") as err:
        return subprocess.Popen(
            [*TORCHRUN, "-m", "betasmooth", *argv],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def _run_script(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    """The Python ``source`` run by two torchrun ranks, with ``tmp_path`` as its argument."""
    script = tmp_path / "script.py"
    script.write_text(source)
    return subprocess.run(
        [*TORCHRUN, str(script), str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            children = (task / "children").read_text().split()
            found += [int(c) for c in children]
            todo += [int(c) for c in children]
    return found


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


def _values(records: list[dict]) -> dict[tuple, dict]:
    return {
        (r["index"], r["method"]): {k: v for k, v in r.items() if k != "seconds"} for r in records
    }


@pytest.mark.slow
def test_two_ranks_write_what_one_process_writes(tmp_path):
    argv = [*ARGS, "-n", "6", "--batch-size", "2", "--steps", "3"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    proc = _torchrun([*argv, "--out", str(tmp_path / "two")], stderr=tmp_path / "stderr")
    assert proc.wait(timeout=300) == 0, (tmp_path / "stderr").read_text()[-3000:]
    one = read_jsonl(tmp_path / "one" / "results.jsonl")
    two = read_jsonl(tmp_path / "two" / "results.jsonl")
    assert [(r["index"], r["method"]) for r in two] == [(r["index"], r["method"]) for r in one]
    a, b = _values(one), _values(two)
    for key, row in a.items():
        assert b[key].keys() == row.keys()
        for field, value in row.items():
            if isinstance(value, float):
                assert b[key][field] == pytest.approx(value, rel=1e-4, abs=1e-7), (key, field)
            else:
                assert b[key][field] == value, (key, field)
    assert not list((tmp_path / "two").glob("results-rank*.jsonl"))
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("one", "two")]
    assert [(c["world_size"], c["process_group"]) for c in configs] == [(1, None), (2, "gloo")]
    names = sorted(p.name for p in (tmp_path / "two" / "arrays").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one" / "arrays").iterdir())


@pytest.mark.slow
def test_killed_rank_then_resume_has_every_item_once(tmp_path):
    out = tmp_path / "run"
    argv = [*ARGS, "-n", "6", "--batch-size", "1", "--steps", "30", "--out", str(out)]
    proc = _torchrun(argv)
    try:
        deadline = time.monotonic() + 180
        while not read_jsonl(out / "results-rank1.jsonl") and time.monotonic() < deadline:
            assert proc.poll() is None, "torchrun ended before rank 1 wrote a batch"
            time.sleep(0.02)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    survivors = read_jsonl(out / "results-rank0.jsonl") + read_jsonl(out / "results-rank1.jsonl")
    assert 1 <= len(survivors) < 12, "rank 1 must die in the middle of the run"
    assert not (out / "results.jsonl").exists()
    assert main([*argv, "--resume"]) == 0
    after = read_jsonl(out / "results.jsonl")
    assert [(r["index"], r["method"]) for r in after] == sorted(
        (i, m) for i in range(6) for m in ("gradient", "lrp")
    )
    by_key = {(r["index"], r["method"]): r for r in after}
    for r in survivors:
        assert by_key[(r["index"], r["method"])] == r
    assert not list(out.glob("results-rank*.jsonl"))


@pytest.mark.parametrize("command", ["demo", "theorem", "report"])
def test_one_process_commands_refuse_torchrun(command, tmp_path, monkeypatch, capsys):
    # Each rank would do the whole job into the same directory.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = {"demo": ["--out", str(tmp_path / "d")], "theorem": ["--out", str(tmp_path / "t")]}
    assert main([command, *argv.get(command, [str(tmp_path)])]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"betasmooth: error: betasmooth {command} runs in one process; start it without "
        "torchrun (attack, explain, sweep, curvature share their work among torchrun's "
        "processes)\n"
    )
    assert not (tmp_path / "d").exists() and not (tmp_path / "t").exists()
    # One process of its own is no torchrun job.
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    if command == "theorem":
        assert main([command, "--out", str(tmp_path / "t"), "--quick"]) == 0


FAKE_CALIBRATION = """
import json, os, sys
from pathlib import Path

import betasmooth.cli as cli
from betasmooth.calibrate import Calibration

def calibrate_beta(model, x, method, **kwargs):
    rank = os.environ["RANK"]
    Path(sys.argv[1], f"calibrated-rank{rank}").write_text(str(x.device))
    # Ranks that chose alone could choose differently: each rank would smooth its own way.
    beta = {"0": 2.0, "1": 50.0}[rank]
    summary = {"min_fidelity": 0.9, "undefended": {}, "betas": {str(beta): {}}}
    return Calibration(beta, True, summary)

cli.calibrate_beta = calibrate_beta
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_beta_auto_smooths_every_rank_with_rank_0s_beta(tmp_path):
    argv = ["explain", "--model", "digits-cnn", "--data", "digits", "--method", "beta_smooth"]
    argv += ["-n", "4", "--batch-size", "1", "--no-progress"]
    assert main([*argv, "--beta", "2", "--out", str(tmp_path / "one")]) == 0
    script = tmp_path / "fake.py"
    script.write_text(FAKE_CALIBRATION)
    proc = subprocess.run(
        [*TORCHRUN, str(script), str(tmp_path), *argv, "--beta", "auto"]
        + ["--out", str(tmp_path / "two")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Each rank calibrates on its own device before the job starts (rank 0 alone would
    # keep the others at a collective that can time out), and takes rank 0's choice.
    calibrated = sorted(p.name for p in tmp_path.glob("calibrated-rank*"))
    assert calibrated == ["calibrated-rank0", "calibrated-rank1"]
    assert proc.stdout.count("calibrating beta on 8 held-out images") == 1
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["beta_smooth_beta"] == 2.0 and config["beta_auto"]["beta"] == 2.0
    one = _values(read_jsonl(tmp_path / "one" / "results.jsonl"))
    two = _values(read_jsonl(tmp_path / "two" / "results.jsonl"))
    assert one.keys() == two.keys() == {(i, "beta_smooth") for i in range(4)}
    for key, row in one.items():  # rank 1's items too were smoothed with rank 0's beta
        for field in ("map_max", "map_entropy", "map_top10_mass"):
            assert two[key][field] == pytest.approx(row[field], rel=1e-5), (key, field)


def _rank_logs(log_dir: Path) -> dict[int, str]:
    """Each rank's stderr, as torchrun's --log-dir --redirects 3 keeps it."""
    return {int(p.parent.name): p.read_text() for p in log_dir.glob("*/attempt_0/*/stderr.log")}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["calibration", "foreign line"])
def test_what_one_rank_refuses_every_rank_says_in_one_line(case, tmp_path):
    # Rank 0 alone repairs and merges: the others must not wait for a rank that is gone,
    # and end with its line and status 2 (a traceback, status 1, before). A calibration
    # that cannot run fails on every rank before the job's processes join.
    if case == "calibration":
        x, y = bs.load_data("digits")
        np.savez(tmp_path / "one.npz", x=x[:1].numpy(), y=y[:1].numpy())
        argv = ["explain", "--model", "digits-cnn", "--data", str(tmp_path / "one.npz")]
        argv += ["--method", "beta_smooth", "--beta", "auto", "-n", "1"]
        argv += ["--out", str(tmp_path / "r")]
        said = "betasmooth: error: calibrating beta needs at least 2 images; got 1\n"
    else:
        argv = [*ARGS, "-n", "4", "--steps", "2", "--batch-size", "2", "--out", str(tmp_path / "r")]
        assert main(argv) == 0
        with open(tmp_path / "r" / "results.jsonl", "a") as file:
            file.write('{"foo": 1}\n')
        argv += ["--resume"]
        said = f"betasmooth: error: {tmp_path / 'r' / 'results.jsonl'}, line 9, is not a betasmooth"
    proc = subprocess.run(
        [*TORCHRUN, "--log-dir", str(tmp_path / "logs"), "--redirects", "3"]
        + ["-m", "betasmooth", *argv, "--no-progress"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    # torchrun stops the other rank once one has failed: it may go before it says anything.
    codes = re.findall(r"exitcode  : (-?\d+)", proc.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, proc.stderr[-3000:]
    logs = _rank_logs(tmp_path / "logs")
    assert sorted(logs) == [0, 1]
    assert any(logs.values())
    for log in logs.values():
        assert not log or (log.startswith(said) and log.count("\n") == 1), log[-2000:]


@pytest.mark.slow
def test_two_ranks_sweep_and_measure_curvature_as_one_process(tmp_path):
    attacked = tmp_path / "attacked"
    assert main([*ARGS, "-n", "4", "--steps", "5", "--out", str(attacked)]) == 0
    for name in ("one", "two"):
        shutil.copytree(attacked, tmp_path / name)
    sweep = ["--betas", "2,10", "--smoothgrad-n", "4", "--no-progress"]
    curvature = ["curvature", "--model", "digits-cnn", "--data", "digits", "-n", "3"]
    curvature += ["--betas", "relu,5", "--no-progress"]
    assert main(["sweep", str(tmp_path / "one"), *sweep]) == 0
    assert main([*curvature, "--out", str(tmp_path / "curv-one")]) == 0
    # A folder named like the built-in data: every rank loads the data, rank 0 alone warns.
    (tmp_path / "digits").mkdir()
    for argv in (
        ["sweep", str(tmp_path / "two"), *sweep],
        [*curvature, "--out", str(tmp_path / "curv-two")],
    ):
        proc = subprocess.run(
            [*TORCHRUN, "-m", "betasmooth", *argv],
            env=ENV,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,  # torch before 2.8 can hang as gloo shuts down
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        # The curvature loads the data by name; the sweep reads the attacked run's images.
        warned = "betasmooth: warning: data 'digits' is the built-in data set, not the digits"
        said = proc.stderr.count(warned)
        assert said == (argv[0] == "curvature"), (argv[0], proc.stderr[-2000:])
    pairs = {"sweep.jsonl": ("one", "two"), "results.jsonl": ("curv-one", "curv-two")}
    for name, dirs in pairs.items():
        one, two = (read_jsonl(tmp_path / d / name) for d in dirs)
        assert len(one) == len(two) > 0
        for a, b in zip(one, two):
            assert a.keys() == b.keys()
            for key, value in a.items():
                if isinstance(value, float) and key != "seconds":
                    assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-7), (name, key)
                elif key != "seconds":
                    assert b[key] == value, (name, key)
    one, two = (
        json.loads((tmp_path / d / "sweep_summary.json").read_text()) for d in pairs["sweep.jsonl"]
    )
    for method in ("gradient", "lrp"):
        assert two[method]["betas"].keys() == one[method]["betas"].keys() == {"2", "10"}
        for beta, medians in one[method]["betas"].items():
            assert two[method]["betas"][beta] == pytest.approx(medians), (method, beta)
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("one", "two")]
    sweep = {"betas": [2.0, 10.0], "smoothgrad_n": 4, "min_fidelity": 0.9}
    assert configs[0]["sweep"] == configs[1]["sweep"] == sweep


ONE_JOB = """
import json, os, sys
from pathlib import Path

import torch

from betasmooth.cli import _one_line
from betasmooth.distributed import distributed

out = Path(sys.argv[1])
with distributed(torch.device("cpu")) as (dist, _):
    try:
        dist.first(lambda: open(out / "missing" / "file.json", "w"))
    except OSError as err:
        (out / f"said-rank{dist.rank}").write_text(f"{type(err).__name__}: {_one_line(err)}")
    found = [dist.any(dist.rank == 0), dist.any(dist.rank == 1), dist.any(False), dist.any(True)]
    (out / f"any-{dist.rank}.json").write_text(json.dumps(found))
    # The first optimizer imports torch._dynamo, and with it torch.distributed.nn.functional,
    # whose collectives take the WORLD group as a default argument.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    dist.barrier()
tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []
names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks)
(out / f"threads-{dist.rank}").write_text(" ".join(names))
"""


@pytest.fixture(scope="module")
def one_job(tmp_path_factory) -> Path:
    """The folder of ``ONE_JOB`` run by two torchrun ranks: one launch for three checks."""
    out = tmp_path_factory.mktemp("job")
    proc = _run_script(out, ONE_JOB)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_a_write_that_fails_on_rank_0_is_said_alike_on_every_rank(one_job):
    said = [(one_job / f"said-rank{rank}").read_text() for rank in (0, 1)]
    missing = one_job / "missing" / "file.json"
    assert said == [f"FileNotFoundError: No such file or directory: {missing}"] * 2


RANK_1_FAILS = """
import os, sys, time

import betasmooth.cli as cli
import betasmooth.runs as runs

explain = runs.explain

def failing(*args, **kwargs):
    if os.environ["RANK"] == "1":
        time.sleep(2)  # rank 0 is at the barrier by then
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return explain(*args, **kwargs)

runs.explain = failing
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_rank_that_fails_in_its_batches_leaves_the_others_one_line(tmp_path):
    # The rank that waits at the barrier for a rank that has gone ended with gloo's
    # traceback and status 1, which torchrun could name the root cause.
    script = tmp_path / "fails.py"
    script.write_text(RANK_1_FAILS)
    argv = ["explain", "--model", "digits-cnn", "--data", "digits", "--method", "gradient"]
    argv += ["-n", "4", "--batch-size", "1", "--no-progress", "--out", str(tmp_path / "r")]
    proc = subprocess.run(
        [*TORCHRUN, "--log-dir", str(tmp_path / "logs"), "--redirects", "3", str(script), *argv],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    codes = re.findall(r"exitcode  : (-?\d+)", proc.stderr)
    assert proc.returncode != 0 and set(codes) <= {"2", "-15"}, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr.split("Root Cause")[1], proc.stderr[-3000:]
    logs = _rank_logs(tmp_path / "logs")
    assert logs[1].endswith(
        "betasmooth: error: out of memory with a batch of 1 (CUDA out of memory. Tried to "
        "allocate 2.00 GiB); expected smaller inputs (--image-size) or, for "
        "integrated_gradients and smoothgrad, fewer points per pass (--option METHOD.chunk=1)\n"
    )
    assert re.fullmatch(
        r"betasmooth: error: rank 0 lost another rank of the torchrun job \(Connection closed "
        r"by peer [^)]*\); the rank that stopped first says why\n",
        logs[0],
    ), logs[0]


def test_a_collective_that_runs_out_of_memory_is_this_ranks_own_failure(monkeypatch):
    # Out of memory in a barrier is said as such; any other failure of a collective
    # is a rank lost, named in one line.
    from betasmooth.distributed import Dist, RankLost

    def oom():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def gone():
        raise RuntimeError("[pair.cc:561] Connection closed by peer. Check the logs.")

    dist = Dist(rank=1, world_size=2, active=True)
    monkeypatch.setattr(torch.distributed, "barrier", oom)
    with pytest.raises(RuntimeError) as info:
        dist.barrier()
    assert type(info.value) is RuntimeError and str(info.value).startswith("CUDA out of memory")
    monkeypatch.setattr(torch.distributed, "barrier", gone)
    with pytest.raises(RankLost, match=r"^rank 1 lost another rank of the torchrun job "
                                       r"\(Connection closed by peer\);"):  # fmt: skip
        dist.barrier()


def test_rank_device_is_the_local_rank_not_the_global_rank(monkeypatch):
    from betasmooth.distributed import rank_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")  # second node, 4 GPUs per node
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")  # a launcher that sets no LOCAL_RANK: one node
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 5)
    assert rank_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize(
    ("local", "ranks", "last"),
    [("0", "3", 2), ("2", "3", 2), ("2", None, 2), ("1", "2", None), ("1", None, None)],
)
def test_a_cuda_job_of_more_ranks_than_gpus_is_refused_alike_on_every_rank(
    monkeypatch, local, ranks, last
):
    # torchrun --nproc-per-node 3 on a machine of 2 GPUs: every rank that knows the
    # node's number of ranks (LOCAL_WORLD_SIZE) refuses in the same line before it
    # joins, naming the rank left without a GPU; without that number, the rank itself.
    from betasmooth.distributed import rank_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in (("RANK", local), ("WORLD_SIZE", "3"), ("LOCAL_RANK", local)):
        monkeypatch.setenv(name, value)
    if ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
    if last is None:
        assert rank_device(torch.device("cuda")) == torch.device("cuda", int(local))
        return
    said = (
        f"--device cuda under torchrun takes one GPU per rank, but local rank {last} has none "
        "of this machine's 2 CUDA device(s); expected --nproc-per-node 2 or fewer"
    )
    with pytest.raises(bs.InputError, match=f"^{re.escape(said)}$"):
        rank_device(torch.device("cuda"))


@pytest.mark.parametrize("command", [["explain"], ["attack", "--steps", "1"]])
def test_a_cuda_job_of_more_ranks_than_gpus_ends_in_one_line_before_any_run(
    monkeypatch, tmp_path, capsys, command
):
    # Rank 0 of torchrun --nproc-per-node 3 on 2 GPUs: the refusal is the command's
    # one line, status 2, and no run directory is made.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "3"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    argv = [*command, "--model", "digits-cnn", "--data", "digits", "--method", "gradient"]
    argv += ["-n", "2", "--device", "cuda", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "betasmooth: error: --device cuda under torchrun takes one GPU per rank, but local "
        "rank 2 has none of this machine's 2 CUDA device(s); expected --nproc-per-node 2 "
        "or fewer\n"
    )
    assert not (tmp_path / "run").exists()


def test_a_job_of_one_rank_computes_on_the_device_it_was_given(monkeypatch):
    # torchrun --nproc-per-node 1 ... --device cuda:1 is one process: no rank to place.
    from betasmooth.distributed import rank_device

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert rank_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_no_device_is_the_cpu_and_a_device_that_computes_nothing_is_refused():
    from betasmooth.distributed import resolve_device

    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(bs.InputError, match=r"^unsupported device 'meta'; expected cpu or cuda$"):
        resolve_device("meta")


def test_a_cuda_index_past_the_last_gpu_is_refused_by_the_count(monkeypatch):
    # On a machine with 2 GPUs, cuda:0 and cuda:1 exist and cuda:2 does not; the message
    # names the count. torch.device itself builds cuda:N without asking for a GPU.
    from betasmooth.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(bs.InputError, match=r"^--device cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_any_is_the_or_of_every_ranks_flag_under_torchrun(one_job):
    for rank in (0, 1):
        found = json.loads((one_job / f"any-{rank}.json").read_text())
        assert found == [True, True, False, True], rank


def test_a_second_nodes_rank_joins_with_its_global_and_local_rank(monkeypatch):
    # Rank 5 of 8 on a second node of 4 processes: Dist keeps both ranks apart (nccl
    # broadcasts on cuda:LOCAL_RANK); the process group's own join is outside this check.
    import betasmooth.distributed as distributed

    joined = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: joined.append(a))
    for name, value in (("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    dist, device = distributed.init_distributed(torch.device("cpu"))
    assert dist == distributed.Dist(rank=5, world_size=8, local_rank=1, active=True)
    assert device == torch.device("cpu") and joined == [("gloo",)]


def test_a_rank_without_local_rank_is_its_own_local_rank_as_on_its_device(monkeypatch):
    # A launcher that sets no LOCAL_RANK starts one node: the rank is also the local rank,
    # as rank_device places it (nccl broadcasts on cuda:LOCAL_RANK, the rank's own GPU).
    import betasmooth.distributed as distributed

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    dist, device = distributed.init_distributed(torch.device("cpu"))
    assert dist == distributed.Dist(rank=3, world_size=4, local_rank=3, active=True)
    assert device == torch.device("cpu")
    assert distributed.rank_device(torch.device("cuda")) == torch.device("cuda", dist.local_rank)


def test_rank_alone_without_world_size_is_one_process(monkeypatch):
    # A launcher that sets RANK but no WORLD_SIZE has started no job to join.
    from betasmooth.distributed import Dist, init_distributed, launched

    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not launched()
    assert init_distributed(torch.device("cpu")) == (Dist(), torch.device("cpu"))


def test_the_first_rank_is_global_rank_0_not_each_nodes_local_rank_0(monkeypatch):
    # Under torchrun only global rank 0 says what all ranks say alike; a second node's
    # local rank 0 stays silent.
    from betasmooth.cli import _first_rank

    monkeypatch.setenv("WORLD_SIZE", "4")
    for rank, local, first in (("0", "0", True), ("2", "0", False), ("3", "1", False)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", local)
        assert _first_rank() is first


def test_an_os_error_without_a_number_is_said_alike_on_every_rank():
    # Rank 0's failed write is raised by the other ranks from what it broadcasts: the
    # one line each ends with is the same, with or without an errno and a file.
    import errno

    from betasmooth.cli import _one_line
    from betasmooth.distributed import _said

    for err in (
        OSError("the network share went away"),
        OSError(errno.EROFS, "Read-only file system"),
        OSError(errno.ENOSPC, "No space left on device", "/runs/r/results.jsonl"),
    ):
        kind, *args = json.loads(json.dumps(_said(err)))
        assert kind == "os"
        assert _one_line(OSError(*args)) == _one_line(err)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads listed by /proc")
def test_leaving_the_job_stops_gloos_threads(one_job):
    # gloo's threads that outlive the job run into the interpreter's finalization, where
    # they can abort a rank that has done its work ("terminate called without an active
    # exception", status -6) when the machine is busy.
    for rank in (0, 1):
        names = (one_job / f"threads-{rank}").read_text().split()
        assert names and not [n for n in names if "gloo" in n], (rank, names)


def test_a_collective_failure_without_a_message_names_its_type():
    # gloo may fail with nothing but its source line: the one line still says what failed.
    from betasmooth.distributed import RankLost

    for err in (RuntimeError(""), RuntimeError("[pair.cc:561] ")):
        assert str(RankLost(3, err)) == (
            "rank 3 lost another rank of the torchrun job (RuntimeError); "
            "the rank that stopped first says why"
        )


def _two_ranks_of(monkeypatch, sent: list) -> None:
    """Dist's broadcast as rank 0 (which sends) and rank 1 (which receives ``sent[-1]``) see it,
    without a process group: a value goes through JSON as it does between ranks."""
    from betasmooth.distributed import Dist

    def broadcast(self, value):
        if self.rank == 0:
            sent.append(json.loads(json.dumps(value)))
        return sent[-1]

    monkeypatch.setattr(Dist, "_broadcast", broadcast)


def test_what_work_refuses_on_rank_0_every_rank_raises_alike(monkeypatch, tmp_path):
    # Rank 0's InputError or OSError is sent to the other ranks (which must not wait for a
    # rank that is gone) and raised there as the same kind, message, number and file.
    import errno

    from betasmooth.distributed import Dist

    sent: list = []
    _two_ranks_of(monkeypatch, sent)
    rank0, rank1 = (Dist(rank=r, world_size=2, active=True) for r in (0, 1))
    path = str(tmp_path / "results.jsonl")

    def refuse():
        raise bs.InputError("calibrating beta needs at least 2 images; got 1")

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", path)

    for work, kind in ((refuse, bs.InputError), (full, OSError)):
        with pytest.raises(kind) as first:
            rank0.first(work)
        assert len(sent) == 1, "rank 0 must tell the other ranks of its failure"
        with pytest.raises(kind) as other:
            rank1.first(lambda: pytest.fail("work runs on rank 0 alone"))
        assert type(other.value) is type(first.value)
        assert str(other.value) == str(first.value)
        if kind is OSError:
            assert (other.value.errno, other.value.filename) == (errno.ENOSPC, path)
        sent.clear()
    # Work that succeeds: rank 0 gets its value, the others None, and no failure is sent.
    assert rank0.first(lambda: 7) == 7 and sent == [None]
    assert rank1.first(lambda: pytest.fail("work runs on rank 0 alone")) is None


def test_rank_0_raises_the_very_error_its_work_raised_and_sends_it_once(monkeypatch):
    # The other ranks get the error's message; rank 0 keeps the error itself (its
    # traceback, its cause), not one made again from what it sent.
    from betasmooth.distributed import Dist

    sent: list = []
    _two_ranks_of(monkeypatch, sent)
    err = bs.InputError("calibrating beta needs at least 2 images; got 1")

    def refuse():
        raise err

    with pytest.raises(bs.InputError) as raised:
        Dist(rank=0, world_size=2, active=True).first(refuse)
    assert raised.value is err
    assert sent == [["input", "calibrating beta needs at least 2 images; got 1"]]


def test_a_rank_past_0_outside_a_process_group_runs_no_work():
    # A Dist of another rank that has joined no group (as a test of the ranks builds one)
    # leaves the work to rank 0 and gets None, as a rank of a torchrun job does.
    from betasmooth.distributed import Dist

    assert Dist(rank=1, world_size=2).first(lambda: pytest.fail("work runs on rank 0")) is None
    assert Dist().first(lambda: 7) == 7


def test_another_rank_may_broadcast_anything_it_holds(monkeypatch):
    # Only rank 0's value is sent: another rank's (here not JSON-ready) is never encoded.
    from betasmooth.distributed import Dist

    payload = json.dumps({"beta": 2.0}).encode()

    def broadcast(tensor, src):
        assert src == 0
        if tensor.dtype == torch.uint8:
            tensor.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        else:
            tensor.fill_(len(payload))

    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    assert Dist(rank=1, world_size=2, active=True).broadcast(object()) == {"beta": 2.0}


def test_a_job_of_one_rank_joins_no_process_group(monkeypatch):
    import betasmooth.distributed as distributed

    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail())
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert distributed.init_distributed(torch.device("cpu")) == (
        distributed.Dist(),
        torch.device("cpu"),
    )


def test_a_process_group_already_joined_is_not_joined_again(monkeypatch):
    import betasmooth.distributed as distributed

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail())
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    dist, _ = distributed.init_distributed(torch.device("cpu"))
    assert dist == distributed.Dist(rank=1, world_size=2, local_rank=1, active=True)


def test_a_cuda_job_joins_nccl_bound_to_the_ranks_gpu(monkeypatch):
    import betasmooth.distributed as distributed

    joined, placed = [], []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda *a, **k: joined.append((a, k))
    )
    monkeypatch.setattr(torch.cuda, "set_device", placed.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # 4 GPUs per node
    for name, value in (("RANK", "5"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    dist, device = distributed.init_distributed(torch.device("cuda"))
    assert device == torch.device("cuda", 1) and placed == [device]
    assert joined == [(("nccl",), {"device_id": torch.device("cuda", 1)})]


def test_one_process_leaves_no_process_group_it_did_not_join(monkeypatch):
    # A caller's own process group outlives a one-process run.
    import betasmooth.distributed as distributed

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: pytest.fail())
    distributed.shutdown_distributed(distributed.Dist())


def test_a_job_that_fails_inside_distributed_still_leaves_the_process_group(monkeypatch):
    import betasmooth.distributed as distributed

    left = []
    monkeypatch.setattr(
        distributed, "init_distributed", lambda d: (distributed.Dist(1, 2, 1, active=True), d)
    )
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: left.append(1))
    with pytest.raises(KeyError), distributed.distributed(torch.device("cpu")):
        raise KeyError("boom")
    assert left == [1]


@pytest.mark.parametrize(
    ("rank", "joined", "said"),
    [
        (None, False, "betasmooth: warning: look here\n"),  # one process
        ("0", False, "betasmooth: warning: look here\n"),
        ("1", False, ""),  # before the ranks join, or after they leave: rank 0 says it
        ("1", True, "betasmooth: warning: rank 1: look here\n"),  # about rank 1's own items
        ("0", True, "betasmooth: warning: rank 0: look here\n"),
    ],
)
def test_a_warning_is_said_once_for_all_ranks_unless_it_is_about_one_ranks_items(
    rank, joined, said, monkeypatch, capsys
):
    from betasmooth.cli import _show_warning

    if rank is not None:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
    else:
        monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: joined)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: int(rank))
    _show_warning("look\n   here", UserWarning, "file.py", 1)
    assert capsys.readouterr().err == said


@pytest.mark.parametrize(
    ("rank", "file"),
    [("0", "warnings.jsonl"), ("1", "warnings-rank1.jsonl")],  # never two writers of one file
)
def test_each_rank_keeps_a_warning_of_its_own_items_as_it_said_it(
    rank, file, monkeypatch, tmp_path, capsys
):
    from betasmooth.cli import _SAID, _show_warning
    from betasmooth.store import RunDir

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: int(rank))
    run = RunDir(tmp_path, rank=int(rank), world_size=2)
    _SAID.start("explain")
    _SAID.keep_in(run)
    try:
        _show_warning("look\n   here", UserWarning, "file.py", 1)
    finally:
        _SAID.start("")
    assert capsys.readouterr().err == f"betasmooth: warning: rank {rank}: look here\n"
    kept = [{"command": "explain", "warning": f"rank {rank}: look here"}]
    assert [p.name for p in tmp_path.iterdir()] == [file]
    assert RunDir(tmp_path).read_warnings() == kept


def test_warnings_are_read_rank_0_first_then_by_rank_number(tmp_path):
    # Rank 10's file sorts before rank 2's by name; the report reads them by number.
    from betasmooth.store import RunDir

    for rank in (10, 0, 2, 1):
        RunDir(tmp_path, rank=rank, world_size=11).add_warnings("attack", [f"rank {rank}: x"])
        RunDir(tmp_path, rank=rank, world_size=11).add_warnings("attack", [f"rank {rank}: x"])
    said = [r["warning"] for r in RunDir(tmp_path).read_warnings()]
    assert said == ["rank 0: x", "rank 1: x", "rank 2: x", "rank 10: x"]


def test_each_rank_of_a_cuda_job_takes_its_own_gpu_whatever_index_was_given(monkeypatch):
    # --device cuda:1 under torchrun would put every rank on one GPU: each rank computes on
    # cuda:LOCAL_RANK. A device that is no GPU (the CPU, Apple's mps) stays as given.
    from betasmooth.distributed import rank_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in (("RANK", "2"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert rank_device(torch.device("cuda", 1)) == torch.device("cuda", 0)
    assert rank_device(torch.device("mps")) == torch.device("mps")


def test_outside_a_job_the_device_is_the_one_given(monkeypatch):
    # No launcher (no RANK, no WORLD_SIZE), or RANK alone: one process, whose --device holds.
    from betasmooth.distributed import rank_device

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert rank_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    monkeypatch.setenv("RANK", "3")
    assert rank_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_a_cpu_job_joins_gloo_with_no_device_to_bind(monkeypatch):
    # device_id binds a process group to one GPU (nccl); gloo on the CPU is given none.
    import betasmooth.distributed as distributed

    joined = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda *a, **k: joined.append((a, k))
    )
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("no GPU to place"))
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert distributed.init_distributed(torch.device("cpu"))[1] == torch.device("cpu")
    assert joined == [(("gloo",), {})]


def test_a_group_already_left_is_not_left_again(monkeypatch):
    # A caller that destroyed the process group itself: leaving it again would raise.
    import betasmooth.distributed as distributed

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: pytest.fail())
    distributed.shutdown_distributed(distributed.Dist(1, 2, 1, active=True))


def test_gloos_own_message_keeps_the_peers_address_and_names_the_errors_type():
    # gloo puts its source line first and the peer's address in brackets after the reason:
    # only the leading source line goes. A failure with no words of its own is named by
    # its own type (a subclass of RuntimeError); a last sentence keeps no full stop.
    from betasmooth.distributed import RankLost

    tail = "; the rank that stopped first says why"
    gloo = "[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:41234"
    assert str(RankLost(0, RuntimeError(gloo))) == (
        f"rank 0 lost another rank of the torchrun job (Connection closed by peer "
        f"[10.0.0.2]:41234){tail}"
    )
    err = torch.distributed.DistBackendError("[ProcessGroupNCCL.cpp:1]  ")
    said = f"rank 1 lost another rank of the torchrun job (DistBackendError){tail}"
    assert str(RankLost(1, err)) == said
    err = RuntimeError("[c10d] Timed out waiting 1800000ms for recv operation to complete.\n")
    assert str(RankLost(1, err)) == (
        f"rank 1 lost another rank of the torchrun job (Timed out waiting 1800000ms for recv "
        f"operation to complete){tail}"
    )


def test_a_broadcast_or_any_that_loses_a_rank_names_this_rank(monkeypatch):
    # The rank that waits names itself, and keeps the collective's error as the cause.
    from betasmooth.distributed import Dist, RankLost

    err = RuntimeError("[pair.cc:561] Connection closed by peer. Check the logs.")

    def gone(*args, **kwargs):
        raise err

    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    monkeypatch.setattr(torch.distributed, "broadcast", gone)
    monkeypatch.setattr(torch.distributed, "all_reduce", gone)
    monkeypatch.setattr(torch.distributed, "barrier", gone)
    dist = Dist(rank=1, world_size=2, local_rank=1, active=True)
    for collective in (lambda: dist.broadcast(None), lambda: dist.any(True), dist.barrier):
        with pytest.raises(RankLost, match=r"^rank 1 lost another rank .*\(Connection closed "
                                           r"by peer\);") as lost:  # fmt: skip
            collective()
        assert lost.value.__cause__ is err


def test_rank_0s_value_that_json_cannot_send_is_its_own_error_not_a_rank_lost(monkeypatch):
    # A TypeError of json.dumps on rank 0 is a fault of the caller, not of another rank.
    from betasmooth.distributed import Dist

    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    monkeypatch.setattr(torch.distributed, "broadcast", lambda *a, **k: pytest.fail())
    with pytest.raises(TypeError, match="not JSON serializable"):
        Dist(rank=0, world_size=2, active=True).broadcast({"beta": object()})


def test_nccl_collectives_run_on_the_ranks_local_gpu(monkeypatch):
    # Rank 5 of 8 is local rank 1 of its node: its nccl tensors live on cuda:1 (cuda:5 does
    # not exist on a node of 4 GPUs). The tensors are made on the CPU here, their device kept.
    from betasmooth.distributed import Dist

    placed = []
    tensor, zeros = torch.tensor, torch.zeros
    payload = json.dumps([1.0, 10.0]).encode()

    def broadcast(t, src):
        if t.dtype == torch.uint8:
            t.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        else:
            t.fill_(len(payload))

    def all_reduce(t, op):
        t.fill_(1)  # another rank's flag holds

    monkeypatch.setattr(torch, "tensor", lambda d, device: placed.append(device) or tensor(d))
    monkeypatch.setattr(
        torch, "zeros", lambda n, dtype, device: placed.append(device) or zeros(n, dtype=dtype)
    )
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    dist = Dist(rank=5, world_size=8, local_rank=1, active=True)
    assert dist.broadcast(None) == [1.0, 10.0] and dist.any(False) is True
    assert placed == [torch.device("cuda", 1)] * 3


def test_only_a_failure_of_what_work_was_given_is_sent_to_the_other_ranks(monkeypatch):
    # Another error of work (a bug) is raised on rank 0 as it is; nothing is sent, as the
    # other ranks could not say it as rank 0 does.
    from betasmooth.distributed import Dist

    sent: list = []
    _two_ranks_of(monkeypatch, sent)

    def bug():
        raise KeyError("beta")

    with pytest.raises(KeyError):
        Dist(rank=0, world_size=2, active=True).first(bug)
    assert sent == []


def test_in_one_process_any_is_a_bool():
    # bool(flag), whatever type the flag has (a numpy bool, a count).
    from betasmooth.distributed import Dist

    assert Dist().any(np.True_) is True and Dist().any(3) is True and Dist().any(0) is False
