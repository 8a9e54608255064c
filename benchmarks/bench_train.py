"""``w2wkit train`` throughput: models/hour vs a one-model-at-a-time PEFT loop and the bound.

The miniature world's base architecture (``BaseSettings()``, one training step: the step
time does not depend on the weights), pictures of ``--models`` identities exported as PNG
instance folders, the world's recipe (rank 1, ``to_q``/``to_v``, 4 pictures per model and
step). Three cases, all in this process:

- ``peft_one_model``: the anchor, :func:`w2wkit.testing.peft_dreambooth` (a peft adapter
  per model, diffusers' ``add_noise``; its training loop timed alone), times ``--models``;
- ``w2wkit_train``: :func:`w2wkit.train` with every model in one batch, timed whole
  (pipeline loading, picture decoding, VAE encoding, training, writing the files);
- ``w2wkit_train_steps_only``: the same, its ``--steps`` training steps alone (a run of
  twice the steps minus the first run: loading, decoding and writing cancel out);
- ``bare_unet_bound``: the bare UNet's forward and backward (to its input) through batches
  of the same shape, ``--steps`` times: what the training step cannot beat.

One JSON line per case (appended to ``results/train.jsonl``)::

    python benchmarks/bench_train.py --steps 20 --models 8
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import training_args, world_base


def main() -> None:
    a = training_args(__doc__, 20, "train.jsonl")
    import numpy as np
    import torch
    from PIL import Image

    from w2wkit.testing import peft_dreambooth
    from w2wkit.training import Recipe, train
    from w2wkit.world.lora import LoraSettings

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp())
    base, jobs, imgs = world_base(tmp, a.models)
    for j, im in zip(jobs, imgs, strict=True):
        d = tmp / "people" / j.name
        d.mkdir(parents=True)
        for k, pic in enumerate(im):
            Image.fromarray(pic).save(d / f"{k}.png")
    prompt = "a photo of sks person"
    ls = LoraSettings(steps=a.steps, threads=a.threads)

    # (a) the anchor: one model at a time
    peft_dreambooth(base, ls, imgs[0], prompt, seed=0)  # warm-up
    peft_s = 0.0
    for k in range(min(a.models, 3)):  # the loop's time per model is flat: 3 measure it
        peft_s += peft_dreambooth(base, ls, imgs[k], prompt, seed=k)[1]
    peft_per_model = peft_s / min(a.models, 3)

    # w2wkit train, all models in one batch, timed whole
    recipe = Recipe(steps=a.steps, batch=ls.batch, lr=ls.lr, targets=ls.targets)
    train(tmp / "people", base, tmp / "warm", Recipe(steps=1, targets=ls.targets),
          models_per_batch=2, device=a.device)  # fmt: skip
    t0 = time.perf_counter()
    train(tmp / "people", base, tmp / "out", recipe,
          models_per_batch=a.models, device=a.device)  # fmt: skip
    train_per_model = (time.perf_counter() - t0) / a.models
    # its training steps alone: a second run with twice the steps, the difference
    t0 = time.perf_counter()
    twice = dataclasses.replace(recipe, steps=2 * a.steps)
    train(tmp / "people", base, tmp / "out2", twice,
          models_per_batch=a.models, device=a.device)  # fmt: skip
    steps_per_model = (time.perf_counter() - t0) / a.models - train_per_model

    # (b) the bound: bare UNet forward + backward through batches of the same shape
    from w2wkit.diffusion.pipeline import load_pipeline

    pipe = load_pipeline(base, device=a.device)
    unet = pipe.unet.requires_grad_(False)
    n = a.models * ls.batch
    side = unet.config.sample_size
    x = torch.randn(n, unet.config.in_channels, side, side, device=a.device, requires_grad=True)
    tok = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        ehs = pipe.text_encoder(tok.to(a.device))[0].expand(n, -1, -1)
    t = torch.randint(0, 1000, (n,), device=a.device)
    unet(x, t, encoder_hidden_states=ehs).sample.square().mean().backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(a.steps):
        x.grad = None
        unet(x, t, encoder_hidden_states=ehs).sample.square().mean().backward()
    bound_per_model = (time.perf_counter() - t0) / a.models

    rows = []
    for case, sec in (
        ("peft_one_model", peft_per_model),
        ("w2wkit_train", train_per_model),
        ("w2wkit_train_steps_only", steps_per_model),
        ("bare_unet_bound", bound_per_model),
    ):
        rows.append(
            {
                "bench": "train",
                "case": case,
                "models": a.models,
                "steps": a.steps,
                "seconds_per_model": sec,
                "models_per_hour": 3600 / sec,
                "ratio_vs_peft_one_model": peft_per_model / sec,
                "fraction_of_bound": bound_per_model / sec,
                "threads": a.threads,
                "device": a.device,
                "numpy": np.__version__,
            }
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
            print(json.dumps(r), file=sys.stdout)


if __name__ == "__main__":
    main()
