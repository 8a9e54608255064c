"""Noise-schedule helpers: the forward process, training targets, sampling schedulers.

Training (DreamBooth, the zoo), inversion and the renderer use these, so the
noising of a latent is written once::

    x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps

with ``abar`` the scheduler's ``alphas_cumprod``. torch and diffusers are
imported when a function needs them.
"""

from __future__ import annotations

import copy
from typing import Any

from w2wkit.errors import W2WError

__all__ = [
    "PREDICTION_TYPES",
    "SCHEDULERS",
    "alphas_cumprod",
    "noisy",
    "prediction_type",
    "sampling_scheduler",
    "target",
]

#: What the UNet may predict (the scheduler's ``prediction_type``).
PREDICTION_TYPES = ("epsilon", "v_prediction")

#: Short names of sampling schedulers -> diffusers class names.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
}


def alphas_cumprod(scheduler: Any, device: Any = "cpu") -> Any:
    """The scheduler's ``alphas_cumprod`` ``(T,)`` as float32 on ``device``."""
    import torch

    return torch.as_tensor(scheduler.alphas_cumprod).to(device=device, dtype=torch.float32)


def _abar(acp: Any, t: Any, like: Any) -> Any:
    """``abar_t`` per sample, shaped to broadcast over ``like`` ``(n, C, H, W)``."""
    a = acp.index_select(0, t.to(acp.device)).to(like.device)
    return a.view(-1, *([1] * (like.ndim - 1)))


def noisy(x0: Any, noise: Any, t: Any, acp: Any) -> Any:
    """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.

    Parameters
    ----------
    x0, noise : torch.Tensor
        ``(n, C, H, W)`` latents and their noise.
    t : torch.LongTensor
        ``(n,)`` timesteps.
    acp : torch.Tensor
        ``(T,)`` from :func:`alphas_cumprod`.

    Returns
    -------
    torch.Tensor
        ``(n, C, H, W)``.
    """
    a = _abar(acp, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target(x0: Any, noise: Any, t: Any, acp: Any, kind: str = "epsilon") -> Any:
    """What the UNet should predict: ``eps`` (epsilon) or ``v`` (v_prediction).

    ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``; shapes as :func:`noisy`.
    """
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        a = _abar(acp, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise W2WError(f"scheduler prediction type {kind!r} is not supported (epsilon or v_prediction)")


def prediction_type(scheduler: Any) -> str:
    """The scheduler's prediction type, refused unless it is in :data:`PREDICTION_TYPES`."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise W2WError(
            f"scheduler prediction type {kind!r} is not supported (epsilon or v_prediction)"
        )
    return str(kind)


def sampling_scheduler(pipe: Any, name: str | None = None) -> Any:
    """A fresh sampling scheduler for ``pipe``.

    Parameters
    ----------
    pipe : diffusers pipeline
    name : str, optional
        ``None``: a copy of the pipeline's own scheduler (a copy, not
        ``from_config``, which re-defaults keys the pipeline fixed after
        construction, e.g. ``steps_offset``). Else a short name of
        :data:`SCHEDULERS` (``"ddim"``) or a diffusers class name, built
        ``from_config`` of the pipeline's scheduler.

    Raises
    ------
    W2WError
        An unknown scheduler name.
    """
    if name is None:
        return copy.deepcopy(pipe.scheduler)
    import diffusers

    cls_name = SCHEDULERS.get(str(name).lower(), str(name))
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise W2WError(
            f"unknown scheduler '{name}'",
            param="scheduler",
            hint="use one of " + ", ".join(SCHEDULERS),
        )
    return cls.from_config(pipe.scheduler.config)
