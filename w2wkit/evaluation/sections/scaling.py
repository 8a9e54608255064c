"""Section "scaling": inversion and direction overlap against the number of models."""

from __future__ import annotations

from typing import Any

import numpy as np

from w2wkit.evaluation.context import EvalContext, fit_space
from w2wkit.evaluation.metrics import id_matrix, id_score, summarize

__all__ = ["run"]


def run(ev: EvalContext) -> dict[str, Any]:
    """Refit the space on the first N models for several N; sweep inversion's components.

    Parameters
    ----------
    ev : EvalContext
        Its world's zoo and labels are refitted per N; its ``space_inv`` gives the
        sweep over ``k``, its ``heldout`` the inverted identities.

    Returns
    -------
    dict
        ``rows`` (per N: inversion ID score, mean ``|cos|`` between directions),
        ``attributes``, ``components_rows`` (inversion ID score per ``k``).
    """
    s, w = ev.s, ev.w
    n_all = len(w.zoo)
    sizes = sorted({min(int(x), n_all) for x in s.scaling_sizes if min(int(x), n_all) >= 3})
    attrs = [a for a in s.edit_attributes if a in w.labels] or list(w.labels)[:3]
    rows = []
    heldout = ev.heldout[: s.scaling_heldout]
    refs = [ev.embed(ev.real(inst, s.n_eval_images, seed=s.seed + 99)) for inst in heldout]
    for size in sizes:
        labels = {a: v[:size] for a, v in w.labels.items()}
        sp = fit_space(w.zoo[:size], w.zoo_names[:size], s.n_components, labels)
        names = [a for a in sp.directions_ if a in w.labels]
        if len(names) >= 2:
            V = np.stack([np.asarray(sp.directions_[a].vector, dtype=np.float64) for a in names])
            C = np.abs(id_matrix(V, V))
            off = C[np.triu_indices(len(names), 1)]
            sel = [names.index(a) for a in attrs if a in names]
            off_sel = C[np.ix_(sel, sel)][np.triu_indices(len(sel), 1)] if len(sel) >= 2 else off
        else:
            off = off_sel = np.array([np.nan])
        inputs = np.concatenate([ev.real(inst, 1, seed=s.seed + 5) for inst in heldout])
        coefs, _, _ = ev.invert(sp, inputs, seed=s.seed)
        imgs = ev.render(sp.inverse_transform(coefs), desc=f"scaling N={size}")
        ids = [id_score(ev.embed(imgs[i, 0]), refs[i]) for i in range(len(heldout))]
        rows.append(
            {
                "n_models": size,
                "n_components": int(sp.n_components_),
                "inversion_id": summarize(ids),
                "direction_abs_cos_all": summarize(off),
                "direction_abs_cos_edit_attributes": summarize(off_sel),
            }
        )
    # inversion against the number of optimised components, full space
    k_rows = []
    sp_inv = ev.space_inv
    ks = sorted({min(int(k), sp_inv.n_components_) for k in s.inversion_k_sweep if k >= 1})
    inputs = np.concatenate([ev.real(inst, 1, seed=s.seed + 5) for inst in heldout])
    for k in ks:
        coefs, _, _ = ev.invert(sp_inv, inputs, k=k, seed=s.seed)
        imgs = ev.render(sp_inv.inverse_transform(coefs), desc=f"k={k}")
        ids = [id_score(ev.embed(imgs[i, 0]), refs[i]) for i in range(len(heldout))]
        k_rows.append({"components": k, "inversion_id": summarize(ids)})
    return {"rows": rows, "attributes": attrs, "components_rows": k_rows}
