"""``w2wkit train`` on an SDXL-architecture pipeline: models/hour vs a PEFT loop and the bound.

A small SDXL-architecture pipeline built from config with random weights
(:func:`w2wkit.testing.tiny_sdxl_pipeline`: two CLIP text encoders, the second with a
projection, a UNet with ``addition_embed_type="text_time"``; ``--channels``,
``--latent`` and ``--text-dims`` set its size; the step time does not depend on the
weights), ``--models`` instance folders of 4 random pictures, the paper's recipe on
``to_q``/``to_v`` (rank 1, ``--batch`` pictures per model and step). All cases in this
process, interleaved over ``--repeats`` rounds (medians reported):

- ``peft_one_model``: the anchor, :func:`w2wkit.testing.peft_dreambooth_sdxl` (a peft
  adapter per model in the style of diffusers' ``train_dreambooth_lora_sdxl.py``; its
  training loop timed alone, loading not counted), per model;
- ``w2wkit_train``: :func:`w2wkit.train` with every model in one batch, timed whole
  (pipeline loading, picture decoding, VAE encoding, training, writing the files);
- ``w2wkit_train_steps_only``: the same, its ``--steps`` training steps alone (a run of
  twice the steps minus the first run);
- ``engine_steps_only``: the engine's loop (:class:`w2wkit.diffusion.DreamBooth`, loaded
  once, every model in one batch), ``--steps + 1`` steps minus 1 step: the training steps
  without two whole runs' noise;
- ``bare_unet_bound``: the bare UNet's forward and backward (to its input) with the
  SDXL conditioning, through batches of the same shape, ``--steps`` times.

One JSON line per case (appended to ``results/train_sdxl.jsonl``)::

    python benchmarks/bench_train_sdxl.py --steps 20 --models 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2, help="pictures per model and step")
    ap.add_argument("--channels", default="32,64", help="UNet block channels")
    ap.add_argument("--latent", type=int, default=16, help="latent side (pictures are 2x)")
    ap.add_argument("--layers", type=int, default=1, help="UNet layers per block")
    ap.add_argument("--text-dims", default="32,48", help="hidden sizes of the two encoders")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--preset",
        choices=("tiny", "sdxl", "sd15"),
        default="tiny",
        help="tiny: --channels/--latent/--layers/--text-dims; sdxl: SDXL's UNet at 128x128 "
        "latents (1024 px); sd15: SD1.5's UNet at 64x64 latents (512 px) and the SD loops",
    )
    ap.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_sdxl.jsonl"))
    a = ap.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from w2wkit.diffusion.dreambooth import DreamBooth
    from w2wkit.testing import (
        SD15_UNET,
        SDXL_UNET,
        peft_dreambooth,
        peft_dreambooth_sdxl,
        tiny_pipeline,
        tiny_sdxl_pipeline,
    )
    from w2wkit.training import Recipe, train

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp())
    chans = tuple(int(c) for c in a.channels.split(","))
    dims = tuple(int(c) for c in a.text_dims.split(","))
    sdxl = a.preset != "sd15"
    if a.preset == "sdxl":  # SDXL's UNet; encoders of SDXL's widths, 2 layers each
        a.latent, chans, dims, a.layers = 128, (320, 640, 1280), (768, 1280), 2
        pipe = tiny_sdxl_pipeline(
            text_dims=dims, projection_dim=1280, time_embed_dim=256, sample_size=a.latent,
            unet_config=SDXL_UNET,
        )  # fmt: skip
    elif a.preset == "sd15":  # SD1.5's UNet; a 2-layer encoder of CLIP-L's width
        a.latent, chans, dims, a.layers = 64, (320, 640, 1280, 1280), (768,), 2
        pipe = tiny_pipeline(cross_attention_dim=768, sample_size=64, unet_config=SD15_UNET)
    else:
        pipe = tiny_sdxl_pipeline(
            block_out_channels=chans, sample_size=a.latent, text_dims=dims,
            layers_per_block=a.layers,
        )  # fmt: skip
    anchor = peft_dreambooth_sdxl if sdxl else peft_dreambooth
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.precision)
    cuda = str(a.device).startswith("cuda")

    def sync() -> None:
        """Wait for the GPU's queued work (CUDA runs asynchronously: a timer needs this)."""
        if cuda:
            torch.cuda.synchronize()

    def peak_gb() -> float:
        return torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")

    base = tmp / "xl"
    pipe.save_pretrained(base)
    side = 2 * a.latent
    rng = np.random.default_rng(0)
    imgs = []
    for j in range(a.models):
        d = tmp / "people" / f"p{j:03d}"
        d.mkdir(parents=True)
        pics = rng.integers(0, 255, (4, side, side, 3), dtype=np.uint8)
        imgs.append(pics)
        for k, pic in enumerate(pics):
            Image.fromarray(pic).save(d / f"{k}.png")
    prompt = "a photo of sks person"
    recipe = Recipe(
        steps=a.steps, batch=a.batch, lr=1e-4, targets=("to_q", "to_v"), precision=a.precision
    )

    # the bound's inputs: bare UNet, batches of the same shape, SDXL conditioning
    n = a.models * a.batch
    x = torch.randn(n, 4, a.latent, a.latent, device=a.device, requires_grad=True)
    with torch.no_grad():
        if sdxl:
            ehs, _, pooled, _ = pipe.encode_prompt(
                prompt=prompt, device="cpu", num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )  # fmt: skip
            pooled = pooled.to(a.device)
            cond = {
                "added_cond_kwargs": {
                    "text_embeds": pooled.expand(n, -1),
                    "time_ids": torch.tensor(
                        [[side, side, 0, 0, side, side]], dtype=torch.float32, device=a.device
                    ).expand(n, -1),
                }
            }
        else:
            tok = pipe.tokenizer
            ids = tok([prompt], padding="max_length", max_length=tok.model_max_length,
                      return_tensors="pt").input_ids  # fmt: skip
            ehs, cond = pipe.text_encoder(ids)[0], {}
    ehs = ehs.to(a.device).expand(n, -1, -1)  # the encoders ran on the CPU
    # the bare UNet in the run's precision (stored in bf16/fp16, run under autocast)
    unet = pipe.unet.to(a.device, dtype=half or torch.float32).requires_grad_(False)
    t = torch.randint(0, 1000, (n,), device=a.device)
    amp_device = str(a.device).split(":")[0]

    def bound() -> float:
        with torch.autocast(amp_device, dtype=half, enabled=half is not None):
            unet(x, t, encoder_hidden_states=ehs, **cond).sample.float().square().mean()
        sync()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            x.grad = None
            with torch.autocast(amp_device, dtype=half, enabled=half is not None):
                out = unet(x, t, encoder_hidden_states=ehs, **cond).sample
            out.float().square().mean().backward()
        sync()
        return (time.perf_counter() - t0) / a.models

    def run_train(r: int, steps: int) -> float:
        rec = dataclasses.replace(recipe, steps=steps)
        sync()
        t0 = time.perf_counter()
        train(tmp / "people", base, tmp / f"out{r}-{steps}", rec,
              models_per_batch=a.models, device=a.device)  # fmt: skip
        sync()
        return (time.perf_counter() - t0) / a.models

    engine = DreamBooth(base, targets=recipe.targets, device=a.device, precision=a.precision)

    def run_engine(steps: int) -> float:
        sync()
        t0 = time.perf_counter()
        engine.train(imgs, prompt, list(range(a.models)), steps=steps, batch=a.batch, lr=1e-4)
        sync()
        return time.perf_counter() - t0

    # warm-ups (imports, first allocations)
    run_engine(1)
    one_step = dataclasses.replace(recipe, steps=1)
    anchor(base, one_step, imgs[0], prompt, seed=0, device=a.device, precision=a.precision)
    run_train(-1, 1)
    times: dict[str, list[float]] = {k: [] for k in ("peft", "train", "steps", "engine", "bound")}
    peak: dict[str, float] = {}
    for r in range(a.repeats):
        k = r % a.models
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times["peft"].append(
            anchor(base, recipe, imgs[k], prompt, seed=k, device=a.device, precision=a.precision)[1]
        )
        peak["peft"] = peak_gb()  # one model (and the bound's resident UNet and inputs)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        whole = run_train(r, a.steps)
        peak["train"] = peak_gb()  # all models in one batch
        times["train"].append(whole)
        times["steps"].append(run_train(r, 2 * a.steps) - whole)
        times["bound"].append(bound())
        one = run_engine(1)
        times["engine"].append((run_engine(a.steps + 1) - one) / a.models)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for case, key in (
        ("peft_one_model", "peft"),
        ("w2wkit_train", "train"),
        ("w2wkit_train_steps_only", "steps"),
        ("engine_steps_only", "engine"),
        ("bare_unet_bound", "bound"),
    ):
        sec = med[key]
        rows.append(
            {
                "bench": "train_sdxl",
                "case": case,
                "models": a.models,
                "steps": a.steps,
                "batch": a.batch,
                "pipeline": f"{a.preset if a.preset != 'tiny' else 'sdxl-arch'} unet {chans} "
                f"x{a.layers} latent {a.latent} text {dims}",
                "precision": a.precision,
                "unet_params": sum(p.numel() for p in unet.parameters()),
                "seconds_per_model": sec,
                "models_per_hour": 3600 / sec,
                "ratio_vs_peft_one_model": med["peft"] / sec,
                "fraction_of_bound": med["bound"] / sec,
                "repeats": a.repeats,
                "threads": a.threads,
                "device": a.device,
                "gpu": torch.cuda.get_device_name() if cuda else None,
                "torch": torch.__version__,
                "peak_gpu_gb_one_model_peft": peak.get("peft"),
                "peak_gpu_gb_train_all_models": peak.get("train"),
                "peak_gpu_gb_per_model_train": (peak["train"] / a.models) if cuda else None,
            }
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), file=sys.stdout)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
