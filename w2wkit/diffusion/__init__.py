"""The torch-side diffusion engine: one implementation of each mechanism.

=================  ==========================================================
module             job
=================  ==========================================================
``quiet``          the quiet context (diffusers/transformers output off, restored)
``pipeline``       opening a pipeline folder: SD1.x/SD2.x/SDXL, dtype, device, offload
``bank``           the per-sample LoRA bank (frozen: rendering, inversion;
                   trainable: many models in one training batch)
``schedule``       noise-schedule helpers (forward process, targets, schedulers)
``loss``           the denoising (epsilon-prediction) loss, per sample
``sampler``        the sampler: :class:`Renderer`
``dreambooth``     the DreamBooth LoRA loop, many models in one batch
=================  ==========================================================

The device and dtype resolver is :mod:`w2wkit.devices` (at the lowest layer, so
that the solvers share it), re-exported here. The renderer (:mod:`w2wkit.render`),
inversion (:mod:`w2wkit.invert`), the miniature world's zoo and LoRA trainer,
its fidelity measurement and the baselines are clients of these modules. Every
module imports torch, diffusers and peft inside its functions: importing the
engine is cheap.
"""

from __future__ import annotations

from w2wkit.devices import DTYPES, resolve_device, torch_dtype
from w2wkit.diffusion.bank import (
    LoraBank,
    StackedLayer,
    install_bank,
    per_sample_lora,
    stack_adapters,
    stack_factors,
)
from w2wkit.diffusion.dreambooth import DreamBooth
from w2wkit.diffusion.loss import denoising_loss
from w2wkit.diffusion.pipeline import load_pipeline, pipeline_kind
from w2wkit.diffusion.quiet import quiet
from w2wkit.diffusion.sampler import Renderer, RenderResult, make_grid, render

__all__ = [
    "DTYPES",
    "DreamBooth",
    "LoraBank",
    "RenderResult",
    "Renderer",
    "StackedLayer",
    "denoising_loss",
    "install_bank",
    "load_pipeline",
    "make_grid",
    "per_sample_lora",
    "pipeline_kind",
    "quiet",
    "render",
    "resolve_device",
    "stack_adapters",
    "stack_factors",
    "torch_dtype",
]
