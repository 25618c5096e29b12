"""report.html from a synthetic run directory: medians, embedded PNGs, determinism."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from betasmooth import figures
from betasmooth.report import GRID_ROWS, THEORY_TABLES, THEORY_TERMS, build_report
from betasmooth.store import AttackBatch, ExplainBatch, RunDir, SweepBatch

METHODS = ("gradient", "lrp")
BETAS = (0.5, 1.0, 5.0)
N, H = 6, 8
BATCH = 4


def _maps(rng, *shape):
    m = rng.random((*shape, H, H))
    return m / m.sum(axis=(-2, -1), keepdims=True)


def make_run(
    path: Path,
    *,
    sweep: bool = True,
    theory: bool = True,
    goal: str = "targeted",
    methods: tuple[str, ...] = METHODS,
    betas: tuple[float, ...] = BETAS,
) -> Path:
    """A run directory with the documented files, filled with seeded random numbers."""
    rng = np.random.default_rng(0)
    config = {
        "command": "attack",
        "model": "digits-cnn",
        "data": "digits",
        "n": N,
        "steps": 3,
        "seed": 7,
        "versions": {"betasmooth": "0.1.0", "torch": "2.x"},
        "methods": list(methods),
    }
    run = RunDir.create(path, config)
    lines = []
    for method in methods:
        for first in range(0, N, BATCH):
            idx = np.arange(first, min(first + BATCH, N))
            b = len(idx)
            batch = AttackBatch(
                index=idx,
                x=rng.random((b, 1, H, H)),
                x_adv=rng.random((b, 1, H, H)),
                map_orig=_maps(rng, b),
                map_adv=_maps(rng, b),
                map_target=_maps(rng, b),
                label=rng.integers(0, 10, b),
                label_adv=rng.integers(0, 10, b),
            )
            run.save_arrays(method, first, batch)
            if sweep:
                swept = SweepBatch(idx, np.array(betas), {"beta_smooth": _maps(rng, b, len(betas))})
                run.save_arrays(method, first, swept, "sweep")
        for i in range(N):
            label = int(rng.integers(0, 10))
            kept = bool(rng.random() < 0.7)
            rec = {"index": i, "method": method, "goal": goal, "label": label}
            rec |= {"label_adv": label if kept else (label + 1) % 10, "label_kept": kept}
            for m in ("mse", "ssim", "pcc"):
                rec[f"expl_{m}_target"] = float(rng.random())
                rec[f"expl_{m}_orig"] = float(rng.random())
            rec |= {"input_mse": float(rng.random()) * 1e-3, "input_pcc": float(rng.random())}
            rec |= {"output_change": float(rng.random()), "seconds": float(rng.random())}
            rec["spearman_target"] = float(rng.random())
            lines.append(rec)
    # A partial last line, as a killed run leaves it, is ignored on reading.
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"index": 99, "meth'
    (path / "results.jsonl").write_text(text)
    if sweep:
        recs = []
        for method in methods:
            for i in range(N):
                settings = [("beta_smooth", b, None) for b in betas]
                settings += [("smoothgrad", b, math.pi / (math.sqrt(3) * b)) for b in betas]
                for defense, beta, sigma in settings:
                    rec = {"index": i, "method": method, "defense": defense}
                    rec |= {"beta": beta, "sigma": sigma, "seconds": float(rng.random())}
                    for a in ("adv_vs_orig", "adv_vs_target", "clean_vs_target", "clean_vs_orig"):
                        for m in ("pcc", "ssim", "mse"):
                            # Maps' MSEs are small: their numbers are written as 4.3e-08.
                            scale = 1e-7 if m == "mse" else 1.0
                            rec[f"{a}_{m}"] = float(rng.random()) * scale
                    recs.append(rec)
        run.append(recs, "sweep")
    if theory:
        x = np.linspace(-2.0, 2.0, 41)
        bs = [0.5, 1.0, 2.0, 5.0, 10.0]
        n = [10, 100, 1000]
        summary = {
            "identity_1d_max_error": 3e-9,
            "sigmoid_derivative_max_error": 1e-8,
            "theorem2_projected_max_error": 0.004,
            "theorem2_projected_ci": 0.006,
            "theorem2_iid_bias": 0.012,
            "theorem2_iid_bias_limit": 0.0228,
            "smoothing_vs_smoothgrad_pcc": {
                str(b): {"logistic": 1 - 0.01 * b, "gaussian": 1 - 0.02 * b} for b in bs
            },
            "curvature_by_beta": {
                str(b): {"hessian_norm": 0.1 * b, "principal_curvature": 0.05 * b} for b in bs
            },
            "curves": {
                "softplus": {
                    "x": x.tolist(),
                    "betas": bs,
                    "y": [(np.logaddexp(0, b * x) / b).tolist() for b in bs],
                    "relu": np.maximum(x, 0).tolist(),
                },
                "density": {
                    "x": x.tolist(),
                    "logistic": (0.25 / np.cosh(x / 2) ** 2).tolist(),
                    "normal": np.exp(-(x**2) / 6.58).tolist(),
                    "beta": 1.0,
                },
                "mc_error": {
                    "n": n,
                    "projected": [0.1, 0.03, 0.01],
                    "projected_ci": [0.2, 0.06, 0.02],
                    "iid": [0.1, 0.04, 0.02],
                    "iid_bias": 0.012,
                },
                "smoothing_vs_smoothgrad": {
                    "beta": bs,
                    "logistic": [1 - 0.01 * b for b in bs],
                    "gaussian": [1 - 0.02 * b for b in bs],
                },
                "curvature": {
                    "beta": bs,
                    "hessian_norm": [0.1 * b for b in bs],
                    "principal_curvature": [0.05 * b for b in bs],
                },
            },
        }
        run.write_theory(summary)
    return path


class _Page(HTMLParser):
    """Tables by id (rows of (text, data-value)), images, and every src/href."""

    def __init__(self) -> None:
        super().__init__()
        self.tables, self.images, self.links, self.ids = {}, [], [], []
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        self.links += [a[k] for k in ("src", "href") if k in a]
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ["", a.get("data-value")]
            # A cell that spans columns heads each of them.
            self._row.extend([self._cell] * int(a.get("colspan", 1)))
        elif tag == "img":
            self.images.append(a)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def column(table, header: str, head_rows: int = 1) -> dict[str, float]:
    """Row label -> data-value of the column headed ``header``: the texts of its
    ``head_rows`` header cells, top to bottom, joined by a space."""
    heads = [" ".join(filter(None, (c[0] for c in cells))) for cells in zip(*table[:head_rows])]
    j = heads.index(header)
    return {
        row[0][0]: (None if row[j][1] is None else float(row[j][1])) for row in table[head_rows:]
    }


def read_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run"))
    first = build_report(run).read_bytes()
    figs = {p.name: p.read_bytes() for p in (run / "figures").glob("*.png")}
    return run, first, figs


def test_build_twice_gives_identical_bytes(full_run):
    run, first, figs = full_run
    # Rebuilt in a copy of the run directory (figures and report overwritten).
    copy = run.parent / "copy"
    shutil.copytree(run, copy)
    assert build_report(copy).read_bytes() == first
    assert {p.name: p.read_bytes() for p in (copy / "figures").glob("*.png")} == figs


def test_the_figures_carry_no_software_or_date_text(full_run):
    # figures' contract: no software or date metadata, so that the PNGs depend on the
    # data only (matplotlib writes "Software: Matplotlib version ..." unless told not to).
    _, _, figs = full_run
    assert len(figs) >= 5
    for name, data in figs.items():
        with Image.open(io.BytesIO(data)) as im:
            assert im.text == {}, name


def test_medians_table_equals_numpy(full_run):
    run, _, _ = full_run
    page = parse(run / "report.html")
    table = page.tables["medians"]
    records = read_lines(run / "results.jsonl")
    assert len(records) == N * len(METHODS)
    keys = [k for k, v in records[0].items() if isinstance(v, float)]
    for method in METHODS:
        got = column(table, f"{method} (targeted)")
        mine = [r for r in records if r["method"] == method]
        for key in keys:
            assert got[key] == np.median([r[key] for r in mine]), key
        assert got["labels kept (fraction)"] == np.mean([r["label_kept"] for r in mine])
        assert got["images"] == N


def test_the_numbers_a_reader_sees_are_the_values_to_four_digits(full_run):
    run, _, _ = full_run
    page = parse(run / "report.html")
    checked = 0
    for name in ("medians", *(t for t in page.tables if t.startswith("defense-table"))):
        for row in page.tables[name]:
            for text, value in row[1:]:
                if value is None or not math.isfinite(float(value)) or float(value) == 0:
                    continue
                # Rounded to 4 significant digits: off by at most half a unit of the 4th.
                assert abs(float(text) - float(value)) <= 5e-4 * abs(float(value)), (name, text)
                checked += 1
    assert checked > 50


def test_defense_tables_equal_numpy(full_run):
    run, _, _ = full_run
    page = parse(run / "report.html")
    sweep = read_lines(run / "sweep.jsonl")
    for method in METHODS:
        table = page.tables[f"defense-table_{method}"]
        for defense, beta in [(d, b) for d in ("beta_smooth", "smoothgrad") for b in BETAS]:
            if defense == "beta_smooth":
                setting = f"β-smoothing β={beta:g}"
            else:
                sigma = math.pi / (math.sqrt(3) * beta)
                setting = f"SmoothGrad σ={sigma:.3g}, matched to β={beta:g}"
            got = column(table, setting, head_rows=2)
            mine = [
                r
                for r in sweep
                if r["method"] == method and r["defense"] == defense and r["beta"] == beta
            ]
            assert got["records"] == len(mine) == N
            for key in (
                "adv_vs_orig_pcc",
                "adv_vs_target_ssim",
                "clean_vs_target_pcc",
                "clean_vs_orig_mse",
                "seconds",
            ):
                assert got[key] == np.median([r[key] for r in mine])


def test_theory_numbers_in_page(full_run):
    run, _, _ = full_run
    page = parse(run / "report.html")
    theory = json.loads((run / "theory.json").read_text())
    numbers = page.tables["theory-numbers"]
    got = column(numbers, "value")
    for key in ("identity_1d_max_error", "theorem2_iid_bias", "theorem2_iid_bias_limit"):
        assert got[THEORY_TERMS[key][0]] == theory[key]
    units = {row[0][0]: row[2][0] for row in numbers[1:]}
    assert units[THEORY_TERMS["theorem2_iid_bias"][0]] == "probability"
    pcc = page.tables["theory_smoothing-vs-smoothgrad-pcc"]
    assert column(pcc, "Gaussian noise")["5.0"] == pytest.approx(0.9)
    curvature = page.tables["theory_curvature-by-beta"]
    assert column(curvature, "largest |Hessian eigenvalue| (logit per input²)")["10.0"] == 1.0


def test_a_theory_bound_from_0_to_h_shows_h(tmp_path):
    run = RunDir.create(tmp_path / "run", {"command": "theorem"})
    run.write_theory({"theorem2_projected_ci": [0.0, 0.006], "theorem2_iid_bias": 0.012})
    page = parse(build_report(run.path))
    got = column(page.tables["theory-numbers"], "value")
    assert got[THEORY_TERMS["theorem2_projected_ci"][0]] == 0.006
    assert got[THEORY_TERMS["theorem2_iid_bias"][0]] == 0.012


def test_a_theory_list_of_three_numbers_is_no_bound_and_no_number(tmp_path):
    # Only a pair [low, high] is a bound (shown as its high end); a longer list is no
    # single number, and its last entry is not shown as if it were.
    run = RunDir.create(tmp_path / "run", {"command": "theorem"})
    run.write_theory({"theorem2_iid_bias": 0.012, "dims": [1.0, 2.0, 3.0]})
    page = parse(build_report(run.path))
    got = column(page.tables["theory-numbers"], "value")
    assert got == {THEORY_TERMS["theorem2_iid_bias"][0]: 0.012}


def test_a_log_axis_is_not_put_on_values_that_are_not_all_positive():
    # A 0 among the betas has no logarithm: the axis stays linear (max / min was inf).
    ax = figures._figure(figures.PLOT_SIZE).add_subplot()
    figures._log_axis(ax, np.array([0.0, 1.0, 100.0]))
    assert ax.get_xscale() == "linear"
    figures._log_axis(ax, np.array([1.0, 100.0]))
    assert ax.get_xscale() == "log"


def test_theory_section_speaks_plain_words(full_run):
    run, _, _ = full_run
    text = (run / "report.html").read_text()
    section = text[text.index("id='theory'") : text.index("id='settings'")]
    theory = json.loads((run / "theory.json").read_text())
    shown = re.sub(r"<[^>]+>", " ", section)
    leaked = [key for key in theory if key != "curves" and key in shown]
    assert leaked == []


def _decode(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    return base64.b64decode(src[len(prefix) :], validate=True)


def test_images_are_embedded_pngs_of_the_expected_size(full_run):
    run, _, _ = full_run
    page = parse(run / "report.html")
    sizes = {}
    for img in page.images:
        data = _decode(img["src"])
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG"
            assert im.size == (int(img["width"]), int(img["height"]))
            sizes[img["alt"]] = im.size
    rows = min(GRID_ROWS, N)
    plot = (round(figures.PLOT_SIZE[0] * figures.DPI), round(figures.PLOT_SIZE[1] * figures.DPI))
    for method in METHODS:
        # original, its map, attacked, its map, target, then one map per beta
        assert sizes[f"{method} grid"] == figures.grid_size(rows, 5 + len(BETAS))
        assert sizes[f"{method} quality against time"] == plot
        curves = f"{method}: similarity of the defended maps against β, PCC and SSIM"
        assert sizes[curves] == tuple(round(v * figures.DPI) for v in figures.DEFENSE_SIZE)
    # The theory figures' alternative texts are their captions.
    for alt in (
        "softplus_β against ReLU",
        "The logistic density p_β against the normal density of the same variance",
        "PCC of the β-smoothed gradient with SmoothGrad (digits-cnn)",
        "Curvature of the β-smoothed digits-cnn against β",
    ):
        assert sizes[alt] == plot
    assert sum(alt.startswith("Monte Carlo error of") for alt in sizes) == 1
    assert len(page.images) == 3 * len(METHODS) + 5


def test_no_external_resources(full_run):
    run, _, _ = full_run
    text = (run / "report.html").read_text()
    page = parse(run / "report.html")
    assert all(link.startswith(("data:", "#")) for link in page.links)
    assert "<script" not in text.lower()
    assert not re.search(r"url\(|@import|https?://", text)
    assert {"run", "results", "methods", "defense", "cost", "theory", "settings"} <= set(page.ids)
    # Every link target once: a heading and its table used to share an id.
    assert sorted(page.ids) == sorted(set(page.ids))


def test_ids_stay_unique_whatever_the_methods_are_called(tmp_path):
    # Methods named like the report's own parts: "choice" met "defense-choice".
    run = make_run(tmp_path, methods=("choice", "table", "Gradient", "gradient"))
    ids = parse(build_report(run)).ids
    assert len(ids) == len(set(ids)) > 10


def test_settings_and_run_tables(full_run):
    run, _, _ = full_run
    page = parse(run / "report.html")
    settings = {row[0][0]: row[1][0] for row in page.tables["settings-table"][1:]}
    assert settings["model"] == "digits-cnn" and settings["steps"] == "3"
    what = {row[0][0]: row[1][0] for row in page.tables["run-table"][1:]}
    assert what["seed"] == "7" and what["images (n)"] == str(N)


def test_versions_have_a_table_of_their_own_and_no_row_among_the_settings(full_run):
    run, _, _ = full_run
    page = parse(run / "report.html")
    stored = json.loads((run / "config.json").read_text())["versions"]
    versions = {row[0][0]: row[1][0] for row in page.tables["versions"][1:]}
    assert versions == stored and list(versions) == sorted(stored) and "torch" in versions
    settings = [row[0][0] for row in page.tables["settings-table"][1:]]
    assert "versions" not in settings and "seed" in settings


def test_a_swept_digits_cnn_run_has_neither_the_no_maps_nor_the_other_model_note(full_run):
    # The notes of a method without beta-smoothed maps and of a theory checked on another
    # model than the run's: full_run has both the maps and the built-in digits-cnn.
    run, _, _ = full_run
    text = (run / "report.html").read_text()
    assert text.count(f"<figcaption>First {GRID_ROWS} of {N} images") == len(METHODS)
    assert "No beta-smoothed maps stored" not in text
    assert "not this run&#x27;s model" not in text


def test_settings_keep_the_order_of_numeric_keys(tmp_path):
    betas = {str(b): {"robustness": b / 100} for b in (0.5, 1, 2, 5, 10, 20, 50)}
    run = RunDir.create(tmp_path, {"command": "explain", "beta_auto": {"betas": betas}})
    run.append([{"index": 0, "method": "gradient", "label": 1, "seconds": 0.1}])
    page = parse(build_report(tmp_path))
    settings = {row[0][0]: row[1][0] for row in page.tables["settings-table"][1:]}
    shown = json.loads(settings["beta_auto"])["betas"]
    assert list(shown) == ["0.5", "1", "2", "5", "10", "20", "50"]


def test_run_without_sweep_or_theory_still_builds(tmp_path):
    run = make_run(tmp_path / "bare", sweep=False, theory=False)
    page = parse(build_report(run))
    text = (run / "report.html").read_text()
    assert "No defense sweep in this run" in text
    assert "No theory checks in this run" in text
    sizes = {}
    for img in page.images:
        with Image.open(io.BytesIO(_decode(img["src"]))) as im:
            sizes[img["alt"]] = im.size
    assert sorted(sizes) == [f"{m} grid" for m in METHODS]
    assert sizes["gradient grid"] == figures.grid_size(min(GRID_ROWS, N), 5)


def test_explain_only_run(tmp_path):
    rng = np.random.default_rng(1)
    run = RunDir.create(tmp_path, {"command": "explain", "seed": 0})
    for method in ("gradient", "lrp"):
        run.save_arrays(
            method, 0, ExplainBatch(np.arange(3), rng.random((3, 1, H, H)), _maps(rng, 3))
        )
    records = [
        {"index": i, "method": m, "label": 1, "map_max": float(rng.random()), "seconds": 0.1}
        for m in ("gradient", "lrp")
        for i in range(3)
    ]
    run.append(records)
    page = parse(build_report(tmp_path))
    got = column(page.tables["explain-medians"], "lrp")
    assert got["map_max"] == np.median([r["map_max"] for r in records if r["method"] == "lrp"])
    assert "label" not in got
    assert got["images"] == 3
    assert [img["alt"] for img in page.images] == ["explanation grid"]
    with Image.open(io.BytesIO(_decode(page.images[0]["src"]))) as im:
        assert im.size == figures.grid_size(3, 3)
    assert "Attack results" not in (tmp_path / "report.html").read_text()
    what = {row[0][0]: row[1][0] for row in page.tables["run-table"][1:]}
    assert what["results lines"] == "6" and what["images (n)"] == "3"


def test_explain_grid_leaves_out_a_method_whose_maps_of_the_rows_are_lost(tmp_path):
    rng = np.random.default_rng(3)
    run = RunDir.create(tmp_path, {"command": "explain", "seed": 0})
    n = GRID_ROWS
    x = rng.random((2 * n, 1, H, H))
    for first in (0, n):
        idx = np.arange(first, first + n)
        run.save_arrays("gradient", first, ExplainBatch(idx, x[idx], _maps(rng, n)))
    # lrp's arrays of the first rows' images are lost: its maps of the next
    # images, as many as there are rows, must not fill those rows.
    run.save_arrays("lrp", n, ExplainBatch(np.arange(n, 2 * n), x[n:], _maps(rng, n)))
    records = [
        {"index": i, "method": m, "label": 1, "map_max": 1.0, "seconds": 0.1}
        for m in ("gradient", "lrp")
        for i in range(2 * n)
    ]
    run.append(records)
    page = parse(build_report(tmp_path))
    with Image.open(io.BytesIO(_decode(page.images[0]["src"]))) as im:
        assert im.size == figures.grid_size(n, 2)
    text = (tmp_path / "report.html").read_text()
    assert "Not shown, their maps of these images are not stored: lrp." in text


def test_explain_grid_leaves_out_a_method_that_lacks_some_of_the_rows(tmp_path):
    # lrp's first batch of two is lost, its second kept: two of the rows' maps are there.
    rng = np.random.default_rng(4)
    run = RunDir.create(tmp_path, {"command": "explain", "seed": 0})
    n = GRID_ROWS
    x = rng.random((n, 1, H, H))
    run.save_arrays("gradient", 0, ExplainBatch(np.arange(n), x, _maps(rng, n)))
    run.save_arrays("lrp", 2, ExplainBatch(np.arange(2, n), x[2:], _maps(rng, n - 2)))
    run.append(
        [
            {"index": i, "method": m, "label": 1, "seconds": 0.1}
            for m in ("gradient", "lrp")
            for i in range(n)
        ]
    )
    page = parse(build_report(tmp_path))
    with Image.open(io.BytesIO(_decode(page.images[0]["src"]))) as im:
        assert im.size == figures.grid_size(n, 2)
    text = (tmp_path / "report.html").read_text()
    assert "Not shown, their maps of these images are not stored: lrp." in text


@pytest.mark.parametrize("goal", ["topk", "center"])
def test_untargeted_goals_show_no_target_map_or_target_rows(tmp_path, goal, monkeypatch):
    run = make_run(tmp_path, theory=False, goal=goal)
    # As the attack records them: its "target" is the original map, so these are 1.
    before = {f"expl_{m}_target_before": 1.0 for m in ("pcc", "ssim", "mse")}
    _rewrite(run / "results.jsonl", [r | before for r in read_lines(run / "results.jsonl")])
    calls = _calls(monkeypatch, "defense_curves")
    page = parse(build_report(run))
    drawn = [{*args[1], *(kwargs.get("undefended") or {})} for args, kwargs in calls]
    assert len(drawn) == len(METHODS)
    assert all(
        "adv_vs_orig_pcc" in keys and not any("_vs_target_" in k for k in keys) for keys in drawn
    )
    rows = [row[0][0] for row in page.tables["medians"][1:]]
    assert "expl_pcc_orig" in rows
    assert not [r for r in rows if "_target" in r]
    expected = [r for r in read_lines(run / "results.jsonl") if r["method"] == "lrp"]
    got = column(page.tables["medians"], f"lrp ({goal})")
    assert got["expl_ssim_orig"] == np.median([r["expl_ssim_orig"] for r in expected])
    text = (run / "report.html").read_text()
    assert "expl_*_target" not in text and "The topk and center goals have no target map" in text
    assert "vs target" not in text
    grids = [img for img in page.images if img["alt"].endswith(" grid")]
    assert len(grids) == len(METHODS)
    for img in grids:
        with Image.open(io.BytesIO(_decode(img["src"]))) as im:
            assert im.size == figures.grid_size(min(GRID_ROWS, N), 4 + len(BETAS))
    for method in METHODS:
        rows = [row[0][0] for row in page.tables[f"defense-table_{method}"][2:]]
        assert "adv_vs_orig_pcc" in rows and not [r for r in rows if "_vs_target_" in r]


def test_a_run_of_targeted_and_untargeted_goals_explains_both_and_blanks_only_the_latter(
    tmp_path,
):
    # gradient attacked towards a target map, lrp with the topk goal (no target map).
    run = make_run(tmp_path, sweep=False, theory=False)
    records = [
        r | {"goal": "topk" if r["method"] == "lrp" else "targeted"}
        for r in read_lines(run / "results.jsonl")
    ]
    _rewrite(run / "results.jsonl", records)
    page = parse(build_report(run))
    text = (run / "report.html").read_text()
    assert "expl_*_target: attacked map vs target map" in text
    assert "The topk and center goals have no target map" in text
    targeted = column(page.tables["medians"], "gradient (targeted)")
    untargeted = column(page.tables["medians"], "lrp (topk)")
    expected = [r["expl_pcc_target"] for r in records if r["method"] == "gradient"]
    assert targeted["expl_pcc_target"] == np.median(expected)
    assert untargeted["expl_pcc_target"] is None
    lrp = [r["expl_pcc_orig"] for r in records if r["method"] == "lrp"]
    assert untargeted["expl_pcc_orig"] == np.median(lrp)


def test_labels_with_dollar_signs_are_drawn_as_written(tmp_path):
    # A class folder named "$a^^b$" is no TeX: as maths it failed to parse.
    rng = np.random.default_rng(4)
    x, m = rng.random((2, 1, H, H)), _maps(rng, 2)
    path = figures.explain_grid(x, {"gradient": m}, tmp_path / "g.png", row_labels=["$a^^b$", "$"])
    with Image.open(path) as im:
        assert im.size == figures.grid_size(2, 2)


def test_missing_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "nope")


def test_grid_rows_share_one_colour_scale(tmp_path):
    """Scaling one map of a row leaves the others' pixels as they were only if the scale is
    shared: with a shared scale, a 10x hotter target map darkens every other map of the row."""
    rng = np.random.default_rng(2)
    x = rng.random((1, 1, H, H))
    m = _maps(rng, 1)
    base = figures.method_grid(x, m, x, m, m, tmp_path / "a.png")
    hot = figures.method_grid(x, m, x, m, 10 * m, tmp_path / "b.png")
    a = np.asarray(Image.open(base).convert("L"), dtype=float)
    b = np.asarray(Image.open(hot).convert("L"), dtype=float)
    width = figures.grid_size(1, 5)[0]
    cell = round(figures.CELL * figures.DPI)
    top = round(figures.TITLE_H * figures.DPI)
    orig_map = (slice(top + 10, top + cell - 10), slice(cell + 10, 2 * cell - 10))
    # Same data, lower share of the colour scale: the original map gets darker.
    assert b[orig_map].mean() < 0.5 * a[orig_map].mean()
    assert a.shape[1] == width


def test_a_map_on_few_pixels_is_scaled_to_its_largest_value():
    # Ten hot pixels of 64 x 64 lie above the 99.5th percentile, which is 0: the scale
    # fell back to 1 (the whole mass on one pixel) and the row was drawn black.
    from betasmooth.figures import MAP_CMAP, _compose

    sparse = np.zeros((1, 64, 64))
    sparse[0, 3, :10] = 0.1
    assert np.percentile(sparse, 99.5) == 0.0
    canvas, vmax = _compose([("map", "map", sparse)])
    assert vmax.tolist() == [0.1]
    top = np.asarray(matplotlib.colormaps[MAP_CMAP](1.0)[:3])
    assert np.isclose(canvas, top).all(axis=-1).any()  # the hot pixels in the top colour
    # An all-zero map keeps the scale of 1: black, with nothing to show.
    assert _compose([("map", "map", np.zeros((1, 8, 8)))])[1].tolist() == [1.0]


def test_panels_keep_the_aspect_ratio_of_the_images():
    # A 2 x 6 image in a 12 x 12 cell: 4 x 12, centred, with white bars (it was
    # stretched to 12 x 12).
    from betasmooth.figures import _fit

    panel = np.arange(12.0).reshape(2, 6, 1).repeat(3, -1)
    cell = _fit(panel, 12)
    assert cell.shape == (12, 12, 3)
    assert (cell[:4] == 1.0).all() and (cell[8:] == 1.0).all()
    np.testing.assert_array_equal(
        cell[4:8, :, 0], panel[[0, 0, 1, 1]][:, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5], 0]
    )
    tall = _fit(panel.transpose(1, 0, 2), 12)
    assert (tall[:, :4] == 1.0).all() and (tall[:, 8:] == 1.0).all()
    # A square image fills its cell, pixel for pixel.
    square = np.random.default_rng(0).random((4, 4, 3))
    np.testing.assert_array_equal(_fit(square, 8), square.repeat(2, 0).repeat(2, 1))


def test_each_panel_sits_in_the_middle_of_its_cell_with_the_gap_on_every_side():
    # Cells of 135 px hold panels of 131: 2 px of white on each side, so that the gap
    # between two panels is 4 px and the panels sit under their centred titles.
    from betasmooth.figures import _CELL_PX, _GAP_PX, _compose

    assert (_CELL_PX, _GAP_PX) == (135, 4)
    black = np.zeros((2, 1, 4, 4))  # two rows of one black image in [0, 1]
    canvas, _ = _compose([("x", "image", black), ("x_adv", "image", black)])
    assert canvas.shape == (270, 270, 3)
    dark = (canvas == 0.0).all(axis=-1)
    panel = np.zeros(135, dtype=bool)
    panel[2:133] = True
    expected = np.outer(np.tile(panel, 2), np.tile(panel, 2))
    np.testing.assert_array_equal(dark, expected)
    assert (canvas[~expected] == 1.0).all()


def test_slugs_keep_letters_and_digits_and_drop_dashes_at_their_ends():
    # Ids and file names "<kind>_<slug>": no '_' inside a slug, and none begins or
    # ends with the '-' that stands for a sign.
    from betasmooth.report import _slug

    assert _slug("MyGrad") == "MyGrad"
    assert _slug("(lrp.eps=0.1)") == "lrp-eps-0-1"
    assert _slug("_integrated_gradients_") == "integrated-gradients"


def test_smoothgrad_without_noise_or_a_beta_has_no_matched_beta():
    # sigma 0 is the plain gradient: every p_beta has a spread, pi / (sqrt(3) beta) > 0.
    from betasmooth.report import _matched_beta

    assert _matched_beta({"defense": "smoothgrad", "sigma": 0.0}) is None
    assert _matched_beta({"defense": "smoothgrad", "sigma": -0.1}) is None


def test_a_row_label_with_a_class_name_stays_on_the_image_panel(tmp_path):
    # "#0 381→381 spider monkey" on one line ran into the original map's panel: the
    # class name goes on a second line, and that panel is drawn as without a label.
    from betasmooth.report import _row_labels

    rng = np.random.default_rng(4)
    x, m = rng.random((1, 3, H, H)), _maps(rng, 1)
    batch = AttackBatch(np.array([0]), x, x, m, m, m, np.array([381]), np.array([381]))
    labels = _row_labels(batch, 1, {0: "spider monkey, and more"})
    assert labels == ["#0 381→381\nspider monkey, a"]
    drawn = [
        np.asarray(
            Image.open(
                figures.method_grid(x, m, x, m, m, tmp_path / f"{i}.png", row_labels=rows)
            ).convert("RGB")
        )
        for i, rows in enumerate((None, labels))
    ]
    cell = round(figures.CELL * figures.DPI)
    top = round(figures.TITLE_H * figures.DPI)
    label_box = (slice(top, top + cell), slice(0, cell))
    assert (drawn[0][label_box] != drawn[1][label_box]).any()  # the label is drawn
    rest = (slice(top, top + cell), slice(cell, None))
    np.testing.assert_array_equal(drawn[0][rest], drawn[1][rest])


def test_curvature_run_medians(tmp_path):
    """A run without arrays (as `betasmooth curvature` writes it): one column per network."""
    rng = np.random.default_rng(3)
    config = {"command": "curvature", "seed": 1, "betas": [None, 1.0, 2.0, 10.0]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    records = [
        {"index": i, "method": net, "beta": beta, "true_label": 2, "hessian_norm": float(h)}
        for net, beta in (("relu", None), ("beta=10", 10.0), ("beta=1", 1.0), ("beta=2", 2.0))
        for i, h in enumerate(rng.random(5))
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    page = parse(build_report(tmp_path))
    got = column(page.tables["medians"], "beta=1")
    want = np.median([r["hessian_norm"] for r in records if r["method"] == "beta=1"])
    assert got["hessian_norm"] == want
    assert sorted(got) == ["hessian_norm", "images"]
    # Networks in order of beta, not of their names' characters.
    header = [c[0] for c in page.tables["medians"][0]][1:]
    assert header == ["beta=1", "beta=2", "beta=10", "relu"]
    assert page.images == []
    # The settings name the ReLU network, which config.json stores as a beta of null.
    settings = {row[0][0]: row[1][0] for row in page.tables["settings-table"][1:]}
    assert settings["betas"] == "[relu, 1, 2, 10]"


def test_an_image_of_two_channels_is_drawn_as_their_mean_in_grey():
    from betasmooth.figures import _image

    x = np.stack([np.zeros((2, 3)), np.full((2, 3), 0.8)])  # (C=2, H, W)
    np.testing.assert_allclose(_image(x, 0.0, 1.0), np.full((2, 3, 3), 0.4))


def test_an_image_of_four_channels_is_drawn_as_their_mean_in_grey():
    # RGBA or RGB-D data (an .npz of 4 channels) is no RGB image: grey, as 2 channels are.
    from betasmooth.figures import _image

    x = np.stack([np.full((2, 3), v) for v in (0.0, 0.2, 0.6, 1.0)])  # (C=4, H, W)
    np.testing.assert_allclose(_image(x, 0.0, 1.0), np.full((2, 3, 3), 0.45))


def test_a_row_of_one_constant_value_outside_zero_one_is_drawn_black_not_nan():
    # Levels 0-255 of a blank image, which the attack left as it was: the row's range is
    # one value, and the panels are its bottom (black), not 0 / 0.
    from betasmooth.figures import _compose

    x = np.full((1, 1, 4, 4), 200.0)
    canvas, _ = _compose([("x", "image", x), ("x_adv", "image", x)])
    assert np.isfinite(canvas).all()
    assert set(np.unique(canvas).tolist()) == {0.0, 1.0}  # black panels, white background


def test_images_in_zero_one_keep_their_brightness():
    # A dark photograph stays dark in the grid; values of another range are
    # stretched to fit the panel.
    from betasmooth.figures import _compose

    dark = np.full((1, 3, 4, 4), 0.2)
    dark[0, 0, 0, 0] = 0.3
    levels = np.linspace(0.0, 255.0, 48).reshape(1, 3, 4, 4)
    canvas, _ = _compose([("x", "image", np.concatenate([dark, levels]))])
    cell = canvas.shape[0] // 2
    first, second = canvas[:cell], canvas[cell:]
    # The panel's colours are the pixels: 0.2 and 0.3 (background is 1).
    assert set(np.round(np.unique(first[first < 1.0]), 6)) == {0.2, 0.3}
    # The levels 0 to 255 fill the panel's whole range, from black to white.
    assert second.min() == 0.0 and second[second < 1.0].max() > 0.95


def test_cost_figure_joins_the_labels_of_points_that_coincide():
    # beta 20 and 50 often cost the same and defend alike: one label for both,
    # the others apart. Positions are shares of the plot's spans (log seconds).
    from betasmooth.figures import CLOSE, _joined_labels

    near, apart = CLOSE[1] / 2, 2 * CLOSE[1]
    pts = [
        {"label": "β=1", "seconds": 0.010, "metric": 0.50},
        {"label": "β=20", "seconds": 0.011, "metric": 0.90},
        {"label": "β=50", "seconds": 0.011, "metric": 0.90 + near},
        {"label": "β=100", "seconds": 0.011, "metric": 0.90 + apart},
    ]
    where = np.array([[np.log10(p["seconds"]), p["metric"]] for p in pts])
    joined = _joined_labels(pts, where, np.ones(2))
    assert joined == [
        ("β=1", 0.010, 0.50),
        ("β=20, β=50", 0.011, 0.90),
        ("β=100", 0.011, 0.90 + apart),
    ]


SWEEP_BETAS = [0.5, 1, 2, 5, 10, 20, 50]
LOG_FIGURES = {
    "mc_error": lambda p: figures.mc_error_figure(
        {
            "n": [10, 100, 1000],
            "projected": [0.3, 0.1, 0.03],
            "projected_ci": [0.6, 0.2, 0.06],
            "iid": [0.3, 0.1, 0.04],
            "iid_bias": 0.01,
        },
        p,
    ),
    "iid_bias": lambda p: figures.iid_bias_figure(
        {"d": [1, 10, 100, 1000], "bias": [0.0, 0.01, 0.02, 0.022], "limit": 0.0227}, p
    ),
    "curvature": lambda p: figures.curvature_figure(
        {"beta": [1, 10, 100], "hessian_norm": [0.5, 5, 40], "principal_curvature": [0.1, 1, 9]},
        p,
    ),
    "cost": lambda p: figures.cost_quality(
        [
            {"defense": "beta_smooth", "label": "β=1", "seconds": 0.01, "metric": 0.5},
            {"defense": "smoothgrad", "label": "σ=1", "seconds": 1.0, "metric": 0.6},
        ],
        p,
    ),
    "defense_betas": lambda p: figures.defense_curves(
        SWEEP_BETAS,
        {"adv_vs_orig_pcc": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], "clean_vs_orig_ssim": [0.5] * 7},
        p,
    ),
    "curvature_betas": lambda p: figures.curvature_figure(
        {"beta": SWEEP_BETAS, "hessian_norm": [0.5] * 7, "principal_curvature": [0.1] * 7}, p
    ),
    "short_log_range": lambda p: figures.curvature_figure(
        {
            "beta": [1, 2, 5],
            "hessian_norm": [0.2, 0.3, 0.5],
            "principal_curvature": [0.25, 0.3, 0.4],
        },
        p,
    ),
}


@pytest.mark.parametrize("name", sorted(LOG_FIGURES))
def test_log_axes_are_labelled_with_the_numbers_at_their_ticks(name, tmp_path, monkeypatch):
    # The style leaves mathtext unparsed (user labels may hold "$"), so a log
    # axis must not fall back to matplotlib's "$\mathdefault{10^{-1}}$" labels.
    drawn = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path: (drawn.append(fig), save(fig, path))[1])
    LOG_FIGURES[name](tmp_path / "f.png")
    (fig,) = drawn
    logs = [axis for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) if axis.get_scale() == "log"]
    assert logs
    for axis in logs:
        labelled = 0
        for tick in axis.get_major_ticks() + axis.get_minor_ticks():
            text = tick.label1.get_text()
            lo, hi = sorted(axis.get_view_interval())
            if text and lo <= tick.get_loc() <= hi:
                assert float(text) == pytest.approx(tick.get_loc(), rel=1e-6), text
                labelled += 1
        assert labelled >= 2
        if axis is fig.axes[0].xaxis and name.endswith("_betas"):
            # A sweep's betas are the ticks, and every one of them is labelled.
            shown = [t.label1.get_text() for t in axis.get_major_ticks() if t.label1.get_text()]
            assert shown == [f"{b:g}" for b in SWEEP_BETAS]


def test_a_log_axis_over_decades_labels_only_its_powers_of_ten(tmp_path, monkeypatch):
    # As matplotlib's own log labels over more than a decade: 10, 100, 1000, and none of
    # the minor ticks between them (20, 30, ..., 900 ran into each other).
    drawn = _drawn_figures(monkeypatch)
    LOG_FIGURES["mc_error"](tmp_path / "f.png")
    (fig,) = drawn
    axis = fig.axes[0].xaxis
    lo, hi = sorted(axis.get_view_interval())
    shown = [
        tick.label1.get_text()
        for tick in axis.get_major_ticks() + axis.get_minor_ticks()
        if tick.label1.get_text() and lo <= tick.get_loc() <= hi
    ]
    assert sorted(shown, key=float) == ["10", "100", "1000"]


def _rewrite(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_an_unfinished_run_says_what_it_lacks(tmp_path):
    # A killed run's report dropped a method without a word, beside "images (n) 6".
    run = make_run(tmp_path / "part")
    config = json.loads((run / "config.json").read_text())
    config["sweep"] = {"betas": list(BETAS), "smoothgrad_n": 2}
    (run / "config.json").write_text(json.dumps(config))
    assert "not finished" not in build_report(run).read_text()
    results = read_lines(run / "results.jsonl")
    # lrp stopped after its first 4 images (one batch), gradient's sweep lacks one row of image 2.
    _rewrite(
        run / "results.jsonl", [r for r in results if r["method"] == "gradient" or r["index"] < 4]
    )
    sweep = read_lines(run / "sweep.jsonl")
    dropped = next(
        r for r in sweep if (r["method"], r["index"], r["defense"]) == ("gradient", 2, "smoothgrad")
    )
    # The sweep of lrp saw only the 4 images lrp finished.
    lost = [r for r in sweep if r["method"] == "lrp" and r["index"] >= 4]
    kept = [r for r in sweep if r is not dropped and r not in lost]
    _rewrite(run / "sweep.jsonl", kept)
    text = build_report(run).read_text()
    notice = re.search(r"This run is not finished</strong>: ([^.]*)\.", text).group(1)
    # lrp's sweep holds every image lrp finished: nothing lacks there.
    assert notice == f"lrp 4 of {N} images, sweep of gradient {N - 1} of {N} images"


def test_a_defense_registered_beside_the_two_leaves_a_finished_sweep_finished(
    tmp_path, monkeypatch
):
    # betasmooth sweep records SWEPT_DEFENSES only; counted against DEFENSES, to which the
    # run's model file (imported for the report) may add, every swept image read as lacking.
    from betasmooth.defense import DEFENSES

    run = make_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["sweep"] = {"betas": list(BETAS), "smoothgrad_n": 2}
    (run / "config.json").write_text(json.dumps(config))
    monkeypatch.setitem(DEFENSES, "extra", DEFENSES["smoothgrad"])
    assert "not finished" not in build_report(run).read_text()


@pytest.fixture(scope="module")
def _swept_run(tmp_path_factory):
    """An attack of three digits and its sweep over beta 4 and 0.5, with the sweep's records."""
    from betasmooth.runs import attack_run, load_inputs, sweep_run

    model, x, y = load_inputs("digits-cnn", "digits", n=3)
    run = RunDir.create(
        tmp_path_factory.mktemp("run") / "run",
        {"command": "attack", "n": 3, "methods": ["gradient"]},
    )
    attack_run(run, model, x, y, ["gradient"], steps=3, seed=0)
    sweep_run(run, model, [4.0, 0.5], smoothgrad_n=2)
    return run, run.read("sweep")


def _median_of(rows, defense, beta, key):
    values = [r[key] for r in rows if r["defense"] == defense and r["beta"] == beta]
    assert values
    return float(np.median(values))


def test_the_defense_figure_draws_the_attacks_own_medians_as_undefended(_swept_run, monkeypatch):
    from betasmooth import report

    run, rows = _swept_run
    records = run.read()
    calls = _calls(monkeypatch, "defense_curves")
    report.build_report(run.path)
    ((args, kwargs),) = calls
    drawn, curves = kwargs.get("undefended") or {}, {tuple(args[0]): args[1]}
    for sweep_key, field in (
        ("adv_vs_orig_pcc", "expl_pcc_orig"),
        ("adv_vs_target_pcc", "expl_pcc_target"),
        # Without a defense the clean map against the target is the attack's "before".
        ("clean_vs_target_pcc", "expl_pcc_target_before"),
        ("adv_vs_orig_ssim", "expl_ssim_orig"),
        ("adv_vs_target_ssim", "expl_ssim_target"),
    ):
        assert drawn[sweep_key] == pytest.approx(np.median([r[field] for r in records])), sweep_key
    # The defended clean map against the target, per beta, beside the attacked map's.
    ((betas, drawn_curves),) = curves.items()
    for beta, value in zip(betas, drawn_curves["clean_vs_target_pcc"]):
        assert value == pytest.approx(_median_of(rows, "beta_smooth", beta, "clean_vs_target_pcc"))


def test_the_report_shows_normalised_images_denormalised():
    from types import SimpleNamespace

    from betasmooth.report import _shown

    x = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 24
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    found = _shown(SimpleNamespace(config={"mean": mean, "std": std}), x)
    for c in range(3):
        np.testing.assert_allclose(found[:, c], x[:, c] * std[c] + mean[c], rtol=1e-6)
    # A config of a version that wrote one statistic alone: the other is 0 or 1.
    only_mean = _shown(SimpleNamespace(config={"mean": mean}), x)
    np.testing.assert_allclose(only_mean, x + np.reshape(mean, (1, 3, 1, 1)), rtol=1e-6)
    only_std = _shown(SimpleNamespace(config={"std": std}), x)
    np.testing.assert_allclose(only_std, x * np.reshape(std, (1, 3, 1, 1)), rtol=1e-6)


def test_the_report_names_a_method_that_lacks_one_image(tmp_path):
    from betasmooth.runs import attack_run, load_inputs
    from betasmooth.store import read_jsonl, write_jsonl

    model, x, y = load_inputs("digits-cnn", "digits", n=3)
    run = RunDir.create(tmp_path / "run", {"command": "attack", "n": 3, "methods": ["gradient"]})
    attack_run(run, model, x, y, ["gradient"], steps=1)
    assert "not finished" not in build_report(run.path).read_text()
    write_jsonl(run.results, [r for r in read_jsonl(run.results) if r["index"] != 2])
    text = build_report(run.path).read_text()
    notice = re.search(r"This run is not finished</strong>: ([^.]*)\.", text)
    assert notice is not None and notice.group(1) == "gradient 2 of 3 images"


def test_the_report_names_unfinished_methods_that_its_config_does_not_list(tmp_path):
    from betasmooth.runs import attack_run, load_inputs

    model, x, y = load_inputs("digits-cnn", "digits", n=3)
    run = RunDir.create(tmp_path / "run", {"command": "attack", "n": 3, "methods": ["gradient"]})
    attack_run(run, model, x, y, ["gradient"], steps=1)
    attack_run(run, model, x[:2], y[:2], ["lrp"], steps=1)  # 2 of 3, and not in the config
    for config in ({"methods": ["gradient"]}, {"methods": None}):
        run.update_config(**config)
        text = build_report(run.path).read_text()
        notice = re.search(r"This run is not finished</strong>: ([^.]*)\.", text)
        assert notice is not None and notice.group(1) == "lrp 2 of 3 images", config


def test_the_grid_caption_names_the_files_of_the_rows_shown_only(tmp_path):
    from betasmooth.runs import attack_run, load_inputs
    from betasmooth.store import read_jsonl, write_jsonl

    n = GRID_ROWS + 2
    model, x, y = load_inputs("digits-cnn", "digits", n=n)
    run = RunDir.create(tmp_path / "run", {"command": "attack", "n": n, "methods": ["gradient"]})
    attack_run(run, model, x, y, ["gradient"], steps=1)
    write_jsonl(run.results, [r | {"file": f"p{r['index']}.png"} for r in read_jsonl(run.results)])
    text = build_report(run.path).read_text()
    (files,) = re.findall(r"Files: (.*?)\.[ <]", text)
    assert files == ", ".join(f"#{i} p{i}.png" for i in range(GRID_ROWS))
    assert f"First {GRID_ROWS} of {n} images" in text


def test_the_settings_an_attack_resolved_are_shown_as_settings_not_as_medians(tmp_path):
    from betasmooth.runs import attack_run, load_inputs

    model, x, y = load_inputs("digits-cnn", "digits", n=2)
    run = RunDir.create(tmp_path / "run", {"command": "attack", "n": 2, "methods": ["gradient"]})
    records = attack_run(run, model, x, y, ["gradient"], steps=2)
    resolved = {
        k.removeprefix("attack_"): v
        for k, v in records[0].items()
        if k.startswith("attack_") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    assert resolved  # the attack's lr, steps, ...
    page = parse(build_report(run.path))
    medians = [row[0][0] for row in page.tables["medians"]]
    assert "expl_pcc_orig" in medians
    assert not [name for name in medians if name.startswith("attack_")]
    shown = {row[0][0]: row[1][1] for row in page.tables["attack-settings"][1:]}
    assert {k: float(shown[k]) for k in resolved} == pytest.approx(resolved)


def test_only_the_recommended_beta_smoothing_row_is_starred(_swept_run, tmp_path):
    from betasmooth.recommend import sweep_summary

    swept, records = _swept_run
    run = RunDir(shutil.copytree(swept.path, tmp_path / "run"))
    # A floor of 0: some beta is recommended, and SmoothGrad has rows of the same betas.
    summary = sweep_summary(records, 0.0)
    run.write_sweep_summary(summary)
    best = summary["gradient"]["recommended_beta"]
    assert best in (4.0, 0.5)
    labels = [row[0][0] for row in parse(build_report(run.path)).tables["choice_gradient"]]
    assert any(label.startswith(f"SmoothGrad, matched β={best:g}") for label in labels)
    assert [label for label in labels if "★" in label] == [f"β-smoothing β={best:g} ★"]


def test_the_report_of_a_cut_sweep_uses_the_recorded_min_fidelity(tmp_path, monkeypatch):
    from betasmooth import report
    from betasmooth.runs import attack_run, load_inputs, sweep_run

    model, x, y = load_inputs("digits-cnn", "digits", n=3)
    run = RunDir.create(tmp_path / "run", {"command": "attack", "n": 3, "methods": ["gradient"]})
    attack_run(run, model, x, y, ["gradient"], steps=1)
    sweep_run(run, model, [2.0, 50.0], smoothgrad_n=2, min_fidelity=0.25)
    stored = run.read_sweep_summary()
    run.sweep_summary.unlink()  # as a kill before the summary leaves it
    floors = []
    real = report.sweep_summary
    monkeypatch.setattr(
        report, "sweep_summary", lambda records, floor: floors.append(floor) or real(records, floor)
    )
    report.build_report(run.path)
    assert floors and set(floors) == {0.25}
    assert (
        real(run.read("sweep"), 0.25)["gradient"]["recommended_beta"]
        == stored["gradient"]["recommended_beta"]
    )


def _spy_plots(monkeypatch):
    import matplotlib.axes

    drawn = []
    real = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        lines = real(self, *args, **kwargs)
        drawn.append((self, lines[0]))
        return lines

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    return drawn


def test_defense_curves_draw_each_median_at_its_own_beta_on_its_metrics_panel(
    tmp_path, monkeypatch
):
    drawn = _spy_plots(monkeypatch)
    betas = [4.0, 0.5, 2.0]  # unsorted, as a sweep's settings may come
    curves = {"adv_vs_orig_pcc": [0.9, 0.1, 0.6], "adv_vs_orig_ssim": [0.3, 0.2, 0.25]}
    sg = {"adv_vs_orig_pcc": [0.7, 0.4]}
    figures.defense_curves(
        betas, curves, tmp_path / "d.png", smoothgrad_betas=[1.0, 0.25], smoothgrad=sg
    )
    got = {}
    for ax, line in drawn:
        pairs = dict(zip(line.get_xdata().tolist(), line.get_ydata().tolist()))
        # The panel's title and its y label name the same metric.
        assert ax.get_title(loc="left") == f"{ax.get_ylabel()} of maps"
        got[(ax.get_ylabel(), line.get_linestyle())] = pairs
    assert got[("PCC", "-")] == dict(zip(betas, curves["adv_vs_orig_pcc"]))
    assert got[("SSIM", "-")] == dict(zip(betas, curves["adv_vs_orig_ssim"]))
    assert got[("PCC", ":")] == {1.0: 0.7, 0.25: 0.4}


def test_curves_against_beta_keep_each_value_at_its_beta(tmp_path, monkeypatch):
    drawn = _spy_plots(monkeypatch)
    curve = {
        "beta": [10.0, 1.0, 3.0],
        "hessian_norm": [5.0, 0.5, 2.0],
        "principal_curvature": [1.0, 0.1, 0.3],
    }
    figures.curvature_figure(curve, tmp_path / "c.png")
    assert len(drawn) == 2
    for (_, line), key in zip(drawn, ("hessian_norm", "principal_curvature")):
        pairs = dict(zip(line.get_xdata().tolist(), line.get_ydata().tolist()))
        assert pairs == dict(zip(curve["beta"], curve[key]))


def test_the_report_draws_each_defenses_medians_as_its_own_series(_swept_run, monkeypatch):
    from betasmooth import report

    run, rows = _swept_run
    calls = _calls(monkeypatch, "defense_curves")
    report.build_report(run.path)
    (((betas, curves, _), kwargs),) = calls
    betas = list(betas)
    for defense, bs_, series in (
        ("beta_smooth", betas, curves),
        ("smoothgrad", kwargs["smoothgrad_betas"], kwargs["smoothgrad"]),
    ):
        assert sorted(bs_) == [0.5, 4.0], defense
        for key in ("adv_vs_orig_pcc", "clean_vs_orig_pcc"):
            for beta, value in zip(bs_, series[key]):
                assert value == pytest.approx(_median_of(rows, defense, beta, key)), (defense, key)


def test_a_registered_defense_has_its_own_column_series_and_cost_points(tmp_path, monkeypatch):
    # A defense beside the paper's two (registered in DEFENSES by a model file): its
    # column is headed by its name, its curves are its own series, not SmoothGrad's.
    path = make_run(tmp_path / "run", methods=("gradient",))
    rng = np.random.default_rng(3)
    recs = []
    for i in range(N):
        for beta in BETAS:
            rec = {"index": i, "method": "gradient", "defense": "box_blur", "beta": beta}
            rec |= {"sigma": None, "seconds": float(rng.random())}
            for a in ("adv_vs_orig", "adv_vs_target", "clean_vs_target", "clean_vs_orig"):
                rec |= {f"{a}_pcc": float(rng.random()), f"{a}_ssim": float(rng.random())}
            recs.append(rec)
    with (path / "sweep.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    curves_calls = _calls(monkeypatch, "defense_curves")
    cost_calls = _calls(monkeypatch, "cost_quality")
    build_report(path)
    (((_, _, _), kwargs),) = curves_calls
    assert sorted(kwargs["smoothgrad_betas"]) == list(BETAS)
    assert list(kwargs["others"]) == ["box_blur"]
    betas, curves = kwargs["others"]["box_blur"]
    assert sorted(betas) == list(BETAS)
    table = parse(path / "report.html").tables["defense-table_gradient"]
    for beta, value in zip(betas, curves["adv_vs_orig_pcc"]):
        mine = [r["adv_vs_orig_pcc"] for r in recs if r["beta"] == beta]
        assert value == pytest.approx(np.median(mine))
        got = column(table, f"box_blur β={beta:g}", head_rows=2)
        assert (got["records"], got["adv_vs_orig_pcc"]) == (N, np.median(mine))
    (((points, _), _),) = cost_calls
    assert sorted(p["label"] for p in points if p["defense"] == "box_blur") == sorted(
        f"β={b:g}" for b in BETAS
    )
    assert "other line styles: box_blur (see the legend)" in (path / "report.html").read_text()


def test_the_cost_figure_plots_median_seconds_against_median_attacked_pcc(_swept_run, monkeypatch):
    from betasmooth import report

    run, rows = _swept_run
    drawn = _spy_plots(monkeypatch)
    calls = _calls(monkeypatch, "cost_quality")
    report.build_report(run.path)
    (((points, _), _),) = calls
    points = list(points)
    assert len(points) == 4
    expected = {}
    for p in points:
        beta = 4.0 if "4" in p["label"] else 0.5
        seconds = _median_of(rows, p["defense"], beta, "seconds")
        metric = _median_of(rows, p["defense"], beta, "adv_vs_orig_pcc")
        assert p["seconds"] == pytest.approx(seconds) and p["metric"] == pytest.approx(metric)
        expected[seconds] = metric
    # The cost figure's markers: x the seconds, y the quality.
    cost = [line for ax, line in drawn if "cost" in ax.get_xlabel() or "seconds" in ax.get_xlabel()]
    got = {x: y for line in cost for x, y in zip(line.get_xdata(), line.get_ydata())}
    assert got == pytest.approx(expected)


def test_smoothgrad_rows_without_a_beta_are_drawn_at_the_beta_their_sigma_matches():
    from betasmooth.defense import matched_sigma
    from betasmooth.report import _matched_beta

    for sigma in (0.05, 0.3, 1.2):
        beta = _matched_beta({"defense": "smoothgrad", "sigma": sigma})
        assert matched_sigma(beta) == pytest.approx(sigma, rel=1e-9)
    assert _matched_beta({"defense": "smoothgrad", "sigma": 0.3, "beta": 2.0}) == 2.0


def test_a_metric_that_one_method_lacks_keeps_its_row(tmp_path):
    # Methods of one run may measure different fields (another goal, a newer version):
    # the field's row stays, with a median under the method that has it.
    run = make_run(tmp_path / "run", sweep=False, theory=False)
    records = read_lines(run / "results.jsonl")
    rng = np.random.default_rng(5)
    for r in records:
        if r["method"] == "lrp":
            r["map_entropy"] = float(rng.random())
    _rewrite(run / "results.jsonl", records)
    page = parse(build_report(run))
    lrp = column(page.tables["medians"], "lrp (targeted)")
    gradient = column(page.tables["medians"], "gradient (targeted)")
    want = np.median([r["map_entropy"] for r in records if r["method"] == "lrp"])
    assert lrp["map_entropy"] == want
    assert gradient["map_entropy"] is None


def test_row_labels_read_the_label_before_then_after_the_attack():
    from betasmooth.report import _row_labels

    rng = np.random.default_rng(6)
    x, m = rng.random((2, 1, H, H)), _maps(rng, 2)
    batch = AttackBatch(np.array([4, 9]), x, x, m, m, m, np.array([3, 7]), np.array([5, 7]))
    assert _row_labels(batch, 2) == ["#4 3→5", "#9 7→7"]
    assert _row_labels(batch, 1, {9: "nine"}) == ["#4 3→5"]


def test_the_grid_takes_the_beta_smoothed_maps_of_the_images_it_shows():
    # The sweep may hold more images than the rows shown (or others first): each row
    # gets the maps of its own image, found by index.
    from betasmooth.report import _sweep_maps

    rng = np.random.default_rng(7)
    maps = rng.random((4, 2, H, H))
    swept = SweepBatch(np.array([0, 1, 2, 3]), np.array([0.5, 4.0]), {"beta_smooth": maps})
    got, betas = _sweep_maps(swept, np.array([2, 3]))
    np.testing.assert_array_equal(got, maps[[2, 3]])
    assert betas == [0.5, 4.0]
    got, _ = _sweep_maps(swept, np.array([3, 0]))
    np.testing.assert_array_equal(got, maps[[3, 0]])
    assert _sweep_maps(swept, np.array([3, 4])) is None  # image 4 has no sweep maps


def test_sweep_arrays_without_betas_are_refused_by_name_and_left_out_of_the_report():
    # Arrays that lack betas are not a sweep's: one line naming what is missing (an
    # InputError, which the report's reader leaves out), never a KeyError.
    from betasmooth.validate import InputError

    arrays = {"index": np.arange(2), "maps_beta": np.zeros((2, 1, H, H))}
    with pytest.raises(InputError) as err:
        SweepBatch.from_npz(arrays, "sweep.npz")
    assert str(err.value) == "sweep.npz lacks betas; expected the arrays of a betasmooth SweepBatch"
    with pytest.raises(InputError, match="^arrays lacks index, betas;"):
        SweepBatch.from_npz({"maps_beta": np.zeros((2, 1, H, H))})


def test_the_cost_figure_labels_every_setting_by_its_beta(_swept_run, monkeypatch):
    from betasmooth import report

    run, _ = _swept_run
    seen = []
    real = figures.cost_quality
    monkeypatch.setattr(
        figures,
        "cost_quality",
        lambda points, path, **kw: seen.append(points) or real(points, path, **kw),
    )
    report.build_report(run.path)
    ((points),) = seen
    by_defense = {}
    for p in points:
        by_defense.setdefault(p["defense"], []).append(p["label"])
    assert {d: sorted(v) for d, v in by_defense.items()} == {
        "beta_smooth": ["β=0.5", "β=4"],
        "smoothgrad": ["β=0.5", "β=4"],
    }


def test_a_method_without_beta_smoothing_rows_gets_no_cost_figure(tmp_path):
    run = make_run(tmp_path / "run", theory=False)
    sweep = read_lines(run / "sweep.jsonl")
    kept = [r for r in sweep if not (r["method"] == "lrp" and r["defense"] == "beta_smooth")]
    _rewrite(run / "sweep.jsonl", kept)
    alts = [img["alt"] for img in parse(build_report(run)).images]
    assert "gradient quality against time" in alts
    # lrp's SmoothGrad rows still draw its curves; the cost figure compares the two.
    assert [a for a in alts if a.startswith("lrp")] == [
        "lrp grid",
        "lrp: similarity of the defended maps against β, PCC and SSIM",
    ]


def test_theory_tables_show_their_columns_in_the_documented_order(full_run):
    run, _, _ = full_run
    page = parse(run / "report.html")
    head = [c[0] for c in page.tables["theory_smoothing-vs-smoothgrad-pcc"][0]]
    assert head == ["β", "logistic noise", "Gaussian noise"]


def test_the_theorem_setup_names_its_settings_in_words(tmp_path):
    run = RunDir.create(tmp_path / "run", {"command": "theorem", "model": "digits-cnn"})
    setup = {"d": 10, "beta": 2.0, "n": 1000, "level": 0.95}
    run.write_theory({"theorem2_setup": setup, "theorem2_iid_bias": 0.012})
    text = build_report(run.path).read_text()
    page = parse(run.path / "report.html")
    got = column(page.tables["theory_theorem2-setup"], "value")
    assert got == {
        "input dimension d": 10.0,
        "β": 2.0,
        "Monte Carlo samples per point": 1000.0,
        "confidence level of the bound": 0.95,
    }
    assert "not this run&#x27;s model" not in text  # the theory's own model


def test_the_theory_of_a_run_of_another_model_says_whose_model_it_checks(tmp_path):
    run = RunDir.create(tmp_path / "run", {"command": "demo", "model": "resnet18"})
    run.write_theory({"theorem2_iid_bias": 0.012})
    text = build_report(run.path).read_text()
    assert "not this run&#x27;s model (resnet18)" in text


def test_every_link_of_the_page_leads_to_a_part_of_it(tmp_path):
    # An explain run has no attack results and no grids of attacks: no links to them.
    rng = np.random.default_rng(8)
    run = RunDir.create(tmp_path, {"command": "explain", "seed": 0})
    run.save_arrays(
        "gradient", 0, ExplainBatch(np.arange(2), rng.random((2, 1, H, H)), _maps(rng, 2))
    )
    run.append([{"index": i, "method": "gradient", "label": 1, "seconds": 0.1} for i in range(2)])
    page = parse(build_report(tmp_path))
    targets = [link[1:] for link in page.links if link.startswith("#")]
    assert "explain" in targets and "results" not in targets and "methods" not in targets
    assert set(targets) <= set(page.ids)


def test_the_grid_names_the_median_of_the_measure_its_goal_optimised(tmp_path):
    from betasmooth.attack import GOALS

    run = make_run(tmp_path / "run", sweep=False, theory=False)
    records = [r for r in read_lines(run / "results.jsonl") if r["method"] == "gradient"]
    text = build_report(run).read_text()
    said = re.findall(r"<p>Medians over (\d+) images: (.*?)\.</p>", text)[0]
    assert said[0] == str(N)
    shown = dict(part.rsplit(" ", 1) for part in said[1].split("; "))
    measure = GOALS["targeted"].measure
    assert list(shown) == ["label_kept", measure, "expl_pcc_orig"]
    for key in (measure, "expl_pcc_orig"):
        assert float(shown[key]) == pytest.approx(np.median([r[key] for r in records]), rel=5e-4)


def test_yes_and_no_stand_for_true_and_false(tmp_path):
    run = RunDir.create(tmp_path / "run", {"command": "theorem", "quick": True})
    run.write_theory({"theorem2_projected_within_ci": True, "theorem2_iid_bias": 0.012})
    page = parse(build_report(run.path))
    within = THEORY_TERMS["theorem2_projected_within_ci"][0]
    numbers = {row[0][0]: row[1][0] for row in page.tables["theory-numbers"][1:]}
    assert numbers[within] == "yes"
    settings = {row[0][0]: row[1][0] for row in page.tables["settings-table"][1:]}
    assert settings["quick"] == "yes"


def test_a_colour_image_is_drawn_with_its_rows_and_columns_as_they_are():
    from betasmooth.figures import _image

    x = np.random.default_rng(9).random((3, 2, 5))  # (C, H, W), not square
    np.testing.assert_allclose(_image(x, 0.0, 1.0), x.transpose(1, 2, 0))


def test_an_image_is_scaled_from_the_bottom_to_the_top_of_its_range():
    from betasmooth.figures import _image

    x = np.array([[[2.0, 3.0, 4.0]]])  # (C=1, H=1, W=3), range [2, 4]
    np.testing.assert_allclose(_image(x, 2.0, 4.0)[0, :, 0], [0.0, 0.5, 1.0])


def test_a_beta_smoothing_row_without_a_beta_has_no_matched_beta():
    from betasmooth.report import _matched_beta

    # Only SmoothGrad's sigma stands for a beta.
    assert _matched_beta({"defense": "beta_smooth", "sigma": 0.3}) is None
    assert _matched_beta({"defense": "beta_smooth", "beta": 3.0}) == 3.0


def test_de_normalised_pixels_a_rounding_error_outside_zero_one_keep_their_brightness():
    # x * std + mean lands a hair below 0 or above 1: that is still a [0, 1] image.
    from betasmooth.figures import _display_range

    assert _display_range(np.array([-1e-4, 0.2, 1.0 + 1e-4])) == (0.0, 1.0)
    assert _display_range(np.array([-0.1, 0.5])) == (-0.1, 0.5)


def test_each_beta_column_of_the_grid_draws_the_maps_of_its_beta(tmp_path, monkeypatch):
    rng = np.random.default_rng(10)
    x, m = rng.random((2, 1, H, H)), _maps(rng, 2)
    maps_beta = _maps(rng, 2, 3)
    composed, bars = [], []
    compose, bar = figures._compose, figures._colour_bar
    monkeypatch.setattr(figures, "_compose", lambda cols: composed.append(cols) or compose(cols))
    monkeypatch.setattr(
        figures,
        "_colour_bar",
        lambda fig, at, size, top: bars.append(top) or bar(fig, at, size, top),
    )
    figures.method_grid(x, m, x, m, m, tmp_path / "g.png", maps_beta=maps_beta, betas=[0.5, 1, 4])
    (columns,) = composed
    assert [c[0] for c in columns[5:]] == ["attacked, β=0.5", "attacked, β=1", "attacked, β=4"]
    for k in range(3):
        np.testing.assert_array_equal(columns[5 + k][2], maps_beta[:, k])
    # The colour bar counts in multiples of 1 / (H W): the row's 99.5th percentile times H W.
    for r in range(2):
        row = np.concatenate([np.ravel(m[r])] * 3 + [np.ravel(maps_beta[r])])
        assert bars[r] == pytest.approx(np.percentile(row, 99.5) * H * H)


def test_the_defense_grid_draws_each_beta_of_the_defense_beside_the_undefended_maps(
    tmp_path, monkeypatch
):
    rng = np.random.default_rng(12)
    orig, adv, target = _maps(rng, 2), _maps(rng, 2), _maps(rng, 2)
    maps = _maps(rng, 2, 3)
    composed = []
    compose = figures._compose
    monkeypatch.setattr(figures, "_compose", lambda cols: composed.append(cols) or compose(cols))
    path = figures.defense_grid(
        orig, adv, target, maps, [0.5, 1, 4], tmp_path / "g.png", label="SG"
    )
    with Image.open(path) as im:
        assert im.size == figures.grid_size(2, 6)
    path = figures.defense_grid(orig, adv, None, maps, [0.5, 1, 4], tmp_path / "u.png", label="SG")
    with Image.open(path) as im:
        assert im.size == figures.grid_size(2, 5)  # untargeted: no target column
    targeted, untargeted = composed
    titles = ["original map", "attacked map", "target map", "SG, β=0.5", "SG, β=1", "SG, β=4"]
    assert [c[0] for c in targeted] == titles
    assert [c[0] for c in untargeted] == titles[:2] + titles[3:]
    for got, want in zip(
        [c[2] for c in targeted], [orig, adv, target, *maps.transpose(1, 0, 2, 3)], strict=True
    ):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"^maps must be \(B, len\(betas\), H, W\) = \(B, 2,"):
        figures.defense_grid(orig, adv, None, maps, [0.5, 1], tmp_path / "x.png", label="SG")


def test_the_report_draws_smoothgrads_stored_maps_of_the_images_it_shows(_swept_run, monkeypatch):
    # Beta-smoothing's maps sit in the method's grid; SmoothGrad's, which the sweep
    # stores too, get a grid of their own, row by row the same images.
    from betasmooth import report

    run, _ = _swept_run
    calls = _calls(monkeypatch, "defense_grid")
    html = report.build_report(run.path).read_text()
    ((args, kwargs),) = calls
    attacked = run.read_arrays("gradient")
    swept = run.read_arrays("gradient", "sweep")
    shown = min(GRID_ROWS, 3)
    np.testing.assert_array_equal(args[0], attacked["map_orig"][:shown])
    np.testing.assert_array_equal(args[1], attacked["map_adv"][:shown])
    np.testing.assert_array_equal(args[2], attacked["map_target"][:shown])
    np.testing.assert_array_equal(args[3], swept["maps_smoothgrad"][:shown])
    assert args[4] == [float(b) for b in swept["betas"]] and sorted(args[4]) == [0.5, 4.0]
    assert args[5].name == "grid_gradient_smoothgrad.png"
    assert kwargs["label"] == "SmoothGrad"
    assert kwargs["row_labels"][0].startswith("#0 ")
    assert 'alt="gradient smoothgrad grid"' in html and "noise matched to β" in html


def _calls(monkeypatch, name):
    """The calls of ``figures.<name>``, which still draws: ``(args, kwargs)`` each."""
    calls = []
    real = getattr(figures, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(figures, name, spy)
    return calls


def _drawn_figures(monkeypatch):
    drawn = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path: (drawn.append(fig), save(fig, path))[1])
    return drawn


def test_the_defense_legend_names_every_comparison_and_defense_inside_the_figure(
    tmp_path, monkeypatch
):
    # Seven entries in one row ran off both sides of the figure once a fourth
    # comparison joined: colours and line styles now take a row each.
    drawn = _drawn_figures(monkeypatch)
    stems = ("adv_vs_orig", "adv_vs_target", "clean_vs_target", "clean_vs_orig")
    curves = {f"{stem}_{m}": [0.2, 0.6] for stem in stems for m in ("pcc", "ssim")}
    figures.defense_curves(
        [1.0, 10.0],
        curves,
        tmp_path / "d.png",
        smoothgrad_betas=[1.0, 10.0],
        smoothgrad=curves,
        undefended={"adv_vs_orig_pcc": 0.4},
    )
    (fig,) = drawn
    texts = [[t.get_text() for t in legend.get_texts()] for legend in fig.legends]
    assert texts == [
        ["attacked vs original", "attacked vs target", "clean vs target", "clean vs original"],
        ["β-smoothing", "SmoothGrad", "no defense (ReLU)"],
    ]
    fig.canvas.draw()
    frame = fig.bbox
    for legend in fig.legends:
        box = legend.get_window_extent()
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0, box


def test_other_defenses_are_drawn_each_in_its_own_style_and_named_in_the_legend(
    tmp_path, monkeypatch
):
    drawn = _drawn_figures(monkeypatch)
    others = {
        "median_filter": ([1.0, 100.0], {"adv_vs_orig_pcc": [0.3, 0.5]}),
        "box_blur": ([50.0, 2.0], {"adv_vs_orig_pcc": [0.7, 0.1]}),
    }
    curves = {"adv_vs_orig_pcc": [0.2, 0.6]}
    figures.defense_curves([1.0, 2.0], curves, tmp_path / "d.png", others=others)
    (fig,) = drawn
    texts = [[t.get_text() for t in legend.get_texts()] for legend in fig.legends]
    assert texts == [["attacked vs original"], ["β-smoothing", "median_filter", "box_blur"]]
    pcc = fig.axes[0]
    # Each defense's points in increasing beta, in the style after the paper's two.
    drawn_lines = {
        (tuple(line.get_xdata()), tuple(line.get_ydata())): (line.get_marker(), line.get_ls())
        for line in pcc.get_lines()
    }
    assert drawn_lines[((1.0, 100.0), (0.3, 0.5))] == ("^", "-.")
    assert drawn_lines[((2.0, 50.0), (0.1, 0.7))] == ("D", "--")
    assert drawn_lines[((1.0, 2.0), (0.2, 0.6))] == ("o", "-")
    assert pcc.get_xscale() == "log"  # the other defenses' betas span two decades
    # Colours C4 on (C0 to C3 tell the paper's defenses and the comparisons); markers and
    # line styles in turn, round again after four.
    five = ["a", "b", "c", "d", "e"]
    assert [figures.defense_style(d, five) for d in ("a", "b", "e")] == [
        ("a", "C4", "^", "-."), ("b", "C5", "D", "--"), ("e", "C8", "^", "-."),
    ]  # fmt: skip


def test_the_cost_figure_draws_another_defense_s_points(tmp_path, monkeypatch):
    drawn = _spy_plots(monkeypatch)
    points = [
        {"defense": "beta_smooth", "label": "β=1", "seconds": 0.01, "metric": 0.8},
        {"defense": "box_blur", "label": "β=1", "seconds": 0.02, "metric": 0.6},
        {"defense": "box_blur", "label": "β=5", "seconds": 0.03, "metric": 0.4},
    ]
    figures.cost_quality(points, tmp_path / "cost.png")
    lines = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for _, line in drawn
    }
    assert lines == {"β-smoothing": ([0.01], [0.8]), "box_blur": ([0.02, 0.03], [0.6, 0.4])}


def test_betas_that_span_exactly_a_decade_get_a_log_axis(tmp_path, monkeypatch):
    drawn = _drawn_figures(monkeypatch)
    figures.defense_curves([1.0, 10.0], {"adv_vs_orig_pcc": [0.2, 0.8]}, tmp_path / "d.png")
    figures.curvature_figure({"beta": [1.0, 10.0], "hessian_norm": [0.5, 5.0]}, tmp_path / "c.png")
    figures.curvature_figure({"beta": [1.0, 9.0], "hessian_norm": [0.5, 5.0]}, tmp_path / "e.png")
    scales = [fig.axes[0].get_xscale() for fig in drawn]
    assert scales == ["log", "log", "linear"]


def test_defense_panels_show_negative_correlations(tmp_path, monkeypatch):
    drawn = _drawn_figures(monkeypatch)
    curves = {"adv_vs_orig_pcc": [-0.6, 0.8], "adv_vs_orig_ssim": [0.2, 0.3]}
    figures.defense_curves([1.0, 2.0], curves, tmp_path / "d.png")
    (fig,) = drawn
    pcc, ssim = fig.axes[:2]
    low, high = pcc.get_ylim()
    assert low <= -0.6 and high == 1.02
    assert ssim.get_ylim() == (-0.05, 1.02)


def _cost_points(seconds: list[float], metric: list[float]) -> list[dict[str, object]]:
    labels = [("beta_smooth", "β=1"), ("beta_smooth", "β=2"), ("smoothgrad", "σ=1")]
    return [
        {"defense": d, "label": label, "seconds": t, "metric": m}
        for (d, label), t, m in zip(labels, seconds, metric)
    ]


@pytest.mark.parametrize(
    ("seconds", "metric", "scale"),
    [
        # Seconds 0.01 and 0.02 lie 0.3 of 2 decades apart (15 % of the x span): two
        # labels, though in plain seconds they are 1 % of the span apart.
        ([0.01, 0.02, 1.0], [0.5, 0.5, 0.6], "log"),
        # 0.1 apart in PCC is a quarter of the PCC span: two labels, though the seconds
        # span 4 (a quarter of the PCC span is under a fortieth of that).
        ([1.0, 1.0, 5.0], [0.5, 0.6, 0.9], "linear"),
        # Seconds spanning exactly a decade are drawn on a log axis.
        ([0.1, 0.2, 1.0], [0.5, 0.5, 0.6], "log"),
    ],
)
def test_cost_labels_are_joined_by_their_distance_on_each_axis_s_own_span(
    tmp_path, monkeypatch, seconds, metric, scale
):
    drawn = _drawn_figures(monkeypatch)
    figures.cost_quality(_cost_points(seconds, metric), tmp_path / "c.png")
    (fig,) = drawn
    assert fig.axes[0].get_xscale() == scale
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["β=1", "β=2", "σ=1"]


def test_cost_labels_are_joined_where_every_point_has_the_same_quality(tmp_path, monkeypatch):
    # An attack that changed no image leaves every setting at PCC 1: the quality axis has
    # no span, and beta 20 and 50, at a hundredth of the seconds' log span apart, still
    # share one label (0 / 0 made their distance NaN, and the labels overlapped).
    drawn = _drawn_figures(monkeypatch)
    points = [
        {"defense": "beta_smooth", "label": "β=20", "seconds": 0.0100, "metric": 1.0},
        {"defense": "beta_smooth", "label": "β=50", "seconds": 0.0101, "metric": 1.0},
        {"defense": "smoothgrad", "label": "σ=1", "seconds": 1.0, "metric": 1.0},
    ]
    figures.cost_quality(points, tmp_path / "c.png")
    (fig,) = drawn
    texts = {t.get_text(): t.xy for t in fig.axes[0].texts}
    assert texts == {"β=20, β=50": (0.01, 1.0), "σ=1": (1.0, 1.0)}


def test_cost_labels_of_beta_smoothing_sit_left_of_their_points_and_smoothgrad_s_right(
    tmp_path, monkeypatch
):
    # Equal betas of the two defenses often land close together: their labels go to
    # opposite sides of the points, so that they do not print over each other.
    drawn = _drawn_figures(monkeypatch)
    figures.cost_quality(_cost_points([1.0, 5.0, 1.0], [0.5, 0.9, 0.5]), tmp_path / "c.png")
    (fig,) = drawn
    sides = {t.get_text(): (t.get_ha(), np.sign(t.xyann[0])) for t in fig.axes[0].texts}
    assert sides == {"β=1": ("right", -1), "β=2": ("right", -1), "σ=1": ("left", 1)}


def test_cost_labels_of_a_defense_are_joined_by_that_defense_s_own_points(tmp_path, monkeypatch):
    # SmoothGrad first: beta 1 coincides with it, beta 2 lies far off; the betas keep
    # a label each, though beta 2 sits where beta 1 would in the list of all points.
    drawn = _drawn_figures(monkeypatch)
    points = [
        {"defense": "smoothgrad", "label": "σ=1", "seconds": 1.0, "metric": 0.5},
        {"defense": "beta_smooth", "label": "β=1", "seconds": 1.0, "metric": 0.5},
        {"defense": "beta_smooth", "label": "β=2", "seconds": 5.0, "metric": 0.9},
    ]
    figures.cost_quality(points, tmp_path / "c.png")
    (fig,) = drawn
    texts = {t.get_text(): t.xy for t in fig.axes[0].texts}
    assert texts == {"σ=1": (1.0, 0.5), "β=1": (1.0, 0.5), "β=2": (5.0, 0.9)}


def test_cost_labels_join_within_a_tenth_across_and_a_twentieth_up():
    from betasmooth.figures import CLOSE, _joined_labels

    assert CLOSE == (0.1, 0.06)
    pts = [{"label": n, "seconds": 1.0, "metric": 0.5} for n in ("a", "b")]
    across = _joined_labels(pts, np.array([[0.0, 0.5], [0.08, 0.5]]), np.ones(2))
    assert [t for t, _, _ in across] == ["a, b"]
    up = _joined_labels(pts, np.array([[0.0, 0.5], [0.0, 0.58]]), np.ones(2))
    assert [t for t, _, _ in up] == ["a", "b"]


@pytest.mark.parametrize(
    ("projected", "iid", "floored"),
    [
        # The zero is the projected curve's; the floor, a decade below 0.02.
        ([0.1, 0.02, 0.0], [0.3, 0.1, 0.05], ([0.1, 0.02, 0.002], [0.3, 0.1, 0.05])),
        # The smallest error (0.005) is the iid curve's: the floor is 0.0005 for both.
        ([0.1, 0.02, 0.01], [0.3, 0.005, 0.0], ([0.1, 0.02, 0.01], [0.3, 0.005, 0.0005])),
    ],
)
def test_a_zero_monte_carlo_error_is_drawn_a_decade_below_the_smallest_of_either_curve(
    tmp_path, monkeypatch, projected, iid, floored
):
    drawn = _spy_plots(monkeypatch)
    curve = {"n": [10, 100, 1000], "projected": projected, "iid": iid}
    figures.mc_error_figure(curve, tmp_path / "mc.png")
    got = tuple(line.get_ydata().tolist() for _, line in drawn)
    assert got[0] == pytest.approx(floored[0]) and got[1] == pytest.approx(floored[1])


@pytest.mark.parametrize(("bias", "named"), [(0.01, ["iid bias 0.01"]), (0.0, [])])
def test_the_iid_bias_line_is_drawn_only_for_a_positive_bias(tmp_path, monkeypatch, bias, named):
    # A bias of 0 has no place on the log axis: no line, and no legend entry for one.
    drawn = _drawn_figures(monkeypatch)
    curve = {"n": [10, 100], "projected": [0.1, 0.03], "iid": [0.1, 0.04], "iid_bias": bias}
    figures.mc_error_figure(curve, tmp_path / "mc.png")
    (fig,) = drawn
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert [t for t in texts if t.startswith("iid bias")] == named


def test_a_confidence_interval_given_as_pairs_is_drawn_from_its_low_end(tmp_path, monkeypatch):
    import matplotlib.axes

    bands = []
    real = matplotlib.axes.Axes.fill_between

    def spy(self, x, low, high, **kwargs):
        bands.append((np.asarray(low).tolist(), np.asarray(high).tolist()))
        return real(self, x, low, high, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", spy)
    ci = [[0.05, 0.2], [0.01, 0.06], [0.0005, 0.02]]
    curve = {"n": [10, 100, 1000], "projected": [0.1, 0.03, 0.01], "iid": [0.1, 0.04, 0.02]}
    figures.mc_error_figure(curve | {"projected_ci": ci}, tmp_path / "mc.png")
    # The low ends, each at least the floor a decade below the smallest error (0.001).
    assert bands == [(pytest.approx([0.05, 0.01, 0.001]), pytest.approx([0.2, 0.06, 0.02]))]


def test_curvature_gets_a_log_y_axis_only_where_every_value_is_positive(tmp_path, monkeypatch):
    drawn = _drawn_figures(monkeypatch)
    for k, values in enumerate(([0.5, 5.0, 40.0], [0.0, 5.0, 40.0])):
        curve = {"beta": [1, 10, 100], "hessian_norm": values, "principal_curvature": [1, 2, 3]}
        figures.curvature_figure(curve, tmp_path / f"{k}.png")
    assert [fig.axes[0].get_yscale() for fig in drawn] == ["log", "linear"]


def test_the_run_table_counts_the_images_asked_for_and_the_lines_written(tmp_path):
    # A cut run: its -n, not the images finished so far (the notice names those).
    run = make_run(tmp_path / "run", sweep=False, theory=False)
    results = read_lines(run / "results.jsonl")
    _rewrite(run / "results.jsonl", [r for r in results if r["index"] < 2])
    what = {row[0][0]: row[1][0] for row in parse(build_report(run)).tables["run-table"][1:]}
    assert what["images (n)"] == str(N)
    assert what["results lines"] == str(2 * len(METHODS))


def test_integers_are_shown_whole(tmp_path):
    seed = 2**40 + 1
    run = RunDir.create(tmp_path, {"command": "explain", "seed": seed, "n": 12345})
    run.append([{"index": 0, "method": "gradient", "label": 1, "seconds": 0.1}])
    what = {row[0][0]: row[1][0] for row in parse(build_report(tmp_path)).tables["run-table"][1:]}
    assert what["seed"] == str(seed) and what["images (n)"] == "12345"


def test_the_run_table_leaves_out_what_the_config_does_not_say(tmp_path):
    # No rows of "–" for a model, data, methods or goal that the run never named.
    run = RunDir.create(tmp_path, {"command": "explain", "seed": 3})
    run.append([{"index": i, "method": "gradient", "label": 1, "seconds": 0.1} for i in range(2)])
    rows = parse(build_report(tmp_path)).tables["run-table"][1:]
    assert [row[0][0] for row in rows] == ["command", "images (n)", "results lines", "seed", "date"]
    what = {row[0][0]: row[1][0] for row in rows}
    assert (what["images (n)"], what["results lines"], what["seed"]) == ("2", "2", "3")


def test_a_median_that_no_record_of_a_method_holds_reads_as_a_dash(tmp_path):
    run = RunDir.create(tmp_path, {"command": "attack", "n": 2, "methods": ["gradient", "lrp"]})
    records = [
        {"index": i, "method": m, "goal": "targeted", "label": 1, "expl_pcc_orig": 0.25 * (i + 1)}
        | ({"map_entropy": 0.5 + i} if m == "lrp" else {})
        for m in ("gradient", "lrp")
        for i in range(2)
    ]
    run.append(records)
    text = build_report(tmp_path).read_text()
    assert "<h2 id='results'>Attack results: medians over images</h2>" in text
    table = parse(tmp_path / "report.html").tables["medians"]
    header = ["median over images", "gradient (targeted)", "lrp (targeted)"]
    assert [c[0] for c in table[0]] == header
    rows = {row[0][0]: [c[0] for c in row[1:]] for row in table[1:]}
    assert rows["expl_pcc_orig"] == ["0.375", "0.375"]
    assert rows["map_entropy"] == ["–", "1"]


def test_results_without_explanation_metrics_are_titled_results_not_attack_results(tmp_path):
    run = RunDir.create(tmp_path, {"command": "curvature", "n": 2})
    run.append([{"index": i, "method": "gradient", "hessian_norm": 1.0 + i} for i in range(2)])
    text = build_report(tmp_path).read_text()
    assert "<h2 id='results'>Results: medians over images</h2>" in text
    medians = column(parse(tmp_path / "report.html").tables["medians"], "gradient")
    assert medians["hessian_norm"] == 1.5


def test_the_beta_choice_table_shows_the_medians_of_the_sweep(_swept_run, tmp_path):
    swept, records = _swept_run
    run = RunDir(shutil.copytree(swept.path, tmp_path / "run"))
    # Cut before beta 4 smoothed image 0 and the summary was written: cells of other sizes.
    cut = ("beta_smooth", 4.0, 0)
    records = [r for r in records if (r["defense"], r["beta"], r["index"]) != cut]
    _rewrite(run.merged("sweep"), records)
    run.sweep_summary.unlink()
    table = parse(build_report(run.path)).tables["choice_gradient"]
    assert [c[0] for c in table[0]][1:] == [
        "images",
        "robustness PCC",
        "robustness SSIM",
        "fidelity PCC",
        "fidelity SSIM",
        "gain left",
    ]
    rows = {
        row[0][0].removesuffix(" ★"): [None if v is None else float(v) for _, v in row[1:]]
        for row in table[1:]
    }
    keys = ("adv_vs_clean_pcc", "adv_vs_clean_ssim", "clean_vs_orig_pcc", "clean_vs_orig_ssim")
    # The attack's gain in median PCC to the target, from the undefended maps of each image.
    whole = [r for r in records if r["defense"] == "beta_smooth" and r["beta"] == 0.5]
    gain = np.median([r["undefended_target_pcc"] for r in whole]) - np.median(
        [r["undefended_before_pcc"] for r in whole]
    )
    for defense, name in (("beta_smooth", "β-smoothing"), ("smoothgrad", "SmoothGrad, matched")):
        for beta in (4.0, 0.5):
            mine = [r for r in records if r["defense"] == defense and r["beta"] == beta]
            want = [len(mine)] + [np.median([r[k] for r in mine]) for k in keys]
            left = np.median([r["adv_vs_target_pcc"] for r in mine]) - np.median(
                [r["clean_vs_target_pcc"] for r in mine]
            )
            want.append(left / gain)
            assert rows[f"{name} β={beta:g}"] == pytest.approx(want), (name, beta)
    # Undefended: the attacked map against the original, both plain; fidelity 1 by definition.
    want = [len(whole), np.median([r["undefended_pcc"] for r in whole])]
    want += [np.median([r["undefended_ssim"] for r in whole]), 1.0, 1.0, None]
    assert rows["undefended"] == pytest.approx(want)


def test_a_summary_written_before_robustness_over_the_changed_images_is_made_again(
    _swept_run, tmp_path
):
    # Up to 0.12.0 the stored summary took robustness over every image. The report says
    # its medians are over the images the attack changed, so it computes such a summary
    # again from the records, where image 0 is one the attack left unchanged.
    from betasmooth.recommend import sweep_summary

    swept, records = _swept_run
    run = RunDir(shutil.copytree(swept.path, tmp_path / "run"))
    records = [{**r, "attacked": r["index"] != 0} for r in records]
    _rewrite(run.merged("sweep"), records)
    old = sweep_summary([{**r, "attacked": True} for r in records])
    for summary in old.values():
        del summary["robustness_over"]
    run.write_sweep_summary(old)
    table = parse(build_report(run.path)).tables["choice_gradient"]
    rows = {row[0][0].removesuffix(" ★"): row[1:] for row in table[1:]}
    changed = [r for r in records if r["index"] != 0]
    plain = [
        r["undefended_pcc"] for r in changed if (r["defense"], r["beta"]) == ("beta_smooth", 4.0)
    ]
    assert float(rows["undefended"][1][1]) == pytest.approx(np.median(plain))
    assert float(rows["β-smoothing β=4"][1][1]) == pytest.approx(
        _median_of(changed, "beta_smooth", 4.0, "adv_vs_clean_pcc")
    )
    assert float(rows["β-smoothing β=4"][3][1]) == pytest.approx(
        _median_of(records, "beta_smooth", 4.0, "clean_vs_orig_pcc")
    )
    # The summary of this version is read as it is.
    mine = sweep_summary(records)
    mine["gradient"]["undefended"]["robustness_pcc"] = 0.123
    run.write_sweep_summary(mine)
    table = parse(build_report(run.path)).tables["choice_gradient"]
    assert float(table[1][2][1]) == pytest.approx(0.123)


def test_each_row_of_a_grid_is_drawn_on_its_own_colour_scale():
    # Row 1 holds row 0's maps times 10: on a scale of its own it looks the same.
    from betasmooth.figures import _compose

    rng = np.random.default_rng(3)
    m = _maps(rng, 1)
    stack = np.concatenate([m, 10 * m])
    canvas, vmax = _compose([("map", "map", stack)])
    assert vmax == pytest.approx([np.percentile(m, 99.5), np.percentile(10 * m, 99.5)])
    cell = round(figures.CELL * figures.DPI)
    np.testing.assert_allclose(canvas[:cell], canvas[cell : 2 * cell], atol=1e-12)
    assert canvas[:cell].std() > 0.1


def _undefended_figure(tmp_path, monkeypatch, first, second):
    """The defense curves of two comparisons, 0.5 to 0.8 and 0.4 to 0.6 over betas 1 and
    2, undefended at 0.3 and 0.7: the figure drawn."""
    drawn = _drawn_figures(monkeypatch)
    curves = {first: [0.5, 0.8], second: [0.4, 0.6]}
    undefended = {first: 0.3, second: 0.7}
    figures.defense_curves([1.0, 2.0], curves, tmp_path / "d.png", undefended=undefended)
    (fig,) = drawn
    return fig


def test_the_undefended_lines_of_each_panel_are_at_that_panel_s_medians(tmp_path, monkeypatch):
    fig = _undefended_figure(tmp_path, monkeypatch, "adv_vs_orig_pcc", "adv_vs_orig_ssim")
    flat = [
        [float(line.get_ydata()[0]) for line in ax.lines if line.get_alpha() == 0.5]
        for ax in fig.axes[:2]
    ]
    assert flat == [[0.3], [0.7]]


def test_the_iid_bias_is_drawn_against_its_dimension_and_named_in_the_legend(tmp_path, monkeypatch):
    drawn = _spy_plots(monkeypatch)
    figures.iid_bias_figure({"d": [1, 4, 64], "bias": [0.0, 0.015, 0.022]}, tmp_path / "b.png")
    ((_, line),) = drawn
    assert line.get_xdata().tolist() == [1, 4, 64]
    assert line.get_ydata().tolist() == [0.0, 0.015, 0.022]
    figs = _drawn_figures(monkeypatch)
    curve = {"n": [10, 100], "projected": [0.1, 0.03], "iid": [0.1, 0.04], "iid_bias": 0.01234}
    figures.mc_error_figure(curve, tmp_path / "mc.png")
    (fig,) = figs
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "iid bias 0.0123" in labels


def test_each_colour_bar_runs_from_zero_to_its_row_s_top(tmp_path, monkeypatch):
    drawn = _drawn_figures(monkeypatch)
    rng = np.random.default_rng(11)
    x, m = rng.random((2, 1, H, H)), _maps(rng, 2)
    figures.explain_grid(x, {"gradient": m}, tmp_path / "e.png")
    (fig,) = drawn
    bars = fig.axes[1:]
    assert len(bars) == 2
    for r, cax in enumerate(bars):
        assert cax.get_ylim() == pytest.approx((0.0, np.percentile(m[r], 99.5) * H * H))


def test_the_density_figure_draws_each_density_as_given(tmp_path, monkeypatch):
    drawn = _spy_plots(monkeypatch)
    x = np.linspace(-3, 3, 7)
    logistic, normal = np.exp(-np.abs(x)), np.exp(-(x**2))
    curve = {"x": x, "logistic": logistic, "normal": normal, "beta": 2.0}
    figures.density_figure(curve, tmp_path / "d.png")
    got = {line.get_label(): line.get_ydata() for _, line in drawn}
    np.testing.assert_array_equal(got["p_β, β=2"], logistic)
    np.testing.assert_array_equal(got["normal, same variance π²/(3β²)"], normal)


def test_the_softplus_figure_draws_each_beta_s_curve_and_relu_dashed(tmp_path, monkeypatch):
    drawn = _spy_plots(monkeypatch)
    x = np.linspace(-2.0, 2.0, 9)
    betas = [0.5, 2.0, 10.0]
    curve = {
        "x": x,
        "betas": betas,
        "y": [np.logaddexp(0, b * x) / b for b in betas],
        "relu": np.maximum(x, 0),
    }
    figures.softplus_figure(curve, tmp_path / "s.png")
    lines = {line.get_label(): line for _, line in drawn}
    assert list(lines) == ["β=0.5", "β=2", "β=10", "ReLU"]
    for b in betas:
        line = lines[f"β={b:g}"]
        np.testing.assert_array_equal(line.get_xdata(), x)
        # log(1 + exp(b x)) / b by hand at x = 0 and x = 2: log(2) / b and 2 + log1p(e^-2b) / b
        y = line.get_ydata()
        assert y[4] == pytest.approx(math.log(2) / b) and y[-1] == pytest.approx(
            2 + math.log1p(math.exp(-2 * b)) / b
        )
    relu = lines["ReLU"]
    np.testing.assert_array_equal(relu.get_ydata(), [0, 0, 0, 0, 0, 0.5, 1, 1.5, 2])
    assert relu.get_linestyle() == "--" and relu.get_color() == "k"


def test_the_smoothgrad_figure_draws_each_noise_s_pcc_at_its_beta(tmp_path, monkeypatch):
    drawn = _spy_plots(monkeypatch)
    curve = {"beta": [10.0, 1.0, 50.0], "logistic": [0.9, 0.99, 0.7], "gaussian": [0.8, 0.95, 0.6]}
    figures.smoothgrad_pcc_figure(curve, tmp_path / "p.png")
    got = {
        line.get_label(): dict(zip(line.get_xdata().tolist(), line.get_ydata().tolist()))
        for _, line in drawn
    }
    assert got == {
        "SmoothGrad, logistic noise (scale 1/β)": {1.0: 0.99, 10.0: 0.9, 50.0: 0.7},
        "SmoothGrad, Gaussian noise (same variance)": {1.0: 0.95, 10.0: 0.8, 50.0: 0.6},
    }


def test_a_confidence_half_width_band_runs_from_the_floor_of_a_log_y_axis_up_to_itself(
    tmp_path, monkeypatch
):
    # The band of a half-width h runs from the floor, a decade below the smallest
    # error (0.03 / 10), up to h: 0 has no place on the log y axis.
    import matplotlib.axes

    bands = []
    real = matplotlib.axes.Axes.fill_between

    def spy(self, x, low, high, **kwargs):
        bands.append((np.asarray(low).tolist(), np.asarray(high).tolist()))
        return real(self, x, low, high, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", spy)
    drawn = _drawn_figures(monkeypatch)
    curve = {"n": [10, 100], "projected": [0.1, 0.03], "iid": [0.1, 0.04]}
    figures.mc_error_figure(curve | {"projected_ci": [0.2, 0.06]}, tmp_path / "mc.png")
    assert bands == [(pytest.approx([0.003, 0.003]), pytest.approx([0.2, 0.06]))]
    (fig,) = drawn
    assert (fig.axes[0].get_xscale(), fig.axes[0].get_yscale()) == ("log", "log")


def test_grid_titles_sit_over_their_columns_and_row_labels_on_their_rows(tmp_path, monkeypatch):
    # A grid of 3 rows x 5 columns of CELL-inch cells: title c centred over column c,
    # the label of row r at the top of row r, one cell below that of row r - 1.
    drawn = _drawn_figures(monkeypatch)
    rng = np.random.default_rng(5)
    x, m = rng.random((3, 1, H, H)), _maps(rng, 3)
    rows = ["row a", "row b", "row c"]
    figures.method_grid(x, m, x, m, m, tmp_path / "g.png", row_labels=rows)
    (fig,) = drawn
    width, height = figures.grid_size(3, 5)
    cell = figures.CELL * figures.DPI
    texts = {t.get_text(): t.get_position() for t in fig.texts}
    titles = ["original", "original map", "attacked", "attacked map", "target map"]
    for c, title in enumerate(titles):
        assert texts[title][0] == pytest.approx((c + 0.5) * cell / width)
    ys = [texts[label][1] for label in rows]
    assert ys[0] == pytest.approx(1 - (figures.TITLE_H * figures.DPI + 4) / height)
    assert np.diff(ys) == pytest.approx([-cell / height] * 2)


def test_the_grid_is_drawn_row_0_on_top_and_each_image_upright(tmp_path, monkeypatch):
    # Row 0's image: top half 0.25, bottom half 0.5 (pixels in [0, 1] keep their grey);
    # row 1's: 0.75. The drawn array holds them where a reader looks for them.
    drawn = _drawn_figures(monkeypatch)
    x = np.full((2, 1, 4, 4), 0.75)
    x[0, 0, :2], x[0, 0, 2:] = 0.25, 0.5
    figures.explain_grid(x, {"gradient": _maps(np.random.default_rng(0), 2)}, tmp_path / "e.png")
    (fig,) = drawn
    (image,) = fig.axes[0].images
    drawn_rgb = np.asarray(image.get_array())
    cell = round(figures.CELL * figures.DPI)
    assert image.origin == "upper"
    quarter = cell // 4
    assert drawn_rgb[quarter, cell // 2].tolist() == [0.25] * 3
    assert drawn_rgb[cell - quarter, cell // 2].tolist() == [0.5] * 3
    assert drawn_rgb[cell + cell // 2, cell // 2].tolist() == [0.75] * 3


def test_the_explain_grid_keeps_the_methods_in_the_order_given(tmp_path, monkeypatch):
    composed = _composed(monkeypatch)
    rng = np.random.default_rng(6)
    maps = {"lrp": _maps(rng, 1), "gradient": _maps(rng, 1)}
    figures.explain_grid(rng.random((1, 1, H, H)), maps, tmp_path / "e.png")
    (columns,) = composed
    assert [c[0] for c in columns] == ["image", "lrp", "gradient"]
    np.testing.assert_array_equal(columns[1][2], maps["lrp"])


def test_a_grid_of_one_beta_draws_its_column(tmp_path, monkeypatch):
    composed = _composed(monkeypatch)
    rng = np.random.default_rng(7)
    x, m = rng.random((2, 1, H, H)), _maps(rng, 2)
    maps_beta = _maps(rng, 2, 1)
    path = figures.method_grid(x, m, x, m, m, tmp_path / "g.png", maps_beta=maps_beta, betas=[2.0])
    (columns,) = composed
    assert [c[0] for c in columns][5:] == ["attacked, β=2"]
    np.testing.assert_array_equal(columns[5][2], maps_beta[:, 0])
    with Image.open(path) as im:
        assert im.size == figures.grid_size(2, 6)


def test_smoothgrad_curves_without_their_betas_are_neither_drawn_nor_named(tmp_path, monkeypatch):
    # SmoothGrad's medians given without the betas they are matched to have no place
    # on the beta axis: only beta-smoothing's curves, and the legend names it alone.
    drawn = _drawn_figures(monkeypatch)
    curves = {"adv_vs_orig_pcc": [0.2, 0.6]}
    figures.defense_curves([1.0, 2.0], curves, tmp_path / "d.png", smoothgrad=curves)
    (fig,) = drawn
    texts = [[t.get_text() for t in legend.get_texts()] for legend in fig.legends]
    assert texts == [["attacked vs original"], ["β-smoothing"]]
    assert [list(line.get_xdata()) for line in fig.axes[0].lines] == [[1.0, 2.0]]


def test_the_cost_figure_draws_every_setting_of_a_defense(tmp_path, monkeypatch):
    drawn = _spy_plots(monkeypatch)
    points = [
        {"defense": "beta_smooth", "label": f"β={b:g}", "seconds": t, "metric": m}
        for b, t, m in ((1, 0.01, 0.5), (10, 0.011, 0.7), (100, 0.012, 0.9))
    ]
    points.append({"defense": "smoothgrad", "label": "σ=1", "seconds": 0.5, "metric": 0.8})
    figures.cost_quality(points, tmp_path / "c.png")
    lines = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for _, line in drawn
    }
    assert lines == {
        "β-smoothing": ([0.01, 0.011, 0.012], [0.5, 0.7, 0.9]),
        "SmoothGrad": ([0.5], [0.8]),
    }


def test_grid_maps_are_drawn_in_magma():
    # The module's documented colour map, by matplotlib: a row's largest value is
    # magma's top colour, 0 its bottom colour.
    from betasmooth.figures import _compose

    magma = matplotlib.colormaps["magma"]
    stack = np.zeros((1, 4, 4))
    stack[0, :2] = 1.0
    canvas, vmax = _compose([("map", "map", stack)])
    assert vmax.tolist() == [1.0]
    colours = {tuple(np.round(c, 6)) for c in canvas.reshape(-1, 3)}
    assert colours == {
        tuple(np.round(magma(0.0)[:3], 6)),
        tuple(np.round(magma(1.0)[:3], 6)),
        (1.0, 1.0, 1.0),  # the gaps between the cells
    }


def test_each_colour_bar_is_drawn_in_magma(tmp_path, monkeypatch):
    drawn = _drawn_figures(monkeypatch)
    rng = np.random.default_rng(11)
    figures.explain_grid(rng.random((1, 1, H, H)), {"g": _maps(rng, 1)}, tmp_path / "e.png")
    (fig,) = drawn
    (bar,) = fig.axes[1:]
    (mesh,) = [a for a in bar.collections if isinstance(a, matplotlib.collections.QuadMesh)]
    assert mesh.get_cmap().name == "magma"


def test_a_seventh_other_defense_takes_a_colour_of_its_own_again():
    # C0 to C3 tell beta-smoothing, SmoothGrad and the comparisons: the others take C4
    # to C9 in turn ("C10" is matplotlib's C0 again, beta-smoothing's blue).
    seven = ["a", "b", "c", "d", "e", "f", "g"]
    colours = [figures.defense_style(d, seven)[1] for d in seven]
    assert colours == ["C4", "C5", "C6", "C7", "C8", "C9", "C4"]


def test_the_undefended_lines_are_in_their_comparison_s_colour(tmp_path, monkeypatch):
    fig = _undefended_figure(tmp_path, monkeypatch, "adv_vs_target_pcc", "clean_vs_orig_pcc")
    flat = {
        float(line.get_ydata()[0]): line.get_color()
        for line in fig.axes[0].lines
        if line.get_alpha() == 0.5
    }
    # attacked vs target in C3, clean vs original in C2, as their curves and legend
    assert flat == {0.3: "C3", 0.7: "C2"}


def test_theorem_figures_draws_every_curve_given_in_its_documented_order(tmp_path):
    x = np.linspace(-1.0, 1.0, 5)
    bs = [1.0, 10.0]
    curves = {
        "curvature": {"beta": bs, "hessian_norm": [0.5, 5.0], "principal_curvature": [0.1, 1.0]},
        "density": {"x": x, "logistic": x**2, "normal": x**2, "beta": 1.0},
        "softplus": {"x": x, "betas": [1.0], "y": [np.logaddexp(0, x)], "relu": np.maximum(x, 0)},
        "iid_bias": {"d": [1, 4], "bias": [0.0, 0.01], "limit": 0.0227},
        "mc_error": {"n": [10, 100], "projected": [0.1, 0.03], "iid": [0.1, 0.04]},
        "smoothing_vs_smoothgrad": {"beta": bs, "logistic": [0.9, 0.8], "gaussian": [0.8, 0.7]},
    }
    paths = figures.theorem_figures({"curves": curves}, tmp_path)
    names = ["softplus", "density", "mc_error", "iid_bias", "smoothing_vs_smoothgrad", "curvature"]
    assert paths == [tmp_path / f"theorem_{n}.png" for n in names]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert figures.theorem_figures({"curves": {"density": curves["density"]}}, tmp_path) == [
        tmp_path / "theorem_density.png"
    ]


def test_up_to_eight_betas_are_each_a_labelled_tick(tmp_path, monkeypatch):
    drawn = _drawn_figures(monkeypatch)
    eight = [0.5, 1, 2, 4, 8, 16, 32, 64]
    for betas in (eight, [*eight, 128]):
        figures.defense_curves(betas, {"adv_vs_orig_pcc": [0.5] * len(betas)}, tmp_path / "d.png")
    ticks = [[t.get_loc() for t in fig.axes[0].xaxis.get_major_ticks()] for fig in drawn]
    assert ticks[0] == eight
    assert ticks[1] != [*eight, 128]


def test_the_two_images_of_a_row_share_one_grey_scale():
    # Pixels in [-1, 0] before, one pushed to 2 by the attack: on the row's scale
    # [-1, 2] the original's brightest pixel is a third grey, not white.
    from betasmooth.figures import _compose

    x = np.full((1, 1, 4, 4), -1.0)
    x[..., 0, 0] = 0.0
    x_adv = x.copy()
    x_adv[..., 1, 1] = 2.0
    canvas, _ = _compose([("original", "image", x), ("attacked", "image", x_adv)])
    cell = round(figures.CELL * figures.DPI)
    first, second = canvas[:, :cell], canvas[:, cell:]
    assert np.isclose(first, 1 / 3).any() and np.isclose(second, 1 / 3).any()
    assert np.isclose(second, 1.0).all(axis=-1).sum() > np.isclose(first, 1.0).all(axis=-1).sum()


def test_a_row_label_names_a_true_class_as_the_true_one():
    # A class folder's name is the image's true class, not the model's prediction.
    from betasmooth.report import _class_names

    records = [
        {"index": 0, "method": "gradient", "label_name": "tabby"},
        {"index": 1, "method": "gradient", "true_label_name": "cats"},
        {"index": 2, "method": "lrp", "label_name": "dog"},
    ]
    assert _class_names(records, "gradient") == {0: "tabby", 1: "true cats"}


def test_a_sweep_on_another_base_names_that_base(tmp_path, monkeypatch):
    # lrp attacked through its own map, swept with gradient under each defense: its
    # undefended row and faint lines are the attacked lrp map, not a plain gradient one.
    run = make_run(tmp_path / "run", theory=False)
    sweep = read_lines(run / "sweep.jsonl")
    _rewrite(
        run / "sweep.jsonl",
        [r | {"base": "gradient"} if r["method"] == "lrp" else r for r in sweep],
    )
    calls = _calls(monkeypatch, "defense_curves")
    page = parse(build_report(run))
    assert [kwargs["undefended_label"] for _, kwargs in calls] == [
        "no defense (ReLU)",
        "as attacked (lrp)",
    ]
    assert page.tables["choice_gradient"][1][0][0] == "undefended"
    assert page.tables["choice_lrp"][1][0][0] == "undefended: plain gradient"


def _composed(monkeypatch):
    composed = []
    compose = figures._compose
    monkeypatch.setattr(figures, "_compose", lambda cols: composed.append(cols) or compose(cols))
    return composed


def test_the_grid_of_a_normalised_run_draws_each_panel_from_its_own_array(tmp_path, monkeypatch):
    # Both images de-normalised (x * std + mean), each map in its own column.
    rng = np.random.default_rng(11)
    mean, std = 0.5, 0.25
    config = {"command": "attack", "n": 2, "methods": ["gradient"], "mean": [mean], "std": [std]}
    run = RunDir.create(tmp_path, config)
    batch = AttackBatch(
        index=np.arange(2),
        x=rng.standard_normal((2, 1, H, H)),
        x_adv=rng.standard_normal((2, 1, H, H)),
        map_orig=_maps(rng, 2),
        map_adv=_maps(rng, 2),
        map_target=_maps(rng, 2),
        label=np.array([1, 2]),
        label_adv=np.array([1, 2]),
    )
    run.save_arrays("gradient", 0, batch)
    rec = {"method": "gradient", "goal": "targeted", "label_kept": True, "expl_pcc_orig": 0.5}
    run.append([{"index": i, **rec} for i in range(2)])
    composed = _composed(monkeypatch)
    build_report(tmp_path)
    (columns,) = composed
    drawn = {name: stack for name, _, stack in columns}
    assert list(drawn) == ["original", "original map", "attacked", "attacked map", "target map"]
    np.testing.assert_allclose(drawn["original"], batch.x * std + mean, rtol=1e-6)
    np.testing.assert_allclose(drawn["attacked"], batch.x_adv * std + mean, rtol=1e-6)
    for name, maps in [
        ("original map", batch.map_orig),
        ("attacked map", batch.map_adv),
        ("target map", batch.map_target),
    ]:
        np.testing.assert_allclose(drawn[name], maps, rtol=1e-6)


def test_the_explain_grid_draws_each_method_s_map_of_the_row_s_image(tmp_path, monkeypatch):
    # gradient's arrays of the first two images are lost: the rows show images 2, 3, ...,
    # and lrp, which holds every image, must give its maps of those, not of 0, 1, ...
    rng = np.random.default_rng(12)
    run = RunDir.create(tmp_path, {"command": "explain", "seed": 0})
    n = GRID_ROWS
    x, grad, lrp = rng.random((n + 2, 1, H, H)), _maps(rng, n + 2), _maps(rng, n + 2)
    kept = np.arange(2, n + 2)
    run.save_arrays("gradient", 2, ExplainBatch(kept, x[kept], grad[kept]))
    run.save_arrays("lrp", 0, ExplainBatch(np.arange(n + 2), x, lrp))
    rec = {"label": 1, "map_max": 1.0, "seconds": 0.1}
    run.append([{"index": i, "method": m, **rec} for m in ("gradient", "lrp") for i in kept])
    composed = _composed(monkeypatch)
    build_report(tmp_path)
    (columns,) = composed
    drawn = {name: stack for name, _, stack in columns}
    np.testing.assert_allclose(drawn["image"], x[kept], rtol=1e-6)
    np.testing.assert_allclose(drawn["gradient"], grad[kept], rtol=1e-6)
    np.testing.assert_allclose(drawn["lrp"], lrp[kept], rtol=1e-6)


def test_the_attack_settings_table_shows_each_method_s_own_settings(tmp_path):
    run = RunDir.create(tmp_path, {"command": "attack", "n": 2, "methods": ["gradient", "lrp"]})
    own = {
        "gradient": {"attack_lr": 0.5, "attack_steps": 3},
        "lrp": {"attack_lr": 2.0, "attack_steps": 7},
    }
    rec = {"goal": "targeted", "label_kept": True, "expl_pcc_orig": 0.5}
    run.append([{"index": i, "method": m, **rec, **own[m]} for m in own for i in range(2)])
    page = parse(build_report(tmp_path))
    table = page.tables["attack-settings"]
    heads = [cell[0] for cell in table[0]]
    for method, settings in own.items():
        j = heads.index(f"{method} (targeted)")
        shown = {row[0][0]: float(row[j][1]) for row in table[1:]}
        assert shown == pytest.approx({k.removeprefix("attack_"): v for k, v in settings.items()})


def test_the_defense_table_counts_the_records_of_each_setting(tmp_path):
    # Two betas, four settings, six images: each column counts its own six records.
    run = make_run(tmp_path, theory=False, methods=("gradient",), betas=(1.0, 5.0))
    page = parse(build_report(run))
    sweep = read_lines(run / "sweep.jsonl")
    table = page.tables["defense-table_gradient"]
    for beta in (1.0, 5.0):
        sigma = math.pi / (math.sqrt(3) * beta)
        for defense, setting in [
            ("beta_smooth", f"β-smoothing β={beta:g}"),
            ("smoothgrad", f"SmoothGrad σ={sigma:.3g}, matched to β={beta:g}"),
        ]:
            mine = [r for r in sweep if r["defense"] == defense and r["beta"] == beta]
            assert column(table, setting, head_rows=2)["records"] == len(mine) == N


def test_the_grid_rows_of_a_method_name_the_class_of_each_image(tmp_path, monkeypatch):
    # A pretrained model's records name each image's class; the grid's row labels say it.
    rng = np.random.default_rng(13)
    run = RunDir.create(tmp_path, {"command": "attack", "n": 2, "methods": ["gradient"]})
    x = rng.random((2, 1, H, H))
    batch = AttackBatch(
        np.arange(2), x, x, _maps(rng, 2), _maps(rng, 2), _maps(rng, 2),
        np.array([3, 7]), np.array([3, 5]),
    )  # fmt: skip
    run.save_arrays("gradient", 0, batch)
    names = {0: "tabby cat", 1: "goldfish"}
    rec = {"method": "gradient", "goal": "targeted", "label_kept": True, "expl_pcc_orig": 0.5}
    run.append([{"index": i, **rec, "label_name": names[i]} for i in range(2)])
    calls = _calls(monkeypatch, "method_grid")
    build_report(tmp_path)
    labels = [kwargs["row_labels"] for _, kwargs in calls]
    assert labels == [["#0 3→3\ntabby cat", "#1 7→5\ngoldfish"]]


def test_the_iid_bias_figure_draws_its_limit_and_names_it(tmp_path, monkeypatch):
    figs = _drawn_figures(monkeypatch)
    curve = {"d": [1, 4, 64], "bias": [0.0, 0.015, 0.022], "limit": 0.02283}
    figures.iid_bias_figure(curve, tmp_path / "b.png")
    (fig,) = figs
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["iid bias", "limit d → ∞: 0.0228"]
    flat = [line for line in ax.get_lines() if line.get_label().startswith("limit")]
    assert [list(line.get_ydata()) for line in flat] == [[0.02283, 0.02283]]


def test_maps_that_do_not_sum_to_one_are_scaled_to_their_own_top(tmp_path, monkeypatch):
    # Signed attributions or raw saliency reach far above 1: the scale still ends at the
    # row's 99.5th percentile, not at 1.
    rng = np.random.default_rng(14)
    x, m = rng.random((1, 1, H, H)), 40 * rng.random((1, H, H))
    bars = []
    bar = figures._colour_bar
    monkeypatch.setattr(
        figures,
        "_colour_bar",
        lambda fig, at, size, top: bars.append(top) or bar(fig, at, size, top),
    )
    figures.method_grid(x, m, x, m, m, tmp_path / "g.png")
    top = np.percentile(np.concatenate([m.ravel()] * 3), 99.5)
    assert bars == [pytest.approx(top * H * H)]
    _, vmax = figures._compose([("map", "map", m)])
    assert vmax.tolist() == pytest.approx([np.percentile(m, 99.5)])


def test_images_the_attack_left_unchanged_are_counted_in_both_tables(tmp_path):
    # integrated gradients moved 2 of 4 images in the quick demo: the console said so,
    # the report did not, while those images scored robustness 1 at every beta.
    run = make_run(tmp_path / "run")
    results = read_lines(run / "results.jsonl")
    for r in results:
        if r["method"] == "gradient" and r["index"] in (0, 1):
            r["input_max_change"] = 0.0
    _rewrite(run / "results.jsonl", results)
    sweep = read_lines(run / "sweep.jsonl")
    for r in sweep:
        r["attacked"] = not (r["method"] == "gradient" and r["index"] in (0, 1))
    _rewrite(run / "sweep.jsonl", sweep)
    page = parse(build_report(run))
    changed = {m: column(page.tables["medians"], f"{m} (targeted)") for m in METHODS}
    assert changed["gradient"]["images the attack changed"] == N - 2
    assert changed["lrp"]["images the attack changed"] == N
    text = build_report(run).read_text()
    assert (
        f"The attack changed {N - 2} of {N} images: robustness and gain left are medians "
        f"over those {N - 2} (the other 2 score robustness 1 in every row, defended or not), "
        f"fidelity over all {N}."
    ) in text
    assert text.count("The attack changed") == 1


def test_images_changed_are_counted_where_only_later_records_say(tmp_path):
    # A run resumed after an upgrade: its first records, of an older version, lack
    # input_max_change and count as changed; the row still counts the others.
    run = make_run(tmp_path / "run")
    results = read_lines(run / "results.jsonl")
    for r in results:
        if r["index"] != 0:  # index 0: as an older version wrote it
            r["input_max_change"] = 0.0 if (r["method"], r["index"]) == ("gradient", 1) else 0.1
    results.sort(key=lambda r: r["index"] != 0)
    _rewrite(run / "results.jsonl", results)
    page = parse(build_report(run))
    changed = {m: column(page.tables["medians"], f"{m} (targeted)") for m in METHODS}
    assert changed["gradient"]["images the attack changed"] == N - 1
    assert changed["lrp"]["images the attack changed"] == N


def test_the_warnings_of_the_commands_that_wrote_a_run_are_a_section_once_each(tmp_path):
    run = make_run(tmp_path / "run", sweep=False, theory=False)
    page = parse(build_report(run))
    assert "warnings" not in page.ids and "warnings-table" not in page.tables
    store = RunDir(run)
    store.add_warnings(
        "attack", ["lrp: <grew> 100 times", "no image changed", "lrp: <grew> 100 times"]
    )
    store.add_warnings("sweep", ["lrp: <grew> 100 times"])
    store.add_warnings("attack", ["no image changed", "later"])  # a resumed attack
    kept = [
        ("attack", "lrp: <grew> 100 times"),
        ("attack", "no image changed"),
        ("sweep", "lrp: <grew> 100 times"),
        ("attack", "later"),
    ]
    assert [(r["command"], r["warning"]) for r in store.read_warnings()] == kept
    page = parse(build_report(run))
    assert [tuple(c[0] for c in row) for row in page.tables["warnings-table"][1:]] == kept
    # Near the top: after what was run, before the results.
    assert page.ids.index("warnings") < page.ids.index("results")


def test_the_run_table_shows_the_command_line_as_typed_not_the_command_name(tmp_path):
    argv = ["betasmooth", "explain", "--n", "1", "--methods", "gradient"]
    run = RunDir.create(tmp_path, {"command": "explain", "argv": argv})
    run.append([{"index": 0, "method": "gradient", "label": 1, "seconds": 0.1}])
    page = parse(build_report(tmp_path))
    what = {row[0][0]: row[1][0] for row in page.tables["run-table"][1:]}
    assert what["command"] == "betasmooth explain --n 1 --methods gradient"


def test_a_method_the_config_lists_that_finished_no_image_is_named_unfinished(tmp_path):
    run = make_run(tmp_path / "part", sweep=False, theory=False)
    results = read_lines(run / "results.jsonl")
    _rewrite(run / "results.jsonl", [r for r in results if r["method"] == "gradient"])
    text = build_report(run).read_text()
    notice = re.search(r"This run is not finished</strong>: ([^.]*)\.", text).group(1)
    assert notice == f"lrp 0 of {N} images"


def test_a_stored_summary_of_which_one_method_is_of_an_older_version_is_made_again(tmp_path):
    from betasmooth.recommend import MIN_FIDELITY, ROBUSTNESS_OVER, sweep_summary

    run = make_run(tmp_path / "run", theory=False)
    fresh = parse(build_report(run)).tables
    store = RunDir(run)
    assert store.read_sweep_summary() is None
    stored = sweep_summary(store.read("sweep"), MIN_FIDELITY)
    for method, s in stored.items():
        s["undefended"] = dict(s["undefended"], n=999)
        if method == "lrp":  # written before robustness was taken over the attacked images
            s.pop("robustness_over", None)
        else:
            s["robustness_over"] = ROBUSTNESS_OVER
    store.write_sweep_summary(stored)
    again = parse(build_report(run)).tables
    for method in METHODS:
        assert again[f"choice_{method}"] == fresh[f"choice_{method}"]
        assert again[f"choice_{method}"][1][1][0] == str(N)


def test_the_images_row_counts_images_not_records_where_an_image_has_a_row_per_beta(tmp_path):
    # Records told apart by their beta (as curvature's are) hold several rows per image.
    (tmp_path / "config.json").write_text(json.dumps({"command": "curvature", "seed": 1}))
    records = [
        {"index": i, "method": "curvature", "beta": beta, "hessian_norm": float(i + beta)}
        for i in range(3)
        for beta in (1.0, 2.0)
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    got = column(parse(build_report(tmp_path)).tables["medians"], "curvature")
    assert got["images"] == 3
    assert got["hessian_norm"] == 2.5  # median of 1, 2, 2, 3, 3, 4


def test_the_attack_settings_are_those_of_the_first_image_of_each_method(tmp_path):
    # A run resumed with another --lr: the table shows what its first image was attacked with.
    RunDir.create(tmp_path, {"command": "attack", "n": 2, "methods": ["gradient", "lrp"]})
    records = [
        {"index": i, "method": m, "goal": "targeted", "attack_lr": lr, "expl_pcc_orig": 0.5}
        for m, lrs in (("gradient", (0.1, 0.2)), ("lrp", (0.3, 0.4)))
        for i, lr in enumerate(lrs)
    ]
    _rewrite(tmp_path / "results.jsonl", records[::-1])
    table = parse(build_report(tmp_path)).tables["attack-settings"]
    assert [[c[0] for c in row] for row in table] == [
        ["attack setting", "gradient (targeted)", "lrp (targeted)"],
        ["lr", "0.1", "0.3"],
    ]


def test_a_method_name_of_html_characters_is_shown_as_written(tmp_path):
    # A method of one's own may be named with the characters HTML gives a meaning to.
    method = "<u>mine&co\"x\"'y'"
    run = make_run(tmp_path, methods=(method,), theory=False)
    text = build_report(run).read_text()
    assert "<u>" not in text
    heading = re.search(r"<h3 id='method_[^']*'>([^<]*)</h3>", text).group(1)
    assert html.unescape(heading) == f"{method} (goal: targeted)"
    # The recommendation's heading of the method, and its verdict.
    assert [html.unescape(h) for h in re.findall(r"<h4>([^<]*)</h4>", text)] == [method]
    assert html.unescape(re.search(r"<p><b>([^<]*)</b></p>", text).group(1)).startswith(method)
    header = [c[0] for c in parse(run / "report.html").tables["medians"][0]]
    assert header[1] == f"{method} (targeted)"


def test_a_file_name_of_html_characters_is_shown_as_written_in_the_caption(tmp_path):
    run = make_run(tmp_path, methods=("gradient",), sweep=False, theory=False)
    records = read_lines(run / "results.jsonl")
    for r in records:
        r["file"] = f"<i>{r['index']}&'x\".png"
    _rewrite(run / "results.jsonl", records)
    text = build_report(run).read_text()
    assert "<i>" not in text
    captions = re.findall(r"<figcaption>([^<]*)</figcaption>", text)
    assert len(captions) == 1
    files = ", ".join(f"#{i} <i>{i}&'x\".png" for i in range(GRID_ROWS))
    assert f" Files: {files}. " in html.unescape(captions[0])


def test_the_base_of_a_swept_method_is_the_one_its_rows_name_or_else_the_method():
    from types import SimpleNamespace

    from betasmooth.report import _base

    rows = [{"method": "m", "base": "gradient"}, {"method": "m", "base": "lrp"}]
    rows += [{"method": "n", "base": "gradient"}, {"method": "n"}, {"method": "o", "base": ""}]
    run = SimpleNamespace(sweep=rows)
    # Rows that disagree name no base: the method is shown as its own undefended map.
    assert [_base(run, m) for m in ("m", "n", "o", "p")] == ["m", "gradient", "o", "p"]


def test_a_section_that_returns_a_list_of_html_is_named_and_left_out(tmp_path, monkeypatch):
    from betasmooth.report import SECTIONS

    run = RunDir.create(tmp_path, {"command": "explain"})
    run.append([{"index": 0, "method": "gradient", "label": 1, "seconds": 0.1}])
    monkeypatch.setitem(SECTIONS, "listed", lambda run: ["<p>listed</p>"])
    with pytest.warns(UserWarning, match=r"^report section 'listed' returned list; expected a str"):
        text = build_report(tmp_path).read_text()
    assert "listed" not in text and "<h2 id='settings'>Settings</h2>" in text


def test_a_setting_that_is_infinite_is_shown_as_inf_not_as_missing(tmp_path):
    # Medians leave out values that are not finite; a setting of inf is shown as written.
    config = {"command": "curvature", "tol": math.inf, "floor": -math.inf}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _rewrite(tmp_path / "results.jsonl", [{"index": 0, "method": "relu", "hessian_norm": 1.0}])
    table = parse(build_report(tmp_path)).tables["settings-table"]
    shown = {row[0][0]: row[1] for row in table[1:]}
    assert shown["tol"] == ["inf", "inf"] and shown["floor"] == ["-inf", "-inf"]


def test_a_theory_without_curves_says_so_and_one_with_curves_does_not(tmp_path, full_run):
    note = "theory.json holds no curves to draw."
    assert note not in (full_run[0] / "report.html").read_text()
    run = RunDir.create(tmp_path, {"command": "theorem"})
    run.write_theory({"identity_1d_max_error": 3e-9})
    assert note in build_report(tmp_path).read_text()


def test_a_method_name_of_quotes_and_brackets_is_the_alternative_text_of_its_figures(tmp_path):
    # The alt attribute is quoted with '"': a quote in a method's name, unescaped, would end
    # the attribute early and let the rest of the name be read as attributes of the image.
    method = 'x"onerror="alert(1)"<b>\'y\''
    run = make_run(tmp_path, methods=(method,), theory=False)
    page = parse(build_report(run))
    alts = [img["alt"] for img in page.images]
    assert f"{method} grid" in alts
    assert f"{method}: similarity of the defended maps against β, PCC and SSIM" in alts
    assert all("onerror" not in img for img in page.images)


def test_the_grid_s_medians_name_only_the_fields_its_records_hold(tmp_path):
    # Records without label_kept (as a version that did not write it left them): the
    # paragraph names the medians it has, not "label_kept –".
    run = make_run(tmp_path, methods=("gradient",), sweep=False, theory=False)
    records = read_lines(run / "results.jsonl")
    for r in records:
        del r["label_kept"]
    _rewrite(run / "results.jsonl", records)
    text = html.unescape(build_report(run).read_text())
    said = re.search(r"<p>Medians over (\d+) images: ([^<]*)\.</p>", text)
    assert said is not None and int(said.group(1)) == N
    shown = dict(part.split(" ") for part in said.group(2).split("; "))
    # The targeted goal's measure, then the attacked map against the original.
    assert list(shown) == ["expl_pcc_target", "expl_pcc_orig"]
    for key, value in shown.items():
        assert float(value) == pytest.approx(np.median([r[key] for r in records]), rel=5e-4)


def test_the_theory_numbers_list_the_documented_terms_first_then_the_others_by_name(tmp_path):
    # Words of their own first, in the documented order; then unknown keys, sorted, with
    # a string or a yes/no shown as written.
    run = RunDir.create(tmp_path / "run", {"command": "theorem"})
    theory = {
        "zeta": 2.5,
        "theorem2_iid_bias": 0.012,
        "alpha_note": "exact",
        "identity_1d_max_error": 3e-9,
        "theorem2_projected_within_ci": True,
    }
    run.write_theory(theory)
    rows = parse(build_report(run.path)).tables["theory-numbers"][1:]
    documented = [k for k in THEORY_TERMS if k in theory]
    assert documented == [
        "identity_1d_max_error",
        "theorem2_projected_within_ci",
        "theorem2_iid_bias",
    ]
    assert [row[0][0] for row in rows] == [THEORY_TERMS[k][0] for k in documented] + [
        "alpha note",
        "zeta",
    ]
    shown = {row[0][0]: row[1][0] for row in rows}
    assert shown["alpha note"] == "exact"
    assert shown[THEORY_TERMS["theorem2_projected_within_ci"][0]] == "yes"


def test_estimates_converged_counts_only_the_records_that_say_so(tmp_path):
    # A record without the field (an older version's) is no converged estimate.
    RunDir.create(tmp_path, {"command": "curvature", "seed": 1})
    flags = [True, False, None, True]
    records = [
        {"index": i, "method": "beta=1", "hessian_norm": 1.0 + i}
        | ({} if c is None else {"converged": c})
        for i, c in enumerate(flags)
    ]
    _rewrite(tmp_path / "results.jsonl", records)
    got = column(parse(build_report(tmp_path)).tables["medians"], "beta=1")
    assert got["estimates converged"] == sum(c is True for c in flags)
    assert got["images"] == len(flags)


def test_a_sweep_without_timings_keeps_its_table_and_draws_no_cost_figure(tmp_path):
    # Sweep records of a version that did not time the defenses: no seconds to plot.
    run = make_run(tmp_path / "run", methods=("gradient",), theory=False)
    sweep = read_lines(run / "sweep.jsonl")
    for r in sweep:
        del r["seconds"]
    _rewrite(run / "sweep.jsonl", sweep)
    page = parse(build_report(run))
    table = page.tables["defense-table_gradient"]
    medians = column(table, "β-smoothing β=1", head_rows=2)
    want = [r["adv_vs_orig_pcc"] for r in sweep if r["defense"] == "beta_smooth" and r["beta"] == 1]
    assert medians["adv_vs_orig_pcc"] == pytest.approx(np.median(want))
    assert "seconds" not in medians
    assert "cost" not in page.ids


def test_labels_kept_is_the_fraction_of_each_method_s_own_images(tmp_path):
    RunDir.create(tmp_path, {"command": "attack", "n": 4, "methods": ["gradient", "lrp"]})
    kept = {"gradient": [True, True, False, True], "lrp": [False, False, True, False]}
    records = [
        {"index": i, "method": m, "goal": "targeted", "label_kept": k, "expl_pcc_orig": 0.5}
        for m, flags in kept.items()
        for i, k in enumerate(flags)
    ]
    _rewrite(tmp_path / "results.jsonl", records)
    table = parse(build_report(tmp_path)).tables["medians"]
    for method, flags in kept.items():
        got = column(table, f"{method} (targeted)")["labels kept (fraction)"]
        assert got == sum(flags) / len(flags)


def test_a_theory_table_puts_undocumented_columns_last_in_words(tmp_path):
    # Documented columns in their documented order, then the others by name, "_" as spaces.
    run = RunDir.create(tmp_path / "run", {"command": "theorem"})
    row = {"extra_col": 3.0, "gradient_norm": 2.0, "hessian_norm": 1.0}
    run.write_theory({"curvature_by_beta": {"1.0": row}})
    table = parse(build_report(run.path)).tables["theory_curvature-by-beta"]
    words = dict(THEORY_TABLES["curvature_by_beta"][2])
    assert [c[0] for c in table[0]] == [
        "β",
        words["hessian_norm"],
        words["gradient_norm"],
        "extra col",
    ]
    assert [c[1] for c in table[1][1:]] == ["1.0", "2.0", "3.0"]


class _HeadSpans(HTMLParser):
    """The (text, colspan) of each cell of the first header row of each table, by id."""

    def __init__(self) -> None:
        super().__init__()
        self.tops: dict[str, list] = {}
        self._id = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._id = a.get("id")
            self.tops[self._id] = []
        elif tag == "th" and self._id is not None:
            self._cell = ["", int(a.get("colspan", 1))]
            self.tops[self._id].append(self._cell)

    def handle_endtag(self, tag):
        if tag == "tr":
            self._id = None  # only the first row of a table
        elif tag == "th":
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def test_each_defense_heads_its_settings_with_one_cell_spanning_them(full_run):
    run, _, _ = full_run
    spans = _HeadSpans()
    spans.feed((run / "report.html").read_text(encoding="utf-8"))
    top = spans.tops["defense-table_gradient"]
    # The row-label column, then one cell per defense over its len(BETAS) settings.
    assert [tuple(c) for c in top] == [
        ("", 1),
        ("β-smoothing", len(BETAS)),
        ("SmoothGrad", len(BETAS)),
    ]


def test_a_method_swept_without_attack_records_keeps_its_defense_table(tmp_path):
    # lrp's attack records were lost (a killed run, cut results.jsonl) but its sweep
    # finished: the defense section shows what the sweep holds.
    run = RunDir.create(tmp_path, {"command": "attack", "methods": ["gradient", "lrp"]})
    run.append([{"index": 0, "method": "gradient", "goal": "targeted", "expl_pcc_orig": 0.5}])
    pcc = [0.2, 0.9, 0.4]
    run.append(
        [
            {"index": i, "method": "lrp", "defense": "beta_smooth", "beta": 5.0}
            | {"adv_vs_orig_pcc": p, "seconds": 0.1}
            for i, p in enumerate(pcc)
        ],
        "sweep",
    )
    page = parse(build_report(tmp_path))
    assert "defense-table_gradient" not in page.tables
    got = column(page.tables["defense-table_lrp"], "β-smoothing β=5", head_rows=2)
    assert got["records"] == len(pcc)
    assert got["adv_vs_orig_pcc"] == np.median(pcc)


def test_the_theory_tables_are_its_mappings_and_not_its_curves(full_run):
    # theory.json's curves are drawn as figures: no table of them.
    run, _, _ = full_run
    theory = json.loads((run / "theory.json").read_text())
    tables = {t for t in parse(run / "report.html").tables if t.startswith("theory_")}
    mappings = {k for k, v in theory.items() if isinstance(v, dict) and k != "curves"}
    assert mappings == {"smoothing_vs_smoothgrad_pcc", "curvature_by_beta"}
    assert tables == {f"theory_{k.replace('_', '-')}" for k in mappings}


def test_the_medians_rows_follow_the_documented_order_then_the_others_by_name(full_run):
    from betasmooth.report import METRIC_ORDER

    run, _, _ = full_run
    table = parse(run / "report.html").tables["medians"]
    records = read_lines(run / "results.jsonl")
    fields = {k for r in records for k, v in r.items() if isinstance(v, float)}
    documented = [k for k in METRIC_ORDER if k in fields]
    rest = sorted(fields - set(documented))
    assert documented[:3] == ["expl_pcc_target", "expl_ssim_target", "expl_mse_target"]
    assert rest == ["spearman_target"]
    rows = [row[0][0] for row in table[1:]]
    assert rows[rows.index("labels kept (fraction)") + 1 :] == documented + rest


def test_an_explain_run_has_its_medians_table_and_no_attack_results(tmp_path):
    # An explain run's results.jsonl holds explanations: one table of their medians,
    # not a second one under "results".
    rng = np.random.default_rng(2)
    run = RunDir.create(tmp_path, {"command": "explain", "seed": 0})
    batch = ExplainBatch(np.arange(3), rng.random((3, 1, H, H)), _maps(rng, 3))
    run.save_arrays("gradient", 0, batch)
    records = [
        {"index": i, "method": "gradient", "label": 1, "map_max": 0.5 + i, "seconds": 0.1}
        for i in range(3)
    ]
    run.append(records)
    page = parse(build_report(tmp_path))
    assert "results" not in page.ids and "medians" not in page.tables
    assert column(page.tables["explain-medians"], "gradient")["map_max"] == 1.5


def test_only_the_theorem_setup_names_its_rows_in_words(tmp_path):
    # Another table's row named like a setting ("n", "points") keeps its own name.
    run = RunDir.create(tmp_path / "run", {"command": "theorem"})
    run.write_theory({"seconds": {"n": 1.5, "points": 0.25}})
    table = parse(build_report(run.path)).tables["theory_seconds"]
    assert [(row[0][0], row[1][1]) for row in table[1:]] == [("n", "1.5"), ("points", "0.25")]


def test_an_explain_run_without_its_arrays_reports_the_medians_of_its_records(tmp_path):
    # arrays/ lost (deleted, or on another disk): the finished records still hold each
    # image's numbers, and the report shows them rather than no Explanations section.
    run = RunDir.create(tmp_path, {"command": "explain", "seed": 0, "n": 3})
    peaks = {"gradient": [0.5, 2.5, 1.0], "lrp": [4.0, 3.0]}
    run.append(
        [
            {"index": i, "method": m, "label": 1, "map_max": v, "seconds": 0.1}
            for m, values in peaks.items()
            for i, v in enumerate(values)
        ]
    )
    page = parse(build_report(tmp_path))
    assert "explain" in page.ids and not page.images
    table = page.tables["explain-medians"]
    for method, values in peaks.items():
        got = column(table, method)
        assert got["images"] == len(values)
        assert got["map_max"] == np.median(values)


def test_cost_labels_are_joined_by_their_share_of_the_plots_span_not_by_seconds(
    tmp_path, monkeypatch
):
    # Seconds 1.0, 1.05 and 1.3 (less than a decade: a linear axis) span 0.3 s: 1.0 and
    # 1.05 are 0.05 / 0.3 = 0.17 of it apart, more than CLOSE[0], though only 0.05 s.
    drawn = _drawn_figures(monkeypatch)
    pts = [
        {"defense": "beta_smooth", "label": label, "seconds": s, "metric": 0.5}
        for label, s in (("β=1", 1.0), ("β=2", 1.05), ("β=3", 1.3))
    ]
    figures.cost_quality(pts, tmp_path / "c.png")
    (fig,) = drawn
    (ax,) = fig.axes
    assert ax.get_xscale() == "linear"
    assert 0.05 / 0.3 >= figures.CLOSE[0] > 0.05
    assert sorted(t.get_text() for t in ax.texts) == ["β=1", "β=2", "β=3"]


def test_the_cost_figure_names_its_metric_on_the_y_axis(tmp_path, monkeypatch):
    drawn = _drawn_figures(monkeypatch)
    pts = [{"defense": "smoothgrad", "label": "σ=1", "seconds": 0.5, "metric": 0.2}]
    figures.cost_quality(pts, tmp_path / "c.png", metric="adv_vs_target_ssim")
    (fig,) = drawn
    assert fig.axes[0].get_ylabel() == "median adv_vs_target_ssim"
    (line,) = fig.axes[0].get_lines()
    assert line.get_xydata().tolist() == [[0.5, 0.2]]


def test_each_comparison_of_the_defense_figure_has_a_colour_of_its_own(tmp_path, monkeypatch):
    # Colour tells the comparison: four comparisons, four colours, on each panel.
    drawn = _drawn_figures(monkeypatch)
    stems = ("adv_vs_orig", "adv_vs_target", "clean_vs_target", "clean_vs_orig")
    curves = {f"{s}_{m}": [0.1 * k, 0.2] for k, s in enumerate(stems) for m in ("pcc", "ssim")}
    figures.defense_curves([1.0, 2.0], curves, tmp_path / "d.png")
    (fig,) = drawn
    for ax in fig.axes:
        colours = {matplotlib.colors.to_hex(line.get_color()) for line in ax.get_lines()}
        assert len(ax.get_lines()) == 4
        assert len(colours) == 4


def test_the_defense_legends_two_rows_do_not_overlap(tmp_path, monkeypatch):
    # Colours (comparisons) in one row, line styles (defenses) in the row below it.
    drawn = _drawn_figures(monkeypatch)
    curves = {"adv_vs_orig_pcc": [0.2, 0.8], "adv_vs_target_pcc": [0.9, 0.3]}
    figures.defense_curves(
        [1.0, 10.0],
        curves,
        tmp_path / "d.png",
        smoothgrad_betas=[1.0],
        smoothgrad={"adv_vs_orig_pcc": [0.5]},
    )
    (fig,) = drawn
    colours, styles = fig.legends
    assert [t.get_text() for t in colours.get_texts()] == [
        "attacked vs original",
        "attacked vs target",
    ]
    assert [t.get_text() for t in styles.get_texts()] == ["β-smoothing", "SmoothGrad"]
    renderer = fig.canvas.get_renderer()
    top, bottom = (legend.get_window_extent(renderer) for legend in (colours, styles))
    assert bottom.y1 <= top.y0


def test_a_grid_of_maps_names_the_unit_of_its_colour_bars_once(tmp_path, monkeypatch):
    # The bars count in multiples of 1 / (H W); without the unit the numbers read as shares.
    drawn = _drawn_figures(monkeypatch)
    rng = np.random.default_rng(0)
    figures.explain_grid(rng.random((2, 1, 4, 4)), {"g": rng.random((2, 4, 4))}, tmp_path / "e.png")
    (fig,) = drawn
    units = [t for t in fig.texts if t.get_text() == "× 1/(HW)"]
    assert len(units) == 1
    # It sits right of the grid's two cells, above the bars.
    assert units[0].get_position()[0] > 2 * figures.CELL / (2 * figures.CELL + figures.CBAR_W)
