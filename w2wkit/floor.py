"""The hardware floor of a fit: compulsory bytes and flops per phase, and their time here.

A fit of ``N`` models of ``d`` numbers with ``k`` components must at least read
the files once and do the products its algorithm is made of. This module counts
them per phase (:func:`fit_floor`), measures the rates of this machine
(:func:`measure_rates`: sequential read of the files, float32 GEMM and SYRK, the
dense symmetric eigensolver; measured once per process, in about a second, and
cached) and turns counts into seconds. A fit with ``profile`` (``w2wkit fit
--profile``) reports its wall time per phase next to that floor
(:func:`profile_table`).

The counts (flops are multiply-adds counted as two, as LAPACK's do)
--------------------------------------------------------------------
``read``
    Every file's bytes once (``file_bytes``; ``4 N d`` when not given), read and
    hashed (the manifest records each file's SHA-256): the slower of the read
    rate and the SHA-256 rate of one thread times the usable cores. (Where the
    page cache's copy is a core's work the two cannot overlap: the profile also
    reports that CPU bound, :meth:`Rates.file_cpu_seconds`, next to the floor.) The read rate
    is the page cache's (the files read twice, the second read timed) unless the
    files outgrow the page cache (more than
    :data:`w2wkit.collection.DIRECT_READ_RAM_FRACTION` of the memory): then no
    read can find them there, and the rate is the disk's, measured with
    ``O_DIRECT`` reads of the same files on
    :data:`w2wkit.collection.DIRECT_READ_THREADS` threads (``cold=True``). Files
    that fit the page cache are counted at the disk's rate for the share of their
    bytes the scan found outside it (``cold`` a float: the fast reader asks the
    kernel of every file it reads, ``_KohyaRows.cold_fraction``), at the page
    cache's for the rest.
``standardize``
    One pass over the ``(N, d)`` float32 rows in memory: mean, variance and the
    in-place ``(x - mean) / scale`` (``3 * 4 N d`` bytes of memory traffic, at
    the measured memory-copy rate).
``gram``
    ``Z Z^T`` by one symmetric product: ``N^2 d`` flops (``?syrk``, half a GEMM).
``eigen``
    Top-``k`` eigenpairs of the ``N x N`` Gram matrix, the cheaper of a dense
    solve (tridiagonal reduction ``4/3 N^3`` plus back-transformation of ``k``
    vectors ``2 N^2 k``, at the measured dense-eigensolver rate) and the block
    Lanczos of :func:`w2wkit.solvers.top_eigh` (``2 N^2 m`` for its ``m = 3k``
    basis plus its orthogonalisation ``4 N m^2``, at the GEMM rate) when it applies.
``components``
    ``U^T Z``: ``2 N k d`` flops.
``passes`` (randomized solver)
    ``n_iter + 1`` reads of the rows (from the models' files or a row cache; at
    the disk's rate when the rows outgrow the page cache) and
    ``(2 n_iter + 1) 2 N d l`` flops;
    a pass costs the larger of its read and its products (they overlap); plus
    the orthogonalisation of the block Krylov basis (``2 d dim^2``).
``delta``
    :func:`delta_floor`: the files read and hashed, the blocked kernel (every
    block product the fit does, float32 or float64 as the fit chose) or, for the
    sketch, every pass that rebuilds and applies it, and the eigenproblem.

The floor of the whole fit is the sum of its phases' floors (they run one after
another).
"""

from __future__ import annotations

import errno
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "PhaseFloor",
    "Profile",
    "Rates",
    "delta_floor",
    "eigen_cost",
    "fit_floor",
    "krylov_basis_columns",
    "measure_rates",
    "profile_table",
]


@dataclass(frozen=True)
class Rates:
    """Rates measured on this machine.

    Attributes
    ----------
    read_bytes_per_s : float
        Sequential read of the files (page cache when they are cached).
    copy_bytes_per_s : float
        Memory traffic of a streaming numpy pass (read + write bytes per second).
    gemm_flops_per_s : float
        float32 GEMM of a data block with a basis block.
    syrk_flops_per_s : float
        float32 ``A A^T`` (counted as ``n^2 m`` flops for ``A`` (n, m)).
    eigh_flops_per_s : float
        Dense symmetric eigensolver (scipy ``evr`` on float32), counted with
        :func:`eigen_cost`'s dense formula.
    dsyrk_flops_per_s : float
        float64 ``A A^T`` (the gram solver's products below
        :data:`GRAM_FLOAT64_MAX_FLOPS`); nan when not measured (then half the
        float32 rate is assumed).
    hash_bytes_per_s : float
        SHA-256 of one thread (the manifest's file hashes); nan when not
        measured (then the hash is not counted).
    dgemm_flops_per_s : float
        float64 GEMM (the delta kernel's block products); nan when not measured
        (then half the float32 GEMM rate is assumed).
    disk_read_bytes_per_s : float
        Read of the files from the disk itself (``O_DIRECT``, around the page
        cache); nan when not measured (then :attr:`read_bytes_per_s` stands).
    touch_bytes_per_s : float
        Fresh memory made ready by one thread (faulted in and zeroed by the kernel, as
        the scan does for rows it holds in memory, :func:`first_touch_rate`); nan when
        not measured.
    """

    read_bytes_per_s: float
    copy_bytes_per_s: float
    gemm_flops_per_s: float
    syrk_flops_per_s: float
    eigh_flops_per_s: float
    dsyrk_flops_per_s: float = math.nan
    hash_bytes_per_s: float = math.nan
    dgemm_flops_per_s: float = math.nan
    disk_read_bytes_per_s: float = math.nan
    touch_bytes_per_s: float = math.nan

    def dgemm(self) -> float:
        """The float64 GEMM rate (half the float32 one when not measured)."""
        d = self.dgemm_flops_per_s
        return d if math.isfinite(d) and d > 0 else self.gemm_flops_per_s / 2

    def read_seconds(self, nbytes: float, cold: bool | float = False) -> float:
        """Floor of reading ``nbytes``: at the page cache's rate, or at the disk's when
        ``cold`` (the bytes outgrow the page cache, or were not in it) and the disk's
        rate was measured. A float ``cold`` is the share of the bytes read from the
        disk (the rest from the page cache)."""
        share = min(max(float(cold), 0.0), 1.0)
        disk = self.disk_read_bytes_per_s
        if not (share and math.isfinite(disk) and disk > 0):
            return nbytes / self.read_bytes_per_s
        return nbytes * (1.0 - share) / self.read_bytes_per_s + nbytes * share / disk

    def file_seconds(
        self, nbytes: float, threads: int | None = None, cold: bool | float = False
    ) -> float:
        """Floor of reading and hashing ``nbytes`` of files: the slower of the
        read (:meth:`read_seconds`) and the SHA-256 spread over ``threads``
        (default: the cores this process may use)."""
        secs = self.read_seconds(nbytes, cold)
        h = self.hash_bytes_per_s
        if math.isfinite(h) and h > 0:
            secs = max(secs, nbytes / (h * (threads or usable_cores())))
        return secs

    def file_cpu_seconds(
        self,
        nbytes: float,
        threads: int | None = None,
        cold: bool | float = False,
        held_bytes: float = 0.0,
    ) -> float:
        """The read phase's CPU bound: the time ``threads`` cores (default: the cores this
        process may use) take to copy ``nbytes`` of files out of the page cache (at
        :attr:`read_bytes_per_s`, one thread), hash them all (at
        :attr:`hash_bytes_per_s`) and make ``held_bytes`` of fresh memory ready for rows
        held in memory (at :attr:`touch_bytes_per_s`), doing nothing else. Bytes that
        come from the disk (``cold``, a share as in :meth:`read_seconds`) are counted as
        moved by the device, as an ``O_DIRECT`` read moves them (read through the page
        cache a core copies them too: the bound stays a lower one). Where the page
        cache's copy is a core's work, as here, the read and the hash cannot overlap as
        :meth:`file_seconds` lets them: this is the bound the read cannot go below on
        this machine (docs/space.md, "Where the time goes"). nan when the hash rate was
        not measured."""
        h = self.hash_bytes_per_s
        if not (math.isfinite(h) and h > 0):
            return math.nan
        share = min(max(float(cold), 0.0), 1.0)
        cpu = nbytes * (1.0 - share) / self.read_bytes_per_s + nbytes / h
        t = self.touch_bytes_per_s
        if held_bytes > 0 and math.isfinite(t) and t > 0:
            cpu += held_bytes / t
        return cpu / (threads or usable_cores())

    def as_dict(self) -> dict[str, float]:
        """The rates as a plain dict."""
        return asdict(self)


_CACHE: dict[Any, Any] = {}


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: block Lanczos of :func:`w2wkit.solvers.top_eigh`: block width (times k, at least
#: ``KRYLOV_MIN_WIDTH``) and number of products; the basis has ``KRYLOV_DEPTH + 1`` blocks
KRYLOV_WIDTH = 0.25
KRYLOV_DEPTH = 11
KRYLOV_MIN_WIDTH = 32
#: the gram solver forms ``Z Z^T`` (and ``U^T Z``) in float64 up to this many flops (N^2 d)
GRAM_FLOAT64_MAX_FLOPS = 2e11


def krylov_basis_columns(n: int, k: int) -> int:
    """Columns of the block Lanczos basis for the top ``k`` of an ``n x n`` matrix; 0 if it
    would not fit in ``n`` columns (then only the dense solver applies)."""
    width = max(KRYLOV_MIN_WIDTH, math.ceil(KRYLOV_WIDTH * k))
    dim = (KRYLOV_DEPTH + 1) * width
    return dim if dim <= n else 0


def _best_time(fn: Any, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return max(best, 1e-9)


def _sample_sizes(paths: Sequence[str | os.PathLike[str]], max_bytes: int) -> list[tuple[str, int]]:
    """``(path, size)`` of the first non-empty readable files, up to ``max_bytes`` of them."""
    sizes: list[tuple[str, int]] = []
    total = 0
    for p in paths:
        try:
            size = os.stat(p).st_size
        except OSError:
            continue
        if size <= 0:
            continue
        sizes.append((os.fspath(p), size))
        total += size
        if total >= max_bytes:
            break
    return sizes


def read_rate(paths: Sequence[str | os.PathLike[str]], max_bytes: int = 64 << 20) -> float:
    """Sequential read rate (bytes/s) of whole files, up to ``max_bytes`` of them.

    The files are read with plain unbuffered reads into one reused buffer (as
    the fit reads them); a file that cannot be read is skipped. Returns nan when
    nothing could be read.
    """
    sizes = _sample_sizes(paths, max_bytes)
    if not sizes:
        return math.nan
    buf = bytearray(max(s for _, s in sizes))
    view = memoryview(buf)

    def read_all() -> int:
        got = 0
        for path, size in sizes:
            try:
                with open(path, "rb", buffering=0) as fh:
                    while True:
                        r = fh.readinto(view[: size + 1])
                        if not r:
                            break
                        got += r
                        if r <= size:
                            break
            except OSError:
                continue
        return got

    read_all()  # the first read may come from disk; the fit's reads are the later ones
    t = time.perf_counter()
    got = read_all()
    return got / max(time.perf_counter() - t, 1e-9)


def disk_read_rate(
    paths: Sequence[str | os.PathLike[str]],
    max_bytes: int = 128 << 20,
    threads: int | None = None,
) -> float:
    """Read rate (bytes/s) of whole files from the disk itself, up to ``max_bytes``.

    Each file is read with ``O_DIRECT`` (around the page cache: cached or not, the
    bytes come from the device) into a page-aligned buffer, ``threads`` files in
    flight (default :data:`w2wkit.collection.DIRECT_READ_THREADS`, as a fit that
    reads files larger than the page cache does); the best of two reads. Returns
    nan where the file system refuses ``O_DIRECT`` or nothing could be read.
    """
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    from w2wkit.collection import DIRECT_READ_THREADS

    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return math.nan
    align = 4096
    sizes = _sample_sizes(paths, max_bytes)
    if not sizes:
        return math.nan
    nthreads = max(1, min(threads or DIRECT_READ_THREADS, len(sizes)))
    span = -(-max(s for _, s in sizes) // align) * align
    bufs = [mmap.mmap(-1, span) for _ in range(nthreads)]
    refused = [False]  # EINVAL: this file system has no O_DIRECT

    def read_part(j: int) -> int:
        view = memoryview(bufs[j])
        got = 0
        for path, size in sizes[j::nthreads]:
            try:
                fd = os.open(path, os.O_RDONLY | flag)
            except OSError as exc:
                refused[0] |= exc.errno == errno.EINVAL
                continue
            try:
                got += os.preadv(fd, [view[: -(-size // align) * align]], 0)
            except OSError as exc:
                refused[0] |= exc.errno == errno.EINVAL
            finally:
                os.close(fd)
        view.release()
        return got

    best = math.inf
    got = 0
    try:
        with ThreadPoolExecutor(nthreads, thread_name_prefix="w2wkit-disk-rate") as pool:
            for _ in range(2):
                t = time.perf_counter()
                got = sum(pool.map(read_part, range(nthreads)))
                best = min(best, time.perf_counter() - t)
    finally:
        for b in bufs:
            b.close()
    if refused[0] or got <= 0:
        return math.nan
    return got / max(best, 1e-9)


def solver_rates(*, refresh: bool = False) -> Rates:
    """Only the rates :func:`eigen_cost` needs, measured once per process.

    The eigensolver choice of every large fit uses them, so they are measured
    apart from the rest of :func:`measure_rates` (which shares them).

    Returns
    -------
    Rates
        ``gemm_flops_per_s`` (float32 GEMM of a data block with a basis block)
        and ``eigh_flops_per_s`` (scipy ``evr``, top quarter of a 1000 x 1000
        float32 matrix, counted with :func:`eigen_cost`'s dense formula); the
        other fields are NaN.
    """
    from scipy.linalg import eigh

    if refresh or "solver" not in _CACHE:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((512, 8192), dtype=np.float32)
        b = rng.standard_normal((8192, 512), dtype=np.float32)
        a @ b
        gemm = 2.0 * 512 * 8192 * 512 / _best_time(lambda: a @ b)
        n = 1000
        x = rng.standard_normal((n, n), dtype=np.float32)
        g = x @ x.T
        sub = [n - n // 4, n - 1]
        t_eig = _best_time(
            lambda: eigh(g, lower=True, subset_by_index=sub, driver="evr", check_finite=False),
            repeats=2,
        )
        _CACHE["solver"] = (gemm, _dense_eigen_flops(n, n // 4) / t_eig)
    gemm, eig_rate = _CACHE["solver"]
    nan = math.nan
    return Rates(nan, nan, gemm, nan, eig_rate, nan)


#: rows of the SYRK the floor's rate is measured on, at most (8192 columns; ~0.8 s a try)
SYRK_PROBE_ROWS = 4096


def first_touch_rate(nbytes: int = 64 << 20) -> float:
    """Bytes per second one thread makes fresh anonymous memory ready: faulted in and
    zeroed by the kernel, the way the scan readies the rows it holds in memory
    (:func:`w2wkit.collection.populate`; a write per page where that is off). Best of 3
    fresh maps; nan when it cannot be measured."""
    from w2wkit.collection import _POPULATE, anon_map, populate

    def once() -> None:
        buf = anon_map(nbytes)
        arr = np.frombuffer(buf, dtype=np.uint8)
        if _POPULATE["on"]:
            populate(arr)
        if not _POPULATE["on"]:
            arr[::4096] = 1
        del arr
        buf.close()

    try:
        once()
        return nbytes / _best_time(once)
    except (OSError, ValueError, BufferError):  # pragma: no cover - no anonymous maps
        return math.nan


def measure_rates(
    paths: Sequence[str | os.PathLike[str]] = (),
    *,
    refresh: bool = False,
    disk: bool = False,
    rows: int | None = None,
) -> Rates:
    """Measure (once per process) the rates the floor is made of.

    Parameters
    ----------
    paths : sequence of path
        Files whose sequential read rate is measured (the first 64 MiB of
        them). Without paths the read rate is the memory-copy rate.
    refresh : bool
        Measure again instead of using the cached rates.
    disk : bool
        Also measure the disk's own read rate of those files
        (:func:`disk_read_rate`, ``Rates.disk_read_bytes_per_s``): for files that
        outgrow the page cache.
    rows : int, optional
        The fit's ``N``: the float32 SYRK rate is measured on ``min(max(N, 1024),``
        :data:`SYRK_PROBE_ROWS` ``)`` rows of 8192 columns instead of 1024. The rate
        grows with ``N`` (here 141 / 156 / 174 GFLOP/s at 1024 / 2048 / 4096 rows, and a
        10,000-row Gram ran at 194): a probe far smaller than the fit's product
        understates it and so overstates the Gram's floor.

    Returns
    -------
    Rates
        The compute rates are cached for the process; the read rate per set of
        first files.
    """

    key = "compute"
    if refresh or key not in _CACHE:
        rng = np.random.default_rng(0)
        # memory traffic: an in-place streaming update of a 64 MiB array
        big = np.ones(16 << 20, dtype=np.float32)
        copy_t = _best_time(lambda: np.subtract(big, np.float32(1.0), out=big))
        copy_rate = 2 * big.nbytes / copy_t
        del big
        solver = solver_rates(refresh=refresh)
        gemm, eig_rate = solver.gemm_flops_per_s, solver.eigh_flops_per_s
        # SYRK: numpy sends a @ a.T to ?syrk
        c = rng.standard_normal((1024, 8192), dtype=np.float32)
        c @ c.T
        syrk = 1024.0 * 1024 * 8192 / _best_time(lambda: c @ c.T)
        c64 = c.astype(np.float64)
        c64 @ c64.T
        dsyrk = 1024.0 * 1024 * 8192 / _best_time(lambda: c64 @ c64.T)
        a64 = c64[:512]
        b64 = np.ascontiguousarray(c64[512:].T)
        a64 @ b64
        dgemm = 2.0 * 512 * 8192 * 512 / _best_time(lambda: a64 @ b64)
        del c, c64, a64, b64
        import hashlib

        blob = rng.bytes(8 << 20)
        sha = len(blob) / _best_time(lambda: hashlib.sha256(blob).digest())
        touch = first_touch_rate()
        _CACHE[key] = (copy_rate, gemm, syrk, eig_rate, dsyrk, sha, dgemm, touch)
    copy_rate, gemm, syrk, eig_rate, dsyrk, sha, dgemm, touch = _CACHE[key]
    m = min(max(int(rows or 0), 1024), SYRK_PROBE_ROWS)
    if m > 1024:
        skey = ("syrk", m)
        if refresh or skey not in _CACHE:
            c = np.random.default_rng(1).standard_normal((m, 8192), dtype=np.float32)
            c @ c.T
            _CACHE[skey] = float(m) * m * 8192 / _best_time(lambda: c @ c.T, repeats=2)
            del c
        syrk = max(syrk, _CACHE[skey])
    files = tuple(os.fspath(p) for p in list(paths)[:256])
    rkey = ("read", files)
    if refresh or rkey not in _CACHE:
        rate = read_rate(files) if files else math.nan
        _CACHE[rkey] = rate if math.isfinite(rate) and rate > 0 else copy_rate / 2
    disk_rate = math.nan
    if disk and files:
        dkey = ("disk", files)
        if refresh or dkey not in _CACHE:
            _CACHE[dkey] = disk_read_rate(files)
        disk_rate = _CACHE[dkey]
    return Rates(_CACHE[rkey], copy_rate, gemm, syrk, eig_rate, dsyrk, sha, dgemm, disk_rate, touch)


def _dense_eigen_flops(n: int, k: int) -> float:
    return 4.0 / 3.0 * n**3 + 2.0 * n * n * k


def eigen_cost(n: int, k: int, rates: Rates) -> tuple[str, float, float]:
    """The cheaper top-``k`` eigensolver of an ``n x n`` matrix at ``rates``.

    Returns
    -------
    method : str
        ``"dense"`` or ``"krylov"`` (the methods of :func:`w2wkit.solvers.top_eigh`).
    flops : float
    seconds : float
    """
    dense_flops = _dense_eigen_flops(n, k)
    best = ("dense", dense_flops, dense_flops / rates.eigh_flops_per_s)
    m = krylov_basis_columns(n, k)
    if m:
        # products A Q (2 n^2 m), two orthogonalisation rounds against the basis
        # (~4 n m^2 on average), the Ritz step (dense m x m) and the vectors (2 n m k)
        kry = 2.0 * n * n * m + 4.0 * n * m * m + 2.0 * n * m * k
        seconds = kry / rates.gemm_flops_per_s + _dense_eigen_flops(m, m) / rates.eigh_flops_per_s
        if seconds < best[2]:
            best = ("krylov", kry + _dense_eigen_flops(m, m), seconds)
    return best


@dataclass
class PhaseFloor:
    """One phase of a fit: its compulsory work and its floor time.

    Attributes
    ----------
    name : str
    bytes : float
        Bytes the phase must read (files or memory).
    flops : float
    seconds : float
        ``max(bytes / rate, flops / rate)`` at the measured rates.
    """

    name: str
    bytes: float
    flops: float
    seconds: float


def fit_floor(
    solver: str,
    n: int,
    d: int,
    k: int,
    rates: Rates,
    *,
    file_bytes: float | None = None,
    n_iter: int = 6,
    block_size: int | None = None,
    cold_files: bool | float = False,
    cold_rows: bool = False,
) -> list[PhaseFloor]:
    """Compulsory bytes, flops and floor seconds per phase of a factors fit.

    Parameters
    ----------
    solver : {"gram", "randomized", "exact"}
        The solver the fit uses (after ``auto``).
    n, d, k : int
        Models, row length, components.
    rates : Rates
    file_bytes : float, optional
        Total size of the files (default ``4 n d``).
    n_iter : int
        Randomized solver: full passes.
    block_size : int, optional
        Randomized solver: block width (default about ``k / 2 + min(50, k / 20)``).
    cold_files, cold_rows : bool
        The files (the rows a pass reads) outgrow the page cache: they are read at
        the disk's rate (``rates.disk_read_bytes_per_s``, where measured). A float
        ``cold_files`` is the share of the files' bytes the scan found outside the
        page cache (:meth:`Rates.read_seconds`).

    Returns
    -------
    list of PhaseFloor
        In the order the fit runs them; see the module docstring.
    """
    n, d, k = int(n), int(d), int(k)
    data = 4.0 * n * d
    fb = data if file_bytes is None else float(file_bytes)
    phases = [PhaseFloor("read", fb, 0.0, rates.file_seconds(fb, cold=cold_files))]
    traffic = 3.0 * data
    phases.append(PhaseFloor("standardize", traffic, 0.0, traffic / rates.copy_bytes_per_s))
    if solver == "gram":
        g = float(n) * n * d
        wide = g <= GRAM_FLOAT64_MAX_FLOPS  # float64 products: half the float32 rates
        d64 = rates.dsyrk_flops_per_s
        syrk = (d64 if math.isfinite(d64) else rates.syrk_flops_per_s / 2) if wide else None
        slow = (syrk / rates.syrk_flops_per_s) if syrk else 1.0
        phases.append(PhaseFloor("gram", data, g, g / (syrk or rates.syrk_flops_per_s)))
        _, ef, es = eigen_cost(n, k, rates)
        phases.append(PhaseFloor("eigen", 8.0 * n * n, ef, es))
        cf = 2.0 * n * k * d
        phases.append(PhaseFloor("components", data, cf, cf / (rates.gemm_flops_per_s * slow)))
    elif solver == "randomized":
        q = int(n_iter)
        width = block_size or (-(-k // 2) + max(10, min(50, k // 20)))
        width = min(width, n, d)
        per_pass_read = rates.read_seconds(data, cold_rows)
        # pass 1..q: Z Q and Z^T Y (4 N d l); the last half pass: Z Q (2 N d l)
        seconds = 0.0
        flops = 0.0
        for j in range(q + 1):
            f = (2.0 if j == q else 4.0) * n * d * width
            flops += f
            seconds += max(per_pass_read, f / rates.gemm_flops_per_s)
        dim = (q + 1) * width
        # the block Krylov basis: each new block of l columns (length d) orthogonalised
        # against the basis so far, twice (~ 2 * 2 d l dim_j each): ~ 2 d dim^2 in all
        ortho = 2.0 * d * dim * dim
        flops += ortho
        seconds += ortho / rates.gemm_flops_per_s
        phases.append(PhaseFloor("passes", (q + 1) * data, flops, seconds))
        # Ritz step: (Z K)^T (Z K) (a SYRK, float64 while N dim^2 <= GRAM_FLOAT64_MAX_FLOPS
        # as the solver does), its eigenproblem, the outputs K G and (Z K) G
        tf = float(n) * dim * dim
        d64 = rates.dsyrk_flops_per_s
        if tf <= GRAM_FLOAT64_MAX_FLOPS:
            t_rate = d64 if math.isfinite(d64) else rates.syrk_flops_per_s / 2
        else:
            t_rate = rates.syrk_flops_per_s
        of = 2.0 * (n + d) * dim * k
        ef = _dense_eigen_flops(dim, k)
        phases.append(
            PhaseFloor(
                "ritz",
                0.0,
                tf + of + ef,
                tf / t_rate + of / rates.gemm_flops_per_s + ef / rates.eigh_flops_per_s,
            )
        )
    else:  # exact: one float64 SVD of the rows (~4 N^2 d + 8 N^3 at a quarter of GEMM)
        f = 4.0 * n * n * d + 8.0 * float(n) ** 3
        phases.append(PhaseFloor("svd", 2 * data, f, f / (rates.gemm_flops_per_s / 4)))
    return phases


@dataclass
class Profile:
    """Wall time per phase of one fit, next to its floor.

    Attributes
    ----------
    phases : dict of str to float
        Seconds per phase, in the order they ran.
    floor : list of PhaseFloor
        The floor of the same phases (empty until :meth:`set_floor`).
    rates : Rates or None
    """

    phases: dict[str, float] = field(default_factory=dict)
    floor: list[PhaseFloor] = field(default_factory=list)
    rates: Rates | None = None
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to phase ``name``."""
        self.phases[name] = self.phases.get(name, 0.0) + float(seconds)

    def phase(self, name: str) -> _PhaseTimer:
        """Context manager timing one phase: ``with profile.phase("gram"): ...``."""
        return _PhaseTimer(self, name)

    def set_floor(self, floor: list[PhaseFloor], rates: Rates) -> None:
        """Record the floor the phases are compared with."""
        self.floor = list(floor)
        self.rates = rates

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: phases with wall, floor and multiple; totals; the rates."""
        floors = {p.name: p for p in self.floor}
        rows = []
        for name, secs in self.phases.items():
            f = floors.get(name)
            rows.append(
                {
                    "phase": name,
                    "seconds": secs,
                    "floor_seconds": None if f is None else f.seconds,
                    "multiple": None if f is None or f.seconds <= 0 else secs / f.seconds,
                    "bytes": None if f is None else f.bytes,
                    "flops": None if f is None else f.flops,
                }
            )
        wall = sum(self.phases.values())
        floor = sum(p.seconds for p in self.floor)
        return {
            "phases": rows,
            "wall_seconds": wall,
            "floor_seconds": floor,
            "multiple": wall / floor if floor > 0 else None,
            "rates": None if self.rates is None else self.rates.as_dict(),
        }


class _PhaseTimer:
    def __init__(self, profile: Profile, name: str) -> None:
        self.profile, self.name = profile, name

    def __enter__(self) -> None:
        self.t = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.profile.add(self.name, time.perf_counter() - self.t)


def profile_table(profile: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows ``(phase, wall, floor, multiple)`` of a :meth:`Profile.as_dict`, as text."""

    def fmt(x: float | None, unit: str = " s") -> str:
        return "-" if x is None else f"{x:.2f}{unit}"

    out = [
        (r["phase"], fmt(r["seconds"]), fmt(r["floor_seconds"]), fmt(r["multiple"], "x"))
        for r in profile["phases"]
    ]
    out.append(
        (
            "total",
            fmt(profile["wall_seconds"]),
            fmt(profile["floor_seconds"]),
            fmt(profile["multiple"], "x"),
        )
    )
    return out


def delta_floor(
    factors: Any,
    k: int,
    rates: Rates,
    *,
    file_bytes: float | None = None,
    solver: str = "gram",
    blocks: Mapping[str, tuple[Sequence[int], bool]] | None = None,
    sketch_columns: int = 0,
    passes: int = 1,
    cold_files: bool = False,
) -> list[PhaseFloor]:
    """Work of a delta-representation fit (kernel PCA on the factor Gram), as its
    blocked algorithm does it.

    Parameters
    ----------
    factors : object
        Has ``modules``, ``out_features`` (module -> int), ``in_shape`` (module ->
        tuple), ``n_models`` and either ``total_rank`` (module -> summed rank over
        the models) or ``up`` (module -> (out, R) array).
    k : int
    rates : Rates
    file_bytes : float, optional
        Total size of the files (default: the float32 factors).
    solver : {"gram", "gram-sketch"}
        ``gram``: the ``N x N`` kernel once, then its eigenpairs;
        ``gram-sketch``: ``passes`` applications of the kernel, rebuilt from the
        factors each time, to ``N x sketch_columns`` blocks.
    blocks : mapping, optional
        Module -> (rank-one terms of each block of models, whether the module's
        stack is read once): the blocks the fit used (default: one block per
        module, read once).
    sketch_columns, passes : int
        ``gram-sketch``: columns of the sketch and kernel applications.
    cold_files : bool
        The files outgrow the page cache: they (and the kernel's reads of them)
        are read at the disk's rate (``rates.disk_read_bytes_per_s``, where measured).

    Returns
    -------
    list of PhaseFloor
        ``read`` (the files once, read and hashed), ``gram`` and ``eigen``.

    Notes
    -----
    ``gram`` counts, per module with ``R`` terms in blocks ``T_a``: the centred
    sum of squares (the summed delta, ``2 R out in`` flops at the module's kernel
    precision); per kernel
    build every pair of blocks ``a <= b``, ``2 T_a T_b (in + out)`` flops (a
    diagonal block is a full product), at the float32 GEMM rate for a module whose
    ``factors.kernel_dtype(m)`` is ``"float32"``, else the float64 one; and the
    factor bytes read for it (once for a module read whole, else block ``a`` and
    every later block for each ``a``) at the read rate, overlapped with the
    products. ``gram-sketch`` adds per pass the product of each module's kernel
    with the sketch (``2 N^2 c`` flops) and a QR of it (``4 N c^2``), and its
    small ``c x c`` eigenproblem; ``eigen`` is then empty (it is timed in
    ``gram``). ``gram``'s ``eigen`` is :func:`eigen_cost`.
    """
    n = int(factors.n_models)
    dgemm = rates.dgemm()
    ss_flops = 0.0
    kernel_flops = 0.0
    kernel_eq = 0.0
    ss_eq = 0.0
    kernel_bytes = 0.0
    fbytes = 0.0
    for m in factors.modules:
        r = factors.total_rank[m] if hasattr(factors, "total_rank") else int(factors.up[m].shape[1])
        out_f = int(factors.out_features[m])
        in_f = math.prod(factors.in_shape[m])
        size = out_f + in_f
        fbytes += 4.0 * r * size
        f32 = hasattr(factors, "kernel_dtype") and factors.kernel_dtype(m) == "float32"
        # work in float64-GEMM-equivalent flops (float32 runs at the sgemm rate)
        rate_scale = dgemm / rates.gemm_flops_per_s if f32 else 1.0
        ss_flops += 2.0 * r * out_f * in_f
        ss_eq += 2.0 * r * out_f * in_f * rate_scale
        terms, whole = (list(blocks[m][0]), bool(blocks[m][1])) if blocks else ([r], True)
        for a, ta in enumerate(terms):
            mflops = sum(2.0 * ta * tb * size for tb in terms[a:])
            kernel_flops += mflops
            kernel_eq += mflops * rate_scale
        if whole:
            kernel_bytes += 4.0 * r * size
        else:
            kernel_bytes += sum(4.0 * size * sum(terms[a:]) for a in range(len(terms)))
    fb = fbytes if file_bytes is None else float(file_bytes)
    ss_s = ss_eq / dgemm
    if solver == "gram-sketch":
        c = int(sketch_columns)
        q = max(int(passes), 1)
        apply_flops = 2.0 * n * n * c * len(factors.modules)
        qr_flops = 4.0 * n * c * c
        per_pass = max(
            rates.read_seconds(kernel_bytes, cold_files), (kernel_eq + apply_flops) / dgemm
        )
        small = _dense_eigen_flops(c, c)
        flops = ss_flops + q * (kernel_flops + apply_flops + qr_flops) + small
        secs = ss_s + q * (per_pass + qr_flops / rates.gemm_flops_per_s)
        secs += small / rates.eigh_flops_per_s
        return [
            PhaseFloor("read", fb, 0.0, rates.file_seconds(fb, cold=cold_files)),
            PhaseFloor("gram", q * kernel_bytes, flops, secs),
            PhaseFloor("eigen", 0.0, 0.0, 0.0),
        ]
    _, ef, es = eigen_cost(n, k, rates)
    gram_s = ss_s + max(rates.read_seconds(kernel_bytes, cold_files), kernel_eq / dgemm)
    return [
        PhaseFloor("read", fb, 0.0, rates.file_seconds(fb, cold=cold_files)),
        PhaseFloor("gram", kernel_bytes, ss_flops + kernel_flops, gram_s),
        PhaseFloor("eigen", 8.0 * n * n, ef, es),
    ]
