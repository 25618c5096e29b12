"""Methods that smooth a base method: smoothgrad (by sampling) and beta_smooth (in closed form).

SmoothGrad averages a base map over noisy copies of the input; beta_smooth
computes the base map on the model with every ReLU replaced by
``softplus_beta``. For a one-layer network ``relu(w.x)`` the gradient of the
smoothed model is the expected SmoothGrad map under logistic noise whose
component along ``w`` has scale ``1 / (beta |w|)`` (Theorem 2): one map
instead of ``n``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..progress import passes
from ..smooth import LogisticNoise, check_beta, check_overridable, logistic_std, smoothed
from ..validate import (
    InputError,
    InputTypeError,
    check_choice,
    check_count,
    check_positive,
    check_seed,
)
from . import (
    BASE_CHECKS,
    INPUT_CHECKS,
    METHODS,
    _check_options,
    _lookup,
    _map_items,
    check_model,
    is_method,
    method_options,
    register,
    wraps_base,
)
from .gradient import auto_chunk, predict

__all__ = ["NOISES", "Seed", "base_call", "noise_scale", "standard_noise"]

#: One seed for the batch, or one per item (so that an item's draws do not
#: depend on the batch it is explained in).
Seed = int | Sequence[int] | torch.Tensor | None


def _gaussian(
    shape: torch.Size, generator: torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)


# The logistic density of standard deviation 1.
_UNIT_LOGISTIC = logistic_std(1.0)


def _logistic(
    shape: torch.Size, generator: torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
    return LogisticNoise(_UNIT_LOGISTIC).from_uniform(u)


NOISES: dict[str, Callable[[torch.Size, torch.Generator | None, torch.Tensor], torch.Tensor]] = {
    "gaussian": _gaussian,
    "logistic": _logistic,
}


def standard_noise(
    noise: str,
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator | None,
    like: torch.Tensor,
) -> torch.Tensor:
    """Draws of mean 0 and standard deviation 1 from the family ``noise``.

    Gaussian draws come from ``torch.randn``; logistic draws are the inverse
    cdf of ``torch.rand`` draws, so that a seeded generator fixes both.

    Parameters
    ----------
    noise : str
        ``gaussian`` or ``logistic``.
    shape : torch.Size
        Shape of the draw.
    generator : torch.Generator or None
        Source of randomness; ``None`` for the global one.
    like : torch.Tensor
        Gives dtype and device.

    Returns
    -------
    torch.Tensor
        The draws.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> e = standard_noise("logistic", (10000,), g, torch.zeros(()))
    >>> round(e.std().item(), 1)
    1.0
    """
    return NOISES[check_choice("noise", noise, NOISES)](torch.Size(shape), generator, like)


def noise_scale(
    x: torch.Tensor, sigma: float, input_range: float | torch.Tensor | None = None
) -> torch.Tensor:
    """Standard deviation of the noise per item: ``sigma`` times the input range.

    The range is ``x.max() - x.min()`` of each item (Smilkov et al. 2017)
    unless ``input_range`` fixes it, e.g. 1.0 for images in [0, 1], or a
    tensor of one range per channel, ``(1, C, 1, 1)``, for normalised data
    (``high - low`` of :class:`betasmooth.zoo.ImageData`).

    Returns
    -------
    torch.Tensor
        Shape ``(B, 1, ..., 1)``, or the shape of a tensor ``input_range``;
        broadcastable to ``x``.

    Examples
    --------
    >>> noise_scale(torch.tensor([[0.0, 2.0], [1.0, 1.5]]), 0.1)
    tensor([[0.2000],
            [0.0500]])
    """
    if torch.is_tensor(input_range):
        return sigma * input_range.to(x)
    if input_range is None:
        flat = x.flatten(1)
        spread = flat.amax(1) - flat.amin(1)
    else:
        spread = torch.full((x.shape[0],), float(input_range), dtype=x.dtype, device=x.device)
    return (sigma * spread).view(-1, *(1,) * (x.dim() - 1))


def _base(method: str, base: object, base_options: object, extra: dict) -> tuple[Callable, dict]:
    if not is_method(base) or wraps_base(base):
        usable = ", ".join(sorted(m for m in METHODS if not wraps_base(m)))
        what = "unknown base method" if not is_method(base) else "base method"
        why = " smooths a base method itself" if is_method(base) else ""
        raise InputError(
            f"{what} {base!r} for {method}{why}; expected one of: {usable}, or captum:NAME"
        )
    if base_options is None:
        base_options = {}
    if not isinstance(base_options, dict):
        raise InputTypeError(
            f"base_options must be a dict of options of {base!r}; got {type(base_options).__name__}"
        )
    # Options that are not the smoothing method's own belong to the base.
    base_options = {**base_options, **extra}
    _check_options(base, base_options, owner=method)
    return _lookup(base), base_options


def _generators(seed: Seed, x: torch.Tensor) -> torch.Generator | list[torch.Generator] | None:
    """No generator, one for the batch, or one per item of ``x``."""
    if seed is None:
        return None
    if isinstance(seed, torch.Tensor) and seed.dim() == 0 and not seed.is_floating_point():
        seed = seed.item()
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        # np.int64 too: the seed of a numpy pipeline is the same seed.
        return torch.Generator(device=x.device).manual_seed(check_seed("seed", int(seed)))
    if isinstance(seed, torch.Tensor):
        seed = seed.tolist() if seed.dim() == 1 and not seed.is_floating_point() else [seed]
    if not isinstance(seed, Sequence) or isinstance(seed, str) or len(seed) != x.shape[0]:
        raise InputError(f"seed must be an int or one int per item ({x.shape[0]}); got {seed!r}")
    return [torch.Generator(device=x.device).manual_seed(check_seed("seed", s)) for s in seed]


def _draw_batch(
    draw: Callable[[torch.Size, torch.Generator | None, torch.Tensor], torch.Tensor],
    generators: torch.Generator | list[torch.Generator] | None,
    x: torch.Tensor,
) -> torch.Tensor:
    """Standard draws shaped like ``x``, per item where each item has its own generator."""
    if isinstance(generators, list):
        return torch.stack([draw(x.shape[1:], g, x) for g in generators])
    return draw(x.shape, generators, x)


@register("smoothgrad")
def smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None,
    *,
    create_graph: bool = False,
    base: str = "gradient",
    base_options: dict | None = None,
    n: int = 50,
    sigma: float = 0.15,
    noise: str = "gaussian",
    input_range: float | torch.Tensor | None = None,
    seed: Seed = None,
    chunk: int | None = None,
    **options: object,
) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017): the base map averaged over ``n`` noisy copies of ``x``.

    Copies are stacked into the batch dimension, ``chunk`` of them per pass.
    The target defaults to the prediction at the clean ``x``, the same for
    every copy.

    Parameters
    ----------
    base : str
        Method to average, any registered one except smoothgrad and beta_smooth.
    base_options : dict or None
        Options of the base method; further keyword options are added to them,
        and one given in both places takes the keyword's value. An option the
        base names in ``per_item_options`` with one value per item (a
        ``(B, C, H, W)`` baseline or LRP bound) goes with its item into each
        noisy copy.
    n : int
        Number of noisy copies.
    sigma : float
        Noise standard deviation as a fraction of the input range: each
        item's ``x.max() - x.min()``, as in Smilkov et al., or ``input_range``.
    noise : str
        ``gaussian``, or ``logistic`` with the same standard deviation (scale
        ``sigma * range * sqrt(3) / pi``), the density of Theorem 2.
    input_range : float, torch.Tensor or None
        A fixed input range, e.g. 1.0 for images in [0, 1], or one per
        channel as a ``(1, C, 1, 1)`` tensor.
    seed : int, sequence of int, (B,) integer tensor or None
        Fixes the draws, e.g. to keep them equal over the steps of an attack:
        one ``torch.Generator`` for the batch, or one per item, so that an
        item's map is the same in any batch; ``None`` uses the global generator.
    chunk : int or None
        Copies per forward pass (each pass holds ``chunk * B`` items);
        ``None`` picks about :data:`~betasmooth.explain.gradient.ITEMS_PER_PASS` items,
        fewer for large inputs (:func:`~betasmooth.explain.gradient.auto_chunk`).

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, _ = bs.load_data("digits")
    >>> h = bs.explain(model, x[:4], "smoothgrad", n=20, sigma=0.1, seed=[0, 1, 2, 3])
    >>> h1 = bs.explain(model, x[1:2], "smoothgrad", n=20, sigma=0.1, seed=[1])
    >>> torch.allclose(h[1:2], h1, atol=1e-6)
    True
    """
    fn, options = _base("smoothgrad", base, base_options, options)
    n = check_count("n", n)
    check_positive("sigma", sigma)
    if torch.is_tensor(input_range):
        if not bool((input_range > 0).all()) or not bool(torch.isfinite(input_range).all()):
            raise InputError("input_range must be positive and finite in every channel")
        # A range that broadcasts x to more channels would reach the model as
        # a batch it cannot take, with an error that does not name the range.
        try:
            fits = torch.broadcast_shapes(input_range.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            per_channel = (1, x.shape[1], *(1,) * (x.dim() - 2))
            raise InputError(
                f"input_range of shape {tuple(input_range.shape)} does not broadcast to x of "
                f"shape {tuple(x.shape)}; expected a number or a {per_channel} tensor, one range "
                "per channel"
            )
    else:
        check_positive("input_range", input_range, optional=True)
    draw = NOISES[check_choice("noise", noise, NOISES)]
    generators = _generators(seed, x)
    chunk = auto_chunk(chunk, n, x.shape[0], x[0].numel())

    if target is None:
        target = predict(model, x)
    x_in = x if create_graph and x.requires_grad else x.detach()
    scale = noise_scale(x_in, sigma, input_range)
    # A layer method's maps have the layer's shape, not the input's.
    total: torch.Tensor | float = 0.0
    for start in passes(range(0, n, chunk), "smoothgrad"):
        k = min(chunk, n - start)
        # One draw per copy, so that the draws do not depend on the chunk size.
        eps = torch.stack([_draw_batch(draw, generators, x) for _ in range(k)])
        noisy = (x_in + scale * eps).flatten(0, 1)
        tiled = _tiled(options, getattr(fn, "per_item_options", ()), x, k)
        maps = fn(model, noisy, target.repeat(k), create_graph=create_graph, **tiled)
        total = total + maps.unflatten(0, (k, x.shape[0])).sum(0)
    return total / n


def _tiled(
    options: dict[str, object], per_item: Iterable[str], x: torch.Tensor, k: int
) -> dict[str, object]:
    """``options`` for ``k`` copies of the batch ``x`` stacked as SmoothGrad stacks them.

    An option the base method names in ``per_item_options`` (a baseline or an
    LRP bound) that has ``x``'s rank and the batch as first dimension holds one
    value per item; each copy of an item takes that item's value.
    """
    return {
        name: _map_items(value, x.shape, lambda rows: rows.repeat(k, *(1,) * (rows.dim() - 1)))
        if name in per_item
        else value
        for name, value in options.items()
    }


# Noise relative to the data's span (see range_options).
smoothgrad.range_options = lambda low, high: {"input_range": high - low}


@register("beta_smooth")
def beta_smooth(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None,
    *,
    create_graph: bool = False,
    base: str = "gradient",
    base_options: dict | None = None,
    beta: float = 1.0,
    **options: object,
) -> torch.Tensor:
    """The base map of the model with every ReLU replaced by ``softplus_beta``.

    For one layer ``relu(w.x)`` the gradient map equals the expected SmoothGrad
    map under logistic noise whose component along ``w`` has scale
    ``1 / (beta |w|)`` (Theorem 2), at the cost of a single map; for deeper
    networks the correspondence is approximate. The target defaults
    to the prediction of the original model at ``x``: the map explains the
    class the user sees, even where smoothing would change the argmax.

    Parameters
    ----------
    base : str
        Method computed on the smoothed model, any registered one except
        smoothgrad and beta_smooth, or any Captum method (``captum:NAME``).
    base_options : dict or None
        Options of the base method; further keyword options are added to them,
        and one given in both places takes the keyword's value.
    beta : float
        Sharpness of softplus, > 0; small values smooth more, ``beta -> inf``
        gives the base map of the original model.

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, _ = bs.load_data("digits")
    >>> h = bs.explain(model, x[:4], "beta_smooth", beta=10.0)
    >>> h = bs.explain(model, x[:4], "beta_smooth", beta=1.0, base="integrated_gradients", steps=8)
    """
    fn, options = _base("beta_smooth", base, base_options, options)
    check_positive("beta", beta)
    check_beta(beta)  # also its range, before the first map
    if target is None:
        target = predict(model, x)
    with smoothed(model, beta):
        return fn(model, x, target, create_graph=create_graph, **options)


def base_call(method: str, options: Mapping[str, object]) -> tuple[str, dict[str, object]]:
    """The base method of a call of ``method`` and the options it gets there:
    ``base_options`` and the others that are not the smoothing's own.

    Examples
    --------
    >>> base_call("beta_smooth", {"beta": 2.0, "base": "lrp", "base_options": {"epsilon": 0.1}})
    ('lrp', {'epsilon': 0.1})
    """
    own = method_options(method)
    base = options.get("base", own["base"])
    extra = {k: v for k, v in options.items() if k not in own}
    return str(base), _base(method, base, options.get("base_options"), extra)[1]


def _checked_base(method: str, options: Mapping[str, object]) -> tuple[str, dict] | None:
    """:func:`base_call` where ``base`` names a method; ``None`` for a registered method
    whose option ``base`` is no name (a number, ``None``): its meaning is the method's own."""
    if not isinstance(options.get("base", method_options(method)["base"]), str):
        return None
    return base_call(method, options)


def _base_input_check(method: str) -> Callable[..., None]:
    def check(x: torch.Tensor, **options: object) -> None:
        # The clean x must suit the base method (e.g. lie in LRP's box); the
        # noisy copies of smoothgrad need not.
        called = _checked_base(method, options)
        if called is None:
            return
        base, base_options = called
        base_check = INPUT_CHECKS.get(base)
        if base_check is not None:
            base_check(x, **base_options)

    return check


# What overrides the model's ReLUs, by smoothing method: named when it cannot.
_OVERRIDES = {"beta_smooth": "beta-smoothing"}


def _base_check(method: str) -> Callable[..., None]:
    def check(model: nn.Module, **options: object) -> None:
        # Beyond its base method, only a smoothing that overrides ReLUs can fail
        # on a model: on a TorchScript one, which no override reaches.
        if method in _OVERRIDES:
            check_overridable(model, _OVERRIDES[method])
        called = _checked_base(method, options)
        if called is not None:
            check_model(model, called[0], **called[1])

    return check


# Every method that smooths a base one, built in or registered later, is
# checked as its base method is (unless it registers checks of its own).
BASE_CHECKS.update(model=_base_check, input=_base_input_check)
