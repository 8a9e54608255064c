"""The evaluation run: fit the spaces, run the sections, publish the report after each.

:func:`run_eval` is the entry point (``w2wkit eval``); every section lives in
its own module of :mod:`w2wkit.evaluation.sections` and is called as
``module.run(context)``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from w2wkit.errors import W2WError
from w2wkit.evaluation.calibration import check_calibration_pool
from w2wkit.evaluation.checks import check_targets
from w2wkit.evaluation.context import EvalContext, fit_space
from w2wkit.evaluation.metrics import summarize
from w2wkit.evaluation.plots import write_plots
from w2wkit.evaluation.progress import progress_bar
from w2wkit.evaluation.sections import (
    editing,
    fidelity,
    inversion,
    ood,
    sampling,
    scaling,
)
from w2wkit.evaluation.sections import space as space_section
from w2wkit.evaluation.settings import PROFILES, EvalSettings
from w2wkit.evaluation.worlds import EvalWorld
from w2wkit.render import resolve_device

__all__ = ["SECTIONS", "run_eval", "train_heldout_models"]

#: The sections of a run, in the order ``results.json`` lists them.
SECTIONS = ("space", "editing", "inversion", "ood", "sampling", "scaling", "fidelity")


def run_eval(
    world: EvalWorld,
    settings: EvalSettings | str = "quick",
    out_dir: str | os.PathLike[str] = "w2w-eval",
    *,
    sections: Sequence[str] = SECTIONS,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the evaluation and write ``results.json``, ``report.html`` and images.

    Parameters
    ----------
    world : EvalWorld
        From :func:`load_eval_world`.
    settings : EvalSettings or str
        Settings or a name in :data:`PROFILES`.
    out_dir : path
        Output folder (created; an existing non-empty one needs ``overwrite``).
    sections : sequence of str
        Which parts to run.
    progress : bool
        rich progress bars.
    overwrite : bool
        Replace an existing, non-empty ``out_dir``.

    Returns
    -------
    dict
        The results (also in ``results.json``).

    Notes
    -----
    The report is written in a working folder and published as a whole
    (:class:`w2wkit.report.ReportSnapshots`) after the space and after every
    section, marked partial until the last: ``out_dir`` always holds one
    complete report - the old one, or the new one as of its last finished
    section (a run stopped early keeps its finished sections) - and nothing
    of the old report survives the first publication. A world that lives
    inside ``out_dir`` (``w2wkit eval --world micro`` builds one in
    ``out_dir/micro-world``) is kept in every publication.
    """
    import torch

    if isinstance(settings, str) and settings not in PROFILES:
        raise W2WError(f"unknown profile {settings!r}; use {', '.join(PROFILES)}", key="profile")
    s = PROFILES[settings] if isinstance(settings, str) else settings
    if "editing" in sections:
        check_calibration_pool(s, len(world.heldout))
    from w2wkit.report import ReportSnapshots

    out = Path(out_dir)
    report = ReportSnapshots(out, overwrite=overwrite, carry=_world_entries(world, out))
    torch.manual_seed(s.seed)
    threads = torch.get_num_threads()
    if resolve_device(s.device) == "cpu" and s.threads:
        torch.set_num_threads(int(s.threads))
    try:
        return _run_eval(world, s, report, sections, progress)
    finally:
        torch.set_num_threads(threads)
        report.close()


def _world_entries(world: EvalWorld, out: Path) -> list[str]:
    """Entries of ``out`` that hold the world's own files (a world built in the output)."""
    try:
        root = out.resolve()
    except OSError:
        return []
    names = []
    for p in [world.base, *[z for z in world.zoo if isinstance(z, (str, os.PathLike))]]:
        try:
            rel = Path(p).resolve().relative_to(root)
        except (ValueError, OSError, TypeError):
            continue
        if rel.parts and rel.parts[0] not in names:
            names.append(rel.parts[0])
    return names


def _run_eval(
    world: EvalWorld,
    s: EvalSettings,
    report: Any,
    sections: Sequence[str],
    progress: bool,
) -> dict[str, Any]:
    out = report.work
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "world": {"name": world.name, **_json_safe(world.info), "n_heldout": len(world.heldout)},
        "settings": _json_safe(asdict(s)),
        "evaluators": getattr(world.evaluators, "name", ""),
        "targets": {
            "inversion": "w2w single-image ID >= 0.93x multi-image DreamBooth "
            "and clearly above single-image DreamBooth",
            "editing": ">= 80% attribute success with a higher ID score than prompting",
        },
    }
    from w2wkit.report import write_report

    title = f"w2wkit evaluation - {world.name}"

    def publish(ev: EvalContext, complete: bool) -> None:
        """Write results.json and report.html (after every section: a long run leaves
        its finished sections behind if it is stopped)."""
        results["complete"] = complete
        results["checks"] = check_targets(results)
        results["seconds"] = time.perf_counter() - t_start
        results["images"] = {k: str(p.relative_to(out)) for k, p in ev.images.items()}
        results["plots"] = {
            k: str(p.relative_to(out)) for k, p in write_plots(results, ev.space, out).items()
        }
        _write_json(out / "results.json", results)
        write_report(results, out / "report.html", title=title)
        report.publish()

    with progress_bar(progress) as bar:
        ev = EvalContext(world, s, out, bar)
        ev.say(f"fitting the space on {len(world.zoo)} models")
        t0 = time.perf_counter()
        space = fit_space(world.zoo, world.zoo_names, s.n_components, world.labels)
        ev.space = space
        results["space"] = space_section.run(ev, space, time.perf_counter() - t0)
        ev.space_inv = space
        k_inv = min(int(s.inversion_space_components), len(world.zoo) - 1)
        if k_inv > space.n_components_ and any(
            x in sections for x in ("inversion", "ood", "scaling")
        ):
            ev.say(f"fitting the inversion space ({k_inv} components)")
            ev.space_inv = fit_space(world.zoo, world.zoo_names, k_inv, {})
        results["space"]["inversion_components"] = int(ev.space_inv.n_components_)
        publish(ev, False)
        heldout = world.heldout[: s.n_heldout]
        ev.heldout = heldout
        if any(x in sections for x in ("editing", "inversion")):
            results["heldout_models"] = train_heldout_models(ev, heldout)
        for name, module in (
            ("inversion", inversion),
            ("editing", editing),
            ("ood", ood),
            ("sampling", sampling),
            ("scaling", scaling),
            ("fidelity", fidelity),
        ):
            if name in sections:
                ev.say(f"section: {name}")
                t0 = time.perf_counter()
                results[name] = module.run(ev)
                results[name]["seconds"] = time.perf_counter() - t0
                publish(ev, False)
    publish(ev, True)
    return results


def _write_json(path: Path, obj: Any) -> None:
    from w2wkit.stio import write_json

    write_json(path, obj, strict=True)


def _json_safe(obj: Any) -> Any:
    from w2wkit.stio import json_safe

    return json_safe(obj)


def train_heldout_models(ev: EvalContext, heldout: Sequence[Any]) -> dict[str, Any]:
    """Multi-image DreamBooth LoRA per held-out identity (zoo recipe): edit input, baseline.

    Sets ``ev.multi`` (adapters) and ``ev.multi_seconds``.

    Parameters
    ----------
    ev : EvalContext
    heldout : sequence of Instance

    Returns
    -------
    dict
        ``{"n", "seconds"}`` (training seconds summarised).
    """
    s = ev.s
    ev.multi = []
    ev.multi_seconds = []
    cb = ev.task("DreamBooth (multi-image) on held-out identities", len(heldout))
    for i, inst in enumerate(heldout):
        n_img = s.n_train_images or int(getattr(ev.w.lora_settings, "n_images", 10))
        imgs = ev.real(inst, n_img, seed=s.seed + 11)
        ad, sec = ev.models.dreambooth(imgs, ev.w.instance_prompt, seed=s.seed * 31 + i)
        ev.multi.append(ad)
        ev.multi_seconds.append(sec)
        cb(i + 1, len(heldout))
    return {"n": len(heldout), "seconds": summarize(ev.multi_seconds)}
