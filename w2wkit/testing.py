"""Helpers for tests: tiny diffusers pipelines and random adapters.

Everything here is built from configs in memory (no download, no hub id).
torch, diffusers and transformers are imported inside the functions that need
them, so importing this module stays cheap.

Functions
---------
tiny_pipeline
    A complete ``StableDiffusionPipeline`` with a few thousand parameters.
tiny_sdxl_pipeline
    A complete ``StableDiffusionXLPipeline`` (two text encoders, size/crop
    conditioning) of the same tiny sizes.
attention_modules
    Canonical module paths (``unet.down_blocks...attn1.to_q``) of a pipeline's
    attention projections.
module_shapes
    ``module path -> (out, in)`` for those paths.
random_adapter
    An :class:`~w2wkit.adapter.Adapter` with random factors.
unet_weights, weight_deltas
    Snapshot a pipeline's weights and compare two snapshots.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.world.tokenizer import byte_symbols

__all__ = [
    "TINY_WORDS",
    "attention_modules",
    "component_module",
    "module_shapes",
    "peft_dreambooth",
    "peft_dreambooth_sdxl",
    "random_adapter",
    "relative_error",
    "tiny_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_tokenizer",
    "unet_weights",
    "weight_deltas",
]

#: Whole words given their own token in the tiny vocabulary.
TINY_WORDS = ("a", "photo", "of", "sks", "person", "dog", "with", "and", "beard", "glasses")


def tiny_tokenizer(folder: str | Path | None = None, words: Iterable[str] = TINY_WORDS) -> Any:
    """Build a CLIP tokenizer from a tiny byte-level vocabulary.

    The vocabulary holds the 256 byte symbols (alone and word-final), the
    merges that spell each of ``words`` as one token, and CLIP's start/end
    tokens. Files are written to ``folder`` (a temporary folder by default)
    and loaded with ``CLIPTokenizer.from_pretrained``.

    Parameters
    ----------
    folder : str or pathlib.Path, optional
        Where to write ``vocab.json`` and ``merges.txt``.
    words : iterable of str
        Lower-case ASCII words that become single tokens.

    Returns
    -------
    transformers.CLIPTokenizer
    """
    from transformers import CLIPTokenizer

    base = byte_symbols()
    vocab: dict[str, int] = {}
    for sym in base:
        vocab.setdefault(sym, len(vocab))
    for sym in base:
        vocab.setdefault(sym + "</w>", len(vocab))
    merges: list[str] = []
    for word in words:
        # merge left to right: ((w o) r) d</w>
        pieces = [*word[:-1], word[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            merge = f"{cur} {nxt}"
            if merge not in merges:
                merges.append(merge)
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    out = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="w2w-tok-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(out), model_max_length=16)


#: Stable Diffusion 1.5's UNet (``runwayml/stable-diffusion-v1-5``'s ``unet/config.json``),
#: for :func:`tiny_pipeline`'s ``unet_config``: 859,520,964 parameters, 64 x 64 latents
#: (512 px).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

#: SDXL 1.0 base's UNet (``unet/config.json``), for :func:`tiny_sdxl_pipeline`'s
#: ``unet_config`` with ``text_dims=(768, 1280)``, ``projection_dim=1280``,
#: ``time_embed_dim=256``: 2,567,463,684 parameters, 128 x 128 latents (1024 px).
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "norm_num_groups": 32,
}


def _tiny_unet(chans: tuple[int, ...], layers: int, sample: int, cross: int) -> dict[str, Any]:
    """The tiny UNets' shared arguments: no cross-attention in the first down block and
    last up block, 4-wide heads, 4 norm groups."""
    n = len(chans)
    return {
        "sample_size": sample,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": layers,
        "block_out_channels": chans,
        "down_block_types": ("DownBlock2D", *["CrossAttnDownBlock2D"] * (n - 1)),
        "up_block_types": (*["CrossAttnUpBlock2D"] * (n - 1), "UpBlock2D"),
        "cross_attention_dim": cross,
        "attention_head_dim": 4,
        "norm_num_groups": 4,
    }


def tiny_pipeline(
    seed: int = 0,
    layers_per_block: int = 1,
    block_out_channels: Sequence[int] = (8, 16),
    cross_attention_dim: int = 12,
    sample_size: int = 8,
    text_layers: int = 2,
    scheduler: str = "ddim",
    unet_config: Mapping[str, Any] | None = None,
) -> Any:
    """A randomly initialised, complete ``StableDiffusionPipeline``.

    The UNet has cross-attention in every block but the first down block and
    last up block (``CrossAttnDownBlock2D``/``CrossAttnUpBlock2D``) plus the
    mid block; the VAE has one down/up level with 4 latent channels; the text
    encoder is a ``CLIPTextModel`` whose tokenizer comes from
    :func:`tiny_tokenizer`. ``safety_checker=None``. Deterministic given
    ``seed``.

    Parameters
    ----------
    seed : int
        ``torch.manual_seed`` applied before each model is built.
    layers_per_block : int
        UNet resnet/attention layers per block.
    block_out_channels : sequence of int
        UNet channels per level (each a multiple of 4).
    cross_attention_dim : int
        Text hidden size and UNet cross-attention width.
    sample_size : int
        Latent side (images are 2x larger).
    text_layers : int
        CLIP encoder layers.
    scheduler : {"ddim", "ddpm"}
        Scheduler class.
    unet_config : mapping, optional
        ``UNet2DConditionModel`` arguments that replace the tiny ones (e.g.
        :data:`SD15_UNET`: Stable Diffusion 1.5's UNet, random weights).

    Returns
    -------
    diffusers.StableDiffusionPipeline
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    chans = tuple(int(c) for c in block_out_channels)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **{
            **_tiny_unet(chans, layers_per_block, sample_size, cross_attention_dim),
            **(unet_config or {}),
        }
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=sample_size * 2,
    )
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cross_attention_dim,
            intermediate_size=2 * cross_attention_dim,
            num_attention_heads=2,
            num_hidden_layers=text_layers,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    kwargs = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
    }
    sched = (
        DDIMScheduler(**kwargs, set_alpha_to_one=False, steps_offset=1)
        if scheduler == "ddim"
        else DDPMScheduler(**kwargs)
    )
    for model in (unet, vae, text_encoder):
        model.eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(
    seed: int = 0,
    layers_per_block: int = 1,
    block_out_channels: Sequence[int] = (8, 16),
    text_dims: tuple[int, int] = (8, 12),
    projection_dim: int = 8,
    time_embed_dim: int = 4,
    sample_size: int = 8,
    text_layers: int = 2,
    unet_config: Mapping[str, Any] | None = None,
) -> Any:
    """A randomly initialised ``StableDiffusionXLPipeline`` of the SDXL architecture.

    As SDXL: two CLIP text encoders (``text_encoder`` a ``CLIPTextModel``,
    ``text_encoder_2`` a ``CLIPTextModelWithProjection`` whose projected
    pooled output conditions the UNet), the UNet's cross-attention width the
    sum of their hidden sizes (both penultimate hidden states are
    concatenated), ``addition_embed_type="text_time"`` (the pooled text
    embedding plus the six size/crop numbers, each embedded in
    ``time_embed_dim`` sinusoids), linear projections in the transformer
    blocks, no cross-attention in the first down block. Tiny sizes, a VAE
    with one down/up level (images are 2x the latent side), both tokenizers
    from :func:`tiny_tokenizer`, a DDIM scheduler. Deterministic given
    ``seed``; nothing is downloaded.

    Parameters
    ----------
    seed : int
        ``torch.manual_seed`` applied before each model is built.
    layers_per_block : int
        UNet resnet/attention layers per block.
    block_out_channels : sequence of int
        UNet channels per level (each a multiple of 4).
    text_dims : (int, int)
        Hidden sizes of the two text encoders.
    projection_dim : int
        ``text_encoder_2``'s projection (the pooled embedding's size).
    time_embed_dim : int
        Sinusoid size per size/crop number (``addition_time_embed_dim``, even).
    sample_size : int
        Latent side.
    text_layers : int
        CLIP encoder layers (at least 2: SDXL reads the penultimate one).
    unet_config : mapping, optional
        ``UNet2DConditionModel`` arguments that replace the tiny ones (e.g.
        :data:`SDXL_UNET`: SDXL's UNet, random weights, with ``text_dims=(768, 1280)``,
        ``projection_dim=1280`` and ``time_embed_dim=256``).

    Returns
    -------
    diffusers.StableDiffusionXLPipeline
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    chans = tuple(int(c) for c in block_out_channels)
    d1, d2 = (int(d) for d in text_dims)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **{
            **_tiny_unet(chans, layers_per_block, sample_size, d1 + d2),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_embed_dim,
            "projection_class_embeddings_input_dim": 6 * time_embed_dim + projection_dim,
            **(unet_config or {}),
        }
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=sample_size * 2,
        scaling_factor=0.13025,
    )
    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer()

    def clip_config(hidden: int, **extra: Any) -> Any:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_attention_heads=2,
            num_hidden_layers=text_layers,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_config(d1))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(d2, projection_dim=projection_dim))
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.eval()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sched,
    )


def component_module(pipe: Any, path: str) -> Any:
    """The torch module a canonical path names in ``pipe``.

    ``text_encoder.text_model.`` resolves also on text encoders whose
    ``text_model`` level was flattened away (transformers >= 5).
    """
    component, rest = path.split(".", 1)
    model = getattr(pipe, component)
    if rest.startswith("text_model.") and not hasattr(model, "text_model"):
        rest = rest[len("text_model.") :]
    return model.get_submodule(rest)


def attention_modules(
    pipe: Any,
    targets: Sequence[str] = ("to_q", "to_v"),
    component: str = "unet",
) -> list[str]:
    """Canonical paths of the attention projections of one component.

    Parameters
    ----------
    pipe : diffusers.DiffusionPipeline
        The pipeline.
    targets : sequence of str
        Projection names, e.g. ``("to_q", "to_k", "to_v", "to_out.0")`` for a
        UNet or ``("q_proj", "v_proj")`` for a CLIP text encoder.
    component : str
        ``"unet"``, ``"text_encoder"``...

    Returns
    -------
    list of str
        ``component.<module>`` in the model's module order; text-encoder paths
        always carry the ``text_model.`` level.
    """
    import torch

    model = getattr(pipe, component)
    out = []
    flattened = component.startswith("text_encoder") and not hasattr(model, "text_model")
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            if "lora_" in name or ".base_layer" in name:
                continue
            full = f"text_model.{name}" if flattened else name
            out.append(f"{component}.{full}")
    return out


def module_shapes(pipe: Any, modules: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """``module path -> weight shape`` (``(out, in)`` for linear layers)."""
    return {m: tuple(component_module(pipe, m).weight.shape) for m in modules}


def random_adapter(
    module_shapes: Mapping[str, Sequence[int]],
    rank: int | Mapping[str, int] = 1,
    alpha: float | Mapping[str, float] | None = None,
    seed: int = 0,
    scale: float = 0.1,
    rslora: bool = False,
    dtype: str = "F32",
) -> Adapter:
    """An adapter with normally distributed factors.

    Parameters
    ----------
    module_shapes : mapping of str to sequence of int
        ``module -> (out, in[, kh, kw])``.
    rank : int or mapping of str to int
        Rank per module (one value for all, or per module).
    alpha : float or mapping of str to float, optional
        Alpha per module; default equals the rank.
    seed : int
        Seed of ``numpy.random.default_rng``.
    scale : float
        Standard deviation of the factor entries.
    rslora : bool
        Rank-stabilised scaling for every layer.
    dtype : str
        Storage dtype recorded on each layer; values are rounded to it.

    Returns
    -------
    Adapter
        Layers in the order of ``module_shapes``; factors float32 with
        ``down`` of shape ``(r, in[, kh, kw])`` and ``up`` ``(out, r[, 1, 1])``.
    """
    from w2wkit.stio import from_storage, to_storage

    rng = np.random.default_rng(seed)
    layers = {}
    for module, shape in module_shapes.items():
        r = int(rank[module] if isinstance(rank, Mapping) else rank)
        a = alpha[module] if isinstance(alpha, Mapping) else alpha
        a = float(r if a is None else a)
        out_f, *rest = (int(s) for s in shape)
        down = (rng.standard_normal((r, *rest)) * scale).astype(np.float32)
        up_shape = (out_f, r, 1, 1) if len(rest) == 3 else (out_f, r)
        up = (rng.standard_normal(up_shape) * scale).astype(np.float32)
        if dtype != "F32":
            down = from_storage(to_storage(down, dtype), dtype).astype(np.float32)
            up = from_storage(to_storage(up, dtype), dtype).astype(np.float32)
        layers[module] = LoraLayer(down=down, up=up, alpha=a, rslora=rslora, dtype=dtype)
    return Adapter(layers=layers, metadata={})


def unet_weights(pipe: Any, modules: Iterable[str]) -> dict[str, np.ndarray]:
    """Copy the weight of each named module as a float64 numpy array.

    Works before and after ``fuse_lora`` (a PEFT-wrapped layer's
    ``base_layer`` is read).
    """
    out = {}
    for m in modules:
        mod = component_module(pipe, m)
        mod = getattr(mod, "base_layer", mod)
        out[m] = mod.weight.detach().double().cpu().numpy().copy()
    return out


def weight_deltas(
    before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``after - before`` per module (float64)."""
    return {m: np.asarray(after[m], np.float64) - np.asarray(before[m], np.float64) for m in before}


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius), float64."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    denom = float(np.linalg.norm(e))
    return float(np.linalg.norm(a - e)) / (denom if denom > 0 else 1.0)


def peft_dreambooth(
    base: str | Path,
    settings: Any,
    images: np.ndarray,
    prompt: str,
    seed: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> tuple[Adapter, float]:
    """A reference DreamBooth LoRA loop for one model, sharing no code with the engine.

    In the style of diffusers' ``train_dreambooth_lora.py``: a peft adapter on the UNet
    (after ``torch.manual_seed(settings.init_seed)``), diffusers' ``add_noise``, AdamW
    without weight decay; each step draws ``batch`` picture indices, the noise and
    ``batch`` timesteps from one generator seeded with ``seed``. The tests check the
    engine's batched trainer against it; ``benchmarks/bench_world_zoo.py`` uses it as
    the one-model-at-a-time anchor.

    Parameters
    ----------
    base : path
        A ``StableDiffusionPipeline`` folder.
    settings : LoraSettings
        ``rank``, ``alpha``, ``targets``, ``steps``, ``batch``, ``lr``, ``init_seed``.
    images : numpy.ndarray
        ``(n, H, W, 3)`` uint8.
    prompt : str
    seed : int
    device, precision : str
        See :func:`peft_dreambooth_sdxl`.

    Returns
    -------
    adapter : Adapter
        ``unet.<module>`` -> LoraLayer.
    seconds : float
        Wall time of the training loop alone (not the loading).
    """

    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), torch_dtype=torch.float32)

    def encode(batch: int) -> tuple[Any, dict]:
        tok = pipe.tokenizer
        ids = tok(
            [prompt], padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
        )
        return pipe.text_encoder(ids.input_ids)[0].expand(batch, -1, -1), {}

    return _peft_loop(pipe, settings, images, seed, encode, device, precision)


def peft_dreambooth_sdxl(
    base: str | Path,
    settings: Any,
    images: np.ndarray,
    prompt: str,
    seed: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> tuple[Adapter, float]:
    """:func:`peft_dreambooth` for an SDXL pipeline, sharing no code with the engine.

    In the style of diffusers' ``train_dreambooth_lora_sdxl.py``: the prompt through
    both text encoders (``StableDiffusionXLPipeline.encode_prompt``), a peft adapter on
    the UNet (after ``torch.manual_seed(settings.init_seed)``), diffusers' ``add_noise``,
    AdamW without weight decay, and the UNet's ``added_cond_kwargs``: the pooled
    embedding and ``time_ids`` ``(H, W, 0, 0, H, W)`` of the ``H x W`` pictures. Each
    step draws ``batch`` picture indices, the noise and ``batch`` timesteps from one
    generator seeded with ``seed``.

    Parameters
    ----------
    base : path
        A ``StableDiffusionXLPipeline`` folder.
    settings : LoraSettings or Recipe
        ``rank``, ``alpha``, ``targets``, ``steps``, ``batch``, ``lr``, ``init_seed``.
    images : numpy.ndarray
        ``(n, H, W, 3)`` uint8.
    prompt : str
    seed : int
    device : str
        Where the UNet and VAE train (the draws stay on the CPU's generator, so a run
        on another device differs only by its arithmetic).
    precision : {"fp32", "bf16", "fp16"}
        As diffusers' ``--mixed_precision``: the UNet stored in bf16/fp16, the LoRA
        parameters cast back to float32, the forward under autocast, the loss in
        float32; fp16 with :class:`torch.amp.GradScaler`. The VAE stays float32.

    Returns
    -------
    adapter : Adapter
        ``unet.<module>`` -> LoraLayer.
    seconds : float
        Wall time of the training loop alone (not the loading).
    """

    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(base), torch_dtype=torch.float32)
    h, w = int(np.shape(images)[1]), int(np.shape(images)[2])

    def encode(batch: int) -> tuple[Any, dict]:
        ehs, _, pooled, _ = pipe.encode_prompt(
            prompt=prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
        cond = {"text_embeds": pooled.expand(batch, -1), "time_ids": time_ids.expand(batch, -1)}
        return ehs.expand(batch, -1, -1), cond

    return _peft_loop(pipe, settings, images, seed, encode, device, precision)


def _peft_loop(
    pipe: Any,
    settings: Any,
    images: np.ndarray,
    seed: int,
    encode: Any,
    device: str = "cpu",
    precision: str = "fp32",
) -> tuple[Adapter, float]:
    """The one-model PEFT loop both reference trainers share (see :func:`peft_dreambooth`).

    ``encode(batch)`` gives the UNet's ``encoder_hidden_states`` ``(batch, L, D)`` and its
    ``added_cond_kwargs`` (empty for SD1.x/SD2.x), on the CPU; the UNet and VAE run on
    ``device``.
    """
    import time

    import torch
    from peft import LoraConfig

    s = settings
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.requires_grad_(False)
    targets = [
        n for n, _ in pipe.unet.named_modules() if any(n.endswith("." + t) for t in s.targets)
    ]
    torch.manual_seed(s.init_seed)
    pipe.unet.add_adapter(
        LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=targets, init_lora_weights=True)
    )
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    pipe.unet.to(device, dtype=half or torch.float32)
    pipe.vae.to(device)
    params = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
    for p in params.values():
        p.data = p.data.float()  # trainable parameters in float32 (cast_training_params)
        p.requires_grad_(True)
    amp_device = str(device).split(":")[0]
    scaler = torch.amp.GradScaler(amp_device) if precision == "fp16" else None

    def sync() -> None:
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        ehs, cond = encode(s.batch)
        ehs = ehs.to(device)
        cond = {k: v.to(device) for k, v in cond.items()}
        x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        lat = pipe.vae.encode(x.to(device)).latent_dist.mean * pipe.vae.config.scaling_factor
    extra = {"added_cond_kwargs": cond} if cond else {}
    sched = pipe.scheduler
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW(list(params.values()), lr=s.lr, weight_decay=0.0)
    for _ in range(s.steps):
        idx = torch.randint(0, len(lat), (s.batch,), generator=gen)
        x0 = lat[idx.to(lat.device)]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (s.batch,), generator=gen)
        t = t.to(device)
        with torch.autocast(amp_device, dtype=half, enabled=half is not None):
            pred = pipe.unet(
                sched.add_noise(x0, noise, t), t, encoder_hidden_states=ehs, **extra
            ).sample
        loss = torch.mean((pred.float() - noise) ** 2)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    sync()
    seconds = time.perf_counter() - t0
    layers = {
        f"unet.{n}": LoraLayer(
            down=params[f"{n}.lora_A.default.weight"].detach().cpu().numpy().copy(),
            up=params[f"{n}.lora_B.default.weight"].detach().cpu().numpy().copy(),
            alpha=float(s.alpha),
        )
        for n in targets
    }
    return Adapter(layers=layers, metadata={}), seconds
