"""Edit strengths calibrated per attribute on models that are never evaluated.

:func:`calibrate_strength` edits the calibration pool (zoo models, or
DreamBooth models of held-out identities beyond the evaluated ones) at each
strength of the sweep and picks one with :func:`pick_strength`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from w2wkit.errors import W2WError
from w2wkit.evaluation.edit_rules import edit_disentangled, excluded_by, plausible
from w2wkit.evaluation.metrics import to_uint8, unit
from w2wkit.evaluation.settings import EvalSettings

if TYPE_CHECKING:
    from w2wkit.evaluation.context import EvalContext

__all__ = [
    "calibrate_strength",
    "calibration_pool_size",
    "check_calibration_pool",
    "edit_strengths",
    "pick_strength",
]


def pick_strength(table: Sequence[Mapping[str, float]], target: float) -> tuple[float, bool]:
    """The calibration rule: the smallest strength whose success reaches ``target``.

    Parameters
    ----------
    table : sequence of mappings
        ``{"strength", "success"}`` rows, any order.
    target : float

    Returns
    -------
    strength : float
        The smallest strength reaching ``target``; if none does, the one with the
        highest success (the smallest among ties).
    reached : bool
    """
    rows = sorted(table, key=lambda r: r["strength"])
    for r in rows:
        if r["success"] >= target:
            return float(r["strength"]), True
    top = max(r["success"] for r in rows)
    return float(next(r["strength"] for r in rows if r["success"] == top)), False


def edit_strengths(s: EvalSettings) -> list[float]:
    """Strengths of the sweep and of the calibration, sorted (the fixed strength included)."""
    return sorted({float(x) for x in s.edit_sweep} | {float(s.edit_strength)})


def check_calibration_pool(s: EvalSettings, n_heldout_available: int) -> None:
    """One clear error for an unknown pool or a held-out pool overlapping the evaluated set."""
    if s.edit_calibration_pool not in ("zoo", "heldout"):
        raise W2WError(
            f"edit_calibration_pool must be 'zoo' or 'heldout', got {s.edit_calibration_pool!r}",
            key="edit_calibration_pool",
        )
    if s.edit_calibration_pool == "heldout" and (
        s.edit_calibration_identities < 1 or s.n_heldout >= n_heldout_available
    ):
        raise W2WError(
            f"edit_calibration_pool='heldout' needs held-out identities beyond the "
            f"{s.n_heldout} evaluated (the world has {n_heldout_available}): evaluate fewer "
            f'or calibrate on the zoo (`edit_calibration_pool="zoo"`)',
            key="edit_calibration_identities",
        )


def calibration_pool_size(s: EvalSettings, n_heldout_available: int) -> int:
    """Held-out identities of the calibration pool: the last ones, never evaluated."""
    return min(int(s.edit_calibration_identities), n_heldout_available - s.n_heldout)


def calibrate_strength(
    ev: EvalContext, attr: str, others: list[str], col: int | None
) -> dict[str, Any] | None:
    """Strength of ``attr``'s edits, chosen on models lacking the attribute.

    The models are zoo models or held-out calibration models
    (``EvalSettings.edit_calibration_pool``). Returns ``None`` when it cannot be
    calibrated (calibration off, no classifier output for the attribute, or no
    model without it).
    """
    s, w, space = ev.s, ev.w, ev.space
    y = w.labels.get(attr)
    if s.edit_calibration <= 0 or col is None or y is None:
        return None
    rng = np.random.default_rng(s.seed + 17)
    if s.edit_calibration_pool == "heldout":
        excluded = excluded_by(w.labels, attr) if s.edit_plausible else {}
        cands = [
            (name, ad)
            for (inst, name, ad) in ev.calibration_models()
            if not inst.attributes.get(attr, False) and plausible(inst.attributes, excluded)
        ]
        if not cands:
            return None
        order = rng.permutation(len(cands))[: int(s.edit_calibration)]
        chosen = [cands[int(j)] for j in sorted(order)]
    else:
        keep = np.asarray(y) == 0
        if s.edit_plausible:
            for a, v in excluded_by(w.labels, attr).items():
                keep &= np.asarray(w.labels[a]) != v
        pool = np.flatnonzero(keep)
        if not len(pool):
            return None
        pick = rng.choice(pool, min(int(s.edit_calibration), len(pool)), replace=False)
        chosen = [(w.zoo_names[int(i)], w.zoo[int(i)]) for i in pick]
    from w2wkit.formats.registry import read_adapter

    strengths = edit_strengths(s)
    models, originals = [], []
    for _, ad in chosen:
        ad = read_adapter(ad) if isinstance(ad, (str, os.PathLike)) else ad
        models.append(ad)  # strength 0: the model itself
        models += [edit_disentangled(space, ad, attr, st, others)[0] for st in strengths]
        originals += [ad] * (1 + len(strengths))
    seeds = list(range(min(2, s.seeds)))
    if s.edit_inject_t is None:
        imgs = ev.render(models, seeds=seeds, desc=f"calibrate {attr}")
    else:  # calibrate the edits as they are measured: with delayed injection
        imgs = ev.render(
            originals,
            seeds=seeds,
            edited=models,
            inject_t=s.edit_inject_t,
            desc=f"calibrate {attr}",
        )
    imgs = imgs.reshape(len(chosen), 1 + len(strengths), -1, *imgs.shape[-3:])
    emb = unit(ev.embed(imgs))
    probs = w.evaluators.attribute_probs(to_uint8(imgs.reshape(-1, *imgs.shape[-3:])))[:, col]
    ok = (probs.reshape(imgs.shape[:3]) > 0.5).mean(axis=(0, 2))
    table = [
        {
            "strength": st,
            "success": float(ok[j + 1]),
            "id_score": float(np.sum(emb[:, j + 1] * emb[:, 0], axis=-1).mean()),
        }
        for j, st in enumerate(strengths)
    ]
    best, reached = pick_strength(table, s.edit_target)
    return {
        "strength": best,
        "reached_target": reached,
        "target": s.edit_target,
        "pool": s.edit_calibration_pool,
        "models": [name for name, _ in chosen],
        "seeds": len(seeds),
        "table": table,
    }
