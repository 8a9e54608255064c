"""The miniature world: procedural concepts, a tiny diffusion model, its LoRA zoo.

The generators (:mod:`w2wkit.world.identity`, :mod:`w2wkit.world.dogs`) need
only numpy and Pillow. :mod:`w2wkit.world.build` (the base pipeline and its
training) and :mod:`w2wkit.world.lora` (per-instance LoRA training) import
torch, diffusers and peft, and are loaded only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "IdentityGenerator": "w2wkit.world.identity",
    "DogGenerator": "w2wkit.world.dogs",
    "Nuisance": "w2wkit.world._draw",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'w2wkit.world' has no attribute {name!r}")
