"""Section "fidelity": are the zoo models who they were trained to be?

Top-1 identification of zoo models' renders among candidates, by ID score
against procedural pictures of each candidate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from w2wkit.evaluation.context import EvalContext
from w2wkit.evaluation.metrics import id_score

__all__ = ["run"]


def run(ev: EvalContext) -> dict[str, Any]:
    """Identify zoo models' renders among ``fidelity_candidates`` zoo instances.

    Parameters
    ----------
    ev : EvalContext

    Returns
    -------
    dict
        ``{concept: {"n_candidates", "top1", "chance", "target"}}`` keyed by the
        evaluated pack's name, or ``{"skipped": reason}``.
    """
    s, w = ev.s, ev.w
    if not w.zoo_instances:
        return {"skipped": "the world does not record which instance each zoo model is"}
    n = min(s.fidelity_candidates, len(w.zoo))
    idx = np.linspace(0, len(w.zoo) - 1, n).round().astype(int)
    imgs = ev.render(
        [w.zoo[i] for i in idx], seeds=list(range(min(2, s.seeds))), desc="rendering zoo models"
    )
    gen_emb = ev.embed(imgs[:, 0])  # (n, seeds, D)
    ref_emb = np.stack([ev.embed(ev.real(w.zoo_instances[i], 2, seed=s.seed + 123)) for i in idx])
    score = np.array([[id_score(gen_emb[a], ref_emb[b]) for b in range(n)] for a in range(n)])
    top1 = float(np.mean(np.argmax(score, axis=1) == np.arange(n)))
    return {w.pack.name: {"n_candidates": n, "top1": top1, "chance": 1.0 / n, "target": 0.8}}
