"""Robustness and fidelity of a defense sweep, and the beta to recommend.

For one explanation method and one attack:

robustness
    the defended map of ``x_adv`` against the defended map of ``x``
    (``adv_vs_clean_<m>`` in the sweep's records): does the defense keep the
    attack from moving the map?
fidelity
    the defended map of ``x`` against the undefended map of ``x``
    (``clean_vs_orig_<m>``): does the defense still explain what the network
    does?
undefended
    the map of ``x_adv`` against the map of ``x``, both without defense
    (``undefended_<m>``): what the attack achieved.

The recommended beta is the most robust (median PCC) among the betas whose
median fidelity (PCC) is at least ``min_fidelity``; ``None`` when no beta
qualifies, or when that beta leaves the map less robust than no defense.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .metrics import medians
from .validate import InputError, given, is_number

__all__ = [
    "CELL_KEYS",
    "MIN_FIDELITY",
    "MIN_GAIN",
    "PAPER_DEFENSES",
    "ROBUSTNESS_OVER",
    "SUMMARY_KEYS",
    "check_defense_names",
    "check_min_fidelity",
    "defense_tables",
    "format_summary",
    "partly_attacked",
    "recommend_beta",
    "sweep_summary",
    "verdict",
]

#: Least median fidelity (PCC) of a beta that can be recommended.
MIN_FIDELITY = 0.9
SUMMARY_METRICS = ("pcc", "ssim")
#: The medians of a summary cell, in the order the tables show them.
CELL_KEYS = tuple(f"{kind}_{m}" for kind in ("robustness", "fidelity") for m in SUMMARY_METRICS)
#: The keys of one method's summary that name no defense: a defense's cells are under
#: its name (beta-smoothing's under ``betas``), so a defense cannot take one of these.
SUMMARY_KEYS = frozenset(
    {
        "base",
        "undefended",
        "betas",
        "recommended_beta",
        "min_fidelity",
        "attacked",
        "defenses",
        "robustness_over",
    }
)
#: A summary's ``robustness_over``: its robustness and gain are medians over the images
#: the attack changed. Summaries written before 0.13.0 took every image and lack it.
ROBUSTNESS_OVER = "attacked"
#: The defenses of the paper: every summary has a table for each, empty where the
#: records hold none; :func:`~betasmooth.defense.defense_sweep` runs them by default.
PAPER_DEFENSES: tuple[str, ...] = ("beta_smooth", "smoothgrad")


def check_defense_names(names: Iterable[str]) -> None:
    """Refuse a defense named as a key of a method's summary, where its table would go.

    Examples
    --------
    >>> check_defense_names(["beta_smooth", "median_filter"])
    >>> check_defense_names(["betas"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: defense 'betas' has the name of a key of the sweep's ...
    """
    taken = [d for d in names if d in SUMMARY_KEYS]
    if taken:
        raise InputError(
            f"defense {taken[0]!r} has the name of a key of the sweep's summary; expected "
            f"a name other than {', '.join(sorted(SUMMARY_KEYS))}"
        )


def _median(rows: Sequence[Mapping[str, object]], key: str) -> float | None:
    return medians(rows, [key])[key]


def _was_attacked(row: Mapping[str, object]) -> bool:
    """Whether the row's ``x_adv`` differs from ``x`` (records of older versions do
    not say: taken as attacked)."""
    return row.get("attacked", True) is not False


def _attacked(rows: Sequence[Mapping[str, object]]) -> Sequence[Mapping[str, object]]:
    """The rows of images the attack changed (:func:`_was_attacked`), or all of them
    where it changed none.

    An image the attack left unchanged scores robustness 1 defended or not and has
    no gain to undo: counted in those medians, it pulls every beta and the
    undefended row alike towards 1 and the verdict towards "about as robust".
    """
    return [r for r in rows if _was_attacked(r)] or rows


def _cell(rows: Sequence[Mapping[str, object]], gain: float | None = None) -> dict[str, object]:
    hit = _attacked(rows)
    cell: dict[str, object] = {"n": len(rows)}
    for m in SUMMARY_METRICS:
        cell[f"robustness_{m}"] = _median(hit, f"adv_vs_clean_{m}")
        cell[f"fidelity_{m}"] = _median(rows, f"clean_vs_orig_{m}")
    # Records of older versions do not say: taken as changed.
    cell["changed"] = any(r.get("changed", True) is not False for r in rows)
    cell["gain_left"] = _gain_left(hit, gain)
    return cell


def _gain(rows: Sequence[Mapping[str, object]]) -> float | None:
    """The attack's gain in median PCC to the target without a defense, or None: when
    a record of an older version, which lacks the undefended target scores, is among
    ``rows``, and for a gain within :data:`SAME_PCC`, against which a share is noise.
    Of the attacked images' rows (:func:`_attacked`)."""
    keys = ("undefended_target_pcc", "undefended_before_pcc")
    if not all(all(k in r for k in keys) for r in rows):
        return None
    hit = _attacked(rows)
    after, before = (_median(hit, k) for k in keys)
    if after is None or before is None or not after - before > SAME_PCC:
        return None
    return after - before


def _gain_left(rows: Sequence[Mapping[str, object]], gain: float | None) -> float | None:
    """The share of ``gain`` that the defended maps still show: their median PCC to
    the target, of ``x_adv`` less that of ``x`` (the defense moves the map of ``x``
    too), over ``gain``."""
    after = _median(rows, "adv_vs_target_pcc")
    before = _median(rows, "clean_vs_target_pcc")
    if gain is None or gain < MIN_GAIN or after is None or before is None:
        return None
    return (after - before) / gain


def recommend_beta(
    betas: Mapping[str, Mapping[str, object]],
    min_fidelity: float = MIN_FIDELITY,
    undefended: float | None = None,
) -> float | None:
    """The most robust beta (median PCC) among those of median fidelity >= ``min_fidelity``
    that changed a map (a cell whose ``changed`` is false defends nothing), unless it is
    less robust than no defense: below the ``undefended`` robustness by more than
    :data:`SAME_PCC`.

    Among equally robust betas the larger one, which changes the network less.

    Examples
    --------
    >>> cells = {
    ...     "1": {"robustness_pcc": 0.9, "fidelity_pcc": 0.5},
    ...     "5": {"robustness_pcc": 0.7, "fidelity_pcc": 0.95},
    ...     "20": {"robustness_pcc": 0.4, "fidelity_pcc": 0.99},
    ... }
    >>> recommend_beta(cells)
    5.0
    >>> recommend_beta(cells, min_fidelity=0.999) is None
    True
    >>> recommend_beta(cells, undefended=0.8) is None  # beta 5 leaves the map less robust
    True
    """
    fit = [
        (float(cell["robustness_pcc"]), float(beta))
        for beta, cell in betas.items()
        if cell.get("fidelity_pcc") is not None
        and cell.get("robustness_pcc") is not None
        and float(cell["fidelity_pcc"]) >= min_fidelity
        and cell.get("changed", True) is not False
    ]
    if not fit or (undefended is not None and max(fit)[0] < undefended - SAME_PCC):
        return None
    return max(fit)[1]


def beta_key(beta: float) -> str:
    """``beta`` as a short text that reads back as the same number: ``f"{beta:g}"``
    where six digits hold it, else every digit it needs.

    Examples
    --------
    >>> beta_key(10.0), beta_key(0.5), beta_key(3.14159265)
    ('10', '0.5', '3.14159265')
    """
    text = f"{beta:g}"
    return text if float(text) == float(beta) else repr(float(beta))


def check_min_fidelity(value: object) -> float:
    """``value`` as the least median fidelity (PCC) of a recommended beta, in [0, 1].

    Examples
    --------
    >>> check_min_fidelity(0.9)
    0.9
    """
    if not is_number(value) or not 0.0 <= float(value) <= 1.0:
        raise InputError(
            "min_fidelity must be a number from 0 to 1 (a median PCC); "
            f"got {given('min_fidelity', value)}"
        )
    return float(value)


def sweep_summary(
    records: Iterable[Mapping[str, object]],
    min_fidelity: float = MIN_FIDELITY,
) -> dict[str, dict[str, object]]:
    """Median robustness and fidelity per method, defense and beta, and the recommended beta.

    Parameters
    ----------
    records : iterable of dict
        Sweep records with ``method`` (default ``"method"`` when absent),
        ``defense``, ``beta``, ``adv_vs_clean_<m>``, ``clean_vs_orig_<m>`` and
        ``undefended_pcc`` / ``undefended_ssim`` (the undefended map of
        ``x_adv`` against the map of ``x``; one per image is used); with
        ``adv_vs_target_pcc``, ``clean_vs_target_pcc``,
        ``undefended_target_pcc`` and ``undefended_before_pcc`` also the gain
        left.
    min_fidelity : float
        Least median fidelity (PCC) of a recommended beta.

    Returns
    -------
    dict
        ``{method: {"base": str | None, "undefended": {...}, "betas": {beta: {...}},
        "smoothgrad": {beta: {...}}, "recommended_beta": float | None,
        "min_fidelity": float, "defenses": [str, ...]}}``; ``defenses`` names
        the defenses the records hold, in table order (``beta_smooth``,
        ``smoothgrad``, then any other, whose cells are under its own name, see
        :func:`defense_tables`; the tables of the first two are there, empty,
        where they were not swept); ``base`` is the records' ``base``, the
        method the defenses smooth (``gradient`` for the adaptive attacks on
        ``beta_smooth`` and ``smoothgrad``, whose undefended row is then the
        plain gradient map; ``None`` when the records name none); each
        ``{...}`` holds ``n`` and the medians
        ``robustness_pcc``, ``robustness_ssim``, ``fidelity_pcc``,
        ``fidelity_ssim`` (the undefended row: robustness only, fidelity 1);
        a defense's also ``changed``, whether it changed any map.
        Betas are keyed by :func:`beta_key`. The undefended row's
        ``gain_pcc`` is the attack's gain in median PCC to the target (None
        without one, or for an adaptive attack, whose undefended row is the
        base map), each cell's ``gain_left`` the share of it that the defended
        maps still show: (median PCC to the target of the defended map of
        ``x_adv`` - that of ``x``) / ``gain_pcc``, which can fall below 0 or
        exceed 1; ``gain_pcc`` is None too when the gain is at most
        :data:`SAME_PCC`, ``gain_left`` when it is below :data:`MIN_GAIN`.
        ``attacked`` counts the images whose ``x_adv`` differs from ``x``
        (the records' ``attacked``): with none, no beta is recommended;
        otherwise robustness, ``gain_pcc`` and ``gain_left`` are medians over
        those images only, fidelity over all ``n``, as ``robustness_over``
        (:data:`ROBUSTNESS_OVER`) records.

    Examples
    --------
    >>> rows = [
    ...     {"defense": "beta_smooth", "beta": 1.0, "adv_vs_clean_pcc": 0.8,
    ...      "clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.3}
    ... ]
    >>> s = sweep_summary(rows)["method"]
    >>> s["recommended_beta"], s["undefended"]["robustness_pcc"], s["betas"]["1"]["n"]
    (1.0, 0.3, 1)
    """
    min_fidelity = check_min_fidelity(min_fidelity)
    groups: dict[str, dict[tuple[str, float], list[Mapping[str, object]]]] = {}
    for r in records:
        if not isinstance(r.get("beta"), (int, float)) or "defense" not in r:
            continue
        method = str(r.get("method", "method"))
        groups.setdefault(method, {}).setdefault((str(r["defense"]), float(r["beta"])), []).append(
            r
        )
    out: dict[str, dict[str, object]] = {}
    for method, cells in groups.items():
        first = min(cells, key=lambda k: (k[0] != "beta_smooth", k[1]))
        rows = cells[first]
        # An adaptive attack moved the defended map, not the base map of these rows.
        base = rows[0].get("base")
        gain = _gain(rows) if base in (None, method) else None
        table: dict[str, dict[str, dict[str, object]]] = {d: {} for d in PAPER_DEFENSES}
        for (defense, beta), cell_rows in sorted(cells.items(), key=lambda kv: kv[0]):
            table.setdefault(defense, {})[beta_key(beta)] = _cell(cell_rows, gain)
        attacked = sum(map(_was_attacked, rows))
        hit = _attacked(rows)
        undefended: dict[str, object] = {"n": len(rows)}
        for m in SUMMARY_METRICS:
            undefended[f"robustness_{m}"] = _median(hit, f"undefended_{m}")
            undefended[f"fidelity_{m}"] = 1.0
        undefended["gain_pcc"] = gain
        others = sorted(d for d in table if d not in PAPER_DEFENSES)
        check_defense_names(others)
        out[method] = {
            "base": base,
            "undefended": undefended,
            "betas": table["beta_smooth"],
            "smoothgrad": table["smoothgrad"],
            **{d: table[d] for d in others},
            # The defenses swept; the paper's two keep their tables, empty where not swept.
            "defenses": [d for d in (*PAPER_DEFENSES, *others) if table[d]],
            # An attack that changed no image leaves a defense nothing to undo.
            "recommended_beta": (
                recommend_beta(table["beta_smooth"], min_fidelity, _robustness(undefended))
                if attacked
                else None
            ),
            "min_fidelity": float(min_fidelity),
            "attacked": attacked,
            "robustness_over": ROBUSTNESS_OVER,
        }
    return out


def defense_tables(summary: Mapping[str, object]) -> dict[str, Mapping[str, Mapping]]:
    """Each defense's cells in one method's summary, by defense name, in table order.

    Beta-smoothing's cells are under ``betas``, every other defense's under its
    own name; a summary written before it listed its ``defenses`` has the two
    of the paper.

    Examples
    --------
    >>> rows = [
    ...     {"defense": "beta_smooth", "beta": 1.0, "adv_vs_clean_pcc": 0.8},
    ...     {"defense": "median_filter", "beta": 1.0, "adv_vs_clean_pcc": 0.6},
    ... ]
    >>> tables = defense_tables(sweep_summary(rows)["method"])
    >>> {name: list(cells) for name, cells in tables.items()}
    {'beta_smooth': ['1'], 'median_filter': ['1']}
    """
    names = summary.get("defenses") or PAPER_DEFENSES
    return {d: summary.get("betas" if d == "beta_smooth" else d) or {} for d in names}


def partly_attacked(summary: Mapping[str, object]) -> tuple[int, int] | None:
    """``(attacked, n)`` of a method's summary where the attack changed some of its
    ``n`` images but not all, whose robustness is then taken over those alone.

    Examples
    --------
    >>> partly_attacked({"attacked": 2, "undefended": {"n": 4}})
    (2, 4)
    >>> partly_attacked({"attacked": 4, "undefended": {"n": 4}}) is None
    True
    """
    attacked = summary.get("attacked")
    undefended = summary.get("undefended")
    n = undefended.get("n") if isinstance(undefended, Mapping) else None
    if isinstance(attacked, int) and isinstance(n, int) and 0 < attacked < n:
        return attacked, n
    return None


#: Differences of median PCC below this are reported as "about as robust".
SAME_PCC = 0.01
#: The least gain in median PCC to the target of which a share is given: below it, a
#: difference of SAME_PCC in the defended scores moves the share by more than 0.2.
MIN_GAIN = 0.05


def _robustness(cell: Mapping[str, object]) -> float | None:
    value = cell.get("robustness_pcc")
    return None if value is None else float(value)


def verdict(summary: Mapping[str, object]) -> str:
    """One sentence on one method's summary: the recommended beta against no defense.

    Examples
    --------
    >>> s = {"recommended_beta": 5.0, "min_fidelity": 0.9,
    ...      "undefended": {"robustness_pcc": 0.72}, "betas": {"5": {"robustness_pcc": 0.80}}}
    >>> print(verdict(s))  # doctest: +NORMALIZE_WHITESPACE
    recommended beta 5 (most robust with median fidelity >= 0.9):
    robustness 0.800 vs 0.720 undefended, more robust
    """
    threshold = f"median fidelity >= {float(summary.get('min_fidelity', MIN_FIDELITY)):g}"
    rec = summary.get("recommended_beta")
    betas = summary.get("betas") or {}
    unchanged = [b for b, c in betas.items() if c.get("changed", True) is False]
    if summary.get("attacked") == 0:
        return "the attack changed no image, so no defense has anything to undo; none recommended"
    if rec is None and not betas:
        return "beta-smoothing was not swept (--defenses); none recommended"
    faithful = recommend_beta(betas, float(summary.get("min_fidelity", MIN_FIDELITY)))
    plain = _robustness(summary.get("undefended") or {})
    if rec is None and faithful is not None and plain is not None:
        best = _robustness(betas[beta_key(faithful)])
        return (
            f"the most robust beta with {threshold}, {beta_key(faithful)}, leaves the map "
            f"less robust than no defense ({best:.3f} vs {plain:.3f} undefended); "
            "none recommended"
        )
    if rec is None and betas and len(unchanged) == len(betas):
        return (
            "beta-smoothing changed no map at any beta (the model calls no ReLU that it "
            "replaces, or each beta is so large that softplus rounds to ReLU); none recommended"
        )
    if rec is None and unchanged:
        return (
            f"no beta that changed a map has {threshold} (beta {', '.join(unchanged)} "
            "changed none); none recommended"
        )
    if rec is None:
        return f"no beta in the sweep has {threshold}; none recommended"
    ours = summary["betas"][beta_key(rec)].get("robustness_pcc")
    plain = summary["undefended"].get("robustness_pcc")
    text = f"recommended beta {beta_key(rec)} (most robust with {threshold})"
    if ours is None or plain is None:
        return text
    gain = ours - plain
    word = (
        "more robust"
        if gain > SAME_PCC
        else "less robust"
        if gain < -SAME_PCC
        else f"about as robust (within {SAME_PCC:g})"
    )
    text = f"{text}: robustness {ours:.3f} vs {plain:.3f} undefended, {word}"
    left = summary["betas"][beta_key(rec)].get("gain_left")
    if left is None:
        return text
    # Robustness alone can rise while most of the attack's pull to the target stays.
    text = f"{text}; {100 * left:.0f} % of the attack's gain in PCC to the target left"
    if round(100 * left) > 100:
        # The rule chose by robustness and fidelity; this beta undoes none of the pull.
        text += " (more than undefended: under it the attacked map moves further to the target)"
    return text


def _num(value: object) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def format_summary(summary: Mapping[str, Mapping[str, object]]) -> str:
    """The summary as a plain-text table, the recommended beta marked with ``*``.

    Examples
    --------
    >>> rows = [
    ...     {"defense": "beta_smooth", "beta": 1.0, "adv_vs_clean_pcc": 0.8,
    ...      "clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.3}
    ... ]
    >>> print(format_summary(sweep_summary(rows)))  # doctest: +NORMALIZE_WHITESPACE
    method  defense         beta    n  robust pcc  robust ssim  fidel pcc  fidel ssim  gain left
    method  undefended         -    1       0.300            -      1.000       1.000          -
    method  beta_smooth      1 *    1       0.800            -      0.950           -          -
    method: recommended beta 1 (most robust with median fidelity >= 0.9):
    robustness 0.800 vs 0.300 undefended, more robust
    """
    head = ("robust pcc", "robust ssim", "fidel pcc", "fidel ssim", "gain left")
    keys = (*CELL_KEYS, "gain_left")
    width = max([len("method"), *map(len, summary)]) + 2
    names = [d for s in summary.values() for d in defense_tables(s)]
    column = max([len("undefended"), *map(len, names)]) + 4
    lines = ["method".ljust(width) + "defense".ljust(column) + "beta".rjust(6) + "n".rjust(5)]
    lines[0] += "".join(h.rjust(w + 2) for h, w in zip(head, map(len, head)))
    verdicts = []
    for method, s in summary.items():
        rec = s.get("recommended_beta")
        rows = [("undefended", "-", s["undefended"])]
        for defense, cells in defense_tables(s).items():
            rows += [(defense, b, c) for b, c in cells.items()]
        for defense, beta, cell in rows:
            mark = (
                " *" if defense == "beta_smooth" and rec is not None and float(beta) == rec else ""
            )
            line = method.ljust(width) + defense.ljust(column) + f"{beta}{mark}".rjust(6)
            line += str(cell.get("n", "")).rjust(5)
            line += "".join(_num(cell.get(k)).rjust(len(h) + 2) for k, h in zip(keys, head))
            lines.append(line)
        verdicts.append(f"{method}: {verdict(s)}")
        part = partly_attacked(s)
        if part is not None:
            attacked, n = part
            verdicts.append(
                f"{method}: robustness and gain left of the {attacked} of {n} images "
                "the attack changed"
            )
        base = s.get("base")
        if base not in (None, method):
            verdicts.append(
                f"{method}: attacked through its own map, swept on {base}: "
                f"undefended is the plain {base} map of the attacked image"
            )
    return "\n".join(lines + verdicts)
