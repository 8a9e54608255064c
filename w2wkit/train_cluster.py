"""``w2wkit train --cluster``: the models of a training run as Dask tasks.

:func:`w2wkit.train` with ``client=`` lands here after it has checked the input and the
output folder exactly as a single-process run does (instances, pipeline folder, targets,
recipe, an output folder of another recipe). Then:

1. every picture is decoded once on this process (an unreadable one is named before
   anything is written, as without a cluster);
2. every worker is asked whether it sees the base pipeline, every picture and the output
   folder (a shared file system); one that does not is named with the first path it
   misses, and nothing is written (an output folder this run made is removed);
3. the models left to train are cut into chunks (``models_per_batch`` models, or in
   ``auto`` about two chunks per worker, at most 32), one task each. A worker keeps the
   base pipeline loaded between its tasks (:data:`_TRAINERS`, one per worker process),
   trains its chunk in one batch (halved on out-of-memory) on its device, and publishes
   each model itself, atomically, into the output folder;
4. this process records each chunk's models in ``train_manifest.json`` as the chunk
   comes back, and shows the progress (models, models/h, ETA; the running chunks' steps
   come as worker events).

A worker that dies mid-chunk: the scheduler runs the chunk again on another worker. The
chunk is trained again whole (same batch, so the same numbers), and each of its models
that the dead worker had already published (a complete file whose metadata carries the
same recipe hash and seed) is kept as it is: no model is lost, written twice or
half-written. A killed driver: run it again; it resumes from the manifest like a
single-process run (the workers' files of unrecorded models are rewritten atomically).

GPU workers: with ``device`` ``cuda...`` (or ``auto`` when the workers declare a ``GPU``
resource, ``dask worker --resources GPU=1``) every task asks for ``GPU=1``, so a worker
runs one chunk at a time on its GPU whatever its thread count.

Dask is imported only here, and only when a client is given.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from w2wkit.errors import W2WError

__all__ = [
    "CHUNK_CAP",
    "EVENT_TOPIC",
    "ClusterTrainError",
    "TrainOps",
    "train_chunk",
    "train_on_cluster",
]

#: Largest chunk ``models_per_batch="auto"`` makes.
CHUNK_CAP = 32
#: Topic of the workers' step events (progress).
EVENT_TOPIC = "w2wkit-train-steps"
#: Per worker process: the loaded base pipeline of the last recipe, keyed by its identity.
_TRAINERS: dict[tuple, Any] = {}
_TRAINERS_LOCK = threading.Lock()


class ClusterTrainError(W2WError):
    """A cluster training run cannot go on (a worker cannot see the input, a chunk fails)."""


class TrainOps(NamedTuple):
    """The training primitives of :mod:`w2wkit.training`, handed over by :func:`w2wkit.train`.

    This module does not import :mod:`w2wkit.training` (which calls it): the driver is
    given these, and sends them with every task (functions travel by name, so a worker
    imports :mod:`w2wkit.training` itself). Each is the single-process path's own.
    """

    load_pictures: Callable[..., Any]
    train_batch: Callable[..., Any]
    publish_model: Callable[..., Any]
    auto_batch: Callable[..., int]
    is_oom: Callable[[BaseException], bool]
    write_manifest: Callable[[Path, dict[str, Any]], None]
    write_loss_record: Callable[..., None]
    caption_prompt: Callable[..., str]


# --------------------------------------------------------------------------- worker side


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"process {os.getpid()}"


def _missing(paths: Sequence[str]) -> str | None:
    """The first of ``paths`` this process cannot see, or None."""
    for p in paths:
        if not os.path.exists(p):
            return p
    return None


def _check_visible(paths: Sequence[str], folder: str | None = None) -> str | None:
    """On a worker: the first missing path (and, given, whether ``folder`` is a folder)."""
    miss = _missing(paths)
    if miss is None and folder is not None and not os.path.isdir(folder):
        miss = folder
    return miss


def _malloc_for_training() -> bool:
    """Undo, in this worker process, what dask's ``MALLOC_TRIM_THRESHOLD_`` does to torch.

    A dask nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand freed
    memory back to the system). Setting it switches off glibc's adaptive mmap threshold:
    every allocation above 128 KiB is then a fresh ``mmap`` that is page-faulted in and
    unmapped again, and torch allocates its activations anew every step: a training step
    on the CPU took 1.9x as long (22.0 s vs 11.5 s for 8 steps of 4 models, miniature
    base, measured). Setting the thresholds to where the adaptive scheme ends up (32 MiB
    mmap, 64 MiB trim) gives the speed back; memory above 64 MiB is still handed back.

    Returns
    -------
    bool
        Whether the thresholds were set (Linux with glibc, the variable set).
    """
    if not os.environ.get("MALLOC_TRIM_THRESHOLD_") or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mmap_ok = libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
        trim_ok = libc.mallopt(-1, 64 * 2**20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mmap_ok and trim_ok)


def _trainer(
    base: str, identity: str, recipe: Any, device: str, text_encoder: Sequence[str] | None
) -> Any:
    """The worker's DreamBooth for this base and recipe, loaded once per worker process."""
    from w2wkit.diffusion.dreambooth import DreamBooth

    key = (base, identity, tuple(recipe.targets), recipe.rank, recipe.alpha, recipe.init_seed)
    key += (device, tuple(text_encoder or ()), recipe.precision)
    with _TRAINERS_LOCK:
        if key not in _TRAINERS:
            _TRAINERS.clear()  # one pipeline per worker process
            _malloc_for_training()
            trainer = DreamBooth(
                base,
                targets=recipe.targets,
                rank=recipe.rank,
                alpha=recipe.alpha,
                init_seed=recipe.init_seed,
                device=device,
                text_encoder_targets=text_encoder,
                precision=recipe.precision,
            )
            if str(trainer.device).startswith("cuda"):
                import torch

                torch.backends.cuda.matmul.allow_tf32 = False  # as the single-process path
            _TRAINERS[key] = trainer
        return _TRAINERS[key]


def _die_hook(published: int, path: Path) -> None:
    """Test hook: ``W2WKIT_TEST_CLUSTER_DIE=k:MARKER`` ends this worker process (``os._exit``)
    right after the k-th model a chunk publishes (``path``), once: the process that creates
    the file MARKER (it must not exist) writes its pid, the model's file name and its
    ``st_mtime_ns`` into it, then exits."""
    spec = os.environ.get("W2WKIT_TEST_CLUSTER_DIE", "")
    k, _, marker = spec.partition(":")
    if not (k.isdigit() and marker) or published != int(k):
        return
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return
    os.write(fd, f"{os.getpid()} {path.name} {path.stat().st_mtime_ns}".encode())
    os.close(fd)
    os._exit(17)


def _step_events(chunk_id: int, every_s: float = 0.5) -> Callable[[int], None]:
    """``on_step`` that sends ``(chunk_id, steps done)`` to the driver at most every 0.5 s."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return lambda k: None
    last = [0.0]

    def on_step(k: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            worker.log_event(EVENT_TOPIC, {"chunk": chunk_id, "step": k})

    return on_step


def _error(exc: W2WError) -> dict[str, Any]:
    return {
        "class": type(exc).__name__,
        "message": exc.message,
        "path": exc.path,
        "key": exc.key,
        "hint": exc.hint,
        "param": exc.param,
    }


def train_chunk(job: dict[str, Any]) -> dict[str, Any]:
    """A dask task: train one chunk of models on this worker and publish them.

    Parameters
    ----------
    job : dict
        ``chunk`` (its number), ``instances`` (Instance list), ``seeds`` (one per
        instance), ``base``, ``identity``, ``recipe`` (a Recipe), ``key`` (the recipe
        hash), ``out``, ``format``, ``device``, ``size``, ``skip_bad``, ``batch`` (models
        per batch, or None: from free memory on CUDA, 8 on the CPU), ``ops``
        (:class:`TrainOps`) and, for a dry run, ``dry_steps`` (a timed warm-up instead of
        training).

    Returns
    -------
    dict
        ``chunk``, ``worker``, ``entries`` (name -> manifest entry), ``notes``, or
        ``error`` (a W2WError's fields: the driver raises it), or ``seconds_per_step``.
    """
    ops: TrainOps = job["ops"]
    worker = _worker_name()
    notes: list[str] = []
    try:
        insts = list(job["instances"])
        seeds = [int(s) for s in job["seeds"]]
        base, out = job["base"], Path(job["out"])
        need = [os.path.join(base, "model_index.json")] + [
            str(p) for i in insts for p in i.pictures
        ]
        miss = _check_visible(need, None if job.get("dry_steps") else str(out))
        if miss is not None:
            raise ClusterTrainError(
                f"worker {worker} cannot see this file",
                path=miss,
                hint="every worker must see the input, the base pipeline and the output "
                "folder at the same paths (a shared file system)",
            )
        recipe = job["recipe"]
        trainer = _trainer(
            base, job["identity"], recipe, job["device"], job.get("text_encoder_targets")
        )
        said: set[str] = set()
        images, prompts = [], []
        for i in insts:
            kept: list[int] = []
            images.append(
                ops.load_pictures(
                    i,
                    job["size"],
                    skip_bad=job["skip_bad"],
                    warn=notes.append,
                    said=said,
                    center_crop=not recipe.random_crop,
                    kept=kept,
                )
            )
            caps = i.captions
            prompts.append(
                [ops.caption_prompt(caps[k] if k < len(caps) else None, recipe) for k in kept]
            )

        def options(lo: int, hi: int) -> dict[str, Any]:
            """The engine's options of models lo..hi (as the single-process path's)."""
            kw: dict[str, Any] = {}
            if recipe.captions:
                kw["prompts"] = prompts[lo:hi]
            if recipe.flip:
                kw["flip"] = True
            if recipe.random_crop:
                kw["crop_size"] = job["size"]
            return kw

        if job.get("dry_steps"):
            warm = int(job["dry_steps"])
            zeros = [0] * len(images)
            kw = options(0, len(images))
            ops.train_batch(trainer, images, zeros, replace(recipe, steps=1), **kw)  # caches
            t0 = time.perf_counter()
            ops.train_batch(trainer, images, zeros, replace(recipe, steps=warm), **kw)
            trainer.release()
            sps = (time.perf_counter() - t0) / warm
            return {"chunk": job["chunk"], "worker": worker, "seconds_per_step": sps}
        batch = job.get("batch")
        if batch is None:
            batch = ops.auto_batch(trainer, images[0], recipe, len(insts), options(0, 1))
        entries: dict[str, Any] = {}
        on_step = _step_events(int(job["chunk"]))
        lo = 0
        published = 0
        while lo < len(insts):
            hi = min(len(insts), lo + int(batch))
            try:
                adapters, losses = ops.train_batch(
                    trainer, images[lo:hi], seeds[lo:hi], recipe, on_step=on_step,
                    **options(lo, hi),
                )  # fmt: skip
            except RuntimeError as exc:
                if not ops.is_oom(exc) or batch == 1:
                    raise
                trainer.release()
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                batch = max(1, int(batch) // 2)
                notes.append(f"out of memory on {worker}: models per batch halved to {batch}")
                continue
            trainer.release()
            hist, prior_hist = trainer.history, trainer.prior_history
            for j, (inst, seed, ad, loss) in enumerate(
                zip(insts[lo:hi], seeds[lo:hi], adapters, losses, strict=True)
            ):
                ops.write_loss_record(
                    out, inst.name, seed, hist[:, j],
                    None if prior_hist is None else prior_hist[:, j], float(loss),
                )  # fmt: skip
                entries[inst.name] = ops.publish_model(
                    inst, ad, float(loss), seed, recipe, out, job["format"], job["key"],
                    keep_complete=True,
                )  # fmt: skip
                if not entries[inst.name].get("kept") and entries[inst.name]["status"] == "done":
                    published += 1
                    _die_hook(published, out / entries[inst.name]["file"])
            lo = hi
        return {"chunk": job["chunk"], "worker": worker, "entries": entries, "notes": notes}
    except W2WError as exc:  # returned, not raised: the driver raises it as one line
        return {"chunk": job.get("chunk"), "worker": worker, "error": _error(exc)}


# --------------------------------------------------------------------------- driver side


def _raise(err: dict[str, Any]) -> None:
    from w2wkit import errors

    cls = getattr(errors, str(err.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, W2WError)):
        cls = ClusterTrainError
    raise cls(
        str(err.get("message")),
        path=err.get("path"),
        key=err.get("key"),
        hint=err.get("hint"),
        param=err.get("param"),
    )


def _workers(client: Any) -> dict[str, dict[str, Any]]:
    return dict(client.scheduler_info(n_workers=-1).get("workers", {}))


def _task_resources(
    workers: dict[str, dict[str, Any]], device: str, warn: Callable[[str], None]
) -> dict[str, float] | None:
    """``{"GPU": 1}`` when the chunks train on CUDA and the workers declare GPUs.

    Parameters
    ----------
    workers : dict
        The scheduler's workers (``client.scheduler_info()["workers"]``: address -> info
        with ``resources``).
    device : str
        The run's device (``auto``, ``cpu``, ``cuda``, ``cuda:1``...).
    warn : callable
        Told when CUDA is asked for but no worker declares a ``GPU`` resource.
    """
    gpus = [a for a, w in workers.items() if (w.get("resources") or {}).get("GPU")]
    if device.startswith("cuda") or (device == "auto" and gpus):
        if gpus:
            return {"GPU": 1}
        warn(
            "the workers declare no GPU resource: each runs as many chunks at once as it has "
            "threads (start them with `dask worker --nthreads 1 --resources GPU=1`)"
        )
    return None


def _preflight(client: Any, paths: list[str], out: Path | None) -> None:
    """Every worker sees ``paths`` (and the folder ``out``), or one line naming the first
    worker and path that is missing."""
    seen = client.run(_check_visible, paths, None if out is None else str(out))
    for worker, miss in sorted(seen.items()):
        if miss is not None:
            raise ClusterTrainError(
                f"worker {worker} cannot see this file",
                path=miss,
                hint="every worker must see the input, the base pipeline and the output folder "
                "at the same paths (a shared file system)",
            )


def _chunk_size(models_per_batch: int | None, todo: int, workers: int) -> int:
    if models_per_batch is not None:
        return int(models_per_batch)
    return max(1, min(CHUNK_CAP, math.ceil(todo / (2 * max(1, workers)))))


def _cancel(client: Any, futures: Sequence[Any]) -> None:
    try:
        client.cancel(list(futures))
    except Exception:  # the scheduler may be gone already
        pass


def train_on_cluster(
    client: Any,
    *,
    insts: list[Any],
    todo: list[Any],
    labels: Path | None,
    base: Path,
    out: Path,
    recipe: Any,
    settings: dict[str, Any],
    models: dict[str, Any],
    seeds: dict[str, int],
    size: int,
    models_per_batch: int | None,
    format: str,
    device: str,
    skip_bad_images: bool,
    dry_run: bool,
    progress: bool,
    warn: Callable[[str], None],
    plan: Any,
    key: str,
    ops: TrainOps,
    text_encoder_targets: Sequence[str] | None = None,
) -> Any:
    """The cluster half of :func:`w2wkit.train` (called by it with the checked input).

    Parameters
    ----------
    client : dask.distributed.Client
    insts, todo : list of Instance
        Every instance; those left to train (input order).
    labels : pathlib.Path or None
        The input's ``labels.csv`` (copied into ``out``).
    base, out : pathlib.Path
        The checked pipeline folder; the output folder.
    recipe : Recipe
    settings : dict
        Recipe, base identity and format, as the manifest records them.
    models : dict
        The manifest's entries so far (updated in place).
    seeds : dict of str to int
        Seed per instance.
    size : int
        Side of the training pictures.
    models_per_batch : int or None
        Models per chunk (None: ``auto``).
    format, device : str
    skip_bad_images, dry_run, progress : bool
    warn : callable
    plan : TrainPlan
        The run's plan so far (models, done, failed, todo, steps); this sets its
        ``models_per_batch`` (models per chunk), ``batches`` (chunks), ``written``...
    key : str
        The recipe hash (``settings_key``), carried in every model's metadata.
    ops : TrainOps
        The training primitives.
    text_encoder_targets : sequence of str, optional
        Text-encoder modules that get a LoRA too (``Recipe.text_encoder``).

    Returns
    -------
    TrainPlan
        ``plan``.
    """
    from distributed import as_completed

    from w2wkit.atomic import atomic_path
    from w2wkit.cluster import dashboard_link
    from w2wkit.progress import Bar

    n_workers = len(_workers(client))
    if n_workers == 0:
        raise ClusterTrainError("the cluster has no workers", param="cluster")
    link = dashboard_link(client)
    warn(f"cluster: {n_workers} workers" + (f", dashboard {link}" if link else ""))
    chunk = _chunk_size(models_per_batch, len(todo), n_workers)
    chunks = [todo[k : k + chunk] for k in range(0, len(todo), chunk)]
    plan.models_per_batch, plan.batches = chunk, len(chunks)
    said: set[str] = set()
    for inst in todo:  # every picture checked here before anything is written
        ops.load_pictures(
            inst, size, skip_bad=skip_bad_images, warn=warn, said=said,
            center_crop=not recipe.random_crop,
        )  # fmt: skip
    if not todo:
        return plan
    resources = _task_resources(_workers(client), device, warn)

    def job(number: int, part: list[Any], **extra: Any) -> dict[str, Any]:
        return {
            "chunk": number,
            "instances": list(part),
            "seeds": [seeds[i.name] for i in part],
            "base": str(base),
            "identity": settings["base"]["sha256"],
            "recipe": recipe,
            "ops": ops,
            "key": key,
            "out": str(out),
            "format": format,
            "device": device,
            "size": size,
            "skip_bad": skip_bad_images,
            "batch": models_per_batch,
            "text_encoder_targets": text_encoder_targets,
            **extra,
        }

    inputs = [str(base / "model_index.json")] + [str(p) for i in todo for p in i.pictures]
    _preflight(client, inputs, None)
    if dry_run:  # a short warm-up of the first chunk on one worker
        fut = client.submit(
            train_chunk, job(0, chunks[0], dry_steps=min(3, recipe.steps)), pure=False,
            resources=resources,
        )  # fmt: skip
        res = fut.result()
        if "error" in res:
            _raise(res["error"])
        plan.seconds_per_step = float(res["seconds_per_step"])
        waves = math.ceil(len(chunks) / n_workers)
        plan.estimated_s = plan.seconds_per_step * recipe.steps * waves
        return plan

    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _preflight(client, [], out)
    except W2WError:
        if made and not any(out.iterdir()):
            out.rmdir()
        raise
    if labels is not None:
        with atomic_path(out / "labels.csv", overwrite=True) as tmp:
            shutil.copyfile(labels, tmp)
    manifest = {**settings, "models": models, "w2wkit": "train"}
    ops.write_manifest(out, manifest)

    steps: dict[int, int] = {}  # chunk -> steps done (worker events)
    over: set[int] = set()  # chunks back
    lock = threading.Lock()

    def on_event(event: Any) -> None:
        msg = event[1] if isinstance(event, tuple) and len(event) == 2 else event
        if isinstance(msg, dict) and "chunk" in msg:
            with lock:
                if int(msg["chunk"]) not in over:  # an event may come after its chunk
                    steps[int(msg["chunk"])] = int(msg.get("step", 0))

    sizes = {n: len(c) for n, c in enumerate(chunks)}
    subscribed = True
    try:
        client.subscribe_topic(EVENT_TOPIC, on_event)
    except Exception:  # progress by chunk only
        subscribed = False
    run = secrets.token_hex(6)  # task keys of this run only (never another run's result)
    futures = {
        client.submit(
            train_chunk, job(n, c), key=f"w2wkit-train-{run}-{n}",
            pure=False, resources=resources,
        ): n
        for n, c in enumerate(chunks)
    }  # fmt: skip
    order = {i.name: k for k, i in enumerate(insts)}
    recorded = plan.done + plan.failed
    try:
        with Bar(len(insts), "train", enabled=progress, unit="models", fields={"loss": "-"}) as bar:
            bar.set(recorded)
            arrived = as_completed(list(futures))
            while not arrived.is_empty():
                finished = arrived.next_batch(block=False) if arrived.has_ready() else []
                if not finished:
                    time.sleep(0.25)
                for fut in finished:
                    number = futures[fut]
                    try:
                        res = fut.result()
                    except Exception as exc:  # a chunk that killed its workers, or a bug
                        what = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                        raise ClusterTrainError(
                            f"chunk {number} ({', '.join(i.name for i in chunks[number])}) "
                            f"failed: {type(exc).__name__}{': ' + what if what else ''}",
                            path=out,
                            hint="the models recorded so far are kept; run again to resume",
                        ) from None
                    if "error" in res:
                        _raise(res["error"])
                    for note in res.get("notes", []):
                        if note not in said:
                            said.add(note)
                            warn(note)
                    for name, entry in res["entries"].items():
                        entry.pop("kept", None)
                        models[name] = entry
                        if entry["status"] == "failed":
                            plan.failed_names.append(name)
                            warn(f"model {name!r} diverged (non-finite loss); marked failed")
                        else:
                            plan.written.append(name)
                            bar.update(0, loss=f"{float(entry['loss']):.4f}")
                    ops.write_manifest(out, manifest)  # as each chunk comes back
                    recorded += len(res["entries"])
                    with lock:
                        over.add(number)
                        steps.pop(number, None)
                with lock:
                    part = sum(sizes[n] * k / recipe.steps for n, k in steps.items())
                bar.set(recorded, part)
    except BaseException:
        _cancel(client, [f for f in futures if not f.done()])
        raise
    finally:
        if subscribed:
            try:
                client.unsubscribe_topic(EVENT_TOPIC)
            except Exception:
                pass
    plan.written.sort(key=order.__getitem__)
    plan.failed_names.sort(key=order.__getitem__)
    return plan
