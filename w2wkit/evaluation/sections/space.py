"""Section "space": the fitted space - explained variance, components needed, directions."""

from __future__ import annotations

from typing import Any

import numpy as np

from w2wkit.evaluation.context import EvalContext

__all__ = ["run"]


def run(ev: EvalContext, space: Any, seconds: float) -> dict[str, Any]:
    """Describe the fitted space.

    Parameters
    ----------
    ev : EvalContext
    space : WeightSpace
        The space of editing and sampling.
    seconds : float
        Its fit time.

    Returns
    -------
    dict
        Models, components, dimension, explained variance (per component and
        cumulative), components for 50/80/90%, directions and their scores.
    """
    evr = np.asarray(space.explained_variance_ratio_, dtype=np.float64)
    cum = np.cumsum(evr)
    # the fraction of total variance: explained_variance_ratio_ is relative to the total
    need = {}
    for q in (0.5, 0.8, 0.9):
        idx = np.nonzero(cum >= q)[0]
        need[f"{int(q * 100)}%"] = int(idx[0] + 1) if idx.size else None
    dirs = {}
    for name, d in getattr(space, "directions_", {}).items():
        dirs[name] = {"score": None if d.score is None else float(d.score), "method": d.method}
    return {
        "n_models": len(space.manifest_),
        "n_components": int(space.n_components_),
        "dim": int(space.layout_.dim) if hasattr(space.layout_, "dim") else None,
        "explained_variance_ratio": evr.tolist(),
        "cumulative": cum.tolist(),
        "components_for": need,
        "directions": dirs,
        "seconds": seconds,
    }
