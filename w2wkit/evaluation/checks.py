"""The evaluation's targets (issue 5) checked on the measured numbers."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_targets"]


def check_targets(r: dict[str, Any]) -> dict[str, Any]:
    """Targets of the issue, evaluated on the measured numbers (never relaxed).

    Parameters
    ----------
    r : dict
        The results so far (sections that did not run are skipped).

    Returns
    -------
    dict
        ``name -> {"value", "target", "pass"}``.
    """
    out: dict[str, Any] = {}
    inv = r.get("inversion")
    if inv:
        w2w = inv["w2w"]["id_score"]["mean"]
        multi = inv["dreambooth_multi"]["id_score"]["mean"]
        single = inv["dreambooth_single"]["id_score"]["mean"]
        out["inversion_w2w_ge_0.93_multi"] = {
            "value": w2w / multi if multi and multi > 0 else None,
            "target": 0.93,
            "pass": bool(multi and w2w >= 0.93 * multi),
        }
        out["inversion_w2w_above_single"] = {
            "value": w2w - single,
            "target": "> 0",
            "pass": bool(w2w > single),
        }
    ed = r.get("editing")
    if ed:
        o = ed["overall"]
        succ = o["w2w"]["success"]["mean"]
        out["editing_success_ge_0.8"] = {"value": succ, "target": 0.8, "pass": bool(succ >= 0.8)}
        out["editing_id_above_prompting"] = {
            "value": o["w2w"]["id_score"]["mean"] - o["prompting"]["id_score"]["mean"],
            "target": "> 0",
            "pass": bool(o["w2w"]["id_score"]["mean"] > o["prompting"]["id_score"]["mean"]),
        }
    # the fidelity section keys its numbers by the evaluated concept
    fid = next((v for v in r.get("fidelity", {}).values() if isinstance(v, dict)), None)
    if fid:
        out["zoo_fidelity_top1_ge_0.8"] = {
            "value": fid["top1"],
            "target": 0.8,
            "pass": bool(fid["top1"] >= 0.8),
        }
    smp = r.get("sampling")
    if smp:
        a, b = smp["intra_model_id"]["mean"], smp["inter_model_id"]["mean"]
        out["sampling_intra_above_inter"] = {
            "value": a - b if math.isfinite(a) and math.isfinite(b) else None,
            "target": "> 0",
            "pass": bool(a > b),
        }
    return out
