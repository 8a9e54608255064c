"""Reading and writing safetensors files without torch.

Reading: only regular files are opened (a FIFO or a device is refused after
an ``os.stat``, before any ``open``). The header is validated by the
``safetensors`` package's own parser (``safe_open`` on the same open file)
and by the same rules here, with messages naming the key, plus what the
reference parser lets through: duplicate keys and deep nesting. A header's
validated layout is remembered by its tensor entries and the file size, so
the files of one collection are parsed once. Every tensor is a numpy view of
one ``read`` of the file (a memory map for large files). What the package
lacks is kept here: ``BF16`` widened to float32 exactly, the storage dtype of
every tensor (so writers can narrow back bit-identically), a one-pass
NaN/Inf check of the data section.

Writing: values are checked after narrowing to their storage dtype (nothing
finite becomes Inf; LoRA writers refuse any NaN/Inf), then written atomically:
a temporary file in the target folder, then ``os.replace``.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from w2wkit import jsonio
from w2wkit.atomic import atomic_path
from w2wkit.errors import FormatError

__all__ = [
    "NarrowingError",
    "SafetensorsFile",
    "atomic_path",
    "check_regular_file",
    "file_sha256",
    "from_storage",
    "json_default",
    "json_safe",
    "read_header",
    "read_safetensors",
    "to_storage",
    "write_json",
    "write_safetensors",
    "write_safetensors_streamed",
]

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_ITEMSIZE = {name: dt.itemsize for name, dt in _DTYPES.items()}
_NP_TO_ST = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16"}
_MAX_HEADER = 100 * 1024 * 1024
_MMAP_THRESHOLD = 64 * 1024 * 1024
#: Headers up to this size have their validated layout cached (the files of a
#: collection usually share their header byte for byte); at most this many.
_CACHE_HEADER_MAX = 256 * 1024
_CACHE_ENTRIES = 64
_FD_DIR = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else None


class SafetensorsFile:
    """Parsed safetensors file: tensors, storage dtypes and metadata.

    Attributes
    ----------
    path : str
        The file.
    tensors : dict of str to numpy.ndarray
        Arrays in file order; ``BF16`` already widened to float32.
    dtypes : dict of str to str
        Storage dtype of every tensor (``"F32"``, ``"F16"``, ``"BF16"``, ...).
    metadata : dict of str to str
        The ``__metadata__`` entry of the header.
    nbytes : int
        Size of the file.
    """

    __slots__ = ("_raw", "dtypes", "metadata", "nbytes", "path", "tensors")

    def __init__(
        self,
        path: str,
        tensors: dict[str, np.ndarray],
        dtypes: dict[str, str],
        metadata: dict[str, str],
        nbytes: int,
        raw: tuple | None = None,
    ) -> None:
        self.path = path
        self.tensors = tensors
        self.dtypes = dtypes
        self.metadata = metadata
        self.nbytes = nbytes
        self._raw = raw

    def all_finite(self) -> bool:
        """True when no floating-point tensor holds NaN or Inf.

        Checks the whole data section in one pass when the file has a single
        float dtype (any byte of any tensor lies in it), else every dtype's
        tensors together. ``False`` also means "could not tell cheaply".
        """
        if self._raw is None:
            return False
        buf, start, bf16_raw = self._raw
        floats = {d for d in self.dtypes.values() if d in _FLOAT_DTYPES}
        if len(floats) == 1 and len(set(self.dtypes.values())) == 1:
            (name,) = floats
            dt = _DTYPES[name]
            if (len(buf) - start) % dt.itemsize == 0:
                n = (len(buf) - start) // dt.itemsize
                return _finite(np.frombuffer(buf, dtype=dt, count=n, offset=start), name)
        for name in floats:
            arrays = [
                (bf16_raw[k] if name == "BF16" else a).reshape(-1)
                for k, a in self.tensors.items()
                if self.dtypes[k] == name
            ]
            if not _finite(np.concatenate(arrays), name):
                return False
        return True


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _finite(arr: np.ndarray, dtype: str) -> bool:
    if dtype == "BF16":  # raw uint16: exponent bits all set means Inf/NaN
        return not bool(((arr & np.uint16(0x7F80)) == np.uint16(0x7F80)).any())
    return bool(np.isfinite(arr).all())


# ----------------------------------------------------------------------------- opening


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular_file(path: str | os.PathLike[str], *, what: str = "file") -> int:
    """Refuse anything but an existing regular file, without opening it.

    FIFOs, devices and sockets would block a reader or never end (``/dev/zero``);
    they are told apart with :func:`os.stat` (which follows links) before any
    ``open``.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    what : str
        What the file is, for the message ("file", "safetensors file", ...).

    Returns
    -------
    int
        The file's size in bytes.

    Raises
    ------
    FormatError
        Naming ``path``: missing, unreadable, a folder, or not a regular file.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError("no such file", path=path) from None
    except (OSError, ValueError) as exc:  # ValueError: NUL in the path
        reason = getattr(exc, "strerror", None) or exc
        raise FormatError(f"cannot read file: {reason}", path=path) from None
    _check_mode(st.st_mode, path, what)
    return st.st_size


def _check_mode(mode: int, path: str | os.PathLike[str], what: str) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise FormatError(f"is a folder, not a {what}", path=path)
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise FormatError(f"is {kind}, not a regular {what}; refusing to read it", path=path)


_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in after the stat cannot block the open
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def _open_regular(path: str) -> tuple[int, int]:
    """``(fd, size)`` of the regular file ``path``; refuses others before opening them."""
    check_regular_file(path, what="safetensors file")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", path=path) from None
    try:
        st = os.fstat(fd)
        _check_mode(st.st_mode, path, "safetensors file")  # replaced since the stat
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


# ----------------------------------------------------------------------------- header


class _Layout:
    """A validated header: where every tensor lies (a function of the header and file size).

    ``entries`` holds ``(key, dtype, lo, hi, shape, offset)`` in header order:
    elements ``lo:hi`` of the dtype's view of the data section, or, when that
    view would be misaligned, ``offset`` (bytes from the start of the file).
    """

    __slots__ = ("dtypes", "entries", "header", "metadata", "start")

    def __init__(
        self, header: dict, metadata: dict[str, str], start: int, entries: tuple, dtypes: tuple
    ) -> None:
        self.header = header
        self.metadata = metadata
        self.start = start
        self.entries = entries
        self.dtypes = dtypes


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return obj


def _is_count(x: object) -> bool:
    return type(x) is int and x >= 0


_TOO_DEEP = f"not a safetensors file (header is nested more than {jsonio.MAX_DEPTH} levels deep)"
_ENTRY_FIELDS = frozenset(("dtype", "shape", "data_offsets"))


def _parse_layout(head: bytes, size: int, path: str) -> _Layout:
    """Parse and check a header strictly (the checks of the reference parser, with messages)."""
    try:
        header = json.loads(
            head.decode("utf-8"),
            object_pairs_hook=_unique_pairs,
            parse_constant=jsonio.reject_constant,
        )
    except _Duplicate as exc:
        raise FormatError("key appears twice in the header", path=path, key=exc.key) from None
    except UnicodeDecodeError:
        raise FormatError("not a safetensors file (header is not UTF-8)", path=path) from None
    except RecursionError:
        raise FormatError(_TOO_DEEP, path=path) from None
    except ValueError as exc:  # JSONDecodeError included
        raise FormatError(
            f"not a safetensors file (header is not JSON: {exc})", path=path
        ) from None
    if not isinstance(header, dict):
        raise FormatError("not a safetensors file (header is not a JSON object)", path=path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError("__metadata__ must map strings to strings", path=path)
    start = 8 + len(head)
    data_len = size - start
    spans = []
    entries = []
    for key, info in header.items():
        try:
            name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            itemsize = _ITEMSIZE[name]
        except (KeyError, TypeError, ValueError):
            raise _entry_error(key, info, path) from None
        if type(begin) is not int or type(end) is not int or type(shape) is not list:
            raise _entry_error(key, info, path)
        count = itemsize
        for d in shape:
            if type(d) is not int or d < 0:
                raise _entry_error(key, info, path)
            count *= d
        if begin < 0 or end - begin != count or end > data_len:
            raise FormatError(
                f"tensor data out of bounds or truncated (offsets {begin}-{end}, "
                f"shape {list(shape)} {name}, data section {data_len} bytes)",
                path=path,
                key=key,
            )
        if len(info) > 3 and jsonio.depth(info) > jsonio.MAX_DEPTH - 1:
            raise FormatError(_TOO_DEEP, path=path)
        spans.append((begin, end, key))
        if start % itemsize == 0 and begin % itemsize == 0:
            entries.append((key, name, begin // itemsize, end // itemsize, tuple(shape), None))
        else:
            entries.append((key, name, 0, 0, tuple(shape), start + begin))
    # The tensors must tile the data section: no overlap (aliased data), no
    # gap, nothing after the last one.
    spans.sort()
    pos, prev = 0, None
    for begin, end, key in spans:
        if begin < pos:
            raise FormatError(
                f"tensor data overlaps that of {prev!r} (offsets {begin}-{end}, "
                f"{prev!r} ends at {pos})",
                path=path,
                key=key,
            )
        if begin > pos:
            raise FormatError(
                f"gap of {begin - pos} bytes before this tensor's data (offsets {begin}-{end}, "
                f"the previous data ends at {pos})",
                path=path,
                key=key,
            )
        pos, prev = end, key
    if pos != data_len:
        raise FormatError(
            f"{data_len - pos} bytes after the last tensor's data (data section "
            f"{data_len} bytes, tensors cover {pos})",
            path=path,
        )
    dtypes = tuple(dict.fromkeys(e[1] for e in entries))
    return _Layout(header, meta, start, tuple(entries), dtypes)


def _entry_error(key: str, info: object, path: str) -> FormatError:
    """The error for a tensor entry that is not ``{dtype, shape, data_offsets}``."""
    if not isinstance(info, dict) or not _ENTRY_FIELDS <= info.keys():
        return FormatError(
            "malformed tensor entry in header (needs dtype, shape, data_offsets)",
            path=path,
            key=key,
        )
    name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(name, str) or name not in _DTYPES:
        return FormatError(f"unsupported dtype {name!r}", path=path, key=key)
    if not (isinstance(shape, list) and all(map(_is_count, shape))):
        return FormatError(f"malformed shape {shape!r}", path=path, key=key)
    return FormatError(f"malformed data_offsets {offsets!r}", path=path, key=key)


def _reference_check(fd: int, path: str) -> None:
    """Have the ``safetensors`` package's own parser validate the open file's header.

    It reads the header from the same open file (``/proc/self/fd``, where
    there is one), checks it with the rules of the format and maps nothing.
    """
    from safetensors import safe_open

    target = f"{_FD_DIR}/{fd}" if _FD_DIR else path
    try:
        with safe_open(target, framework="numpy"):
            pass
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", path=path) from None
    except Exception as exc:  # safetensors_rust.SafetensorError
        text = " ".join(str(exc).split())
        raise FormatError(f"rejected by the safetensors parser: {text}", path=path) from None


_LAYOUTS: dict[tuple, _Layout] = {}
_META_PREFIX = '{"__metadata__":'
_META_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_pairs, parse_constant=jsonio.reject_constant
)


def _split_metadata(head: bytes) -> tuple[dict[str, str], str] | None:
    """``(metadata, rest of the header)`` when the header starts with valid metadata.

    Writers put ``__metadata__`` first. Metadata that is not plainly valid
    (or not first) gives ``None``: the whole header then goes through both
    parsers, which report what is wrong.
    """
    if not head.startswith(b'{"__metadata__":{'):
        return None
    try:
        text = head.decode("utf-8")
        meta, end = _META_DECODER.raw_decode(text, len(_META_PREFIX))
        if not all(type(v) is str for v in meta.values()):
            return None
        for k, v in meta.items():  # lone surrogates: not text in UTF-8 (or to the reference)
            k.encode("utf-8")
            v.encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeError and JSONDecodeError included
        return None
    return meta, text[end:]


def _check_length(prefix: bytes, size: int, path: str) -> int:
    if size < 8:
        raise FormatError(
            "not a safetensors file (shorter than its 8-byte header length)"
            if size
            else "file is empty",
            path=path,
        )
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0 or n > _MAX_HEADER:
        raise FormatError(f"not a safetensors file (header length {n} is invalid)", path=path)
    if 8 + n > size:
        raise FormatError(
            f"truncated safetensors header (needs {n} bytes, file has {size - 8})", path=path
        )
    return n


def _layout(head: bytes, size: int, fd: int, path: str, reference: bool = True) -> _Layout:
    """The validated layout of a header, from the cache or by both parsers.

    Validity is a function of the header bytes and the file size alone, so a
    header seen before (files of one collection share theirs) is not parsed
    again.
    """
    key = (head, size)
    layout = _LAYOUTS.get(key)
    if layout is not None:
        return layout
    # Files of one training run share their tensor entries but not their
    # metadata: valid metadata first, then tensor entries already validated
    # behind other valid metadata at the same offsets, make a valid header.
    split = _split_metadata(head) if len(head) <= _CACHE_HEADER_MAX else None
    if split is not None:
        rest_key = (split[1], size, len(head))
        base = _LAYOUTS.get(rest_key)
        if base is not None:
            return _Layout(base.header, split[0], base.start, base.entries, base.dtypes)
    layout = _parse_layout(head, size, path)
    if not reference:
        return layout  # not cached: a later read of the file checks it with both parsers
    _reference_check(fd, path)
    if len(head) <= _CACHE_HEADER_MAX:
        if len(_LAYOUTS) >= _CACHE_ENTRIES:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
        if split is not None:
            _LAYOUTS[rest_key] = layout
    return layout


def read_header(
    path: str | os.PathLike[str], *, reference: bool = True
) -> tuple[dict[str, dict], dict[str, str]]:
    """Read and validate only the header of a safetensors file.

    ``reference=False`` skips the ``safetensors`` package's parser (which maps the
    whole file: refused under an address-space limit smaller than the file) and
    keeps w2wkit's own checks; for files w2wkit wrote and verifies otherwise (a
    saved space's arrays file, whose SHA-256 space.json records).

    Returns
    -------
    entries : dict
        ``key -> {"dtype", "shape", "data_offsets"}``.
    metadata : dict of str to str
    """
    path = os.fspath(path)
    fd, size = _open_regular(path)
    try:
        with os.fdopen(os.dup(fd), "rb") as fh:
            prefix = fh.read(8)
            n = _check_length(prefix, size, path)
            head = fh.read(n)
        if len(head) != n:
            raise FormatError("file changed while it was read", path=path)
        layout = _layout(head, size, fd, path, reference)
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", path=path) from None
    finally:
        os.close(fd)
    return {k: dict(v) for k, v in layout.header.items()}, dict(layout.metadata)


def read_safetensors(path: str | os.PathLike[str]) -> SafetensorsFile:
    """Read and validate a whole safetensors file.

    The header is validated by the ``safetensors`` package's own parser and,
    with messages that name the key, by the same rules here: unique keys,
    known dtypes, offsets that match each shape and tile the data section
    exactly (no overlapping/aliased data, no gaps, no trailing bytes).
    Tensors are views of one read of the file (a memory map above 64 MiB);
    ``BF16`` is widened to float32 and every storage dtype is kept.

    Parameters
    ----------
    path : str or os.PathLike
        The file. Anything but a regular file (a FIFO, a device, a socket) is
        refused without being opened.

    Returns
    -------
    SafetensorsFile

    Raises
    ------
    FormatError
        Naming the file (and key) when it is unreadable, empty, truncated,
        not a regular file, or not a valid safetensors file.
    """
    path = os.fspath(path)
    fd, size = _open_regular(path)
    try:
        if size >= _MMAP_THRESHOLD:
            buf: bytes | mmap.mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        else:
            with os.fdopen(os.dup(fd), "rb") as fh:
                buf = fh.read()
        size = len(buf)
        n = _check_length(bytes(buf[:8]), size, path)
        layout = _layout(bytes(buf[8 : 8 + n]), size, fd, path)
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", path=path) from None
    finally:
        os.close(fd)
    start = layout.start
    data_len = size - start
    views = {}
    for name in layout.dtypes:
        dt = _DTYPES[name]
        views[name] = (
            np.frombuffer(buf, dtype=dt, count=data_len // dt.itemsize, offset=start)
            if start % dt.itemsize == 0
            else None
        )
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    bf16_raw: dict[str, np.ndarray] = {}
    for key, name, lo, hi, shape, offset in layout.entries:
        if offset is None:
            arr = views[name][lo:hi].reshape(shape)
        else:
            arr = np.ndarray(shape, dtype=_DTYPES[name], buffer=buf, offset=offset)
        if name == "BF16":
            bf16_raw[key] = arr
            arr = from_storage(arr, "BF16")
        tensors[key] = arr
        dtypes[key] = name
    return SafetensorsFile(
        path, tensors, dtypes, dict(layout.metadata), size, (buf, start, bf16_raw)
    )


def from_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Widen raw stored values to a numpy float array.

    Parameters
    ----------
    arr : numpy.ndarray
        Raw values as stored (``uint16`` for ``BF16``), any shape.
    dtype : str
        Storage dtype name.

    Returns
    -------
    numpy.ndarray
        Same shape; float32 for ``BF16``, unchanged otherwise.
    """
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def to_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Narrow a float array to the raw values of a storage dtype.

    ``BF16`` uses round-to-nearest-even, which is exact for values that came
    from ``BF16``.

    Parameters
    ----------
    arr : numpy.ndarray
        Values, any shape.
    dtype : str
        ``"F64"``, ``"F32"``, ``"F16"`` or ``"BF16"``.

    Returns
    -------
    numpy.ndarray
        Contiguous array in the storage representation, same shape.
    """
    if dtype == "BF16":
        bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
        rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
        return (rounded >> 16).astype(np.uint16)
    if dtype not in _DTYPES:
        raise FormatError(f"unsupported storage dtype {dtype!r}")
    with np.errstate(over="ignore"):  # overflow is reported by the writer's check
        return np.ascontiguousarray(arr, dtype=_DTYPES[dtype])


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    *,
    metadata: Mapping[str, str] | None = None,
    dtypes: Mapping[str, str] | None = None,
    overwrite: bool = False,
    finite: bool = False,
) -> None:
    """Write tensors to a safetensors file atomically.

    Values are checked after they are narrowed to their storage dtype: a
    finite value that would be stored as Inf (above 65504 in ``F16``, 1e300 in
    ``F32``) is refused, naming the key, and nothing is written.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    tensors : mapping of str to numpy.ndarray
        Arrays of any shape; written in the given order.
    metadata : mapping of str to str, optional
        Stored as the header's ``__metadata__``.
    dtypes : mapping of str to str, optional
        Storage dtype per key (default: the array's own, float32 for other
        float types).
    overwrite : bool
        Replace an existing file.
    finite : bool
        Refuse any NaN/Inf value in a float tensor, not only those made by
        narrowing (LoRA files: a non-finite factor breaks every image).

    Raises
    ------
    FormatError
        Naming ``path`` and the key, for a value that is not finite as stored.
    """
    dtypes = dict(dtypes or {})
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs: list[np.ndarray] = []
    offset = 0
    for key, arr in tensors.items():
        arr = np.asarray(arr)
        st = dtypes.get(key) or _NP_TO_ST.get(arr.dtype, "F32")
        raw = to_storage(arr, st)
        if st in _FLOAT_DTYPES and (finite or raw.dtype.itemsize < arr.dtype.itemsize):
            _check_stored(arr, raw, st, finite, path, key)
        header[key] = {
            "dtype": st,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + raw.nbytes],
        }
        offset += raw.nbytes
        blobs.append(raw)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        for raw in blobs:
            fh.write(memoryview(raw).cast("B") if raw.size else b"")


def write_safetensors_streamed(
    path: str | os.PathLike[str],
    specs: Sequence[tuple[str, str, tuple[int, ...]]],
    fill: Callable[[str, Callable[[int, np.ndarray], None]], None],
    *,
    overwrite: bool = False,
) -> None:
    """Write a safetensors file whose tensors are produced piece by piece.

    For tensors too large to hold together (a saved space's factor stacks): the
    header is written from ``specs``, then ``fill(key, write)`` is called once per
    tensor, in order, and puts its bytes with ``write(byte_offset, array)`` (the
    array's raw bytes, C order, at ``byte_offset`` from the tensor's start; any
    order, any number of calls). Every byte of every tensor must be written once:
    the bytes each ``fill`` wrote are counted and a shortfall or overflow is an
    error. The file appears atomically (:func:`w2wkit.atomic.atomic_path`).

    Parameters
    ----------
    path : str or os.PathLike
    specs : sequence of (key, dtype, shape)
        Storage dtype names as in the header (``"F32"``, ``"I64"``, ...).
    fill : callable
        ``fill(key, write)``.
    overwrite : bool

    Raises
    ------
    ValueError
        When a ``fill`` writes outside its tensor or not all of it.
    """
    header: dict[str, object] = {}
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for key, dtype, shape in specs:
        nbytes = _ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
        header[key] = {
            "dtype": dtype,
            "shape": [int(x) for x in shape],
            "data_offsets": [offset, offset + nbytes],
        }
        spans[key] = (offset, nbytes)
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    start = 8 + len(head)
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(head)))
        fh.write(head)
        fh.flush()
        fd = fh.fileno()
        os.ftruncate(fd, start + offset)
        for key, _, _ in specs:
            base, nbytes = spans[key]
            written = 0

            def write(
                at: int, arr: np.ndarray, base: int = base, nbytes: int = nbytes, key: str = key
            ) -> None:
                nonlocal written
                view = memoryview(np.ascontiguousarray(arr)).cast("B")
                if at < 0 or at + len(view) > nbytes:
                    raise ValueError(f"{key}: bytes {at}..{at + len(view)} outside 0..{nbytes}")
                pos = start + base + at
                while view:
                    done = os.pwrite(fd, view, pos)
                    view, pos = view[done:], pos + done
                    written += done

            fill(key, write)
            if written != nbytes:
                raise ValueError(f"{key}: {written} bytes written, expected {nbytes}")


class NarrowingError(FormatError):
    """A finite value that its storage dtype would hold as Inf."""


_LARGEST = {"F16": 65504.0, "BF16": 3.3895313892515355e38, "F32": 3.4028234663852886e38}


def _check_stored(
    arr: np.ndarray,
    raw: np.ndarray,
    dtype: str,
    finite: bool,
    path: str | os.PathLike[str],
    key: str,
) -> None:
    """Refuse non-finite stored values: all of them (``finite``) or those narrowing made."""
    if _finite(raw.reshape(-1), dtype):
        return
    src = np.asarray(arr)
    if src.dtype.kind == "f":
        made = ~np.isfinite(from_storage(raw, dtype)) & np.isfinite(src)
        if made.any():
            value = float(np.max(np.abs(src[made])))
            raise NarrowingError(
                f"{value:g} does not fit {dtype} (largest finite value "
                f"{_LARGEST.get(dtype, float('inf')):g}); it would be written as Inf",
                path=path,
                key=key,
                hint="store it in a wider dtype, e.g. F32",
            )
    if finite:
        wide = from_storage(raw, dtype)
        bad = "NaN" if np.isnan(wide).any() else "Inf"
        raise FormatError(
            f"tensor holds {bad} values; refusing to write a non-finite file",
            path=path,
            key=key,
        )


# ----------------------------------------------------------------------------- JSON


def json_default(obj: object) -> object:
    """``json.dumps`` fallback: numpy scalars and arrays as Python values, the rest as text."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def json_safe(obj: object) -> object:
    """``obj`` as plain JSON values; NaN and infinities become ``None`` (strict JSON)."""
    text = json.dumps(obj, default=json_default)
    return json.loads(text, parse_constant=lambda _: None)


def write_json(path: str | os.PathLike[str], obj: object, *, strict: bool = False) -> None:
    """Write ``obj`` as indented JSON atomically (``strict``: NaN/inf as null first)."""
    text = json.dumps(json_safe(obj) if strict else obj, indent=1, default=json_default)
    with atomic_path(path, overwrite=True, suffix=".json") as tmp:
        Path(tmp).write_text(text)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, or of the sorted files of a folder (names included).

    The one hash of w2wkit: spaces, collections, the world's manifest and the
    zoo use it. A folder (a PEFT adapter) hashes each file's path relative to
    it, then its bytes, in sorted order.
    """
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()
