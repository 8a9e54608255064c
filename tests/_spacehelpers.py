"""Shared builders for the weight-space tests (small, deterministic)."""

from __future__ import annotations

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.layout import WeightLayout

#: Module -> (out, in) of a small fake UNet (two attention blocks, one conv).
SHAPES = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": (8, 8),
    "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q": (12, 6),
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": (6, 10),
}


def layout(rank: int = 2, alpha: float | None = None, shapes=SHAPES) -> WeightLayout:
    """A layout over ``shapes`` at one rank."""
    return WeightLayout(
        [(m, (rank, i), (o, rank), float(alpha or rank), False) for m, (o, i) in shapes.items()]
    )


def planted_rows(n: int, lay: WeightLayout, true_rank: int, noise: float = 0.0, seed: int = 0):
    """``(n, d)`` float64 rows of rank ``true_rank`` (+ mean, + optional noise)."""
    rng = np.random.default_rng(seed)
    spectrum = 10.0 / (1.0 + np.arange(true_rank)) ** 1.5
    u = rng.standard_normal((n, true_rank))
    v = np.linalg.qr(rng.standard_normal((lay.dim, true_rank)))[0]
    x = (u * spectrum) @ v.T
    x *= rng.uniform(0.5, 2.0, lay.dim)  # unequal coordinate scales
    x += rng.standard_normal(lay.dim)
    if noise:
        x += noise * rng.standard_normal(x.shape)
    return x.astype(np.float32).astype(np.float64)


def adapters_from_rows(rows: np.ndarray, lay: WeightLayout) -> list[Adapter]:
    """Unflatten every row."""
    return [lay.unflatten(r.astype(np.float32)) for r in rows]


def random_models(n: int, rank: int = 2, seed: int = 0, shapes=SHAPES) -> list[Adapter]:
    """``n`` adapters with random factors sharing one layout."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        layers = {
            m: LoraLayer(
                down=(0.3 * rng.standard_normal((rank, i))).astype(np.float32),
                up=(0.3 * rng.standard_normal((o, rank))).astype(np.float32),
                alpha=float(rank),
            )
            for m, (o, i) in shapes.items()
        }
        out.append(Adapter(layers))
    return out


def regauge(ad: Adapter, seed: int) -> Adapter:
    """Same deltas, other factors: ``A -> G A``, ``B -> B G^-1`` per module."""
    rng = np.random.default_rng(seed)
    layers = {}
    for m, layer in ad.items():
        r = layer.rank
        g = np.eye(r) + 0.5 * rng.standard_normal((r, r))
        layers[m] = LoraLayer(
            down=(g @ layer.down.astype(np.float64)).astype(np.float32),
            up=(layer.up.astype(np.float64) @ np.linalg.inv(g)).astype(np.float32),
            alpha=layer.alpha,
        )
    return Adapter(layers)


def pad_rank(ad: Adapter, extra: int) -> Adapter:
    """Same deltas at a higher rank (zero rows/columns, alpha scaled to keep the scale)."""
    layers = {}
    for m, layer in ad.items():
        r = layer.rank
        down = np.concatenate([layer.down, np.zeros((extra, layer.down.shape[1]), np.float32)])
        up = np.concatenate([layer.up, np.zeros((layer.up.shape[0], extra), np.float32)], axis=1)
        layers[m] = LoraLayer(down=down, up=up, alpha=layer.alpha * (r + extra) / r)
    return Adapter(layers)


def split_alpha(ad: Adapter, factor: float) -> Adapter:
    """Same deltas with ``alpha / factor`` and ``up * factor``."""
    return Adapter(
        {
            m: LoraLayer(
                down=layer.down, up=layer.up * np.float32(factor), alpha=layer.alpha / factor
            )
            for m, layer in ad.items()
        }
    )


def principal_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal angle (radians) between the row spaces of ``a`` and ``b``."""
    from scipy.linalg import subspace_angles

    return float(np.max(subspace_angles(a.T.astype(np.float64), b.T.astype(np.float64))))


def direct_io_works(path) -> bool:
    """Whether the file system of ``path`` takes ``O_DIRECT`` (it refuses with EINVAL)."""
    import errno
    import os

    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError as exc:
        assert exc.errno == errno.EINVAL, exc
        return False
    return True


def evict(paths) -> None:
    """Drop the files' pages from the page cache (written back first)."""
    import os

    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
