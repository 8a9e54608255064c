"""Probe edit settings on the shipped world: edit space, direction estimator, edited models.

Usage::

    OMP_NUM_THREADS=1 python scripts/edit_probe.py OUT.jsonl [K ...] [--kinds pattern,filter]
        [--all-models] [--inject T] [--attrs beard,glasses,old] [--models 6]
        [--strengths 1,2,3,4,6,8] [--heldout] [--project] [--orth-params all|nohair]
        [--representation delta --rank 8 | --energy E]

For each K (default 50 100 200) an identity space of K components is fitted on the
shipped zoo with its labels and, for each attribute (default ``beard``, ``glasses``,
``old``), ``--models`` models lacking the attribute are edited at each strength (in
training standard deviations). By default they are zoo models (seed 17; only models
for which the attribute is plausible, as the eval's calibration pool:
:func:`w2wkit.evaluation.excluded_by`; ``--all-models`` drops that rule). ``--heldout``
edits multi-image DreamBooth LoRAs of the *last* held-out identities instead (trained
here with the zoo recipe, as ``w2wkit eval`` trains its edit inputs); ``--project``
edits their projection onto the space (``keep_residual=False``) while the ID score is
still taken against the unedited LoRA itself. ``--orth-params`` also keeps the edit
orthogonal to probes of the world's continuous identity parameters (ground truth of
the zoo's identities: skin, hair and eye colour, face geometry; the glasses-frame
parameters never; ``nohair`` leaves out the hair colour too).

Direction kinds (``--kinds``):

- ``pattern``, ``filter``: the toolkit's probe vectors (:func:`fit_directions`), made
  orthogonal to the correlated attributes' probes as ``w2wkit eval`` does;
- ``joint``: the joint effect of the attribute: the row of ``B`` in the least-squares
  fit ``P - mean = (Y - mean) B`` of the coefficients on all labels at once (the
  coefficient change of having the attribute, the other labels held fixed); not
  made orthogonal to anything;
- ``joint-shrunk``: the same with each component shrunk by ``max(0, 1 - 4 / t^2)``,
  ``t`` its regression t-statistic (components with ``|t| <= 2`` dropped);
- ``pattern-shrunk``: the class-mean difference with each component shrunk by its
  two-sample t-statistic the same way, then made orthogonal like ``pattern``.

Every edit is rendered with 4 seeds (20 DDIM steps, CFG 3, the world's prompt);
success is the classifier's reading of the attribute, ID the cosine of identity
embeddings to the unedited model's picture of the same seed. ``--inject T`` renders
with delayed injection (the unedited model for timesteps ``t > T``, the edited one
after). One JSON line per (K, kind, attribute, strength). Used for docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

TOOLKIT_KINDS = ("pattern", "filter")
SCRIPT_KINDS = ("joint", "joint-shrunk", "pattern-shrunk")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("ks", nargs="*", type=int, default=[50, 100, 200])
    p.add_argument("--kinds", default="pattern,filter")
    p.add_argument("--all-models", action="store_true")
    p.add_argument("--inject", type=float, default=None)
    p.add_argument("--attrs", default="beard,glasses,old")
    p.add_argument("--models", type=int, default=6)
    p.add_argument("--strengths", default="1,2,3,4,6,8")
    p.add_argument("--heldout", action="store_true")
    p.add_argument("--project", action="store_true")
    p.add_argument("--orth-params", choices=("all", "nohair"), default=None)
    p.add_argument("--representation", default="factors")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--energy", type=float, default=None)
    a = p.parse_args(argv)
    a.kinds = a.kinds.split(",")
    bad = [k for k in a.kinds if k not in TOOLKIT_KINDS + SCRIPT_KINDS]
    if bad:
        p.error(f"unknown kind {bad[0]!r}; choose from {', '.join(TOOLKIT_KINDS + SCRIPT_KINDS)}")
    if a.project and not a.heldout:
        p.error("--project edits held-out LoRAs: give --heldout too")
    a.attrs = a.attrs.split(",")
    a.strengths = [float(x) for x in a.strengths.split(",")]
    return a


def _shrink(effect: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Shrink each component of ``effect`` ``(k,)`` by its t-statistic ``(k,)``."""
    return effect * np.clip(1.0 - 4.0 / np.maximum(t**2, 1e-12), 0.0, None)


def _script_directions(space, labels: dict[str, np.ndarray], attrs: list[str]) -> None:
    """Store ``attr@joint``, ``attr@joint-shrunk`` and ``attr@pattern-shrunk`` in the space."""
    from w2wkit.directions import calibrate

    P = np.asarray(space.coefficients_, dtype=np.float64)
    names = list(labels)
    Y = np.stack([labels[a] for a in names], 1)
    Yc, Pc = Y - Y.mean(0), P - P.mean(0)
    G = np.linalg.inv(Yc.T @ Yc)
    B = G @ Yc.T @ Pc  # (n_labels, k): joint effect of each label
    s2 = ((Pc - Yc @ B) ** 2).sum(0) / (len(P) - Y.shape[1] - 1)
    for attr in attrs:
        j = names.index(attr)
        y = Y[:, j]
        pos, neg = P[y == 1], P[y == 0]
        diff = pos.mean(0) - neg.mean(0)
        se = np.sqrt(pos.var(0, ddof=1) / len(pos) + neg.var(0, ddof=1) / len(neg))
        vectors = {
            "joint": B[j],
            "joint-shrunk": _shrink(B[j], B[j] / np.sqrt(s2 * G[j, j])),
            "pattern-shrunk": _shrink(diff, diff / se),
        }
        base = space.directions_[attr]
        for kind, vec in vectors.items():
            vec = vec / np.linalg.norm(vec)
            mean, std = calibrate(P, vec)
            name = f"{attr}@{kind}"  # the probe's record, another vector and unit
            space.directions_[name] = replace(
                base, name=name, vector=vec, proj_mean=mean, proj_std=std, info=dict(base.info)
            )


FRAME_PARAMS = ("glasses_round", "frame_r", "frame_g", "frame_b")
HAIR_PARAMS = ("hair_r", "hair_g", "hair_b")


def _param_directions(space, insts: list, which: str) -> list[str]:
    """Fit ``p_<param>`` probes of the zoo identities' (``insts``) parameters; their names."""
    from w2wkit.directions import fit_directions

    skip = set(FRAME_PARAMS) | (set(HAIR_PARAMS) if which == "nohair" else set())
    table = {
        f"p_{p}": np.array([inst.params[p] for inst in insts], dtype=np.float64)
        for p in insts[0].params
        if p not in skip
    }
    fit_directions(space, table, kind="pattern", cv=0)
    return list(table)


def _heldout_models(ew, attr: str, rule: dict[str, float], n: int) -> list:
    """Multi-image DreamBooth LoRAs of the last held-out identities of ``ew`` lacking ``attr``.

    Identities holding a value of ``rule`` (:func:`w2wkit.evaluation.excluded_by`) are skipped.
    """
    from w2wkit.baselines import BaselineModels

    insts = [
        inst
        for inst in ew.heldout[::-1]
        if not inst.attributes[attr] and all(inst.attributes[k] != bool(v) for k, v in rule.items())
    ][:n]
    models = BaselineModels(ew.base, replace(ew.lora_settings, threads=1), device="cpu")
    n_img = int(getattr(ew.lora_settings, "n_images", 10))
    out = []
    for i, inst in enumerate(insts):
        imgs = ew.generator.render(inst, n_img, seed=11, size=ew.image_size)
        out.append(models.dreambooth(imgs, ew.instance_prompt, seed=1000 + i)[0])
    return out


def main(argv: list[str] | None = None) -> None:
    from w2wkit.collection import Collection
    from w2wkit.directions import fit_directions
    from w2wkit.evaluation import (
        correlated_attributes,
        edit_disentangled,
        excluded_by,
        load_eval_world,
    )
    from w2wkit.labels import read_labels
    from w2wkit.render import Renderer
    from w2wkit.space import WeightSpace
    from w2wkit.world.shipped import load_world

    a = _parse(argv)
    w = load_world()
    names = w.names("identity")
    zoo = [w.adapter("identity", i) for i in range(len(names))]
    labels = read_labels(w.labels_path("identity"), names)
    labels = {k: v for k, v in labels.items() if len(np.unique(v[np.isfinite(v)])) == 2}
    ev = w.evaluators()
    cols = ev.attribute_names("identity")
    renderer = Renderer(w.pipeline_dir, device="cpu")
    prompt = w.prompt("identity")
    seeds = [0, 1, 2, 3]
    inputs: dict[str, list] = {}
    rules: dict[str, dict[str, float]] = {}
    ew = load_eval_world(device="cpu") if (a.heldout or a.orth_params) else None
    for attr in a.attrs:
        rule = {} if a.all_models else excluded_by(labels, attr)
        rules[attr] = rule
        if a.heldout:
            inputs[attr] = _heldout_models(ew, attr, rule, a.models)
            continue
        keep = labels[attr] == 0
        for other, v in rule.items():
            keep &= labels[other] != v
        pick = np.random.default_rng(17).choice(np.flatnonzero(keep), a.models, replace=False)
        inputs[attr] = [zoo[int(i)] for i in pick]
    n_st = 1 + len(a.strengths)
    for k in a.ks:
        space = WeightSpace(n_components=k, representation=a.representation, random_state=0)
        space.fit(Collection.from_adapters(zoo, names=names))
        space.set_labels(labels)
        params = []
        if a.orth_params:
            params = _param_directions(space, ew.zoo_instances, a.orth_params)
        for kind in a.kinds:
            fit_directions(space, labels, kind="filter" if kind == "filter" else "pattern", cv=5)
            if kind in SCRIPT_KINDS:
                _script_directions(space, labels, a.attrs)
            for attr in a.attrs:
                t0 = time.time()
                toolkit = [d for d in space.directions_ if "@" not in d and d not in params]
                others = correlated_attributes(labels, attr, 0.15, toolkit)
                if kind.startswith("joint"):  # a joint effect holds the others fixed itself
                    others = []
                others = others + params
                dname = attr if kind in TOOLKIT_KINDS else f"{attr}@{kind}"
                models, originals = [], []
                for ad in inputs[attr]:
                    start = ad
                    if a.project:  # the model's point in the space, its residual dropped
                        start = space.shift(ad, np.zeros(space.n_components_), keep_residual=False)
                    models.append(start)
                    models += [
                        edit_disentangled(
                            space, start, dname, st, others, rank=a.rank, energy=a.energy
                        )[0]
                        for st in a.strengths
                    ]
                    originals += [ad] * n_st
                kw = {"steps": 20, "guidance": 3.0}
                if a.inject is not None:  # original model while t > inject, edited after
                    kw.update(edited=models, inject_t=a.inject)
                    models = originals
                imgs = renderer.render(models, prompt, seeds, **kw).images
                u8 = (imgs * 255).round().clip(0, 255).astype(np.uint8).reshape(-1, 32, 32, 3)
                n_m = len(inputs[attr])
                emb = ev.embed("identity", u8).reshape(n_m, n_st, len(seeds), -1)
                if a.project:  # ID against the unedited LoRA itself, residual included
                    plain = renderer.render(inputs[attr], prompt, seeds, steps=20, guidance=3.0)
                    p8 = (plain.images * 255).round().clip(0, 255).astype(np.uint8)
                    ref = ev.embed("identity", p8.reshape(-1, 32, 32, 3))
                    ref = ref.reshape(n_m, len(seeds), -1)
                else:
                    ref = emb[:, 0]
                probs = ev.attributes("identity", u8)[:, cols.index(attr)]
                ok = probs.reshape(n_m, n_st, len(seeds)) > 0.5
                for j, st in enumerate([0.0, *a.strengths]):
                    rec = {
                        "k": k,
                        "representation": a.representation,
                        "rank": a.rank,
                        "energy": a.energy,
                        "kind": kind,
                        "models": "heldout" if a.heldout else "zoo",
                        "project": a.project,
                        "excluded_by": rules[attr],
                        "inject_t": a.inject,
                        "orth_params": a.orth_params,
                        "attr": attr,
                        "strength": st,
                        "success": float(ok[:, j].mean()),
                        "id": float(np.sum(emb[:, j] * ref, axis=-1).mean()),
                        "cv_score": space.directions_[attr].score,
                        "seconds": time.time() - t0,
                    }
                    print(json.dumps(rec), flush=True)
                    with open(a.out, "a") as fh:
                        fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
