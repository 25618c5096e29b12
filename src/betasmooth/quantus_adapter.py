"""Quantus' ``explain_func`` for every betasmooth method: :func:`quantus_explain`.

Quantus (Hedström et al. 2023) evaluates explanations with metrics that call
``explain_func(model=model, inputs=x, targets=y, **explain_func_kwargs)`` on
numpy batches and expect a numpy array back. :func:`quantus_explain` is such a
function: pass it unchanged, with the betasmooth method and its options in
``explain_func_kwargs``::

    metric(model=model, x_batch=x, y_batch=y, explain_func=bs.quantus_explain,
           explain_func_kwargs={"method": "beta_smooth", "beta": 1.0})

As Quantus' own ``quantus.explain``, the attribution is summed over the
channel axis by default (``reduce_axes=(1,)``, ``keepdims=True``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .explain import explain
from .validate import InputError, InputTypeError, check_module, resolve_device, to_numpy

__all__ = ["quantus_explain"]


def _channel_first(x: torch.Tensor, channel_first: bool | None) -> bool:
    """The layout as Quantus' ``infer_channel_first`` reads it: channels are the shorter axis."""
    if channel_first is not None:
        return bool(channel_first)
    if x.dim() not in (3, 4):
        return True
    c_first, c_last, inner = x.shape[1], x.shape[-1], x.shape[2:-1]
    if c_first < min((c_last, *inner)):
        return True
    if c_last < min((c_first, *inner)):
        return False
    raise InputError(
        f"cannot tell the channel axis of inputs of shape {tuple(x.shape)}; "
        "expected channel_first=True or False in explain_func_kwargs"
    )


def _as_tensor(value: object, name: str, device: torch.device) -> torch.Tensor:
    """``value`` as a tensor on ``device``, in its own dtype."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device)
    if isinstance(value, (np.ndarray, list, tuple, int, np.integer)):
        array = np.asarray(value)
        if not array.flags.writeable:
            # torch would share the memory of an array it may not write, and warn.
            array = array.copy()
        return torch.as_tensor(array, device=device)
    raise InputTypeError(
        f"quantus_explain {name} must be a numpy array or a torch tensor; "
        f"got {type(value).__name__}"
    )


def _option_tensor(value: object, dtype: torch.dtype, device: torch.device) -> object:
    if not isinstance(value, np.ndarray):
        return value
    if value.ndim == 0:
        return value.item()  # a number (beta, a seed) stays a number
    tensor = torch.as_tensor(value, device=device)
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _reduce_axes(reduce_axes: Sequence[object], rank: int) -> tuple[int, ...]:
    """``reduce_axes`` checked against attributions of ``rank`` axes: integers, each once,
    inside them and never the batch axis (0, or ``-rank``, which would mix the images)."""
    if not all(isinstance(a, (int, np.integer)) for a in reduce_axes) or any(
        isinstance(a, bool) for a in reduce_axes
    ):
        raise InputTypeError(
            f"quantus_explain: reduce_axes must hold integers, e.g. (1,); got {reduce_axes!r}"
        )
    axes = tuple(int(a) for a in reduce_axes)
    outside = [a for a in axes if not -rank <= a < rank]
    if outside:
        raise InputError(
            f"quantus_explain: reduce_axes has axis {outside[0]}, outside the "
            f"{rank} axes of the attributions; expected axes from 1 to {rank - 1}, e.g. (1,)"
        )
    positive = [a % rank for a in axes]
    if 0 in positive:
        raise InputError("quantus_explain cannot reduce over the batch axis 0; expected e.g. (1,)")
    if len(set(positive)) < len(axes):
        raise InputError(
            f"quantus_explain: reduce_axes names an axis twice: {axes}; expected e.g. (1,)"
        )
    return axes


def _axes_given(reduce_axes: object) -> Sequence[object]:
    """``reduce_axes`` as a sequence: one int, or a numpy array, as numpy and Quantus take them."""
    if isinstance(reduce_axes, np.ndarray):
        reduce_axes = reduce_axes.tolist()  # a 0-d array is one axis
    if isinstance(reduce_axes, (int, np.integer)) and not isinstance(reduce_axes, bool):
        return (reduce_axes,)
    if not isinstance(reduce_axes, Sequence) or isinstance(reduce_axes, str):
        raise InputTypeError(
            f"quantus_explain: reduce_axes must be an int or a sequence of ints, e.g. (1,); "
            f"got {reduce_axes!r}"
        )
    return reduce_axes


def _keepdims(keepdims: object) -> bool:
    if isinstance(keepdims, (bool, np.bool_)) or (
        isinstance(keepdims, (int, np.integer)) and keepdims in (0, 1)
    ):
        return bool(keepdims)
    raise InputTypeError(f"quantus_explain: keepdims must be True or False; got {keepdims!r}")


def _model_place(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        try:
            place = resolve_device(device, "device")
        except InputError as err:
            raise InputError(f"quantus_explain: {err}") from None
        # Quantus' own explain puts the model on the requested device too.
        model.to(place)
        return place
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def quantus_explain(
    model: nn.Module,
    inputs: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor | int,
    *,
    method: str = "gradient",
    device: str | torch.device | None = None,
    channel_first: bool | None = None,
    softmax: bool | None = None,
    reduce_axes: int | Sequence[int] = (1,),
    keepdims: bool | int = True,
    **options: object,
) -> np.ndarray:
    """Explain ``inputs`` with a betasmooth method, as Quantus' ``explain_func``.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits; the logit of each target is explained.
    inputs : numpy.ndarray or torch.Tensor
        Batch, channel-first ``(B, C, H, W)`` or channel-last ``(B, H, W, C)``;
        signals ``(B, C, L)`` or ``(B, L, C)``.
    targets : numpy.ndarray, torch.Tensor or int
        Class per item.
    method : str
        Any :func:`~betasmooth.explain` method, e.g. ``beta_smooth``, ``lrp``,
        ``smoothgrad`` or ``captum:DeepLift``.
    device : str or None
        Where the model and the inputs go (as in Quantus); ``None`` keeps the model's.
    channel_first : bool or None
        Layout of ``inputs`` (and of the result); ``None`` infers it as Quantus does.
    softmax : bool or None
        Quantus' switch for the output activation. betasmooth explains logits:
        ``None`` and ``False`` are accepted, ``True`` is refused.
    reduce_axes : int or sequence of int
        Axes of the (channel-first) attribution summed, as in ``quantus.explain``;
        ``()`` keeps the channels.
    keepdims : bool or int
        Keep the reduced axes with size 1 (0 and 1 as numpy takes them).
    **options
        Options of ``method``, e.g. ``beta=1.0`` or ``n=50, sigma=0.15``.

    Returns
    -------
    numpy.ndarray
        The attributions, float, in the layout of ``inputs``.

    Examples
    --------
    >>> import betasmooth as bs
    >>> model = bs.load_model("digits-cnn")
    >>> x, y = bs.load_data("digits")
    >>> a = bs.quantus_explain(model, x[:4].numpy(), y[:4].numpy(), method="beta_smooth", beta=1.0)
    >>> a.shape, a.dtype
    ((4, 1, 32, 32), dtype('float32'))
    """
    if softmax:
        raise InputError(
            "quantus_explain explains logits (pre-softmax); expected softmax=None or False"
        )
    check_module(model)
    place = _model_place(model, device)
    parameter = next(model.parameters(), None)
    dtype = torch.get_default_dtype() if parameter is None else parameter.dtype
    # In float32 at least: explain casts to a float16 model's dtype, and names
    # values that the cast makes inf.
    x = _as_tensor(inputs, "inputs", place)
    if not x.is_floating_point():
        # As explain: 0-255 levels are no model's inputs, and a cast would hide them.
        raise InputTypeError(
            f"quantus_explain inputs must be floating point; got {x.dtype} (scale the "
            "images as the model expects them, e.g. to [0, 1])"
        )
    x = x.to(torch.promote_types(dtype, torch.float32))
    target = _as_tensor(targets, "targets", place)
    if target.numel() not in (1, x.shape[0]) or any(d != 1 for d in target.shape[1:]):
        # Named by the shape given: flattened, a (B, 2) array would read as 2B classes.
        raise InputError(
            f"quantus_explain targets must be one class per item, shape ({x.shape[0]},), or "
            f"one class; got shape {tuple(target.shape)}"
        )
    target = target.reshape(-1)
    if target.is_floating_point():
        # Quantus may hand labels over as floats; a cast would truncate 3.7 to class 3.
        if not bool((torch.isfinite(target) & (target == target.round())).all()):
            raise InputError(
                f"quantus_explain targets must be class indices; got {target.tolist()[:8]}"
            )
        target = target.long()
    if target.numel() == 1:
        target = target.expand(x.shape[0])
    first = _channel_first(x, channel_first)
    if not first:
        x = x.movedim(-1, 1)
    # Quantus works in numpy: array options (LRP's bounds, a baseline) become tensors.
    options = {k: _option_tensor(v, dtype, place) for k, v in options.items()}
    attribution = explain(model, x, method, target, **options).detach().to(dtype)
    channels_left = True
    keepdims = _keepdims(keepdims)
    reduce_axes = _axes_given(reduce_axes)
    if reduce_axes:
        rank = attribution.dim()
        axes = _reduce_axes(reduce_axes, rank)
        attribution = attribution.sum(dim=axes, keepdim=keepdims)
        channels_left = keepdims or 1 not in {a % rank for a in axes}
    if not first and channels_left:
        # Back to the inputs' layout, where a channel axis is left to move.
        attribution = attribution.movedim(1, -1)
    return to_numpy(attribution)
