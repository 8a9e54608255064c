"""Section "inversion": w2w from one picture vs DreamBooth on one and on several pictures.

ID score of each inverted model's renders against *other* renders of the
held-out identity, and wall time; real renders of the same and of other
identities give the upper reference and chance.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from w2wkit.evaluation.context import EvalContext
from w2wkit.evaluation.metrics import id_matrix, id_score, summarize

__all__ = ["run"]


def run(ev: EvalContext) -> dict[str, Any]:
    """Invert one picture of each held-out identity and compare with the baselines.

    Parameters
    ----------
    ev : EvalContext
        With ``space_inv``, ``heldout`` and their multi-image models ``multi``.

    Returns
    -------
    dict
        Per method (``w2w``, ``dreambooth_single``, ``dreambooth_multi``): ID
        score, seconds and per-identity scores; the references, the recipe, the
        loss at the start and end, and the ratio of w2w to multi-image DreamBooth.
    """
    s = ev.s
    space = ev.space_inv
    methods: dict[str, dict[str, list[float]]] = {
        m: {"id": [], "seconds": []} for m in ("w2w", "dreambooth_single", "dreambooth_multi")
    }
    real_same, real_other = [], []
    grid_rows, grid = [], []
    refs = [ev.embed(ev.real(inst, s.n_eval_images, seed=s.seed + 99)) for inst in ev.heldout]
    inputs = np.concatenate([ev.real(inst, 1, seed=s.seed + 5) for inst in ev.heldout])
    ev.say(f"w2w inversion of {len(inputs)} pictures (one batch)")
    coefs, sec_w2w, inv = ev.invert(space, inputs, seed=s.seed)
    w2w_models = space.inverse_transform(coefs)
    singles, sec_single = [], []
    cb = ev.task("DreamBooth (single image)", len(inputs))
    for i in range(len(inputs)):
        ad, sec = ev.models.dreambooth(
            inputs[i : i + 1], ev.w.instance_prompt, seed=s.seed * 17 + i
        )
        singles.append(ad)
        sec_single.append(sec)
        cb(i + 1, len(inputs))
    n = len(inputs)
    imgs_all = ev.render([*w2w_models, *singles, *ev.multi[:n]], desc="rendering inversions")
    for i, inst in enumerate(ev.heldout):
        img = inputs[i : i + 1]
        imgs = imgs_all[[i, n + i, 2 * n + i]]
        secs = [sec_w2w, sec_single[i], ev.multi_seconds[i]]
        for m, name in enumerate(methods):
            e = ev.embed(imgs[m, 0])
            methods[name]["id"].append(id_score(e, refs[i]))
            methods[name]["seconds"].append(secs[m])
        real_same.append(
            float(id_matrix(refs[i], refs[i])[np.triu_indices(len(refs[i]), 1)].mean())
            if len(refs[i]) > 1
            else float("nan")
        )
        others = [refs[j] for j in range(len(refs)) if j != i]
        if others:
            real_other.append(id_score(refs[i], np.concatenate(others)))
        if i < 4:
            grid.append(
                np.concatenate(
                    [img / 255.0, imgs[:, 0, : min(3, s.seeds)].reshape(-1, *img.shape[1:])]
                )[None]
            )
            grid_rows.append(f"identity {inst.index}")
    results_losses = inv.losses[0][np.isfinite(inv.losses[0])]
    if grid:
        cols = ["input"] + [
            f"{m} s{j}" for m in ("w2w", "DB-1", "DB-multi") for j in range(min(3, s.seeds))
        ]
        ev.save_grid("inversion", np.concatenate(grid), grid_rows, cols)
    out = {
        name: {
            "id_score": summarize(v["id"]),
            "seconds": summarize(v["seconds"]),
            "per_identity": v["id"],
        }
        for name, v in methods.items()
    }
    out["reference"] = {
        "real_same_identity": summarize(real_same),
        "real_other_identities": summarize(real_other),
        "note": "ID score between real renders of the same identity (upper reference) "
        "and of different identities (chance level)",
    }
    out["components"] = inv.settings["n_components"]
    out["recipe"] = {
        k_: inv.settings[k_] for k_ in ("n_components", "lr", "steps", "early_stopping")
    }
    out["steps_run"] = summarize(inv.steps_run)
    out["w2w_seconds_note"] = f"batch of {n} pictures; seconds per picture = batch time / {n}"
    out["loss_first_last"] = [
        float(results_losses[: max(1, len(results_losses) // 10)].mean()),
        float(results_losses[-max(1, len(results_losses) // 10) :].mean()),
    ]
    multi = out["dreambooth_multi"]["id_score"]["mean"]
    out["ratio_w2w_to_multi"] = out["w2w"]["id_score"]["mean"] / multi if multi else float("nan")
    return out
