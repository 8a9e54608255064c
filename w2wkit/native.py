"""The factors scan's native helper: per-file reads, hashes, copies and statistics in C.

``w2wkit/_native/scan.c`` is compiled at install time (``setup.py``; optional: an
install without a C compiler goes on without it) into ``w2wkit/_scan*.so``, a plain
shared library loaded here with :mod:`ctypes` (never imported as a module; ctypes
releases the GIL around each call). The scan's reader threads hand it a run of files
at a time (:func:`w2wkit.collection._read_rows_job`): one call reads and hashes them
all, one checks their rows, copies them out and adds them to the column statistics --
where the Python path made some fifteen calls per file, each a hand-over of the GIL
between threads (docs/space.md, "The scan's native helper"). :meth:`Native.stats` adds a
block of rows to such statistics (``_ColumnStats.add_block``).

The SHA-256 is OpenSSL's, from the very ``libcrypto`` the process's :mod:`hashlib`
loaded; the library is used only after it hashed a test string as :mod:`hashlib` does.
``W2WKIT_NATIVE=0`` turns the helper off (the Python path then runs everything).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: flags of :meth:`Native.read_files`
ASK_HELD = 1
DIRECT = 2
#: columns of :meth:`Native.read_files`'s ``info``
GOT, SIZE, MTIME_NS, HELD, READ_DIRECT, REFUSED = range(6)
#: the version of scan.c's interface this module calls (``w2w_abi``)
ABI = 1006


@dataclass(frozen=True)
class Native:
    """The loaded helper and the SHA-256 it calls.

    Attributes
    ----------
    lib : ctypes.CDLL
    sha256 : int
        Address of OpenSSL's ``SHA256``.
    path : str
        The shared library's file.
    """

    lib: Any
    sha256: int
    path: str

    def read_files(
        self,
        paths: list[bytes],
        buf: int,
        span: int,
        digests: np.ndarray,
        info: np.ndarray,
        flags: int,
    ) -> None:
        """Read and hash ``paths`` into the buffer at address ``buf`` (page-aligned,
        ``len(paths) * span`` bytes; ``span`` a multiple of the page size), file ``k`` at
        byte ``k * span``.

        Parameters
        ----------
        digests : ndarray
            ``(m, 32)`` uint8, filled with each file's SHA-256.
        info : ndarray
            ``(m, 6)`` int64, filled per file: bytes read (or ``-errno``; a file of
            ``span`` bytes or more is read to ``span`` and not hashed), size,
            modification time (ns), held by the page cache (1/0/-1 unknown), read with
            ``O_DIRECT``, ``O_DIRECT`` refused. Columns :data:`GOT` ... :data:`REFUSED`.
        flags : int
            :data:`ASK_HELD` (ask the page cache about each file) and :data:`DIRECT`
            (read a file it does not hold with ``O_DIRECT``).
        """
        m = len(paths)
        arr = (ctypes.c_char_p * m)(*paths)
        self.lib.w2w_read_files(
            arr, m, buf, span, digests.ctypes.data, info.ctypes.data, flags, self.sha256
        )

    def gather(
        self,
        buf: int,
        span: int,
        start: np.ndarray,
        runs: np.ndarray,
        alpha_index: np.ndarray,
        alpha_value: np.ndarray,
        out: np.ndarray,
        ok: np.ndarray,
        sums: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        copy: bool = True,
    ) -> int:
        """Copy the rows of the files read by :meth:`read_files` whose ``ok`` is set into
        ``out`` ``(m, d)`` float32 (C order): ``out[k, a:b] = data[c : c + b - a]`` for
        each run ``(a, b, c)`` of ``runs`` ``(R, 3)`` int64, ``data`` the float32 data
        section starting at byte ``start[k]`` (int64) of file ``k``. Clears ``ok[k]``
        (uint8) first for a file whose alphas (``data[alpha_index] == alpha_value``)
        differ or whose row is not finite. With ``sums = (shift, total, total_sq)``
        (float64 ``(d,)`` each) the rows copied are added to them as :meth:`stats` adds
        a block, in the same pass. ``copy=False`` leaves ``out`` as it is (only its shape
        is used): the rows are checked and summed, not copied. Returns the files still
        ok."""
        m, d = out.shape
        assert out.dtype == np.float32 and out.flags.c_contiguous and len(start) >= m
        assert len(ok) >= m and ok.dtype == np.uint8
        assert runs.dtype == np.int64 and runs.flags.c_contiguous and runs.shape[1:] == (3,)
        assert alpha_index.dtype == np.int64 and alpha_value.dtype == np.float32
        assert len(alpha_index) == len(alpha_value) and start.dtype == np.int64
        if sums is not None:
            for a in sums:
                assert a.dtype == np.float64 and a.flags.c_contiguous and a.shape == (d,)
        shift, total, total_sq = (a.ctypes.data for a in sums) if sums is not None else (0, 0, 0)
        return int(
            self.lib.w2w_gather(
                buf,
                span,
                start.ctypes.data,
                m,
                runs.ctypes.data,
                len(runs),
                alpha_index.ctypes.data,
                alpha_value.ctypes.data,
                len(alpha_index),
                out.ctypes.data if copy else None,
                d,
                ok.ctypes.data,
                shift or None,
                total or None,
                total_sq or None,
            )
        )

    def stats(
        self, block: np.ndarray, shift: np.ndarray, total: np.ndarray, total_sq: np.ndarray
    ) -> None:
        """Add ``block`` ``(b, d)`` float32 (C order) to ``total += sum(x - shift)`` and
        ``total_sq += sum((x - shift) ** 2)`` over its rows, float64 ``(d,)`` each."""
        b, d = block.shape
        for a in (shift, total, total_sq):
            assert a.dtype == np.float64 and a.flags.c_contiguous and a.shape == (d,)
        self.lib.w2w_stats(
            block.ctypes.data, b, d, shift.ctypes.data, total.ctypes.data, total_sq.ctypes.data
        )


def library_file() -> Path | None:
    """The compiled helper next to this module, or None where it was not built."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_scan{suffix}"
        if path.is_file():
            return path
    return None


def _libcrypto() -> ctypes.CDLL | None:
    """The ``libcrypto`` this process's :mod:`hashlib` loaded (found in
    ``/proc/self/maps``), or None."""
    try:
        import _hashlib  # noqa: F401  (loads libcrypto)

        with open("/proc/self/maps") as fh:
            maps = fh.read()
    except (ImportError, OSError):
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if "/libcrypto" in path and os.path.isfile(path):
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


@functools.cache
def native() -> Native | None:
    """The helper, loaded and checked once per process; None where it is not built,
    not usable here, or turned off (``W2WKIT_NATIVE=0``)."""
    if os.environ.get("W2WKIT_NATIVE", "1").strip() in ("0", "off", "no", "false"):
        return None
    path = library_file()
    crypto = _libcrypto()
    if path is None or crypto is None or not hasattr(crypto, "SHA256"):
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    if not hasattr(lib, "w2w_abi"):  # built from an older scan.c: pip install -e .
        return None
    lib.w2w_abi.restype = i64
    if lib.w2w_abi() != ABI:  # built from another version of scan.c
        return None
    lib.w2w_read_files.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, ptr]
    lib.w2w_read_files.restype = i64
    lib.w2w_gather.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, i64] + [ptr] * 4
    lib.w2w_gather.restype = i64
    lib.w2w_stats.argtypes = [ptr, i64, i64, ptr, ptr, ptr]
    lib.w2w_stats.restype = None
    sha = ctypes.cast(crypto.SHA256, ctypes.c_void_p).value
    if not sha:
        return None
    # the digest it computes must be hashlib's
    sha_fn = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ptr)(sha)
    md = ctypes.create_string_buffer(32)
    sha_fn(b"w2wkit", 6, ctypes.addressof(md))
    if md.raw != hashlib.sha256(b"w2wkit").digest():
        return None
    return Native(lib, sha, str(path))
