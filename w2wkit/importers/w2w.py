"""Import the official weights2weights release as a :class:`WeightSpace`.

The release is a folder of torch pickles (loading them can run code, so the
caller must opt in with ``allow_pickle=True``):

``weight_dimensions.pt``
    dict ``PEFT key -> [numel, shape]`` in flattening order (down, mid, up
    blocks; ``lora_A`` then ``lora_B`` per module). Keys may be PEFT names
    (``base_model.model.down_blocks.0....to_q.lora_A.weight``, optionally
    with an adapter name before ``.weight``) or kohya-style names
    (``lora_unet_down_blocks_0_..._to_q.lora_A.weight``).
``mean.pt``, ``std.pt``
    ``(d,)`` per-coordinate mean and standard deviation. The release has
    negative std entries (a numerical bug); the scale becomes ``|std|`` (with
    the space's floor for zeros) and the sign is moved into the components
    (``V[j] *= sign(std_j)``), which keeps every projection of the release
    unchanged.
``V.pt``
    ``(d, K)`` principal directions (columns).
``proj_1000pc.pt``
    ``(N, 1000)`` coefficients of the training models.
``all_weights.pt``
    ``(N, d)`` flattened models (optional; used for coefficients beyond the
    shipped projection and for the total variance).
``identity_df.pt``
    Attribute table (a pandas DataFrame, or a dict of columns); numeric and
    boolean columns become labels (CelebA's -1/1 become 0/1).
``adapter_config.json``
    PEFT config: ``r``, ``lora_alpha``, ``target_modules`` (optional: without
    it the rank comes from ``weight_dimensions.pt`` and alpha is 27, the value
    the weights2weights code trains and samples with; a warning says so).

As downloaded, the release splits these files: ``files/`` holds everything
but ``all_weights.pt``, which sits in ``weights_datasets/identities/``.
:func:`import_w2w` takes that root folder (and finds both), one folder holding
all files, or the two folders separately (``weights=``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.errors import FormatError, SpaceError
from w2wkit.formats.w2wmodel import DEFAULT_ALPHA, parse_release_key
from w2wkit.jsonio import as_float, as_int, field, read_json
from w2wkit.layout import WeightLayout
from w2wkit.pickles import load_tensors, resolve_globals, unsafe_globals
from w2wkit.stio import check_regular_file

__all__ = ["DEFAULT_ALPHA", "REQUIRED", "find_release", "import_w2w", "parse_release_key"]

REQUIRED = ("weight_dimensions.pt", "mean.pt", "std.pt", "V.pt")


#: Where the release keeps all_weights.pt, relative to its root.
WEIGHTS_SUBPATHS = ("weights_datasets/identities", "weights_datasets", "files", ".")

#: Label-table columns that identify rows rather than describe them: never labels.
ID_COLUMNS = frozenset(
    {
        "file",
        "files",
        "filename",
        "file_name",
        "name",
        "names",
        "identity",
        "id",
        "ids",
        "index",
        "idx",
        "path",
        "image",
        "image_id",
        "img",
        "unnamed: 0",
        "level_0",
        "celeb_id",
    }
)

#: The only globals a label table may name (exact dotted names): the classes and
#: rebuild helpers of a pandas DataFrame/Series of numbers and strings, across
#: pandas 1.x-3.x and numpy 1.x/2.x. Nothing here runs code or touches files.
LABEL_TABLE_GLOBALS = frozenset(
    {
        "builtins.slice",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "pandas.DataFrame",
        "pandas.Series",
        "pandas.Index",
        "pandas.RangeIndex",
        "pandas.StringDtype",
        "pandas.arrays.StringArray",
        "pandas.core.frame.DataFrame",
        "pandas.core.series.Series",
        "pandas.core.indexes.base.Index",
        "pandas.core.indexes.base._new_Index",
        "pandas.core.indexes.range.RangeIndex",
        "pandas.core.indexes.numeric.Int64Index",
        "pandas.core.indexes.numeric.Float64Index",
        "pandas.core.internals.managers.BlockManager",
        "pandas.core.internals.managers.SingleBlockManager",
        "pandas.core.internals.blocks.new_block",
        "pandas.core.arrays.string_.StringDtype",
        "pandas.core.arrays.string_.StringArray",
        "pandas._libs.internals._unpickle_block",
        "pandas._libs.arrays.__pyx_unpickle_NDArrayBacked",
    }
)


def _load(path: Path, *, mmap: bool = False) -> Any:
    """Tensors (and containers of them) from a release file, never running its code."""
    return load_tensors(path, mmap=mmap, what="release file")


class _Stub:
    """Stands in for a pandas class or rebuild helper while a label table is unpickled.

    It only records what the pickle hands it (constructor arguments and state);
    nothing of pandas is imported or run. :func:`_decode_frame` reads the columns
    out of the recorded tree.
    """

    _name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _stub_globals(names: list[str]) -> list[Any]:
    """Recording stand-ins named exactly like the pandas ``names`` (torch allows by name)."""
    out: list[Any] = []
    for dotted in names:
        module, _, name = dotted.rpartition(".")
        if not dotted.startswith("pandas."):
            continue
        if name[:1].isupper():
            out.append(
                type(name, (_Stub,), {"__module__": module, "__qualname__": name, "_name": dotted})
            )
            continue
        result = type(
            f"{name}_result",
            (_Stub,),
            {"__module__": module, "__qualname__": f"{name}_result", "_name": dotted},
        )

        def helper(*args: Any, _result: type = result) -> Any:
            return _result(*args)

        helper.__module__, helper.__qualname__, helper.__name__ = module, name, name
        out += [helper, result]
    return out


def _stub_array(obj: Any) -> np.ndarray:
    """The numpy array a recorded pandas array or index holds."""
    if isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, _Stub):
        if obj._name.endswith("_new_Index"):
            d = obj.args[1]
            if "data" in d:
                return _stub_array(d["data"])
            return np.arange(int(d.get("start", 0)), int(d["stop"]), int(d.get("step", 1)))
        for part in (*(obj.state if isinstance(obj.state, tuple) else ()), *obj.args):
            if isinstance(part, np.ndarray | _Stub):
                try:
                    return _stub_array(part)
                except ValueError:
                    continue
        if isinstance(obj.state, dict):
            for value in obj.state.values():
                if isinstance(value, np.ndarray):
                    return value
    raise ValueError(f"cannot read {getattr(obj, '_name', type(obj).__name__)} as an array")


@dataclass
class _Table:
    """A label table read without pandas: columns by name, and the row index."""

    columns: dict[str, np.ndarray]
    index: list[Any]


def _decode_frame(obj: Any) -> _Table:
    """Columns of a recorded ``DataFrame`` (pandas 1.x-3.x block layouts).

    Raises
    ------
    ValueError
        When the recorded tree is not a DataFrame this understands.
    """
    if not (isinstance(obj, _Stub) and isinstance(obj.state, dict) and "_mgr" in obj.state):
        raise ValueError("not a DataFrame")
    mgr = obj.state["_mgr"]
    blocks: list[tuple[Any, Any]] = []
    if isinstance(mgr, _Stub) and len(mgr.args) == 2:  # pandas >= 3: (blocks, axes)
        raw_blocks, axes = mgr.args
        for b in raw_blocks:
            blocks.append((b.args[0], b.args[1]))
    elif isinstance(mgr, _Stub) and isinstance(mgr.state, tuple) and len(mgr.state) == 4:
        extra = mgr.state[3]["0.14.1"]  # pandas 1.x/2.x __getstate__
        axes = extra["axes"]
        blocks = [(b["values"], b["mgr_locs"]) for b in extra["blocks"]]
    else:
        raise ValueError("unknown DataFrame layout")
    names = [str(c) for c in _stub_array(axes[0])]
    index = list(_stub_array(axes[1]))
    columns: dict[str, np.ndarray] = {}
    for values, place in blocks:
        where = np.arange(len(names))[place] if isinstance(place, slice) else np.asarray(place)
        arr = _stub_array(values)
        arr = arr.reshape(1, -1) if arr.ndim == 1 else arr
        if arr.shape[0] != where.size:
            raise ValueError("block shape does not match its columns")
        for row, col in zip(arr, where, strict=True):
            columns[names[int(col)]] = row
    return _Table(columns, index)


def _load_label_table(path: Path, warn: Callable[[str], None]) -> Any | None:
    """The release's label table, read safely, without pandas when it can be.

    The pickle's pandas objects are replaced by recording stand-ins
    (:func:`_stub_globals`), whose columns :func:`_decode_frame` reads; if that
    fails, pandas itself (when installed) with :data:`LABEL_TABLE_GLOBALS`
    allowed only. Returns None (after ``warn``) when neither works; the table is
    never loaded unsafely.
    """
    check_regular_file(path, what="label table")
    names = unsafe_globals(path)
    foreign = [n for n in names if n not in LABEL_TABLE_GLOBALS]
    if foreign:
        warn(
            f"{path}: labels skipped: the table names objects outside the label-table "
            f"allow-list ({', '.join(foreign[:4])}); it was not loaded"
        )
        return None
    numpy_names = [n for n in names if not n.startswith("pandas.")]
    try:
        basic = resolve_globals(numpy_names) + _numpy_dtype_classes()
        raw = load_tensors(path, allowed=basic + _stub_globals(names), what="label table")
        return raw if isinstance(raw, dict) else _decode_frame(raw)
    except (FormatError, ValueError, TypeError, KeyError, IndexError, AttributeError, ImportError):
        pass  # not a layout the stand-ins understand: try pandas itself
    try:
        allowed = resolve_globals(names) + _numpy_dtype_classes()
    except (ImportError, AttributeError) as exc:
        warn(f"{path}: labels skipped: the table needs {exc.name or exc} (install pandas?)")
        return None
    try:
        return load_tensors(path, allowed=allowed, what="label table")
    except FormatError as exc:
        warn(f"{path}: labels skipped: {exc.message}")
        return None


def _numpy_dtype_classes() -> list[type]:
    """numpy's dtype classes of numbers, booleans, strings and objects (numpy >= 1.25)."""
    return [type(np.dtype(c)) for c in "?bhilqBHILQefdgOUS"]


def _scan_weights(
    weights: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    comps: np.ndarray | None,
    path: Path,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[np.ndarray | None, float]:
    """One pass over ``all_weights.pt`` (memory-mapped): finiteness, total variance, coefficients.

    Parameters
    ----------
    weights : numpy.ndarray
        ``(N, d)`` flattened models.
    mean, scale : numpy.ndarray
        ``(d,)`` standardisation.
    comps : numpy.ndarray, optional
        ``(k, d)`` components; when given, the ``(N, k)`` coefficients are computed.
    path : pathlib.Path
        Named in errors.
    progress : callable, optional
        ``progress("weights", bytes read, total bytes)`` after each block.

    Returns
    -------
    coef : numpy.ndarray or None
        ``(N, k)`` float32 coefficients, when ``comps`` is given.
    total_sq : float
        Sum of squares of the standardised rows.
    """
    n, d = weights.shape
    block = max(1, (64 << 20) // max(1, 4 * d))
    coef = np.zeros((n, comps.shape[0]), np.float32) if comps is not None else None
    total_sq = 0.0
    row_bytes = d * weights.dtype.itemsize
    for s0 in range(0, n, block):
        chunk = np.asarray(weights[s0 : s0 + block], dtype=np.float64)
        if not np.isfinite(chunk).all():
            bad = s0 + int(np.nonzero(~np.isfinite(chunk).all(axis=1))[0][0])
            raise SpaceError(f"all_weights.pt holds NaN/Inf values (row {bad})", path=path)
        z = (chunk - mean) / scale
        total_sq += float(np.sum(z * z))
        if coef is not None:
            coef[s0 : s0 + block] = z @ comps.T
        if progress is not None:
            progress("weights", min(s0 + block, n) * row_bytes, n * row_bytes)
    return coef, total_sq


def _np(obj: Any, path: Path) -> np.ndarray:
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.detach().float().numpy()
    except ImportError:  # pragma: no cover
        pass
    try:
        return np.asarray(obj, dtype=np.float32)
    except (TypeError, ValueError):
        raise FormatError(f"expected a tensor, got {type(obj).__name__}", path=path) from None


def _numel_shape(value: Any, key: str, path: Path) -> tuple[int, tuple[int, ...]]:
    try:
        numel_raw, shape_raw = value[0], value[1]
        while not isinstance(numel_raw, int | np.integer) and hasattr(numel_raw, "__getitem__"):
            numel_raw = numel_raw[0]
        numel = int(numel_raw)
        shape = tuple(int(s) for s in shape_raw)
    except (TypeError, ValueError, IndexError, KeyError):
        raise FormatError("expected [numel, shape]", path=path, key=key) from None
    if int(np.prod(shape)) != numel:
        raise FormatError(f"numel {numel} does not match shape {list(shape)}", path=path, key=key)
    return numel, shape


def _labels(
    obj: Any, n: int, path: Path, warn: Callable[[str], None] | None = None
) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """Numeric columns of a DataFrame or dict as ``(N,)`` float64 labels.

    NaN marks a missing value; a column holding infinities is skipped (``warn``).
    """
    columns: dict[str, Any]
    names = None
    if isinstance(obj, _Table):  # read without pandas
        columns = obj.columns
        if obj.index and not all(isinstance(i, int | np.integer) for i in obj.index):
            names = [str(i) for i in obj.index]
    elif hasattr(obj, "columns") and hasattr(obj, "to_dict"):  # pandas DataFrame
        columns = {str(c): obj[c].to_numpy() for c in obj.columns}
        idx = list(obj.index)
        if idx and not all(isinstance(i, int | np.integer) for i in idx):
            names = [str(i) for i in idx]
    elif isinstance(obj, dict):
        columns = {str(k): v for k, v in obj.items()}
    else:
        raise FormatError(
            f"identity_df.pt holds a {type(obj).__name__}, expected a DataFrame or dict", path=path
        )
    labels = {}
    for col, vals in columns.items():
        arr = np.asarray(vals.numpy() if hasattr(vals, "numpy") else vals)
        if arr.shape != (n,):
            continue
        key = col.strip().lower()
        if key in ID_COLUMNS or key.startswith("unnamed"):
            # identifies rows (a file name, an id, a numeric file index): never a label
            if arr.dtype.kind in "OUS" and names is None:
                names = [str(v) for v in arr]
            continue
        if arr.dtype.kind not in "biuf":
            continue
        vals64 = arr.astype(np.float64)
        if np.isinf(vals64).any():
            if warn is not None:
                warn(f"{path}: label column {col!r} skipped: it holds infinite values")
            continue
        finite = vals64[np.isfinite(vals64)]
        if finite.size and set(np.unique(finite)) <= {-1.0, 1.0}:
            vals64 = np.where(np.isfinite(vals64), (vals64 + 1) / 2, np.nan)
        labels[col] = vals64
    return labels, names


def find_release(
    folder: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None
) -> tuple[Path, Path | None]:
    """The folder of the release's small files and its ``all_weights.pt`` (if any).

    Parameters
    ----------
    folder : path-like
        The release root as downloaded (holding ``files/`` and
        ``weights_datasets/identities/``), or the folder of the small files.
    weights : path-like, optional
        ``all_weights.pt`` or the folder holding it, when it is elsewhere.

    Returns
    -------
    files : pathlib.Path
        Folder holding ``weight_dimensions.pt``, ``mean.pt``...
    all_weights : pathlib.Path or None

    Raises
    ------
    SpaceError
        For a missing folder or file, or a folder that is not a release.
    """
    root = Path(folder)
    if not root.is_dir():
        raise SpaceError("release folder not found", path=root)
    files = root
    if not (root / REQUIRED[0]).is_file() and (root / "files" / REQUIRED[0]).is_file():
        files = root / "files"
    missing = [f for f in REQUIRED if not (files / f).is_file()]
    if missing:
        raise SpaceError(
            f"not a weights2weights release: missing {', '.join(missing)}",
            path=root,
            hint="give the release root (with files/ and weights_datasets/) or its files/ folder",
        )
    found: Path | None = None
    if weights is not None:
        w = Path(weights)
        found = w / "all_weights.pt" if w.is_dir() else w
        if not found.is_file():
            raise SpaceError("all_weights.pt not found", path=found, param="weights")
    else:
        for base in (root, files):
            for sub in WEIGHTS_SUBPATHS:
                cand = base / sub / "all_weights.pt"
                if cand.is_file():
                    found = cand
                    break
            if found is not None:
                break
    return files, found


def import_w2w(
    folder: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
    n_components: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Any:
    """Build a :class:`~w2wkit.space.WeightSpace` from the official release.

    Parameters
    ----------
    folder : str or os.PathLike
        The release root as downloaded (``files/`` + ``weights_datasets/``),
        or the folder holding the small files (see the module docstring).
    weights : str or os.PathLike, optional
        ``all_weights.pt`` (or its folder) when it is not under ``folder``.
    allow_pickle : bool
        Must be true: the release is made of pickles.
    n_components : int, optional
        Components to keep (default: the width of ``proj_1000pc.pt``, else
        all of ``V``). More than the stored projection holds are computed
        from ``all_weights.pt``.
    progress : callable, optional
        ``progress(stage, done, total)``: ``"weights"`` with bytes of
        ``all_weights.pt`` read.
    warn : callable, optional
        ``warn(message)`` for what is skipped (a label table that cannot be
        loaded safely); default :func:`warnings.warn`.

    Returns
    -------
    WeightSpace
        A factors-representation space with the release's layout (canonical
        ``unet.`` module paths, alpha and rank from ``adapter_config.json``),
        mean, scale, components and training coefficients; labels from
        ``identity_df.pt``.

    Raises
    ------
    SpaceError
        Without ``allow_pickle``, for missing files, inconsistent shapes,
        non-finite values, or more components than the release can give.
    FormatError
        For a file that cannot be loaded as tensors with ``weights_only=True``
        (every pickle is loaded that way; none is ever loaded unsafely).
    """
    from w2wkit.collection import file_sha256
    from w2wkit.space import WeightSpace

    if warn is None:
        import warnings

        def warn(message: str) -> None:
            warnings.warn(message, stacklevel=3)

    if n_components is not None and (
        isinstance(n_components, bool) or not isinstance(n_components, int) or n_components < 1
    ):
        raise SpaceError(f"must be a whole number >= 1, got {n_components!r}", param="n_components")
    if not allow_pickle:
        raise SpaceError(
            "the weights2weights release is made of pickles, which can run code when loaded",
            path=Path(folder),
            hint="pass `allow_pickle=True` if you trust these files",
        )
    root, weights_path = find_release(folder, weights)

    dims_path = root / "weight_dimensions.pt"
    dims = _load(dims_path)
    if not isinstance(dims, dict) or not dims:
        raise SpaceError("weight_dimensions.pt is not a non-empty dict", path=dims_path)
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    order: list[tuple[str, str, int]] = []
    for key, value in dims.items():
        module, factor = parse_release_key(str(key))
        numel, shape = _numel_shape(value, str(key), dims_path)
        modules.setdefault(module, {})[factor] = shape
        order.append((module, factor, numel))

    cfg_path = root / "adapter_config.json"
    if cfg_path.is_file():
        config = read_json(cfg_path, error=SpaceError)
        rank = as_int(
            field(config, "r", (int, float), path=cfg_path, error=SpaceError),
            path=cfg_path,
            key="r",
            error=SpaceError,
            minimum=1,
        )
        alpha = as_float(
            config.get("lora_alpha", rank), path=cfg_path, key="lora_alpha", error=SpaceError
        )
    else:
        first = next(iter(modules.values()))
        rank = int(first.get("down", first.get("up", (1, 1)))[0])
        alpha = DEFAULT_ALPHA
        config = {"r": rank, "lora_alpha": alpha, "peft_type": "LORA"}
        warn(
            f"{root}: no adapter_config.json; rank {rank} from weight_dimensions.pt and "
            f"alpha {alpha:g} (the weights2weights code's)"
        )
    rows = []
    for module, fac in modules.items():
        if set(fac) != {"down", "up"}:
            raise SpaceError(
                f"module has only its {next(iter(fac))} factor", path=dims_path, key=module
            )
        rows.append((module, fac["down"], fac["up"], alpha, bool(config.get("use_rslora"))))
    layout = WeightLayout(rows)
    # the release's flattening order must be the layout's (A then B per module)
    expected = [(s.module, s.factor) for s in layout.slots]
    if [(m, f) for m, f, _ in order] != expected:
        raise SpaceError(
            "weight_dimensions.pt does not list lora_A then lora_B for each module", path=dims_path
        )
    d = layout.dim

    mean = _np(_load(root / "mean.pt"), root / "mean.pt").reshape(-1).astype(np.float64)
    std = _np(_load(root / "std.pt"), root / "std.pt").reshape(-1).astype(np.float64)
    v = _np(_load(root / "V.pt", mmap=True), root / "V.pt")
    if mean.shape != (d,) or std.shape != (d,):
        raise SpaceError(
            f"mean/std have {mean.size}/{std.size} entries, the layout has d={d}", path=root
        )
    if v.ndim != 2 or v.shape[0] != d:
        raise SpaceError(f"V.pt has shape {list(v.shape)}, expected ({d}, K)", path=root)
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and np.isfinite(v).all()):
        raise SpaceError("mean, std or V hold NaN/Inf values", path=root)

    proj_path = next(iter(sorted(root.glob("proj_*pc.pt"))), root / "proj_1000pc.pt")
    proj = None
    if proj_path.is_file():
        proj = _np(_load(proj_path), proj_path)
    weights_arr = None
    if weights_path is not None:
        weights_arr = _np(_load(weights_path, mmap=True), weights_path)
        if weights_arr.ndim != 2 or weights_arr.shape[1] != d:
            raise SpaceError(
                f"all_weights.pt has shape {list(weights_arr.shape)}, expected (N, {d})",
                path=weights_path,
            )
    if proj is not None and (proj.ndim != 2 or not np.isfinite(proj).all()):
        raise SpaceError(
            f"{proj_path.name} must be a finite (N, K) matrix"
            + ("" if proj.ndim != 2 else " (it holds NaN/Inf values)"),
            path=proj_path,
        )
    if proj is None and weights_arr is None:
        raise SpaceError(
            "need proj_1000pc.pt or all_weights.pt for the training coefficients",
            path=root,
            hint="all_weights.pt is in the release's weights_datasets/identities/",
        )
    k = n_components or (proj.shape[1] if proj is not None else v.shape[1])
    if k > v.shape[1]:
        raise SpaceError(
            f"{k} components asked, but V.pt holds {v.shape[1]}",
            path=root / "V.pt",
            param="n_components",
        )
    if weights_arr is None and proj is not None and k > proj.shape[1]:
        raise SpaceError(
            f"{k} components asked, but {proj_path.name} holds the coefficients of "
            f"{proj.shape[1]}; more need all_weights.pt, which was not found",
            path=root,
            param="n_components",
            hint="download weights_datasets/identities/all_weights.pt into the release root, "
            "or pass its path with `weights`",
        )

    # negative std entries (the release's bug): move the sign into the components
    sign = np.where(std < 0, -1.0, 1.0)
    scale = np.abs(std)
    rms = float(np.sqrt(np.mean(scale**2)))
    scale = np.maximum(scale, max(1e-6 * rms, float(np.finfo(np.float32).tiny)))
    comps = (v[:, :k].astype(np.float64) * sign[:, None]).T
    # the release's coefficients used the original std; zero-std entries are re-scaled
    need_coef = proj is None or k > proj.shape[1]
    total_var = float(d)  # standardised coordinates have unit variance each
    coef = proj[:, :k].astype(np.float32) if not need_coef else None
    if weights_arr is not None:
        scanned, total_sq = _scan_weights(
            weights_arr, mean, scale, comps if need_coef else None, weights_path, progress
        )
        if need_coef:
            coef = scanned
        if weights_arr.shape[0] < 2:
            raise SpaceError("the release has fewer than 2 models", path=weights_path)
        total_var = total_sq / (weights_arr.shape[0] - 1)
    assert coef is not None  # proj or all_weights.pt, checked above
    n = coef.shape[0]
    if weights_arr is not None and weights_arr.shape[0] != n:
        raise SpaceError(
            f"all_weights.pt has {weights_arr.shape[0]} rows, {proj_path.name} has {n}",
            path=weights_path,
        )
    if n < 2:
        raise SpaceError("the release has fewer than 2 models", path=root)

    labels: dict[str, np.ndarray] | None = None
    names = [f"w2w_{i:05d}" for i in range(n)]
    table = None
    if (root / "identity_df.pt").exists():
        table = _load_label_table(root / "identity_df.pt", warn)
    if table is not None:
        try:
            lab, idx_names = _labels(table, n, root / "identity_df.pt", warn)
        except (FormatError, TypeError, ValueError, AttributeError, KeyError) as exc:
            msg = exc.message if isinstance(exc, FormatError) else f"{type(exc).__name__}: {exc}"
            warn(f"{root / 'identity_df.pt'}: labels skipped: {msg}")
            lab, idx_names = {}, None
        labels = lab or None
        if idx_names and len(set(idx_names)) == n:
            names = idx_names

    space = WeightSpace(k, representation="factors", standardize=True, solver="exact")
    coef64 = coef.astype(np.float64)
    ev = coef64.var(axis=0, ddof=1)
    space.layout_ = layout
    space.mean_ = mean.astype(np.float32)
    space.scale_ = scale.astype(np.float32)
    space.components_ = comps.astype(np.float32)
    space.coefficients_ = coef
    space.explained_variance_ = ev
    space.singular_values_ = np.sqrt(ev * (n - 1))
    space.explained_variance_ratio_ = ev / total_var
    space.total_variance_ = total_var
    space.coef_mean_ = coef64.mean(axis=0)
    space.coef_std_ = np.sqrt(ev)
    space.n_components_ = k
    weights_file = "all_weights.pt" if weights_arr is not None else proj_path.name
    space.manifest_ = [
        {"name": names[i], "file": weights_file, "format": "w2w-release", "sha256": None, "row": i}
        for i in range(n)
    ]
    space.labels_ = labels
    space.directions_ = {}
    hashes: dict[str, Any] = {}
    small = [f for f in sorted(root.iterdir()) if f.is_file() and f.suffix in (".pt", ".json")]
    for f in small:
        if f.name != "all_weights.pt":  # 26 GB: named by size, not hashed
            hashes[f.name] = file_sha256(f)
    if weights_path is not None:
        hashes["all_weights.pt"] = {"bytes": weights_path.stat().st_size}
    space.info_ = {
        "solver_used": "imported",
        "n_passes": 0,
        "source": {
            "kind": "weights2weights release",
            "folder": str(root),
            "all_weights": str(weights_path) if weights_path is not None else None,
            "files": hashes,
            "negative_std_entries": int((std < 0).sum()),
            "zero_std_entries": int((std == 0).sum()),
            "adapter_config": config,
        },
    }
    return space
