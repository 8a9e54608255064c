"""Baselines the evaluation compares weights2weights against, in the same code.

* **DreamBooth LoRA, multi-image**: the zoo's own recipe
  (:class:`w2wkit.world.lora.LoraTrainer`: rank 1, ``to_q``/``to_v``, shared
  initialisation, instance prompt) on several pictures of one identity.
* **DreamBooth LoRA, single image**: the same recipe on one picture (it
  overfits the pose, as in the paper).
* **Prompting** for edits: the *unedited* model rendered with the attribute
  named in the prompt (``"a photo of sks person with a beard"``).
* **Undisentangled direction**: the plain probe direction, without making it
  orthogonal to the correlated attributes (``orthogonal_to=()``).

w2w inversion itself is :func:`w2wkit.invert.invert`, the user-facing code.

torch, diffusers and peft are imported inside the functions.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter

__all__ = ["BaselineModels", "edit_prompt", "edit_undisentangled"]


def edit_prompt(
    spec: Any, instance_prompt: str = "sks person", template: str = "a photo of {}"
) -> str:
    """The prompting baseline's prompt that adds one attribute.

    Parameters
    ----------
    spec : AttributeSpec
        ``phrase`` and ``adjective`` are used: adjectives go before the
        instance prompt ("a photo of old sks person"), other phrases after
        "with" ("a photo of sks person with a beard").
    instance_prompt : str
    template : str

    Returns
    -------
    str
    """
    if getattr(spec, "adjective", False):
        return template.format(f"{spec.phrase} {instance_prompt}")
    return template.format(f"{instance_prompt} with {spec.phrase}")


def edit_undisentangled(space: Any, adapter: Adapter, name: str, strength: float) -> Adapter:
    """Edit along the plain (not disentangled) direction ``name``.

    The stored direction as the probe produced it, with no
    ``orthogonal_to``: the paper's edit without its disentanglement step.
    """
    return space.edit(adapter, {name: float(strength)}, orthogonal_to=())


class BaselineModels:
    """The base pipeline loaded once for the DreamBooth baselines (the zoo recipe).

    The DreamBooth loop is the diffusion engine's
    (:class:`w2wkit.diffusion.dreambooth.DreamBooth`, through
    :class:`w2wkit.world.lora.LoraTrainer`), on the CPU or a GPU alike.

    Parameters
    ----------
    base : path
        The base pipeline folder.
    settings : LoraSettings
        The zoo recipe (rank, alpha, targets, steps, batch, lr, init seed).
    device : str
        ``"cpu"`` or ``"cuda"`` (``"auto"``: CUDA if present).
    """

    def __init__(self, base: Any, settings: Any, device: str = "auto") -> None:
        from w2wkit.world.lora import LoraTrainer

        self.settings = settings
        self.trainer = LoraTrainer(base, settings, device=device)
        self.device = self.trainer.device

    # -------------------------------------------------------------- DreamBooth
    def dreambooth(
        self, images: np.ndarray, prompt: str, seed: int = 0, steps: int | None = None
    ) -> tuple[Adapter, float]:
        """Train the zoo recipe on ``images`` ``(n, H, W, 3)`` uint8.

        Returns
        -------
        (Adapter, float)
            The LoRA and its wall time in seconds.
        """
        t0 = time.perf_counter()
        s = self.settings if steps is None else replace(self.settings, steps=int(steps))
        old = self.trainer.settings
        self.trainer.settings = s
        try:
            adapter, _ = self.trainer.train(np.asarray(images), prompt, seed=seed)
        finally:
            self.trainer.settings = old
        return adapter, time.perf_counter() - t0
