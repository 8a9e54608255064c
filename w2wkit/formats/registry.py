"""Format registry: detection, reading and writing of LoRA files.

The formats are an explicit list (``w2wkit.formats._builtin.BUILTIN_FORMATS``),
plus what installed packages declare in the ``w2wkit.formats`` entry-point
group, plus :func:`register_format` at run time; :data:`FORMATS` fills itself
on first read, and importing a format module registers nothing. A format
answers three questions about a :class:`Source` (the parsed file, see
:mod:`w2wkit.formats.base`): ``sniff`` (how sure it is that the keys are its
own, 0..1), ``read`` (the canonical :class:`Adapter`) and, for writable
formats, ``write``. Formats translate keys with tables of
patterns (see :mod:`w2wkit.names`), never with chains of string replaces.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.adapter import COMPONENTS, Adapter
from w2wkit.errors import OUTPUT_EXISTS, FormatError
from w2wkit.stio import (
    NarrowingError,
    check_regular_file,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "FORMATS",
    "LoraFormat",
    "Source",
    "WriteOptions",
    "detect_format",
    "discover_lora_files",
    "load_source",
    "provenance_metadata",
    "read_adapter",
    "register_format",
    "write_adapter",
]

from w2wkit.formats.base import (  # re-exported: the registry's public types
    LORA_SUFFIXES,
    PEFT_CONFIG,
    LoraFormat,
    Source,
    WriteOptions,
    component_subfolders,
    load_source,
)


#: Every known format by name: the built-in list, the ``w2wkit.formats`` entry
#: points of installed packages, and formats registered at run time. Filled on
#: first use (:func:`_ensure_loaded`); importing a format module registers nothing.
class _Formats(dict):
    """A dict that fills itself (:func:`_ensure_loaded`) before its first read."""

    def _filled(self) -> _Formats:
        _ensure_loaded()
        return self

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self._filled(), key)

    def __getitem__(self, key: str) -> LoraFormat:
        return dict.__getitem__(self._filled(), key)

    def __iter__(self):  # type: ignore[override]
        return dict.__iter__(self._filled())

    def __len__(self) -> int:
        return dict.__len__(self._filled())

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self._filled(), key, default)

    def items(self):  # type: ignore[override]
        return dict.items(self._filled())

    def keys(self):  # type: ignore[override]
        return dict.keys(self._filled())

    def values(self):  # type: ignore[override]
        return dict.values(self._filled())


FORMATS: dict[str, LoraFormat] = _Formats()

#: Entry-point group through which other packages add formats (a class or instance).
ENTRY_POINT_GROUP = "w2wkit.formats"


def register_format(fmt: type | LoraFormat) -> type | LoraFormat:
    """Add a format (a class, instantiated, or an instance) under its ``name``.

    Usable as a class decorator by third-party code; the built-in formats are
    an explicit list instead (``w2wkit.formats._builtin.BUILTIN_FORMATS``).
    """
    _ensure_loaded()
    FORMATS[fmt.name] = fmt() if isinstance(fmt, type) else fmt
    _DETECTED.clear()
    return fmt


# Detection depends only on the key names and on whether a PEFT config came
# with them (the sniff contract), so files of one collection, which share
# their keys, are sniffed once.
_DETECTED: dict[tuple[bool, tuple[str, ...]], str] = {}
_DETECTED_MAX = 256


_LOADED = False


def _ensure_loaded() -> None:
    """Fill :data:`FORMATS` once: the built-in list, then installed entry points."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from w2wkit.formats._builtin import BUILTIN_FORMATS

    for fmt in BUILTIN_FORMATS:
        dict.setdefault(FORMATS, fmt.name, fmt)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            fmt = obj() if isinstance(obj, type) else obj
            name = str(fmt.name)
        except Exception as exc:  # a broken third-party package must not break reading
            import warnings

            warnings.warn(
                f"LoRA format entry point {ep.name!r} ({ep.value}) failed to load: {exc}",
                stacklevel=2,
            )
            continue
        dict.setdefault(FORMATS, name, fmt)
    _DETECTED.clear()


def detect_format(src: Source) -> str:
    """Name of the registered format most confident about ``src``.

    Raises
    ------
    FormatError
        When no format recognises the keys (the message shows one key).
    """
    _ensure_loaded()
    signature = (src.config is None, tuple(src.tensors))
    known = _DETECTED.get(signature)
    if known is not None:
        return known
    scores = {name: fmt.sniff(src) for name, fmt in FORMATS.items()}
    best = max(scores, key=lambda n: scores[n])
    if scores[best] <= 0:
        sample = next(iter(src.tensors))
        raise FormatError(
            "unknown LoRA key scheme (not kohya, diffusers, PEFT, attention-processor or LyCORIS)",
            path=src.path,
            key=sample,
        )
    if len(_DETECTED) >= _DETECTED_MAX:
        _DETECTED.clear()
    _DETECTED[signature] = best
    return best


def read_adapter(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    allow_pickle: bool = False,
    validate: bool = True,
) -> Adapter:
    """Read a LoRA file or PEFT folder into the canonical :class:`Adapter`.

    Parameters
    ----------
    path : str or os.PathLike
        File or PEFT folder.
    format : str, optional
        Force a format by name (see :data:`FORMATS`); default auto-detects.
    allow_pickle : bool
        Permit pickle files.
    validate : bool
        Check shapes and finiteness (default).

    Returns
    -------
    Adapter

    Raises
    ------
    FormatError
        Naming the file for anything wrong with it, including running out of
        memory while reading it.
    """
    _ensure_loaded()
    try:
        src = load_source(path, allow_pickle=allow_pickle)
        name = format or detect_format(src)
        if name not in FORMATS:
            raise FormatError(f"unknown format {name!r}; known: {', '.join(sorted(FORMATS))}")
        if validate:
            check_finite(src)
        adapter = FORMATS[name].read(src)
        adapter.source = src.path
        adapter.format = name
        return adapter.validate(check_finite=False) if validate else adapter
    except MemoryError:
        raise FormatError(
            "out of memory while reading this file", path=path, hint="free memory or read fewer"
        ) from None


def check_finite(src: Source) -> None:
    """Reject NaN/Inf in any floating tensor of ``src``, naming the file's key.

    Raises
    ------
    FormatError
        Naming the file and the first offending key.
    """
    if src.all_finite():  # one pass over the data section; per key only on failure
        return
    for key, arr in src.tensors.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = "NaN" if np.isnan(arr).any() else "Inf"
            raise FormatError(f"tensor contains {bad} values", path=src.path, key=key)


def provenance_metadata(made_by: str, inputs: Iterable[str] = (), **extra: Any) -> dict[str, str]:
    """Metadata entries recording what made a file.

    Parameters
    ----------
    made_by : str
        The command or function, e.g. ``"w2wkit convert"``.
    inputs : iterable of str
        Files the output was made from.
    **extra
        More ``w2wkit.*`` entries (JSON-encoded when not strings).

    Returns
    -------
    dict of str to str
    """
    from w2wkit import __version__

    meta = {
        "w2wkit.version": __version__,
        "w2wkit.made_by": made_by,
        "w2wkit.inputs": json.dumps([os.path.basename(str(i)) for i in inputs]),
    }
    for k, v in extra.items():
        meta[f"w2wkit.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return meta


def writable_formats() -> list[str]:
    """Names of the formats w2wkit can write (built-in and registered), sorted."""
    _ensure_loaded()
    return sorted(n for n, f in FORMATS.items() if f.writable)


def write_adapter(
    adapter: Adapter,
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    provenance: dict[str, str] | None = None,
    target: str | None = None,
    keep_alphas: bool | None = None,
    warn: Any = None,
) -> Path:
    """Write an adapter in a writable format, atomically.

    Parameters
    ----------
    adapter : Adapter
        What to write.
    path : str or os.PathLike
        Output file (kohya, diffusers) or folder (peft).
    format : str, optional
        ``"kohya"``, ``"diffusers"`` or ``"peft"``; default the format
        ``target``'s loader reads completely (see
        :data:`w2wkit.formats.targets.TARGETS`), else ``"kohya"``.
    target : str, optional
        The loader the file is for: ``"comfyui"``, ``"a1111"``,
        ``"kohya-scripts"``, ``"diffusers"`` or ``"peft"``. Picks the format;
        when ``format`` is also given and that loader reads it only in part,
        ``warn`` is called with one line naming the loader and the modules.
    keep_alphas : bool, optional
        kohya output only. ``False`` folds per-module alphas into the factors
        (every layer gets the most common alpha; the deltas are unchanged),
        which diffusers' kohya converter would otherwise mis-scale; ``True``
        writes each module's own alpha. Default: fold when ``target`` is
        given, keep otherwise. ``warn`` is told when layers were folded.
    warn : callable, optional
        ``warn(message)`` for the notes above; default :func:`warnings.warn`.
    dtype : str, optional
        Storage dtype override (``"F32"``, ``"F16"``, ``"BF16"``).
    overwrite : bool
        Replace an existing output.
    provenance : dict of str to str, optional
        Metadata recording what made the file (see
        :func:`provenance_metadata`).

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    FormatError
        For an unknown format, an existing output, or a layer the format
        cannot hold; :class:`~w2wkit.stio.NarrowingError` (``param="dtype"``)
        for a value the storage dtype would hold as Inf. Nothing is written.
    """
    _ensure_loaded()
    from w2wkit.formats.targets import LOADERS, fold_alphas, loader_gaps, target_format

    if warn is None:
        import warnings

        def warn(message: str) -> None:
            warnings.warn(message, stacklevel=3)

    if format is None:
        format = target_format(target) if target is not None else "kohya"
    elif target is not None:
        target_format(target)  # an unknown target fails before anything is written
    fmt = FORMATS.get(format)
    if fmt is None or not fmt.writable:
        writable = writable_formats()
        raise FormatError(f"cannot write format {format!r}; writable: {', '.join(writable)}")
    out = Path(path)
    if out.exists() and not overwrite:
        raise FormatError(OUTPUT_EXISTS, path=out)
    notes: list[str] = []  # said once the file is written
    folded = 0
    if format == "kohya" and (not keep_alphas if keep_alphas is not None else target is not None):
        adapter, folded = fold_alphas(adapter)
        if folded:
            notes.append(
                f"{folded} of {len(adapter)} modules had an alpha other than the most common "
                f"one; folded into their up factors (deltas unchanged) so that "
                f"{LOADERS['diffusers']} applies them like every other loader "
                "(keep them with `keep_alphas=True`)"
            )
    if target is not None:
        notes += [gap.message(format) for gap in loader_gaps(adapter, format, target)]
    try:
        fmt.write(adapter, out, WriteOptions(dtype, overwrite, dict(provenance or {})))
    except NarrowingError as exc:
        why = (
            "both factors of a layer are stored in its down factor's dtype"
            if dtype is None
            else f"parameter dtype is {dtype}"
        )
        also = " (or keep the per-module alphas, `keep_alphas=True`)" if folded else ""
        raise NarrowingError(
            exc.message,
            path=exc.path,
            key=exc.key,
            param="dtype",
            hint=f"{why}; choose a wider storage dtype, e.g. F32{also}",
        ) from None
    for note in notes:
        warn(note)
    return out


def discover_lora_files(
    path: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    allow_pickle: bool = False,
    pattern: str | None = None,
) -> list[Path]:
    """Find LoRA files: a folder (recursively), a glob, a file or a list.

    PEFT folders (holding ``adapter_config.json``) count as one adapter.

    Returns
    -------
    list of pathlib.Path
        Sorted by path.

    Raises
    ------
    FormatError
        When nothing is found.
    """
    suffixes = LORA_SUFFIXES if allow_pickle else (".safetensors",)
    if not isinstance(path, str | os.PathLike):
        found = [Path(p) for p in path]
        if not found:
            raise FormatError("empty list of LoRA files")
        return found
    p = Path(path)
    if p.is_file():
        return [p]
    if p.exists() and not p.is_dir():
        check_regular_file(p)  # a FIFO, device or socket: refused, never opened
    if not p.exists():
        import glob

        hits = sorted(Path(h) for h in glob.glob(str(p), recursive=True))
        if not hits:
            raise FormatError("no such file, folder or glob match", path=p)
        return hits
    if (p / PEFT_CONFIG).is_file() or component_subfolders(p):
        return [p]
    found = []
    peft_dirs = {c.parent for c in p.rglob(PEFT_CONFIG)}
    # a component subfolder (``out/text_encoder``) of a PEFT folder is part of it, and
    # component folders side by side with no adapter above them (``run/unet``,
    # ``run/text_encoder``: the training layout) are one adapter, their parent
    nested = {d for d in peft_dirs if d.name in COMPONENTS}
    layouts = {d.parent for d in nested if d.parent not in peft_dirs}
    for d in sorted((peft_dirs - nested) | layouts):
        found.append(d)
    for f in sorted(p.rglob(pattern or "*")):
        if f.is_file() and f.suffix.lower() in suffixes and f.parent not in peft_dirs:
            if f.name.startswith("."):
                continue
            found.append(f)
    if not found:
        raise FormatError(
            f"folder holds no LoRA files ({', '.join(suffixes)} or PEFT folders)", path=p
        )
    return sorted(found)
