"""Directions in a weight space: the space-level glue around the probes.

The pure probes on plain arrays live in :mod:`w2wkit.probes`; the
:class:`Direction` record, the strength unit (:func:`calibrate`),
:func:`disentangle` and the edits (:func:`edit`, :func:`edit_delta`) in
:mod:`w2wkit.edits`, below the space (``WeightSpace.edit`` and its saved file
use them); the planted test world (:func:`make_planted`, :func:`spillover`) in
:mod:`w2wkit.synthetic`. This module fits them on a fitted
:class:`~w2wkit.space.WeightSpace` (:func:`fit_directions`,
:func:`disentangle_direction`, ...) and re-exports all of them, so
``w2wkit.directions`` is the one place to import directions from.

Strengths are calibrated: strength 1.0 moves a model by one standard
deviation (``ddof=1``) of the training models' projections on the
direction.

This module imports neither torch nor diffusers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from w2wkit.edits import (  # the part the space itself uses; re-exported here
    EDIT_METADATA_KEY,
    MAX_STRENGTH,
    Direction,
    _directions,
    _readout,
    _require_fitted,
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
from w2wkit.probes import (  # re-exported here
    DEFAULT_KIND,
    DEFAULT_METHOD,
    KINDS,
    PROBES,
    DisentangleReport,
    ProbeResult,
    check_kind,
    check_method,
    cosine_matrix,
    cross_validated_score,
    disentangle_report,
    disentangle_sequential,
    fit_probe,
    group_direction,
    pattern_from_filter,
    prepare_labels,
    score_direction,
)
from w2wkit.synthetic import PlantedWorld, make_planted, spillover  # re-exported here

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
    check_kind(kind)
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
    check_kind(kind)
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
    check_method(method)
    check_kind(kind)
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
