"""Choose beta for a model: attack a few held-out images briefly, sweep, recommend.

:func:`calibrate_beta` is what ``betasmooth explain --method beta_smooth
--beta auto`` runs: a short targeted attack on the base method of a few
images that are not explained afterwards, a defense sweep over candidate
betas, and the recommendation of :func:`betasmooth.recommend.recommend_beta`
(the most robust beta whose median fidelity is at least ``min_fidelity``,
unless it is less robust than no defense). When no candidate qualifies, the
most faithful one is taken and the result says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .attack import attack_options, manipulate, random_targets
from .defense import check_defendable, defense_sweep, sweep_scales
from .explain import explain
from .metrics import heatmap
from .recommend import MIN_FIDELITY, check_min_fidelity
from .validate import InputError, check_input

__all__ = ["CANDIDATE_BETAS", "Calibration", "calibrate_beta", "check_calibration_count"]

#: Betas tried by :func:`calibrate_beta` unless told otherwise. The built-in
#: models reach a median fidelity of 0.9 at 2 to 10; a network whose layers
#: see small pre-activations may need 50 (photos-cnn up to 0.7.0).
CANDIDATE_BETAS: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)


def check_calibration_count(n: int) -> None:
    """Refuse fewer than the 2 images a calibration needs: each image's target map
    is another image's map.

    Examples
    --------
    >>> check_calibration_count(2)
    """
    if n < 2:
        raise InputError(f"calibrating beta needs at least 2 images; got {n}")


@dataclass
class Calibration:
    """What :func:`calibrate_beta` found.

    Attributes
    ----------
    beta : float
        The chosen beta.
    recommended : bool
        ``True`` when ``beta`` is the recommended one (see
        :func:`~betasmooth.recommend.recommend_beta`); ``False`` when no beta
        met the fidelity threshold, or the most robust that did was less robust
        than no defense, and the most faithful one was taken.
    summary : dict
        The sweep's summary (:meth:`betasmooth.defense.SweepResult.summary`).

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, _ = bs.load_data("digits")
    >>> found = bs.calibrate_beta(model, x[:2], betas=(1.0, 10.0), steps=2)
    >>> found.beta in (1.0, 10.0), sorted(found.summary["betas"])
    (True, ['1', '10'])
    """

    beta: float
    recommended: bool
    summary: dict[str, object]

    def record(self) -> dict[str, object]:
        """A JSON-ready account of the choice, e.g. for ``config.json``: the chosen beta,
        whether it was recommended, and the whole summary, from which
        :func:`~betasmooth.recommend.verdict` gives the same verdict again."""
        return {"beta": self.beta, "recommended": self.recommended, **self.summary}


def calibrate_beta(
    model: nn.Module,
    x: torch.Tensor,
    method: str = "gradient",
    *,
    betas: Sequence[float] = CANDIDATE_BETAS,
    steps: int = 100,
    min_fidelity: float = MIN_FIDELITY,
    data_range: tuple[float, float] | tuple[torch.Tensor, torch.Tensor] | None = (0.0, 1.0),
    method_options: dict[str, object] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Calibration:
    """Beta for beta-smoothing ``method``, calibrated on the images ``x``.

    Each image is attacked (targeted, towards another image's map, ``steps``
    Adam steps) and the defense sweep measures, per beta, robustness
    (defended map of ``x_adv`` against the defended map of ``x``) and
    fidelity (defended map of ``x`` against the undefended one).

    Parameters
    ----------
    model : nn.Module
        Classifier.
    x : torch.Tensor
        At least two held-out images ``(B, C, H, W)``, not those to be explained.
    method : str
        The base method that beta_smooth will smooth.
    betas : sequence of float
        Candidates.
    steps : int
        Attack steps per image.
    min_fidelity : float
        Least median fidelity (PCC) of a recommended beta.
    data_range : tuple, optional
        Bounds of the inputs (floats or per-channel tensors): the attack's
        clamp, and the method's range (LRP's box, ...), as in
        :func:`~betasmooth.attack.attack_options`.
    method_options : dict, optional
        Options of ``method`` (e.g. LRP's ``low`` / ``high``).
    seed : int
        Seeds the targets and the attack.
    progress : bool
        Show progress bars on stderr: the attack's steps, then the sweep's betas.

    Returns
    -------
    Calibration
        The chosen beta, whether it was recommended, and the summary.

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x = bs.load_data("digits", split="train")[0][:4]
    >>> found = calibrate_beta(model, x, betas=[1.0, 20.0], steps=10)
    >>> found.beta in (1.0, 20.0)
    True
    """
    # Everything the sweep and the summary take is checked before the attack runs.
    x = check_input(model, x)
    check_calibration_count(x.shape[0])
    check_defendable(method)
    betas, _ = sweep_scales(betas, None)
    check_min_fidelity(min_fidelity)
    # The map the attack and the sweep see: the attack's defaults, the data's range.
    options = attack_options(method, x, data_range=data_range, method_options=method_options)
    maps = heatmap(explain(model, x, method, **options)).detach()
    targets = random_targets(maps, torch.Generator().manual_seed(seed)).to(x.device)
    attacked = manipulate(
        model,
        x,
        targets,
        method,
        steps=steps,
        data_range=data_range,
        method_options=options,
        seed=seed,
        progress=progress,
    )
    sweep = defense_sweep(
        model,
        x,
        attacked.x_adv.to(x.device),
        targets,
        method,
        list(betas),
        defenses=("beta_smooth",),
        data_range=data_range,
        method_options=options,
        seed=seed,
        progress=progress,
    )
    summary = sweep.summary(min_fidelity)
    best = summary["recommended_beta"]
    if best is not None:
        return Calibration(float(best), True, summary)

    def fidelity(cell: dict) -> float:
        # A median of exactly 0 is a fidelity like any other; only a missing one ranks last.
        return -math.inf if cell["fidelity_pcc"] is None else float(cell["fidelity_pcc"])

    faithful = max(summary["betas"].items(), key=lambda kv: (fidelity(kv[1]), float(kv[0])))
    return Calibration(float(faithful[0]), False, summary)
