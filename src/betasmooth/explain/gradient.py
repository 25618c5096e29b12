"""Gradient-based methods: gradient, input_x_gradient, integrated_gradients."""

from __future__ import annotations

import torch
from torch import nn

from ..validate import check_classes
from . import register

__all__ = ["input_gradient", "predict", "select_logit"]


def select_logit(
    logits: torch.Tensor, target: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: E501
    """The logit of ``target`` per item, and the target (the argmax where ``None``).

    Parameters
    ----------
    logits : torch.Tensor
        Model output of shape ``(B, classes)``.
    target : torch.Tensor or None
        Class per item, ``(B,)``.

    Returns
    -------
    tuple of torch.Tensor
        ``(logit, target)``, both of shape ``(B,)``.
    """
    if logits.dim() != 2:
        raise ValueError(
            f"the model must return logits of shape (B, classes); got {tuple(logits.shape)}"
        )
    if target is None:
        target = logits.detach().argmax(1)
    check_classes(target, logits.shape[1])
    return logits.gather(1, target[:, None])[:, 0], target


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The predicted class of each item, ``(B,)``."""
    return model(x).argmax(1)


def _leaf(x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    # With create_graph the gradient is taken w.r.t. x itself, so that the map
    # stays a function of x; otherwise w.r.t. a detached copy.
    if create_graph and x.requires_grad:
        return x
    return x.detach().requires_grad_(True)


def input_gradient(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor | None,
    create_graph: bool = False,
) -> torch.Tensor:
    """Gradient of the target logit w.r.t. the input, batched.

    Parameters
    ----------
    model : nn.Module
        Classifier.
    x : torch.Tensor
        Input batch.
    target : torch.Tensor or None
        Class per item; ``None`` for the predicted class.
    create_graph : bool
        Keep the graph for a derivative of the gradient.

    Returns
    -------
    torch.Tensor
        ``d logit_target / d x``, shaped like ``x``.
    """
    xg = _leaf(x, create_graph)
    with torch.enable_grad():
        logit, _ = select_logit(model(xg), target)
        (grad,) = torch.autograd.grad(logit.sum(), xg, create_graph=create_graph)
    return grad


@register("gradient")
def gradient(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None, *, create_graph: bool = False
) -> torch.Tensor:
    """Saliency: the gradient of the target logit (Simonyan et al. 2014)."""
    return input_gradient(model, x, target, create_graph)


@register("input_x_gradient")
def input_x_gradient(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None, *, create_graph: bool = False
) -> torch.Tensor:
    """Input times gradient (Shrikumar et al. 2016)."""
    return x * input_gradient(model, x, target, create_graph)
