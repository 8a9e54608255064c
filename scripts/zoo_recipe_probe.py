"""Probe a zoo recipe on the shipped base: train k models in one chunk, measure fidelity.

Usage::

    OMP_NUM_THREADS=1 python scripts/zoo_recipe_probe.py NAME ALPHA LR STEPS BATCH \
        TARGETS K CONCEPT [RANK]

e.g. ``b1s600qkvp 27 1e-3 600 1 to_q,to_k,to_v,proj 12 identity``. The first K instances of
seed 0 are trained with :class:`ZooTrainer`; fidelity is the build's test (top-1 among the
first 50 instances by ID score against the mean of 4 reference renders, 2 generations per
model). One JSON line is appended to ``$ZOOFIX_OUT/results.jsonl`` (default /tmp/zoofix);
the factors and generations are saved beside it. ``$ZOO_PROMPT`` replaces the instance prompt
(training and generation; default ``sks person`` / ``sks dog``). ``$ZOO_BASE`` names
another base pipeline folder (default: the shipped world's; e.g. the output of
``scripts/base_continue_probe.py``). Used for docs/world.md ("Choosing the zoo recipe").
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def main(argv: list[str]) -> dict:
    """Train, generate, measure; returns the result record."""
    import torch

    from w2wkit.concepts import get_pack
    from w2wkit.diffusion import Renderer, stack_factors
    from w2wkit.world.measure import FidelitySettings, generate
    from w2wkit.world.pictures import render_instances
    from w2wkit.world.shipped import load_world
    from w2wkit.world.zoo import (
        ZooSettings,
        ZooTrainer,
        _model_seed,
        render_job,
        zoo_jobs,
    )

    torch.set_num_threads(1)
    out = os.environ.get("ZOOFIX_OUT", "/tmp/zoofix")
    os.makedirs(out, exist_ok=True)
    name, alpha, lr, steps, batch = (
        argv[0],
        float(argv[1]),
        float(argv[2]),
        int(argv[3]),
        int(argv[4]),
    )
    targets, k_models, concept = tuple(argv[5].split(",")), int(argv[6]), argv[7]
    rank = int(argv[8]) if len(argv) > 8 else 1
    world = load_world(verify=False)
    s = ZooSettings(
        rank=rank, alpha=alpha, lr=lr, steps=steps, batch=batch, targets=targets, device="cpu"
    )
    tr = ZooTrainer(os.environ.get("ZOO_BASE") or world.pipeline_dir, s)
    tr.pipe.to(dtype=torch.float32)  # the shipped pipeline is float16
    tr.init_down = {t: v.float() for t, v in tr.init_down.items()}
    n_cand = 50
    jobs = zoo_jobs(concept, n_cand, inst_seed=0)
    train = jobs[:k_models]
    prompt = os.environ.get("ZOO_PROMPT") or get_pack(concept).instance_prompt
    t0 = time.perf_counter()
    adapters, losses = tr.train_chunk(
        [render_job(j, s.n_images, s.seed) for j in train],
        prompt,
        [_model_seed(s, j) for j in train],
    )
    dt = time.perf_counter() - t0
    stacks = {
        t: (
            np.stack([a.layers[f"unet.{t}"].down for a in adapters]),
            np.stack([a.layers[f"unet.{t}"].up for a in adapters]),
        )
        for t in tr.targets
    }
    np.savez(
        f"{out}/{name}_{concept}.npz",
        **{f"A|{t}": v[0] for t, v in stacks.items()},
        **{f"B|{t}": v[1] for t, v in stacks.items()},
    )
    tr.release()
    renderer = Renderer(tr.pipe, device="cpu")
    k = 2
    model = np.repeat(np.arange(k_models), k)
    seeds = np.tile(np.arange(k), k_models) + 10_000
    bank = stack_factors(stacks, alpha)
    gen = generate(renderer, bank, model, prompt, seeds, FidelitySettings())
    ev = world.evaluators("cpu")
    refs = render_instances(concept, [(j.index, j.inst_seed) for j in jobs], 4, s.seed + 999, 32, 1)
    ref = ev.embed(concept, refs.reshape(-1, 32, 32, 3)).reshape(n_cand, 4, -1).mean(1)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    g = ev.embed(concept, gen).reshape(k_models, k, -1)
    hits = [int(np.argmax((g[a] @ ref.T).mean(0)) == a) for a in range(k_models)]
    flat = g.reshape(k_models * k, -1)
    cos = flat @ flat.T
    own = np.repeat(np.arange(k_models), k)
    same = (own[:, None] == own[None]) & ~np.eye(len(own), dtype=bool)
    diff = own[:, None] != own[None]
    res = {
        "name": name,
        "concept": concept,
        "alpha": alpha,
        "lr": lr,
        "steps": steps,
        "batch": batch,
        "targets": list(targets),
        "rank": rank,
        "n_models": k_models,
        "candidates": n_cand,
        "fidelity_top1": float(np.mean(hits)),
        "own_ref_score": float(np.mean([g[a] @ ref[a] for a in range(k_models)])),
        "intra": float(cos[same].mean()),
        "inter": float(cos[diff].mean()),
        "loss": float(np.mean(losses)),
        "train_s": dt,
        "models_per_hour": 3600 * k_models / dt,
        "n_modules": len(tr.targets),
        "prompt": prompt,
        "base": os.environ.get("ZOO_BASE") or "shipped",
    }
    with open(f"{out}/results.jsonl", "a") as fh:
        fh.write(json.dumps(res) + "\n")
    np.savez(f"{out}/{name}_{concept}_gen.npz", gen=gen)
    return res


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
