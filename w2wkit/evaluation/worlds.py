"""Worlds to evaluate in: the shipped miniature world or a micro world built in seconds.

:func:`load_eval_world` opens either as an :class:`EvalWorld` (models,
labels, held-out identities, generator, evaluators, recipe, concept pack);
:func:`build_micro_world` builds a small world (a micro base pipeline, a few
LoRAs trained a few steps, :class:`~w2wkit.evaluation.evaluators.PixelEvaluators`)
whose numbers only show that the machinery runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.errors import FormatError, W2WError
from w2wkit.evaluation.evaluators import PixelEvaluators, WorldEvaluators
from w2wkit.render import resolve_device
from w2wkit.world import HELDOUT_CONCEPT

__all__ = [
    "EVAL_CONCEPT",
    "PHOTO_PROMPT",
    "EvalWorld",
    "build_micro_world",
    "load_eval_world",
    "shipped_world_available",
]

#: The concept pack the evaluation measures: micro worlds are built for it, the
#: shipped world's models of it are evaluated, and micro worlds written before
#: ``world.json`` named a concept are read as it (the paper's tables are about
#: identities): the world's held-out concept.
EVAL_CONCEPT = HELDOUT_CONCEPT

#: Training prompt around a pack's ``instance_prompt`` (``"a photo of sks person"``):
#: the micro world's zoo LoRAs are trained with it and the evaluation renders with it.
PHOTO_PROMPT = "a photo of {}"


@dataclass
class EvalWorld:
    """Everything the evaluation needs from a world.

    Attributes
    ----------
    name : str
        ``"shipped"`` or ``"micro (<folder>)"``.
    base : pathlib.Path
        Base pipeline folder.
    zoo : list
        Training models: :class:`~w2wkit.adapter.Adapter` or LoRA file paths.
    zoo_names : list of str
    zoo_instances : list of Instance or None
        The generator instance of each zoo model (for zoo fidelity).
    labels : dict of str to numpy.ndarray
        ``attribute -> (N,)`` 0/1 labels of the zoo models.
    heldout : list of Instance
        Identities in no zoo model.
    generator : ProceduralGenerator
    evaluators : Evaluators
    lora_settings : LoraSettings
        The zoo recipe (used for the DreamBooth baselines).
    pack : ConceptPack
    image_size : int
    info : dict
        Anything worth reporting about the world (sizes, build log).
    train_prompt : str
        The prompt the zoo LoRAs were trained with (the shipped world records
        it); the DreamBooth baselines and inversion use it. Empty: the pack's
        instance prompt.
    """

    name: str
    base: Path
    zoo: list[Any]
    zoo_names: list[str]
    zoo_instances: list[Any] | None
    labels: dict[str, np.ndarray]
    heldout: list[Any]
    generator: Any
    evaluators: Any
    lora_settings: Any
    pack: Any
    image_size: int = 32
    info: dict[str, Any] = field(default_factory=dict)
    train_prompt: str = ""

    @property
    def instance_prompt(self) -> str:
        """The zoo's training prompt (``train_prompt`` or the pack's instance prompt)."""
        return self.train_prompt or self.pack.instance_prompt


def build_micro_world(
    folder: str | os.PathLike[str],
    *,
    n_models: int = 12,
    n_heldout: int = 3,
    base_steps: int = 3,
    lora_steps: int = 3,
    n_images: int = 3,
    seed: int = 0,
    evaluator_size: str = "tiny",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Build a small world to run the evaluation machinery on (seconds to minutes).

    Writes ``folder/base`` (a micro base pipeline), ``folder/zoo/*.safetensors``
    (rank-1 ``to_q``/``to_v`` LoRAs, the zoo recipe with few steps),
    ``folder/evaluators.npz`` (:class:`PixelEvaluators`) and
    ``folder/world.json`` (instances, labels, recipe). Identities: zoo
    ``generator.instance(i, seed)`` for ``i < n_models``, held-out ones
    ``i >= n_models``.

    Returns
    -------
    pathlib.Path
        ``folder``.
    """
    import torch

    from w2wkit.concepts import get_pack
    from w2wkit.world import base_model as B
    from w2wkit.world.lora import LoraSettings, LoraTrainer, instance_jobs

    out = Path(folder)
    if (out / "world.json").exists():
        raise W2WError("a micro world exists there already", path=out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    pack = get_pack(EVAL_CONCEPT)
    gen = pack.generator()
    prompt = PHOTO_PROMPT.format(pack.instance_prompt)
    settings = B.BaseSettings.micro(
        concepts=(pack.name,),
        n_instances={pack.name: 24},
        images_per_instance={pack.name: 2},
        vae_steps=base_steps,
        unet_steps=base_steps,
        seed=seed,
        threads=threads,
    )
    if not (out / "base").exists():
        if progress:
            progress("building the micro base pipeline")
        B.build_base(out / "base", settings)
    lora = LoraSettings(steps=lora_steps, batch=2, n_images=n_images, seed=seed, threads=threads)
    trainer = LoraTrainer(out / "base", lora)
    insts = gen.instances(n_models, seed=seed)
    if progress:
        progress(f"training {n_models} zoo LoRAs")
    trainer.train_many(instance_jobs(gen, insts, n_images, seed=seed), out / "zoo", prompt)
    sizes = {"tiny": (200, 40, 4), "small": (1200, 150, 6)}[evaluator_size]
    if progress:
        progress("training pixel evaluators")
    ev = PixelEvaluators.fit(gen, n_attr=sizes[0], n_ids=sizes[1], per_id=sizes[2], seed=seed + 500)
    ev.save(out / "evaluators.npz")
    meta = {
        "format": "w2wkit-micro-world",
        "concept": pack.name,
        "prompt": prompt,
        "seed": seed,
        "image_size": 32,
        "lora_settings": asdict(lora),
        "zoo": [
            {"name": i.name, "file": f"zoo/{i.name}.safetensors", "index": i.index, "seed": i.seed}
            for i in insts
        ],
        "labels": {a.name: [int(i.attributes[a.name]) for i in insts] for a in pack.attributes},
        "heldout": [{"index": n_models + j, "seed": seed} for j in range(n_heldout)],
        "evaluators": ev.metrics,
        "base_settings": settings.to_json(),
    }
    from w2wkit.stio import atomic_path

    with atomic_path(out / "world.json", overwrite=True, suffix=".json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1))
    torch.set_num_threads(threads)
    return out


def _micro_world(folder: Path) -> EvalWorld:
    try:
        return _micro_world_unchecked(folder)
    except (KeyError, TypeError, IndexError) as exc:
        raise FormatError(
            f"world.json is incomplete ({type(exc).__name__}: {exc})", path=folder / "world.json"
        ) from None


def _micro_world_unchecked(folder: Path) -> EvalWorld:
    from w2wkit.concepts import get_pack
    from w2wkit.world.lora import LoraSettings

    try:
        meta = json.loads((folder / "world.json").read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"not a readable world: {exc}", path=folder / "world.json") from None
    pack = get_pack(meta.get("concept", EVAL_CONCEPT))
    gen = pack.generator()
    settings = LoraSettings(
        **{**meta["lora_settings"], "targets": tuple(meta["lora_settings"]["targets"])}
    )
    zoo = [folder / z["file"] for z in meta["zoo"]]
    missing = [str(p) for p in zoo if not p.exists()]
    if missing:
        raise FormatError(f"{len(missing)} zoo files missing, e.g. {missing[0]}", path=folder)
    return EvalWorld(
        name=f"micro ({folder})",
        base=folder / "base",
        zoo=zoo,
        zoo_names=[z["name"] for z in meta["zoo"]],
        zoo_instances=[gen.instance(z["index"], z["seed"]) for z in meta["zoo"]],
        labels={k: np.asarray(v, dtype=np.float64) for k, v in meta["labels"].items()},
        heldout=[gen.instance(h["index"], h["seed"]) for h in meta["heldout"]],
        generator=gen,
        evaluators=PixelEvaluators.load(folder / "evaluators.npz"),
        lora_settings=settings,
        pack=pack,
        image_size=int(meta.get("image_size", 32)),
        info={"kind": "micro", "n_models": len(zoo), "evaluators": meta.get("evaluators", {})},
        train_prompt=str(meta.get("prompt", pack.instance_prompt)),  # older worlds: bare
    )


def _instance_from_name(gen: Any, name: str) -> Any:
    """``identity-s0-000042`` -> ``gen.instance(42, 0)``."""
    from w2wkit.world.measure import instance_spec

    return gen.instance(*instance_spec(name))


def _find(d: Any, key: str) -> Any:
    """First value of ``key`` in a nested dict (depth first)."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        for v in d.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _shipped_world(obj: Any, device: str = "cpu") -> EvalWorld:
    """Adapt a :class:`w2wkit.world.shipped.World` (identity concept)."""
    from dataclasses import fields

    from w2wkit.concepts import get_pack
    from w2wkit.labels import read_labels
    from w2wkit.stio import json_safe
    from w2wkit.world.lora import LoraSettings

    pack = get_pack(EVAL_CONCEPT)
    concept = pack.name
    gen = pack.generator()
    names = obj.names(concept)
    zoo = [obj.adapter(concept, i) for i in range(len(names))]
    try:
        instances = [_instance_from_name(gen, n) for n in names]
    except (ValueError, IndexError):
        instances = None
    labels: dict[str, np.ndarray] = {}
    lab = obj.labels_path(concept)
    if lab.exists():
        labels = read_labels(lab, names)
    h = obj.heldout()
    seeds = h.get("inst_seed", 0)
    heldout = [
        gen.instance(int(ix), int(seeds if np.isscalar(seeds) else seeds[j]))
        for j, ix in enumerate(h["index"])
    ]
    log = obj.build_log
    zoo_log = log.get("phases", {}).get("zoo", {})
    found = _find(zoo_log, "settings") or _find(log, "zoo") or {}
    allowed = {f.name for f in fields(LoraSettings)}
    values = {k: v for k, v in dict(found).items() if k in allowed}
    if "targets" in values:
        values["targets"] = tuple(values["targets"])
    meta = obj.stack_meta
    values.setdefault("rank", int(meta.get("rank", 1)))
    values.setdefault("alpha", float(meta.get("alpha", 1.0)))
    ev = WorldEvaluators(obj.evaluators(device=device), concept)
    return EvalWorld(
        name=f"shipped ({obj.root})",
        base=Path(obj.pipeline_dir),
        zoo=zoo,
        zoo_names=list(names),
        zoo_instances=instances,
        labels=labels,
        heldout=heldout,
        generator=gen,
        evaluators=ev,
        lora_settings=LoraSettings(**values),
        pack=pack,
        image_size=32,
        info={"kind": "shipped", "n_models": len(zoo), "summary": json_safe(obj.summary())},
        train_prompt=obj.prompt(concept),
    )


def shipped_world_available() -> bool:
    """True when a shipped miniature world is found (package folder or ``$W2WKIT_WORLD``)."""
    try:
        from w2wkit.world import shipped  # type: ignore[attr-defined]
    except ImportError:
        return False
    try:
        shipped.world_dir()
    except W2WError:
        return False
    return True


def load_eval_world(world: str | os.PathLike[str] | None = None, device: str = "auto") -> EvalWorld:
    """Open a world for evaluation.

    Parameters
    ----------
    world : path or None
        A micro world folder (``world.json``), a shipped-world folder, or
        ``None`` for the world shipped with the package (or ``$W2WKIT_WORLD``).
    device : str
        Where the world's evaluators run (``auto``: CUDA if present).

    Raises
    ------
    W2WError
        No world there (one line saying what to do).
    """
    if world is not None and not Path(world).is_dir():
        raise W2WError("world folder not found", path=world)
    if world is not None and (Path(world) / "world.json").exists():
        meta = json.loads((Path(world) / "world.json").read_text())
        if meta.get("format") == "w2wkit-micro-world":
            return _micro_world(Path(world))
    try:
        from w2wkit.world import shipped  # type: ignore[attr-defined]
    except ImportError:
        raise W2WError(
            "no miniature world: this checkout has no shipped world; evaluate a micro one "
            'with `world="micro"`',
            key="world",
        ) from None
    return _shipped_world(shipped.load_world(world), device=resolve_device(device))
