"""Many adapters as one data set: :class:`Collection`.

A collection is an ordered list of models (LoRA files, PEFT folders or
in-memory adapters). It reads them one at a time, never all at once:

- :meth:`Collection.scan_factors` reads every model once, checks that all
  share one :class:`~w2wkit.layout.WeightLayout` (explaining the groups when
  they do not), writes the flattened rows to a float32 ``.npy`` memory map on
  disk and accumulates per-coordinate mean and variance. The returned
  :class:`FactorRows` streams row blocks from that cache for any number of
  solver passes with memory bounded by one block.
- :meth:`Collection.scan_deltas` reads every model once and stacks each
  module's factors (scale folded into ``up``) for the gauge-invariant delta
  representation.

Every read records a manifest entry ``{"name", "file", "format", "sha256",
"row"}``, plus ``"prompt"`` when the file's metadata names the instance prompt
it was trained with (one of :data:`PROMPT_METADATA_KEYS`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import mmap
import os
import shutil
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter, DeltaLayer, LoraLayer
from w2wkit.errors import FormatError, LayoutError, SpaceError
from w2wkit.layout import WeightLayout, describe_layout_groups
from w2wkit.native import Native, native
from w2wkit.stio import file_sha256  # re-exported: the collection's file hash

__all__ = [
    "PROMPT_METADATA_KEYS",
    "Collection",
    "DeltaFactors",
    "FactorRows",
    "file_sha256",
    "memory_budget",
    "model_family",
]

#: Metadata keys that carry the instance prompt a LoRA was trained with, in order
#: of preference (the miniature world's files carry ``w2wkit.world.prompt``).
PROMPT_METADATA_KEYS = ("w2wkit.instance_prompt", "w2wkit.world.prompt")


def _metadata_prompt(metadata: dict[str, Any]) -> str | None:
    for key in PROMPT_METADATA_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


Progress = Callable[[str, int, int], None]

#: Default bytes per streamed row block.
BLOCK_BYTES = 64 * 1024 * 1024
#: Fewest rows per streamed block (when the memory budget allows): the solvers' passes
#: coalesce smaller blocks for BLAS efficiency, which costs a copy of every block.
STREAM_MIN_ROWS = 256


def model_family(ad: Adapter, path: str | os.PathLike[str] | None = None) -> str:
    """The base model family of ``ad``, as far as it can be told.

    Uses the modules' names and delta shapes, the file's metadata and, for a
    kohya ``.safetensors`` file ``path``, whether its UNet keys use sgm block
    names (see :func:`w2wkit.names.guess_family`).

    Returns
    -------
    str
        ``"sd1"`` or ``"sdxl"``; ``"sd1 or sdxl"`` when every module (and
        shape) exists in both and nothing else tells them apart; ``"unknown"``
        when the modules fit neither (e.g. a small test model).
    """
    from w2wkit.names import families_fitting, kohya_uses_sgm

    shapes = {m: tuple(layer.delta_shape) for m, layer in ad.items()}
    fits = families_fitting(shapes)
    if not fits:
        return "unknown"
    if len(fits) == 1:
        return next(iter(fits))
    sgm = False
    if path is not None and Path(path).suffix.lower() == ".safetensors" and ad.format == "kohya":
        from w2wkit.stio import read_header

        try:
            sgm = kohya_uses_sgm(read_header(path)[0])
        except (FormatError, OSError):
            sgm = False
    return _family_of(shapes, fits, sgm, ad.metadata)


def _family_of(
    shapes: dict[str, tuple[int, ...]], fits: Any, sgm: bool, metadata: dict[str, str]
) -> str:
    """:func:`model_family` once the shapes fit more than one family."""
    from w2wkit.names import metadata_family, sdxl_evidence

    if sdxl_evidence(shapes, sgm_names=sgm, metadata=metadata):
        return "sdxl"
    if metadata_family(metadata) == "sd1":
        return "sd1"
    return "sd1 or sdxl"


def _model_names(files: Sequence[Path]) -> list[str]:
    """Short unique names: paths relative to the common folder, suffix dropped."""
    if len(files) == 1:
        return [files[0].stem if files[0].is_file() else files[0].name]
    try:
        common = Path(os.path.commonpath([str(f.resolve()) for f in files]))
    except ValueError:
        common = None
    names = []
    for f in files:
        rel = f.resolve().relative_to(common) if common else Path(f.name)
        names.append(str(rel.with_suffix("")) if f.suffix else str(rel))
    return names


@dataclass
class FactorRows:
    """Flattened factor rows of a collection, cached on disk.

    Attributes
    ----------
    layout : WeightLayout
        Shared layout of every row.
    data : numpy.ndarray
        ``(N, d)`` float32 memory map (or in-memory array).
    mean : numpy.ndarray
        ``(d,)`` float64 per-coordinate mean.
    var : numpy.ndarray
        ``(d,)`` float64 per-coordinate variance (``ddof=0``).
    """

    layout: WeightLayout
    data: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    _cleanup: Any = field(default=None, repr=False)
    #: True when ``data`` is one in-memory array (``scan_factors(in_memory=...)``)
    in_memory: bool = False

    @property
    def n_rows(self) -> int:
        """Number of models ``N``."""
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        """Row length ``d``."""
        return int(self.data.shape[1])

    @property
    def source(self) -> str:
        """Where the passes read the rows: ``"memory"``, ``"row cache"``, ``"files"`` or
        ``"files, O_DIRECT"`` (with ``" + row cache of M rows"`` for rows the fast path
        did not read)."""
        data = self.data
        if isinstance(data, _FileRows):
            text = "files, O_DIRECT" if data.direct else "files"
            side = data.side_rows
            return text + (f" + row cache of {side} rows" if side else "")
        if isinstance(data, _RowFile):
            return "row cache, O_DIRECT" if data.direct else "row cache"
        return "memory"

    def default_block_rows(self) -> int:
        """Rows per block so that one block is about 64 MiB, and at least
        :data:`STREAM_MIN_ROWS` (the size a solver pass would otherwise coalesce blocks
        to, with a copy); less under a memory cap: a block is at most an eighth of
        :func:`memory_budget` (a block and its transformed copies in flight)."""
        cap = memory_budget() // 8
        row = 4 * max(self.dim, 1)
        rows = min(BLOCK_BYTES, cap) // row
        if rows < STREAM_MIN_ROWS:
            rows = min(STREAM_MIN_ROWS, cap // row)
        return max(1, rows)

    def blocks(
        self,
        block_rows: int | None = None,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        start: int = 0,
        standardise: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield consecutive float32 row blocks ``(b, d)`` from row ``start`` on, optionally
        transformed.

        ``standardise=(mean32, scale32)`` (both ``(d,)`` float32) yields ``(rows - mean32)
        / scale32`` (these float32 operations, so the same bits however the rows are read):
        rows read from their files are standardised by the reader, each right after its
        read (while it is in cache, off the caller's thread); a block the row cache reads
        into a fresh buffer is standardised where it lies; rows in memory give a new array.
        ``transform`` then applies to the standardised block.
        """
        b = block_rows or self.default_block_rows()
        for lo in range(int(start), self.n_rows, b):
            if isinstance(self.data, _FileRows):
                block = self.data.read(lo, lo + b, standardise)
            else:
                block = np.asarray(self.data[lo : lo + b], dtype=np.float32)
                if standardise is not None:
                    mean32, scale32 = standardise
                    if isinstance(self.data, _RowFile):  # a fresh buffer: in place
                        block -= mean32
                        block /= scale32
                    else:
                        block = (block - mean32) / scale32
            yield transform(block) if transform is not None else block

    def columns(
        self,
        lo: int,
        hi: int,
        transform: Callable[[np.ndarray, int, int], np.ndarray] | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Columns ``lo:hi`` of every row, a fresh ``(N, hi - lo)`` float32 array (or ``out``,
        filled), optionally transformed in place: ``transform(a, lo, hi)`` with ``a`` the
        chunk or, from a row cache on disk or the models' files, each row's piece
        ``(hi - lo,)`` in turn."""
        if isinstance(self.data, (_RowFile, _FileRows)):
            # transformed a row at a time, while its piece is in cache after the read
            return self.data.read_columns(lo, hi, out, transform)
        if out is not None:
            chunk = out
            chunk[...] = self.data[:, lo:hi]
        else:
            chunk = np.array(self.data[:, lo:hi], dtype=np.float32, order="C")
        return transform(chunk, lo, hi) if transform is not None else chunk

    def close(self) -> None:
        """Drop the disk cache (if it is a temporary one)."""
        self.data = np.empty((0, self.dim), np.float32)
        if self._cleanup is not None:
            self._cleanup()


#: a module's kernel products are float32 GEMMs when no model's factors cancel by more
#: than this (:attr:`DeltaFactors.cancel`; 1 in an orthogonal gauge), else float64: the
#: float32 rounding of ``U^T U`` and ``D D^T`` (about ``1e-7 sqrt(width)`` of their
#: entries) reaches the kernel multiplied by that ratio
F32_KERNEL_CANCEL = 4.0


@dataclass
class DeltaFactors:
    """Each module's factors stacked over all models (delta representation).

    For module ``m`` the delta of model ``i`` is
    ``up[m][:, owner[m] == i] @ down[m][owner[m] == i]`` (scale folded into
    ``up``).

    The stacks are either arrays in memory or, for a collection read from
    files, a spill file written once by :meth:`Collection.scan_deltas`
    (``spill``): then ``up``, ``down`` and ``owner`` read one module on access
    and :meth:`block` reads the factors of a range of models, so nothing holds
    the whole store in memory.

    Attributes
    ----------
    modules : list of str
        Union of the modules of all models, in first-seen order.
    out_features : dict of str to int
    in_shape : dict of str to tuple of int
        Trailing shape of the delta (``(in,)`` or ``(in, kh, kw)``).
    up : mapping of str to numpy.ndarray
        ``(out, R_m)`` float32, ``R_m`` the summed rank over models.
    down : mapping of str to numpy.ndarray
        ``(R_m, prod(in_shape))`` float32.
    owner : mapping of str to numpy.ndarray
        ``(R_m,)`` int64 model index of each stacked rank-one term (sorted).
    max_rank : dict of str to int
        Largest rank of the module over models.
    n_models : int
    spill : _FactorSpill or None
        The spill file behind the mappings (``None``: arrays in memory).
    self_ss : dict of str to float or None
        ``sum_i |delta_i|^2`` per module, summed by the scan.
    cancel : dict of str to float or None
        Per module, the largest over models of
        ``sum_ab |(U^T U)_ab (D D^T)_ab| / |delta|^2`` (1 for factors in an
        orthogonal gauge): how much rounding of the factor products the sum
        that makes ``|delta|^2`` can amplify. The kernel uses float32 products
        for a module only when it is small (:data:`F32_KERNEL_CANCEL`).
    """

    modules: list[str]
    out_features: dict[str, int]
    in_shape: dict[str, tuple[int, ...]]
    up: Mapping[str, np.ndarray]
    down: Mapping[str, np.ndarray]
    owner: Mapping[str, np.ndarray]
    max_rank: dict[str, int]
    n_models: int
    spill: _FactorSpill | None = None
    self_ss: dict[str, float] | None = None
    cancel: dict[str, float] | None = None

    def segments(self, m: str) -> list[tuple[int, int, int]]:
        """``(model, rank, start)`` of each model holding module ``m``, in model order."""
        if self.spill is not None:
            return self.spill.segments.get(m, [])
        owner = np.asarray(self.owner[m])
        if owner.size == 0:
            return []
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        ends = np.r_[starts[1:], owner.size]
        return [(int(owner[a]), int(b - a), int(a)) for a, b in zip(starts, ends, strict=True)]

    def kernel_dtype(self, m: str) -> str:
        """``"float32"`` or ``"float64"``: the precision of module ``m``'s kernel
        products (see :data:`F32_KERNEL_CANCEL`)."""
        cancel = self.cancel.get(m) if self.cancel is not None else None
        return "float32" if cancel is not None and cancel <= F32_KERNEL_CANCEL else "float64"

    @property
    def total_rank(self) -> dict[str, int]:
        """``R_m``: the summed rank of each module over models."""
        return {m: sum(r for _, r, _ in self.segments(m)) for m in self.modules}

    def factor_bytes(self, m: str) -> int:
        """Bytes of module ``m``'s float32 stack (up and down)."""
        width = self.out_features[m] + math.prod(self.in_shape[m])
        return 4 * width * sum(r for _, r, _ in self.segments(m))

    def block(self, m: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Factors of the segments ``lo:hi`` of module ``m`` (see :meth:`segments`).

        Returns
        -------
        up : numpy.ndarray
            ``(out, R)`` float32 (possibly a transposed view).
        down : numpy.ndarray
            ``(R, in_flat)`` float32 (possibly a view).
        owner : numpy.ndarray
            ``(R,)`` int64 model index of each column/row.
        """
        segs = self.segments(m)[lo:hi]
        owner = _segment_owner(segs)
        out_f = self.out_features[m]
        if self.spill is None:
            c0 = segs[0][2] if segs else 0
            c1 = segs[-1][2] + segs[-1][1] if segs else 0
            up = np.asarray(self.up[m])[:, c0:c1]
            down = np.asarray(self.down[m])[c0:c1]
            return up, down, owner
        if isinstance(self.spill, _SavedFactors):  # stored apart: no row copy
            up, down = self.spill.factors(m, lo, hi)
            return up, down, owner
        rows = self.spill.read(m, out_f + math.prod(self.in_shape[m]), lo, hi, out_f)
        # views of the one read (the up part transposed in place: matrix products take
        # it as it is, no copy)
        return rows[:, :out_f].T, rows[:, out_f:], owner

    def close(self) -> None:
        """Remove the spill file (if any); the mappings are unusable after."""
        if self.spill is not None:
            self.spill.close()


def layer_factors(layer: LoraLayer | DeltaLayer) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``(up * scale (out, r), down (r, in_flat))`` with ``up @ down == delta``.

    A :class:`~w2wkit.adapter.DeltaLayer` is factorised exactly by an SVD.
    """
    if isinstance(layer, LoraLayer):
        r = layer.rank
        up = np.asarray(layer.up, dtype=np.float32).reshape(layer.out_features, r)
        down = np.asarray(layer.down, dtype=np.float32).reshape(r, -1)
        return up * np.float32(layer.scale), down
    w = np.asarray(layer.weight, dtype=np.float64).reshape(layer.weight.shape[0], -1)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    keep = s > s[0] * 1e-7 if s.size and s[0] > 0 else np.zeros(s.shape, bool)
    keep[0] = True
    return (u[:, keep] * s[keep]).astype(np.float32), vt[keep].astype(np.float32)


class Collection:
    """An ordered set of models to fit a space on.

    Parameters
    ----------
    source : str, os.PathLike or iterable of them, optional
        A folder (searched recursively), a glob, one file, or a list of files
        and PEFT folders (see :func:`w2wkit.formats.discover_lora_files`).
    adapters : sequence of Adapter, optional
        In-memory models instead of files.
    names : sequence of str, optional
        Names of in-memory adapters (default ``model_0000``...).
    format : str, optional
        Force the input format of every file.
    allow_pickle : bool
        Also read pickle files.
    cache_dir : str or os.PathLike, optional
        Where to put the row cache (default: a temporary folder removed when
        the rows are closed or garbage-collected).

    Raises
    ------
    SpaceError
        When nothing is found.
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
        *,
        adapters: Sequence[Adapter] | None = None,
        names: Sequence[str] | None = None,
        format: str | None = None,
        allow_pickle: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.format = format
        self.allow_pickle = allow_pickle
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._adapters: list[Adapter] | None = None
        self.files: list[Path] = []
        if adapters is not None:
            self._adapters = list(adapters)
            if not self._adapters:
                raise SpaceError("empty list of adapters")
            self.names = (
                list(names)
                if names is not None
                else [f"model_{i:04d}" for i in range(len(self._adapters))]
            )
            if len(self.names) != len(self._adapters):
                raise SpaceError(f"{len(self.names)} names for {len(self._adapters)} adapters")
        else:
            if source is None:
                raise SpaceError("a collection needs a folder, glob, list of files or adapters")
            from w2wkit.formats.registry import discover_lora_files

            try:
                self.files = discover_lora_files(source, allow_pickle=allow_pickle)
            except FormatError as exc:
                raise SpaceError(
                    f"no models to fit: {exc}",
                    hint="point at a folder of .safetensors LoRA files",
                ) from None
            self.names = _model_names(self.files)
        self.manifest: list[dict[str, Any]] = []
        #: Base model family of each model read so far (see :func:`model_family`).
        self.families: list[str] = []

    @classmethod
    def from_adapters(
        cls, adapters: Sequence[Adapter], names: Sequence[str] | None = None
    ) -> Collection:
        """A collection of in-memory adapters."""
        return cls(adapters=adapters, names=names)

    def __len__(self) -> int:
        return len(self._adapters) if self._adapters is not None else len(self.files)

    def __repr__(self) -> str:
        return f"Collection({len(self)} models)"

    # ---------------------------------------------------------------- reading
    def read(self, i: int) -> tuple[Adapter, dict[str, Any]]:
        """Read model ``i`` (validated) with its manifest entry."""
        name = self.names[i]
        if self._adapters is not None:
            ad = self._adapters[i]
            ad = Adapter(dict(ad.layers), dict(ad.metadata), ad.source or name, ad.format)
            ad.validate()  # rank-0 and other degenerate layers too
            entry = {
                "name": name,
                "file": ad.source if ad.source != name else None,
                "format": ad.format,
                "sha256": None,
                "row": i,
            }
            if (prompt := _metadata_prompt(ad.metadata)) is not None:
                entry["prompt"] = prompt
            return ad, entry
        from w2wkit.formats.registry import read_adapter

        path = self.files[i]
        ad = read_adapter(path, format=self.format, allow_pickle=self.allow_pickle)
        entry = {
            "name": name,
            "file": str(path),
            "format": ad.format,
            "sha256": file_sha256(path),
            "row": i,
        }
        if (prompt := _metadata_prompt(ad.metadata)) is not None:
            entry["prompt"] = prompt
        return ad, entry

    def iter_adapters(self, progress: Progress | None = None) -> Iterator[tuple[int, Adapter]]:
        """Read the models one at a time, recording the manifest and the families."""
        self.manifest = []
        self.families = []
        n = len(self)
        for i in range(n):
            ad, entry = self.read(i)
            self.manifest.append(entry)
            self.families.append(model_family(ad, self.files[i] if self.files else None))
            if progress is not None:
                progress("read", i + 1, n)
            yield i, ad

    def check_one_family(self) -> None:
        """Refuse models of more than one known base family (after a scan).

        Raises
        ------
        LayoutError
            Listing each family with its number of models and an example.
        """
        known = {f for f in self.families if f in ("sd1", "sdxl")}
        if len(known) < 2:
            return
        groups: dict[str, list[str]] = {}
        for i, fam in enumerate(self.families):
            groups.setdefault(fam, []).append(str(self.files[i]) if self.files else self.names[i])
        desc = "; ".join(
            f"{fam}: {len(items)} model{'s' if len(items) > 1 else ''} (e.g. {items[0]})"
            for fam, items in sorted(groups.items(), key=lambda kv: -len(kv[1]))
        )
        raise LayoutError(
            f"models of different base model families cannot share a space: {desc}",
            hint="fit one space per base model (SD1.x or SDXL)",
        )

    def _require_models(self, minimum: int = 2) -> None:
        if len(self) < minimum:
            where = self.files[0] if self.files else None
            raise SpaceError(
                f"a space needs at least {minimum} models, the collection has {len(self)}",
                path=where,
            )

    # ----------------------------------------------------------- factor rows
    def scan_factors(
        self,
        *,
        progress: Progress | None = None,
        in_memory: bool | Callable[[int, int], bool] = False,
        in_files: bool | Callable[[int, int], bool] = False,
    ) -> FactorRows:
        """Read every model once: check layouts, cache rows, compute statistics.

        Parameters
        ----------
        progress : callable, optional
            ``progress("read", done, total)``.
        in_memory : bool or callable
            Put the rows in one ``(N, d)`` array in memory (no disk cache; the
            statistics come from one pass over it after the reads), for a solver
            that holds the data in memory anyway. A callable ``(N, d) -> bool``
            decides once the first model has given ``d``.
        in_files : bool or callable
            When the rows are not held in memory: leave them in the models' own
            files and read them from there on every pass (:class:`_FileRows`;
            only the rows the fast kohya path does not read go to a row cache)
            instead of writing them all to a row cache on disk. For a solver that
            reads the rows a whole row at a time. A callable ``(N, d) -> bool``
            decides once the first model has given ``d``.

        Returns
        -------
        FactorRows
            ``(N, d)`` float32 rows (a row cache on disk, the files, or in
            memory) with mean/variance.

        Notes
        -----
        kohya files laid out exactly like the first one (same tensors, dtypes,
        shapes, offsets and alphas; float32) are copied into their rows straight
        from the file's bytes, read and hashed a few files ahead in a thread (see
        :class:`_KohyaRows`); every other file goes through the ordinary reader.

        Raises
        ------
        LayoutError
            When the models do not share one layout; the message lists the
            groups (which models, which modules/ranks differ) and suggests
            the delta representation.
        """
        self._require_models()
        n = len(self)
        layout: WeightLayout | None = None
        groups: dict[str, list[str]] = {}
        layouts: dict[str, WeightLayout] = {}
        data: np.ndarray | None = None
        cleanup = None
        stats: _ColumnStats | None = None
        try:
            rows_of = self._iter_factor_rows(progress, lambda: data, lambda: stats)
            for i, ad in rows_of:
                if ad is None:  # copied into data[i] and counted by the reader threads
                    groups[next(iter(groups))].append(self.names[i])
                    continue
                lay = WeightLayout.from_adapter(ad)
                groups.setdefault(lay.signature, []).append(self.names[i])
                layouts.setdefault(lay.signature, lay)
                if layout is None:
                    layout = lay
                    if callable(in_memory):
                        in_memory = bool(in_memory(n, layout.dim))
                    if callable(in_files):
                        in_files = bool(in_files(n, layout.dim))
                    if in_memory:
                        data = bulk_empty((n, layout.dim), np.float32)
                    elif in_files and self.files:
                        data, cleanup = self._open_file_rows(n, layout.dim)
                    else:
                        data, cleanup = self._open_cache(n, layout.dim)
                    stats = _ColumnStats(layout.dim)
                    self._fast_layout = layout
                if len(groups) > 1:
                    continue
                assert data is not None and stats is not None
                row = layout.flatten(ad)
                data[i] = row
                stats.add_row(row)
            self.check_one_family()
        except BaseException:
            if cleanup is not None:
                cleanup()
            raise
        finally:
            if isinstance(data, _RowFile):
                data.end_writes()
        assert layout is not None and data is not None
        if len(groups) > 1:
            if cleanup is not None:
                cleanup()
            raise LayoutError(
                f"models do not share one factor layout: {describe_layout_groups(groups, layouts)}",
                hint="the factors representation needs one rank and module set; "
                'use `representation="delta"`',
            )
        assert stats is not None
        if isinstance(data, _FileRows):
            data.direct = outgrows_page_cache(data.file_bytes)
        elif isinstance(data, _RowFile):
            data.direct = outgrows_page_cache(4 * n * data.shape[1])
        mean, var = stats.result()
        return FactorRows(layout, data, mean, var, cleanup, bool(in_memory))

    def _iter_factor_rows(
        self,
        progress: Progress | None,
        rows: Callable[[], np.ndarray | None],
        stats: Callable[[], _ColumnStats | None] | None = None,
    ) -> Iterator[tuple[int, Adapter | None]]:
        """:meth:`iter_adapters` as ``(i, adapter)``, except that a kohya file laid out like
        the first one is copied into ``rows()[i]`` directly and yields ``(i, None)``.

        Reader threads take the files in runs of :data:`READ_RUN` (fewer where a run's
        rows would pass :data:`READ_RUN_BYTES`), three runs a thread ahead of the caller.
        Into memory (an ndarray) they copy the rows into their places; into a row cache on
        disk (:class:`_RowFile`) they write them, a run in one write (around the page
        cache when the cache outgrows it); for rows left in their files
        (:class:`_FileRows`) they record where the rows lie; any other target is written
        by the caller's thread, in order.

        With ``stats`` (giving the scan's :class:`_ColumnStats` once the first row is
        known), the reader threads add the rows they copy to statistics of their own,
        merged into it once every file has been read: the caller adds only the rows it
        reads itself.
        """
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.manifest = []
        self.families = []
        n = len(self)
        self._fast_layout: WeightLayout | None = None
        self._fast_reader: _KohyaRows | None = None
        fast: _KohyaRows | None = None
        tried = False
        workers = read_threads()
        run_files = READ_RUN
        ahead = 3 * workers * run_files
        counted = _ThreadStats() if stats is not None else None
        with contextlib.ExitStack() as stack:
            pool: ThreadPoolExecutor | None = None
            pending: deque[tuple[int, int, Any]] = deque()
            submitted = 0  # files below it have a job
            run: tuple[int, int, list[Any], np.ndarray | None] | None = None
            for i in range(n):
                data = rows()
                if fast is not None and data is not None:
                    # the workers read, hash, check and copy a few runs of files ahead
                    if pool is None:
                        # a file the page cache does not hold is read around it unless the
                        # passes read the rows from these files (they want them cached):
                        # the files' pages then do not push the rows out (measured, 30k
                        # cold: 44-50 s -> 35-41 s). A row cache that outgrows the page
                        # cache (the passes read it around it) is written around it too,
                        # by at least 4 threads (they wait for the disk): measured at 65k
                        # cold, 69-73 s -> 50-55 s (docs/space.md, "The scan")
                        fast.direct = not isinstance(data, _FileRows)
                        if isinstance(data, _RowFile):
                            data.write_direct = outgrows_page_cache(4 * n * int(data.shape[1]))
                            if data.write_direct:
                                workers = max(workers, DIRECT_SCAN_THREADS)
                        if files_cold(self.files[i:]):
                            # every thread waits for the disk at each read: more of them
                            # keep the cores busy (10k cold, 2 / 4 threads: into memory
                            # 8.1-8.4 / 6.4-7.2 s, left in the files 7.5-7.9 / 6.5-6.9 s)
                            workers = max(workers, DIRECT_SCAN_THREADS)
                        pool = stack.enter_context(
                            ThreadPoolExecutor(workers, thread_name_prefix="w2wkit-read")
                        )
                        submitted = i
                        run_files = max(1, min(READ_RUN, READ_RUN_BYTES // (4 * data.shape[1])))
                        ahead = 3 * workers * run_files
                    while submitted < min(n, i + ahead):
                        hi = min(n, submitted + run_files)
                        job = (fast, self.files[submitted:hi], data, submitted, counted)
                        pending.append((submitted, hi, pool.submit(_read_rows_job, *job)))
                        submitted = hi
                    if run is None or i >= run[1]:
                        lo, hi, fut = pending.popleft()
                        run = (lo, hi, *fut.result())
                    got = run[2][i - run[0]]
                    if got is not None:
                        meta, digest = got
                        if run[3] is not None:  # a target the reader threads do not write
                            data[i] = run[3][i - run[0]]
                        entry: dict[str, Any] = {
                            "name": self.names[i],
                            "file": str(self.files[i]),
                            "format": "kohya",
                            "sha256": digest,
                            "row": i,
                        }
                        if (prompt := _metadata_prompt(meta)) is not None:
                            entry["prompt"] = prompt
                        self.manifest.append(entry)
                        self.families.append(fast.family(meta))
                        if progress is not None:
                            progress("read", i + 1, n)
                        yield i, None
                        continue
                ad, entry = self.read(i)
                self.manifest.append(entry)
                self.families.append(model_family(ad, self.files[i] if self.files else None))
                if progress is not None:
                    progress("read", i + 1, n)
                yield i, ad
                if not tried and self.files and self._fast_layout is not None:
                    tried = True
                    fast = self._kohya_template(i, ad)
                    self._fast_reader, self._fast_reader_row = fast, i  # built on file i
                    target_rows = rows()
                    if isinstance(target_rows, _FileRows):
                        target_rows.template = fast
        if counted is not None and stats is not None:
            main = stats()
            if main is not None:
                counted.merge_into(main)

    def _kohya_template(self, i: int, ad: Adapter) -> _KohyaRows | None:
        """The fast reader built on file ``i`` (just read as ``ad``), or None."""
        path = self.files[i]
        layout = self._fast_layout
        if ad.format != "kohya" or path.suffix.lower() != ".safetensors" or layout is None:
            return None
        if any(layout.rslora.values()):
            return None
        try:
            fast = _KohyaRows(path, layout)
        except (ValueError, KeyError, TypeError, FormatError, OSError):
            return None
        from w2wkit.names import families_fitting, kohya_uses_sgm

        shapes = {m: tuple(layer.delta_shape) for m, layer in ad.items()}
        fits = families_fitting(shapes)
        sgm = kohya_uses_sgm(fast.header)
        fast.shapes, fast.fits, fast.sgm = shapes, fits, sgm
        return fast

    def _open_cache(self, n: int, d: int) -> tuple[np.ndarray, Callable[[], None] | None]:
        if n * d * 4 <= min(256 << 20, memory_budget()) and self.cache_dir is None:
            return np.empty((n, d), dtype=np.float32), None
        parent = Path(self.cache_dir or tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_row_caches(parent)
        folder = Path(tempfile.mkdtemp(prefix=f"{ROW_CACHE_PREFIX}{os.getpid()}-", dir=parent))
        arr = _RowFile(folder / "rows.npy", n, d)
        fin = weakref.finalize(arr, _close_and_remove, arr.fd, str(folder))
        return arr, fin  # type: ignore[return-value]

    def _open_file_rows(self, n: int, d: int) -> tuple[_FileRows, Callable[[], None]]:
        """Rows left in the files (:class:`_FileRows`), with a side row cache opened on
        demand in ``cache_dir`` or the temporary folder; the cleanup removes it."""
        opened: list[Callable[[], None]] = []

        def open_side() -> _RowFile:
            parent = Path(self.cache_dir or tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            _remove_dead_row_caches(parent)
            folder = Path(tempfile.mkdtemp(prefix=f"{ROW_CACHE_PREFIX}{os.getpid()}-", dir=parent))
            side = _RowFile(folder / "rows.npy", n, d)
            opened.append(weakref.finalize(side, _close_and_remove, side.fd, str(folder)))
            return side

        rows = _FileRows(self.files, n, d, open_side)

        def cleanup() -> None:
            rows.close()
            for fin in opened:
                fin()
            rows.side = None

        return rows, cleanup

    # ----------------------------------------------------------- delta factors
    def scan_deltas(
        self, *, progress: Progress | None = None, spill: bool | None = None
    ) -> DeltaFactors:
        """Read every model once and stack each module's factors.

        Models may differ in rank, alpha, format, modules (a module a model
        lacks counts as a zero delta) and factor gauge; only the delta shape
        of a module must agree.

        Parameters
        ----------
        progress : Progress, optional
        spill : bool, optional
            Write the factors once to a spill file (in ``cache_dir`` or the
            temporary folder) instead of holding them in memory. Default: spill
            for a collection of files, keep in-memory adapters in memory.

        Raises
        ------
        LayoutError
            When two models disagree on the delta shape of a module.
        """
        self._require_models()
        if spill is None:
            spill = self._adapters is None
        store = _FactorSpill(self.cache_dir) if spill else None
        modules: list[str] = []
        out_f: dict[str, int] = {}
        in_s: dict[str, tuple[int, ...]] = {}
        ups: dict[str, list[np.ndarray]] = {}
        downs: dict[str, list[np.ndarray]] = {}
        owners: dict[str, list[np.ndarray]] = {}
        max_rank: dict[str, int] = {}
        self_ss: dict[str, float] = {}
        cancel: dict[str, float] = {}
        first_of: dict[str, str] = {}
        try:
            for i, ad in self.iter_adapters(progress):
                path = stamp = None
                if store is not None and self.files and os.path.isfile(self.files[i]):
                    path = os.fspath(self.files[i])
                    st = os.stat(path)
                    stamp = (int(st.st_size), int(st.st_mtime_ns))
                for module, layer in ad.items():
                    shape = layer.delta_shape
                    if module not in out_f:
                        modules.append(module)
                        out_f[module] = int(shape[0])
                        in_s[module] = tuple(int(s) for s in shape[1:])
                        ups[module], downs[module], owners[module] = [], [], []
                        max_rank[module] = 0
                        self_ss[module] = 0.0
                        first_of[module] = self.names[i]
                    elif (out_f[module], *in_s[module]) != shape:
                        raise LayoutError(
                            f"delta shape {shape} differs from {(out_f[module], *in_s[module])} "
                            f"of {first_of[module]}",
                            path=ad.source,
                            key=module,
                        )
                    up, down = layer_factors(layer)
                    u64, d64 = up.astype(np.float64), down.astype(np.float64)
                    pq = (u64.T @ u64) * (d64 @ d64.T)
                    ss = float(np.sum(pq))
                    self_ss[module] += ss
                    mag = float(np.sum(np.abs(pq)))
                    ratio = mag / ss if ss > 0 else (1.0 if mag == 0 else math.inf)
                    cancel[module] = max(cancel.get(module, 1.0), ratio)
                    if store is not None:
                        store.add(module, i, layer, (up, down), path, stamp)
                    else:
                        ups[module].append(up)
                        downs[module].append(down)
                        owners[module].append(np.full(up.shape[1], i, dtype=np.int64))
                    max_rank[module] = max(max_rank[module], up.shape[1])
            self.check_one_family()
        except BaseException:
            if store is not None:
                store.close()
            raise
        fac = DeltaFactors(
            modules=modules,
            out_features=out_f,
            in_shape=in_s,
            up={},
            down={},
            owner={},
            max_rank=max_rank,
            n_models=len(self),
            spill=store,
            self_ss=self_ss,
            cancel=cancel,
        )
        if store is None:
            fac.up = {m: np.concatenate(ups[m], axis=1) for m in modules}
            fac.down = {m: np.concatenate(downs[m], axis=0) for m in modules}
            fac.owner = {m: np.concatenate(owners[m]) for m in modules}
        else:
            fac.up = _LazyFactors(fac, 0)
            fac.down = _LazyFactors(fac, 1)
            fac.owner = _LazyFactors(fac, 2)
        return fac


class _FactorSpill:
    """Every model's factors of every module, read from where they lie on disk.

    A model's module is one segment of ``r`` rows ``[up[:, j] | down[j]]`` (scale
    folded into ``up``). Where the reader handed the factors over as views of the
    model's file (a safetensors file's ``F32``/``F16`` tensors, stored as the layer
    uses them: kohya, diffusers and PEFT files), the segment records their byte
    offsets and is read back from that file (no copy on disk; the file is checked
    against its size and modification time at every read). Any other segment
    (converted, widened ``BF16``, SVD-factorised, in-memory) is appended as float32
    to a spill file created on first use. Plain ``pread``/``pwrite`` (no memory
    map), so the store takes no address space and no resident memory beyond the
    rows being read. The spill file is removed with the store (or at exit).
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.parent = Path(folder) if folder is not None else Path(tempfile.gettempdir())
        self.folder: Path | None = None
        self.path: Path | None = None
        self.fd = -1
        self.size = 0
        #: module -> list of (model index, rank, at): ``at >= 0`` a byte offset in the
        #: spill file, ``at < 0`` the source ``-1 - at`` of :attr:`sources`
        self.segments: dict[str, list[tuple[int, int, int]]] = {}
        #: (file index, up offset, down offset, dtype, scale) of each sourced segment
        self.sources: list[tuple[int, int, int, str, float]] = []
        #: (path, (size, mtime_ns)) of each source file
        self.files: list[tuple[str, tuple[int, int]]] = []
        self._file_ids: dict[str, int] = {}
        self._fin: Any = None

    @property
    def spilled_bytes(self) -> int:
        """Bytes written to the spill file (0: every segment read from its file)."""
        return self.size

    def _open_spill(self) -> None:
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="w2wkit-deltas-", dir=self.parent))
        except OSError as exc:
            raise SpaceError(
                f"cannot create the delta factor spill file: {exc.strerror or exc}",
                path=self.parent,
                hint="point cache_dir at a writable folder",
            ) from None
        self.path = self.folder / "factors.f32"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._fin = weakref.finalize(self, _close_and_remove, self.fd, str(self.folder))

    def append(self, module: str, i: int, up: np.ndarray, down: np.ndarray) -> None:
        """Spill model ``i``'s factors of ``module``: ``up (out, r)`` with the scale
        folded in, ``down (r, in_flat)``."""
        if self.fd < 0:
            self._open_spill()
        rows = np.ascontiguousarray(np.concatenate([up.T, down], axis=1), dtype="<f4")
        view = memoryview(rows).cast("B")
        at = self.size
        self.segments.setdefault(module, []).append((int(i), int(up.shape[1]), at))
        try:
            while view:
                done = os.pwrite(self.fd, view[:BUFFERED_WRITE_BYTES], at)
                view, at = view[done:], at + done
        except OSError as exc:
            raise SpaceError(
                f"cannot write the delta factor spill file: {exc.strerror or exc}",
                path=self.path,
                hint="free disk space or point cache_dir at a larger disk",
            ) from None
        self.size = at

    def add(
        self,
        module: str,
        i: int,
        layer: LoraLayer | DeltaLayer,
        factors: tuple[np.ndarray, np.ndarray],
        path: str | None,
        stamp: tuple[int, int] | None,
    ) -> None:
        """Record model ``i``'s factors of ``module`` (``factors``: ``up (out, r)``,
        scale folded in, and ``down (r, in_flat)``): by their place in ``path`` when
        ``layer`` holds views of that file's bytes, else spilled."""
        place = None
        if isinstance(layer, LoraLayer) and path is not None and stamp is not None:
            place = _file_place(layer, stamp[0])
        if place is None:
            self.append(module, i, *factors)
            return
        fid = self._file_ids.get(path)
        if fid is None:
            fid = self._file_ids[path] = len(self.files)
            self.files.append((path, stamp))
        self.sources.append((fid, place[0], place[1], place[2], layer.scale))
        at = -len(self.sources)
        self.segments.setdefault(module, []).append((int(i), layer.rank, at))

    def _read_source(self, src: int, out: np.ndarray, out_f: int) -> None:
        """Fill ``out`` ``(r, width)`` with a sourced segment's rows."""
        fid, up_at, down_at, dtype, scale = self.sources[src]
        path, stamp = self.files[fid]
        r, width = out.shape
        dt = np.dtype(dtype)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise SpaceError(
                f"cannot read a model's factors: {exc.strerror or exc}",
                path=path,
                hint="a delta space fitted from files reads them until it is saved",
            ) from None
        try:
            st = os.fstat(fd)
            if (int(st.st_size), int(st.st_mtime_ns)) != stamp:
                raise SpaceError(
                    "the file changed since the collection was read",
                    path=path,
                    hint="a delta space fitted from files reads them until it is saved; fit again",
                )
            up = np.empty((out_f, r), dt)
            down = np.empty((r, width - out_f), dt)
            _pread_exact(fd, up, up_at, path)
            _pread_exact(fd, down, down_at, path)
        finally:
            os.close(fd)
        np.multiply(up.T, np.float32(scale), out=out[:, :out_f], dtype=np.float32)
        out[:, out_f:] = down

    def read(self, module: str, width: int, lo: int, hi: int, out_f: int = 0) -> np.ndarray:
        """``(R, width)`` float32 rows of the segments ``lo:hi`` of ``module``
        (``out_f``: the ``up`` part's width, for the segments read from files)."""
        segs = self.segments.get(module, [])[lo:hi]
        total = sum(r for _, r, _ in segs)
        out = np.empty((total, width), dtype=np.float32)
        row = 0
        for _, r, at in segs:
            if at < 0:
                self._read_source(-1 - at, out[row : row + r], out_f)
                row += r
                continue
            _pread_exact(self.fd, out[row : row + r], at, str(self.path))
            row += r
        return out

    def close(self) -> None:
        """Remove the spill file now (the models' own files stay)."""
        if self._fin is not None:
            self._fin()


def _pread_exact(fd: int, buf: np.ndarray, at: int, path: str) -> None:
    """Fill ``buf`` with the file's bytes from offset ``at`` (a short file: one error)."""
    view = memoryview(buf).cast("B")
    while view:
        got = os.preadv(fd, [view], at)
        if got <= 0:
            raise SpaceError("the file is shorter than the factors recorded for it", path=path)
        view, at = view[got:], at + got


def _file_place(layer: LoraLayer, file_size: int) -> tuple[int, int, str] | None:
    """``(up offset, down offset, dtype)`` of a layer's factors in its file's bytes, or
    ``None`` when they are not plain views of the whole file (converted or copied)."""
    at = []
    for arr in (layer.up, layer.down):
        if arr.dtype not in (np.dtype("<f4"), np.dtype("<f2")) or not arr.flags.c_contiguous:
            return None
        root: Any = arr
        while isinstance(root, np.ndarray) and root.base is not None:
            root = root.base
        if not isinstance(root, bytes | mmap.mmap | memoryview):
            return None
        whole = np.frombuffer(root, np.uint8)
        if whole.size != file_size:
            return None
        off = arr.__array_interface__["data"][0] - whole.__array_interface__["data"][0]
        if off < 0 or off + arr.nbytes > whole.size:
            return None
        at.append(off)
    if layer.up.dtype != layer.down.dtype:
        return None
    return at[0], at[1], layer.up.dtype.str


class _SavedFactors:
    """The factor stacks of a saved delta space, read from its arrays file in blocks.

    The same interface as :class:`_FactorSpill` (``segments``, :meth:`read`,
    :meth:`close`), over the ``delta.<i>.up`` ``(out, R)`` and ``delta.<i>.down``
    ``(R, in)`` float32 tensors of a safetensors file: a block of models reads
    its ``down`` rows in one ``pread`` and its ``up`` columns row by row, so a
    loaded space holds no factor in memory (nor maps the file).
    """

    def __init__(
        self,
        path: Path,
        places: Mapping[str, tuple[int, int, int, int, int]],
        owners: Mapping[str, np.ndarray],
    ) -> None:
        """``places``: module -> (byte offset of up, byte offset of down, R, out, in);
        ``owners``: module -> (R,) model index of each term (sorted)."""
        self.path = Path(path)
        self.places = dict(places)
        self.segments: dict[str, list[tuple[int, int, int]]] = {}
        for m, owner in owners.items():
            owner = np.asarray(owner)
            if owner.size == 0:
                self.segments[m] = []
                continue
            starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
            ends = np.r_[starts[1:], owner.size]
            self.segments[m] = [
                (int(owner[a]), int(b - a), int(a)) for a, b in zip(starts, ends, strict=True)
            ]
        self.fd = os.open(self.path, os.O_RDONLY)
        self._fin = weakref.finalize(self, os.close, self.fd)

    def _pread_into(self, buf: np.ndarray, at: int) -> None:
        _pread_exact(self.fd, buf, at, str(self.path))

    def factors(self, module: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """``up (out, T)`` and ``down (T, in)`` float32 of the segments ``lo:hi``, read
        straight into their arrays."""
        segs = self.segments.get(module, [])[lo:hi]
        up_at, down_at, total, out_f, in_f = self.places[module]
        if not segs:
            return np.empty((out_f, 0), np.float32), np.empty((0, in_f), np.float32)
        c0 = segs[0][2]
        t = segs[-1][2] + segs[-1][1] - c0
        down = np.empty((t, in_f), np.float32)
        self._pread_into(down, down_at + 4 * c0 * in_f)
        up = np.empty((out_f, t), np.float32)
        for o in range(out_f):  # column block c0:c0+t of each row of up
            self._pread_into(up[o], up_at + 4 * (o * total + c0))
        return up, down

    def read(self, module: str, width: int, lo: int, hi: int, out_f: int = 0) -> np.ndarray:
        """``(T, width)`` float32 rows ``[up[:, j] | down[j]]`` of the segments ``lo:hi``."""
        up, down = self.factors(module, lo, hi)
        return np.concatenate([up.T, down], axis=1)

    def close(self) -> None:
        """Close the file (the saved space stays)."""
        self._fin()


class _LazyFactors(Mapping):
    """``module -> up (out, R)``, ``down (R, in)`` or ``owner (R,)`` (part 0, 1, 2) of a
    spilled store, read on access.

    Each access reads the module's whole stack (one module at a time, never the
    whole store); the block-wise kernel reads blocks of models instead
    (:meth:`DeltaFactors.block`).
    """

    def __init__(self, fac: DeltaFactors, part: int) -> None:
        self._fac = fac
        self._part = part

    def __getitem__(self, m: str) -> np.ndarray:
        if m not in self._fac.out_features:
            raise KeyError(m)
        segs = self._fac.segments(m)
        if self._part == 2:
            return _segment_owner(segs)
        return self._fac.block(m, 0, len(segs))[self._part]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fac.modules)

    def __len__(self) -> int:
        return len(self._fac.modules)


def _segment_owner(segs: Sequence[tuple[int, int, int]]) -> np.ndarray:
    """``(R,)`` int64 model index of each rank-one term of the segments."""
    models = np.array([i for i, _, _ in segs], np.int64)
    return np.repeat(models, np.array([r for _, r, _ in segs], np.int64)).astype(np.int64)


def memory_budget() -> int:
    """Bytes a fit may hold its data in: 40% of what the process may still take.

    That is the head room under its address-space limit (``RLIMIT_AS``, when one
    is set) and the memory the kernel reports available (``MemAvailable``).
    """
    budget = math.inf
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            used = 0
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmSize:"):
                        used = int(line.split()[1]) * 1024
            budget = min(budget, 0.4 * max(soft - used, 0))
    except (ImportError, OSError, ValueError):
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    budget = min(budget, 0.4 * int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    return int(max(min(budget, 1 << 62), 1 << 20))


def _close_and_remove(fd: int, folder: str) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    shutil.rmtree(folder, ignore_errors=True)


class _RowFile:
    """An ``(N, d)`` float32 ``.npy`` file of rows, written and read with plain I/O.

    Unlike a memory map, it takes no address space beyond the rows being read or
    written (a fit under a memory cap -- ``RLIMIT_AS`` -- can stream a cache far
    larger than the cap) and its pages do not count as the process's resident
    memory. ``rows[i] = row`` writes a row, ``rows[lo:hi]`` reads a ``(hi - lo, d)``
    array that nothing else sees (a buffer of a :class:`_BlockPool`, reused only once no
    array uses it), ``rows[i]`` one row.
    """

    def __init__(self, path: Path, n: int, d: int) -> None:
        self.path = Path(path)
        self.shape = (int(n), int(d))
        self.dtype = np.dtype(np.float32)
        header = {"descr": "<f4", "fortran_order": False, "shape": self.shape}
        with open(self.path, "wb") as fh:
            np.lib.format.write_array_header_2_0(fh, header)
            self.offset = fh.tell()
            fh.truncate(self.offset + 4 * n * d)
        self.fd = os.open(self.path, os.O_RDWR)
        #: row slices read with ``O_DIRECT`` (set by the scan when the cache outgrows the
        #: page cache, see :data:`DIRECT_READ_RAM_FRACTION`)
        self.direct = False
        #: runs of rows written with ``O_DIRECT`` (their whole pages; the pages they share
        #: with the next run through the page cache): set by the scan when the cache
        #: outgrows the page cache, turned off by a file system that refuses it
        self.write_direct = False
        self._direct_fd: int | None = None
        self._lock = threading.Lock()
        #: buffered writes one at a time: threads writing one file through the page
        #: cache queue on its inode lock, where the kernel spins a waiter while the
        #: writer copies; a waiter on this lock sleeps instead (10k scan, 3.2 MB
        #: writes: 5.0-7.3 -> 4.4-4.8 s of system CPU; in 1 MiB pieces 2.3 -> 2.0-2.2)
        self._buffered = threading.Lock()
        self._blocks = _BlockPool()

    def __len__(self) -> int:
        return self.shape[0]

    def _read_direct(self, lo: int, rows: int) -> np.ndarray | None:
        """Rows ``lo:lo + rows`` read with ``O_DIRECT`` into a pooled page-aligned buffer
        (a C-contiguous view of it); None (and :attr:`direct` off) where the file system
        refuses ``O_DIRECT``."""
        d = self.shape[1]
        start = self.offset + 4 * d * lo
        end = start + 4 * d * rows
        a0 = start // _ALIGN * _ALIGN
        a1 = -(-end // _ALIGN) * _ALIGN
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            self.direct = False
            return None
        try:
            # one size for every block of ``rows`` rows (the pool reuses buffers by size)
            raw = self._blocks.raw(-(-(4 * d * rows + 2 * _ALIGN) // _ALIGN) * _ALIGN)
            view = memoryview(raw)[: a1 - a0]
            got = 0
            while a0 + got < end:
                try:
                    r = os.preadv(fd, [view[got:]], a0 + got)
                except OSError as exc:
                    if exc.errno == errno.EINVAL and got == 0:
                        self.direct = False
                        return None
                    raise
                if r <= 0:
                    raise OSError(f"{self.path}: short read")
                got += r
        finally:
            os.close(fd)
        return raw[start - a0 : end - a0].view(np.float32).reshape(rows, d)

    def __setitem__(self, i: int, row: np.ndarray) -> None:
        buf = np.ascontiguousarray(row, dtype="<f4")
        if buf.shape != (self.shape[1],):
            raise ValueError(f"row of shape {buf.shape}, need ({self.shape[1]},)")
        self.write_rows(int(i), buf[None])

    def write_phase(self, lo: int) -> int:
        """Where row ``lo`` starts within its page of the file (bytes)."""
        return (self.offset + 4 * self.shape[1] * int(lo)) % _ALIGN

    def _direct_writer(self) -> int | None:
        """A descriptor of the file opened with ``O_DIRECT`` (opened once); None, and
        :attr:`write_direct` off, where that cannot be."""
        with self._lock:
            if self._direct_fd is None and self.write_direct:
                try:
                    self._direct_fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
                except (OSError, AttributeError):  # no O_DIRECT on this file system
                    self.write_direct = False
            return self._direct_fd

    def write_rows(self, lo: int, block: np.ndarray) -> None:
        """Write ``block`` (b, d) as rows ``lo : lo + b`` (one ``pwrite`` where it can).

        With :attr:`write_direct`, the whole pages of the run go around the page
        cache in one ``O_DIRECT`` write when ``block`` lies in memory as the file will
        (:func:`_scratch_block` with :meth:`write_phase`); its first and last partial
        pages, shared with the neighbouring runs, through the page cache.
        """
        buf = np.ascontiguousarray(block, dtype="<f4")
        if buf.ndim != 2 or buf.shape[1] != self.shape[1] or lo + buf.shape[0] > self.shape[0]:
            raise ValueError(f"rows of shape {buf.shape} at {lo}, need (b, {self.shape[1]})")
        view = memoryview(buf).cast("B")
        at = self.offset + 4 * self.shape[1] * int(lo)
        try:
            if self.write_direct and len(view) >= 2 * _ALIGN:
                address = buf.__array_interface__["data"][0]
                head = -at % _ALIGN
                body = (len(view) - head) // _ALIGN * _ALIGN
                if (address + head) % _ALIGN == 0 and body:
                    fd = self._direct_writer()
                    if fd is not None and self._write_direct(
                        fd, view[head : head + body], at + head
                    ):
                        self._write_all(view[:head], at)
                        self._write_all(view[head + body :], at + head + body)
                        return
            self._write_all(view, at)
        except OSError as exc:  # a full disk: name the row cache, not just the errno
            if exc.filename is None and exc.errno is not None:
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
            raise

    def _write_direct(self, fd: int, view: memoryview, at: int) -> bool:
        """``view`` written at ``at`` with ``O_DIRECT``; False (nothing written, and
        :attr:`write_direct` off) where the file system refuses it."""
        done = 0
        while done < len(view):
            try:
                wrote = os.pwrite(fd, view[done:], at + done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and done == 0:
                    self.write_direct = False
                    return False
                raise
            if wrote <= 0 or wrote % _ALIGN:  # pragma: no cover - a short unaligned write
                view, at = view[done + wrote :], at + done + wrote
                self._write_all(view, at)
                return True
            done += wrote
        return True

    def _write_all(self, view: memoryview, at: int) -> None:
        """``view`` written at ``at`` through the page cache, in pieces of at most
        :data:`BUFFERED_WRITE_BYTES`, one writer at a time."""
        with self._buffered:
            while view:
                done = os.pwrite(self.fd, view[:BUFFERED_WRITE_BYTES], at)
                view, at = view[done:], at + done

    def __getitem__(self, key: int | slice) -> np.ndarray:
        n, d = self.shape
        if isinstance(key, slice):
            lo, hi, step = key.indices(n)
            if step != 1:
                raise IndexError("row slices must be contiguous")
            rows = max(0, hi - lo)
        else:
            lo = int(key) + (n if int(key) < 0 else 0)
            if not 0 <= lo < n:
                raise IndexError(key)
            rows = 1
        if self.direct and rows > 0:
            block = self._read_direct(lo, rows)
            if block is not None:
                return block if isinstance(key, slice) else block[0]
        # a block of a pass: a pooled buffer (no page faults); one row: its own array
        out = self._blocks.empty((rows, d)) if rows > 1 else np.empty((rows, d), np.float32)
        view = memoryview(out).cast("B")
        at = self.offset + 4 * d * lo
        while view:
            got = os.preadv(self.fd, [view], at)
            if got <= 0:
                raise OSError(f"{self.path}: short read")
            view, at = view[got:], at + got
        return out if isinstance(key, slice) else out[0]

    def read_columns(
        self,
        lo: int,
        hi: int,
        out: np.ndarray | None = None,
        transform: Callable[[np.ndarray, int, int], np.ndarray] | None = None,
    ) -> np.ndarray:
        """Columns ``lo:hi`` of every row: a fresh ``(N, hi - lo)`` array, or ``out`` filled
        (one read a row); ``transform(piece, lo, hi)`` is applied to each row's piece in
        place right after its read."""
        n, d = self.shape
        lo, hi = max(0, int(lo)), min(d, int(hi))
        if out is None:
            out = np.empty((n, max(0, hi - lo)), dtype=np.float32)
        elif out.shape != (n, max(0, hi - lo)) or not out.flags.c_contiguous:
            raise ValueError(f"out of shape {out.shape}, need ({n}, {hi - lo}) C-contiguous")
        if hi <= lo:
            return out
        for i in range(n):
            self.read_columns_of(i, lo, hi, out[i])
            if transform is not None:
                transform(out[i], lo, hi)
        return out

    def read_columns_of(self, i: int, lo: int, hi: int, out: np.ndarray) -> None:
        """Columns ``lo:hi`` of row ``i`` into ``out`` ``(hi - lo,)`` (one read)."""
        view = memoryview(out).cast("B")
        at = self.offset + 4 * self.shape[1] * int(i) + 4 * int(lo)
        while view:
            got = os.preadv(self.fd, [view], at)
            if got <= 0:
                raise OSError(f"{self.path}: short read")
            view, at = view[got:], at + got

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[0 : self.shape[0]]
        return out if dtype is None else out.astype(dtype)

    def flush(self) -> None:
        """Nothing to do: every write went to the file."""

    def end_writes(self) -> None:
        """Close the ``O_DIRECT`` descriptor of the writes (reopened should more come)."""
        with self._lock:
            fd, self._direct_fd = self._direct_fd, None
        if fd is not None:
            os.close(fd)


class _FileRows:
    """``(N, d)`` float32 rows left in the models' own files (no row cache).

    A factors fit that streams its rows (the randomized solver's passes with
    ``row_cache=False``; the Gram over column chunks while the files fit the page cache)
    reads them again from the files on every pass, instead of from a copy written to a
    row cache on disk: the scan writes nothing, the files alone compete for the page
    cache, and no temporary space of the data's size is needed. A kohya file laid out
    like the scan's template (:class:`_KohyaRows`) is read with one ``preadv`` that
    scatters its data section straight into its row (:meth:`_KohyaRows.column_plan` of
    every column), or a column chunk's bytes into the row's piece (:meth:`read_columns`);
    every other row (the template's own file, a file the fast path declined) is written
    by the scan to a side row cache (:class:`_RowFile`, created at the first such row,
    sparse).

    Every read checks the file's size and modification time against the scan's and
    raises :class:`~w2wkit.errors.SpaceError` naming a file that changed or vanished.
    The scan checked every value finite and hashed every file; a file is not re-read
    unless its stamp is unchanged.

    With :attr:`direct` (set by the scan when the files outgrow the page cache, see
    :data:`DIRECT_READ_RAM_FRACTION`) each file is read with ``O_DIRECT`` into an aligned
    buffer and its row copied out of it: a pass over more data than the page cache holds
    gets no cache hits anyway, and the kernel's cache insertion and reclaim cost about
    three times the CPU of the direct read (measured: 8,000 files, 3.4 GB, under a 1.5 GB
    memory cgroup: 2.2-4.0 s of CPU a pass buffered, 1.0-1.2 s direct; wall 4.2-6.6 s and
    3.1-3.5 s). A file system that refuses ``O_DIRECT`` is read the ordinary way.
    """

    def __init__(
        self, paths: Sequence[Path], n: int, d: int, open_side: Callable[[], _RowFile]
    ) -> None:
        self.paths = [os.fspath(p) for p in paths]
        self.shape = (int(n), int(d))
        self.dtype = np.dtype(np.float32)
        #: byte offset of each file's data section; -1: the row is in the side cache
        self.starts = np.full(int(n), -1, dtype=np.int64)
        self.stamps = np.zeros((int(n), 2), dtype=np.int64)
        self.template: _KohyaRows | None = None
        #: read with ``O_DIRECT`` (no page cache)
        self.direct = False
        self._open_side = open_side
        self.side: _RowFile | None = None
        self._lock = threading.Lock()
        self._pool: Any = None
        self._blocks = _BlockPool()

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def side_rows(self) -> int:
        """Rows held in the side cache."""
        return int(np.count_nonzero(self.starts < 0))

    def record(self, i: int, stamp: tuple[int, int], start: int) -> None:
        """Row ``i`` lies in its file from byte ``start`` on, as the template lays it out."""
        self.stamps[i] = stamp
        self.starts[i] = int(start)

    def __setitem__(self, i: int, row: np.ndarray) -> None:
        with self._lock:
            if self.side is None:
                self.side = self._open_side()
        self.side[i] = row
        self.starts[i] = -1

    def __getitem__(self, key: int | slice) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, slice):
            lo, hi, step = key.indices(n)
            if step != 1:
                raise IndexError("row slices must be contiguous")
            return self.read(lo, max(lo, hi))
        lo = int(key) + (n if int(key) < 0 else 0)
        if not 0 <= lo < n:
            raise IndexError(key)
        return self.read(lo, lo + 1)[0]

    def read(
        self, lo: int, hi: int, standardise: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """Rows ``lo:hi`` in a fresh ``(hi - lo, d)`` float32 array; with ``standardise=
        (mean32, scale32)``, ``(row - mean32) / scale32``, computed by the reader right
        after each row's read."""
        n, d = self.shape
        lo, hi = max(0, int(lo)), min(n, int(hi))
        out = self._blocks.empty((max(0, hi - lo), d))
        side = self.starts[lo:hi] < 0
        if side.any():
            assert self.side is not None
            # runs of consecutive side rows, one read each
            idx = np.flatnonzero(side)
            brk = np.flatnonzero(np.diff(idx) != 1) + 1
            for a, b in zip(np.r_[0, brk], np.r_[brk, idx.size], strict=True):
                r0, r1 = int(idx[a]), int(idx[b - 1]) + 1
                out[r0:r1] = self.side[lo + r0 : lo + r1]
                if standardise is not None:
                    out[r0:r1] -= standardise[0]
                    out[r0:r1] /= standardise[1]
        todo = [int(j) for j in np.flatnonzero(~side)]
        if self.direct and DIRECT_READ_THREADS > 1 and len(todo) > 1:
            # several reads in flight: a read's completion waits for a core the products
            # keep busy, so one reader alone falls behind them
            from concurrent.futures import ThreadPoolExecutor

            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(
                        DIRECT_READ_THREADS, thread_name_prefix="w2wkit-rows"
                    )

            def read_part(part: list[int]) -> None:
                for j in part:
                    self._read_file_row(lo + j, out[j], standardise)

            step = -(-len(todo) // DIRECT_READ_THREADS)
            parts = [todo[c : c + step] for c in range(0, len(todo), step)]
            list(self._pool.map(read_part, parts))
        else:
            for j in todo:
                self._read_file_row(lo + j, out[j], standardise)
        return out

    @property
    def file_bytes(self) -> int:
        """Bytes of the files the rows are read from."""
        return int(self.stamps[self.starts >= 0, 0].sum())

    def _read_file_row(
        self, i: int, out: np.ndarray, standardise: tuple[np.ndarray, np.ndarray] | None = None
    ) -> None:
        if not (self.direct and self._read_direct(i, out)):
            self._read_buffered(i, out)
        if standardise is not None:  # the row is in cache after its read
            out -= standardise[0]
            out /= standardise[1]

    def _open_checked(self, i: int, flags: int = 0) -> int | None:
        """File ``i`` opened (``O_RDONLY | flags``) and checked against its scan stamp: its
        descriptor; None where ``flags`` are refused (``EINVAL``: no ``O_DIRECT`` here).
        Raises :class:`~w2wkit.errors.SpaceError` naming a file that vanished or changed."""
        path = self.paths[i]
        try:
            fd = os.open(path, os.O_RDONLY | flags)
        except OSError as exc:
            if flags and exc.errno == errno.EINVAL:
                return None
            raise SpaceError(
                f"cannot read the file again during the fit: {exc.strerror or exc}",
                path=path,
                hint="do not move or delete the input files while a fit runs",
            ) from None
        st = os.fstat(fd)
        size, mtime = self.stamps[i].tolist()
        if st.st_size != size or st.st_mtime_ns != mtime:
            os.close(fd)
            raise SpaceError(
                "the file changed during the fit (its size or modification time differs "
                "from the scan's)",
                path=path,
                hint="do not write the input files while a fit runs",
            )
        return fd

    def _read_buffered(self, i: int, out: np.ndarray) -> None:
        """Row ``i`` scattered from its file into ``out`` (:meth:`_read_file_columns` with
        every column)."""
        tpl = self.template
        assert tpl is not None
        self._read_file_columns(i, int(self.starts[i]), tpl.column_plan(0, self.shape[1]), out)

    def _read_direct(self, i: int, out: np.ndarray) -> bool:
        """Row ``i`` read with ``O_DIRECT``; False (and :attr:`direct` off) where the file
        system refuses it."""
        path = self.paths[i]
        tpl = self.template
        assert tpl is not None
        size = int(self.stamps[i, 0])
        fd = self._open_checked(i, getattr(os, "O_DIRECT", 0))
        if fd is None:
            self.direct = False
            return False
        try:
            buf = _aligned_scratch(size)
            try:
                got = os.preadv(fd, [memoryview(buf)[: -(-size // _ALIGN) * _ALIGN]], 0)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    self.direct = False
                    return False
                raise SpaceError(
                    f"cannot read the file again during the fit: {exc.strerror or exc}",
                    path=path,
                ) from None
            if got != size:
                raise SpaceError("the file is shorter than when it was scanned", path=path)
        finally:
            os.close(fd)
        start = int(self.starts[i])
        data = np.frombuffer(buf, dtype="<f4", count=tpl.data_len // 4, offset=start)
        if tpl.runs is not None:
            for a, b, c in tpl.runs:
                out[a:b] = data[c : c + b - a]
        else:
            np.take(data, tpl.perm, out=out)
        return True

    def read_columns(
        self,
        lo: int,
        hi: int,
        out: np.ndarray | None = None,
        transform: Callable[[np.ndarray, int, int], np.ndarray] | None = None,
    ) -> np.ndarray:
        """Columns ``lo:hi`` of every row (see :meth:`_RowFile.read_columns`): from each
        file only the bytes of those columns, scattered into the row's piece by one
        ``preadv`` a stretch of the file (:meth:`_KohyaRows.column_plan`); side rows from
        the side cache. Every file is checked against its scan stamp as it is opened."""
        n, d = self.shape
        lo, hi = max(0, int(lo)), min(d, int(hi))
        if out is None:
            out = np.empty((n, max(0, hi - lo)), dtype=np.float32)
        elif out.shape != (n, max(0, hi - lo)) or not out.flags.c_contiguous:
            raise ValueError(f"out of shape {out.shape}, need ({n}, {hi - lo}) C-contiguous")
        if hi <= lo:
            return out
        tpl = self.template
        plan = tpl.column_plan(lo, hi) if tpl is not None else []
        starts = self.starts.tolist()
        for i in range(n):
            piece = out[i]
            start = starts[i]
            if start < 0:
                assert self.side is not None
                self.side.read_columns_of(i, lo, hi, piece)
            else:
                self._read_file_columns(i, start, plan, piece)
            if transform is not None:
                transform(piece, lo, hi)
        return out

    def _read_file_columns(self, i: int, start: int, plan: ColumnPlan, out: np.ndarray) -> None:
        """Fill ``out`` (one row's piece) from file ``i``, whose data section starts at byte
        ``start``, by ``plan`` (:meth:`_KohyaRows.column_plan`)."""
        path = self.paths[i]
        fd = self._open_checked(i)
        assert fd is not None
        try:
            row = memoryview(out).cast("B")
            for at, parts, skip, want in plan:
                scratch = _scratch_bytes(skip)
                iov = [row[a:b] if a >= 0 else scratch[:b] for a, b in parts]
                if os.preadv(fd, iov, start + at) != want:
                    raise SpaceError("the file is shorter than when it was scanned", path=path)
        except OSError as exc:
            raise SpaceError(
                f"cannot read the file again during the fit: {exc.strerror or exc}", path=path
            ) from None
        finally:
            os.close(fd)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[0 : self.shape[0]]
        return out if dtype is None else out.astype(dtype)

    def flush(self) -> None:
        """Nothing to do: every write went to the side cache's file."""

    def close(self) -> None:
        """Stop the reader threads (if any)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


class _BlockPool:
    """Row-block buffers that come back once no array uses them.

    A pass over rows read from disk asks for a new ``(b, d)`` block hundreds of times; a
    fresh 100 MB buffer costs its page faults (about 15 ms of CPU, measured on this
    project's machine: 21.6 ms to fill a fresh one, 6.1 ms to fill one again), on the
    cores the products use. A buffer handed out here is returned to the pool by a
    finalizer on the array that wraps it, which lives as long as any view of it: the
    memory is reused only when nothing can see it. At most ``keep`` idle buffers are
    kept.
    """

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep
        self._free: list[Any] = []
        self._lock = threading.RLock()

    def empty(self, shape: tuple[int, int]) -> np.ndarray:
        """An uninitialised float32 array of ``shape`` (its contents are old rows)."""
        return self.raw(4 * shape[0] * shape[1]).view(np.float32).reshape(shape)

    def raw(self, nbytes: int) -> np.ndarray:
        """An uninitialised ``(nbytes,)`` uint8 array on page-aligned memory (an anonymous
        map: what ``O_DIRECT`` reads need)."""
        buf = None
        with self._lock:
            for j, b in enumerate(self._free):
                if len(b) == nbytes:
                    buf = self._free.pop(j)
                    break
        if buf is None:
            buf = mmap.mmap(-1, max(nbytes, 1))
        base = np.frombuffer(buf, dtype=np.uint8, count=nbytes)
        weakref.finalize(base, self._give_back, buf)
        return base

    def _give_back(self, buf: Any) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)


#: most buffers one ``preadv`` takes (``IOV_MAX`` on Linux)
_IOV_MAX = 1024
_SCRATCH = threading.local()
#: alignment of ``O_DIRECT`` buffers and lengths
_ALIGN = 4096

#: Rows left in their files are read with ``O_DIRECT`` when the files hold more than this
#: fraction of the machine's memory (or of its memory cgroup's limit): a pass then finds
#: next to nothing in the page cache (it reads the files in the same order every time,
#: and the fit's own memory takes its share), and going around the cache takes a third of
#: the CPU (:class:`_FileRows`).
DIRECT_READ_RAM_FRACTION = 0.75

#: Threads reading rows with ``O_DIRECT`` in a pass (reads in flight while the products
#: hold the cores; measured on 4,000 files of 65k beside the products, 2 cores: the pass
#: waited 2.5 s on 1 reader, 1.0 s on 4, 0.7 s on 8)
DIRECT_READ_THREADS = 8


def outgrows_page_cache(nbytes: float) -> bool:
    """Whether ``nbytes`` of files or rows hold more than :data:`DIRECT_READ_RAM_FRACTION`
    of :func:`physical_memory`: a read of them then finds next to nothing in the page
    cache (the rule by which passes and scans read around it, and the floor counts the
    disk's rate)."""
    return float(nbytes) > DIRECT_READ_RAM_FRACTION * physical_memory()


def physical_memory(
    proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
    cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
) -> int:
    """Bytes of memory the page cache can use at most: the machine's RAM, or the limit of
    the process's memory cgroup (v1 or v2, read from ``proc_cgroup`` under
    ``cgroup_root``) when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limits = []
    with contextlib.suppress(OSError, ValueError):
        for line in Path(proc_cgroup).read_text().splitlines():
            _, controllers, where = line.split(":", 2)
            if controllers == "":  # cgroup v2
                limits.append(Path(cgroup_root, where.lstrip("/"), "memory.max"))
            elif "memory" in controllers.split(","):
                limits.append(
                    Path(cgroup_root, "memory", where.lstrip("/"), "memory.limit_in_bytes")
                )
    for limit_file in limits:
        with contextlib.suppress(OSError, ValueError):
            total = min(total, int(limit_file.read_text().strip()))
    return int(total)


def _aligned_scratch(size: int) -> mmap.mmap:
    """A thread's page-aligned buffer of at least ``size`` bytes rounded up to
    :data:`_ALIGN` (an anonymous map: aligned as ``O_DIRECT`` needs)."""
    need = -(-max(size, 1) // _ALIGN) * _ALIGN
    buf = getattr(_SCRATCH, "aligned", None)
    if buf is None or len(buf) < need:
        buf = _SCRATCH.aligned = mmap.mmap(-1, need)
    return buf


def _scratch_bytes(size: int) -> memoryview:
    """A thread's scratch buffer of at least ``size`` bytes (where bytes no row keeps go)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or len(buf) < size:
        buf = _SCRATCH.buf = memoryview(bytearray(size))
    return buf


class _KohyaRows:
    """Rows of kohya files whose tensors lie exactly where a template file's do.

    Built from the first file of a collection (read and validated by the kohya
    reader). Another file whose header (validated by the same strict parser)
    lists the same tensors with the same dtypes, shapes and offsets, all float32,
    with the same alphas, differs from the template only in its values and
    metadata: its row is copied straight out of the file's bytes, checked
    finite, with no :class:`~w2wkit.adapter.Adapter` built. Any other file (or
    any doubt) goes through the ordinary reader, which raises its errors.
    """

    def __init__(self, path: Path, layout: WeightLayout) -> None:
        from w2wkit.formats.kohya import SUFFIXES, kohya_module
        from w2wkit.stio import _parse_layout

        raw = Path(path).read_bytes()
        (hlen,) = np.frombuffer(raw[:8], dtype="<u8")
        lay = _parse_layout(raw[8 : 8 + int(hlen)], len(raw), str(path))
        self.header = lay.header
        self._head_around = _around_metadata(raw[8 : 8 + int(hlen)])
        #: read a file the page cache does not hold with ``O_DIRECT`` (:meth:`read_file`;
        #: set by the scan, turned off by the first file system that refuses it)
        self.direct = False
        #: bytes :meth:`read_file` read from files whose page-cache residency the kernel
        #: told, and of those from files it did not hold whole (the read floor counts
        #: these at the disk's rate, :meth:`cold_fraction`)
        self.asked_bytes = 0
        self.cold_bytes = 0
        self._count = threading.Lock()
        #: :meth:`column_plan` by ``(lo, hi)`` (a fit asks the same few chunks again)
        self._column_plans: dict[tuple[int, int], ColumnPlan] = {}
        roles: dict[str, dict[str, str]] = {}
        for key in lay.header:
            for suffix, role in SUFFIXES.items():
                if key.endswith("." + suffix):
                    roles.setdefault(kohya_module(key[: -len(suffix) - 1], str(path)), {})[role] = (
                        key
                    )
                    break
            else:
                raise ValueError(key)
        # the row as one gather from the data section: perm[j] = float32 index of entry j
        self.perm = np.empty(layout.dim, dtype=np.intp)
        for slot in layout.slots:
            key = roles[slot.module][slot.factor]
            info = lay.header[key]
            if info["dtype"] != "F32" or tuple(info["shape"]) != tuple(slot.shape):
                raise ValueError(key)
            lo, hi = info["data_offsets"]
            if hi - lo != 4 * slot.size or lo % 4:
                raise ValueError(key)
            self.perm[slot.offset : slot.stop] = np.arange(lo // 4, lo // 4 + slot.size)
        # the same gather as copies of contiguous runs, when there are few of them
        brk = np.flatnonzero(np.diff(self.perm) != 1) + 1
        starts, ends = np.r_[0, brk], np.r_[brk, self.perm.size]
        #: every run ``(a, b, c)``: ``row[a:b] = data[c : c + b - a]``, an ``(R, 3)`` int64
        #: table (the native copy's); :attr:`runs` the same as tuples when there are few
        self.run_table = np.ascontiguousarray(
            np.stack([starts, ends, self.perm[starts]], axis=1), dtype=np.int64
        ).reshape(-1, 3)
        self.runs: list[tuple[int, int, int]] | None = None
        if len(starts) <= 512:
            self.runs = [(a, b, c) for a, b, c in self.run_table.tolist()]
        self.data_len = len(raw) - lay.start
        self.file_size = len(raw)
        if self.data_len % 4:
            raise ValueError("data")
        self.n_tensors = len(lay.header)
        alpha_index, alpha_values = [], []
        for module in layout.modules:
            r = roles[module]
            if set(r) - {"down", "up", "alpha"}:
                raise ValueError(module)
            if "alpha" in r:
                info = lay.header[r["alpha"]]
                lo, hi = info["data_offsets"]
                value = np.float32(layout.alphas[module])
                if (
                    info["dtype"] != "F32"
                    or hi - lo != 4
                    or lo % 4
                    or value != layout.alphas[module]
                ):
                    raise ValueError(module)
                alpha_index.append(lo // 4)
                alpha_values.append(value)
            elif layout.alphas[module] != float(layout._by_module[module][0].shape[0]):
                raise ValueError(module)
        if set(roles) != set(layout.modules):
            raise ValueError("modules")
        self.alpha_index = np.array(alpha_index, dtype=np.int64)
        self.alpha_values = np.array(alpha_values, dtype=np.float32)
        #: bytes of a reader thread's buffer per file of a native run (the template's size
        #: and 64 KiB for longer metadata, in whole pages; a larger file is read apart)
        self.native_span = -(-(self.file_size + 1 + (64 << 10)) // _ALIGN) * _ALIGN
        #: the template's row, float64: the shift of the statistics the native copies sum
        data = np.frombuffer(raw, dtype="<f4", count=self.data_len // 4, offset=lay.start)
        self.shift = data[self.perm].astype(np.float64)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.fits: Any = ()
        self.sgm = False

    def fingerprint(self) -> str:
        """SHA-256 of the template's tensor entries (names, dtypes, shapes, offsets): two
        readers with the same fingerprint find every value at the same place."""
        import hashlib

        text = json.dumps(self.header, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def column_runs(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Where entries ``lo:hi`` of a row lie in a file laid out like the template:
        ``(a, b, c)`` with ``row[lo + a : lo + b] = data[c : c + b - a]`` (``data`` the
        float32 data section)."""
        p = self.perm[lo:hi]
        if p.size == 0:
            return []
        brk = np.flatnonzero(np.diff(p) != 1) + 1
        starts, ends = np.r_[0, brk], np.r_[brk, p.size]
        return [(int(a), int(b), int(p[a])) for a, b in zip(starts, ends, strict=True)]

    def family(self, metadata: dict[str, str]) -> str:
        """:func:`model_family` of a file with the template's tensors and ``metadata``."""
        if not self.fits:
            return "unknown"
        if len(self.fits) == 1:
            return next(iter(self.fits))
        return _family_of(self.shapes, self.fits, self.sgm, metadata)

    def row(self, path: Path, raw: bytes | memoryview, out: np.ndarray) -> dict[str, str] | None:
        """Copy ``path``'s row into ``out`` (d,); its metadata, or None to use the reader."""
        got = self.head(raw)
        if got is None:
            return None
        meta, start = got
        data = np.frombuffer(raw, dtype="<f4", count=self.data_len // 4, offset=start)
        if not np.array_equal(data[self.alpha_index], self.alpha_values):
            return None  # another alpha: the reader folds it into up
        if self.runs is not None:
            for a, b, c in self.runs:
                out[a:b] = data[c : c + b - a]
        else:
            np.take(data, self.perm, out=out)
        if not np.isfinite(out).all():
            return None
        return meta

    def head(self, raw: bytes | memoryview) -> tuple[dict[str, str], int] | None:
        """The metadata of the file whose bytes are ``raw`` and where its data section
        starts, when its header lists the template's tensors at the template's offsets
        and its data section has the template's length; else None (the caller then uses
        the ordinary reader)."""
        if len(raw) < 8:
            return None
        hlen = int.from_bytes(raw[:8], "little")
        start = 8 + hlen
        if len(raw) - start != self.data_len:
            return None
        head = bytes(raw[8:start])
        meta = self._same_header(head)
        if meta is None:
            # the same tensors at the same offsets as the template (which the strict
            # parser accepted); a duplicated key would add an entry the dict comparison
            # cannot see
            if head.count(b'"data_offsets"') != self.n_tensors:
                return None
            try:
                header = json.loads(head)
            except (ValueError, RecursionError):
                return None
            if not isinstance(header, dict):
                return None
            meta = header.pop("__metadata__", None) or {}
            if header != self.header or not isinstance(meta, dict):
                return None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            return None
        return meta, start

    def _same_header(self, head: bytes) -> dict[str, str] | None:
        """The metadata of a header that is the template's text with only its
        ``__metadata__`` object replaced (by an object of unique keys); else None.

        Text equality around the metadata means the same tensor entries, in the
        same order, as the header the strict parser accepted: no JSON parse of
        the tensor entries is needed.
        """
        if self._head_around is None:
            return None
        before, after = self._head_around
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if after is None:  # a template without metadata: the very same header
            return {} if text == before else None
        if not text.startswith(before) or not text.endswith(after):
            return None
        try:
            meta, end = _METADATA_DECODER.raw_decode(text, len(before))
        except (ValueError, RecursionError):
            return None
        if end != len(text) - len(after) or not isinstance(meta, dict):
            return None
        return meta

    def read_row(
        self, path: Path, out: np.ndarray, where: dict[str, Any] | None = None
    ) -> tuple[dict[str, str], str] | None:
        """Read ``path`` once, hash it and copy its row into ``out`` (d,).

        Thread-safe (each thread reads into its own buffer); the SHA-256 and the
        copies release the GIL, so a few threads overlap them. ``where``, when
        given, receives the file's ``stamp`` (size, modification time in ns) and
        ``start`` (the byte offset of its data section) for a row that was read.
        With :attr:`direct` a file the page cache does not hold is read around it
        (:meth:`read_file`).

        Returns
        -------
        (metadata, sha256 hex) or None
            None when the file is not a regular file laid out like the template
            (the caller then uses the ordinary reader, which names any error).
        """
        got = self.read_file(path)
        if got is None:
            return None
        raw, st = got
        return self._finish_row(path, raw, st, out, where)

    def _finish_row(
        self,
        path: Path,
        raw: memoryview,
        st: os.stat_result,
        out: np.ndarray,
        where: dict[str, Any] | None,
    ) -> tuple[dict[str, str], str] | None:
        """Hash the file's bytes ``raw``, check them and copy the row into ``out``."""
        import hashlib

        digest = hashlib.sha256(raw).hexdigest()
        meta = self.row(path, raw, out)
        if meta is None:
            return None
        if where is not None:
            where["stamp"] = (int(st.st_size), int(st.st_mtime_ns))
            where["start"] = 8 + int.from_bytes(raw[:8], "little")
        return meta, digest

    def read_file(self, path: Path) -> tuple[memoryview, os.stat_result] | None:
        """The whole file (to its end, should it have grown since its ``fstat``) in this
        thread's aligned scratch buffer, and its ``fstat``; None for anything but a regular
        file or a file that cannot be read (the ordinary reader then names the problem).

        With :attr:`direct` a file the page cache does not hold whole
        (:func:`page_cache_holds`) is read with ``O_DIRECT``: one device read and no
        page-cache insertion and reclaim (docs/space.md, "The scan"). A file system that
        refuses ``O_DIRECT`` turns :attr:`direct` off.
        """
        import fcntl
        import stat

        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > (1 << 40):
                return None
            held = page_cache_holds(fd, st.st_size)
            direct = self.direct and held is False
            if direct:
                try:
                    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
                except (OSError, AttributeError):  # no O_DIRECT here
                    self.direct = direct = False
            span = -(-(st.st_size + 1) // _ALIGN) * _ALIGN  # one aligned read past the end
            while True:
                view = memoryview(_aligned_scratch(span))[:span]
                try:
                    got = os.preadv(fd, [view], 0)
                except OSError as exc:
                    if direct and exc.errno == errno.EINVAL:  # O_DIRECT refused at the read
                        self.direct = False
                        return self.read_file(path)
                    return None
                if got < span:
                    if held is not None:
                        with self._count:
                            self.asked_bytes += got
                            self.cold_bytes += got if not held else 0
                    return view[:got], st
                span *= 2  # the file grew past the buffer: read it again, whole, into more
        finally:
            os.close(fd)

    def cold_fraction(self) -> float | None:
        """The share of the bytes :meth:`read_file` read that came from files the page
        cache did not hold whole (so from the disk); None where the kernel told nothing
        of residency."""
        with self._count:
            return self.cold_bytes / self.asked_bytes if self.asked_bytes else None

    def column_plan(self, lo: int, hi: int) -> ColumnPlan:
        """How to read entries ``lo:hi`` of a row from a file laid out like the template:
        one ``preadv`` for each ``(at, parts, skip, want)``, at byte ``at`` of the data
        section, of ``want`` bytes, into the buffers ``parts`` in file order -- ``(a, b)``
        the bytes ``a:b`` of the ``(hi - lo,)`` piece, ``(-1, size)`` bytes skipped (an
        alpha between two runs; ``skip`` the largest). Runs the file holds far apart (or
        out of order) get reads of their own, so no read skips more than
        :data:`COLUMN_GAP_BYTES` at once, and none has more than ``IOV_MAX`` buffers."""
        cache = self._column_plans
        plan = cache.get((lo, hi))
        if plan is not None:
            return plan
        runs = sorted(self.column_runs(lo, hi), key=lambda r: r[2])
        groups: list[tuple[int, list[tuple[int, int]]]] = []
        pos = -1
        for a, b, c in runs:
            near = 0 <= 4 * (c - pos) <= COLUMN_GAP_BYTES
            if groups and near and len(groups[-1][1]) < _IOV_MAX - 1:
                if c > pos:
                    groups[-1][1].append((-1, 4 * (c - pos)))
            else:
                groups.append((4 * c, []))
            groups[-1][1].append((4 * a, 4 * b))
            pos = c + b - a
        plan = [
            (
                at,
                parts,
                max((b for a, b in parts if a < 0), default=0),
                sum(b if a < 0 else b - a for a, b in parts),
            )
            for at, parts in groups
        ]
        if len(cache) < 64:
            cache[(lo, hi)] = plan
        return plan


#: how to read a stretch of columns from a model's file: one ``preadv`` per
#: ``(at, parts, skip, want)`` (see :meth:`_KohyaRows.column_plan`)
ColumnPlan = list[tuple[int, list[tuple[int, int]], int, int]]

#: a column read from a model's file skips at most this many bytes between two of the
#: column's runs within one ``preadv`` (:meth:`_KohyaRows.column_plan`); a wider gap
#: starts a read of its own
COLUMN_GAP_BYTES = 64 << 10

#: files a reader thread of a factors scan takes at a time (one hand-over, one wake-up and,
#: into a row cache, one write per run instead of per file)
READ_RUN = 8
#: reader threads of a scan whose row cache is written with ``O_DIRECT`` at least (each
#: waits for the disk at every read and write; 2 / 4 / 8 threads on 2 cores at 65k: 60-67 /
#: 50-55 / 56-57 s)
DIRECT_SCAN_THREADS = 4
#: a buffered write of the row cache goes in pieces of at most this many bytes (one
#: pwrite of a run of 8 SD1.5 rows, 3.2 MB, cost the 10k scan 2.6 s more of system CPU
#: than pieces of 256 KiB-2 MiB, 7.7 s vs 5.1-5.5 s, in one state of the VM; even in
#: another, never faster)
BUFFERED_WRITE_BYTES = 1 << 20
#: at most this many bytes of rows in a run (SDXL-size rows: fewer files a run)
READ_RUN_BYTES = 16 << 20


class _ThreadStats:
    """Column statistics of the rows the reader threads of a scan copy, one
    :class:`_ColumnStats` per thread (no lock held while adding), merged at the end."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[_ColumnStats] = []
        self._lock = threading.Lock()

    def add(self, block: np.ndarray) -> None:
        """Add the rows of ``block`` (b, d) to this thread's statistics."""
        mine = getattr(self._local, "stats", None)
        if mine is None:
            mine = self._local.stats = _ColumnStats(block.shape[1])
            with self._lock:
                self._all.append(mine)
        mine.add_block(block)

    def mine(self, d: int, shift: np.ndarray) -> _ColumnStats:
        """This thread's statistics, made with ``shift`` ``(d,)`` float64 when new."""
        mine = getattr(self._local, "stats", None)
        if mine is None:
            mine = self._local.stats = _ColumnStats(d)
            mine.shift = np.array(shift, dtype=np.float64)
            with self._lock:
                self._all.append(mine)
        return mine

    def merge_into(self, total: _ColumnStats) -> None:
        """Add every thread's statistics to ``total``."""
        for part in self._all:
            total.merge(part)
        self._all = []


def _scratch_block(rows: int, d: int, phase: int = 0) -> np.ndarray:
    """This thread's reused ``(rows, d)`` float32 block (grown when too small), starting
    ``phase`` bytes (a multiple of 4, below :data:`_ALIGN`) past a page boundary: a run
    of rows bound for file offset ``o`` with ``phase = o % _ALIGN`` has its page-aligned
    part at page-aligned addresses (what an ``O_DIRECT`` write needs)."""
    need = phase + 4 * rows * d
    buf = getattr(_SCRATCH, "block", None)
    if buf is None or len(buf) < need:
        buf = _SCRATCH.block = anon_map(-(-max(need, 1) // _ALIGN) * _ALIGN)
    return np.frombuffer(buf, dtype=np.float32, count=rows * d, offset=phase).reshape(rows, d)


def _read_rows_job(
    fast: _KohyaRows,
    paths: Sequence[Path],
    target: Any,
    lo: int,
    stats: _ThreadStats | None,
) -> tuple[list[tuple[dict[str, str], str] | None], np.ndarray | None]:
    """A reader thread's work on the run of files ``paths`` (rows ``lo : lo + len(paths)``).

    Each file is read, hashed, checked and copied by :meth:`_KohyaRows.read_row`: into
    ``target``'s rows when it is an ndarray; else into this thread's scratch block, and
    from there written to a :class:`_RowFile` (contiguous rows in one write), recorded
    as lying in its file for :class:`_FileRows`, or -- any other target -- handed back
    in a block of its own for the caller to write. The rows read are added to ``stats``
    when given.

    Returns
    -------
    results : list
        Per file, ``(metadata, sha256 hex)`` or None (the caller reads that file
        with the ordinary reader).
    block : ndarray or None
        ``(len(paths), d)``: the rows, for a target the caller writes; else None.
    """
    m, d = len(paths), int(target.shape[1])
    held = isinstance(target, np.ndarray)
    hand_back = not isinstance(target, (np.ndarray, _RowFile, _FileRows))  # the caller writes
    if held:
        block = target[lo : lo + m]
        populate(block)
    elif hand_back:
        block = np.empty((m, d), dtype=np.float32)
    else:
        phase = target.write_phase(lo) if isinstance(target, _RowFile) else 0
        block = _scratch_block(m, d, phase)
    results: list[tuple[dict[str, str], str] | None] = []
    nat = native()
    summed = False  # the rows read are in stats already
    if nat is not None and block.flags.c_contiguous and block.dtype == np.float32:
        mine = stats.mine(d, fast.shift) if stats is not None else None
        results = _read_run_native(nat, fast, paths, block, target, lo, mine)
        summed = True
    for k, path in enumerate(paths[len(results) :]):
        if isinstance(target, _FileRows):
            where: dict[str, Any] = {}
            got = fast.read_row(path, block[k], where)
            if got is not None:
                target.record(lo + k, where["stamp"], where["start"])
        else:
            got = fast.read_row(path, block[k])
        results.append(got)
    # runs of rows that were read: written (row cache) and counted a run at a time
    k = 0
    while k < m:
        if results[k] is None:
            k += 1
            continue
        end = k + 1
        while end < m and results[end] is not None:
            end += 1
        if isinstance(target, _RowFile):
            target.write_rows(lo + k, block[k:end])
        if stats is not None and not summed:
            stats.add(block[k:end])
        k = end
    return results, block if hand_back else None


def _read_run_native(
    nat: Native,
    fast: _KohyaRows,
    paths: Sequence[Path],
    block: np.ndarray,
    target: Any,
    lo: int,
    stats: _ColumnStats | None = None,
) -> list[tuple[dict[str, str], str] | None]:
    """:func:`_read_rows_job`'s reads, hashes, checks and copies of the run ``paths`` by
    the native helper (:mod:`w2wkit.native`): one call reads and hashes every file into
    this thread's buffer, the headers are checked here (:meth:`_KohyaRows.head`), one
    call copies the rows into ``block`` ``(len(paths), d)`` and checks their alphas and
    values. A file the helper could not read whole into its slot (larger than
    :attr:`_KohyaRows.native_span`, not a regular file, an error) goes through
    :meth:`_KohyaRows.read_row`, as on the Python path; the results are those of
    :meth:`_KohyaRows.read_row`, file by file. With ``stats`` (shifted by
    :attr:`_KohyaRows.shift`) every row read is added to it: the helper's in the same
    pass as their copy, the others after :meth:`_KohyaRows.read_row`."""
    from w2wkit import native as nv

    m, span = len(paths), fast.native_span
    buf = _native_scratch(m * span)
    digests = np.empty((m, 32), dtype=np.uint8)
    info = np.empty((m, 6), dtype=np.int64)
    flags = nv.ASK_HELD | (nv.DIRECT if fast.direct else 0)
    nat.read_files([os.fsencode(p) for p in paths], buf.ctypes.data, span, digests, info, flags)
    view = memoryview(buf)
    start = np.zeros(m, dtype=np.int64)
    ok = np.zeros(m, dtype=np.uint8)
    metas: list[dict[str, str] | None] = [None] * m
    apart: list[int] = []  # read by read_row
    asked = cold = 0
    for k in range(m):
        got = int(info[k, nv.GOT])
        if info[k, nv.REFUSED]:
            fast.direct = False
        if got < 0 or got >= span:
            apart.append(k)
            continue
        if info[k, nv.HELD] >= 0:
            asked += got
            cold += 0 if info[k, nv.HELD] else got
        head = fast.head(view[k * span : k * span + got])
        if head is not None:
            metas[k], start[k] = head
            ok[k] = 1
    if asked:
        with fast._count:
            fast.asked_bytes += asked
            fast.cold_bytes += cold
    sums = None
    if stats is not None:
        assert stats.shift is not None
        sums = (stats.shift, stats.total, stats.total_sq)
    kept = nat.gather(
        buf.ctypes.data,
        span,
        start,
        fast.run_table,
        fast.alpha_index,
        fast.alpha_values,
        block[:m],
        ok,
        sums,
        # rows left in their files are only checked and summed (unless nothing sums them)
        copy=not (isinstance(target, _FileRows) and sums is not None),
    )
    if stats is not None:
        stats.n += kept
    results: list[tuple[dict[str, str], str] | None] = [None] * m
    for k in range(m):
        if ok[k]:
            meta = metas[k]
            assert meta is not None
            results[k] = (meta, digests[k].tobytes().hex())
            if isinstance(target, _FileRows):
                target.record(
                    lo + k, (int(info[k, nv.SIZE]), int(info[k, nv.MTIME_NS])), int(start[k])
                )
    for k in apart:
        where: dict[str, Any] = {}
        results[k] = fast.read_row(paths[k], block[k], where)
        if results[k] is None:
            continue
        if isinstance(target, _FileRows):
            target.record(lo + k, where["stamp"], where["start"])
        if stats is not None:
            stats.add_block(block[k : k + 1])
    return results


def _native_scratch(nbytes: int) -> np.ndarray:
    """This thread's page-aligned uint8 buffer of at least ``nbytes`` for
    :func:`_read_run_native` (grown when too small)."""
    buf = getattr(_SCRATCH, "native", None)
    if buf is None or buf.size < nbytes:
        size = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        buf = _SCRATCH.native = np.frombuffer(anon_map(size), dtype=np.uint8)
    return buf


@functools.cache
def _mincore_calls() -> tuple[Any, Any, int] | None:
    """ctypes, libc (``mmap``, ``mincore`` and ``munmap`` typed) and ``MAP_FAILED``; None
    where libc has no ``mincore``."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):  # pragma: no cover - no libc mincore here
        return None
    return ctypes, libc, ctypes.c_void_p(-1).value


#: ``madvise`` advice that faults a range in, writable, in one call (Linux 5.14)
_MADV_POPULATE_WRITE = 23


@functools.cache
def _madvise_call() -> Any | None:
    """libc's ``madvise`` (typed), or None where there is none."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - no libc madvise here
        return None
    return fn


_POPULATE = {"on": sys.platform.startswith("linux")}


def populate(block: np.ndarray) -> None:
    """Fault the pages of the C-contiguous ``block`` in, writable, before it is filled.

    One ``madvise(MADV_POPULATE_WRITE)`` call for the whole range instead of one page
    fault per 4 KiB page as the copies first touch it: filling 4 GB of fresh anonymous
    memory took 1.2-2.1 s of system CPU this way against 1.6-7.4 s by touching it
    (benchmarks/README.md, "Where the rows live"). Pages already there are left as they are; a
    kernel without the advice (before Linux 5.14) turns this off and the copies fault
    the pages in as before. Only for private memory (the scan's rows in memory).
    """
    if not _POPULATE["on"] or block.nbytes == 0:
        return
    fn = _madvise_call()
    if fn is None:
        _POPULATE["on"] = False
        return
    start = block.ctypes.data
    lo = start // _ALIGN * _ALIGN
    hi = start + block.nbytes
    if fn(lo, hi - lo, _MADV_POPULATE_WRITE) != 0:
        import ctypes

        if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS):
            _POPULATE["on"] = False  # an older kernel: the advice is unknown


#: ``cachestat(2)`` (Linux 6.5): its number on the architectures that share it
_CACHESTAT_NR = 451
_CACHESTAT_MACHINES = {"x86_64", "amd64", "aarch64", "arm64", "riscv64", "ppc64le", "s390x"}


@functools.cache
def _cachestat_call() -> tuple[Any, Any, Any] | None:
    """ctypes, libc's ``syscall`` (typed) and the ``cachestat(2)`` range and result
    structures, where that call may exist; else None."""
    import platform
    import sys

    if not sys.platform.startswith("linux") or platform.machine().lower() not in (
        _CACHESTAT_MACHINES
    ):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syscall
    except (OSError, AttributeError):  # pragma: no cover - no libc syscall here
        return None
    call.restype = ctypes.c_long

    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_uint64)
            for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "recent")
        ]

    return ctypes, call, (Range, Stat)


_CACHESTAT = {"works": True}


def _cachestat_holds(fd: int, size: int) -> bool | None:
    """Whether ``cachestat(2)`` counts every page of the file's first ``size`` bytes in
    the page cache; None where the kernel (or a seccomp filter) refuses the call."""
    calls = _cachestat_call() if _CACHESTAT["works"] else None
    if calls is None:
        return None
    ctypes, call, (range_type, stat_type) = calls
    rng, stat = range_type(0, size), stat_type()
    if call(_CACHESTAT_NR, fd, ctypes.byref(rng), ctypes.byref(stat), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
            _CACHESTAT["works"] = False  # not on this kernel: ask mincore from now on
        return None
    return int(stat.nr_cache) >= -(-size // mmap.PAGESIZE)


def page_cache_holds(fd: int, size: int) -> bool | None:
    """Whether every page of the open file ``fd`` (``size`` bytes) is in the page cache.

    Asked of ``cachestat(2)`` (one system call, ~5 us here), or where the kernel lacks
    it of ``mincore(2)`` on a read-only mapping (a map, the call and an unmap: ~22 us
    and a TLB flush on every thread). Neither starts a read, unlike a ``RWF_NOWAIT``
    read, whose readahead made a cold scan as slow as a buffered one. None where
    neither can be asked.
    """
    if size <= 0:
        return True
    held = _cachestat_holds(fd, size)
    if held is not None:
        return held
    return _mincore_holds(fd, size)


def _mincore_holds(fd: int, size: int) -> bool | None:
    """:func:`page_cache_holds` asked of ``mincore(2)``."""
    calls = _mincore_calls()
    if calls is None:
        return None
    ctypes_, libc, failed = calls
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == failed:
        return None
    try:
        vec = ctypes_.create_string_buffer(-(-size // mmap.PAGESIZE))
        if libc.mincore(addr, size, vec) != 0:
            return None
        resident = np.frombuffer(vec.raw, dtype=np.uint8) & 1  # bit 0: the page is in RAM
        return bool(resident.all())
    finally:
        libc.munmap(addr, size)


#: files of a collection :func:`files_cold` asks the page cache about
COLD_SAMPLE = 5


def files_cold(paths: Sequence[Path]) -> bool:
    """Whether the page cache misses any of :data:`COLD_SAMPLE` files spread over
    ``paths`` (the first, the last and evenly between): the scan then reads from the
    disk. False where the kernel cannot tell (:func:`page_cache_holds`)."""
    if not paths:
        return False
    count = min(COLD_SAMPLE, len(paths))
    picks = sorted({round(j * (len(paths) - 1) / max(count - 1, 1)) for j in range(count)})
    for j in picks:
        try:
            fd = os.open(paths[j], os.O_RDONLY)
        except OSError:
            continue  # the reader names it
        try:
            if page_cache_holds(fd, os.fstat(fd).st_size) is False:
                return True
        finally:
            os.close(fd)
    return False


def read_threads() -> int:
    """Threads that read, hash and copy files in a factors scan: the cores this
    process may use, at least 2 (one overlaps the reads with the caller), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 2
    return max(2, min(8, cores))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


_METADATA_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _around_metadata(head: bytes) -> tuple[str, str | None] | None:
    """Header text before and after the value of its top-level ``__metadata__`` key;
    ``(text, None)`` for a header without one; None when it is not where a plain
    search finds it."""
    try:
        text = head.decode("utf-8")
        whole = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(whole, dict):
        return None
    if "__metadata__" not in whole:
        return text, None
    key = '"__metadata__"'
    at = text.find(key)
    if at < 0:
        return None
    j = at + len(key)
    while j < len(text) and text[j] in " \t\r\n":
        j += 1
    if text[j : j + 1] != ":":
        return None
    j += 1
    while j < len(text) and text[j] in " \t\r\n":
        j += 1
    try:
        meta, end = _METADATA_DECODER.raw_decode(text, j)
    except (ValueError, RecursionError):
        return None
    if meta != whole["__metadata__"]:
        return None
    return text[:j], text[end:]


def anon_map(nbytes: int) -> mmap.mmap:
    """A private anonymous memory map of ``nbytes`` in 4 KiB pages.

    Private, not shared: a shared anonymous map (``mmap.mmap(-1, n)``'s default) is
    backed by ``shmem``, whose page faults cost 1.3-1.9x those of ordinary anonymous
    pages here (filling 4 GB: 3.1-5.4 s vs 2.1-2.8 s of CPU, benchmarks/README.md
    "The scan a run at a time"). Huge pages are declined (see :func:`bulk_empty`).
    """
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    if not flags:  # pragma: no cover - not POSIX
        return mmap.mmap(-1, nbytes)
    buf = mmap.mmap(-1, nbytes, flags=flags)
    with contextlib.suppress(AttributeError, OSError):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return buf


#: buffers at least this large are taken from an anonymous map (:func:`bulk_empty`)
_BULK_MIN_BYTES = 64 << 20


def bulk_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array in ordinary 4 KiB pages.

    numpy asks the kernel for transparent huge pages on every large array. On
    the virtual machines this project runs on, first-touching fresh huge pages
    was measured 2-3x slower than small pages (reading 4 GB into a fresh array:
    12.6 s vs 4.9 s) while the BLAS products ran at the same speed, so the
    solvers take their large buffers (>= 64 MiB) from an anonymous memory map
    instead; smaller ones come from ``np.empty``. The map is released with the
    array.

    Parameters
    ----------
    shape : tuple of int
    dtype : dtype

    Returns
    -------
    ndarray, shape ``shape``
    """
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    if nbytes < _BULK_MIN_BYTES:
        return np.empty(shape, dtype=dt)
    return np.frombuffer(anon_map(nbytes), dtype=dt).reshape(shape)


class _ColumnStats:
    """Column sums of ``(row - shift)`` and of its square, float64, a block of rows at a time.

    ``shift`` is the first row (shifted sums: a variance that is small next to the
    mean keeps its digits). Rows given one at a time (:meth:`add_row`) are gathered
    into a block of :attr:`ROWS`; a block (:meth:`add_block`) is widened to float64
    a column chunk at a time (a chunk of the block stays in cache while it is
    shifted, summed, squared and summed: the block is read from memory once, and no
    float64 copy of a whole row or block is made).
    """

    ROWS = 32
    CHUNK = 4096

    def __init__(self, d: int) -> None:
        self.d = int(d)
        self.n = 0
        self.shift: np.ndarray | None = None
        self.total = np.zeros(self.d)
        self.total_sq = np.zeros(self.d)
        self._buf: np.ndarray | None = None
        self._filled = 0

    def add_row(self, row: np.ndarray) -> None:
        """Add one ``(d,)`` row (copied: the caller may reuse its buffer)."""
        if self._buf is None:
            self._buf = np.empty((self.ROWS, self.d), dtype=np.float32)
        self._buf[self._filled] = row
        self._filled += 1
        if self._filled == self.ROWS:
            self.flush()

    def flush(self) -> None:
        """Add the rows gathered by :meth:`add_row` so far."""
        if self._filled:
            assert self._buf is not None
            filled, self._filled = self._filled, 0
            self.add_block(self._buf[:filled])

    def add_block(self, block: np.ndarray) -> None:
        """Add the rows of ``block`` ``(b, d)`` (any float dtype)."""
        if block.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = np.asarray(block[0], dtype=np.float64).copy()
        nat = native()
        if nat is not None and block.dtype == np.float32 and block.flags.c_contiguous:
            nat.stats(block, self.shift, self.total, self.total_sq)
            self.n += block.shape[0]
            return
        step = self.CHUNK
        tmp = np.empty((block.shape[0], min(step, self.d)))
        for lo in range(0, self.d, step):
            hi = min(self.d, lo + step)
            t = tmp[:, : hi - lo]
            np.subtract(block[:, lo:hi], self.shift[lo:hi], out=t)
            self.total[lo:hi] += t.sum(axis=0)
            np.multiply(t, t, out=t)
            self.total_sq[lo:hi] += t.sum(axis=0)
        self.n += block.shape[0]

    def merge(self, other: _ColumnStats) -> None:
        """Add the rows ``other`` has summed (its own shift moved to this one's)."""
        other.flush()
        if other.n == 0:
            return
        self.flush()
        if self.shift is None:
            assert other.shift is not None
            self.shift = other.shift.copy()
            self.total += other.total
            self.total_sq += other.total_sq
        else:
            # sum (x - s) = sum (x - t) + n (t - s), and the same for the squares
            delta = other.shift - self.shift
            self.total_sq += other.total_sq + 2.0 * delta * other.total + other.n * delta * delta
            self.total += other.total + other.n * delta
        self.n += other.n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Column mean and variance (``ddof=0``), float64 ``(d,)`` each."""
        self.flush()
        if self.shift is None or self.n == 0:
            return np.zeros(self.d), np.zeros(self.d)
        mean_shift = self.total / self.n
        return self.shift + mean_shift, np.maximum(self.total_sq / self.n - mean_shift**2, 0.0)


def in_features(shape: tuple[int, ...]) -> int:
    """Flattened input size of a delta's trailing shape."""
    return math.prod(shape)


#: Name prefix of the row caches a fit spills to disk: ``w2w-rows-PID-RANDOM``.
ROW_CACHE_PREFIX = "w2w-rows-"


def _remove_dead_row_caches(parent: Path) -> None:
    """Delete row caches left in ``parent`` by fits whose process was killed."""
    from w2wkit.atomic import process_alive

    for entry in parent.glob(f"{ROW_CACHE_PREFIX}*-*"):
        pid = entry.name[len(ROW_CACHE_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
