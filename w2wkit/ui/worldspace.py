"""A space of a world's concept, fitted once and kept in a cache folder.

``w2wkit ui`` without ``--space`` opens the shipped world: its identity zoo is
fitted (:class:`~w2wkit.space.WeightSpace`, factors), its labelled attributes
get directions, and those the world's classifier knows are calibrated
(:mod:`w2wkit.calibrate`). The result is saved under the cache folder, keyed
by the world's manifest hash and the settings, so later starts load it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.errors import W2WError

__all__ = ["QUICK_CALIBRATION", "cache_dir", "default_concept", "world_models", "world_space"]


def _quick() -> Any:
    from w2wkit.calibrate import CalibrationSettings

    return CalibrationSettings(
        n_models=16, seeds=1, strengths=(1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0), confirm=0
    )


#: Calibration of a world's space at the first start of ``w2wkit ui`` (16 models x 1 picture:
#: the 90% lower bound reaches 80% at 15 of 16; ``w2wkit directions --calibrate`` does more).
QUICK_CALIBRATION = _quick()


def cache_dir() -> Path:
    """``$W2WKIT_CACHE`` or ``$XDG_CACHE_HOME/w2wkit`` (default ``~/.cache/w2wkit``)."""
    env = os.environ.get("W2WKIT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "w2wkit"


def default_concept(world: Any) -> str:
    """The world's first concept with an attribute classifier (its first concept otherwise)."""
    concepts = list(world.concepts)
    if not concepts:
        raise W2WError("the world has no concepts", path=world.root)
    return concepts[0]


def world_models(world: Any, concept: str, space: Any) -> Callable[[int], Any]:
    """Row of ``space`` -> the world's zoo model of that name (an Adapter)."""
    names = list(space.names_)

    def get(i: int) -> Any:
        return world.adapter(concept, names[int(i)])

    return get


def world_space(
    world: Any,
    concept: str,
    *,
    n_components: int = 200,
    calibrate: bool = True,
    calibration: Any = None,
    renderer: Any = None,
    folder: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Any, Path]:
    """Fit (or load from the cache) the space of ``concept``'s zoo, with calibrated directions.

    Parameters
    ----------
    world : w2wkit.world.shipped.World
    concept : str
    n_components : int
        Capped at N-1.
    calibrate : bool
        Calibrate the directions the world's classifier knows (needs ``renderer``).
    calibration : CalibrationSettings, optional
    renderer : Renderer, optional
    folder : path, optional
        Where the space is kept (default: under :func:`cache_dir`).
    log : callable, optional

    Returns
    -------
    (WeightSpace, pathlib.Path)
    """
    from w2wkit.calibrate import ConceptClassifier, calibrate_directions
    from w2wkit.collection import Collection
    from w2wkit.directions import fit_directions
    from w2wkit.labels import read_labels
    from w2wkit.persist import save_directions
    from w2wkit.space import WeightSpace

    cs = calibration or QUICK_CALIBRATION
    digest = hashlib.sha256(
        json.dumps(
            [world.manifest.get("files", {}), concept, n_components, repr(cs)], sort_keys=True
        ).encode()
    ).hexdigest()[:12]
    path = Path(folder) if folder else cache_dir() / f"space-{concept}-{digest}"
    if (path / "space.json").exists():
        space = WeightSpace.load(path)
        if not calibrate or any("calibration" in d.info for d in space.directions_.values()):
            return space, path
    else:
        names = world.names(concept)
        if log:
            log(f"fitting the {concept} space on {len(names)} LoRAs of the world (once)")
        ads = [world.adapter(concept, i) for i in range(len(names))]
        k = max(1, min(int(n_components), len(ads) - 1))
        space = WeightSpace(n_components=k, random_state=0).fit(
            Collection.from_adapters(ads, names=names)
        )
        labels = read_labels(world.labels_path(concept), names)
        usable = {a: v for a, v in labels.items() if len(np.unique(v[np.isfinite(v)])) == 2}
        if usable:
            space.set_labels(usable)
            counts = [np.bincount(v[np.isfinite(v)].astype(int)) for v in usable.values()]
            smallest = min(int(c.min()) for c in counts)
            fit_directions(space, usable, cv=min(5, max(2, smallest)))
        space.save(path, overwrite=True)
    if calibrate and renderer is not None and space.directions_:
        classifier = ConceptClassifier(world.evaluators(), concept)

        def progress(name: str, done: int, total: int) -> None:
            if log and done == 1:
                log(f"calibrating {name} (renders the edit at increasing strengths)")

        calibrate_directions(
            space,
            renderer,
            classifier,
            pack=concept,
            settings=cs,
            models=world_models(world, concept, space),
            prompt=world.prompt(concept),
            progress=progress,
        )
        save_directions(space, path)
    return space, path
