"""Calibrated, visible strengths: the strength at which an edit is seen.

A direction's unit is one standard deviation of the training models along it
(:mod:`w2wkit.edits`): a number a person cannot judge. This module measures,
with a concept's attribute classifier and the renderer, the smallest strength
at which the edited model's pictures carry the attribute on at least
``target`` (80%) of the pictures of training models that lack it, and the ID
score of the edited pictures to the unedited ones there. The result is stored
in the direction (``Direction.info["calibration"]``, saved with the space's
directions; old spaces load unchanged) and read back by
:func:`w2wkit.edits.calibration_of` / :func:`w2wkit.edits.strength_range`.

Which models an edit may be calibrated on is the concept pack's rule
(``pack.plausible(attributes, name)``: no beards on a population's women when
it has none); no code here names a concept or an attribute.

>>> from w2wkit.calibrate import calibrate_directions, ConceptClassifier  # doctest: +SKIP
>>> calibrate_directions(space, renderer, ConceptClassifier(world.evaluators(), "identity"),
...                      pack="identity", models=world_models)           # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from w2wkit.edits import CALIBRATION_KEY, get_direction, vector_digest
from w2wkit.errors import DirectionError, W2WError

__all__ = [
    "CalibrationSettings",
    "Classifier",
    "ConceptClassifier",
    "calibrate_direction",
    "calibrate_directions",
    "candidates",
    "measure_edit",
    "training_models",
]


class Classifier(Protocol):
    """What calibration needs to judge pictures.

    Attributes
    ----------
    attributes : list of str
        Names of the columns of :meth:`attribute_probs`.
    name : str
    """

    attributes: list[str]
    name: str

    def attribute_probs(self, images: np.ndarray) -> np.ndarray:
        """uint8 pictures ``(n, H, W, 3)`` -> probabilities ``(n, A)``."""
        ...


class ConceptClassifier:
    """A world's evaluators (``world.evaluators()``) for one concept, as a :class:`Classifier`.

    Parameters
    ----------
    evaluators : w2wkit.world.evaluators.Evaluators
        ``attributes(concept, images)``, ``embed(concept, images)``,
        ``attribute_names(concept)``.
    concept : str
    """

    def __init__(self, evaluators: Any, concept: str) -> None:
        self.evaluators = evaluators
        self.concept = concept
        self.attributes = list(evaluators.attribute_names(concept))
        self.name = f"world attribute classifier ({concept})"

    def attribute_probs(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(n, H, W, 3)`` -> ``(n, A)`` probabilities."""
        return np.asarray(self.evaluators.attributes(self.concept, images), dtype=np.float64)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``(n, H, W, 3)`` -> ``(n, D)`` unit identity embeddings."""
        return np.asarray(self.evaluators.embed(self.concept, images), dtype=np.float64)


@dataclass
class CalibrationSettings:
    """How a calibration is measured.

    Attributes
    ----------
    target : float
        Success rate asked for (fraction of edited pictures the classifier
        gives ``p > 0.5`` for the attribute).
    n_models : int
        Training models lacking the attribute (and plausible for it) drawn.
    seeds : int
        Pictures per model.
    strengths : tuple of float
        Strengths tried, in training standard deviations; the smallest one
        reaching ``target`` is kept (else the most successful one).
    steps, guidance : rendering.
    inject_t : float, optional
        Delayed injection (the edited model for timesteps ``t <= inject_t``);
        ``None``: the edited model throughout.
    seed : int
        Draw of the models.
    batch_size : int
        Pictures per UNet call.
    """

    target: float = 0.8
    n_models: int = 8
    seeds: int = 2
    strengths: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
    steps: int = 20
    guidance: float = 3.0
    inject_t: float | None = None
    seed: int = 0
    batch_size: int = 32

    def check(self) -> None:
        """Refuse settings that cannot calibrate (one line naming the field)."""
        if not 0.0 < float(self.target) <= 1.0:
            raise W2WError(f"must be in (0, 1], got {self.target}", param="target")
        for name in ("n_models", "seeds", "steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise W2WError(f"must be >= 1, got {getattr(self, name)}", param=name)
        st = [float(x) for x in self.strengths]
        if not st or any(not math.isfinite(x) or x <= 0 for x in st):
            raise W2WError(f"must be positive numbers, got {self.strengths}", param="strengths")


ModelSource = Callable[[int], Any]


def _pack(pack: Any) -> Any:
    if pack is None or not isinstance(pack, str):
        return pack
    from w2wkit.concepts import get_pack

    return get_pack(pack)


def _row_attributes(labels: dict[str, np.ndarray], i: int) -> dict[str, bool]:
    return {a: bool(v[i]) for a, v in labels.items() if np.isfinite(v[i])}


def candidates(
    space: Any, name: str, pack: Any = None, *, exclude: Sequence[int] = ()
) -> tuple[list[int], int]:
    """Training models an edit along ``name`` may be calibrated on.

    Models labelled without the attribute, for which the concept pack finds
    adding it plausible (``pack.plausible(attributes, name)``; every model when
    the pack has no rule or no pack is given).

    Parameters
    ----------
    space : WeightSpace
        Fitted, with labels (``space.labels_``) holding ``name``.
    name : str
    pack : ConceptPack, str or None
    exclude : sequence of int
        Rows to leave out (e.g. the models another calibration used).

    Returns
    -------
    (list of int, int)
        Row indices, and how many rows lacking the attribute were implausible.

    Raises
    ------
    DirectionError
        When the space has no labels for ``name``.
    """
    labels = getattr(space, "labels_", None) or {}
    if name not in labels:
        raise DirectionError(
            f"the space has no labels for {name!r}, so no model is known to lack it",
            key=name,
            hint="fit the space with `labels`",
        )
    pack = _pack(pack)
    rule = getattr(pack, "plausible", None)
    y = np.asarray(labels[name], dtype=np.float64)
    skip = {int(i) for i in exclude}
    out, implausible = [], 0
    for i in np.flatnonzero(np.isfinite(y) & (y == 0)):
        if int(i) in skip:
            continue
        if rule is not None and not rule(_row_attributes(labels, int(i)), name):
            implausible += 1
            continue
        out.append(int(i))
    return out, implausible


def training_models(space: Any) -> ModelSource:
    """Row -> Adapter: the training file when it is readable, else the model in the space."""
    from w2wkit.formats.registry import read_adapter

    def get(i: int) -> Any:
        f = space.manifest_[i].get("file")
        if isinstance(f, str) and os.path.exists(f):
            try:
                return read_adapter(f)
            except W2WError:
                pass
        return space.inverse_transform(np.asarray(space.coefficients_[i : i + 1], np.float64))[0]

    return get


def _u8(images: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(images, np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _unit(e: np.ndarray) -> np.ndarray:
    e = np.asarray(e, dtype=np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def _prompt(space: Any, pack: Any, prompt: str | None) -> str:
    if prompt:
        return prompt
    p = getattr(space, "training_prompt_", None)
    if p:
        return str(p)
    if pack is not None:
        return f"a photo of {pack.instance_prompt}"
    raise W2WError(
        "no prompt: the space's models name none and no concept pack is given",
        param="prompt",
    )


def measure_edit(
    space: Any,
    name: str,
    strengths: Sequence[float],
    rows: Sequence[int],
    renderer: Any,
    classifier: Classifier,
    *,
    settings: CalibrationSettings | None = None,
    models: ModelSource | None = None,
    prompt: str | None = None,
    orthogonal_to: Sequence[str] = (),
    stop_at: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, float]]:
    """Success and ID score of edits along ``name`` at each strength, on training models.

    Each model is rendered unedited and edited (same seeds); success is the
    fraction of edited pictures whose classifier probability for ``name`` is
    above 0.5; the ID score (when the classifier has ``embed``) is the mean
    cosine of each edited picture's embedding to its unedited twin's.

    Parameters
    ----------
    space : WeightSpace
    name : str
        Direction, and the classifier's attribute of the same name.
    strengths : sequence of float
        Tried in increasing order.
    rows : sequence of int
        Training models (rows of the space).
    renderer : w2wkit.render.Renderer
    classifier : Classifier
    settings : CalibrationSettings, optional
    models : callable, optional
        Row -> Adapter (default: the training file, else the model in the space).
    prompt : str, optional
    orthogonal_to : sequence of str
        Directions the edit keeps unchanged (see :func:`w2wkit.edits.edit`).
    stop_at : float, optional
        Stop after the first strength whose success reaches it.
    progress : callable, optional
        ``progress(done, total)`` in strengths.

    Returns
    -------
    list of dict
        ``{"strength", "success", "id_score", "prob"}`` for strength 0 (the
        unedited pictures) and each strength measured (``id_score`` None
        without an embedder; ``prob`` the mean classifier probability).
    """
    s = settings or CalibrationSettings()
    if name not in classifier.attributes:
        raise DirectionError(
            f"the classifier has no output for {name!r} (it knows "
            f"{', '.join(classifier.attributes)})",
            key=name,
        )
    if not rows:
        raise DirectionError(f"no model to measure {name!r} on", key=name)
    col = classifier.attributes.index(name)
    get = models or training_models(space)
    originals = [get(int(i)) for i in rows]
    seeds = list(range(int(s.seeds)))
    kw: dict[str, Any] = {
        "prompts": prompt,
        "seeds": seeds,
        "steps": int(s.steps),
        "guidance": float(s.guidance),
        "batch_size": int(s.batch_size),
    }
    base = _u8(renderer.render(originals, **kw).images[:, 0])  # (m, seeds, H, W, 3)
    embed = getattr(classifier, "embed", None)
    flat = base.reshape(-1, *base.shape[-3:])
    e0 = _unit(embed(flat)) if embed else None
    p0 = classifier.attribute_probs(flat)[:, col]
    # strength 0: the unedited pictures (how often the classifier already sees it)
    table: list[dict[str, Any]] = [
        {
            "strength": 0.0,
            "success": float(np.mean(p0 > 0.5)),
            "id_score": None if e0 is None else 1.0,
            "prob": float(np.mean(p0)),
        }
    ]
    todo = sorted(float(x) for x in strengths)
    for j, st in enumerate(todo):
        edited = [space.edit(ad, {name: st}, orthogonal_to=orthogonal_to) for ad in originals]
        if s.inject_t is None:
            res = renderer.render(edited, **kw)
        else:
            res = renderer.render(originals, edited=edited, inject_t=float(s.inject_t), **kw)
        imgs = _u8(res.images[:, 0]).reshape(-1, *base.shape[-3:])
        p = classifier.attribute_probs(imgs)[:, col]
        row: dict[str, Any] = {"strength": st, "success": float(np.mean(p > 0.5)), "id_score": None}
        if embed is not None and e0 is not None:
            row["id_score"] = float(np.sum(_unit(embed(imgs)) * e0, axis=1).mean())
        row["prob"] = float(np.mean(p))
        table.append(row)
        if progress is not None:
            progress(j + 1, len(todo))
        if stop_at is not None and row["success"] >= stop_at:
            break
    return table


def calibrate_direction(
    space: Any,
    name: str,
    renderer: Any,
    classifier: Classifier,
    *,
    pack: Any = None,
    settings: CalibrationSettings | None = None,
    models: ModelSource | None = None,
    prompt: str | None = None,
    exclude: Sequence[int] = (),
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Measure and store the calibrated strength of one direction.

    Draws ``settings.n_models`` training models lacking the attribute (and
    plausible for it under ``pack``'s rule, see :func:`candidates`), edits them
    at increasing strengths and keeps the smallest strength whose success
    reaches ``settings.target`` (if none does, the most successful one, with
    ``reached`` False). Stored in ``space.directions_[name].info["calibration"]``
    (save with :func:`w2wkit.persist.save_directions` or ``space.save``).

    Returns
    -------
    dict
        ``{"strength", "success", "target", "reached", "id_score", "prob",
        "success_unedited", "prob_unedited", "classifier", "models", "rows",
        "n_models", "seeds", "steps", "guidance", "inject_t", "prompt",
        "n_implausible", "plausibility", "table", "vector"}``.

    Raises
    ------
    DirectionError
        Unknown direction, no labels or no classifier output for it, or no
        training model lacking it.
    """
    s = settings or CalibrationSettings()
    s.check()
    d = get_direction(space, name)
    pack = _pack(pack)
    pool, implausible = candidates(space, name, pack, exclude=exclude)
    if not pool:
        raise DirectionError(
            f"no training model lacks {name!r} (and may plausibly get it): nothing to calibrate on",
            key=name,
        )
    rng = np.random.default_rng(int(s.seed))
    rows = sorted(int(i) for i in rng.choice(pool, min(int(s.n_models), len(pool)), replace=False))
    text = _prompt(space, pack, prompt)
    table = measure_edit(
        space,
        name,
        s.strengths,
        rows,
        renderer,
        classifier,
        settings=s,
        models=models,
        prompt=text,
        stop_at=float(s.target),
        progress=progress,
    )
    tried = table[1:]
    reached = [r for r in tried if r["success"] >= s.target]
    best = reached[0] if reached else max(tried, key=lambda r: (r["success"], -r["strength"]))
    names = list(space.names_)
    rec = {
        "strength": float(best["strength"]),
        "success": float(best["success"]),
        "target": float(s.target),
        "reached": bool(reached),
        "id_score": best["id_score"],
        "prob": float(best["prob"]),
        "success_unedited": float(table[0]["success"]),
        "prob_unedited": float(table[0]["prob"]),
        "classifier": str(getattr(classifier, "name", type(classifier).__name__)),
        "models": [names[i] for i in rows],
        "rows": rows,
        "n_models": len(rows),
        "seeds": int(s.seeds),
        "steps": int(s.steps),
        "guidance": float(s.guidance),
        "inject_t": None if s.inject_t is None else float(s.inject_t),
        "prompt": text,
        "n_implausible": int(implausible),
        "plausibility": getattr(pack, "name", None) if getattr(pack, "plausible", None) else None,
        "table": table,
        "settings": {k: v for k, v in asdict(s).items() if k in ("strengths", "seed")},
        "vector": vector_digest(d.vector),
    }
    rec["settings"]["strengths"] = [float(x) for x in rec["settings"]["strengths"]]
    d.info[CALIBRATION_KEY] = rec
    return rec


def calibrate_directions(
    space: Any,
    renderer: Any,
    classifier: Classifier,
    names: Sequence[str] | None = None,
    *,
    pack: Any = None,
    settings: CalibrationSettings | None = None,
    models: ModelSource | None = None,
    prompt: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, dict[str, Any] | str]:
    """Calibrate several directions (default: every one the classifier and labels know).

    Returns
    -------
    dict
        Name -> the record of :func:`calibrate_direction`, or a one-line reason
        why it stays uncalibrated (no classifier output, no labels, no model
        lacking the attribute).
    """
    labels = getattr(space, "labels_", None) or {}
    todo = list(names) if names is not None else list(space.directions_)
    out: dict[str, dict[str, Any] | str] = {}
    for n in todo:
        get_direction(space, n)  # unknown names fail loudly
        if n not in classifier.attributes:
            out[n] = "uncalibrated: the classifier has no output for it"
            continue
        if n not in labels:
            out[n] = "uncalibrated: the space has no labels for it"
            continue

        def cb(done: int, total: int, n: str = n) -> None:
            if progress is not None:
                progress(n, done, total)

        try:
            out[n] = calibrate_direction(
                space,
                n,
                renderer,
                classifier,
                pack=pack,
                settings=settings,
                models=models,
                prompt=prompt,
                progress=cb,
            )
        except DirectionError as exc:
            if names is not None and len(todo) == 1:
                raise
            out[n] = f"uncalibrated: {exc.message}"
    return out
