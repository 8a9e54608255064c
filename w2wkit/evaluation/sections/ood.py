"""Section "ood": inversion of stylised pictures (w2w vs single-image DreamBooth)."""

from __future__ import annotations

from typing import Any

import numpy as np

from w2wkit.evaluation.context import EvalContext
from w2wkit.evaluation.metrics import id_score, summarize
from w2wkit.evaluation.stylise import stylise

__all__ = ["run"]


def run(ev: EvalContext) -> dict[str, Any]:
    """Invert stylised pictures of held-out identities (one per style and identity).

    Parameters
    ----------
    ev : EvalContext
        With ``space_inv`` and ``heldout``.

    Returns
    -------
    dict
        ``styles -> method -> {"id_score", "seconds"}``, the recipe.
    """
    s, space = ev.s, ev.space_inv
    res: dict[str, Any] = {"styles": {}}
    heldout = ev.heldout[: s.ood_heldout]
    grid, rows = [], []
    refs = [ev.embed(ev.real(inst, s.n_eval_images, seed=s.seed + 99)) for inst in heldout]
    for style in s.styles:
        vals: dict[str, dict[str, list[float]]] = {
            m: {"id": [], "seconds": []} for m in ("w2w", "dreambooth_single")
        }
        inputs = stylise(
            np.concatenate([ev.real(inst, 1, seed=s.seed + 5) for inst in heldout]), style
        )
        coefs, sec_w2w, inv = ev.invert(space, inputs, ood=True, seed=s.seed + 50)
        res["components"] = inv.settings["n_components"]
        res["recipe"] = {k_: inv.settings[k_] for k_ in ("n_components", "lr", "steps")}
        models, secs = list(space.inverse_transform(coefs)), []
        for i in range(len(inputs)):
            single, sec = ev.models.dreambooth(
                inputs[i : i + 1], ev.w.instance_prompt, seed=s.seed * 23 + i
            )
            models.append(single)
            secs.append(sec)
        n = len(inputs)
        imgs_all = ev.render(models, desc=f"rendering {style}")
        for i in range(n):
            imgs = imgs_all[[i, n + i]]
            for m, name in enumerate(vals):
                vals[name]["id"].append(id_score(ev.embed(imgs[m, 0]), refs[i]))
            vals["w2w"]["seconds"].append(sec_w2w)
            vals["dreambooth_single"]["seconds"].append(secs[i])
            if i == 0:
                img = inputs[:1]
                grid.append(
                    np.concatenate([img / 255.0, imgs[:, 0, :2].reshape(-1, *img.shape[1:])])[None]
                )
                rows.append(style)
        res["styles"][style] = {
            m: {"id_score": summarize(v["id"]), "seconds": summarize(v["seconds"])}
            for m, v in vals.items()
        }
    if grid:
        n = grid[0].shape[1] - 1
        ev.save_grid(
            "ood",
            np.concatenate(grid),
            rows,
            ["input"]
            + [f"w2w s{j}" for j in range(n // 2)]
            + [f"DB-1 s{j}" for j in range(n // 2)],
        )
    return res
