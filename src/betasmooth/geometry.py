"""Curvature of a classifier's output manifold, from Hessian-vector products.

For the target logit ``g`` of a model at an input ``x``:

- ``hessian_norm``: spectral norm ``max |eig(H)|`` of the Hessian ``H`` of
  ``g`` w.r.t. the input (Lanczos on Hessian-vector products);
- ``principal_curvature``: the largest absolute principal curvature of the
  level set ``{g = g(x)}`` at ``x``, the largest ``|eig|`` of ``P H P / |grad g|``
  with ``P = I - n n^T`` and ``n = grad g / |grad g|`` (the Hessian restricted
  to the tangent space of the level set);
- ``hessian_frobenius``: Hutchinson's estimate ``sqrt(E |H v|^2)`` with
  Rademacher probes ``v``;
- ``gradient_norm``: ``|grad g|``.

A ReLU network is piecewise linear: its Hessian is zero almost everywhere and
all three curvatures are 0, while its gradient jumps on the boundaries between
linear regions. Its curvature is measured through its beta-smoothed versions
``smooth(model, beta)``, which approach it as ``beta`` grows (Dombrowski et
al. 2019 bound the principal curvatures of a softplus_beta network by
``beta C``). Beta-smoothing replaces ReLU (and the activations made of
it) only: max-pooling stays piecewise
linear, so a smoothed network with max-pooling is smooth only between changes
of a pooling winner, and the curvature measured at a point says nothing about
those kinks.

Every Hessian-vector product is one backward pass through the graph of the
gradient (double backprop) for the whole batch at once: items of a batch are
independent, so the Hessian of the summed logit is block diagonal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .explain.gradient import input_gradient, select_logit
from .progress import passes
from .smooth import second_order, smooth
from .validate import (
    InputError,
    InputTypeError,
    as_bound,
    check_bounds,
    check_count,
    check_input,
    check_module,
    check_seed,
    check_target,
    check_uncompiled,
    evaluating,
    given,
    item_seeds,
    one_at_a_time,
)

__all__ = ["curvature", "theorem1_check"]

Operator = Callable[[torch.Tensor], torch.Tensor]


class _Hessian:
    """Gradient and Hessian-vector products of the target logit at a batch of inputs.

    Vectors are flat, ``(B, D)``; one graph serves every product. Each item's
    logit is multiplied by ``scale``, a power of two that brings its largest
    gradient entry into [1, 2): the gradient, the products and
    ``gradient_norm`` are of the scaled logit (ratios such as the curvature
    are not changed), and :meth:`unscale` gives them back in the logit's units.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor | None) -> None:
        self.x = x.detach().clone().requires_grad_(True)
        # The products differentiate the gradient again.
        with torch.enable_grad(), second_order():
            self.logit, _ = select_logit(model(self.x), target)
            (first,) = torch.autograd.grad(self.logit.sum(), self.x, retain_graph=True)
            # float32 squares a gradient of 1e-20 into subnormals, where a norm loses
            # its digits, and one of 1e-23 to zero; multiplying by a power of two is
            # exact, so the scaled logit keeps every digit that the logit has.
            self.scale = _power_of_two(first.detach().flatten(1).abs().amax(1))
            scaled = (self.logit * self.scale).sum()
            (grad,) = torch.autograd.grad(scaled, self.x, create_graph=True)
        self.grad = grad.flatten(1)
        self.gradient_norm = _norm(self.grad.detach())
        norm = self.gradient_norm[:, None]
        # Unit normal of the level set; zero where the gradient vanishes, as
        # the level set has no normal there.
        self.normal = torch.where(norm > 0, self.grad.detach() / _nonzero(norm), 0.0)
        # A gradient that does not depend on x (an affine model) has no graph:
        # its Hessian is zero.
        self.linear = not self.grad.requires_grad

    def unscale(self, t: torch.Tensor) -> torch.Tensor:
        """``t``, measured on the scaled logit, in units of the logit."""
        return t / self.scale

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        if self.linear:
            return torch.zeros_like(v)
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(
                (self.grad * v).sum(), self.x, retain_graph=True, allow_unused=True
            )
        return torch.zeros_like(v) if hv is None else hv.flatten(1)

    def tangent(self, v: torch.Tensor) -> torch.Tensor:
        """``P v``: ``v`` without its component along the normal."""
        return v - (v * self.normal).sum(1, keepdim=True) * self.normal

    def tangent_operator(self) -> Operator:
        """``v -> P H P v / |grad g|``, the shape operator of the level set."""
        norm = self.gradient_norm[:, None]
        inverse = torch.where(norm > 0, 1 / _nonzero(norm), 0.0)

        def apply(v: torch.Tensor) -> torch.Tensor:
            return self.tangent(self.hvp(self.tangent(v))) * inverse

        return apply


def _power_of_two(largest: torch.Tensor) -> torch.Tensor:
    """Per item, the power of two that brings ``largest`` (> 0) into [1, 2); 1 for 0.

    Its exponent stays within the dtype's finite powers of two, so the factor is finite
    (and exact: a subnormal power such as float32's 2^-127 is one too).
    """
    bound = math.frexp(torch.finfo(largest.dtype).max)[1] - 1  # the largest finite power
    exponent = (-largest.double().log2().floor()).clamp(-bound, bound)
    exponent = torch.where((largest > 0) & largest.isfinite(), exponent, 0.0)
    return torch.exp2(exponent).to(largest.dtype)


def _norm(t: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row of ``t`` (``(B, D) -> (B,)``), computed on the row
    divided by its largest entry: its squares neither overflow nor vanish."""
    largest = t.abs().amax(1)
    return largest * (t / _nonzero(largest)[:, None]).norm(dim=1)


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    """``t`` with zeros raised to the dtype's smallest normal number, to divide by."""
    return t.clamp_min(torch.finfo(t.dtype).tiny)


def _lanczos(
    op: Operator,
    start: torch.Tensor,
    iterations: int,
    tol: float,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest ``|eigenvalue|`` of the symmetric operator ``op`` for each item, ``(B,)``,
    and whether each item's estimate converged (``(B,)`` bool).

    Lanczos with full reorthogonalisation on the Krylov space of ``start``;
    stops when the residual of every item's Ritz pair, ``|beta_k s_k|``, is at
    most ``tol`` times its estimate, or after ``iterations`` products (an
    estimate that merely stops changing may sit next to a lower eigenvalue).
    Exact once the Krylov space is invariant, e.g. after ``rank(H)`` steps;
    an item that meets neither condition within ``iterations`` has not converged
    (its estimate may lie below the largest eigenvalue).
    """
    batch = start.shape[0]
    q = start / _nonzero(_norm(start)[:, None])
    basis = [q]
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    estimate = torch.zeros(batch, dtype=start.dtype, device=start.device)
    # An item keeps the estimate at which it stopped, as if measured alone:
    # its number does not depend on the other items of the batch.
    done = torch.zeros(batch, dtype=torch.bool, device=start.device)
    for _ in passes(range(iterations), "lanczos", show=progress or None):
        w = op(q)
        alphas.append((w * q).sum(1))
        stacked = torch.stack(basis, 1)
        # Two passes of Gram-Schmidt against the whole basis keep the Ritz
        # values free of spurious copies.
        for _ in range(2):
            w = w - torch.einsum("bk,bkd->bd", torch.einsum("bkd,bd->bk", stacked, w), stacked)
        beta = _norm(w)
        k = len(alphas)
        tri = torch.diag_embed(torch.stack(alphas, 1))
        if k > 1:
            off = torch.stack(betas, 1)
            tri = tri + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        previous = estimate
        values, vectors = torch.linalg.eigh(tri)
        top = values.abs().argmax(1)
        estimate = torch.where(done, previous, values.abs().gather(1, top[:, None])[:, 0])
        scale = torch.maximum(estimate, alphas[0].abs()).clamp_min(torch.finfo(w.dtype).tiny)
        # An invariant subspace (beta ~ 0) has been found: the estimate is exact.
        exhausted = beta <= 1e3 * torch.finfo(w.dtype).eps * scale
        # Converged when the Ritz pair's residual |beta_k s_k| is small, not when the
        # estimate stalls (a stall next to a lower eigenvalue is not convergence).
        last = vectors[torch.arange(batch, device=vectors.device), -1, top].abs()
        converged = beta * last <= tol * estimate
        done = done | exhausted | (converged if k > 1 else False)
        if bool(done.all()):
            break
        q = torch.where(exhausted[:, None], 0.0, w / _nonzero(beta[:, None]))
        basis.append(q)
        betas.append(torch.where(exhausted, 0.0, beta))
    return estimate, done


def _check_inputs(
    model: object, x: object, target: object, what: str = "curvature"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` checked against the model and in its dtype, and the target on its device."""
    check_module(model)
    check_uncompiled(model, what)
    x = check_input(model, x)
    if x.dtype in (torch.float16, torch.bfloat16):
        # Measured: Lanczos on their Hessian-vector products misses the largest
        # eigenvalue by 40 % (float16) to 98 % (bfloat16) on a small MLP.
        raise InputTypeError(
            f"{what} needs a float32 or float64 model and x; got {x.dtype}, whose "
            "Hessian-vector products are too coarse for Lanczos: expected model.float() and "
            "x.float()"
        )
    target_t = check_target(target, x.shape[0])
    target_t = None if target_t is None else target_t.to(x.device)
    # One item's gradient names a forward that leaves x out of the graph,
    # which the Hessian's own autograd call would meet as a raw error; in evaluation
    # mode, as what it checks, so that BatchNorm's running statistics are not moved.
    with evaluating(model):
        input_gradient(model, x[:1], None if target_t is None else target_t[:1])
    return x, target_t


def _curvature(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None,
    iterations: int,
    tol: float,
    generators: list[torch.Generator],
    probes: int,
    progress: bool,
) -> dict[str, torch.Tensor]:
    hessian = _Hessian(model, x, target)
    flat = hessian.grad.shape

    def draw(sample: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
        # Each item from its own generator: its numbers do not depend on the batch.
        return torch.stack([sample(g) for g in generators]).to(device=x.device, dtype=x.dtype)

    start = draw(lambda g: torch.randn(flat[1:], generator=g, dtype=x.dtype))
    norm, norm_done = _lanczos(hessian.hvp, start, iterations, tol, progress)
    kappa, kappa_done = _lanczos(hessian.tangent_operator(), start, iterations, tol, progress)
    flat_logit = hessian.gradient_norm == 0
    result = {
        "hessian_norm": hessian.unscale(norm),
        "principal_curvature": torch.where(flat_logit, torch.nan, kappa),
        # Where grad g = 0 there is no curvature to converge to.
        "converged": norm_done & (kappa_done | flat_logit),
    }
    norms = []
    for _ in range(probes):
        v = draw(lambda g: torch.randint(0, 2, flat[1:], generator=g)) * 2 - 1
        norms.append(_norm(hessian.hvp(v)))
    # sqrt(mean |H v|^2), without squaring the scaled products themselves.
    mean_square_root = _norm(torch.stack(norms, 1)) / probes**0.5
    result["hessian_frobenius"] = hessian.unscale(mean_square_root)
    result["gradient_norm"] = hessian.unscale(hessian.gradient_norm)
    return {k: v.detach() for k, v in result.items()}


@one_at_a_time
def curvature(
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor | None = None,
    *,
    iterations: int = 20,
    tol: float = 1e-3,
    seed: int | Sequence[int] = 0,
    probes: int = 10,
    progress: bool = False,
    data_range: tuple[torch.Tensor | float, torch.Tensor | float] | None = None,
) -> dict[str, torch.Tensor]:
    """Hessian norms and the largest principal curvature of the target logit, batched.

    A ReLU network gives zeros almost everywhere (it is piecewise linear);
    measure ``smooth(model, beta)`` for growing ``beta`` instead.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits ``(B, classes)``; run in evaluation mode
        (restored afterwards). Items of a batch must not interact.
    x : torch.Tensor
        Input batch, e.g. ``(B, C, H, W)``.
    target : None, int or torch.Tensor
        Class whose logit ``g`` is measured; ``None`` for the predicted class.
    iterations : int
        Most Lanczos steps (Hessian-vector products) per estimate.
    tol : float
        Stop when the residual of every estimate's Ritz pair is at most this
        fraction of the estimate.
    seed : int or sequence of int
        Seed of the start vectors and of the Hutchinson probes: one, from
        which each item's seed is drawn, or one per item. Each item draws
        from its own seed and stops its Lanczos steps on its own, so its
        numbers do not depend on the batch it is measured in.
    probes : int
        Rademacher probes of the Frobenius estimate.
    progress : bool
        Show a progress bar over the Lanczos steps.
    data_range : tuple, optional
        ``(low, high)`` of the data, per channel (``data.bounds``): measure
        per unit of each channel's range, as the attack reports its input
        change, i.e. per pixel value in [0, 1] on normalised data. By default
        per unit of the model's input, which on normalised data is std
        pixel values (gradients then come out std times, Hessians std^2
        times those per pixel value).

    Returns
    -------
    dict of str to torch.Tensor
        ``hessian_norm``, ``principal_curvature`` (NaN where ``grad g = 0``),
        ``hessian_frobenius`` and ``gradient_norm``, each of shape ``(B,)``, and
        ``converged`` ``(B,)`` bool: whether both Lanczos estimates met ``tol``
        (or found an invariant subspace) within ``iterations``; one that did
        not may lie below the true value, and more ``iterations`` raise it.

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, y = bs.load_data("digits")
    >>> bs.curvature(model, x[:4])["hessian_norm"]  # ReLU: piecewise linear
    tensor([0., 0., 0., 0.])
    >>> bs.curvature(bs.smooth(model, 10.0), x[:4])["principal_curvature"].shape
    torch.Size([4])
    """
    x, target_t = _check_inputs(model, x, target)
    check_count("iterations", iterations)
    check_count("probes", probes)
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise InputError(f"tol must be a number >= 0; got {given('tol', tol)}")
    generators = [torch.Generator().manual_seed(s) for s in item_seeds(seed, x.shape[0])]
    if data_range is not None:
        model, x = _in_range_units(model, data_range, x)
    with evaluating(model):
        return _curvature(model, x, target_t, iterations, tol, generators, probes, progress)


class _FromRange(nn.Module):
    """``model`` on inputs in units of each channel's range: ``model(low + p * span)``."""

    def __init__(self, model: nn.Module, low: torch.Tensor, span: torch.Tensor) -> None:
        super().__init__()
        self.model, self.low, self.span = model, low, span
        # evaluating() gives every module, the wrapper included, its own mode back.
        self.training = model.training

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self.model(self.low + p * self.span)


def _in_range_units(
    model: nn.Module, data_range: tuple[object, object], x: torch.Tensor, *more: torch.Tensor
) -> tuple[nn.Module, ...]:
    """The model on inputs per unit of each channel's range, and ``x`` (and ``more``) in them."""
    if not isinstance(data_range, (tuple, list)) or len(data_range) != 2:
        raise InputError(
            f"data_range must be (low, high), e.g. data.bounds; got {type(data_range).__name__} "
            f"{repr(data_range)[:60]}"
        )
    low, high = (as_bound(b, x) for b in data_range)
    if any(b.dim() not in (0, x.dim()) for b in (low, high)):
        # A (C,) vector would meet the last axis, the width, not the channels.
        raise InputError(
            f"data_range bounds must be numbers or shaped like data.bounds, (1, C, 1, 1); got "
            f"shapes {tuple(low.shape)} and {tuple(high.shape)}"
        )
    low, high = check_bounds(low, high, x)
    span = high - low
    return (_FromRange(model, low, span), *((v - low) / span for v in (x, *more)))


def theorem1_check(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    target: int | torch.Tensor | None = None,
    *,
    beta: float | None = None,
    samples: int = 8,
    iterations: int = 20,
    seed: int = 0,
    data_range: tuple[torch.Tensor | float, torch.Tensor | float] | None = None,
) -> dict[str, torch.Tensor]:
    """Check the curvature bound on the change of the normalised gradient, on pairs.

    Dombrowski et al. (2019, Theorem 1): for a network ``g`` with softplus
    activations and two points ``x``, ``x_adv`` on one level set ``S = {g = c}``,
    in a connected part of ``S`` where ``|grad g|`` stays away from zero,

        |n(x_adv) - n(x)| <= |lambda_max| d_S(x, x_adv),

    where ``n = grad g / |grad g|``, ``d_S`` is the geodesic distance on ``S``
    and ``lambda_max`` the largest absolute principal curvature on that part
    (itself at most ``beta C``). It follows from ``|dn/ds| <= |lambda_max|``
    along any unit-speed curve in ``S``.

    What this check computes, per pair:

    - ``bound = |x_adv - x| * max_t kappa(x_t)``, with the Euclidean distance
      (a lower bound of ``d_S``) and the principal curvature ``kappa`` sampled
      at ``samples`` points ``x_t`` of the straight segment. This is the
      paper's bound with both factors replaced by computable proxies; it is
      *not* guaranteed: it can fail where the geodesic is much longer than the
      chord, where the segment leaves ``S`` (``output_change`` > 0) or where the
      curvature peaks between samples. ``holds`` and ``ratio`` report it.
    - ``segment_bound = |x_adv - x| * max_t |P H u| / |grad g|`` along the
      segment (``u`` its direction, ``P`` the tangent projection at ``x_t``):
      ``n`` changes along the segment at exactly the rate ``|P H u| / |grad g|``,
      so ``normal_change <= segment_bound`` is guaranteed for any pair of a
      twice-differentiable ``g`` with non-zero gradient on the segment, up to
      the sampling of the maximum; no level-set condition is needed.

    A ReLU network has ``H = 0`` almost everywhere while ``n`` jumps between
    linear regions, so neither bound holds for it: pass ``beta`` to check its
    beta-smoothed version. Max-pooling is piecewise linear as well and
    beta-smoothing keeps it: where the segment crosses a change of a pooling
    winner, ``n`` jumps and both bounds can fail (the built-in ``digits-cnn``
    has max-pooling; with average pooling instead, ``segment_bound`` holds).

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits ``(B, classes)``.
    x, x_adv : torch.Tensor
        The pairs, two batches of one shape.
    target : None, int or torch.Tensor
        Class whose logit is ``g``; ``None`` for the class predicted at ``x``
        (used at ``x_adv`` too).
    beta : float or None
        Check ``smooth(model, beta)`` instead of ``model``.
    samples : int
        Points on the segment, ends included (at least 2).
    iterations : int
        Lanczos steps per curvature estimate.
    seed : int
        Seed of the Lanczos start vectors.
    data_range : tuple, optional
        ``(low, high)`` of the data (``data.bounds``): distances and
        curvatures per unit of each channel's range, as :func:`curvature`.

    Returns
    -------
    dict of str to torch.Tensor
        Each ``(B,)``: ``normal_change``, ``distance``, ``max_principal_curvature``,
        ``bound``, ``ratio`` (``normal_change / bound``), ``holds`` (bool),
        ``segment_bound``, ``output_change`` (``|g(x_adv) - g(x)|``).

    Examples
    --------
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x = torch.randn(2, 4)
    >>> check = theorem1_check(net, x, x + 0.1 * torch.randn(2, 4), beta=5.0, samples=33)
    >>> bool((check["normal_change"] <= 1.01 * check["segment_bound"]).all())
    True
    """
    x, target_t = _check_inputs(model, x, target, "theorem1_check")
    x_adv = check_input(model, x_adv, "x_adv")
    if x_adv.shape != x.shape:
        raise InputError(
            f"x_adv must have the shape of x, {tuple(x.shape)}; got {tuple(x_adv.shape)}"
        )
    check_count("samples", samples, 2)
    check_count("iterations", iterations)
    if beta is not None:
        model = smooth(model, beta)
    if data_range is not None:
        model, x, x_adv = _in_range_units(model, data_range, x, x_adv)
    generator = torch.Generator().manual_seed(check_seed("seed", seed))
    with evaluating(model):
        if target_t is None:
            with torch.no_grad():
                target_t = model(x).argmax(1)
        direction = (x_adv - x).detach()
        distance = direction.flatten(1).norm(dim=1)
        unit = direction.flatten(1) / _nonzero(distance[:, None])
        kappa, speed, ends = [], [], []
        for t in torch.linspace(0, 1, samples, dtype=x.dtype).tolist():
            point = x + t * direction
            hessian = _Hessian(model, point, target_t)
            start = torch.randn(hessian.grad.shape, generator=generator, dtype=x.dtype)
            operator = hessian.tangent_operator()
            kappa.append(_lanczos(operator, start.to(x.device), iterations, 1e-4)[0])
            tangent_speed = _norm(hessian.tangent(hessian.hvp(unit)))
            speed.append(tangent_speed / hessian.gradient_norm)
            if t in (0.0, 1.0):
                ends.append((hessian.normal, hessian.logit.detach()))
    (n0, g0), (n1, g1) = ends
    normal_change = (n1 - n0).norm(dim=1)
    max_kappa = torch.stack(kappa).amax(0)
    bound = distance * max_kappa
    return {
        "normal_change": normal_change,
        "distance": distance,
        "max_principal_curvature": max_kappa,
        "bound": bound,
        # x_adv == x (an attack that did not move an image) changes nothing: ratio 0.
        "ratio": torch.where(
            bound > 0,
            normal_change / _nonzero(bound),
            torch.where(normal_change > 0, torch.inf, 0.0),
        ),
        "holds": normal_change <= bound,
        "segment_bound": distance * torch.stack(speed).amax(0),
        "output_change": (g1 - g0).abs(),
    }
