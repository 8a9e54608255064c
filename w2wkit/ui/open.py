"""Open what ``w2wkit ui`` serves: a space, a pipeline, and the concept's classifier if known."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from w2wkit.errors import W2WError
from w2wkit.ui.backend import MAX_UPLOAD_BYTES, Backend

__all__ = ["open_backend"]


def _world(log: Callable[[str], None] | None) -> Any:
    from w2wkit.world.shipped import load_world

    try:
        return load_world()
    except W2WError as exc:
        if log:
            log(f"no shipped world ({exc.message})")
        return None


def _channels_last(renderer: Any) -> None:
    """On the CPU, the UNet and VAE in channels-last memory: oneDNN's convolutions run
    without layout conversions (the shipped world's 4 pictures: 1.85 -> 1.54 s, same
    pictures to float rounding; ``benchmarks/bench_ui.py``)."""
    if renderer.device != "cpu":
        return
    import torch

    for name in ("unet", "vae"):
        mod = getattr(renderer.pipe, name, None)
        if mod is not None:
            mod.to(memory_format=torch.channels_last)


def open_backend(
    space_path: str | os.PathLike[str] | None = None,
    base: str | os.PathLike[str] | None = None,
    *,
    prompt: str | None = None,
    device: str = "auto",
    calibrate: bool = True,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    log: Callable[[str], None] | None = None,
    world: Any = None,
) -> Backend:
    """A :class:`Backend` for a saved space (or the shipped world's) and a pipeline.

    Parameters
    ----------
    space_path : path, optional
        Saved space; default: the world's first concept, fitted (and calibrated
        unless ``calibrate`` is False) once into the cache folder.
    base : path, optional
        Pipeline folder; default: the world's.
    prompt : str, optional
        Default: the prompt the space's models were trained with.
    world : World, optional
        Default: the shipped world (``$W2WKIT_WORLD`` or the packaged one).
    """
    from w2wkit.calibrate import ConceptClassifier
    from w2wkit.concepts import get_pack
    from w2wkit.render import Renderer
    from w2wkit.space import WeightSpace
    from w2wkit.ui.worldspace import default_concept, world_space

    world = world if world is not None else _world(log)
    if base is None and world is None:
        raise W2WError("no pipeline: pass `base` (a pipeline folder)", param="base")
    renderer = Renderer(base or world.pipeline_dir, device=device)
    _channels_last(renderer)
    concept = None
    if space_path is None:
        if world is None:
            raise W2WError(
                "no space: pass `space_path` (there is no shipped world)", param="space_path"
            )
        concept = default_concept(world)
        space, where = world_space(
            world, concept, calibrate=calibrate, renderer=renderer if calibrate else None, log=log
        )
        description = f"Space: the {concept} zoo of the world {world.root} (kept in {where})."
    else:
        space = WeightSpace.load(Path(space_path))
        description = f"Space: {space_path}."
        if world is not None:
            names = set(space.names_)
            shared = [c for c in world.concepts if names & set(world.names(c))]
            concept = shared[0] if shared else None
    pack = get_pack(concept) if concept else None
    classifier = None
    if world is not None and concept is not None:
        try:
            classifier = ConceptClassifier(world.evaluators(renderer.device), concept)
        except W2WError:
            classifier = None
    text = prompt or space.training_prompt_
    if not text and world is not None and concept is not None:
        text = world.prompt(concept)
    if not text and pack is not None:
        text = f"a photo of {pack.instance_prompt}"
    if not text:
        raise W2WError("the space's models name no prompt: pass `prompt`", param="prompt")
    if not space.directions_:
        description += " It has no directions: fit some with `w2wkit directions`."
    return Backend(
        space,
        renderer,
        prompt=text,
        pack=pack,
        classifier=classifier,
        max_upload_bytes=max_upload_bytes,
        description=description,
    )
