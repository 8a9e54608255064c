"""``w2wkit train`` throughput: models/hour vs a one-model-at-a-time PEFT loop and the bound.

The miniature world's base architecture (``BaseSettings()``, one training step: the step
time does not depend on the weights), pictures of ``--models`` identities exported as PNG
instance folders, the world's recipe (rank 1, ``to_q``/``to_v``, 4 pictures per model and
step). Three cases, all in this process, timed in ``--rounds`` interleaved rounds (after a
warm-up of each; the order rotates from round to round) so that a contended machine slows
them alike:

- ``peft_one_model``: the anchor, :func:`w2wkit.testing.peft_dreambooth` (a peft adapter
  per model, diffusers' ``add_noise``; its training loop timed alone), one model per round;
- ``w2wkit_train``: :func:`w2wkit.train` with every model in one batch, timed whole
  (pipeline loading, picture decoding, VAE encoding, the shared initialisation, training,
  writing the files and the manifest);
- ``bare_unet_bound``: the bare UNet's forward and backward (to its input) through batches
  of the same shape, ``--steps`` times: what the training steps cannot beat.

Per case the median time per model over the rounds; ``fraction_of_bound`` is the median over
the rounds of (bound / case) within a round, ``fraction_of_bound_min`` the same from the
fastest round of each. One JSON line per case (appended to ``results/train.jsonl``)::

    python benchmarks/bench_train.py --steps 20 --models 8 --rounds 3
"""

from __future__ import annotations

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

    from w2wkit.diffusion.pipeline import load_pipeline
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
    recipe = Recipe(steps=a.steps, batch=ls.batch, lr=ls.lr, targets=ls.targets)

    # the bound's inputs: batches of the training step's shape
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

    def peft_case(r: int) -> float:  # seconds per model: one model
        return peft_dreambooth(base, ls, imgs[r % a.models], prompt, seed=r)[1]

    def train_case(r: int) -> float:
        t0 = time.perf_counter()
        train(tmp / "people", base, tmp / f"out{r}", recipe,
              models_per_batch=a.models, device=a.device)  # fmt: skip
        return (time.perf_counter() - t0) / a.models

    def bound_case(r: int) -> float:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            x.grad = None
            unet(x, t, encoder_hidden_states=ehs).sample.square().mean().backward()
        return (time.perf_counter() - t0) / a.models

    cases = {
        "peft_one_model": peft_case,
        "w2wkit_train": train_case,
        "bare_unet_bound": bound_case,
    }
    # warm-up: one of each (first-call allocations, caches)
    peft_dreambooth(base, ls, imgs[0], prompt, seed=0)
    train(tmp / "people", base, tmp / "warm", Recipe(steps=1, targets=ls.targets),
          models_per_batch=a.models, device=a.device)  # fmt: skip
    bound_case(-1)
    times: dict[str, list[float]] = {c: [] for c in cases}
    names = list(cases)
    for r in range(a.rounds):
        for c in names[r % len(names) :] + names[: r % len(names)]:
            times[c].append(cases[c](r))
    bound = np.array(times["bare_unet_bound"])
    peft = np.array(times["peft_one_model"])
    rows = []
    for case, secs in times.items():
        s = np.array(secs)
        med = float(np.median(s))
        rows.append(
            {
                "bench": "train",
                "case": case,
                "models": a.models,
                "steps": a.steps,
                "rounds": a.rounds,
                "interleaved": True,
                "seconds_per_model": med,
                "seconds_per_model_rounds": [round(v, 4) for v in secs],
                "models_per_hour": 3600 / med,
                "ratio_vs_peft_one_model": float(np.median(peft / s)),
                "fraction_of_bound": float(np.median(bound / s)),
                "fraction_of_bound_min": float(bound.min() / s.min()),
                "threads": a.threads,
                "device": a.device,
                "torch": torch.__version__,
            }
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), file=sys.stdout)


if __name__ == "__main__":
    main()
