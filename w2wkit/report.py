"""A self-contained HTML report of an evaluation or a demo run.

The report links the PNG grids and plots that sit next to it (relative
paths), shows every number as ``mean +- std (n)`` in tables, and lists the
targets with their measured value and pass/fail. No JavaScript, no external
resources.
"""

from __future__ import annotations

import contextlib
import html
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ReportSnapshots",
    "fmt",
    "panel",
    "report_folder",
    "table",
    "write_html",
    "write_report",
]

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.pass{color:#17803d;font-weight:bold}.fail{color:#b42318;font-weight:bold}
img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd;margin:.3em 0}
.note{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 .2em}
.panel{display:flex;gap:1.2em;flex-wrap:wrap;margin:.8em 0 1.4em}
.panel figure{margin:0;flex:1 1 300px;max-width:340px}
.panel img{width:100%;margin:0}
.panel figcaption{font-size:.95em;line-height:1.35}.panel figcaption b{display:block}
"""


def fmt(v: Any, digits: int = 3) -> str:
    """Format a number, a ``{"mean", "std", "n"}`` summary or anything else."""
    if isinstance(v, Mapping) and "mean" in v:
        m, s = v.get("mean"), v.get("std")
        if m is None or (isinstance(m, float) and not math.isfinite(m)):
            return "-"
        n = v.get("n")
        text = f"{m:.{digits}f} &plusmn; {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"
        return text + (f" <span class=note>(n={n})</span>" if n is not None else "")
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.{digits}f}"
    if v is None:
        return "-"
    return html.escape(str(v))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table; cells go through :func:`fmt`."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def panel(figures: Sequence[tuple[str, str, str]]) -> str:
    """A row of figures to judge at a glance: ``(image path, title, caption)`` each.

    The caption is plain text (escaped); the title is shown in bold above it.
    """
    out = []
    for src, title, caption in figures:
        out.append(
            f'<figure><img src="{html.escape(src)}" alt="{html.escape(title)}">'
            f"<figcaption><b>{html.escape(title)}</b>{html.escape(caption)}</figcaption></figure>"
        )
    return f"<div class=panel>{''.join(out)}</div>"


# --------------------------------------------------------------------------- report folders


def _may_replace(final: Path, overwrite: bool) -> bool:
    """Whether the report folder ``final`` may be written (an empty folder may, always).

    Leftovers of killed writers are repaired first (:func:`w2wkit.atomic.recover`).
    """
    from w2wkit.atomic import recover
    from w2wkit.errors import OUTPUT_EXISTS, FormatError

    recover(final)
    if os.path.lexists(final) and not (final.is_dir() and not final.is_symlink()):
        raise FormatError("output exists and is not a folder", path=final)
    if not os.path.lexists(final) or overwrite:
        return overwrite
    if final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
        return True  # e.g. a folder made by mkdtemp: nothing to keep
    raise FormatError(OUTPUT_EXISTS, path=final)


@contextlib.contextmanager
def report_folder(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Write a whole report folder in a staging folder and publish it once.

    The caller writes every file of the report into the yielded (existing,
    empty) folder. When the block ends, the staging folder takes the name
    ``path`` in one step (an existing report is exchanged with it and then
    deleted, see :func:`w2wkit.atomic.atomic_path`): nothing of an old report
    survives, and a run that fails or is killed leaves the old report as it
    was; its staging folder is removed at once, or, after ``SIGKILL``, by the
    next write of ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The report folder.
    overwrite : bool
        Replace an existing, non-empty ``path`` (an empty folder is always
        replaced).

    Yields
    ------
    pathlib.Path
        The staging folder ``.NAME.w2wtmp-PID-TOKEN`` beside ``path``.

    Raises
    ------
    FormatError
        ``path`` exists, is not an empty folder, and ``overwrite`` is false.
    """
    from w2wkit.atomic import atomic_path

    final = Path(path)
    with atomic_path(final, overwrite=_may_replace(final, overwrite)) as tmp:
        tmp.mkdir()
        yield tmp


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class ReportSnapshots:
    """A report folder written over a long run and published after each part.

    Everything is written into a working folder (``.NAME.w2wtmp-PID-TOKEN``
    beside the report, removed by :meth:`close`, or after ``SIGKILL`` by the
    next write of the report). :meth:`publish` copies it into a fresh
    staging folder and swaps that in as a whole (:func:`report_folder`), so
    the report folder is at every moment a complete report: the old one, or
    the new one as of its last :meth:`publish` - never a mix, never a file
    of the old one beside the new.

    Parameters
    ----------
    path : str or os.PathLike
        The report folder.
    overwrite : bool
        Replace an existing, non-empty ``path`` (checked here, before any work).
    carry : sequence of str
        Entries of the existing ``path`` that are not part of the report but
        must stay (e.g. a world built in it that the run reads): each
        snapshot gets them as hard links (copies where links fail) of what
        the published folder holds.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, overwrite: bool = False, carry: Sequence[str] = ()
    ) -> None:
        from w2wkit.atomic import temp_path

        self.final = Path(path)
        self.carry = [c for c in carry if (self.final / c).exists()]
        _may_replace(self.final, overwrite)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.work = temp_path(self.final)
        self.work.mkdir()

    def publish(self) -> None:
        """Swap a copy of the working folder (and the carried entries) in as the report."""
        from w2wkit.atomic import atomic_path

        with atomic_path(self.final, overwrite=True) as tmp:
            shutil.copytree(self.work, tmp, symlinks=True)
            for name in self.carry:
                src, dst = self.final / name, tmp / name
                if src.is_dir() and not src.is_symlink():
                    shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(os.fspath(src), os.fspath(dst))

    def close(self) -> None:
        """Remove the working folder."""
        shutil.rmtree(self.work, ignore_errors=True)


def _img(rel: str | None, alt: str) -> str:
    if not rel:
        return ""
    return f'<p><img src="{html.escape(rel)}" alt="{html.escape(alt)}"></p>'


def write_html(path: str | os.PathLike[str], title: str, body: str) -> Path:
    """Write ``body`` inside a minimal HTML page, atomically."""
    from w2wkit.stio import atomic_path

    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    out = Path(path)
    with atomic_path(out, overwrite=True, suffix=".html") as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return out


def write_report(results: Mapping[str, Any], path: str | os.PathLike[str], title: str) -> Path:
    """The evaluation report (see :func:`w2wkit.evaluation.run_eval`)."""
    r = results
    imgs, plots = r.get("images", {}), r.get("plots", {})
    parts: list[str] = []
    w = r.get("world", {})
    parts.append(
        f"<p>World: <b>{fmt(w.get('name'))}</b>, {fmt(w.get('n_models'))} training models, "
        f"{fmt(w.get('n_heldout'))} held-out identities. Evaluators: {fmt(r.get('evaluators'))}. "
        f"Total time {fmt(r.get('seconds'), 1)} s. All numbers are mean &plusmn; std over "
        "held-out identities (or models) with n in brackets.</p>"
    )
    if not r.get("complete", True):
        parts.append(
            "<p class=fail>Partial run: the evaluation stopped before all sections finished; "
            "the sections below are complete.</p>"
        )
    checks = r.get("checks", {})
    if checks:
        rows = []
        for name, c in checks.items():
            ok = c.get("pass")
            mark = f"<span class={'pass' if ok else 'fail'}>{'pass' if ok else 'miss'}</span>"
            rows.append(
                f"<tr><td>{html.escape(name)}</td><td>{fmt(c.get('value'))}</td>"
                f"<td>{fmt(c.get('target'))}</td><td>{mark}</td></tr>"
            )
        parts.append(
            "<h2>Targets</h2><table><tr><th>check</th><th>measured</th><th>target</th>"
            f"<th></th></tr>{''.join(rows)}</table>"
        )
    sp = r.get("space")
    if sp:
        parts.append("<h2>The space</h2>")
        parts.append(
            table(
                ["models", "components", "components for 50% / 80% / 90% of the variance"],
                [
                    [
                        sp["n_models"],
                        sp["n_components"],
                        " / ".join(str(v) for v in sp["components_for"].values()),
                    ]
                ],
            )
        )
        if sp.get("directions"):
            parts.append(
                table(
                    ["direction", "method", "cross-validated accuracy"],
                    [[k, v["method"], v["score"]] for k, v in sp["directions"].items()],
                )
            )
        parts.append(_img(plots.get("explained_variance"), "explained variance"))
    inv = r.get("inversion")
    if inv:
        parts.append("<h2>Inversion</h2>")
        parts.append(
            "<p class=note>ID score of the model's renders against other renders of the held-out "
            f"identity (new poses and lighting); w2w uses {inv['components']} components.</p>"
        )
        rows = [
            [label, inv[k]["id_score"], inv[k]["seconds"]]
            for k, label in (
                ("w2w", "w2w, 1 image"),
                ("dreambooth_single", "DreamBooth LoRA, 1 image"),
                ("dreambooth_multi", "DreamBooth LoRA, multi-image"),
            )
        ]
        ref = inv["reference"]
        rows.append(["real renders, same identity", ref["real_same_identity"], None])
        rows.append(["real renders, other identities", ref["real_other_identities"], None])
        parts.append(table(["method", "ID score", "seconds"], rows))
        parts.append(_img(plots.get("inversion"), "inversion"))
        parts.append(_img(imgs.get("inversion"), "inversion grid"))
    ed = r.get("editing")
    if ed:
        parts.append("<h2>Editing</h2>")
        strengths = ", ".join(
            f"{html.escape(a)} {fmt(v.get('strength', ed['strength']))}"
            for a, v in ed["attributes"].items()
        )
        how = (
            f"calibrated on zoo models (smallest strength reaching {fmt(ed['target'])} success)"
            if ed.get("calibrated")
            else "fixed"
        )
        parts.append(
            f"<p class=note>Strengths ({how}; training standard deviations): {strengths}; "
            "the undisentangled direction uses the same strength; "
            "success = the attribute classifier sees the attribute on the edited renders "
            "(identities that lacked it); "
            f"distance: {html.escape(ed['distance'])}.</p>"
        )
        rules = [
            f"{html.escape(a)}: not on models with "
            + " or ".join(f"{html.escape(k)}={int(x)}" for k, x in v["excluded_by"].items())
            + f" ({v.get('n_implausible_skipped', 0)} held-out identities skipped)"
            for a, v in ed["attributes"].items()
            if v.get("excluded_by")
        ]
        if rules:
            parts.append(
                "<p class=note>Edits are made where the zoo shows the attribute at all "
                "(calibration and held-out identities): " + "; ".join(rules) + ".</p>"
            )
        rows = []
        for a, v in ed["attributes"].items():
            for m in ("w2w", "prompting", "undisentangled"):
                rows.append([f"{a} ({m})", v[m]["id_score"], v[m]["success"], v[m]["pixel_rmse"]])
            orc = v.get("oracle")
            if orc and orc.get("n"):
                rows.append([f"{a} (perfect edit)", orc["id_score"], orc["success"], None])
        for m in ("w2w", "prompting", "undisentangled"):
            o = ed["overall"][m]
            rows.append([f"all ({m})", o["id_score"], o["success"], o["pixel_rmse"]])
        if ed["overall"].get("oracle", {}).get("n"):
            rows.append(["all (perfect edit)", ed["overall"]["oracle"]["id_score"], None, None])
            parts.append(
                "<p class=note>Perfect edit: "
                + html.escape(ed.get("oracle", ""))
                + " - the ceiling of the ID score of a successful edit under these evaluators."
                "</p>"
            )
        parts.append(
            table(
                ["edit (method)", "ID score to unedited", "attribute success", "pixel RMSE"], rows
            )
        )
        calib = [(a, v["calibration"]) for a, v in ed["attributes"].items() if v.get("calibration")]
        if calib:
            parts.append(
                table(
                    ["calibration (zoo models)", "strength", "success", "ID score to unedited"],
                    [
                        [
                            f"{a}{' (chosen)' if x['strength'] == c['strength'] else ''}",
                            x["strength"],
                            x["success"],
                            x["id_score"],
                        ]
                        for a, c in calib
                        for x in c["table"]
                    ],
                )
            )
        if ed.get("sweep"):
            parts.append(
                table(
                    ["w2w strength (std)", "ID score to unedited", "attribute success"],
                    [[x["strength"], x["id_score"], x["success"]] for x in ed["sweep"]],
                )
            )
        parts.append(_img(plots.get("editing"), "editing"))
        parts.append(_img(plots.get("editing_tradeoff"), "editing trade-off"))
        parts.append(_img(imgs.get("editing"), "editing grid"))
    ood = r.get("ood")
    if ood:
        parts.append("<h2>Out-of-distribution inputs</h2>")
        rows = [
            [st, v["w2w"]["id_score"], v["dreambooth_single"]["id_score"], v["w2w"]["seconds"]]
            for st, v in ood["styles"].items()
        ]
        parts.append(table(["style", "w2w ID", "DreamBooth (1 image) ID", "w2w seconds"], rows))
        parts.append(_img(imgs.get("ood"), "ood grid"))
    smp = r.get("sampling")
    if smp:
        parts.append("<h2>Sampling</h2>")
        parts.append(
            table(
                [
                    "samples",
                    "intra-model ID (across seeds)",
                    "inter-model ID",
                    "nearest training cosine",
                    "relative distance to nearest",
                    "ID to nearest training model",
                ],
                [
                    [
                        smp["n_samples"],
                        smp["intra_model_id"],
                        smp["inter_model_id"],
                        smp["nearest_training_cosine"],
                        smp["nearest_training_relative_distance"],
                        smp["nearest_training_id"],
                    ]
                ],
            )
        )
        parts.append(_img(imgs.get("sampling"), "samples"))
    sc = r.get("scaling")
    if sc and sc.get("rows"):
        parts.append("<h2>Scaling</h2>")
        parts.append(
            table(
                [
                    "models",
                    "components",
                    "inversion ID",
                    "mean |cos| (edit attributes)",
                    "mean |cos| (all)",
                ],
                [
                    [
                        x["n_models"],
                        x["n_components"],
                        x["inversion_id"],
                        x["direction_abs_cos_edit_attributes"],
                        x["direction_abs_cos_all"],
                    ]
                    for x in sc["rows"]
                ],
            )
        )
        parts.append(_img(plots.get("scaling"), "scaling"))
    if sc and sc.get("components_rows"):
        parts.append("<h3>Inversion vs number of optimised components</h3>")
        parts.append(
            table(
                ["components k", "inversion ID"],
                [[x["components"], x["inversion_id"]] for x in sc["components_rows"]],
            )
        )
        parts.append(_img(plots.get("inversion_components"), "inversion vs components"))
    fid = r.get("fidelity")
    if fid:
        parts.append("<h2>Zoo fidelity</h2>")
        rows = [
            [concept, f["n_candidates"], f["top1"], f["chance"], f["target"]]
            for concept, f in fid.items()
            if isinstance(f, dict) and "top1" in f
        ]
        if rows:
            parts.append(
                table(["concept", "candidates", "top-1 identification", "chance", "target"], rows)
            )
        else:
            parts.append(f"<p>{fmt(fid.get('skipped'))}</p>")
    return write_html(path, title, "\n".join(parts))
