"""Per-instance DreamBooth-style LoRA training on the miniature world's base model.

The paper's recipe, scaled down: one LoRA per instance (identity, breed) on
~10 renders with the instance prompt ("sks person"), rank 1, ``to_q``/``to_v``
of every attention module of the UNet, and the **same initialisation seed for
every model** (so the factors of different models are comparable). Written as
standard LoRA files through :func:`w2wkit.formats.write_adapter`. Resumable:
finished models are skipped and every file is written atomically.

torch, diffusers and peft are imported inside the functions.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer

__all__ = ["LoraSettings", "LoraTrainer"]


@dataclass
class LoraSettings:
    """How each instance's LoRA is trained.

    Attributes
    ----------
    rank, alpha : LoRA rank and alpha (scale = alpha / rank).
    targets : names of the UNet projections that get a LoRA (a module is targeted when its
        name equals or ends in ``.<target>``, e.g. ``to_q``, ``to_out.0``, ``ff.net.2``).
    steps, batch, lr : AdamW training budget.
    n_images : renders of the instance used for training.
    init_seed : seed of the LoRA initialisation, the same for every model.
    seed : seed of renders and noise (combined with the instance index).
    format : file format written (``diffusers``, ``kohya``, ``peft``).
    threads : torch threads.
    """

    rank: int = 1
    alpha: float = 1.0
    targets: tuple[str, ...] = ("to_q", "to_v")
    steps: int = 150
    batch: int = 4
    lr: float = 2e-3
    n_images: int = 10
    init_seed: int = 0
    seed: int = 0
    format: str = "diffusers"
    threads: int = 1


class LoraTrainer:
    """Trains instance LoRAs on one base pipeline, reusing the loaded models.

    Parameters
    ----------
    base : path
        Folder of the base pipeline (``StableDiffusionPipeline`` layout).
    settings : LoraSettings, optional
    """

    def __init__(self, base: str | os.PathLike[str], settings: LoraSettings | None = None) -> None:
        import torch
        from diffusers import StableDiffusionPipeline
        from peft import LoraConfig

        self.settings = s = settings or LoraSettings()
        torch.set_num_threads(s.threads)
        self.base = str(base)
        pipe = StableDiffusionPipeline.from_pretrained(self.base, local_files_only=True)
        self.pipe = pipe
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False)
            m.eval()
        self.targets = [
            n
            for n, _ in pipe.unet.named_modules()
            if any(n == t or n.endswith("." + t) for t in s.targets)
        ]
        torch.manual_seed(s.init_seed)  # same initialisation for every model
        pipe.unet.add_adapter(
            LoraConfig(
                r=s.rank, lora_alpha=s.alpha, target_modules=self.targets, init_lora_weights=True
            )
        )
        self.lora_params = {n: p for n, p in pipe.unet.named_parameters() if "lora_" in n}
        for p in self.lora_params.values():
            p.requires_grad_(True)
        self.init_state = {n: p.detach().clone() for n, p in self.lora_params.items()}

    def _embed(self, prompt: str) -> Any:
        import torch

        tok = self.pipe.tokenizer
        ids = tok(
            [prompt],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            return self.pipe.text_encoder(ids)[0]

    def train(self, images: np.ndarray, prompt: str, seed: int = 0) -> tuple[Adapter, float]:
        """Train one LoRA from the shared initialisation.

        Parameters
        ----------
        images : numpy.ndarray
            Shape ``(n, H, W, 3)`` uint8.
        prompt : str
            Instance prompt, e.g. ``"sks person"``.
        seed : int
            Seed of the noise and batch draws.

        Returns
        -------
        adapter : Adapter
            ``unet.<module>`` -> LoraLayer (down ``(r, in)``, up ``(out, r)``).
        loss : float
            Mean loss of the last 20% of steps.
        """
        import torch

        s = self.settings
        with torch.no_grad():
            for n, p in self.lora_params.items():
                p.copy_(self.init_state[n])
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            lat = self.pipe.vae.encode(x).latent_dist.mean * self.pipe.vae.config.scaling_factor
        ehs = self._embed(prompt)
        sched = self.pipe.scheduler
        gen = torch.Generator().manual_seed(int(seed))
        opt = torch.optim.AdamW(list(self.lora_params.values()), lr=s.lr, weight_decay=0.0)
        losses = []
        unet = self.pipe.unet
        for _ in range(s.steps):
            idx = torch.randint(0, len(lat), (s.batch,), generator=gen)
            x0 = lat[idx]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, sched.config.num_train_timesteps, (s.batch,), generator=gen)
            pred = unet(
                sched.add_noise(x0, noise, t), t, encoder_hidden_states=ehs.expand(s.batch, -1, -1)
            ).sample
            loss = torch.mean((pred - noise) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        tail = losses[int(0.8 * len(losses)) :] or losses
        return self.to_adapter(), float(np.mean(tail))

    def to_adapter(self) -> Adapter:
        """The current LoRA weights as an :class:`Adapter` (module order of the UNet)."""
        s = self.settings
        layers: dict[str, LoraLayer] = {}
        for name in self.targets:
            a = self.lora_params[f"{name}.lora_A.default.weight"].detach().numpy().copy()
            b = self.lora_params[f"{name}.lora_B.default.weight"].detach().numpy().copy()
            layers[f"unet.{name}"] = LoraLayer(down=a, up=b, alpha=float(s.alpha))
        return Adapter(layers=layers, metadata={})

    def train_many(
        self,
        jobs: Iterable[tuple[str, Callable[[], np.ndarray]]],
        out_dir: str | os.PathLike[str],
        prompt: str,
        progress: Callable[[str], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Train and write one LoRA per job, skipping files that already exist.

        Parameters
        ----------
        jobs : iterable of (name, make_images)
            Output stem and a function returning the instance's renders.
        out_dir : path
            Folder of the ``<name>.safetensors`` files (created).
        prompt : str
            Instance prompt.

        Returns
        -------
        list of dict
            One record per job: ``name``, ``file``, ``status`` (``trained`` or
            ``skipped``), ``loss``, ``seconds``.
        """
        from w2wkit.formats.registry import provenance_metadata, write_adapter

        s = self.settings
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        records = []
        for k, (name, make_images) in enumerate(jobs):
            path = out / f"{name}.safetensors"
            if path.exists():
                records.append({"name": name, "file": str(path), "status": "skipped"})
                continue
            t0 = time.perf_counter()
            adapter, loss = self.train(make_images(), prompt, seed=s.seed * 1_000_003 + k)
            adapter.metadata.update(
                provenance_metadata(
                    "w2wkit.world.lora",
                    [self.base],
                    instance=name,
                    prompt=prompt,
                    settings=str(asdict(s)),
                )
            )
            write_adapter(adapter, path, format=s.format)
            rec = {
                "name": name,
                "file": str(path),
                "status": "trained",
                "loss": loss,
                "seconds": time.perf_counter() - t0,
            }
            records.append(rec)
            if progress is not None:
                progress(f"{name}: loss {loss:.4f} in {rec['seconds']:.1f} s")
        return records


def instance_jobs(
    generator: Any, instances: Sequence[Any], n_images: int, seed: int = 0, size: int = 32
) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """Jobs for :meth:`LoraTrainer.train_many` rendering each instance lazily."""
    return [
        (inst.name, lambda inst=inst: generator.render(inst, n_images, seed=seed, size=size))
        for inst in instances
    ]
