"""The denoising loss: mean squared error of the UNet's prediction, per sample.

DreamBooth training (one model or many in a batch) and inversion minimise it;
with the epsilon target it is the epsilon-prediction loss of DDPM. Per sample
(shape ``(n,)``), so that a batch of many models can sum each model's own mean.
"""

from __future__ import annotations

from typing import Any

__all__ = ["denoising_loss"]


def denoising_loss(pred: Any, target: Any, mask: Any = None) -> Any:
    """Per-sample mean squared error ``(n,)`` of ``pred`` against ``target`` ``(n, C, H, W)``.

    Parameters
    ----------
    pred, target : torch.Tensor
        ``(n, C, H, W)``; ``pred`` is computed in float32.
    mask : torch.Tensor, optional
        ``(n, 1, H, W)`` weights in ``[0, 1]``: the mean over the masked area
        (all channels) instead of the whole latent.

    Returns
    -------
    torch.Tensor
        ``(n,)`` float32.
    """
    err = (pred.float() - target) ** 2
    if mask is None:
        return err.mean(dim=tuple(range(1, err.ndim)))
    dims = tuple(range(1, err.ndim))
    return (err * mask).sum(dim=dims) / (mask.sum(dim=dims) * err.shape[1])
