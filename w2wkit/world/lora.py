"""Per-instance DreamBooth-style LoRA training on the miniature world's base model.

The paper's recipe, scaled down: one LoRA per instance (identity, breed) on
~10 renders with the instance prompt ("sks person"), rank 1, ``to_q``/``to_v``
of every attention module of the UNet, and the **same initialisation seed for
every model** (so the factors of different models are comparable). Written as
standard LoRA files through :func:`w2wkit.formats.write_adapter`. Resumable:
finished models are skipped and every file is written atomically. The training
loop is the diffusion engine's (:mod:`w2wkit.diffusion.dreambooth`).

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

from w2wkit.adapter import Adapter

__all__ = ["LoraSettings", "LoraTrainer"]


@dataclass
class LoraSettings:
    """How each instance's LoRA is trained.

    Attributes
    ----------
    rank, alpha : LoRA rank and alpha (scale = alpha / rank).
    targets : names of the UNet projections that get a LoRA (a module is targeted when its
        name equals or ends in ``.<target>``, e.g. ``to_q``, ``to_out.0``, ``ff.net.2``).
    steps, batch, lr : Adam training budget (no weight decay).
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
    """Trains instance LoRAs one at a time on one base pipeline, reusing the loaded models.

    A client of the engine's DreamBooth loop
    (:class:`w2wkit.diffusion.dreambooth.DreamBooth`) with one model per batch;
    the zoo (:class:`w2wkit.world.zoo.ZooTrainer`) runs the same loop with many.

    Parameters
    ----------
    base : path
        Folder of the base pipeline (``StableDiffusionPipeline`` layout).
    settings : LoraSettings, optional
    device : str
        ``cpu``, ``cuda`` or ``auto``.
    """

    def __init__(
        self,
        base: str | os.PathLike[str],
        settings: LoraSettings | None = None,
        device: str = "cpu",
    ) -> None:
        import torch

        from w2wkit.diffusion.dreambooth import DreamBooth

        self.settings = s = settings or LoraSettings()
        torch.set_num_threads(s.threads)
        self.base = str(base)
        self.engine = DreamBooth(
            base,
            targets=s.targets,
            rank=s.rank,
            alpha=s.alpha,
            init_seed=s.init_seed,
            device=device,
        )
        self.device = self.engine.device
        self.pipe = self.engine.pipe
        self.targets = self.engine.targets
        self.engine.install(1)  # the shared initialisation, before any training

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
        s = self.settings
        adapters, losses = self.engine.train(
            [np.asarray(images)], prompt, [int(seed)], steps=s.steps, batch=s.batch, lr=s.lr
        )
        return adapters[0], float(losses[0])

    def to_adapter(self) -> Adapter:
        """The current LoRA weights as an :class:`Adapter` (module order of the UNet)."""
        return self.engine.adapters()[0]

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
