"""Heatmap normalisation and map similarity.

Every similarity takes two batches of maps of shape ``(B, H, W)`` and returns
one value per pair, shape ``(B,)``. ``mse``, ``ssim``, ``pcc``,
``center_of_mass`` and ``com_shift`` are plain torch operations,
differentiable in both arguments, so that they can serve as attack losses;
``spearman`` and ``topk_intersection`` are rank statistics without a gradient.

Constant maps (all pixels equal) get defined values, never NaN:

- ``pcc`` and ``spearman``: 1 when both maps are constant, 0 when exactly one is;
- ``ssim``: 1 when both maps are the same constant (``data_range = 0``);
  otherwise the usual formula, whose constants ``C1, C2 > 0`` keep it finite;
- ``center_of_mass`` of an all-zero map: the geometric centre of the grid.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .validate import (
    InputError,
    InputTypeError,
    check_batch,
    check_choice,
    check_map_batch,
    given,
    is_number,
    registrar,
    warn_user,
)

__all__ = [
    "METRICS",
    "medians",
    "group_records",
    "REDUCTIONS",
    "center_of_mass",
    "com_shift",
    "compare",
    "default_k",
    "heatmap",
    "mse",
    "pcc",
    "register_metric",
    "resolve_k",
    "spearman",
    "ssim",
    "ssim_window",
    "topk_intersection",
]

Metric = Callable[..., torch.Tensor]
METRICS: dict[str, Metric] = {}

# Wang et al. 2004, as in skimage.metrics.structural_similarity(gaussian_weights=True).
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
SSIM_K1 = 0.01
SSIM_K2 = 0.03

TOPK_FRACTION = 0.1


def register_metric(name: str, *, replace: bool = False) -> Callable[[Metric], Metric]:
    """Add a map similarity ``fn(a, b, **options) -> (B,)`` to :data:`METRICS` under ``name``.

    :func:`compare` evaluates every registered metric, passes each the
    keyword options its signature names, and checks that it gives one number
    per map. A taken name is refused unless ``replace`` (the attack's losses
    keep the built-in ``pcc`` and ``ssim`` either way).

    Examples
    --------
    >>> @register_metric("l1")
    ... def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ...     return (a - b).abs().flatten(1).mean(1)
    >>> del METRICS["l1"]
    """
    return registrar(METRICS, name, "metric", replace=replace)


REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "abs_sum": lambda h: h.abs().sum(1),
    "sum": lambda h: h.sum(1),
    "pos": lambda h: h.sum(1).clamp(min=0),
    "l2": lambda h: h.square().sum(1).sqrt(),
}
"""Reductions of ``(B, C, H, W)`` explanations over channels to ``(B, H, W)`` maps."""


def heatmap(
    explanation: torch.Tensor, eps: float = 0.0, *, reduction: str = "abs_sum"
) -> torch.Tensor:
    """Relevance reduced over channels, each map normalised so that its absolute values sum to 1.

    The reductions (:data:`REDUCTIONS`) of an explanation ``h``:

    - ``abs_sum`` (default, as Dombrowski et al. 2019): ``sum_c |h_c|``;
    - ``sum``: ``sum_c h_c``, signed (Captum's ``visualize_image_attr`` sums the same way);
    - ``pos``: the positive part of ``sum_c h_c`` (Captum's ``sign="positive"``);
    - ``l2``: ``sqrt(sum_c h_c^2)``, the Euclidean norm over channels.

    Each map is divided by the sum of its absolute values, so the
    non-negative maps sum to 1 and a signed map keeps its signs. The
    ``abs_sum`` map is differentiable, so that it can serve in an attack loss
    (``l2`` is not differentiable where all channels are zero).

    Parameters
    ----------
    explanation : torch.Tensor
        Explanation of shape ``(B, C, H, W)``.
    eps : float
        A map whose absolute values sum to at most ``eps`` becomes all zero
        (default 0: an all-zero map stays all zero, and so does a map whose
        sum is below the dtype's smallest normal number, 1.2e-38 in float32,
        whose reciprocal would overflow); any other map sums to 1 however
        small its values.
    reduction : str
        ``abs_sum``, ``sum``, ``pos`` or ``l2``.

    Returns
    -------
    torch.Tensor
        Maps of shape ``(B, H, W)``, each of absolute sum 1.

    Examples
    --------
    >>> heatmap(torch.ones(2, 3, 4, 4)).sum(dim=(1, 2))
    tensor([1., 1.])
    >>> h = torch.tensor([[[[1.0, -3.0]], [[1.0, 1.0]]]])
    >>> heatmap(h, reduction="sum")
    tensor([[[ 0.5000, -0.5000]]])
    >>> heatmap(h, reduction="pos")
    tensor([[[1., 0.]]])
    """
    reduce = REDUCTIONS[check_choice("reduction", reduction, REDUCTIONS)]
    if not is_number(eps) or not 0.0 <= float(eps) < math.inf:
        raise InputError(f"eps must be a finite number >= 0; got {given('eps', eps)}")
    check_batch(explanation, "explanation", min_dim=4)
    if explanation.dim() != 4:
        raise InputError(
            f"explanation must have shape (B, C, H, W); got {tuple(explanation.shape)}"
        )
    dtype = explanation.dtype
    if torch.finfo(dtype).bits < 32:
        # float16 overflows at 65504: the sum of an ordinary 224 x 224 map.
        explanation = explanation.float()
    h, total = _reduced(explanation, reduce, reduction)
    if not bool(torch.isfinite(total).all()):
        # Values near the dtype's largest overflow in the sum (or l2's squares);
        # the map does not depend on the scale, so it is taken from the largest value.
        peak = explanation.abs().amax(dim=(1, 2, 3), keepdim=True)
        h, total = _reduced(explanation / torch.where(peak > 0, peak, 1.0), reduce, reduction)
    # Divide only where the sum is positive, so that neither the map nor its
    # derivative sees 0 / 0, and a map of tiny values still sums to 1.
    kept = total > max(eps, torch.finfo(total.dtype).tiny)
    return torch.where(kept, h / torch.where(kept, total, torch.ones_like(total)), 0.0).to(dtype)


def _reduced(
    explanation: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor], reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The map reduced over channels, and the sum that normalises it."""
    h = reduce(explanation)
    # Only the signed reduction needs |.|; the others keep the plain sum, whose
    # derivative the attack has always used.
    return h, (h.abs() if reduction == "sum" else h).sum(dim=(1, 2), keepdim=True)


def _check_maps(a: object, b: object) -> tuple[torch.Tensor, torch.Tensor]:
    for name, m in (("a", a), ("b", b)):
        check_map_batch(m, f"map {name}")
    if a.shape != b.shape:
        raise InputError(
            f"maps must have the same shape (B, H, W); got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise InputTypeError(f"maps must be on the same device; got {a.device} and {b.device}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    if torch.finfo(dtype).bits < 32:
        # float16's sums of squares overflow at 65504 (a 32 x 32 map's), and
        # 8 bits of bfloat16 put a 224 px centre of mass on a half-pixel grid.
        dtype = torch.float32
    return a.to(dtype), b.to(dtype)


def _is_constant(m: torch.Tensor) -> torch.Tensor:
    # Exact comparison: a float mean of equal values need not equal them.
    flat = m.flatten(1)
    return flat.amax(1) == flat.amin(1)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per row of ``(B, N)`` tensors, with the constant-map convention."""
    const_a, const_b = _is_constant(a), _is_constant(b)
    da, db = _centred_unit(a), _centred_unit(b)
    # Rows with a constant map get a unit denominator; their value is set below.
    # The square root is taken after the choice: sqrt(0) in the branch not
    # chosen would still send 0 * inf = NaN into the gradient.
    denom = torch.where(
        const_a | const_b,
        torch.ones_like(da[:, 0]),
        da.square().sum(1) * db.square().sum(1),
    ).sqrt()
    r = ((da * db).sum(1) / denom).clamp(-1, 1)
    r = torch.where(const_a | const_b, torch.zeros_like(r), r)
    return torch.where(const_a & const_b, torch.ones_like(r), r)


def _peak(x: torch.Tensor) -> torch.Tensor:
    """Largest absolute value of each item of ``x``, detached, shaped to divide it; 1 if zero."""
    peak = x.detach().abs().flatten(1).amax(1).view(-1, *(1,) * (x.dim() - 1))
    return torch.where(peak > 0, peak, torch.ones_like(peak))


def _unit_scale(x: torch.Tensor) -> torch.Tensor:
    """Each item of ``x`` divided by its largest absolute value; all-zero items stay zero."""
    return x / _peak(x)


def _centred_unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` minus their mean, scaled so that the largest absolute value is 1.

    Pearson's r does not change with the scale of either map, but its sums of
    squares and products do: at 1e-25 they flush to zero and at 1e25 they
    overflow in float32 (1e-160 and 1e160 in float64). Scaling before the mean
    keeps the sum finite, and scaling the centred row again keeps the products
    of order 1 whatever the spread left after centring. The scales are
    detached: r is invariant to them, so its gradient is unchanged.
    """
    x = _unit_scale(x)
    return _unit_scale(x - x.mean(1, keepdim=True))


@register_metric("mse")
def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per map.

    Parameters
    ----------
    a, b : torch.Tensor
        Maps of shape ``(B, H, W)``.

    Returns
    -------
    torch.Tensor
        Shape ``(B,)``, in ``[0, inf)``; differentiable.

    Examples
    --------
    >>> mse(torch.zeros(1, 2, 2), torch.ones(1, 2, 2))
    tensor([1.])
    """
    a, b = _check_maps(a, b)
    return (a - b).square().flatten(1).mean(1)


# Cached: an attack with the SSIM loss filters maps of one size at every step.
@functools.lru_cache(maxsize=16)
def _filter_matrix(n: int) -> torch.Tensor:
    """``(n, n)`` float64 matrix of the 1-D Gaussian filter with scipy.ndimage's ``reflect`` border.

    Row ``i`` holds the taps around ``i``; taps that fall outside the map are
    folded back (d c b a | a b c d | d c b a), repeatedly for maps narrower
    than the window. One matrix product per axis is faster than a padded
    convolution on CPU, float64 included.
    """
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1)
    taps = torch.exp(-0.5 * (offsets.double() / SSIM_SIGMA) ** 2)
    taps = taps / taps.sum()
    source = torch.arange(n).unsqueeze(1) + offsets
    source = source % (2 * n)
    source = torch.where(source >= n, 2 * n - 1 - source, source)
    rows = torch.arange(n).unsqueeze(1).expand_as(source)
    matrix = torch.zeros(n, n, dtype=torch.float64)
    matrix.index_put_((rows.reshape(-1), source.reshape(-1)), taps.repeat(n), accumulate=True)
    return matrix


def _gaussian_filter(x: torch.Tensor) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5, mode="reflect")`` over (N, H, W)."""
    rows = _filter_matrix(x.shape[1]).to(dtype=x.dtype, device=x.device)
    cols = _filter_matrix(x.shape[2]).to(dtype=x.dtype, device=x.device)
    return rows @ x @ cols.T


def ssim_window(height: int, width: int) -> int:
    """Side of the border-free window SSIM averages over: 11, or less for small maps.

    skimage crops ``(win_size - 1) // 2`` pixels from each side; for maps
    smaller than 11 pixels the window is the largest odd size that fits,
    which is skimage's result with that ``win_size`` passed explicitly.

    Examples
    --------
    >>> ssim_window(32, 32), ssim_window(7, 9)
    (11, 7)
    """
    side = min(height, width, 2 * SSIM_RADIUS + 1)
    return side if side % 2 == 1 else side - 1


@register_metric("ssim")
def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity with a Gaussian window (Wang et al. 2004), per map.

    Equal to ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=R)`` with
    ``R = max(a.max(), b.max()) - min(a.min(), b.min())`` for each pair: an
    11-tap Gaussian (sigma 1.5), ``K1 = 0.01``, ``K2 = 0.03``, population
    covariance, scipy's ``reflect`` border, and the mean taken after cropping
    the window radius from every side (see :func:`ssim_window` for small maps).

    Parameters
    ----------
    a, b : torch.Tensor
        Maps of shape ``(B, H, W)``.

    Returns
    -------
    torch.Tensor
        Shape ``(B,)``, in ``[-1, 1]``; 1 for equal maps, including two equal
        constant maps (``R = 0``, where the formula is 0 / 0). Differentiable.

    Examples
    --------
    >>> a = torch.rand(2, 16, 16)
    >>> ssim(a, a)
    tensor([1., 1.])
    """
    a, b = _check_maps(a, b)
    # First a common, detached scale: max - min of maps near float32's largest
    # value overflows to inf (SSIM, unchanged by a common scale, keeps its gradient).
    # A power of two, which rounds no value: a nearly flat map keeps its digits.
    _, exponent = torch.frexp(torch.maximum(_peak(a), _peak(b)))
    peak = torch.ldexp(torch.ones_like(a[:, :1, :1]), exponent - 1)  # within 2x below the peak
    a, b = a / peak, b / peak
    lo = torch.minimum(a.flatten(1).amin(1), b.flatten(1).amin(1))
    hi = torch.maximum(a.flatten(1).amax(1), b.flatten(1).amax(1))
    data_range = hi - lo
    flat = data_range == 0
    # SSIM is invariant to a common scale (C1, C2 scale with R^2); working at
    # R = 1 keeps float32 variances of maps that sum to 1 well above rounding.
    scale = torch.where(flat, torch.ones_like(data_range), data_range).view(-1, 1, 1)
    c1 = torch.where(flat, torch.zeros_like(data_range), torch.full_like(data_range, SSIM_K1**2))
    c2 = torch.where(flat, torch.zeros_like(data_range), torch.full_like(data_range, SSIM_K2**2))
    c1, c2 = c1.view(-1, 1, 1), c2.view(-1, 1, 1)

    batch = a.shape[0]
    # (Co)variances do not change with a shift: taken about each map's mean (a
    # subtraction that rounds little before the division by R), they keep the
    # digits that G(x^2) - G(x)^2 of a nearly flat map cancels in float32.
    # The reflecting filter keeps constants, so the local means are G(x - m) + m.
    ma, mb = a.mean((1, 2), keepdim=True).detach(), b.mean((1, 2), keepdim=True).detach()
    x, y = (a - ma) / scale, (b - mb) / scale
    moments = _gaussian_filter(torch.cat([x, y, x * x, y * y, x * y]))
    ux, uy, uxx, uyy, uxy = moments.split(batch)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    ux, uy = ux + ma / scale, uy + mb / scale
    num = (2 * ux * uy + c1) * (2 * vxy + c2)
    den = (ux.square() + uy.square() + c1) * (vx + vy + c2)
    s = num / torch.where(flat.view(-1, 1, 1), torch.ones_like(den), den)

    crop = (ssim_window(*a.shape[1:]) - 1) // 2
    h, w = a.shape[1:]
    value = s[:, crop : h - crop, crop : w - crop].flatten(1).mean(1)
    return torch.where(flat, torch.ones_like(value), value)


@register_metric("pcc")
def pcc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the pixel values, per map.

    Equal to ``scipy.stats.pearsonr(a.ravel(), b.ravel()).statistic`` for each
    pair, at any scale of the maps: each map is centred and divided by its
    largest absolute value before the sums, which neither flush to zero nor
    overflow, in float32 as in float64.

    Parameters
    ----------
    a, b : torch.Tensor
        Maps of shape ``(B, H, W)``.

    Returns
    -------
    torch.Tensor
        Shape ``(B,)``, in ``[-1, 1]``; 1 when both maps are constant, 0 when
        exactly one is. Differentiable (zero gradient at constant maps).

    Examples
    --------
    >>> a = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    >>> pcc(a, 2 * a + 1)
    tensor([1.])
    """
    a, b = _check_maps(a, b)
    return _correlation(a.flatten(1), b.flatten(1))


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N per row of ``(B, N)``, tied values sharing their mean rank (float64)."""
    values, order = x.sort(dim=1, stable=True)
    new_group = torch.ones_like(values, dtype=torch.long)
    new_group[:, 1:] = (values[:, 1:] != values[:, :-1]).long()
    group = new_group.cumsum(1) - 1
    position = torch.arange(1, x.shape[1] + 1, dtype=torch.float64, device=x.device)
    position = position.expand_as(group).contiguous()
    mean_rank = torch.zeros_like(position).scatter_reduce(
        1, group, position, reduce="mean", include_self=False
    )
    ranks = torch.empty_like(position)
    ranks.scatter_(1, order, mean_rank.gather(1, group))
    return ranks


@register_metric("spearman")
def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per map; ties get their average rank.

    Equal to ``scipy.stats.spearmanr(a.ravel(), b.ravel()).statistic`` for
    each pair. Not differentiable.

    Parameters
    ----------
    a, b : torch.Tensor
        Maps of shape ``(B, H, W)``.

    Returns
    -------
    torch.Tensor
        Shape ``(B,)``, in ``[-1, 1]``; 1 when both maps are constant, 0 when
        exactly one is (scipy gives NaN there).

    Examples
    --------
    >>> a = torch.rand(1, 8, 8)
    >>> spearman(a, a.exp())
    tensor([1.])
    """
    a, b = _check_maps(a, b)
    with torch.no_grad():
        ra, rb = _average_ranks(a.flatten(1)), _average_ranks(b.flatten(1))
        return _correlation(ra, rb).to(a.dtype)


def default_k(height: int, width: int) -> int:
    """Default top-k size: 10 % of the pixels, at least one.

    Examples
    --------
    >>> default_k(32, 32)
    102
    """
    return max(1, int(TOPK_FRACTION * height * width))


def resolve_k(k: object, height: int, width: int) -> int:
    """The top-k size for maps of ``height x width``: ``k`` checked, or :func:`default_k`.

    Raises
    ------
    InputError
        Unless ``k`` is None or an integer from 1 to ``height * width``.

    Examples
    --------
    >>> resolve_k(None, 32, 32), resolve_k(5, 32, 32)
    (102, 5)
    """
    if k is None:
        return default_k(height, width)
    n = height * width
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
        raise InputError(f"k must be an int between 1 and H * W = {n}; got {k!r}")
    return int(k)


def _topk_mask(m: torch.Tensor, k: int) -> torch.Tensor:
    # torch.topk breaks ties in no documented order; only the k-th largest
    # value is well defined. Everything above it is in; of the pixels equal to
    # it, the lowest row-major indices fill the remaining places.
    flat = m.flatten(1)
    kth = flat.topk(k, dim=1).values[:, -1:]
    above = flat > kth
    at = flat == kth
    places = k - above.sum(1, keepdim=True)
    return above | (at & (at.cumsum(1) <= places))


@register_metric("topk")
def topk_intersection(a: torch.Tensor, b: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Fraction of the ``k`` largest pixels of ``a`` that are among the ``k`` largest of ``b``.

    Ghorbani et al. 2019: ``|topk(a) ∩ topk(b)| / k``, pixels ranked by value
    (heatmaps are non-negative). Among equal values the lower row-major index
    ranks first, in both maps. Not differentiable.

    Parameters
    ----------
    a, b : torch.Tensor
        Maps of shape ``(B, H, W)``.
    k : int, optional
        Number of pixels, ``1 <= k <= H * W``; default :func:`default_k`, 10 % of the pixels.

    Returns
    -------
    torch.Tensor
        Shape ``(B,)``, in ``[0, 1]``; 1 for two constant maps.

    Examples
    --------
    >>> a = torch.arange(16.0).view(1, 4, 4)
    >>> topk_intersection(a, a.flip(2), k=4)
    tensor([1.])
    """
    a, b = _check_maps(a, b)
    k = resolve_k(k, *a.shape[1:])
    with torch.no_grad():
        both = _topk_mask(a, k) & _topk_mask(b, k)
        return both.sum(1).to(a.dtype) / k


def center_of_mass(m: torch.Tensor) -> torch.Tensor:
    """Centre of mass ``(row, column)`` of ``|m|`` in pixels, per map.

    Equal to ``scipy.ndimage.center_of_mass(abs(m))``; an all-zero map (where
    scipy gives NaN) has its centre at the middle of the grid,
    ``((H - 1) / 2, (W - 1) / 2)``.

    Parameters
    ----------
    m : torch.Tensor
        Maps of shape ``(B, H, W)``.

    Returns
    -------
    torch.Tensor
        Shape ``(B, 2)``; differentiable (Ghorbani et al.'s centre attack
        follows its gradient).

    Examples
    --------
    >>> m = torch.zeros(1, 3, 5)
    >>> m[0, 2, 4] = 1.0
    >>> center_of_mass(m)
    tensor([[2., 4.]])
    """
    m, _ = _check_maps(m, m)
    # The centre does not change with the scale of the map; the sum of a map
    # near float32's largest value does, to inf.
    w = _unit_scale(m.abs())
    h_idx = torch.arange(m.shape[1], dtype=m.dtype, device=m.device)
    w_idx = torch.arange(m.shape[2], dtype=m.dtype, device=m.device)
    total = w.sum(dim=(1, 2))
    empty = total == 0
    safe = torch.where(empty, torch.ones_like(total), total)
    rows = (w.sum(2) * h_idx).sum(1) / safe
    cols = (w.sum(1) * w_idx).sum(1) / safe
    rows = torch.where(empty, torch.full_like(rows, (m.shape[1] - 1) / 2), rows)
    cols = torch.where(empty, torch.full_like(cols, (m.shape[2] - 1) / 2), cols)
    return torch.stack([rows, cols], dim=1)


@register_metric("com_shift")
def com_shift(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance in pixels between the centres of mass of ``|a|`` and ``|b|``.

    Ghorbani et al. 2019's centre-of-mass shift; see :func:`center_of_mass`.

    Parameters
    ----------
    a, b : torch.Tensor
        Maps of shape ``(B, H, W)``.

    Returns
    -------
    torch.Tensor
        Shape ``(B,)``, in ``[0, sqrt((H - 1)^2 + (W - 1)^2)]``; differentiable
        except where the two centres coincide.

    Examples
    --------
    >>> a, b = torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)
    >>> a[0, 0, 0], b[0, 3, 3] = 1.0, 1.0
    >>> com_shift(a, b)
    tensor([4.2426])
    """
    a, b = _check_maps(a, b)
    return (center_of_mass(a) - center_of_mass(b)).square().sum(1).sqrt()


def _options_for(fn: Metric, options: dict[str, object]) -> dict[str, object]:
    accepted = inspect.signature(fn).parameters
    return {name: value for name, value in options.items() if name in accepted}


def compare(
    map_a: torch.Tensor, map_b: torch.Tensor, k: int | None = None
) -> dict[str, torch.Tensor]:
    """Every metric of :data:`METRICS` between two batches of maps.

    Parameters
    ----------
    map_a, map_b : torch.Tensor
        Maps of shape ``(B, H, W)``, e.g. from :func:`heatmap`; finite, same shape.
    k : int, optional
        Top-k size for ``"topk"``; default 10 % of the pixels.

    Returns
    -------
    dict of str to torch.Tensor
        ``mse``, ``ssim``, ``pcc``, ``spearman``, ``topk``, ``com_shift`` (and
        any metric added with :func:`register_metric`), each of shape ``(B,)``.
        Maps of fewer than 32 bits (float16, bfloat16) are compared in float32,
        and their scores are float32.

    Examples
    --------
    >>> a = torch.rand(2, 16, 16)
    >>> scores = compare(a, a)
    >>> sorted(scores)
    ['com_shift', 'mse', 'pcc', 'spearman', 'ssim', 'topk']
    >>> scores["pcc"]
    tensor([1., 1.])
    """
    a, b = _check_maps(map_a, map_b)
    # k unset leaves each metric its own default.
    options = {} if k is None else {"k": k}
    return {
        name: _one_per_map(name, fn(a, b, **_options_for(fn, options)), a.shape[0])
        for name, fn in METRICS.items()
    }


def _one_per_map(name: str, value: object, maps: int) -> torch.Tensor:
    """A metric's value, refused in one line unless it is one number per map, ``(B,)``."""
    if isinstance(value, torch.Tensor) and tuple(value.shape) == (maps,):
        if not bool(torch.isfinite(value.detach()).all()):
            # The maps are finite (checked): the metric made it, and medians skip it.
            warn_user(
                f"metric {name!r} gave NaN or inf for some pairs of finite maps (a run's "
                "records hold null there, and its medians leave them out)"
            )
        return value
    got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
    raise InputError(f"metric {name!r} returned {got}; expected a tensor of shape ({maps},)")


# ----------------------------------------------------------------------------- records


def _finite(values: Iterable[object]) -> np.ndarray:
    x = np.array(
        [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)],
        dtype=np.float64,
    )
    return x[np.isfinite(x)]


def medians(
    records: Sequence[Mapping[str, object]], keys: Sequence[str]
) -> dict[str, float | None]:
    """Median of each key over the records (finite numbers only; None when there are none).

    Boolean keys give the fraction of True.

    Parameters
    ----------
    records : sequence of mapping
        Result or sweep records.
    keys : sequence of str
        The fields to summarise.

    Returns
    -------
    dict
        Key -> median (or fraction), ``None`` where no record has a number.

    Examples
    --------
    >>> medians([{"pcc": 0.1, "kept": True}, {"pcc": 0.3, "kept": False}], ["pcc", "kept"])
    {'pcc': 0.2, 'kept': 0.5}
    """
    out: dict[str, float | None] = {}
    for key in keys:
        flags = [r[key] for r in records if isinstance(r.get(key), bool)]
        if flags:
            out[key] = float(np.mean(flags))
            continue
        x = _finite(r.get(key) for r in records)
        out[key] = float(np.median(x)) if x.size else None
    return out


def _natural(value: object) -> tuple:
    # None first, then numbers, then names with their digits read as numbers (beta=2 < beta=10).
    if value is None:
        return (0, ())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, (float(value),))
    parts = re.split(r"(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)", str(value))
    return (2, tuple((1, float(p), "") if i % 2 else (0, 0.0, p) for i, p in enumerate(parts)))


def group_records(
    records: Iterable[Mapping[str, object]], keys: Sequence[str]
) -> dict[tuple, list[Mapping[str, object]]]:
    """Records grouped by their values of ``keys``, in natural order.

    Groups come in order of their key values: missing values first, then
    numbers, then names, whose digits compare as numbers.

    Parameters
    ----------
    records : iterable of mapping
        Result or sweep records.
    keys : sequence of str
        The fields that define a group.

    Returns
    -------
    dict
        Tuple of key values -> the records with those values, in their order.

    Examples
    --------
    >>> rows = [{"method": "beta=10"}, {"method": "relu"}, {"method": "beta=2"}]
    >>> rows.append({"method": "beta=1e-05"})
    >>> list(group_records(rows, ["method"]))
    [('beta=1e-05',), ('beta=2',), ('beta=10',), ('relu',)]
    """
    out: dict[tuple, list[Mapping[str, object]]] = {}
    for r in records:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return {g: out[g] for g in sorted(out, key=lambda g: tuple(_natural(v) for v in g))}
