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

w2w inversion itself is :func:`w2wkit.invert.invert`, the user-facing code.

torch, diffusers and peft are imported inside the functions.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter

__all__ = ["BaselineModels", "edit_prompt", "edit_undisentangled"]


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


class BaselineModels:
    """The base pipeline loaded once for the DreamBooth baselines (the zoo recipe).

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
        from w2wkit.render import resolve_device

        self.device = resolve_device(device)
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


def _adapter_from(trainer: Any, settings: Any) -> Adapter:
    from w2wkit.adapter import LoraLayer

    layers = {}
    for name in trainer.targets:
        a = trainer.lora_params[f"{name}.lora_A.default.weight"].detach().cpu().numpy().copy()
        b = trainer.lora_params[f"{name}.lora_B.default.weight"].detach().cpu().numpy().copy()
        layers[f"unet.{name}"] = LoraLayer(down=a, up=b, alpha=float(settings.alpha))
    return Adapter(layers=layers, metadata={})
