"""``w2wkit directions --calibrate``: a world's classifier and renderer measure strengths."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from w2wkit.cli.common import console
from w2wkit.errors import W2WError


def space_concept(space: Any, world: Any, concept: str | None) -> str:
    """``concept``, else the world's concept sharing the most model names with the space."""
    if concept:
        return concept
    names = set(space.names_)
    best = max(world.concepts, key=lambda c: len(names & set(world.names(c))))
    if not names & set(world.names(best)):
        raise W2WError(
            "the space's models are none of the world's: say which concept pack to use",
            param="concept",
        )
    return str(best)


def space_models(space: Any, world: Any, concept: str) -> Any:
    """Row -> model: the world's zoo model of that name, else the training file / the space's."""
    from w2wkit.calibrate import training_models

    known = set(world.names(concept))
    fallback = training_models(space)
    names = list(space.names_)

    def get(i: int) -> Any:
        if names[int(i)] in known:
            return world.adapter(concept, names[int(i)])
        return fallback(int(i))

    return get


def calibrate_space(
    space: Any,
    path: Path,
    *,
    world_path: Path | None,
    base: Path | None,
    concept: str | None,
    names: list[str] | None,
    target: float,
    n_models: int,
    seeds: int,
    confidence: float = 0.9,
    steps: int,
    device: str,
) -> dict[str, Any]:
    """Calibrate ``space``'s directions and save them beside it; the records (or reasons)."""
    from w2wkit.calibrate import CalibrationSettings, ConceptClassifier, calibrate_directions
    from w2wkit.persist import save_directions
    from w2wkit.render import Renderer
    from w2wkit.world.shipped import load_world

    if not space.directions_:
        raise W2WError(
            "the space has no directions to calibrate",
            path=path,
            hint="fit some with `w2wkit directions SPACE --labels FILE`",
        )
    settings = CalibrationSettings(
        target=float(target),
        n_models=int(n_models),
        seeds=int(seeds),
        steps=int(steps),
        confidence=float(confidence),
    )
    settings.check()
    world = load_world(world_path)
    concept = space_concept(space, world, concept)
    renderer = Renderer(base or world.pipeline_dir, device=device)
    classifier = ConceptClassifier(world.evaluators(renderer.device), concept)
    t0 = time.perf_counter()

    def progress(name: str, done: int, total: int) -> None:
        console.print(
            f"[{time.perf_counter() - t0:6.0f} s] {name}: strength {done}/{total} measured",
            highlight=False,
        )

    results = calibrate_directions(
        space,
        renderer,
        classifier,
        names,
        pack=concept,
        settings=settings,
        models=space_models(space, world, concept),
        prompt=space.training_prompt_ or world.prompt(concept),
        progress=progress,
    )
    folder = path.parent if path.is_file() else path
    save_directions(space, folder)
    return results
