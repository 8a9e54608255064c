"""Benchmark: render many different LoRA models, batched vs diffusers' per-model loop.

Case ``render``: ``--models`` different rank-1 LoRAs (``to_q``/``to_v`` of every
attention module, alpha 27: the paper's layout), each rendered for the same
prompts and seeds, two ways in the same run:

* **batched** - :class:`w2wkit.render.Renderer`: all models in shared batches,
  each sample with its own LoRA weights (files read by w2wkit);
* **anchor** - diffusers' loop per model: ``load_lora_weights(file)`` ->
  ``pipe(prompt, num_images_per_prompt=n_seeds, generator=[...])`` ->
  ``unload_lora_weights()``.

Both start from the same LoRA files on disk and produce the same images (the
largest absolute pixel difference is printed as ``max_abs_diff``). One JSON
line per pipeline with images/s of both and ``ratio`` = anchor time / batched
time (target >= 5). ``base_model_s`` renders the same images with no LoRA
through the same batches: the floor of any per-model renderer, so
``best_possible_ratio`` = anchor / floor bounds ``ratio`` when the UNet's
compute, not per-call overhead, dominates (CPU at larger sizes), and
``lora_overhead`` is what the per-sample LoRA costs over the bare model.

Pipelines (random weights, built in code, nothing downloaded):

* ``tiny`` - :func:`w2wkit.testing.tiny_pipeline` (16x16 images, UNet channels
  8/16, attention at 8x8 and 4x4);
* ``small`` - the same classes a size up, close to the miniature world's model:
  32x32 images (16x16x4 latents), UNet channels 32/64 with attention at 8x8,
  CLIP width 32;
* ``world`` - the shipped miniature world's own pipeline (trained weights,
  32x32 images) and the first ``--models`` LoRAs of its identity zoo, written
  out as diffusers files: the issue's "miniature pipeline";
* ``--sd15`` - full Stable Diffusion 1.5 sizes: the SD1.5 UNet
  (``UNet2DConditionModel`` with block channels 320/640/1280/1280, 2 layers per
  block, 8 attention heads, cross-attention 768 - diffusers' default config with
  SD1.5's cross-attention width), the SD1.5 VAE (128/256/512/512, 4 latent
  channels) and a CLIP ViT-L/14-sized text encoder (768 wide, 12 layers, 77
  tokens) whose vocabulary is the tiny offline one (so its embedding table is
  small; everything else is full size). DDIM scheduler with SD1.5's betas.
  Meant for a GPU: ``--sd15 --device cuda --dtype float16 --size 512 --steps 25``.

Examples
--------
CPU, the default cases::

    OMP_NUM_THREADS=1 python benchmarks/bench_render.py

GPU at SD1.5 size::

    python benchmarks/bench_render.py --sd15 --device cuda --dtype float16 --size 512 --steps 25

SD1.5 path on CPU at toy settings (proves it runs)::

    python benchmarks/bench_render.py --sd15 --size 64 --steps 2 --models 2 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def sd15_pipeline(device: str, dtype: Any, seed: int = 0) -> Any:
    """A randomly initialised pipeline with Stable Diffusion 1.5's architecture."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from w2wkit.testing import tiny_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="w2w-sd15-tok-"))
    tiny_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=(
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ),
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device, dtype)


def build_pipeline(kind: str, device: str, dtype: Any) -> Any:
    """``tiny``, ``small`` or ``sd15``."""
    from w2wkit.testing import tiny_pipeline

    if kind == "sd15":
        return sd15_pipeline(device, dtype)
    if kind == "world":
        from w2wkit.world.shipped import load_world

        return load_world().load_pipeline(device=device, dtype=str(dtype).replace("torch.", ""))
    if kind == "tiny":
        pipe = tiny_pipeline(seed=0)
    elif kind == "small":
        pipe = tiny_pipeline(
            seed=0, block_out_channels=(32, 64), sample_size=16, cross_attention_dim=32
        )
    else:
        raise ValueError(kind)
    return pipe.to(device, dtype)


def write_models(pipe: Any, n: int, folder: Path, kind: str = "tiny") -> list[Path]:
    """``n`` rank-1 LoRAs on ``to_q``/``to_v``, written as diffusers files.

    Random (alpha 27) for the random pipelines, the zoo's first ``n`` identity
    models for ``world``.
    """
    from w2wkit.formats import write_adapter

    if kind == "world":
        from w2wkit.world.shipped import load_world

        return load_world().export_loras(folder / "zoo", "identity", models=list(range(n)))
    from w2wkit.testing import attention_modules, module_shapes, random_adapter

    shapes = module_shapes(pipe, attention_modules(pipe, ("to_q", "to_v")))
    files = []
    for i in range(n):
        ad = random_adapter(shapes, rank=1, alpha=27.0, seed=100 + i, scale=0.05)
        f = folder / f"model_{i:03d}.safetensors"
        write_adapter(ad, f, format="diffusers")
        files.append(f)
    return files


def run_case(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    import torch

    from w2wkit.diffusion import Renderer, resolve_device
    from w2wkit.diffusion import quiet as _quiet
    from w2wkit.diffusion import torch_dtype as _torch_dtype

    device = resolve_device(args.device)
    dtype = _torch_dtype(args.dtype)
    t0 = time.perf_counter()
    with _quiet():
        pipe = build_pipeline(kind, device, dtype)
    build_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    prompts = args.prompt or ["a photo of sks person"]
    seeds = [int(s) for s in args.seeds.split(",")]
    size = args.size
    height = width = size
    steps = args.steps

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory(prefix="w2w-bench-render-") as tmp:
        files = write_models(pipe, args.models, Path(tmp), kind)
        renderer = Renderer(pipe, device=device, dtype=dtype)
        kw = {"steps": steps, "guidance": args.guidance, "height": height, "width": width}

        def batched() -> np.ndarray:
            res = renderer.render(files, prompts, seeds, batch_size=args.batch_size, **kw)
            return res.images

        def anchor() -> np.ndarray:
            out = []
            for f in files:
                with _quiet():
                    pipe.load_lora_weights(str(f), adapter_name="bench")
                rows = []
                for p in prompts:
                    gens = [torch.Generator().manual_seed(s) for s in seeds]
                    imgs = pipe(
                        p,
                        num_images_per_prompt=len(seeds),
                        generator=gens,
                        num_inference_steps=steps,
                        guidance_scale=args.guidance,
                        height=height,
                        width=width,
                        output_type="np",
                    ).images
                    rows.append(imgs)
                pipe.unload_lora_weights()
                out.append(np.stack(rows))
            return np.stack(out)

        def base_only() -> np.ndarray:
            # the floor: the same images through the same batches with no LoRA at all
            nones = [None] * len(files)
            return renderer.render(nones, prompts, seeds, batch_size=args.batch_size, **kw).images

        timings: dict[str, list[float]] = {"batched": [], "anchor": [], "base": []}
        results: dict[str, np.ndarray] = {}
        # one warm-up round of each, then alternate
        for rnd in range(args.repeats + 1):
            for name, fn in (("anchor", anchor), ("batched", batched), ("base", base_only)):
                sync()
                t = time.perf_counter()
                results[name] = fn()
                sync()
                if rnd > 0:
                    timings[name].append(time.perf_counter() - t)
    n_images = args.models * len(prompts) * len(seeds)
    b, a, f = min(timings["batched"]), min(timings["anchor"]), min(timings["base"])
    diff = float(np.abs(results["batched"].astype(np.float64) - results["anchor"]).max())
    return {
        "case": "render_many_models",
        "pipeline": kind,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "models": args.models,
        "prompts": len(prompts),
        "seeds": len(seeds),
        "images": n_images,
        "size": int(results["batched"].shape[-2]),
        "steps": steps,
        "guidance": args.guidance,
        "batch_size": args.batch_size,
        "build_s": round(build_s, 2),
        "batched_s": round(b, 4),
        "batched_images_per_s": round(n_images / b, 3),
        "anchor": "diffusers load_lora_weights -> generate -> unload_lora_weights per model",
        "anchor_s": round(a, 4),
        "anchor_images_per_s": round(n_images / a, 3),
        "ratio": round(a / b, 2),
        "target_ratio": 5.0,
        "base_model_s": round(f, 4),
        "lora_overhead": round(b / f - 1.0, 3),
        "best_possible_ratio": round(a / f, 2),
        "max_abs_diff": diff,
        "repeats": args.repeats,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--pipeline", action="append", choices=["tiny", "small", "world"], help="CPU cases"
    )
    p.add_argument("--sd15", action="store_true", help="full SD1.5-size pipeline (random)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--dtype", default=None, help="float32 (cpu default), float16 (cuda default)")
    p.add_argument("--models", type=int, default=16)
    p.add_argument("--prompt", action="append", help="prompt (repeatable)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=None, help="default 10 (25 with --sd15)")
    p.add_argument("--size", type=int, default=None, help="image side (default: pipeline's)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batch-size", type=int, default=32, help="images per batched UNet call")
    p.add_argument("--repeats", type=int, default=1, help="timed rounds after a warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.dtype is None:
        args.dtype = "float16" if args.device.startswith("cuda") else "float32"
    if args.steps is None:
        args.steps = 25 if args.sd15 else 10
    kinds = ["sd15"] if args.sd15 else (args.pipeline or ["tiny", "small", "world"])
    for kind in kinds:
        print(json.dumps(run_case(args, kind)), flush=True)


if __name__ == "__main__":
    main()
