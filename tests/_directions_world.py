"""Planted LoRA collections for the direction tests (no torch needed).

Models are rank-1 LoRAs on the attention projections of
``w2wkit.testing.tiny_pipeline()`` (shapes hard-coded here so that only the
diffusers test has to build the pipeline). Their flattened factors are
``mean + Z @ basis + noise`` where ``Z`` are the coefficients of a planted
world (:func:`w2wkit.synthetic.make_planted`), so the labels of that world
are linear in planted directions of the models.
"""

from __future__ import annotations

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.synthetic import make_planted

_BLOCKS = (
    "unet.down_blocks.1.attentions.0",
    "unet.up_blocks.0.attentions.0",
    "unet.up_blocks.0.attentions.1",
    "unet.mid_block.attentions.0",
)
MODULE_SHAPES: dict[str, tuple[int, int]] = {}
for _b in _BLOCKS:
    for _a, _p, _in in (
        ("attn1", "to_q", 16),
        ("attn1", "to_v", 16),
        ("attn2", "to_q", 16),
        ("attn2", "to_v", 12),
    ):
        MODULE_SHAPES[f"{_b}.transformer_blocks.0.{_a}.{_p}"] = (16, _in)


def _unflatten(x: np.ndarray, alpha: float) -> Adapter:
    layers = {}
    o = 0
    for m, (out_f, in_f) in MODULE_SHAPES.items():
        down = x[o : o + in_f].reshape(1, in_f).astype(np.float32)
        o += in_f
        up = x[o : o + out_f].reshape(out_f, 1).astype(np.float32)
        o += out_f
        layers[m] = LoraLayer(down=down, up=up, alpha=alpha)
    return Adapter(layers=layers, metadata={})


def planted_collection(n: int = 120, k: int = 8, seed: int = 0, noise: float = 1e-3):
    """Adapters with planted attributes.

    Returns
    -------
    adapters : list of Adapter
    labels : dict of str to numpy.ndarray
        ``a0``..``a3`` binary (``a0``/``a1`` correlated), shape ``(n,)``.
    world : PlantedWorld
    """
    world = make_planted(n, k, n_attributes=4, correlation=0.3, seed=seed)
    rng = np.random.default_rng(seed + 100)
    d = sum(i + o for o, i in MODULE_SHAPES.values())
    basis = rng.standard_normal((k, d)) * 0.05
    mean = rng.standard_normal(d) * 0.1
    X = mean + world.P @ basis + noise * rng.standard_normal((n, d))
    adapters = [_unflatten(x, alpha=1.0) for x in X]
    return adapters, world.labels, world
