"""The miniature world's base model: definition, training, saving.

The pipeline is made of the standard diffusers/transformers classes that a
Stable Diffusion 1.x checkpoint uses, only smaller:

- :class:`diffusers.AutoencoderKL`: 32x32 RGB <-> 16x16x4 latents;
- :class:`diffusers.UNet2DConditionModel` on 16x16x4 latents, cross-attention
  only at the lowest resolution (8x8) and in the mid block;
- :class:`transformers.CLIPTextModel` with a :class:`transformers.CLIPTokenizer`
  written from an offline vocabulary (the caption words plus ``sks``);
- :class:`diffusers.DDPMScheduler`: scaled_linear betas 0.00085-0.012 over
  1000 steps, epsilon prediction (as SD1.5 and the paper).

Training (``build_base``): render a captioned dataset of both concepts, train
the VAE, encode the dataset once, then train the UNet and the text encoder
together on the captions (10% empty captions for classifier-free guidance).
``sks`` never occurs in a caption, so its embedding keeps its initial value
(the "rare token"). The result is a folder that
``StableDiffusionPipeline.from_pretrained(folder)`` loads offline.

torch, diffusers and transformers are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.atomic import recover, temp_path
from w2wkit.errors import OUTPUT_EXISTS, W2WError
from w2wkit.world import CONCEPTS
from w2wkit.world.pictures import generator
from w2wkit.world.tokenizer import token_ids

__all__ = [
    "BaseSettings",
    "CaptionedImages",
    "build_base",
    "make_pipeline",
    "make_scheduler",
    "make_text_encoder",
    "make_unet",
    "make_vae",
    "render_dataset",
    "save_pipeline",
    "train_unet",
    "train_vae",
]


@dataclass
class BaseSettings:
    """Sizes and training budget of the base model.

    The defaults are the planned full build; tests pass tiny values.

    Attributes
    ----------
    image_size : int
        Picture side in pixels; latents are ``image_size // 2``.
    latent_channels : int
        Channels of the VAE latents.
    vae_channels : tuple of int
        ``block_out_channels`` of the VAE (two blocks = one 2x downsampling).
    unet_channels : tuple of int
        ``block_out_channels`` of the UNet (attention only in the last block).
    layers_per_block : int
        ResNet (and transformer) layers per UNet block.
    attention_heads : int
        Attention heads of the UNet's transformer blocks.
    text_width, text_layers, text_heads, text_positions : int
        CLIP text encoder: hidden size, layers, heads, max prompt length.
    concepts : tuple of str
        Concept packs whose renders and captions make the dataset.
    n_instances : dict of str to int
        Instances per concept in the dataset (dogs: at most the catalogue).
    images_per_instance : dict of str to int
        Renders per instance.
    vae_steps, vae_batch, vae_lr, kl_weight : training of the VAE.
    unet_steps, unet_batch, unet_lr : training of the UNet + text encoder.
    caption_drop : float
        Probability of leaving out each attribute phrase of a caption.
    uncond_prob : float
        Probability of an empty caption (classifier-free guidance).
    seed : int
        Seed of everything (data, initialisation, noise).
    threads : int
        torch threads (1 lets two builds share a 2-core machine).
    """

    image_size: int = 32
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64)
    unet_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    attention_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_positions: int = 32
    concepts: tuple[str, ...] = CONCEPTS
    n_instances: dict[str, int] = field(
        default_factory=lambda: dict(zip(CONCEPTS, (6000, 240), strict=True))
    )
    images_per_instance: dict[str, int] = field(
        default_factory=lambda: dict(zip(CONCEPTS, (3, 40), strict=True))
    )
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    unet_steps: int = 8000
    unet_batch: int = 8
    unet_lr: float = 5e-4
    caption_drop: float = 0.25
    uncond_prob: float = 0.1
    seed: int = 0
    threads: int = 1

    @classmethod
    def micro(cls, **changes: Any) -> BaseSettings:
        """Tiny settings for tests and CI: a few pictures, a few steps (seconds)."""
        values: dict[str, Any] = {
            "vae_channels": (8, 16),
            "unet_channels": (16, 32),
            "attention_heads": 2,
            "text_width": 16,
            "text_layers": 1,
            "text_heads": 2,
            "n_instances": dict(zip(CONCEPTS, (6, 3), strict=True)),
            "images_per_instance": dict(zip(CONCEPTS, (2, 2), strict=True)),
            "vae_steps": 3,
            "vae_batch": 4,
            "unet_steps": 3,
            "unet_batch": 4,
            "seed": 3,
        }
        values.update(changes)
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dictionary of the settings."""
        return asdict(self)


@dataclass
class CaptionedImages:
    """Rendered training pictures and where they come from.

    Attributes
    ----------
    images : numpy.ndarray
        Shape ``(n, size, size, 3)``, uint8.
    owners : list of tuple
        ``(concept, instance)`` for each picture.
    """

    images: np.ndarray
    owners: list[tuple[str, Any]]

    def captions(self, index: np.ndarray, rng: np.random.Generator, drop: float) -> list[str]:
        """Captions of pictures ``index`` with random phrase dropout."""
        out = []
        for i in index:
            concept, inst = self.owners[int(i)]
            out.append(generator(concept).caption(inst, rng, drop))
        return out


def render_dataset(settings: BaseSettings) -> CaptionedImages:
    """Render the captioned training set of the base model.

    Returns
    -------
    CaptionedImages
        ``images`` of shape ``(sum_c n_c * k_c, size, size, 3)``.
    """
    imgs, owners = [], []
    for concept in settings.concepts:
        gen = generator(concept)
        n = int(settings.n_instances.get(concept, 0))
        if hasattr(gen, "n_breeds"):
            n = min(n, gen.n_breeds)
        k = int(settings.images_per_instance.get(concept, 1))
        # instances of the base set use seed 1000 + seed so that zoo identities
        # (seed = settings.seed) are not the ones pretraining saw
        for inst in (
            gen.instances(n) if hasattr(gen, "n_breeds") else gen.instances(n, 1000 + settings.seed)
        ):
            imgs.append(gen.render(inst, k, seed=settings.seed + 77, size=settings.image_size))
            owners += [(concept, inst)] * k
    return CaptionedImages(np.concatenate(imgs), owners)


def _torch(threads: int) -> Any:
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    return torch


def _groups(channels: Sequence[int]) -> int:
    """Largest group count <= 32 dividing every channel count."""
    return max(g for g in range(1, 33) if all(c % g == 0 for c in channels))


def make_vae(settings: BaseSettings) -> Any:
    """The AutoencoderKL: ``image_size`` RGB <-> ``image_size // 2`` latents."""
    from diffusers import AutoencoderKL

    n = len(settings.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(settings.vae_channels),
        layers_per_block=1,
        latent_channels=settings.latent_channels,
        norm_num_groups=_groups(settings.vae_channels),
        sample_size=settings.image_size,
        mid_block_add_attention=False,
    )


def make_unet(settings: BaseSettings) -> Any:
    """The UNet2DConditionModel; cross-attention only in the lowest-resolution block."""
    from diffusers import UNet2DConditionModel

    n = len(settings.unet_channels)
    down = ("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",)
    up = ("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1)
    return UNet2DConditionModel(
        sample_size=settings.image_size // 2 ** (len(settings.vae_channels) - 1),
        in_channels=settings.latent_channels,
        out_channels=settings.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(settings.unet_channels),
        layers_per_block=settings.layers_per_block,
        cross_attention_dim=settings.text_width,
        attention_head_dim=settings.attention_heads,
        norm_num_groups=_groups(settings.unet_channels),
    )


def make_text_encoder(settings: BaseSettings, tokenizer: Any) -> Any:
    """A small CLIPTextModel matching ``tokenizer``'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.text_width,
        intermediate_size=4 * settings.text_width,
        num_hidden_layers=settings.text_layers,
        num_attention_heads=settings.text_heads,
        max_position_embeddings=settings.text_positions,
        projection_dim=settings.text_width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_scheduler() -> Any:
    """DDPM, scaled_linear 0.00085-0.012, 1000 steps, epsilon prediction (SD1.5's)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def make_tokenizer(settings: BaseSettings, folder: str | os.PathLike[str]) -> Any:
    """Write the offline vocabulary of ``settings.concepts`` to ``folder`` and load it."""
    from transformers import CLIPTokenizer

    from w2wkit.world.tokenizer import world_words, write_tokenizer

    write_tokenizer(folder, world_words(settings.concepts), settings.text_positions)
    return CLIPTokenizer.from_pretrained(str(folder))


def _log(progress: Callable[[str], None] | None, text: str) -> None:
    if progress is not None:
        progress(text)


def train_vae(
    vae: Any,
    images: np.ndarray,
    settings: BaseSettings,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
    budget_s: float | None = None,
) -> dict[str, float]:
    """Train the VAE on pictures (MSE reconstruction + ``kl_weight`` * KL).

    ``budget_s`` stops training early (the steps done are in the log);
    ``device`` is where the VAE trains (it is moved back to the CPU).

    Parameters
    ----------
    vae : diffusers.AutoencoderKL
        Trained in place.
    images : numpy.ndarray
        Shape ``(n, H, W, 3)`` uint8.

    Returns
    -------
    dict
        ``seconds``, ``seconds_per_step``, final ``mse`` and ``psnr``.
    """
    torch = _torch(settings.threads)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    rng = np.random.default_rng(settings.seed + 1)
    vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    vae.train()
    t0 = time.perf_counter()
    ema = None
    done = 0
    for step in range(settings.vae_steps):
        idx = rng.integers(0, len(images), settings.vae_batch)
        x = torch.from_numpy(images[idx]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        rec = vae.decode(z).sample
        mse = torch.mean((rec - x) ** 2)
        kl = post.kl().mean() / x[0].numel()
        loss = mse + settings.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = mse.item() if ema is None else 0.98 * ema + 0.02 * mse.item()
        done = step + 1
        if progress is not None and (step + 1) % 100 == 0:
            _log(progress, f"vae step {step + 1}/{settings.vae_steps} mse {ema:.5f}")
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            _log(progress, f"vae: time budget reached after {done} steps")
            break
    seconds = time.perf_counter() - t0
    vae.eval()
    vae.to("cpu")
    mse = float(ema if ema is not None else np.nan)
    return {
        "seconds": seconds,
        "steps": done,
        "seconds_per_step": seconds / max(1, done),
        "mse": mse,
        "psnr": float(10 * np.log10(4.0 / mse)) if mse > 0 else float("inf"),
    }


def encode_latents(
    vae: Any, images: np.ndarray, batch: int = 256, device: str = "cpu"
) -> np.ndarray:
    """Posterior means of ``images`` (unscaled), shape ``(n, C, h, w)`` float32."""
    import torch

    out = []
    vae.to(device)
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(images[s : s + batch]).to(device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            out.append(vae.encode(x).latent_dist.mean.cpu().numpy())
    vae.to("cpu")
    return np.concatenate(out).astype(np.float32)


def train_unet(
    unet: Any,
    text_encoder: Any,
    tokenizer: Any,
    latents: np.ndarray,
    data: CaptionedImages,
    settings: BaseSettings,
    progress: Callable[[str], None] | None = None,
    device: str = "cpu",
    budget_s: float | None = None,
) -> dict[str, float]:
    """Train the UNet and the text encoder on scaled latents and captions.

    With ``budget_s``, the step time is measured over the first 50 steps and,
    if ``unet_steps`` would not fit, the run is shortened to what fits and the
    warm-up + cosine schedule is compressed to the new length (same recipe,
    fewer steps; ``steps`` in the log says how many ran).

    Parameters
    ----------
    latents : numpy.ndarray
        Shape ``(n, C, h, w)``, already multiplied by the VAE scaling factor.
    data : CaptionedImages
        Owners of the latents (for the captions), same order.

    Returns
    -------
    dict
        ``seconds``, ``seconds_per_step`` and the final smoothed ``loss``.
    """
    torch = _torch(settings.threads)
    sched = make_scheduler()
    gen = torch.Generator().manual_seed(settings.seed + 2)
    rng = np.random.default_rng(settings.seed + 2)
    unet.to(device)
    text_encoder.to(device)  # before the optimizer sees the parameters
    emb = text_encoder.get_input_embeddings().weight
    others = [p for p in text_encoder.parameters() if p is not emb]
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "weight_decay": 1e-2},
            {"params": others, "weight_decay": 1e-2},
            # no decay on token embeddings: unused tokens (sks) keep their initial value
            {"params": [emb], "weight_decay": 0.0},
        ],
        lr=settings.unet_lr,
        # the fused kernel is the same AdamW update, in fewer launches (CUDA only)
        **({"fused": True} if str(device).startswith("cuda") else {}),
    )
    total = [settings.unet_steps]
    warm = max(1, settings.unet_steps // 20)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm) * (0.5 * (1 + np.cos(np.pi * min(1.0, s / max(1, total[0])))))
        ),
    )
    unet.to(device).train()
    text_encoder.to(device).train()
    lat = torch.from_numpy(latents).to(device)
    t0 = t20 = time.perf_counter()
    ema = None
    ema_t: Any = None
    step = -1
    while step + 1 < total[0]:
        step += 1
        if budget_s is not None and step in (20, 70):
            # step time from steps 20-70: the first ones carry one-off costs (kernel
            # selection, allocator growth) that would make the estimate too short
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            if step == 20:
                t20 = time.perf_counter()
            else:
                per = (time.perf_counter() - t20) / 50
                fit = int(step + (budget_s - (time.perf_counter() - t0)) / per)
                if fit < total[0]:
                    total[0] = max(step + 1, fit)
                    _log(progress, f"unet: {settings.unet_steps} steps do not fit, running {fit}")
        idx = rng.integers(0, len(lat), settings.unet_batch)
        caps = data.captions(idx, rng, settings.caption_drop)
        caps = ["" if rng.random() < settings.uncond_prob else c for c in caps]
        ids = token_ids(tokenizer, caps).to(device)
        x0 = lat[torch.from_numpy(idx).to(device)]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        t = t.to(device)
        xt = sched.add_noise(x0, noise, t)
        ehs = text_encoder(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=ehs).sample
        loss = torch.mean((pred - noise) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        opt.step()
        lr_sched.step()
        # smoothed loss kept on the device: no host sync per step
        ema_t = loss.detach() if ema_t is None else 0.99 * ema_t + 0.01 * loss.detach()
        if (step + 1) % 100 == 0 or step + 1 == total[0]:
            ema = float(ema_t)
        if progress is not None and (step + 1) % 100 == 0:
            _log(progress, f"unet step {step + 1}/{total[0]} loss {ema:.4f}")
        if budget_s is not None and step % 50 == 49 and time.perf_counter() - t0 > 1.15 * budget_s:
            ema = float(ema_t)
            _log(progress, f"unet: stopped at step {step + 1} (time budget)")
            break
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    unet.eval().to("cpu")
    text_encoder.eval().to("cpu")
    return {
        "seconds": seconds,
        "steps": step + 1,
        "seconds_per_step": seconds / max(1, step + 1),
        "loss": float(ema if ema is not None else np.nan),
    }


def make_pipeline(vae: Any, text_encoder: Any, tokenizer: Any, unet: Any) -> Any:
    """Assemble a StableDiffusionPipeline (no safety checker) from the parts."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe: Any, folder: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Save ``pipe`` atomically (temporary sibling folder, then rename).

    Raises
    ------
    W2WError
        If ``folder`` exists and ``overwrite`` is false.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise W2WError(OUTPUT_EXISTS, path=folder)
    from w2wkit.atomic import atomic_path

    with atomic_path(folder, overwrite=overwrite) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return folder


def build_base(
    folder: str | os.PathLike[str],
    settings: BaseSettings | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    data: CaptionedImages | None = None,
    device: str = "cpu",
    budget_s: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Render the dataset, train VAE then UNet + text encoder, save the pipeline.

    Parameters
    ----------
    folder : path
        Output pipeline folder (``StableDiffusionPipeline.from_pretrained``
        loads it). A ``world_base.json`` log is written inside.
    settings : BaseSettings, optional
        Sizes and budget; the defaults are the planned full build.
    overwrite : bool
        Replace an existing folder.
    progress : callable, optional
        Receives one-line progress messages.
    data : CaptionedImages, optional
        The dataset, already rendered (e.g. in parallel); default: rendered here.
    device : str
        Where VAE and UNet train (the saved pipeline is on the CPU).
    budget_s : dict, optional
        Time budgets ``{"vae": s, "unet": s}`` (see :func:`train_unet`).

    Returns
    -------
    dict
        The build log: settings, seconds per phase, VAE PSNR, UNet loss,
        latent scaling factor, parameter counts.
    """
    settings = settings or BaseSettings()
    folder = Path(folder)
    recover(folder)  # what a killed build left beside it (staging folders, a cut swap)
    if folder.exists() and not overwrite:
        raise W2WError(OUTPUT_EXISTS, path=folder)
    torch = _torch(settings.threads)
    torch.manual_seed(settings.seed)
    log: dict[str, Any] = {"settings": settings.to_json()}
    t0 = time.perf_counter()
    data = data if data is not None else render_dataset(settings)
    log["render"] = {"images": len(data.images), "seconds": time.perf_counter() - t0}
    _log(progress, f"rendered {len(data.images)} pictures")
    staging = temp_path(folder, ".tok")  # removed below, or by the next build if killed
    try:
        tokenizer = make_tokenizer(settings, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    vae = make_vae(settings)
    budget_s = budget_s or {}
    log["device"] = device
    log["vae"] = train_vae(vae, data.images, settings, progress, device, budget_s.get("vae"))
    t1 = time.perf_counter()
    raw = encode_latents(vae, data.images, device=device)
    scale = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scale)
    log["latents"] = {"scaling_factor": scale, "seconds": time.perf_counter() - t1}
    unet = make_unet(settings)
    text_encoder = make_text_encoder(settings, tokenizer)
    log["unet"] = train_unet(
        unet,
        text_encoder,
        tokenizer,
        raw * scale,
        data,
        settings,
        progress,
        device,
        budget_s.get("unet"),
    )
    log["parameters"] = {
        name: int(sum(p.numel() for p in m.parameters()))
        for name, m in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))
    }
    pipe = make_pipeline(vae, text_encoder, tokenizer, unet)
    save_pipeline(pipe, folder, overwrite=overwrite)
    log["seconds"] = time.perf_counter() - t0
    (folder / "world_base.json").write_text(json.dumps(log, indent=2, default=str))
    return log


def rare_token_unused(data: CaptionedImages, n: int = 2000, seed: int = 0) -> bool:
    """True if no caption drawn from ``data`` contains the rare token ``sks``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(data.images), min(n, len(data.images)))
    return not any("sks" in c.split() for c in data.captions(idx, rng, 0.0))


def unet_lora_targets(unet: Any, names: Sequence[str] = ("to_q", "to_v")) -> list[str]:
    """Module names of the UNet's attention projections called ``names``."""
    return [n for n, _ in unet.named_modules() if n.rsplit(".", 1)[-1] in names]
