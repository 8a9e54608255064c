"""A built or shipped world's zoo or embedder, trained again.

:func:`retrain_zoo` and :func:`retrain_embedder` both verify the world first,
train from its build log's profile, swap the new weights in together with a
``revisions`` entry of the build log and the rewritten manifest
(:func:`w2wkit.world.shipped.revision`), and keep everything else bit for bit.

The zoo: one concept's zoo trained again, with another recipe.

``w2wkit world retrain-zoo --concept dog --steps 1200`` trains every model of
the concept again on the world's own base pipeline: the same instances,
training renders, initialisation and per-model seeds as the build (its log's
zoo settings), with the training budget changed (``steps``, ``lr``, ``batch``,
``n_images``). Rank, alpha and targets stay the stack's, so the world keeps one
layout. The new factors replace the concept's in ``loras.safetensors`` (float16,
as packed); the other concept's are kept bit for bit. The recipe goes into the
stack's metadata (``concepts.<c>.recipe``) and a ``revisions`` entry of the
build log; the manifest is rewritten so that the world verifies.

``--continue`` trains the concept's current models further instead of from
the shared initialisation (a fresh Adam state; the pictures, noise and
timesteps are drawn apart from the earlier rounds'). Its recipe names the
recipe it continued (``continued_from``), so a chain of revisions reads as
one training budget: ``total_steps`` is the sum.

The models are trained into a work folder first (resumable: finished models
are skipped on a second call with the same recipe; a folder holding another
recipe's models is refused). The default work folder is in the system's
temporary directory and is removed after success.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.concepts import get_pack
from w2wkit.errors import W2WError
from w2wkit.world import CONCEPTS, HELDOUT_CONCEPT
from w2wkit.world.evaluators import EvalSettings
from w2wkit.world.profiles import WorldProfile, profile_from_log

__all__ = ["RECIPE_KEYS", "recipe_rounds", "retrain_embedder", "retrain_zoo", "total_steps"]

#: ZooSettings fields a zoo revision may change (the rest stay the build's).
RECIPE_KEYS = ("steps", "lr", "batch", "n_images")


def recipe_rounds(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """The training rounds of a recipe, first to last (``continued_from`` unrolled)."""
    chain = []
    r: dict[str, Any] | None = recipe
    while r:
        chain.append({k: v for k, v in r.items() if k != "continued_from"})
        r = r.get("continued_from")
    return chain[::-1]


def total_steps(recipe: dict[str, Any]) -> int:
    """Steps a model of this recipe was trained for, over all its rounds."""
    return int(sum(int(r["steps"]) for r in recipe_rounds(recipe)))


def _check_concept(concept: str) -> None:
    if concept not in CONCEPTS:
        raise W2WError(
            f"unknown concept {concept!r}; the world has {' and '.join(CONCEPTS)}", key="concept"
        )


def _check_recipe(changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if key == "lr":
            if not (np.isfinite(float(value)) and float(value) > 0):
                raise W2WError(f"must be a positive number, got {value}", param="lr")
        elif int(value) < 1:
            raise W2WError(f"must be >= 1, got {value}", param=key)


def retrain_zoo(
    world: str | os.PathLike[str] | None = None,
    concept: str = CONCEPTS[-1],
    *,
    steps: int | None = None,
    lr: float | None = None,
    batch: int | None = None,
    n_images: int | None = None,
    workers: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    chunk: int | None = None,
    work: str | os.PathLike[str] | None = None,
    progress: bool = True,
    continue_training: bool = False,
) -> dict[str, Any]:
    """Train every model of ``concept`` again and put the new factors in the world.

    Parameters
    ----------
    world : path, optional
        A built or shipped world (default: the shipped one). Verified first.
    concept : str
        One of :data:`w2wkit.world.CONCEPTS`.
    steps, lr, batch, n_images : optional
        The recipe's training budget (default: the concept's current one: an
        earlier revision's, else the build's, from its log).
    workers : int
        CPU training processes.
    device : str
        ``cpu``, ``cuda`` or ``auto``.
    threads : int, optional
        torch threads per process (default: the build's zoo setting).
    chunk : int, optional
        Models trained together in one batch (default: the build's setting;
        0 means 8 on the CPU). Larger chunks are much faster on a CPU: at
        1,200 steps a chunk of 8 trained ~37 models/h per process here, a chunk
        of 40 ~92 (two processes side by side).
    work : path, optional
        Folder the LoRA files are trained into (kept after success). Default:
        a folder in the temporary directory named after the world, removed
        after success.
    progress : bool
        Show a progress bar of the models.
    continue_training : bool
        Start every model from its current factors (as stored, float16)
        instead of the shared initialisation, for ``steps`` more steps; the new
        recipe records the one it continued (``continued_from``).

    Returns
    -------
    dict
        The revision entry (recipe before and after, seconds, models/h, mean
        training loss of the models this call trained).

    Raises
    ------
    W2WError
        For an unknown concept, an invalid recipe value, a damaged world, a
        world without a build log, or a work folder of another recipe.
    """
    import torch

    before = torch.get_num_threads()
    try:
        return _retrain_zoo(
            world,
            concept,
            steps,
            lr,
            batch,
            n_images,
            workers,
            device,
            threads,
            chunk,
            work,
            progress,
            continue_training,
        )
    finally:
        torch.set_num_threads(before)


def _retrain_zoo(
    world: str | os.PathLike[str] | None,
    concept: str,
    steps: int | None,
    lr: float | None,
    batch: int | None,
    n_images: int | None,
    workers: int,
    device: str,
    threads: int | None,
    chunk: int | None,
    work: str | os.PathLike[str] | None,
    progress: bool,
    continue_training: bool,
) -> dict[str, Any]:
    import torch

    from w2wkit.render import resolve_device
    from w2wkit.stio import read_safetensors, write_json, write_safetensors
    from w2wkit.world.profiles import zoo_jobs_for
    from w2wkit.world.shipped import (
        LORAS,
        STACK_KEY,
        load_world,
        read_stacks,
        revision,
        verify_world,
        world_dir,
    )
    from w2wkit.world.shipped import write_manifest as write_world_manifest
    from w2wkit.world.zoo import train_zoo, write_start

    _check_concept(concept)
    changes = {
        k: v
        for k, v in (("steps", steps), ("lr", lr), ("batch", batch), ("n_images", n_images))
        if v is not None
    }
    _check_recipe(changes)
    if int(workers) < 1:
        raise W2WError(f"must be >= 1, got {workers}", param="workers")
    if chunk is not None and int(chunk) < 1:
        raise W2WError(f"must be >= 1, got {chunk}", param="chunk")
    device = resolve_device(device)
    root = world_dir(world)
    verify_world(root)
    log_path = root / "build_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    if "profile" not in log:
        raise W2WError("the world has no build log with its profile", path=log_path)
    prof = profile_from_log(log["profile"])
    w = load_world(root, verify=False)
    w._check_concept(concept)
    jobs = zoo_jobs_for(prof)[concept]
    names = w.names(concept)
    if [j.name for j in jobs] != names:
        raise W2WError(
            f"the world's {concept} models are not the ones its build log's profile names",
            path=root / LORAS,
        )
    meta = w.stack_meta
    # the concept's current recipe: an earlier revision's, else the build's
    current = dict(meta["concepts"][concept].get("recipe") or {})
    old_recipe = {k: current.get(k, getattr(prof.zoo, k)) for k in RECIPE_KEYS}
    if current.get("continued_from"):
        old_recipe["continued_from"] = current["continued_from"]
    s = replace(
        prof.zoo,
        **{**{k: old_recipe[k] for k in RECIPE_KEYS}, **changes},
        device=device,
        threads=int(threads or prof.zoo.threads or 1),
        chunk=int(chunk if chunk is not None else prof.zoo.chunk),
    )
    if int(s.rank) != int(meta["rank"]) or float(s.alpha) != float(meta["alpha"]):
        raise W2WError(
            f"the build log's zoo recipe (rank {s.rank}, alpha {s.alpha}) is not the stack's "
            f"(rank {meta['rank']}, alpha {meta['alpha']})",
            path=log_path,
        )
    recipe: dict[str, Any] = {k: getattr(s, k) for k in RECIPE_KEYS}
    draw_round = 0
    if continue_training:
        recipe["continued_from"] = old_recipe
        draw_round = len(recipe_rounds(old_recipe))
    ident = {
        "world": str(root.resolve()),
        "concept": concept,
        # how the work is split does not change the recipe
        "settings": {k: v for k, v in asdict(s).items() if k not in ("device", "threads", "chunk")},
    }
    if continue_training:  # the models it starts from
        ident["continue_from"] = {
            "recipe": old_recipe,
            "loras_sha256": hashlib.sha256((root / LORAS).read_bytes()).hexdigest(),
        }
    keep = work is not None
    if work is None:
        tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]
        work = Path(tempfile.gettempdir()) / f"w2wkit-retrain-zoo-{concept}-{tag}"
    folder = Path(work)
    stamp = folder / "recipe.json"
    if stamp.exists():
        if json.loads(stamp.read_text()) != json.loads(json.dumps(ident)):
            raise W2WError(
                "the work folder holds models of another world or recipe",
                path=folder,
                hint="remove it, or pass another `work` folder",
            )
    elif folder.exists() and any(folder.glob("*.safetensors")):
        raise W2WError(
            "the work folder holds LoRA files but no recipe.json",
            path=folder,
            hint="remove it, or pass another `work` folder",
        )
    folder.mkdir(parents=True, exist_ok=True)
    write_json(stamp, ident)
    start = None
    if continue_training:
        start = write_start(folder / "start.factors", names, w.stack(concept))
    t0 = time.time()
    res = train_zoo(
        w.pipeline_dir,
        jobs,
        folder,
        w.prompt(concept),
        s,
        workers=int(workers),
        progress=progress,
        start=start,
        draw_round=draw_round,
    )
    if res["missing"]:
        raise W2WError(f"{res['missing']} model(s) were not trained", path=folder)
    # the new factors (the build's own stacking), in the stack's module order
    stacks, _ = read_stacks(folder, jobs)
    st = read_safetensors(root / LORAS)
    tensors = dict(st.tensors)
    for t in w.targets:
        if t not in stacks:
            raise W2WError(f"the retrained models have no module {t}", path=folder)
        for part, arr in zip(("down", "up"), stacks[t], strict=True):
            key = f"{concept}.{part}.{t}"
            if arr.shape != tensors[key].shape:
                raise W2WError(
                    f"retrained factors have shape {arr.shape}, the stack {tensors[key].shape}",
                    key=key,
                )
            tensors[key] = arr.astype(np.float16)
    losses = [r["loss"] for r in res["records"]]  # the models trained by this call
    meta = json.loads(st.metadata[STACK_KEY])
    meta["concepts"][concept]["recipe"] = recipe
    seconds = time.time() - t0
    entry = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "what": f"{concept} zoo retrained (world retrain-zoo)",
        "kind": "zoo",
        "concept": concept,
        "torch": torch.__version__,
        "device": device,
        "workers": int(workers),
        "models": len(names),
        "trained": res["trained"],
        "skipped": res["skipped"],
        "recipe_before": old_recipe,
        "recipe": recipe,
        "continued": bool(continue_training),
        "total_steps": total_steps(recipe),
        "settings": asdict(s),
        "mean_loss": float(np.mean(losses)) if losses else None,
        "seconds": seconds,
        "models_per_hour": res["models_per_hour"],
    }
    log.setdefault("revisions", []).append(entry)
    with revision(root, [LORAS]):  # the three files change together, or not at all
        write_safetensors(
            root / LORAS, tensors, metadata={STACK_KEY: json.dumps(meta)}, overwrite=True
        )
        write_json(log_path, log)
        write_world_manifest(root)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return entry


def retrain_embedder(
    world: str | os.PathLike[str] | None = None,
    vary: float | None = None,
    concept: str = HELDOUT_CONCEPT,
    tied: bool | None = None,
    steps: int | None = None,
    batch: int | None = None,
    budget_s: float | None = None,
    workers: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one of a world's embedders again (identity: with transient attributes varied).

    The training instances, pictures per instance, seed and network are the
    build's (its log's profile). For ``identity`` the pictures are drawn with
    ``eval_id_vary = vary`` (default: this version's profile default); ``dog``
    draws them as the build did (a build whose time budget cut the embedder's
    training short gets it trained to the planned steps). The new embedder
    replaces the old one in ``evaluators.safetensors``; the attribute
    classifiers and the other concept's embedder are kept bit for bit.
    ``evaluators.json`` gets the new metrics, ``build_log.json`` a ``revisions``
    entry (old and new verification ROC-AUC; for identity also the
    :func:`w2wkit.world.oracle.edit_oracle` scores; the settings, seconds) and the
    manifest is rewritten so that the world verifies.

    Parameters
    ----------
    world : path, optional
        A built or shipped world (default: the shipped one). Verified first.
    vary : float, optional
        A concept with transient attributes only (an error for ``dog``, whose
        breeds have none).
    concept : str
        One of :data:`w2wkit.world.CONCEPTS` (default: the held-out concept).
    tied : bool, optional
        A concept with transient attributes only: toggle them as
        :meth:`~w2wkit.concepts.identity.generator.IdentityGenerator.edited` does (ageing
        greys the hair). Default: this version's profile default (``True``);
        ``False`` reproduces world v1.1's embedder (flags only).
    steps, batch : int, optional
        Training steps and batch (default: the build's).
    budget_s : float, optional
        Shorten the training to fit (the steps done are recorded).
    workers : int, optional
        Render processes.
    device : str
    threads : int, optional
        torch threads on the CPU during the call (restored after). The result
        is deterministic given the settings and the thread count; another
        thread count sums in another order, and Adam turns those roundings
        into visibly different (equally trained) weights.
    progress : bool
        Show a progress bar of the training steps.

    Returns
    -------
    dict
        The revision entry.
    """
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _retrain_embedder(
            world, vary, concept, tied, steps, batch, budget_s, workers, device, progress
        )
    finally:
        torch.set_num_threads(before)


def _retrain_embedder(
    world: str | os.PathLike[str] | None,
    vary: float | None,
    concept: str,
    tied: bool | None,
    steps: int | None,
    batch: int | None,
    budget_s: float | None,
    workers: int | None,
    device: str,
    progress: bool,
) -> dict[str, Any]:
    import datetime

    import torch

    from w2wkit.render import resolve_device
    from w2wkit.stio import atomic_path, write_json
    from w2wkit.world.builder import _eval_data, _say, _transient_id
    from w2wkit.world.evaluators import (
        CONFIG,
        WEIGHTS,
        Evaluators,
        load_evaluators,
        roc_auc_verification,
        save_evaluators,
        train_embedder,
    )
    from w2wkit.world.pictures import default_workers
    from w2wkit.world.shipped import revision, verify_world, world_dir, write_manifest

    _check_concept(concept)
    ident = bool(get_pack(concept).transient_attributes)
    if not ident and (vary is not None or tied is not None):
        varied = [c for c in CONCEPTS if get_pack(c).transient_attributes]
        raise W2WError(
            f"vary and tied apply to the {' and '.join(varied)} embedder only "
            f"({concept} has no transient attributes)",
            key="vary",
        )
    device = resolve_device(device)
    root = world_dir(world)
    verify_world(root)
    log_path = root / "build_log.json"
    if not log_path.exists() or "profile" not in json.loads(log_path.read_text()):
        raise W2WError("the world has no build log with its profile", path=log_path)
    log = json.loads(log_path.read_text())
    prof = profile_from_log(log["profile"])
    new_vary = WorldProfile.eval_id_vary if vary is None else float(vary)
    if not 0.0 <= new_vary <= 1.0:
        raise W2WError(f"must be in [0, 1], got {new_vary}", param="vary")
    new_tied = WorldProfile.eval_id_vary_tied if tied is None else bool(tied)
    if ident:
        prof = replace(prof, eval_id_vary=new_vary, eval_id_vary_tied=new_tied)
    s = replace(
        prof.evals,
        steps=int(steps or prof.evals.steps),
        batch=int(batch or prof.evals.batch),
        budget_s=budget_s,
        device=device,
    )
    old = load_evaluators(root, device)
    before: dict[str, Any] = {"transient_id": _transient_id(old, prof)} if ident else {}
    t0 = time.time()
    d = _eval_data(prof, concept, workers or default_workers(), classifier=False)
    before["verification_auc"] = roc_auc_verification(old.embed(concept, d["tx"]), d["towner"])
    t_render = time.time() - t0
    _say(f"retrain-embedder: {len(d['xe'])} pictures rendered in {t_render:.0f} s")
    from w2wkit.progress import Bar

    with Bar(s.steps, f"{concept} embedder", enabled=progress, unit="steps") as bar:
        net, log_e = train_embedder(d["xe"], d["cls"], s, lambda done, _: bar.set(done))
    nets = {**old.nets, ("emb", concept): net.eval()}
    ev = Evaluators(nets, old.config, device)
    after: dict[str, Any] = {
        "verification_auc": roc_auc_verification(ev.embed(concept, d["tx"]), d["towner"]),
    }
    if ident:
        after["transient_id"] = _transient_id(ev, prof)
    config = old.config
    metrics = dict(config.get("metrics", {}))
    metrics[concept] = {
        **metrics.get(concept, {}),
        "verification_auc": after["verification_auc"],
        "emb_training": log_e,
    }
    if ident:
        metrics[f"{concept}_embedder"] = {
            "vary": new_vary,
            "vary_tied": new_tied,
            "transient_id": after["transient_id"],
        }
    entry = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "what": f"{concept} embedder retrained (world retrain-embedder)",
        "concept": concept,
        "torch": torch.__version__,
        "device": device,
        "vary": new_vary if ident else None,
        "vary_tied": new_tied if ident else None,
        "settings": asdict(s),
        "training": log_e,
        "render_seconds": t_render,
        "seconds": time.time() - t0,
        "before": before,
        "after": after,
    }
    # write the new evaluators next to the old ones, then swap both files in
    tmp_dir = root / ".retrain-embedder"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        saved = save_evaluators(
            tmp_dir,
            {k: v.cpu() for k, v in nets.items()},
            config["attributes"],
            EvalSettings(
                **{
                    k: v
                    for k, v in config["settings"].items()
                    if k in EvalSettings.__dataclass_fields__
                }
            ),
            metrics,
        )
        info = json.loads((saved / CONFIG).read_text())
        settings = dict(config.get("embedder_settings", {}))
        settings[concept] = asdict(s)
        if ident:
            settings["vary"] = new_vary
            settings["vary_tied"] = new_tied
        info["embedder_settings"] = settings
        with atomic_path(saved / CONFIG, overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps(info, indent=1, default=str))
        log.setdefault("revisions", []).append(entry)
        with revision(root, [WEIGHTS, CONFIG]):  # the four files change together, or not at all
            os.replace(saved / WEIGHTS, root / WEIGHTS)
            os.replace(saved / CONFIG, root / CONFIG)
            write_json(log_path, log)
            write_manifest(root)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return entry
