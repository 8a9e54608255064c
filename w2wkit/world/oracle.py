"""Judging pictures of a world: the evaluators' protocol and the perfect edit.

The world build checks its trained evaluators with :func:`edit_oracle` (what a
perfect edit scores), and the evaluation (:mod:`w2wkit.evaluation`, a layer
above) reports it per attribute; both judge pictures through the
:class:`Evaluators` protocol. :class:`WorldEvaluators` puts a loaded
:class:`w2wkit.world.evaluators.Evaluators` (several concepts) behind that
protocol for one concept. This module imports only numpy (and the concept
base at call time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["Evaluators", "WorldEvaluators", "edit_oracle", "to_uint8", "unit"]


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (float64; all-zero rows stay zero).

    Parameters
    ----------
    x : numpy.ndarray
        ``(..., D)`` vectors, e.g. ``(n, D)`` embeddings.

    Returns
    -------
    numpy.ndarray
        ``(..., D)`` float64.
    """
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pictures as uint8: uint8 unchanged, floats in ``[0, 1]`` clipped and rounded.

    Parameters
    ----------
    images : numpy.ndarray
        ``(..., H, W, 3)`` uint8 or floats in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        Same shape, uint8 (the input itself when it is uint8 already).
    """
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class Evaluators(Protocol):
    """What judging pictures needs: attribute probabilities and identity embeddings.

    Attributes
    ----------
    attributes : list of str
        Attribute names, the columns of :meth:`attribute_probs`.
    name : str
        What the evaluators are (shown in the report).
    """

    attributes: list[str]
    name: str

    def attribute_probs(self, images: np.ndarray) -> np.ndarray:
        """``(n, H, W, 3)`` -> ``(n, n_attributes)`` probabilities."""
        ...

    def embed(self, images: np.ndarray) -> np.ndarray:
        """``(n, H, W, 3)`` -> ``(n, D)`` identity embeddings (compared by cosine)."""
        ...


class WorldEvaluators:
    """A world's trained evaluators (``world.evaluators()``) for one concept.

    Parameters
    ----------
    obj : w2wkit.world.evaluators.Evaluators
        The loaded evaluators of all concepts.
    concept : str
        The concept judged (a name the evaluators know, e.g. a pack's ``name``).

    Attributes
    ----------
    attributes : list of str
    name : str
    metrics : dict
        The evaluators' recorded metrics (accuracy, ROC-AUC), when their
        configuration has them.
    """

    def __init__(self, obj: Any, concept: str) -> None:
        self.obj = obj
        self.concept = concept
        self.attributes = list(obj.attribute_names(concept))
        self.name = "world evaluators (attribute CNN, identity embedder)"
        cfg = getattr(obj, "config", {}) or {}
        self.metrics = {k: v for k, v in cfg.items() if k in ("metrics", "accuracy", "auc")}

    def attribute_probs(self, images: np.ndarray) -> np.ndarray:
        """``(n, H, W, 3)`` -> ``(n, A)`` probabilities."""
        return np.asarray(self.obj.attributes(self.concept, to_uint8(images)), dtype=np.float64)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """``(n, H, W, 3)`` -> ``(n, D)`` unit embeddings."""
        return np.asarray(self.obj.embed(self.concept, to_uint8(images)), dtype=np.float64)


def edit_oracle(
    evaluators: Evaluators,
    generator: Any,
    instances: Sequence[Any],
    attr: str,
    n_images: int = 4,
    seed: int = 0,
    size: int = 32,
) -> dict[str, float]:
    """What a perfect edit scores: each instance drawn again with ``attr`` added.

    ``n_images`` procedural pictures of every instance that lacks the
    attribute are drawn with and without it at the same nuisance (the
    generator's ``edited(instance, attr)`` when it has one: growing old greys
    the hair); the ID score of each same-seed pair and the classifier's
    success on the edited pictures are averaged. Which instances may carry
    the attribute (no beards on women) is the caller's choice. This is the
    ceiling of the editing ID score under these evaluators: an embedder that
    scores a perfect edit low calls the edited person someone else, and then
    only an edit that fails keeps the ID score.

    Parameters
    ----------
    evaluators : Evaluators
    generator : procedural generator
        ``render(instance, n, seed=, size=)``, e.g. ``IdentityGenerator``.
    instances : sequence of Instance
    attr : str
    n_images, seed, size : int
        Pictures per instance (``(n_images, size, size, 3)`` each) and their seed.

    Returns
    -------
    dict
        ``{"id_score", "success", "n"}`` (``n`` instances used; ``success`` NaN
        when the classifier has no such output).
    """
    from w2wkit.concepts.base import Instance

    names = list(evaluators.attributes)
    ids, succ = [], []
    for inst in instances:
        a = dict(inst.attributes)
        if a.get(attr, True):
            continue
        if hasattr(generator, "edited"):  # e.g. growing old greys the hair
            edited = generator.edited(inst, attr, True)
        else:
            edited = Instance(inst.concept, inst.index, inst.seed, {**a, attr: True}, inst.params)
        plain = generator.render(inst, n_images, seed=seed, size=size)
        imgs = generator.render(edited, n_images, seed=seed, size=size)
        e0, e1 = unit(evaluators.embed(plain)), unit(evaluators.embed(imgs))
        ids.append(float(np.sum(e0 * e1, axis=1).mean()))
        if attr in names:
            p = evaluators.attribute_probs(imgs)[:, names.index(attr)]
            succ.append(float((p > 0.5).mean()))
    return {
        "id_score": float(np.mean(ids)) if ids else float("nan"),
        "success": float(np.mean(succ)) if succ else float("nan"),
        "n": len(ids),
    }
