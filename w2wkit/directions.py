"""Directions in a weight space: probes, patterns, disentanglement, edits.

The pure core of this module works on plain arrays: a matrix of space
coefficients ``P`` of shape ``(N, k)`` (one row per training model) and a
label vector ``y`` of shape ``(N,)`` where ``NaN`` marks a missing label.
The space-level functions (:func:`fit_directions`, :func:`disentangle_direction`,
...) wrap it around a fitted :class:`~w2wkit.space.WeightSpace`. The
:class:`Direction` record, the strength unit (:func:`calibrate`),
:func:`disentangle` and the edits (:func:`edit`, :func:`edit_delta`) are
defined in :mod:`w2wkit.edits`, below the space (``WeightSpace.edit`` and its
saved file use them), and re-exported here.

Two kinds of direction come out of every probe (see ``docs/directions.md``):

``filter``
    The probe's weight vector ``w`` (the paper's least-squares "classifier"
    ``pinv(P) @ y``). It is the smallest Euclidean step that changes the
    probe's output.
``pattern``
    ``Cov(P) @ w``: how the population actually moves with the probe's output
    (for least squares on a binary label, the difference of the class means).
    It is the smallest step in the population's own (Mahalanobis) metric, and
    a step along it changes any other linear score ``u @ p`` by
    ``Cov(u @ p, w @ p)``: nothing at all for attributes that are
    uncorrelated with the target in the training population.

Strengths are calibrated: strength 1.0 moves a model by one standard
deviation (``ddof=1``) of the training models' projections on the
direction.

This module imports neither torch nor diffusers; scikit-learn is imported
only by the probes that need it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from w2wkit.edits import (  # the part the space itself uses; re-exported here
    _EPS,
    EDIT_METADATA_KEY,
    MAX_STRENGTH,
    Direction,
    _as_matrix,
    _directions,
    _readout,
    _require_fitted,
    _unit,
    available,
    calibrate,
    check_strength,
    disentangle,
    edit,
    edit_delta,
    get_direction,
    parse_strength,
)
from w2wkit.errors import DirectionError

if TYPE_CHECKING:  # pragma: no cover
    from w2wkit.adapter import Adapter
    from w2wkit.space import WeightSpace

__all__ = [
    "DEFAULT_KIND",
    "DEFAULT_METHOD",
    "EDIT_METADATA_KEY",
    "KINDS",
    "MAX_STRENGTH",
    "PROBES",
    "Direction",
    "DisentangleReport",
    "PlantedWorld",
    "ProbeResult",
    "available",
    "calibrate",
    "check_strength",
    "cosine_matrix",
    "cross_validated_score",
    "direction_vector",
    "disentangle",
    "disentangle_direction",
    "disentangle_report",
    "disentangle_sequential",
    "edit",
    "edit_delta",
    "fit_directions",
    "fit_probe",
    "get_direction",
    "group_direction",
    "group_direction_in_space",
    "make_direction",
    "make_planted",
    "parse_strength",
    "pattern_from_filter",
    "prepare_labels",
    "score_direction",
    "spillover",
]

#: Probe names accepted by :func:`fit_probe`.
PROBES = ("lstsq", "ridge", "logistic", "svm")
#: Direction kinds every probe yields.
KINDS = ("filter", "pattern")
#: Default probe: the paper's least squares.
DEFAULT_METHOD = "lstsq"
#: Default kind, chosen by the spill-over measurement in docs/directions.md.
DEFAULT_KIND = "pattern"


# ---------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------


def prepare_labels(y: np.ndarray, name: str = "attribute") -> tuple[np.ndarray, np.ndarray, str]:
    """Select the labelled rows and decide whether a label is binary.

    Parameters
    ----------
    y : numpy.ndarray
        Labels, shape ``(N,)``; ``NaN`` marks a missing value.
    name : str
        Attribute name used in error messages.

    Returns
    -------
    mask : numpy.ndarray
        Boolean, shape ``(N,)``: rows with a label.
    values : numpy.ndarray
        float64, shape ``(n,)``: the labels of those rows; binary labels are
        mapped to ``{0, 1}`` (the larger value is the positive class).
    task : str
        ``"binary"`` (exactly two distinct values) or ``"continuous"``.

    Raises
    ------
    DirectionError
        Non-numeric or infinite labels, fewer than 3 labelled rows, or a
        single distinct value (one class).
    """
    try:
        arr = np.asarray(y, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DirectionError("labels are not numeric", key=name) from None
    if np.isinf(arr).any():
        raise DirectionError("labels contain infinite values", key=name)
    mask = ~np.isnan(arr)
    vals = arr[mask]
    if vals.size < 3:
        raise DirectionError(
            f"only {vals.size} labelled model(s); a probe needs at least 3", key=name
        )
    uniq = np.unique(vals)
    if uniq.size < 2:
        raise DirectionError(
            f"every labelled model has the same value {uniq[0]:g} (one class); "
            "a direction needs two classes or a spread of values",
            key=name,
        )
    if uniq.size == 2:
        return mask, (vals == uniq[1]).astype(np.float64), "binary"
    return mask, vals, "continuous"


# ---------------------------------------------------------------------------
# probes
# ---------------------------------------------------------------------------


@dataclass
class ProbeResult:
    """What :func:`fit_probe` learned about one attribute.

    Attributes
    ----------
    method : str
        Probe name (one of :data:`PROBES`).
    task : str
        ``"binary"`` or ``"continuous"``.
    filter : numpy.ndarray
        Unit probe weight vector, shape ``(k,)``, float64; the positive side
        is the positive class / larger values.
    pattern : numpy.ndarray
        Unit ``Cov(P) @ filter``, shape ``(k,)``, float64.
    score : float or None
        Cross-validated accuracy (binary) or R^2 (continuous) of the probe;
        ``None`` when there are too few labels for cross-validation.
    scores : dict of str to float or None
        Cross-validated score of a one-dimensional fit on each kind's
        projection (``{"filter": ..., "pattern": ...}``).
    n_labelled : int
        Rows with a label.
    label_stats : dict
        ``{"n", "n_positive", "n_negative"}`` (binary) or
        ``{"n", "mean", "std", "min", "max"}`` (continuous).
    params : dict
        Hyper-parameters actually used (e.g. ridge ``alpha``).
    """

    method: str
    task: str
    filter: np.ndarray
    pattern: np.ndarray
    score: float | None
    scores: dict[str, float | None]
    n_labelled: int
    label_stats: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)

    def vector(self, kind: str) -> np.ndarray:
        """The unit vector of ``kind`` (``"filter"`` or ``"pattern"``), shape ``(k,)``."""
        _check_kind(kind)
        return self.filter if kind == "filter" else self.pattern


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise DirectionError(f"unknown direction kind {kind!r}; choose one of {', '.join(KINDS)}")


def _check_method(method: str) -> None:
    if method not in PROBES:
        raise DirectionError(f"unknown probe {method!r}; choose one of {', '.join(PROBES)}")


def _ridge_alphas(Pc: np.ndarray) -> np.ndarray:
    # The grid is relative to the mean eigenvalue of Pc^T Pc, so it does not
    # depend on the units of the coefficients.
    scale = float(np.einsum("ij,ij->", Pc, Pc)) / max(Pc.shape[1], 1)
    return np.logspace(-6, 1, 15) * max(scale, _EPS)


def _fit_weights(
    P: np.ndarray,
    y: np.ndarray,
    method: str,
    task: str,
    *,
    alpha: float | None,
    C: float,
    random_state: int | None,
) -> tuple[np.ndarray, float, dict[str, Any]]:
    """Fit one probe; return raw weights ``(k,)``, intercept and params.

    The decision value of a row ``p`` is ``p @ w + b``; for ``lstsq`` and
    ``ridge`` it predicts the (0/1 or continuous) label itself.
    """
    mean = P.mean(axis=0)
    Pc = P - mean
    ym = float(y.mean())
    if method == "lstsq":
        # pinv(P) @ y on centred data: identical to the paper's pinv on PCA
        # scores, whose columns are already centred on the full set.
        w = np.linalg.lstsq(Pc, y - ym, rcond=None)[0]
        return w, ym - float(mean @ w), {}
    if method == "ridge":
        from sklearn.linear_model import Ridge, RidgeCV

        if alpha is None:
            model = RidgeCV(alphas=_ridge_alphas(Pc), fit_intercept=False).fit(Pc, y - ym)
            used = float(model.alpha_)
        else:
            model = Ridge(alpha=float(alpha), fit_intercept=False).fit(Pc, y - ym)
            used = float(alpha)
        w = np.asarray(model.coef_, dtype=np.float64).reshape(-1)
        return w, ym - float(mean @ w), {"alpha": used}
    if task != "binary":
        raise DirectionError(
            f"probe {method!r} needs a binary label; this one is continuous",
            param="method",
            hint='use `method="lstsq"` or `method="ridge"`',
        )
    # logistic / svm: standardise the coefficients so that C means the same
    # for every component, then map the weights back to raw coordinates.
    sd = Pc.std(axis=0)
    sd = np.where(sd > _EPS, sd, 1.0)
    Z = Pc / sd
    if method == "logistic":
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=C, max_iter=5000, random_state=random_state)
    else:
        from sklearn.svm import LinearSVC

        model = LinearSVC(C=C, max_iter=20000, random_state=random_state)
    model.fit(Z, y.astype(int))
    w = np.asarray(model.coef_, dtype=np.float64).reshape(-1) / sd
    b = float(np.asarray(model.intercept_).reshape(-1)[0]) - float(mean @ w)
    return w, b, {"C": C}


def _predict(method: str, task: str, P: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    out = P @ w + b
    if task == "binary":
        thr = 0.5 if method in ("lstsq", "ridge") else 0.0
        return (out > thr).astype(np.float64)
    return out


def _score(task: str, y: np.ndarray, pred: np.ndarray) -> float:
    if task == "binary":
        return float(np.mean(pred == y))
    ss = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - pred) ** 2)) / ss if ss > 0 else float("nan")


def _folds(y: np.ndarray, task: str, cv: int, random_state: int | None):
    from sklearn.model_selection import KFold, StratifiedKFold

    n = y.size
    if task == "binary":
        smallest = int(min(y.sum(), n - y.sum()))
        n_splits = min(cv, smallest)
        if n_splits < 2:
            return None
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=random_state)
        return list(splitter.split(np.zeros(n), y.astype(int)))
    n_splits = min(cv, n // 2)
    if n_splits < 2:
        return None
    splitter = KFold(n_splits=n_splits, shuffle=True, random_state=random_state)
    return list(splitter.split(np.zeros(n)))


def cross_validated_score(
    P: np.ndarray,
    y: np.ndarray,
    method: str = DEFAULT_METHOD,
    *,
    cv: int = 5,
    random_state: int | None = 0,
    alpha: float | None = None,
    C: float = 1.0,
    name: str = "attribute",
) -> float | None:
    """k-fold cross-validated score of a probe.

    Parameters
    ----------
    P : numpy.ndarray
        Coefficients, shape ``(N, k)``.
    y : numpy.ndarray
        Labels, shape ``(N,)``, ``NaN`` = missing.
    method : str
        One of :data:`PROBES`.
    cv : int
        Number of folds (stratified for binary labels, shuffled with
        ``random_state``); reduced when a class is smaller.

    Returns
    -------
    float or None
        Mean accuracy (binary) or R^2 (continuous) over the held-out folds;
        ``None`` when fewer than two folds are possible.
    """
    _check_method(method)
    P = _as_matrix(P)
    mask, vals, task = prepare_labels(y, name)
    Pl = P[mask]
    folds = _folds(vals, task, cv, random_state)
    if folds is None:
        return None
    out = []
    for tr, te in folds:
        w, b, _ = _fit_weights(
            Pl[tr], vals[tr], method, task, alpha=alpha, C=C, random_state=random_state
        )
        out.append(_score(task, vals[te], _predict(method, task, Pl[te], w, b)))
    return float(np.mean(out))


def pattern_from_filter(P: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The pattern ``Cov(P) @ w`` of a filter, normalised.

    Parameters
    ----------
    P : numpy.ndarray
        Coefficients, shape ``(N, k)``.
    w : numpy.ndarray
        Filter, shape ``(k,)``.

    Returns
    -------
    numpy.ndarray
        Unit vector, shape ``(k,)``, with ``pattern @ w > 0``.
    """
    P = _as_matrix(P)
    Pc = P - P.mean(axis=0)
    a = Pc.T @ (Pc @ np.asarray(w, dtype=np.float64)) / max(P.shape[0] - 1, 1)
    return _unit(a, "pattern")


def score_direction(
    P: np.ndarray,
    y: np.ndarray,
    vector: np.ndarray,
    *,
    cv: int = 5,
    random_state: int | None = 0,
    name: str = "attribute",
) -> float | None:
    """Cross-validated score of a fixed direction.

    A one-dimensional least-squares fit of the label on ``P @ vector`` is
    cross-validated exactly like a probe: accuracy of ``fit > 0.5`` for a
    binary label, R^2 for a continuous one.

    Parameters
    ----------
    P : numpy.ndarray
        Coefficients, shape ``(N, k)``.
    y : numpy.ndarray
        Labels, shape ``(N,)``, ``NaN`` = missing.
    vector : numpy.ndarray
        Direction, shape ``(k,)``.

    Returns
    -------
    float or None
    """
    P = _as_matrix(P)
    v = np.asarray(vector, dtype=np.float64).reshape(-1, 1)
    if v.shape[0] != P.shape[1]:
        raise DirectionError(f"direction has {v.shape[0]} entries, coefficients have {P.shape[1]}")
    return cross_validated_score(P @ v, y, "lstsq", cv=cv, random_state=random_state, name=name)


def _label_stats(vals: np.ndarray, task: str) -> dict[str, float]:
    if task == "binary":
        pos = int(vals.sum())
        return {"n": int(vals.size), "n_positive": pos, "n_negative": int(vals.size - pos)}
    return {
        "n": int(vals.size),
        "mean": float(vals.mean()),
        "std": float(vals.std(ddof=1)),
        "min": float(vals.min()),
        "max": float(vals.max()),
    }


def fit_probe(
    P: np.ndarray,
    y: np.ndarray,
    method: str = DEFAULT_METHOD,
    *,
    cv: int = 5,
    random_state: int | None = 0,
    alpha: float | None = None,
    C: float = 1.0,
    name: str = "attribute",
) -> ProbeResult:
    """Fit a linear probe of one attribute on space coefficients.

    Parameters
    ----------
    P : numpy.ndarray
        Coefficients of the training models, shape ``(N, k)``.
    y : numpy.ndarray
        Labels, shape ``(N,)``; ``NaN`` rows are left out. Two distinct
        values make a binary label, more a continuous one.
    method : str
        ``"lstsq"`` (the paper's ``pinv(P) @ y``, on centred data),
        ``"ridge"`` (``alpha`` by generalised cross-validation unless given),
        ``"logistic"`` or ``"svm"`` (linear SVM; both binary only, on
        standardised coefficients with inverse regularisation ``C``).
    cv : int
        Folds of the cross-validated score (0 skips it).
    random_state : int, optional
        Seed of the fold shuffling and of the solvers.
    alpha : float, optional
        Ridge penalty; ``None`` selects it.
    C : float
        Inverse regularisation of ``logistic`` and ``svm``.
    name : str
        Attribute name for messages.

    Returns
    -------
    ProbeResult
        Unit ``filter`` and ``pattern`` vectors, shape ``(k,)``, and scores.

    Raises
    ------
    DirectionError
        Bad labels (see :func:`prepare_labels`), an unknown method, or a
        continuous label with ``logistic``/``svm``.
    """
    _check_method(method)
    P = _as_matrix(P)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if y.shape[0] != P.shape[0]:
        raise DirectionError(f"{y.shape[0]} labels for {P.shape[0]} models", key=name)
    mask, vals, task = prepare_labels(y, name)
    Pl = P[mask]
    w, _, params = _fit_weights(Pl, vals, method, task, alpha=alpha, C=C, random_state=random_state)
    filt = _unit(w, f"probe weights of {name!r}")
    patt = pattern_from_filter(Pl, filt)
    score = None
    scores: dict[str, float | None] = {"filter": None, "pattern": None}
    if cv and cv >= 2:
        score = cross_validated_score(
            P, y, method, cv=cv, random_state=random_state, alpha=alpha, C=C, name=name
        )
        for kind, vec in (("filter", filt), ("pattern", patt)):
            scores[kind] = score_direction(P, y, vec, cv=cv, random_state=random_state, name=name)
    return ProbeResult(
        method=method,
        task=task,
        filter=filt,
        pattern=patt,
        score=score,
        scores=scores,
        n_labelled=int(mask.sum()),
        label_stats=_label_stats(vals, task),
        params=params,
    )


# ---------------------------------------------------------------------------
# disentanglement and geometry
# ---------------------------------------------------------------------------


def cosine_matrix(vectors: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Cosine similarities of a set of directions.

    Parameters
    ----------
    vectors : array_like
        Shape ``(m, k)``.

    Returns
    -------
    numpy.ndarray
        Shape ``(m, m)``, float64, ones on the diagonal.
    """
    V = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    n = np.linalg.norm(V, axis=1, keepdims=True)
    if np.any(n <= _EPS):
        raise DirectionError("cannot take the cosine of a zero direction")
    U = V / n
    C = np.clip(U @ U.T, -1.0, 1.0)
    np.fill_diagonal(C, 1.0)
    return C


def disentangle_sequential(
    vector: np.ndarray, others: np.ndarray | Sequence[np.ndarray]
) -> np.ndarray:
    """The research code's disentanglement: one single projection after another.

    ``v <- v - (v @ u) u`` for each unit ``u`` in ``others`` in turn. When
    the others are correlated the later projections reintroduce components
    along the earlier ones; kept for comparison (see :func:`disentangle`).

    Parameters
    ----------
    vector : numpy.ndarray
        Shape ``(k,)``.
    others : array_like
        Shape ``(m, k)``.

    Returns
    -------
    numpy.ndarray
        Unit vector, shape ``(k,)``.
    """
    v = _unit(vector)
    for u in np.atleast_2d(np.asarray(others, dtype=np.float64)):
        u = _unit(u)
        v = v - (v @ u) * u
    return _unit(v)


@dataclass
class DisentangleReport:
    """Before/after record of a disentanglement.

    Attributes
    ----------
    names : list of str
        The target first, then the others.
    before, after : numpy.ndarray
        Cosine matrices, shape ``(m + 1, m + 1)``.
    cos_to_original : float
        Cosine between the disentangled and the original target.
    """

    names: list[str]
    before: np.ndarray
    after: np.ndarray
    cos_to_original: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "names": list(self.names),
            "cosines_before": np.round(self.before, 6).tolist(),
            "cosines_after": np.round(self.after, 6).tolist(),
            "cos_to_original": round(float(self.cos_to_original), 6),
        }


def disentangle_report(
    name: str, vector: np.ndarray, others: Mapping[str, np.ndarray], result: np.ndarray
) -> DisentangleReport:
    """Cosine matrices of ``[vector, *others]`` before and of ``[result, *others]`` after."""
    names = [name, *others]
    O = [np.asarray(v, dtype=np.float64) for v in others.values()]
    before = cosine_matrix([vector, *O])
    after = cosine_matrix([result, *O])
    return DisentangleReport(names, before, after, float(_unit(vector) @ _unit(result)))


# ---------------------------------------------------------------------------
# calibration, groups
# ---------------------------------------------------------------------------


def group_direction(
    Pa: np.ndarray,
    Pb: np.ndarray,
    *,
    method: str = "mean",
    cv: int = 5,
    random_state: int | None = 0,
) -> ProbeResult:
    """A label-free direction from two groups of models, pointing from A to B.

    Parameters
    ----------
    Pa, Pb : numpy.ndarray
        Coefficients of the two groups, shapes ``(Na, k)`` and ``(Nb, k)``.
    method : str
        ``"mean"``: the difference of the group means (both kinds are then
        this vector; it is the pattern of the least-squares probe on the
        group label); or any of :data:`PROBES`, fitted on the label
        ``0 = A, 1 = B``.
    cv : int
        Folds for the cross-validated accuracy of telling the groups apart.

    Returns
    -------
    ProbeResult
        With ``method="groups"`` for the mean difference.
    """
    Pa = _as_matrix(Pa)
    Pb = _as_matrix(Pb)
    if Pa.shape[1] != Pb.shape[1]:
        raise DirectionError(
            f"groups have {Pa.shape[1]} and {Pb.shape[1]} coefficients; they must share a space"
        )
    if Pa.shape[0] < 1 or Pb.shape[0] < 1:
        raise DirectionError("each group needs at least one model")
    P = np.vstack([Pa, Pb])
    y = np.r_[np.zeros(Pa.shape[0]), np.ones(Pb.shape[0])]
    if method != "mean":
        return fit_probe(P, y, method, cv=cv, random_state=random_state, name="groups")
    d = _unit(Pb.mean(axis=0) - Pa.mean(axis=0), "difference of the group means")
    score = None
    if cv and min(Pa.shape[0], Pb.shape[0]) >= 2:
        score = score_direction(P, y, d, cv=cv, random_state=random_state, name="groups")
    return ProbeResult(
        method="groups",
        task="binary",
        filter=d,
        pattern=d,
        score=score,
        scores={"filter": score, "pattern": score},
        n_labelled=int(y.size),
        label_stats={
            "n": int(y.size),
            "n_positive": int(Pb.shape[0]),
            "n_negative": int(Pa.shape[0]),
        },
    )


# ---------------------------------------------------------------------------
# planted data and the spill-over measurement
# ---------------------------------------------------------------------------


@dataclass
class PlantedWorld:
    """Synthetic coefficients with attributes planted in known directions.

    Attributes
    ----------
    P : numpy.ndarray
        Coefficients, shape ``(N, k)``.
    labels : dict of str to numpy.ndarray
        Attribute -> labels ``(N,)`` (binary 0/1 or continuous).
    readouts : dict of str to numpy.ndarray
        Attribute -> unit planted direction ``(k,)``: the attribute's
        (noise-free) score of a model ``p`` is ``p @ readout``.
    world : str
        ``"readout"`` or ``"generative"``.
    loadings : numpy.ndarray or None
        ``(n_attributes, k)`` generating directions of a generative world.
    """

    P: np.ndarray
    labels: dict[str, np.ndarray]
    readouts: dict[str, np.ndarray]
    world: str
    loadings: np.ndarray | None = None

    def true_scores(self, P: np.ndarray) -> dict[str, np.ndarray]:
        """Noise-free attribute scores of models ``P`` (n, k) -> name -> (n,).

        Readout world: ``P @ readout``. Generative world: the least-squares
        amounts of each attribute's loading in ``P`` (``P @ pinv(loadings)``).
        """
        P = np.atleast_2d(P)
        if self.world == "readout":
            return {n: P @ d for n, d in self.readouts.items()}
        amounts = P @ np.linalg.pinv(self.loadings)
        return {n: amounts[:, i] for i, n in enumerate(self.readouts)}


def make_planted(
    n: int = 2000,
    k: int = 40,
    *,
    n_attributes: int = 4,
    correlation: float = 0.35,
    spectrum: float = 0.5,
    label_noise: float = 0.3,
    binary: bool | Sequence[bool] = True,
    world: str = "readout",
    orthogonal_loadings: bool = True,
    seed: int = 0,
) -> PlantedWorld:
    """Plant attributes in synthetic space coefficients.

    Coefficients are Gaussian with a power-law spectrum (variance of
    component ``i`` is ``(i + 1) ** -spectrum``), like PCA scores; the
    variation that no attribute reads is nuisance (identity). Attributes
    ``a0``, ``a1`` ... are planted in random directions; ``a0`` and ``a1``
    are correlated in the population (correlation ``correlation``), all other
    pairs are uncorrelated.

    ``world="readout"``: an attribute is a noisy linear readout of the
    model, ``y = p @ d / std + label_noise * e`` (thresholded at 0 when
    binary); the readouts ``d`` are orthonormal in the population's whitened
    coordinates except for the a0/a1 mix. ``world="generative"``: models are
    made from their attributes, ``p = nuisance + sum_j s_j * loading_j``
    with orthogonal loadings and latent scores ``s`` that are independent
    except ``corr(s_0, s_1) = correlation``; labels are the latent scores
    plus noise (thresholded when binary).

    Parameters
    ----------
    n, k : int
        Models and coefficients.
    n_attributes : int
        At least 2.
    correlation : float
        Population correlation of ``a0`` and ``a1``.
    spectrum : float
        Power-law exponent of the nuisance variance.
    label_noise : float
        Label noise, in units of the attribute score's std.
    binary : bool or sequence of bool
        Per attribute.
    world : str
        ``"readout"`` or ``"generative"``.
    orthogonal_loadings : bool
        Generative world: orthonormal loadings (default) or independent
        random unit loadings (which overlap each other and the nuisance).
    seed : int
        Random seed.

    Returns
    -------
    PlantedWorld
    """
    if n_attributes < 2:
        raise DirectionError("make_planted needs at least 2 attributes")
    if n_attributes > k:
        raise DirectionError(f"make_planted needs k >= n_attributes, got k={k}")
    rng = np.random.default_rng(seed)
    flags = [binary] * n_attributes if isinstance(binary, bool) else list(binary)
    names = [f"a{i}" for i in range(n_attributes)]
    sd = (np.arange(1, k + 1, dtype=np.float64)) ** (-spectrum / 2)
    X = rng.standard_normal((n, k)) * sd
    # Orthonormal directions in the population's whitened coordinates, so
    # that attributes other than a0/a1 are exactly uncorrelated.
    U = np.linalg.qr(rng.standard_normal((k, n_attributes)))[0].T  # (m, k)
    U[1] = correlation * U[0] + math.sqrt(1 - correlation**2) * U[1]
    labels: dict[str, np.ndarray] = {}
    if world == "readout":
        D = U / sd  # d = Sigma^-1/2 u: d_i @ Sigma @ d_j = u_i @ u_j
        D /= np.linalg.norm(D, axis=1, keepdims=True)
        for i, name in enumerate(names):
            s = X @ D[i]
            s = (s - s.mean()) / s.std()
            y = s + label_noise * rng.standard_normal(n)
            labels[name] = (y > 0).astype(np.float64) if flags[i] else y
        return PlantedWorld(X, labels, {nm: D[i] for i, nm in enumerate(names)}, world)
    if world != "generative":
        raise DirectionError(f"unknown planted world {world!r}; choose readout or generative")
    D = rng.standard_normal((n_attributes, k))
    if orthogonal_loadings:
        D = np.linalg.qr(D.T)[0].T
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    cov = np.eye(n_attributes)
    cov[0, 1] = cov[1, 0] = correlation
    S = rng.standard_normal((n, n_attributes)) @ np.linalg.cholesky(cov).T
    loadings = D * (2.0 * sd.max())
    P = X + S @ loadings
    for i, name in enumerate(names):
        y = S[:, i] + label_noise * rng.standard_normal(n)
        labels[name] = (y > 0).astype(np.float64) if flags[i] else y
    return PlantedWorld(
        P, labels, {nm: D[i] for i, nm in enumerate(names)}, world, loadings=loadings
    )


def spillover(
    world: PlantedWorld,
    target: str,
    vector: np.ndarray,
    *,
    independent: Sequence[str] | None = None,
) -> dict[str, float]:
    """Measure what a calibrated edit along ``vector`` does in a planted world.

    Every training model is moved by strength 1.0 (one std of the training
    projections on ``vector``); the change of each attribute's true score
    (:meth:`PlantedWorld.true_scores`) is expressed in standard deviations
    of that score over the training population.

    Parameters
    ----------
    world : PlantedWorld
    target : str
        The attribute the direction is meant to change.
    vector : numpy.ndarray
        Direction, shape ``(k,)``.
    independent : sequence of str, optional
        Attributes independent of the target (default: all except the
        target and, for ``a0``/``a1``, its correlated partner).

    Returns
    -------
    dict
        ``target_std`` (target change per unit strength, in target stds),
        ``spill_mean`` / ``spill_max`` (mean / max |change| of the independent
        attributes per *one std of target change*), ``distance`` (size of the
        edit in the population's Mahalanobis metric per one std of target
        change).
    """
    v = _unit(vector)
    P = world.P
    _, std = calibrate(P, v)
    step = std * v
    base = world.true_scores(P)
    moved = world.true_scores(P[:1] + step)
    before = world.true_scores(P[:1])
    change = {n: float((moved[n] - before[n])[0] / base[n].std(ddof=1)) for n in base}
    if independent is None:
        pair = {"a0": "a1", "a1": "a0"}
        independent = [n for n in base if n not in (target, pair.get(target))]
    t = change[target]
    spills = np.abs([change[n] / t for n in independent]) if independent else np.zeros(1)
    Pc = P - P.mean(axis=0)
    cov = Pc.T @ Pc / (P.shape[0] - 1)
    maha = float(np.sqrt(step @ np.linalg.solve(cov, step)))
    return {
        "target_std": t,
        "spill_mean": float(spills.mean()),
        "spill_max": float(spills.max()),
        "distance": maha / abs(t),
    }


# ---------------------------------------------------------------------------
# space level (WeightSpace integration)
# ---------------------------------------------------------------------------


def direction_vector(direction: Direction, kind: str | None = None) -> np.ndarray:
    """A direction's unit vector of a kind, shape ``(k,)``.

    Both kinds are stored: the one the direction edits along in
    ``direction.vector``, the other in ``direction.info[kind]``.
    """
    if kind is None or kind == direction.kind:
        return np.asarray(direction.vector, dtype=np.float64)
    _check_kind(kind)
    other = direction.info.get(kind)
    if other is None:
        raise DirectionError(f"direction {direction.name!r} has no stored {kind} vector")
    return np.asarray(other, dtype=np.float64)


def _resolve_labels(
    space: WeightSpace, labels: Mapping[str, Any] | str | os.PathLike[str] | None
) -> dict[str, np.ndarray]:
    if labels is None:
        got = getattr(space, "labels_", None)
        if not got:
            raise DirectionError(
                "no labels: the space was fitted without labels and none were given",
                hint="pass them as `labels`",
            )
        return {k: np.asarray(v, dtype=np.float64) for k, v in got.items()}
    if isinstance(labels, str | os.PathLike):
        from w2wkit.labels import read_labels

        names = getattr(space, "names_", None) or [
            m.get("name", m.get("file", "")) for m in getattr(space, "manifest_", None) or []
        ]
        return read_labels(labels, list(names))
    return {k: np.asarray(v, dtype=np.float64) for k, v in labels.items()}


def make_direction(
    name: str,
    result: ProbeResult,
    P: np.ndarray,
    *,
    kind: str = DEFAULT_KIND,
) -> Direction:
    """Turn a :class:`ProbeResult` into a calibrated :class:`Direction`.

    Parameters
    ----------
    name : str
    result : ProbeResult
    P : numpy.ndarray
        Training coefficients ``(N, k)`` that define the strength unit.
    kind : str
        Which vector to edit along; the other is kept in ``info``.
    """
    _check_kind(kind)
    vec = result.vector(kind)
    mean, std = calibrate(P, vec)
    other = "pattern" if kind == "filter" else "filter"
    info: dict[str, Any] = {
        "task": result.task,
        "n_labelled": result.n_labelled,
        "label_stats": result.label_stats,
        "scores_1d": result.scores,
        "params": result.params,
        other: [float(x) for x in result.vector(other)],
    }
    return Direction(
        name=name,
        vector=vec.copy(),
        method=result.method,
        kind=kind,
        score=None if result.score is None else float(result.score),
        proj_mean=mean,
        proj_std=std,
        info=_json_safe(info),
    )


def fit_directions(
    space: WeightSpace,
    labels: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    method: str = DEFAULT_METHOD,
    kind: str = DEFAULT_KIND,
    names: Sequence[str] | None = None,
    disentangle: Mapping[str, Sequence[str]] | None = None,
    cv: int = 5,
    random_state: int | None = 0,
    alpha: float | None = None,
    C: float = 1.0,
) -> dict[str, Direction]:
    """Fit named directions from labels and store them in ``space.directions_``.

    Parameters
    ----------
    space : WeightSpace
        A fitted space; its ``coefficients_`` ``(N, k)`` are the probe data.
    labels : dict, path or None
        ``attribute -> (N,)`` arrays (``NaN`` = missing, rows in manifest
        order), a CSV/JSON label file (see :func:`w2wkit.labels.read_labels`),
        or ``None`` for the labels stored in the space.
    method : str
        Probe, one of :data:`PROBES`.
    kind : str
        ``"pattern"`` (default, see docs/directions.md) or ``"filter"``.
    names : sequence of str, optional
        Attributes to fit (default: every attribute in ``labels``).
    disentangle : mapping of str to sequence of str, optional
        ``{"beard": ["gender", "age"]}``: after fitting, make ``beard``
        leave the probe scores of ``gender`` and ``age`` unchanged (see
        :func:`disentangle_direction`). The others may be existing directions.
    cv : int
        Folds of the cross-validated scores.
    random_state : int, optional
    alpha, C : float
        Probe regularisation (see :func:`fit_probe`).

    Returns
    -------
    dict of str to Direction
        The directions fitted now (also stored in the space, replacing
        directions of the same name).
    """
    _check_method(method)
    _check_kind(kind)
    P = _require_fitted(space)
    table = _resolve_labels(space, labels)
    wanted = list(names) if names is not None else list(table)
    missing = [n for n in wanted if n not in table]
    if missing:
        raise DirectionError(
            f"no labels for {', '.join(missing)}; labelled attributes: {', '.join(table)}"
        )
    fitted: dict[str, Direction] = {}
    for attr in wanted:
        y = table[attr]
        if y.shape != (P.shape[0],):
            raise DirectionError(f"{y.shape[0]} labels for {P.shape[0]} models", key=attr)
        res = fit_probe(P, y, method, cv=cv, random_state=random_state, alpha=alpha, C=C, name=attr)
        fitted[attr] = make_direction(attr, res, P, kind=kind)
    store = _directions(space)
    store.update(fitted)
    for target, others in (disentangle or {}).items():
        if target not in store:
            raise DirectionError(
                f"cannot disentangle unknown direction {target!r}; available: {available(space)}"
            )
        y = table.get(target)
        d, _ = disentangle_direction(
            space, target, others, labels=y, cv=cv, random_state=random_state
        )
        fitted[target] = d
    return fitted


def disentangle_direction(
    space: WeightSpace,
    name: str,
    others: Sequence[str],
    *,
    labels: np.ndarray | None = None,
    cv: int = 5,
    random_state: int | None = 0,
    store: bool = True,
) -> tuple[Direction, DisentangleReport]:
    """Make a direction leave the scores of a set of other directions unchanged.

    The direction's vector is projected, all at once, onto the orthogonal
    complement of the span of the others' probe weights (their filters;
    :func:`disentangle`), re-normalised and re-calibrated. For ``filter``
    directions this is the research code's disentanglement done properly;
    for ``pattern`` directions it is what guarantees that an edit does not
    move the other probes' outputs.

    Parameters
    ----------
    space : WeightSpace
    name : str
        Direction to change.
    others : sequence of str
        Directions to keep unchanged.
    labels : numpy.ndarray, optional
        ``(N,)`` labels of ``name`` for the score after (default: the
        space's stored labels, if any).
    store : bool
        Replace the stored direction.

    Returns
    -------
    direction : Direction
        With ``info["disentangled"]`` recording the others, the cosine
        matrices of ``[direction, *others' filters]`` before and after, and the
        scores before/after.
    report : DisentangleReport
    """
    P = _require_fitted(space)
    d = get_direction(space, name)
    others = [o for o in others if o != name]
    if not others:
        raise DirectionError(f"nothing to disentangle {name!r} from", key=name)
    readouts = {o: _readout(get_direction(space, o)) for o in others}
    new = disentangle(d.vector, list(readouts.values()))
    report = disentangle_report(name, d.vector, readouts, new)
    if labels is None:
        stored = getattr(space, "labels_", None) or {}
        labels = stored.get(name)
    score_after = score_before = None
    if labels is not None:
        score_before = score_direction(
            P, labels, d.vector, cv=cv, random_state=random_state, name=name
        )
        score_after = score_direction(P, labels, new, cv=cv, random_state=random_state, name=name)
    mean, std = calibrate(P, new)
    info = dict(d.info)
    record = report.to_dict()
    record.update({"against": "filter", "score_before": score_before, "score_after": score_after})
    info["disentangled"] = record
    info["orthogonal_to"] = list(others)
    if d.kind in info:  # keep the stored other kind honest: it is the pre-disentangle one
        info[f"{d.kind}_original"] = [float(x) for x in d.vector]
    out = Direction(
        name=d.name,
        vector=new,
        method=d.method,
        kind=d.kind,
        score=d.score,
        proj_mean=mean,
        proj_std=std,
        info=_json_safe(info),
    )
    if store:
        _directions(space)[name] = out
    return out, report


def group_direction_in_space(
    space: WeightSpace,
    name: str,
    group_a: Sequence[Adapter],
    group_b: Sequence[Adapter],
    *,
    method: str = "mean",
    kind: str = DEFAULT_KIND,
    cv: int = 5,
    random_state: int | None = 0,
    store: bool = True,
) -> Direction:
    """A label-free direction from two groups of adapters, pointing from A to B.

    Parameters
    ----------
    space : WeightSpace
    name : str
    group_a, group_b : sequence of Adapter
        Models without / with the attribute (e.g. two folders).
    method : str
        ``"mean"`` (difference of the group means in the space) or a probe
        name (fitted on the group label).

    Returns
    -------
    Direction
        Calibrated on the space's training coefficients.
    """
    P = _require_fitted(space)
    Pa = np.atleast_2d(space.transform(list(group_a)))
    Pb = np.atleast_2d(space.transform(list(group_b)))
    res = group_direction(Pa, Pb, method=method, cv=cv, random_state=random_state)
    d = make_direction(name, res, P, kind=kind)
    if store:
        _directions(space)[name] = d
    return d


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=float))
