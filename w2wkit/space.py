"""The weight space: PCA over a collection of LoRAs (:class:`WeightSpace`).

Two representations
-------------------
``"factors"`` (the paper's)
    Each model is the concatenation, per module, of its ``down`` (A) and
    ``up`` (B) factors (see :class:`~w2wkit.layout.WeightLayout`). Coordinates
    are standardised (mean and ``ddof=0`` standard deviation over the models;
    a standard deviation below ``scale_floor`` times the root-mean-square of
    all of them is raised to that floor, so a scale is never zero, negative or
    NaN). PCA of the standardised ``(N, d)`` matrix is done by
    :func:`w2wkit.solvers.fit_pca` from row blocks streamed off a disk cache.
    Valid when every model shares ranks, modules and the factor gauge (same
    initialisation seed): a gauge change ``A -> G A, B -> B G^-1`` keeps every
    delta but moves the point.
``"delta"`` (gauge-invariant)
    Each model is its per-layer deltas ``scale * B @ A``. The deltas are never
    materialised: the inner product of two models is a sum over modules of
    ``sum((B_i^T B_j) * (A_i A_j^T))`` (r x r products), which gives the
    ``N x N`` Gram matrix; PCA is kernel PCA on the centred Gram matrix
    (:func:`w2wkit.solvers.top_eigh`). A component is a combination of the
    training models (``beta`` weights); the training factors are kept in the
    space. Reconstruction writes each layer at a chosen rank by a truncated
    SVD of the implicit delta (QR of the stacked factors, SVD of the small
    core) and reports the energy kept. ``standardize`` scales each *layer* by
    the root-mean-square standard deviation of its entries. Cost: the Gram
    matrix needs ``O(N^2 r^2 (in + out))`` per module and the space holds
    all training factors.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.collection import Collection, DeltaFactors, layer_factors
from w2wkit.edits import Direction, edit
from w2wkit.errors import LayoutError, SpaceError
from w2wkit.layout import WeightLayout
from w2wkit.persist import FORMAT_VERSION, load_space, save_space
from w2wkit.solvers import SOLVERS

__all__ = [
    "DEFAULT_COMPONENTS",
    "FORMAT_VERSION",  # defined in w2wkit.persist (the space's file), re-exported
    "Direction",  # defined in w2wkit.edits, public home w2wkit.directions; re-exported
    "WeightSpace",
    "compress_factors",
    "validate_energy",
    "validate_rank",
]

REPRESENTATIONS = ("factors", "delta")


# --------------------------------------------------------------------- helpers
def compress_factors(
    up: np.ndarray, down: np.ndarray, rank: int | None, energy: float | None = None
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Best rank-``rank`` factorisation of ``up @ down`` without forming it.

    Parameters
    ----------
    up : numpy.ndarray
        ``(out, R)``.
    down : numpy.ndarray
        ``(R, in)``.
    rank : int or None
        Target rank; the result is zero-padded when the product has lower
        rank. With ``energy`` it is an upper bound (None: no bound).
    energy : float, optional
        Choose the rank: the smallest one whose truncation keeps at least this
        fraction of the squared Frobenius norm (at least 1).

    Returns
    -------
    new_up : numpy.ndarray
        ``(out, rank)`` float32.
    new_down : numpy.ndarray
        ``(rank, in)`` float32 (singular values split evenly between both).
    kept : float
        Squared Frobenius norm of the truncated product.
    total : float
        Squared Frobenius norm of ``up @ down``.
    """
    out, r_in = up.shape[0], down.shape[1]
    if up.shape[1] == 0:
        r0 = 1 if rank is None else rank
        return np.zeros((out, r0), np.float32), np.zeros((r0, r_in), np.float32), 0.0, 0.0
    qu, ru = np.linalg.qr(np.asarray(up, dtype=np.float64))
    qd, rd = np.linalg.qr(np.asarray(down, dtype=np.float64).T)
    p, s, wt = np.linalg.svd(ru @ rd.T, full_matrices=False)
    return _truncate(qu, p, s, wt, qd, out, r_in, rank, energy)


def compress_dense(
    dense: np.ndarray, rank: int | None, energy: float | None = None
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """:func:`compress_factors` of a dense ``(out, in)`` matrix (one SVD of it)."""
    out, r_in = dense.shape
    p, s, wt = np.linalg.svd(np.asarray(dense, dtype=np.float64), full_matrices=False)
    return _truncate(None, p, s, wt, None, out, r_in, rank, energy)


def _truncate(
    qu: np.ndarray | None,
    p: np.ndarray,
    s: np.ndarray,
    wt: np.ndarray,
    qd: np.ndarray | None,
    out: int,
    r_in: int,
    rank: int | None,
    energy: float | None,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The best rank-``rank`` factors of ``(qu p) diag(s) (wt qd^T)`` (``qu``/``qd``
    None: identity), singular values split evenly; see :func:`compress_factors`."""
    if energy is not None:
        cum = np.cumsum(s**2)
        need = int(np.searchsorted(cum, energy * cum[-1] * (1.0 - 1e-12))) + 1
        rank = need if rank is None else max(1, min(need, rank))
    if rank is None:
        raise SpaceError("compress_factors needs a rank or an energy")
    new_up = np.zeros((out, rank), dtype=np.float32)
    new_down = np.zeros((rank, r_in), dtype=np.float32)
    r = min(rank, int(s.size))
    root = np.sqrt(s[:r])
    left = p[:, :r] if qu is None else qu @ p[:, :r]
    right = wt[:r] if qd is None else wt[:r] @ qd.T
    new_up[:, :r] = left * root
    new_down[:r] = root[:, None] * right
    return new_up, new_down, float(np.sum(s[:r] ** 2)), float(np.sum(s**2))


def validate_rank(rank: Any) -> None:
    """Raise :class:`SpaceError` (``param="rank"``) unless ``rank`` is None or an integer >= 1.

    A rank-0 layer has no parameters: a file of them is a model that changes nothing.
    """
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
        raise SpaceError(f"must be an integer >= 1, got {rank!r}", param="rank")


def validate_energy(energy: float | None, representation: str) -> None:
    """Raise :class:`SpaceError` unless ``energy`` is None or lies in (0, 1] for a delta space."""
    if energy is None:
        return
    if not 0.0 < float(energy) <= 1.0:
        raise SpaceError(f"energy must lie in (0, 1], got {energy}", param="energy")
    if representation != "delta":
        raise SpaceError(
            "energy chooses the rank of re-compressed layers: only a delta space has them",
            hint="a factors space writes the layout's rank exactly",
        )


def _segment_sum(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Sum the last axis of ``values`` by ``owner`` (sorted) into ``n`` bins."""
    if values.ndim == 1:
        return np.bincount(owner, weights=values, minlength=n)
    out = np.zeros((*values.shape[:-1], n))
    if owner.size == 0:
        return out
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    out[..., owner[starts]] = np.add.reduceat(values, starts, axis=-1)
    return out


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    # one bar, on stderr, for the phase under way (a new phase hides the last one's; the
    # solvers report many short passes); nothing on a log or a pipe, nothing left at the end
    from w2wkit.progress import Tasks

    with Tasks(enabled, one_at_a_time=True, terminal_only=True) as tasks:
        if not tasks.enabled:
            yield None
            return
        bars: dict[str, Callable[[int, int], None]] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = tasks.task(stage, total)
            bars[stage](done, total)

        yield update


def _sign_flip(scores: np.ndarray) -> np.ndarray:
    """Signs making the largest-magnitude score of each component positive."""
    idx = np.argmax(np.abs(scores), axis=0)
    signs = np.sign(scores[idx, np.arange(scores.shape[1])])
    signs[signs == 0] = 1.0
    return signs


def _as_2d(coefficients: np.ndarray, k: int) -> np.ndarray:
    c = np.asarray(coefficients, dtype=np.float64)
    if c.ndim == 1:
        c = c[None, :]
    if c.ndim != 2 or c.shape[1] != k:
        raise SpaceError(f"coefficients have shape {np.shape(coefficients)}, need (n, {k})")
    if not np.isfinite(c).all():
        raise SpaceError("coefficients contain NaN or Inf")
    return c


# ------------------------------------------------------------------ the space
#: Components of a space when ``n_components`` is not given (the paper's 1000),
#: capped at ``N - 1`` by :class:`WeightSpace`.
DEFAULT_COMPONENTS = 1000

#: A factors fit whose rows would fit in memory leaves them in the row cache on disk (the
#: Gram over column chunks) when that holds at most this fraction of what holding them
#: does: it costs time at a few thousand rows and saves half the memory at 10,000
#: (benchmarks/README.md, "10k, rows held or streamed").
STREAM_MEMORY_RATIO = 0.55


class WeightSpace:
    """A linear space of models fitted on a collection of LoRAs.

    Parameters
    ----------
    n_components : int or None
        Number of principal components ``k`` (at most ``N - 1``). ``None``
        (the default): the paper's :data:`DEFAULT_COMPONENTS` (1000), capped at
        ``N - 1`` and at the model dimension ``d``.
    representation : {"factors", "delta"}
        See the module docstring.
    standardize : bool
        Factors: per-coordinate standardisation (the paper's). Delta:
        per-layer scaling.
    solver : {"auto", "exact", "gram", "randomized"}
        Factors representation: passed to :func:`w2wkit.solvers.fit_pca`.
        The delta representation always uses the Gram matrix.
    random_state : int, optional
        Seed of randomised solvers.
    device : str
        ``"cpu"`` or ``"cuda"`` (solvers only).
    block_rows : int, optional
        Rows per streamed block (default: about 64 MiB per block).
    scale_floor : float
        Relative floor of the per-coordinate (per-layer) scale.
    row_cache : bool
        Factors fits that stream whole rows (the randomized solver's passes): write the
        rows once to a row cache on disk (the collection's ``cache_dir`` or the temporary
        folder) and read it on every pass (the default, and the faster: 597 s against
        695-723 s for 65,000 SD1.5 LoRAs on a 23 GB machine, about even at 8,000), or,
        with ``False``, read them from the models' own files on every pass: no temporary
        space the size of the data. Either is read around the page cache (``O_DIRECT``)
        when it outgrows the memory. While the files fit the page cache they are read in
        place whatever this says, by the Gram over column chunks (its chunks then come
        from their cached pages: 10,000 SD1.5 LoRAs 81.0-81.5 s against 84.5-85.4 s
        through a row cache) and by the randomized passes (30,000 cold: 346-348 s against
        347-364 s, and no 12.8 GB of temporary space); a row cache otherwise unless this
        is ``False``.

    Attributes
    ----------
    layout_ : WeightLayout
        Layout of the models the space writes.
    mean_ : numpy.ndarray or None
        ``(d,)`` float32 mean row (factors; ``None`` for delta, whose mean is
        implicit).
    scale_ : numpy.ndarray
        ``(d,)`` float32 per-coordinate scale (factors) or ``(L,)`` float64
        per-layer scale (delta, layers in ``delta_modules_`` order).
    components_ : numpy.ndarray or None
        ``(k, d)`` float32 orthonormal rows (factors; ``None`` for delta).
    singular_values_, explained_variance_, explained_variance_ratio_ : numpy.ndarray
        ``(k,)`` float64.
    coefficients_ : numpy.ndarray
        ``(N, k)`` float32 coefficients of the training models.
    coef_mean_, coef_std_ : numpy.ndarray
        ``(k,)`` float64 mean and standard deviation (``ddof=1``) of them.
    manifest_ : list of dict
        ``{"name", "file", "format", "sha256", "row"}`` per training model.
    labels_ : dict of str to numpy.ndarray or None
        ``attribute -> (N,)`` float64 (NaN missing).
    directions_ : dict of str to Direction
    n_components_ : int
    last_energy_ : list of dict
        Energy kept by the last delta-mode reconstruction, per adapter:
        ``{"overall": float, "layers": {module: float}}``.
    """

    def __init__(
        self,
        n_components: int | None = None,
        *,
        representation: str = "factors",
        standardize: bool = True,
        solver: str = "auto",
        random_state: int | None = 0,
        device: str = "cpu",
        block_rows: int | None = None,
        scale_floor: float = 1e-6,
        row_cache: bool = True,
    ) -> None:
        self.n_components = n_components
        self.representation = representation
        self.standardize = standardize
        self.solver = solver
        self.random_state = random_state
        self.device = device
        self.block_rows = block_rows
        self.scale_floor = scale_floor
        self.row_cache = row_cache
        self.directions_: dict[str, Direction] = {}
        self.labels_: dict[str, np.ndarray] | None = None
        self.last_energy_: list[dict[str, Any]] = []
        self.info_: dict[str, Any] = {}

    def __repr__(self) -> str:
        fitted = f", fitted on {len(self.manifest_)} models" if self.is_fitted else ""
        return (
            f"WeightSpace(n_components={self.n_components}, "
            f"representation={self.representation!r}{fitted})"
        )

    @property
    def is_fitted(self) -> bool:
        """True after :meth:`fit` or :meth:`load`."""
        return hasattr(self, "coefficients_")

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise SpaceError("the space is not fitted yet; call fit() or WeightSpace.load()")

    def _check_params(self) -> None:
        if self.representation not in REPRESENTATIONS:
            raise SpaceError(
                f"unknown representation {self.representation!r}; use factors or delta"
            )
        if self.solver not in SOLVERS:
            raise SpaceError(f"unknown solver {self.solver!r}; use {', '.join(SOLVERS)}")
        if self.n_components is None:
            return
        if (
            isinstance(self.n_components, bool)
            or not isinstance(self.n_components, int | np.integer)
            or self.n_components < 1
        ):
            raise SpaceError(
                f"must be a positive integer, got {self.n_components!r}", param="n_components"
            )

    def _check_k(self, n: int, d: int) -> int:
        if self.n_components is None:  # the one place the N-1 policy lives
            return max(1, min(DEFAULT_COMPONENTS, n - 1, d))
        k = int(self.n_components)
        if k > n - 1:
            raise SpaceError(
                f"{k} exceeds N-1={n - 1} for a collection of {n} models",
                param="n_components",
                hint=f"use `n_components={n - 1}` or fewer",
            )
        if k > d:
            raise SpaceError(f"{k} exceeds the model dimension d={d}", param="n_components")
        return k

    # -------------------------------------------------------------------- fit
    def fit(
        self,
        collection: Collection | str | os.PathLike[str] | Sequence[Any],
        *,
        labels: str | os.PathLike[str] | dict[str, Any] | None = None,
        progress: bool = False,
        profile: bool = False,
        client: Any = None,
    ) -> WeightSpace:
        """Fit the space.

        Parameters
        ----------
        collection : Collection, path, glob, list of paths or list of Adapter
            The training models (``N >= 2``).
        labels : path or dict, optional
            Attribute labels (CSV/JSON, see :func:`w2wkit.labels.read_labels`)
            or ``attribute -> (N,)`` values.
        progress : bool
            Show rich progress bars.
        profile : bool
            Also measure this machine's rates (:func:`w2wkit.floor.measure_rates`,
            about a second) and record, in ``info_["profile"]``, the wall time
            of each phase of the fit next to its floor
            (:meth:`w2wkit.floor.Profile.as_dict`). The phase times alone are
            always in ``info_["timings"]``.
        client : distributed.Client or str, optional
            Run the scan and every solver pass as tasks on a Dask cluster (a Client, or a
            ``--cluster`` value: ``local:N``, ``tcp://HOST:PORT``, a scheduler file); see
            :mod:`w2wkit.clusterfit` and ``docs/scale.md``. The workers open the files
            themselves: they must see them at the same paths. Factors representation, a
            collection of files, device ``cpu``. The result equals the single-process fit's
            up to the rounding of the products. Without it, dask is not imported.

        Returns
        -------
        WeightSpace
            ``self``.
        """
        import time

        self._check_params()
        coll = _as_collection(collection)
        if client is not None:
            self._check_cluster_fit(coll)
        t0 = time.perf_counter()
        with _progress_bar(progress) as cb:
            if client is not None:
                from w2wkit.cluster import open_client

                with open_client(client) as dask_client:
                    self._fit_factors(coll, cb, dask_client)
            elif self.representation == "factors":
                self._fit_factors(coll, cb)
            else:
                self._fit_delta(coll, cb)
        self.manifest_ = list(coll.manifest)
        self.n_components_ = int(self.coefficients_.shape[1])
        self.coef_mean_ = self.coefficients_.mean(axis=0, dtype=np.float64)
        self.coef_std_ = self.coefficients_.std(axis=0, ddof=1, dtype=np.float64)
        self.labels_ = None
        self.directions_ = {}
        if labels is not None:
            self.set_labels(labels)
        self.info_["wall_seconds"] = time.perf_counter() - t0
        if profile:
            self.info_["profile"] = self._profile(coll)
        return self

    def set_labels(self, labels: str | os.PathLike[str] | dict[str, Any]) -> None:
        """Attach attribute labels of the training models (file or dict)."""
        self._check_fitted()
        n = len(self.manifest_)
        if isinstance(labels, dict):
            out = {}
            for key, vals in labels.items():
                arr = np.asarray(vals, dtype=np.float64).reshape(-1)
                if arr.shape != (n,):
                    raise SpaceError(f"labels for {key!r} have {arr.size} values, need {n}")
                if np.isinf(arr).any():
                    row = int(np.flatnonzero(np.isinf(arr))[0])
                    raise SpaceError(
                        f"label {key!r} of model {row} is {arr[row]} (NaN marks a missing "
                        "label; infinite values are refused)",
                        param="labels",
                    )
                out[str(key)] = arr
            self.labels_ = out
        else:
            from w2wkit.labels import read_labels

            self.labels_ = read_labels(labels, self.names_)

    @property
    def names_(self) -> list[str]:
        """Names of the training models in row order."""
        return [str(e["name"]) for e in self.manifest_]

    @property
    def training_prompt_(self) -> str | None:
        """The instance prompt every training model names in its metadata, else ``None``.

        Read from the files' metadata at fit time (see
        :data:`w2wkit.collection.PROMPT_METADATA_KEYS`); ``None`` when any model
        lacks it or the models disagree. Inversion uses it as its default prompt.
        """
        self._check_fitted()
        prompts = {e.get("prompt") for e in self.manifest_}
        if len(prompts) != 1:
            return None
        (prompt,) = prompts
        return str(prompt) if prompt else None

    def _profile(self, coll: Collection) -> dict[str, Any]:
        """The last fit's phases next to their floor (see :mod:`w2wkit.floor`)."""
        from w2wkit.floor import Profile, fit_floor, measure_rates

        prof = Profile()
        for name, secs in self.info_.get("timings", {}).items():
            prof.add(name, secs)
        from w2wkit.collection import outgrows_page_cache

        files = [str(f) for f in coll.files]
        n = len(self.manifest_)
        file_bytes = None
        if files:
            file_bytes = float(sum(os.path.getsize(f) for f in files if os.path.isfile(f)))
        # files (rows) the page cache cannot hold are read at the disk's rate: the rule
        # the fit's own reads go around the page cache by. Files that fit it are counted
        # at the disk's rate as far as the scan found them outside it (cold files)
        outgrow = outgrows_page_cache(file_bytes or 0.0)
        measured = self.info_.get("cold_file_share")  # found by the fit's own scan
        cold_share = 1.0 if outgrow else float(measured or 0.0)
        rates = measure_rates(files, disk=cold_share > 0, rows=n)
        if self.representation == "factors":
            extra = {}
            if self.info_.get("n_iter") is not None:  # the randomized solver's passes
                extra = {"n_iter": self.info_["n_iter"], "block_size": self.info_["block_size"]}
            floor = fit_floor(
                self.info_["solver_used"],
                n,
                self.layout_.dim,
                self.n_components_,
                rates,
                file_bytes=file_bytes,
                cold_files=cold_share,
                cold_rows=outgrows_page_cache(4.0 * n * self.layout_.dim),
                **extra,
            )
        else:
            from w2wkit.floor import delta_floor

            floor = delta_floor(
                self.delta_,
                self.n_components_,
                rates,
                file_bytes=file_bytes,
                solver=self.info_["solver_used"],
                blocks=getattr(self, "_kernel_plan", None),
                sketch_columns=int(self.info_.get("sketch_columns", 0)),
                passes=int(self.info_.get("n_passes", 1)),
                cold_files=outgrow,
            )
        prof.set_floor(floor, rates)
        out = prof.as_dict()
        # the read phase's CPU bound (page-cache copy + SHA-256 of every byte on the cores):
        # above its floor where the copy is a core's work (floor.Rates.file_cpu_seconds)
        bound = None
        if file_bytes is not None and "read" in self.info_.get("timings", {}):
            held = 0.0
            if self.representation == "factors" and self.info_.get("rows_from") == "memory":
                held = 4.0 * n * self.layout_.dim  # the rows, in fresh memory
            bound = rates.file_cpu_seconds(file_bytes, cold=cold_share, held_bytes=held)
        out["read_cpu_bound_seconds"] = bound if bound is None or math.isfinite(bound) else None
        out["cold_file_share"] = cold_share if self.representation == "factors" else float(outgrow)
        out["wall_seconds_total"] = self.info_.get("wall_seconds")
        return out

    def _in_memory(self, n: int, d: int) -> bool:
        """Whether a factors fit of ``n`` rows of ``d`` holds them in memory (gram solver):
        when they fit the budget, unless the column Gram over the row cache on disk would
        hold at most :data:`STREAM_MEMORY_RATIO` of what holding them does."""
        from w2wkit.solvers import column_gram_bytes, memory_budget

        if self.device not in ("cpu", "", None) or 4 * n * d > memory_budget():
            return False
        try:
            k = self._check_k(n, d)
        except SpaceError:
            return False
        if self._solver_for(n, d, k) != "gram":
            return False
        if not self._column_gram(n, d, k):
            return True
        # held: the rows and the N x N Gram (the components are written over the rows);
        # streamed: the Gram, the components and the column chunks in flight. Streaming
        # costs the row cache's write and two reads of it: +33% of the time at 3k rows of
        # SD1.5's 99,648, +2.5% at 10k, where it took the peak from 5.27 to 2.96 GB
        # (benchmarks/README.md); so the rows stay on disk only when that about halves
        # the memory
        held = 4 * n * d + column_gram_bytes(n, d, 0, width=0)
        return column_gram_bytes(n, d, k) > STREAM_MEMORY_RATIO * held

    def _rows_in_files(self, n: int, d: int) -> bool:
        """Whether a factors fit of ``n`` rows of ``d`` not held in memory reads them from
        their files on every pass instead of a row cache: with ``row_cache=False``; and,
        while the files stay in the page cache (their rows' bytes within
        :func:`~w2wkit.collection.outgrows_page_cache`), for the Gram over column chunks
        (each chunk read from the files' cached pages: 10k rows of SD1.5) and for the
        randomized passes (30k): the scan then writes no copy of the rows. docs/space.md,
        "Where a factors fit keeps the rows"."""
        from w2wkit.collection import outgrows_page_cache

        if not self.row_cache:
            return True
        try:
            k = self._check_k(n, d)
        except SpaceError:
            return False
        if outgrows_page_cache(4.0 * n * d):
            return False
        # the column Gram's chunks, and the randomized passes' rows (30k SD1.5, cold: 346-348
        # s in five fits against 347-364 s through a row cache, the scan 14-18 s against
        # 31 s; docs/space.md, "Where a factors fit keeps the rows")
        return self._column_gram(n, d, k) or self._solver_for(n, d, k) == "randomized"

    def _solver_for(self, n: int, d: int, k: int) -> str:
        """The solver a factors fit of ``n`` rows of ``d`` with ``k`` components runs."""
        from w2wkit.solvers import choose_solver

        return choose_solver(n, d, k) if self.solver == "auto" else self.solver

    def _column_gram(self, n: int, d: int, k: int) -> bool:
        """Whether a factors fit of rows held on disk takes the gram solver over column chunks
        (:func:`w2wkit.solvers.fit_gram_columns`: two reads of the rows in all)."""
        from w2wkit.solvers import MIN_COLUMN_CHUNK, column_chunk_width

        if self.device not in ("cpu", "", None):
            return False
        # chunks too narrow for the N x N matrix (N near the gram's limit): row stripes
        wide = column_chunk_width(n, d) >= min(d, MIN_COLUMN_CHUNK)
        return self._solver_for(n, d, k) == "gram" and wide

    def _check_cluster_fit(self, coll: Collection) -> None:
        """Refuse what a cluster fit cannot do, before a cluster is started."""
        if self.representation != "factors":
            raise SpaceError(
                "a cluster fit supports the factors representation only",
                param="client",
                hint="fit the delta representation without a cluster",
            )
        if self.device not in ("cpu", "", None):
            raise SpaceError(
                f"a cluster fit runs on the workers' CPUs, not on device {self.device!r}",
                param="client",
            )
        if not coll.files:
            raise SpaceError(
                "a cluster fit reads files; this collection holds in-memory adapters",
                param="client",
                hint="fit in-memory adapters without a cluster",
            )

    def _fit_factors(
        self,
        coll: Collection,
        cb: Callable[[str, int, int], None] | None,
        client: Any = None,
    ) -> None:
        import time

        from w2wkit.solvers import (
            column_gram_bytes,
            fit_gram_columns,
            fit_pca,
            fit_pca_array,
            memory_budget,
        )

        if client is not None:
            self._fit_factors_cluster(coll, cb, client)
            return
        t0 = time.perf_counter()
        rows = coll.scan_factors(
            progress=cb, in_memory=self._in_memory, in_files=self._rows_in_files
        )
        timings = {"read": time.perf_counter() - t0}  # with the statistics, fused into it
        source = rows.source
        try:
            n, d = rows.n_rows, rows.dim
            k = self._check_k(n, d)
            scale, mean32, scale32, total_var = self._standardisation(rows.mean, rows.var, n)

            def blocks(start: int = 0) -> Iterator[np.ndarray]:
                # standardised as they are read: rows from their files by the readers, a
                # row-cache block where it lies (the same arithmetic either way)
                return rows.blocks(self.block_rows, start=start, standardise=(mean32, scale32))

            if rows.in_memory:
                # standardise the rows in place (one pass, no copy) and multiply them as
                # they are
                t1 = time.perf_counter()
                inv32 = (1.0 / scale).astype(np.float32)
                z = rows.data
                step = max(1, (16 << 20) // max(4 * d, 1))
                for lo in range(0, n, step):
                    blk = z[lo : lo + step]
                    blk -= mean32
                    blk *= inv32
                timings["standardize"] = timings.get("standardize", 0.0) + (
                    time.perf_counter() - t1
                )
                del z, blk
                res = fit_pca_array(
                    rows.data,
                    k,
                    overwrite=True,
                    solver=self.solver,
                    random_state=self.random_state,
                    device=self.device,
                    progress=cb,
                )
            elif self._column_gram(n, d, k):
                # rows on disk, gram solver on the CPU: two reads a column chunk at a time
                inv32 = (1.0 / scale).astype(np.float32)

                def standardised_columns(chunk: np.ndarray, lo: int, hi: int) -> np.ndarray:
                    chunk -= mean32[lo:hi]
                    chunk *= inv32[lo:hi]
                    return chunk

                def columns(lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
                    return rows.columns(lo, hi, standardised_columns, out=out)

                res = fit_gram_columns(
                    columns,
                    n,
                    d,
                    k,
                    progress=cb,
                    # rows left on disk to save memory (they would fit): chunks no wider
                    # than that; rows beyond the budget keep the widest chunks it allows
                    budget=(
                        min(memory_budget(), column_gram_bytes(n, d, k))
                        if 4 * n * d <= memory_budget()
                        else None
                    ),
                )
            else:
                res = fit_pca(
                    blocks,
                    n,
                    d,
                    k,
                    solver=self.solver,
                    random_state=self.random_state,
                    device=self.device,
                    progress=cb,
                )
        finally:
            rows.close()
        self._set_factors_result(res, rows.layout, mean32, scale32, total_var, n, timings)
        self.info_["rows_from"] = source
        fast = getattr(coll, "_fast_reader", None)
        share = fast.cold_fraction() if fast is not None else None
        if share is not None:
            # the share of the files' bytes the scan found outside the page cache (the
            # profile's read floor counts it at the disk's rate)
            self.info_["cold_file_share"] = share

    def _standardisation(
        self, mean: np.ndarray, var: np.ndarray, n: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """The per-coordinate scale (d,) float64, the float32 mean and scale every row is
        standardised with (``(row - mean32) / scale32``) and the total variance they leave."""
        d = int(var.shape[0])
        std = np.sqrt(var)
        if self.standardize:
            rms = float(np.sqrt(np.mean(var))) if d else 0.0
            floor = max(self.scale_floor * rms, np.finfo(np.float32).tiny)
            scale = np.maximum(std, floor)
        else:
            scale = np.ones(d)
        mean32 = mean.astype(np.float32)
        scale32 = scale.astype(np.float32)
        total_var = float(np.sum(var / scale**2) * n / (n - 1))
        if total_var <= 0:
            raise SpaceError("all models are identical: the collection has no variance to fit")
        return scale, mean32, scale32, total_var

    def _fit_factors_cluster(
        self, coll: Collection, cb: Callable[[str, int, int], None] | None, client: Any
    ) -> None:
        """:meth:`_fit_factors` with the scan and the solver passes as tasks on ``client``."""
        import time

        from w2wkit.cluster import worker_count
        from w2wkit.clusterfit import HELD_BYTES_PER_WORKER, _stamp, fit_pca_files, scan_files

        t0 = time.perf_counter()
        # the workers keep the rows when they fit in their share; else every pass reads the
        # files (and a Gram fit goes a column chunk at a time)
        size = sum(_stamp(os.fspath(f))[0] for f in coll.files)  # (size, mtime) of each
        keep = size <= HELD_BYTES_PER_WORKER * max(1, worker_count(client))
        rows = scan_files(client, coll, cb, keep_rows=keep)
        timings = {"read": time.perf_counter() - t0}
        n, d = rows.n_rows, rows.dim
        k = self._check_k(n, d)
        try:
            _, mean32, scale32, total_var = self._standardisation(rows.mean, rows.var, n)
            res = fit_pca_files(
                client,
                rows,
                k,
                mean32,
                scale32,
                solver=self.solver,
                random_state=self.random_state,
                progress=cb,
            )
        finally:
            rows.release()
        self._set_factors_result(res, rows.layout, mean32, scale32, total_var, n, timings)
        self.info_["cluster_workers"] = (res.info or {}).get("cluster_workers")

    def _set_factors_result(
        self,
        res: Any,
        layout: WeightLayout,
        mean32: np.ndarray,
        scale32: np.ndarray,
        total_var: float,
        n: int,
        timings: dict[str, float],
    ) -> None:
        """Store a factors fit's solver result (components, coefficients, variances)."""
        for name, secs in (res.info or {}).get("timings", {}).items():
            timings[name] = timings.get(name, 0.0) + secs
        comps = np.asarray(res.components, dtype=np.float32)
        scores = np.asarray(res.scores, dtype=np.float32)
        signs = _sign_flip(scores)
        self.layout_ = layout
        self.mean_ = mean32
        self.scale_ = scale32
        comps *= signs[:, None].astype(np.float32)  # in place: the solver's array
        self.components_ = comps
        self.coefficients_ = scores * signs[None, :].astype(np.float32)
        self.singular_values_ = np.asarray(res.singular_values, dtype=np.float64)
        self.explained_variance_ = self.singular_values_**2 / (n - 1)
        self.explained_variance_ratio_ = self.explained_variance_ / total_var
        self.total_variance_ = total_var
        self.info_ = {
            "solver_used": res.solver,
            "n_passes": int(res.n_passes),
            "timings": timings,
        }
        if res.solver == "randomized" and res.info and "n_iter" in res.info:
            self.info_["n_iter"] = int(res.info["n_iter"])
            self.info_["block_size"] = int(res.info["block_size"])

    # ------------------------------------------------------------ delta mode
    def _fit_delta(self, coll: Collection, cb: Callable[[str, int, int], None] | None) -> None:
        import time

        from w2wkit.solvers import top_eigh

        t_read = time.perf_counter()
        fac = coll.scan_deltas(progress=cb)
        t_read = time.perf_counter() - t_read
        n = fac.n_models
        dim = sum(fac.out_features[m] * math.prod(fac.in_shape[m]) for m in fac.modules)
        k = self._check_k(n, dim)
        t0 = time.perf_counter()
        # sum of squares of the centred deltas per module, without its N x N Gram:
        # sum_i |delta_i|^2 - |sum_i delta_i|^2 / N (the summed delta is one dense
        # out x in product, far cheaper than the R x R factor products)
        from w2wkit.collection import memory_budget

        # what the kernel and its centred copy leave of the budget, for the blocks
        budget = memory_budget()
        budget = max(budget - 3 * 8 * n * n, budget // 4)
        ss = np.array([_module_centred_ss(fac, m, budget) for m in fac.modules])
        numel = np.array(
            [fac.out_features[m] * math.prod(fac.in_shape[m]) for m in fac.modules], float
        )
        sigma = np.sqrt(np.maximum(ss, 0.0) / (n * numel))
        if self.standardize:
            rms = float(np.sqrt(np.mean(sigma**2)))
            if rms <= 0:
                raise SpaceError("all models are identical: the collection has no variance to fit")
            sigma = np.maximum(sigma, self.scale_floor * rms)
        else:
            sigma = np.ones(len(fac.modules))
        weights = 1.0 / sigma**2
        whole_budget = memory_budget()
        self._kernel_plan = _kernel_plan(fac, budget)  # the blocks, for the floor
        if 3 * 8 * n * n <= whole_budget:
            # the kernel, one module at a time in blocks of models (memory: the N x N
            # kernel and one block product, never a module's R x R products or its Gram)
            gram = np.zeros((n, n))
            for j, (m, w) in enumerate(zip(fac.modules, weights, strict=True)):
                _add_module_gram(gram, fac, m, w, budget)
                if cb is not None:
                    cb("gram", j + 1, len(fac.modules))
            timings = {"read": t_read, "gram": time.perf_counter() - t0}
            t0 = time.perf_counter()
            colmean = gram.mean(axis=0)
            allmean = float(colmean.mean())
            centred = gram - colmean[None, :] - colmean[:, None] + allmean
            del gram
            centred = (centred + centred.T) / 2
            total_var = float(np.trace(centred)) / (n - 1)
            if total_var <= 0:
                raise SpaceError("all models are identical: the collection has no variance to fit")
            lam, vec = top_eigh(centred, k)
            del centred
            timings["eigen"] = time.perf_counter() - t0
            solver, passes = "gram", 1
        else:
            # the N x N kernel does not fit: a randomized eigensolver that applies the
            # kernel to N x (k + p) blocks, the kernel rebuilt from the factors each pass
            total_var = float(np.sum(np.maximum(ss, 0.0) * weights)) / (n - 1)
            if total_var <= 0:
                raise SpaceError("all models are identical: the collection has no variance to fit")
            lam, vec, colmean, passes = _sketched_kernel_eigh(fac, weights, k, budget, cb)
            allmean = float(colmean.mean())
            timings = {"read": t_read, "gram": time.perf_counter() - t0, "eigen": 0.0}
            solver = "gram-sketch"
        lam = np.maximum(np.asarray(lam, dtype=np.float64), 0.0)
        vec = np.asarray(vec, dtype=np.float64)
        sv = np.sqrt(lam)
        scores = vec * sv
        signs = _sign_flip(scores)
        vec = vec * signs
        scores = scores * signs
        tiny = sv > sv.max() * 1e-10 if sv.size and sv.max() > 0 else np.zeros(k, bool)
        beta = np.where(tiny, vec / np.where(tiny, sv, 1.0), 0.0)
        beta -= beta.mean(axis=0, keepdims=True)
        self.delta_ = fac
        self.delta_modules_ = list(fac.modules)
        self.beta_ = beta
        self.gram_colmean_ = colmean
        self.gram_mean_ = allmean
        self.scale_ = sigma
        self.mean_ = None
        self.components_ = None
        self.layout_ = _delta_layout(fac)
        self.coefficients_ = scores.astype(np.float32)
        self.singular_values_ = sv
        self.explained_variance_ = lam / (n - 1)
        self.explained_variance_ratio_ = self.explained_variance_ / total_var
        self.total_variance_ = total_var
        self.info_ = {"solver_used": solver, "n_passes": passes, "timings": timings}
        if solver == "gram-sketch":
            self.info_["sketch_columns"] = min(n - 1, k + _SKETCH_OVERSAMPLE)

    @staticmethod
    def _module_gram(fac: DeltaFactors, m: str) -> np.ndarray:
        up = fac.up[m].astype(np.float64)
        down = fac.down[m].astype(np.float64)
        prod = (up.T @ up) * (down @ down.T)  # (R, R) rank-one inner products
        owner = fac.owner[m]
        return _segment_sum(_segment_sum(prod, owner, fac.n_models).T, owner, fac.n_models)

    def _cross_gram(self, adapter: Adapter) -> tuple[np.ndarray, float]:
        """Standardised inner products of ``adapter`` with the training models.

        Returns
        -------
        cross : numpy.ndarray
            ``(N,)`` float64.
        self_ip : float
            Standardised squared norm of the adapter (modules of the space only).
        """
        from w2wkit.collection import memory_budget

        fac = self.delta_
        cross = np.zeros(fac.n_models)
        self_ip = 0.0
        budget = memory_budget() // 4
        for j, m in enumerate(self.delta_modules_):
            layer = adapter.layers.get(m)
            if layer is None:
                continue
            shape = layer.delta_shape
            if shape != (fac.out_features[m], *fac.in_shape[m]):
                raise LayoutError(
                    f"delta shape {shape} differs from the space's "
                    f"{(fac.out_features[m], *fac.in_shape[m])}",
                    path=adapter.source,
                    key=m,
                )
            u, d = layer_factors(layer)
            u = u.astype(np.float64)
            d = d.astype(np.float64)
            w = 1.0 / self.scale_[j] ** 2
            # one module at a time, in blocks of models (bounded whatever N is)
            for lo, hi in _segment_blocks(fac, m, _block_terms(fac, m, budget)):
                up, down, owner = fac.block(m, lo, hi)
                prod = (u.T @ up) * (d @ down.T)  # (r, T)
                cross += w * _segment_sum(prod.sum(axis=0), owner, fac.n_models)
            self_ip += w * float(np.sum((u.T @ u) * (d @ d.T)))
        return cross, self_ip

    # ------------------------------------------------------------- transform
    def transform(self, adapters: Adapter | Sequence[Adapter]) -> np.ndarray:
        """Coefficients of adapters.

        Parameters
        ----------
        adapters : Adapter or sequence of Adapter

        Returns
        -------
        numpy.ndarray
            ``(n, k)`` float64.
        """
        self._check_fitted()
        items = [adapters] if isinstance(adapters, Adapter) else list(adapters)
        out = np.zeros((len(items), self.n_components_))
        for i, ad in enumerate(items):
            if self.representation == "factors":
                z = self._standardised_row(ad)
                out[i] = self.components_.astype(np.float64) @ z
            else:
                cross, _ = self._cross_gram(ad)
                out[i] = self.beta_.T @ (cross - self.gram_colmean_)
        return out

    def _standardised_row(self, adapter: Adapter) -> np.ndarray:
        x = self.layout_.flatten(adapter).astype(np.float64)
        return (x - self.mean_) / self.scale_.astype(np.float64)

    def residual(self, adapters: Adapter | Sequence[Adapter]) -> np.ndarray:
        """Relative distance of adapters to the space (standardised metric).

        Returns
        -------
        numpy.ndarray
            ``(n,)`` float64: ``|z - proj(z)| / |z|`` with ``z`` the centred,
            standardised model (0 when ``z`` is 0).
        """
        self._check_fitted()
        items = [adapters] if isinstance(adapters, Adapter) else list(adapters)
        out = np.zeros(len(items))
        for i, ad in enumerate(items):
            if self.representation == "factors":
                z = self._standardised_row(ad)
                c = self.components_.astype(np.float64) @ z
                norm2 = float(z @ z)
            else:
                cross, self_ip = self._cross_gram(ad)
                c = self.beta_.T @ (cross - self.gram_colmean_)
                norm2 = self_ip - 2 * float(cross.mean()) + self.gram_mean_
            res2 = max(norm2 - float(c @ c), 0.0)
            out[i] = math.sqrt(res2 / norm2) if norm2 > 0 else 0.0
        return out

    def inverse_transform(
        self,
        coefficients: np.ndarray,
        *,
        rank: int | None = None,
        format_hint: str | None = None,
        energy: float | None = None,
    ) -> list[Adapter]:
        """Models at given coefficients.

        Parameters
        ----------
        coefficients : numpy.ndarray
            ``(n, k)`` or ``(k,)``.
        rank : int, optional
            Delta representation: rank of every written layer (default: the
            largest rank of that module among the training models). Factors:
            must be ``None`` or the layout's rank.
        energy : float, optional
            Delta representation: per layer, the smallest rank that keeps this
            fraction (0 < energy <= 1) of the layer's squared Frobenius norm;
            ``rank`` then caps it. Layers may get different ranks.
        format_hint : str, optional
            Recorded as the adapters' ``format``.

        Returns
        -------
        list of Adapter
            In delta mode each adapter's metadata holds
            ``w2wkit.energy_kept`` (overall fraction of squared Frobenius
            norm kept by the rank truncation) and
            ``w2wkit.energy_kept_min_layer``; per-layer values are in
            :attr:`last_energy_`.
        """
        self._check_fitted()
        c = _as_2d(coefficients, self.n_components_)
        validate_energy(energy, self.representation)
        validate_rank(rank)
        out = []
        self.last_energy_ = []
        for row in c:
            if self.representation == "factors":
                if rank is not None and any(
                    self.layout_.rank(m) != rank for m in self.layout_.modules
                ):
                    raise SpaceError(
                        "the factors representation writes the layout's rank; "
                        "use a delta space to choose the rank"
                    )
                x = (row @ self.components_.astype(np.float64)) * self.scale_ + self.mean_
                ad = self.layout_.unflatten(x.astype(np.float32))
            else:
                g = self.beta_ @ row
                ad, kept = self._delta_adapter(g, rank, energy=energy)
                self.last_energy_.append(kept)
            ad.format = format_hint
            ad.metadata.update(self._provenance())
            out.append(ad)
        return out

    def _provenance(self) -> dict[str, str]:
        from w2wkit import __version__

        return {
            "w2wkit.version": __version__,
            "w2wkit.space_representation": self.representation,
            "w2wkit.layout_signature": self.layout_.signature,
        }

    def _delta_adapter(
        self,
        g: np.ndarray,
        rank: int | None,
        *,
        extra: Adapter | None = None,
        mean_weight: float = 1.0,
        energy: float | None = None,
    ) -> tuple[Adapter, dict[str, Any]]:
        """Adapter of the implicit model ``sum_i gamma_i x_i`` (+ ``extra``'s deltas)."""
        fac = self.delta_
        layers: dict[str, LoraLayer] = {}
        per_layer: dict[str, float] = {}
        kept_all = total_all = 0.0
        modules = list(self.delta_modules_)
        if extra is not None:
            modules += [m for m in extra.layers if m not in fac.out_features]
        for m in modules:
            ups, downs = [], []
            dense = None
            if m in fac.out_features:
                # sum_i gamma_i delta_i: mean (1/N each) plus the components'
                # combination; the per-layer scale cancels (scaled metric,
                # unscaled output).
                gamma = mean_weight / fac.n_models + g
                out_f, in_shape = fac.out_features[m], fac.in_shape[m]
                in_f = math.prod(in_shape)
                terms = sum(r for _, r, _ in fac.segments(m))
                if terms * (out_f + in_f) <= _DENSE_SUM_RATIO * out_f * in_f:
                    up, down, owner = fac.block(m, 0, len(fac.segments(m)))
                    ups.append(up.astype(np.float64) * gamma[owner])
                    downs.append(down.astype(np.float64))
                else:
                    # more terms than the dense delta has numbers: sum it in blocks of
                    # models (memory: the out x in sum, whatever N is) and factor it as
                    # identity x sum
                    from w2wkit.collection import memory_budget

                    dense = np.zeros((out_f, in_f))
                    terms = _block_terms(fac, m, memory_budget() // 4)
                    for lo, hi in _segment_blocks(fac, m, terms):
                        up, down, owner = fac.block(m, lo, hi)
                        dense += (up.astype(np.float64) * gamma[owner]) @ down.astype(np.float64)
                    del up, down
                default_rank = fac.max_rank[m]
            else:
                layer = extra.layers[m]  # type: ignore[union-attr]
                out_f, in_shape = layer.delta_shape[0], layer.delta_shape[1:]
                default_rank = 0
            if extra is not None and m in extra.layers:
                u, d = layer_factors(extra.layers[m])
                if dense is not None:
                    dense += u.astype(np.float64) @ d.astype(np.float64)
                else:
                    ups.append(u.astype(np.float64))
                    downs.append(d.astype(np.float64))
                default_rank += u.shape[1]
            # an energy target chooses the rank (a given rank caps it)
            r_arg: int | None = int(rank) if rank is not None else default_rank
            if rank is None and energy is not None:
                r_arg = None
            if dense is not None:
                up, down, kept, total = compress_dense(dense, r_arg, energy)
                del dense
            else:
                up, down, kept, total = compress_factors(
                    np.concatenate(ups, axis=1), np.concatenate(downs, axis=0), r_arg, energy
                )
            r = up.shape[1]
            per_layer[m] = kept / total if total > 0 else 1.0
            kept_all += kept
            total_all += total
            conv = len(in_shape) == 3
            layers[m] = LoraLayer(
                down=down.reshape(r, *in_shape),
                up=up.reshape(out_f, r, 1, 1) if conv else up,
                alpha=float(r),
            )
        overall = kept_all / total_all if total_all > 0 else 1.0
        energy = {"overall": overall, "layers": per_layer}
        meta = {
            "w2wkit.energy_kept": f"{overall:.8f}",
            "w2wkit.energy_kept_min_layer": f"{min(per_layer.values()):.8f}",
        }
        return Adapter(layers, meta), energy

    # ------------------------------------------------------------------- edit
    def edit(
        self,
        adapter: Adapter | None,
        strengths: Mapping[str, Any],
        *,
        keep_residual: bool = True,
        rank: int | None = None,
        orthogonal_to: Sequence[str] = (),
        energy: float | None = None,
    ) -> Adapter:
        """Edit along named directions; 1.0 = one training std (see :func:`w2wkit.edits.edit`)."""
        return edit(
            self,
            adapter,
            strengths,
            keep_residual=keep_residual,
            rank=rank,
            orthogonal_to=orthogonal_to,
            energy=energy,
        )

    # ------------------------------------------------------------------ shift
    def shift(
        self,
        adapter: Adapter,
        delta_coefficients: np.ndarray,
        *,
        keep_residual: bool = True,
        rank: int | None = None,
        energy: float | None = None,
    ) -> Adapter:
        """Move an adapter by a coefficient change.

        Parameters
        ----------
        adapter : Adapter
        delta_coefficients : numpy.ndarray
            ``(k,)`` change of coefficients.
        keep_residual : bool
            Keep the part of the adapter outside the subspace (default).
            When false the adapter is first projected onto the subspace.
        rank : int, optional
            Delta representation: rank of the written layers (default: the
            adapter's rank plus the space's rank for that module).
        energy : float, optional
            Delta representation: per layer, the smallest rank keeping this
            fraction of the edited layer's squared norm (as ``inverse_transform``).

        Returns
        -------
        Adapter
            With ``keep_residual`` and a zero change, an adapter whose deltas
            equal ``adapter``'s exactly.
        """
        self._check_fitted()
        dc = _as_2d(delta_coefficients, self.n_components_)[0]
        validate_energy(energy, self.representation)
        validate_rank(rank)
        if keep_residual and not dc.any():
            return Adapter(dict(adapter.layers), dict(adapter.metadata), None, adapter.format)
        if not keep_residual:
            c = self.transform(adapter)[0] + dc
            return self.inverse_transform(c, rank=rank, energy=energy)[0]
        if self.representation == "factors":
            x = self.layout_.flatten(adapter).astype(np.float64)
            x += (dc @ self.components_.astype(np.float64)) * self.scale_
            out = self.layout_.unflatten(x.astype(np.float32), metadata=dict(adapter.metadata))
            out.format = adapter.format
            return out
        g = self.beta_ @ dc
        out, kept = self._delta_adapter(g, rank, extra=adapter, mean_weight=0.0, energy=energy)
        self.last_energy_ = [kept]
        out.metadata = {**adapter.metadata, **out.metadata}
        out.format = adapter.format
        return out

    # --------------------------------------------------------------- sampling
    def sample(
        self,
        n: int,
        *,
        seed: int | None = None,
        temperature: float = 1.0,
        covariance: str = "diagonal",
    ) -> np.ndarray:
        """Draw coefficients of new models.

        Parameters
        ----------
        n : int
            Number of samples.
        seed : int, optional
        temperature : float
            Multiplies the standard deviation.
        covariance : {"diagonal", "full"}
            Independent Gaussian per coefficient (the paper's) or a Gaussian
            with the full covariance of the training coefficients (the same
            for a fresh PCA fit, whose coefficients are uncorrelated; differs
            for imported or edited spaces).

        Returns
        -------
        numpy.ndarray
            ``(n, k)`` float64.
        """
        self._check_fitted()
        if n < 1:
            raise SpaceError(f"must be positive, got {n}", param="n")
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise SpaceError(
                f"must be a finite number >= 0, got {temperature}", param="temperature"
            )
        rng = np.random.default_rng(seed)
        z = rng.standard_normal((n, self.n_components_))
        if covariance == "diagonal":
            return self.coef_mean_ + temperature * z * self.coef_std_
        if covariance == "full":
            cov = np.cov(self.coefficients_.astype(np.float64), rowvar=False)
            w, v = np.linalg.eigh(np.atleast_2d(cov))
            root = v * np.sqrt(np.maximum(w, 0.0))
            return self.coef_mean_ + temperature * z @ root.T
        raise SpaceError(f"unknown covariance {covariance!r}; use diagonal or full")

    def nearest(self, coefficients: np.ndarray, n: int = 5) -> list[list[tuple[int, str, float]]]:
        """Nearest training models by cosine similarity of coefficients.

        Returns
        -------
        list of list of (row, name, similarity)
            One list of ``n`` entries per query row, most similar first.
        """
        self._check_fitted()
        c = _as_2d(coefficients, self.n_components_)
        train = self.coefficients_.astype(np.float64)
        tn = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-300)
        qn = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-300)
        sims = qn @ tn.T
        n = min(n, train.shape[0])
        names = self.names_
        out = []
        for row in sims:
            idx = np.argsort(-row, kind="stable")[:n]
            out.append([(int(i), names[i], float(row[i])) for i in idx])
        return out

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the space as a folder: ``arrays.safetensors`` + ``space.json``.

        The write is atomic (a temporary folder renamed into place). An
        existing folder is replaced only with ``overwrite`` and only when it
        is a w2wkit space.

        Returns
        -------
        pathlib.Path
        """
        self._check_fitted()
        return save_space(self, Path(path), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, verify: bool = True) -> WeightSpace:
        """Load a saved space (arrays memory-mapped when large).

        Parameters
        ----------
        path : str or os.PathLike
            The space folder (or its ``space.json``).
        verify : bool
            Check the SHA-256 of the arrays file against the one recorded in
            ``space.json`` (default; hashing costs about as much as reading
            the file once). ``False`` skips it (the CLI's ``--no-verify``).

        Raises
        ------
        SpaceError
            For a missing, damaged or future-version space.
        """
        return load_space(cls, Path(path), verify=verify)


#: columns (stacked rank-one terms) per block of the blocked module Gram
_GRAM_BLOCK_TERMS = 2048
#: a delta space's output sums a module's terms as a dense ``out x in`` matrix when the
#: stacked factors would hold more than this many times its numbers
_DENSE_SUM_RATIO = 1.0


def _model_blocks(owner: np.ndarray, terms: int | None = None) -> list[tuple[int, int]]:
    """Split the sorted ``owner`` (R,) into column ranges of whole models, about ``terms``
    (default :data:`_GRAM_BLOCK_TERMS`) each."""
    terms = _GRAM_BLOCK_TERMS if terms is None else terms
    if owner.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    bounds = [0]
    for st in starts[1:]:
        if st - bounds[-1] >= terms:
            bounds.append(int(st))
    bounds.append(int(owner.size))
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def _segment_blocks(fac: DeltaFactors, m: str, terms: int) -> list[tuple[int, int]]:
    """Split module ``m``'s segments (whole models) into ranges of about ``terms`` terms."""
    bounds = [0]
    acc = 0
    segs = fac.segments(m)
    for j, (_, r, _) in enumerate(segs):
        if acc >= terms:
            bounds.append(j)
            acc = 0
        acc += r
    bounds.append(len(segs))
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1) if bounds[i + 1] > bounds[i]]


def _block_terms(fac: DeltaFactors, m: str, budget: int) -> int:
    """Rank-one terms per block: two blocks and their products within ``budget`` (sized
    as float64, which also bounds the float32 kernel blocks and their copies)."""
    width = fac.out_features[m] + math.prod(fac.in_shape[m])
    # 2 blocks x (T x width) float64 + T x T float64 products (x2 temporaries)
    t = int((-(2 * width) + math.sqrt(4 * width**2 + 4 * 2 * budget / 8)) / 2 / 2)
    return max(1, min(_GRAM_BLOCK_TERMS, t))


def _kernel_plan(fac: DeltaFactors, budget: int) -> dict[str, tuple[list[int], bool]]:
    """Per module: the rank-one terms of each block of models
    :func:`_module_gram_blocks` multiplies at ``budget``, and whether the module's
    stack is read whole (once) rather than block by block."""
    plan = {}
    for m in fac.modules:
        segs = fac.segments(m)
        blocks = _segment_blocks(fac, m, _block_terms(fac, m, budget // 2))
        terms = [sum(r for _, r, _ in segs[lo:hi]) for lo, hi in blocks]
        whole = fac.spill is None or 2 * fac.factor_bytes(m) <= budget // 4
        plan[m] = (terms, bool(whole))
    return plan


def _module_gram_blocks(
    fac: DeltaFactors, m: str, budget: int | None = None
) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
    """Blocks ``(ia, ja, ib, jb, G_m[ib:jb, ia:ja])`` of module ``m``'s Gram, ``ib >= ia``
    (``G_m[i, j] = <delta_i, delta_j>``; the blocks with ``ib > ia`` stand for their
    transposes too).

    Blocks of models (whole models, about :data:`_GRAM_BLOCK_TERMS` rank-one terms,
    fewer when ``budget`` bytes are tight) are multiplied pairwise,
    ``(U_a^T U_b) * (D_a D_b^T)`` summed per pair of owners (all at the precision
    :meth:`DeltaFactors.kernel_dtype` chose; each block is returned as float64 for the
    kernel's float64 sum), so the temporaries
    are bounded by two blocks whatever N and the ranks are. A module whose
    float64 stack fits in a quarter of the budget is read once; a larger one is
    read a block at a time from the factor store (block ``a`` held, the blocks
    ``b >= a`` read in turn).
    """
    from w2wkit.collection import memory_budget

    budget = memory_budget() if budget is None else budget
    blocks = _segment_blocks(fac, m, _block_terms(fac, m, budget // 2))
    whole = fac.spill is None or 2 * fac.factor_bytes(m) <= budget // 4
    if whole and blocks:
        up, down, owner = fac.block(m, 0, blocks[-1][1])
        base = fac.segments(m)
        col = np.cumsum([0] + [r for _, r, _ in base])

    def get(j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = blocks[j]
        if whole:
            c0, c1 = col[lo], col[hi]
            return up[:, c0:c1], down[c0:c1], owner[c0:c1]
        return fac.block(m, lo, hi)

    dt = np.dtype(fac.kernel_dtype(m))
    for a in range(len(blocks)):
        ua, da, oa = get(a)
        uat = np.asarray(ua.T, dtype=dt)  # views of the read rows when float32
        da = np.asarray(da, dtype=dt)
        for b in range(a, len(blocks)):
            if b == a:
                ub, db, ob = ua, da, oa
            else:
                ub, db, ob = get(b)
            # GEMMs (each entry a dot product over out or in numbers), their Hadamard
            # product summed per pair of models by two more GEMMs with the blocks'
            # one-hot owner matrices (a pass over T_a x T_b numbers at GEMM speed)
            prod = uat @ np.asarray(ub, dt)
            prod *= da @ np.asarray(db, dt).T
            ia, ib = oa[0], ob[0]
            ja, jb = oa[-1] + 1, ob[-1] + 1
            # model indices within a block are increasing but may skip models
            # that lack the module: one-hot over the index range
            blk = (prod @ _one_hot(ob - ib, jb - ib, dt)).T @ _one_hot(oa - ia, ja - ia, dt)
            yield int(ia), int(ja), int(ib), int(jb), blk.astype(np.float64)  # (b's, a's)


def _one_hot(owner: np.ndarray, n: int, dtype: Any) -> np.ndarray:
    """``(len(owner), n)`` matrix with a 1 at ``(t, owner[t])``."""
    out = np.zeros((owner.size, n), dtype=dtype)
    out[np.arange(owner.size), owner] = 1
    return out


def _add_module_gram(
    gram: np.ndarray, fac: DeltaFactors, m: str, weight: float, budget: int | None = None
) -> None:
    """``gram += weight * G_m`` (see :func:`_module_gram_blocks`)."""
    for ia, ja, ib, jb, blk in _module_gram_blocks(fac, m, budget):
        gram[ib:jb, ia:ja] += weight * blk
        if ib != ia:
            gram[ia:ja, ib:jb] += weight * blk.T


def _kernel_apply(fac: DeltaFactors, weights: np.ndarray, x: np.ndarray, budget: int) -> np.ndarray:
    """``K @ x`` for the kernel ``K = sum_m weights[m] G_m``, never holding ``K``.

    ``x`` is ``(N, c)``; returns ``(N, c)`` float64.
    """
    out = np.zeros_like(x, dtype=np.float64)
    for m, w in zip(fac.modules, weights, strict=True):
        for ia, ja, ib, jb, blk in _module_gram_blocks(fac, m, budget):
            out[ib:jb] += w * (blk @ x[ia:ja])
            if ib != ia:
                out[ia:ja] += w * (blk.T @ x[ib:jb])
    return out


#: Extra columns and power iterations of the sketched kernel eigensolver.
_SKETCH_OVERSAMPLE = 10
_SKETCH_POWER = 2


def _sketched_kernel_eigh(
    fac: DeltaFactors,
    weights: np.ndarray,
    k: int,
    budget: int,
    cb: Callable[[str, int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Top ``k`` eigenpairs of the centred kernel ``H K H`` by a randomized range finder.

    Each pass rebuilds the kernel's blocks from the factors and applies them to an
    ``N x (k + p)`` block (memory: that block and one kernel block, not N x N).

    Returns
    -------
    lam : numpy.ndarray
        ``(k,)`` eigenvalues, descending.
    vec : numpy.ndarray
        ``(N, k)`` orthonormal eigenvectors.
    colmean : numpy.ndarray
        ``(N,)`` column means of ``K``.
    passes : int
        Passes over the factors.
    """
    n = fac.n_models
    c = min(n - 1, k + _SKETCH_OVERSAMPLE)  # the centred range has N - 1 dimensions
    rng = np.random.default_rng(0)
    passes = _SKETCH_POWER + 2
    omega = rng.standard_normal((n, c))
    omega -= omega.mean(axis=0)
    # first pass: K @ [H omega, 1/N]: the sketch and the kernel's column means
    y = _kernel_apply(fac, weights, np.column_stack([omega, np.full(n, 1.0 / n)]), budget)
    colmean = y[:, -1].copy()
    y = y[:, :-1]
    y -= y.mean(axis=0)
    if cb is not None:
        cb("gram", 1, passes)
    for it in range(_SKETCH_POWER):
        q, _ = np.linalg.qr(y)
        q -= q.mean(axis=0)
        y = _kernel_apply(fac, weights, q, budget)
        y -= y.mean(axis=0)
        if cb is not None:
            cb("gram", 2 + it, passes)
    q, _ = np.linalg.qr(y)
    q -= q.mean(axis=0)  # in the centred range: H q = q up to rounding
    q, _ = np.linalg.qr(q)
    q -= q.mean(axis=0)
    z = _kernel_apply(fac, weights, q, budget)
    z -= z.mean(axis=0)
    if cb is not None:
        cb("gram", passes, passes)
    b = q.T @ z
    lam, v = np.linalg.eigh((b + b.T) / 2)
    order = np.argsort(lam)[::-1][:k]
    return lam[order], q @ v[:, order], colmean, passes


def _module_centred_ss(fac: DeltaFactors, m: str, budget: int | None = None) -> float:
    """``sum_i |delta_i - mean|^2`` of module ``m`` (Frobenius), without any Gram.

    ``sum_i |delta_i|^2`` (summed by the scan, or per model here) minus
    ``|sum_i delta_i|^2 / N``, the summed delta a dense ``(out, in)`` float64
    matrix built from blocks of models.
    """
    from w2wkit.collection import memory_budget

    budget = memory_budget() if budget is None else budget
    n = fac.n_models
    blocks = _segment_blocks(fac, m, _block_terms(fac, m, budget // 2))
    if not blocks:
        return 0.0
    self_ss = fac.self_ss.get(m) if fac.self_ss is not None else None
    total = np.zeros((fac.out_features[m], math.prod(fac.in_shape[m])))
    acc = 0.0
    dt = np.dtype(fac.kernel_dtype(m))  # block products at the kernel's precision
    for lo, hi in blocks:
        up, down, owner = fac.block(m, lo, hi)
        total += np.asarray(up, dt) @ np.asarray(down, dt)
        if self_ss is None:
            u = up.astype(np.float64)
            d = down.astype(np.float64)
            starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
            ends = np.r_[starts[1:], owner.size]
            for s0, s1 in zip(starts, ends, strict=True):
                acc += float(np.sum((u[:, s0:s1].T @ u[:, s0:s1]) * (d[s0:s1] @ d[s0:s1].T)))
    if self_ss is None:
        self_ss = acc
    return self_ss - float(np.sum(total * total)) / n


def _delta_layout(fac: DeltaFactors) -> WeightLayout:
    rows = []
    for m in fac.modules:
        r = fac.max_rank[m]
        in_shape = fac.in_shape[m]
        up = (fac.out_features[m], r, 1, 1) if len(in_shape) == 3 else (fac.out_features[m], r)
        rows.append((m, (r, *in_shape), up, float(r), False))
    return WeightLayout(rows)


def _as_collection(obj: Any) -> Collection:
    if isinstance(obj, Collection):
        return obj
    if isinstance(obj, str | os.PathLike):
        return Collection(obj)
    items = list(obj)
    if items and all(isinstance(a, Adapter) for a in items):
        return Collection(adapters=items)
    if not items:
        raise SpaceError("empty collection: no models to fit")
    return Collection(items)
