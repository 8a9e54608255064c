"""The UNet's conditioning of a prompt: SD1.x/SD2.x hidden states, SDXL's two encoders and sizes.

One place for what the sampler (:class:`~w2wkit.diffusion.sampler.Renderer`),
the DreamBooth loop and inversion give the UNet besides the noisy latents:

- :func:`encode_prompts`: the text encoder's hidden states; for SDXL both text
  encoders' penultimate hidden states concatenated and ``text_encoder_2``'s
  pooled, projected output (as ``StableDiffusionXLPipeline.encode_prompt``),
  with the empty negative prompt as zeros when the pipeline asks for it
  (``force_zeros_for_empty_prompt``).
- :func:`added_cond`: SDXL's ``added_cond_kwargs``: the pooled embedding and the
  size/crop conditioning ``(H, W, 0, 0, H, W)`` (original size, crop corner,
  target size) of pictures of size ``(H, W)``.

The text encoders run with autograd when the caller allows it, so a per-sample
LoRA on them (the bank) is trained or inverted through these functions.

torch is imported by the callers' tensors only; importing this module is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["added_cond", "encode_prompts", "is_sdxl"]


def is_sdxl(pipe: Any) -> bool:
    """Whether ``pipe`` has SDXL's second text encoder."""
    return getattr(pipe, "text_encoder_2", None) is not None


def encode_prompts(
    pipe: Any,
    prompts: Sequence[str],
    device: Any,
    *,
    cfg: bool = False,
    negative: Sequence[str] | None = None,
) -> tuple[Any, Any, Any, Any]:
    """``(pos, neg, pooled, neg_pooled)`` embeddings of ``prompts``.

    Parameters
    ----------
    pipe : diffusers.StableDiffusionPipeline or StableDiffusionXLPipeline
    prompts : sequence of str
        ``n`` prompts.
    device : str or torch.device
    cfg : bool
        Also encode the negative prompts (classifier-free guidance).
    negative : sequence of str, optional
        ``n`` negative prompts (with ``cfg``; default empty).

    Returns
    -------
    tuple
        ``pos`` ``(n, L, D)``; ``neg`` ``(n, L, D)`` or ``None`` without
        ``cfg``; SDXL's ``pooled`` and ``neg_pooled`` ``(n, P)``, ``None`` for
        SD1.x/SD2.x (and ``neg_pooled`` without ``cfg``).
    """
    prompts = list(prompts)
    neg_list = list(negative) if negative is not None else [""] * len(prompts)
    if not is_sdxl(pipe):
        pos, neg = pipe.encode_prompt(prompts, device, 1, cfg, neg_list if cfg else None)
        return pos, neg, None, None
    zeros = pipe.config.get("force_zeros_for_empty_prompt", True)
    neg_in = None if (not cfg or (zeros and not any(neg_list))) else neg_list
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=prompts,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=cfg,
        negative_prompt=neg_in,
    )
    return pos, (neg if cfg else None), pooled, (neg_pooled if cfg else None)


def added_cond(pooled: Any, size: tuple[int, int]) -> dict[str, Any]:
    """SDXL's ``{"added_cond_kwargs": ...}`` for pooled embeddings and pictures of ``size``.

    Parameters
    ----------
    pooled : torch.Tensor or None
        ``(n, P)`` pooled text embeddings (``None``: an SD1.x/SD2.x UNet, ``{}``).
    size : (int, int)
        Height and width of the pictures in pixels.

    Returns
    -------
    dict
        ``{"added_cond_kwargs": {"text_embeds": (n, P), "time_ids": (n, 6)}}``,
        ``time_ids`` ``(H, W, 0, 0, H, W)`` in ``pooled``'s dtype and device.
    """
    if pooled is None:
        return {}
    import torch

    h, w = int(size[0]), int(size[1])
    ids = torch.tensor([[h, w, 0, 0, h, w]], device=pooled.device, dtype=pooled.dtype)
    return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.expand(len(pooled), -1)}}
