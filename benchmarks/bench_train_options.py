"""What each option of ``w2wkit train`` beyond the paper's recipe costs per training step.

The miniature world's base architecture (untrained; ``_common.world_base``), ``--models``
identities trained together in one batch through the engine's loop
(:class:`w2wkit.diffusion.dreambooth.DreamBooth`). Anchor: the paper's recipe, measured in
the same process, interleaved round by round with each option, so the ratios hold on a
contended machine. Options: per-picture captions (every picture its own prompt), ``flip``,
``random_crop`` (pictures 8 px wider than the crop: the crop is VAE-encoded every step),
prior preservation (as many class samples as instance samples), a text-encoder LoRA.

Run: ``python benchmarks/bench_train_options.py [--steps 6] [--models 8] [--threads 1]``;
writes ``results/train_options.json``: seconds per batch step (median over rounds) and the
ratio to the anchor.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, training_args, world_base


def main() -> None:
    args = training_args(__doc__, steps=6, results="train_options.json")
    import torch

    from w2wkit.diffusion.dreambooth import TEXT_ENCODER_TARGETS, DreamBooth

    torch.set_num_threads(args.threads)
    rounds = 5
    with tempfile.TemporaryDirectory() as tmp:
        base, _jobs, pics = world_base(Path(tmp), args.models)
        targets = ("to_q", "to_k", "to_v", "to_out.0")
        plain = DreamBooth(base, targets=targets, device=args.device)
        te = DreamBooth(
            base, targets=targets, device=args.device, text_encoder_targets=TEXT_ENCODER_TARGETS
        )
        size = pics[0].shape[1]
        wide = [np.pad(p, ((0, 0), (0, 0), (4, 4), (0, 0)), mode="edge") for p in pics]
        prompt = "a photo of sks person"
        captions = [
            [f"{prompt}, picture {k} of {j}" for k in range(len(p))] for j, p in enumerate(pics)
        ]
        prior = np.concatenate([p[:2] for p in pics])
        seeds = list(range(len(pics)))
        cases = {
            "paper recipe (anchor)": (plain, pics, {}),
            "captions": (plain, pics, {"prompts": captions}),
            "flip": (plain, pics, {"flip": True}),
            "random crop": (plain, [list(w) for w in wide], {"crop_size": size}),
            "prior preservation": (
                plain,
                pics,
                {"prior": prior, "class_prompt": "a photo of a person", "prior_weight": 1.0},
            ),
            "text encoder": (te, pics, {}),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for trainer, imgs, kw in cases.values():  # warm-up: allocation, caches
            trainer.train(imgs, prompt, seeds, steps=1, batch=1, lr=1e-4, **kw)
            trainer.release()
        for _ in range(rounds):
            for name, (trainer, imgs, kw) in cases.items():
                t0 = time.perf_counter()
                trainer.train(imgs, prompt, seeds, steps=args.steps, batch=1, lr=1e-4, **kw)
                times[name].append((time.perf_counter() - t0) / args.steps)
                trainer.release()
    anchor = statistics.median(times["paper recipe (anchor)"])
    rows = {
        k: {
            "s_per_step": statistics.median(v),
            "ratio_to_anchor": statistics.median(v) / anchor,
            "rounds_s_per_step": v,
        }
        for k, v in times.items()
    }
    report = {
        "machine": machine(),
        "contended": "shared 2-core machine, other sessions running",
        "models": args.models,
        "steps": args.steps,
        "rounds": rounds,
        "threads": args.threads,
        "device": args.device,
        "picture_size": size,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for k, r in rows.items():
        print(f"{k:24s} {r['s_per_step'] * 1000:8.1f} ms/step  x{r['ratio_to_anchor']:.2f}")


if __name__ == "__main__":
    main()
