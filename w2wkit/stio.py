"""Reading and writing safetensors files without torch.

The reader validates the header strictly (so a truncated or foreign file gets
one clear error naming it), reads the file with one ``read`` call (or a
memory map for large files) and returns numpy views. ``BF16`` tensors are
widened to float32 exactly; the storage dtype of every tensor is returned so
writers can narrow them back bit-identically.

Writes are atomic: a temporary file in the target folder, then ``os.replace``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from w2wkit.atomic import atomic_path
from w2wkit.errors import FormatError

__all__ = [
    "SafetensorsFile",
    "atomic_path",
    "from_storage",
    "json_default",
    "json_safe",
    "read_header",
    "read_safetensors",
    "to_storage",
    "write_json",
    "write_safetensors",
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
_NP_TO_ST = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16"}
_MAX_HEADER = 100 * 1024 * 1024
_MMAP_THRESHOLD = 64 * 1024 * 1024


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


def _parse_header(raw: bytes | memoryview, size: int, path: str) -> tuple[dict, int]:
    if size < 8:
        raise FormatError(
            "not a safetensors file (shorter than its 8-byte header length)"
            if size
            else "file is empty",
            path=path,
        )
    (n,) = struct.unpack("<Q", bytes(raw[:8]))
    if n == 0 or n > _MAX_HEADER:
        raise FormatError(f"not a safetensors file (header length {n} is invalid)", path=path)
    if 8 + n > size:
        raise FormatError(
            f"truncated safetensors header (needs {n} bytes, file has {size - 8})", path=path
        )
    try:
        header = json.loads(bytes(raw[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(
            f"not a safetensors file (header is not JSON: {exc})", path=path
        ) from None
    if not isinstance(header, dict):
        raise FormatError("not a safetensors file (header is not a JSON object)", path=path)
    return header, 8 + n


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """Read only the header of a safetensors file.

    Returns
    -------
    entries : dict
        ``key -> {"dtype", "shape", "data_offsets"}``.
    metadata : dict of str to str
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if 0 < n <= _MAX_HEADER:
                    head += fh.read(n)
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", path=path) from None
    header, _ = _parse_header(head, size, path)
    meta = header.pop("__metadata__", None) or {}
    return header, _check_metadata(meta, path)


def _check_metadata(meta: object, path: str) -> dict[str, str]:
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise FormatError("__metadata__ must map strings to strings", path=path)
    return dict(meta)


def read_safetensors(path: str | os.PathLike[str]) -> SafetensorsFile:
    """Read and validate a whole safetensors file.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    SafetensorsFile

    Raises
    ------
    FormatError
        When the file is unreadable, empty, truncated, not safetensors, or a
        tensor's offsets do not fit its dtype and shape.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size >= _MMAP_THRESHOLD:
                buf: bytes | mmap.mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            else:
                buf = fh.read()
    except IsADirectoryError:
        raise FormatError("is a folder, not a safetensors file", path=path) from None
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", path=path) from None
    header, start = _parse_header(buf if isinstance(buf, bytes) else memoryview(buf), size, path)
    meta = _check_metadata(header.pop("__metadata__", None) or {}, path)
    data_len = size - start
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    bf16_raw: dict[str, np.ndarray] = {}
    # One typed view of the data section per dtype; tensors are slices of it
    # (cheaper than one numpy constructor per tensor). Unaligned data falls
    # back to a view per tensor.
    typed: dict[str, tuple[np.ndarray | None, int]] = {}
    key = ""
    try:
        for key, info in header.items():
            dt_name = info["dtype"]
            shape = info["shape"]
            begin, end = info["data_offsets"]
            base = typed.get(dt_name)
            if base is None:
                dt = _DTYPES.get(dt_name)
                if dt is None:
                    raise FormatError(f"unsupported dtype {dt_name!r}", path=path, key=key)
                size_ = dt.itemsize
                view = (
                    np.frombuffer(buf, dtype=dt, count=data_len // size_, offset=start)
                    if start % size_ == 0
                    else None
                )
                base = typed[dt_name] = (view, size_)
            view, size_ = base
            count = math.prod(shape)
            if not (0 <= begin <= end <= data_len and end - begin == count * size_):
                raise FormatError(
                    f"tensor data out of bounds or truncated (offsets {begin}-{end}, "
                    f"shape {list(shape)} {dt_name}, data section {data_len} bytes)",
                    path=path,
                    key=key,
                )
            if view is not None and begin % size_ == 0:
                arr = view[begin // size_ : end // size_].reshape(shape)
            else:
                arr = np.ndarray(shape, dtype=_DTYPES[dt_name], buffer=buf, offset=start + begin)
            if dt_name == "BF16":
                bf16_raw[key] = arr
                arr = from_storage(arr, "BF16")
            tensors[key] = arr
            dtypes[key] = dt_name
    except (KeyError, TypeError, ValueError, AttributeError):
        raise FormatError("malformed tensor entry in header", path=path, key=key) from None
    return SafetensorsFile(path, tensors, dtypes, meta, size, (buf, start, bf16_raw))


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
    return np.ascontiguousarray(arr, dtype=_DTYPES[dtype])


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    *,
    metadata: Mapping[str, str] | None = None,
    dtypes: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> None:
    """Write tensors to a safetensors file atomically.

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
