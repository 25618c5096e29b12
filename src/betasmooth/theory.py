"""Numerical checks of the theory behind beta-smoothing.

softplus_beta is ReLU averaged over logistic noise ``e ~ p_beta`` (scale ``1/beta``):

    E_e[relu(x - e)] = softplus_beta(x),      d/dx softplus_beta(x) = sigmoid(beta x).

Theorem 2 (Dombrowski et al. 2019) lifts this to ``g(x) = relu(w.x)``:

    E_e[grad g(x - e)] = P(u.e < t) w = sigmoid(beta t) w = grad softplus_{beta/|w|}(w.x),

with ``u = w/|w|`` and ``t = u.x``. The middle equality needs the noise
component along ``w``, ``u.e``, to have the density ``p_beta``:

- ``projected`` noise (``u.e ~ p_beta``, anything orthogonal to ``w``): exact;
  a Monte Carlo estimate errs by ``O(1/sqrt(N))`` only.
- ``iid`` noise (every component ``~ p_beta``, as usually stated): ``u.e`` is a
  weighted sum of logistic variables with the right variance but not
  logistic unless ``w`` is axis-aligned, so a bias remains. It depends on the
  direction ``u`` only (not on ``beta`` once ``t`` is scaled by ``beta``); as
  the weight spreads over many components ``u.e`` tends to the normal
  distribution of the same variance and the bias to
  ``max_z |sigmoid(z) - Phi(z sqrt(3) / pi)|``.

:func:`iid_cdf` computes the distribution of ``u.e`` by inverting its
characteristic function; :func:`run` gathers all checks (the
``betasmooth theorem`` command prints and plots its result).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .explain import explain
from .geometry import curvature
from .metrics import heatmap, pcc
from .smooth import LogisticNoise, check_beta, logistic_std, smooth, softplus
from .validate import MAX_SEED, InputError, check_choice, check_count, given, is_number
from .zoo import BUILTIN_DATA, load_model

__all__ = [
    "NOISE_MODELS",
    "bias_limit",
    "iid_bias",
    "iid_cdf",
    "identity_1d",
    "run",
    "smoothing_vs_smoothgrad",
    "curvature_by_beta",
    "theorem2_monte_carlo",
]

# Half-width of p_beta, in units of 1/beta, beyond which its mass is below 1e-19.
_TAIL = 45.0
# Where iid_cdf is 0 or 1 to float64's rounding: for weights u of unit norm (each
# |u_i| <= 1), Chernoff's bound at t = 1/2 gives P(beta u.e > z) <= (pi/2) exp(-z/2),
# 6.7e-18 at 80.
_CDF_TAIL = 80.0
# Standard deviation of the standard logistic distribution (beta = 1).
_LOGISTIC_SD = logistic_std(1.0)


def _gauss_legendre(
    lo: torch.Tensor, hi: torch.Tensor, panels: int, order: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of composite Gauss-Legendre quadrature on ``[lo, hi]`` (broadcast)."""
    check_count("panels", panels)
    nodes, weights = np.polynomial.legendre.leggauss(order)
    nodes = torch.as_tensor(nodes, dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    edges = torch.linspace(0, 1, panels + 1, dtype=torch.float64)
    left, width = edges[:-1, None], (edges[1] - edges[0])
    unit = (left + width * (nodes + 1) / 2).flatten()
    unit_w = (width / 2 * weights).expand(panels, order).flatten()
    lo, hi = lo[..., None], hi[..., None]
    return lo + (hi - lo) * unit, (hi - lo) * unit_w


def identity_1d(
    x: torch.Tensor, betas: Sequence[float], panels: int = 90
) -> dict[str, torch.Tensor]:
    """``E[relu(x - e)]`` and ``E[1{e < x}]``, ``e ~ p_beta``, by quadrature, and the closed forms.

    Integrates the density of :class:`~betasmooth.LogisticNoise` up to ``x``
    with composite Gauss-Legendre quadrature in float64, leaving out only
    ``e > 45 / beta`` and ``e < min(x, 0) - 45 / beta`` (mass below 1e-19 of
    what is kept, so that far in the left tail, where both expectations are
    tiny, they are still exact to relative precision), and compares with
    :func:`~betasmooth.softplus` and with its autograd derivative.

    Parameters
    ----------
    x : torch.Tensor
        1-D grid of points.
    betas : sequence of float
        Sharpness values.
    panels : int
        Quadrature panels (16 nodes each).

    Returns
    -------
    dict of str to torch.Tensor
        ``expectation``, ``softplus``, ``cdf``, ``derivative``, each
        ``(len(betas), len(x))``.

    Examples
    --------
    >>> out = identity_1d(torch.linspace(-3, 3, 61), [1.0, 5.0])
    >>> float((out["expectation"] - out["softplus"]).abs().max()) < 1e-12
    True
    """
    betas = list(betas)
    for b in betas:
        check_beta(b)
    x = torch.as_tensor(x, dtype=torch.float64)
    beta = torch.as_tensor(betas, dtype=torch.float64)[:, None]
    upper = x.expand(beta.shape[0], -1)
    # p_beta has no mass outside (-45/beta, 45/beta) to float64 precision.
    lower = upper.clamp(max=0) - _TAIL / beta
    e, weight = _gauss_legendre(lower, torch.minimum(upper, _TAIL / beta), panels)
    density = LogisticNoise(beta[..., None]).log_prob(e).exp()
    xs = upper.clone().requires_grad_(True)
    with torch.enable_grad():
        value = softplus(xs, beta)
        (derivative,) = torch.autograd.grad(value.sum(), xs)
    return {
        "expectation": ((upper[..., None] - e) * density * weight).sum(-1),
        "softplus": value.detach(),
        "cdf": (density * weight).sum(-1),
        "derivative": derivative,
    }


def _logistic_cf(s: torch.Tensor) -> torch.Tensor:
    """Characteristic function ``pi s / sinh(pi s)`` of the standard logistic distribution."""
    a = math.pi * s.abs()
    # log(a / sinh a) = log(2 a) - a - log1p(-exp(-2 a)), finite for every a > 0
    log_cf = torch.log(2 * a) - a - torch.log1p(-torch.exp(-2 * a))
    return torch.where(a < 1e-8, torch.ones_like(a), log_cf.exp())


def iid_cdf(u: torch.Tensor, z: torch.Tensor, panels: int = 60) -> torch.Tensor:
    """``P(u.e < z / beta)`` for ``e`` with i.i.d. ``p_beta`` components, for any beta.

    ``beta u.e`` is a weighted sum of standard logistic variables with weights
    ``u / |u|``; its distribution function is obtained by Gil-Pelaez inversion
    of the characteristic function ``prod_i phi(u_i s)``,
    ``phi(s) = pi s / sinh(pi s)``:

        F(z) = 1/2 + (1/pi) int_0^inf sin(s z) prod_i phi(u_i s) / s ds,

    by composite Gauss-Legendre quadrature on ``(0, 15]`` (the integrand has
    decayed below 1e-17 there, since ``sum |u_i| >= 1``).

    Parameters
    ----------
    u : torch.Tensor
        Weight vector ``(d,)``; normalised here.
    z : torch.Tensor
        Points, in units of ``1/beta`` (``z = beta t``).
    panels : int
        Quadrature panels of 16 nodes on ``(0, 15]``; at least 2.4 per unit of
        the largest ``|z|`` up to 80 (beyond, it is 0 or 1 to rounding), so that the nodes follow
        ``sin(s z)`` (15 z / 2 pi periods on the interval).

    Returns
    -------
    torch.Tensor
        The distribution function at ``z``, float64, shaped like ``z``.

    Examples
    --------
    >>> z = torch.linspace(-4, 4, 9)
    >>> bool(torch.allclose(iid_cdf(torch.tensor([0.0, 1.0]), z), torch.sigmoid(z.double())))
    True
    """
    u = _direction(torch.as_tensor(u, dtype=torch.float64).flatten(), "u")
    z = torch.as_tensor(z, dtype=torch.float64)
    # Beyond |z| = _CDF_TAIL the tail is below float64's rounding of 1: exactly 0 or 1,
    # which also bounds the panels (and the memory) the inner points need.
    inner = z[z.abs() <= _CDF_TAIL]
    widest = float(inner.abs().max()) if inner.numel() else 0.0
    panels = max(panels, math.ceil(2.4 * widest))
    s, weight = _gauss_legendre(torch.tensor(0.0), torch.tensor(15.0), panels)
    # Equal weights share one factor: evenly spread w of any length costs one power.
    values, counts = torch.unique(u.abs(), return_counts=True)
    log_cf = torch.zeros_like(s)
    for value, count in zip(values.tolist(), counts.tolist()):
        if value > 0:
            log_cf = log_cf + count * torch.log(_logistic_cf(value * s))
    kernel = log_cf.exp() * weight / s
    cdf = 0.5 + (torch.sin(z.flatten()[:, None] * s) * kernel).sum(1).reshape(z.shape) / math.pi
    cdf = torch.where(z.abs() > _CDF_TAIL, (z > 0).to(cdf.dtype), cdf)
    return cdf.clamp(0.0, 1.0)  # rounding past 0 or 1


def _direction(w: torch.Tensor, name: str) -> torch.Tensor:
    """``w / |w|``, refused in one line where it has no direction."""
    peak = float(w.abs().max()) if w.numel() else 0.0
    if not math.isfinite(peak) or peak == 0:
        raise InputError(
            f"{name} must be a finite vector with a nonzero entry (the noise is projected on its "
            f"direction); got {'a zero vector' if peak == 0 else 'a non-finite value'}"
        )
    # Scaled first: the norm of 1e200 or 1e-200 entries overflows or flushes to 0.
    w = w / peak
    return w / w.norm()


def iid_bias(u: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """Largest ``|P(u.e < t) - sigmoid(beta t)|`` for i.i.d. logistic noise.

    The gap in the coefficient of the Theorem 2 gradient, ``E[grad g] =
    P(u.e < t) w`` against ``sigmoid(beta t) w``, over the points ``z = beta t``
    (by default a grid of 2001 points on ``[-10, 10]``, i.e. the supremum
    over ``x``). Independent of beta.

    Examples
    --------
    >>> float(iid_bias(torch.tensor([1.0, 0.0, 0.0]))) < 1e-12
    True
    >>> 0 < float(iid_bias(torch.ones(64))) < 0.03
    True
    """
    if z is None:
        z = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    z = torch.as_tensor(z, dtype=torch.float64)
    return (iid_cdf(u, z) - torch.sigmoid(z)).abs().max()


def bias_limit(grid: int = 200001) -> tuple[float, float]:
    """``max_z |sigmoid(z) - Phi(z sqrt(3) / pi)|`` and its argmax ``z > 0``.

    The logistic distribution function against the normal one of the same
    variance: the iid bias as the weight spreads evenly over ``d -> inf``
    components. Dense grid on ``[0, 10]``, refined by golden-section search.

    Examples
    --------
    >>> round(bias_limit()[0], 6)
    0.022663
    """

    def gap(z: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(z) - torch.special.ndtr(z / _LOGISTIC_SD)).abs()

    z = torch.linspace(0, 10, grid, dtype=torch.float64)
    i = int(gap(z).argmax())
    lo, hi = float(z[max(i - 1, 0)]), float(z[min(i + 1, grid - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        ga, gb = gap(torch.tensor([a, b], dtype=torch.float64)).tolist()
        lo, hi = (a, hi) if ga < gb else (lo, b)
    arg = (lo + hi) / 2
    return float(gap(torch.tensor(arg, dtype=torch.float64))), arg


def _projected_noise(
    u: torch.Tensor, beta: float, n: int, generator: torch.Generator
) -> torch.Tensor:
    """``u.e ~ p_beta``; the part orthogonal to ``u`` is i.i.d. logistic (any law would do)."""
    e = _iid_noise(u, beta, n, generator)
    along = _iid_noise(u[:1], beta, n, generator)[:, 0]
    return e + (along - e @ u)[:, None] * u


def _iid_noise(u: torch.Tensor, beta: float, n: int, generator: torch.Generator) -> torch.Tensor:
    uniform = torch.rand((n, u.shape[0]), generator=generator, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    return LogisticNoise(torch.tensor(beta, dtype=torch.float64)).icdf(uniform.clamp_min(tiny))


NoiseModel = Callable[[torch.Tensor, float, int, torch.Generator], torch.Tensor]
NOISE_MODELS: dict[str, NoiseModel] = {"projected": _projected_noise, "iid": _iid_noise}
"""Noise models of Theorem 2: ``(u, beta, n, generator) -> (n, d)`` samples."""


def _z_quantile(level: float) -> float:
    return math.sqrt(2) * float(torch.special.erfinv(torch.tensor(level, dtype=torch.float64)))


def _plain(value: object) -> object:
    """A one-element tensor as the Python number it holds (``checkpoints`` given as a
    tensor iterate as such), for the checks of plain numbers."""
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def theorem2_monte_carlo(
    w: torch.Tensor,
    x: torch.Tensor,
    beta: float,
    n: int,
    noise: str = "projected",
    *,
    seed: int = 0,
    level: float = 0.95,
    checkpoints: Sequence[int] = (),
) -> dict[str, torch.Tensor]:
    """Monte Carlo ``E_e[grad relu(w.(x - e))]`` against ``grad softplus_{beta/|w|}(w.x)``.

    Both gradients are multiples of ``w``; the estimate's coefficient is the
    fraction of samples with ``w.(x - e) > 0``, the closed form's is
    ``sigmoid(beta w.x / |w|)``. Errors are given in that coefficient
    (``|gradient error| / |w|``).

    Parameters
    ----------
    w : torch.Tensor
        Weight vector ``(d,)``.
    x : torch.Tensor
        Evaluation points ``(m, d)``.
    beta : float
        Sharpness of the noise.
    n : int
        Samples.
    noise : str
        A key of :data:`NOISE_MODELS`: ``"projected"`` or ``"iid"``.
    seed : int
        Seed of the samples.
    level : float
        Confidence level of the intervals (normal approximation).
    checkpoints : sequence of int
        Sample sizes ``<= n`` at which the error of the running estimate is
        also reported.

    Returns
    -------
    dict of str to torch.Tensor
        ``estimate`` (m,), ``closed_form`` (m,), ``error`` (m,),
        ``half_width`` (m,, per point at ``level``), ``simultaneous_half_width``
        (scalar, Bonferroni over the m points), ``checkpoint_error`` (the
        largest error at each checkpoint) and ``checkpoint_half_width``.

    Examples
    --------
    >>> w = torch.tensor([3.0, 4.0])
    >>> out = theorem2_monte_carlo(w, torch.tensor([[0.2, 0.1]]), 1.0, 20000)
    >>> bool(out["error"][0] <= out["simultaneous_half_width"])
    True
    """
    check_choice("noise model", noise, NOISE_MODELS)
    check_beta(beta)
    n, level = _plain(n), _plain(level)
    n = check_count("n", n)
    # A checkpoint of 0 or less would index the running estimate from its end.
    steps = [check_count("checkpoints", _plain(c), 1, n) for c in checkpoints]
    if not is_number(level) or not 0.0 < float(level) < 1.0:
        raise InputError(
            f"level must be a number between 0 and 1, exclusive; got {given('level', level)}"
        )
    w = torch.as_tensor(w, dtype=torch.float64)
    x = torch.as_tensor(x, dtype=torch.float64)
    u = _direction(w, "w")
    generator = torch.Generator().manual_seed(seed)
    e = NOISE_MODELS[noise](u, beta, n, generator)
    # grad relu(w.(x - e)) = 1{w.(x - e) > 0} w
    active = ((x @ w)[None, :] - (e @ w)[:, None] > 0).to(torch.float64)
    running = active.cumsum(0) / torch.arange(1, n + 1, dtype=torch.float64)[:, None]
    closed = torch.sigmoid(beta * (x @ u))
    var = closed * (1 - closed)
    z = _z_quantile(level)
    z_all = _z_quantile(1 - (1 - level) / x.shape[0])
    steps = torch.as_tensor(steps, dtype=torch.long)
    estimate = running[-1]
    return {
        "estimate": estimate,
        "closed_form": closed,
        "error": (estimate - closed).abs(),
        "half_width": z * (var / n).sqrt(),
        "simultaneous_half_width": z_all * (var.max() / n).sqrt(),
        "checkpoint_error": (running[steps - 1] - closed).abs().amax(1),
        "checkpoint_half_width": z_all * (var.max() / steps.to(torch.float64)).sqrt(),
    }


def smoothing_vs_smoothgrad(
    model: torch.nn.Module,
    x: torch.Tensor,
    betas: Sequence[float],
    *,
    samples: int = 64,
    input_range: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Median PCC between beta-smoothed gradient maps and SmoothGrad maps, per beta.

    SmoothGrad uses logistic noise of scale ``1/beta`` (standard deviation
    ``pi / (sqrt(3) beta)``), and Gaussian noise of the same standard
    deviation. Theorem 2 matches the gradient of one layer of weights ``w``
    smoothed at ``beta`` with logistic noise of scale ``1 / (beta |w|)``; a
    network has a ``|w|`` per unit and many layers, so the scale ``1/beta`` is
    a convention, and how far the maps then differ is what this measures.

    Parameters
    ----------
    model : nn.Module
        A ReLU classifier.
    x : torch.Tensor
        Input batch.
    betas : sequence of float
        Sharpness values.
    samples : int
        SmoothGrad samples.
    input_range : float
        Width of the input range; SmoothGrad's ``sigma`` is a fraction of it.
    seed : int
        Seed of SmoothGrad's noise.
    progress : bool
        Show a progress bar over beta.

    Returns
    -------
    dict
        ``{str(beta): {"logistic": pcc, "gaussian": pcc}}``, medians over ``x``.

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, _ = bs.load_data("digits")
    >>> out = smoothing_vs_smoothgrad(model, x[:2], [1.0, 10.0], samples=8)
    >>> sorted(out["1.0"])
    ['gaussian', 'logistic']
    """
    result = {}
    for beta in tqdm(list(betas), desc="smoothgrad", disable=not progress, leave=False):
        reference = heatmap(explain(model, x, "beta_smooth", beta=float(beta)))
        sigma = logistic_std(float(beta)) / input_range
        options = {"sigma": sigma, "n": samples, "seed": seed, "input_range": input_range}
        result[str(float(beta))] = {
            noise: float(
                pcc(
                    reference, heatmap(explain(model, x, "smoothgrad", noise=noise, **options))
                ).median()
            )
            for noise in ("logistic", "gaussian")
        }
    return result


def curvature_by_beta(
    model: torch.nn.Module,
    x: torch.Tensor,
    betas: Sequence[float],
    *,
    iterations: int = 20,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Median Hessian norm and principal curvature of ``smooth(model, beta)`` over ``x``.

    Includes ``"relu"`` for the model itself (zero almost everywhere). Every
    beta measures the logit of the class the model itself predicts, so that a
    small beta, which can move the argmax, is compared on the same surface.

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, _ = bs.load_data("digits")
    >>> curvature_by_beta(model, x[:2], [1.0])["relu"]["hessian_norm"]
    0.0
    """

    with torch.no_grad():
        label = model(x).argmax(1)

    def medians(m: torch.nn.Module) -> dict[str, float]:
        out = curvature(m, x, label, iterations=iterations, seed=seed, probes=1)
        return {
            key: float(out[key].nanmedian())
            for key in ("hessian_norm", "principal_curvature", "gradient_norm")
        }

    result = {
        str(float(beta)): medians(smooth(model, float(beta)))
        for beta in tqdm(list(betas), desc="curvature", disable=not progress, leave=False)
    }
    result["relu"] = medians(model)
    return result


_CONFIG = {
    False: {"n": 100_000, "images": 8, "samples": 64, "betas": [0.5, 1, 2, 5, 10, 20, 50]},
    True: {"n": 10_000, "images": 2, "samples": 16, "betas": [0.5, 2, 10, 50]},
}


def run(quick: bool = False, seed: int = 0, progress: bool = False) -> dict:
    """All checks of the theory, as a JSON-serialisable dict.

    Under a minute on one CPU core (``quick``: a few seconds). Errors of
    Theorem 2 are in the coefficient of the gradient along ``w``:
    ``|E_hat[grad g(x - e)] - grad softplus_{beta/|w|}(w.x)| / |w|``.

    Parameters
    ----------
    quick : bool
        Fewer samples, images and betas.
    seed : int
        Seed of every random draw.
    progress : bool
        Show progress bars.

    Returns
    -------
    dict
        Scalars (float) and lists; the layout is stable::

            identity_1d_max_error          max |E[relu(x - e)] - softplus_beta(x)| (quadrature)
            sigmoid_derivative_max_error   max |E[1{e < x}] - d/dx softplus_beta(x)| (autograd)
            identity_1d_betas              the betas of both checks (201 points of x in [-5, 5])
            theorem2_setup                 {"d", "w", "beta", "n", "points", "level"}
            theorem2_projected_max_error   max over points, projected noise, N = n
            theorem2_projected_ci          [0, h]: h the simultaneous (Bonferroni) 95%
                                           half-width; the max error lies inside with
                                           probability >= 0.95 when Theorem 2 holds
            theorem2_projected_within_ci   bool
            theorem2_iid_max_error         the same for iid noise (bias + sampling)
            theorem2_iid_mc_vs_exact       max |MC - exact iid cdf| (sampling only)
            theorem2_iid_bias              sup_x |P(u.e < t) - sigmoid(beta t)|, exact (by cf
                                           inversion), for the random Gaussian w in R^d
            theorem2_iid_bias_at_points    the same, over the evaluation points only
            theorem2_iid_bias_axis_aligned the same for w = e_1 (0 up to quadrature error)
            theorem2_iid_bias_limit        max_z |sigmoid(z) - Phi(z sqrt(3)/pi)|  (d -> inf)
            theorem2_iid_bias_limit_at     its argmax z = beta t > 0
            theorem2_iid_bias_by_d         {str(d): bias for w = (1, ..., 1) in R^d}
            smoothing_vs_smoothgrad_pcc    {str(beta): {"logistic": pcc, "gaussian": pcc}}
            curvature_by_beta              {str(beta) | "relu": {"hessian_norm": median,
                                            "principal_curvature": median, "gradient_norm": median}}
            seconds                        {"identity", "theorem2", "smoothgrad", "curvature"}
            curves:
              softplus   {"x", "betas": [0.5, 1, 2, 5, 10], "y": [[...] per beta], "relu"}
              density    {"x", "logistic", "normal", "beta"}   (normal: same variance)
              mc_error   {"n", "projected", "projected_ci", "iid", "iid_bias"}
              iid_bias   {"d", "bias", "limit"}
              smoothing_vs_smoothgrad  {"beta", "logistic", "gaussian"}
              curvature  {"beta", "hessian_norm", "principal_curvature"}

        The last three sections use the built-in ``digits-cnn`` on the first
        test images; SmoothGrad there uses ``sigma = pi / (sqrt(3) beta)``
        (input range 1).

    Examples
    --------
    >>> import betasmooth as bs
    >>> summary = bs.theory.run(quick=True)
    >>> summary["identity_1d_max_error"] < 1e-10
    True
    """
    config = _CONFIG[bool(quick)]
    seconds: dict[str, float] = {}
    with _timed(seconds, "identity"):
        identity = _identity_part()
    with _timed(seconds, "theorem2"):
        theorem2 = _theorem2_part(config["n"], seed)
    model = load_model("digits-cnn")
    # The built-in set itself: a digits/ folder where the command runs is not meant.
    images = BUILTIN_DATA["digits"]("test")[0][: config["images"]]
    betas = config["betas"]
    with _timed(seconds, "smoothgrad"):
        smoothgrad_pcc = smoothing_vs_smoothgrad(
            model, images, betas, samples=config["samples"], seed=seed, progress=progress
        )
    with _timed(seconds, "curvature"):
        curv = curvature_by_beta(model, images, betas, seed=seed, progress=progress)
    keys = [str(float(b)) for b in betas]
    curves = {
        **identity.pop("curves"),
        **theorem2.pop("curves"),
        "smoothing_vs_smoothgrad": _by_beta(betas, smoothgrad_pcc, keys, ("logistic", "gaussian")),
        "curvature": _by_beta(betas, curv, keys, ("hessian_norm", "principal_curvature")),
    }
    return {
        **identity,
        **theorem2,
        "smoothing_vs_smoothgrad_pcc": smoothgrad_pcc,
        "curvature_by_beta": curv,
        "seconds": seconds,
        "curves": curves,
    }


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start


def _by_beta(
    betas: Sequence[float], table: Mapping[str, Mapping[str, float]], keys: list[str], fields: tuple
) -> dict[str, list[float]]:
    """Columns of a ``{str(beta): {field: value}}`` table, for a curve against beta."""
    return {"beta": [float(b) for b in betas], **{f: [table[k][f] for k in keys] for f in fields}}


def _identity_part() -> dict:
    """The 1-D identity and the derivative of softplus, with the softplus and density curves."""
    x_grid = torch.linspace(-5, 5, 201, dtype=torch.float64)
    betas = [0.5, 1.0, 2.0, 5.0, 10.0, 100.0]
    identity = identity_1d(x_grid, betas)
    curve_x = torch.linspace(-3, 3, 301, dtype=torch.float64)
    curve_betas = [0.5, 1.0, 2.0, 5.0, 10.0]
    density_x = torch.linspace(-8, 8, 401, dtype=torch.float64)
    logistic = LogisticNoise(torch.tensor(1.0, dtype=torch.float64)).log_prob(density_x).exp()
    normal = torch.exp(-0.5 * (density_x / _LOGISTIC_SD) ** 2) / (
        _LOGISTIC_SD * math.sqrt(2 * math.pi)
    )
    return {
        "identity_1d_max_error": float(
            (identity["expectation"] - identity["softplus"]).abs().max()
        ),
        "sigmoid_derivative_max_error": float(
            (identity["cdf"] - identity["derivative"]).abs().max()
        ),
        "identity_1d_betas": betas,
        "curves": {
            "softplus": {
                "x": curve_x.tolist(),
                "betas": curve_betas,
                "y": [softplus(curve_x, b).tolist() for b in curve_betas],
                "relu": curve_x.clamp_min(0).tolist(),
            },
            "density": {
                "x": density_x.tolist(),
                "logistic": logistic.tolist(),
                "normal": normal.tolist(),
                "beta": 1.0,
            },
        },
    }


def _theorem2_part(n: int, seed: int) -> dict:
    """Theorem 2 by Monte Carlo under projected and iid noise, and the exact iid bias."""
    d, beta = 64, 1.0
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=generator, dtype=torch.float64)
    u = w / w.norm()
    z = torch.linspace(-3, 3, 25, dtype=torch.float64)
    # Points with u.x = z / beta and an arbitrary orthogonal part.
    other = torch.randn(z.shape[0], d, generator=generator, dtype=torch.float64)
    points = z[:, None] / beta * u + other - (other @ u)[:, None] * u
    checkpoints = [c for c in (100, 300, 1000, 3000, 10_000, 30_000, 100_000) if c <= n]
    # One seed per noise model; wrapped, so that the largest seed a user may give fits too.
    mc = {
        kind: theorem2_monte_carlo(
            w, points, beta, n, kind, seed=(seed + i) % (MAX_SEED + 1), checkpoints=checkpoints
        )
        for i, kind in enumerate(NOISE_MODELS)
    }
    exact_iid = iid_cdf(u, z)
    bias_at_points = float((exact_iid - torch.sigmoid(z)).abs().max())
    limit, limit_at = bias_limit()
    dims = [1, 2, 3, 4, 8, 16, 64, 256, 4096]
    by_d = {str(k): float(iid_bias(torch.ones(k))) for k in dims}
    projected = mc["projected"]
    h = float(projected["simultaneous_half_width"])
    return {
        "theorem2_setup": {
            "d": d,
            "w": "standard Gaussian in R^d",
            "beta": beta,
            "n": n,
            "points": len(z),
            "level": 0.95,
        },
        "theorem2_projected_max_error": float(projected["error"].max()),
        "theorem2_projected_ci": [0.0, h],
        "theorem2_projected_within_ci": bool(projected["error"].max() <= h),
        "theorem2_iid_max_error": float(mc["iid"]["error"].max()),
        "theorem2_iid_mc_vs_exact": float((mc["iid"]["estimate"] - exact_iid).abs().max()),
        "theorem2_iid_bias": float(iid_bias(u)),
        "theorem2_iid_bias_at_points": bias_at_points,
        "theorem2_iid_bias_axis_aligned": float(iid_bias(torch.eye(d, dtype=torch.float64)[0])),
        "theorem2_iid_bias_limit": limit,
        "theorem2_iid_bias_limit_at": limit_at,
        "theorem2_iid_bias_by_d": by_d,
        "curves": {
            "mc_error": {
                "n": checkpoints,
                "projected": projected["checkpoint_error"].tolist(),
                "projected_ci": projected["checkpoint_half_width"].tolist(),
                "iid": mc["iid"]["checkpoint_error"].tolist(),
                "iid_bias": bias_at_points,
            },
            "iid_bias": {"d": dims, "bias": list(by_d.values()), "limit": limit},
        },
    }
