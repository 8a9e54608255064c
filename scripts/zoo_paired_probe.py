"""Paired probe of a zoo recipe against the shipped zoo, with the fidelity test's own settings.

Usage::

    OMP_NUM_THREADS=1 python scripts/zoo_paired_probe.py NAME --concept dog --k 40 \
        [--steps 600] [--lr 1e-3] [--batch 1] [--n-images 10] [--alpha A] [--baseline]

The ``k`` tested instances are the first ``k`` of the shipped zoo in ``w2wkit world
measure``'s draw order (``default_rng(123).permutation``). Each is retrained with the given
recipe (rank and targets as shipped; the model's own seed as in the build) and scored like
``w2wkit world measure`` scores a model: 8 generations (seeds 10000..10007, 20 DDIM steps,
CFG 3, the world's instance prompt) matched among 50 candidates (itself and 49 other zoo
instances, the same draw for every recipe) by ID score against the mean embedding of 16
reference renders (nuisance seed 999). ``--baseline`` scores the shipped factors of the same
instances in the same way, so two recipes are compared on the same instances, seeds and
candidates (a paired comparison). One JSON line per scored zoo goes to
``$ZOOFIX_OUT/paired.jsonl`` (default /tmp/zoofix) with the per-model hits. Used for
docs/world.md ("Retraining a concept's zoo").
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _score(pipe, stacks, alpha, targets, ev, concept, prompt, refs_emb, test, cands):
    from w2wkit.diffusion import Renderer, stack_factors
    from w2wkit.world.measure import FidelitySettings, generate

    renderer = Renderer(pipe, device=str(pipe.unet.device))
    bank = stack_factors({t: stacks[t] for t in targets}, alpha)
    k = 8
    model = np.repeat(np.arange(len(test)), k)
    seeds = np.tile(np.arange(k), len(test)) + 10_000
    t0 = time.time()
    gen = generate(renderer, bank, model, prompt, seeds, FidelitySettings(steps=20, guidance=3.0))
    t_gen = time.time() - t0
    g = ev.embed(concept, gen).reshape(len(test), k, -1)
    hits, single, own = [], [], []
    for a, mi in enumerate(test):
        per = g[a] @ refs_emb[cands[a]].T  # (k, 50), column 0 is the model's own instance
        hits.append(int(np.argmax(per.mean(0)) == 0))
        single.extend((np.argmax(per, axis=1) == 0).astype(int).tolist())
        own.append(float(g[a].mean(0) @ refs_emb[mi]))
    flat = g.reshape(-1, g.shape[-1])
    cos = flat @ flat.T
    o = np.repeat(np.arange(len(test)), k)
    same = (o[:, None] == o[None]) & ~np.eye(len(o), dtype=bool)
    return {
        "fidelity_top1": float(np.mean(hits)),
        "fidelity_top1_per_image": float(np.mean(single)),
        "own_ref_score": float(np.mean(own)),
        "intra": float(cos[same].mean()),
        "inter": float(cos[o[:, None] != o[None]].mean()),
        "hits": hits,
        "generation_seconds": t_gen,
    }, gen


def main() -> None:
    """Parse the arguments, train, score and append the result lines."""
    import torch

    from w2wkit.world.measure import _specs_from_names
    from w2wkit.world.pictures import render_instances
    from w2wkit.world.shipped import load_world
    from w2wkit.world.zoo import ZooJob, ZooSettings, ZooTrainer, _model_seed, render_job

    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--concept", default="dog")
    p.add_argument("--k", type=int, default=40)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--n-images", type=int, default=10)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--baseline", action="store_true")
    p.add_argument("--no-train", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    out = Path(os.environ.get("ZOOFIX_OUT", "/tmp/zoofix"))
    out.mkdir(parents=True, exist_ok=True)
    w = load_world(verify=False)
    c = a.concept
    names = w.names(c)
    specs = _specs_from_names(c, names)
    m = len(names)
    test = np.random.default_rng(123).permutation(m)[: a.k]
    rng = np.random.default_rng(7)
    cands = [
        np.concatenate([[mi], rng.choice(np.delete(np.arange(m), mi), 49, replace=False)])
        for mi in test
    ]
    ev = w.evaluators("cpu")
    ref_path = out / f"refs_{c}.npy"
    if ref_path.exists():
        refs_emb = np.load(ref_path)
    else:
        refs = render_instances(c, specs, 16, 999, 32, 1)
        refs_emb = ev.embed(c, refs.reshape(-1, 32, 32, 3)).reshape(m, 16, -1).mean(1)
        refs_emb /= np.linalg.norm(refs_emb, axis=1, keepdims=True)
        np.save(ref_path, refs_emb)
    meta = w.stack_meta
    alpha_shipped = float(meta["alpha"])
    prompt = w.prompt(c)
    pipe = w.load_pipeline(device="cpu")
    lines = []
    if a.baseline:
        full = w.stack(c)
        stacks = {t: (v[0][test], v[1][test]) for t, v in full.items()}
        res, _ = _score(
            pipe, stacks, alpha_shipped, w.targets, ev, c, prompt, refs_emb, test, cands
        )
        lines.append({"name": "shipped", "concept": c, "k": len(test), **res})
        print(json.dumps({k: v for k, v in lines[-1].items() if k != "hits"}), flush=True)
    if not a.no_train:
        alpha = a.alpha if a.alpha is not None else alpha_shipped
        s = ZooSettings(
            rank=int(meta.get("rank", 1)),
            alpha=alpha,
            lr=a.lr,
            steps=a.steps,
            batch=a.batch,
            n_images=a.n_images,
            targets=tuple(sorted({t.rsplit(".", 1)[-1] for t in w.targets})),
            device="cpu",
            threads=1,
        )
        tr = ZooTrainer(w.pipeline_dir, s)
        tr.pipe.to(dtype=torch.float32)
        tr.init_down = {t: v.float() for t, v in tr.init_down.items()}
        jobs = [ZooJob(names[i], c, specs[i][0], specs[i][1], int(i)) for i in test]
        t0 = time.time()
        adapters, losses = tr.train_chunk(
            [render_job(j, s.n_images, s.seed) for j in jobs],
            prompt,
            [_model_seed(s, j) for j in jobs],
        )
        t_train = time.time() - t0
        stacks = {
            t: (
                np.stack([ad.layers[f"unet.{t}"].down for ad in adapters]),
                np.stack([ad.layers[f"unet.{t}"].up for ad in adapters]),
            )
            for t in tr.targets
        }
        res, _ = _score(pipe, stacks, alpha, tr.targets, ev, c, prompt, refs_emb, test, cands)
        lines.append(
            {
                "name": a.name,
                "concept": c,
                "k": len(test),
                "steps": a.steps,
                "lr": a.lr,
                "batch": a.batch,
                "n_images": a.n_images,
                "alpha": alpha,
                "loss": float(np.mean(losses)),
                "train_seconds": t_train,
                **res,
            }
        )
        print(json.dumps({k: v for k, v in lines[-1].items() if k != "hits"}), flush=True)
    with open(out / "paired.jsonl", "a") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
