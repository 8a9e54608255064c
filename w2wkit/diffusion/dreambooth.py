"""The one DreamBooth LoRA loop: many models trained in one batch, each as if alone.

:class:`DreamBooth` loads a base pipeline once and trains ``M`` LoRAs at a
time in a trainable :class:`~w2wkit.diffusion.bank.LoraBank` (``M = 1`` is the
classic one-model loop). A batch mixes the samples of all ``M`` models and each
sample goes through its own model's factors::

    out[s] = W x[s] + (alpha / r) * B[m(s)] @ A[m(s)] @ x[s]

The loss is the sum over models of each model's own mean loss, so each model's
gradient is exactly the gradient it would get alone (the UNet has no
batch-coupling layer). Adam is elementwise, so one optimizer over the stacked
tensors is ``M`` independent optimizers (no weight decay, no clipping). Every
model starts from the same initialisation (peft's: ``A`` from
``torch.manual_seed(init_seed)``, ``B = 0``), the paper's shared seed.

Random draws: model ``j`` has its own ``torch.Generator`` seeded with
``seeds[j]``; each step it draws, in this order, ``batch`` picture indices,
the noise ``(batch, C, h, w)`` and ``batch`` timesteps (then the same three for
its prior-preservation samples, then with ``flip`` its ``batch`` flip draws,
then with ``crop_size`` one ``(row, column)`` crop offset per instance
sample). So a model's training does not depend on which other models share its
batch (``tests/test_world_zoo.py`` checks a batch of 3 against a one-model peft
loop). Options that are off draw nothing, so they leave the other draws as they
were.

Options of :meth:`DreamBooth.train` beyond the paper's recipe (all off by default):

- per-picture ``prompts`` (captions): sample ``s`` is conditioned on the prompt
  of the picture it drew;
- ``flip``: each instance sample is mirrored left-right with probability 1/2;
- ``crop_size``: pictures of any shape (short side ``>= crop_size``), each
  sample a random ``crop_size`` square of its picture, encoded by the VAE at
  each step (the pictures' latents cannot be cached);
- a text-encoder LoRA (``text_encoder_targets`` of :class:`DreamBooth`): the
  text encoder's targeted projections get a bank row per model too, and every
  step encodes each sample's prompt through its own model's text encoder.

After :meth:`DreamBooth.train`, :attr:`DreamBooth.history` holds every step's
per-model instance loss ``(steps, M)`` (and :attr:`DreamBooth.prior_history`
the prior-preservation loss).

SDXL base pipelines train the way diffusers' ``train_dreambooth_lora_sdxl.py``
does: the prompt through both text encoders (``encode_prompt``: penultimate
hidden states concatenated, ``text_encoder_2``'s pooled projection), and the
UNet gets ``added_cond_kwargs`` with the pooled embedding and the size/crop
conditioning ``(H, W, 0, 0, H, W)`` of the training pictures (``w2wkit.train``
resizes and center-crops them to the training size first).

torch, diffusers and peft are imported inside the functions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter
from w2wkit.devices import resolve_device
from w2wkit.diffusion.bank import LoraBank, install_bank, lora_init
from w2wkit.diffusion.conditioning import added_cond, encode_prompts
from w2wkit.diffusion.loss import denoising_loss
from w2wkit.diffusion.pipeline import load_pipeline, pipeline_kind, resolve_module
from w2wkit.diffusion.quiet import quiet
from w2wkit.diffusion.schedule import alphas_cumprod, noisy
from w2wkit.errors import W2WError

__all__ = [
    "PRECISIONS",
    "TEXT_ENCODER_TARGETS",
    "DreamBooth",
    "RowAdam",
    "is_target",
    "text_encoder_init",
]

#: Training precisions: ``fp32``; ``bf16`` / ``fp16``: the frozen UNet and text
#: encoders stored in that type and run under autocast, the LoRA factors, their Adam
#: state and the loss in float32 (the VAE stays float32: SDXL's overflows in fp16),
#: ``fp16`` with a dynamic loss scale per model (:class:`RowAdam`).
PRECISIONS = ("fp32", "bf16", "fp16")

#: The text encoder's attention projections (CLIP), the modules ``--text-encoder`` trains.
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def text_encoder_init(
    text_encoder: Any, targets: Sequence[str], rank: int, alpha: float, seed: int
) -> dict:
    """peft's initial ``A`` ``(r, in)`` per text-encoder module after ``torch.manual_seed(seed)``.

    The shared initialisation of the text encoder's LoRA (as :func:`lora_init` for the
    UNet), computed on a copy so the text encoder itself is not touched.
    """
    import copy

    import torch
    from peft import LoraConfig, inject_adapter_in_model

    probe = copy.deepcopy(text_encoder).cpu()
    torch.manual_seed(int(seed))
    inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True),
        probe,
    )
    params = dict(probe.named_parameters())
    return {t: params[f"{t}.lora_A.default.weight"].detach().clone() for t in targets}


def is_target(name: str, targets: Sequence[str]) -> bool:
    """Whether module ``name`` is targeted: equal to or ending in ``.<target>`` (as peft)."""
    return any(name == t or name.endswith("." + t) for t in targets)


class DreamBooth:
    """A base pipeline loaded once, training batches of LoRAs of one recipe.

    Parameters
    ----------
    base : path or diffusers pipeline
        The base pipeline (a folder is opened in float32 whatever it stores; a
        pipeline object is used in place: moved to ``device`` and, in bf16/fp16,
        its UNet and text encoders cast, as diffusers' training scripts do).
    targets : sequence of str
        UNet module names (or name endings) that get a LoRA (``to_q``, ``to_v``).
    rank, alpha : int, float
        LoRA rank and alpha (scale ``alpha / rank``).
    init_seed : int
        Seed of the shared initialisation.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    text_encoder_targets : sequence of str, optional
        Text-encoder module names (or endings, e.g. :data:`TEXT_ENCODER_TARGETS`)
        that get a LoRA too; ``None``: the UNet only (the paper's recipe).
    precision : {"fp32", "bf16", "fp16"}
        See :data:`PRECISIONS`. The shared initialisation is drawn from the
        float32 weights' shapes, so it is the same in every precision.

    Attributes
    ----------
    pipe : diffusers pipeline
        Frozen (no grad, eval mode), on ``device``.
    targets : list of str
        The UNet's targeted module names.
    init_down : dict of str to torch.Tensor
        The shared initial ``A`` ``(r, in)`` per target.
    bank : LoraBank or None
        The bank of the last :meth:`train` call.
    steps_done : int
        Steps the last :meth:`train` call ran (fewer than asked when its time
        budget ran out).
    te_targets : list of str
        Canonical text-encoder module paths with a LoRA (``text_encoder.text_model...``).
    history : numpy.ndarray or None
        ``(steps_done, M)``: each step's instance loss of each model (last :meth:`train`).
    prior_history : numpy.ndarray or None
        ``(steps_done, M)``: each step's prior-preservation loss, when it was on.
    """

    def __init__(
        self,
        base: str | os.PathLike[str] | Any,
        *,
        targets: Sequence[str] = ("to_q", "to_v"),
        rank: int = 1,
        alpha: float = 1.0,
        init_seed: int = 0,
        device: str = "auto",
        text_encoder_targets: Sequence[str] | None = None,
        precision: str = "fp32",
    ) -> None:
        import torch

        if precision not in PRECISIONS:
            raise W2WError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}",
                param="precision",
            )
        self.precision = precision
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.device = resolve_device(device)
        self.base = str(base) if isinstance(base, (str, os.PathLike)) else type(base).__name__
        # float32 whatever the folder stores (a shipped world's base is float16)
        pipe = load_pipeline(base, device="cpu", dtype=torch.float32, sdxl=True)
        self.sdxl = pipeline_kind(pipe) == "sdxl"
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if m is None:
                continue
            m.requires_grad_(False)
            m.eval()
        self.pipe = pipe
        self.rank, self.alpha = int(rank), float(alpha)
        self.targets = [n for n, _ in pipe.unet.named_modules() if is_target(n, targets)]
        if not self.targets:
            raise W2WError(
                f"no UNet module is named {list(targets)}", path=self.base, key="targets"
            )
        self.init_down = lora_init(pipe.unet, self.targets, self.rank, self.alpha, init_seed)
        self.te_targets: list[str] = []
        self.te_init_down: dict[str, Any] = {}
        if text_encoder_targets:
            te = pipe.text_encoder
            names = [n for n, _ in te.named_modules() if is_target(n, text_encoder_targets)]
            if not names:
                raise W2WError(
                    f"no text-encoder module is named {list(text_encoder_targets)}",
                    path=self.base,
                    key="text_encoder_targets",
                )
            init = text_encoder_init(te, names, self.rank, self.alpha, init_seed)
            flat = not hasattr(te, "text_model")  # canonical paths keep the text_model level
            for n in names:
                canon = f"text_encoder.{'text_model.' if flat else ''}{n}"
                self.te_targets.append(canon)
                self.te_init_down[canon] = init[n]
        with quiet():  # diffusers' notes on casting a loaded pipeline
            if self.amp_dtype is not None:  # frozen weights in half; the VAE stays float32
                for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
                    if m is not None:
                        m.to(self.amp_dtype)
            pipe.to(self.device)
        self.bank: LoraBank | None = None
        self.steps_done = 0
        self.history: np.ndarray | None = None
        self.prior_history: np.ndarray | None = None
        self._ehs: dict[str, Any] = {}
        self._pooled: dict[str, Any] = {}

    # ---------------------------------------------------------------- inputs
    def embed(self, prompt: str) -> Any:
        """Text-encoder hidden states of ``prompt``, shape ``(1, L, D)`` (cached)."""
        import torch

        if prompt not in self._ehs and self.sdxl:
            with torch.no_grad(), self._autocast():
                ehs, _, pooled, _ = encode_prompts(self.pipe, [prompt], self.device)
            self._ehs[prompt], self._pooled[prompt] = ehs.float(), pooled.float()
        if prompt not in self._ehs:
            tok = self.pipe.tokenizer
            ids = tok(
                [prompt],
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            with torch.no_grad(), self._autocast():
                self._ehs[prompt] = self.pipe.text_encoder(ids)[0].float()
        return self._ehs[prompt]

    def _autocast(self) -> Any:
        """Autocast to the training precision's type on this device (none in fp32)."""
        import contextlib

        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=str(self.device).split(":")[0], dtype=self.amp_dtype)

    def added_cond(self, rows: Sequence[tuple[str, int]], size: tuple[int, int]) -> dict[str, Any]:
        """The UNet's extra keyword arguments for a batch: ``{}`` unless SDXL.

        Parameters
        ----------
        rows : sequence of (str, int)
            Consecutive runs of the batch: ``(prompt, number of rows)``.
        size : (int, int)
            Height and width of the training pictures in pixels.

        Returns
        -------
        dict
            SDXL: ``{"added_cond_kwargs": {"text_embeds": (n, P), "time_ids": (n, 6)}}``.
        """
        import torch

        if not self.sdxl:
            return {}
        return self._cond(torch.cat([self._pooled_of(p).expand(n, -1) for p, n in rows]), size)

    def _cond(self, pooled: Any, size: tuple[int, int]) -> dict[str, Any]:
        """``added_cond_kwargs`` of pooled embeddings ``(n, P)`` and pictures of ``size``."""
        return added_cond(pooled, size)

    def _pooled_of(self, prompt: str) -> Any:
        if prompt not in self._pooled:
            self.embed(prompt)
        return self._pooled[prompt]

    def encode(self, images: np.ndarray) -> Any:
        """Scaled VAE latents (posterior means) of uint8 pictures ``(n, H, W, 3)``."""
        import torch

        vae = self.pipe.vae
        out = []
        with torch.no_grad():
            for s in range(0, len(images), 512):
                x = torch.from_numpy(np.asarray(images[s : s + 512])).to(self.device)
                x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
                out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
        return torch.cat(out)

    # ---------------------------------------------------------------- the bank
    def install(self, n_models: int) -> LoraBank:
        """A fresh trainable bank of ``n_models`` rows at the shared initialisation."""
        import torch

        if self.bank is not None:
            self.bank.remove()
            self.bank = None
        factors = {}
        for t in self.targets:
            down = self.init_down[t]
            layer = self.pipe.unet.get_submodule(t)
            out_f = getattr(layer, "base_layer", layer).weight.shape[0]  # Linear or Conv2d
            factors[f"unet.{t}"] = (
                down.unsqueeze(0).expand(n_models, *down.shape),
                torch.zeros(n_models, out_f, self.rank),
            )
        for t in self.te_targets:
            down = self.te_init_down[t]
            layer = resolve_module(self.pipe, t)
            out_f = getattr(layer, "base_layer", layer).weight.shape[0]
            factors[t] = (
                down.unsqueeze(0).expand(n_models, *down.shape),
                torch.zeros(n_models, out_f, self.rank),
            )
        self.bank = install_bank(
            self.pipe,
            factors,
            self.device,
            torch.float32,
            scale=self.alpha / self.rank,
            trainable=True,
        )
        return self.bank

    def release(self) -> None:
        """Remove the bank (the pipeline is the bare base again) and free its memory."""
        if self.bank is not None:
            self.bank.remove()
            self.bank = None

    def adapters(self) -> list[Adapter]:
        """The current factors of the bank's models as Adapters (UNet module order)."""
        if self.bank is None:
            return []
        return self.bank.adapters(alpha=self.alpha)

    # ---------------------------------------------------------------- training
    def train(
        self,
        images: Sequence[np.ndarray] | Sequence[Sequence[np.ndarray]],
        prompt: str,
        seeds: Sequence[int],
        *,
        steps: int,
        batch: int,
        lr: float,
        prior: np.ndarray | None = None,
        class_prompt: str | None = None,
        prior_weight: float = 0.0,
        budget_s: float | None = None,
        start: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        on_step: Callable[[int], None] | None = None,
        prompts: Sequence[Sequence[str]] | None = None,
        flip: bool = False,
        crop_size: int | None = None,
    ) -> tuple[list[Adapter], np.ndarray]:
        """Train ``M = len(images)`` LoRAs together from the shared initialisation.

        Parameters
        ----------
        images : sequence of numpy.ndarray
            Per model, its pictures ``(n_j, H, W, 3)`` uint8 (with ``crop_size``: a
            sequence of ``(h, w, 3)`` pictures of any shape, short side ``>= crop_size``).
        prompt : str
            Instance prompt (``"a photo of sks person"``).
        seeds : sequence of int
            Per model, the seed of its picture / noise / timestep draws.
        steps, batch, lr : int, int, float
            Adam steps, samples per model and step, learning rate.
        prior : numpy.ndarray, optional
            Pool of class pictures ``(p, H, W, 3)`` for prior preservation
            (used when ``prior_weight > 0``), with ``class_prompt``.
        budget_s : float, optional
            Stop early after this many seconds (:attr:`steps_done` says where).
        start : dict, optional
            Factors to continue training from instead of the shared
            initialisation: target -> ``(A (M, r, in), B (M, out, r))``, one row
            per model (a fresh Adam state).
        on_step : callable, optional
            Called with the number of steps done after each step.
        prompts : sequence of sequence of str, optional
            Per model, the prompt of each of its pictures (``n_j`` each); a sample
            is conditioned on its picture's prompt. ``None``: ``prompt`` for all.
        flip : bool
            Mirror each instance sample left-right with probability 1/2 (drawn
            from the model's generator).
        crop_size : int, optional
            Train on a random ``crop_size`` square of each sampled picture (the
            offset drawn from the model's generator); ``None``: the pictures as given.

        Returns
        -------
        adapters : list of Adapter
            One per model, ``unet.<module>`` (and ``text_encoder.<module>``) -> LoraLayer.
        losses : numpy.ndarray
            ``(M,)``: mean instance loss of each model over the last 20% of steps.
        """
        import torch

        m = len(images)
        if m == 0:
            return [], np.zeros(0)
        if len(seeds) != m:
            raise W2WError(f"{len(seeds)} seeds for {m} models", param="seeds")
        bank = self.install(m)
        dev = self.device
        if start is not None:
            for t in self.targets:
                if t not in start:
                    raise W2WError(f"the start factors have no module {t}", key=t)
                w = bank.wrappers[f"unet.{t}"]
                a, b_ = (np.asarray(x, np.float32) for x in start[t])
                if a.shape != tuple(w.lora_down.shape) or b_.shape != tuple(w.lora_up.shape):
                    raise W2WError(
                        f"start factors of shape {a.shape} / {b_.shape}, expected "
                        f"{tuple(w.lora_down.shape)} / {tuple(w.lora_up.shape)}",
                        key=t,
                    )
                bank.set_factors(f"unet.{t}", a, b_)
        crop = int(crop_size) if crop_size else None
        if crop is None:
            lats = [self.encode(im) for im in images]
            counts = [len(x) for x in lats]
            lat = torch.cat(lats)
            lat_flip = (
                torch.cat([self.encode(np.ascontiguousarray(im[:, :, ::-1])) for im in images])
                if flip
                else None
            )
        else:
            pools = [[np.asarray(p) for p in im] for im in images]
            counts = [len(p) for p in pools]
            small = [p.shape for ps in pools for p in ps if min(p.shape[:2]) < crop]
            if small:
                raise W2WError(
                    f"a picture of {small[0][1]}x{small[0][0]} is smaller than the crop {crop}",
                    param="crop_size",
                )
        offsets = torch.tensor(np.concatenate([[0], np.cumsum(counts)[:-1]]), device=dev)
        use_prior = prior_weight > 0 and prior is not None and len(prior) > 0
        plat = self.encode(prior) if use_prior else None
        per_prompt = prompts is not None or bool(self.te_targets)
        if prompts is not None and (
            len(prompts) != m or any(len(p) != c for p, c in zip(prompts, counts, strict=True))
        ):
            raise W2WError("give one prompt per picture of each model", param="prompts")
        if per_prompt:
            # every sample's prompt as an index into `uniq`: pictures' prompts, class prompt
            flat = [str(p) for ps in prompts for p in ps] if prompts is not None else []
            extra = [class_prompt or ""] if use_prior else []
            uniq = list(dict.fromkeys([prompt, *flat, *extra]))
            where = {p: i for i, p in enumerate(uniq)}
            pic_prompt = torch.tensor(
                [where[p] for p in flat] if flat else [0] * int(sum(counts)), device=dev
            )
            cls_prompt = where[class_prompt or ""] if use_prior else 0
            if self.te_targets:
                tok = self.pipe.tokenizer
                ids_table = tok(
                    uniq,
                    padding="max_length",
                    max_length=tok.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(dev)
            if not self.te_targets or self.sdxl:
                emb_table = torch.cat([self.embed(p) for p in uniq])
            if self.sdxl:
                pooled_table = torch.cat([self._pooled_of(p) for p in uniq])
        else:
            ehs = self.embed(prompt)
            cls_ehs = self.embed(class_prompt or "") if use_prior else None
        n_t = self.pipe.scheduler.config.num_train_timesteps
        acp = alphas_cumprod(self.pipe.scheduler, dev)
        gens = [torch.Generator().manual_seed(int(sd)) for sd in seeds]
        scaled = self.precision == "fp16"
        # fp16: a loss scale and an Adam step count per model (a model whose scaled
        # gradients overflow skips its step alone, as it would trained alone)
        opt = (
            RowAdam(list(bank.parameters()), m, lr=lr, device=dev)
            if scaled
            else torch.optim.Adam(bank.parameters(), lr=lr, weight_decay=0.0)
        )
        b = int(batch)
        owner = torch.arange(m, device=dev).repeat_interleave(b)
        n_rows = 2 * m * b if use_prior else m * b
        index = torch.cat([owner, owner]) if use_prior else owner
        groups = None if use_prior else b  # grouped by model: the bank needs no gather
        if crop is None:
            shape = (b, *lat.shape[1:])
        else:
            vsf = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
            shape = (b, self.pipe.unet.config.in_channels, crop // vsf, crop // vsf)
        if not per_prompt:
            ehs_all = (
                torch.cat([ehs.expand(m * b, -1, -1), cls_ehs.expand(m * b, -1, -1)])
                if use_prior
                else ehs.expand(n_rows, -1, -1)
            )
        # SDXL: the pooled text embedding and the size/crop conditioning of the pictures
        vsf = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        hw = (int(shape[2]) * vsf, int(shape[3]) * vsf)
        runs = [(prompt, m * b)] + ([(class_prompt or "", m * b)] if use_prior else [])
        cond = self.added_cond(runs, hw) if not per_prompt else {}
        history, prior_history = [], []
        t0 = time.perf_counter()
        unet = self.pipe.unet
        for _step in range(int(steps)):
            idx, noise, tt, pidx, pnoise, ptt, flips, cuts = [], [], [], [], [], [], [], []
            for j, g in enumerate(gens):  # each model's own draws, in a fixed order
                idx.append(torch.randint(0, counts[j], (b,), generator=g))
                noise.append(torch.randn(shape, generator=g))
                tt.append(torch.randint(0, n_t, (b,), generator=g))
                if use_prior:
                    pidx.append(torch.randint(0, len(plat), (b,), generator=g))
                    pnoise.append(torch.randn(shape, generator=g))
                    ptt.append(torch.randint(0, n_t, (b,), generator=g))
                if flip:
                    flips.append(torch.rand(b, generator=g) < 0.5)
                if crop is not None:
                    for s in idx[-1].tolist():
                        h, w = pools[j][s].shape[:2]
                        oy = int(torch.randint(0, h - crop + 1, (1,), generator=g))
                        ox = int(torch.randint(0, w - crop + 1, (1,), generator=g))
                        cuts.append((j, s, oy, ox))
            rows = (torch.stack(idx).to(dev) + offsets[:, None]).reshape(-1)
            if crop is None:
                x0 = lat[rows]
                if flip:
                    mask = torch.cat(flips).to(dev)[:, None, None, None]
                    x0 = torch.where(mask, lat_flip[rows], x0)
            else:
                mirror = torch.cat(flips).tolist() if flip else [False] * len(cuts)
                pix = [
                    pools[j][s][oy : oy + crop, ox : ox + crop][:, :: -1 if fl else 1]
                    for (j, s, oy, ox), fl in zip(cuts, mirror, strict=True)
                ]
                x0 = self.encode(np.ascontiguousarray(np.stack(pix)))
            nz = torch.cat(noise).to(dev)
            t = torch.cat(tt).to(dev)
            if use_prior:
                x0 = torch.cat([x0, plat[torch.cat(pidx).to(dev)]])
                nz = torch.cat([nz, torch.cat(pnoise).to(dev)])
                t = torch.cat([t, torch.cat(ptt).to(dev)])
            with self._autocast():  # the frozen weights in bf16/fp16 (fp32: no-op)
                if per_prompt:
                    which = pic_prompt[rows]
                    if use_prior:
                        which = torch.cat([which, torch.full_like(which, cls_prompt)])
                    if self.te_targets and self.sdxl:
                        # the first encoder's LoRA: its penultimate layer, then the second's
                        bank.set_index("text_encoder", index, groups)
                        te1 = self.pipe.text_encoder(ids_table[which], output_hidden_states=True)
                        te1 = te1.hidden_states[-2]
                        bank.set_index("text_encoder", None)
                        ehs_all = torch.cat([te1, emb_table[which][..., te1.shape[-1] :]], dim=-1)
                    elif self.te_targets:
                        bank.set_index("text_encoder", index, groups)
                        ehs_all = self.pipe.text_encoder(ids_table[which])[0]
                        bank.set_index("text_encoder", None)
                    else:
                        ehs_all = emb_table[which]
                    if self.sdxl:
                        cond = self._cond(pooled_table[which], hw)
                bank.set_index("unet", index, groups)
                pred = unet(noisy(x0, nz, t, acp), t, encoder_hidden_states=ehs_all, **cond)
            per = denoising_loss(pred.sample, nz)  # float32 whatever the precision
            inst = per[: m * b].view(m, b).mean(1)
            model_loss = inst
            if use_prior:
                prior_loss = per[m * b :].view(m, b).mean(1)
                model_loss = inst + prior_weight * prior_loss
                prior_history.append(prior_loss.detach())
            opt.zero_grad(set_to_none=True)
            if scaled:
                (model_loss * opt.scale).sum().backward()
            else:
                model_loss.sum().backward()
            opt.step()
            history.append(inst.detach())
            if on_step is not None:
                on_step(len(history))
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                break
        bank.set_index("unet", None)
        self.steps_done = len(history)
        if not history:
            self.history = np.zeros((0, m), np.float32)
            self.prior_history = np.zeros((0, m), np.float32) if use_prior else None
            return self.adapters(), np.full(m, np.nan)
        hist = torch.stack(history).cpu().numpy()
        self.history = hist
        self.prior_history = torch.stack(prior_history).cpu().numpy() if use_prior else None
        tail = hist[int(0.8 * len(hist)) :] if len(hist) > 1 else hist
        return self.adapters(), tail.mean(0)


class RowAdam:
    """Adam over parameters whose first axis is the model, with a dynamic loss scale and
    a step count per model (fp16 training of many models as if each trained alone).

    Each model's rows get the update :class:`torch.optim.Adam` would make (no weight
    decay), from gradients divided by that model's loss scale; a model whose
    gradients are not finite skips the step (its rows, moments and step count stay)
    and halves its scale; after ``growth_interval`` finite steps in a row its scale
    doubles (the defaults of :class:`torch.amp.GradScaler`).

    Parameters
    ----------
    params : list of torch.Tensor
        ``(M, ...)`` float32 leaves with gradients.
    n_models : int
    lr, betas, eps : float, (float, float), float
    init_scale, growth_interval : float, int
    device : str

    Attributes
    ----------
    scale : torch.Tensor
        ``(M,)`` the loss scale of each model (multiply its loss by it).
    steps : torch.Tensor
        ``(M,)`` Adam steps taken by each model.
    skipped : torch.Tensor
        ``(M,)`` steps each model skipped for non-finite gradients.
    """

    def __init__(
        self,
        params: list[Any],
        n_models: int,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        init_scale: float = 2.0**16,
        growth_interval: int = 2000,
        device: str = "cpu",
    ) -> None:
        import torch

        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.growth_interval = int(growth_interval)
        self.scale = torch.full((n_models,), float(init_scale), device=device)
        self.steps = torch.zeros(n_models, dtype=torch.int64, device=device)
        self.skipped = torch.zeros(n_models, dtype=torch.int64, device=device)
        self._good = torch.zeros(n_models, dtype=torch.int64, device=device)
        # One flat vector over every parameter (each one's rows in order), so a step is a
        # dozen kernels whatever the number of LoRA layers (a loop over SDXL's 560 factor
        # tensors launched ~8,000 small kernels a step); ``_owner`` holds each element's model.
        self._sizes = [int(p.numel()) for p in self.params]
        owner = torch.arange(n_models, device=device)
        self._owner = torch.cat(
            [owner.repeat_interleave(n // n_models) for n in self._sizes] or [owner[:0]]
        )
        total = sum(self._sizes)
        self._m = torch.zeros(total, device=device)
        self._v = torch.zeros(total, device=device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Unscale, skip the models with non-finite gradients, update the others."""
        import torch

        if not self.params:
            return
        own = self._owner
        with torch.no_grad():
            flat = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                    for p in self.params
                ]
            )
            g = flat / self.scale[own]
            # a sum of non-negative counts is zero exactly when every one is, rounding or not
            bad = torch.zeros_like(self.scale).index_add_(0, own, (~torch.isfinite(g)).float())
            ok = bad == 0
            b1, b2 = self.betas
            self.steps += ok.long()
            # bias corrections in float64, as torch's Adam computes them (in Python)
            t = self.steps.clamp(min=1).double()
            step_size = (self.lr / (1 - b1**t)).float()
            bias2_sqrt = torch.sqrt(1 - b2**t).float()
            keep = ok[own]
            g = torch.where(keep, g, torch.zeros_like(g))
            m_, v_ = self._m, self._v
            m_.copy_(torch.where(keep, m_.lerp(g, 1 - b1), m_))
            v_.copy_(torch.where(keep, v_ * b2 + g * g * (1 - b2), v_))
            denom = v_.sqrt() / bias2_sqrt[own] + self.eps
            upd = torch.where(keep, step_size[own] * (m_ / denom), torch.zeros_like(g))
            parts = [u.view_as(p) for u, p in zip(upd.split(self._sizes), self.params, strict=True)]
            torch._foreach_sub_(self.params, parts)
        self.skipped += (~ok).long()
        self._good = torch.where(ok, self._good + 1, torch.zeros_like(self._good))
        grow = self._good >= self.growth_interval
        self.scale = torch.where(ok, self.scale, self.scale * 0.5)
        self.scale = torch.where(grow, self.scale * 2.0, self.scale)
        self._good = torch.where(grow, torch.zeros_like(self._good), self._good)
