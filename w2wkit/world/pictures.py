"""Procedural pictures: the packs' generators, and many instances rendered in worker processes.

numpy/Pillow only (the workers are forked before torch touches a GPU).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from w2wkit.errors import W2WError

__all__ = ["default_workers", "generator", "render_instances"]

_GEN_CACHE: dict[str, Any] = {}


def generator(concept: str) -> Any:
    """The procedural generator of ``concept``'s pack, made once per process.

    Raises
    ------
    W2WError
        If the pack has no procedural generator (or :class:`~w2wkit.concepts.ConceptError`
        if there is no such pack).
    """
    if concept not in _GEN_CACHE:
        from w2wkit.concepts import get_pack

        gen = get_pack(concept).generator()
        if gen is None:
            raise W2WError(f"concept '{concept}' has no procedural generator", key="concepts")
        _GEN_CACHE[concept] = gen
    return _GEN_CACHE[concept]


def default_workers() -> int:
    """CPU processes worth using for rendering (all cores but one, at least 1)."""
    return max(1, (os.cpu_count() or 1) - 1)


def _render_part(args: tuple) -> np.ndarray:
    concept, specs, n_images, seed, size, vary, vary_tied = args
    gen = generator(concept)
    kw = {"vary": vary, "vary_tied": vary_tied} if vary else {}
    out = [gen.render(gen.instance(i, s), n_images, seed=seed, size=size, **kw) for i, s in specs]
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)


def _start_method() -> str:
    """``fork`` (fast) unless CUDA is initialised here: then a clean ``forkserver``."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return "forkserver"
    except Exception:  # pragma: no cover - a torch without cuda
        pass
    return os.environ.get("W2WKIT_RENDER_START", "fork")


def render_instances(
    concept: str,
    specs: Sequence[tuple[int, int]],
    n_images: int,
    seed: int = 0,
    size: int = 32,
    workers: int = 1,
    vary: float = 0.0,
    vary_tied: bool = True,
) -> np.ndarray:
    """Render ``n_images`` pictures of each instance ``(index, inst_seed)``.

    ``vary`` > 0 is passed to generators that vary transient attributes per
    picture (identity: ``IdentityGenerator.render(..., vary=, vary_tied=)``).

    Returns
    -------
    numpy.ndarray
        ``(len(specs), n_images, size, size, 3)`` uint8, instance-major; the
        same for any ``workers`` (each instance has its own random stream).
    """
    specs = [(int(i), int(s)) for i, s in specs]
    if not specs:
        return np.zeros((0, n_images, size, size, 3), np.uint8)
    workers = max(1, min(int(workers), len(specs) // 8 or 1))
    if workers == 1:
        flat = _render_part((concept, specs, n_images, seed, size, vary, vary_tied))
    else:
        parts = np.array_split(np.arange(len(specs)), workers * 4)
        args = [
            (concept, [specs[k] for k in p], n_images, seed, size, vary, vary_tied)
            for p in parts
            if len(p)
        ]
        with mp.get_context(_start_method()).Pool(workers) as pool:
            flat = np.concatenate(pool.map(_render_part, args))
    return flat.reshape(len(specs), n_images, size, size, 3)
