"""w2wkit: weight-space arithmetic over customized diffusion models.

Layers (dependencies point down only): :mod:`w2wkit.formats` (LoRA files <->
:class:`~w2wkit.adapter.Adapter`), :mod:`w2wkit.layout` and
:mod:`w2wkit.collection` (flattening many adapters), :mod:`w2wkit.space`
(:class:`WeightSpace`), :mod:`w2wkit.directions` (probes and edits). Torch,
diffusers and peft are imported lazily, only by code that renders or trains.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Adapter": "w2wkit.adapter",
    "LoraLayer": "w2wkit.adapter",
    "DeltaLayer": "w2wkit.adapter",
    "W2WError": "w2wkit.errors",
    "read_adapter": "w2wkit.formats.registry",
    "write_adapter": "w2wkit.formats.registry",
    "WeightLayout": "w2wkit.layout",
    "Collection": "w2wkit.collection",
    "WeightSpace": "w2wkit.space",
    "train": "w2wkit.training",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'w2wkit' has no attribute {name!r}")
