"""Metrics of the evaluation: ID score, pixel distance, summaries.

The ID score compares identity embeddings by cosine (:func:`id_matrix`,
:func:`id_score`); :func:`pixel_rmse` measures how much an edit changes the
pictures. :func:`unit` and :func:`to_uint8` are the world's
(:mod:`w2wkit.world.oracle`, which the perfect edit is scored with), re-exported
here so the evaluation has one place for its metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from w2wkit.world.oracle import to_uint8, unit

__all__ = [
    "id_matrix",
    "id_score",
    "pixel_rmse",
    "summarize",
    "to_float01",
    "to_uint8",
    "unit",
]


def id_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities of identity embeddings ``a (n, D)`` x ``b (m, D)`` -> ``(n, m)``."""
    return unit(a) @ unit(b).T


def id_score(a: np.ndarray, b: np.ndarray) -> float:
    """ID score: the mean cosine similarity over all pairs of ``a`` and ``b`` embeddings."""
    return float(id_matrix(a, b).mean())


def pixel_rmse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root-mean-square pixel difference per image pair, images in ``[0, 1]``.

    Parameters
    ----------
    a, b : numpy.ndarray
        ``(n, H, W, 3)`` floats in ``[0, 1]`` or uint8.

    Returns
    -------
    numpy.ndarray
        ``(n,)``; 0 = identical, 1 = black vs white everywhere.
    """
    fa, fb = to_float01(a), to_float01(b)
    return np.sqrt(((fa - fb) ** 2).reshape(len(fa), -1).mean(axis=1))


def to_float01(images: np.ndarray) -> np.ndarray:
    """Pictures as float64 in ``[0, 1]``: uint8 divided by 255, floats clipped.

    Parameters
    ----------
    images : numpy.ndarray
        ``(..., H, W, 3)`` uint8 or floats.

    Returns
    -------
    numpy.ndarray
        Same shape, float64 in ``[0, 1]``.
    """
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    return np.clip(x.astype(np.float64), 0.0, 1.0)


def summarize(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``{"mean", "std", "n"}`` of the finite values (``std`` with ``ddof=0``)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}
