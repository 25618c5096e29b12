"""A run directory as one self-contained HTML page.

:func:`build_report` reads what a run wrote (``config.json``,
``results.jsonl``, ``arrays/``, ``sweep.jsonl``, ``theory.json``), draws the
figures into ``figures/`` and writes ``report.html``, with every figure
embedded as a base64 PNG: the page needs neither the package, nor the model,
nor a network connection, nor JavaScript. Parts missing from the run (no
sweep, no theory, an explain-only run) are left out with a one-line note.

The page is a pure function of the run directory: building it twice gives
byte-identical files (no timestamps; the figures are deterministic PNGs).
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import figures
from .attack import recorded_goal
from .checkpoint import reason
from .metrics import group_records, medians
from .recommend import (
    CELL_KEYS,
    MIN_FIDELITY,
    MIN_GAIN,
    PAPER_DEFENSES,
    ROBUSTNESS_OVER,
    defense_tables,
    partly_attacked,
    sweep_summary,
    verdict,
)
from .runs import swept_defenses
from .smooth import logistic_std
from .store import AttackBatch, Batch, ExplainBatch, RunDir, SweepBatch, write_bytes
from .validate import InputError, is_number, warn_user

__all__ = ["METRIC_ORDER", "SECTIONS", "build_report", "medians"]

# Result fields in the order the medians table shows them; other numeric
# fields follow alphabetically.
METRIC_ORDER = tuple(
    f"expl_{m}_{ref}"
    for ref in ("target_before", "target", "orig")
    for m in ("pcc", "ssim", "mse", "spearman", "topk", "com_shift")
) + ("input_mse", "input_max_change", "input_pcc", "output_change", "seconds")
# Fields that identify a record rather than measure it.
_ID_FIELDS = {
    "index",
    "label",
    "label_adv",
    "label_kept",
    "true_label",
    "target_index",
    "first",
    "beta",
}
SWEEP_METRICS = (
    "adv_vs_orig_pcc",
    "adv_vs_orig_ssim",
    "adv_vs_target_pcc",
    "adv_vs_target_ssim",
    "clean_vs_target_pcc",
    "clean_vs_orig_pcc",
    "clean_vs_orig_ssim",
    "adv_vs_orig_mse",
    "adv_vs_target_mse",
    "clean_vs_orig_mse",
    "seconds",
)
# Sweep fields that tell one defense setting from another.
_SWEEP_GROUP = ("defense", "beta", "sigma")
#: The theory's numbers in plain words: key of theory.json -> (what it is, unit).
THEORY_TERMS: dict[str, tuple[str, str]] = {
    "identity_1d_max_error": (
        "Largest gap between ReLU averaged over logistic noise and softplus_β (x in [−5, 5])",
        "output units",
    ),
    "sigmoid_derivative_max_error": (
        "Largest gap between the noise-averaged ReLU slope and sigmoid(βx)",
        "slope (0 to 1)",
    ),
    "theorem2_projected_max_error": (
        "Theorem 2, noise along w: largest Monte Carlo error of the averaged gradient",
        "gradient along w, per |w|",
    ),
    "theorem2_projected_ci": (
        "Theorem 2, noise along w: 95 % bound on that error if the theorem holds",
        "gradient along w, per |w|",
    ),
    "theorem2_projected_within_ci": ("Theorem 2, noise along w: the error is inside the bound", ""),
    "theorem2_iid_max_error": (
        "Theorem 2, iid noise: largest error of the averaged gradient (bias and sampling)",
        "gradient along w, per |w|",
    ),
    "theorem2_iid_mc_vs_exact": (
        "Theorem 2, iid noise: sampling error alone (Monte Carlo against the exact value)",
        "gradient along w, per |w|",
    ),
    "theorem2_iid_bias": (
        "Theorem 2, iid noise: exact bias (largest gap of the noise's law along w to p_β)",
        "probability",
    ),
    "theorem2_iid_bias_at_points": (
        "Theorem 2, iid noise: exact bias at the evaluation points",
        "probability",
    ),
    "theorem2_iid_bias_axis_aligned": (
        "Theorem 2, iid noise, w along an axis: bias (zero in theory)",
        "probability",
    ),
    "theorem2_iid_bias_limit": (
        "Theorem 2, iid noise: limit of the bias in high dimension (logistic vs normal)",
        "probability",
    ),
    "theorem2_iid_bias_limit_at": ("Where that limit's largest gap lies", "β·t, no unit"),
}
#: Tables of the theory: key -> (title, header of the row labels, {column key: header}).
THEORY_TABLES: dict[str, tuple[str, str, dict[str, str]]] = {
    "theorem2_setup": (
        "Setup of the Theorem 2 check",
        "setting",
        {"value": "value"},
    ),
    "theorem2_iid_bias_by_d": (
        "Bias of iid noise against the input dimension d, for w = (1, …, 1)",
        "dimension d",
        {"value": "bias (probability)"},
    ),
    "smoothing_vs_smoothgrad_pcc": (
        "β-smoothed gradient against SmoothGrad on the built-in digits-cnn: Pearson "
        "correlation of the maps (−1 to 1)",
        "β",
        {"logistic": "logistic noise", "gaussian": "Gaussian noise"},
    ),
    "curvature_by_beta": (
        "Curvature of the β-smoothed digits-cnn, medians over images (relu: the network itself)",
        "β",
        {
            "hessian_norm": "largest |Hessian eigenvalue| (logit per input²)",
            "principal_curvature": "principal curvature (per input unit)",
            "hessian_frobenius": "Hessian Frobenius norm (logit per input²)",
            "gradient_norm": "gradient norm (logit per input unit)",
        },
    ),
    "seconds": ("Time per check", "check", {"value": "time (s)"}),
}
_SETUP_WORDS = {
    "d": "input dimension d",
    "w": "weight vector w",
    "beta": "β",
    "n": "Monte Carlo samples per point",
    "points": "evaluation points",
    "level": "confidence level of the bound",
}
GRID_ROWS = 4

_CSS = """
body{font-family:"DejaVu Sans",Verdana,sans-serif;font-size:14px;color:#1a1a1a;
max-width:1180px;margin:1.5em auto;padding:0 1em;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ccc;
margin-top:1.8em}h3{font-size:1.05em;margin-top:1.3em}
table{border-collapse:collapse;margin:.6em 0;font-size:12.5px}
th,td{border:1px solid #d0d0d0;padding:2px 7px;text-align:right;vertical-align:top}
td[data-value]{white-space:nowrap}
th{background:#f2f2f2}td.k,th.k{text-align:left;white-space:nowrap}code{font-size:12px}
img{max-width:100%;height:auto;display:block;margin:.4em 0}
p.note{color:#666;font-style:italic}figure{margin:.8em 0}figcaption{font-size:12px;color:#444}
nav a{margin-right:1em}.wide{overflow-x:auto}th[colspan]{text-align:center}
.row{display:flex;flex-wrap:wrap;gap:0 2em;align-items:flex-start}
.figs{display:flex;flex-wrap:wrap;gap:0 1.5em}.figs figure{max-width:570px}
@page{size:landscape}
@media print{body{max-width:none;margin:0;padding:0;font-size:11px}nav{display:none}
.wide{overflow:visible}table{font-size:9px}th,td{padding:1px 3px}code{font-size:9px}
figure,tr{break-inside:avoid}h2,h3{break-after:avoid}}
"""


# ----------------------------------------------------------------------------- reading


@dataclass
class _Run:
    """What the report reads from a run directory."""

    path: Path
    config: dict = field(default_factory=dict)
    results: list = field(default_factory=list)
    explain: list = field(default_factory=list)
    sweep: list = field(default_factory=list)
    theory: dict | None = None
    #: The records that hold explanations: the demo's ``explain``, or an explain run's results.
    explain_name: str = "explain"

    @property
    def store(self) -> RunDir:
        """The run directory, which names its files."""
        return RunDir(self.path)


def _read(run_dir: Path) -> _Run:
    store = RunDir(run_dir)
    run = _Run(
        path=run_dir,
        config=store.config(),
        results=store.read("results"),
        explain=store.read("explain"),
        sweep=store.read("sweep"),
        theory=store.read_theory(),
    )
    if run.config.get("command") == "explain":
        # An explain run's results and arrays are explanations, not attacks.
        run.explain, run.results, run.explain_name = run.results, [], "results"
    return run


def _arrays(run: _Run, name: str, kind: type[Batch]) -> dict[str, Batch]:
    """Each method's batches of the records ``name`` joined and read as ``kind``.

    A method whose arrays are not of that kind (e.g. written by hand) is left out.
    """
    store = run.store
    out = {}
    for method in store.batch_files(name):
        try:
            out[method] = kind.from_npz(store.read_arrays(method, name))
        except InputError:
            continue
    return out


# ----------------------------------------------------------------------------- numbers


#: Prefix of the settings an attack resolved (lr, weights, ...): shown as settings, not medians.
SETTING_PREFIX = "attack_"


def _metric_keys(records: Sequence[Mapping[str, object]]) -> list[str]:
    present = {
        k
        for r in records
        for k, v in r.items()
        if is_number(v) and not k.startswith(SETTING_PREFIX)
    } - _ID_FIELDS
    ordered = [k for k in METRIC_ORDER if k in present]
    return ordered + sorted(present - set(ordered))


# ----------------------------------------------------------------------------- HTML


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if is_number(value):
        v = float(value)
        if not math.isfinite(v):
            return str(v)
        if isinstance(value, int):
            return str(value)
        return f"{v:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, Mapping):
        # In the order written, so that numeric keys (betas) stay in numeric order.
        return json.dumps(value, default=str)
    return str(value)


def _cell(value: object, cls: str = "") -> str:
    attrs = f' class="{cls}"' if cls else ""
    if is_number(value):
        attrs += f' data-value="{float(value)!r}"'
    return f"<td{attrs}>{_e(_fmt(value))}</td>"


def _table(
    table_id: str,
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    groups: Sequence[str] | None = None,
) -> str:
    """A table; the first column is a row label, the other cells carry data-value.

    ``groups`` names a group for each column after the first; runs of equal names share
    one cell in a header row above ``header``, so that the column heads stay short.
    """
    head = "".join(f'<th class="k">{_e(header[0])}</th>' if header else "")
    head += "".join(f"<th>{_e(h)}</th>" for h in header[1:])
    if groups:
        spans = [(name, len(list(run))) for name, run in itertools.groupby(groups)]
        top = '<th class="k"></th>' + "".join(
            f'<th colspan="{n}">{_e(name)}</th>' if n > 1 else f"<th>{_e(name)}</th>"
            for name, n in spans
        )
        head = f"{top}</tr><tr>{head}"
    body = []
    for row in rows:
        cells = f'<th class="k">{_e(_fmt(row[0]))}</th>' + "".join(_cell(v) for v in row[1:])
        body.append(f"<tr>{cells}</tr>")
    return (
        f'<div class="wide"><table id="{_e(table_id)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _png_size(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _img(path: Path, alt: str, caption: str = "") -> str:
    data = path.read_bytes()
    width, height = _png_size(data)
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (
        f'<figure><img src="{src}" width="{width}" height="{height}" alt="{_e(alt)}">{cap}</figure>'
    )


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _slug(text: str) -> str:
    # Case kept: methods MyGrad and mygrad get figures and ids of their own. No
    # slug holds '_', so ids "<kind>_<slug>" never meet the report's fixed ids.
    return "".join(c if c.isalnum() else "-" for c in str(text)).strip("-")


# ----------------------------------------------------------------------------- sections


def _section_run(run: _Run) -> str:
    c = run.config

    def pick(*keys: str) -> object:
        return next((c[k] for k in keys if k in c), None)

    command = pick("argv", "command")
    if isinstance(command, (list, tuple)):
        command = " ".join(str(a) for a in command)
    methods = pick("methods", "method")
    # An explain run's results.jsonl was read into run.explain.
    lines = run.explain if run.explain_name == "results" else run.results
    indices = {r.get("index") for r in lines}
    rows = [
        ("command", command),
        ("model", pick("model")),
        ("data", pick("data")),
        ("methods", ", ".join(methods) if isinstance(methods, list) else methods),
        ("goal", pick("goal")),
        ("images (n)", pick("n") if pick("n") is not None else len(indices) or None),
        ("results lines", len(lines)),
        ("seed", pick("seed")),
        ("date", pick("created")),
    ]
    rows = [r for r in rows if r[1] is not None]
    out = ["<h2 id='run'>What was run</h2>", _table("run-table", ["", "value"], rows)]
    unfinished = _unfinished(run, methods if isinstance(methods, list) else [], lines)
    if unfinished:
        out.append(
            f"<p><strong>This run is not finished</strong>: {_e(unfinished)}. The tables and "
            "figures below show the finished images only; run the same command again with "
            "--resume to finish it.</p>"
        )
    versions = c.get("versions")
    if isinstance(versions, Mapping) and versions:
        out.append(
            _table("versions", ["package", "version"], [(k, versions[k]) for k in sorted(versions)])
        )
    return "".join(out)


def _unfinished(run: _Run, methods: Sequence[str], lines: Sequence[Mapping]) -> str:
    """What a stopped or running run still lacks, per method: "lrp 0 of 4 images", or ""."""
    n = run.config.get("n")
    if not isinstance(n, int) or isinstance(n, bool):
        return ""
    done: dict[str, set] = {}
    for r in lines:
        done.setdefault(str(r.get("method")), set()).add(r.get("index"))
    missing = [
        f"{m} {len(done.get(m, ()))} of {n} images"
        for m in dict.fromkeys([*methods, *sorted(done)])
        if len(done.get(m, ())) < n
    ]
    sweep = run.config.get("sweep")
    betas = sweep.get("betas") if isinstance(sweep, Mapping) else None
    if run.results and isinstance(betas, list) and betas:
        # A defended image has a row per defense the sweep ran and beta (not per entry
        # of DEFENSES, to which the run's model file, imported for the report, may add).
        rows: dict[tuple, int] = {}
        for r in run.sweep:
            key = (str(r.get("method")), r.get("index"))
            rows[key] = rows.get(key, 0) + 1
        per_image = len(betas) * len(swept_defenses(sweep))
        for m in dict.fromkeys(str(r.get("method")) for r in run.results):
            attacked = {r.get("index") for r in run.results if str(r.get("method")) == m}
            defended = sum(rows.get((m, i), 0) >= per_image for i in attacked)
            if defended < len(attacked):
                missing.append(f"sweep of {m} {defended} of {len(attacked)} images")
    return ", ".join(missing)


def _changed(record: Mapping[str, object]) -> bool:
    change = record.get("input_max_change")
    return not isinstance(change, (int, float)) or change > 0


def _section_results(run: _Run) -> str:
    if not run.results and run.explain_name == "results":
        return ""
    if not run.results:
        return "<h2 id='results'>Attack results</h2>" + _note(
            "No attack results in this run (results.jsonl is missing or empty)."
        )
    keys = _metric_keys(run.results)
    kept = any(isinstance(r.get("label_kept"), bool) for r in run.results)
    groups = group_records(run.results, ("method", "goal"))
    columns = list(groups)
    header = ["median over images"] + [m if not g else f"{m} ({g})" for m, g in columns]
    rows = [["images"] + [len({r.get("index") for r in groups[c]}) for c in columns]]
    if any(isinstance(r.get("input_max_change"), (int, float)) for r in run.results):
        # An image no step moved scores as its original in every median: say how many.
        rows.append(
            ["images the attack changed"] + [sum(_changed(r) for r in groups[c]) for c in columns]
        )
    lanczos = any(isinstance(r.get("converged"), bool) for r in run.results)
    if lanczos:
        # An estimate that --iterations stopped early may lie below the true value.
        rows.append(
            ["estimates converged"]
            + [sum(r.get("converged") is True for r in groups[c]) for c in columns]
        )
    if kept:
        rows.append(
            ["labels kept (fraction)"]
            + [medians(groups[c], ["label_kept"])["label_kept"] for c in columns]
        )
    stats = {c: medians(groups[c], keys) for c in columns}
    for method, goal in columns:
        if _untargeted(run, goal):
            # Its "target" is the original map: the target rows would repeat
            # the orig rows under a name that reads the other way round.
            stats[method, goal] = {
                k: None if "_target" in k else v for k, v in stats[method, goal].items()
            }
    rows += [
        [k] + [stats[c][k] for c in columns]
        for k in keys
        if any(stats[c][k] is not None for c in columns)
    ]
    targeted = (
        ""
        if all(_untargeted(run, g) for _, g in columns)
        else (
            "expl_*_target: attacked map vs target map (high PCC/SSIM, low MSE = the attack "
            "worked); expl_*_target_before: original map vs target map, before the attack; "
        )
    )
    legend = targeted + (
        "expl_*_orig: attacked map vs original map; input_*: attacked vs original "
        "image, in units of each channel's data range (input_max_change: the largest "
        "change of one pixel value); output_change: "
        "change of the model's output; seconds: per image."
    )
    if any(_untargeted(run, g) for _, g in columns):
        legend += (
            " The topk and center goals have no target map: they push the map away from the "
            "original, so there low expl_topk_orig (top-k pixels still in the original's top-k) "
            "and high expl_com_shift_orig (pixels the centre of mass moved) = the attack worked."
        )
    attack = any(k.startswith("expl_") for k in keys)
    title = "Attack results" if attack else "Results"
    converged = (
        "Estimates converged: images whose Lanczos estimates met their tolerance within "
        "--iterations; the others may lie below the true value (a larger --iterations gives "
        "them)."
    )
    return (
        f"<h2 id='results'>{title}: medians over images</h2>"
        + _table("medians", header, rows)
        + (f"<p>{_e(legend)}</p>" if attack else "")
        + (f"<p>{_e(converged)}</p>" if lanczos else "")
        + _attack_settings(groups)
    )


def _untargeted(run: _Run, goal: object) -> bool:
    """Whether an attack's goal has no target map (Ghorbani et al.'s topk and center)."""
    return not recorded_goal(run.config, goal)[0]


def _attack_settings(groups: Mapping[tuple, Sequence[Mapping[str, object]]]) -> str:
    """The settings each attack resolved (one per method and goal), from its first record."""
    first = {c: rows[0] for c, rows in groups.items() if rows}
    names = sorted({k for r in first.values() for k in r if k.startswith(SETTING_PREFIX)})
    if not names:
        return ""
    columns = list(first)
    header = ["attack setting"] + [m if not g else f"{m} ({g})" for m, g in columns]
    rows = [[n.removeprefix(SETTING_PREFIX)] + [first[c].get(n) for c in columns] for n in names]
    return _table("attack-settings", header, rows)


def _row_labels(batch: Batch, n: int, names: Mapping[int, str] | None = None) -> list[str]:
    labels = []
    for i in range(n):
        index = int(batch.index[i])
        text = f"#{index}"
        if isinstance(batch, AttackBatch):
            text += f" {int(batch.label[i])}→{int(batch.label_adv[i])}"
        if names and index in names:
            # The class name of the prediction, on a line of its own and cut to fit
            # the panel: beside the labels it ran into the next panel.
            text += f"\n{names[index][:16]}"
        labels.append(text)
    return labels


def _class_names(records: Sequence[Mapping], method: str | None = None) -> dict[int, str]:
    # The predicted class's name where the model has names, else the true class's
    # (a class folder's name), marked as such.
    names = {}
    for r in records:
        if method is None or r.get("method") == method:
            if "label_name" in r:
                names[int(r["index"])] = str(r["label_name"])
            elif "true_label_name" in r:
                names[int(r["index"])] = f"true {r['true_label_name']}"
    return names


def _files(records: Sequence[Mapping], index: Iterable[int]) -> str:
    """`` Files: #0 a.png, #1 b.png.`` for the shown rows whose records name a file."""
    named = {int(r["index"]): str(r["file"]) for r in records if "file" in r}
    shown = [f"#{int(i)} {named[int(i)]}" for i in index if int(i) in named]
    return f" Files: {', '.join(shown)}." if shown else ""


def _sweep_maps(
    swept: SweepBatch | None, index: np.ndarray, defense: str = "beta_smooth"
) -> tuple[np.ndarray, list[float]] | None:
    """A defense's maps of the attacked images, aligned with ``index``, and their betas."""
    maps = None if swept is None else swept.maps.get(defense)
    if maps is None:
        return None
    betas = [float(b) for b in np.ravel(swept.betas)]
    where = {int(i): k for k, i in enumerate(swept.index)}
    if len(betas) != maps.shape[1] or not all(int(i) in where for i in index):
        return None
    return maps[[where[int(i)] for i in index]], betas


def _section_methods(run: _Run) -> str:
    batches = _arrays(run, "results", AttackBatch) if run.explain_name == "explain" else {}
    if not batches:
        return ""
    sweeps = _arrays(run, "sweep", SweepBatch)
    goals = {str(r.get("method")): r.get("goal") for r in run.results}
    out = ["<h2 id='methods'>Maps before and after the attack</h2>"]
    for method, batch in batches.items():
        goal = goals.get(method)
        heading = method + (f" (goal: {goal})" if goal else "")
        out.append(f"<h3 id='method_{_e(_slug(method))}'>{_e(heading)}</h3>")
        n = min(GRID_ROWS, len(batch.x))
        swept = _sweep_maps(sweeps.get(method), batch.index[:n])
        path = figures.method_grid(
            _shown(run, batch.x[:n]),
            batch.map_orig[:n],
            _shown(run, batch.x_adv[:n]),
            batch.map_adv[:n],
            None if _untargeted(run, goal) else batch.map_target[:n],
            run.store.figures / f"grid_{_slug(method)}.png",
            maps_beta=swept[0] if swept else None,
            betas=swept[1] if swept else None,
            row_labels=_row_labels(batch, n, _class_names(run.results, method)),
        )
        caption = (
            f"First {n} of {len(batch.x)} images (row label: index, label before → after). "
            f"Maps in {figures.MAP_CMAP}, one colour scale per row (colour bar)."
        )
        caption += _files(run.results, batch.index[:n])
        if swept is None:
            caption += " No beta-smoothed maps stored for this method."
        out.append(_img(path, f"{method} grid", caption))
        out += _defense_grids(run, method, batch, n, sweeps.get(method), goal)
        mine = [r for r in run.results if r.get("method") == method]
        if mine:
            measure = recorded_goal(run.config, goal)[1]
            m = medians(mine, list(dict.fromkeys(["label_kept", measure, "expl_pcc_orig"])))
            parts = [f"{k} {_fmt(v)}" for k, v in m.items() if v is not None]
            out.append(f"<p>Medians over {len(mine)} images: {_e('; '.join(parts))}.</p>")
    return "".join(out)


def _defense_grids(
    run: _Run, method: str, batch: AttackBatch, n: int, swept: SweepBatch | None, goal: object
) -> list[str]:
    """A grid per defense other than beta-smoothing (whose maps the method's grid shows)."""
    out = []
    defenses = [] if swept is None else [d for d in swept.maps if d != "beta_smooth"]
    for defense in defenses:
        found = _sweep_maps(swept, batch.index[:n], defense)
        if found is None:
            continue
        label = figures.defense_style(defense, defenses)[0]
        path = figures.defense_grid(
            batch.map_orig[:n],
            batch.map_adv[:n],
            None if _untargeted(run, goal) else batch.map_target[:n],
            found[0],
            found[1],
            run.store.figures / f"grid_{_slug(method)}_{_slug(defense)}.png",
            label=label,
            row_labels=_row_labels(batch, n, _class_names(run.results, method)),
        )
        caption = (
            f"{label}'s maps of the same attacked images, one column per β of the sweep"
            + (" (noise matched to β, as in the sweep's table)" if defense == "smoothgrad" else "")
            + "; the maps of a row share one colour scale (colour bar)."
        )
        out.append(_img(path, f"{method} {defense} grid", caption))
    return out


def _section_explain(run: _Run) -> str:
    table = _explain_medians(run)
    loaded = _arrays(run, run.explain_name, ExplainBatch)
    if not loaded:
        # The records alone still hold each finished image's numbers.
        if not table:
            return ""
        note = "<p>No maps are stored in arrays/; the medians come from the records.</p>"
        return "<h2 id='explain'>Explanations</h2>" + note + table
    first = next(iter(loaded.values()))
    n = min(GRID_ROWS, len(first.x))
    shown = [int(i) for i in first.index[:n]]
    maps, missing = {}, []
    for method, batch in loaded.items():
        # Rows by image index: a method whose arrays were lost for some images
        # (to be computed again by --resume) must not lend its maps to others.
        where = {int(i): k for k, i in enumerate(batch.index)}
        if all(i in where for i in shown):
            maps[method] = batch.map[[where[i] for i in shown]]
        else:
            missing.append(method)
    path = figures.explain_grid(
        _shown(run, first.x[:n]),
        maps,
        run.store.figures / "explain.png",
        row_labels=_row_labels(first, n, _class_names(run.explain or run.results)),
    )
    caption = f"First {n} images; maps in {figures.MAP_CMAP}, one colour scale per row."
    if missing:
        caption += f" Not shown, their maps of these images are not stored: {', '.join(missing)}."
    out = "<h2 id='explain'>Explanations</h2>" + _img(
        path, "explanation grid", caption + _files(run.explain or run.results, first.index[:n])
    )
    return out + table


def _explain_medians(run: _Run) -> str:
    """The table of each method's medians over the explain records; "" without them."""
    if not run.explain:
        return ""
    keys = _metric_keys(run.explain)
    groups = group_records(run.explain, ("method",))
    columns = list(groups)
    stats = {c: medians(groups[c], keys) for c in columns}
    rows = [["images"] + [len(groups[c]) for c in columns]]
    rows += [[k] + [stats[c][k] for c in columns] for k in keys]
    header = ["median over images"] + [c[0] for c in columns]
    return _table("explain-medians", header, rows)


def _sweep_group(key: Mapping[str, object]) -> str:
    """The defense of a sweep setting, as the figures name it."""
    return figures.defense_style(str(key.get("defense")))[0]


def _sweep_label(key: Mapping[str, object]) -> str:
    """A sweep setting within its group (:func:`_sweep_group`)."""
    parts = []
    if key.get("defense") == "smoothgrad":
        if is_number(key.get("sigma")):
            parts.append(f"σ={float(key['sigma']):.3g}")
        if is_number(key.get("beta")):
            parts.append(f"matched to β={float(key['beta']):g}")
    elif is_number(key.get("beta")):
        parts.append(f"β={float(key['beta']):g}")
    return ", ".join(parts)


def _matched_beta(key: Mapping[str, object]) -> float | None:
    """The beta of a sweep setting; for SmoothGrad without one, the beta whose p_beta has
    the standard deviation of its noise."""
    if is_number(key.get("beta")) and math.isfinite(float(key["beta"])):
        return float(key["beta"])
    if key.get("defense") == "smoothgrad" and is_number(key.get("sigma")) and key["sigma"] > 0:
        return logistic_std(float(key["sigma"]))
    return None


def _defensegroup_records(records: Sequence[Mapping]) -> list[tuple[dict, list[Mapping]]]:
    keys = [k for k in _SWEEP_GROUP if any(k in r for r in records)]
    return [(dict(zip(keys, g)), recs) for g, recs in group_records(records, keys).items()]


# Sweep keys and the attack result fields that measure the same without a defense.
_UNDEFENDED = {
    "adv_vs_orig_pcc": "expl_pcc_orig",
    "adv_vs_target_pcc": "expl_pcc_target",
    "clean_vs_target_pcc": "expl_pcc_target_before",
    "adv_vs_orig_ssim": "expl_ssim_orig",
    "adv_vs_target_ssim": "expl_ssim_target",
}


def _undefended(run: _Run, method: str) -> dict[str, float] | None:
    """Medians of the attack results of ``method``, named as the sweep names them."""
    mine = [r for r in run.results if str(r.get("method")) == method]
    stats = medians(mine, list(_UNDEFENDED.values()))
    found = {k: stats[v] for k, v in _UNDEFENDED.items() if stats[v] is not None}
    if mine and _untargeted(run, mine[0].get("goal")):
        found = {k: v for k, v in found.items() if "_vs_target_" not in k}
    return found or None


def _shown(run: _Run, x: np.ndarray) -> np.ndarray:
    """Inputs as the eye should see them: normalised data back in [0, 1]."""
    mean, std = run.config.get("mean"), run.config.get("std")
    if mean is None and std is None:
        return x
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = np.ones(1) if std is None else np.asarray(std, dtype=np.float64)
    shift = np.zeros(1) if mean is None else np.asarray(mean, dtype=np.float64)
    return np.asarray(x, dtype=np.float64) * scale.reshape(shape) + shift.reshape(shape)


def _summary(run: _Run) -> dict:
    stored = run.store.read_sweep_summary()
    current = stored is not None and all(
        isinstance(s, dict) and s.get("robustness_over") == ROBUSTNESS_OVER for s in stored.values()
    )
    if current:
        return stored
    # A sweep cut before its summary was written, or a summary of a version that took
    # robustness over every image: from the records, at the floor the sweep was run with.
    settings = run.config.get("sweep")
    floor = settings.get("min_fidelity") if isinstance(settings, dict) else None
    return sweep_summary(run.sweep, MIN_FIDELITY if floor is None else float(floor))


#: The recommendation's table says how SmoothGrad's noise is set; every other
#: defense's rows are named as the figures name it.
_DEFENSE_ROWS = {"smoothgrad": "SmoothGrad, matched"}


def _recommendation(run: _Run) -> str:
    """Undefended, robustness and fidelity per beta, and the recommended beta, per method."""
    out = [
        "<h3 id='defense-choice'>Which beta: robustness and fidelity</h3>",
        "<p>Robustness: defended map of the attacked image against the defended map of the "
        "original (high: the attack no longer moves the map). Fidelity: defended map of the "
        "original against the undefended one (high: the defense still explains the "
        "network). The recommended beta (marked ★) is the most robust one whose median "
        "fidelity (PCC) reaches the threshold, unless it is less robust than no defense. "
        "Gain left: the share of the attack's gain in median PCC to the target that the "
        "defended maps still show (their PCC to the target, of the attacked image less that "
        f"of the original), not given for a gain below {MIN_GAIN:g}, of which a share is "
        "noise. Medians over images.</p>",
    ]
    keys = (*CELL_KEYS, "gain_left")
    for method, s in sorted(_summary(run).items()):
        rec = s.get("recommended_beta")
        base = _base(run, method)
        plain = "undefended" if base == method else f"undefended: plain {base}"
        rows = [[plain, s["undefended"].get("n")] + [s["undefended"].get(k) for k in keys]]
        for defense, cells in defense_tables(s).items():
            name = _DEFENSE_ROWS.get(defense) or figures.defense_style(defense)[0]
            for beta, cell in cells.items():
                star = " ★" if defense == "beta_smooth" and rec == float(beta) else ""
                rows.append([f"{name} β={beta}{star}", cell.get("n")] + [cell.get(k) for k in keys])
        header = ["setting", "images", "robustness PCC", "robustness SSIM"]
        header += ["fidelity PCC", "fidelity SSIM", "gain left"]
        out.append(f"<h4>{_e(method)}</h4>")
        if base != method:
            out.append(
                f"<p>{_e(method)} was attacked through its own map (an adaptive attack on "
                f"that defense); the sweep explains the attacked images with {_e(base)} under "
                f"each defense, so its undefended row is the plain {_e(base)} map, not the "
                f"{_e(method)} map the attack moved (that one is in the attack table).</p>"
            )
        out.append(_table(f"choice_{_slug(method)}", header, rows))
        part = partly_attacked(s)
        if part is not None:
            attacked, n = part
            out.append(
                f"<p>The attack changed {attacked} of {n} images: robustness and gain left "
                f"are medians over those {attacked} (the other {n - attacked} score robustness "
                f"1 in every row, defended or not), fidelity over all {n}.</p>"
            )
        out.append(f"<p><b>{_e(method)}: {_e(verdict(s))}.</b></p>")
    return "".join(out)


def _section_defense(run: _Run) -> str:
    if not run.sweep:
        return "<h2 id='defense'>Defense: beta-smoothing and SmoothGrad</h2>" + _note(
            "No defense sweep in this run (sweep.jsonl is missing or empty)."
        )
    out = ["<h2 id='defense'>Defense: beta-smoothing and SmoothGrad</h2>"]
    out.append(_recommendation(run))
    out.append(
        "<p>Each attacked image is explained again by the defended network "
        "(ReLU → softplus<sub>β</sub>) or by SmoothGrad, and the map is compared with the "
        "original map (should be high) and, after a targeted attack, with its target "
        "(should be low: near clean_vs_target, the defended map of the clean image "
        "against the target, since smoothing moves that map too). Medians over images.</p>"
    )
    points = []
    for method in sorted({str(r.get("method")) for r in run.sweep}):
        html, found = _defense_of(run, method)
        out.append(html)
        points += found
    return "".join(out) + _section_cost(run, points)


def _defense_of(run: _Run, method: str) -> tuple[str, list[dict]]:
    """A method's defense curves and table, and its (seconds, quality) points."""
    mine = [r for r in run.sweep if str(r.get("method")) == method]
    keys = [k for k in SWEEP_METRICS if any(is_number(r.get(k)) for r in mine)]
    if _untargeted(run, _goal(run, method)):
        # Its "target" is the original map: those rows would repeat adv_vs_orig.
        keys = [k for k in keys if "_vs_target_" not in k]
    rows, points = [], []
    series: dict[str, tuple[list, dict]] = {}
    for key, recs in _defensegroup_records(mine):
        stats = medians(recs, keys)
        label = _sweep_label(key)
        defense = key.get("defense", "")
        rows.append([_sweep_group(key), label, len(recs)] + [stats[k] for k in keys])
        beta = _matched_beta(key)
        if beta is not None:
            betas, curves = series.setdefault(str(defense), ([], {}))
            betas.append(beta)
            for k in keys:
                curves.setdefault(k, []).append(np.nan if stats[k] is None else stats[k])
        if "seconds" in stats and stats["seconds"] and "adv_vs_orig_pcc" in stats:
            shown = label if beta is None else f"β={beta:g}"
            points.append(
                {"method": method, "defense": defense, "label": shown}
                | {"seconds": stats["seconds"], "metric": stats["adv_vs_orig_pcc"]}
            )
    out = [f"<h3 id='defense_{_e(_slug(method))}'>{_e(method)}</h3>"]
    if series:
        out.append(_defense_figure(run, method, series))
    # One column per setting: a dozen metrics fit down the page, not across it; the
    # defense heads a group of columns, so that each column's head stays a short setting.
    header = ["median over images"] + [r[1] for r in rows]
    columns = [["records"] + [r[2] for r in rows]]
    columns += [[k] + [r[3 + j] for r in rows] for j, k in enumerate(keys)]
    groups = [r[0] for r in rows]
    out.append(_table(f"defense-table_{_slug(method)}", header, columns, groups))
    return "".join(out), points


def _base(run: _Run, method: str) -> str:
    """The method a sweep's defenses smooth for ``method``: its records' ``base``, else itself."""
    bases = {str(r["base"]) for r in run.sweep if r.get("method") == method and r.get("base")}
    return bases.pop() if len(bases) == 1 else method


def _defense_figure(run: _Run, method: str, series: Mapping[str, tuple[list, dict]]) -> str:
    (betas, curves), (sg_betas, smoothgrad) = (
        series.get("beta_smooth", ([], {})),
        series.get("smoothgrad", ([], {})),
    )
    others = {d: s for d, s in series.items() if d not in PAPER_DEFENSES}
    # The faint lines are the attack's own numbers: for an adaptive attack on
    # a defense they measure that defended map, not the plain network.
    adaptive = _base(run, method) != method
    legend = f"as attacked ({method})" if adaptive else "no defense (ReLU)"
    faint = f"the attacked {method} map, no further defense" if adaptive else "no defense"
    path = figures.defense_curves(
        betas,
        {k: v for k, v in curves.items() if k != "seconds"},
        run.store.figures / f"defense_{_slug(method)}.png",
        smoothgrad_betas=sg_betas,
        smoothgrad=smoothgrad,
        others=others,
        undefended=_undefended(run, method),
        undefended_label=legend,
        title=f"{method}: defended maps against β",
    )
    target = (
        ""
        if _untargeted(run, _goal(run, method))
        else "red: attacked map vs target map (low is good); orange: clean map vs target "
        "map (where the defense alone puts the map; the attack's gain is red above it); "
    )
    return _img(
        path,
        f"{method}: similarity of the defended maps against β, PCC and SSIM",
        f"Blue: attacked map vs original map (high is good); {target}green: clean map vs "
        "original (what the defense costs without attack). Solid: β-smoothing; dotted: "
        f"SmoothGrad with noise of the same variance; {_other_styles(others)}faint dotted, "
        f"in each colour: {faint}.",
    )


def _other_styles(others: Mapping[str, object]) -> str:
    """The caption's words for the line styles of defenses other than the paper's."""
    names = ", ".join(others)  # the caption is escaped as a whole
    return f"other line styles: {names} (see the legend); " if others else ""


def _goal(run: _Run, method: str) -> object:
    """The goal ``method`` was attacked with (its records' ``goal``), or None."""
    return next((r.get("goal") for r in run.results if r.get("method") == method), None)


def _section_cost(run: _Run, points: Sequence[Mapping]) -> str:
    if not points:
        return ""
    out = []
    for method in sorted({p["method"] for p in points}):
        mine = [p for p in points if p["method"] == method]
        if not {p["defense"] for p in mine} >= {"beta_smooth"}:
            continue
        path = figures.cost_quality(
            mine,
            run.store.figures / f"cost_{_slug(method)}.png",
            metric="PCC attacked vs original map",
            title=f"{method}: quality against cost",
        )
        out.append(
            _img(
                path,
                f"{method} quality against time",
                "Each point: one setting; x: median seconds per image to compute its "
                "two defended maps (of the attacked and of the clean image), y: median "
                "PCC of the defended attacked map with the original map.",
            )
        )
    if not out:  # no method swept with beta-smoothing (--defenses)
        return ""
    return "<h2 id='cost'>SmoothGrad against beta-smoothing: quality and time</h2>" + "".join(out)


def _theory_scalar(value: object) -> bool:
    two = isinstance(value, (list, tuple)) and len(value) == 2 and all(map(is_number, value))
    return is_number(value) or isinstance(value, (str, bool)) or two


def _theory_mapping(key: str, value: object) -> bool:
    return key != "curves" and isinstance(value, Mapping) and bool(value)


def _words(key: str) -> tuple[str, str]:
    return THEORY_TERMS.get(key, (key.replace("_", " "), ""))


def _theory_numbers(t: Mapping[str, object]) -> str:
    """The theory's single numbers, in plain words with units (a bound [0, h] shows h)."""
    keys = [k for k in THEORY_TERMS if k in t] + sorted(k for k in t if k not in THEORY_TERMS)
    rows = []
    for key in keys:
        value = t[key]
        if not _theory_scalar(value):
            continue
        words, unit = _words(key)
        rows.append((words, value[-1] if isinstance(value, (list, tuple)) else value, unit))
    return "<div>" + _table("theory-numbers", ["quantity", "value", "unit"], rows) + "</div>"


def _theory_table(key: str, value: Mapping[str, object]) -> str:
    title, label, columns = THEORY_TABLES.get(key, (key.replace("_", " "), "", {}))
    inner = [v for v in value.values() if isinstance(v, Mapping)]
    if len(inner) == len(value):
        order = list(columns)
        found = sorted(
            {c for v in inner for c in v},
            key=lambda c: (order.index(c) if c in columns else len(order), c),
        )
        header = [columns.get(c, c.replace("_", " ")) for c in found]
        rows = [[k] + [value[k].get(c) for c in found] for k in value]
    else:
        header = [columns.get("value", "value")]
        rows = [(_SETUP_WORDS.get(k, k) if key == "theorem2_setup" else k, value[k]) for k in value]
    table = _table(f"theory_{_slug(key)}", [label, *header], rows)
    return f"<div><h3>{_e(title)}</h3>{table}</div>"


def _section_theory(run: _Run) -> str:
    title = "<h2 id='theory'>Theory: softplus<sub>β</sub> and Theorem 2</h2>"
    if not run.theory:
        return title + _note("No theory checks in this run (theory.json is missing).")
    t = run.theory
    out = [title]
    model = run.config.get("model")
    if model not in (None, "digits-cnn"):
        out.append(
            _note(
                f"The SmoothGrad and curvature checks of the theory use the built-in digits-cnn "
                f"on its first test digits, not this run's model ({model}): they check the "
                "theory, whatever the run."
            )
        )
    tables = [_theory_numbers(t)] if any(_theory_scalar(v) for v in t.values()) else []
    tables += [_theory_table(key, t[key]) for key in sorted(t) if _theory_mapping(key, t[key])]
    out.append(f"<div class='row'>{''.join(tables)}</div>")
    paths = figures.theorem_figures(t, run.store.figures)
    captions = {
        "theorem_softplus": "softplus_β against ReLU.",
        "theorem_density": "The logistic density p_β against the normal density of the same "
        "variance.",
        "theorem_mc_error": "Monte Carlo error of E[∇relu(w·(x − ε))] against "
        "∇softplus_{β/|w|}(w·x): projected noise (exact identity) and iid noise (biased).",
        "theorem_iid_bias": "The bias that iid logistic noise leaves in Theorem 2, against the "
        "dimension, and its limit.",
        "theorem_smoothing_vs_smoothgrad": "PCC of the β-smoothed gradient with SmoothGrad "
        "(digits-cnn).",
        "theorem_curvature": "Curvature of the β-smoothed digits-cnn against β.",
    }
    out.append(
        "<div class='figs'>"
        # The caption says what a figure shows: its alternative text too.
        + "".join(
            _img(p, captions.get(p.stem, p.stem).rstrip("."), captions.get(p.stem, ""))
            for p in paths
        )
        + "</div>"
    )
    if not paths:
        out.append(_note("theory.json holds no curves to draw."))
    return "".join(out)


def _section_warnings(run: _Run) -> str:
    said = run.store.read_warnings()
    if not said:
        return ""
    rows = [(r.get("command"), r.get("warning")) for r in said]
    return (
        "<h2 id='warnings'>Warnings</h2>"
        + _note("What the commands that wrote this run warned of on the command line.")
        + _table("warnings-table", ["command", "warning"], rows)
    )


def _section_settings(run: _Run) -> str:
    rest = {k: v for k, v in run.config.items() if k != "versions"}
    if isinstance(rest.get("betas"), list):
        # A beta of None is the ReLU network itself (curvature's "relu").
        rest["betas"] = ["relu" if b is None else b for b in rest["betas"]]
    rows = [(k, rest[k]) for k in sorted(rest)]
    if not rows:
        return "<h2 id='settings'>Settings</h2>" + _note("No config.json in this run.")
    return "<h2 id='settings'>Settings</h2>" + _table("settings-table", ["setting", "value"], rows)


SECTIONS: dict[str, Callable[[_Run], str]] = {
    "run": _section_run,
    "warnings": _section_warnings,
    "results": _section_results,
    "methods": _section_methods,
    "explain": _section_explain,
    "defense": _section_defense,
    "theory": _section_theory,
    "settings": _section_settings,
}


def _rendered(name: str, section: Callable[[_Run], str], run: _Run) -> str:
    """The HTML of one section; one that fails or gives no text is named in a warning and
    left out, so that the report holds the others (a plugin's bug costs one section). A
    damaged run (InputError) and a failing disk or memory (OSError, MemoryError) end the
    report as before: they would fail every section."""
    try:
        part = section(run)
    except (InputError, OSError, MemoryError):
        raise
    except Exception as err:
        warn_user(f"report section {name!r} failed ({reason(err)}); the report holds the others")
        return ""
    if not isinstance(part, str):
        warn_user(
            f"report section {name!r} returned {type(part).__name__}; expected a str of HTML; "
            "the report holds the others"
        )
        return ""
    return part


def build_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` (and ``run_dir/figures/*.png``) from a run directory.

    The page shows what was run, a grid of maps per method (original image
    and map, attacked image and map, target map, beta-smoothed maps when the
    sweep stored them), the medians table, the defense curves against beta,
    SmoothGrad against beta-smoothing in quality and time, the theorem
    figures with their key numbers, and the settings. It is self-contained
    (figures embedded as base64 PNG, no external resources, no JavaScript)
    and deterministic: the same run directory always gives the same bytes.

    Parameters
    ----------
    run_dir : str or Path
        A run directory as written by ``betasmooth demo`` / ``attack`` /
        ``sweep`` / ``explain`` / ``theorem``.

    Returns
    -------
    Path
        The path of ``report.html``.

    Raises
    ------
    FileNotFoundError
        If ``run_dir`` is not a directory.
    InputError
        If it is not a run directory (it has no ``config.json``).

    Examples
    --------
    >>> build_report("runs/demo")  # doctest: +SKIP
    PosixPath('runs/demo/report.html')
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    run = _read(run_dir)
    run.store.figures.mkdir(exist_ok=True)
    body = [_rendered(name, section, run) for name, section in SECTIONS.items()]
    nav = "".join(f'<a href="#{name}">{name}</a>' for name, part in zip(SECTIONS, body) if part)
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>betasmooth report</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>betasmooth report</h1><nav>{nav}</nav>" + "".join(body) + "</body></html>\n"
    )
    path = run_dir / "report.html"
    write_bytes(path, page.encode("utf-8"))
    return path
