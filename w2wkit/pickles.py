"""The one way w2wkit loads a torch pickle: as tensors, never running its code.

Every pickle (``.pt``/``.pth``/``.ckpt``/``.bin`` LoRA files behind
``allow_pickle``, the weights2weights release) goes through
:func:`load_tensors`, which is ``torch.load(weights_only=True)`` on a regular
file, with an optional exact allow-list of extra classes. There is no unsafe
fallback. A refusal is one :class:`~w2wkit.errors.FormatError` that names the
file and the objects the pickle refers to (listed without running it).
"""

from __future__ import annotations

import importlib
import os
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from w2wkit.errors import FormatError

__all__ = ["load_tensors", "resolve_globals", "unsafe_globals"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def unsafe_globals(path: str | os.PathLike[str]) -> list[str]:
    """The globals a torch pickle names beyond torch's own safe set (read, never run).

    Parameters
    ----------
    path : path-like
        A torch checkpoint (zip format; the legacy format gives ``[]``).

    Returns
    -------
    list of str
        Dotted names such as ``"builtins.exec"``.
    """
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path)))
    except Exception:  # not a zip checkpoint, or not readable at all
        return []


def resolve_globals(names: Iterable[str]) -> list[Any]:
    """The objects behind dotted ``names`` (import the module, then the attribute).

    Raises
    ------
    ImportError, AttributeError
        When a module or attribute does not exist here.
    """
    out = []
    for name in names:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


def load_tensors(
    path: str | os.PathLike[str],
    *,
    mmap: bool = False,
    allowed: Iterable[Any] = (),
    what: str = "pickle",
) -> Any:
    """Load a torch pickle with ``weights_only=True`` (tensors, numbers, strings, containers).

    Parameters
    ----------
    path : path-like
        The pickle; it must be a regular file (FIFOs and devices are refused
        before opening).
    mmap : bool
        Memory-map the tensors (zip checkpoints; others are read whole).
    allowed : iterable
        Extra classes/functions the pickle may name, allowed by identity
        (``torch.serialization.safe_globals``). Keep it to exact, known-harmless
        rebuild helpers.
    what : str
        What the file is, for the message.

    Returns
    -------
    object
        What the pickle holds.

    Raises
    ------
    FormatError
        Naming the file and, when it names code, the objects it names.
    """
    import torch  # lazy: pickles are an explicit opt-in

    from w2wkit.stio import check_regular_file

    check_regular_file(path, what=what)
    allowed = list(allowed)
    # only zip checkpoints can be memory-mapped; legacy pickles are read whole
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for bad or unsafe pickles
        reason = " ".join(_ANSI.sub("", str(exc)).split())
        named = unsafe_globals(path) or sorted(set(re.findall(r"GLOBAL ([\w.]+)", reason)))
        if named:
            reason = f"it names code objects ({', '.join(named[:4])})"
        elif "Weights only load failed" in reason:
            reason = "it holds objects other than tensors, numbers, strings and containers"
        raise FormatError(
            f"cannot load safely as tensors (weights_only=True): {reason[:200]}",
            path=Path(path),
            hint="w2wkit never loads pickles unsafely",
        ) from None
