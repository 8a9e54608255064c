"""Rules of the evaluation's edits: disentanglement and which models an edit suits.

An edit is made orthogonal to the directions of correlated attributes
(:func:`correlated_attributes`, :func:`edit_disentangled`), and only models
for which the attribute is plausible are edited (:func:`excluded_by`,
:func:`plausible`: no beards on women when the zoo shows none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["correlated_attributes", "edit_disentangled", "excluded_by", "plausible"]


def edit_disentangled(
    space: Any,
    adapter: Any,
    attr: str,
    strength: float,
    others: list[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
) -> tuple[Any, list[str]]:
    """Edit orthogonal to ``others`` (most correlated first); drop the weakest if needed.

    Parameters
    ----------
    space : WeightSpace
        With a direction named ``attr`` (and those of ``others``).
    adapter : Adapter
        The model to edit.
    attr : str
    strength : float
        In training standard deviations along the direction.
    others : list of str
        Directions to stay orthogonal to, most important first; only the first
        ``n_components - 2`` are tried, and the last is dropped while the
        projection is degenerate.
    rank, energy : int or float or None
        The written layers of a delta space (see
        :meth:`w2wkit.space.WeightSpace.edit`); ignored (``None``) for factors.

    Returns
    -------
    (Adapter, list of str)
        The edited model and the directions it was made orthogonal to.
    """
    from w2wkit.errors import DirectionError

    keep = list(others)[: max(0, int(space.n_components_) - 2)]
    while True:
        try:
            edited = space.edit(
                adapter, {attr: strength}, orthogonal_to=keep, rank=rank, energy=energy
            )
            return edited, keep
        except DirectionError:
            if not keep:
                raise
            keep = keep[:-1]


def correlated_attributes(
    labels: dict[str, np.ndarray], target: str, threshold: float, available: Sequence[str]
) -> list[str]:
    """Attributes whose labels correlate with ``target``'s, most correlated first.

    Parameters
    ----------
    labels : dict of str to numpy.ndarray
        ``attribute -> (N,)`` labels of the zoo (NaN: unknown).
    target : str
    threshold : float
        Minimum absolute Pearson correlation.
    available : sequence of str
        Candidates (e.g. the space's directions); those without labels, or
        with fewer than 3 jointly known or constant labels, are skipped.

    Returns
    -------
    list of str
    """
    y = labels[target]
    out = []
    for a in available:
        if a == target or a not in labels:
            continue
        x = labels[a]
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3 or x[ok].std() == 0 or y[ok].std() == 0:
            continue
        r = abs(np.corrcoef(x[ok], y[ok])[0, 1])
        if r >= threshold:
            out.append((r, a))
    return [a for _, a in sorted(out, key=lambda t: -t[0])]


def excluded_by(
    labels: dict[str, np.ndarray], target: str, rate: float = 0.01, support: int = 20
) -> dict[str, float]:
    """Attribute values under which ``target`` (almost) never occurs in the zoo.

    ``{attribute: value}`` for every binary attribute whose value ``v`` is held by
    at least ``support`` zoo models of which at most ``rate`` have ``target``:
    e.g. ``{"male": 0.0, "lipstick": 1.0}`` for ``beard`` when no woman in the
    zoo has a beard. Adding ``target`` to such a model asks for a combination
    the models never show, so edits are calibrated and measured on the other
    models (see ``EvalSettings.edit_plausible``).
    """
    y = labels[target]
    out: dict[str, float] = {}
    for a, x in labels.items():
        if a == target:
            continue
        ok = np.isfinite(x) & np.isfinite(y)
        for v in (0.0, 1.0):
            sel = ok & (x == v)
            if sel.sum() >= support and float(np.mean(y[sel] == 1)) <= rate:
                out[a] = v
    return out


def plausible(attrs: dict[str, Any], excluded: dict[str, float]) -> bool:
    """False when an identity's attributes hold one of the ``excluded`` values.

    Parameters
    ----------
    attrs : dict of str to bool
        An instance's attributes.
    excluded : dict of str to float
        From :func:`excluded_by`.

    Returns
    -------
    bool
    """
    return not any(a in attrs and float(bool(attrs[a])) == v for a, v in excluded.items())
