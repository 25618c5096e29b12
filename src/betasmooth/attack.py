"""Manipulation attacks on explanations: targeted, top-k and centre of mass.

Targeted attack (Dombrowski et al. 2019): move ``x`` so that its explanation
map approaches a target map while the output stays put,

    loss = w_e * MSE(heatmap(x_adv), target) + w_o * MSE(softmax(x_adv), softmax(x)),

minimised by Adam on ``x_adv``, clamped to the data range after each step.
The paper's settings are for VGG16 on ImageNet-normalised 224 x 224 inputs
and 1000 classes; :func:`default_lr` and :func:`default_weights` keep its
step relative to the data range, its reach in a shorter budget and the
balance of the two terms for any input range, map size and class count.
The second derivative of a ReLU network is zero almost everywhere, so during
the attack every ReLU computes ``softplus_beta`` with ``beta`` growing
geometrically (10 -> 100 by default); the final maps come from the original
network. Untargeted attacks (Ghorbani et al. 2019) take signed steps in an
L-infinity ball that remove the map mass from the original top-k pixels
(``goal="topk"``) or push its centre of mass away (``goal="center"``).

Everything is batched: each image has its own loss, its own label check and
its own best iterate. Adam and signed steps act per element, so a batch
follows the same path as its images one at a time (in float64 to rounding;
in float32 a gradient near zero can change sign, and a pixel then moves by
about one step more or less).

How much of an attack survives beta-smoothing is measured in
:mod:`betasmooth.defense`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import metrics
from .explain import (
    RESERVED,
    explain,
    forwards_once,
    is_differentiable,
    is_method,
    range_options,
    with_base_range,
    wraps_base,
)
from .explain import method_options as options_of
from .explain.gradient import detached_message
from .metrics import heatmap
from .smooth import (
    check_beta,
    check_overridable,
    flush_denormals,
    is_smoothed,
    replace_relu,
    softplus,
)
from .validate import (
    MAX_SEED,
    InputError,
    InputTypeError,
    check_batch,
    check_bounds,
    check_choice,
    check_count,
    check_in_range,
    check_input,
    check_map_batch,
    check_module,
    check_positive,
    check_seed,
    check_target,
    check_uncompiled,
    evaluating,
    is_number,
    one_at_a_time,
    to_numpy,
    warn_user,
)

__all__ = [
    "ATTACK_DEFAULTS",
    "Bound",
    "GOALS",
    "LOSSES",
    "Goal",
    "ManipulationResult",
    "UNTARGETED_STEPS",
    "UnchangedWarning",
    "attack_defaults",
    "attack_options",
    "beta_at",
    "check_attack_model",
    "check_attackable",
    "check_goal",
    "check_method_name",
    "check_target_map",
    "default_lr",
    "default_weights",
    "derangement",
    "keep_best",
    "manipulate",
    "random_targets",
    "recorded_goal",
    "resolve_range",
    "scoring_options",
]


class UnchangedWarning(UserWarning):
    """:func:`manipulate` changed no image: no step improved the map and kept the label.

    A run (``betasmooth attack``) says so in its own words per method, over all
    its batches, and leaves this warning out.
    """


# The paper's budget per method (Dombrowski et al. 2019, VGG16): steps, Adam
# learning rate (in ImageNet-normalised units; default_lr translates it to
# other data ranges and budgets), beta schedule during the attack and method
# options. LRP's rules make its map differentiable on the ReLU network itself.
ATTACK_DEFAULTS: dict[str, dict[str, object]] = {
    "gradient": {"steps": 1500, "lr": 1e-3, "beta_schedule": "geometric"},
    "input_x_gradient": {"steps": 1500, "lr": 1e-3, "beta_schedule": "geometric"},
    "integrated_gradients": {
        "steps": 500,
        "lr": 5e-3,
        "beta_schedule": "geometric",
        "options": {"steps": 30},
    },
    "lrp": {"steps": 1500, "lr": 2e-4, "beta_schedule": "none"},
    "guided_backprop": {"steps": 1500, "lr": 1e-3, "beta_schedule": "geometric"},
    # Adaptive attacks on the defenses, through their own maps. beta_smooth is
    # smooth already; SmoothGrad of a ReLU network is piecewise constant in x
    # for fixed draws and needs the surrogate like the gradient.
    "beta_smooth": {
        "steps": 1500,
        "lr": 1e-3,
        "beta_schedule": "none",
        "options": {"beta": 0.8},
    },
    "smoothgrad": {
        "steps": 1500,
        "lr": 1e-3,
        "beta_schedule": "geometric",
        "options": {"n": 10, "seed": 0},
    },
}
_FALLBACK: dict[str, object] = {"steps": 1500, "lr": 1e-3, "beta_schedule": "geometric"}


def attack_defaults(method: str) -> dict[str, object]:
    """The attack's budget of ``method``: a copy of its entry in :data:`ATTACK_DEFAULTS`,
    or, for a method without one (a registered method), of the gradient's.

    Examples
    --------
    >>> attack_defaults("lrp")["lr"], attack_defaults("my_method")["steps"]
    (0.0002, 1500)
    """
    return copy.deepcopy(ATTACK_DEFAULTS.get(method, _FALLBACK))


#: The paper's prefactors ``(w_e, w_o)`` for 224 x 224 maps and 1000 classes.
PAPER_WEIGHTS = (1e11, 1e6)
PAPER_PIXELS = 224 * 224
PAPER_CLASSES = 1000
#: Width of the paper's input range: ImageNet-normalised pixels span 1 / std
#: per channel (mean over RGB), and its learning rates are steps in those units.
PAPER_SPAN = (1 / 0.229 + 1 / 0.224 + 1 / 0.225) / 3

#: Steps between scorings of the targeted attack's iterates on the original network.
CHECK_EVERY = 10

#: Untargeted attacks: steps, and the L-inf budget as a fraction of the data range.
UNTARGETED_STEPS = 100
UNTARGETED_EPS = 8 / 255
#: Signed step as a fraction of ``eps``.
UNTARGETED_STEP = 0.1


def default_weights(height: int, width: int, classes: int = PAPER_CLASSES) -> tuple[float, float]:
    """The loss prefactors ``(w_e, w_o)`` for maps of ``height x width`` pixels.

    Maps sum to 1, so a pixel holds about ``1 / (H W)`` and the mean squared
    difference of two maps scales like ``1 / (H W)^2``. Scaling the paper's
    ``w_e = 1e11`` (224 x 224) by ``(H W / 224^2)^2`` keeps the balance of the
    two loss terms at any size. The output term is a mean over the classes of
    the squared change of the softmax probabilities; a change moves a few
    probabilities whatever the number of classes, so that mean scales like
    ``1 / classes`` and the paper's ``w_o = 1e6`` (1000 ImageNet classes)
    becomes ``1e6 * classes / 1000``.

    Parameters
    ----------
    height, width : int
        Map size in pixels.
    classes : int
        Number of logits.

    Returns
    -------
    tuple of float
        ``(w_e, w_o)``.

    Examples
    --------
    >>> default_weights(224, 224)
    (100000000000.0, 1000000.0)
    >>> w_e, w_o = default_weights(32, 32, classes=10)
    >>> f"{w_e:.3g} {w_o:.3g}"
    '4.16e+07 1e+04'
    """
    w_e = PAPER_WEIGHTS[0] * (height * width / PAPER_PIXELS) ** 2
    return w_e, PAPER_WEIGHTS[1] * classes / PAPER_CLASSES


def default_lr(method: str, span: float = PAPER_SPAN, steps: int | None = None) -> float:
    """The default Adam step of the targeted attack on ``method``'s maps.

    The paper's learning rates (:data:`ATTACK_DEFAULTS`) are steps on
    ImageNet-normalised inputs, whose range is :data:`PAPER_SPAN` wide; the
    same step relative to an input range ``span`` wide is ``lr * span /
    PAPER_SPAN``. Adam moves each pixel by about ``lr`` per step, so a budget
    of ``steps`` instead of the paper's takes steps longer by ``paper steps /
    steps``: it can move the input as far as the paper's budget could.

    Parameters
    ----------
    method : str
        The attacked method.
    span : float
        Width of the input range (mean over channels).
    steps : int, optional
        The budget; default the paper's.

    Returns
    -------
    float
        The learning rate.

    Examples
    --------
    >>> default_lr("gradient")
    0.001
    >>> f"{default_lr('gradient', span=1.0):.3g} {default_lr('gradient', span=1.0, steps=150):.3g}"
    '0.000226 0.00226'
    """
    defaults = attack_defaults(method)
    paper_steps = int(defaults["steps"])
    return float(defaults["lr"]) * span / PAPER_SPAN * paper_steps / (steps or paper_steps)


def beta_at(
    schedule: str | float, step: int, steps: int, beta0: float, beta_end: float
) -> float | None:
    """The softplus sharpness at ``step`` (0-based) of ``steps``; ``None`` is the ReLU network.

    ``"geometric"`` grows from ``beta0`` at the first step to ``beta_end`` at
    the last, ``beta0 * (beta_end / beta0) ** (step / (steps - 1))``; a number
    is a fixed beta; ``"none"`` attacks the network as it is.

    Examples
    --------
    >>> beta_at("geometric", 0, 3, 10.0, 100.0), beta_at("geometric", 2, 3, 10.0, 100.0)
    (10.0, 100.0)
    >>> beta_at(0.8, 7, 100, 10.0, 100.0)
    0.8
    """
    if schedule == "none":
        return None
    if schedule == "geometric":
        return beta0 * (beta_end / beta0) ** (step / max(steps - 1, 1))
    return float(schedule)


class _Surrogate:
    """ReLU replacement whose ``beta`` changes per step; ``None`` computes ReLU."""

    def __init__(self) -> None:
        self.beta: float | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Runs inside the override, which is off while it handles a call, so
        # torch.relu here is the plain ReLU.
        return torch.relu(x) if self.beta is None else softplus(x, self.beta)


# ------------------------------------------------------------------ losses


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _in_mse_units(similarity: Loss) -> Loss:
    """The loss ``2 var(target) (1 - similarity)`` of a similarity that is 1 at equal maps.

    For two maps of equal mean and variance ``v``, ``MSE = 2 v (1 - PCC)``: in
    these units ``w_e`` means the same for every loss.
    """

    def loss(maps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        scale = 2 * target.flatten(1).var(1, unbiased=False).detach()
        return scale * (1 - similarity(maps, target))

    return loss


#: Explanation losses of the targeted attack, per image, in units of the MSE.
LOSSES: dict[str, Loss] = {
    "mse": metrics.mse,
    "pcc": _in_mse_units(metrics.pcc),
    "ssim": _in_mse_units(metrics.ssim),
}


@dataclass
class ManipulationResult:
    """What :func:`manipulate` returns; tensors on the CPU, batched over dim 0.

    Attributes
    ----------
    x, x_adv : torch.Tensor
        Input and manipulated input, ``(B, C, H, W)``.
    map_orig, map_adv, map_target : torch.Tensor
        Heatmaps ``(B, H, W)`` of ``x`` and ``x_adv`` on the original network,
        and the target (for untargeted goals the original map); also as the
        dict :attr:`maps`.
    label, label_adv : torch.Tensor
        Prediction on ``x`` and on ``x_adv``, ``(B,)``.
    label_kept : torch.Tensor
        ``label_adv == label``, ``(B,)`` bool.
    metrics : dict of str to torch.Tensor
        ``(B,)`` each: ``expl_<m>_target`` and ``expl_<m>_orig`` for every
        metric ``m`` of :func:`betasmooth.compare` (the map of ``x_adv``
        against the target and against the map of ``x``);
        ``expl_<m>_target_before`` for ``m`` in pcc, ssim, mse (the map of
        ``x`` against the target, before the attack); ``input_mse`` and
        ``input_max_change``, the largest change of one pixel value, both in
        units of the data range of each channel (so in [0, 1] pixel values
        for normalised images too), and ``input_pcc`` (``x_adv`` against
        ``x``); ``output_change``, the mean
        squared change of the softmax probabilities (the loss's output term).
    history : torch.Tensor
        ``(steps * (restarts + 1), B)``: the attack loss at each step, on the
        surrogate network.
    method, goal : str
        As passed to :func:`manipulate`.
    settings : dict
        What the attack used where defaults filled in: ``steps``, ``lr``,
        ``w_e`` and ``w_o`` (targeted), ``eps`` and ``step`` as fractions of
        the data range (untargeted), ``beta_schedule``, ``beta0``,
        ``beta_end`` and the method's options that are numbers or names (a
        rule, a composite) as ``method_<option>``; in :meth:`records` under
        ``attack_<name>``.

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, _ = bs.load_data("digits")
    >>> maps = bs.heatmap(bs.explain(model, x[:2], "gradient"))
    >>> result = bs.manipulate(model, x[:2], maps.roll(1, 0), "gradient", steps=2)
    >>> result.x_adv.shape, result.map_adv.shape, result.history.shape
    (torch.Size([2, 1, 32, 32]), torch.Size([2, 32, 32]), torch.Size([2, 2]))
    >>> sorted(result.maps), result.metrics["expl_pcc_target"].shape
    (['adv', 'orig', 'target'], torch.Size([2]))
    """

    x: torch.Tensor
    x_adv: torch.Tensor
    map_orig: torch.Tensor
    map_adv: torch.Tensor
    map_target: torch.Tensor
    label: torch.Tensor
    label_adv: torch.Tensor
    label_kept: torch.Tensor
    metrics: dict[str, torch.Tensor]
    history: torch.Tensor
    method: str = ""
    goal: str = "targeted"
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def maps(self) -> dict[str, torch.Tensor]:
        """The three heatmaps by name: ``orig``, ``adv`` and ``target`` (``map_<name>``).

        Examples
        --------
        >>> import betasmooth as bs
        >>> model = bs.load_model("digits-cnn")
        >>> x = bs.load_data("digits")[0][:2]
        >>> target = bs.heatmap(bs.explain(model, x.flip(0), "gradient"))
        >>> result = bs.manipulate(model, x, target, "gradient", steps=2)
        >>> {name: tuple(m.shape) for name, m in result.maps.items()}
        {'orig': (2, 32, 32), 'adv': (2, 32, 32), 'target': (2, 32, 32)}
        """
        return {"orig": self.map_orig, "adv": self.map_adv, "target": self.map_target}

    def records(self) -> list[dict[str, object]]:
        """One flat dict per image: method, goal, labels, every metric as a float, settings.

        Examples
        --------
        >>> import betasmooth as bs
        >>> model = bs.load_model("digits-cnn")
        >>> x = bs.load_data("digits")[0][:2]
        >>> maps = bs.heatmap(bs.explain(model, x, "gradient"))
        >>> result = bs.manipulate(model, x, maps.flip(0), "gradient", steps=5)
        >>> row = result.records()[0]
        >>> row["method"], row["attack_steps"], sorted(k for k in row if k.startswith("expl_"))[:2]
        ('gradient', 5, ['expl_com_shift_orig', 'expl_com_shift_target'])
        """
        rows = []
        for i in range(self.x.shape[0]):
            row: dict[str, object] = {
                "method": self.method,
                "goal": self.goal,
                "label": int(self.label[i]),
                "label_adv": int(self.label_adv[i]),
                "label_kept": bool(self.label_kept[i]),
            }
            row.update({name: float(v[i]) for name, v in self.metrics.items()})
            row.update({f"attack_{name}": v for name, v in self.settings.items()})
            rows.append(row)
        return rows

    def arrays(self) -> dict[str, np.ndarray]:
        """Inputs, maps and labels as numpy arrays, e.g. for ``np.savez``."""
        names = ("x", "x_adv", "map_orig", "map_adv", "map_target", "label", "label_adv")
        return {n: to_numpy(getattr(self, n)) for n in names}


# ------------------------------------------------------------------ goals


@dataclass(frozen=True)
class _Settings:
    """Every option of an attack, checked and resolved to its value."""

    goal: str
    method: str
    options: dict[str, object]
    steps: int
    lr: float
    #: ``step`` and ``eps`` are fractions of the data range, as given.
    step: float
    schedule: str | float
    beta0: float
    beta_end: float
    low: float | torch.Tensor
    high: float | torch.Tensor
    span: float
    eps: float | None
    loss: str
    #: None until the problem knows the number of classes (:func:`default_weights`).
    weights: tuple[float, float] | None
    k: int | None
    restarts: int
    check_every: int
    eot: bool
    seed: int
    progress: bool

    @property
    def step_input(self) -> float | torch.Tensor:
        """The signed step in the model's input units, per channel."""
        return self.step * (self.high - self.low)

    @property
    def eps_input(self) -> float | torch.Tensor | None:
        """The L-inf budget in the model's input units, per channel."""
        return None if self.eps is None else self.eps * (self.high - self.low)

    def width(self, dtype: torch.dtype) -> torch.Tensor:
        """``high - low`` per channel, subtracted in ``dtype``: bounds held in a bfloat16
        ``x``'s dtype round their difference there to 8 bits."""
        return torch.as_tensor(self.high, dtype=dtype) - torch.as_tensor(self.low, dtype=dtype)


def _heatmaps(
    model: nn.Module,
    x: torch.Tensor,
    s: _Settings,
    explained: torch.Tensor,
    step: int | None = None,
    graph: bool = False,
) -> torch.Tensor:
    """Maps of ``x`` by the attacked method; fresh draws at each step under ``eot``."""
    options = dict(s.options)
    if s.eot and step is not None:
        options["seed"] = s.seed + 1 + step
    return heatmap(explain(model, x, s.method, explained, create_graph=graph, **options))


@dataclass
class _Problem:
    """An attack on one batch, fixed before the first step."""

    model: nn.Module
    x: torch.Tensor
    s: _Settings
    explained: torch.Tensor
    label: torch.Tensor
    logits: torch.Tensor
    map_orig: torch.Tensor
    map_target: torch.Tensor
    surrogate: _Surrogate = field(default_factory=_Surrogate)
    history: list[torch.Tensor] = field(default_factory=list)
    seen_logits: torch.Tensor | None = None

    def maps(self, x: torch.Tensor, step: int | None = None, graph: bool = False) -> torch.Tensor:
        self.seen_logits = None
        handle = None
        if graph and forwards_once(self.s.method):
            handle = self.model.register_forward_hook(self._see(x))
        try:
            return _heatmaps(self.model, x, self.s, self.explained, step, graph)
        finally:
            if handle is not None:
                handle.remove()

    def _see(self, x: torch.Tensor) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if args and args[0] is x:
                self.seen_logits = output

        return hook

    def output(self, x_adv: torch.Tensor) -> torch.Tensor:
        """Logits of ``x_adv`` on the surrogate; from the explanation's forward where it had one."""
        return self.model(x_adv) if self.seen_logits is None else self.seen_logits

    def project(self, x_adv: torch.Tensor) -> torch.Tensor:
        if self.s.eps is not None:
            x_adv = torch.minimum(torch.maximum(x_adv, self.ball[0]), self.ball[1])
        return x_adv.clamp(self.s.low, self.s.high)

    @functools.cached_property
    def ball(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The L-inf budget's bounds around ``x`` in its dtype, each rounded towards ``x``:
        rounded to the nearest (bfloat16 keeps 8 bits) they can lie outside the budget."""
        exact = self.x.double()
        eps = (self.s.eps * self.s.width(torch.float64)).to(self.x.device)
        bounds = []
        for edge in (exact - eps, exact + eps):
            near = edge.to(self.x.dtype)
            outside = (near.double() - exact).abs() > eps
            bounds.append(torch.where(outside, torch.nextafter(near, self.x), near))
        return bounds[0], bounds[1]

    @contextlib.contextmanager
    def original(self) -> Iterator[None]:
        """The ReLU network, also inside the attack's surrogate."""
        beta, self.surrogate.beta = self.surrogate.beta, None
        try:
            yield
        finally:
            self.surrogate.beta = beta


@dataclass(frozen=True)
class Goal:
    """An attack goal: the per-image objective to minimise and how to step.

    ``objective(problem, maps, x_adv)`` gives the ``(B,)`` loss of the
    differentiable maps of ``x_adv``; ``score(problem, maps)`` the ``(B,)``
    criterion on the original network that picks the best iterate (lower is
    better); ``signed`` selects signed steps in the L-inf ball instead of Adam.
    ``targeted`` tells whether the goal steers to a target map (an untargeted
    one pushes away from the original map, its "target"); ``measure`` names
    the record that says how far it got, in the attacked map's words.

    Examples
    --------
    >>> sorted(GOALS)
    ['center', 'targeted', 'topk']
    >>> GOALS["topk"].signed, GOALS["topk"].targeted, GOALS["topk"].measure
    (True, False, 'expl_topk_orig')
    """

    objective: Callable[[_Problem, torch.Tensor, torch.Tensor], torch.Tensor]
    score: Callable[[_Problem, torch.Tensor], torch.Tensor]
    signed: bool
    targeted: bool = True
    measure: str = "expl_pcc_target"


def _per_image(value: object, who: str, images: int) -> torch.Tensor:
    """``value`` of a loss or a goal, refused in one line unless one number per image:
    a batch total would make every image's best step the batch's."""
    if isinstance(value, torch.Tensor) and tuple(value.shape) == (images,):
        return value
    got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
    raise InputError(f"{who} returned {got}; expected one value per image, shape ({images},)")


def _map_loss(p: _Problem, maps: torch.Tensor) -> torch.Tensor:
    value = LOSSES[p.s.loss](maps, p.map_target)
    return _per_image(value, f"loss {p.s.loss!r}", maps.shape[0])


def _targeted_objective(p: _Problem, maps: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    w_e, w_o = p.s.weights
    loss = w_e * _map_loss(p, maps)
    if w_o:
        loss = loss + w_o * _output_change(p.output(x_adv), p.logits)
    return loss


def _output_change(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared change of the softmax probabilities per item.

    The reference code of Dombrowski et al. compares softmax outputs, not logits.
    """
    return (logits.softmax(1) - reference.softmax(1)).square().mean(1)


def _targeted_score(p: _Problem, maps: torch.Tensor) -> torch.Tensor:
    return _map_loss(p, maps)


def _topk_mass(p: _Problem, maps: torch.Tensor, x_adv: torch.Tensor | None = None) -> torch.Tensor:
    # Ranked as in betasmooth.compare: a stable sort sends ties to the lower index.
    order = p.map_orig.flatten(1).sort(dim=1, descending=True, stable=True).indices[:, : p.s.k]
    return maps.flatten(1).gather(1, order).sum(1)


def _com_distance(
    p: _Problem, maps: torch.Tensor, x_adv: torch.Tensor | None = None
) -> torch.Tensor:
    shift = metrics.center_of_mass(maps) - metrics.center_of_mass(p.map_orig)
    # The small constant keeps the gradient of the norm finite at zero shift.
    return -(shift.square().sum(1) + 1e-12).sqrt()


#: Length in pixels of the nudge that gives the centre attack a direction at zero shift.
CENTER_NUDGE = 1e-3


def _com_objective(p: _Problem, maps: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """The centre distance, nudged so that its gradient at zero shift is not zero.

    Where the attacked map equals the original (every step of a method
    attacked without a surrogate, such as LRP, starts there) the distance has
    a zero gradient and signed steps never leave ``x``. A shift of
    :data:`CENTER_NUDGE` pixels, away from the grid's centre along the line
    through the original centre of mass, gives those steps a direction; once
    the centre has moved, the nudge is negligible.
    """
    origin = metrics.center_of_mass(p.map_orig)
    middle = origin.new_tensor([(maps.shape[1] - 1) / 2, (maps.shape[2] - 1) / 2])
    outward = origin - middle
    length = outward.norm(dim=1, keepdim=True)
    fallback = outward.new_tensor([1.0, 0.0]).expand_as(outward)
    direction = torch.where(length > 0, outward / length.clamp(min=1e-12), fallback)
    shift = metrics.center_of_mass(maps) - origin + CENTER_NUDGE * direction
    return -shift.norm(dim=1)


#: Attack goals: ``targeted`` (Dombrowski et al.), ``topk`` and ``center`` (Ghorbani et al.).
GOALS: dict[str, Goal] = {
    "targeted": Goal(_targeted_objective, _targeted_score, signed=False),
    "topk": Goal(_topk_mass, _topk_mass, True, targeted=False, measure="expl_topk_orig"),
    "center": Goal(
        _com_objective, _com_distance, True, targeted=False, measure="expl_com_shift_orig"
    ),
}


def check_goal(goal: object, name: str = "goal") -> str:
    """Check that ``goal`` names an entry of :data:`GOALS` that is a :class:`Goal` whose
    ``measure`` is a record the attack writes: ``expl_<metric>_orig``, ``_target`` or
    ``_target_before``, or one of its own (``input_pcc``, ``label_kept``, ...).

    Examples
    --------
    >>> check_goal("topk")
    'topk'
    """
    goal = check_choice(name, goal, GOALS)
    entry = GOALS[goal]
    if not isinstance(entry, Goal):
        raise InputTypeError(
            f"goal {goal!r} is a {type(entry).__name__}; expected a betasmooth.attack.Goal"
        )
    names = "|".join(map(re.escape, metrics.METRICS))
    compared = re.fullmatch(rf"expl_({names})_(orig|target|target_before)", str(entry.measure))
    if compared is None and entry.measure not in _OWN_RECORDS:
        raise InputError(
            f"goal {goal!r} measures {entry.measure!r}, which is no record of the attack's; "
            "expected expl_<metric>_orig or expl_<metric>_target of a metric of "
            f"betasmooth.metrics.METRICS, or one of {', '.join(_OWN_RECORDS)}"
        )
    return goal


# The records of an attack besides the map comparisons (see _result).
_OWN_RECORDS = ("label_kept", "input_mse", "input_max_change", "input_pcc", "output_change")


def recorded_goal(config: Mapping[str, object], goal: object = None) -> tuple[bool, str]:
    """Whether ``goal`` (default: the run's) has a target map, and the record that
    measures it: as a run's ``config`` recorded them (a goal that a model file registered
    need not be registered here), else as :data:`GOALS` has them (runs of versions before
    0.8.4), else those of the targeted goal.

    Examples
    --------
    >>> recorded_goal({"goal": "topk"})
    (False, 'expl_topk_orig')
    """
    goal = config.get("goal") if goal is None else goal
    targeted, measure = config.get("goal_targeted"), config.get("goal_measure")
    if config.get("goal") == goal and isinstance(targeted, bool) and isinstance(measure, str):
        return targeted, measure
    if isinstance(goal, str) and goal in GOALS:
        return GOALS[goal].targeted, GOALS[goal].measure
    return True, "expl_pcc_target"


# ------------------------------------------------------------------ engine


def keep_best(
    best: torch.Tensor,
    best_score: torch.Tensor,
    candidate: torch.Tensor,
    score: torch.Tensor,
    kept: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, take ``candidate`` where it keeps the label and scores lower.

    Parameters
    ----------
    best, candidate : torch.Tensor
        Iterates ``(B, ...)``.
    best_score, score : torch.Tensor
        Their scores ``(B,)``; lower is better.
    kept : torch.Tensor
        ``(B,)`` bool: the candidate's label equals the original one.

    Returns
    -------
    tuple of torch.Tensor
        The new best iterates and their scores.

    Examples
    --------
    >>> best, s = keep_best(torch.zeros(2, 1), torch.ones(2), torch.ones(2, 1),
    ...                     torch.zeros(2), torch.tensor([True, False]))
    >>> best.flatten().tolist(), s.tolist()
    ([1.0, 0.0], [0.0, 1.0])
    """
    better = kept & (score < best_score)
    shape = (-1,) + (1,) * (best.dim() - 1)
    return (
        torch.where(better.view(shape), candidate, best),
        torch.where(better, score, best_score),
    )


def _evaluate(p: _Problem, goal: Goal, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Score and label check of ``x`` on the original network."""
    with p.original():
        maps = p.maps(x.detach())
        with torch.no_grad():
            kept = p.model(x.detach()).argmax(1) == p.label
        score = _per_image(goal.score(p, maps), f"goal {p.s.goal!r}'s score", len(x))
        return score.detach(), kept


def _run(
    p: _Problem,
    goal: Goal,
    start: torch.Tensor,
    best: torch.Tensor,
    best_score: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    s = p.s
    x_adv = start.detach().clone().requires_grad_(True)
    optimizer = None if goal.signed else torch.optim.Adam([x_adv], lr=s.lr)
    # Per image: a step that flips the label halves that image's step.
    step_size = torch.ones(x_adv.shape[0], dtype=x_adv.dtype, device=x_adv.device)
    step = s.step_input
    shape = (-1,) + (1,) * (x_adv.dim() - 1)
    desc = f"{s.method} {s.goal}"
    bar = tqdm(range(s.steps), desc=desc, unit="step", disable=not s.progress, leave=False)
    for i in bar:
        p.surrogate.beta = beta_at(s.schedule, i, s.steps, s.beta0, s.beta_end)
        with torch.enable_grad():
            maps = p.maps(x_adv, i, graph=True)
            loss = _per_image(
                goal.objective(p, maps, x_adv), f"goal {s.goal!r}'s objective", len(x_adv)
            )
            moves = i == 0 and _depends_on(maps, x_adv)  # a backward: at the first step only
            if moves and not _depends_on(loss, maps):
                uses = f", loss {s.loss!r}" if goal.objective is _targeted_objective else ""
                raise InputError(
                    f"the attack's objective (goal {s.goal!r}{uses}) does not depend on the "
                    "maps it is given, so no step can move them; expected a differentiable "
                    "function of the maps (does it detach them?)"
                )
            if not loss.requires_grad:
                raise InputError(_no_graph(s.method))
            if i == 0 and not moves:
                # Only the targeted goal's output term moves x then; the map stays put.
                warn_user(_no_graph(s.method), p.model)
            (grad,) = torch.autograd.grad(loss.sum(), x_adv, allow_unused=True)
            if grad is None:  # the loss has a graph, through the weights only
                raise InputError(_no_graph(s.method))
        _check_finite_gradient(grad, s, i)
        p.history.append(loss.detach())
        with torch.no_grad():
            if optimizer is None:
                previous = x_adv.detach().clone()
                x_adv.copy_(p.project(x_adv - step_size.view(shape) * step * grad.sign()))
            else:
                x_adv.grad = grad
                optimizer.step()
                x_adv.copy_(p.project(x_adv))
        if optimizer is None or (i + 1) % s.check_every == 0 or i + 1 == s.steps:
            score, kept = _evaluate(p, goal, x_adv)
            best, best_score = keep_best(best, best_score, x_adv.detach(), score, kept)
            # Only at scorings, which wait for the device anyway.
            bar.set_postfix(loss=f"{float(loss.detach().mean()):.4g}")
            if optimizer is None:
                # A step that flips the label is undone and that image's step
                # halved, so that it keeps moving inside the label's region.
                with torch.no_grad():
                    x_adv.copy_(torch.where(kept.view(shape), x_adv, previous))
                step_size = torch.where(kept, step_size, step_size / 2)
    return best, best_score


def _check_finite_gradient(grad: torch.Tensor, s: _Settings, step: int) -> None:
    # A NaN step would reach the next explanation as a NaN input, whose error
    # blames x; the fault is in the loss or the model's backward pass.
    finite = torch.isfinite(grad.flatten(1)).all(1)
    if not bool(finite.all()):
        images = (~finite).nonzero().flatten().tolist()
        raise InputError(
            f"the attack's gradient is NaN or inf at step {step} for images {images} (method "
            f"{s.method!r}, loss {s.loss!r}): the model's backward pass or the loss is not "
            "finite there, not the images; check the model on these inputs"
        )


def _depends_on(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``y``'s graph reaches ``x`` (a graph through the weights alone does not)."""
    if not y.requires_grad:
        return False
    return torch.autograd.grad(y.sum(), x, retain_graph=True, allow_unused=True)[0] is not None


def _no_graph(method: str) -> str:
    return (
        f"the maps of method {method!r} come without a graph under create_graph=True, so the "
        "attack's map term cannot steer x (only the output term moves it, where the goal has "
        "one): the method ignores create_graph, or its map does not depend on x (e.g. a "
        "linear model's gradient)"
    )


def check_target_map(target_map: object, x: torch.Tensor) -> torch.Tensor:
    """``target_map`` checked as one map ``(B, H, W)`` per image of ``x``, on its device and dtype.

    Examples
    --------
    >>> x = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    >>> check_target_map(torch.full((2, 4, 4), 1 / 16), x).dtype
    torch.float64
    """
    expected = (x.shape[0], *x.shape[2:])
    check_map_batch(target_map, "target_map")
    if tuple(target_map.shape) != expected:
        raise InputError(
            f"target_map must have shape (B, H, W) = {expected} to match x of shape "
            f"{tuple(x.shape)}; got {tuple(target_map.shape)}"
        )
    return target_map.to(device=x.device, dtype=x.dtype)


def _check_heatmaps(target_map: torch.Tensor) -> None:
    """Refuse targets that heatmap(x_adv), >= 0 and summing to 1, can never reach.

    An all-zero map (heatmap of a zero explanation) is a heatmap too; the sums
    of low-precision maps are off by their rounding (bfloat16: 2e-3).
    """
    sums = target_map.double().sum(dim=(1, 2))
    tolerance = max(1e-3, 4 * torch.finfo(target_map.dtype).eps)
    scaled = ((sums - 1).abs() > tolerance) & (sums != 0)
    far = scaled | (target_map < 0).flatten(1).any(1)
    if bool(far.any()):
        i = int(far.nonzero()[0])
        raise InputError(
            f"target_map must hold heatmaps, each >= 0 and summing to 1 (as bs.heatmap and "
            f"random_targets make them); map {i} sums to {float(sums[i]):.4g} with least value "
            f"{float(target_map[i].min()):.3g}: use t.clamp(min=0) / t.clamp(min=0).sum((1, 2), "
            "keepdim=True)"
        )


def _check_schedule(schedule: object) -> str | float:
    if isinstance(schedule, str) and schedule in ("geometric", "none"):
        return schedule
    if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
        beta = check_positive("beta_schedule", schedule)
        check_beta(beta, "beta_schedule")
        return beta
    raise InputError(
        f"beta_schedule must be 'geometric', 'none' or a positive number; got {schedule!r}"
    )


Bound = float | torch.Tensor


def resolve_range(data_range: object, x: torch.Tensor) -> tuple[Bound, Bound]:
    """The bounds ``(low, high)`` of ``data_range`` checked, or ``x``'s own for ``None``.

    Per-channel bounds (tensors or arrays, as ``data.bounds``) are checked
    against ``x`` (:func:`~betasmooth.validate.check_bounds`); numbers must be
    finite with ``low < high``.

    Examples
    --------
    >>> resolve_range((0, 1), torch.zeros(1, 1, 2, 2))
    (0.0, 1.0)
    >>> resolve_range(None, torch.arange(4.0).view(1, 1, 2, 2))
    (0.0, 3.0)
    """
    if data_range is None:
        return float(x.min()), float(x.max())
    if isinstance(data_range, (tuple, list)) and len(data_range) == 2:
        # Per-channel bounds: tensors such as data.bounds, or their numpy copies.
        if any(torch.is_tensor(v) or isinstance(v, np.ndarray) for v in data_range):
            return check_bounds(*data_range, x)
    if (
        not isinstance(data_range, (tuple, list))
        or len(data_range) != 2
        or not all(is_number(v) and math.isfinite(v) for v in data_range)
        or not data_range[0] < data_range[1]
    ):
        # Without the finiteness check an infinite bound gives an infinite
        # learning rate, and the NaN iterates are blamed on x.
        raise InputError(
            f"data_range must be None or (low, high) with low < high, both finite; "
            f"got {data_range!r}"
        )
    return float(data_range[0]), float(data_range[1])


def check_method_name(method: object) -> None:
    """Refuse a method that is not a registered name (the registry's own message).

    Examples
    --------
    >>> check_method_name("gradient")
    >>> check_method_name("gradiant")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: unknown method 'gradiant'; expected one of: beta_smooth, ...
    """
    if not isinstance(method, str):
        raise InputTypeError(f"method must be a method name (str); got {type(method).__name__}")
    options_of(method)


def check_attackable(method: object, options: Mapping[str, object] | None = None) -> None:
    """Refuse a method whose maps the attack cannot differentiate (``captum:NAME``,
    :func:`~betasmooth.explain.is_differentiable`), also as the ``base`` of a
    smoothing method (``smoothgrad`` or ``beta_smooth`` with ``base="captum:NAME"``).

    Examples
    --------
    >>> check_attackable("captum:Saliency")
    Traceback (most recent call last):
    ...
    betasmooth.validate.InputError: captum:Saliency cannot be attacked: ...
    """
    check_method_name(method)
    if not is_differentiable(method):
        raise InputError(
            f"{method} cannot be attacked: its maps are not differentiable w.r.t. x; "
            "expected a method such as gradient or lrp"
        )
    if wraps_base(method):
        base = dict(options or {}).get("base", options_of(method).get("base"))
        if isinstance(base, str) and is_method(base) and not is_differentiable(base):
            raise InputError(
                f"{method} with base {base} cannot be attacked: {base}'s maps are not "
                "differentiable w.r.t. x; expected a base such as gradient or lrp"
            )


#: What overrides the model's ReLUs while a method is attacked with a beta schedule.
SURROGATE = "the attack's softplus surrogate"


def check_attack_model(
    model: nn.Module, methods: Iterable[str], x: torch.Tensor | None = None
) -> None:
    """Check before a run that the attack can differentiate ``model`` for ``methods``.

    The attack differentiates the maps once more, which a graph made by
    ``torch.compile`` does not allow; and a method attacked with its default
    beta schedule (:data:`ATTACK_DEFAULTS`) differentiates through softplus
    in place of every ReLU, which a TorchScript model does not let through
    (:func:`~betasmooth.smooth.check_overridable`). Where ``x`` is given, the
    model's output on its first item must have two or more logits (the attack
    keeps the label, the argmax, which one logit never changes) and a graph
    back to the item.

    Raises
    ------
    InputError
        Naming what cannot work and the expected form.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2), torch.nn.ReLU())
    >>> check_attack_model(net, ["gradient", "lrp"])
    """
    check_uncompiled(model, "the attack")
    if any(attack_defaults(m)["beta_schedule"] != "none" for m in methods):
        check_overridable(model, SURROGATE)
    if x is not None:
        probe = check_input(model, x)[:1].detach().requires_grad_(True)
        with evaluating(model), torch.enable_grad():
            logits = model(probe)
        _check_classes(logits)
        # Before the run directory is made (the weights may require grad: ask of x).
        reached = (
            logits.requires_grad
            and torch.autograd.grad(logits.sum(), probe, allow_unused=True)[0] is not None
        )
        if not reached:
            raise InputError(detached_message(model))


def _check_classes(logits: torch.Tensor) -> None:
    if logits.shape[1] < 2:
        # argmax of one column is always 0: a decision that flips would pass as kept.
        raise InputError(
            "the attack needs two or more logits per item, but the model returns one, of "
            f"shape (B, {logits.shape[1]}); expected a binary classifier's two logits, e.g. a "
            "forward returning torch.cat([-z, z], 1) / 2 for its one logit z (softmax then "
            "equals sigmoid(z))"
        )


def _check_method_options(method_options: object, method: str) -> dict[str, object]:
    if method_options is None:
        return {}
    if not isinstance(method_options, Mapping):
        raise InputTypeError(
            f"method_options must be a dict of options of {method!r}, e.g. {{'beta': 0.8}}; "
            f"got {type(method_options).__name__} {method_options!r}"
        )
    reserved = sorted(set(method_options) & set(RESERVED))
    if reserved:
        raise InputError(
            f"method_options may not set {', '.join(reserved)}: the attack sets them itself; "
            f"expected options of {method!r} such as those of "
            f"betasmooth.explain.method_options({method!r})"
        )
    return dict(method_options)


def _input_pcc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return metrics.pcc(a.flatten(1)[:, None], b.flatten(1)[:, None])


@one_at_a_time
def manipulate(
    model: nn.Module,
    x: torch.Tensor,
    target_map: torch.Tensor | None,
    method: str,
    *,
    goal: str = "targeted",
    target: int | torch.Tensor | None = None,
    steps: int | None = None,
    lr: float | None = None,
    weights: tuple[float, float] | None = None,
    beta_schedule: str | float | None = None,
    beta0: float = 10.0,
    beta_end: float = 100.0,
    data_range: tuple[Bound, Bound] | None = (0.0, 1.0),
    loss: str = "mse",
    eps: float | None = None,
    step: float | None = None,
    k: int | None = None,
    restarts: int = 0,
    check_every: int | None = None,
    method_options: dict[str, object] | None = None,
    eot: bool = False,
    progress: bool = False,
    seed: int = 0,
) -> ManipulationResult:
    """Manipulate the explanations of a batch while keeping the predicted labels.

    ``goal="targeted"`` (Dombrowski et al. 2019) minimises, per image,
    ``w_e * L(heatmap(x_adv), target_map) + w_o * MSE(softmax(x_adv), softmax(x))``
    with Adam, clamping to ``data_range`` after each step (and to the L-inf
    ball ``eps`` if given). ``goal="topk"`` and ``goal="center"`` (Ghorbani et
    al. 2019) take signed steps of size ``step`` inside the L-inf ball ``eps``
    that minimise the map mass on the original top-k pixels, or maximise the
    distance between the centres of mass; a step that flips an image's label is
    undone and that image's step halved.

    During the attack every ReLU computes ``softplus_beta`` per
    ``beta_schedule``; the scores, labels and final maps come from the
    original network. Every ``check_every`` steps (every step for untargeted
    goals) each image's iterate is scored on the original network, and the
    best one that keeps the label is returned: the lowest explanation loss
    ``L`` to the target (targeted), the lowest top-k mass, or the largest
    centre-of-mass shift. ``x`` itself is the first candidate, so every label
    is kept.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits; it is not changed.
    x : torch.Tensor
        Input batch ``(B, C, H, W)`` inside ``data_range`` (values outside it raise
        :class:`~betasmooth.validate.InputError`), on the model's device.
    target_map : torch.Tensor or None
        Target heatmaps ``(B, H, W)``, each >= 0 and summing to 1 (e.g.
        :func:`random_targets`, or :func:`~betasmooth.metrics.heatmap` of
        other images); ignored, and may be ``None``, for untargeted goals.
    method : str
        Explanation method to attack (any registered one).
    goal : str
        ``targeted``, ``topk`` or ``center``.
    target : None, int or torch.Tensor
        Class to explain; default the prediction on ``x``.
    steps, lr : int, float, optional
        Budget; default :data:`ATTACK_DEFAULTS` of the method (targeted) or
        :data:`UNTARGETED_STEPS` (untargeted). The default ``lr``
        (:func:`default_lr`) is the paper's, whose steps are in
        ImageNet-normalised units, times the width of ``data_range`` over
        :data:`PAPER_SPAN` (about 4.4), and times the paper's steps over
        ``steps``: the paper's step relative to the data range (``2.26e-4``
        for gradient on [0, 1] pixels, the paper's own on ImageNet-normalised
        inputs), lengthened in a shorter budget so that it reaches as far. A
        given ``lr`` is used as it is.
    weights : tuple of float, optional
        ``(w_e, w_o)``; default :func:`default_weights` for the map size and
        the number of classes.
    beta_schedule : str or float, optional
        ``"geometric"`` (``beta0`` -> ``beta_end``), ``"none"`` or a fixed
        beta; default per method (``"none"`` for LRP and beta_smooth), and
        ``"none"`` for a model that is already smoothed (a copy made by
        :func:`~betasmooth.smooth.smooth`, or a model inside
        :func:`~betasmooth.smooth.smoothed`), whose own softplus is attacked;
        a schedule given for such a model replaces its softplus during the
        steps, while scores and maps come from the model itself.
    beta0, beta_end : float
        Ends of the geometric schedule, in :data:`~betasmooth.smooth.BETA_RANGE`.
    data_range : tuple of float or torch.Tensor, or None
        ``(low, high)`` to clamp to, numbers or per-channel tensors such as
        ``(1, C, 1, 1)`` (``ImageData.bounds`` of normalised data); ``None``
        uses the batch's min and max. Also LRP's z^B box and the baseline of
        integrated gradients, unless ``method_options`` gives them
        (:func:`attack_options`).
    loss : str
        Explanation loss ``L``: ``mse`` (the paper), or ``pcc`` / ``ssim``,
        ``2 var(target) (1 - PCC or SSIM)``, which equals the MSE for maps of
        equal variance, so ``w_e`` keeps its meaning.
    eps : float, optional
        L-inf budget as a fraction of the data range of each channel (so
        ``8 / 255`` is 8 levels of an 8-bit pixel, whether or not the inputs
        are normalised); untargeted default ``8 / 255``.
    step : float, optional
        Signed step of the untargeted goals, as a fraction of the data range;
        default ``eps / 10``.
    k : int, optional
        Top-k size of ``goal="topk"``; default 10 % of the pixels, as in
        :func:`betasmooth.compare`.
    restarts : int
        Further runs from ``x`` plus uniform noise (of ``eps``, or 1 % of the
        data range), each image keeping its best iterate over all runs.
    check_every : int, optional
        Steps between scorings on the original network (targeted), which
        also scores the last step; default :data:`CHECK_EVERY` (10).
    method_options : dict, optional
        Options of the method, e.g. ``{"beta": 0.8}`` for beta_smooth or
        ``{"n": 10, "seed": 0}`` for smoothgrad (fixed draws per step). A
        method's ``seed`` seeds the attack's draws only: the result's maps and
        metrics come from draws it did not see (:func:`scoring_options`); its
        ``history`` holds the losses on the attack's own draws.
    eot : bool
        Expectation over transformations: fresh draws each step (the
        method's ``seed`` option set to ``seed + 1 + step``).
    progress : bool
        Show a progress bar on stderr: one tick per step, the mean loss at each
        scoring, elapsed and remaining time.
    seed : int
        Seeds the restarts' noise and the draws of ``eot``; from 0 to ``2**64 - 1``
        (less ``steps`` under ``eot``), the range of ``torch.Generator``.

    Returns
    -------
    ManipulationResult
        Inputs, maps, labels, metrics and loss history, on the CPU. A float64
        ``x`` to a float32 (or bfloat16) model is attacked in the model's dtype,
        as :func:`~betasmooth.explain` explains it, and its inputs (``x`` as the
        model saw it) and maps come back in float64; a float32 ``x`` to a
        float64 model comes back in float64.

    Warns
    -----
    UnchangedWarning
        Where no image changed (no step improved the map and kept the label),
        once per model and method.

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, _ = bs.load_data("digits")
    >>> maps = bs.heatmap(bs.explain(model, x[:4], "gradient"))
    >>> targets = random_targets(maps, torch.Generator().manual_seed(0))
    >>> result = bs.manipulate(model, x[:4], targets, "gradient", steps=50)
    >>> result.label_kept.all()
    tensor(True)
    """
    given = x
    x = _checked_input(model, x)
    if beta_schedule is None and is_smoothed(model):
        # Its own softplus is the network to attack: a surrogate would take its place.
        beta_schedule = "none"
    settings = _resolve(
        x,
        method,
        goal=goal,
        steps=steps,
        lr=lr,
        weights=weights,
        beta_schedule=beta_schedule,
        beta0=beta0,
        beta_end=beta_end,
        data_range=data_range,
        loss=loss,
        eps=eps,
        step=step,
        k=k,
        restarts=restarts,
        check_every=check_every,
        method_options=method_options,
        eot=eot,
        progress=progress,
        seed=seed,
    )
    map_target = None
    if GOALS[settings.goal].targeted:
        if target_map is None:
            raise InputError("target_map is required for goal='targeted'; expected (B, H, W)")
        map_target = check_target_map(target_map, x)
        _check_heatmaps(target_map)  # in its own dtype, whose rounding its sums carry
    with evaluating(model), flush_denormals():
        p = _problem(model, x, target, map_target, settings)
        best = _search(p)
        if torch.equal(best, x):
            # Read as "the map cannot be moved", which this budget has not shown.
            warn_user(
                f"{settings.method}: the attack changed no image (no step improved the map "
                "and kept the label); more steps or a smaller lr may move it",
                model,
                UnchangedWarning,
            )
        p, map_adv = _scored(p, best)
        with torch.no_grad():
            logits_adv = model(best)
    return _in_dtype(_result(p, best, map_adv, logits_adv), given)


def _in_dtype(result: ManipulationResult, given: torch.Tensor) -> ManipulationResult:
    """``result``'s images and maps in the dtype of the ``x`` given where it holds them
    exactly, as :func:`explain` gives its maps: an ``x`` cast down to the model's dtype
    (float64 to a float32 model) comes back in its own, as the model saw it. One cast up
    (float32 to a float64 model) stays in the model's: rounding ``x_adv`` would move it
    off the budget and off the labels and maps it was scored by."""
    dtype = given.dtype
    if dtype == result.x.dtype or torch.promote_types(dtype, result.x.dtype) != dtype:
        return result
    names = ("x", "x_adv", "map_orig", "map_adv", "map_target")
    return replace(result, **{name: getattr(result, name).to(dtype) for name in names})


def scoring_options(options: Mapping[str, object]) -> dict[str, object]:
    """The options that a result is scored with: a method's ``seed`` (its noise, e.g.
    SmoothGrad's) replaced by seeds drawn from it, which the attack did not see.

    An attack with fixed draws fits that noise; maps of the same draws would
    measure the fit, not how far the method was steered.

    Examples
    --------
    >>> scoring_options({"n": 10, "seed": [3, 4]})["seed"] != [3, 4]
    True
    >>> scoring_options({"beta": 0.8})
    {'beta': 0.8}
    """
    inner = options.get("base_options")
    if isinstance(inner, Mapping) and inner.get("seed") is not None:
        options = {**options, "base_options": scoring_options(inner)}
    seed = options.get("seed")
    if seed is None:
        return dict(options)
    if isinstance(seed, torch.Tensor):
        seed = seed.tolist()
    if isinstance(seed, Sequence):
        return {**options, "seed": [_fresh_seed(int(s)) for s in seed]}
    return {**options, "seed": _fresh_seed(int(seed))}


def _fresh_seed(seed: int) -> int:
    return zlib.crc32(f"scored {seed}".encode())


def _scored(p: _Problem, best: torch.Tensor) -> tuple[_Problem, torch.Tensor]:
    """The problem with its original maps, and the maps of ``best``, as the result
    reports them: under :func:`scoring_options`."""
    options = scoring_options(p.s.options)
    if options == p.s.options:
        return p, p.maps(best).detach()
    s = replace(p.s, options=options, eot=False)
    map_orig = _heatmaps(p.model, p.x, s, p.explained).detach()
    map_adv = _heatmaps(p.model, best, s, p.explained).detach()
    # An untargeted goal's reference is the map of x itself.
    map_target = map_orig if p.map_target is p.map_orig else p.map_target
    return replace(p, map_orig=map_orig, map_target=map_target), map_adv


def _checked_input(model: object, x: object) -> torch.Tensor:
    check_module(model)
    check_uncompiled(model, "the attack")
    check_batch(x, "x", min_dim=4)
    if x.dim() != 4:
        raise InputError(f"x must have shape (B, C, H, W); got {tuple(x.shape)}")
    x = check_input(model, x).detach()
    if x.dtype == torch.float16:
        # The maps' MSE underflows and Adam's eps (1e-8) is 0 in float16: the
        # attack would end in NaN; bfloat16 has float32's range.
        raise InputError(
            "a float16 model cannot be attacked (its loss and Adam's steps underflow); "
            "expected model.float() or model.bfloat16()"
        )
    return x


def _resolve(x: torch.Tensor, method: object, **given: object) -> _Settings:
    """Check every option of :func:`manipulate` and resolve the defaults of the method."""
    goal = check_goal(given["goal"])
    check_choice("loss", given["loss"], LOSSES)
    check_attackable(method, given["method_options"])
    defaults = attack_defaults(method)
    low, high = resolve_range(given["data_range"], x)
    check_in_range(x, low, high)
    box = None if given["data_range"] is None else (low, high)
    options = _check_method_options(given["method_options"], method)
    options = _attacked_options(method, options, box)
    if given["eot"] and "seed" not in options_of(method):
        raise InputError(f"eot=True needs a method with a seed option; {method!r} has none")
    # Adam's learning rate is one number (its steps are per element anyway);
    # the L-inf budget and the signed step follow each channel's range.
    span = float(torch.as_tensor(high - low).mean())
    eps = check_positive("eps", given["eps"], optional=True)
    if eps is not None and eps > 1:
        # A budget beyond the whole range is none; most likely meant in 8-bit levels.
        raise InputError(
            f"eps must be at most 1: it is a fraction of each channel's data range "
            f"(8/255 = 0.031 is 8 levels of an 8-bit pixel); got {eps:g}"
        )
    if GOALS[goal].targeted:
        steps = defaults["steps"] if given["steps"] is None else given["steps"]
    else:
        steps = UNTARGETED_STEPS if given["steps"] is None else given["steps"]
        eps = eps or UNTARGETED_EPS
    step = check_positive("step", given["step"], optional=True) or UNTARGETED_STEP * (eps or 0.0)
    schedule = given["beta_schedule"]
    check_every = given["check_every"]
    steps = check_count("steps", steps)
    for name in ("beta0", "beta_end"):
        check_beta(given[name], name)
    # Under eot the method's draws are seeded with seed + 1 + step: they too
    # must fit torch's generator.
    seed = check_seed("seed", given["seed"], MAX_SEED - steps if given["eot"] else MAX_SEED)
    return _Settings(
        goal=goal,
        method=method,
        options=options,
        steps=steps,
        lr=check_positive("lr", given["lr"], optional=True) or default_lr(method, span, steps),
        step=step,
        schedule=_check_schedule(defaults["beta_schedule"] if schedule is None else schedule),
        beta0=float(given["beta0"]),
        beta_end=float(given["beta_end"]),
        low=low,
        high=high,
        span=span,
        eps=eps,
        loss=given["loss"],
        weights=_check_weights(given["weights"]),
        k=given["k"],
        restarts=check_count("restarts", given["restarts"], 0),
        check_every=check_count("check_every", CHECK_EVERY if check_every is None else check_every),
        eot=given["eot"],
        seed=seed,
        progress=given["progress"],
    )


#: Methods whose range options :func:`attack_options` leaves out: SmoothGrad's
#: noise level is relative to each item's range in explain, and stays so.
_ITEM_RANGED = ("smoothgrad",)


def attack_options(
    method: str,
    x: torch.Tensor,
    *,
    data_range: tuple[Bound, Bound] | None = (0.0, 1.0),
    method_options: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The options of the map :func:`manipulate` attacks (and the defense sweep defends).

    The options given, then the method's attack defaults
    (:func:`attack_defaults`), then, where ``data_range`` is given, the
    method's range options (:func:`~betasmooth.explain.range_options`: LRP's
    z^B box, the black baseline of integrated gradients, those of a
    registered method), also for the base method of ``smoothgrad`` and
    ``beta_smooth`` (in ``base_options``). An option given, or one bound of
    LRP's box, is never overridden. On [0, 1] data these are the methods'
    own defaults; SmoothGrad's noise level stays its own (each item's range;
    the command line passes each channel's range).

    Examples
    --------
    >>> import torch
    >>> x = torch.zeros(1, 3, 8, 8)
    >>> low, high = -torch.ones(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    >>> options = attack_options("integrated_gradients", x, data_range=(low, high))
    >>> options["steps"], float(options["baseline"].min())
    (30, -1.0)
    """
    check_method_name(method)
    box = None if data_range is None else resolve_range(data_range, x)
    return _attacked_options(method, _check_method_options(method_options, method), box)


def _fixed_draws(method: str, options: dict[str, object]) -> dict[str, object]:
    """``options`` with the seed of a method that draws noise, and of its base method
    (in ``base_options``), named: its default, or 0 where that is ``None``.

    The attack moves fixed draws (fresh draws at every step are what ``eot``
    asks for), and a seed named is one :func:`scoring_options` can replace.
    """
    known = options_of(method)
    if "seed" in known and "seed" not in options:
        options["seed"] = 0 if known["seed"] is None else known["seed"]
    base = options.get("base", known.get("base")) if wraps_base(method) else None
    # A seed that is not the smoothing's own option is its base's already.
    routed = "seed" in options and "seed" not in known
    if isinstance(base, str) and is_method(base) and not wraps_base(base) and not routed:
        inner = options.get("base_options")
        if inner is None or isinstance(inner, dict):
            filled = _fixed_draws(base, dict(inner or {}))
            if filled != (inner or {}):
                options["base_options"] = filled
    return options


def _attacked_options(
    method: str, given: Mapping[str, object], box: tuple[Bound, Bound] | None = None
) -> dict[str, object]:
    defaults = attack_defaults(method).get("options", {})
    known = options_of(method)
    options = _fixed_draws(method, {**{n: v for n, v in defaults.items() if n in known}, **given})
    if box is None:
        return options
    # SmoothGrad keeps explain's own noise level (each item's range): on [0, 1]
    # data the map attacked is then explain's with the same options, as LRP's
    # box and the integrated-gradients baseline of [0, 1] are explain's defaults.
    ranged = range_options(*box, methods=[method])
    ranged = {m: o for m, o in ranged.items() if m not in _ITEM_RANGED}
    options = {**ranged.get(method, {}), **options}
    # A wrapper adds its further keyword options to base_options.
    return with_base_range(method, options, *box)


def _check_weights(weights: object) -> tuple[float, float] | None:
    if weights is None:
        return None
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise InputTypeError(
            f"weights must be None or (w_e, w_o), two numbers >= 0; "
            f"got {type(weights).__name__} {weights!r}"
        )
    values = list(weights)
    if len(values) != 2 or not all(is_number(w) and w >= 0 and math.isfinite(w) for w in values):
        raise InputError(f"weights must be None or (w_e, w_o), two numbers >= 0; got {weights!r}")
    return float(values[0]), float(values[1])


def _problem(
    model: nn.Module,
    x: torch.Tensor,
    target: object,
    map_target: torch.Tensor | None,
    s: _Settings,
) -> _Problem:
    """The attack on ``x``: its labels, logits and original maps, on the ReLU network."""
    with torch.no_grad():
        logits = model(x)
    _check_classes(logits)
    label = logits.argmax(1)
    if s.weights is None:
        s = replace(s, weights=default_weights(x.shape[2], x.shape[3], logits.shape[1]))
    explained = check_target(target, x.shape[0])
    explained = label if explained is None else explained.to(x.device)
    map_orig = _heatmaps(model, x, s, explained).detach()
    # Checked against the maps (a layer method's are the layer's size) before any step.
    s = replace(s, k=metrics.resolve_k(s.k, *map_orig.shape[1:]))
    return _Problem(
        model=model,
        x=x,
        s=s,
        explained=explained,
        label=label,
        logits=logits,
        map_orig=map_orig,
        map_target=map_orig if map_target is None else map_target,
    )


def _search(p: _Problem) -> torch.Tensor:
    """The best iterate per image over the runs from ``x`` and the restarts."""
    s, x, goal = p.s, p.x, GOALS[p.s.goal]
    best, best_score = x.clone(), _evaluate(p, goal, x)[0]
    generator = torch.Generator().manual_seed(s.seed)
    radius = s.eps_input if s.eps is not None else 0.01 * (s.high - s.low)
    # Without a schedule the network is attacked as it is, and the
    # override (which sees every torch call in forward) is left out.
    if s.schedule != "none":
        check_overridable(p.model, SURROGATE)
    surrogate = (
        contextlib.nullcontext() if s.schedule == "none" else replace_relu(p.model, p.surrogate)
    )
    with surrogate:
        for r in range(s.restarts + 1):
            start = x
            if r:
                noise = torch.rand(x.shape, generator=generator, dtype=x.dtype)
                start = p.project(x + radius * (2 * noise.to(x.device) - 1))
            best, best_score = _run(p, goal, start, best, best_score)
    return best


def _result(
    p: _Problem, best: torch.Tensor, map_adv: torch.Tensor, logits_adv: torch.Tensor
) -> ManipulationResult:
    """Scores of the best iterates against the target, the original map and the input."""
    x, k = p.x, p.s.k
    label_adv = logits_adv.argmax(1)
    scores: dict[str, torch.Tensor] = {}
    for name, value in metrics.compare(map_adv, p.map_target, k=k).items():
        scores[f"expl_{name}_target"] = value
    for name, value in metrics.compare(map_adv, p.map_orig, k=k).items():
        scores[f"expl_{name}_orig"] = value
    before = metrics.compare(p.map_orig, p.map_target, k=k)
    for name in ("pcc", "ssim", "mse"):
        scores[f"expl_{name}_target_before"] = before[name]
    # In units of the data range, per channel: pixel values in [0, 1] whether
    # or not the model's inputs are normalised, so sizes compare across models.
    # In float32 at least, as compare's measures: a bfloat16 difference rounds to 8 bits.
    wide = torch.promote_types(x.dtype, torch.float32)
    change = (best.to(wide) - x.to(wide)) / p.s.width(wide).to(x.device)
    scores["input_mse"] = change.square().flatten(1).mean(1)
    scores["input_max_change"] = change.abs().flatten(1).amax(1)
    scores["input_pcc"] = _input_pcc(best, x)
    scores["output_change"] = _output_change(logits_adv, p.logits)
    return ManipulationResult(
        x=x.cpu(),
        x_adv=best.detach().cpu(),
        map_orig=p.map_orig.cpu(),
        map_adv=map_adv.cpu(),
        map_target=p.map_target.detach().cpu(),
        label=p.label.cpu(),
        label_adv=label_adv.cpu(),
        label_kept=(label_adv == p.label).cpu(),
        metrics={name: v.detach().cpu() for name, v in scores.items()},
        history=torch.stack(p.history).cpu(),
        method=p.s.method,
        goal=p.s.goal,
        settings=_settings_record(p.s),
    )


def _settings_record(s: _Settings) -> dict[str, object]:
    """The resolved settings as JSON numbers and names, for the records."""
    out: dict[str, object] = {"steps": s.steps}
    if GOALS[s.goal].targeted:
        out |= {"lr": s.lr, "w_e": s.weights[0], "w_o": s.weights[1]}
        if s.eps is not None:
            out["eps"] = s.eps
    else:
        out |= {"eps": s.eps, "step": s.step}
    # The expl_topk scores of every goal depend on it, not only the topk goal.
    out["k"] = s.k
    out["beta_schedule"] = s.schedule
    if s.schedule == "geometric":
        # Only the geometric schedule reads them; elsewhere they would mislead.
        out |= {"beta0": s.beta0, "beta_end": s.beta_end}
    for name, value in s.options.items():
        # Prefixed: a method's own steps (integrated gradients) are not the attack's.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            out[f"method_{name}"] = value
    return out


def random_targets(maps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image's target: the map of another, random image of the batch.

    The assignment is a random cyclic permutation, so no image gets its own
    map. A batch of one has no other image: pass maps of at least two (e.g.
    of the whole data set, then take the rows you need).

    Parameters
    ----------
    maps : torch.Tensor
        Heatmaps ``(B, H, W)``, ``B >= 2``.
    generator : torch.Generator, optional
        Source of randomness.

    Returns
    -------
    torch.Tensor
        ``maps[perm]`` for a derangement ``perm``.

    Examples
    --------
    >>> maps = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 2)
    >>> t = random_targets(maps, torch.Generator().manual_seed(0))
    >>> bool((t[:, 0, 0] != maps[:, 0, 0]).all())
    True
    """
    check_batch(maps, "maps", min_dim=3)
    if maps.shape[0] < 2:
        raise InputError(
            "random_targets needs maps of at least 2 images, so that each gets another's map; "
            f"got a batch of {maps.shape[0]}"
        )
    return maps[derangement(maps.shape[0], generator).to(maps.device)]


def derangement(n: int, generator: torch.Generator | int | None = None) -> torch.Tensor:
    """A random permutation of ``range(n)`` without fixed points.

    Item ``i`` is sent to the next item on one random cycle through all ``n``,
    so it never maps to itself; with a seed the result depends only on ``n``
    and the seed, not on batches or ranks.

    Parameters
    ----------
    n : int
        Number of items, at least 2.
    generator : torch.Generator, int or None
        Source of randomness, or a seed for one.

    Examples
    --------
    >>> p = derangement(5, 0)
    >>> bool((p != torch.arange(5)).all())
    True
    """
    if n < 2:
        raise InputError(
            f"an attack needs at least 2 images, one to attack and one for the target map; got {n}"
        )
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    order = torch.randperm(n, generator=generator)
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(-1)
    return out
