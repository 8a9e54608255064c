"""Figures of the evaluation's results (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_plots"]


def write_plots(results: dict[str, Any], space: Any, out: Path) -> dict[str, Path]:
    """matplotlib figures of the results (PNG): explained variance, bars, scaling.

    Parameters
    ----------
    results : dict
        The results so far (a figure per finished section that has one).
    space : WeightSpace or None
        Unused; kept for callers that pass the fitted space.
    out : pathlib.Path
        Figures go to ``out/plots/<key>.png``.

    Returns
    -------
    dict of str to pathlib.Path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, Path] = {}
    (out / "plots").mkdir(parents=True, exist_ok=True)

    def save(fig: Any, key: str) -> None:
        path = out / "plots" / f"{key}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        plots[key] = path

    sp = results.get("space")
    if sp:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        cum = np.asarray(sp["cumulative"])
        ax.plot(np.arange(1, len(cum) + 1), cum, marker="." if len(cum) < 40 else None)
        ax.set_xlabel("components")
        ax.set_ylabel("cumulative explained variance")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"space of {sp['n_models']} models")
        ax.grid(alpha=0.3)
        save(fig, "explained_variance")
    inv = results.get("inversion")
    if inv:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        names = ["w2w", "dreambooth_single", "dreambooth_multi"]
        m = [inv[n]["id_score"]["mean"] for n in names]
        e = [inv[n]["id_score"]["std"] for n in names]
        ax.bar(
            ["w2w (1 img)", "DreamBooth (1 img)", "DreamBooth (multi)"],
            m,
            yerr=e,
            capsize=4,
            color=["C0", "C1", "C2"],
        )
        ref = inv["reference"]["real_same_identity"]["mean"]
        if ref is not None and math.isfinite(ref):
            ax.axhline(ref, color="k", ls="--", lw=1, label="real, same identity")
            ax.legend(fontsize=8)
        ax.set_ylabel("ID score")
        ax.set_title("inversion")
        save(fig, "inversion")
    ed = results.get("editing")
    if ed and ed["attributes"]:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        attrs = list(ed["attributes"])
        x = np.arange(len(attrs))
        for j, (key, label) in enumerate(
            (("id_score", "ID score to unedited"), ("success", "attribute success"))
        ):
            for q, meth in enumerate(("w2w", "prompting", "undisentangled")):
                vals = [ed["attributes"][a][meth][key]["mean"] for a in attrs]
                vals = [v if v is not None else np.nan for v in vals]
                axes[j].bar(x + (q - 1) * 0.27, vals, 0.27, label=meth)
            axes[j].set_xticks(x, attrs)
            axes[j].set_title(label)
        axes[0].legend(fontsize=8)
        save(fig, "editing")
        if ed.get("sweep"):
            fig, ax = plt.subplots(figsize=(4.5, 3.4))
            sw = ed["sweep"]
            ax.plot(
                [r["id_score"]["mean"] for r in sw],
                [r["success"]["mean"] for r in sw],
                marker="o",
                label="w2w (strength sweep)",
            )
            for r in sw:
                ax.annotate(
                    f"{r['strength']:g}", (r["id_score"]["mean"], r["success"]["mean"]), fontsize=7
                )
            o = ed["overall"]
            for meth, mk in (("prompting", "s"), ("undisentangled", "^")):
                ax.scatter(
                    o[meth]["id_score"]["mean"], o[meth]["success"]["mean"], marker=mk, label=meth
                )
            ax.set_xlabel("ID score to unedited")
            ax.set_ylabel("attribute success")
            ax.legend(fontsize=7)
            save(fig, "editing_tradeoff")
    sc = results.get("scaling")
    if sc and sc["rows"]:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        n = [r["n_models"] for r in sc["rows"]]
        axes[0].errorbar(
            n,
            [r["inversion_id"]["mean"] for r in sc["rows"]],
            yerr=[r["inversion_id"]["std"] for r in sc["rows"]],
            marker="o",
        )
        axes[0].set_xscale("log")
        axes[0].set_xlabel("models in the space")
        axes[0].set_title("inversion ID score")
        axes[1].plot(
            n, [r["direction_abs_cos_edit_attributes"]["mean"] for r in sc["rows"]], marker="o"
        )
        axes[1].set_xscale("log")
        axes[1].set_xlabel("models in the space")
        axes[1].set_title("mean |cos| between directions")
        save(fig, "scaling")
    if sc and sc.get("components_rows"):
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        kr = sc["components_rows"]
        ax.errorbar(
            [r["components"] for r in kr],
            [r["inversion_id"]["mean"] for r in kr],
            yerr=[r["inversion_id"]["std"] for r in kr],
            marker="o",
        )
        ax.set_xscale("log")
        ax.set_xlabel("optimised components k")
        ax.set_ylabel("inversion ID score")
        save(fig, "inversion_components")
    return plots
