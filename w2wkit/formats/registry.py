"""Format registry: detection, reading and writing of LoRA files.

A format is a class registered with :func:`register_format`. It answers three
questions about a :class:`Source` (the parsed file): ``sniff`` (how sure it is
that the keys are its own, 0..1), ``read`` (the canonical :class:`Adapter`) and,
for writable formats, ``write``. Formats translate keys with tables of
patterns (see :mod:`w2wkit.names`), never with chains of string replaces.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from w2wkit.adapter import COMPONENTS, Adapter
from w2wkit.errors import OUTPUT_EXISTS, FormatError
from w2wkit.jsonio import read_json
from w2wkit.stio import (
    NarrowingError,
    SafetensorsFile,
    check_regular_file,
    read_safetensors,
)

__all__ = [
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

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
LORA_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class Source:
    """A LoRA file (or PEFT folder) parsed into raw tensors.

    Attributes
    ----------
    path : str
        The file or folder the user named.
    tensors : dict of str to numpy.ndarray
        Raw tensors by key (bfloat16 widened to float32).
    dtypes : dict of str to str
        Storage dtype per key.
    metadata : dict of str to str
        safetensors ``__metadata__``.
    config : dict, optional
        A PEFT ``adapter_config.json`` when the source is a PEFT folder.
    weights_path : str
        The weights file actually read.
    nbytes : int
        Size of the weights file.
    """

    path: str
    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]
    metadata: dict[str, str]
    config: dict[str, Any] | None = None
    weights_path: str = ""
    nbytes: int = 0
    file: SafetensorsFile | None = None

    def all_finite(self) -> bool:
        """True when every float tensor of the file is known to be finite (one pass)."""
        return self.file is not None and self.file.all_finite()

    @property
    def keys(self) -> list[str]:
        """Tensor keys in file order."""
        return list(self.tensors)


@dataclass
class WriteOptions:
    """Options shared by every writer.

    Attributes
    ----------
    dtype : str, optional
        Storage dtype for every tensor (``"F32"``, ``"F16"``, ``"BF16"``);
        default keeps each layer's own.
    overwrite : bool
        Replace an existing output.
    provenance : dict of str to str
        Extra metadata recording what made the file; merged into the header.
    """

    dtype: str | None = None
    overwrite: bool = False
    provenance: dict[str, str] = field(default_factory=dict)


class LoraFormat(Protocol):
    """What a registered format provides."""

    name: ClassVar[str]
    writable: ClassVar[bool]
    description: ClassVar[str]

    def sniff(self, src: Source) -> float:
        """Confidence in [0, 1] that ``src`` is in this format.

        Must depend only on the key names and on ``src.config is None``
        (results are cached per key set).
        """

    def read(self, src: Source) -> Adapter:
        """Translate ``src`` into the canonical adapter (not yet validated)."""

    def write(self, adapter: Adapter, path: Path, options: WriteOptions) -> None:
        """Write ``adapter`` to ``path`` atomically (writable formats only)."""


FORMATS: dict[str, LoraFormat] = {}


def register_format(cls: type) -> type:
    """Class decorator adding a format to :data:`FORMATS` under ``cls.name``."""
    FORMATS[cls.name] = cls()
    _DETECTED.clear()
    return cls


# Detection depends only on the key names and on whether a PEFT config came
# with them (the sniff contract), so files of one collection, which share
# their keys, are sniffed once.
_DETECTED: dict[tuple[bool, tuple[str, ...]], str] = {}
_DETECTED_MAX = 256


def _ensure_loaded() -> None:
    # Import the built-in format modules for their registration side effect.
    from w2wkit.formats import _builtin  # noqa: F401


def _torch_pickle(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    import torch  # lazy: only for explicit pickle opt-in

    from w2wkit.pickles import load_tensors

    obj = load_tensors(path, what="LoRA pickle")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FormatError("pickle does not hold a dict of tensors", path=path)
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    names = {
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float64: "F64",
    }
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        dtypes[key] = names.get(value.dtype, "F32")
        tensors[key] = (
            value.detach().float().numpy()
            if value.dtype == torch.bfloat16
            else (value.detach().numpy())
        )
    return tensors, dtypes


def _is_file(path: Path) -> bool:
    """True for a regular file, False when nothing is there; refuses FIFOs, devices, folders."""
    if not os.path.lexists(path):
        return False
    check_regular_file(path)
    return True


def _peft_folder(path: Path) -> tuple[Path, dict[str, Any]] | None:
    cfg = path / PEFT_CONFIG
    if not _is_file(cfg):
        return None
    config = read_json(cfg, what=PEFT_CONFIG, error=FormatError)
    for name in PEFT_WEIGHTS:
        if _is_file(path / name):
            return path / name, config
    raise FormatError(
        f"PEFT folder has {PEFT_CONFIG} but no {' or '.join(PEFT_WEIGHTS)}", path=path
    )


def load_source(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Source:
    """Parse a LoRA file or PEFT folder into raw tensors.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.safetensors`` file, a pickle file (with ``allow_pickle``), or a
        PEFT folder holding ``adapter_config.json``.
    allow_pickle : bool
        Permit ``.pt/.pth/.ckpt/.bin`` files, loaded with
        ``torch.load(weights_only=True)``.

    Raises
    ------
    FormatError
        For a missing, unreadable or non-LoRA file.
    """
    p = Path(path)
    config = None
    if not p.exists():
        raise FormatError("no such file or folder", path=p)
    if p.is_dir():
        found = _peft_folder(p)
        if found is None:
            raise FormatError(
                f"folder is not a PEFT adapter (no {PEFT_CONFIG}); "
                "pass a file, or use a collection for a folder of LoRA files",
                path=p,
            )
        weights, config = found
    else:
        check_regular_file(p)  # a FIFO or a device is refused before it is opened
        weights = p
        sibling = p.parent / PEFT_CONFIG
        if p.name in PEFT_WEIGHTS and _is_file(sibling):
            config = _peft_folder(p.parent)[1]  # type: ignore[index]
    if weights.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise FormatError(
                "pickle files can run code when loaded; refusing",
                path=weights,
                hint="convert it to .safetensors, or pass `allow_pickle=True` if you trust it",
            )
        nbytes = check_regular_file(weights)
        tensors, dtypes = _torch_pickle(str(weights))
        meta: dict[str, str] = {}
    else:
        st: SafetensorsFile = read_safetensors(weights)
        tensors, dtypes, meta, nbytes = st.tensors, st.dtypes, st.metadata, st.nbytes
        if not tensors:
            raise FormatError("file holds no tensors", path=weights)
        return Source(str(p), tensors, dtypes, meta, config, str(weights), nbytes, st)
    if not tensors:
        raise FormatError("file holds no tensors", path=weights)
    return Source(str(p), tensors, dtypes, meta, config, str(weights), nbytes)


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
    format: str = "kohya",
    dtype: str | None = None,
    overwrite: bool = False,
    provenance: dict[str, str] | None = None,
) -> Path:
    """Write an adapter in a writable format, atomically.

    Parameters
    ----------
    adapter : Adapter
        What to write.
    path : str or os.PathLike
        Output file (kohya, diffusers) or folder (peft).
    format : str
        ``"kohya"``, ``"diffusers"`` or ``"peft"``.
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
    fmt = FORMATS.get(format)
    if fmt is None or not fmt.writable:
        writable = writable_formats()
        raise FormatError(f"cannot write format {format!r}; writable: {', '.join(writable)}")
    out = Path(path)
    if out.exists() and not overwrite:
        raise FormatError(OUTPUT_EXISTS, path=out)
    try:
        fmt.write(adapter, out, WriteOptions(dtype, overwrite, dict(provenance or {})))
    except NarrowingError as exc:
        why = (
            "both factors of a layer are stored in its down factor's dtype"
            if dtype is None
            else f"parameter dtype is {dtype}"
        )
        raise NarrowingError(
            exc.message,
            path=exc.path,
            key=exc.key,
            param="dtype",
            hint=f"{why}; choose a wider storage dtype, e.g. F32",
        ) from None
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
    if (p / PEFT_CONFIG).is_file():
        return [p]
    found = []
    peft_dirs = {c.parent for c in p.rglob(PEFT_CONFIG)}
    # a component subfolder (``out/text_encoder``) of a PEFT folder is part of it
    nested = {d for d in peft_dirs if d.name in COMPONENTS and d.parent in peft_dirs}
    for d in sorted(peft_dirs - nested):
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
