"""Operators the per-sample LoRA adds to a training step, per targeted layer.

A GPU runs each operator as at least one kernel launched by the CPU; when the UNet's own
work per step is short (half precision, few models per batch), these launches set the
pace (benchmarks/README.md, "the per-sample LoRA in training"). This counts, with a
``TorchDispatchMode``, the aten operators of one bank layer's forward and backward
minus those of its bare base layer (views and reshapes not counted: they launch
nothing), in float32 and under bf16 autocast, with samples grouped by model (how
``w2wkit train`` batches them) and gathered by an index (prior preservation)::

    python benchmarks/count_bank_ops.py
"""

from __future__ import annotations

import collections
import contextlib
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from w2wkit.diffusion.bank import _layer_class, _Selector

FREE = (  # metadata-only operators: no kernel
    "aten::view",
    "aten::_unsafe_view",
    "aten::t",
    "aten::transpose",
    "aten::reshape",
    "aten::expand",
    "aten::detach",
    "aten::alias",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::slice",
    "aten::as_strided",
)


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if not name.startswith(FREE):
            self.ops[name] += 1
        return out


def extra_ops(groups: int | None, autocast: bool) -> int:
    """Operators of one bank layer's step minus its base layer's (4 models x 2 samples)."""
    ctx = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if autocast
        else contextlib.nullcontext
    )
    base = torch.nn.Linear(16, 8).requires_grad_(False)
    sel = _Selector()
    sel.index, sel.groups = torch.arange(4).repeat_interleave(2), groups
    layer = _layer_class()(base, torch.randn(4, 1, 16), torch.randn(4, 8, 1), sel, trainable=True)
    counts = []
    for mod in (layer, base):
        x = torch.randn(8, 5, 16, requires_grad=True)
        with _Count() as c:
            with ctx():
                y = mod(x)
            y.float().sum().backward()
        counts.append(sum(c.ops.values()))
    return counts[0] - counts[1]


def main() -> None:
    for autocast in (False, True):
        for groups in (2, None):
            print(
                json.dumps(
                    {
                        "bench": "count_bank_ops",
                        "precision": "bf16 autocast" if autocast else "fp32",
                        "samples": "grouped by model" if groups else "gathered by index",
                        "extra_ops_per_layer_step": extra_ops(groups, autocast),
                    }
                )
            )


if __name__ == "__main__":
    main()
