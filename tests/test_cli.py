"""The betasmooth command: demo, attack with kill -9 and resume, sweep, theorem, bad input."""

from __future__ import annotations

import html
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import pearsonr

import betasmooth as bs
from betasmooth.attack import ATTACK_DEFAULTS, PAPER_SPAN, default_lr, default_weights, derangement
from betasmooth.cli import main
from betasmooth.explain import wraps_base
from betasmooth.report import build_report
from betasmooth.store import RunDir, read_jsonl
from betasmooth.units import unit_seed
from betasmooth.validate import OutOfMemory

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
RESULT_FIELDS = {
    "index",
    "method",
    "label",
    "label_adv",
    "label_kept",
    "expl_mse_target",
    "expl_ssim_target",
    "expl_pcc_target",
    "expl_mse_orig",
    "expl_ssim_orig",
    "expl_pcc_orig",
    "input_mse",
    "input_pcc",
    "output_change",
    "seconds",
}
ATTACK = ["attack", "--model", "digits-cnn", "--data", "digits", "--no-progress"]


def _saliency(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """|d logit_pred / dx| normalised to sum 1, by plain autograd."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    picked = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    (g,) = torch.autograd.grad(picked, x)
    h = g.abs().sum(1)
    return (h / h.sum(dim=(1, 2), keepdim=True)).numpy()


def _softplus_twin(beta: float) -> torch.nn.Module:
    """digits-cnn with every nn.ReLU module swapped for torch's own Softplus(beta)."""
    model = bs.load_model("digits-cnn")
    for name, module in model.named_children():
        if isinstance(module, torch.nn.ReLU):
            setattr(model, name, torch.nn.Softplus(beta=beta))
    return model


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """A quick digits demo: its directory and what it printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "run"
    argv = ["demo", "--out", str(out), "--quick", "-n", "4", "--steps", "5", "--no-progress"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*argv, "--model", "digits-cnn", "--data", "digits"]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def demo_dir(demo_run) -> Path:
    return demo_run[0]


@pytest.fixture(scope="module")
def attack_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("attack") / "run"
    argv = [*ATTACK, "--method", "gradient,lrp", "-n", "6", "--batch-size", "2"]
    assert main([*argv, "--steps", "10", "--out", str(out)]) == 0
    return out


SWEEP = ["--betas", "2,10", "--smoothgrad-n", "4", "--no-progress"]


@pytest.fixture(scope="module")
def swept_dir(attack_dir, tmp_path_factory) -> Path:
    """A copy of ``attack_dir`` swept with ``SWEEP``; tests copy it before they change it."""
    import shutil

    out = tmp_path_factory.mktemp("swept") / "run"
    shutil.copytree(attack_dir, out)
    assert main(["sweep", str(out), *SWEEP]) == 0
    return out


@pytest.mark.slow
def test_a_sweep_of_a_demo_with_other_betas_is_refused(demo_dir, tmp_path, capsys):
    # The demo records its sweep: another sweep with other betas would add rows
    # that its summary and the recorded settings do not describe.
    import shutil

    config = json.loads((demo_dir / "config.json").read_text())
    swept = sorted({float(r["beta"]) for r in read_jsonl(demo_dir / "sweep.jsonl")})
    assert config["sweep"]["betas"] == swept
    run = tmp_path / "run"
    shutil.copytree(demo_dir, run)
    before = (run / "sweep.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["sweep", str(run), "--betas", "2,7", "--no-progress"]) == 2
    held = ",".join(f"{b:g}" for b in swept)
    n = config["sweep"]["smoothgrad_n"]
    err = capsys.readouterr().err
    assert f"holds a sweep whose betas is {held} (2,7 now), smoothgrad_n is {n} (20 now) in " in err
    assert (run / "sweep.jsonl").read_bytes() == before


@pytest.mark.slow
def test_demo_writes_every_file_with_the_documented_fields(demo_dir, capsys):
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["command"] == "demo" and config["seed"] == 0 and config["world_size"] == 1
    assert {"torch", "numpy", "python", "betasmooth"} <= set(config["versions"])
    assert config["argv"][:2] == ["betasmooth", "demo"]

    methods = sorted(bs.attack.ATTACK_DEFAULTS)
    results = read_jsonl(demo_dir / "results.jsonl")
    keys = [(r["index"], r["method"]) for r in results]
    assert keys == sorted((i, m) for i in range(4) for m in methods)
    for r in results:
        assert RESULT_FIELDS <= set(r)
        assert r["label_kept"] == (r["label"] == r["label_adv"])
    explained = read_jsonl(demo_dir / "explain.jsonl")
    assert sorted((r["index"], r["method"]) for r in explained) == sorted(
        (i, m) for i in range(4) for m in bs.METHODS
    )
    sweep = read_jsonl(demo_dir / "sweep.jsonl")
    assert len(sweep) == 4 * len(methods) * 3 * 2
    theory = json.loads((demo_dir / "theory.json").read_text())
    assert "curves" in theory
    assert (demo_dir / "report.html").stat().st_size > 10_000
    assert all(p.stat().st_size > 1000 for p in (demo_dir / "figures").glob("*.png"))
    for m in methods:
        assert (demo_dir / "arrays" / f"{m}-0.npz").exists()
        assert (demo_dir / "arrays" / f"sweep-{m}-0.npz").exists()
    _assert_sweep_starts_from_the_attacked_maps(results, sweep)
    _assert_adaptive_attacks_say_what_their_sweep_measures(demo_dir)


def _assert_adaptive_attacks_say_what_their_sweep_measures(run):
    # beta_smooth and smoothgrad are attacked through their own maps and swept on
    # gradient: their undefended row is the plain gradient, and the faint lines
    # of their figures are the attacked defended map; both must say so.
    summary = json.loads((run / "sweep_summary.json").read_text())
    assert {m: s["base"] for m, s in summary.items()} == {
        m: "gradient" if wraps_base(m) else m for m in summary
    }
    sweep = read_jsonl(run / "sweep.jsonl")
    for method in ("beta_smooth", "smoothgrad"):
        # One value per image: every (defense, beta) row of an image repeats it.
        plain = {r["index"]: r["undefended_pcc"] for r in sweep if r["method"] == method}
        expected = np.median(list(plain.values()))
        assert summary[method]["undefended"]["robustness_pcc"] == pytest.approx(expected)
    html = (run / "report.html").read_text()
    assert html.count("undefended: plain gradient") == 2
    # A run swept before summaries named the base: the report reads it from the records.
    stored = run / "sweep_summary.json"
    kept = stored.read_text()
    try:
        stored.write_text(json.dumps({m: {**s, "base": None} for m, s in summary.items()}))
        html_old = build_report(run).read_text()
    finally:
        stored.write_text(kept)
    assert html_old.count("undefended: plain gradient") == 2
    assert "faint dotted, in each colour: the attacked beta_smooth map, no further defense" in html
    assert "faint dotted, in each colour: no defense." in html  # the other methods


def _assert_sweep_starts_from_the_attacked_maps(results, sweep):
    # The sweep's undefended map is the map the attack moved (same options, e.g.
    # integrated gradients' points), except for the adaptive attacks on the
    # defenses, which are swept on their base method.
    attacked = {(r["index"], r["method"]): r["expl_pcc_orig"] for r in results}
    checked = 0
    for row in sweep:
        if row["base"] == row["method"]:
            assert row["undefended_pcc"] == pytest.approx(attacked[row["index"], row["method"]])
            checked += 1
    assert checked > 0


def test_sweep_of_an_attack_explains_with_the_attacks_options(tmp_path):
    out = tmp_path / "run"
    argv = [*ATTACK, "--method", "integrated_gradients,gradient", "-n", "2", "--steps", "5"]
    assert main([*argv, "--out", str(out)]) == 0
    assert main(["sweep", str(out), "--betas", "1", "--smoothgrad-n", "2", "--no-progress"]) == 0
    results, sweep = read_jsonl(out / "results.jsonl"), read_jsonl(out / "sweep.jsonl")
    _assert_sweep_starts_from_the_attacked_maps(results, sweep)


def test_a_registered_smoothing_is_swept_on_its_base(tmp_path, monkeypatch):
    # A method with the option base is a defense, whoever registered it: its
    # adaptive attack is swept on its base, as smoothgrad's and beta_smooth's are.
    from betasmooth.explain import METHODS, register

    # Its own default base, not smoothgrad's: the sweep must take the one it smooths.
    def doubled(
        model, x, target, *, create_graph=False, base="input_x_gradient", base_options=None
    ):
        return 2 * bs.explain(model, x, base, target, create_graph=create_graph)

    monkeypatch.setitem(METHODS, "doubled", doubled)  # so that the test's end removes it
    register("doubled", replace=True)(doubled)
    out = tmp_path / "run"
    assert main([*ATTACK, "--method", "doubled", "-n", "2", "--steps", "3", "--out", str(out)]) == 0
    assert main(["sweep", str(out), "--betas", "1", "--smoothgrad-n", "2", "--no-progress"]) == 0
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert summary["doubled"]["base"] == "input_x_gradient"
    model = bs.load_model("digits-cnn")
    with np.load(out / "arrays" / "doubled-0.npz") as saved:
        x, x_adv = torch.from_numpy(saved["x"]), torch.from_numpy(saved["x_adv"])
    label = model(x).argmax(1)
    plain = bs.compare(
        bs.heatmap(bs.explain(model, x_adv, "input_x_gradient", label)),
        bs.heatmap(bs.explain(model, x, "input_x_gradient", label)),
    )["pcc"]
    rows = {r["index"]: r["undefended_pcc"] for r in read_jsonl(out / "sweep.jsonl")}
    np.testing.assert_allclose([rows[0], rows[1]], plain.numpy(), rtol=1e-5)


@pytest.mark.slow
def test_demo_values_match_their_arrays_and_hand_computation(demo_dir):
    model = bs.load_model("digits-cnn")
    x, _ = bs.load_data("digits")
    results = {(r["index"], r["method"]): r for r in read_jsonl(demo_dir / "results.jsonl")}
    with np.load(demo_dir / "arrays" / "gradient-0.npz") as data:
        arrays = {k: data[k] for k in data.files}
    targets = derangement(4, 0).numpy()
    np.testing.assert_array_equal(arrays["index"], np.arange(4))
    np.testing.assert_array_equal(arrays["target_index"], targets)
    # The target of image i is the saliency map of image targets[i].
    np.testing.assert_allclose(arrays["map_target"], _saliency(model, x[targets]), atol=1e-6)
    np.testing.assert_allclose(arrays["map_orig"], _saliency(model, x[:4]), atol=1e-6)
    for i in range(4):
        r = results[(i, "gradient")]
        assert r["target_index"] == targets[i]
        assert r["label_adv"] == arrays["label_adv"][i]
        diff = arrays["map_adv"][i] - arrays["map_target"][i]
        assert r["expl_mse_target"] == pytest.approx(np.mean(diff**2), rel=1e-4)
        assert r["expl_pcc_orig"] == pytest.approx(
            pearsonr(arrays["map_adv"][i].ravel(), arrays["map_orig"][i].ravel())[0], abs=1e-4
        )
        dx = arrays["x_adv"][i] - arrays["x"][i]
        assert r["input_mse"] == pytest.approx(np.mean(dx**2), rel=1e-4)

    # The demo's 5 steps cover the paper's 1500 of lr 1e-3 (normalised units,
    # 1e-3 / 4.43 on [0, 1] pixels): 5 steps of 300 times that lr.
    lr = 1e-3 / PAPER_SPAN * 1500 / 5
    target = torch.from_numpy(arrays["map_target"])
    again = bs.manipulate(model, x[:4], target, "gradient", steps=5, lr=lr)
    np.testing.assert_allclose(again.x_adv.numpy(), arrays["x_adv"], atol=1e-6)
    paper_lr = bs.manipulate(model, x[:4], target, "gradient", steps=5, lr=1e-3 / PAPER_SPAN)
    assert not np.allclose(paper_lr.x_adv.numpy(), arrays["x_adv"], atol=1e-6)

    # The sweep's beta-smoothed map of x_adv against the original map, by torch's Softplus.
    sweep = read_jsonl(demo_dir / "sweep.jsonl")
    row = next(
        s
        for s in sweep
        if s["method"] == "gradient"
        and s["defense"] == "beta_smooth"
        and s["beta"] == 5.0
        and s["index"] == 2
    )
    smoothed = _softplus_twin(5.0)
    x_adv = torch.from_numpy(arrays["x_adv"][2:3])
    with torch.no_grad():
        label = model(x[2:3]).argmax(1)
    xg = x_adv.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(smoothed(xg)[0, label[0]], xg)
    h = g.abs().sum(1)[0]
    h = (h / h.sum()).numpy()
    assert row["adv_vs_orig_pcc"] == pytest.approx(
        pearsonr(h.ravel(), arrays["map_orig"][2].ravel())[0], abs=1e-3
    )
    with np.load(demo_dir / "arrays" / "sweep-gradient-0.npz") as data:
        np.testing.assert_array_equal(data["betas"], [1.0, 5.0, 20.0])
        np.testing.assert_allclose(data["maps_beta"][2, 1], h, atol=1e-5)


# Moments to kill a run at: when it has created its folder, written its first
# result, or written several batches.
KILL_AT = {
    "created": lambda out: (out / "config.json").exists(),
    "first result": lambda out: len(read_jsonl(out / "results.jsonl")) >= 1,
    "several batches": lambda out: len(list((out / "arrays").glob("*.npz"))) >= 4,
}


@pytest.mark.slow
@pytest.mark.parametrize("moment", sorted(KILL_AT))
def test_attack_killed_then_resumed_has_every_item_once(tmp_path, moment):
    out = tmp_path / "run"
    argv = [*ATTACK, "--method", "gradient,lrp", "-n", "5", "--batch-size", "1"]
    argv += ["--steps", "30", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "betasmooth", *argv], env=ENV, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not KILL_AT[moment](out) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = read_jsonl(out / "results.jsonl")
    assert len(before) < 10, "the run must be killed in the middle"
    assert main([*argv, "--resume"]) == 0
    after = read_jsonl(out / "results.jsonl")
    keys = [(r["index"], r["method"]) for r in after]
    assert keys == sorted((i, m) for i in range(5) for m in ("gradient", "lrp"))
    by_key = {(r["index"], r["method"]): r for r in after}
    for r in before:
        assert by_key[(r["index"], r["method"])] == r
    assert sorted(p.name for p in (out / "arrays").iterdir()) == sorted(
        f"{m}-{i}.npz" for i in range(5) for m in ("gradient", "lrp")
    )


def test_non_empty_directory_is_refused(attack_dir, capsys):
    before = _snapshot(attack_dir)
    argv = [*ATTACK, "--method", "gradient,lrp", "-n", "6", "--batch-size", "2", "--steps", "10"]
    assert main([*argv, "--out", str(attack_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "is not empty; pass --resume" in err
    assert main([*argv[:-1], "20", "--out", str(attack_dir), "--resume"]) == 2
    assert "steps is 10" in capsys.readouterr().err
    # Said before the data load, whose notice of fewer images made it two lines.
    more = [*ATTACK, "--method", "gradient", "-n", "100000", "--out", str(attack_dir)]
    assert main(more) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty; pass --resume" in err
    assert _snapshot(attack_dir) == before


def test_resume_without_the_beta_of_the_run_is_refused(tmp_path, capsys):
    # Leaving --beta out would explain the remaining images at the default beta.
    argv = ["explain", "--model", "digits-cnn", "--data", "digits", "--method", "beta_smooth"]
    argv += ["-n", "2", "--out", str(tmp_path / "run")]
    assert main([*argv, "--beta", "5"]) == 0
    before = (tmp_path / "run" / "results.jsonl").read_text()
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    assert "--resume with a different setting: beta is 5.0" in capsys.readouterr().err
    assert (tmp_path / "run" / "results.jsonl").read_text() == before
    assert json.loads((tmp_path / "run" / "config.json").read_text())["beta"] == 5.0


def test_resume_of_a_finished_run_changes_nothing(attack_dir):
    before = _snapshot(attack_dir)
    argv = [*ATTACK, "--method", "gradient,lrp", "-n", "6", "--batch-size", "2", "--steps", "10"]
    assert main([*argv, "--out", str(attack_dir), "--resume"]) == 0
    after = _snapshot(attack_dir)
    # config.json and the report built from it record the new command line.
    volatile = {"config.json", "report.html"}
    assert {k: v for k, v in after.items() if k not in volatile} == {
        k: v for k, v in before.items() if k not in volatile
    }


def test_sweep_is_idempotent_and_indexes_the_run(swept_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(swept_dir, run)
    first = (run / "sweep.jsonl").read_bytes()
    rows = read_jsonl(run / "sweep.jsonl")
    assert len(rows) == 6 * 2 * 2 * 2
    assert sorted({(r["index"], r["method"]) for r in rows}) == sorted(
        (i, m) for i in range(6) for m in ("gradient", "lrp")
    )
    assert main(["sweep", str(run), "--betas", "2,10", "--smoothgrad-n", "4"]) == 0
    assert (run / "sweep.jsonl").read_bytes() == first
    # The same betas in another order are the same sweep.
    assert main(["sweep", str(run), "--betas", "10,2", "--smoothgrad-n", "4"]) == 0
    assert (run / "sweep.jsonl").read_bytes() == first
    # Another --min-fidelity chooses again from the same rows, and config.json
    # records it (it recorded no min_fidelity, which decides the recommendation).
    argv = ["sweep", str(run), "--betas", "2,10", "--smoothgrad-n", "4", "--min-fidelity", "0.5"]
    assert main(argv) == 0
    assert (run / "sweep.jsonl").read_bytes() == first
    config = json.loads((run / "config.json").read_text())
    assert config["sweep"] == {"betas": [2.0, 10.0], "smoothgrad_n": 4, "min_fidelity": 0.5}
    summary = json.loads((run / "sweep_summary.json").read_text())
    assert {s["min_fidelity"] for s in summary.values()} == {0.5}
    # clean_vs_orig compares the smoothed map of x with the original one: for item 3
    # under beta = 10, by torch's Softplus and scipy.
    model = bs.load_model("digits-cnn")
    x, _ = bs.load_data("digits")
    row = next(
        r
        for r in rows
        if (r["index"], r["method"], r["defense"], r["beta"]) == (3, "gradient", "beta_smooth", 10)
    )
    with torch.no_grad():
        label = model(x[3:4]).argmax(1)
    xg = x[3:4].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_softplus_twin(10.0)(xg)[0, label[0]], xg)
    assert row["clean_vs_orig_pcc"] == pytest.approx(
        pearsonr(g.abs().ravel().numpy(), _saliency(model, x[3:4]).ravel())[0], abs=1e-3
    )
    assert main(["sweep", str(run), "--betas", "1"]) == 2


def test_sweep_table_shows_the_defended_clean_maps_similarity_to_the_target(
    swept_dir, tmp_path, capsys
):
    # pcc adv/tgt alone mixes what the attack moved with what smoothing moves: the
    # table shows the defended map of x against the target beside it, as recorded.
    # A finished sweep run again prints its table from the rows it recorded.
    import shutil

    from betasmooth.cli import SWEEP_COLUMNS

    run = tmp_path / "run"
    shutil.copytree(swept_dir, run)
    assert main(["sweep", str(run), *SWEEP]) == 0
    rows = read_jsonl(run / "sweep.jsonl")
    header, lines = _table(capsys.readouterr().out.splitlines(), "method")
    titles = [t for _, t in SWEEP_COLUMNS]
    for method in ("gradient", "lrp"):
        mine = [
            r for r in rows if (r["method"], r["defense"], r["beta"]) == (method, "beta_smooth", 2)
        ]
        row = next(line for line in lines if _words(line).startswith(f"{method} beta_smooth 2"))
        row = row.split()
        cell = row[4 + titles.index("pcc clean/tgt")]
        expected = np.median([r["clean_vs_target_pcc"] for r in mine])
        assert float(cell) == pytest.approx(expected, abs=6e-4)
        assert "pcc clean/tgt" in header


def test_sweep_cut_by_a_kill_is_completed_once(swept_dir, tmp_path):
    # A kill can cut the write of a batch's sweep rows after some of its lines,
    # and leave the temporary file of an arrays write. The resumed sweep adds
    # exactly the missing rows, keeps one arrays file per batch, and removes the
    # temporary file.
    import shutil

    whole, cut = swept_dir, tmp_path / "cut"
    shutil.copytree(swept_dir, cut)
    lines = (cut / "sweep.jsonl").read_text().splitlines(keepends=True)
    last = [
        i for i, r in enumerate(map(json.loads, lines)) if (r["method"], r["index"]) == ("lrp", 5)
    ]
    # Rows of lrp item 5 (the last batch) after the third are lost, the fourth half written.
    kept = [line for i, line in enumerate(lines) if i not in last[3:]]
    (cut / "sweep.jsonl").write_text("".join(kept) + lines[last[3]][:40])
    (cut / "arrays" / ".sweep-lrp-4.npz.x1y2z3w4.npz").write_bytes(b"partial")
    assert main(["sweep", str(cut), *SWEEP]) == 0

    def rows(run):
        return [
            {k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(run / "sweep.jsonl")
        ]

    assert rows(cut) == rows(whole) and len(rows(whole)) == 6 * 2 * 2 * 2
    names = sorted(p.name for p in (cut / "arrays").iterdir())
    assert names == sorted(p.name for p in (whole / "arrays").iterdir())


def _no_model(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    del config["model"]
    (run / "config.json").write_text(json.dumps(config))


def _seed_text(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "seed": "x"}))


def _no_lrp_arrays(run: Path) -> None:
    for path in (run / "arrays").glob("lrp-*.npz"):
        path.unlink()


def _damaged_arrays(run: Path) -> None:
    path = run / "arrays" / "gradient-2.npz"
    path.write_bytes(path.read_bytes()[:200])


def _altered_index(run: Path) -> None:
    path = run / "arrays" / "gradient-2.npz"
    with np.load(path) as saved:
        arrays = dict(saved)
    arrays["index"] = arrays["index"] + 1
    np.savez(path, **arrays)


def _one_batch_lost(run: Path) -> None:
    (run / "arrays" / "lrp-4.npz").unlink()


def _binary_results(run: Path) -> None:
    (run / "results.jsonl").write_bytes(b"\xe8\xff not text\n")


DAMAGED_RUNS = {
    "arrays of other items": (
        _altered_index,
        r"gradient-2.npz holds items \[3, 4\]\.\.\., not from 2",
    ),
    "results not text": (
        _binary_results,
        r"results.jsonl, line 1, is not JSON, nor a record cut short by a kill; expected one",
    ),
    "config without model": (_no_model, r"config.json has model = None; expected the str"),
    "seed that is no int": (_seed_text, r"config.json has seed = 'x'; expected the int"),
    "arrays deleted": (_no_lrp_arrays, r"has results but no arrays of lrp in .*arrays"),
    "arrays truncated": (_damaged_arrays, r"gradient-2.npz is a damaged .npz archive"),
    "arrays of one batch deleted": (
        _one_batch_lost,
        r"the arrays of 2 finished items .* missing or damaged \(e.g. lrp item 4\); run the "
        r"same betasmooth attack command with --resume",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_RUNS))
def test_sweep_of_a_damaged_run_is_one_line(case, attack_dir, tmp_path, capsys):
    import re
    import shutil

    damage, pattern = DAMAGED_RUNS[case]
    run = tmp_path / "run"
    shutil.copytree(attack_dir, run)
    damage(run)
    config = (run / "config.json").read_bytes()
    assert main(["sweep", str(run), "--betas", "1", "--smoothgrad-n", "2", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("betasmooth: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert not (run / "sweep.jsonl").exists() or not (run / "sweep.jsonl").read_text()
    # No sweep settings are recorded for a sweep that did not start.
    assert (run / "config.json").read_bytes() == config


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    torch.save({"w": [1, 2]}, d / "not_state_dict.pt")
    torch.save(bs.load_model("digits-cnn"), d / "pickled_module.pt")
    (d / "images" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(d / "images" / "a" / "ok.png")
    (d / "images" / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    np.savez(d / "small.npz", x=np.zeros((4, 1, 20, 20), np.float32))
    x = np.zeros((4, 1, 32, 32), np.float32)
    x[1, 0, 3, 3] = np.nan
    np.savez(d / "nan.npz", x=x)
    np.savez(d / "whole.npz", x=np.zeros((4, 1, 32, 32), np.float32))
    (d / "truncated.npz").write_bytes((d / "whole.npz").read_bytes()[:300])
    np.savez(d / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    np.savez(d / "label50.npz", x=np.zeros((4, 1, 32, 32), np.float32), y=np.array([0, 1, 50, 2]))
    nan_weights = {k: torch.full_like(v, float("nan")) for k, v in _digits_state().items()}
    torch.save(nan_weights, d / "nan_weights.pt")
    return d


def _digits_state() -> dict[str, torch.Tensor]:
    return bs.load_model("digits-cnn").state_dict()


BAD = {
    "unknown model": (["--model", "no-such-net", "--data", "digits"], "unknown model spec"),
    "missing weights": (
        ["--model", "digits-cnn", "--weights", "{d}/missing.pt", "--data", "digits"],
        "does not exist",
    ),
    "not a state dict": (
        ["--model", "digits-cnn", "--weights", "{d}/not_state_dict.pt", "--data", "digits"],
        "not a state dict",
    ),
    "pickled module": (
        ["--model", "digits-cnn", "--weights", "{d}/pickled_module.pt", "--data", "digits"],
        "not a state dict",
    ),
    "corrupt image": (["--model", "digits-cnn", "--data", "{d}/images"], "corrupt.png"),
    "wrong size": (["--model", "digits-cnn", "--data", "{d}/small.npz"], "(1, 20, 20)"),
    "nan": (["--model", "digits-cnn", "--data", "{d}/nan.npz"], "NaN"),
    "missing folder": (["--model", "digits-cnn", "--data", "{d}/photos/"], "photos/ does not"),
    "weights a directory": (
        ["--model", "digits-cnn", "--weights", "{d}/images", "--data", "digits"],
        "images is a directory; expected a file written by torch.save",
    ),
    "truncated npz": (
        ["--model", "digits-cnn", "--data", "{d}/truncated.npz"],
        "truncated.npz is a damaged .npz archive",
    ),
    "npz of objects": (
        ["--model", "digits-cnn", "--data", "{d}/objects.npz"],
        "objects.npz holds pickled objects, which are never loaded",
    ),
    "label beyond the classes": (
        ["--model", "digits-cnn", "--data", "{d}/label50.npz"],
        "has label 50, but the model has 10 classes; expected labels 0 to 9",
    ),
    "weights that give NaN": (
        ["--model", "digits-cnn", "--weights", "{d}/nan_weights.pt", "--data", "digits"],
        "returns NaN or inf on 2 items of x",
    ),
    "no cuda": (["--model", "digits-cnn", "--data", "digits", "--device", "cuda"], "CUDA"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line_and_keeps_the_run(case, bad_files, attack_dir, capsys):
    args, expected = BAD[case]
    args = [a.format(d=bad_files) for a in args]
    before = _snapshot(attack_dir)
    argv = ["attack", *args, "--method", "gradient,lrp", "-n", "6", "--batch-size", "2"]
    assert main([*argv, "--steps", "10", "--out", str(attack_dir), "--resume"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("betasmooth: error: ") and err.count("\n") == 1
    assert expected in err
    assert "Traceback" not in err + out
    assert _snapshot(attack_dir) == before


def test_bad_input_through_the_installed_command(bad_files, tmp_path):
    argv = ["attack", "--model", "digits-cnn", "--data", f"{bad_files}/nan.npz"]
    argv += ["--method", "gradient", "--out"]

    def run(out):
        return subprocess.run(
            [sys.executable, "-m", "betasmooth", *argv, str(out)],
            env=ENV,
            capture_output=True,
            text=True,
        )

    proc = run(tmp_path / "new")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"betasmooth: error: array x in {bad_files}/nan.npz contains NaN or inf (first at item 1); "
        "expected finite values"
    ]
    assert not (tmp_path / "new").exists() or not list((tmp_path / "new").iterdir())
    # A folder that holds files of the user's is named first: the run could not go there.
    (tmp_path / "mine" / "keep.txt").parent.mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("mine")
    proc = run(tmp_path / "mine")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"betasmooth: error: {tmp_path / 'mine'} is not empty; pass --resume to continue the "
        "run in it, or choose a new --out"
    ]
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.txt"]


def test_theorem_json_prints_the_summary_without_curves(tmp_path, capsys):
    assert main(["theorem", "--out", str(tmp_path / "t"), "--quick", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((tmp_path / "t" / "theory.json").read_text())
    assert "curves" not in printed and "curves" in stored
    assert printed == {k: v for k, v in stored.items() if k != "curves"}
    assert list((tmp_path / "t" / "figures").glob("*.png"))
    # The report is built too, with the numbers of theory.json.
    first = (tmp_path / "t" / "report.html").read_bytes()
    assert build_report(tmp_path / "t").read_bytes() == first
    assert f"{stored['identity_1d_max_error']:.4g}".encode() in first


def test_explain_records_the_prediction_and_map_statistics(tmp_path, capsys):
    out = tmp_path / "maps"
    argv = ["explain", "--model", "digits-cnn", "--data", "digits", "--method", "gradient"]
    assert main([*argv, "-n", "3", "--out", str(out), "--no-progress"]) == 0
    model = bs.load_model("digits-cnn")
    x, y = bs.load_data("digits")
    rows = read_jsonl(out / "results.jsonl")
    with torch.no_grad():
        logits = model(x[:3])
    maps = _saliency(model, x[:3])
    for i, r in enumerate(rows):
        assert (r["index"], r["method"], r["true_label"]) == (i, "gradient", int(y[i]))
        assert r["label"] == int(logits[i].argmax())
        assert r["logit"] == pytest.approx(float(logits[i].max()), rel=1e-5)
        flat = np.sort(maps[i].ravel())[::-1]
        assert r["map_max"] == pytest.approx(flat[0], rel=1e-4)
        assert r["map_top10_mass"] == pytest.approx(flat[: flat.size // 10].sum(), rel=1e-4)
        nz = flat[flat > 0]
        assert r["map_entropy"] == pytest.approx(-(nz * np.log(nz)).sum(), rel=1e-4)
    with np.load(out / "arrays" / "gradient-0.npz") as data:
        np.testing.assert_allclose(data["map"], maps, atol=1e-6)
    # The console's table: medians of the hand-computed statistics, each in its column.
    header, *table = capsys.readouterr().out.splitlines()
    assert header.split() == ["method", "n", "max", "entropy", "top10%", "s/img"]
    cells = table[0].split()
    assert cells[:2] == ["gradient", "3"]
    flat = np.sort(maps.reshape(3, -1), axis=1)[:, ::-1]
    logs = np.log(np.where(flat > 0, flat, 1.0))
    expected = [flat[:, 0], -(flat * logs).sum(1), flat[:, : flat.shape[1] // 10].sum(1)]
    for cell, values in zip(cells[2:5], expected):
        assert float(cell) == pytest.approx(np.median(values), abs=6e-4)


def test_curvature_of_relu_is_zero_and_gradient_norm_matches_autograd(tmp_path, capsys):
    out = tmp_path / "curv"
    argv = ["curvature", "--model", "digits-cnn", "--data", "digits", "--betas", "relu,10,5"]
    assert main([*argv, "-n", "2", "--iterations", "5", "--out", str(out)]) == 0
    # The console lists the networks in order of beta.
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[1:4]] == ["beta=5", "beta=10", "relu"]
    rows = {(r["index"], r["method"]): r for r in read_jsonl(out / "results.jsonl")}
    assert sorted(rows) == [(i, m) for i in (0, 1) for m in ("beta=10", "beta=5", "relu")]
    model = bs.load_model("digits-cnn")
    x, _ = bs.load_data("digits")
    for i in range(2):
        # A ReLU network is piecewise linear: no curvature at all.
        assert rows[(i, "relu")]["hessian_norm"] == 0.0
        assert rows[(i, "beta=5")]["hessian_norm"] > 0.0
        with torch.no_grad():
            label = model(x[i : i + 1]).argmax(1)
        xg = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_softplus_twin(5.0)(xg)[0, label[0]], xg)
        assert rows[(i, "beta=5")]["gradient_norm"] == pytest.approx(float(g.norm()), rel=1e-4)
        assert rows[(i, "beta=5")]["beta"] == 5.0 and rows[(i, "relu")]["beta"] is None
        assert rows[(i, "relu")]["label"] == rows[(i, "beta=5")]["label"] == int(label[0])
    html = (out / "report.html").read_text()
    assert "principal_curvature" in html and "hessian_norm" in html


def test_curvature_says_which_estimates_stopped_before_they_converged(tmp_path, capsys):
    # Two Lanczos products on beta = 5 leave the Hessian norm below the converged value;
    # ReLU's Hessian is zero, exact at once. The resumed run, --betas in another order,
    # is the same run and adds nothing.
    out = str(tmp_path / "curv")
    argv = ["curvature", "--model", "digits-cnn", "--data", "digits", "-n", "2", "--no-progress"]
    assert main([*argv, "--betas", "relu,5", "--iterations", "2", "--out", out]) == 0
    err = capsys.readouterr().err
    assert (
        "betasmooth: warning: 2 of 4 curvature estimates (e.g. item 0, beta=5) did not "
        "converge in --iterations 2"
    ) in err
    short = {(r["index"], r["method"]): r for r in read_jsonl(Path(out) / "results.jsonl")}
    assert {k: r["converged"] for k, r in short.items()} == {
        (0, "beta=5"): False,
        (1, "beta=5"): False,
        (0, "relu"): True,
        (1, "relu"): True,
    }
    found = bs.curvature(
        bs.smooth(bs.load_model("digits-cnn"), 5.0),
        bs.load_data("digits")[0][:2],
        iterations=60,
        seed=[unit_seed(0, "curvature", i) for i in (0, 1)],
        data_range=(0.0, 1.0),
    )
    assert found["converged"].all()
    for i in (0, 1):
        assert short[(i, "beta=5")]["hessian_norm"] < 0.999 * found["hessian_norm"][i].item()
    # The report counts them per network (columns beta=5, relu).
    page = (Path(out) / "report.html").read_text()
    row = re.search(r'<th class="k">estimates converged</th>((?:<td[^>]*>[^<]*</td>)+)', page)
    assert re.findall(r">(\d+)</td>", row.group(1)) == ["0", "2"]
    assert "the others may lie below the true value" in page
    # The warning said on the command line is kept in the run, and its report shows it.
    said = next(line for line in err.splitlines() if "did not converge" in line)
    kept = [{"command": "curvature", "warning": said.removeprefix("betasmooth: warning: ")}]
    assert read_jsonl(Path(out) / "warnings.jsonl") == kept
    table = re.search(r"<table id=\"warnings-table\">.*?</table>", page).group(0)
    assert re.findall(r"<t[hd][^>]*>([^<]*)</t[hd]>", table)[2:] == [
        "curvature",
        html.escape(kept[0]["warning"], quote=False),
    ]
    assert main([*argv, "--betas", "5,relu", "--iterations", "2", "--out", out, "--resume"]) == 0
    assert len(read_jsonl(Path(out) / "results.jsonl")) == 4
    assert read_jsonl(Path(out) / "warnings.jsonl") == kept  # said again, kept once


def test_curvature_records_do_not_depend_on_the_batch_size(tmp_path):
    argv = ["curvature", "--model", "digits-cnn", "--data", "digits", "--betas", "1,5", "-n", "3"]
    rows = {}
    for size in (1, 3):
        out = tmp_path / f"b{size}"
        assert main([*argv, "--iterations", "6", "--batch-size", str(size), "--out", str(out)]) == 0
        rows[size] = {
            (r["index"], r["method"]): {k: v for k, v in r.items() if k != "seconds"}
            for r in read_jsonl(out / "results.jsonl")
        }
    assert rows[1].keys() == rows[3].keys() and len(rows[1]) == 6
    for key, row in rows[1].items():
        for field, value in row.items():
            # pytest.approx takes numbers only (a label or None: compared as they are).
            want = pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
            assert rows[3][key][field] == want, (key, field)


def test_curvature_draws_the_same_probes_for_every_beta(tmp_path, capsys):
    # A network without ReLU is the same network at every beta: identical rows.
    weights = tmp_path / "tanh.pt"
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(32 * 32, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10)
    )
    torch.save(net.state_dict(), weights)
    (tmp_path / "tanh_net.py").write_text(
        "import torch\n\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Flatten(), "
        "torch.nn.Linear(32 * 32, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10))\n"
    )
    out = tmp_path / "curv"
    argv = ["curvature", "--model", f"{tmp_path / 'tanh_net.py'}:build", "--weights", str(weights)]
    argv += ["--data", "digits", "--betas", "relu,1,5", "-n", "2", "--iterations", "4"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    assert "no ReLU was called" in capsys.readouterr().err  # smoothing changes nothing, as said
    rows = read_jsonl(out / "results.jsonl")
    fields = ("hessian_norm", "principal_curvature", "hessian_frobenius", "gradient_norm")
    for i in (0, 1):
        mine = [r for r in rows if r["index"] == i]
        assert len(mine) == 3 and mine[0]["hessian_frobenius"] > 0
        assert all(r[f] == mine[0][f] for r in mine for f in fields), mine
    # A run of 0.6.0 drew per beta: resuming it would mix the two draws.
    config = json.loads((out / "config.json").read_text())
    del config["probes"]
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--no-progress", "--resume"]) == 2
    assert "--resume with a different setting: probes is not given" in capsys.readouterr().err


def test_records_and_report_name_the_file_and_class_of_each_image(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("zebra/b.png", "zebra/a.png", "Apple/x.png"):
        (tmp_path / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(
            tmp_path / "imgs" / name
        )
    common = ["--model", "digits-cnn", "--data", str(tmp_path / "imgs"), "--method", "gradient"]
    for command, extra in (("explain", []), ("attack", ["--steps", "2"])):
        out = tmp_path / command
        assert main([command, *common, *extra, "--out", str(out), "--no-progress"]) == 0
        name = "explain.jsonl" if (out / "explain.jsonl").exists() else "results.jsonl"
        rows = sorted(read_jsonl(out / name), key=lambda r: r["index"])
        assert [(r["file"], r["true_label"], r["true_label_name"]) for r in rows] == [
            ("Apple/x.png", 0, "Apple"),
            ("zebra/a.png", 1, "zebra"),
            ("zebra/b.png", 1, "zebra"),
        ]
        html = (out / "report.html").read_text()
        assert "Files: #0 Apple/x.png, #1 zebra/a.png, #2 zebra/b.png." in html


def test_a_float64_model_is_explained_in_float64(tmp_path):
    # The runs call the model directly: the inputs must take its dtype.
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef net():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(1024, 10)).double()\n"
    )
    argv = ["explain", "--model", f"{tmp_path}/net.py:net", "--data", "digits", "-n", "2"]
    assert main([*argv, "--method", "gradient", "--out", str(tmp_path / "run")]) == 0
    with np.load(tmp_path / "run" / "arrays" / "gradient-0.npz") as saved:
        x, saved_map = torch.from_numpy(saved["x"]), torch.from_numpy(saved["map"])
    assert x.dtype == torch.float64
    net = bs.load_model(f"{tmp_path}/net.py:net")
    expected = bs.heatmap(bs.explain(net, bs.load_data("digits")[0][:2].double(), "gradient"))
    torch.testing.assert_close(saved_map.double(), expected, rtol=1e-6, atol=1e-9)


def test_a_bfloat16_model_runs_from_the_command_line(tmp_path):
    # numpy has no bfloat16: writing the arrays of a run ended in a TypeError.
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef net():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(4096, 10)).bfloat16()\n"
    )
    common = ["--model", f"{tmp_path}/net.py:net", "--data", "digits", "-n", "2", "--no-progress"]
    argv = ["explain", *common, "--method", "gradient", "--out", str(tmp_path / "e")]
    assert main(argv) == 0
    with np.load(tmp_path / "e" / "arrays" / "gradient-0.npz") as saved:
        x, saved_map = torch.from_numpy(saved["x"]), torch.from_numpy(saved["map"])
    assert x.dtype == saved_map.dtype == torch.float32
    net = bs.load_model(f"{tmp_path}/net.py:net")
    images = bs.load_data("digits")[0][:2]
    torch.testing.assert_close(x, images.bfloat16().float(), rtol=0, atol=0)
    expected = bs.heatmap(bs.explain(net, images.bfloat16(), "gradient")).float()
    torch.testing.assert_close(saved_map, expected, rtol=0, atol=0)
    attack = tmp_path / "a"
    argv = ["attack", *common, "--method", "gradient", "--steps", "2", "--out", str(attack)]
    assert main(argv) == 0
    with np.load(attack / "arrays" / "gradient-0.npz") as saved:
        assert saved["x_adv"].dtype == np.float32 and np.isfinite(saved["map_adv"]).all()
    assert main(["sweep", str(attack), "--betas", "1", "--smoothgrad-n", "2", "--no-progress"]) == 0
    assert len(read_jsonl(attack / "sweep.jsonl")) > 0


def test_warnings_are_one_line_about_the_run(tmp_path, capsys):
    (tmp_path / "net.py").write_text(
        "from torch import nn\n\n\ndef net():\n    return nn.Sequential(nn.Conv2d(1, 2, 3, "
        "padding=1), nn.Hardshrink(), nn.Flatten(), nn.Linear(2048, 10))\n"
    )
    argv = ["explain", "--model", f"{tmp_path}/net.py:net", "--data", "digits", "-n", "1"]
    assert main([*argv, "--method", "beta_smooth", "--out", str(tmp_path / "run")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == [
        "betasmooth: warning: Sequential: no ReLU was called in forward; beta-smoothing "
        "changed nothing",
        "betasmooth: warning: Sequential: beta-smoothing replaces ReLU and the activations made "
        "of it; these piecewise-linear activations stay non-smooth: Hardshrink",
    ]


def test_a_libraries_warning_over_several_lines_is_one_line(tmp_path, capsys):
    # A model file's own library may wrap its warning's text (Captum's did).
    (tmp_path / "net.py").write_text(
        "import warnings\n\nfrom torch import nn\n\n\nclass Net(nn.Sequential):\n"
        "    def forward(self, x):\n        warnings.warn('first part\\n    second  part')\n"
        "        return super().forward(x)\n\n\ndef net():\n    return Net(nn.Flatten(), "
        "nn.Linear(1024, 10))\n"
    )
    argv = ["explain", "--model", f"{tmp_path}/net.py:net", "--data", "digits", "-n", "1"]
    assert main([*argv, "--method", "gradient", "--out", str(tmp_path / "run")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "part" in line]
    assert warned and set(warned) == {"betasmooth: warning: first part second part"}


@pytest.mark.parametrize(("accepted", "calls"), [(1, [-3, -1]), (0, [-3])])
def test_the_trim_threshold_is_set_only_where_the_mmap_threshold_was_taken(
    monkeypatch, accepted, calls
):
    # Either setting turns off glibc's rising mmap threshold: the trim threshold alone,
    # where a glibc refuses 1 GiB as mmap threshold (mallopt returns 0), would leave
    # every block over 128 KiB mapped anew at each allocation.
    import ctypes

    import betasmooth.cli as cli

    seen = []

    class Libc:
        def mallopt(self, param, value):
            seen.append(param)
            assert value == 1 << 30
            return accepted if param == -3 else 1

    monkeypatch.setattr(cli.sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    cli._reuse_freed_memory()
    assert seen == calls


def test_the_command_sets_glibcs_thresholds_before_it_runs(monkeypatch, tmp_path):
    # main() itself keeps the freed blocks, not only the helper: a command that fails
    # on its model file has set both thresholds, 1 GiB each, before it reads the file.
    import ctypes

    import betasmooth.cli as cli

    seen = []

    class Libc:
        def mallopt(self, param, value):
            seen.append((param, value))
            return 1

    monkeypatch.setattr(cli.sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    argv = ["explain", "--model", f"{tmp_path / 'missing.py'}:net", "--data", "digits"]
    assert main([*argv, "--method", "gradient", "--out", str(tmp_path / "run")]) == 2
    assert seen == [(-3, 1 << 30), (-1, 1 << 30)]


def test_a_reader_that_goes_away_is_no_error(tmp_path):
    # `betasmooth theorem --json | head -1`: the pipe closes before the summary is printed.
    argv = ["theorem", "--quick", "--json", "--no-progress", "--out", str(tmp_path / "t")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "betasmooth", *argv],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0
    assert proc.stderr.read() == ""
    assert json.loads((tmp_path / "t" / "theory.json").read_text())


@pytest.mark.parametrize(
    ("goal", "column", "field"),
    [("topk", "top-k kept", "expl_topk_orig"), ("center", "com shift", "expl_com_shift_orig")],
)
def test_untargeted_attack_summary_shows_what_the_goal_moves(goal, column, field, tmp_path, capsys):
    argv = [*ATTACK, "--method", "gradient", "--goal", goal, "-n", "3", "--steps", "3"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert column in header and "pcc tgt" not in header
    row = next(line for line in lines if line.startswith("gradient")).split()
    records = read_jsonl(tmp_path / "run" / "results.jsonl")
    position = header.split().index(column.split()[0])
    assert float(row[position]) == pytest.approx(np.median([r[field] for r in records]), abs=6e-4)
    # Its sweep has no target column either: the "target" is the original map, and the
    # column repeated pcc adv/orig.
    assert main(["sweep", str(tmp_path / "run"), "--betas", "2", "--smoothgrad-n", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if _words(line).startswith("method defense beta"))
    assert "pcc adv/orig" in header and "tgt" not in header
    row = next(line for line in lines if _words(line).startswith("gradient beta_smooth")).split()
    sweep = [
        r for r in read_jsonl(tmp_path / "run" / "sweep.jsonl") if r["defense"] == "beta_smooth"
    ]
    expected = np.median([r["adv_vs_orig_pcc"] for r in sweep])
    assert float(row[4]) == pytest.approx(expected, abs=6e-4)


def test_attack_takes_the_budget_and_top_k_size_of_ghorbani_et_al(tmp_path, capsys):
    # --eps 4/255 bounds every pixel's change; --k 50 is the top-k of the goal and of
    # the scores, which equal the intersection of numpy's top 50 pixels of both maps.
    run = tmp_path / "run"
    argv = [*ATTACK, "--method", "gradient", "--goal", "topk", "-n", "3", "--steps", "6"]
    assert main([*argv, "--eps", "4/255", "--k", "50", "--out", str(run)]) == 0
    records = read_jsonl(run / "results.jsonl")
    for r in records:
        assert (r["attack_eps"], r["attack_step"], r["attack_k"]) == (
            pytest.approx(4 / 255),
            pytest.approx(0.4 / 255),
            50,
        )
    with np.load(run / "arrays" / "gradient-0.npz") as saved:
        change = np.abs(saved["x_adv"] - saved["x"]).max()
        adv, orig = saved["map_adv"], saved["map_orig"]
    assert 0.4 / 255 < change <= 4 / 255 + 1e-6
    top = [
        [set(np.argsort(-m[i].ravel(), kind="stable")[:50]) for m in (adv, orig)] for i in range(3)
    ]
    expected = [len(a & o) / 50 for a, o in top]
    np.testing.assert_allclose([r["expl_topk_orig"] for r in records], expected, atol=1e-6)
    assert min(expected) < 1  # the attack moved some of the top 50
    assert json.loads((run / "config.json").read_text())["eps"] == pytest.approx(4 / 255)
    # Another budget is another run; a run made with a budget resumes only with it.
    capsys.readouterr()
    assert main([*argv, "--eps", "0.02", "--k", "50", "--out", str(run), "--resume"]) == 2
    assert "eps is 0.01568627450980392 in" in capsys.readouterr().err
    assert main([*argv, "--k", "50", "--out", str(run), "--resume"]) == 2
    assert main([*argv, "--eps", "4/255", "--k", "50", "--out", str(run), "--resume"]) == 0
    # The defaults given by name are the attack without them: 8/255 and 10 % of 32 x 32.
    plain = tmp_path / "plain"
    assert main([*argv, "--out", str(plain)]) == 0
    assert "eps" not in json.loads((plain / "config.json").read_text())
    assert main([*argv, "--eps", "8/255", "--k", "102", "--out", str(plain), "--resume"]) == 0
    assert main([*argv, "--k", "103", "--out", str(plain), "--resume"]) == 2


def test_an_attack_without_eps_or_k_records_neither_so_an_earlier_run_resumes(tmp_path):
    # The config of an attack given neither is that of a version before --eps and --k.
    run = tmp_path / "run"
    argv = [*ATTACK, "--method", "gradient", "-n", "2", "--steps", "2", "--out", str(run)]
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert "eps" not in config and "k" not in config
    assert main([*argv, "--resume"]) == 0
    assert main([*argv, "--k", "50", "--resume"]) == 2  # a top-k size given is another run


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--eps", "0", "expected a fraction of the data range above 0 and at most 1"),
        ("--eps", "1.5", "expected a fraction of the data range above 0 and at most 1"),
        ("--eps", "8/0", "expected a fraction of the data range above 0 and at most 1"),
        ("--eps", "-8/-255", "expected a fraction of the data range above 0 and at most 1"),
        ("--k", "0", "expected a positive integer"),
        ("--k", "1025", "--k must be less than the 32x32 map's 1024 pixels; got 1025"),
        ("--k", "1024", "--k must be less than the 32x32 map's 1024 pixels; got 1024"),
    ],
)
def test_a_bad_budget_or_top_k_size_is_one_line_before_the_run_starts(
    flag, value, message, tmp_path, capsys
):
    argv = [*ATTACK, "--method", "gradient", "--goal", "topk", "-n", "2", "--steps", "2"]
    try:
        # flag=value: a value that starts with "-" is otherwise taken for an option.
        status = main([*argv, f"{flag}={value}", "--out", str(tmp_path / "run")])
    except SystemExit as stop:  # argparse's own errors
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_top_k_size_from_one_to_one_pixel_less_than_the_map_is_recorded_unless_default():
    # A 32 x 32 map: the default k is 10 % of its 1024 pixels (102), which the config
    # leaves out; 1 and 1023 are the smallest and largest other sizes it records.
    import argparse

    from betasmooth.attack import GOALS
    from betasmooth.cli import _budget_settings

    x = torch.zeros(2, 1, 32, 32)
    settings = {
        k: _budget_settings(argparse.Namespace(eps=None, k=k), GOALS["topk"], x)
        for k in (None, 1, 101, 102, 103, 1023)
    }
    assert settings == {
        None: {},
        1: {"k": 1},
        101: {"k": 101},
        102: {},
        103: {"k": 103},
        1023: {"k": 1023},
    }
    with pytest.raises(bs.InputError, match="^--k must be less than the 32x32 map's 1024 pix"):
        _budget_settings(argparse.Namespace(eps=None, k=1024), GOALS["topk"], x)


def test_a_targeted_attack_records_any_budget_it_is_given():
    # A targeted attack has no budget by default: 8/255, the untargeted goals' default,
    # is a setting of its own and recorded, as it is not for topk.
    import argparse

    from betasmooth.attack import GOALS, UNTARGETED_EPS
    from betasmooth.cli import _budget_settings

    x = torch.zeros(2, 1, 32, 32)
    given = argparse.Namespace(eps=UNTARGETED_EPS, k=None)
    assert _budget_settings(given, GOALS["targeted"], x) == {"eps": UNTARGETED_EPS}
    assert _budget_settings(given, GOALS["topk"], x) == {}


def test_a_budget_is_a_fraction_above_zero_up_to_the_whole_range():
    # 1 (the whole range, the same as no budget) is at most 1; 0 and above 1 are not.
    import argparse

    from betasmooth.cli import _budget

    assert _budget("8/255") == 8 / 255 and _budget("0.03") == 0.03
    assert _budget("1") == _budget("255/255") == 1.0
    # -8/-255 divides to 8/255, but no one means a budget of negative parts.
    for bad in ("0", "0/255", "-0.1", "1.0001", "256/255", "8/0", "x", "1/2/3", "-8/-255"):
        with pytest.raises(
            argparse.ArgumentTypeError, match=f"at most 1, e.g. 0.03 or 8/255; got '{bad}'$"
        ):
            _budget(bad)


def _away_from_the_original(p, maps, x_adv=None):
    return -bs.compare(maps, p.map_orig)["mse"]


def test_a_registered_goal_runs_from_the_command_line(tmp_path, capsys, monkeypatch):
    # GOALS is the registry of goals: --goal, the attack, its records and its
    # summary table follow a new one without another list to keep in step.
    from betasmooth.attack import GOALS, Goal

    away = Goal(_away_from_the_original, _away_from_the_original, True, False, "expl_mse_orig")
    monkeypatch.setitem(GOALS, "away", away)
    argv = [*ATTACK, "--method", "gradient", "--goal", "away", "-n", "3", "--steps", "3"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("method")).split()
    row = next(line for line in lines if line.startswith("gradient")).split()
    records = read_jsonl(tmp_path / "run" / "results.jsonl")
    assert {r["goal"] for r in records} == {"away"} and "target_index" not in records[0]
    with np.load(tmp_path / "run" / "arrays" / "gradient-0.npz") as saved:
        moved = bs.compare(torch.from_numpy(saved["map_adv"]), torch.from_numpy(saved["map_orig"]))
    np.testing.assert_allclose([r["expl_mse_orig"] for r in records], moved["mse"], rtol=1e-5)
    expected = np.median([r["expl_mse_orig"] for r in records])
    assert float(row[header.index("expl_mse_orig")]) == pytest.approx(expected, rel=5e-3)


MODEL_WITH_GOAL = """
import betasmooth as bs
from betasmooth.attack import GOALS, Goal


def away(p, maps, x_adv=None):
    return -bs.compare(maps, p.map_orig)["mse"]


GOALS["away_from_file"] = Goal(away, away, True, False, "expl_mse_orig")


def build():
    return bs.load_model("digits-cnn")
"""


def test_a_goal_the_model_file_registers_is_a_goal_of_the_command_line(tmp_path, capsys):
    # --goal is checked once the model file is imported: argparse's fixed choices refused it.
    from betasmooth.attack import GOALS

    path = tmp_path / "goal.py"
    path.write_text(MODEL_WITH_GOAL)
    argv = ["attack", "--model", f"{path}:build", "--data", "digits", "--no-progress"]
    argv += ["--method", "gradient", "-n", "2", "--steps", "2"]
    try:
        assert main([*argv, "--goal", "away_from_fil", "--out", str(tmp_path / "typo")]) == 2
        assert capsys.readouterr().err == (
            "betasmooth: error: unknown --goal 'away_from_fil'; expected one of: "
            "away_from_file, center, targeted, topk\n"
        )
        assert not (tmp_path / "typo").exists()
        assert main([*argv, "--goal", "away_from_file", "--out", str(tmp_path / "run")]) == 0
    finally:
        GOALS.pop("away_from_file", None)
    records = read_jsonl(tmp_path / "run" / "results.jsonl")
    assert {r["goal"] for r in records} == {"away_from_file"} and len(records) == 2
    assert "target_index" not in records[0] and "expl_mse_orig" in records[0]
    # betasmooth report imports no model file: the goal is read from the run, and the
    # report comes out as the attack wrote it (before, as a targeted attack's).
    report = tmp_path / "run" / "report.html"
    written = report.read_bytes()
    assert b"expl_mse_orig" in written and b"expl_pcc_target" not in written
    assert main(["report", str(tmp_path / "run")]) == 0
    assert report.read_bytes() == written


MODEL_WITH_DEFENSE = """
import torch
import betasmooth as bs
from betasmooth.defense import DEFENSES


def box_blur(model, xs, method, label, beta, *, sigma, n, seed, input_range, base_options):
    k = 1 + 2 * round(2 / beta)
    blurred = torch.nn.functional.avg_pool2d(xs, k, 1, k // 2, count_include_pad=False)
    return bs.heatmap(bs.explain(model, blurred, method, label))


DEFENSES["box_blur"] = box_blur


def build():
    return bs.load_model("digits-cnn")
"""


def test_sweep_runs_a_defense_the_model_file_registers(tmp_path, capsys):
    from betasmooth.defense import DEFENSES

    path, run = tmp_path / "defended.py", tmp_path / "run"
    path.write_text(MODEL_WITH_DEFENSE)
    argv = ["attack", "--model", f"{path}:build", "--data", "digits", "--no-progress"]
    sweep = ["sweep", str(run), "--betas", "1,4", "--smoothgrad-n", "2", "--no-progress"]
    try:
        assert (
            main([*argv, "--method", "gradient", "-n", "2", "--steps", "2", "--out", str(run)]) == 0
        )
        capsys.readouterr()
        # As in a new process, the defense is known once the sweep has loaded the model file.
        DEFENSES.pop("box_blur")
        for name in [n for n in sys.modules if n.startswith("_betasmooth_user_defended_")]:
            del sys.modules[name]
        assert main([*sweep, "--defenses", "box_blur, beta_smooth,box_blur"]) == 0
        table = capsys.readouterr().out
        # Another selection is another sweep: refused before the model is loaded.
        assert main(sweep) == 2
        assert (
            "holds a sweep whose defenses is beta_smooth,box_blur (beta_smooth,smoothgrad now)"
            in (capsys.readouterr().err)
        )
        # A typo is named as such, with the file's defenses, before the settings compared.
        DEFENSES.pop("box_blur")
        for name in [n for n in sys.modules if n.startswith("_betasmooth_user_defended_")]:
            del sys.modules[name]
        assert main([*sweep, "--defenses", "box_blr"]) == 2
        assert capsys.readouterr().err == (
            "betasmooth: error: unknown defense 'box_blr'; expected one of: beta_smooth, "
            "box_blur, smoothgrad\n"
        )
    finally:
        DEFENSES.pop("box_blur", None)
    rows = read_jsonl(run / "sweep.jsonl")
    assert sorted({(r["defense"], r["beta"]) for r in rows}) == [
        (d, b) for d in ("beta_smooth", "box_blur") for b in (1.0, 4.0)
    ]
    summary = json.loads((run / "sweep_summary.json").read_text())["gradient"]
    assert summary["defenses"] == ["beta_smooth", "box_blur"]  # the defenses swept
    assert summary["smoothgrad"] == {}
    # The summary's table (after the records' medians) shows its fidelity at beta 1.
    fidelity = [
        r["clean_vs_orig_pcc"] for r in rows if r["defense"] == "box_blur" and r["beta"] == 1
    ]
    summary_table = table[table.index("robust pcc") :]
    line = next(t for t in summary_table.splitlines() if t.split()[1:3] == ["box_blur", "1"])
    assert float(line.split()[6]) == pytest.approx(np.median(fidelity), abs=5e-4) != 1
    assert json.loads((run / "config.json").read_text())["sweep"]["defenses"] == [
        "beta_smooth",
        "box_blur",
    ]
    # Its maps are stored beside beta-smoothing's: at beta 4 the blur is 1 pixel wide,
    # so they are the attack's own maps of the attacked images.
    swept = np.load(next(run.glob("arrays/sweep-gradient-*.npz")))
    attacked = np.load(next(run.glob("arrays/gradient-*.npz")))
    assert sorted(swept) == ["betas", "index", "maps_beta", "maps_box_blur"]
    assert swept["maps_box_blur"].shape == swept["maps_beta"].shape == (2, 2, 32, 32)
    np.testing.assert_allclose(swept["maps_box_blur"][:, 1], attacked["map_adv"], atol=1e-6)
    assert np.abs(swept["maps_box_blur"][:, 0] - attacked["map_adv"]).max() > 1e-3


def test_defenses_are_a_comma_list_as_a_shell_user_writes_it():
    from betasmooth.cli import build_parser

    args = build_parser().parse_args(["sweep", "run", "--defenses", " box_blur, smoothgrad ,"])
    assert args.defenses == ["box_blur", "smoothgrad"]


def test_sweep_names_an_unknown_defense_of_a_built_in_model_before_loading(
    attack_dir, tmp_path, capsys, monkeypatch
):
    import shutil

    import betasmooth.cli as cli

    run = tmp_path / "run"
    shutil.copytree(attack_dir, run)
    monkeypatch.setattr(cli, "_load", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert main(["sweep", str(run), "--defenses", "beta_smooth,median"]) == 2
    assert capsys.readouterr().err == (
        "betasmooth: error: unknown defense 'median'; expected one of: beta_smooth, smoothgrad\n"
    )
    assert "sweep" not in json.loads((run / "config.json").read_text())


MODEL_WITH_SECTION = """
import betasmooth as bs
from betasmooth.report import SECTIONS


def images(run):
    return f"<h2 id='own'>Own section</h2><p>{len(run.explain)} explained images</p>"


SECTIONS["own_section"] = images


def build():
    return bs.load_model("digits-cnn")
"""


def test_report_rebuilds_the_sections_the_run_s_model_file_registers(tmp_path):
    # betasmooth report imports the model file, as the run's commands did: the rebuilt
    # report is the one they wrote (before, without the file's section). In a process of
    # its own, where nothing is imported yet.
    from betasmooth.report import SECTIONS

    path = tmp_path / "own.py"
    path.write_text(MODEL_WITH_SECTION)
    run = tmp_path / "run"
    argv = ["explain", "--model", f"{path}:build", "--data", "digits", "-n", "3"]
    try:
        assert main([*argv, "--method", "gradient", "--no-progress", "--out", str(run)]) == 0
    finally:
        SECTIONS.pop("own_section", None)
    written = (run / "report.html").read_bytes()
    assert b"<p>3 explained images</p>" in written
    (run / "report.html").unlink()
    command = [sys.executable, "-m", "betasmooth", "report", str(run)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert (run / "report.html").read_bytes() == written
    # A model file that is gone: said in one line, and the report holds the rest.
    path.unlink()
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stderr == (
        f"betasmooth report: model file {path} does not exist; expected "
        "'path/to/file.py:factory' or 'package.module:factory'; the report holds only what "
        "betasmooth registers\n"
    )
    rebuilt = (run / "report.html").read_bytes()
    assert b"explained images" not in rebuilt and b"id='explain'" in rebuilt


def test_a_report_section_that_fails_or_gives_no_text_costs_only_itself(tmp_path, capsys):
    # A section that raises, and one that forgets its return: each named in one line,
    # and the report holds every other section as without them.
    from betasmooth.report import SECTIONS, build_report

    run = tmp_path / "run"
    argv = ["explain", "--model", "digits-cnn", "--data", "digits", "-n", "2", "--no-progress"]
    assert main([*argv, "--method", "gradient", "--out", str(run)]) == 0
    capsys.readouterr()
    whole = (run / "report.html").read_bytes()

    def broken(run):
        raise KeyError("maps")

    SECTIONS["broken"], SECTIONS["empty"] = broken, lambda run: None
    try:
        assert main(["report", str(run)]) == 0
        assert capsys.readouterr().err.splitlines() == [
            "betasmooth: warning: report section 'broken' failed (KeyError: 'maps'); the report "
            "holds the others",
            "betasmooth: warning: report section 'empty' returned NoneType; expected a str of "
            "HTML; the report holds the others",
        ]
        with pytest.warns(UserWarning, match=r"report section '(broken|empty)'"):
            build_report(run)
    finally:
        SECTIONS.pop("broken"), SECTIONS.pop("empty")
    assert (run / "report.html").read_bytes() == whole


GELU_MODEL = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GELU(), nn.MaxPool2d(4), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )
"""


def test_beta_auto_on_a_network_without_relu_says_that_no_beta_changes_a_map(tmp_path, capsys):
    # Every beta gives the plain maps back: the calibration said "no beta met the
    # fidelity threshold" of betas whose fidelity is 1.
    path = tmp_path / "gelu.py"
    path.write_text(GELU_MODEL)
    argv = ["explain", "--model", f"{path}:build", "--data", "digits", "-n", "2"]
    argv += ["--method", "beta_smooth", "--beta", "auto", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert "no ReLU was called in forward (its activations: GELU)" in err
    said = out.splitlines()[1]
    assert said == (
        "beta = 50, the most faithful: beta-smoothing changed no map at any beta (the model "
        "calls no ReLU that it replaces, or each beta is so large that softplus rounds to "
        "ReLU); none recommended"
    )
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    cells = config["beta_auto"]["betas"].values()
    assert {c["changed"] for c in cells} == {False} and {c["fidelity_pcc"] for c in cells} == {1.0}


def test_attack_beta_sets_the_attacked_defense_and_records_every_setting(tmp_path):
    argv = [*ATTACK, "--method", "beta_smooth,gradient", "--beta", "2", "-n", "2", "--steps", "3"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    rows = {(r["method"], r["index"]): r for r in read_jsonl(tmp_path / "run" / "results.jsonl")}
    model = bs.load_model("digits-cnn")
    x = bs.load_data("digits")[0][:2]
    with np.load(tmp_path / "run" / "arrays" / "beta_smooth-0.npz") as saved:
        target, x_adv = torch.from_numpy(saved["map_target"]), torch.from_numpy(saved["x_adv"])
    again = bs.manipulate(model, x, target, "beta_smooth", steps=3, method_options={"beta": 2.0})
    torch.testing.assert_close(x_adv, again.x_adv)
    w_e, w_o = default_weights(32, 32, 10)
    for method in ("beta_smooth", "gradient"):
        row = rows[(method, 0)]
        assert row["attack_lr"] == pytest.approx(default_lr(method, 1.0, 3))
        assert (row["attack_w_e"], row["attack_w_o"], row["attack_steps"]) == (w_e, w_o, 3)
    assert (
        rows[("beta_smooth", 0)]["attack_method_beta"] == 2.0
        and "attack_method_beta" not in rows[("gradient", 0)]
    )
    html = (tmp_path / "run" / "report.html").read_text()
    medians = html[html.index('id="medians"') : html.index("</table>", html.index('id="medians"'))]
    assert "attack_" not in medians and 'id="attack-settings"' in html
    assert json.loads((tmp_path / "run" / "config.json").read_text())["beta"] == 2.0


def test_integrated_gradients_records_its_own_steps_apart_from_the_attacks(tmp_path):
    argv = [*ATTACK, "--method", "integrated_gradients", "-n", "2", "--steps", "3"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0
    row = read_jsonl(tmp_path / "run" / "results.jsonl")[0]
    assert row["attack_steps"] == 3
    assert row["attack_method_steps"] == ATTACK_DEFAULTS["integrated_gradients"]["options"]["steps"]
    assert row["attack_lr"] == pytest.approx(default_lr("integrated_gradients", 1.0, 3))


def test_an_attack_that_changes_nothing_says_so(tmp_path, capsys):
    # A linear model's gradient map does not depend on x: no step can move it.
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef net():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(1024, 10))\n"
    )
    argv = ["attack", "--model", f"{tmp_path}/net.py:net", "--data", "digits", "-n", "2"]
    assert main([*argv, "--method", "gradient", "--steps", "3", "--out", str(tmp_path / "r")]) == 0
    records = read_jsonl(tmp_path / "r" / "results.jsonl")
    assert all(r["input_max_change"] == 0 for r in records)
    out = capsys.readouterr().out
    assert "gradient: no image changed (no step improved the map and kept the label)" in out
    assert main([*ATTACK, "--method", "gradient", "-n", "2", "--steps", "3", "--out",
                 str(tmp_path / "moved")]) == 0  # fmt: skip
    assert "no image changed" not in capsys.readouterr().out


def test_an_attack_that_changes_some_images_says_how_many(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["attack", "--model", "photos-cnn", "--data", "photos", "--method", "gradient"]
    assert main([*argv, "-n", "4", "--steps", "30", "--no-progress", "--out", str(out)]) == 0
    unmoved = sum(r["input_max_change"] == 0 for r in read_jsonl(out / "results.jsonl"))
    said = capsys.readouterr().out
    if 0 < unmoved < 4:
        assert f"gradient: {unmoved} of 4 images unchanged (no step improved the map" in said
    else:
        assert "images unchanged" not in said


def test_the_count_of_unchanged_images_is_said_per_method(capsys):
    from betasmooth.cli import _say_unmoved

    changes = {
        "gradient": [0.0, 0.2, 0.0],
        "guided_backprop": [0.3, 0.0, 0.1],
        "lrp": [0.0, 0.0],
        "smoothgrad": [0.1],
        # Records that do not say how far the input moved (no field) count as no unchanged one.
        "integrated_gradients": [None, None],
    }
    records = [
        {"index": i, "method": m} | ({} if c is None else {"input_max_change": c})
        for m, cs in changes.items()
        for i, c in enumerate(cs)
    ]
    _say_unmoved(records)
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 3
    assert said[0].startswith("gradient: 2 of 3 images unchanged (no step improved the map")
    # One unchanged image is said too.
    assert said[1].startswith("guided_backprop: 1 of 3 images unchanged (no step improved")
    assert said[2].startswith("lrp: no image changed (no step improved the map and kept the label)")


MODEL_WITH_METHOD = """
import betasmooth as bs
from betasmooth.explain import register


@register("gradient_x_sign")
def gradient_x_sign(model, x, target, *, create_graph=False):
    return bs.explain(model, x, "gradient", target, create_graph=create_graph) * x.sign()


def build():
    return bs.load_model("digits-cnn")
"""


def test_methods_registered_by_the_model_file_and_captum_names_run_on_the_command_line(tmp_path):
    # The model file is imported once, before --method is checked: what it
    # registers is a method of explain, attack and the sweep that loads it again.
    path = tmp_path / "mynet.py"
    path.write_text(MODEL_WITH_METHOD)
    model = ["--model", f"{path}:build", "--data", "digits", "-n", "2", "--no-progress"]
    out = tmp_path / "explain"
    methods = "gradient_x_sign,captum:Saliency"
    assert main(["explain", *model, "--method", methods, "--out", str(out)]) == 0
    net = bs.load_model("digits-cnn").double()
    with np.load(out / "arrays" / "gradient_x_sign-0.npz") as saved:
        x, stored = torch.from_numpy(saved["x"]).double(), saved["map"]
    x.requires_grad_(True)
    logits = net(x)
    (grad,) = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), x)
    hand = (grad * x.sign()).abs().sum(1)
    hand = hand / hand.sum((1, 2), keepdim=True)
    np.testing.assert_allclose(stored, hand.detach().numpy(), rtol=1e-4, atol=1e-7)
    with np.load(out / "arrays" / "captum~Saliency-0.npz") as saved:
        saliency = saved["map"]
    hand = grad.abs().sum(1)
    hand = (hand / hand.sum((1, 2), keepdim=True)).numpy()
    np.testing.assert_allclose(saliency, hand, rtol=1e-4, atol=1e-7)  # a float32 run
    attacked = tmp_path / "attack"
    argv = ["attack", *model, "--method", "gradient_x_sign", "--steps", "5"]
    assert main([*argv, "--out", str(attacked)]) == 0
    sweep = ["sweep", str(attacked), "--betas", "5", "--smoothgrad-n", "2", "--no-progress"]
    assert main(sweep) == 0
    rows = read_jsonl(attacked / "sweep.jsonl")
    assert {(r["method"], r["base"]) for r in rows} == {("gradient_x_sign", "gradient_x_sign")}
    # Edited (or imported as a module too), the file defines its method again: no refusal.
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert (
        main(["explain", *model, "--method", "gradient_x_sign", "--out", str(tmp_path / "e2")]) == 0
    )


def test_a_run_of_all_methods_made_before_all_took_registered_ones_resumes(tmp_path, capsys):
    # Before 0.12.0 `--method all` recorded the built-in methods only, also when the
    # model file registered one: --resume continues that run and names the one left out.
    path = tmp_path / "mynet.py"
    path.write_text(MODEL_WITH_METHOD)
    out = tmp_path / "attack"
    argv = ["attack", "--model", f"{path}:build", "--data", "digits", "-n", "2", "--steps", "1"]
    argv += ["--no-progress", "--out", str(out)]
    assert main([*argv, "--method", ",".join(ATTACK_DEFAULTS)]) == 0
    capsys.readouterr()
    assert main([*argv, "--method", "all", "--resume"]) == 0
    err = capsys.readouterr().err
    assert (
        f"{out} was made when --method all meant the 7 built-in methods: resuming those; "
        "attack gradient_x_sign with --method in a new --out"
    ) in err
    assert json.loads((out / "config.json").read_text())["methods"] == list(ATTACK_DEFAULTS)
    assert sorted({r["method"] for r in read_jsonl(out / "results.jsonl")}) == sorted(
        ATTACK_DEFAULTS
    )
    # Any other list is still another setting.
    assert main([*argv, "--method", "gradient", "--resume"]) == 2
    assert "--resume with a different setting: methods" in capsys.readouterr().err


@pytest.mark.parametrize(
    "recorded", [list(ATTACK_DEFAULTS), ["gradient", "lrp"], list(ATTACK_DEFAULTS)[::-1]]
)
def test_resume_of_all_keeps_the_methods_of_all_unless_an_old_run_recorded_fewer(
    recorded, tmp_path, capsys
):
    # Only a run that recorded exactly the built-in methods, while `all` now names
    # more, is resumed on its own methods; any other list stays what was asked, which
    # --resume then compares with the run's (another setting), and nothing is said.
    import argparse

    from betasmooth.cli import _resumed_all

    (tmp_path / "config.json").write_text(json.dumps({"methods": recorded}))
    args = argparse.Namespace(resume=True, method="all", out=str(tmp_path))
    assert _resumed_all(args, list(ATTACK_DEFAULTS)) == list(ATTACK_DEFAULTS)
    more = [*ATTACK_DEFAULTS, "my_gradient"]
    resumed = _resumed_all(args, more)
    assert resumed == (recorded if recorded == list(ATTACK_DEFAULTS) else more)
    err = capsys.readouterr().err
    if recorded == list(ATTACK_DEFAULTS):
        assert err == (
            f"{tmp_path} was made when --method all meant the 7 built-in methods: resuming "
            "those; attack my_gradient with --method in a new --out\n"
        )
    else:
        assert err == ""
    # `all` written as the method lists read it: with a trailing comma or spaces.
    spaced = argparse.Namespace(resume=True, method=" all , ", out=str(tmp_path))
    assert _resumed_all(spaced, more) == resumed


def test_a_new_run_of_all_into_an_old_runs_directory_is_not_resumed_on_its_methods(
    tmp_path, capsys
):
    # Without --resume the old run's methods are no one's concern: the methods stay those
    # asked, nothing is said, and creating the run refuses the non-empty directory alone.
    import argparse

    from betasmooth.cli import _resumed_all

    (tmp_path / "config.json").write_text(json.dumps({"methods": list(ATTACK_DEFAULTS)}))
    more = [*ATTACK_DEFAULTS, "my_gradient"]
    args = argparse.Namespace(resume=False, method="all", out=str(tmp_path))
    assert _resumed_all(args, more) == more
    assert capsys.readouterr().err == ""


MODEL_WITH_CHECKS = """
import os

import betasmooth as bs
from betasmooth.explain import register, register_check, register_input_check
from betasmooth.validate import InputError


@register("checked_gradient")
def checked_gradient(model, x, target, *, create_graph=False):
    return bs.explain(model, x, "gradient", target, create_graph=create_graph)


@register_check("checked_gradient")
def model_check(model, **options):
    if os.environ.get("REFUSE") == "model":
        raise InputError("checked_gradient refuses this model")


@register_input_check("checked_gradient")
def input_check(x, **options):
    if os.environ.get("REFUSE") == "input":
        raise InputError("checked_gradient refuses these images")


def build():
    return bs.load_model("digits-cnn")
"""


def test_the_checks_a_model_file_registers_run_before_any_command_writes(
    tmp_path, capsys, monkeypatch
):
    # A method's checks refuse before a run writes: its input check too (it ran only
    # inside explain, after the first method's batch was written), and in the sweep,
    # whose defenses explain the attacked method (it ran none of them).
    path = tmp_path / "checked.py"
    path.write_text(MODEL_WITH_CHECKS)
    model = ["--model", f"{path}:build", "--data", "digits", "-n", "2", "--no-progress"]
    explained = tmp_path / "explain"
    monkeypatch.setenv("REFUSE", "input")
    argv = ["explain", *model, "--method", "gradient,checked_gradient", "--out", str(explained)]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "betasmooth: error: checked_gradient refuses these images; of the methods asked for, "
        "gradient can run\n"
    )
    assert not explained.exists()
    monkeypatch.delenv("REFUSE")
    attacked = tmp_path / "attack"
    argv = ["attack", *model, "--method", "checked_gradient", "--steps", "2"]
    assert main([*argv, "--out", str(attacked)]) == 0
    capsys.readouterr()
    config = (attacked / "config.json").read_bytes()
    sweep = ["sweep", str(attacked), "--betas", "5", "--smoothgrad-n", "2", "--no-progress"]
    for refused, said in (("model", "this model"), ("input", "these images")):
        monkeypatch.setenv("REFUSE", refused)
        assert main(sweep) == 2
        assert capsys.readouterr().err == f"betasmooth: error: checked_gradient refuses {said}\n"
        assert not (attacked / "sweep.jsonl").exists()
        assert (attacked / "config.json").read_bytes() == config
    monkeypatch.delenv("REFUSE")
    assert main(sweep) == 0
    assert len(read_jsonl(attacked / "sweep.jsonl")) == 2 * 2


def test_captum_maps_cannot_be_attacked_on_the_command_line(tmp_path, capsys):
    argv = [*ATTACK, "--method", "captum:Saliency", "-n", "2", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "captum:Saliency cannot be attacked: its maps are not differentiable" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


def test_a_captum_method_missing_an_option_ends_in_one_line_before_any_run(tmp_path, capsys):
    out = tmp_path / "run"
    methods = "captum:IntegratedGradients,captum:Occlusion"
    argv = ["explain", "--model", "digits-cnn", "--data", "digits", "-n", "2", "--no-progress"]
    assert main([*argv, "--method", methods, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "captum:Occlusion needs the option sliding_window_shapes" in err
    assert "--option captum:Occlusion.sliding_window_shapes=... on the command line" in err
    assert not out.exists()


def test_a_captum_method_the_model_fails_ends_in_one_line_before_any_run(tmp_path, capsys):
    # Captum's LRP has no rule for Flatten: only running it tells, and that is done on
    # one image before the run directory is made, with no --option given.
    out = tmp_path / "run"
    argv = ["explain", "--model", "digits-cnn", "--data", "digits", "-n", "2", "--no-progress"]
    assert main([*argv, "--method", "captum:LRP", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("betasmooth: error: captum:LRP failed on this model: ")
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "beta"), [("attack", "2"), ("explain", "2"), ("explain", "auto")]
)
def test_beta_without_beta_smooth_among_the_methods_is_one_line_before_any_run(
    command, beta, tmp_path, capsys
):
    # A --beta that no method takes would be recorded and silently do nothing (auto:
    # calibrated for minutes first).
    out = tmp_path / "run"
    argv = [command, "--model", "digits-cnn", "--data", "digits", "-n", "2", "--no-progress"]
    argv += ["--method", "gradient", "--beta", beta]
    argv += ["--steps", "1"] if command == "attack" else []
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "betasmooth: error: --beta applies to --method beta_smooth; add it to --method\n"
    )
    assert not out.exists()


EXPLAIN = ["explain", "--model", "digits-cnn", "--data", "digits", "-n", "2", "--no-progress"]


def test_beta_and_an_option_of_beta_smooth_s_beta_are_refused_together_before_any_run(
    tmp_path, capsys
):
    # Both given, --beta silently won over the option.
    out = tmp_path / "run"
    argv = [*EXPLAIN, "--method", "beta_smooth", "--beta", "2", "--option", "beta_smooth.beta=3"]
    assert main([*argv, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "betasmooth: error: --beta and --option beta_smooth.beta both give beta_smooth's beta; "
        "expected one\n"
    )
    assert not out.exists()


def test_option_gives_captum_its_options_and_resume_compares_them(tmp_path, capsys):
    from captum.attr import Occlusion

    out = tmp_path / "run"
    given = ["--option", "captum:Occlusion.sliding_window_shapes=(1,8,8)"]
    given += ["--option", "captum:Occlusion.strides=4"]
    argv = [*EXPLAIN, "--method", "captum:Occlusion", *given, "--out", str(out)]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["options"] == {
        "captum:Occlusion": {"sliding_window_shapes": [1, 8, 8], "strides": 4}
    }
    with np.load(out / "arrays" / "captum~Occlusion-0.npz") as saved:
        x, stored = torch.from_numpy(saved["x"]), saved["map"]
    net = bs.load_model("digits-cnn")
    occ = Occlusion(net).attribute(
        x, target=net(x).argmax(1), sliding_window_shapes=(1, 8, 8), strides=4
    )
    expected = (occ.abs().sum(1) / occ.abs().sum((1, 2, 3)).view(-1, 1, 1)).numpy()
    np.testing.assert_allclose(stored, expected, rtol=0, atol=1e-6 * expected.max())
    # The stored lists equal the tuples given again; another value is another run.
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    argv[argv.index("captum:Occlusion.strides=4")] = "captum:Occlusion.strides=2"
    assert main([*argv, "--resume"]) == 2
    assert "--resume with a different setting: options is" in capsys.readouterr().err


def test_option_values_as_a_shell_user_writes_them(tmp_path):
    # false is False (a string 'false' would be true): Captum's Saliency keeps the sign.
    out = tmp_path / "run"
    argv = [*EXPLAIN, "--method", "captum:Saliency", "--save-attributions", "--out", str(out)]
    assert main([*argv, "--option", "captum:Saliency.abs=false"]) == 0
    with np.load(out / "arrays" / "captum~Saliency-0.npz") as saved:
        x, stored = torch.from_numpy(saved["x"]), saved["attribution"]
    net = bs.load_model("digits-cnn")
    expected = bs.explain(net, x, "gradient").numpy()
    assert stored.min() < 0
    np.testing.assert_allclose(stored, expected, rtol=0, atol=1e-7)


def test_option_reaches_the_attacked_map_and_the_sweep(tmp_path):
    from betasmooth.cli import _attacked_with

    out = tmp_path / "run"
    argv = [*ATTACK, "--method", "integrated_gradients", "-n", "2", "--steps", "2"]
    assert main([*argv, "--option", "integrated_gradients.steps=4", "--out", str(out)]) == 0
    with np.load(out / "arrays" / "integrated_gradients-0.npz") as saved:
        x, stored = torch.from_numpy(saved["x"]), saved["map_orig"]
    net = bs.load_model("digits-cnn")
    four, default = (
        bs.heatmap(bs.explain(net, x, "integrated_gradients", steps=s)).numpy() for s in (4, 30)
    )
    np.testing.assert_allclose(stored, four, rtol=0, atol=1e-7)
    assert np.abs(stored - default).max() > 1e-4
    # The sweep explains with the options the run attacked with.
    config = json.loads((out / "config.json").read_text())
    bounds = (torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    assert _attacked_with(config, bounds)["integrated_gradients"]["steps"] == 4


def test_sweep_of_a_smoothing_attacked_on_another_base_sweeps_on_that_base(tmp_path):
    out = tmp_path / "run"
    argv = [*ATTACK, "--method", "beta_smooth", "-n", "2", "--steps", "2", "--out", str(out)]
    assert main([*argv, "--option", "beta_smooth.base=lrp"]) == 0
    assert main(["sweep", str(out), "--betas", "5", "--smoothgrad-n", "2", "--no-progress"]) == 0
    assert {r["base"] for r in read_jsonl(out / "sweep.jsonl")} == {"lrp"}
    with np.load(out / "arrays" / "beta_smooth-0.npz") as saved:
        x_adv = torch.from_numpy(saved["x_adv"])
    with np.load(out / "arrays" / "sweep-beta_smooth-0.npz") as swept:
        stored = swept["maps_beta"][:, 0]
    net = bs.load_model("digits-cnn")
    expected = bs.heatmap(bs.explain(net, x_adv, "beta_smooth", beta=5.0, base="lrp")).numpy()
    gradient = bs.heatmap(bs.explain(net, x_adv, "beta_smooth", beta=5.0)).numpy()
    np.testing.assert_allclose(stored, expected, rtol=0, atol=1e-6)
    assert np.abs(stored - gradient).max() > 1e-3


@pytest.mark.parametrize(
    ("method", "option", "message"),
    [
        ("gradient", "gradient", r"argument --option: expected METHOD.NAME=VALUE, e.g. "),
        ("gradient", "gradient.x y=1", r"expected METHOD.NAME=VALUE"),
        ("gradient", "gradient.abs=(1,", r"expected VALUE to be a number, a word, True/False"),
        ("gradient", "gradient.zzz=1", r"unknown option 'zzz' for method 'gradient'"),
        ("gradient", "lrp.composite=epsilon_plus", r"lrp is not among --method \(gradient\)"),
        ("lrp", "lrp.composite=nonsense", r"unknown lrp composite 'nonsense'"),
        ("beta_smooth", "beta_smooth.beta=1|--beta|2", r"--beta and --option beta_smooth.beta"),
        ("gradient", "gradient.zzz=1|--option|gradient.zzz=2", r"gradient.zzz is given twice"),
        ("gradient", "gradient.abs=1e400", r"expected VALUE to be a finite number"),
        ("gradient", "gradient.method=riemann_left", r"method is set by the command, .*rule"),
        ("smoothgrad", "smoothgrad.target=1", r"target is set by the command, not an option"),
        ("lrp", "lrp.model=foo", r"model is set by the command"),
        (
            "beta_smooth",
            "beta_smooth.base=lrp|--option|beta_smooth.base_options=(1,2)",
            r"base_options must be a dict of options of 'lrp'; got tuple",
        ),  # fmt: skip
        # Options a wrapper passes on to its base, and values: named before the run too.
        ("beta_smooth", "beta_smooth.bogus=1", r"unknown option 'bogus' for method 'beta_smooth'"),
        ("smoothgrad", "smoothgrad.seed=abc", r"--option smoothgrad: seed must be"),
        ("integrated_gradients", "integrated_gradients.steps=abc", r"steps must be an integer"),
    ],
)
def test_a_bad_option_is_one_line_before_any_run(tmp_path, capsys, method, option, message):
    import re

    out = tmp_path / "run"
    first, *more = option.split("|")
    try:
        status = main([*EXPLAIN, "--method", method, "--option", first, *more, "--out", str(out)])
    except SystemExit as stop:  # argparse's own errors
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize(
    ("error", "message"),
    [
        # The method's message starts with a longer word than its name: still named.
        (bs.InputError, "--option grad: gradient power must be positive; got -1"),
        # A plain ValueError: the method named once, as the one that refused.
        (ValueError, "--option grad refused its options: gradient power must be positive; got -1"),
    ],
)
def test_an_options_error_names_the_method_it_was_given_to(
    tmp_path, capsys, monkeypatch, error, message
):
    from betasmooth.explain import METHODS, register

    def grad(model, x, target, *, create_graph=False, power=1.0):
        if power <= 0:
            raise error(f"gradient power must be positive; got {power:g}")
        return bs.explain(model, x, "gradient", target, create_graph=create_graph)

    monkeypatch.setitem(METHODS, "grad", grad)  # so that the test's end removes it
    register("grad", replace=True)(grad)
    out = tmp_path / "run"
    argv = [*EXPLAIN, "--method", "grad", "--option", "grad.power=-1", "--out", str(out)]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"betasmooth: error: {message}\n"
    assert not out.exists()


def test_resume_refuses_other_images_labels_or_weights_under_the_same_names(tmp_path, capsys):
    x, y = bs.load_data("digits")
    data, weights = tmp_path / "d.npz", tmp_path / "w.pt"
    np.savez(data, x=x[:4].numpy(), y=y[:4].numpy())
    torch.save(bs.load_model("digits-cnn").state_dict(), weights)
    out = tmp_path / "run"
    argv = ["explain", "--model", "digits-cnn", "--weights", str(weights), "--data", str(data)]
    argv += ["--method", "gradient", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert main([*argv, "--resume"]) == 0  # the same contents
    config = json.loads((out / "config.json").read_text())
    del config["inputs_sha256"]  # as a run of 0.6.0 recorded it: resumed as before
    (out / "config.json").write_text(json.dumps(config))
    assert main([*argv, "--resume"]) == 0
    assert main([*argv[:-1], str(tmp_path / "run2")]) == 0
    changes = {
        "images": lambda: np.savez(data, x=x[4:8].numpy(), y=y[:4].numpy()),
        "labels": lambda: np.savez(data, x=x[:4].numpy(), y=y[4:8].numpy()),
        "weights": lambda: torch.save(
            {k: v + 1e-3 for k, v in bs.load_model("digits-cnn").state_dict().items()}, weights
        ),
    }
    for change in changes.values():
        np.savez(data, x=x[:4].numpy(), y=y[:4].numpy())
        torch.save(bs.load_model("digits-cnn").state_dict(), weights)
        change()
        capsys.readouterr()
        assert main([*argv[:-1], str(tmp_path / "run2"), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "--resume with other inputs: the images, labels or weights file differ" in err


def test_an_interrupt_says_how_to_continue_each_command(attack_dir, tmp_path, monkeypatch, capsys):
    import shutil

    from betasmooth import runs

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    shutil.copytree(attack_dir, run)
    monkeypatch.setattr(runs, "sweep_run", interrupt)
    monkeypatch.setattr(runs, "attack_run", interrupt)
    # sweep has no --resume: it continues by itself when run again.
    assert main(["sweep", str(run), "--betas", "1", "--no-progress"]) == 130
    assert capsys.readouterr().err == "betasmooth: interrupted; run again to continue\n"
    assert main([*ATTACK, "--method", "gradient", "-n", "2", "--out", str(tmp_path / "a")]) == 130
    assert "interrupted; run again with --resume to continue" in capsys.readouterr().err


def test_an_interrupted_run_keeps_the_warnings_it_said(attack_dir, tmp_path, monkeypatch, capsys):
    # Kept as they are said, not only with the report at the end: a run stopped on
    # its way (Ctrl-C here, kill -9 alike) keeps what it warned on the console.
    import shutil
    import warnings

    from betasmooth import runs

    def warn_then_stop(*args, **kwargs):
        warnings.warn("the first batch looked odd", stacklevel=1)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "explain_run", warn_then_stop)
    monkeypatch.setattr(runs, "sweep_run", warn_then_stop)
    out = tmp_path / "e"
    argv = ["explain", "--model", "digits-cnn", "--data", "digits", "-n", "2", "--no-progress"]
    assert main([*argv, "--method", "gradient", "--out", str(out)]) == 130
    assert "betasmooth: warning: the first batch looked odd\n" in capsys.readouterr().err
    said = [{"command": "explain", "warning": "the first batch looked odd"}]
    assert read_jsonl(out / "warnings.jsonl") == said
    run = tmp_path / "run"
    shutil.copytree(attack_dir, run)
    assert main(["sweep", str(run), "--betas", "1", "--no-progress"]) == 130
    kept = read_jsonl(run / "warnings.jsonl")
    assert kept[-1] == {"command": "sweep", "warning": "the first batch looked odd"}


def test_an_interrupted_theorem_keeps_the_warnings_it_said(tmp_path, monkeypatch, capsys):
    import warnings

    from betasmooth import theory

    def warn_then_stop(**kwargs):
        warnings.warn("a curve looked odd", stacklevel=1)
        raise KeyboardInterrupt

    monkeypatch.setattr(theory, "run", warn_then_stop)
    out = tmp_path / "t"
    assert main(["theorem", "--out", str(out), "--quick", "--no-progress"]) == 130
    assert capsys.readouterr().err == (
        "betasmooth: warning: a curve looked odd\n"
        "betasmooth: interrupted; run again with --resume to continue\n"
    )
    said = [{"command": "theorem", "warning": "a curve looked odd"}]
    assert read_jsonl(out / "warnings.jsonl") == said


def test_a_write_the_disk_refuses_ends_in_one_line_naming_the_file_and_status_2(
    tmp_path, monkeypatch, capsys
):
    # An OSError without a file name (a full disk at write time) is named by the file written.
    import errno

    from betasmooth import store

    def full(path, write, suffix):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store, "_replace", full)
    out = tmp_path / "run"
    assert main(["theorem", "--out", str(out), "--quick", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"betasmooth: error: {os.strerror(errno.ENOSPC)}: {out / 'config.json'}\n"
    )


def test_an_error_of_several_lines_is_said_in_one(tmp_path, monkeypatch, capsys):
    from betasmooth import theory

    def refuse(**kwargs):
        raise bs.InputError("the checks failed:\n    first reason\n    second reason")

    monkeypatch.setattr(theory, "run", refuse)
    assert main(["theorem", "--out", str(tmp_path / "run"), "--quick", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        "betasmooth: error: the checks failed: first reason second reason\n"
    )


def test_a_model_file_and_data_named_relative_to_the_working_directory_are_recorded_absolute(
    tmp_path, monkeypatch
):
    # A sweep or report started from another directory reopens them by the recorded names.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(
        "import betasmooth as bs\n\n\ndef net():\n    return bs.load_model('digits-cnn')\n"
    )
    data = tmp_path / "one.npz"
    np.savez(data, x=np.random.default_rng(0).random((1, 1, 32, 32)).astype(np.float32))
    torch.save(bs.load_model("digits-cnn").state_dict(), tmp_path / "w.pt")
    argv = ["explain", "--model", "net.py:net", "--data", "one.npz", "-n", "1"]
    argv += ["--weights", "w.pt"]
    assert main([*argv, "--method", "gradient", "--out", "run", "--no-progress"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["model"], config["data"], config["weights"]) == (
        f"{tmp_path.resolve()}/net.py:net",
        str(data.resolve()),
        str((tmp_path / "w.pt").resolve()),
    )


def test_what_an_npz_holds_is_said_once(tmp_path, capsys):
    x, y = bs.load_data("digits")
    np.savez(tmp_path / "big.npz", x=x[:4].numpy() * 255, labels=y[:4].numpy())
    argv = ["attack", "--model", "digits-cnn", "--data", str(tmp_path / "big.npz"), "-n", "2"]
    assert main([*argv, "--method", "gradient", "--steps", "2", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert err.count("holds values up to 255") == 1 and err.count("has no array 'y'") == 1


def test_sweep_table_report_and_betas_of_a_run_with_two_methods(tmp_path, capsys):
    from betasmooth.recommend import sweep_summary, verdict

    run = tmp_path / "run"
    argv = [*ATTACK, "--method", "gradient,lrp", "-n", "3", "--steps", "2", "--out", str(run)]
    assert main(argv) == 0
    # A beta given twice counted its images twice in that beta's medians.
    capsys.readouterr()
    assert main(["sweep", str(run), "--betas", "10,1,10"]) == 2
    assert capsys.readouterr().err == (
        "betasmooth: error: --betas must differ; 10 is given more than once\n"
    )
    sweep = ["sweep", str(run), "--betas", "1,10", "--smoothgrad-n", "2", "--no-progress"]
    assert main([*sweep, "--min-fidelity", "0.9999"]) == 0
    # One row per method: the table pooled both methods' records under one name.
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if _words(line).startswith("method defense beta"))
    records = read_jsonl(run / "sweep.jsonl")
    assert header.split()[4:6] == ["pcc", "adv/orig"]
    for method in ("gradient", "lrp"):
        row = next(line for line in lines if _words(line).startswith(f"{method} beta_smooth 10"))
        row = row.split()
        mine = [
            r
            for r in records
            if r["method"] == method and r["defense"] == "beta_smooth" and r["beta"] == 10
        ]
        assert int(row[3]) == len(mine) == 3
        assert float(row[4]) == pytest.approx(
            np.median([r["adv_vs_orig_pcc"] for r in mine]), abs=6e-4
        )
    # A sweep cut before its summary: the report recommends under the run's own floor.
    (run / "sweep_summary.json").unlink()
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    for method, summary in sweep_summary(records, 0.9999).items():
        assert html.escape(verdict(summary)) in page, method
    assert "median fidelity &gt;= 0.9)" not in page


def test_resume_of_a_run_whose_attacked_smoothgrad_drew_from_seed_0_refuses_another_seed(
    tmp_path, capsys
):
    # Before 0.8.8 the attacked SmoothGrad drew from seed 0 whatever --seed said: a
    # resumed run mixed both draws. Such a run's config lacks smoothgrad_seed.
    out = tmp_path / "run"
    argv = [*ATTACK, "--method", "smoothgrad", "-n", "2", "--steps", "1", "--out", str(out)]
    assert main([*argv, "--seed", "5"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["smoothgrad_seed"] == 5
    del config["smoothgrad_seed"]
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main([*argv, "--seed", "5", "--resume"]) == 2
    assert "smoothgrad_seed is not given in" in capsys.readouterr().err
    # Seed 0 drew as it always did: nothing recorded, and a run of then resumes.
    zero = tmp_path / "zero"
    assert main([*argv[:-1], str(zero)]) == 0
    assert "smoothgrad_seed" not in json.loads((zero / "config.json").read_text())
    assert main([*argv[:-1], str(zero), "--resume"]) == 0


def _words(line):
    """A table's line with each run of spaces as one: its columns are padded."""
    return " ".join(line.split())


def _table(lines, head):
    header = next(i for i, line in enumerate(lines) if _words(line).startswith(head))
    return lines[header], lines[header + 1 :]


def test_targeted_attack_summary_table_is_the_median_of_each_column(tmp_path, capsys):
    from betasmooth.cli import ATTACK_COLUMNS

    out = tmp_path / "run"
    assert (
        main([*ATTACK, "--method", "gradient", "-n", "4", "--steps", "20", "--out", str(out)]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    header, rows = _table(lines, "method")
    row = next(r for r in rows if r.startswith("gradient")).split()
    records = read_jsonl(out / "results.jsonl")
    assert int(row[1]) == len(records) == 4
    expected = {
        "kept": np.mean([r["label_kept"] for r in records]),
        "pcc tgt0": np.median([r["expl_pcc_target_before"] for r in records]),
        "pcc tgt": np.median([r["expl_pcc_target"] for r in records]),
        "ssim tgt0": np.median([r["expl_ssim_target_before"] for r in records]),
        "ssim tgt": np.median([r["expl_ssim_target"] for r in records]),
        "pcc orig": np.median([r["expl_pcc_orig"] for r in records]),
    }
    # The before and after columns must differ for the check to bite.
    assert abs(expected["pcc tgt"] - expected["pcc tgt0"]) > 0.01
    titles = [t for _, t in ATTACK_COLUMNS]
    for title, value in expected.items():
        cell = row[2 + titles.index(title)]
        assert float(cell) == pytest.approx(value, abs=6e-4), title
    # The input's change: below one hundredth in e-notation, each its own field's median.
    changes = {
        "input mse": "input_mse",
        "max |dx|": "input_max_change",
        "d output": "output_change",
    }
    for title, field in changes.items():
        value = float(np.median([r[field] for r in records]))
        written = f"{value:.2e}" if value != 0 and abs(value) < 1e-2 else f"{value:.3f}"
        assert row[2 + titles.index(title)] == written, title


def test_summary_table_keeps_three_digits_of_small_and_large_medians():
    from betasmooth.cli import summary_table

    mse, seconds = [2.5e-4, 3.5e-4, 4.5e-4], [2e4, 3e4, 4e4]
    records = [{"method": "gradient", "input_mse": m, "seconds": s} for m, s in zip(mse, seconds)]
    table = summary_table(records, [("input_mse", "input mse"), ("seconds", "s")])
    row = table.splitlines()[1].split()
    assert row[:2] == ["gradient", "3"]
    # A median of 3.5e-4 written as 0.000 (or 30000 as 30000.000) reads as another number.
    assert float(row[2]) == pytest.approx(np.median(mse), rel=1e-2)
    assert float(row[3]) == pytest.approx(np.median(seconds), rel=1e-2)
    assert len(row[2]) == len(row[3]) == len("3.50e-04")


def test_summary_table_heads_each_grouping_field_over_its_own_column():
    # The sweep's table once headed three fields with one padded "method defense beta".
    from betasmooth.cli import summary_table

    records = [
        {"method": m, "defense": d, "beta": b, "pcc": 0.5}
        for m in ("gradient", "integrated_gradients")
        for d in ("beta_smooth", "smoothgrad")
        for b in (2.0, 10.0)
    ]
    lines = summary_table(records, [("pcc", "pcc")], ("method", "defense", "beta")).splitlines()
    starts = [lines[0].index(h) for h in ("method", "defense", "beta")]
    assert starts == [0, len("integrated_gradients  "), len("integrated_gradients  beta_smooth  ")]
    for line in lines[1:]:
        method, defense, beta = line.split()[:3]
        assert [
            line.index(f" {v}") + 1 if i else 0 for i, v in enumerate((method, defense, beta))
        ] == starts
    assert lines[6].split() == ["integrated_gradients", "beta_smooth", "10", "1", "0.500"]


def test_a_grouping_field_longer_than_its_entries_is_as_wide_as_its_heading():
    # "method" (6 letters) over "gd" (2): the column is the heading's width plus 2, so
    # the count and the medians stand right under their headings.
    from betasmooth.cli import summary_table

    records = [{"method": "gd", "beta": b, "pcc": 0.5} for b in (2.0, 2.0, 10.0)]
    table = summary_table(records, [("pcc", "pcc")], ("method", "beta"))
    assert table.splitlines() == [
        "method  beta    n      pcc",
        "gd      2       2    0.500",
        "gd      10      1    0.500",
    ]


def test_summary_table_writes_zero_plainly_ten_thousand_in_e_notation_and_a_lacking_field_as_dash():
    # 0 is neither small nor large (0.000, not 0.00e+00); 1e4 is the first large value.
    from betasmooth.cli import summary_table

    records = [{"method": "gradient", "zero": 0.0, "big": 1e4}]
    columns = [("zero", "zero"), ("big", "big"), ("absent", "absent")]
    assert summary_table(records, columns).splitlines()[1].split() == [
        "gradient",
        "1",
        "0.000",
        "1.00e+04",
        "-",
    ]


def test_summary_table_writes_one_hundredth_plainly_and_just_below_it_in_e_notation():
    # 0.01 keeps two digits in 0.010; below it three decimals would keep one.
    from betasmooth.cli import summary_table

    records = [{"method": "lrp", "a": 0.01, "b": -0.01, "c": 0.0099}]
    columns = [("a", "a"), ("b", "b"), ("c", "c")]
    row = summary_table(records, columns).splitlines()[1].split()
    assert row == ["lrp", "1", "0.010", "-0.010", "9.90e-03"]


@pytest.mark.parametrize("values", [[1.2e-3, 1.4e-3, 1.9e-3], [-6.3e-3, -5.6e-3, -4e-3]])
def test_summary_table_keeps_three_digits_below_one_hundredth(values):
    # Three decimals would show an input MSE of 1.4e-3 as 0.001 and of 1.9e-3 as 0.002.
    from betasmooth.cli import summary_table

    records = [{"method": "lrp", "input_mse": v} for v in values]
    row = summary_table(records, [("input_mse", "input mse")]).splitlines()[1].split()
    assert float(row[2]) == pytest.approx(np.median(values), rel=5e-3)


def test_demo_steps_keep_the_papers_proportions_rounded():
    from betasmooth.cli import _demo_steps

    paper = {m: ATTACK_DEFAULTS[m]["steps"] for m in ("gradient", "integrated_gradients")}
    assert paper == {"gradient": 1500, "integrated_gradients": 500}
    # 20 steps for the longest; a third of them, 6.67, rounds to 7.
    assert _demo_steps(list(paper), 20) == {"gradient": 20, "integrated_gradients": 7}
    assert _demo_steps(list(paper), 2) == {"gradient": 2, "integrated_gradients": 1}


def test_demo_steps_give_every_method_at_least_one_step():
    # A budget of 1 is a third of a step for integrated_gradients: rounded, none at all.
    from betasmooth.cli import _demo_steps

    methods = ["gradient", "integrated_gradients"]
    assert _demo_steps(methods, 1) == {"gradient": 1, "integrated_gradients": 1}


def test_data_of_one_image_fewer_than_asked_is_said_in_the_singular(tmp_path, capsys):
    data = tmp_path / "one.npz"
    np.savez(data, x=np.random.default_rng(0).random((1, 1, 32, 32)).astype(np.float32))
    argv = ["explain", "--model", "digits-cnn", "--data", str(data), "--method", "gradient"]
    assert main([*argv, "-n", "2", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err == f"betasmooth explain: {data} holds only 1 image; using all 1 (asked for 2)\n"


def test_data_holding_as_many_images_as_asked_says_nothing_of_fewer(tmp_path):
    # -n 3 of data holding 3 images: all of them are used, and nothing is said.
    import argparse

    from betasmooth.cli import _load_images

    (tmp_path / "pooled.py").write_text(POOLED_MODEL)
    data = tmp_path / "three.npz"
    np.savez(data, x=np.zeros((3, 1, 8, 8), np.float32))
    none = dict.fromkeys(["weights", "image_size", "channels", "mean", "std", "preset"])
    model = f"{tmp_path / 'pooled.py'}:build"
    args = argparse.Namespace(model=model, data=str(data), n=3, command="explain", **none)
    assert len(_load_images(args)[1]) == 3
    assert args.n == 3 and not hasattr(args, "fewer")


@pytest.mark.parametrize(("data", "table"), [("digits", "DEMO_SIZES"), ("photos", "PHOTO")])
def test_demo_sizes_by_data_and_those_of_other_data_are_the_photographs(data, table, tmp_path):
    # Any data but the built-in digits are images such as the photographs: their
    # smaller sizes (fewer images, longer sweep), not the digits' 32 images.
    import argparse

    from betasmooth.cli import DEMO_SIZES, PHOTO_DEMO_SIZES, _demo_sizes

    sizes = {"DEMO_SIZES": DEMO_SIZES, "PHOTO": PHOTO_DEMO_SIZES}[table]
    for name in (data, str(tmp_path / "my_images")) if table == "PHOTO" else (data,):
        for quick in (False, True):
            args = argparse.Namespace(data=name, quick=quick, n=None, steps=None)
            assert _demo_sizes(args) == sizes["quick" if quick else "default"]
        args = argparse.Namespace(data=name, quick=False, n=3, steps=7)
        assert _demo_sizes(args) == {**sizes["default"], "n": 3, "steps": 7}
    assert PHOTO_DEMO_SIZES["default"]["n"] == 8 and DEMO_SIZES["default"]["n"] == 32


def test_cli_sweep_draws_smoothgrad_from_the_runs_seed(tmp_path, capsys):
    import shutil

    from betasmooth.cli import _attacked_with
    from betasmooth.runs import load_inputs, sweep_run

    out = tmp_path / "run"
    argv = [*ATTACK, "--method", "gradient", "-n", "3", "--steps", "3", "--seed", "5"]
    assert main([*argv, "--out", str(out)]) == 0
    # The attack takes its targets from --seed too, and by default the targeted goal:
    # image i moves towards the map of image derangement(3, 5)[i] (seed 0's differ).
    targets = {r["index"]: r["target_index"] for r in read_jsonl(out / "results.jsonl")}
    expected = derangement(3, 5).tolist()
    assert [targets[i] for i in range(3)] == expected
    assert derangement(3, 0).tolist() != expected
    for seed in (5, 0):
        shutil.copytree(out, tmp_path / f"api{seed}")
    assert main(["sweep", str(out), "--betas", "2", "--smoothgrad-n", "2", "--no-progress"]) == 0
    cli = {(r["index"], r["defense"]): r for r in read_jsonl(out / "sweep.jsonl")}
    inputs = load_inputs("digits-cnn", "digits", n=1)
    config = RunDir(out).config()
    api = {}
    for seed in (5, 0):
        rows = sweep_run(
            RunDir(tmp_path / f"api{seed}"),
            inputs[0],
            [2.0],
            smoothgrad_n=2,
            seed=seed,
            data_range=inputs.bounds,
            method_options=_attacked_with(config, inputs.bounds),
        )
        api[seed] = {(r["index"], r["defense"]): r for r in rows}
    key = "adv_vs_orig_pcc"
    smooth = [k for k in cli if k[1] == "smoothgrad"]
    assert len(smooth) == 3
    for k in smooth:
        assert cli[k][key] == pytest.approx(api[5][k][key], rel=1e-6, abs=1e-9)
    # The seed matters, so the check bites.
    assert any(abs(api[0][k][key] - api[5][k][key]) > 1e-4 for k in smooth)


def test_demo_explains_integrated_gradients_with_the_steps_it_records(demo_run):
    from betasmooth.explain import range_options
    from betasmooth.runs import load_inputs

    out, _ = demo_run
    config = RunDir(out).config()
    inputs = load_inputs("digits-cnn", "digits", n=config["n"])
    model, x, _ = inputs
    label = model(x).argmax(1)
    options = {**range_options(*inputs.bounds).get("integrated_gradients", {})}
    found = RunDir(out).read_arrays("integrated_gradients", "explain")["map"]
    for steps, close in ((config["ig_steps"], True), (30, False)):
        expected = bs.heatmap(
            bs.explain(model, x, "integrated_gradients", label, **options, steps=steps)
        )
        same = np.allclose(found, expected.detach().numpy(), rtol=1e-4, atol=1e-7)
        assert same == close, steps


def test_demo_defense_table_rows_are_medians_per_defense_and_beta(demo_run):
    from betasmooth.explain import range_options
    from betasmooth.runs import load_inputs
    from betasmooth.units import unit_seed

    out, printed = demo_run
    _, rows = _table(printed.splitlines(), "defense beta")
    sweep = read_jsonl(out / "sweep.jsonl")
    config = RunDir(out).config()
    keys = sorted({(r["defense"], r["beta"]) for r in sweep})
    assert len(keys) == 2 * len(config["sweep"]["betas"])
    for defense, beta in keys:
        row = next(r for r in rows if r.split()[:2] == [defense, f"{beta:g}"]).split()
        mine = [r for r in sweep if r["defense"] == defense and r["beta"] == beta]
        assert int(row[2]) == len(mine)
        median = np.median([r["adv_vs_orig_pcc"] for r in mine])
        assert float(row[3]) == pytest.approx(median, abs=6e-4)
    # The explained SmoothGrad draws the smoothgrad_attack_n samples the config records.
    inputs = load_inputs("digits-cnn", "digits", n=config["n"])
    model, x, _ = inputs
    label = model(x).argmax(1)
    drawn = [unit_seed(0, "smoothgrad", i) for i in range(len(x))]
    found = RunDir(out).read_arrays("smoothgrad", "explain")["map"]
    given = range_options(*inputs.bounds)["smoothgrad"]
    for n, close in ((config["smoothgrad_attack_n"], True), (10, False)):
        expected = bs.heatmap(bs.explain(model, x, "smoothgrad", label, n=n, seed=drawn, **given))
        same = np.allclose(found, expected.detach().numpy(), rtol=1e-4, atol=1e-7)
        assert same == close, n


def test_the_defaults_the_help_states_are_the_parsers_defaults():
    import argparse
    import re

    from betasmooth.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checked = []
    for name, p in sub.choices.items():
        for action in p._actions:
            said = re.search(r"\(default ([-0-9.e,]+)\)", action.help or "")
            if not said or action.default is None:
                continue
            stated = [float(v) for v in said.group(1).split(",")]
            value = action.default if isinstance(action.default, list) else [action.default]
            assert [float(v) for v in value] == stated, (name, action.dest)
            checked.append((name, action.dest))
    # The defaults that change what a run computes are among them.
    for dest in [
        ("sweep", "smoothgrad_n"),
        ("attack", "batch_size"),
        ("curvature", "iterations"),
        ("sweep", "min_fidelity"),
        ("attack", "seed"),
        ("curvature", "betas"),
    ]:
        assert dest in checked, dest


@pytest.mark.parametrize("extra", [11, 2, 1])
def test_beta_auto_holds_out_the_images_after_the_first_n(tmp_path, capsys, monkeypatch, extra):
    import betasmooth.cli as cli
    from betasmooth.calibrate import Calibration

    x, y = bs.load_data("digits")
    n = 4
    data = tmp_path / "d.npz"
    np.savez(data, x=x[: n + extra].numpy(), y=y[: n + extra].numpy())
    seen = []

    def fake(model, images, method, **kwargs):
        seen.append(images.clone())
        return Calibration(2.0, True, {"min_fidelity": 0.9, "undefended": {}, "betas": {"2": {}}})

    monkeypatch.setattr(cli, "calibrate_beta", fake)
    argv = ["explain", "--model", "digits-cnn", "--data", str(data), "-n", str(n)]
    argv += [
        "--method",
        "beta_smooth",
        "--beta",
        "auto",
        "--no-progress",
        "--out",
        str(tmp_path / "r"),
    ]
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    k = cli.CALIBRATION["n"]
    if extra >= 2:
        # Hand computation: images n to n + k - 1 are held out, all there are up to k.
        torch.testing.assert_close(seen[0], x[n : n + min(extra, k)])
        held = min(extra, k)
        assert f"calibrating beta on {held} held-out images (after the first -n)" in said
    else:
        # One image past -n is too few to hold out: all five are used, and said so.
        torch.testing.assert_close(seen[0], x[: n + extra])
        assert "images that are also explained" in said


def test_the_bounds_of_the_beta_range_are_betas(capsys):
    from betasmooth.cli import BETA_RANGE, _check_betas, build_parser

    _check_betas([BETA_RANGE[0], BETA_RANGE[1], None])  # raises where a bound is refused
    for outside in (BETA_RANGE[0] / 2, BETA_RANGE[1] * 2):
        with pytest.raises(bs.InputError):
            _check_betas([outside])
    # --beta of attack and explain takes the same bounds, as Python writes them.
    parser = build_parser()
    for command in ("attack", "explain"):
        argv = [command, "--model", "m", "--data", "d", "--method", "beta_smooth", "--out", "r"]
        for bound in BETA_RANGE:
            assert parser.parse_args([*argv, "--beta", repr(bound)]).beta == bound
        for outside in (BETA_RANGE[0] / 2, BETA_RANGE[1] * 2, 0.0):
            with pytest.raises(SystemExit):
                parser.parse_args([*argv, "--beta", repr(outside)])
    assert "expected a positive number" in capsys.readouterr().err


def test_of_several_betas_outside_the_range_the_first_is_named(tmp_path, capsys):
    from betasmooth.cli import BETA_RANGE

    betas = "2,0,1e40"
    assert main(["curvature", "--model", "digits-cnn", "--data", "digits", "--betas", betas,
                 "--out", str(tmp_path / "run")]) == 2  # fmt: skip
    assert capsys.readouterr().err == (
        f"betasmooth: error: --betas must be positive numbers from {BETA_RANGE[0]:.3g} to "
        f"{BETA_RANGE[1]:.3g} (float32's normal range), e.g. 0.5,1,2,5; got 0\n"
    )
    assert not (tmp_path / "run").exists()


def test_min_fidelity_takes_the_bounds_0_and_1_and_nothing_outside(capsys):
    from betasmooth.cli import build_parser

    parser = build_parser()
    for text in ("0", "1", "0.5"):
        assert parser.parse_args(["sweep", "run", "--min-fidelity", text]).min_fidelity == float(
            text
        )
    # A word is no number: it must not pass as 0 (a floor that every beta meets).
    for text in ("-0.1", "1.5", "abc"):
        with pytest.raises(SystemExit):
            parser.parse_args(["sweep", "run", "--min-fidelity", text])
    assert "--min-fidelity" in capsys.readouterr().err


POOLED_MODEL = """
from torch import nn


def build():
    return nn.Sequential(
        nn.Conv2d(1, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
"""


def test_data_stored_below_the_least_image_size_are_refused_unless_resized(tmp_path, capsys):
    # A model that takes any size: 4 x 4 images would give 16-pixel maps, refused as
    # --image-size 4 is; resized to 8 px they run.
    (tmp_path / "pooled.py").write_text(POOLED_MODEL)
    data = tmp_path / "tiny.npz"
    np.savez(data, x=np.random.default_rng(0).random((2, 1, 4, 4)).astype(np.float32))
    argv = ["explain", "--model", f"{tmp_path / 'pooled.py'}:build", "--data", str(data)]
    argv += ["--method", "gradient", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == (
        f"betasmooth: error: {data} holds images of 4x4 px; expected at least 8 px "
        "(--image-size 8 or more resizes them): a map of a few pixels matches any target map\n"
    )
    assert not (tmp_path / "a").exists()
    assert main([*argv, "--image-size", "8", "--out", str(tmp_path / "b")]) == 0


@pytest.mark.parametrize(
    ("height", "width", "refused"), [(7, 7, True), (8, 8, False), (7, 16, True), (16, 7, True)]
)
def test_stored_images_one_pixel_below_the_least_image_size_are_refused(
    tmp_path, height, width, refused
):
    # The bound of the stored images is --image-size's: 7 px refused, 8 px taken; in
    # either side of an image that is not square too.
    import argparse

    from betasmooth.cli import _load_images

    (tmp_path / "pooled.py").write_text(POOLED_MODEL)
    data = tmp_path / "small.npz"
    np.savez(data, x=np.zeros((2, 1, height, width), np.float32))
    none = dict.fromkeys(["weights", "image_size", "channels", "mean", "std", "preset"])
    model = f"{tmp_path / 'pooled.py'}:build"
    args = argparse.Namespace(model=model, data=str(data), n=2, command="explain", **none)
    if not refused:
        assert _load_images(args)[1].shape == (2, 1, 8, 8)
        return
    with pytest.raises(
        bs.InputError, match=rf" holds images of {height}x{width} px; expected at least 8 px"
    ):
        _load_images(args)


def test_seed_image_size_and_out_take_their_bounds_and_nothing_outside(capsys):
    from betasmooth.cli import MAX_IMAGE_SIZE, MAX_SEED, MIN_IMAGE_SIZE, build_parser

    parser = build_parser()
    out = ["--out", "run"]
    for seed in (0, MAX_SEED):
        assert parser.parse_args(["theorem", "--seed", str(seed), *out]).seed == seed
    size = ["explain", "--model", "m", "--data", "d", "--method", "gradient", *out]
    assert parser.parse_args([*size, "--image-size", str(MAX_IMAGE_SIZE)]).image_size == 4096
    assert parser.parse_args([*size, "--image-size", str(MIN_IMAGE_SIZE)]).image_size == 8
    # A name of blanks is no directory name, as the empty one is not.
    for argv in (["theorem", "--seed", "-1", *out], [*size, "--image-size", "4097"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    with pytest.raises(SystemExit):
        parser.parse_args(["theorem", "--out", "  "])
    assert "expected a directory name; got an empty one" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("TRUE", True), ("False", False), ("FALSE", False), ("NONE", None)]
    + [("Null", None), ("3", 3), ("(3,8,8)", (3, 8, 8)), ("epsilon_plus", "epsilon_plus")],
)
def test_option_words_are_taken_in_any_case(text, value):
    # A shell user writes TRUE or FALSE too; the string 'FALSE' would be true.
    from betasmooth.cli import build_parser

    argv = ["explain", "--model", "m", "--data", "d", "--method", "lrp", "--out", "run"]
    args = build_parser().parse_args([*argv, "--option", f"lrp.x={text}"])
    assert args.option == [("lrp", "x", value)]


def test_counts_take_2_to_the_31_minus_1_and_nothing_above():
    import argparse

    from betasmooth.cli import positive_integer

    assert positive_integer(str(2**31 - 1)) == 2**31 - 1
    for text in (str(2**31), "0"):
        with pytest.raises(argparse.ArgumentTypeError, match="below 2"):
            positive_integer(text)


def test_the_demo_attacks_smoothgrad_and_integrated_gradients_with_its_smaller_sizes():
    # Every attack step pays for all samples: the demo attacks SmoothGrad with 8 of them,
    # and sweeps with 16 (its own --smoothgrad-n), not the other way round.
    import torch

    from betasmooth.cli import DEMO_SIZES, _attacked_with

    sizes = DEMO_SIZES["default"]
    config = {"methods": ["smoothgrad", "integrated_gradients"], **sizes}
    options = _attacked_with(config, (torch.zeros(1, 1, 1), torch.ones(1, 1, 1)))
    assert options["smoothgrad"]["n"] == sizes["smoothgrad_attack_n"] == 8 != sizes["smoothgrad_n"]
    assert options["integrated_gradients"]["steps"] == sizes["ig_steps"]


def test_beta_auto_is_a_usage_error_of_the_attack(tmp_path, capsys):
    # Only explain calibrates: the attack's --beta auto is refused as it is parsed.
    out = tmp_path / "run"
    argv = [*ATTACK, "--method", "beta_smooth", "-n", "2", "--steps", "1", "--beta", "auto"]
    with pytest.raises(SystemExit) as end:
        main([*argv, "--out", str(out)])
    assert end.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "argument --beta: expected a positive number (a float32 beta); got 'auto'" in err
    assert not out.exists()


def test_beta_goes_next_to_the_other_options_of_beta_smooth(tmp_path):
    # --beta 2 with --option beta_smooth.base=...: the map is that base's at beta 2.
    out = tmp_path / "run"
    argv = [*EXPLAIN, "--method", "beta_smooth", "--beta", "2", "--out", str(out)]
    assert main([*argv, "--option", "beta_smooth.base=input_x_gradient"]) == 0
    with np.load(out / "arrays" / "beta_smooth-0.npz") as saved:
        x, stored = torch.from_numpy(saved["x"]), saved["map"]
    net = bs.load_model("digits-cnn")
    expected = bs.heatmap(bs.explain(net, x, "beta_smooth", beta=2.0, base="input_x_gradient"))
    gradient = bs.heatmap(bs.explain(net, x, "beta_smooth", beta=2.0))
    np.testing.assert_allclose(stored, expected.numpy(), rtol=0, atol=1e-7)
    assert np.abs(stored - gradient.numpy()).max() > 1e-3
    config = json.loads((out / "config.json").read_text())
    assert config["beta"] == 2.0
    assert config["options"] == {"beta_smooth": {"base": "input_x_gradient"}}


def test_beta_auto_calibrates_on_the_training_split_with_the_run_s_seed(tmp_path, monkeypatch):
    import betasmooth.cli as cli
    from betasmooth.calibrate import Calibration

    seen = []

    def fake(model, images, method, **kwargs):
        seen.append((images.clone(), method, kwargs))
        return Calibration(2.0, True, {"min_fidelity": 0.9, "undefended": {}, "betas": {"2": {}}})

    monkeypatch.setattr(cli, "calibrate_beta", fake)
    argv = [*EXPLAIN, "--method", "beta_smooth", "--beta", "auto", "--seed", "5"]
    assert cli.main([*argv, "--out", str(tmp_path / "r")]) == 0
    ((images, method, kwargs),) = seen
    # Built-in data holds out its training split: no image the run explains.
    train = bs.load_data("digits", "train")[0]
    torch.testing.assert_close(images, train[: cli.CALIBRATION["n"]])
    assert method == "gradient"
    assert (kwargs["seed"], kwargs["steps"]) == (5, cli.CALIBRATION["steps"])


def test_beta_auto_calibrates_on_the_base_that_beta_smooth_smooths(tmp_path, monkeypatch, capsys):
    # beta_smooth of lrp is calibrated on lrp's own map, in the data's box, as the
    # README says LRP needs a larger beta than the gradient.
    import betasmooth.cli as cli
    from betasmooth.calibrate import Calibration

    seen = []

    def fake(model, images, method, **kwargs):
        seen.append((method, kwargs))
        return Calibration(2.0, True, {"min_fidelity": 0.9, "undefended": {}, "betas": {}})

    monkeypatch.setattr(cli, "calibrate_beta", fake)
    argv = [*EXPLAIN, "--method", "beta_smooth", "--beta", "auto"]
    argv += ["--option", "beta_smooth.base=lrp", "--option", "beta_smooth.epsilon=0.5"]
    assert cli.main([*argv, "--out", str(tmp_path / "r")]) == 0
    ((method, kwargs),) = seen
    assert method == "lrp"
    options = kwargs["method_options"]
    assert sorted(options) == ["epsilon", "high", "low"] and options["epsilon"] == 0.5
    assert (options["low"].item(), options["high"].item()) == (0.0, 1.0)
    assert "on 8 held-out images (the training split), on the lrp map" in capsys.readouterr().out
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["beta_auto"]["method"] == "lrp"


def test_beta_auto_of_a_captum_base_is_calibrated_on_the_gradient_and_says_so(
    tmp_path, monkeypatch, capsys
):
    # Captum's maps are detached: the calibration's attack cannot move them.
    import betasmooth.cli as cli
    from betasmooth.calibrate import Calibration

    seen = []

    def fake(model, images, method, **kwargs):
        seen.append((method, kwargs["method_options"]))
        return Calibration(2.0, True, {"min_fidelity": 0.9, "undefended": {}, "betas": {}})

    monkeypatch.setattr(cli, "calibrate_beta", fake)
    argv = [*EXPLAIN, "--method", "beta_smooth", "--beta", "auto"]
    argv += ["--option", "beta_smooth.base=captum:Saliency", "--out", str(tmp_path / "r")]
    assert cli.main(argv) == 0
    assert seen == [("gradient", {})]
    said = capsys.readouterr().out
    assert (
        "captum:Saliency's maps cannot be attacked: beta is calibrated on the gradient map" in said
    )
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["beta_auto"]["method"] == "gradient" and config["beta_smooth_beta"] == 2.0


def test_unconverged_curvature_is_counted_among_the_records_that_say():
    # Records of versions before 0.17.0 hold no converged: not counted either way.
    from betasmooth.cli import _warn_unconverged

    records = [
        {"index": 0, "method": "beta=5", "converged": False},
        {"index": 0, "method": "relu", "converged": True},
        {"index": 1, "method": "beta=5"},
    ]
    with pytest.warns(UserWarning, match=r"^1 of 2 curvature estimates \(e.g. item 0, beta=5\)"):
        _warn_unconverged(records, 7)


def test_beta_auto_says_once_that_built_in_data_is_not_the_folder_of_its_name(
    tmp_path, monkeypatch, capsys
):
    # The held-out images are a second load of the same data, whose notice was said.
    import betasmooth.cli as cli
    from betasmooth.calibrate import Calibration

    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    found = Calibration(2.0, True, {"min_fidelity": 0.9, "undefended": {}, "betas": {}})
    monkeypatch.setattr(cli, "calibrate_beta", lambda *args, **kwargs: found)
    argv = [*EXPLAIN, "--method", "beta_smooth", "--beta", "auto", "--out", "r"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("data 'digits' is the built-in data set, not the digits in this folder") == 1


def test_beta_auto_refuses_a_resume_with_other_settings_before_calibrating(
    tmp_path, monkeypatch, capsys
):
    # The calibration takes minutes on a large model; the refusal it would end in comes first.
    import betasmooth.cli as cli

    out = str(tmp_path / "r")
    assert cli.main([*EXPLAIN, "--method", "beta_smooth", "--beta", "2", "--out", out]) == 0

    def calibrating(*args, **kwargs):
        raise AssertionError("calibrated before the run directory was checked")

    monkeypatch.setattr(cli, "calibrate_beta", calibrating)
    capsys.readouterr()
    argv = [*EXPLAIN, "--method", "beta_smooth", "--beta", "auto", "--out", out, "--resume"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--resume with a different setting: beta is 2.0 in" in err and "but 'auto' now" in err


def test_resume_reads_one_mean_and_std_as_that_value_for_every_channel(tmp_path, capsys):
    # --mean 0.5 and --mean 0.5 0.5 0.5 normalise an RGB image alike: the same run.
    out = tmp_path / "run"
    argv = ["explain", "--model", "photos-cnn", "--data", "photos", "-n", "2", "--no-progress"]
    argv += ["--method", "gradient", "--out", str(out)]
    assert main([*argv, "--mean", "0.5", "--std", "0.25"]) == 0
    before = (out / "results.jsonl").read_bytes()
    per_channel = ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25", "--resume"]
    capsys.readouterr()
    assert main([*argv, *per_channel[:3], "0.4", *per_channel[4:]]) == 2
    assert capsys.readouterr().err == (
        f"betasmooth: error: --resume with a different setting: mean is [0.5] in "
        f"{out / 'config.json'} but [0.5, 0.5, 0.4] now; use the same settings or choose a "
        "new --out\n"
    )
    assert main([*argv, *per_channel]) == 0
    assert (out / "results.jsonl").read_bytes() == before


def test_resume_with_another_image_count_is_refused(tmp_path, capsys):
    # The run records -n: more images under --resume would be another run's.
    out = tmp_path / "run"
    argv = [*EXPLAIN[:-3], "--method", "gradient", "--no-progress", "--out", str(out)]
    assert main([*argv, "-n", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["n"] == 2
    before = (out / "results.jsonl").read_bytes()
    capsys.readouterr()
    assert main([*argv, "-n", "3", "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"betasmooth: error: --resume with a different setting: n is 2 in {out / 'config.json'} "
        "but 3 now; use the same settings or choose a new --out\n"
    )
    assert (out / "results.jsonl").read_bytes() == before


def test_curvature_refuses_a_torchscript_model_before_the_run_directory_is_made(tmp_path, capsys):
    model = tmp_path / "scripted.py"
    model.write_text(
        "import torch\n\n\ndef build():\n"
        "    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 10), "
        "torch.nn.ReLU())\n"
        "    return torch.jit.script(net)\n"
    )
    out = tmp_path / "run"
    argv = ["curvature", "--model", f"{model}:build", "--data", "digits", "-n", "2"]
    assert main([*argv, "--no-progress", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "betasmooth: error: beta-smoothing cannot work on RecursiveScriptModule, a TorchScript "
        "module (torch.jit.script or torch.jit.trace) that runs its own graph and takes no "
        "forward hooks; expected the nn.Module it was made from"
    )
    assert not out.exists()


def test_demo_records_the_fingerprints_of_its_images_and_weights(demo_dir):
    # As attack and explain do: --resume and a later sweep check them.
    import hashlib

    from betasmooth.zoo import weights_file

    config = json.loads((demo_dir / "config.json").read_text())
    x, y = bs.load_data("digits")
    inputs = hashlib.sha256()
    for tensor in (x[:4], y[:4]):
        inputs.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        inputs.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    weights = hashlib.sha256(weights_file("digits-cnn", None).read_bytes()).hexdigest()
    assert (config["inputs_sha256"], config["weights_sha256"]) == (inputs.hexdigest(), weights)


def test_a_run_that_recorded_no_weights_fingerprint_is_swept(tmp_path, capsys):
    # Runs made before weights_sha256 was recorded have nothing to compare: swept as before.
    out = tmp_path / "run"
    argv = [*ATTACK, "--method", "gradient", "-n", "2", "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    del config["weights_sha256"]
    (out / "config.json").write_text(json.dumps(config))
    assert main(["sweep", str(out), "--betas", "1", "--smoothgrad-n", "1", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    rows = read_jsonl(out / "sweep.jsonl")
    assert sorted((r["index"], r["defense"]) for r in rows) == [
        (i, d) for i in (0, 1) for d in ("beta_smooth", "smoothgrad")
    ]


def test_a_run_made_with_a_std_alone_is_swept_and_resumed_with_its_neutral_mean(tmp_path, capsys):
    # Up to 0.9.0 --std alone was taken (mean 0); it is refused now, and such a run's
    # config must still be read: its sweep failed and --resume refused every spelling.
    common = ["--model", "digits-cnn", "--data", "digits", "--method", "gradient", "-n", "2"]
    out = tmp_path / "run"
    argv = ["attack", *common, "--steps", "2", "--mean", "0", "--std", "0.5", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["mean"] == [0.0] and config["std"] == [0.5]
    config["mean"] = None  # as 0.9.0 wrote it
    (out / "config.json").write_text(json.dumps(config))
    assert main([*argv, "--resume", "--no-progress"]) == 0
    assert main(["sweep", str(out), "--betas", "1", "--smoothgrad-n", "2", "--no-progress"]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2  # 2 images x (beta_smooth, smoothgrad) at beta 1


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        # NAME is the identifier after the last dot: the name after a method's prefix may
        # hold dots of its own (a model file's prefix "scaled" resolves scaled:0.5).
        ("scaled:0.5.gain=2", ("scaled:0.5", "gain", 2)),
        ("captum:Occlusion.strides=4", ("captum:Occlusion", "strides", 4)),
        # A bare word is a name, kept whole with its colons, dots, pluses and dashes.
        ("smoothgrad.base=captum:Saliency", ("smoothgrad", "base", "captum:Saliency")),
        ("captum:LayerGradCam.layer=features.3", ("captum:LayerGradCam", "layer", "features.3")),
        ("my_method.defense=my-defense", ("my_method", "defense", "my-defense")),
        ("my_method.rule=z+", ("my_method", "rule", "z+")),
    ],
)
def test_an_option_is_split_at_its_last_dot_and_a_bare_word_is_kept_whole(text, parsed):
    from betasmooth.cli import build_parser

    argv = ["explain", "--model", "m", "--data", "d", "--method", "lrp", "--out", "run"]
    assert build_parser().parse_args([*argv, "--option", text]).option == [parsed]


def test_relu_given_twice_in_betas_is_named_relu(tmp_path, capsys):
    # relu stands for the network itself; the message names it as it was written.
    out = tmp_path / "c"
    argv = ["curvature", "--model", "digits-cnn", "--data", "digits", "--no-progress"]
    assert main([*argv, "--betas", "relu,1,relu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == "betasmooth: error: --betas must differ; relu is given more than once\n"
    assert not out.exists()


def test_betas_written_with_spaces_after_the_commas_are_the_same_betas():
    # A shell user writes "relu, 1, 5" as readily as "relu,1,5"; relu stands for None.
    from betasmooth.cli import build_parser

    argv = ["curvature", "--model", "m", "--data", "d", "--out", "run", "--betas"]
    for text, betas in (("relu, 1, 5", [None, 1.0, 5.0]), ("1 , relu ,5", [1.0, None, 5.0])):
        assert build_parser().parse_args([*argv, text]).betas == betas


def test_an_argparse_error_holding_a_newline_is_still_one_line(capsys):
    # argparse names an unrecognised argument as written; one with a newline in it
    # must not break the one-line error (its whitespace is one space).
    with pytest.raises(SystemExit) as stop:
        main(["report", "run", "a\nb"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "betasmooth report: error: unrecognized arguments: a b (see betasmooth report --help)\n"
    )


def test_an_abbreviated_option_of_a_subcommand_is_refused(capsys):
    # --smoothgrad would abbreviate --smoothgrad-n, and a later option could make any
    # abbreviation ambiguous: only the full spelling is taken.
    from betasmooth.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["sweep", "run", "--smoothgrad-n", "4"]).smoothgrad_n == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "run", "--smoothgrad", "4"])
    assert "unrecognized arguments: --smoothgrad 4" in capsys.readouterr().err


def test_beta_auto_with_one_image_to_explain_holds_out_the_images_after_it(
    tmp_path, capsys, monkeypatch
):
    # -n 1 of data holding 3 images: the one image explained is no calibration's count;
    # the 2 after it are held out, and the beta is calibrate_beta's on those 2.
    import betasmooth.cli as cli

    monkeypatch.setitem(cli.CALIBRATION, "steps", 2)
    x, y = bs.load_data("digits")
    data = tmp_path / "d.npz"
    np.savez(data, x=x[:3].numpy(), y=y[:3].numpy())
    out = tmp_path / "r"
    argv = ["explain", "--model", "digits-cnn", "--data", str(data), "-n", "1"]
    argv += ["--method", "beta_smooth", "--beta", "auto", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "calibrating beta on 2 held-out images (after the first -n)" in said
    found = bs.calibrate_beta(bs.load_model("digits-cnn"), x[1:3], steps=2, seed=0)
    config = json.loads((out / "config.json").read_text())
    assert config["beta_smooth_beta"] == found.beta
    assert config["beta_auto"]["betas"] == found.summary["betas"]
    assert [r["index"] for r in read_jsonl(out / "results.jsonl")] == [0]


@pytest.mark.parametrize(
    ("stored", "resume", "expected"),
    [
        ({"beta": "auto", "beta_smooth_beta": 1.5, "beta_auto": {"beta": 1.5}}, True, 1.5),
        # Without --resume the run starts afresh: its old beta is no choice.
        ({"beta": "auto", "beta_smooth_beta": 1.5, "beta_auto": {"beta": 1.5}}, False, None),
        # A config whose beta is no number (edited, damaged) is calibrated anew, not said.
        ({"beta": "auto", "beta_smooth_beta": "1.5", "beta_auto": {"beta": 1.5}}, True, None),
        ({"beta": "auto", "beta_smooth_beta": None, "beta_auto": {"beta": 1.5}}, True, None),
        ({"beta": 2.0, "beta_smooth_beta": 2.0}, True, None),
    ],
)
def test_a_resumed_beta_auto_run_keeps_only_a_numeric_beta_it_was_calibrated_to(
    stored, resume, expected, tmp_path, capsys
):
    import argparse

    import betasmooth.cli as cli

    out = tmp_path / "r"
    (out / "arrays").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(stored))
    (out / "results.jsonl").write_text("")  # more than create writes: the run has begun
    got = cli._calibrated(argparse.Namespace(out=str(out), resume=resume))
    said = capsys.readouterr().out
    if expected is None:
        assert (got, said) == (None, "")
    else:
        assert got == (expected, {"beta": 1.5})
        assert said == "beta = 1.5 (calibrated when the run began)\n"


def test_beta_auto_of_a_captum_base_calibrates_the_bare_gradient_on_the_held_out_images(
    tmp_path, monkeypatch, capsys
):
    # The options of the captum base are not the gradient's: the gradient gets none. The
    # record names the map calibrated on and the images, next to calibrate_beta's own.
    import argparse

    import betasmooth.cli as cli
    from betasmooth.calibrate import Calibration

    seen = []
    summary = {"min_fidelity": 0.9, "undefended": {}, "betas": {}}

    def fake(model, images, method, **kwargs):
        seen.append((method, kwargs["method_options"], kwargs["steps"], kwargs["seed"]))
        seen.append(images.tolist())
        return Calibration(2.0, True, summary)

    monkeypatch.setattr(cli, "calibrate_beta", fake)
    held = torch.arange(3.0).reshape(3, 1, 1, 1)
    monkeypatch.setattr(cli, "_held_out", lambda args, k: (held, "3 images held out"))
    args = argparse.Namespace(beta="auto", out=tmp_path / "r", resume=False, progress=False, seed=5)
    options = {"beta_smooth": {"base": "captum:Saliency", "base_options": {"abs": False}}}
    bounds = (torch.zeros(1), torch.ones(1))
    got = cli._explain_beta(args, torch.nn.Identity(), bounds, options, torch.device("cpu"))
    assert seen == [("gradient", {}, 100, 5), [[[[0.0]]], [[[1.0]]], [[[2.0]]]]]
    record = {"beta": 2.0, "recommended": True, **summary}
    assert got == (2.0, {**record, "method": "gradient", "images": "3 images held out"})
    said = capsys.readouterr().out.splitlines()
    assert said[:2] == [
        "captum:Saliency's maps cannot be attacked: beta is calibrated on the gradient map",
        "calibrating beta on 3 3 images held out, on the gradient map",
    ]


def test_the_recommendation_is_said_only_for_a_run_with_a_sweep_summary(tmp_path, capsys):
    # A run that has not been swept has no summary: nothing is said, and nothing fails.
    from betasmooth.cli import _say_recommendation
    from betasmooth.recommend import format_summary, sweep_summary

    run = RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    _say_recommendation(run)
    assert capsys.readouterr().out == ""
    rows = [
        {"defense": "beta_smooth", "beta": 1.0, "adv_vs_clean_pcc": 0.8}
        | {"clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.3}
    ]
    summary = json.loads(json.dumps(sweep_summary(rows)))
    run.write_sweep_summary(summary)
    _say_recommendation(run)
    assert capsys.readouterr().out == (
        "robustness: defended map of x_adv vs defended map of x; fidelity: defended map\n"
        "of x vs undefended map of x; medians over images; * recommended beta\n"
        f"{format_summary(summary)}\n"
    )
    assert "method: recommended beta 1 (most robust with median fidelity >= 0.9)" in (
        format_summary(summary)
    )


def test_an_os_error_names_its_file_only_where_it_has_one():
    from betasmooth.cli import _one_line

    assert _one_line(OSError(28, "No space left on device", "/r/a.npy")) == (
        "No space left on device: /r/a.npy"
    )
    assert _one_line(OSError(2, None, "/r/a.npy")) == "cannot open: /r/a.npy"
    # Without a file, the error's own words: no "None" where the file would be.
    assert _one_line(OSError(28, "No space left on device")) == "[Errno 28] No space left on device"
    assert _one_line(RuntimeError("two\n   lines ")) == "two lines"
    assert _one_line(KeyError()) == "KeyError"


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        (
            "rank",
            "rank 1 lost another rank of the torchrun job (Connection closed by peer); the rank "
            "that stopped first says why",
        ),
        ("input", "bad value: 3"),
        ("disk", "No space left on device: /r/arrays/a.npy"),
    ],
)
def test_what_ends_a_command_is_one_error_line_and_status_2(raised, said, monkeypatch, capsys):
    # A lost torchrun rank is a RuntimeError, but no bug of this process: one line, not
    # a traceback.
    import betasmooth.cli as cli
    from betasmooth.distributed import RankLost
    from betasmooth.validate import InputError

    error = {
        "rank": RankLost(1, RuntimeError("[pair.cc:561] Connection closed by peer. Check logs.")),
        "input": InputError("bad\n    value: 3"),
        "disk": OSError(28, "No space left on device", "/r/arrays/a.npy"),
    }[raised]

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_apply_preset", fail)
    assert cli.main(["report", "somewhere"]) == 2
    assert capsys.readouterr() == ("", f"betasmooth: error: {said}\n")


FAILS_ON_ONE = """
import torch


class Net(torch.nn.Module):
    # Fails on an image it meets alone after the first such: on the last batch only.
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(1024, 10)
        self.alone = []

    def forward(self, x):
        if len(x) == 1 and self.alone and not torch.equal(x, self.alone[0]):
            {fault}
        self.alone += [x.detach().clone()] if len(x) == 1 else []
        return self.fc(x.flatten(1))


def build():
    torch.manual_seed(0)
    return Net()
"""


AT = "{net}, line 14, in forward"


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        (
            'raise KeyError("no such layer")',
            f"KeyError: 'no such layer', raised in the model's own code at {AT}",
        ),
        (
            "return self.fc(x.flatten(1)[:, :5])",
            "RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x5 and 1024x10), "
            f"raised in the model's own code at {AT}",
        ),
        # sys.exit() would end the command with its status and no word of why.
        (
            '__import__("sys").exit(3)',
            f"the model's own code exited (sys.exit(3)) at {AT}; expected it to return or raise",
        ),
        (
            '__import__("sys").exit()',
            f"the model's own code exited (sys.exit()) at {AT}; expected it to return or raise",
        ),
    ],
)
def test_an_error_in_the_models_own_code_is_one_line_at_its_place(tmp_path, capsys, fault, said):
    # The model passes its checks on one and two items and fails on the last batch:
    # one line says what it raised and where in the model's file (also where torch
    # raised, called from there), exit 2, and the finished batch is kept.
    net = tmp_path / "net.py"
    net.write_text(FAILS_ON_ONE.format(fault=fault))
    out = tmp_path / "run"
    argv = ["explain", "--model", f"{net}:build", "--data", "digits"]
    argv += ["-n", "3", "--batch-size", "2", "--method", "gradient", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"betasmooth: error: {said.format(net=net)} (finished items are kept: run again with "
        "--resume once it is fixed)\n"
    )
    assert [r["index"] for r in read_jsonl(out / "results.jsonl")] == [0, 1]


LAYERS = """
import torch


class Layer(torch.nn.Linear):
    def forward(self, x):
        if len(x) == 1:
            raise ValueError
        return super().forward(x.flatten(1))
"""


@pytest.mark.parametrize("imported", ["on import", "by build"])
@pytest.mark.parametrize("form", ["file", "module"])
def test_an_error_in_a_module_beside_the_model_file_is_named_for_either_spec_form(
    tmp_path, monkeypatch, capsys, form, imported
):
    # beside_net.py builds its model from beside_layers.py, imported with it or by
    # build(): that is the model's code too, whether the spec names the file
    # (beside_net.py:build) or the module; an exception without a message is named by
    # its type alone.
    (tmp_path / "beside_layers.py").write_text(LAYERS)
    build = "def build():\n    from beside_layers import Layer\n\n    return Layer(1024, 10)\n"
    if imported == "on import":
        build = "from beside_layers import Layer\n\ndef build():\n    return Layer(1024, 10)\n"
    (tmp_path / "beside_net.py").write_text(build)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = f"{tmp_path / 'beside_net.py'}:build" if form == "file" else "beside_net:build"
    argv = ["explain", "--model", spec, "--data", "digits", "-n", "2", "--method", "gradient"]
    try:
        assert main([*argv, "--no-progress", "--out", str(tmp_path / "run")]) == 2
    finally:  # the module form leaves them imported, as Python does
        sys.modules.pop("beside_net", None)
        sys.modules.pop("beside_layers", None)
    assert capsys.readouterr().err == (
        f"betasmooth: error: ValueError, raised in the model's own code at "
        f"{tmp_path / 'beside_layers.py'}, line 8, in forward\n"
    )


def test_a_runtime_error_that_is_no_lack_of_memory_is_not_caught(monkeypatch, capsys):
    # A bug is not said as a lack of memory: its traceback is kept.
    import betasmooth.cli as cli

    def fail(args):
        raise RuntimeError("index 3 is out of bounds")

    monkeypatch.setattr(cli, "_apply_preset", fail)
    with pytest.raises(RuntimeError, match="^index 3 is out of bounds$"):
        cli.main(["report", "somewhere"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("command", "hint", "said"),
    [
        ("sweep", None, "expected a smaller --smoothgrad-n, or an attack run on smaller images"),
        ("curvature", None, "expected smaller inputs (--image-size)"),
        (
            "explain",
            None,
            "expected smaller inputs (--image-size) or, for integrated_gradients and "
            "smoothgrad, fewer points per pass (--option METHOD.chunk=1)",
        ),
        ("sweep", "expected a smaller model", "expected a smaller model"),
    ],
)
def test_out_of_memory_names_what_to_try_in_the_command_s_own_options(command, hint, said):
    # The error's own hint first; else each command's own remedy.
    from betasmooth.cli import _memory_error
    from betasmooth.validate import OutOfMemory

    err = OutOfMemory(MemoryError(), "at a batch of 1", hint)
    assert _memory_error(command, err) == (
        f"betasmooth: error: out of memory at a batch of 1 (MemoryError); {said}"
    )


@pytest.mark.parametrize(
    ("n", "count", "held", "which"),
    [
        # Built-in data: the first 8 of its training split.
        (3, 8, [0, 1, 2, 3, 4, 5, 6, 7], "held-out images (the training split)"),
        # The 8 after the first -n 3, of 3 + 8 read.
        (3, 11, [3, 4, 5, 6, 7, 8, 9, 10], "held-out images (after the first -n)"),
        # Two after the first -n are enough.
        (3, 5, [3, 4], "held-out images (after the first -n)"),
        # Fewer than -n 20 + 2: the last 8 of the 10 there are, also explained.
        (20, 10, [2, 3, 4, 5, 6, 7, 8, 9], None),
    ],
)
def test_beta_auto_holds_out_the_images_after_the_first_n_else_the_last(
    n, count, held, which, monkeypatch
):
    import argparse

    import betasmooth.cli as cli
    import betasmooth.zoo as zoo

    data = "digits" if count == 8 and n == 3 else "/my/images"
    asked = []

    def load_data(name, split, **kwargs):
        asked.append((name, split, kwargs["n"]))
        return torch.arange(float(count)).reshape(count, 1, 1, 1), torch.zeros(count)

    monkeypatch.setattr(zoo, "load_data", load_data)
    settings = {"image_size": None, "channels": None, "mean": None, "std": None, "preset": None}
    args = argparse.Namespace(data=data, n=n, **settings)
    x, said = cli._held_out(args, 8)
    assert x.flatten().tolist() == held
    split, read = ("train", 8) if data == "digits" else ("all", n + 8)
    assert asked == [(data, split, read)]
    assert said == (
        which
        or "images that are also explained: /my/images has no two images after the first -n "
        "to hold out"
    )


AGAIN = " (finished items are kept: run again with --resume once it is fixed)"


@pytest.mark.parametrize(
    ("command", "where", "again"),
    [
        # Before any run begins nothing is kept; sweep has no --resume (it continues by
        # itself); explain's begun run has.
        ("report", "_apply_preset", ""),
        ("explain", "_apply_preset", ""),
        ("sweep", "sweep_run", ""),
        ("explain", "explain_run", AGAIN),
    ],
)
def test_an_error_in_the_models_own_code_advises_resume_only_for_a_begun_run_that_has_it(
    command, where, again, attack_dir, tmp_path, monkeypatch, capsys
):
    import shutil

    import betasmooth.cli as cli
    from betasmooth import runs, zoo

    net = tmp_path / "net.py"
    code = compile(
        "def fail(*args, **kwargs):\n    raise KeyError('no such layer')\n", str(net), "exec"
    )
    space: dict[str, object] = {}
    exec(code, space)
    monkeypatch.setattr(zoo, "_USER_CODE", {net.resolve()})
    monkeypatch.setattr(cli if where == "_apply_preset" else runs, where, space["fail"])
    run = tmp_path / "run"
    argv = {
        "report": ["report", str(attack_dir)],
        "sweep": ["sweep", str(run), "--betas", "1", "--no-progress"],
        "explain": [*EXPLAIN, "--method", "gradient", "--out", str(run)],
    }[command]
    if command == "sweep":
        shutil.copytree(attack_dir, run)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (
        f"betasmooth: error: KeyError: 'no such layer', raised in the model's own code at "
        f"{net}, line 2, in fail{again}\n"
    )


def test_betasmooths_own_error_called_from_a_models_code_keeps_its_traceback(
    tmp_path, monkeypatch, capsys
):
    # betasmooth's code lies nearer the raise than the model's: a bug of betasmooth's,
    # not the model's, so it is not said as one line at the model's place.
    import argparse

    import betasmooth.cli as cli
    from betasmooth import zoo

    net = tmp_path / "net.py"
    source = "def fail(args):\n    return positive_integer('many')\n"
    space: dict[str, object] = {"positive_integer": cli.positive_integer}
    exec(compile(source, str(net), "exec"), space)
    monkeypatch.setattr(zoo, "_USER_CODE", {net.resolve()})
    monkeypatch.setattr(cli, "_apply_preset", space["fail"])
    with pytest.raises(argparse.ArgumentTypeError, match="^expected a positive integer"):
        cli.main(["report", "somewhere"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("argv", "raised", "said"),
    [
        (
            ["sweep", "somewhere"],
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 8 bytes."),
            "out of memory (DefaultCPUAllocator: can't allocate memory: you tried 8 bytes.); "
            "expected a smaller --smoothgrad-n, or an attack run on smaller images",
        ),
        (
            ["curvature", "--model", "digits-cnn", "--data", "digits", "--out", "somewhere"],
            MemoryError(),
            "out of memory (MemoryError); expected smaller inputs (--image-size)",
        ),
        # At a batch of 1 the run's retries in halves give up with OutOfMemory: status 2
        # too, as the README says of a rank that runs out of memory at a batch of 1.
        (
            ["curvature", "--model", "digits-cnn", "--data", "digits", "--out", "somewhere"],
            OutOfMemory(MemoryError(), "at a batch of 1"),
            "out of memory at a batch of 1 (MemoryError); expected smaller inputs (--image-size)",
        ),
    ],
)
def test_memory_running_out_before_a_run_is_one_line_with_the_command_s_remedy(
    argv, raised, said, monkeypatch, capsys
):
    # Loading or a check before the run's batches, which would retry in halves.
    import betasmooth.cli as cli

    def fail(args):
        raise raised

    monkeypatch.setattr(cli, "_apply_preset", fail)
    assert cli.main(argv) == 2
    assert capsys.readouterr() == ("", f"betasmooth: error: {said}\n")


def test_a_warning_said_while_loading_before_the_run_exists_is_kept_in_it(
    tmp_path, monkeypatch, capsys
):
    # The notice comes before the run directory is made: it is kept when the run is.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    argv = ["explain", "--model", "digits-cnn", "--data", "digits", "-n", "1"]
    assert main([*argv, "--method", "gradient", "--no-progress", "--out", "r"]) == 0
    err = capsys.readouterr().err.splitlines()
    said = [line.removeprefix("betasmooth: warning: ") for line in err if "warning" in line]
    assert len(said) == 1
    assert said[0].startswith("data 'digits' is the built-in data set, not the digits in")
    assert read_jsonl(tmp_path / "r" / "warnings.jsonl") == [
        {"command": "explain", "warning": said[0]}
    ]


@pytest.mark.parametrize("spec", ["torchvision.models.resnet:resnet18", "json.decoder:JSONDecoder"])
def test_an_installed_package_or_the_standard_library_is_never_the_models_own_code(
    spec, monkeypatch, capsys
):
    # A model named by a module of an installed package (or of the standard library)
    # makes none of its files the model's code: what is raised inside them keeps its
    # traceback.
    import importlib
    import json

    import betasmooth.cli as cli
    from betasmooth import zoo

    monkeypatch.setattr(zoo, "_USER_CODE", set())
    assert zoo.import_model_code(spec)
    module = importlib.import_module(spec.partition(":")[0])
    assert not zoo.is_user_code(module.__file__) and zoo._USER_CODE == set()
    monkeypatch.setattr(cli, "_apply_preset", lambda args: json.loads("{"))
    with pytest.raises(json.JSONDecodeError):
        cli.main(["report", "somewhere"])
    assert capsys.readouterr().err == ""


def test_beta_auto_resumed_into_a_directory_not_yet_started_calibrates(
    tmp_path, monkeypatch, capsys
):
    # --resume of a run that never began starts it: its beta is calibrated as a new run's.
    import betasmooth.cli as cli
    from betasmooth.calibrate import Calibration

    found = Calibration(2.0, True, {"min_fidelity": 0.9, "undefended": {}, "betas": {}})
    monkeypatch.setattr(cli, "calibrate_beta", lambda *args, **kwargs: found)
    out = tmp_path / "r"
    argv = [*EXPLAIN, "--method", "beta_smooth", "--beta", "auto", "--out", str(out)]
    assert cli.main([*argv, "--resume"]) == 0
    assert "beta = 2" in capsys.readouterr().out
    assert RunDir(out).config()["beta_smooth_beta"] == 2.0


def test_a_warning_said_after_a_command_is_kept_in_no_run_of_it(tmp_path, capsys):
    # In one process (a notebook, a test session) the next warning belongs to no run:
    # before, it went into the last command's warnings.jsonl, or failed where that
    # run had gone.
    import betasmooth.cli as cli

    net = tmp_path / "net.py"
    net.write_text(
        "import warnings\nimport torch\n\n\ndef build():\n"
        "    warnings.warn('built')\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 10))\n"
    )
    argv = ["explain", "--model", f"{net}:build", "--data", "digits", "-n", "1"]
    assert main([*argv, "--method", "gradient", "--no-progress", "--out", str(tmp_path / "r")]) == 0
    cli._show_warning("later", UserWarning, "elsewhere.py", 1)
    assert "betasmooth: warning: later" in capsys.readouterr().err
    kept = [r["warning"] for r in read_jsonl(tmp_path / "r" / "warnings.jsonl")]
    assert kept == ["built"]


def test_explain_draws_smoothgrad_noise_from_the_seed_it_is_given(tmp_path):
    # Each image's SmoothGrad draws come from unit_seed(--seed, method, index), as the
    # library's own explain_run documents: the saved map is the library's for seed 3.
    from betasmooth.explain import range_options
    from betasmooth.runs import load_inputs

    out = tmp_path / "run"
    argv = [*EXPLAIN, "--method", "smoothgrad", "--seed", "3", "--option", "smoothgrad.n=4"]
    assert main([*argv, "--out", str(out)]) == 0
    inputs = load_inputs("digits-cnn", "digits", n=2)
    model, x, _ = inputs
    label = model(x).argmax(1)
    given = {**range_options(*inputs.bounds)["smoothgrad"], "n": 4}
    found = RunDir(out).read_arrays("smoothgrad")["map"]
    for seed, close in ((3, True), (0, False)):
        drawn = [unit_seed(seed, "smoothgrad", i) for i in range(2)]
        expected = bs.heatmap(bs.explain(model, x, "smoothgrad", label, seed=drawn, **given))
        same = np.allclose(found, expected.detach().numpy(), rtol=1e-4, atol=1e-7)
        assert same == close, seed


def test_the_image_count_defaults_to_16_as_the_readme_says():
    # README: "The number of images is -n N, --images N or --n N (default 16)"; the
    # help derives its "(default N)" from the parser, so only the README pins it.
    from betasmooth.cli import build_parser

    parser = build_parser()
    inputs = ["--model", "m", "--data", "d", "--out", "run"]
    for command in (["attack", "--method", "gradient"], ["explain", "--method", "lrp"]):
        assert parser.parse_args([*command, *inputs]).n == 16, command
    assert parser.parse_args(["curvature", *inputs]).n == 16


def test_an_option_given_overrides_the_one_the_data_range_sets(tmp_path):
    # The data's range sets integrated gradients' baseline (the black image, 0 on the
    # digits); --option integrated_gradients.baseline=0.5 is the user's word over it.
    out = tmp_path / "run"
    argv = [*EXPLAIN, "--method", "integrated_gradients", "--out", str(out)]
    options = ["--option", "integrated_gradients.baseline=0.5"]
    assert main([*argv, *options, "--option", "integrated_gradients.steps=8"]) == 0
    with np.load(out / "arrays" / "integrated_gradients-0.npz") as saved:
        x, stored = torch.from_numpy(saved["x"]), saved["map"]
    net = bs.load_model("digits-cnn")
    given, black = (
        bs.heatmap(bs.explain(net, x, "integrated_gradients", baseline=b, steps=8)).numpy()
        for b in (0.5, 0.0)
    )
    np.testing.assert_allclose(stored, given, rtol=1e-5, atol=1e-7)
    assert np.abs(stored - black).max() > 1e-4


def test_config_records_the_number_of_images_used_where_the_data_hold_fewer(tmp_path):
    # README: "when the data hold fewer, a notice on stderr says so and config.json
    # records the number used": 2 images of -n 5 are recorded as n = 2.
    data = tmp_path / "two.npz"
    np.savez(data, x=np.random.default_rng(0).random((2, 1, 32, 32)).astype(np.float32))
    out = tmp_path / "run"
    argv = ["explain", "--model", "digits-cnn", "--data", str(data), "--method", "gradient"]
    assert main([*argv, "-n", "5", "--out", str(out), "--no-progress"]) == 0
    assert len(read_jsonl(out / "results.jsonl")) == 2
    assert RunDir(out).config()["n"] == 2


def test_options_read_back_from_a_config_are_those_the_command_line_parsed():
    # config.json holds a tuple option as a list; the sweep reads it back for the run's
    # methods as the command line gave it, a tuple (Captum refuses a list of shapes).
    from betasmooth.cli import _attacked_with, _given_options, _stored, build_parser

    argv = ["attack", "--model", "m", "--data", "d", "--method", "lrp", "--out", "run"]
    args = build_parser().parse_args([*argv, "--option", "lrp.shape=(1,3,3)"])
    given = _given_options(args)
    config = {"methods": ["lrp"], "options": json.loads(json.dumps(_stored(given)))}
    assert config["options"] == {"lrp": {"shape": [1, 3, 3]}}
    bounds = (torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    read = _attacked_with(config, bounds)["lrp"]["shape"]
    assert read == given["lrp"]["shape"] == (1, 3, 3)
    assert isinstance(read, tuple)
