"""Rendering many LoRA models of one base pipeline: the public names, from the engine.

The renderer lives in the diffusion engine (:mod:`w2wkit.diffusion`): the
sampler (:class:`Renderer`) in :mod:`w2wkit.diffusion.sampler`, the per-sample
LoRA bank in :mod:`w2wkit.diffusion.bank`, pipeline loading in
:mod:`w2wkit.diffusion.pipeline` and the device resolver in
:mod:`w2wkit.devices`. This module keeps the names people import
(``from w2wkit.render import Renderer, make_grid, resolve_device``).

Importing it is cheap (torch and diffusers load when a function needs them).
"""

from __future__ import annotations

from w2wkit.devices import DTYPES, resolve_device
from w2wkit.diffusion.bank import (
    LoraBank,
    StackedLayer,
    per_sample_lora,
    stack_adapters,
)
from w2wkit.diffusion.pipeline import load_pipeline
from w2wkit.diffusion.sampler import Renderer, RenderResult, make_grid, render

#: The handle :func:`per_sample_lora` yields (the engine's :class:`LoraBank`).
LoraPatch = LoraBank

__all__ = [
    "DTYPES",
    "LoraPatch",
    "RenderResult",
    "Renderer",
    "StackedLayer",
    "load_pipeline",
    "make_grid",
    "per_sample_lora",
    "render",
    "resolve_device",
    "stack_adapters",
]
