"""Fitting a factors space on a Dask cluster: the scan and every solver pass as tasks.

:meth:`w2wkit.space.WeightSpace.fit` with ``client=`` (``w2wkit fit --cluster SPEC``) runs here.
The driver (the process that called ``fit``) lists the files; everything that touches their
contents runs as tasks on the workers, which open the files themselves (tasks carry paths,
never rows), so the workers must see the same files at the same paths (a shared file system).

Tasks
-----
scan
    One task per block of files (:data:`SCAN_FILES` at most): read and validate each file (the
    kohya fast path of :class:`w2wkit.collection.Collection` or the ordinary reader), hash it,
    record its size and modification time, and sum its rows (float64, shifted by the block's
    first row). The driver merges the layouts (one layout or the usual error listing the
    groups), the manifest, the model families and the per-coordinate mean and variance.
randomized passes
    One task per row block: read the rows, standardise them exactly as the single-process fit
    does, and return ``Y_b = Z_b Q`` (b, l) and ``W_b = Z_b^T Y_b`` (d, l) (a half pass:
    ``Y_b`` only). The driver sums the ``W_b`` in block order and runs the same block Krylov
    orthogonalisation and Rayleigh-Ritz step as the single-process solver.
Gram passes
    One task per pair of row tiles ``I <= J`` (``Z_I Z_J^T``, the tile ``I`` held, ``J``
    streamed), then one task per row block for the components ``diag(1/s) U_b^T Z_b``
    (k, d), summed by the driver in block order.

The driver holds what the single-process solver holds besides the data: the Krylov basis and
its products (``(N + d) * (n_iter + 1) * l``), or the N x N Gram matrix and the (k, d)
components; never the N x d matrix. A file is re-read on every pass; its size and modification
time must not change after the scan (checked on every read).

Reductions run in block order, whatever worker finished first, so a result depends only on
the seed, the data and the block partition. A worker that dies mid-pass loses its tasks; Dask
runs them again on another worker and the pass completes with the same numbers (after
``distributed.scheduler.allowed-failures`` deaths of one task the fit stops with one line).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from w2wkit.cluster import ClusterError, worker_count
from w2wkit.errors import FormatError, LayoutError, SpaceError, W2WError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from distributed import Client

    from w2wkit.collection import Collection
    from w2wkit.layout import WeightLayout
    from w2wkit.solvers import PCAResult

__all__ = ["FileRows", "fit_pca_files", "scan_files"]

Progress = Callable[[str, int, int], None]

#: files per scan task
SCAN_FILES = 256
#: bytes of rows a task reads and multiplies at a time (a sub-block)
SUB_BLOCK_BYTES = 64 << 20
#: bytes of the row tile a Gram task holds while it streams the other tile
GRAM_TILE_BYTES = 1 << 30
#: row blocks per worker of a randomized or components pass
BLOCKS_PER_WORKER = 2
#: a cluster fit keeps the rows in the workers' memory (``keep_rows``) when the files take at
#: most this much per worker; a larger collection is read from its files on every pass, and
#: its Gram fit goes a column chunk at a time (two reads of the files in all)
HELD_BYTES_PER_WORKER = 2 << 30
#: bytes of the column chunk (N x w float32) a task of the column Gram solver reads
COLUMN_CHUNK_BYTES = 1 << 30
#: what a task's error says when a worker cannot open a file the driver listed
MUST_SEE = (
    "the workers must see the same files at the same paths as this machine "
    "(a shared file system; pass absolute paths)"
)


@dataclass
class FileRows:
    """The rows of a collection, left in its files: what the workers read on every pass.

    Attributes
    ----------
    files : list of str
        Absolute paths as the workers open them, in row order.
    layout : WeightLayout
        The one layout of every row (d entries).
    mean, var : numpy.ndarray
        ``(d,)`` float64 per-coordinate mean and variance (``ddof=0``).
    stamps : list of tuple of int
        ``(size, mtime_ns)`` of each file at the scan; a later read of another file is refused.
    format : str or None
        The forced input format (``Collection.format``).
    allow_pickle : bool
        Whether pickle files may be read.
    """

    files: list[str]
    layout: WeightLayout
    mean: np.ndarray
    var: np.ndarray
    stamps: list[tuple[int, int]]
    format: str | None = None
    allow_pickle: bool = False
    #: the scan's row blocks ``(lo, hi)``; with ``sources`` the passes use the same blocks
    blocks: list[tuple[int, int]] = field(default_factory=list)
    #: futures of the row blocks the workers hold (``keep_rows``), else None: read the files
    sources: list[Any] | None = None
    #: per file: laid out like the first kohya file (its columns are read straight from the
    #: file's bytes), else read whole by the ordinary reader
    fast: list[bool] = field(default_factory=list)

    def release(self) -> None:
        """Let the workers drop the row blocks they hold."""
        for fut in self.sources or ():
            with contextlib.suppress(Exception):
                fut.release()
        self.sources = None

    @property
    def n_rows(self) -> int:
        """Number of models ``N``."""
        return len(self.files)

    @property
    def dim(self) -> int:
        """Row length ``d``."""
        return int(self.layout.dim)


# ----------------------------------------------------------------------------- worker side


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return socket.gethostname()


def _unseen(path: str, exc: BaseException) -> ClusterError:
    """The one line for a file a worker cannot open (it exists where the driver listed it)."""
    why = getattr(exc, "strerror", None) or type(exc).__name__
    return ClusterError(
        f"a worker ({_worker_name()}) cannot read this file ({why}); {MUST_SEE}", path=path
    )


def _missing_on_worker(path: str) -> bool:
    return not os.access(path, os.R_OK)


def _stamp(path: str, st: os.stat_result | None = None) -> tuple[int, int]:
    """``(size, mtime_ns)`` of a file; of a folder (PEFT), summed sizes and the latest
    modification time of the files in it."""
    st = st if st is not None else os.stat(path)
    if not os.path.isdir(path):
        return int(st.st_size), int(st.st_mtime_ns)
    size, mtime = 0, 0
    for root, _, names in os.walk(path):
        for name in names:
            s = os.stat(os.path.join(root, name))
            size += int(s.st_size)
            mtime = max(mtime, int(s.st_mtime_ns))
    return size, mtime


class _Sink:
    """Takes the rows of a scan block one at a time and keeps their shifted sums (float64,
    :class:`w2wkit.collection._ColumnStats`); with ``keep`` the rows too, in one ``(m, d)``
    float32 block. Read ``shift``, ``total``, ``total_sq`` after :meth:`finish`."""

    def __init__(self, m: int, d: int, keep: bool = False) -> None:
        from w2wkit.collection import _ColumnStats

        self.shape = (m, d)
        self.rows = np.zeros((m, d), dtype=np.float32) if keep else None
        self._stats = _ColumnStats(d)
        self.count = 0

    def __setitem__(self, i: int, row: np.ndarray) -> None:
        if self.rows is not None:
            self.rows[i] = row
        self._stats.add_row(row)
        self.count += 1

    def finish(self) -> None:
        """Add the rows still gathered; :attr:`shift`, :attr:`total`, :attr:`total_sq`."""
        self._stats.flush()
        self.shift = self._stats.shift
        self.total = self._stats.total
        self.total_sq = self._stats.total_sq


def _scan_task(
    paths: Sequence[str], fmt: str | None, allow_pickle: bool, keep: bool = False
) -> dict[str, Any]:
    """Read, validate and hash a block of files on a worker; return their summaries (and
    with ``keep`` the rows, ``rows`` (m, d) float32, which stay on the worker).

    Returns
    -------
    dict
        ``entries`` (manifest entries), ``families``, ``groups`` (layout signature -> local
        indices), ``layouts`` (signature -> WeightLayout), ``stamps`` (size, mtime_ns),
        and the shifted sums of the rows of the block's first layout: ``count``, ``shift``
        (d,), ``total`` (d,), ``total_sq`` (d,) float64.
    """
    from w2wkit.collection import Collection
    from w2wkit.layout import WeightLayout

    for p in paths:
        if _missing_on_worker(p):
            raise _unseen(p, FileNotFoundError(2, "No such file or directory"))
    sub = Collection(list(paths), format=fmt, allow_pickle=allow_pickle)
    groups: dict[str, list[int]] = {}
    layouts: dict[str, WeightLayout] = {}
    sink: _Sink | None = None
    first: str | None = None
    stamps: list[tuple[int, int]] = []
    fast: list[bool] = []
    try:
        for i, ad in sub._iter_factor_rows(None, lambda: sink):  # noqa: B023
            fast.append(ad is None)
            if ad is None:  # the fast path wrote the row into the sink
                assert first is not None
                groups[first].append(i)
            else:
                lay = WeightLayout.from_adapter(ad)
                groups.setdefault(lay.signature, []).append(i)
                layouts.setdefault(lay.signature, lay)
                if first is None:
                    first = lay.signature
                    sink = _Sink(len(paths), lay.dim, keep)
                    sub._fast_layout = lay
                if lay.signature == first:
                    assert sink is not None
                    sink[i] = lay.flatten(ad)
            stamps.append(_stamp(paths[i]))
    except (FormatError, OSError) as exc:
        path = getattr(exc, "path", None) or getattr(exc, "filename", None)
        if path is not None and _missing_on_worker(str(path)):
            raise _unseen(str(path), exc) from None
        raise
    assert sink is not None
    sink.finish()
    reader = getattr(sub, "_fast_reader", None)
    if reader is not None:  # the file the template was built on is laid out like it
        fast[sub._fast_reader_row] = True
    return {
        "template": reader.fingerprint() if reader is not None else None,
        "entries": sub.manifest,
        "families": sub.families,
        "groups": groups,
        "layouts": layouts,
        "stamps": stamps,
        "fast": fast,
        "count": sink.count,
        "shift": sink.shift,
        "total": sink.total,
        "total_sq": sink.total_sq,
        "rows": sink.rows,
    }


def _pick(result: dict[str, Any], name: str) -> Any:
    """One entry of a task's result (a task of its own: the rows stay where they are)."""
    return result[name]


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """A scan task's result without its rows (what the driver fetches)."""
    return {key: value for key, value in result.items() if key != "rows"}


@dataclass
class _Context:
    """What every pass task needs besides its rows and its operand (scattered once per fit)."""

    layout: WeightLayout
    format: str | None
    allow_pickle: bool
    mean32: np.ndarray
    scale32: np.ndarray
    template: str


#: per worker process: the kohya fast reader of a template file and layout (or None)
_TEMPLATES: dict[tuple[str, str], Any] = {}


def _template(ctx: _Context) -> Any:
    from w2wkit.collection import _KohyaRows

    key = (ctx.template, ctx.layout.signature)
    if key not in _TEMPLATES:
        fast = None
        if not any(ctx.layout.rslora.values()) and ctx.template.endswith(".safetensors"):
            try:
                fast = _KohyaRows(Path(ctx.template), ctx.layout)
            except (ValueError, KeyError, TypeError, FormatError, OSError):
                fast = None
        _TEMPLATES.clear()
        _TEMPLATES[key] = fast
    return _TEMPLATES[key]


def _read_rows(
    ctx: _Context,
    paths: Sequence[str],
    stamps: Sequence[tuple[int, int]],
    standardise: bool = True,
) -> np.ndarray:
    """The standardised rows ``(rows - mean) / scale`` (b, d) float32 of ``paths`` (the rows
    as they are with ``standardise=False``)."""
    from w2wkit.formats.registry import read_adapter

    fast = _template(ctx)
    out = np.empty((len(paths), ctx.layout.dim), dtype=np.float32)
    for j, p in enumerate(paths):
        raw = None
        try:
            if os.path.isdir(p):  # a PEFT folder: the ordinary reader
                stamp = _stamp(p)
            else:
                with open(p, "rb", buffering=0) as fh:
                    stamp = _stamp(p, os.fstat(fh.fileno()))
                    raw = fh.read() if fast is not None else None
        except OSError as exc:
            if _missing_on_worker(p):
                raise _unseen(p, exc) from None
            raise SpaceError(f"cannot read the file on a worker: {exc}", path=p) from None
        if stamp != tuple(stamps[j]):
            raise SpaceError(
                "the file changed during the fit (its size or modification time differs "
                "from the scan's)",
                path=p,
                hint="do not write the input files while a fit runs",
            )
        if fast is not None and raw is not None and fast.row(Path(p), raw, out[j]) is not None:
            continue
        ad = read_adapter(p, format=ctx.format, allow_pickle=ctx.allow_pickle)
        from w2wkit.layout import WeightLayout

        if WeightLayout.from_adapter(ad).signature != ctx.layout.signature:
            raise SpaceError("the file's layout changed during the fit", path=p)
        ctx.layout.flatten(ad, out=out[j])
    if standardise:
        out -= ctx.mean32
        out /= ctx.scale32
    return out


def _checked_stamp(p: str, fd: int, stamp: Sequence[int]) -> None:
    """Refuse a file whose size or modification time differs from the scan's."""
    if _stamp(p, os.fstat(fd)) != tuple(stamp):
        raise SpaceError(
            "the file changed during the fit (its size or modification time differs "
            "from the scan's)",
            path=p,
            hint="do not write the input files while a fit runs",
        )


def _read_columns(
    ctx: _Context, files: tuple[list[str], list[tuple[int, int]], list[bool]], lo: int, hi: int
) -> np.ndarray:
    """Entries ``lo:hi`` of every row, standardised: ``(N, hi - lo)`` float32.

    A file laid out like the template (``fast``) is read only where those entries lie (one
    read of the span from the file's data section); any other is read whole by the ordinary
    reader. Every file is checked against its scan stamp.
    """
    from w2wkit.collection import _pread_exact

    paths, stamps, fast = files
    tpl = _template(ctx)
    out = np.empty((len(paths), hi - lo), dtype=np.float32)
    runs = tpl.column_runs(lo, hi) if tpl is not None else []
    if runs:
        first = min(c for _, _, c in runs)
        span = np.empty(max(c + b - a for a, b, c in runs) - first, dtype=np.float32)
    head = np.empty(8, dtype=np.uint8)
    for j, p in enumerate(paths):
        if runs and fast[j]:
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError as exc:
                if _missing_on_worker(p):
                    raise _unseen(p, exc) from None
                raise SpaceError(f"cannot read the file on a worker: {exc}", path=p) from None
            try:
                _checked_stamp(p, fd, stamps[j])
                _pread_exact(fd, head, 0, p)
                start = 8 + int(head.view("<u8")[0])
                _pread_exact(fd, span, start + 4 * first, p)
            finally:
                os.close(fd)
            for a, b, c in runs:
                out[j, a:b] = span[c - first : c - first + b - a]
        else:
            out[j] = _read_rows(ctx, [p], [stamps[j]], standardise=False)[0, lo:hi]
    if not np.isfinite(out).all():
        bad = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
        raise SpaceError("the file now holds NaN or infinite values", path=paths[bad])
    out -= ctx.mean32[lo:hi]
    out /= ctx.scale32[lo:hi]
    return out


#: A task's rows: a standardised block the workers hold (b, d) float32 (see
#: :func:`_standardise_task`), or ``(paths, stamps)``: the files to read and standardise.
Source = Any


def _standardise_task(ctx: _Context, raw: np.ndarray) -> np.ndarray:
    """A held row block standardised as the single-process fit does, ``(raw - mean) / scale``
    (b, d) float32: a new block (the raw one is released once every block is done)."""
    out = raw - ctx.mean32
    out /= ctx.scale32
    return out


def _source_rows(src: Source) -> int:
    return int(src.shape[0]) if isinstance(src, np.ndarray) else len(src[0])


def _sub_blocks(ctx: _Context, src: Source) -> Iterator[tuple[int, np.ndarray]]:
    """``(offset, standardised rows)`` of a source in sub-blocks of about
    :data:`SUB_BLOCK_BYTES`; files are read one sub-block ahead in a background thread."""
    from w2wkit.solvers import _prefetch

    step = max(1, SUB_BLOCK_BYTES // (4 * max(ctx.layout.dim, 1)))
    if isinstance(src, np.ndarray):  # standardised already: views, no copies
        for lo in range(0, src.shape[0], step):
            yield lo, src[lo : lo + step]
        return
    paths, stamps = src

    def gen() -> Iterator[tuple[int, np.ndarray]]:
        for lo in range(0, len(paths), step):
            yield lo, _read_rows(ctx, paths[lo : lo + step], stamps[lo : lo + step])

    yield from _prefetch(gen())  # type: ignore[arg-type]


def _krylov_task(
    ctx: _Context,
    src: Source,
    q: np.ndarray,
    full: bool,
    want_sumsq: bool,
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """One row block of a randomized pass: ``Y_b = Z_b Q`` (b, l), ``W_b = Z_b^T Y_b`` (d, l)
    when ``full``, and ``sum(Z_b**2)`` when ``want_sumsq``."""
    from w2wkit.solvers import _check_finite_rows, _NumpyOps

    ops = _NumpyOps()
    y = np.empty((_source_rows(src), q.shape[1]), dtype=np.float32)
    w = np.zeros((q.shape[0], q.shape[1]), dtype=np.float32) if full else None
    sumsq = 0.0
    for lo, z in _sub_blocks(ctx, src):
        if want_sumsq:
            sumsq += float(np.einsum("ij,ij->i", z, z).sum(dtype=np.float64))
        yb = ops.block_matmul(z, q)
        _check_finite_rows(yb, lo, "randomized")
        y[lo : lo + z.shape[0]] = yb
        if w is not None:
            ops.add_at_b(w, z, yb)
    return y, w, sumsq


def _gram_tile_task(ctx: _Context, src_i: Source, src_j: Source | None, dtype: str) -> np.ndarray:
    """``Z_I Z_J^T`` (|I|, |J|) in ``dtype`` (``src_j`` None: the diagonal tile ``Z_I Z_I^T``)."""
    dt = np.dtype(dtype)
    if isinstance(src_i, np.ndarray) and src_i.dtype == dt:
        tile = src_i  # a held block, multiplied as it is
    else:
        tile = np.empty((_source_rows(src_i), ctx.layout.dim), dtype=dt)
        for lo, z in _sub_blocks(ctx, src_i):
            tile[lo : lo + z.shape[0]] = z
    if src_j is None:
        return tile @ tile.T  # one symmetric product (BLAS ?syrk)
    if isinstance(src_j, np.ndarray) and src_j.dtype == dt:
        return tile @ src_j.T
    out = np.empty((tile.shape[0], _source_rows(src_j)), dtype=dt)
    for lo, z in _sub_blocks(ctx, src_j):
        out[:, lo : lo + z.shape[0]] = tile @ z.astype(dt, copy=False).T
    return out


def _components_task(ctx: _Context, src: Source, proj: np.ndarray, dtype: str) -> np.ndarray:
    """``proj^T Z_b`` (k, d) of a row block (``proj`` (b, k), the block's rows of ``U / s``)."""
    dt = np.dtype(dtype)
    comp = np.zeros((proj.shape[1], ctx.layout.dim), dtype=dt)
    from w2wkit.solvers import _NumpyOps

    ops = _NumpyOps()
    for lo, z in _sub_blocks(ctx, src):
        p = np.ascontiguousarray(proj[lo : lo + z.shape[0]].T, dtype=dt)
        if dt == np.float32:
            ops.add_ab(comp, p, z)  # comp += p @ z in place (no (k, d) temporary)
        else:
            comp += p @ z.astype(dt)
    return comp


def _gram_columns_task(ctx: _Context, files: Any, lo: int, hi: int, dtype: str) -> np.ndarray:
    """``Z[:, lo:hi] Z[:, lo:hi]^T`` (N, N), upper triangle (Fortran order; ``?syrk``)."""
    from scipy.linalg import blas

    z = _read_columns(ctx, files, lo, hi)
    if np.dtype(dtype) == np.float64:
        return blas.dsyrk(1.0, z.astype(np.float64).T, trans=1, lower=0)
    return blas.ssyrk(1.0, z.T, trans=1, lower=0)


def _components_columns_task(
    ctx: _Context, files: Any, pt: np.ndarray, lo: int, hi: int
) -> np.ndarray:
    """Columns ``lo:hi`` of the components, ``pt @ Z[:, lo:hi]`` (k, hi - lo) (``pt`` (k, N),
    ``(U / s)^T``)."""
    z = _read_columns(ctx, files, lo, hi)
    return pt @ z.astype(pt.dtype, copy=False)


# ----------------------------------------------------------------------------- driver side


def _absolute(path: Path) -> str:
    """The path as the workers should open it: absolute, symbolic links left as they are."""
    return os.path.abspath(os.fspath(path))


@contextlib.contextmanager
def _cluster_errors() -> Iterator[None]:
    """Turn Dask's own failures (a task that killed its workers, a lost scheduler) into one
    :class:`ClusterError` line; w2wkit's errors raised in tasks pass through as they are."""
    try:
        yield
    except W2WError:
        raise
    except Exception as exc:
        from distributed.scheduler import KilledWorker

        if isinstance(exc, KilledWorker):
            raise ClusterError(
                "a task of the fit killed every worker that ran it "
                f"({exc.args[0] if exc.args else 'task'}); out of memory?",
                hint="give the workers more memory, or raise "
                "distributed.scheduler.allowed-failures",
            ) from None
        import asyncio
        import concurrent.futures

        from distributed.comm.core import CommClosedError

        if isinstance(exc, asyncio.CancelledError | concurrent.futures.CancelledError):
            raise ClusterError(
                "the fit's tasks were cancelled on the cluster (was the scheduler restarted?)"
            ) from None
        if isinstance(exc, CommClosedError | OSError | TimeoutError):
            raise ClusterError(f"lost the dask scheduler during the fit ({exc})") from None
        raise


def _in_order(
    client: Client,
    futures: list[Any],
    sizes: Sequence[int],
    stage: str,
    progress: Progress | None,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, result)`` of ``futures`` in index order while reporting progress as any
    of them finish; each result is fetched once and released right after."""
    from distributed import as_completed

    total = int(sum(sizes))
    done_rows = 0
    if progress is not None:
        progress(stage, 0, total)
    ready: set[int] = set()
    index = {f.key: i for i, f in enumerate(futures)}
    nxt = 0
    with _cluster_errors():
        for fut in as_completed(futures):
            i = index[fut.key]
            if fut.status == "error":
                fut.result()  # raises the task's own error
            ready.add(i)
            done_rows += int(sizes[i])
            if progress is not None:
                progress(stage, done_rows, total)
            while nxt in ready:
                result = futures[nxt].result()
                futures[nxt].release()
                ready.discard(nxt)
                yield nxt, result
                nxt += 1


def _row_blocks(n: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous ``(lo, hi)`` row ranges of nearly equal size covering ``range(n)``."""
    count = max(1, min(n, count))
    edges = [round(i * n / count) for i in range(count + 1)]
    return [(edges[i], edges[i + 1]) for i in range(count) if edges[i + 1] > edges[i]]


def scan_files(
    client: Client,
    coll: Collection,
    progress: Progress | None = None,
    *,
    keep_rows: bool = True,
    files_per_task: int = SCAN_FILES,
) -> FileRows:
    """Read, validate and hash every file of ``coll`` on the workers (the cluster scan).

    Parameters
    ----------
    client : distributed.Client
        The cluster.
    coll : Collection
        A collection of files (at least 2); its ``manifest`` and ``families`` are set as
        :meth:`Collection.scan_factors` sets them.
    progress : callable, optional
        ``progress("read", done, total)``.
    keep_rows : bool
        The scan's tasks keep their rows (one float32 block per task, ``BLOCKS_PER_WORKER``
        blocks per worker) in the workers' memory, where the passes use them: the files are
        read once. Dask spills blocks to the workers' local disk past their memory limit and
        recomputes the blocks of a worker that died from the files. False: every pass reads
        the files again (nothing held between passes).
    files_per_task : int
        Files per scan task without ``keep_rows``.

    Returns
    -------
    FileRows
        The layout, the per-coordinate mean and variance, the files and their stamps.

    Raises
    ------
    LayoutError
        Models that do not share one layout (the same message as the single-process scan), or
        of more than one base model family.
    ClusterError
        A worker cannot open a file the driver listed.
    """
    from w2wkit.layout import describe_layout_groups

    if not coll.files:
        raise SpaceError(
            "a cluster fit reads files; this collection holds in-memory adapters",
            param="client",
            hint="fit in-memory adapters without a cluster",
        )
    coll._require_models()
    n = len(coll)
    paths = [_absolute(f) for f in coll.files]
    token = uuid.uuid4().hex[:8]
    if keep_rows:
        blocks = _row_blocks(n, BLOCKS_PER_WORKER * max(1, worker_count(client)))
    else:
        blocks = _row_blocks(n, math.ceil(n / max(1, files_per_task)))
    with _cluster_errors():
        scans = [
            client.submit(
                _scan_task,
                paths[lo:hi],
                coll.format,
                coll.allow_pickle,
                keep_rows,
                key=f"w2wkit-scan-{token}-{b}",
            )
            for b, (lo, hi) in enumerate(blocks)
        ]
        futures = [
            client.submit(_summary, f, key=f"w2wkit-summary-{token}-{b}")
            for b, f in enumerate(scans)
        ]
        sources = (
            [
                client.submit(_pick, f, "rows", key=f"w2wkit-rows-{token}-{b}")
                for b, f in enumerate(scans)
            ]
            if keep_rows
            else None
        )
    del scans  # the row blocks and the summaries keep what they need
    sizes = [hi - lo for lo, hi in blocks]
    manifest: list[dict[str, Any]] = []
    families: list[str] = []
    stamps: list[tuple[int, int]] = []
    fast: list[bool] = []
    template: str | None = None
    groups: dict[str, list[str]] = {}
    layouts: dict[str, Any] = {}
    first: str | None = None
    shift: np.ndarray | None = None
    total = total_sq = None
    count = 0
    for b, res in _in_order(client, futures, sizes, "read", progress):
        lo = blocks[b][0]
        for j, entry in enumerate(res["entries"]):
            entry = dict(entry)
            entry["name"] = coll.names[lo + j]
            entry["file"] = str(coll.files[lo + j])
            entry["row"] = lo + j
            manifest.append(entry)
        families.extend(res["families"])
        stamps.extend(tuple(s) for s in res["stamps"])
        # "fast" means laid out like the block's first kohya file; the column tasks read
        # by the first block's: other blocks' files count only if their template is the same
        if b == 0:
            template = res["template"]
        same = res["template"] is not None and res["template"] == template
        fast.extend(bool(f) and same for f in res["fast"])
        local_first = next(iter(res["groups"]))
        for sig, idx in res["groups"].items():
            groups.setdefault(sig, []).extend(coll.names[lo + i] for i in idx)
            layouts.setdefault(sig, res["layouts"][sig])
        if first is None:
            first = local_first
        if local_first != first or res["count"] == 0:
            continue  # another layout: the scan fails below with the groups
        # merge the block's sums (shifted by its first row) into sums shifted by row 0
        s_b, m = res["shift"], int(res["count"])
        if shift is None:
            shift, total, total_sq = s_b, res["total"].copy(), res["total_sq"].copy()
        else:
            delta = s_b - shift
            total_sq += res["total_sq"] + 2.0 * delta * res["total"] + m * delta * delta
            total += res["total"] + m * delta
        count += m
    coll.manifest = manifest
    coll.families = families
    if len(groups) > 1 or sources is None:
        for fut in sources or ():
            fut.release()
    if len(groups) > 1:
        raise LayoutError(
            f"models do not share one factor layout: {describe_layout_groups(groups, layouts)}",
            hint="the factors representation needs one rank and module set; "
            'use `representation="delta"` (without a cluster)',
        )
    coll.check_one_family()
    assert first is not None and shift is not None and total is not None
    mean_shift = total / n
    mean = shift + mean_shift
    var = np.maximum(total_sq / n - mean_shift**2, 0.0)
    return FileRows(
        files=paths,
        layout=layouts[first],
        mean=mean,
        var=var,
        stamps=stamps,
        format=coll.format,
        allow_pickle=coll.allow_pickle,
        blocks=blocks,
        sources=sources,
        fast=fast,
    )


class _ClusterStream:
    """What the block Krylov solver needs of a stream, for passes that run as tasks."""

    def __init__(self, rows: FileRows, progress: Progress | None) -> None:
        self.n_rows = rows.n_rows
        self.n_cols = rows.dim
        self.progress = progress
        self.n_passes = 0
        self.mean = None
        self.timings: dict[str, float] = {}

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


class _Runner:
    """Submits the pass tasks of one fit: the scattered context, the row blocks, the keys."""

    def __init__(
        self, client: Client, rows: FileRows, mean32: np.ndarray, scale32: np.ndarray
    ) -> None:
        self.client = client
        self.rows = rows
        ctx = _Context(rows.layout, rows.format, rows.allow_pickle, mean32, scale32, rows.files[0])
        with _cluster_errors():
            self.ctx = client.scatter(ctx, broadcast=True, hash=False)
        self.token = uuid.uuid4().hex[:8]
        self.calls = 0
        self.workers = max(1, worker_count(client))
        #: the rows are blocks the workers hold (else every pass reads the files)
        self.held = rows.sources is not None
        if rows.sources is not None:
            self.blocks = list(rows.blocks)
            with _cluster_errors():
                self.sources: list[Any] = [
                    client.submit(_standardise_task, self.ctx, raw, key=self.key("std", b))
                    for b, raw in enumerate(rows.sources)
                ]
            rows.release()  # the raw blocks go once the standardised ones exist
        else:
            self.blocks = _row_blocks(rows.n_rows, BLOCKS_PER_WORKER * self.workers)
            self.sources = [self.files(lo, hi) for lo, hi in self.blocks]

    def close(self) -> None:
        """Let the workers drop the standardised blocks and the context."""
        for fut in [*(f for f in self.sources if not isinstance(f, tuple)), self.ctx]:
            with contextlib.suppress(Exception):
                fut.release()
        self.sources = []

    def key(self, what: str, b: int) -> str:
        return f"w2wkit-{what}-{self.token}-{self.calls}-{b}"

    def scatter(self, a: np.ndarray) -> Any:
        with _cluster_errors():
            return self.client.scatter(a, broadcast=True, hash=False)

    def scatter_object(self, obj: Any) -> Any:
        """One future of ``obj`` on every worker (a list or tuple stays one object)."""
        with _cluster_errors():
            return self.client.scatter([obj], broadcast=True, hash=False)[0]

    def files(self, lo: int, hi: int) -> tuple[list[str], list[tuple[int, int]]]:
        """The source that reads rows ``lo:hi`` from their files."""
        return self.rows.files[lo:hi], self.rows.stamps[lo:hi]


def _make_cluster_krylov(runner: _Runner) -> type:
    """The block Krylov solver whose passes are tasks on the cluster."""
    from w2wkit.solvers import _BlockKrylov

    class _ClusterKrylov(_BlockKrylov):
        def _pass(self, full: bool) -> None:
            stream = self.stream
            q = np.ascontiguousarray(self.basis[-1], dtype=np.float32)
            first = self.sumsq is None
            stream.n_passes += 1
            runner.calls += 1
            t0 = time.perf_counter()
            qf = runner.scatter(q)
            futures = []
            for b, src in enumerate(runner.sources):
                futures.append(
                    runner.client.submit(
                        _krylov_task,
                        runner.ctx,
                        src,
                        qf,
                        full,
                        first,
                        key=runner.key("krylov", b),
                    )
                )
            y = np.empty((stream.n_rows, q.shape[1]), dtype=np.float32)
            w = np.zeros((stream.n_cols, q.shape[1]), dtype=np.float32) if full else None
            sumsq = 0.0
            sizes = [hi - lo for lo, hi in runner.blocks]
            stage = f"randomized: pass {stream.n_passes}"
            for b, (yb, wb, ssb) in _in_order(
                runner.client, futures, sizes, stage, stream.progress
            ):
                lo, hi = runner.blocks[b]
                y[lo:hi] = yb
                if w is not None:
                    w += wb
                sumsq += ssb
                del yb, wb
            with contextlib.suppress(Exception):
                qf.release()
            if first:
                self.sumsq = sumsq
            if len(self.products) < len(self.basis):  # else a half pass computed Z Q already
                self.products.append(y)
            if full:
                self.pending = w
            stream.add_time("passes", time.perf_counter() - t0)

        def full_pass(self) -> None:
            self._pass(True)

        def half_pass(self) -> None:
            self._pass(False)

    return _ClusterKrylov


def _gram_eigenpairs(
    runner: _Runner, stream: _ClusterStream, gram: np.ndarray, k: int, dtype: Any, t0: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, Any]:
    """After the Gram pass that began at ``t0``: the eigenpairs of the upper triangle ``gram``
    (N, N; symmetrised in place) as :func:`w2wkit.solvers._gram_eigen` gives them, the data's
    sum of squares (its trace) and the components' dtype; counts the components pass that
    follows."""
    from w2wkit.solvers import _gram_eigen, _stage, _symmetrize_from_upper

    stream.add_time("gram", time.perf_counter() - t0)
    sumsq = float(np.trace(gram))
    _symmetrize_from_upper(gram)
    if not gram.flags.c_contiguous:
        gram = gram.T  # the same symmetric matrix, C-contiguous
    with _stage(stream, "gram: top-k eigenpairs", "eigen"):  # type: ignore[arg-type]
        u, proj, good, sv = _gram_eigen(gram, k, stream.n_rows, stream.n_cols, dtype)
    runner.calls += 1
    stream.n_passes += 1
    return u, proj, good, sv, sumsq, np.float64 if dtype == np.float64 else np.float32


def _fit_gram_files(runner: _Runner, stream: _ClusterStream, k: int, tile_bytes: int) -> PCAResult:
    """The Gram solver with its block products and its components pass as tasks."""
    from w2wkit.solvers import (
        _GRAM_FLOAT64_MAX_FLOPS,
        _gram_result,
    )

    n, d = stream.n_rows, stream.n_cols
    dtype = np.float64 if float(n) * n * d <= _GRAM_FLOAT64_MAX_FLOPS else np.float32
    itemsize = np.dtype(dtype).itemsize
    if runner.held:
        # the tiles are the row blocks the workers hold; a pair task on another worker than
        # one of its blocks gets it from that worker (no file is read again)
        tiles, sources = runner.blocks, runner.sources
    else:
        tile_rows = max(1, min(n, tile_bytes // max(1, d * itemsize)))
        # at least one tile per worker when the rows allow, never above the tile bytes
        tiles = _row_blocks(n, max(math.ceil(n / tile_rows), min(n, runner.workers)))
        sources = [runner.files(lo, hi) for lo, hi in tiles]
    client = runner.client
    t0 = time.perf_counter()
    runner.calls += 1
    stream.n_passes += 1
    pairs = [(i, j) for i in range(len(tiles)) for j in range(i, len(tiles))]
    futures = []
    for b, (i, j) in enumerate(pairs):
        futures.append(
            client.submit(
                _gram_tile_task,
                runner.ctx,
                sources[i],
                None if i == j else sources[j],
                np.dtype(dtype).name,
                key=runner.key("gram", b),
            )
        )
    gram = np.zeros((n, n), dtype=np.float64)
    sizes = [(tiles[i][1] - tiles[i][0]) * (tiles[j][1] - tiles[j][0]) for i, j in pairs]
    for b, tile in _in_order(client, futures, sizes, "gram: Z Z^T", stream.progress):
        i, j = pairs[b]
        (a0, a1), (b0, b1) = tiles[i], tiles[j]
        gram[a0:a1, b0:b1] = tile
        del tile
    u, proj, good, sv, sumsq, comp_dtype = _gram_eigenpairs(runner, stream, gram, k, dtype, t0)
    del gram
    t0 = time.perf_counter()
    futures = []
    for b, ((lo, hi), src) in enumerate(zip(runner.blocks, runner.sources, strict=True)):
        futures.append(
            client.submit(
                _components_task,
                runner.ctx,
                src,
                np.ascontiguousarray(proj[lo:hi]),
                np.dtype(comp_dtype).name,
                key=runner.key("components", b),
            )
        )
    comp = np.zeros((k, d), dtype=comp_dtype)
    sizes = [hi - lo for lo, hi in runner.blocks]
    for _, part in _in_order(client, futures, sizes, "gram: components", stream.progress):
        comp += part
        del part
    stream.add_time("components", time.perf_counter() - t0)
    return _gram_result(
        comp,
        good,
        u,
        sv,
        stream,  # type: ignore[arg-type]
        sumsq,
        n,
        {"stripes": len(tiles), "tiles": len(pairs), "cluster_workers": runner.workers},
        dtype,
        None,
    )


def _fit_gram_columns_files(runner: _Runner, stream: _ClusterStream, k: int) -> PCAResult:
    """The Gram solver a column chunk at a time, for rows the workers do not hold: a task per
    chunk reads those columns of every file and returns their ``?syrk`` (N x N); the driver
    sums them, solves the eigenproblem, and a second round of tasks returns the components'
    columns. Two reads of the files in all (:func:`w2wkit.solvers.fit_gram_columns` on one
    machine)."""
    from w2wkit.solvers import (
        _GRAM_FLOAT64_MAX_FLOPS,
        _gram_result,
        _upper_added,
    )

    rows = runner.rows
    n, d = stream.n_rows, stream.n_cols
    dtype = np.float64 if float(n) * n * d <= _GRAM_FLOAT64_MAX_FLOPS else np.float32
    client = runner.client
    width = int(min(d, max(1, COLUMN_CHUNK_BYTES // (4 * max(n, 1)))))
    # two chunks per worker when the columns allow (not narrower than 256 for that)
    width = int(min(width, max(256, -(-d // (BLOCKS_PER_WORKER * runner.workers)))))
    chunks = [(lo, min(d, lo + width)) for lo in range(0, d, width)]
    files = runner.scatter_object((rows.files, rows.stamps, rows.fast))
    try:
        t0 = time.perf_counter()
        runner.calls += 1
        stream.n_passes += 1
        futures = [
            client.submit(
                _gram_columns_task,
                runner.ctx,
                files,
                lo,
                hi,
                np.dtype(dtype).name,
                key=runner.key("gram-columns", b),
            )
            for b, (lo, hi) in enumerate(chunks)
        ]
        gram = np.zeros((n, n), dtype=np.float64, order="F")  # the parts' layout
        sizes = [hi - lo for lo, hi in chunks]
        for b, part in _in_order(client, futures, sizes, "gram: column chunks", stream.progress):
            bad = ~np.isfinite(np.diagonal(part))
            if bad.any():
                lo, hi = chunks[b]
                raise SpaceError(
                    f"row {int(np.flatnonzero(bad)[0])} of the data has NaN or infinite "
                    f"values (gram, columns {lo}-{hi})"
                )
            _upper_added(gram, part)
            del part
        u, proj, good, sv, sumsq, comp_dtype = _gram_eigenpairs(runner, stream, gram, k, dtype, t0)
        del gram
        t0 = time.perf_counter()
        pt = runner.scatter(np.ascontiguousarray(proj.T, dtype=comp_dtype))
        futures = [
            client.submit(
                _components_columns_task,
                runner.ctx,
                files,
                pt,
                lo,
                hi,
                key=runner.key("components-columns", b),
            )
            for b, (lo, hi) in enumerate(chunks)
        ]
        comp = np.empty((k, d), dtype=comp_dtype)
        for b, part in _in_order(client, futures, sizes, "gram: components", stream.progress):
            lo, hi = chunks[b]
            comp[:, lo:hi] = part
            del part
        with contextlib.suppress(Exception):
            pt.release()
        stream.add_time("components", time.perf_counter() - t0)
    finally:
        with contextlib.suppress(Exception):
            files.release()
    info = {
        "stripes": 0,
        "column_chunks": [width, width],
        "cluster_workers": runner.workers,
    }
    return _gram_result(
        comp,
        good,
        u,
        sv,
        stream,
        sumsq,
        n,
        info,
        dtype,
        None,  # type: ignore[arg-type]
    )


def fit_pca_files(
    client: Client,
    rows: FileRows,
    n_components: int,
    mean32: np.ndarray,
    scale32: np.ndarray,
    *,
    solver: str = "auto",
    random_state: int | None = 0,
    n_iter: int | None = None,
    block_size: int | None = None,
    progress: Progress | None = None,
    tile_bytes: int = GRAM_TILE_BYTES,
) -> PCAResult:
    """Truncated PCA of the standardised rows ``(row - mean32) / scale32`` of files, on a cluster.

    Parameters
    ----------
    client : distributed.Client
        The cluster; its workers open ``rows.files``.
    rows : FileRows
        From :func:`scan_files`.
    n_components : int
        ``k``.
    mean32, scale32 : numpy.ndarray
        ``(d,)`` float32: each row is standardised as ``(row - mean32) / scale32`` (exactly the
        single-process fit's float32 operations).
    solver : {"auto", "gram", "randomized", "exact"}
        As :func:`w2wkit.solvers.fit_pca`; ``exact`` (small problems) runs as ``gram``.
    random_state, n_iter, block_size
        As :func:`w2wkit.solvers.fit_pca` (randomized).
    progress : callable, optional
        ``progress(stage, done_rows, total_rows)`` as tasks finish.
    tile_bytes : int
        Bytes of the row tile a Gram task holds.

    Returns
    -------
    PCAResult
        As the single-process solver's; ``info["cluster_workers"]`` holds the worker count.
    """
    from w2wkit.solvers import SOLVERS, _randomized_checkpoints, choose_solver

    n, d, k = rows.n_rows, rows.dim, int(n_components)
    if not 1 <= k <= min(n, d):
        raise SpaceError(f"n_components={k} must be between 1 and min(rows, columns) = {min(n, d)}")
    if solver not in SOLVERS:
        raise SpaceError(f"unknown solver '{solver}'", hint=f"choose one of {', '.join(SOLVERS)}")
    if solver == "auto":
        solver = choose_solver(n, d, k)
    if solver == "exact":
        solver = "gram"  # the same decomposition, exact up to rounding of the products
    runner = _Runner(client, rows, mean32, scale32)
    stream = _ClusterStream(rows, progress)
    try:
        if solver == "gram":
            if runner.held:
                return _fit_gram_files(runner, stream, k, tile_bytes)
            return _fit_gram_columns_files(runner, stream, k)
        from w2wkit.solvers import DEFAULT_N_ITER, _NumpyOps

        q = DEFAULT_N_ITER if n_iter is None else n_iter
        for res in _randomized_checkpoints(
            stream,  # type: ignore[arg-type]
            k,
            [q],
            random_state,
            _NumpyOps(),
            block_size=block_size,
            krylov_class=_make_cluster_krylov(runner),
        ):
            assert res.info is not None
            res.info["cluster_workers"] = runner.workers
            return res
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        runner.close()
