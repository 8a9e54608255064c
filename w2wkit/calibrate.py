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
    "binomial_cdf",
    "calibrate_direction",
    "calibrate_directions",
    "candidates",
    "check_heldout",
    "choose_strength",
    "fit_success",
    "isotonic",
    "measure_edit",
    "success_test",
    "training_models",
    "unimodal",
    "wilson_interval",
    "wilson_lower",
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
        Training models lacking the attribute (and plausible for it) drawn
        (all of them when fewer are available).
    seeds : int
        Pictures per model (1: every picture is another model, so the pictures
        are independent trials and the confidence bound means what it says).
    strengths : tuple of float
        Grid of strengths tried, in training standard deviations. Success
        against strength is fitted monotone (isotonic) and the smallest
        strength whose *lower* confidence bound reaches ``target`` is kept
        (else the one with the highest bound, ``reached`` False).
    confidence : float
        One-sided confidence of the Wilson lower bound of the success rate.
    confirm : int
        Stop the grid after this many strengths beyond the first whose bound
        reaches ``target`` also reach it (0: stop at the first; a strength
        measured later could still pull the monotone fit below).
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
    n_models: int = 48
    seeds: int = 1
    strengths: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
    confidence: float = 0.9
    confirm: int = 1
    steps: int = 20
    guidance: float = 3.0
    inject_t: float | None = None
    seed: int = 0
    batch_size: int = 32

    def check(self) -> None:
        """Refuse settings that cannot calibrate (one line naming the field)."""
        if not 0.0 < float(self.target) <= 1.0:
            raise W2WError(f"must be in (0, 1], got {self.target}", param="target")
        if not 0.5 <= float(self.confidence) < 1.0:
            raise W2WError(f"must be in [0.5, 1), got {self.confidence}", param="confidence")
        if int(self.confirm) < 0:
            raise W2WError(f"must be >= 0, got {self.confirm}", param="confirm")
        for name in ("n_models", "seeds", "steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise W2WError(f"must be >= 1, got {getattr(self, name)}", param=name)
        st = [float(x) for x in self.strengths]
        if not st or any(not math.isfinite(x) or x <= 0 for x in st):
            raise W2WError(f"must be positive numbers, got {self.strengths}", param="strengths")


# --------------------------------------------------------------------------- statistics


def wilson_lower(k: float, n: int, confidence: float = 0.9) -> float:
    """One-sided Wilson lower confidence bound of a success rate.

    Parameters
    ----------
    k : float
        Successes (may be fractional: a fitted rate times ``n``).
    n : int
        Trials.
    confidence : float
        One-sided confidence, e.g. 0.9: the true rate is at least the bound
        with that probability (for independent trials).

    Returns
    -------
    float
        In ``[0, 1]``; 0 when ``n == 0``.
    """
    n = int(n)
    if n <= 0:
        return 0.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf(float(confidence))
    p = min(max(float(k) / n, 0.0), 1.0)
    den = 1.0 + z * z / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    return max(0.0, (centre - half) / den)


def isotonic(rates: Sequence[float], weights: Sequence[float]) -> np.ndarray:
    """Non-decreasing least-squares fit of ``rates`` (pool adjacent violators).

    Parameters
    ----------
    rates : sequence of float
        ``(m,)`` observed rates in increasing order of strength.
    weights : sequence of float
        ``(m,)`` trials behind each rate (positive).

    Returns
    -------
    numpy.ndarray
        ``(m,)`` fitted rates, non-decreasing.
    """
    blocks: list[list[float]] = []  # [weighted mean, weight, count]
    for r, w in zip(rates, weights, strict=True):
        blocks.append([float(r), float(w), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            r2, w2, c2 = blocks.pop()
            r1, w1, c1 = blocks.pop()
            blocks.append([(r1 * w1 + r2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return np.array([b[0] for b in blocks for _ in range(int(b[2]))], dtype=np.float64)


def unimodal(rates: Sequence[float], weights: Sequence[float]) -> np.ndarray:
    """Least-squares fit of ``rates`` that rises to one peak, then falls.

    An edit too strong loses the attribute again (the shipped world's ``beard``:
    83% at 6 sd, 73% at 8, 48% at 12), so success against strength is
    monotone only up to a peak. Every peak position is tried: non-decreasing
    (:func:`isotonic`) up to it, non-increasing after it.

    Parameters
    ----------
    rates, weights : sequence of float
        ``(m,)``, in increasing order of strength.

    Returns
    -------
    numpy.ndarray
        ``(m,)`` fitted rates.
    """
    r = np.asarray(rates, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    best, best_err = r, math.inf
    for m in range(1, len(r) + 1):
        up = isotonic(r[:m], w[:m])
        # non-increasing after the peak: the reversed tail fitted non-decreasing
        down = isotonic(r[m:][::-1], w[m:][::-1])[::-1] if m < len(r) else np.empty(0)
        fit = np.concatenate([up, down])
        err = float(np.sum(w * (r - fit) ** 2))
        if err < best_err - 1e-15:
            best, best_err = fit, err
    return best


def fit_success(table: Sequence[dict[str, Any]], confidence: float = 0.9) -> list[dict[str, float]]:
    """Unimodal success curve (rising, then falling) and its lower bounds over a measured grid.

    Parameters
    ----------
    table : sequence of dict
        Rows of :func:`measure_edit` (``strength`` > 0, ``k`` successes of ``n``
        pictures), any order.
    confidence : float

    Returns
    -------
    list of dict
        Per strength (increasing): ``{"strength", "k", "n", "success", "fit",
        "lower"}``: the observed rate, the unimodal fit, and the Wilson lower
        bound of the fitted rate with the strength's own ``n`` trials (not the
        pooled ones: conservative).
    """
    rows = sorted((r for r in table if float(r["strength"]) > 0), key=lambda r: r["strength"])
    if not rows:
        return []
    fit = unimodal([r["k"] / r["n"] for r in rows], [r["n"] for r in rows])
    return [
        {
            "strength": float(r["strength"]),
            "k": int(r["k"]),
            "n": int(r["n"]),
            "success": float(r["k"]) / int(r["n"]),
            "fit": float(f),
            "lower": wilson_lower(float(f) * int(r["n"]), int(r["n"]), confidence),
        }
        for r, f in zip(rows, fit, strict=True)
    ]


def choose_strength(
    curve: Sequence[dict[str, float]], target: float
) -> tuple[dict[str, float] | None, bool]:
    """The smallest strength whose lower bound reaches ``target``.

    Returns
    -------
    (dict or None, bool)
        The row of :func:`fit_success` kept and whether the target was
        reached; when it was not, the row with the highest lower bound
        (smallest strength among ties); ``None`` for an empty curve.
    """
    if not curve:
        return None, False
    for row in curve:
        if row["lower"] >= target:
            return row, True
    best = max(curve, key=lambda r: (r["lower"], r["fit"], -r["strength"]))
    return best, False


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, p)`` (exact; n up to a few thousand)."""
    k, n = int(k), int(n)
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    p = float(p)
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    logs = [
        math.lgamma(n + 1)
        - math.lgamma(i + 1)
        - math.lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
        for i in range(k + 1)
    ]
    top = max(logs)
    return float(min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs)))


def success_test(k: int, n: int, target: float) -> float:
    """One-sided exact binomial test of "the success rate is at least ``target``".

    Returns the p-value ``P(X <= k | n, target)``: a small value (below the
    level chosen, e.g. 0.05) rejects the claim; a held-out measurement is
    consistent with the stored success when the p-value is above the level.
    """
    return binomial_cdf(k, n, target)


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
    stop: Callable[[list[dict[str, Any]]], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
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
    stop : callable, optional
        ``stop(table) -> bool`` after each strength: stop when True.
    progress : callable, optional
        ``progress(done, total)`` in strengths.

    Returns
    -------
    list of dict
        ``{"strength", "success", "k", "n", "id_score", "prob"}`` for
        strength 0 (the unedited pictures) and each strength measured
        (``k`` of ``n`` pictures succeeded; ``id_score`` None without an
        embedder; ``prob`` the mean classifier probability).
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
            "k": int(np.sum(p0 > 0.5)),
            "n": len(p0),
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
        row: dict[str, Any] = {
            "strength": st,
            "success": float(np.mean(p > 0.5)),
            "k": int(np.sum(p > 0.5)),
            "n": len(p),
            "id_score": None,
        }
        if embed is not None and e0 is not None:
            row["id_score"] = float(np.sum(_unit(embed(imgs)) * e0, axis=1).mean())
        row["prob"] = float(np.mean(p))
        table.append(row)
        if progress is not None:
            progress(j + 1, len(todo))
        if stop_at is not None and row["success"] >= stop_at:
            break
        if stop is not None and stop(table):
            break
    return table


def _confirmed(table: list[dict[str, Any]], s: CalibrationSettings) -> bool:
    """Whether the grid may stop: ``s.confirm`` strengths after the first reaching the target
    reach it too (on the monotone fit so far)."""
    curve = fit_success(table, s.confidence)
    ok = [r["lower"] >= s.target for r in curve]
    if True not in ok:
        return False
    first = ok.index(True)
    return len(ok) - first > int(s.confirm) and all(ok[first:])


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
    plausible for it under ``pack``'s rule, see :func:`candidates`) from the
    pool of all such models, edits them over the grid ``settings.strengths``,
    fits success against strength monotone (:func:`isotonic`) and keeps the
    smallest strength whose one-sided Wilson lower bound
    (``settings.confidence``) reaches ``settings.target``: a claim about models
    it was not calibrated on, not only about the ones drawn. The grid stops
    ``settings.confirm`` strengths after the first that reaches it. If none
    does, the strength with the highest bound is kept with ``reached`` False.
    Stored in ``space.directions_[name].info["calibration"]`` (save with
    :func:`w2wkit.persist.save_directions` or ``space.save``).

    Returns
    -------
    dict
        ``{"strength", "success", "success_lower", "success_observed",
        "confidence", "target", "reached", "id_score", "prob",
        "success_unedited", "prob_unedited", "classifier", "models", "rows",
        "n_models", "n_pictures", "pool", "seeds", "steps", "guidance",
        "inject_t", "prompt", "n_implausible", "plausibility", "table",
        "curve", "vector"}``: ``success`` is the monotone fit at the kept
        strength, ``success_lower`` its lower bound, ``success_observed`` the
        raw rate there, ``pool`` the models it could have drawn (the rest of
        the pool never saw the calibration: held out), ``curve`` the fit over
        the grid (:func:`fit_success`).

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
        stop=lambda t: _confirmed(t, s),
        progress=progress,
    )
    curve = fit_success(table, s.confidence)
    chosen, reached = choose_strength(curve, float(s.target))
    assert chosen is not None  # the grid is never empty (settings.check)
    best = next(r for r in table if r["strength"] == chosen["strength"])
    names = list(space.names_)
    rec = {
        "strength": float(chosen["strength"]),
        "success": round(float(chosen["fit"]), 6),
        "success_lower": round(float(chosen["lower"]), 6),
        "success_observed": float(chosen["success"]),
        "confidence": float(s.confidence),
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
        "n_pictures": int(chosen["n"]),
        "pool": len(pool),
        "seeds": int(s.seeds),
        "steps": int(s.steps),
        "guidance": float(s.guidance),
        "inject_t": None if s.inject_t is None else float(s.inject_t),
        "prompt": text,
        "n_implausible": int(implausible),
        "plausibility": getattr(pack, "name", None) if getattr(pack, "plausible", None) else None,
        "table": table,
        "curve": curve,
        "settings": {k: v for k, v in asdict(s).items() if k in ("strengths", "seed", "confirm")},
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


def wilson_interval(k: int, n: int, confidence: float = 0.9) -> tuple[float, float]:
    """Two-sided Wilson interval of a success rate (``confidence`` in total)."""
    tail = 0.5 + float(confidence) / 2.0
    lo = wilson_lower(k, n, tail)
    hi = 1.0 - wilson_lower(n - k, n, tail) if n > 0 else 1.0
    return lo, hi


def check_heldout(
    space: Any,
    name: str,
    renderer: Any,
    classifier: Classifier,
    *,
    record: dict[str, Any] | None = None,
    pack: Any = None,
    n_models: int = 48,
    seed: int = 1,
    fractions: Sequence[float] = (1.0, 0.25),
    models: ModelSource | None = None,
    prompt: str | None = None,
    level: float = 0.05,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Success of a calibrated edit on models its calibration never saw.

    Draws up to ``n_models`` models of the calibration's pool (lacking the
    attribute, plausible for it) that are not among the calibration's
    ``rows``, renders them unedited and edited at ``fractions`` of the stored
    strength (same prompt, steps, guidance and seeds as the calibration) and
    tests each rate with :func:`success_test` against the stored target.

    Parameters
    ----------
    record : dict, optional
        The calibration (default: the one stored in the direction).
    fractions : sequence of float
        Multiples of the stored strength measured (1.0: the claim; a smaller
        one is a control the claim must beat).
    level : float
        Level of the one-sided binomial test.

    Returns
    -------
    dict
        ``{"name", "strength", "target", "level", "rows", "n_models",
        "unedited": {...}, "at": [{"fraction", "strength", "k", "n",
        "success", "ci90", "p_value", "consistent"}, ...]}``; ``consistent``:
        the test does not reject "success >= target" at ``level``.

    Raises
    ------
    DirectionError
        Uncalibrated direction, or no held-out model left.
    """
    from w2wkit.edits import calibration_of

    d = get_direction(space, name)
    rec = record if record is not None else calibration_of(d)
    if not rec:
        raise DirectionError(f"{name!r} is not calibrated", key=name)
    pool, _ = candidates(space, name, _pack(pack), exclude=rec.get("rows", ()))
    if not pool:
        raise DirectionError(f"no held-out model left for {name!r}", key=name)
    rng = np.random.default_rng(int(seed))
    rows = sorted(int(i) for i in rng.choice(pool, min(int(n_models), len(pool)), replace=False))
    s = CalibrationSettings(
        seeds=int(rec.get("seeds", 1)),
        steps=int(rec.get("steps", 20)),
        guidance=float(rec.get("guidance", 3.0)),
        inject_t=rec.get("inject_t"),
    )
    strength = float(rec["strength"])
    table = measure_edit(
        space,
        name,
        [strength * float(f) for f in fractions],
        rows,
        renderer,
        classifier,
        settings=s,
        models=models,
        prompt=prompt or rec.get("prompt"),
        progress=progress,
    )
    target = float(rec.get("target", 0.8))
    at = []
    for f in fractions:
        row = next(r for r in table[1:] if math.isclose(r["strength"], strength * float(f)))
        p = success_test(row["k"], row["n"], target)
        at.append(
            {
                "fraction": float(f),
                "strength": float(row["strength"]),
                "k": int(row["k"]),
                "n": int(row["n"]),
                "success": float(row["success"]),
                "ci90": list(wilson_interval(row["k"], row["n"], 0.9)),
                "p_value": p,
                "consistent": bool(p > level),
                "id_score": row["id_score"],
            }
        )
    return {
        "name": name,
        "strength": strength,
        "target": target,
        "level": float(level),
        "rows": rows,
        "n_models": len(rows),
        "unedited": {k: table[0][k] for k in ("k", "n", "success")},
        "at": at,
    }
