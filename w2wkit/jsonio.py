"""Strict reading of the JSON files and JSON strings w2wkit is handed.

Every JSON text w2wkit reads from a user (safetensors headers and metadata,
PEFT configs, label files, ``space.json``, the world's manifest) goes through
:func:`parse_json`, which turns every way such a text can be wrong into one
:class:`~w2wkit.errors.W2WError` naming the file:

- not UTF-8, not JSON, or nested deeper than :data:`MAX_DEPTH`;
- ``NaN``/``Infinity`` literals, or numbers that overflow a float (``1e400``);
- a value of the wrong type where the caller expects a type (:func:`field`,
  :func:`as_int`, :func:`as_float`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from w2wkit.errors import W2WError

__all__ = [
    "MAX_DEPTH",
    "as_float",
    "as_int",
    "depth",
    "field",
    "parse_json",
    "read_json",
    "reject_constant",
]

#: Deepest nesting of arrays/objects accepted; no file w2wkit reads comes near it.
MAX_DEPTH = 64


def reject_constant(name: str) -> Any:
    """``parse_constant`` hook of :func:`json.loads`: refuse ``NaN``/``Infinity``."""
    raise ValueError(f"the non-standard number {name} is not accepted")


def _nan_as_none(name: str) -> Any:
    return None if name == "NaN" else reject_constant(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} does not fit a float")
    return value


class _RepeatedKey(ValueError):
    pass


def _unique_pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in items:
        if k in out:
            raise _RepeatedKey(k)
        out[k] = v
    return out


def depth(obj: Any) -> int:
    """Nesting depth of ``obj`` (iterative, so no recursion limit is hit)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in item)
    return deepest


def parse_json(
    text: str | bytes,
    *,
    path: str | os.PathLike[str] | None = None,
    what: str = "JSON",
    error: type[W2WError] = W2WError,
    key: str | None = None,
    unique_keys: bool = False,
    nan_as_null: bool = False,
) -> Any:
    """Parse ``text`` strictly; every failure is one ``error`` naming ``path``.

    Parameters
    ----------
    text : str or bytes
        The JSON text (bytes must be UTF-8).
    path : path-like, optional
        The file the text came from, for the message.
    what : str
        What the text is ("safetensors header", "space.json"), for the message.
    error : type of W2WError
        The error class raised.
    key : str, optional
        The metadata key the text came from, for the message.
    unique_keys : bool
        Refuse an object that gives one key twice (``json`` keeps the last).
    nan_as_null : bool
        Read a ``NaN`` literal as ``None`` (how ``json.dumps`` writes an
        undefined float); ``Infinity`` is refused all the same.

    Returns
    -------
    object
        The parsed value; floats are finite.

    Raises
    ------
    W2WError
        (of class ``error``) for text that is not strict, finite JSON of at most
        :data:`MAX_DEPTH` levels.
    """
    try:
        if isinstance(text, bytes | bytearray | memoryview):
            text = bytes(text).decode("utf-8")
        hook = _unique_pairs if unique_keys else None
        constant = _nan_as_none if nan_as_null else reject_constant
        obj = json.loads(
            text, parse_constant=constant, parse_float=_finite_float, object_pairs_hook=hook
        )
    except _RepeatedKey as exc:
        raise error(
            f"{what} gives the key {exc.args[0]!r} twice in one object", path=path, key=key
        ) from None
    except UnicodeDecodeError:
        raise error(f"{what} is not UTF-8 text", path=path, key=key) from None
    except RecursionError:
        raise error(f"{what} is nested too deeply", path=path, key=key) from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise error(f"{what} is not valid JSON ({exc})", path=path, key=key) from None
    if depth(obj) > MAX_DEPTH:
        raise error(f"{what} is nested more than {MAX_DEPTH} levels deep", path=path, key=key)
    return obj


def read_json(
    path: str | os.PathLike[str],
    *,
    what: str | None = None,
    error: type[W2WError] = W2WError,
    expect: type | None = dict,
    unique_keys: bool = False,
    nan_as_null: bool = False,
) -> Any:
    """Read and strictly parse the JSON file ``path``.

    Parameters
    ----------
    path : path-like
        The file.
    what : str, optional
        What the file is, for messages (default: its name).
    error : type of W2WError
        The error class raised.
    expect : type or None
        The type the top-level value must have (default: an object).
    unique_keys : bool
        Refuse an object that gives one key twice.
    nan_as_null : bool
        Read ``NaN`` literals as ``None`` (see :func:`parse_json`).

    Returns
    -------
    object
    """
    path = Path(path)
    what = what or path.name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} is missing", path=path) from None
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}", path=path) from None
    obj = parse_json(
        raw, path=path, what=what, error=error, unique_keys=unique_keys, nan_as_null=nan_as_null
    )
    if expect is not None and not isinstance(obj, expect):
        kind = "a JSON object" if expect is dict else f"a JSON {expect.__name__}"
        raise error(f"{what} is not {kind}", path=path)
    return obj


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "an object",
    list: "a list",
}


def field(
    obj: dict,
    key: str,
    types: type | tuple[type, ...],
    *,
    path: str | os.PathLike[str] | None = None,
    error: type[W2WError] = W2WError,
    default: Any = ...,
) -> Any:
    """``obj[key]`` checked to be of ``types``; a missing key gives ``default``.

    ``bool`` never passes for ``int`` or ``float``, and an ``int`` passes for
    ``float``.
    """
    if key not in obj:
        if default is ...:
            raise error("missing field", path=path, key=key)
        return default
    value = obj[key]
    want = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, want) and not (isinstance(value, bool) and bool not in want)
    if not ok and float in want and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in want)
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise error(f"must be {names}, got {shown}", path=path, key=key)
    return value


def as_int(
    value: Any,
    *,
    path: str | os.PathLike[str] | None = None,
    key: str | None = None,
    error: type[W2WError] = W2WError,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """``value`` as an ``int`` within ``[minimum, maximum]``; one error otherwise.

    Integral floats (``4.0``) and decimal strings (``"4"``) are accepted;
    booleans, infinities and fractions are not.
    """
    out: int | None = None
    if isinstance(value, bool):
        out = None
    elif isinstance(value, int):
        out = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        out = int(value)
    elif isinstance(value, str):
        try:
            out = int(value.strip())
        except ValueError:
            out = None
    if out is None:
        raise error(f"expected an integer, got {value!r}"[:120], path=path, key=key)
    if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        lo = "" if minimum is None else f">= {minimum}"
        hi = "" if maximum is None else f"<= {maximum}"
        rng = " and ".join(p for p in (lo, hi) if p)
        raise error(f"expected an integer {rng}, got {out}", path=path, key=key)
    return out


def as_float(
    value: Any,
    *,
    path: str | os.PathLike[str] | None = None,
    key: str | None = None,
    error: type[W2WError] = W2WError,
) -> float:
    """``value`` as a finite ``float``; one error otherwise (booleans refused)."""
    out: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            out = None
    if out is None or not math.isfinite(out):
        raise error(f"expected a finite number, got {value!r}"[:120], path=path, key=key)
    return out
