"""The shipped world's zoo models trained again through ``w2wkit.train``, and their fidelity.

For the first ``--models`` models of a concept: their training pictures (the zoo's renders)
are exported as PNG instance folders, :func:`w2wkit.train` trains them with the zoo's recipe
(the world's build log: rank, alpha, targets, steps, lr, batch, seeds, the concept's prompt;
the instances' name order is the zoo's numbering, so each model gets the zoo's seed), and the
world's fidelity protocol (:func:`w2wkit.world.measure.zoo_fidelity`, ``w2wkit world
measure``'s settings: 8 pictures x 16 references, 20 DDIM steps, CFG 3) scores them twice
with the same draws: the models trained here, then the shipped ones in their place. The
candidates of each model are drawn among the first ``--candidates`` models of the concept.
Also reported: the cosine between each module's delta-W trained here and shipped.

Nothing of the shipped world is changed. Only single-round recipes can be trained by
``w2wkit.train`` (the shipped dog zoo was continued for a second round, ``retrain-zoo
--continue``; ``tests/test_world_zoo_train.py`` reproduces one of its models through the
same training function instead)::

    python scripts/zoo_through_train.py --concept identity --models 8 --work /tmp/zt \\
        -o benchmarks/results/zoo_through_train_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concept", default="identity")
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--settings",
        choices=["measure", "build"],
        default="measure",
        help="fidelity settings: `world measure`'s (8 x 16) or the build profile's (2 x 4)",
    )
    ap.add_argument("--work", required=True, help="folder for the pictures and models")
    ap.add_argument("-o", "--out", required=True, help="JSON result")
    a = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from w2wkit.diffusion.bank import stack_factors
    from w2wkit.diffusion.sampler import Renderer
    from w2wkit.formats.registry import read_adapter
    from w2wkit.training import Recipe, train
    from w2wkit.world.measure import (
        FidelitySettings,
        _specs_from_names,
        fidelity_settings,
        zoo_fidelity,
    )
    from w2wkit.world.profiles import profile_from_log, zoo_jobs_for
    from w2wkit.world.retrain import recipe_rounds
    from w2wkit.world.shipped import load_world
    from w2wkit.world.zoo import render_job

    torch.set_num_threads(a.threads)
    w = load_world(None)
    prof = profile_from_log(w.build_log["profile"])
    concept, k, m = a.concept, a.models, max(a.candidates, a.models)
    rounds = recipe_rounds(w.stack_meta["concepts"][concept].get("recipe") or {})
    if len(rounds) > 1:
        raise SystemExit(f"the shipped {concept} zoo was trained in {len(rounds)} rounds")
    s = prof.zoo
    jobs = zoo_jobs_for(prof)[concept][:k]
    if any(j.number != i for i, j in enumerate(jobs)):
        raise SystemExit(f"the {concept} zoo's seeds do not start at 0: train would seed apart")
    work = Path(a.work)
    pics = work / "pictures"
    for j in jobs:
        d = pics / j.name
        d.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(render_job(j, s.n_images, s.seed)):
            Image.fromarray(im).save(d / f"{i:02d}.png")
    recipe = Recipe(
        rank=s.rank,
        alpha=s.alpha,
        targets=tuple(s.targets),
        steps=s.steps,
        batch=s.batch,
        lr=s.lr,
        instance_prompt=w.prompt(concept),
        resolution=32,
        init_seed=s.init_seed,
        seed=s.seed,
    )
    t0 = time.time()
    train(pics, w.pipeline_dir, work / "models", recipe, models_per_batch=k, format="diffusers",
          device="cpu")  # fmt: skip
    train_s = time.time() - t0

    names = w.names(concept)[:m]
    shipped = {t: (d[:m].copy(), u[:m].copy()) for t, (d, u) in w.stack(concept).items()}
    trained = {t: (d.copy(), u.copy()) for t, (d, u) in shipped.items()}
    cos = []
    for i in range(k):
        ad = read_adapter(work / "models" / f"{names[i]}.safetensors")
        for t in w.targets:
            layer = ad.layers[f"unet.{t}"]
            down, up = trained[t][0][i], trained[t][1][i]
            down[...] = layer.down.reshape(down.shape)
            up[...] = layer.up.reshape(up.shape)
            sd, su = shipped[t][0][i], shipped[t][1][i]
            dw = (up @ down.reshape(down.shape[0], -1)).ravel()
            sw = (su @ sd.reshape(sd.shape[0], -1)).ravel()
            cos.append(float(dw @ sw / (np.linalg.norm(dw) * np.linalg.norm(sw))))
    fs = FidelitySettings(models=k, candidates=m)
    if a.settings == "build":
        fs = replace(fidelity_settings(prof), models=k, candidates=m)
    specs = _specs_from_names(concept, names)
    renderer = Renderer(w.load_pipeline(device="cpu"), device="cpu")
    ev = w.evaluators(device="cpu")
    out = {
        "concept": concept,
        "models": k,
        "recipe": recipe.as_dict(),
        "train_seconds": train_s,
        "threads": a.threads,
        "torch": torch.__version__,
        "fidelity_settings": asdict(fs),
        "delta_w_cosine_vs_shipped": {"min": min(cos), "median": float(np.median(cos))},
    }
    keys = (
        "fidelity_top1",
        "fidelity_top1_per_image",
        "id_score_gen_vs_own_refs",
        "intra_model_id_score",
        "inter_model_id_score",
        "candidates",
        "fidelity_models",
    )
    for tag, st in (("through_train", trained), ("shipped", shipped)):
        bank = stack_factors(st, float(w.stack_meta["alpha"]))
        rng = np.random.default_rng(fs.seed)
        res, _, _ = zoo_fidelity(
            renderer, bank, ev, concept, specs, w.prompt(concept), fs, rng, tested=list(range(k))
        )
        out[tag] = {key: res[key] for key in keys}
        print(tag, json.dumps(out[tag]), flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
