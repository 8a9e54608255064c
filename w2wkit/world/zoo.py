"""The dataset of models: many rank-1 LoRAs trained at once, in one batch.

The training itself is the diffusion engine's DreamBooth loop
(:class:`w2wkit.diffusion.dreambooth.DreamBooth`): every target ``Linear`` of
the UNet (``to_q``/``to_v`` of all attention modules by default) gets a layer
of the trainable per-sample LoRA bank holding the factors of ``M`` models, and
each sample of a batch goes through its own model's LoRA::

    out[s] = W x[s] + (alpha / r) * B[idx[s]] @ A[idx[s]] @ x[s]

so each model is trained exactly as if alone, from the paper's shared
initialisation. It is the function :func:`w2wkit.train` calls for each batch: ``train`` on
the world's pictures exported as instance folders writes bit for bit the models
:func:`train_zoo` writes (``tests/test_world_zoo_train.py``). This module adds the zoo
around it: which instances (jobs),
their training pictures, chunks of models per batch, worker processes, files,
labels, the manifest and continued training (start factors). The per-model
random draws (picture index, noise, timestep) come from a per-model generator
seeded as :meth:`w2wkit.world.lora.LoraTrainer.train_many` seeds the job at the
same position, so both give the same adapter.

torch, diffusers and peft are imported inside the functions.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter
from w2wkit.devices import resolve_device
from w2wkit.diffusion.dreambooth import DreamBooth
from w2wkit.diffusion.quiet import quiet
from w2wkit.errors import W2WError
from w2wkit.progress import Bar
from w2wkit.stio import file_sha256
from w2wkit.world.lora import LoraSettings

__all__ = [
    "ZooJob",
    "ZooSettings",
    "ZooTrainer",
    "train_zoo",
    "write_labels",
    "write_start",
    "zoo_jobs",
]


@dataclass
class ZooSettings(LoraSettings):
    """The zoo recipe: :class:`LoraSettings` plus batching and prior options.

    Attributes
    ----------
    chunk : int
        Models trained together in one batch (0: 8 on CPU, 1024 on CUDA).
    class_prompt : str or None
        Prompt of the prior-preservation samples (``"person"``); None: none.
    prior_weight : float
        Weight of the prior-preservation loss (0 disables it). The prior
        pictures are renders of other instances of the concept (the class
        distribution the base model was trained on).
    n_prior : int
        Prior pictures per model (drawn from a shared pool).
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    """

    chunk: int = 0
    class_prompt: str | None = None
    prior_weight: float = 0.0
    n_prior: int = 10
    device: str = "auto"


@dataclass(frozen=True)
class ZooJob:
    """One model of the zoo: which instance, which renders, which seed.

    Attributes
    ----------
    name : str
        Output stem (the instance name).
    concept : str
        Concept pack name.
    index, inst_seed : int
        ``generator.instance(index, inst_seed)``.
    number : int
        Position of the model in the zoo (its noise seed is derived from it).
    """

    name: str
    concept: str
    index: int
    inst_seed: int
    number: int


def zoo_jobs(concept: str, n: int, inst_seed: int = 0, start: int = 0, first: int = 0) -> list:
    """Jobs for instances ``start .. start + n - 1`` of ``concept``.

    ``first`` is the zoo number of the first job (noise seeds follow it).
    """
    from w2wkit.world.pictures import generator

    gen = generator(concept)
    out = []
    for k in range(n):
        inst = gen.instance(start + k, inst_seed)
        out.append(ZooJob(inst.name, concept, start + k, inst_seed, first + k))
    return out


def render_job(job: ZooJob, n_images: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Training renders of a job's instance, shape ``(n_images, size, size, 3)`` uint8."""
    from w2wkit.world.pictures import generator

    gen = generator(job.concept)
    return gen.render(gen.instance(job.index, job.inst_seed), n_images, seed=seed, size=size)


class ZooTrainer(DreamBooth):
    """Trains chunks of instance LoRAs on one base pipeline, all at once.

    The engine's :class:`~w2wkit.diffusion.dreambooth.DreamBooth` with the
    zoo's recipe (:class:`ZooSettings`: threads, device, prior preservation).

    Parameters
    ----------
    base : path
        Folder of the base pipeline.
    settings : ZooSettings, optional
    """

    def __init__(self, base: str | os.PathLike[str], settings: ZooSettings | None = None) -> None:
        import torch

        self.settings = s = settings or ZooSettings()
        if s.threads:
            torch.set_num_threads(s.threads)
        device = resolve_device(s.device)
        if device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        super().__init__(
            base,
            targets=s.targets,
            rank=s.rank,
            alpha=s.alpha,
            init_seed=s.init_seed,
            device=device,
        )

    def train_chunk(
        self,
        images: Sequence[np.ndarray],
        prompt: str,
        seeds: Sequence[int],
        prior: np.ndarray | None = None,
        budget_s: float | None = None,
        start: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> tuple[list[Adapter], np.ndarray]:
        """Train ``M = len(images)`` LoRAs together with the zoo's recipe.

        :meth:`DreamBooth.train <w2wkit.diffusion.dreambooth.DreamBooth.train>`
        with ``steps``, ``batch``, ``lr``, ``class_prompt`` and
        ``prior_weight`` from the settings; returns ``(adapters, losses (M,))``.
        """
        s = self.settings
        return self.train(
            images,
            prompt,
            seeds,
            steps=s.steps,
            batch=s.batch,
            lr=s.lr,
            prior=prior,
            class_prompt=s.class_prompt,
            prior_weight=s.prior_weight,
            budget_s=budget_s,
            start=start,
            on_step=on_step,
        )


# ---------------------------------------------------------------------------
# the zoo: chunks, files, workers, labels, manifest


def _chunk_size(settings: ZooSettings, device: str) -> int:
    if settings.chunk:
        return int(settings.chunk)
    return 1024 if device.startswith("cuda") else 8


def _model_seed(settings: ZooSettings, job: ZooJob, draw_round: int = 0) -> int:
    # the same seed LoraTrainer.train_many gives the job at position `number`
    seed = settings.seed * 1_000_003 + job.number
    if draw_round:  # a continuation round draws its pictures, noise and timesteps apart
        # (torch's CPU generator keeps the low 32 bits of a seed: mix within them)
        seed = (seed + int(draw_round) * 2_654_435_761) % 2**32
    return seed


def write_start(
    path: str | os.PathLike[str], names: Sequence[str], stacks: dict[str, tuple]
) -> Path:
    """Write the factors a zoo continues training from (one file, one row per model).

    Parameters
    ----------
    path : path
        The ``.safetensors`` file to write.
    names : sequence of str
        Model names, in the rows' order.
    stacks : dict
        Target -> ``(A (M, r, in), B (M, out, r))``.
    """
    from w2wkit.stio import write_safetensors

    tensors = {}
    for t, (a, b) in stacks.items():
        tensors[f"down.{t}"] = np.ascontiguousarray(a, np.float32)
        tensors[f"up.{t}"] = np.ascontiguousarray(b, np.float32)
    write_safetensors(path, tensors, metadata={"names": json.dumps(list(names))}, overwrite=True)
    return Path(path)


def _read_start(path: str | os.PathLike[str]) -> tuple[dict[str, int], dict[str, tuple]]:
    from w2wkit.stio import read_safetensors

    st = read_safetensors(path)
    rows = {n: i for i, n in enumerate(json.loads(st.metadata["names"]))}
    stacks = {
        k.removeprefix("down."): (v, st.tensors["up." + k.removeprefix("down.")])
        for k, v in st.tensors.items()
        if k.startswith("down.")
    }
    return rows, stacks


def _check_start(path: str, jobs: Sequence[ZooJob]) -> None:
    """Refuse a start file that lacks one of ``jobs`` (its header only)."""
    from w2wkit.stio import read_header

    _, meta = read_header(path)
    try:
        names = set(json.loads(meta["names"]))
    except (KeyError, ValueError) as exc:
        raise W2WError("not a start-factors file (no model names)", path=path) from exc
    gone = [j.name for j in jobs if j.name not in names]
    if gone:
        more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
        raise W2WError(f"the start factors have no model {gone[0]}{more}", path=path)


def _write_model(
    adapter: Adapter, path: Path, job: ZooJob, prompt: str, base: str, s: ZooSettings, loss: float
) -> None:
    from w2wkit.formats.registry import provenance_metadata, write_adapter

    adapter.metadata.update(
        provenance_metadata(
            "w2wkit.world.zoo",
            [base],
            instance=job.name,
            concept=job.concept,
            prompt=prompt,
            loss=f"{loss:.6f}",
            settings=json.dumps(asdict(s), sort_keys=True),
        )
    )
    write_adapter(adapter, path, format=s.format, overwrite=True)


def _run_chunks(
    trainer: ZooTrainer | str,
    settings: ZooSettings,
    chunks: list[list[ZooJob]],
    out_dir: str,
    prompt: str,
    images: Callable[[ZooJob], np.ndarray] | None,
    prior: np.ndarray | None,
    deadline: float | None,
    on_model: Callable[[int], None] | None = None,
    start: str | None = None,
    draw_round: int = 0,
    on_partial: Callable[[float], None] | None = None,
) -> list[dict[str, Any]]:
    if not isinstance(trainer, ZooTrainer):  # a base pipeline folder
        trainer = ZooTrainer(trainer, settings)
    rows, stacks = _read_start(start) if start is not None else ({}, {})
    base = trainer.base
    out = Path(out_dir)
    records: list[dict[str, Any]] = []
    pending = sum(len(c) for c in chunks)
    for chunk in chunks:
        if deadline is not None and time.time() > deadline:
            break
        share = len(chunk) / max(1, pending)  # of the time left, for this chunk
        pending -= len(chunk)
        todo = [j for j in chunk if not (out / f"{j.name}.safetensors").exists()]
        if not todo:
            continue
        t0 = time.perf_counter()
        imgs = [
            images(j) if images is not None else render_job(j, settings.n_images, settings.seed)
            for j in todo
        ]
        seeds = [_model_seed(settings, j, draw_round) for j in todo]
        init = None
        if start is not None:  # train_zoo checked that the file has every model
            sel = [rows[j.name] for j in todo]
            init = {t: (a[sel], b[sel]) for t, (a, b) in stacks.items()}
        left = None if deadline is None else max(1.0, (deadline - time.time()) * share)
        on_step = None
        if on_partial is not None:
            m_now, n_steps = len(todo), max(1, settings.steps)

            def on_step(k: int, m_now: int = m_now, n_steps: int = n_steps) -> None:
                on_partial(m_now * min(k, n_steps) / n_steps)

        oom = False
        try:
            adapters, losses = trainer.train_chunk(
                imgs, prompt, seeds, prior=prior, budget_s=left, start=init, on_step=on_step
            )
        except RuntimeError as exc:  # CUDA out of memory: train the chunk in two halves
            if "out of memory" not in str(exc).lower() or len(todo) < 2:
                raise
            oom = True
        if oom:
            import gc

            import torch

            trainer.release()
            gc.collect()
            torch.cuda.empty_cache()
            half = len(todo) // 2
            records += _run_chunks(
                trainer,
                settings,
                [todo[:half], todo[half:]],
                out_dir,
                prompt,
                images,
                prior,
                deadline,
                on_model,
                start,
                draw_round,
                on_partial,
            )
            continue
        dt = time.perf_counter() - t0
        for j, ad, ls in zip(todo, adapters, losses, strict=True):
            _write_model(ad, out / f"{j.name}.safetensors", j, prompt, base, settings, float(ls))
            records.append(
                {
                    "name": j.name,
                    "status": "trained",
                    "loss": float(ls),
                    "seconds": dt / len(todo),
                    "steps": trainer.steps_done,
                }
            )
        if on_model is not None:
            on_model(len(todo))
        if on_partial is not None:
            on_partial(0.0)
    return records


def _worker(args: tuple) -> list[dict[str, Any]]:
    base, settings, chunks, out_dir, prompt, deadline, start, draw_round, note = args
    last = [0.0]

    def on_partial(models: float) -> None:
        # the share of the running chunk done, for the parent's progress bar
        now = time.time()
        if models == 0.0 or now - last[0] >= 2.0:
            last[0] = now
            Path(note).write_text(f"{models:.4f}")

    with quiet():
        return _run_chunks(
            base,
            settings,
            chunks,
            out_dir,
            prompt,
            None,
            None,
            deadline,
            None,
            start,
            draw_round,
            on_partial,
        )


def _partial(notes: Sequence[Path]) -> float:
    """Models' worth of steps the workers' running chunks have done (their notes)."""
    total = 0.0
    for f in notes:
        try:
            total += float(f.read_text() or 0.0)
        except (OSError, ValueError):  # not written yet, or being written
            pass
    return total


def train_zoo(
    base: str | os.PathLike[str],
    jobs: Sequence[ZooJob],
    out_dir: str | os.PathLike[str],
    prompt: str,
    settings: ZooSettings | None = None,
    *,
    workers: int = 1,
    images: Callable[[ZooJob], np.ndarray] | None = None,
    prior: np.ndarray | None = None,
    budget_s: float | None = None,
    progress: bool = True,
    start: str | os.PathLike[str] | None = None,
    draw_round: int = 0,
) -> dict[str, Any]:
    """Train the LoRA of every job (skipping finished files) and write them.

    Parameters
    ----------
    base : path
        Base pipeline folder.
    jobs : sequence of ZooJob
        The models; file ``<out_dir>/<job.name>.safetensors`` each.
    prompt : str
        Instance prompt.
    workers : int
        CPU processes (each trains its share of the chunks); 1 runs inline.
    images : callable, optional
        ``job -> (n, H, W, 3)`` uint8 training pictures (default: render
        ``settings.n_images`` pictures with ``settings.seed``). Inline only.
    budget_s : float, optional
        No new chunk starts after this many seconds.
    start : path, optional
        A file of :func:`write_start`: every model continues training from its
        row there instead of the shared initialisation.
    draw_round : int
        0 for a model's first training; a continuation round ``k >= 1`` seeds
        the model's picture, noise and timestep draws apart from earlier rounds.

    Returns
    -------
    dict
        ``trained``, ``skipped``, ``missing`` counts, ``seconds``,
        ``models_per_hour`` and per-model ``records``.
    """
    s = settings or ZooSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise W2WError("zoo jobs have duplicate names", key="jobs")
    done = {j.name for j in jobs if (out / f"{j.name}.safetensors").exists()}
    todo = [j for j in jobs if j.name not in done]
    device = resolve_device(s.device)
    start = str(start) if start is not None else None
    if start is not None and todo:  # refuse before training anything, in any worker mode
        _check_start(start, todo)
    size = _chunk_size(s, device)
    if todo:  # balanced chunks (1100 models at 1024 -> 550 + 550)
        n_chunks = -(-len(todo) // size)
        size = -(-len(todo) // n_chunks)
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    t0 = time.time()
    deadline = t0 + budget_s if budget_s is not None else None
    records: list[dict[str, Any]] = []
    bar = Bar(len(todo), f"zoo ({device}, {len(chunks)} chunk(s))", enabled=progress, unit="models")
    with bar:
        if workers <= 1 or device != "cpu" or len(chunks) <= 1:
            records = _run_chunks(
                str(base),
                s,
                chunks,
                str(out),
                prompt,
                images,
                prior,
                deadline,
                bar.advance,
                start,
                draw_round,
                bar.partial,
            )
        else:
            ctx = mp.get_context("spawn")
            shares = [chunks[w::workers] for w in range(workers)]
            notes_dir = Path(tempfile.mkdtemp(prefix="w2wkit-zoo-progress-"))
            notes = [notes_dir / f"worker{w}.txt" for w in range(workers)]
            args = [
                (str(base), s, sh, str(out), prompt, deadline, start, draw_round, str(note))
                for sh, note in zip(shares, notes, strict=True)
                if sh
            ]
            try:
                with ctx.Pool(len(args)) as pool:
                    res = pool.map_async(_worker, args)
                    while not res.ready():
                        res.wait(1.0)
                        n_now = sum((out / f"{j.name}.safetensors").exists() for j in todo)
                        bar.set(n_now, _partial(notes))
                    for r in res.get():
                        records.extend(r)
            finally:
                shutil.rmtree(notes_dir, ignore_errors=True)
    seconds = time.time() - t0
    missing = [j.name for j in jobs if not (out / f"{j.name}.safetensors").exists()]
    trained = len(records)
    steps = [r["steps"] for r in records]
    return {
        "steps_min": min(steps) if steps else None,
        "steps_planned": s.steps,
        "trained": trained,
        "skipped": len(done),
        "missing": len(missing),
        "seconds": seconds,
        "models_per_hour": trained / seconds * 3600 if trained and seconds > 0 else None,
        "chunk": size,
        "device": device,
        "records": records,
    }


def write_labels(jobs: Sequence[ZooJob], path: str | os.PathLike[str]) -> Path:
    """Labels CSV of the jobs' ground-truth binary attributes (``name`` column first)."""
    from w2wkit.stio import atomic_path
    from w2wkit.world.pictures import generator

    rows, header = [], None
    for j in jobs:
        inst = generator(j.concept).instance(j.index, j.inst_seed)
        if header is None:
            header = ["name", *inst.attributes.keys()]
        rows.append([j.name, *(int(v) for v in inst.attributes.values())])
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header or ["name"])
        w.writerows(rows)
    return path


def write_zoo_manifest(
    folder: str | os.PathLike[str], jobs: Sequence[ZooJob], info: dict[str, Any]
) -> Path:
    """The zoo folder's ``manifest.json``: settings, one entry per model (file, sha256, instance).

    Not the shipped world's manifest (:func:`w2wkit.world.shipped.write_manifest`).
    """
    from w2wkit.stio import atomic_path

    folder = Path(folder)
    models = []
    for j in jobs:
        f = folder / f"{j.name}.safetensors"
        if f.exists():
            models.append(
                {
                    "name": j.name,
                    "file": f.name,
                    "sha256": file_sha256(f),
                    "concept": j.concept,
                    "index": j.index,
                    "inst_seed": j.inst_seed,
                }
            )
    path = folder / "manifest.json"
    with atomic_path(path, overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps({**info, "models": models}, indent=1, default=str))
    return path
