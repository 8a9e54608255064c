"""Attribute labels of the models of a collection (CSV or JSON).

Accepted files
--------------
CSV
    A header row; the model is named by the column called ``file`` or
    ``name`` (else the first column); every other column is an attribute.
JSON
    Either ``{"model": {"attr": value, ...}, ...}`` or a list of records
    ``[{"file": "model.safetensors", "attr": value, ...}, ...]``.

A model is matched by its manifest name (``sub/model``), by its file name
(``model.safetensors``) or by its stem (``model``). Values may be finite
numbers, booleans (``true/false``, ``yes/no``) or missing, which become NaN:
an empty cell or one of ``NA``, ``nan``, ``n/a``, ``none``, ``null``, ``?``,
``-`` (any case), or JSON ``null``. Models without a row get NaN.

Refused, with one :class:`~w2wkit.errors.DirectionError` naming the file,
the row or column and the value: infinite values (``inf``, ``1e400``), a
column (CSV) or key (JSON) given twice, a row naming a model the collection
does not have, a model labelled twice, JSON that is not strict (``NaN``
literals, nesting deeper than 64 levels).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.errors import DirectionError

__all__ = ["read_labels"]

_MISSING = {"", "na", "nan", "n/a", "none", "null", "?", "-"}
_TRUE = {"true", "yes", "y"}
_FALSE = {"false", "no", "n"}
_ID_COLUMNS = ("file", "name", "model", "filename", "path")
_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def _value(raw: Any, row: str, column: str, path: str) -> float:
    if raw is None:
        return math.nan
    if isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, int | float):
        return _finite_label(float(raw), raw, row, column, path)
    if isinstance(raw, dict | list):
        raise DirectionError(
            f"non-numeric label value {raw!r} in row {row!r}, column {column!r}"[:200], path=path
        )
    text = str(raw).strip()
    low = text.lower()
    if low in _MISSING:
        return math.nan
    if low in _TRUE:
        return 1.0
    if low in _FALSE:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise DirectionError(
            f"non-numeric label value {text!r} in row {row!r}, column {column!r}",
            path=path,
        ) from None
    return _finite_label(value, text, row, column, path)


def _finite_label(value: float, raw: object, row: object, column: str, path: object) -> float:
    """``value``, or one error naming the row, column and the value as written."""
    if not math.isfinite(value):
        raise DirectionError(
            f"label value {raw!r} in row {row!r}, column {column!r} is not finite",
            path=path,
            hint="write a missing value as an empty cell, NA or null",
        )
    return value


def _strip(key: str) -> str:
    key = key.replace("\\", "/").rstrip("/")
    for suf in _SUFFIXES:
        if key.lower().endswith(suf):
            return key[: -len(suf)]
    return key


def _matcher(names: list[str]) -> dict[str, int]:
    """Lookup table: full name, basename and stem -> row (ambiguous ones dropped)."""
    table: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i, name in enumerate(names):
        full = _strip(name)
        base = full.rsplit("/", 1)[-1]
        for key in {name, full, base}:
            if key in table and table[key] != i:
                ambiguous.add(key)
            table[key] = i
    for key in ambiguous:
        if key not in names:
            del table[key]
    return table


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    text_path = str(path)
    if path.suffix.lower() == ".json":
        data = _read_label_json(path)
        if isinstance(data, dict):
            out = []
            for key, val in data.items():
                if not isinstance(val, dict):
                    raise DirectionError(
                        f"entry {key!r} is not an object of attribute values", path=text_path
                    )
                out.append((str(key), val))
            return out
        if isinstance(data, list):
            out = []
            for j, rec in enumerate(data):
                if not isinstance(rec, dict):
                    raise DirectionError(f"record {j} is not an object", path=text_path)
                id_key = next((c for c in _ID_COLUMNS if c in rec), None)
                if id_key is None:
                    raise DirectionError(
                        f"record {j} has no 'file' or 'name' field", path=text_path
                    )
                rest = {k: v for k, v in rec.items() if k != id_key}
                out.append((str(rec[id_key]), rest))
            return out
        raise DirectionError("label JSON must be an object or a list of records", path=text_path)
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise DirectionError(f"cannot read label CSV: {exc}", path=text_path) from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise DirectionError("label CSV needs a header row and at least one row", path=text_path)
    header = [h.strip() for h in rows[0]]
    first: dict[str, int] = {}
    for c, h in enumerate(header, start=1):
        if h in first:
            raise DirectionError(
                f"column {h!r} appears twice in the header (columns {first[h]} and {c})",
                path=text_path,
                hint="rename or remove one of them",
            )
        first[h] = c
    low = [h.lower() for h in header]
    id_col = next((low.index(c) for c in _ID_COLUMNS if c in low), 0)
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DirectionError(
                f"row {line} has {len(row)} fields, header has {len(header)}", path=text_path
            )
        rec = {header[c]: row[c] for c in range(len(header)) if c != id_col}
        out.append((row[id_col].strip(), rec))
    return out


def _read_label_json(path: Path) -> Any:
    """The parsed label JSON: strict (see :mod:`w2wkit.jsonio`), no key given twice."""
    from w2wkit.jsonio import read_json

    return read_json(path, what="label JSON", error=DirectionError, expect=None, unique_keys=True)


def read_labels(path: str | os.PathLike[str], names: list[str]) -> dict[str, np.ndarray]:
    """Read per-model attribute labels.

    Parameters
    ----------
    path : str or os.PathLike
        CSV or JSON file (see the module docstring).
    names : list of str
        Manifest names (or file paths) of the ``N`` models, in row order.

    Returns
    -------
    dict of str to numpy.ndarray
        ``attribute -> (N,)`` float64, NaN where missing.

    Raises
    ------
    DirectionError
        For an unreadable file, rows naming unknown models (listed), no
        overlap with the collection, or a non-numeric value (row and column
        named).
    """
    p = Path(path)
    if not p.is_file():
        raise DirectionError("label file not found", path=p)
    records = _records(p)
    table = _matcher(list(names))
    unknown = [key for key, _ in records if _strip(key) not in table and key not in table]
    if unknown and len(unknown) == len(records):
        raise DirectionError(
            f"no label row names a model of the collection (first rows: {', '.join(unknown[:3])})",
            path=p,
        )
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" +{len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DirectionError(
            f"{len(unknown)} label row(s) name models not in the collection: {shown}", path=p
        )
    attrs: list[str] = []
    for _, rec in records:
        for a in rec:
            if a not in attrs:
                attrs.append(a)
    if not attrs:
        raise DirectionError("label file has no attribute columns", path=p)
    out = {a: np.full(len(names), np.nan) for a in attrs}
    seen: dict[int, str] = {}
    for key, rec in records:
        row = table.get(key, table.get(_strip(key)))
        assert row is not None
        if row in seen:
            raise DirectionError(
                f"model {names[row]!r} is labelled twice (rows {seen[row]!r} and {key!r})", path=p
            )
        seen[row] = key
        for a, raw in rec.items():
            out[a][row] = _value(raw, key, a, str(p))
    return out
