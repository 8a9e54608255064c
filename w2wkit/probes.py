"""Linear probes on plain arrays: the pure core of the directions.

Everything here works on a matrix of space coefficients ``P`` of shape
``(N, k)`` (one row per training model) and a label vector ``y`` of shape
``(N,)`` where ``NaN`` marks a missing label; nothing here knows of a
:class:`~w2wkit.space.WeightSpace` (that glue is :mod:`w2wkit.directions`).

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

This module imports neither torch nor diffusers; scikit-learn is imported
only by the probes that need it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from w2wkit.edits import EPS, as_matrix, unit_vector
from w2wkit.errors import DirectionError

__all__ = [
    "DEFAULT_KIND",
    "DEFAULT_METHOD",
    "KINDS",
    "PROBES",
    "DisentangleReport",
    "ProbeResult",
    "check_kind",
    "check_method",
    "cosine_matrix",
    "cross_validated_score",
    "disentangle_report",
    "disentangle_sequential",
    "fit_probe",
    "group_direction",
    "pattern_from_filter",
    "prepare_labels",
    "score_direction",
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
        check_kind(kind)
        return self.filter if kind == "filter" else self.pattern


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise DirectionError(f"unknown direction kind {kind!r}; choose one of {', '.join(KINDS)}")


def check_method(method: str) -> None:
    if method not in PROBES:
        raise DirectionError(f"unknown probe {method!r}; choose one of {', '.join(PROBES)}")


def _ridge_alphas(Pc: np.ndarray) -> np.ndarray:
    # The grid is relative to the mean eigenvalue of Pc^T Pc, so it does not
    # depend on the units of the coefficients.
    scale = float(np.einsum("ij,ij->", Pc, Pc)) / max(Pc.shape[1], 1)
    return np.logspace(-6, 1, 15) * max(scale, EPS)


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
    sd = np.where(sd > EPS, sd, 1.0)
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
    check_method(method)
    P = as_matrix(P)
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
    P = as_matrix(P)
    Pc = P - P.mean(axis=0)
    a = Pc.T @ (Pc @ np.asarray(w, dtype=np.float64)) / max(P.shape[0] - 1, 1)
    return unit_vector(a, "pattern")


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
    P = as_matrix(P)
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
    check_method(method)
    P = as_matrix(P)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if y.shape[0] != P.shape[0]:
        raise DirectionError(f"{y.shape[0]} labels for {P.shape[0]} models", key=name)
    mask, vals, task = prepare_labels(y, name)
    Pl = P[mask]
    w, _, params = _fit_weights(Pl, vals, method, task, alpha=alpha, C=C, random_state=random_state)
    filt = unit_vector(w, f"probe weights of {name!r}")
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
    if np.any(n <= EPS):
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
    v = unit_vector(vector)
    for u in np.atleast_2d(np.asarray(others, dtype=np.float64)):
        u = unit_vector(u)
        v = v - (v @ u) * u
    return unit_vector(v)


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
    return DisentangleReport(names, before, after, float(unit_vector(vector) @ unit_vector(result)))


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
    Pa = as_matrix(Pa)
    Pb = as_matrix(Pb)
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
    d = unit_vector(Pb.mean(axis=0) - Pa.mean(axis=0), "difference of the group means")
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
