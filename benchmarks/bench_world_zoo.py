"""Zoo training throughput: batched multi-model trainer vs one model at a time (peft).

Both at the planned base size (``BaseSettings()`` architecture, untrained
weights: the step time does not depend on them), the zoo recipe's batch of 4,
one torch thread. The anchor is :func:`w2wkit.testing.peft_dreambooth` (a peft
adapter, diffusers' ``add_noise``, one model per run, its loop timed alone)
measured in the same run. One JSON line per case::

    python benchmarks/bench_world_zoo.py --steps 10 --models 8
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from _common import training_args, world_base


def main() -> None:
    a = training_args(__doc__, 10, "world_zoo.jsonl")
    import torch

    from w2wkit.testing import peft_dreambooth
    from w2wkit.world.lora import LoraSettings
    from w2wkit.world.zoo import ZooSettings, ZooTrainer

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp())
    base, _, imgs = world_base(tmp, a.models)
    rows = []
    ls = LoraSettings(steps=a.steps, threads=a.threads)
    peft_dreambooth(base, ls, imgs[0], "sks person", seed=0)  # warm-up
    _, seconds = peft_dreambooth(base, ls, imgs[1], "sks person", seed=1)
    anchor = seconds / a.steps  # seconds per step, one model
    zt = ZooTrainer(base, ZooSettings(steps=a.steps, threads=a.threads, device=a.device))
    zt.train_chunk(imgs[:2], "sks person", [0, 1])  # warm-up
    t0 = time.perf_counter()
    zt.train_chunk(imgs, "sks person", list(range(a.models)))
    per_model_step = (time.perf_counter() - t0) / a.steps / a.models
    for name, sec in (("peft_one_model", anchor), ("batched_zoo", per_model_step)):
        rows.append(
            {
                "bench": "world_zoo",
                "case": name,
                "models_per_chunk": 1 if name.startswith("peft") else a.models,
                "steps_measured": a.steps,
                "seconds_per_model_step": sec,
                "models_per_hour_at_150_steps": 3600 / (150 * sec),
                "anchor_seconds_per_model_step": anchor,
                "ratio_speedup_vs_anchor": anchor / sec,
                "threads": a.threads,
                "device": a.device,
            }
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
            print(json.dumps(r), file=sys.stdout)


if __name__ == "__main__":
    main()
