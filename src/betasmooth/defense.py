"""Beta-smoothing as a defense against manipulated explanations, beside SmoothGrad.

:func:`defense_sweep` measures how much of an attack survives each defense
over a range of ``beta`` (Dombrowski et al. 2019, Fig. 4 and 7): the defended
map of ``x_adv`` against the original map and the target (robustness), and
the defended map of ``x`` against the undefended one (fidelity).
``beta_smooth`` explains the model with every ReLU computing
``softplus_beta``; ``smoothgrad`` averages the method over logistic noise of
standard deviation ``pi / (sqrt(3) beta)``, the matched scale (a convention:
Theorem 2 matches one layer of weights ``w`` at scale ``1 / (beta |w|)``,
:func:`matched_sigma`). The maps defended are
those :func:`~betasmooth.attack.manipulate` attacked
(:func:`~betasmooth.attack.attack_options`); the medians and the recommended
beta come from :mod:`betasmooth.recommend`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import metrics
from .attack import (
    Bound,
    attack_options,
    check_method_name,
    check_target_map,
    resolve_range,
)
from .explain import explain, select_items, wraps_base
from .explain.gradient import predict
from .metrics import heatmap
from .recommend import MIN_FIDELITY, PAPER_DEFENSES, check_defense_names, sweep_summary
from .smooth import check_beta, flush_denormals, logistic_std, relu_calls
from .validate import (
    InputError,
    InputTypeError,
    check_batch,
    check_choice,
    check_form,
    check_in_range,
    check_input,
    check_positive,
    evaluating,
    item_seeds,
    one_at_a_time,
)

__all__ = [
    "DEFENSES",
    "SWEPT_DEFENSES",
    "check_defenses",
    "SweepResult",
    "check_defendable",
    "defense_sweep",
    "matched_sigma",
    "sweep_scales",
]


def check_defendable(method: object) -> None:
    """Refuse a method that is itself a defense (it wraps a base method).

    Examples
    --------
    >>> check_defendable("lrp")
    >>> check_defendable("smoothgrad")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: smoothgrad is itself a smoothing of a base method, ...
    """
    check_method_name(method)
    if wraps_base(method):
        raise InputError(
            f"{method} is itself a smoothing of a base method, which the defenses wrap; "
            "expected the base method, such as gradient or lrp (the command line's sweep "
            "sweeps such runs on it)"
        )


# Fields that name a sweep row rather than measure it.
_SWEEP_IDS = ("defense", "beta", "index", "sigma")


@dataclass
class SweepResult:
    """What :func:`defense_sweep` returns.

    Attributes
    ----------
    rows : list of dict
        One per (image, defense, beta); see :meth:`records`.
    maps : dict
        ``(defense, beta) -> (map of x_adv, map of x)``, each ``(B, H, W)``.

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, _ = bs.load_data("digits")
    >>> target_map = bs.heatmap(bs.explain(model, x[:2], "gradient")).roll(1, 0)
    >>> x_adv = bs.manipulate(model, x[:2], target_map, "gradient", steps=2).x_adv
    >>> sweep = bs.defense_sweep(
    ...     model, x[:2], x_adv, target_map, "gradient", [1.0, 10.0], smoothgrad_n=4
    ... )
    >>> len(sweep.rows), sorted(sweep.maps)  # 2 images x 2 defenses x 2 betas
    (8, [('beta_smooth', 1.0), ('beta_smooth', 10.0), ('smoothgrad', 1.0), ('smoothgrad', 10.0)])
    >>> sorted(sweep.summary())  # doctest: +NORMALIZE_WHITESPACE
    ['attacked', 'base', 'betas', 'defenses', 'min_fidelity', 'recommended_beta',
     'robustness_over', 'smoothgrad', 'undefended']
    """

    rows: list[dict[str, object]]
    maps: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]]

    def records(self) -> list[dict[str, object]]:
        """One dict per (image, defense, beta).

        Keys: ``index``, ``defense`` (``beta_smooth`` or ``smoothgrad``),
        ``beta``, ``sigma`` (SmoothGrad's noise standard deviation, ``None``
        for beta_smooth), ``adv_vs_orig_<m>``, ``adv_vs_target_<m>``,
        ``adv_vs_clean_<m>`` (robustness: defended map of ``x_adv`` against
        the defended map of ``x``), ``clean_vs_orig_<m>`` (fidelity: the
        defended map of ``x`` against the undefended one),
        ``clean_vs_target_<m>`` (the defended map of ``x`` against the target:
        the attack's gain under the defense is ``adv_vs_target`` less this) and
        ``undefended_<m>`` (the undefended map of ``x_adv`` against the map of
        ``x``, the same in every row of an image) for every metric ``m`` of
        :func:`betasmooth.compare`; ``undefended_target_pcc`` and
        ``undefended_before_pcc`` (the undefended maps of ``x_adv`` and of ``x``
        against the target: the attack's gain without a defense); ``changed``,
        whether the defense changed the map of ``x`` or of ``x_adv`` at all
        (not where beta-smoothing finds no ReLU to replace); ``attacked``,
        whether ``x_adv`` differs from ``x`` at all; and ``seconds``: the time
        per image for both maps (of ``x_adv`` and ``x``).
        """
        return list(self.rows)

    def summary(self, min_fidelity: float = MIN_FIDELITY) -> dict[str, object]:
        """Median robustness and fidelity per defense and beta, and the recommended beta.

        See :func:`betasmooth.recommend.sweep_summary`: ``{"undefended": ...,
        "betas": {beta: ...}, "smoothgrad": {beta: ...}, "recommended_beta":
        float or None, "min_fidelity": ..., "defenses": [...]}``, another
        defense's cells under its name (:func:`~betasmooth.recommend.defense_tables`).

        Examples
        --------
        >>> rows = [
        ...     {"defense": "beta_smooth", "beta": 1.0, "adv_vs_clean_pcc": r,
        ...      "clean_vs_orig_pcc": 0.95, "undefended_pcc": 0.3}
        ...     for r in (0.7, 0.9)
        ... ]
        >>> summary = SweepResult(rows, {}).summary()
        >>> summary["betas"]["1"]["robustness_pcc"], summary["recommended_beta"]
        (0.8, 1.0)
        """
        return sweep_summary(self.rows, min_fidelity)["method"]

    def medians(self) -> list[dict[str, object]]:
        """Median of every number over the images, one dict per (defense, beta).

        Over every image, those the attack left unchanged (``attacked`` false)
        included, where :meth:`summary` takes robustness over the changed ones.

        Examples
        --------
        >>> rows = [
        ...     {"index": i, "defense": "smoothgrad", "beta": 1.0, "sigma": 1.8,
        ...      "adv_vs_clean_pcc": r}
        ...     for i, r in enumerate((0.2, 0.4, 0.9))
        ... ]
        >>> SweepResult(rows, {}).medians()
        [{'defense': 'smoothgrad', 'beta': 1.0, 'n': 3, 'adv_vs_clean_pcc': 0.4, 'sigma': 1.8}]
        """
        groups: dict[tuple[str, float], list[dict[str, object]]] = {}
        for row in self.rows:
            groups.setdefault((row["defense"], row["beta"]), []).append(row)
        out = []
        for (defense, beta), rows in groups.items():
            keys = [k for k, v in rows[0].items() if k not in _SWEEP_IDS and isinstance(v, float)]
            head = {"defense": defense, "beta": beta, "n": len(rows)}
            out.append({**head, **metrics.medians(rows, keys), "sigma": rows[0]["sigma"]})
        return out


def _beta_smooth_maps(
    model: nn.Module,
    xs: torch.Tensor,
    method: str,
    label: torch.Tensor,
    beta: float,
    base_options: dict[str, object] | None = None,
    **_: object,
) -> torch.Tensor:
    return heatmap(
        explain(model, xs, "beta_smooth", label, base=method, beta=beta, base_options=base_options)
    )


def _smoothgrad_maps(
    model: nn.Module,
    xs: torch.Tensor,
    method: str,
    label: torch.Tensor,
    beta: float,
    *,
    sigma: float,
    n: int,
    seed: int | list[int],
    input_range: float,
    base_options: dict[str, object] | None = None,
) -> torch.Tensor:
    return heatmap(
        explain(
            model,
            xs,
            "smoothgrad",
            label,
            base=method,
            base_options=base_options,
            n=n,
            sigma=sigma,
            noise="logistic",
            input_range=input_range,
            seed=seed,
        )
    )


#: Defenses compared by :func:`defense_sweep`: name -> maps of a batch at one beta.
DEFENSES: dict[str, Callable[..., torch.Tensor]] = {
    "beta_smooth": _beta_smooth_maps,
    "smoothgrad": _smoothgrad_maps,
}

#: How :func:`defense_sweep` calls a defense; it returns maps ``(2B, H, W)``.
DEFENSE_FORM = "fn(model, xs, method, label, beta, *, sigma, n, seed, input_range, base_options)"
_DEFENSE_KEYWORDS = ("sigma", "n", "seed", "input_range", "base_options")

#: The defenses :func:`defense_sweep` and ``betasmooth sweep`` run by default, those of
#: the paper. Another entry of :data:`DEFENSES` runs where ``defenses`` (``--defenses``)
#: names it, and has its own table in the summary and the report.
SWEPT_DEFENSES: tuple[str, ...] = PAPER_DEFENSES


def matched_sigma(beta: float) -> float:
    """SmoothGrad's noise scale matched to ``beta``: ``pi / (sqrt(3) beta)``.

    The standard deviation of the logistic density ``p_beta``, relative to an
    input range of 1. Theorem 2 matches beta-smoothing of one layer of weights
    ``w`` with noise of scale ``1 / (beta |w|)``; a deep network has no single
    ``|w|``, so this match, ``|w| = 1``, is a convention.

    Examples
    --------
    >>> round(matched_sigma(1.0), 4)
    1.8138
    """
    return logistic_std(beta)


@one_at_a_time
def defense_sweep(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    target_map: torch.Tensor,
    method: str,
    betas: Sequence[float],
    *,
    smoothgrad_sigmas: Sequence[float] | None = None,
    smoothgrad_n: int = 20,
    defenses: Sequence[str] = SWEPT_DEFENSES,
    data_range: tuple[Bound, Bound] | None = (0.0, 1.0),
    method_options: dict[str, object] | None = None,
    seed: int | Sequence[int] = 0,
    k: int | None = None,
    progress: bool = False,
) -> SweepResult:
    """How much of a manipulation survives beta-smoothing, and SmoothGrad, at each beta.

    For each beta and defense: the defended map of ``x_adv`` against the
    original map (the undefended map of ``x``) and against the target, and the
    defended map of ``x`` against the original map (Dombrowski et al. 2019,
    Fig. 4 and 7). ``beta_smooth`` is the method on the model with
    ``softplus_beta``; ``smoothgrad`` averages the method over
    ``smoothgrad_n`` logistic draws: by default of the standard deviation of
    ``p_beta``, ``pi / (sqrt(3) beta)`` in the units of the model's input
    (the matched scale, :func:`matched_sigma`); with ``smoothgrad_sigmas`` given, of standard
    deviation ``sigma`` times ``data_range``. Every map explains the
    prediction on ``x``.

    Parameters
    ----------
    model : nn.Module
        Classifier.
    x, x_adv : torch.Tensor
        Clean and manipulated batch ``(B, C, H, W)``.
    target_map : torch.Tensor
        The attack's targets ``(B, H, W)``.
    method : str
        Base explanation method, e.g. ``gradient`` or ``lrp``.
    betas : sequence of float
        Sharpness values, > 0, in :data:`~betasmooth.smooth.BETA_RANGE`.
    smoothgrad_sigmas : sequence of float, optional
        SmoothGrad noise scales, one per beta; default :func:`matched_sigma`.
    smoothgrad_n : int
        SmoothGrad samples.
    defenses : sequence of str
        Non-empty selection of :data:`DEFENSES`; default
        :data:`SWEPT_DEFENSES`, ``beta_smooth`` and ``smoothgrad``. A defense
        registered there is called as they are, ``fn(model, xs, method, label,
        beta, *, sigma, n, seed, input_range, base_options)`` with ``xs`` the
        attacked images then the clean ones, and returns their maps ``(2B, H, W)``.
    data_range : tuple of float or torch.Tensor, or None
        Input range for SmoothGrad's noise given by ``smoothgrad_sigmas``
        (per channel for ``(1, C, 1, 1)`` bounds); ``None`` per image. The
        matched noise (the default) has the standard deviation of
        ``p_beta`` in the units of the model's input, whatever the range.
        As in :func:`~betasmooth.attack.manipulate`, ``x`` and ``x_adv`` must lie inside it,
        and it gives LRP's z^B box and the baseline of integrated gradients
        unless ``method_options`` does (:func:`~betasmooth.attack.attack_options`).
    method_options : dict, optional
        Options of the base method, e.g. ``{"composite": "epsilon_plus_flat"}``
        for LRP; used for every map. Options left out take
        the values :func:`~betasmooth.attack.manipulate` attacks by default
        (:data:`~betasmooth.attack.ATTACK_DEFAULTS`: integrated gradients with 30 points), so
        that the undefended maps are the maps the attack moved.
    seed : int or sequence of int
        Fixes SmoothGrad's draws: one seed, from which each image's seed is
        drawn, or one seed per image, whose draws then do not depend on the
        batch it is in. Either way an image and its attacked copy share their
        draws, so that the sampling noise does not count as a change of the map.
    k : int, optional
        Top-k size of the ``topk`` scores (:func:`~betasmooth.metrics.compare`);
        the attack's, where it was given one.
    progress : bool
        Show a progress bar.

    Returns
    -------
    SweepResult
        Records per (image, defense, beta) and the defended maps.

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x = bs.load_data("digits")[0][:2]
    >>> maps = bs.heatmap(bs.explain(model, x, "gradient"))
    >>> result = bs.manipulate(model, x, maps.flip(0), "gradient", steps=5)
    >>> sweep = bs.defense_sweep(model, x, result.x_adv, maps.flip(0), "gradient", [0.5, 1.0])
    >>> len(sweep.records())  # 2 images x 2 defenses x 2 betas
    8
    """
    check_defendable(method)
    target_map = _check_sweep_inputs(x, x_adv, target_map)
    betas, sigmas = sweep_scales(betas, smoothgrad_sigmas)
    defenses = check_defenses(defenses)
    # In the model's dtype, as explain and manipulate take them (float64 on a
    # float32 model met the model's weights as a raw dtype error).
    x = check_input(model, x)
    x_adv = check_input(model, x_adv.to(device=x.device), "x_adv")
    # The same checks as manipulate's: the range is valid and holds both batches.
    if data_range is not None:
        box = resolve_range(data_range, x)
        check_in_range(x, *box)
        check_in_range(x_adv, *box, "x_adv")
    options = attack_options(method, x, data_range=data_range, method_options=method_options)
    # The defenses explain x_adv and x in one batch: a per-image option twice over.
    options = select_items(method, options, [*range(x.shape[0])] * 2, x.shape)
    input_range = _input_range(data_range, x) if smoothgrad_sigmas is not None else 1.0
    seeds = _sweep_seeds(seed, x.shape[0])
    k = metrics.resolve_k(k, *x.shape[2:])

    # In evaluation mode, as explain and manipulate: the labels and maps of the
    # deployed model, and no update of its BatchNorm statistics.
    with evaluating(model), flush_denormals():
        label = predict(model, x)
        both = torch.cat([x_adv, x])
        # Whether beta-smoothing reaches a ReLU that these images pass through decides
        # whether it changed anything: a GELU network's maps still differ in their last
        # bits with its override on (no fused attention kernel).
        smoothable = "beta_smooth" not in defenses or relu_calls(model, both) > 0
        # In the batch the defenses explain: a map can differ in its last bits
        # between batches of other sizes.
        plain = explain(model, both, method, label.repeat(2), **options)
        map_plain, map_orig = heatmap(plain).detach().chunk(2)
        undefended = {
            f"undefended_{m}": v for m, v in metrics.compare(map_plain, map_orig, k=k).items()
        }
        # The attack's gain in PCC to the target, without a defense: what a defense undoes.
        undefended["undefended_target_pcc"] = metrics.pcc(map_plain, target_map)
        undefended["undefended_before_pcc"] = metrics.pcc(map_orig, target_map)
        attacked = [not torch.equal(a, b) for a, b in zip(x_adv, x)]
        rows: list[dict[str, object]] = []
        kept_maps: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]] = {}
        jobs = [(d, b, s) for d in defenses for b, s in zip(betas, sigmas)]
        for defense, beta, sigma in tqdm(jobs, desc="defense sweep", disable=not progress):
            start = time.perf_counter()
            maps = DEFENSES[defense](
                model,
                both,
                method,
                label.repeat(2),
                beta,
                sigma=sigma,
                n=smoothgrad_n,
                seed=seeds,
                input_range=input_range,
                base_options=options,
            )
            maps = _checked_maps(defense, maps, (2 * x.shape[0], *x.shape[2:]))
            seconds = (time.perf_counter() - start) / x.shape[0]
            adv, clean = maps.chunk(2)
            kept_maps[(defense, beta)] = (adv.cpu(), clean.cpu())
            head = {
                "defense": defense,
                "beta": beta,
                "sigma": sigma if defense == "smoothgrad" else None,
            }
            scores = {**_defense_scores(adv, clean, map_orig, target_map, k), **undefended}
            # A network whose ReLUs beta-smoothing cannot reach (GELU, attention)
            # gets the undefended maps back: no beta of it is a defense.
            untouched = defense == "beta_smooth" and not smoothable
            same = [
                untouched
                or (torch.equal(clean[i], map_orig[i]) and torch.equal(adv[i], map_plain[i]))
                for i in range(x.shape[0])
            ]
            rows += [
                {
                    "index": i,
                    **head,
                    **{k: float(v[i]) for k, v in scores.items()},
                    "changed": not same[i],
                    "attacked": attacked[i],
                    "seconds": seconds,
                }
                for i in range(x.shape[0])
            ]
    return SweepResult(rows, kept_maps)


def _check_sweep_inputs(
    x: torch.Tensor, x_adv: torch.Tensor, target_map: torch.Tensor
) -> torch.Tensor:
    check_batch(x, "x", min_dim=4)
    check_batch(x_adv, "x_adv", min_dim=4)
    if x_adv.shape != x.shape:
        raise InputError(
            f"x_adv must have the shape of x, {tuple(x.shape)}; got {tuple(x_adv.shape)}"
        )
    return check_target_map(target_map, x)


def _sequence(name: str, values: object, what: str, example: str) -> list[object]:
    """``values`` as a list; a string or a single number is refused, not iterated."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InputTypeError(
            f"{name} must be a sequence of {what}, e.g. {example}; "
            f"got {type(values).__name__} {values!r}"
        )
    return list(values)


def sweep_scales(
    betas: Sequence[float], smoothgrad_sigmas: Sequence[float] | None
) -> tuple[list[float], list[float]]:
    """The betas, and SmoothGrad's noise level for each: given, or matched to beta.

    Examples
    --------
    >>> betas, sigmas = sweep_scales([1, 10], None)
    >>> betas, [round(s, 4) for s in sigmas]  # pi / (sqrt(3) beta)
    ([1.0, 10.0], [1.8138, 0.1814])
    >>> sweep_scales([1, 10], [0.1, 0.2])
    ([1.0, 10.0], [0.1, 0.2])
    """
    betas = [
        check_positive("beta", b)
        for b in _sequence("betas", betas, "positive numbers", "[0.5, 1, 2, 5]")
    ]
    if not betas:
        raise InputError("betas must hold at least one positive number, e.g. [0.5, 1, 2, 5]")
    for beta in betas:
        check_beta(beta)
    if len(set(map(float, betas))) < len(betas):
        # Each would add the same images again to its beta's medians.
        twice = sorted({float(b) for b in betas if betas.count(b) > 1})
        raise InputError(
            f"betas must differ; {', '.join(f'{b:g}' for b in twice)} given more than once"
        )
    if smoothgrad_sigmas is None:
        return betas, [matched_sigma(b) for b in betas]
    sigmas = _sequence("smoothgrad_sigmas", smoothgrad_sigmas, "positive numbers", "[0.1, 0.2]")
    sigmas = [check_positive("smoothgrad_sigmas", s) for s in sigmas]
    if len(sigmas) != len(betas):
        raise InputError(
            f"smoothgrad_sigmas must hold one value per beta ({len(betas)}); got {len(sigmas)}"
        )
    return betas, sigmas


def check_defenses(defenses: object) -> list[str]:
    """Check that ``defenses`` names entries of :data:`DEFENSES`, at least one.

    Examples
    --------
    >>> check_defenses(["smoothgrad"])
    ['smoothgrad']
    >>> check_defenses(["median"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: unknown defense 'median'; expected one of: beta_smooth, ...
    """
    names = _sequence("defenses", defenses, "names", "['beta_smooth', 'smoothgrad']")
    if not names:
        raise InputError(
            f"defenses must name at least one of: {', '.join(sorted(DEFENSES))}; got none"
        )
    names = list(dict.fromkeys(check_choice("defense", d, DEFENSES) for d in names))
    check_defense_names(names)
    for name in names:
        check_form(f"defense {name!r}", DEFENSES[name], 5, _DEFENSE_KEYWORDS, DEFENSE_FORM)
    if "beta" in names:
        # A sweep's arrays hold each defense's maps as maps_<name>, beta-smoothing's as maps_beta.
        raise InputError(
            "defense 'beta' has the name of beta_smooth's maps in a sweep's arrays (maps_beta); "
            "expected another name"
        )
    return names


def _checked_maps(defense: str, maps: object, shape: tuple[int, ...]) -> torch.Tensor:
    """A defense's maps, detached, or one line naming the defense that returned others:
    an entry registered in :data:`DEFENSES` returns the maps of the attacked images,
    then the clean ones."""
    if not isinstance(maps, torch.Tensor) or tuple(maps.shape) != shape:
        got = (
            f"shape {tuple(maps.shape)}" if isinstance(maps, torch.Tensor) else type(maps).__name__
        )
        raise InputError(
            f"defense {defense!r} returned {got}; expected maps of shape {shape}, the "
            "attacked images' then the clean ones' (2B, H, W) as a torch.Tensor"
        )
    if not bool(torch.isfinite(maps).all()):
        # Every score of the sweep would be NaN, far from its cause.
        raise InputError(f"defense {defense!r} returned maps with NaN or inf; expected finite maps")
    return maps.detach()


def _sweep_seeds(seed: object, batch: int) -> list[int]:
    """SmoothGrad's seeds for the batch of ``x_adv`` and ``x``: each image's twice."""
    seeds = item_seeds(seed, batch)
    # x_adv and x go through the defenses as one batch; each image's copies share its draws.
    return [*seeds, *seeds]


def _defense_scores(
    adv: torch.Tensor,
    clean: torch.Tensor,
    map_orig: torch.Tensor,
    target_map: torch.Tensor,
    k: int,
) -> dict[str, torch.Tensor]:
    """Defended maps of ``x_adv`` and ``x`` against the original map, the target and each other."""
    parts = {
        "adv_vs_orig": (adv, map_orig),
        "adv_vs_target": (adv, target_map),
        "adv_vs_clean": (adv, clean),
        "clean_vs_orig": (clean, map_orig),
        # The baseline of adv_vs_target: the defense alone moves the map of x
        # too, so the attack's gain under it starts from here.
        "clean_vs_target": (clean, target_map),
    }
    return {
        f"{prefix}_{m}": v
        for prefix, (a, b) in parts.items()
        for m, v in metrics.compare(a, b, k=k).items()
    }


def _input_range(data_range: object, x: torch.Tensor) -> float | torch.Tensor | None:
    if data_range is None:
        return None
    low, high = resolve_range(data_range, x)
    span = high - low
    return span if torch.is_tensor(span) else float(span)
