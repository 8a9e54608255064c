"""Out-of-distribution inputs: pictures restyled (posterised, painted, line drawing)."""

from __future__ import annotations

import numpy as np

from w2wkit.errors import W2WError
from w2wkit.evaluation.metrics import to_uint8

__all__ = ["STYLES", "stylise"]

#: Out-of-distribution styles of :func:`stylise`.
STYLES = ("posterised", "painted", "line drawing")


def stylise(images: np.ndarray, style: str) -> np.ndarray:
    """Out-of-distribution versions of pictures.

    Parameters
    ----------
    images : numpy.ndarray
        ``(n, H, W, 3)`` uint8.
    style : {"posterised", "painted", "line drawing"}
        ``posterised``: 2 bits per channel. ``painted``: mode filter (flat
        brush patches), 3-bit colours, a warm canvas tint and smoothing.
        ``line drawing``: dark edge lines (gradient magnitude of a smoothed
        grey image) on white paper.

    Returns
    -------
    numpy.ndarray
        Same shape, uint8.
    """
    from PIL import Image, ImageFilter, ImageOps

    out = []
    for im in to_uint8(images):
        p = Image.fromarray(im)
        if style == "posterised":
            q = ImageOps.posterize(p, 2)
        elif style == "painted":
            q = p.filter(ImageFilter.ModeFilter(3))
            q = ImageOps.posterize(q, 3).filter(ImageFilter.SMOOTH_MORE)
            arr = np.asarray(q).astype(np.float32) * np.array([1.05, 1.0, 0.88]) + np.array(
                [8, 4, 0]
            )
            q = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        elif style == "line drawing":
            g = np.asarray(p.convert("L").filter(ImageFilter.GaussianBlur(0.6)), np.float32)
            gy, gx = np.gradient(g)
            mag = np.hypot(gx, gy)
            thr = np.percentile(mag, 75)
            lines = np.where(mag > thr, 255.0 - np.clip(mag * 4, 0, 230), 255.0)
            q = Image.fromarray(np.repeat(lines[..., None], 3, axis=2).astype(np.uint8))
        else:
            raise W2WError(f"unknown style {style!r}; use {', '.join(STYLES)}", key="style")
        out.append(np.asarray(q, dtype=np.uint8))
    return np.stack(out)
