"""Named directions of a space and calibrated edits along them.

This is the part of the directions layer that :class:`~w2wkit.space.WeightSpace`
itself stores, saves and edits with, so it sits beside the space and imports
nothing above it: the :class:`Direction` record, looking a direction up by
name, the strength unit (:func:`calibrate`), keeping other scores unchanged
(:func:`disentangle`) and the edit itself (:func:`edit_delta`, :func:`edit`).
Learning directions from labels (probes, :func:`~w2wkit.directions.fit_directions`)
is :mod:`w2wkit.directions`, which re-exports everything public here; that is
the documented place to import them from.

Strengths are calibrated: strength 1.0 moves a model by one standard
deviation (``ddof=1``) of the training models' projections on the
direction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from w2wkit.errors import DirectionError

if TYPE_CHECKING:  # pragma: no cover
    from w2wkit.adapter import Adapter
    from w2wkit.space import WeightSpace

__all__ = [
    "EDIT_METADATA_KEY",
    "EPS",
    "MAX_STRENGTH",
    "Direction",
    "as_matrix",
    "available",
    "calibrate",
    "calibration_of",
    "check_strength",
    "describe_strength",
    "disentangle",
    "edit",
    "edit_delta",
    "get_direction",
    "parse_strength",
    "strength_range",
    "unit_vector",
    "vector_digest",
]

EPS = 1e-12


@dataclass
class Direction:
    """A named direction in coefficient space.

    Attributes
    ----------
    name : str
    vector : numpy.ndarray
        ``(k,)`` float64, unit norm, in the space's coefficient coordinates.
    method : str
        ``"lstsq"``, ``"ridge"``, ``"logistic"``, ``"svm"``, ``"groups"``,
        ``"imported"``...
    kind : str
        ``"filter"`` (probe weights) or ``"pattern"`` (class means).
    score : float, optional
        Cross-validated accuracy (binary) or R^2 (continuous).
    proj_mean, proj_std : float
        Mean and standard deviation of the training coefficients projected on
        ``vector`` (the calibration unit of an edit).
    info : dict
        JSON-serialisable extras.
    """

    name: str
    vector: np.ndarray
    method: str
    kind: str = "filter"
    score: float | None = None
    proj_mean: float = 0.0
    proj_std: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON part (everything but ``vector``)."""
        return {
            "name": self.name,
            "method": self.method,
            "kind": self.kind,
            "score": None if self.score is None else float(self.score),
            "proj_mean": float(self.proj_mean),
            "proj_std": float(self.proj_std),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, meta: dict[str, Any], vector: np.ndarray) -> Direction:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=str(meta["name"]),
            vector=np.asarray(vector, dtype=np.float64),
            method=str(meta.get("method", "imported")),
            kind=str(meta.get("kind", "filter")),
            score=meta.get("score"),
            proj_mean=float(meta.get("proj_mean", 0.0)),
            proj_std=float(meta.get("proj_std", 1.0)),
            info=dict(meta.get("info") or {}),
        )


# ---------------------------------------------------------------------------
# linear algebra of an edit
# ---------------------------------------------------------------------------


def as_matrix(P: np.ndarray) -> np.ndarray:
    P = np.asarray(P, dtype=np.float64)
    if P.ndim != 2:
        raise DirectionError(f"coefficients must be a matrix (N, k), got shape {P.shape}")
    if not np.isfinite(P).all():
        raise DirectionError("coefficients contain NaN or infinite values")
    return P


def unit_vector(v: np.ndarray, what: str = "direction") -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    n = float(np.linalg.norm(v))
    if not math.isfinite(n) or n <= EPS:
        raise DirectionError(f"{what} is zero or not finite")
    return v / n


def _orthonormal_basis(others: np.ndarray, rtol: float) -> np.ndarray:
    """Orthonormal basis ``(k, r)`` of the span of the rows of ``others`` (m, k)."""
    from scipy.linalg import qr

    A = np.asarray(others, dtype=np.float64).T  # (k, m)
    if A.size == 0:
        return np.zeros((A.shape[0], 0))
    norms = np.linalg.norm(A, axis=0)
    A = A[:, norms > EPS] / norms[norms > EPS]
    if A.shape[1] == 0:
        return np.zeros((A.shape[0], 0))
    Q, R, _ = qr(A, mode="economic", pivoting=True)
    diag = np.abs(np.diag(R))
    rank = int(np.sum(diag > rtol * diag[0]))
    return Q[:, :rank]


def disentangle(
    vector: np.ndarray, others: np.ndarray | Sequence[np.ndarray], *, rtol: float = 1e-10
) -> np.ndarray:
    """Remove from a direction its components along a set of others, at once.

    The direction is projected onto the orthogonal complement of the span of
    ``others``, whose orthonormal basis comes from a column-pivoted QR
    (near-dependent members are dropped by ``rtol`` on ``|R_ii|``). The
    projection is applied twice ("twice is enough"), so the result is
    orthogonal to every member to rounding error even when they are nearly
    collinear.

    Parameters
    ----------
    vector : numpy.ndarray
        Shape ``(k,)``.
    others : array_like
        Shape ``(m, k)``; need not be orthogonal or normalised.
    rtol : float
        Relative rank tolerance of the QR.

    Returns
    -------
    numpy.ndarray
        Unit vector, shape ``(k,)``.

    Raises
    ------
    DirectionError
        When the direction lies (numerically) in the span of the others.
    """
    v = unit_vector(vector)
    O = np.atleast_2d(np.asarray(others, dtype=np.float64))
    if O.shape[1] != v.shape[0]:
        raise DirectionError(f"directions have {O.shape[1]} entries, expected {v.shape[0]}")
    Q = _orthonormal_basis(O, rtol)
    r = v - Q @ (Q.T @ v)
    r = r - Q @ (Q.T @ r)
    if np.linalg.norm(r) < 1e-8:
        raise DirectionError(
            "direction lies in the span of the directions it is kept orthogonal to"
        )
    return r / np.linalg.norm(r)


def calibrate(P: np.ndarray, vector: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of the projections ``P @ vector``.

    Parameters
    ----------
    P : numpy.ndarray
        Training coefficients, shape ``(N, k)``.
    vector : numpy.ndarray
        Unit direction, shape ``(k,)``.

    Returns
    -------
    mean, std : float
        ``std`` uses ``ddof=1``; it is the unit of edit strength.

    Raises
    ------
    DirectionError
        When the training models do not vary along the direction.
    """
    P = as_matrix(P)
    proj = P @ np.asarray(vector, dtype=np.float64)
    std = float(proj.std(ddof=1)) if proj.size > 1 else 0.0
    if not std > EPS * max(1.0, float(np.abs(P).max())):
        raise DirectionError("the training models do not vary along this direction")
    return float(proj.mean()), std


# ---------------------------------------------------------------------------
# measured (visible) calibration of a direction
# ---------------------------------------------------------------------------

#: Key of ``Direction.info`` holding a measured calibration (see ``w2wkit.calibrate``).
CALIBRATION_KEY = "calibration"
#: Slider half-range of an uncalibrated direction, in training standard deviations.
UNCALIBRATED_RANGE = 3.0
#: Slider half-range of a calibrated direction, as a multiple of its calibrated strength.
CALIBRATED_RANGE = 1.5


def vector_digest(vector: np.ndarray) -> str:
    """A short hash of a direction's vector, shape ``(k,)`` (12 hex digits).

    A calibration records the digest of the vector it measured, so a direction
    refitted or disentangled later is not shown with a stale strength.
    """
    import hashlib

    v = np.ascontiguousarray(np.asarray(vector, dtype="<f8").reshape(-1))
    return hashlib.sha256(v.tobytes()).hexdigest()[:12]


def calibration_of(direction: Direction) -> dict[str, Any] | None:
    """The measured calibration of ``direction``, or ``None``.

    ``None`` when the direction was never calibrated (only the 1-sd unit is
    known), when the record is malformed, or when it was measured on another
    vector (the direction changed since).

    Returns
    -------
    dict or None
        ``{"strength", "success", "target", "reached", "id_score", ...}``; see
        :func:`w2wkit.calibrate.calibrate_direction`.
    """
    rec = direction.info.get(CALIBRATION_KEY)
    if not isinstance(rec, dict):
        return None
    s = rec.get("strength")
    if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s <= 0:
        return None
    if rec.get("vector") != vector_digest(direction.vector):
        return None
    return rec


def strength_range(direction: Direction) -> dict[str, Any]:
    """The range of strengths to offer for ``direction`` (sliders, defaults).

    Returns
    -------
    dict
        ``{"low", "high", "default", "calibrated", "unit"}``: for a calibrated
        direction ``+-1.5 x`` its calibrated strength, ``default`` the calibrated
        strength; otherwise ``+-3`` training standard deviations and ``default``
        1.0, with ``calibrated`` False and ``unit`` saying so.
    """
    rec = calibration_of(direction)
    if rec is None:
        return {
            "low": -UNCALIBRATED_RANGE,
            "high": UNCALIBRATED_RANGE,
            "default": 1.0,
            "calibrated": False,
            "unit": "uncalibrated: 1 = one training standard deviation",
        }
    s = float(rec["strength"])
    return {
        "low": -CALIBRATED_RANGE * s,
        "high": CALIBRATED_RANGE * s,
        "default": s,
        "calibrated": True,
        "unit": f"calibrated: {s:g} sd = {float(rec.get('success', 0.0)):.0%} success"
        + (f" (>= {float(rec['success_lower']):.0%})" if _number(rec.get("success_lower")) else "")
        + ("" if rec.get("reached", True) else " (target missed)"),
    }


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def describe_strength(direction: Direction) -> str:
    """One line for listings: the calibrated strength and what it does, or "uncalibrated".

    e.g. ``"3 sd: 91% success (>= 83% at 90% confidence, 48 pictures of a pool
    of 310) (target 80%), ID 0.63"`` or ``"uncalibrated (1 = 1 sd)"``.
    """
    rec = calibration_of(direction)
    if rec is None:
        return "uncalibrated (1 = 1 sd)"
    text = f"{float(rec['strength']):g} sd: {float(rec.get('success', 0.0)):.0%} success"
    lower, conf = rec.get("success_lower"), rec.get("confidence")
    if _number(lower) and _number(conf):
        # the calibrated claim: its lower bound, on how many models of how large a pool
        text += f" (>= {float(lower):.0%} at {float(conf):.0%} confidence"
        n, pool = rec.get("n_pictures"), rec.get("pool")
        if _number(n) and _number(pool):
            text += f", {int(n)} pictures of a pool of {int(pool)}"
        text += ")"
    target = rec.get("target")
    if isinstance(target, int | float):
        text += f" (target {float(target):.0%}{'' if rec.get('reached') else ', missed'})"
    idv = rec.get("id_score")
    if isinstance(idv, int | float) and not isinstance(idv, bool):
        text += f", ID {float(idv):.2f}"
    return text


# ---------------------------------------------------------------------------
# named directions of a space
# ---------------------------------------------------------------------------


def _require_fitted(space: WeightSpace) -> np.ndarray:
    P = getattr(space, "coefficients_", None)
    if P is None:
        raise DirectionError("the space is not fitted (no training coefficients)")
    return np.asarray(P, dtype=np.float64)


def _directions(space: WeightSpace) -> dict[str, Direction]:
    d = getattr(space, "directions_", None)
    if d is None:
        d = {}
        space.directions_ = d
    return d


def available(space: WeightSpace) -> str:
    """Comma-separated names of the space's directions (for messages)."""
    names = sorted(_directions(space))
    return ", ".join(names) if names else "none"


def get_direction(space: WeightSpace, name: str) -> Direction:
    """Look a direction up by name.

    Raises
    ------
    DirectionError
        When the space has no directions or none of that name (the message
        lists the available ones).
    """
    dirs = _directions(space)
    if not dirs:
        raise DirectionError(
            "the space has no directions",
            hint="fit some with `fit_directions()`",
        )
    if name not in dirs:
        raise DirectionError(f"unknown direction {name!r}; available: {available(space)}")
    return dirs[name]


def _readout(direction: Direction) -> np.ndarray:
    # What keeps another attribute unchanged is orthogonality to its probe
    # weights (its score is p @ filter); directions without a probe (groups,
    # imported) use their own vector.
    if "filter" in direction.info:
        return np.asarray(direction.info["filter"], dtype=np.float64)
    return np.asarray(direction.vector, dtype=np.float64)


# ---------------------------------------------------------------------------
# edits
# ---------------------------------------------------------------------------


#: Largest accepted edit strength, in training standard deviations (edits use a few).
MAX_STRENGTH = 1e4


def check_strength(value: Any, name: str = "strength") -> float:
    """``value`` as a strength: a real number, finite, at most :data:`MAX_STRENGTH` in size.

    The API takes numbers; text is parsed by the caller (the command line
    parses ``--strength``/``--edit`` once, see ``w2wkit.cli.common``).

    Raises
    ------
    DirectionError
        Naming the direction (``key``) and the value: not a number, not finite,
        or absurdly large (it would overflow the written weights).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise DirectionError(f"strength {value!r} is not a number", key=name, param="strengths")
    s = float(value)
    if not math.isfinite(s):
        raise DirectionError(f"strength {value!r} is not finite", key=name)
    if abs(s) > MAX_STRENGTH:
        raise DirectionError(
            f"strength {value!r} is out of range (at most {MAX_STRENGTH:g} training "
            "standard deviations either way)",
            key=name,
            hint="edits use strengths of a few units, e.g. 1.5",
        )
    return s


def parse_strength(text: str, name: str = "strength") -> float:
    """A strength written as text (``"1.5"``, ``"-2"``), checked by :func:`check_strength`.

    Raises
    ------
    DirectionError
        Naming the direction and the text as written.
    """
    try:
        value = float(str(text).strip())
    except ValueError:
        raise DirectionError(f"strength {text!r} is not a number", key=name) from None
    try:
        return check_strength(value, name)
    except DirectionError as exc:  # say it with the text the user wrote
        message = exc.message.replace(repr(value), repr(str(text)))
        raise DirectionError(message, key=name, hint=exc.hint) from None


def _check_finite_edit(adapter: Adapter, strengths: Mapping[str, Any]) -> None:
    """Refuse an edited model holding NaN/Inf (e.g. the float32 weights overflowed)."""
    for module, layer in adapter.items():
        arrays = (layer.down, layer.up) if hasattr(layer, "down") else (layer.weight,)
        if all(np.isfinite(a).all() for a in arrays):
            continue
        desc = ", ".join(f"{n}={v:g}" for n, v in strengths.items())
        raise DirectionError(
            f"the edit {desc} gives non-finite weights (NaN or Inf) in module {module}; "
            "nothing was written",
            key=", ".join(strengths),
            hint="use a smaller strength",
        )


def edit_delta(
    space: WeightSpace,
    strengths: Mapping[str, float],
    *,
    orthogonal_to: Sequence[str] = (),
) -> np.ndarray:
    """The coefficient change of a calibrated edit.

    ``delta = sum_name strength * proj_std(name) * vector(name)``: strength
    1.0 moves a model by one standard deviation of the training models'
    projections on that direction.

    Parameters
    ----------
    space : WeightSpace
    strengths : mapping of str to float
        Direction name -> strength.
    orthogonal_to : sequence of str
        Directions whose scores the edit must leave unchanged: each edited
        direction is disentangled from them on the fly (and re-calibrated).

    Returns
    -------
    numpy.ndarray
        Shape ``(k,)``, float64.
    """
    if not strengths:
        raise DirectionError("no edit given", hint="name a direction and a strength")
    P = _require_fitted(space)
    delta = np.zeros(P.shape[1])
    for name, raw in strengths.items():
        s = check_strength(raw, name)
        d = get_direction(space, name)
        vec, std = np.asarray(d.vector, dtype=np.float64), float(d.proj_std)
        keep = [o for o in orthogonal_to if o != name]
        if keep:
            vec = disentangle(vec, [_readout(get_direction(space, o)) for o in keep])
            std = calibrate(P, vec)[1]
        delta += s * std * vec
    return delta


def _edit_record(
    strengths: Mapping[str, Any], keep_residual: bool, orthogonal_to: Sequence[str]
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "strengths": {k: float(v) for k, v in strengths.items()},
        "keep_residual": bool(keep_residual),
        "unit": "std of training projections",
    }
    if orthogonal_to:
        rec["orthogonal_to"] = list(orthogonal_to)
    return rec


def _with_edit_metadata(adapter: Adapter, record: dict[str, Any]) -> Adapter:
    history: list[Any] = []
    prev = adapter.metadata.get(EDIT_METADATA_KEY)
    if prev:
        try:
            loaded = json.loads(prev)
            history = loaded if isinstance(loaded, list) else [loaded]
        except ValueError:
            history = []
    history.append(record)
    return adapter.with_metadata({EDIT_METADATA_KEY: json.dumps(history)})


#: Metadata key holding the list of edits applied to an adapter (JSON).
EDIT_METADATA_KEY = "w2wkit.edits"


def edit(
    space: WeightSpace,
    adapter: Adapter | None,
    strengths: Mapping[str, float],
    *,
    keep_residual: bool = True,
    rank: int | None = None,
    orthogonal_to: Sequence[str] = (),
    energy: float | None = None,
) -> Adapter:
    """Edit a model along named directions with calibrated strengths.

    Parameters
    ----------
    space : WeightSpace
        A fitted space holding the directions.
    adapter : Adapter or None
        The model to edit; ``None`` edits the space's mean model
        (coefficients ``coef_mean_``).
    strengths : mapping of str to float
        ``{"age": 1.5, "beard": -1.0}``; 1.0 = one standard deviation of
        the training models' projections on that direction. Numbers only
        (see :func:`check_strength`); text is parsed by the caller.
    keep_residual : bool
        Keep the part of the model outside the space (default); ``False``
        projects it onto the space first.
    rank : int, optional
        Output rank per layer (``delta`` representation only).
    orthogonal_to : sequence of str
        Directions whose scores must not change (see :func:`edit_delta`).
    energy : float, optional
        ``delta`` representation only: per layer, the smallest output rank
        that keeps this fraction of the edited layer's squared norm (``rank``
        caps it); e.g. 0.999 makes the edit nearly exact at a chosen cost.

    Returns
    -------
    Adapter
        The edited adapter; ``metadata["w2wkit.edits"]`` is a JSON list of
        the edits applied so far (this one appended).
    """
    delta = edit_delta(space, strengths, orthogonal_to=orthogonal_to)
    record = _edit_record(strengths, keep_residual, orthogonal_to)
    # overflow is checked on the result (_check_finite_edit), not warned about
    with np.errstate(over="ignore", invalid="ignore"):
        if adapter is None:
            base = np.asarray(getattr(space, "coef_mean_", np.zeros_like(delta)), dtype=np.float64)
            out = space.inverse_transform((base + delta)[None, :], rank=rank, energy=energy)[0]
            record["input"] = "mean model"
        else:
            out = space.shift(adapter, delta, keep_residual=keep_residual, rank=rank, energy=energy)
    if adapter is not None:
        if adapter.metadata.get(EDIT_METADATA_KEY) and not out.metadata.get(EDIT_METADATA_KEY):
            out = out.with_metadata({EDIT_METADATA_KEY: adapter.metadata[EDIT_METADATA_KEY]})
    _check_finite_edit(out, strengths)
    return _with_edit_metadata(out, record)
