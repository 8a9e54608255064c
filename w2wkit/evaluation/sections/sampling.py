"""Section "sampling": consistency of sampled models and their distance to the training ones."""

from __future__ import annotations

from typing import Any

import numpy as np

from w2wkit.evaluation.context import EvalContext
from w2wkit.evaluation.metrics import id_matrix, id_score, summarize

__all__ = ["run"]


def run(ev: EvalContext) -> dict[str, Any]:
    """Sample models from the space and render them.

    Parameters
    ----------
    ev : EvalContext
        With ``space``.

    Returns
    -------
    dict
        Intra- and inter-model ID score, and cosine, relative distance and ID
        score to each sample's nearest training model.
    """
    s, space = ev.s, ev.space
    coef = space.sample(s.n_samples, seed=s.seed)
    models = space.inverse_transform(coef)
    imgs = ev.render(models, desc="rendering samples")
    emb = ev.embed(imgs[:, 0])  # (n, seeds, D)
    n, m = emb.shape[:2]
    intra, inter = [], []
    for a in range(n):
        sim = id_matrix(emb[a], emb[a])
        if m > 1:
            intra.append(float(sim[np.triu_indices(m, 1)].mean()))
        for b in range(a + 1, n):
            inter.append(id_score(emb[a], emb[b]))
    near = space.nearest(coef, n=1)
    near_cos = [row[0][2] for row in near]
    train = space.coefficients_.astype(np.float64)
    dist = [
        float(
            np.linalg.norm(coef[i] - train[row[0][0]])
            / max(np.linalg.norm(train[row[0][0]] - space.coef_mean_), 1e-12)
        )
        for i, row in enumerate(near)
    ]
    # ID score of each sample to its nearest training model
    near_models = [space.inverse_transform(train[row[0][0]][None])[0] for row in near]
    near_imgs = ev.render(near_models, desc="rendering nearest training models")
    near_id = [id_score(emb[i], ev.embed(near_imgs[i, 0])) for i in range(n)]
    ev.save_grid(
        "sampling",
        imgs[:, 0, : min(4, m)],
        [f"sample {i}" for i in range(n)],
        [f"seed {j}" for j in range(min(4, m))],
    )
    return {
        "n_samples": n,
        "intra_model_id": summarize(intra),
        "inter_model_id": summarize(inter),
        "nearest_training_cosine": summarize(near_cos),
        "nearest_training_relative_distance": summarize(dist),
        "nearest_training_id": summarize(near_id),
        "note": "relative distance = |c - c_nearest| / |c_nearest - mean|; "
        "ID to the nearest training model's renders (same seeds)",
    }
