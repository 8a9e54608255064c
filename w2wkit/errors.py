"""Errors raised by w2wkit.

Every error a user can cause (a bad file, a bad key, a bad value) is a
:class:`W2WError`. Its ``str()`` is one line that names the file, the key and
the value involved, so the CLI can print it as is and exit non-zero without a
traceback.
"""

from __future__ import annotations

import os

__all__ = [
    "OUTPUT_EXISTS",
    "DirectionError",
    "FormatError",
    "LayoutError",
    "SpaceError",
    "W2WError",
]


class W2WError(Exception):
    """Base class of every user-facing w2wkit error.

    Parameters
    ----------
    message : str
        What went wrong, in one sentence.
    path : str or os.PathLike, optional
        The file or folder concerned.
    key : str, optional
        The tensor key, module path or field concerned.
    hint : str, optional
        What the user can do about it.
    param : str, optional
        The API parameter at fault; the message then says "parameter NAME",
        which the command line rewrites to the flag that sets it.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        key: str | None = None,
        hint: str | None = None,
        param: str | None = None,
    ) -> None:
        self.message = message
        self.param = param
        self.path = None if path is None else os.fspath(path)
        self.key = key
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(str(self.path))
        if self.param is not None:
            parts.append(f"parameter {self.param}")
        if self.key is not None:
            parts.append(f"key '{self.key}'")
        text = ": ".join([*parts, self.message]) if parts else self.message
        if self.hint:
            text = f"{text} ({self.hint})"
        return " ".join(text.split("\n"))


class FormatError(W2WError):
    """A LoRA file cannot be read or written in the requested format."""


class LayoutError(W2WError):
    """Adapters do not share the layout a computation needs."""


class SpaceError(W2WError):
    """A weight space cannot be fitted, loaded or used as asked."""


class DirectionError(W2WError):
    """A direction, a label file or an edit request is invalid."""


#: The message of every refusal to replace an existing output (the CLI names ``--force``).
OUTPUT_EXISTS = "output exists (pass `overwrite=True` to replace it)"
