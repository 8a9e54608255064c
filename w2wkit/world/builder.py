"""``w2wkit world build``: the whole miniature world from a seed, phase by phase.

Phases (each writes its outputs as soon as it ends and is skipped when they
exist, so an interrupted build resumes; the build log is rewritten after every
phase):

1. ``base``: render the captioned dataset (worker processes), train the VAE,
   then UNet + text encoder (:func:`w2wkit.world.base_model.build_base`);
2. ``zoo``: identity and dog-breed LoRAs, all trained in big batches
   (:mod:`w2wkit.world.zoo`), labels CSVs and manifests;
3. ``heldout``: identities not in the zoo: parameters and renders;
4. ``evaluators``: attribute classifiers and identity embedders, with their
   held-out accuracy / verification ROC-AUC;
5. ``metrics``: zoo fidelity (top-1 among 50 candidates by ID score), intra-
   vs inter-model ID score, explained variance of the identity zoo, attribute
   accuracy of base-model generations;
6. ``pack``: the compact shipped world (:mod:`w2wkit.world.shipped`).

With a total time budget, each phase gets a share of the time left
(``PHASE_SHARES``); training loops stop or shorten themselves to fit.

The settings of a build are its profile (:mod:`w2wkit.world.profiles`);
retraining a built world's zoo or embedder is :mod:`w2wkit.world.retrain`.

Run without the CLI: ``python -m w2wkit.world.builder --out DIR`` (:func:`main`).
``w2wkit world build`` takes the same flags; this second, argparse command line
stays because ``scripts/build_world_gpu.sh`` runs the build from a bare checkout
on ``PYTHONPATH``, where the click CLI (``cli/``, installed as ``w2wkit.cli``)
cannot be imported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.concepts import full_prompt, get_pack
from w2wkit.diffusion.quiet import quiet
from w2wkit.errors import W2WError
from w2wkit.world import CONCEPTS, HELDOUT_CONCEPT
from w2wkit.world.base_model import CaptionedImages
from w2wkit.world.measure import fidelity_settings
from w2wkit.world.profiles import PROFILES, WorldProfile, profile, zoo_jobs_for

__all__ = ["PHASE_SHARES", "build_world", "main", "sample_space"]

#: Relative share of the remaining time budget of each timed phase. The zoo's share
#: was raised from 0.17 (unet 0.50) with the 600-step recipe: on the first H100 build the
#: zoo ran 100 ms steps of 2,200 samples (42 s); 600 steps of 550 samples are estimated at
#: ~70-90 s, which 0.17 of a 495 s budget (~85 s at that point) could have cut short.
PHASE_SHARES = {
    "render": 0.04,
    "vae": 0.05,
    "unet": 0.45,
    "zoo": 0.22,
    "heldout": 0.01,
    "evaluators": 0.11,
    "metrics": 0.08,
    "pack": 0.04,
}


class _Clock:
    """Total budget split over the phases still to run.

    Phases in ``free`` take (almost) no time, e.g. evaluators copied from another
    world: their share goes to the others.
    """

    def __init__(self, total_s: float | None, free: tuple[str, ...] = ()) -> None:
        self.t0 = time.time()
        self.total = total_s
        self.shares = {p: (0.0 if p in free else s) for p, s in PHASE_SHARES.items()}

    def left(self) -> float | None:
        return None if self.total is None else self.total - (time.time() - self.t0)

    def budget(self, phase: str) -> float | None:
        if self.total is None:
            return None
        return max(1.0, (self.left() or 0.0) * self.share(phase, phase))

    def share(self, phase: str, start: str) -> float:
        """Fraction of the time left at phase ``start`` that ``phase`` gets."""
        names = list(self.shares)
        rest = sum(self.shares[p] for p in names[names.index(start) :])
        return self.shares[phase] / rest


def _say(text: str) -> None:
    print(f"[world {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _write_json(path: Path, data: Any) -> None:
    from w2wkit.stio import write_json

    write_json(path, data)


def _gen(concept: str) -> Any:
    from w2wkit.world.pictures import generator

    return generator(concept)


# ---------------------------------------------------------------------------
# phases


def _phase_base(out: Path, prof: WorldProfile, device: str, clock: _Clock, workers: int) -> dict:
    from w2wkit.world.base_model import build_base
    from w2wkit.world.pictures import render_instances

    folder = out / "base"
    if (folder / "world_base.json").exists():
        return {"skipped": True, **json.loads((folder / "world_base.json").read_text())}
    s = prof.base
    t0 = time.time()
    imgs, owners = [], []
    for concept in s.concepts:
        gen = _gen(concept)
        n = int(s.n_instances.get(concept, 0))
        k = int(s.images_per_instance.get(concept, 1))
        if hasattr(gen, "n_breeds"):
            insts = gen.instances(min(n, gen.n_breeds))
        else:
            insts = gen.instances(n, 1000 + s.seed)
        arr = render_instances(
            concept, [(i.index, i.seed) for i in insts], k, s.seed + 77, s.image_size, workers
        )
        imgs.append(arr.reshape(-1, *arr.shape[2:]))
        owners += [(concept, inst) for inst in insts for _ in range(k)]
    data = CaptionedImages(np.concatenate(imgs), owners)
    _say(f"base: rendered {len(owners)} pictures in {time.time() - t0:.1f} s ({workers} workers)")
    budgets: dict[str, float] = {}
    left = clock.left()
    if left is not None:
        budgets = {
            "vae": left * clock.share("vae", "vae"),
            "unet": max(10.0, left * clock.share("unet", "vae") - 5.0),
        }
    log = build_base(
        folder,
        s,
        overwrite=True,
        progress=_say,
        data=data,
        device=device,
        budget_s=budgets,
    )
    log["render"]["seconds"] = time.time() - t0 - log["vae"]["seconds"] - log["unet"]["seconds"]
    log["render"]["workers"] = workers
    (folder / "world_base.json").write_text(json.dumps(log, indent=2, default=str))
    return log


def _phase_zoo(out: Path, prof: WorldProfile, device: str, clock: _Clock, workers: int) -> dict:
    from w2wkit.world.pictures import render_instances
    from w2wkit.world.zoo import train_zoo, write_labels, write_zoo_manifest

    s = replace(prof.zoo, device=device)
    jobs = zoo_jobs_for(prof)
    log: dict[str, Any] = {"settings": asdict(s)}
    budget = clock.budget("zoo")
    t0 = time.time()
    total = sum(len(v) for v in jobs.values())
    for concept, js in jobs.items():
        folder = out / "zoo" / concept
        prompt = full_prompt(concept)
        if (folder / "manifest.json").exists():
            log[concept] = {"skipped": True}
            continue
        folder.mkdir(parents=True, exist_ok=True)
        todo = [j for j in js if not (folder / f"{j.name}.safetensors").exists()]
        tr = time.time()
        arr = render_instances(
            concept, [(j.index, j.inst_seed) for j in todo], s.n_images, s.seed, 32, workers
        )
        pics = {j.name: arr[k] for k, j in enumerate(todo)}
        t_render = time.time() - tr
        share = None
        if budget is not None:
            share = max(1.0, budget - (time.time() - t0)) * len(js) / max(1, total)
            total -= len(js)
        res = train_zoo(
            out / "base",
            js,
            folder,
            prompt,
            s,
            workers=workers if device == "cpu" else 1,
            images=lambda j, pics=pics: pics[j.name],
            budget_s=share,
            progress=False,
        )
        res.pop("records", None)
        res["render_seconds"] = t_render
        res["prompt"] = prompt
        log[concept] = res
        write_labels(js, folder / "labels.csv")
        if res["missing"] == 0:
            write_zoo_manifest(
                folder, js, {"concept": concept, "prompt": prompt, "settings": asdict(s)}
            )
        _say(
            f"zoo {concept}: {res['trained']} trained, {res['missing']} missing, "
            f"{res['seconds']:.1f} s ({res['models_per_hour'] or 0:.0f} models/h)"
        )
    log["seconds"] = time.time() - t0
    return log


def _heldout_specs(prof: WorldProfile) -> list[tuple[int, int]]:
    return [(prof.n_identities + k, prof.base.seed) for k in range(prof.n_heldout)]


def _phase_heldout(out: Path, prof: WorldProfile, workers: int) -> dict:
    from w2wkit.stio import atomic_path
    from w2wkit.world.pictures import render_instances

    path = out / "heldout" / "heldout.npz"
    if path.exists():
        return {"skipped": True}
    gen = _gen(HELDOUT_CONCEPT)
    specs = _heldout_specs(prof)
    insts = [gen.instance(i, s) for i, s in specs]
    seed = prof.zoo.seed
    renders = render_instances(HELDOUT_CONCEPT, specs, prof.heldout_images, seed, 32, workers)
    canon = np.stack([gen.render(i, 1, seed=seed, canonical=True)[0] for i in insts])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=True) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(
            fh,
            renders=renders,
            canonical=canon,
            vectors=np.stack([i.vector() for i in insts]).astype(np.float32),
            attributes=np.stack([i.attribute_vector() for i in insts]),
        )
    meta = {
        "concept": HELDOUT_CONCEPT,
        "names": [i.name for i in insts],
        "index": [i.index for i in insts],
        "inst_seed": prof.base.seed,
        "render_seed": seed,
        "attribute_names": [a.name for a in gen.attributes],
        "param_names": list(gen.param_names),
        "arrays": {
            "renders": "(n, k, 32, 32, 3) uint8: renders with nuisance (generator.render seed)",
            "canonical": "(n, 32, 32, 3) uint8: canonical render",
            "vectors": "(n, n_attributes + n_params) float32: Instance.vector()",
            "attributes": "(n, n_attributes) int8",
        },
    }
    _write_json(path.with_name("heldout.json"), meta)
    return {"identities": len(insts), "renders": int(renders.shape[0] * renders.shape[1])}


def _eval_specs(
    prof: WorldProfile, concept: str
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """Training instances, test instances and training pictures each of an evaluator."""
    seed = prof.base.seed
    gen = _gen(concept)
    if concept == HELDOUT_CONCEPT:
        train = [(i, 2000 + seed) for i in range(prof.eval_identities)]
        test = _heldout_specs(prof)[: prof.eval_test_instances]
        if len(test) < prof.eval_test_instances:  # more test identities than held out
            extra = prof.eval_test_instances - len(test)
            test += [(i, 3000 + seed) for i in range(extra)]
        return train, test, prof.eval_id_images
    nb = min(prof.eval_dog_breeds, gen.n_breeds)
    train = [(i, seed + c) for c in range(prof.eval_dog_catalogues) for i in range(nb)]
    test = [(i, 99 + seed) for i in range(min(prof.eval_test_instances, gen.n_breeds))]
    return train, test, prof.eval_dog_images


def _eval_data(
    prof: WorldProfile, concept: str, workers: int, classifier: bool = True
) -> dict[str, np.ndarray]:
    """Training and test renders of one concept's evaluators.

    ``x``/``y`` train the attribute classifier (skipped with ``classifier=False``);
    ``xe``/``cls`` the embedder: for identities with ``eval_id_vary > 0`` its own
    renders with transient attributes varied per picture.
    """
    from w2wkit.world.pictures import render_instances

    seed = prof.base.seed
    gen = _gen(concept)
    train, test, k = _eval_specs(prof, concept)
    out: dict[str, np.ndarray] = {}
    vary = prof.eval_id_vary if get_pack(concept).transient_attributes else 0.0
    if classifier or vary <= 0:
        tr = render_instances(concept, train, k, seed + 5, 32, workers).reshape(-1, 32, 32, 3)
        out["xe"] = tr
    if classifier:
        lab = np.stack([gen.instance(i, s).attribute_vector() for i, s in train])
        out["x"] = tr
        out["y"] = np.repeat(lab, k, 0)
    if vary > 0:
        xe = render_instances(
            concept, train, k, seed + 7, 32, workers, vary=vary, vary_tied=prof.eval_id_vary_tied
        )
        out["xe"] = xe.reshape(-1, 32, 32, 3)
    te = render_instances(concept, test, 4, seed + 6, 32, workers)
    tlab = np.stack([gen.instance(i, s).attribute_vector() for i, s in test])
    out.update(
        cls=np.repeat(np.arange(len(train)), k),
        tx=te.reshape(-1, 32, 32, 3),
        ty=np.repeat(tlab, 4, 0),
        towner=np.repeat(np.arange(len(test)), 4),
    )
    return out


def _transient_id(ev: Any, prof: WorldProfile, n: int = 50) -> dict[str, Any]:
    """Perfect-edit scores (:func:`w2wkit.world.oracle.edit_oracle`) on held-out instances.

    One score per transient attribute of the held-out concept's pack.
    """
    from w2wkit.world.oracle import WorldEvaluators, edit_oracle

    pack = get_pack(HELDOUT_CONCEPT)
    gen, judge = _gen(HELDOUT_CONCEPT), WorldEvaluators(ev, HELDOUT_CONCEPT)
    insts = [gen.instance(i, s) for i, s in _heldout_specs(prof)[:n]]
    return {
        attr: edit_oracle(
            judge,
            gen,
            [i for i in insts if pack.plausible(i.attributes, attr)],
            attr,
            seed=prof.base.seed + 8,
        )
        for attr in pack.transient_attributes
    }


_EVALUATOR_FILES = ("evaluators.safetensors", "evaluators.json")


def _check_evaluators_source(source: Path) -> dict:
    """The description of reusable evaluators in ``source``, or one error naming the file.

    The source must hold ``evaluators.safetensors`` and ``evaluators.json`` for the
    same concepts and attributes as this code's generators. :func:`build_world`
    calls it before the first phase, so a bad source fails at once, not after the
    base and zoo.
    """
    for name in _EVALUATOR_FILES:
        if not (source / name).is_file():
            raise W2WError("no evaluators to reuse here", path=source / name)
    try:
        info = json.loads((source / "evaluators.json").read_text())
        attrs = info["attributes"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise W2WError("not an evaluators description", path=source / "evaluators.json") from None
    want = {c: [a.name for a in _gen(c).attributes] for c in CONCEPTS}
    if attrs != want:
        raise W2WError(
            "the evaluators were trained for other attributes than this version's generators",
            path=source / "evaluators.json",
        )
    return info


def _reuse_evaluators(folder: Path, source: Path) -> dict:
    """Copy the evaluators of another world into ``folder``; returns the phase record.

    The evaluators depend on the procedural generators and the seed, not on the
    base model, so a rebuild of the base and zoo may reuse them
    (:func:`_check_evaluators_source` says which sources qualify).
    """
    from w2wkit.stio import file_sha256 as sha256

    info = _check_evaluators_source(source)
    names = _EVALUATOR_FILES
    from w2wkit.atomic import atomic_path

    with atomic_path(folder, overwrite=True) as tmp:
        tmp.mkdir()
        for name in names:
            shutil.copyfile(source / name, tmp / name)
    return {
        "reused_from": str(source),
        "sha256": {name: sha256(folder / name) for name in names},
        **info.get("metrics", {}),
    }


def _phase_evaluators(
    out: Path,
    prof: WorldProfile,
    device: str,
    clock: _Clock,
    workers: int,
    reuse: Path | None = None,
) -> dict:
    from w2wkit.world.evaluators import (
        Evaluators,
        roc_auc_verification,
        save_evaluators,
        train_attribute_classifier,
        train_embedder,
    )

    folder = out / "evaluators"
    if (folder / "evaluators.json").exists():
        return {"skipped": True, **json.loads((folder / "evaluators.json").read_text())["metrics"]}
    if reuse is not None:
        return _reuse_evaluators(folder, Path(reuse))
    t0 = time.time()
    data = {c: _eval_data(prof, c, workers) for c in CONCEPTS}
    t_render = time.time() - t0
    budget = clock.budget("evaluators")
    per = None if budget is None else max(1.0, (budget - t_render) / 4)
    s = replace(prof.evals, device=device, budget_s=per)
    nets, metrics = {}, {"render_seconds": t_render}
    attrs = {c: [a.name for a in _gen(c).attributes] for c in data}
    for concept, d in data.items():
        net, log_a = train_attribute_classifier(d["x"], d["y"], s)
        nets[("attr", concept)] = net
        emb, log_e = train_embedder(d["xe"], d["cls"], s)
        nets[("emb", concept)] = emb
        ev = Evaluators(nets, {"attributes": attrs}, device)
        p = ev.attributes(concept, d["tx"])
        acc = ((p > 0.5) == (d["ty"] > 0)).mean(0)
        auc = roc_auc_verification(ev.embed(concept, d["tx"]), d["towner"])
        if get_pack(concept).transient_attributes:
            metrics[f"{concept}_embedder"] = {
                "vary": prof.eval_id_vary,
                "vary_tied": prof.eval_id_vary_tied,
                "transient_id": _transient_id(ev, prof),
            }
        metrics[concept] = {
            "attribute_accuracy": dict(zip(attrs[concept], acc.round(4).tolist(), strict=True)),
            "min_attribute_accuracy": float(acc.min()),
            "verification_auc": auc,
            "train_instances": int(d["cls"].max() + 1),
            "train_images": len(d["x"]),
            "test_images": len(d["tx"]),
            "attr_training": log_a,
            "emb_training": log_e,
        }
        _say(
            f"evaluators {concept}: min attribute accuracy {acc.min():.3f}, "
            f"verification ROC-AUC {auc:.3f}"
        )
    metrics["seconds"] = time.time() - t0
    save_evaluators(folder, {k: v.cpu() for k, v in nets.items()}, attrs, s, metrics)
    return metrics


def _phase_metrics(out: Path, prof: WorldProfile, device: str, clock: _Clock, workers: int) -> dict:
    from w2wkit.diffusion.bank import stack_factors
    from w2wkit.diffusion.sampler import Renderer
    from w2wkit.world.evaluators import load_evaluators
    from w2wkit.world.measure import zoo_fidelity
    from w2wkit.world.shipped import read_stacks

    path = out / "metrics.json"
    if path.exists():
        return {"skipped": True, **json.loads(path.read_text())}
    t0 = time.time()
    budget = clock.budget("metrics")
    ev = load_evaluators(out / "evaluators", device)
    renderer = Renderer(out / "base", device=device)
    metrics: dict[str, Any] = {}
    rng = np.random.default_rng(prof.base.seed + 123)
    jobs = zoo_jobs_for(prof)
    for concept, js in jobs.items():
        stacks, names = read_stacks(out / "zoo" / concept, js)
        if not names:
            continue
        bank = stack_factors(stacks, float(prof.zoo.alpha))
        prompt = full_prompt(concept)
        by_name = {j.name: j for j in js}
        specs = [(by_name[n].index, by_name[n].inst_seed) for n in names]
        fid, test, gen_imgs = zoo_fidelity(
            renderer, bank, ev, concept, specs, prompt, fidelity_settings(prof), rng, workers
        )
        model_index = np.repeat(test, prof.fidelity_seeds)
        # attributes read on the generations vs the model's ground truth
        gen = _gen(concept)
        truth = np.stack([gen.instance(*specs[i]).attribute_vector() for i in model_index]).astype(
            bool
        )
        pa = ev.attributes(concept, gen_imgs) > 0.5
        metrics[concept] = {
            **fid,
            "attribute_agreement_zoo_generations": dict(
                zip(
                    ev.attribute_names(concept),
                    (pa == truth).mean(0).round(4).tolist(),
                    strict=True,
                )
            ),
        }
        _say(
            f"metrics {concept}: fidelity top-1 {fid['fidelity_top1']:.3f} "
            f"(of {fid['fidelity_models']} models, {fid['candidates']} candidates)"
        )
        if concept == HELDOUT_CONCEPT:
            metrics[f"explained_variance_{concept}"] = _explained_variance(stacks)
            try:
                metrics[f"sampled_{concept}_models"] = _sampled_consistency(
                    renderer, ev, prof, stacks, rng, prompt, concept
                )
            except Exception as exc:  # a metric must not sink the build
                metrics[f"sampled_{concept}_models"] = {"error": repr(exc)}
        if budget is not None and time.time() - t0 > budget:
            metrics["truncated"] = True
            break
    # base-model generations with full captions: does the classifier read the prompt?
    try:
        metrics["base_prompting"] = _base_prompting(renderer, ev, prof)
    except Exception as exc:  # a metric must not sink the build
        metrics["base_prompting"] = {"error": repr(exc)}
    metrics["seconds"] = time.time() - t0
    _write_json(path, metrics)
    return metrics


def _base_prompting(renderer: Any, ev: Any, prof: WorldProfile) -> dict[str, Any]:
    from w2wkit.world.measure import generate

    out = {}
    for concept in CONCEPTS:
        gen = _gen(concept)
        n = min(prof.fidelity_models, 100)
        insts = (
            gen.instances(min(n, gen.n_breeds))
            if hasattr(gen, "n_breeds")  # a catalogue (breeds), else a seeded population
            else [gen.instance(i, 3000 + prof.base.seed) for i in range(n)]
        )
        prompts = [gen.caption(i) for i in insts]
        imgs = generate(
            renderer, None, None, prompts, np.arange(len(prompts)), fidelity_settings(prof)
        )
        truth = np.stack([i.attribute_vector() for i in insts]).astype(bool)
        acc = ((ev.attributes(concept, imgs) > 0.5) == truth).mean(0)
        out[concept] = {
            "images": len(imgs),
            "attribute_accuracy": dict(
                zip(ev.attribute_names(concept), acc.round(4).tolist(), strict=True)
            ),
            "mean_attribute_accuracy": float(acc.mean()),
        }
    return out


def _flatten(stacks: dict) -> np.ndarray:
    """``(M, D)``: per model, every module's A then B, flattened (the paper's layout)."""
    return np.concatenate(
        [
            np.concatenate([a.reshape(len(a), -1), b.reshape(len(b), -1)], 1)
            for a, b in stacks.values()
        ],
        1,
    ).astype(np.float64)


def sample_space(
    stacks: dict, n: int, k: int, rng: np.random.Generator
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Draw ``n`` new models from the PCA space of ``stacks`` (first ``k`` components).

    Each coefficient is drawn from a normal fitted to the zoo's projections on
    that component (the paper's sampling); the result has the stacks' layout,
    ``{target: (A (n, r, in), B (n, out, r))}``.
    """
    x = _flatten(stacks)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = max(1, min(k, len(vt)))
    coef = (x - mean) @ vt[:k].T
    z = rng.normal(coef.mean(0), coef.std(0) + 1e-12, size=(n, k))
    w = mean + z @ vt[:k]
    out, col = {}, 0
    for t, (a, b) in stacks.items():
        na, nb = a[0].size, b[0].size
        out[t] = (
            w[:, col : col + na].reshape(n, *a.shape[1:]).astype(np.float32),
            w[:, col + na : col + na + nb].reshape(n, *b.shape[1:]).astype(np.float32),
        )
        col += na + nb
    return out


def _sampled_consistency(
    renderer: Any,
    ev: Any,
    prof: WorldProfile,
    stacks: dict,
    rng: np.random.Generator,
    prompt: str,
    concept: str,
) -> dict[str, Any]:
    """Models sampled from a concept's space: ID score across seeds, same vs other model."""
    from w2wkit.diffusion.bank import stack_factors
    from w2wkit.world.measure import generate

    n = min(50, max(2, prof.fidelity_models // 4))
    k = min(1000, len(next(iter(stacks.values()))[0]) - 1)
    sampled = sample_space(stacks, n, k, rng)
    bank = stack_factors(sampled, float(prof.zoo.alpha))
    per = max(2, prof.fidelity_seeds)
    idx = np.repeat(np.arange(n), per)
    seeds = np.tile(np.arange(per), n) + 20_000
    imgs = generate(renderer, bank, idx, prompt, seeds, fidelity_settings(prof))
    e = ev.embed(concept, imgs)
    cos = e @ e.T
    same = (idx[:, None] == idx[None, :]) & ~np.eye(len(idx), dtype=bool)
    diff = idx[:, None] != idx[None, :]
    return {
        "models": n,
        "components": k,
        "seeds_per_model": per,
        "intra_model_id_score": float(cos[same].mean()),
        "inter_model_id_score": float(cos[diff].mean()),
    }


def _explained_variance(stacks: dict) -> dict[str, Any]:
    """PCA of the flattened factors (A and B of every module, as the paper)."""
    flat = _flatten(stacks)
    x = flat - flat.mean(0)
    sv = np.linalg.svd(x, compute_uv=False)
    var = sv**2 / max(1e-30, (sv**2).sum())
    cum = np.cumsum(var)
    ks = [k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if k <= len(cum)]
    return {
        "dims": int(flat.shape[1]),
        "models": int(flat.shape[0]),
        "cumulative_at": {str(k): float(cum[k - 1]) for k in ks},
        "curve": cum[:200].round(5).tolist(),
        "components_for_90pct": int(np.searchsorted(cum, 0.9) + 1),
    }


# ---------------------------------------------------------------------------


@quiet()  # diffusers/transformers output off for the build, restored after it
def build_world(
    out: str | os.PathLike[str],
    profile_name: str = "full",
    *,
    seed: int = 0,
    device: str = "auto",
    budget_s: float | None = None,
    workers: int | None = None,
    pack: bool = True,
    install: bool = False,
    prof: WorldProfile | None = None,
    evaluators_from: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Build the miniature world into ``out`` (resumable) and pack it.

    Parameters
    ----------
    out : path
        Work folder: ``base/``, ``zoo/``, ``heldout/``, ``evaluators/``,
        ``metrics.json``, ``build_log.json`` and ``shipped/``.
    profile_name : str
        ``full`` or ``micro``.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    budget_s : float, optional
        Total wall-clock budget; phases get shares of the time left.
    workers : int, optional
        CPU processes for rendering (and zoo training on CPU); default all
        cores but one.
    install : bool
        Copy the packed world into the package (``w2wkit/data/world``).
    evaluators_from : path, optional
        A folder with ``evaluators.safetensors`` / ``.json`` (a shipped world,
        or another build's ``evaluators/``) whose evaluators are copied instead
        of trained (~2 h of CPU): they depend on the generators and the seed,
        not on the base. The build log records the source and the hashes.

    Returns
    -------
    dict
        The build log (also ``out/build_log.json``).
    """
    import torch

    from w2wkit.render import resolve_device
    from w2wkit.world.pictures import default_workers

    out = Path(out)
    reuse = Path(evaluators_from) if evaluators_from is not None else None
    if reuse is not None:  # a bad source fails now, before hours of base and zoo
        _check_evaluators_source(reuse)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    prof = prof or profile(profile_name, seed, device)
    workers = int(workers or default_workers())
    if device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    done = out / "evaluators" / "evaluators.json"
    clock = _Clock(budget_s, free=("evaluators",) if reuse or done.exists() else ())
    log_path = out / "build_log.json"
    log: dict[str, Any] = json.loads(log_path.read_text()) if log_path.exists() else {}
    log.update(
        {
            "profile": prof.to_json(),
            "device": device,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "workers": workers,
            "budget_s": budget_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    log.setdefault("phases", {})

    def run(name: str, fn: Any) -> None:
        t = time.time()
        b = clock.budget(name) if name in PHASE_SHARES else clock.left()
        _say(f"phase {name}: start" + (f" (budget {b:.0f} s)" if b is not None else ""))
        try:
            res = fn()
        except W2WError:
            raise
        prev = log["phases"].get(name)
        if isinstance(res, dict) and res.get("skipped") and prev:
            prev["resumed"] = True  # finished in an earlier run: keep its record
        else:
            log["phases"][name] = {"seconds": time.time() - t, "result": res}
        log["elapsed"] = time.time() - clock.t0
        _write_json(log_path, log)
        _say(f"phase {name}: done in {time.time() - t:.1f} s (total {log['elapsed']:.1f} s)")

    run("base", lambda: _phase_base(out, prof, device, clock, workers))
    run("zoo", lambda: _phase_zoo(out, prof, device, clock, workers))
    run("heldout", lambda: _phase_heldout(out, prof, workers))
    run("evaluators", lambda: _phase_evaluators(out, prof, device, clock, workers, reuse))
    run("metrics", lambda: _phase_metrics(out, prof, device, clock, workers))
    if pack:
        from w2wkit.world.shipped import pack_world, package_world_dir

        def do_pack() -> dict:
            log["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            return pack_world(out, out / "shipped", log)

        run("pack", do_pack)
        _write_json(out / "shipped" / "build_log.json", log)
        from w2wkit.world.shipped import write_manifest

        write_manifest(out / "shipped")
        if install:
            from w2wkit.atomic import atomic_path

            dest = package_world_dir()
            with atomic_path(dest, overwrite=True) as tmp:
                shutil.copytree(out / "shipped", tmp)
            _say(f"installed the world in {dest}")
    return log


def main(argv: list[str] | None = None) -> int:
    """``python -m w2wkit.world.builder`` (no CLI dependencies)."""
    ap = argparse.ArgumentParser(prog="python -m w2wkit.world.builder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", default="full", choices=list(PROFILES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=None, help="total seconds")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--install", action="store_true")
    ap.add_argument("--evaluators-from", default=None, help="reuse these evaluators")
    a = ap.parse_args(argv)
    try:
        log = build_world(
            a.out,
            a.profile,
            seed=a.seed,
            device=a.device,
            budget_s=a.budget,
            workers=a.workers,
            install=a.install,
            evaluators_from=a.evaluators_from,
        )
    except W2WError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _say(f"world built in {log.get('elapsed', 0):.1f} s -> {Path(a.out) / 'shipped'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
