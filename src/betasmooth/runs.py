"""The jobs of the command line: attack, explain, sweep and curvature over a data set.

Each job turns a model, the data and its settings into work units
(:mod:`betasmooth.units`) whose records and arrays go to a run directory
(:mod:`betasmooth.store`).

Examples
--------
>>> model, x, y = load_inputs("digits-cnn", "digits", n=4)
>>> attack_methods("gradient,lrp")
['gradient', 'lrp']
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from .attack import (
    ATTACK_DEFAULTS,
    GOALS,
    UnchangedWarning,
    attack_defaults,
    attack_options,
    check_attackable,
    check_goal,
    derangement,
    manipulate,
    scoring_options,
)
from .checkpoint import read_npz
from .defense import SWEPT_DEFENSES, check_defenses, defense_sweep
from .distributed import Dist
from .explain import (
    METHODS,
    PREFIXES,
    check_method_input,
    check_model,
    explain,
    is_method,
    select_items,
    wraps_base,
)
from .explain import method_options as options_of
from .explain.noise import base_call
from .geometry import curvature
from .metrics import heatmap
from .recommend import MIN_FIDELITY, sweep_summary
from .smooth import smooth
from .store import (
    AttackBatch,
    ExplainBatch,
    Record,
    RunDir,
    SweepBatch,
    check_batch_file,
)
from .units import Unit, execute, plan, seeded, unit_seed
from .validate import InputError, check_input, silenced, to_numpy
from .zoo import check_compatible, load_data, load_model

__all__ = [
    "attack_methods",
    "attack_run",
    "curvature_run",
    "explain_methods",
    "explain_run",
    "load_inputs",
    "sweep_run",
    "sweep_settings",
    "swept_defenses",
]


class Inputs(tuple):
    """``(model, x, y)`` as :func:`load_inputs` returns them, with what the data say of each item.

    Unpacks like a triple. ``about[i]`` holds the fields that the records of
    item ``i`` carry besides its label: for a folder of images its ``file``
    and ``true_label_name`` (the name of its class folder); empty otherwise.
    ``bounds`` are the data's per-channel ``(low, high)``, ``(1, C, 1, 1)`` each.
    """

    def __new__(
        cls,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        about: Sequence[Mapping[str, object]],
        bounds: tuple[torch.Tensor, torch.Tensor],
    ) -> Inputs:
        inputs = super().__new__(cls, (model, x, y))
        inputs.about = list(about)
        inputs.bounds = bounds
        return inputs


def load_inputs(
    model: str,
    data: str,
    *,
    weights: str | None = None,
    n: int | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    preset: str | None = None,
) -> Inputs:
    """Load a model and the first ``n`` test items, and check that they fit together.

    ``preset`` (a ``torchvision:...`` model spec) prepares the images as those
    weights require; see :func:`betasmooth.zoo.load_data`.

    Everything that can be wrong with user input fails here, before a run
    directory is touched.

    Parameters
    ----------
    model, data : str
        Specs as on the command line (:func:`betasmooth.zoo.load_model`,
        :func:`betasmooth.zoo.load_data`).
    weights : str, optional
        A state dict file for the model (loaded with ``weights_only=True``).
    n : int, optional
        How many test items (default all).
    image_size, channels, mean, std, preset : optional
        How the images are prepared, as :func:`betasmooth.zoo.load_data` takes them.

    Returns
    -------
    Inputs
        ``(model, x, y)``; ``y`` is -1 where the label is unknown; ``.about``
        the file and class name of each item where the data have them.

    Examples
    --------
    >>> model, x, y = load_inputs("digits-cnn", "digits", n=4)
    >>> tuple(x.shape)
    (4, 1, 32, 32)
    """
    if n is not None and n < 1:
        raise InputError(f"-n must be a positive number of images; got {n}")
    net = load_model(model, weights=weights)
    loaded = load_data(
        data,
        "test",
        image_size=image_size,
        channels=channels,
        mean=mean,
        std=std,
        preset=preset,
        n=n,
    )
    x, y = loaded
    about = [loaded.about(i) for i in range(len(x))]
    # The runs call the model directly: the inputs take its dtype (a float64 model).
    x = check_input(net, x)
    classes = check_compatible(net, x).shape[1]
    wrong = (y < -1) | (y >= classes)
    if wrong.any():
        # One logit is no classifier of labelled data; a binary one returns two.
        two = ", or a model of two logits, e.g. torch.cat([-z, z], 1) / 2 for its logit z"
        raise InputError(
            f"{data} has label {int(y[wrong][0])}, but the model has {classes} "
            f"{'class' if classes == 1 else 'classes'}; expected labels 0 to {classes - 1} "
            f"(or -1 for unknown){two if classes == 1 else ''}"
        )
    return Inputs(net, x, y, about, loaded.bounds)


def _split_methods(
    methods: str | Sequence[str], choices: Sequence[str], known: Callable[[str], bool], what: str
) -> list[str]:
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [m.strip() for m in names if m.strip()]
    if names == ["all"]:
        return list(choices)
    if "all" in names:
        raise InputError(f"method 'all' stands alone; got {','.join(names)}")
    unknown = [m for m in names if not known(m)]
    if unknown or not names:
        raise InputError(
            f"unknown method {(unknown or [''])[0]!r}; expected a comma list of "
            f"{', '.join(choices)}, {what}or all"
        )
    twice = [m for i, m in enumerate(names) if m in names[:i]]
    if twice:
        # Refused as a beta given twice is: a typo that would otherwise pass unseen.
        raise InputError(f"methods must differ; {twice[0]!r} is given more than once")
    return names


def attack_methods(methods: str | Sequence[str]) -> list[str]:
    """Check a method list (a comma list or ``all``) against the attackable methods.

    ``all`` is every registered method whose maps are differentiable: the
    built-in ones, with the paper's budgets (:data:`ATTACK_DEFAULTS`), and any
    that a model file registers, with the gradient's
    (:func:`~betasmooth.attack.attack_defaults`). ``captum:NAME`` maps are
    not differentiable, so they cannot be attacked.

    Examples
    --------
    >>> attack_methods("gradient,lrp")
    ['gradient', 'lrp']
    """

    def attackable(name: str) -> bool:
        if is_method(name):
            check_attackable(name)
            return True
        return False

    def differentiable(name: str) -> bool:
        try:
            check_attackable(name)  # a smoothing of a Captum method by default is not
        except InputError:
            return False
        return True

    # The built-in ones in the order of their budgets, as runs have always listed them.
    every = [m for m in dict.fromkeys([*ATTACK_DEFAULTS, *METHODS]) if differentiable(m)]
    return _split_methods(methods, every, attackable, "a registered method, ")


def explain_methods(methods: str | Sequence[str]) -> list[str]:
    """Check a method list (a comma list or ``all``) against the registered methods.

    Names with a registered prefix (``captum:NAME``) are methods too; ``all``
    is every registered method.

    Examples
    --------
    >>> explain_methods("gradient,captum:Saliency")
    ['gradient', 'captum:Saliency']
    """
    prefixed = "".join(f"{p}:NAME, " for p in sorted(PREFIXES))
    return _split_methods(methods, list(METHODS), is_method, prefixed)


def check_methods(
    model: torch.nn.Module,
    methods: Sequence[str],
    method_options: Mapping[str, Mapping[str, object]] | None = None,
    x: torch.Tensor | None = None,
    what: str = "methods",
) -> None:
    """Check before a run that every method can explain ``model`` (see :func:`check_model`),
    and ``x`` where given (see :func:`~betasmooth.explain.check_method_input`); a failure
    names those that can, as ``what`` (the methods, or the sweep's defenses).

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2), torch.nn.Softmax(1))
    >>> check_methods(net, ["gradient", "lrp"])
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: lrp has no rule for module Softmax (2) ...gradient can run
    """
    options = method_options or {}
    failed: dict[str, InputError] = {}
    for method in methods:
        try:
            check_model(model, method, **options.get(method, {}))
            if x is not None:
                check_method_input(x, method, **options.get(method, {}))
        except InputError as err:
            failed.setdefault(method, err)
    if failed:
        err = next(iter(failed.values()))
        # With many methods (``all``) one that cannot would hide those that can.
        fine = [m for m in methods if m not in failed]
        if not fine:
            raise err
        raise type(err)(f"{err}; of the {what} asked for, {','.join(fine)} can run") from None


def _named(
    record: Record,
    classes: Sequence[str] | None,
    about: Sequence[Mapping[str, object]] | None = None,
) -> Record:
    """The record with its labels' class names (``classes``) and its item's file and class."""
    if about is not None:
        record.update(about[int(record["index"])])
    if classes:
        for key in ("label", "label_adv"):
            if isinstance(record.get(key), int) and 0 <= record[key] < len(classes):
                record[f"{key}_name"] = classes[record[key]]
    return record


def _attack_records(
    unit: Unit,
    rows: Sequence[Record],
    targets: torch.Tensor | None,
    y: torch.Tensor,
    classes: Sequence[str] | None,
    about: Sequence[Mapping[str, object]] | None,
) -> list[Record]:
    """The attack's rows, each headed by its index, method, target index and true label."""
    records = []
    for i, r in zip(unit.indices, rows):
        head: Record = {"index": i, "method": unit.method}
        if targets is not None:
            head["target_index"] = int(targets[i])
        head["true_label"] = int(y[i])
        row = {**head, **{k: v for k, v in r.items() if k not in head}}
        records.append(_named(row, classes, about))
    return records


def _options(
    unit: Unit,
    given: dict[str, dict[str, object]] | None,
    seed: int,
    shape: Sequence[int],
    defaults: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """Options of the unit's method: ``defaults``, those ``given`` (an option with one
    value per image of the run's ``x`` of ``shape`` cut to the unit's, see
    :func:`~betasmooth.explain.select_items`), and, for a method that draws noise,
    one seed per item, derived from the item's index and the run's seed (or the seed
    given), so that no draw depends on the batch or the rank; a seed among
    ``defaults`` gives way to the run's."""
    mine = (given or {}).get(unit.method, {})
    options = select_items(unit.method, {**(defaults or {}), **mine}, unit.indices, shape)
    if "seed" in options_of(unit.method):
        base = seed if mine.get("seed") is None else int(mine["seed"])
        options["seed"] = [unit_seed(base, unit.method, i) for i in unit.indices]
    return options


def _seeded(work: Callable[[Unit], object], seed: int, device: torch.device) -> Callable:
    """``work`` with torch's and numpy's global generators seeded per unit from ``seed``
    and its first index: Captum's sampling methods (GradientShap, Lime, ...) and a
    model file's methods draw from them, and a rerun, --resume and torchrun repeat
    their draws."""

    def seeded_work(unit: Unit) -> object:
        with seeded(unit_seed(seed, unit.method, unit.indices[0]), device):
            return work(unit)

    return seeded_work


def attack_run(
    run: RunDir,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    methods: Sequence[str],
    *,
    steps: int | Mapping[str, int] | None = None,
    lr: float | Mapping[str, float] | None = None,
    batch_size: int = 16,
    goal: str = "targeted",
    eps: float | None = None,
    k: int | None = None,
    seed: int = 0,
    data_range: tuple[float | torch.Tensor, float | torch.Tensor] | None = (0.0, 1.0),
    method_options: dict[str, dict[str, object]] | None = None,
    check_every: int | None = None,
    device: torch.device | str = "cpu",
    dist: Dist | None = None,
    progress: bool | None = None,
    save_attributions: bool = False,
    classes: Sequence[str] | None = None,
    about: Sequence[Mapping[str, object]] | None = None,
) -> list[Record]:
    """Attack every item of ``x`` with every method, batch by batch, into ``run``.

    The target map of item ``i`` is the map (by the same method) of item
    ``derangement(len(x), seed)[i]``. Records are those of
    :meth:`betasmooth.attack.ManipulationResult.records` plus ``index``,
    ``target_index``, ``true_label`` and ``seconds``; the arrays of a batch are
    those of :meth:`~betasmooth.attack.ManipulationResult.arrays` plus
    ``index`` and ``target_index``; with ``save_attributions`` also
    ``attr_orig`` and ``attr_adv``, the signed explanations ``(B, C, H, W)``
    of ``x`` and ``x_adv`` on the original network (of the label of ``x``),
    whose heatmaps are the maps. ``steps`` and ``lr`` are one value for all
    methods, one per method, or ``None`` for the attack's defaults. With ``classes``
    (the model's class names) records also hold ``label_name`` and
    ``label_adv_name``; with ``about`` (:attr:`Inputs.about`) the file and
    class name of each item.

    Parameters
    ----------
    run : RunDir
        The run directory; items already in its records are skipped (resume).
    model : torch.nn.Module
        The classifier.
    x, y : torch.Tensor
        Images ``(N, C, H, W)`` and labels ``(N,)`` (``-1`` for unknown).
    methods : sequence of str
        Explanation methods to attack, each on every item.
    steps, lr : int or float, mapping of str to it, or None
        The attack's steps and learning rate.
    batch_size : int
        Items per batch, halved on out-of-memory (:func:`~betasmooth.units.execute`).
    goal : str
        A goal of :data:`~betasmooth.attack.GOALS` (``targeted``, ``topk``, ``center``).
    eps : float, optional
        L-inf budget as a fraction of each channel's data range (the attack's default
        where ``None``: ``8 / 255`` for the untargeted goals, none for targeted).
    k : int, optional
        Top-k size of ``goal="topk"`` and of the ``expl_topk`` scores (10 % of the
        pixels where ``None``).
    seed : int
        Seeds the targets, the attack's noise and SmoothGrad's draws per item.
    data_range : tuple or None
        The data's ``(low, high)``, per channel ``(1, C, 1, 1)``: the attack's clamp.
    method_options : dict, optional
        Options per method (e.g. LRP's box, :func:`~betasmooth.explain.range_options`).
    check_every : int, optional
        Steps between the attack's scorings on the original network
        (:func:`~betasmooth.attack.manipulate`; its default where ``None``).
    device : torch.device or str
        Where to compute.
    dist : Dist, optional
        The torchrun process group; items are shared among the ranks.
    progress : bool, optional
        Progress bars (default: when stderr is a terminal).
    save_attributions : bool
        Also store the signed explanations (see above).
    classes, about : sequence, optional
        Class names, and what the data say of each item (see above).

    Returns
    -------
    list of dict
        On rank 0 every record of the run, sorted by (index, method).

    Examples
    --------
    >>> import tempfile
    >>> model, x, y = load_inputs("digits-cnn", "digits", n=2)
    >>> run = RunDir.create(tempfile.mkdtemp() + "/attack", {"command": "attack"})
    >>> records = attack_run(run, model, x, y, ["gradient"], steps=3)
    >>> [(r["index"], r["target_index"]) for r in records]
    [(0, 1), (1, 0)]
    """
    device = torch.device(device)
    model = model.to(device)
    targeted = GOALS[check_goal(goal)].targeted
    targets = derangement(x.shape[0], seed) if targeted else None
    # Each batch's steps get a bar of their own below the batches' bar.
    steps_bar = (dist is None or dist.rank == 0) and (
        sys.stderr.isatty() if progress is None else progress
    )

    def work(unit: Unit) -> tuple[list[Record], AttackBatch]:
        idx = torch.tensor(unit.indices)
        s = unit_seed(seed, unit.method, unit.indices[0])
        defaults = attack_defaults(unit.method).get("options")
        options = _options(unit, method_options, seed, x.shape, defaults)
        xb = x[idx].to(device)
        target_map = None
        if targets is not None:
            others = targets[idx]
            xt = x[others].to(device)
            # The map the attack moves, of another image: with the attack's options, and
            # the draws of that image's own attack (a method that draws noise).
            own = _options(
                Unit(unit.method, tuple(others.tolist())), method_options, seed, x.shape, defaults
            )
            attacked = attack_options(unit.method, xt, data_range=data_range, method_options=own)
            target_map = heatmap(explain(model, xt, unit.method, **attacked)).detach()
        # The run names unchanged images per method once all batches are done.
        with silenced(UnchangedWarning):
            result = manipulate(
                model,
                xb,
                target_map,
                unit.method,
                goal=goal,
                steps=steps.get(unit.method) if isinstance(steps, Mapping) else steps,
                lr=lr.get(unit.method) if isinstance(lr, Mapping) else lr,
                eps=eps,
                k=k,
                data_range=data_range,
                method_options=options,
                check_every=check_every,
                progress=steps_bar,
                seed=s,
            )
        records = _attack_records(unit, result.records(), targets, y, classes, about)
        batch = AttackBatch(index=np.asarray(unit.indices), **result.arrays())
        if targets is not None:
            batch.target_index = targets[idx].numpy()
        if save_attributions:
            label = result.label.to(device)
            scored = attack_options(
                unit.method, xb, data_range=data_range, method_options=scoring_options(options)
            )
            batch.attr_orig, batch.attr_adv = (
                to_numpy(explain(model, xs, unit.method, label, **scored))
                for xs in (xb, result.x_adv.to(device))
            )
        return records, batch

    units = plan(methods, range(x.shape[0]), batch_size)
    return execute(
        run, units, _seeded(work, seed, device), dist=dist, progress=progress, desc="attack"
    )


def explain_run(
    run: RunDir,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    methods: Sequence[str],
    *,
    batch_size: int = 16,
    seed: int = 0,
    method_options: dict[str, dict[str, object]] | None = None,
    name: str = "results",
    device: torch.device | str = "cpu",
    dist: Dist | None = None,
    progress: bool | None = None,
    save_attributions: bool = False,
    classes: Sequence[str] | None = None,
    about: Sequence[Mapping[str, object]] | None = None,
) -> list[Record]:
    """Explain every item with every method; one record per (index, method).

    Records hold ``index``, ``method``, ``true_label``, ``label`` (the
    predicted class, which is explained), ``logit`` and statistics of the
    heatmap: ``map_max``, ``map_entropy`` (in nats, of the map as a
    distribution over pixels) and ``map_top10_mass`` (mass on the top 10 % of
    pixels); with ``classes`` (the model's class names) also ``label_name``;
    with ``about`` (:attr:`Inputs.about`) the file and class name of each item.
    Arrays: ``index``, ``x``, ``map`` ``(B, H, W)``, and with
    ``save_attributions`` the signed explanation ``attribution`` ``(B, C, H, W)``.

    Parameters
    ----------
    run : RunDir
        The run directory; items already in its records are skipped (resume).
    model : torch.nn.Module
        The classifier.
    x, y : torch.Tensor
        Images ``(N, C, H, W)`` and labels ``(N,)`` (``-1`` for unknown).
    methods : sequence of str
        Explanation methods, each on every item.
    batch_size : int
        Items per batch, halved on out-of-memory (:func:`~betasmooth.units.execute`).
    seed : int
        Seeds each item's draws (SmoothGrad's noise).
    method_options : dict, optional
        Options per method (e.g. LRP's box, :func:`~betasmooth.explain.range_options`).
    name : str
        The records' file stem (``results``; the demo's ``explain``).
    device : torch.device or str
        Where to compute.
    dist : Dist, optional
        The torchrun process group; items are shared among the ranks.
    progress : bool, optional
        Progress bars (default: when stderr is a terminal).
    save_attributions : bool
        Also store the signed explanations (see above).
    classes, about : sequence, optional
        Class names, and what the data say of each item (see above).

    Returns
    -------
    list of dict
        On rank 0 every record of the run, sorted by (index, method).

    Examples
    --------
    >>> import tempfile
    >>> model, x, y = load_inputs("digits-cnn", "digits", n=2)
    >>> run = RunDir.create(tempfile.mkdtemp() + "/explain", {"command": "explain"})
    >>> records = explain_run(run, model, x, y, ["gradient", "lrp"])
    >>> [(r["index"], r["method"]) for r in records]
    [(0, 'gradient'), (0, 'lrp'), (1, 'gradient'), (1, 'lrp')]
    """
    device = torch.device(device)
    model = model.to(device)

    def work(unit: Unit) -> tuple[list[Record], ExplainBatch]:
        idx = torch.tensor(unit.indices)
        xb = x[idx].to(device)
        options = _options(unit, method_options, seed, x.shape)
        with torch.no_grad():
            logits = model(xb)
        label = logits.argmax(1)
        attribution = explain(model, xb, unit.method, label, **options).detach()
        maps = heatmap(attribution)
        flat = maps.flatten(1)
        k = max(1, flat.shape[1] // 10)
        entropy = -(flat * flat.clamp_min(1e-30).log()).sum(1)
        top = flat.topk(k, dim=1).values.sum(1)
        records = [
            _named(
                {
                    "index": i,
                    "method": unit.method,
                    "true_label": int(y[i]),
                    "label": int(label[j]),
                    "logit": float(logits[j, label[j]]),
                    "map_max": float(flat[j].max()),
                    "map_entropy": float(entropy[j]),
                    "map_top10_mass": float(top[j]),
                },
                classes,
                about,
            )
            for j, i in enumerate(unit.indices)
        ]
        batch = ExplainBatch(
            index=np.asarray(unit.indices),
            x=to_numpy(xb),
            map=to_numpy(maps),
            attribution=to_numpy(attribution) if save_attributions else None,
        )
        return records, batch

    units = plan(methods, range(x.shape[0]), batch_size)
    return execute(
        run,
        units,
        _seeded(work, seed, device),
        name=name,
        dist=dist,
        progress=progress,
        desc="explain",
    )


def sweep_run(
    run: RunDir,
    model: torch.nn.Module,
    betas: Sequence[float],
    *,
    methods: Sequence[str] | None = None,
    smoothgrad_n: int = 20,
    defenses: Sequence[str] = SWEPT_DEFENSES,
    seed: int = 0,
    data_range: tuple[float | torch.Tensor, float | torch.Tensor] | None = (0.0, 1.0),
    method_options: dict[str, dict[str, object]] | None = None,
    min_fidelity: float = MIN_FIDELITY,
    device: torch.device | str = "cpu",
    dist: Dist | None = None,
    progress: bool | None = None,
) -> list[Record]:
    """Defense sweep over ``betas`` on every attacked batch of ``run``, into ``sweep.jsonl``.

    Reads ``arrays/<method>-<first>.npz`` (``x``, ``x_adv``, ``map_target``,
    ``index``); records are those of
    :meth:`betasmooth.defense.SweepResult.records` with the run's ``index``,
    the attacked ``method`` and the ``base`` method the defenses smooth.
    Arrays ``arrays/sweep-<method>-<first>.npz`` hold ``index``, ``betas`` and
    the defended maps of ``x_adv``, ``maps_<defense>`` for each defense
    (``maps_beta`` for ``beta_smooth``, :class:`~betasmooth.store.SweepBatch`),
    each ``(B, len(betas), H, W)``, the betas in increasing order. Batches
    already in ``sweep.jsonl`` are skipped, so the sweep is resumable and
    running it twice adds nothing; its settings (``betas``, ``smoothgrad_n``,
    ``min_fidelity``, and ``defenses`` where they are not
    :data:`~betasmooth.defense.SWEPT_DEFENSES`, :func:`sweep_settings`) are
    recorded as ``sweep`` in ``config.json`` once the
    attack's arrays are read, and a run that holds sweep rows of other settings
    is refused
    (:meth:`~betasmooth.store.RunDir.start_sweep`).
    ``method_options`` holds the options each method was attacked with (e.g.
    LRP's bounds, :func:`~betasmooth.explain.range_options`); an attacked
    ``beta_smooth`` or ``smoothgrad`` is swept on its ``base`` with the options
    its own entry gives that base (``base_options`` and the options that are
    not its own, :func:`~betasmooth.explain.noise.base_call`). Rank 0 writes ``sweep_summary.json``:
    median robustness and fidelity per method, defense and beta and the
    recommended beta (:func:`betasmooth.recommend.sweep_summary`).
    SmoothGrad draws per image from a seed of (``seed``, attacked method,
    index), so the records do not depend on the attack's batch size or on
    the ranks; an attacked ``smoothgrad`` draws with its own name, not its
    base's, as the ``method`` of its records says.

    Parameters
    ----------
    run : RunDir
        A finished attack's run directory.
    model : torch.nn.Module
        The model the attack ran on.
    betas : sequence of float
        The sweep's betas (SmoothGrad's noise is matched to each).
    methods : sequence of str, optional
        The attacked methods to sweep; default every method of the run.
    smoothgrad_n : int
        SmoothGrad's samples per image.
    defenses : sequence of str
        Entries of :data:`~betasmooth.defense.DEFENSES`; default the paper's two.
    seed : int
        The run's seed, from which SmoothGrad draws per image.
    data_range : tuple or None
        The data's ``(low, high)``, per channel ``(1, C, 1, 1)``.
    method_options : dict, optional
        The options each method was attacked with (see above).
    min_fidelity : float
        Least median fidelity (PCC) of the recommended beta.
    device : torch.device or str
        Where to compute.
    dist : Dist, optional
        The torchrun process group; batches are shared among the ranks.
    progress : bool, optional
        Progress bars (default: when stderr is a terminal).

    Returns
    -------
    list of dict
        On rank 0 every sweep record of the run.

    Examples
    --------
    >>> import tempfile
    >>> model, x, y = load_inputs("digits-cnn", "digits", n=2)
    >>> run = RunDir.create(tempfile.mkdtemp() + "/attack", {"command": "attack"})
    >>> _ = attack_run(run, model, x, y, ["gradient"], steps=3)
    >>> rows = sweep_run(run, model, [1.0], smoothgrad_n=2)
    >>> sorted({(r["defense"], r["beta"]) for r in rows})
    [('beta_smooth', 1.0), ('smoothgrad', 1.0)]
    """
    device = torch.device(device)
    model = model.to(device)
    attack_records = run.read()
    finished = {(int(r["index"]), str(r["method"])) for r in attack_records}
    if methods is None:
        methods = sorted({m for _, m in finished})
    batches = run.batch_files()
    files = {(m, first): f for m in methods for first, f in batches.get(m, {}).items()}
    attacked = {key: AttackBatch.from_npz(read_npz(f), f) for key, f in files.items()}
    held = {
        (i, key[0])
        for key, batch in attacked.items()
        for i in check_batch_file(files[key], key[1], batch.index)
    }
    lost = sorted(item for item in finished - held if item[1] in methods)
    if lost:
        raise InputError(
            f"the arrays of {len(lost)} finished items of the attack in {run.path} are "
            f"missing or damaged (e.g. {lost[0][1]} item {lost[0][0]}); run the same "
            "betasmooth attack command with --resume, which computes them again, then sweep"
        )
    defenses = check_defenses(defenses)
    # The attack's images, by index: what a per-image option of the run has one row for.
    total = 1 + max((i for i, _ in finished), default=0)

    def swept(method: str, indices: Sequence[int], images: np.ndarray) -> tuple[str, dict]:
        base, base_options = _swept_base(method, method_options)
        return base, select_items(base, base_options, indices, (total, *images.shape[1:]))

    for method in dict.fromkeys(m for m, _ in attacked):
        _check_sweepable(model, defenses, swept, attacked, method, data_range)
    # Recorded once the arrays are known to be whole and the defenses can explain
    # them: a sweep that cannot start leaves config.json as it was.
    run.start_sweep(sweep_settings(betas, smoothgrad_n, min_fidelity, defenses), dist)
    # The arrays hold the betas in increasing order: a sweep resumed with --betas in
    # another order (the same sweep) adds batches whose columns agree with the others'.
    stored = sorted(float(b) for b in betas)
    units = [Unit(m, tuple(int(i) for i in b.index)) for (m, _), b in attacked.items()]
    # The top-k size each method's attack scored with (records before 0.11.0 have none).
    ks = {str(r["method"]): r.get("attack_k") for r in attack_records}

    # A unit halved on out-of-memory starts inside its attack batch: found by any item.
    holding = {(m, int(i)): b for (m, _), b in attacked.items() for i in b.index}

    def work(unit: Unit) -> tuple[list[Record], SweepBatch]:
        batch = holding[(unit.method, unit.indices[0])]
        rows = [[int(i) for i in batch.index].index(i) for i in unit.indices]
        x, x_adv, target_map = (
            torch.from_numpy(a[rows]).to(device) for a in (batch.x, batch.x_adv, batch.map_target)
        )
        base, base_options = swept(unit.method, unit.indices, batch.x)
        result = defense_sweep(
            model,
            x,
            x_adv,
            target_map,
            base,
            betas,
            smoothgrad_n=smoothgrad_n,
            defenses=defenses,
            data_range=data_range,
            method_options=base_options or None,
            seed=[unit_seed(seed, unit.method, i) for i in unit.indices],
            k=ks.get(unit.method),
        )
        records = [
            {"index": unit.indices[r["index"]], "method": unit.method, "base": base}
            | {k: v for k, v in r.items() if k != "index"}
            for r in result.records()
        ]
        return records, SweepBatch(
            np.asarray(unit.indices),
            np.asarray(stored, float),
            {d: _defended(result.maps, d, stored) for d in defenses},
        )

    records = execute(
        run,
        units,
        _seeded(work, seed, device),
        name="sweep",
        dist=dist,
        progress=progress,
        desc="sweep",
        rows_per_item=len(defenses) * len({float(b) for b in betas}),
    )
    if records:
        run.write_sweep_summary(sweep_summary(records, min_fidelity))
    return records


def sweep_settings(
    betas: Sequence[float],
    smoothgrad_n: int,
    min_fidelity: float,
    defenses: Sequence[str] = SWEPT_DEFENSES,
) -> dict[str, object]:
    """The settings of a sweep as ``config.json`` records them under ``sweep``.

    The betas are recorded in increasing order, as the arrays hold them (the
    sweep ``--betas 10,1`` is the sweep ``--betas 1,10``).
    ``defenses`` is recorded, sorted, only where it is not the default
    :data:`~betasmooth.defense.SWEPT_DEFENSES`, so that the settings of a
    default sweep read as those of versions that swept no other;
    ``smoothgrad_n`` only where a defense other than beta-smoothing, which
    draws no samples, is swept (a registered one is given it as ``n``).

    Examples
    --------
    >>> sweep_settings([10, 1], 20, 0.9)
    {'betas': [1.0, 10.0], 'smoothgrad_n': 20, 'min_fidelity': 0.9}
    >>> sweep_settings([1], 20, 0.9, ["smoothgrad", "median_filter"])["defenses"]
    ['median_filter', 'smoothgrad']
    >>> sweep_settings([1], 20, 0.9, ["beta_smooth"])
    {'betas': [1.0], 'min_fidelity': 0.9, 'defenses': ['beta_smooth']}
    """
    settings: dict[str, object] = {"betas": sorted(float(b) for b in betas)}
    if set(defenses) - {"beta_smooth"}:
        settings["smoothgrad_n"] = smoothgrad_n
    settings["min_fidelity"] = min_fidelity
    if set(defenses) != set(SWEPT_DEFENSES):
        settings["defenses"] = sorted(set(defenses))
    return settings


def swept_defenses(settings: object) -> list[str]:
    """The defenses of a sweep from its recorded settings (:func:`sweep_settings`).

    Examples
    --------
    >>> swept_defenses({"betas": [1.0]})
    ['beta_smooth', 'smoothgrad']
    """
    given = settings.get("defenses") if isinstance(settings, Mapping) else None
    return [str(d) for d in given] if isinstance(given, list) and given else list(SWEPT_DEFENSES)


def _swept_base(
    method: str, method_options: Mapping[str, Mapping[str, object]] | None
) -> tuple[str, dict[str, object]]:
    """The method the sweep's defenses smooth for an attacked ``method``, and its options:
    a defense attacked adaptively is swept on the method it smooths."""
    given = dict((method_options or {}).get(method) or {})
    return base_call(method, given) if wraps_base(method) else (method, given)


def _check_sweepable(
    model: torch.nn.Module,
    defenses: Sequence[str],
    swept: Callable[[str, Sequence[int], np.ndarray], tuple[str, dict[str, object]]],
    attacked: Mapping[tuple[str, int], AttackBatch],
    method: str,
    data_range: tuple[float | torch.Tensor, float | torch.Tensor] | None,
) -> None:
    """Check that each defense that is a smoothing method can explain ``model`` on its
    base, and the attacked images of ``method``, before the sweep writes anything: with
    the base's options as :func:`~betasmooth.defense.defense_sweep` gives them (LRP's
    box from ``data_range``), each batch with its images' (``swept``)."""
    smoothing = [d for d in defenses if is_method(d) and wraps_base(d)]
    checked = False
    for (name, _), batch in attacked.items():
        if name != method:
            continue
        base, base_options = swept(method, [int(i) for i in batch.index], batch.x)
        given = attack_options(
            base, torch.from_numpy(batch.x), data_range=data_range, method_options=base_options
        )
        options = {d: {"base": base, "base_options": given or None} for d in smoothing}
        if not checked:
            check_methods(model, smoothing, options, what="defenses")
            checked = True
        for images in (batch.x, batch.x_adv):
            for defense in smoothing:
                check_method_input(torch.from_numpy(images), defense, **options[defense])


def _defended(
    maps: Mapping[tuple[str, float], tuple[torch.Tensor, torch.Tensor]],
    defense: str,
    betas: Sequence[float],
) -> np.ndarray:
    """The defended maps of the attacked images, ``(B, len(betas), H, W)``."""
    return to_numpy(torch.stack([maps[(defense, float(b))][0] for b in betas], 1))


def curvature_run(
    run: RunDir,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    betas: Sequence[float | None],
    *,
    batch_size: int = 16,
    seed: int = 0,
    options: dict[str, object] | None = None,
    device: torch.device | str = "cpu",
    dist: Dist | None = None,
    progress: bool | None = None,
    classes: Sequence[str] | None = None,
    about: Sequence[Mapping[str, object]] | None = None,
) -> list[Record]:
    """Curvature of the model and its beta-smoothed versions at every item.

    ``None`` in ``betas`` stands for the original ReLU network. One record
    per (index, beta): ``index``, ``method`` (``relu`` or ``beta=<b>``),
    ``beta``, ``label`` (the class whose logit is measured: the original
    network's prediction; ``label_name`` where ``classes`` name it),
    ``true_label`` (with ``about``, :attr:`Inputs.about`, the file and class
    name of each item) and every estimate of :func:`betasmooth.geometry.curvature`.

    Parameters
    ----------
    run : RunDir
        The run directory; items already in its records are skipped (resume).
    model : torch.nn.Module
        The classifier.
    x, y : torch.Tensor
        Images ``(N, C, H, W)`` and labels ``(N,)`` (``-1`` for unknown).
    betas : sequence of float or None
        The betas to measure; ``None`` for the ReLU network.
    batch_size : int
        Items per batch, halved on out-of-memory.
    seed : int
        Seeds the random probes of each item, the same for every beta.
    options : dict, optional
        Options of :func:`betasmooth.geometry.curvature` (``iterations``,
        ``probes``, ``data_range``).
    device : torch.device or str
        Where to compute.
    dist : Dist, optional
        The torchrun process group; items are shared among the ranks.
    progress : bool, optional
        Progress bars (default: when stderr is a terminal).
    classes, about : sequence, optional
        Class names, and what the data say of each item (see above).

    Returns
    -------
    list of dict
        On rank 0 every record of the run.

    Examples
    --------
    >>> import tempfile
    >>> model, x, y = load_inputs("digits-cnn", "digits", n=2)
    >>> run = RunDir.create(tempfile.mkdtemp() + "/curvature", {"command": "curvature"})
    >>> rows = curvature_run(run, model, x, y, [None, 1.0], options={"iterations": 3, "probes": 2})
    >>> [(r["index"], r["method"]) for r in rows]
    [(0, 'beta=1'), (0, 'relu'), (1, 'beta=1'), (1, 'relu')]
    """
    device = torch.device(device)
    model = model.to(device)
    nets = {_beta_label(b): (b, model if b is None else smooth(model, b)) for b in betas}

    def work(unit: Unit) -> tuple[list[Record], None]:
        beta, net = nets[unit.method]
        xb = x[torch.tensor(unit.indices)].to(device)
        with torch.no_grad():
            # Every version explains the class the original network predicts.
            label = model(xb).argmax(1)
        # The same probes and start vectors for every beta: the rows of one
        # image differ by the network, not by the draw.
        seeds = [unit_seed(seed, "curvature", i) for i in unit.indices]
        found = curvature(net, xb, label, seed=seeds, **(options or {}))
        records = []
        for j, i in enumerate(unit.indices):
            row: Record = {"index": i, "method": unit.method, "beta": beta}
            row["label"] = int(label[j])
            row["true_label"] = int(y[i])
            row = _named(row, classes, about)
            # item() keeps converged a bool beside the float measurements.
            row.update({k: v[j].item() for k, v in found.items() if torch.is_tensor(v)})
            records.append(row)
        return records, None

    units = plan(list(nets), range(x.shape[0]), batch_size)
    return execute(
        run, units, work, dist=dist, progress=progress, desc="curvature", keeps_arrays=False
    )


def _beta_label(beta: float | None) -> str:
    return "relu" if beta is None else f"beta={beta:g}"
