"""The one sampler: render many LoRA models of one base pipeline in shared batches.

The models are installed as a frozen per-sample LoRA bank
(:mod:`w2wkit.diffusion.bank`), so one UNet call denoises samples of many
models at once; classifier-free guidance doubles the batch and both halves use
the sample's own weights.

Delayed edit injection (weights2weights): with ``edited`` models and
``inject_t=T``, each sample uses its original model while the scheduler
timestep ``t > T`` and its edited model for ``t <= T``. ``T >=
num_train_timesteps - 1`` therefore renders the edited model throughout and
``T < 0`` the original one.

Every sample draws its initial noise (and any scheduler noise) from its own
``torch.Generator`` seeded with the sample's seed, exactly as
``StableDiffusionPipeline(generator=torch.Generator().manual_seed(seed))``
does for one image, so a model's image does not depend on which other models
share its batch.

SDXL pipelines render the way ``StableDiffusionXLPipeline`` does: both text
encoders (their penultimate hidden states concatenated; the pooled, projected
output of ``text_encoder_2``), the size/crop conditioning ``(H, W, 0, 0, H, W)``
as ``time_ids``, and the empty negative prompt as zeros
(``force_zeros_for_empty_prompt``). A LoRA on either text encoder goes through
the bank per sample, as on the UNet.

The evaluation, the CLI's ``render``, the world's zoo-fidelity measurement
and its build all render through :class:`Renderer`.

torch and diffusers are imported when a function needs them; importing this
module is cheap.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter
from w2wkit.devices import resolve_device, torch_dtype
from w2wkit.diffusion.bank import (
    StackedLayer,
    check_against_pipeline,
    per_sample_lora,
    stack_adapters,
)
from w2wkit.diffusion.conditioning import added_cond, encode_prompts
from w2wkit.diffusion.pipeline import load_pipeline, pipeline_kind
from w2wkit.diffusion.quiet import quiet
from w2wkit.diffusion.schedule import sampling_scheduler
from w2wkit.errors import OUTPUT_EXISTS, FormatError, W2WError

__all__ = ["ModelLike", "RenderResult", "Renderer", "make_grid", "render"]

ModelLike = Adapter | str | os.PathLike[str] | None


# --------------------------------------------------------------------------- adapters


def _name_of(model: ModelLike, i: int) -> str:
    if model is None:
        return "base"
    if isinstance(model, Adapter):
        if model.metadata.get("name"):
            return str(model.metadata["name"])
        return Path(model.source).stem if model.source else f"model {i}"
    return Path(model).stem


def _as_adapter(model: ModelLike, allow_pickle: bool = False) -> Adapter | None:
    if model is None or isinstance(model, Adapter):
        return model
    from w2wkit.formats.registry import read_adapter

    return read_adapter(model, allow_pickle=allow_pickle)


# --------------------------------------------------------------------------- results


@dataclass
class RenderResult:
    """Images of ``models x prompts x seeds``.

    Attributes
    ----------
    images : numpy.ndarray
        float32 in ``[0, 1]``, shape ``(n_models, n_prompts, n_seeds, H, W, 3)``.
    names : list of str
        Row label of each model.
    prompts : list of str
    seeds : list of int
    info : dict
        Settings used (steps, guidance, device, dtype, inject_t...).
    """

    images: np.ndarray
    names: list[str]
    prompts: list[str]
    seeds: list[int]
    info: dict[str, Any] = field(default_factory=dict)

    def grid(self, cell: int | None = None) -> Any:
        """The labelled grid as a ``PIL.Image`` (rows = models, columns = prompt x seed)."""
        cols = [f"{p}\nseed {s}" for p in self.prompts for s in self.seeds]
        n_m, n_p, n_s = self.images.shape[:3]
        flat = self.images.reshape(n_m, n_p * n_s, *self.images.shape[3:])
        return make_grid(flat, self.names, cols, cell=cell)

    def save_grid(
        self, path: str | os.PathLike[str], *, overwrite: bool = False, cell: int | None = None
    ) -> Path:
        """Write :meth:`grid` as PNG atomically; return the path."""
        from w2wkit.stio import atomic_path

        out = Path(path)
        if out.exists() and not overwrite:
            raise FormatError(OUTPUT_EXISTS, path=out)
        img = self.grid(cell=cell)
        with atomic_path(out, overwrite=overwrite, suffix=".png") as tmp:
            img.save(tmp, format="PNG")
        return out


def make_grid(
    images: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    cell: int | None = None,
) -> Any:
    """Lay images out in a labelled grid.

    Parameters
    ----------
    images : numpy.ndarray
        ``(rows, cols, H, W, 3)`` floats in ``[0, 1]`` (or uint8).
    row_labels, col_labels : sequence of str
        One label per row / column.
    cell : int, optional
        Side of a cell in pixels; images are resized (nearest for
        upscaling) so that the longer side equals it. Default: the image size,
        but at least 96 pixels so labels stay readable.

    Returns
    -------
    PIL.Image.Image
    """
    from PIL import Image, ImageDraw, ImageFont

    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    rows, cols, h, w = arr.shape[:4]
    side = cell or max(96, h, w)
    ch, cw = (side, max(1, round(w * side / h))) if h >= w else (max(1, round(h * side / w)), side)
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(s: str) -> tuple[int, int]:
        x0, y0, x1, y1 = probe.textbbox((0, 0), s, font=font)
        return x1 - x0, y1 - y0

    def fit(s: str, width: int) -> str:
        if text_size(s)[0] <= width:
            return s
        while s and text_size(s + "...")[0] > width:
            s = s[:-1]
        return s + "..."

    line_h = max(text_size("Ag|")[1], 10) + 4
    left = min(220, max([text_size(s)[0] for s in row_labels] + [40]) + 12)
    n_lines = max([len(str(s).split("\n")) for s in col_labels] + [1])
    top = n_lines * line_h + 4
    pad = 2
    grid = Image.new("RGB", (left + cols * (cw + pad), top + rows * (ch + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        for k, part in enumerate(str(label).split("\n")):
            xy = (left + j * (cw + pad) + 2, 3 + k * line_h)
            draw.text(xy, fit(part, cw - 4), fill="black", font=font)
    for i, label in enumerate(row_labels):
        y = top + i * (ch + pad)
        draw.text((4, y + ch // 2 - line_h // 2 + 3), fit(label, left - 8), fill="black", font=font)
        for j in range(cols):
            tile = Image.fromarray(arr[i, j])
            if (tile.height, tile.width) != (ch, cw):
                up = ch >= tile.height
                tile = tile.resize((cw, ch), Image.NEAREST if up else Image.LANCZOS)
            grid.paste(tile, (left + j * (cw + pad), y))
    return grid


# --------------------------------------------------------------------------- renderer


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


class Renderer:
    """Render many LoRA models of one Stable Diffusion pipeline in shared batches.

    Parameters
    ----------
    pipeline : str, os.PathLike or diffusers.StableDiffusionPipeline
        A pipeline folder or object (see :func:`load_pipeline`; an object is
        moved to ``device``/``dtype`` in place).
    device : str, optional
        ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"``...
    dtype : str or torch.dtype
        Compute dtype: ``float32``, ``float16`` or ``bfloat16``.
    allow_download : bool
        Allow a hub id for ``pipeline`` (user-triggered paths only).
    offload : bool
        On CUDA, keep the models on the CPU and move each to the GPU while it
        runs (diffusers' model CPU offload; for GPUs with little memory).

    Examples
    --------
    >>> r = Renderer("./pipe")                                    # doctest: +SKIP
    >>> res = r.render(["a.safetensors", "b.safetensors"], ["a photo of sks person"],
    ...                seeds=[0, 1], steps=25)                    # doctest: +SKIP
    >>> res.save_grid("grid.png")                                 # doctest: +SKIP
    """

    def __init__(
        self,
        pipeline: str | os.PathLike[str] | Any,
        *,
        device: str | None = "auto",
        dtype: str | Any = "float32",
        allow_download: bool = False,
        offload: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = torch_dtype(dtype)
        self.pipe = load_pipeline(
            pipeline,
            device=self.device,
            dtype=self.dtype,
            allow_download=allow_download,
            offload=offload,
            sdxl=True,
        )
        self.sdxl = pipeline_kind(self.pipe) == "sdxl"

    # ---------------------------------------------------------------- helpers
    def _encode(
        self, prompts: list[str], negative: list[str], cfg: bool
    ) -> tuple[Any, Any, Any, Any]:
        """``(pos, neg, pos_pooled, neg_pooled)`` embeddings; pooled ones ``None`` unless SDXL.

        ``pos``/``neg`` are ``(n, L, D)``; SDXL's pooled ones ``(n, P)``; ``neg``
        is ``None`` without guidance.
        """
        return encode_prompts(self.pipe, prompts, self.device, cfg=cfg, negative=negative)

    def prepare(
        self,
        models: Sequence[ModelLike] | np.ndarray,
        *,
        edited: Sequence[ModelLike] | np.ndarray | None = None,
        space: Any = None,
        allow_pickle: bool = False,
    ) -> tuple[list[Adapter | None], list[Adapter | None] | None, list[str]]:
        """Read files / unproject coefficients into adapters and check the layout.

        Parameters
        ----------
        models : sequence of Adapter, path or None, or numpy.ndarray
            ``None`` renders the base model. A ``(n, k)`` array is a batch of
            coefficient vectors of ``space`` (``space.inverse_transform``).
        edited : same as ``models``, optional
            The edited model of each model (delayed injection).
        space : WeightSpace, optional
            Needed when coefficients are given.

        Returns
        -------
        (list, list or None, list of str)
            Original adapters, edited adapters, row names.
        """

        def convert(items: Any, what: str) -> tuple[list[Adapter | None], list[str]]:
            if isinstance(items, np.ndarray):
                if space is None:
                    raise W2WError(f"{what} given as coefficients but no space", key=what)
                coef = np.atleast_2d(items)
                ads = list(space.inverse_transform(coef))
                return ads, [f"point {i}" for i in range(len(ads))]
            items = list(items)
            return [_as_adapter(m, allow_pickle) for m in items], [
                _name_of(m, i) for i, m in enumerate(items)
            ]

        originals, names = convert(models, "models")
        if not originals:
            raise W2WError("no models to render", key="models")
        edits = None
        if edited is not None:
            edits, _ = convert(edited, "edited")
            if len(edits) != len(originals):
                raise W2WError(
                    f"{len(edits)} edited models for {len(originals)} models; give one each",
                    param="edited",
                )
        return originals, edits, names

    def check(self, models: Sequence[Adapter | None]) -> dict[str, StackedLayer]:
        """Stack ``models`` and check they fit the pipeline (no rendering).

        Raises
        ------
        LayoutError
            Different module sets, non-LoRA layers, modules missing from the
            pipeline (named), shapes that do not fit, unsupported components.
        """
        stacked = stack_adapters(models)
        check_against_pipeline(self.pipe, stacked)
        return stacked

    # ---------------------------------------------------------------- main entry
    def render(
        self,
        models: Sequence[ModelLike] | np.ndarray,
        prompts: str | Sequence[str] = "a photo of sks person",
        seeds: int | Sequence[int] = (0,),
        *,
        steps: int = 25,
        guidance: float = 7.5,
        negative_prompt: str = "",
        height: int | None = None,
        width: int | None = None,
        edited: Sequence[ModelLike] | np.ndarray | None = None,
        inject_t: float | None = None,
        names: Sequence[str] | None = None,
        space: Any = None,
        batch_size: int = 16,
        eta: float = 0.0,
        allow_pickle: bool = False,
        progress: Callable[[int, int], None] | None = None,
        scheduler: str | None = None,
    ) -> RenderResult:
        """Render every model for every prompt and seed.

        Parameters
        ----------
        models : sequence of Adapter, path or None, or numpy.ndarray
            The models (rows). ``None`` is the base model; a ``(n, k)`` array is
            coefficients of ``space``. Adapters must target the same modules
            (ranks may differ: smaller ones are zero-padded, an exact no-op).
        prompts : str or sequence of str
        seeds : int or sequence of int
            One ``torch.Generator().manual_seed(seed)`` per image.
        steps : int
            Scheduler steps.
        guidance : float
            Classifier-free guidance scale (``<= 1`` disables it).
        negative_prompt : str
        height, width : int, optional
            Image size; default the UNet's sample size times the VAE factor.
        edited : same as ``models``, optional
            Edited model per model, used for timesteps ``t <= inject_t``.
        inject_t : float, optional
            Delayed-injection threshold in scheduler timesteps (0..999).
            Required with ``edited``.
        names : sequence of str, optional
            Row labels (default: file stems).
        space : WeightSpace, optional
            To turn coefficient arrays into adapters.
        batch_size : int
            Images per UNet call (doubled by classifier-free guidance).
        eta : float
            DDIM eta (as the diffusers pipeline).
        allow_pickle : bool
            Let model paths be ``.pt``/``.bin`` pickles.
        progress : callable, optional
            ``progress(done_images, total_images)`` after each batch.
        scheduler : str, optional
            Sampling scheduler: ``None`` the pipeline's own, else a short name
            (``"ddim"``, see :data:`w2wkit.diffusion.schedule.SCHEDULERS`) or a
            diffusers class name, built from the pipeline's scheduler config.

        Returns
        -------
        RenderResult
            ``images`` of shape ``(n_models, n_prompts, n_seeds, H, W, 3)``.
        """
        prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        seeds = [int(seeds)] if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
        if not prompts:
            raise W2WError("give at least one prompt", param="prompts")
        if not seeds:
            raise W2WError("give at least one seed", param="seeds")
        self._check_settings(steps, batch_size)
        if (edited is None) != (inject_t is None):
            raise W2WError(
                "delayed injection needs both `edited` models and `inject_t`", param="inject_t"
            )
        originals, edits, row_names = self.prepare(
            models, edited=edited, space=space, allow_pickle=allow_pickle
        )
        if names is not None:
            row_names = [str(n) for n in names]
            if len(row_names) != len(originals):
                raise W2WError(f"{len(row_names)} names for {len(originals)} models", param="names")
        n_models = len(originals)
        stacked = self.check(originals + (edits or []))
        # one item per image: (model, prompt, seed), model-major
        items = [
            (m, p, s)
            for m in range(n_models)
            for p in range(len(prompts))
            for s in range(len(seeds))
        ]
        flat, info = self._run(
            stacked,
            items,
            prompts,
            seeds,
            n_models=n_models,
            edited=edits is not None,
            inject_t=inject_t,
            steps=steps,
            guidance=guidance,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            scheduler=scheduler,
            batch_size=batch_size,
            eta=eta,
            progress=progress,
        )
        out = flat.reshape(n_models, len(prompts), len(seeds), *flat.shape[1:])
        return RenderResult(out, row_names, prompts, seeds, info)

    def sample(
        self,
        bank: Mapping[str, StackedLayer] | None,
        model_index: Sequence[int] | np.ndarray | None,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int = 25,
        guidance: float = 7.5,
        negative_prompt: str = "",
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        batch_size: int = 16,
        eta: float = 0.0,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """One picture per ``(model, prompt, seed)`` triple, from stacked factors.

        :meth:`render` renders the grid of models x prompts x seeds of adapter
        files; this renders a list of triples from a bank already stacked (a
        world's ``loras.safetensors`` through
        :func:`w2wkit.diffusion.bank.stack_factors`), with the same sampling.

        Parameters
        ----------
        bank : mapping of str to StackedLayer, or None
            ``M`` models, canonical module paths, scale folded into ``up``.
        model_index : sequence of int, or None
            ``(n,)`` bank row of each picture; ``None`` renders the base model.
        prompts : sequence of str
            ``(n,)`` prompt of each picture.
        seeds : sequence of int
            ``(n,)`` noise seed of each picture.
        steps, guidance, negative_prompt, height, width, scheduler, batch_size, eta, progress
            As :meth:`render`.

        Returns
        -------
        numpy.ndarray
            ``(n, H, W, 3)`` float32 in ``[0, 1]``.
        """
        n = len(seeds)
        if len(prompts) != n or (model_index is not None and len(model_index) != n):
            raise W2WError(
                f"{len(prompts)} prompts and "
                f"{n if model_index is None else len(model_index)} model indices for {n} seeds; "
                "give one of each per picture",
                param="prompts",
            )
        if n == 0:
            raise W2WError("give at least one seed", param="seeds")
        self._check_settings(steps, batch_size)
        stacked = dict(bank or {}) if model_index is not None else {}
        m = len(next(iter(stacked.values())).down) if stacked else 1
        check_against_pipeline(self.pipe, stacked)
        rows = [0] * n if model_index is None else [int(i) for i in model_index]
        if rows and (min(rows) < 0 or max(rows) >= m):
            raise W2WError(f"model indices must be in 0..{m - 1}", param="model_index")
        uniq = list(dict.fromkeys(str(p) for p in prompts))
        where = {p: i for i, p in enumerate(uniq)}
        items = [(r, where[str(p)], i) for i, (r, p) in enumerate(zip(rows, prompts, strict=True))]
        images, _ = self._run(
            stacked,
            items,
            uniq,
            [int(s) for s in seeds],
            n_models=m,
            edited=False,
            inject_t=None,
            steps=steps,
            guidance=guidance,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            scheduler=scheduler,
            batch_size=batch_size,
            eta=eta,
            progress=progress,
        )
        return images

    def _decode(self, latents: Any, gens: list[Any]) -> Any:
        """VAE-decode ``(n, C, h, w)`` latents to ``(n, 3, H, W)`` in ``[-1, 1]``.

        As the SDXL pipeline: a float16 VAE that asks for it (``force_upcast``)
        decodes in float32, and ``latents_mean``/``latents_std`` are undone.
        """
        import torch

        vae = self.pipe.vae
        cfg = vae.config
        upcast = vae.dtype == torch.float16 and bool(getattr(cfg, "force_upcast", False))
        if upcast and self.sdxl:
            with quiet():
                vae.to(torch.float32)
            latents = latents.float()
        try:
            mean = getattr(cfg, "latents_mean", None)
            std = getattr(cfg, "latents_std", None)
            if self.sdxl and mean is not None and std is not None:
                m = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
                s = torch.tensor(std).view(1, -1, 1, 1).to(latents)
                latents = latents * s / cfg.scaling_factor + m
            else:
                latents = latents / cfg.scaling_factor
            return vae.decode(latents, return_dict=False, generator=gens)[0]
        finally:
            if upcast and self.sdxl:
                with quiet():
                    vae.to(torch.float16)

    @staticmethod
    def _check_settings(steps: int, batch_size: int) -> None:
        if steps < 1:
            raise W2WError(f"must be >= 1, got {steps}", param="steps")
        if batch_size < 1:
            raise W2WError(f"must be >= 1, got {batch_size}", param="batch_size")

    def _run(
        self,
        stacked: Mapping[str, StackedLayer],
        items: list[tuple[int, int, int]],
        prompts: list[str],
        seeds: list[int],
        *,
        n_models: int,
        edited: bool,
        inject_t: float | None,
        steps: int,
        guidance: float,
        negative_prompt: str,
        height: int | None,
        width: int | None,
        scheduler: str | None,
        batch_size: int,
        eta: float,
        progress: Callable[[int, int], None] | None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Images ``(len(items), H, W, 3)`` of ``(bank row, prompt index, seed index)`` items.

        With ``edited``, rows ``n_models + m`` of the bank hold the edited
        models, used for timesteps ``t <= inject_t``.
        """
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        te_patched = any(m.startswith(("text_encoder.", "text_encoder_2.")) for m in stacked)
        pipe = self.pipe
        unet = pipe.unet
        vsf = getattr(pipe, "vae_scale_factor", 8)
        height = int(height or unet.config.sample_size * vsf)
        width = int(width or unet.config.sample_size * vsf)
        if height % vsf or width % vsf:
            raise W2WError(f"image size {height}x{width} must be a multiple of {vsf}", param="size")
        cfg = guidance > 1.0 and unet.config.time_cond_proj_dim is None
        lat_shape = (unet.config.in_channels, height // vsf, width // vsf)
        total = len(items)
        out = np.zeros((total, height, width, 3), np.float32)
        probe = sampling_scheduler(pipe, scheduler)
        sched_name = type(probe).__name__
        step_params = set(inspect.signature(probe.step).parameters)

        patched = per_sample_lora(pipe, stacked, self.device, self.dtype)
        with torch.inference_mode(), patched as bank:
            sel = bank.selectors
            # prompt embeddings shared by all models when the text encoder is not patched
            shared = None
            te_sels = [sel[c] for c in ("text_encoder", "text_encoder_2") if c in sel]
            if not te_patched:
                for s in te_sels:
                    s.index = None
                shared = self._encode(prompts, [negative_prompt] * len(prompts), cfg)
            done = 0
            for chunk in _chunks(total, batch_size):
                batch = [items[i] for i in chunk]
                mi = torch.tensor([b[0] for b in batch], device=self.device)
                orig_idx = mi
                edit_idx = mi + n_models if edited else mi

                def embeds(idx: Any, batch: list[tuple[int, int, int]] = batch) -> Any:
                    """``(hidden states, pooled or None)`` of the batch, negatives first."""
                    if shared is not None:
                        pi = torch.tensor([b[1] for b in batch], device=self.device)
                        enc = [None if e is None else e.index_select(0, pi) for e in shared]
                    else:
                        for s in te_sels:
                            s.index = idx
                        enc = list(
                            self._encode(
                                [prompts[b[1]] for b in batch], [negative_prompt] * len(batch), cfg
                            )
                        )
                        for s in te_sels:
                            s.index = None
                    pos, neg, pooled, neg_pooled = enc
                    if pooled is not None and cfg:
                        pooled = torch.cat([neg_pooled, pooled])
                    return (torch.cat([neg, pos]) if cfg else pos), pooled

                emb_orig = embeds(orig_idx)
                emb_edit = embeds(edit_idx) if (edited and te_patched) else emb_orig

                gens = [torch.Generator(device="cpu").manual_seed(seeds[b[2]]) for b in batch]
                sched = sampling_scheduler(pipe, scheduler)
                sched.set_timesteps(steps, device=self.device)
                latents = randn_tensor(
                    (len(batch), *lat_shape),
                    generator=gens,
                    device=torch.device(self.device),
                    dtype=self.dtype,
                )
                latents = latents * sched.init_noise_sigma
                extra: dict[str, Any] = {}
                if "eta" in step_params:
                    extra["eta"] = eta
                if "generator" in step_params:
                    extra["generator"] = gens
                for t in sched.timesteps:
                    use_edit = edited and float(t) <= float(inject_t)  # type: ignore[arg-type]
                    idx = edit_idx if use_edit else orig_idx
                    emb, pooled = emb_edit if use_edit else emb_orig
                    sel["unet"].index = torch.cat([idx, idx]) if cfg else idx
                    inp = torch.cat([latents] * 2) if cfg else latents
                    inp = sched.scale_model_input(inp, t)
                    # SDXL: pooled embedding and size/crop conditioning; SD: nothing
                    kw = added_cond(pooled, (height, width))
                    noise = unet(inp, t, encoder_hidden_states=emb, return_dict=False, **kw)[0]
                    if cfg:
                        unc, txt = noise.chunk(2)
                        noise = unc + guidance * (txt - unc)
                    latents = sched.step(noise, t, latents, **extra, return_dict=False)[0]
                sel["unet"].index = None
                img = self._decode(latents, gens)
                img = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
                out[list(chunk)] = img
                done += len(batch)
                if progress is not None:
                    progress(done, total)

        info = {
            "steps": steps,
            "guidance": guidance,
            "negative_prompt": negative_prompt,
            "height": height,
            "width": width,
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "scheduler": sched_name,
            "inject_t": inject_t,
            "batch_size": batch_size,
            "modules": len(stacked),
        }
        return out, info


def render(
    pipeline: str | os.PathLike[str] | Any,
    models: Sequence[ModelLike] | np.ndarray,
    prompts: str | Sequence[str] = "a photo of sks person",
    seeds: int | Sequence[int] = (0,),
    *,
    device: str | None = "auto",
    dtype: str | Any = "float32",
    **kwargs: Any,
) -> RenderResult:
    """``Renderer(pipeline, device=, dtype=).render(models, prompts, seeds, **kwargs)``."""
    return Renderer(pipeline, device=device, dtype=dtype).render(models, prompts, seeds, **kwargs)
