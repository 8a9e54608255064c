"""Benchmark: inversion wall time per image, a batch of images vs one image at a time.

Both methods run :func:`w2wkit.invert.invert` with the same settings, seeds and
a fixed number of steps (early stopping off, so both do the same work); the
batched run inverts ``--images`` images together (each its own coefficients
and per-sample LoRA), the anchor inverts the same images one call each, in the
same process. Both give the same coefficients (max abs difference reported).
One JSON line per case::

    {"bench": "invert", "pipeline": ..., "per_image_s": ..., "anchor_per_image_s": ...,
     "ratio": anchor / batched, ...}

Cases:

* ``tiny`` - ``w2wkit.testing.tiny_pipeline`` (16x16 images).
* ``miniature`` - the miniature world's base-model architecture
  (``w2wkit.world.base_model.BaseSettings()``: 32x32 images, UNet (64, 128), 16
  ``to_q``/``to_v`` targets) with random weights.
* ``--sd15`` - full Stable Diffusion 1.5 sizes with random weights (the
  pipeline of ``bench_render.py``: diffusers' default SD1.5 UNet config) and a
  random space over its ``to_q``/``to_v`` rank-1 layout (64 modules, 99,648
  dimensions), ``--components`` random unit rows (not orthogonalised: timing
  only). The paper reports 55 s per image on an A100 (10k components,
  400 steps, bf16)::

    python benchmarks/bench_invert.py --sd15 --device cuda --dtype bfloat16 \\
        --components 10000 --steps 400 --images 8

  ``--anchor-images M`` times the one-at-a-time anchor on the first ``M``
  images only (its per-image time is what the paper's 55 s compares to).

The spaces are random: wall time does not depend on what the weights are.

Usage (CPU)::

    python benchmarks/bench_invert.py                      # tiny + miniature, 8 images, 50 steps
    python benchmarks/bench_invert.py --sd15 --size 64 --steps 2 --images 2 --components 100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def miniature_pipeline(device: str, dtype: Any) -> Any:
    """The miniature world's base architecture with random weights."""
    import torch

    from w2wkit.world import base_model

    s = base_model.BaseSettings()
    torch.manual_seed(0)
    tok = base_model.make_tokenizer(s, tempfile.mkdtemp(prefix="w2w-mini-tok-"))
    pipe = base_model.make_pipeline(
        base_model.make_vae(s), base_model.make_text_encoder(s, tok), tok, base_model.make_unet(s)
    )
    return pipe.to(device, dtype)


def build_pipeline(kind: str, device: str, dtype: Any) -> Any:
    """``tiny``, ``miniature`` or ``sd15``."""
    from w2wkit.diffusion import quiet as _quiet
    from w2wkit.testing import tiny_pipeline

    with _quiet():
        if kind == "sd15":
            from bench_render import sd15_pipeline

            return sd15_pipeline(device, dtype)
        if kind == "miniature":
            return miniature_pipeline(device, dtype)
        if kind == "tiny":
            return tiny_pipeline(seed=0).to(device, dtype)
    raise ValueError(kind)


def random_space(pipe: Any, k: int, seed: int = 0, alpha: float = 1.0) -> Any:
    """A factors WeightSpace over the pipeline's ``to_q``/``to_v`` at rank 1, random rows.

    Parameters
    ----------
    pipe : diffusers.StableDiffusionPipeline
    k : int
        Components (rows of ``components_``, each ``(d,)`` with unit norm).
    seed : int
    alpha : float

    Returns
    -------
    WeightSpace
        Fitted-looking: ``layout_``, ``mean_``, ``scale_`` (d,), ``components_``
        (k, d), ``coefficients_`` (2, k), ``coef_std_`` (k,).
    """
    from w2wkit.layout import WeightLayout
    from w2wkit.space import WeightSpace
    from w2wkit.testing import attention_modules, module_shapes

    shapes = module_shapes(pipe, attention_modules(pipe))
    layout = WeightLayout([(m, (1, i), (o, 1), alpha, False) for m, (o, i) in shapes.items()])
    d = layout.dim
    if k > d:
        raise SystemExit(f"--components {k} exceeds the layout's dimension {d}")
    rng = np.random.default_rng(seed)
    comps = np.empty((k, d), np.float32)
    for start in range(0, k, 1000):  # bounded float32 temporaries
        block = rng.standard_normal((min(1000, k - start), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        comps[start : start + len(block)] = block
    space = WeightSpace(k)
    space.layout_ = layout
    space.mean_ = (0.01 * rng.standard_normal(d)).astype(np.float32)
    space.scale_ = np.full(d, 0.01, np.float32)
    space.components_ = comps
    space.coefficients_ = np.zeros((2, k), np.float32)
    space.coef_mean_ = np.zeros(k)
    space.coef_std_ = np.ones(k)
    space.n_components_ = k
    space.manifest_ = [{"name": f"m{i}", "file": "", "format": "", "row": i} for i in range(2)]
    return space


def run_case(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    import torch

    from w2wkit.diffusion import resolve_device
    from w2wkit.diffusion import torch_dtype as _torch_dtype
    from w2wkit.invert import invert

    device = resolve_device(args.device)
    dtype = _torch_dtype(args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    t0 = time.perf_counter()
    pipe = build_pipeline(kind, device, dtype)
    if args.size and kind == "sd15":
        pipe.unet.register_to_config(sample_size=args.size // pipe.vae_scale_factor)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    k_default = {"tiny": 100, "miniature": 1000, "sd15": 10000}[kind]
    space = random_space(pipe, args.components or k_default)
    k = space.n_components_
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (args.images, side, side, 3)).astype(np.float32)
    seeds = list(range(args.images))
    kw = dict(
        n_components=k, steps=args.steps, lr=0.1, early_stopping=False,
        device=device, dtype=dtype,
    )  # fmt: skip

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    # warm-up (allocator, kernels) on one image, 2 steps
    invert(space, pipe, images[:1], **{**kw, "steps": 2})
    sync()
    t = time.perf_counter()
    batched = invert(space, pipe, images, seed=seeds, **kw)
    sync()
    batched_s = time.perf_counter() - t
    # the anchor is slow at SD1.5 size: by default time 2 images alone there
    m = args.anchor_images or (min(2, args.images) if kind == "sd15" else args.images)
    t = time.perf_counter()
    alone = [invert(space, pipe, images[i : i + 1], seed=[seeds[i]], **kw) for i in range(m)]
    sync()
    anchor_s = time.perf_counter() - t
    diff = max(
        float(np.abs(a.coefficients[0] - batched.coefficients[i]).max())
        for i, a in enumerate(alone)
    )
    per = batched_s / args.images
    anchor_per = anchor_s / m
    out = {
        "bench": "invert",
        "pipeline": kind,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "threads": torch.get_num_threads(),
        "image_size": side,
        "dim": space.layout_.dim,
        "modules": len(space.layout_.modules),
        "components": k,
        "steps": args.steps,
        "images": args.images,
        "batched_total_s": round(batched_s, 3),
        "per_image_s": round(per, 4),
        "anchor_images": m,
        "anchor_per_image_s": round(anchor_per, 4),
        "ratio": round(anchor_per / per, 2),
        "max_abs_coef_diff": diff,
        "build_s": round(build_s, 1),
    }
    if device.startswith("cuda"):
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", action="append", choices=["tiny", "miniature"], help="CPU cases")
    p.add_argument("--sd15", action="store_true", help="full SD1.5-size pipeline (random)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    p.add_argument("--dtype", default=None, help="float32 (cpu default), bfloat16 (cuda default)")
    p.add_argument("--images", type=int, default=8, help="images inverted together")
    p.add_argument(
        "--anchor-images", type=int, default=None, help="images timed alone (default all; 2 sd15)"
    )
    p.add_argument("--steps", type=int, default=None, help="default 50 (400 with --sd15)")
    p.add_argument("--components", type=int, default=None, help="default 100/1000/10000")
    p.add_argument("--size", type=int, default=None, help="--sd15 image side (default 512)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.steps is None:
        args.steps = 400 if args.sd15 else 50
    kinds = ["sd15"] if args.sd15 else (args.pipeline or ["tiny", "miniature"])
    for kind in kinds:
        print(json.dumps(run_case(args, kind)), flush=True)


if __name__ == "__main__":
    main()
