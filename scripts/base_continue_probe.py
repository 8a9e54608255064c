"""Probe: does more base-model training lift zoo fidelity? Continue the shipped base.

The shipped world's base UNet + text encoder were trained for 5,726 steps of batch 8
(cut by the GPU build's time budget). This script renders the same base dataset
(``BaseSettings()``, seed 0), encodes it with the shipped VAE and continues
training the UNet and text encoder with the build's own :func:`train_unet`
(fresh AdamW, warm-up + cosine), then saves the pipeline. Measure it with
``ZOO_BASE=OUT scripts/zoo_recipe_probe.py ...`` against the same probe on the
shipped base (docs/world.md, "Choosing the zoo recipe").

Usage::

    python scripts/base_continue_probe.py OUT [STEPS] [LR] [BATCH] [BUDGET_S]

``$BASE_FROM`` starts from another pipeline folder (e.g. an earlier OUT) instead of the
shipped base.

Defaults: 20,000 steps (a cap), lr 2.5e-4, batch 8, budget 1500 s (the step count
is cut to what fits, the schedule compressed: :func:`train_unet`). Threads: 2.
Not part of a world build: a continued base is not reproducible from the seed
alone; this only tells whether the build's base training is the lever.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv: list[str]) -> dict:
    """Continue training, save the pipeline to ``argv[0]``; returns the log."""
    import torch
    from diffusers import StableDiffusionPipeline

    from w2wkit.world.base_model import (
        BaseSettings,
        encode_latents,
        render_dataset,
        save_pipeline,
        train_unet,
    )
    from w2wkit.world.shipped import load_world

    out = argv[0]
    steps = int(argv[1]) if len(argv) > 1 else 20_000
    lr = float(argv[2]) if len(argv) > 2 else 2.5e-4
    batch = int(argv[3]) if len(argv) > 3 else 8
    budget = float(argv[4]) if len(argv) > 4 else 1500.0
    torch.set_num_threads(2)
    world = load_world(verify=False)
    start = os.environ.get("BASE_FROM") or str(world.pipeline_dir)
    pipe = StableDiffusionPipeline.from_pretrained(
        start, torch_dtype=torch.float32, local_files_only=True
    )
    settings = BaseSettings(unet_steps=steps, unet_lr=lr, unet_batch=batch, threads=2)
    t0 = time.perf_counter()
    data = render_dataset(settings)
    raw = encode_latents(pipe.vae, data.images)
    latents = raw * float(pipe.vae.config.scaling_factor)
    log = {
        "from": start,
        "render_encode_s": time.perf_counter() - t0,
        "steps_cap": steps,
        "lr": lr,
    }
    log["unet"] = train_unet(
        pipe.unet,
        pipe.text_encoder,
        pipe.tokenizer,
        latents,
        data,
        settings,
        lambda msg: print(msg, flush=True),
        "cpu",
        budget,
    )
    save_pipeline(pipe, out, overwrite=True)
    with open(f"{out}/continue_log.json", "w") as fh:
        json.dump(log, fh, indent=2)
    return log


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
