"""Section "editing": calibrated w2w edits vs prompting vs the undisentangled direction.

For each edited attribute and each held-out identity that lacks it (and may
plausibly have it): ID score to the unedited model's renders (same seeds),
attribute success, pixel RMSE; a strength sweep; and the perfect edit
(:func:`w2wkit.world.oracle.edit_oracle`) as the ceiling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from w2wkit.evaluation.calibration import calibrate_strength, edit_strengths
from w2wkit.evaluation.context import EvalContext
from w2wkit.evaluation.edit_rules import (
    correlated_attributes,
    edit_disentangled,
    excluded_by,
    plausible,
)
from w2wkit.evaluation.metrics import pixel_rmse, summarize, to_uint8, unit
from w2wkit.world.oracle import edit_oracle

__all__ = ["run"]


def run(ev: EvalContext) -> dict[str, Any]:
    """Edit the held-out identities' models along at least three attributes.

    Parameters
    ----------
    ev : EvalContext
        With ``space`` (and its directions), ``heldout`` and ``multi``.

    Returns
    -------
    dict
        Per attribute and overall, per method (``w2w``, ``prompting``,
        ``undisentangled``): ID score, success, pixel RMSE; the calibration,
        the plausibility rule, the oracle and the strength sweep.
    """
    s, w, space = ev.s, ev.w, ev.space
    specs = {a.name: a for a in w.pack.attributes}
    attrs = [a for a in s.edit_attributes if a in space.directions_]
    if len(attrs) < 3:
        attrs += [a for a in space.directions_ if a not in attrs][: 3 - len(attrs)]
    from w2wkit.baselines import edit_prompt, edit_undisentangled

    ev_attrs = list(w.evaluators.attributes)
    res: dict[str, Any] = {
        "attributes": {},
        "strength": s.edit_strength,
        "calibrated": s.edit_calibration > 0,
        "target": s.edit_target,
        "inject_t": s.edit_inject_t,
    }
    pooled: dict[str, dict[str, list[float]]] = {
        m: {"id": [], "success": [], "rmse": []} for m in ("w2w", "prompting", "undisentangled")
    }
    grid, rows = [], []
    sweep: dict[float, dict[str, list[float]]] = {}
    for attr in attrs:
        others = correlated_attributes(
            w.labels, attr, s.disentangle_threshold, list(space.directions_)
        )
        col = ev_attrs.index(attr) if attr in ev_attrs else None
        per: dict[str, dict[str, list[float]]] = {
            m: {"id": [], "success": [], "rmse": []} for m in pooled
        }
        calib = calibrate_strength(ev, attr, others, col)
        strength = calib["strength"] if calib else float(s.edit_strength)
        strengths = edit_strengths(s)  # the calibrated strength is one of them
        excluded = excluded_by(w.labels, attr) if s.edit_plausible else {}
        skipped = 0
        edited_insts = []
        for i, inst in enumerate(ev.heldout):
            if inst.attributes.get(attr, False):
                continue  # edits add the attribute; identities that have it are skipped
            if not plausible(inst.attributes, excluded):
                skipped += 1
                continue
            edited_insts.append(inst)
            base = ev.multi[i]
            sweep_models = []
            for st in strengths:
                ad, others = edit_disentangled(space, base, attr, st, others)
                sweep_models.append(ad)
            und = edit_undisentangled(space, base, attr, strength)
            prompt = (
                edit_prompt(specs[attr], w.pack.instance_prompt)
                if attr in specs
                else f"{ev.prompt} {attr}"
            )
            plain = ev.render([base, und], desc=f"edit {attr} {i + 1}")
            # the sweep is rendered as the headline edit is: with delayed injection when set
            if s.edit_inject_t is not None:
                kw = {"edited": sweep_models, "inject_t": s.edit_inject_t}
                swept = ev.render([base] * len(sweep_models), **kw, desc="edit (delayed)")
            else:
                swept = ev.render(sweep_models, desc=f"edit {attr} sweep")
            edited = swept[strengths.index(strength) :][:1]
            prompted = ev.render([base], prompts=[prompt], desc=f"edit {attr} prompt")
            e_base = ev.embed(plain[0, 0])
            for j, st in enumerate(strengths):
                imgs_s = swept[j, 0]
                e = ev.embed(imgs_s)
                cell = sweep.setdefault(st, {"id": [], "success": []})
                cell["id"].append(float(np.sum(unit(e) * unit(e_base), axis=1).mean()))
                if col is not None:
                    pr = w.evaluators.attribute_probs(to_uint8(imgs_s))[:, col]
                    cell["success"].append(float((pr > 0.5).mean()))
            ref = plain[0, 0]
            e_ref = ev.embed(ref)
            for name, imgs in (
                ("w2w", edited[0, 0]),
                ("prompting", prompted[0, 0]),
                ("undisentangled", plain[1, 0]),
            ):
                e = ev.embed(imgs)
                ids = np.sum(unit(e) * unit(e_ref), axis=1)  # same seed pairs
                per[name]["id"].append(float(ids.mean()))
                if col is not None:
                    pr = w.evaluators.attribute_probs(to_uint8(imgs))[:, col]
                    per[name]["success"].append(float((pr > 0.5).mean()))
                per[name]["rmse"].append(float(pixel_rmse(imgs, ref).mean()))
            if len(grid) < 6:
                grid.append(
                    np.stack([ref[0], edited[0, 0, 0], plain[1, 0, 0], prompted[0, 0, 0]])[None]
                )
                rows.append(f"{attr} id{inst.index}")
        res["attributes"][attr] = {
            "orthogonal_to": others,
            "strength": strength,
            "calibration": calib,
            "n_identities": len(per["w2w"]["id"]),
            "excluded_by": excluded,
            "n_implausible_skipped": skipped,
            "oracle": _oracle(ev, attr, edited_insts),
            **{
                m: {
                    "id_score": summarize(v["id"]),
                    "success": summarize(v["success"]),
                    "pixel_rmse": summarize(v["rmse"]),
                }
                for m, v in per.items()
            },
        }
        for m in pooled:
            for key in ("id", "success", "rmse"):
                pooled[m][key] += per[m][key]
    res["overall"] = {
        m: {
            "id_score": summarize(v["id"]),
            "success": summarize(v["success"]),
            "pixel_rmse": summarize(v["rmse"]),
        }
        for m, v in pooled.items()
    }
    res["distance"] = (
        "pixel RMSE in [0, 1] between the edited and the unedited model's renders at the same seed"
    )
    orc = [r["oracle"] for r in res["attributes"].values() if r["oracle"]["n"]]
    n_orc = sum(o["n"] for o in orc)
    res["overall"]["oracle"] = {
        "id_score": sum(o["id_score"] * o["n"] for o in orc) / n_orc if n_orc else float("nan"),
        "n": n_orc,
    }
    res["oracle"] = (
        "the held-out identity drawn by the generator with the attribute added (same "
        "nuisance); ID score against the same picture without it"
    )
    res["sweep"] = [
        {"strength": st, "id_score": summarize(v["id"]), "success": summarize(v["success"])}
        for st, v in sorted(sweep.items())
    ]
    if grid:
        ev.save_grid(
            "editing",
            np.concatenate(grid),
            rows,
            ["unedited", "w2w", "undisentangled", "prompting"],
        )
    return res


def _oracle(ev: EvalContext, attr: str, instances: Sequence[Any]) -> dict[str, float]:
    """:func:`edit_oracle` of one attribute on the edited held-out identities."""
    gen = getattr(ev.w, "generator", None)
    if gen is None or not instances:
        return {"id_score": float("nan"), "success": float("nan"), "n": 0}
    return edit_oracle(
        ev.w.evaluators,
        gen,
        instances,
        attr,
        n_images=ev.s.seeds,
        seed=ev.s.seed + 99,
        size=ev.w.image_size,
    )
