"""Baselines the evaluation compares weights2weights against, in the same code.

* **DreamBooth LoRA, multi-image**: the zoo's own recipe
  (:class:`w2wkit.world.lora.LoraTrainer`: rank 1, ``to_q``/``to_v``, shared
  initialisation, instance prompt) on several pictures of one identity.
* **DreamBooth LoRA, single image**: the same recipe on one picture (it
  overfits the pose, as in the paper).
* **Prompting** for edits: the *unedited* model rendered with the attribute
  named in the prompt (``"a photo of sks person with a beard"``).
* **Undisentangled direction**: the plain probe direction, without making it
  orthogonal to the correlated attributes (``orthogonal_to=()``).
* **w2w inversion** (:func:`invert_coefficients`): optimise only the first
  ``k`` coefficients of a factors space with the epsilon-prediction loss on
  one picture (optional mask), Adam, timesteps uniform - the paper's recipe.
  :mod:`w2wkit.invert` is the user-facing implementation; this one works on
  the trainer's peft-wrapped UNet so that both inversion and DreamBooth share
  one loaded pipeline during an evaluation.

torch, diffusers and peft are imported inside the functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter
from w2wkit.errors import SpaceError, W2WError

__all__ = [
    "BaselineModels",
    "InversionResult",
    "edit_prompt",
    "edit_undisentangled",
    "invert_coefficients",
]


def edit_prompt(
    spec: Any, instance_prompt: str = "sks person", template: str = "a photo of {}"
) -> str:
    """The prompting baseline's prompt that adds one attribute.

    Parameters
    ----------
    spec : AttributeSpec
        ``phrase`` and ``adjective`` are used: adjectives go before the
        instance prompt ("a photo of old sks person"), other phrases after
        "with" ("a photo of sks person with a beard").
    instance_prompt : str
    template : str

    Returns
    -------
    str
    """
    if getattr(spec, "adjective", False):
        return template.format(f"{spec.phrase} {instance_prompt}")
    return template.format(f"{instance_prompt} with {spec.phrase}")


def edit_undisentangled(space: Any, adapter: Adapter, name: str, strength: float) -> Adapter:
    """Edit along the plain (not disentangled) direction ``name``.

    The stored direction as the probe produced it, with no
    ``orthogonal_to``: the paper's edit without its disentanglement step.
    """
    return space.edit(adapter, {name: float(strength)}, orthogonal_to=())


@dataclass
class InversionResult:
    """Coefficients found by :func:`invert_coefficients`.

    Attributes
    ----------
    coefficients : numpy.ndarray
        ``(n, k_space)`` float64 (components beyond ``k`` stay at the mean).
    losses : numpy.ndarray
        ``(n, steps)`` loss per step.
    seconds : numpy.ndarray
        ``(n,)`` wall time per image.
    """

    coefficients: np.ndarray
    losses: np.ndarray
    seconds: np.ndarray


class BaselineModels:
    """One loaded base pipeline shared by DreamBooth training and inversion.

    Parameters
    ----------
    base : path
        The base pipeline folder.
    settings : LoraSettings
        The zoo recipe (rank, alpha, targets, steps, batch, lr, init seed).
    device : str
        ``"cpu"`` or ``"cuda"`` (``"auto"``: CUDA if present).
    """

    def __init__(self, base: Any, settings: Any, device: str = "auto") -> None:
        import torch

        from w2wkit.world.lora import LoraTrainer

        self.trainer = LoraTrainer(base, settings)
        pipe = self.trainer.pipe
        # shipped pipelines store float16 weights; diffusers loads the UNet and VAE as
        # float32 but transformers keeps the text encoder in float16
        for part in (pipe.text_encoder, pipe.vae):
            if next(part.parameters()).dtype != torch.float32:
                part.to(torch.float32)
        self.settings = settings
        self.device = _device(device)
        if self.device != "cpu":
            self.trainer.pipe.to(self.device)
            for name, p in self.trainer.pipe.unet.named_parameters():
                if name in self.trainer.lora_params:
                    self.trainer.lora_params[name] = p
            self.trainer.init_state = {
                n: v.to(self.device) for n, v in self.trainer.init_state.items()
            }

    # -------------------------------------------------------------- DreamBooth
    def dreambooth(
        self, images: np.ndarray, prompt: str, seed: int = 0, steps: int | None = None
    ) -> tuple[Adapter, float]:
        """Train the zoo recipe on ``images`` ``(n, H, W, 3)`` uint8.

        Returns
        -------
        (Adapter, float)
            The LoRA and its wall time in seconds.
        """
        t0 = time.perf_counter()
        if self.device == "cpu":
            s = self.settings if steps is None else replace(self.settings, steps=int(steps))
            old = self.trainer.settings
            self.trainer.settings = s
            try:
                adapter, _ = self.trainer.train(np.asarray(images), prompt, seed=seed)
            finally:
                self.trainer.settings = old
        else:
            adapter = self._train_device(images, prompt, seed, steps)
        return adapter, time.perf_counter() - t0

    def _train_device(
        self, images: np.ndarray, prompt: str, seed: int, steps: int | None
    ) -> Adapter:
        import torch

        tr, s = self.trainer, self.settings
        n_steps = int(steps if steps is not None else s.steps)
        pipe = tr.pipe
        with torch.no_grad():
            for n, p in tr.lora_params.items():
                p.copy_(tr.init_state[n])
            lat = self._latents(images)
        ehs = self._embed(prompt)
        gen = torch.Generator().manual_seed(int(seed))
        opt = torch.optim.AdamW(list(tr.lora_params.values()), lr=s.lr, weight_decay=0.0)
        sched = pipe.scheduler
        for _ in range(n_steps):
            idx = torch.randint(0, len(lat), (s.batch,), generator=gen)
            noise = torch.randn((s.batch, *lat.shape[1:]), generator=gen).to(self.device)
            t = torch.randint(0, sched.config.num_train_timesteps, (s.batch,), generator=gen)
            t = t.to(self.device)
            x0 = lat[idx.to(self.device)]
            pred = pipe.unet(
                sched.add_noise(x0, noise, t), t, encoder_hidden_states=ehs.expand(s.batch, -1, -1)
            ).sample
            loss = torch.mean((pred - noise) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return _adapter_from(tr, s)

    # -------------------------------------------------------------- helpers
    def _latents(self, images: np.ndarray) -> Any:
        import torch

        pipe = self.trainer.pipe
        x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        x = x.to(self.device)
        with torch.no_grad():
            return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor

    def _embed(self, prompt: str) -> Any:
        import torch

        tok = self.trainer.pipe.tokenizer
        ids = tok(
            [prompt],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        with torch.no_grad():
            return self.trainer.pipe.text_encoder(ids)[0]

    # -------------------------------------------------------------- inversion
    def invert(
        self,
        space: Any,
        images: np.ndarray,
        *,
        prompt: str = "sks person",
        components: int | None = None,
        steps: int = 200,
        lr: float = 0.1,
        batch: int = 4,
        mask: np.ndarray | None = None,
        seed: int = 0,
        progress: Callable[[int, int], None] | None = None,
    ) -> InversionResult:
        """Invert each picture into coefficients of ``space`` (see :func:`invert_coefficients`)."""
        return invert_coefficients(
            self,
            space,
            images,
            prompt=prompt,
            components=components,
            steps=steps,
            lr=lr,
            batch=batch,
            mask=mask,
            seed=seed,
            progress=progress,
        )


def _device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _adapter_from(trainer: Any, settings: Any) -> Adapter:
    from w2wkit.adapter import LoraLayer

    layers = {}
    for name in trainer.targets:
        a = trainer.lora_params[f"{name}.lora_A.default.weight"].detach().cpu().numpy().copy()
        b = trainer.lora_params[f"{name}.lora_B.default.weight"].detach().cpu().numpy().copy()
        layers[f"unet.{name}"] = LoraLayer(down=a, up=b, alpha=float(settings.alpha))
    return Adapter(layers=layers, metadata={})


def _latent_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Average-pool an ``(H, W)`` mask to the latent grid ``shape``."""
    m = np.asarray(mask, dtype=np.float32)
    h, w = m.shape
    fh, fw = h // shape[0], w // shape[1]
    if fh * shape[0] != h or fw * shape[1] != w:
        raise W2WError(
            f"mask of shape {h}x{w} does not tile the {shape[0]}x{shape[1]} latent grid",
            key="mask",
        )
    return m.reshape(shape[0], fh, shape[1], fw).mean(axis=(1, 3))


def invert_coefficients(
    models: BaselineModels,
    space: Any,
    images: np.ndarray,
    *,
    prompt: str = "sks person",
    components: int | None = None,
    steps: int = 200,
    lr: float = 0.1,
    batch: int = 4,
    mask: np.ndarray | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> InversionResult:
    """Find space coefficients whose model reconstructs one picture.

    The weights2weights inversion: only the first ``k`` coefficients are
    optimised (initialised at the training mean), with the
    epsilon-prediction MSE on the picture under the instance prompt,
    timesteps uniform in ``[0, T)``, Adam. With a mask the squared error is
    weighted by the mask pooled to the latent grid.

    Parameters
    ----------
    models : BaselineModels
        The loaded pipeline (its peft-wrapped UNet is called functionally;
        the LoRA parameters are replaced by the space's factors).
    space : WeightSpace
        A ``factors`` space whose layout matches the pipeline's LoRA targets.
    images : numpy.ndarray
        ``(n, H, W, 3)`` uint8; each picture is inverted on its own.
    components : int, optional
        ``k`` (default: all of the space's).
    steps, lr, batch : int, float, int
        Adam steps, step size, noise draws per step.
    mask : numpy.ndarray, optional
        ``(H, W)`` or ``(n, H, W)`` in ``[0, 1]``.
    seed : int
        Seed of the noise and timesteps.

    Returns
    -------
    InversionResult
    """
    import torch
    from torch.func import functional_call

    if getattr(space, "representation", "factors") != "factors":
        raise SpaceError("inversion needs a factors space (coefficients map linearly to factors)")
    tr = models.trainer
    layout = space.layout_
    missing = [m for m in layout.modules if m.removeprefix("unet.") not in tr.targets]
    if missing:
        raise SpaceError(
            f"space and pipeline do not match: the pipeline's LoRA targets lack "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
        )
    k_all = int(space.n_components_)
    k = k_all if components is None else max(1, min(int(components), k_all))
    dev = models.device
    V = torch.from_numpy(np.ascontiguousarray(space.components_[:k], dtype=np.float32)).to(dev)
    mean = torch.from_numpy(np.asarray(space.mean_, dtype=np.float32)).to(dev)
    scale = torch.from_numpy(np.asarray(space.scale_, dtype=np.float32)).to(dev)
    peft_scale = float(models.settings.alpha) / float(models.settings.rank)
    slots = []
    for m in layout.modules:
        down, up = layout.slots_of(m)
        fix = layout.scale(m) / peft_scale
        name = m.removeprefix("unet.")
        slots.append((f"{name}.lora_A.default.weight", down, 1.0))
        slots.append((f"{name}.lora_B.default.weight", up, fix))
    imgs = np.asarray(images)
    if imgs.ndim == 3:
        imgs = imgs[None]
    n = len(imgs)
    if mask is not None:
        mask = np.asarray(mask, dtype=np.float32)
        if mask.ndim == 2:
            mask = np.broadcast_to(mask, (n, *mask.shape))
        if mask.shape != imgs.shape[:3]:
            raise W2WError(
                f"mask of shape {tuple(mask.shape[-2:])} does not match the image size "
                f"{imgs.shape[1]}x{imgs.shape[2]}",
                key="mask",
            )
    ehs = models._embed(prompt)
    unet = tr.pipe.unet
    sched = tr.pipe.scheduler
    n_t = int(sched.config.num_train_timesteps)
    coef_mean = np.asarray(space.coef_mean_, dtype=np.float64)
    out = np.tile(coef_mean, (n, 1))
    losses = np.zeros((n, steps))
    seconds = np.zeros(n)
    for i in range(n):
        t0 = time.perf_counter()
        lat = models._latents(imgs[i : i + 1])
        w = None
        if mask is not None:
            lm = _latent_mask(mask[i], tuple(lat.shape[-2:]))
            w = torch.from_numpy(lm).to(dev)[None, None]
            w = w / w.mean().clamp_min(1e-6)
        c = torch.tensor(coef_mean[:k], dtype=torch.float32, device=dev, requires_grad=True)
        opt = torch.optim.Adam([c], lr=lr)
        gen = torch.Generator().manual_seed(int(seed) * 7919 + i)
        for step in range(steps):
            x = mean + scale * (c @ V)
            params = {
                name: x[slot.offset : slot.stop].view(slot.shape) * fix for name, slot, fix in slots
            }
            noise = torch.randn((batch, *lat.shape[1:]), generator=gen).to(dev)
            t = torch.randint(0, n_t, (batch,), generator=gen).to(dev)
            noisy = sched.add_noise(lat.expand(batch, -1, -1, -1), noise, t)
            pred = functional_call(
                unet, params, (noisy, t), {"encoder_hidden_states": ehs.expand(batch, -1, -1)}
            ).sample
            err = (pred - noise) ** 2
            loss = (err * w).mean() if w is not None else err.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[i, step] = float(loss.detach())
            if progress is not None:
                progress(i * steps + step + 1, n * steps)
        out[i, :k] = c.detach().cpu().numpy().astype(np.float64)
        seconds[i] = time.perf_counter() - t0
    return InversionResult(out, losses, seconds)


def train_dreambooth(
    models: BaselineModels,
    images: Sequence[np.ndarray] | np.ndarray,
    prompt: str = "sks person",
    seed: int = 0,
    steps: int | None = None,
) -> tuple[Adapter, float]:
    """Convenience wrapper of :meth:`BaselineModels.dreambooth`."""
    return models.dreambooth(np.asarray(images), prompt, seed=seed, steps=steps)
