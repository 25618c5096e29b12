"""Heatmap normalisation and map similarity."""

from __future__ import annotations

import torch

from .validate import InputError, check_batch

__all__ = ["heatmap"]


def heatmap(explanation: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Absolute relevance summed over channels, each map normalised to sum 1.

    Differentiable, so that it can serve in an attack loss.

    Parameters
    ----------
    explanation : torch.Tensor
        Explanation of shape ``(B, C, H, W)``.
    eps : float
        Guards an all-zero map, which stays all zero.

    Returns
    -------
    torch.Tensor
        Maps of shape ``(B, H, W)``, each summing to 1.

    Examples
    --------
    >>> heatmap(torch.ones(2, 3, 4, 4)).sum(dim=(1, 2))
    tensor([1., 1.])
    """
    check_batch(explanation, "explanation", min_dim=4)
    if explanation.dim() != 4:
        raise InputError(
            f"explanation must have shape (B, C, H, W); got {tuple(explanation.shape)}"
        )
    h = explanation.abs().sum(1)
    return h / (h.sum(dim=(1, 2), keepdim=True) + eps)
