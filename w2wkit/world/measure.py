"""Zoo fidelity: do a zoo model's generations show its own instance?

The miniature world's build measures it once (``metrics`` phase, settings in its
profile); :func:`measure_world` measures it again on any built or shipped world
with other settings (``w2wkit world measure``), without changing the world.

Protocol (the issue's "zoo fidelity"): for each of ``models`` zoo models chosen at
random, render ``generations`` pictures with the model's LoRA and its training
prompt (DDIM ``steps``, classifier-free guidance ``guidance``, seeds ``10000 ..``;
rendered by the engine's sampler, :meth:`w2wkit.diffusion.sampler.Renderer.sample`,
the one the evaluation renders with);
render ``ref_images`` procedural pictures of every zoo instance (new nuisance
draws) and average their identity embeddings into one unit reference per
instance. The model is matched when its own instance has the highest mean cosine
score (mean over its generations) among ``candidates`` instances: itself plus
``candidates - 1`` drawn at random from the other zoo models. The same match made
for each generation alone is reported too (``fidelity_top1_per_image``).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.errors import W2WError
from w2wkit.world import CONCEPTS

__all__ = [
    "FidelitySettings",
    "fidelity_settings",
    "measure_world",
    "record_measurement",
    "zoo_fidelity",
]


@dataclass(frozen=True)
class FidelitySettings:
    """Settings of the zoo-fidelity test.

    Attributes
    ----------
    models : int
        Zoo models tested (drawn at random; all when the zoo is smaller).
    candidates : int
        Instances each model is matched among (itself included).
    generations : int
        Pictures generated per tested model (seeds ``10000 ..``).
    ref_images : int
        Procedural reference renders per instance (averaged embedding).
    steps : int
        DDIM steps of the generations.
    guidance : float
        Classifier-free guidance scale.
    seed : int
        Seed of the model and candidate draws.
    ref_seed : int
        Seed of the reference renders' nuisance.
    scheduler : str
        Sampling scheduler of the generations (a name of
        :data:`w2wkit.diffusion.schedule.SCHEDULERS`).
    batch_size : int
        Pictures per UNet call.
    """

    models: int = 200
    candidates: int = 50
    generations: int = 8
    ref_images: int = 16
    steps: int = 20
    guidance: float = 3.0
    seed: int = 123
    ref_seed: int = 999
    scheduler: str = "ddim"
    batch_size: int = 256

    def check(self) -> None:
        """Raise :class:`W2WError` naming the first invalid value."""
        for key in ("models", "generations", "ref_images", "steps", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise W2WError(f"must be >= 1, got {getattr(self, key)}", param=key)
        if int(self.candidates) < 2:
            raise W2WError(f"must be >= 2, got {self.candidates}", param="candidates")
        if not float(self.guidance) >= 0:
            raise W2WError(f"must be >= 0, got {self.guidance}", param="guidance")


def zoo_fidelity(
    renderer: Any,
    bank: dict[str, Any],
    evaluators: Any,
    concept: str,
    specs: list[tuple[int, int]],
    prompt: str,
    settings: FidelitySettings,
    rng: np.random.Generator,
    workers: int = 1,
    tested: Any = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Measure zoo fidelity and seed consistency of stacked zoo models.

    Parameters
    ----------
    renderer : w2wkit.diffusion.sampler.Renderer
        The sampler on the zoo's base pipeline.
    bank : dict of str to StackedLayer
        The zoo's ``M`` models stacked
        (:func:`w2wkit.diffusion.bank.stack_factors` of the world's stacks).
    evaluators : w2wkit.world.evaluators.Evaluators
    concept : str
    specs : list of (int, int)
        ``(index, inst_seed)`` of each of the ``M`` models' instance.
    prompt : str
        The zoo's training prompt.
    settings : FidelitySettings
    rng : numpy.random.Generator
        Draws the tested models and the candidates.
    workers : int
        Processes for the reference renders.
    tested : sequence of int, optional
        The models to test (bank rows) instead of ``settings.models`` drawn at
        random; the candidates are still drawn from ``rng``.

    Returns
    -------
    metrics : dict
        ``fidelity_top1`` (a model's pictures scored together),
        ``fidelity_top1_per_image`` (each picture alone), ``tested_models``,
        ``id_score_gen_vs_own_refs``, intra / inter-model ID scores, timings
        and the settings.
    tested : numpy.ndarray
        ``(n,)`` indices of the tested models.
    generations : numpy.ndarray
        ``(n * generations, H, W, 3)`` uint8, model-major.
    """
    from w2wkit.world.pictures import render_instances

    settings.check()
    m = len(specs)
    if m < 2:
        raise W2WError(f"the {concept} zoo has {m} model(s); fidelity needs at least 2")
    if tested is None:
        test = rng.permutation(m)[: min(settings.models, m)]
    else:
        test = np.asarray(tested, dtype=np.int64).reshape(-1)
        if test.size == 0 or test.min() < 0 or test.max() >= m or len(set(test)) < test.size:
            raise W2WError(f"tested models must be distinct rows of the {m}-model bank")
    k = int(settings.generations)
    model_index = np.repeat(test, k)
    seeds = np.tile(np.arange(k), len(test)) + 10_000
    tg = time.time()
    gen_imgs = generate(renderer, bank, model_index, prompt, seeds, settings)
    t_gen = time.time() - tg
    size = int(gen_imgs.shape[1])
    r = int(settings.ref_images)
    refs = render_instances(concept, specs, r, settings.ref_seed, size, workers)
    ref_emb = evaluators.embed(concept, refs.reshape(-1, size, size, 3)).reshape(m, r, -1).mean(1)
    ref_emb /= np.linalg.norm(ref_emb, axis=1, keepdims=True)
    g_emb = evaluators.embed(concept, gen_imgs).reshape(len(test), k, -1)
    hits, single, cands = [], [], min(int(settings.candidates), m)
    for a, mi in enumerate(test):
        others = rng.choice(np.delete(np.arange(m), mi), cands - 1, replace=False)
        cand = np.concatenate([[mi], others])
        per_image = g_emb[a] @ ref_emb[cand].T  # (k, cands)
        hits.append(int(np.argmax(per_image.mean(0)) == 0))
        single.extend((np.argmax(per_image, axis=1) == 0).astype(int).tolist())
    flat = g_emb.reshape(len(test) * k, -1)
    cos = flat @ flat.T
    own = np.repeat(np.arange(len(test)), k)
    same = (own[:, None] == own[None, :]) & ~np.eye(len(own), dtype=bool)
    diff = own[:, None] != own[None, :]
    metrics = {
        "models": m,
        "fidelity_top1": float(np.mean(hits)),
        "fidelity_top1_per_image": float(np.mean(single)),
        "fidelity_models": len(test),
        "tested_models": [int(i) for i in test],
        "candidates": cands,
        "generations_per_model": k,
        "id_score_gen_vs_own_refs": float(
            np.mean([g_emb[a].mean(0) @ ref_emb[mi] for a, mi in enumerate(test)])
        ),
        "intra_model_id_score": float(cos[same].mean()) if same.any() else None,
        "inter_model_id_score": float(cos[diff].mean()) if diff.any() else None,
        "generation_seconds": t_gen,
        "fidelity_settings": asdict(settings),
    }
    return metrics, test, gen_imgs


def generate(
    renderer: Any,
    bank: dict[str, Any] | None,
    model_index: np.ndarray | None,
    prompt: str | list[str],
    seeds: np.ndarray,
    settings: FidelitySettings,
) -> np.ndarray:
    """The fidelity protocol's generations: one picture per (model, seed), uint8.

    Parameters
    ----------
    renderer : w2wkit.diffusion.sampler.Renderer
    bank : dict of str to StackedLayer, or None
        Stacked models; ``None`` (with ``model_index=None``) renders the base.
    model_index : numpy.ndarray or None
        ``(n,)`` model of each picture.
    prompt : str or list of str
        One prompt for all, or ``(n,)``.
    seeds : numpy.ndarray
        ``(n,)`` noise seeds.
    settings : FidelitySettings
        ``steps``, ``guidance``, ``scheduler``, ``batch_size``.

    Returns
    -------
    numpy.ndarray
        ``(n, H, W, 3)`` uint8.
    """
    n = len(seeds)
    prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
    imgs = renderer.sample(
        bank,
        None if model_index is None else np.asarray(model_index).tolist(),
        prompts,
        np.asarray(seeds).tolist(),
        steps=int(settings.steps),
        guidance=float(settings.guidance),
        scheduler=settings.scheduler,
        batch_size=int(settings.batch_size),
    )
    return np.round(imgs * 255.0).astype(np.uint8)


def instance_spec(name: str) -> tuple[int, int]:
    """``identity-s0-000042`` -> ``(42, 0)`` (index, instance seed); ``ValueError`` if not."""
    _, s, ix = name.rsplit("-", 2)
    return int(ix), int(s.removeprefix("s"))


def _specs_from_names(concept: str, names: list[str]) -> list[tuple[int, int]]:
    """:func:`instance_spec` of every name, checked against the generator."""
    from w2wkit.world.pictures import generator

    gen = generator(concept)
    specs = []
    for name in names:
        try:
            spec = instance_spec(name)
        except ValueError:
            raise W2WError(
                f"zoo model name '{name}' does not say its instance (expected "
                f"'{concept}-s<seed>-<index>')",
                key="names",
            ) from None
        if gen.instance(*spec).name != name:
            raise W2WError(
                f"zoo model '{name}' is not instance {spec} of the {concept} generator",
                key="names",
            )
        specs.append(spec)
    return specs


def measure_world(
    world: str | os.PathLike[str] | None = None,
    concepts: tuple[str, ...] = CONCEPTS,
    settings: FidelitySettings | None = None,
    device: str = "cpu",
    workers: int = 1,
    progress: Any = None,
) -> dict[str, Any]:
    """Zoo fidelity of a shipped or packed world (default: the shipped one).

    Parameters
    ----------
    world : path, optional
        World folder (``manifest.json``); default :func:`w2wkit.world.shipped.world_dir`.
    concepts : tuple of str
    settings : FidelitySettings, optional
    device : str
    workers : int
    progress : callable, optional
        Receives one line per concept.

    Returns
    -------
    dict
        ``{concept: metrics}`` (see :func:`zoo_fidelity`) plus ``world`` and
        ``seconds``.
    """
    from w2wkit.devices import resolve_device
    from w2wkit.diffusion.bank import stack_factors
    from w2wkit.diffusion.sampler import Renderer
    from w2wkit.world.shipped import load_world

    s = settings or FidelitySettings()
    s.check()
    w = load_world(world)
    for c in concepts:
        w._check_concept(c)
    dev = resolve_device(device)
    t0 = time.time()
    renderer = Renderer(w.load_pipeline(device=dev), device=dev)
    ev = w.evaluators(device=dev)
    rng = np.random.default_rng(s.seed)
    out: dict[str, Any] = {"world": str(Path(w.root))}
    for c in concepts:
        stacks = w.stack(c)
        specs = _specs_from_names(c, w.names(c))
        bank = stack_factors(stacks, float(w.stack_meta["alpha"]))
        metrics, _, _ = zoo_fidelity(renderer, bank, ev, c, specs, w.prompt(c), s, rng, workers)
        out[c] = metrics
        if progress is not None:
            progress(
                f"{c}: fidelity top-1 {metrics['fidelity_top1']:.3f} "
                f"({metrics['fidelity_models']} models, {metrics['candidates']} candidates)"
            )
    out["seconds"] = time.time() - t0
    return out


def record_measurement(world: str | os.PathLike[str] | None, result: dict[str, Any]) -> Path:
    """Append a :func:`measure_world` result to the world's build log.

    The entry goes to ``build_log.json``'s ``measurements`` list (with the
    date, torch version and device); the build's own metrics stay as they were
    measured. ``manifest.json`` is rewritten so that the world still verifies.

    Returns
    -------
    pathlib.Path
        The build log.
    """
    import datetime
    import json

    import torch

    from w2wkit.stio import file_sha256 as sha256
    from w2wkit.stio import write_json
    from w2wkit.world.evaluators import WEIGHTS
    from w2wkit.world.shipped import verify_world, world_dir, write_manifest

    root = world_dir(world)
    verify_world(root)  # never re-hash a damaged world into a valid-looking one
    path = root / "build_log.json"
    log = json.loads(path.read_text()) if path.exists() else {}
    entry = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        # which evaluators scored it (they can be retrained: world retrain-embedder)
        "evaluators_sha256": sha256(root / WEIGHTS)[:16],
        # ... and which models (a zoo can be retrained: world retrain-zoo)
        "loras_sha256": sha256(root / "loras.safetensors")[:16],
        **{k: v for k, v in result.items() if k != "world"},
    }
    log.setdefault("measurements", []).append(entry)
    write_json(path, log)
    write_manifest(root)
    return path


def fidelity_settings(prof: Any) -> FidelitySettings:
    """A build profile's zoo-fidelity settings.

    ``prof`` is a :class:`w2wkit.world.profiles.WorldProfile`.
    """
    return FidelitySettings(
        models=prof.fidelity_models,
        candidates=prof.candidates,
        generations=prof.fidelity_seeds,
        ref_images=prof.ref_images,
        steps=prof.sample_steps,
        guidance=prof.guidance,
        seed=prof.base.seed + 123,
        ref_seed=prof.zoo.seed + 999,
    )
