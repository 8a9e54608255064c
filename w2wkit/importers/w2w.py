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
    PEFT config: ``r``, ``lora_alpha``, ``target_modules``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.errors import FormatError, SpaceError
from w2wkit.jsonio import as_float, as_int, field, read_json
from w2wkit.layout import WeightLayout
from w2wkit.pickles import load_tensors, resolve_globals, unsafe_globals
from w2wkit.stio import check_regular_file

__all__ = ["REQUIRED", "import_w2w", "parse_release_key"]

REQUIRED = ("weight_dimensions.pt", "mean.pt", "std.pt", "V.pt", "adapter_config.json")

_PEFT = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>.+?)\.lora_(?P<f>[AB])(?:\.(?!weight$)[^.]+)?\.weight$"
)
_KOHYA = re.compile(
    r"^(?P<path>lora_(?:unet|te|te1|te2)_.+?)[._]lora[._](?P<f>A|B|down|up)(?:\.[^.]+)?\.weight$"
)


def parse_release_key(key: str) -> tuple[str, str]:
    """Canonical ``(module path, factor)`` of a release key.

    Raises
    ------
    FormatError
        For a key that is neither a PEFT nor a kohya-style LoRA key.
    """
    m = _KOHYA.match(key)
    if m:
        from w2wkit.names import kohya_to_module

        factor = "down" if m["f"] in ("A", "down") else "up"
        return kohya_to_module(m["path"]), factor
    m = _PEFT.match(key)
    if m:
        path = m["path"]
        if not path.startswith(("unet.", "text_encoder.", "text_encoder_2.")):
            path = "unet." + path  # the release's PEFT model is the UNet
        return path, "down" if m["f"] == "A" else "up"
    raise FormatError("not a LoRA key of the weights2weights release", key=key)


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


def _load_label_table(path: Path, warn: Callable[[str], None]) -> Any | None:
    """The release's label table, loaded with :data:`LABEL_TABLE_GLOBALS` allowed only.

    Returns None (after ``warn``) when it cannot be read that way; it is never
    loaded unsafely.
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


def _finite_rows(weights: np.ndarray) -> bool:
    """Whether a (possibly memory-mapped) ``(N, d)`` matrix is finite, read in blocks."""
    block = max(1, (64 << 20) // max(1, 4 * weights.shape[1]))
    return all(
        bool(np.isfinite(weights[s0 : s0 + block]).all())
        for s0 in range(0, weights.shape[0], block)
    )


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
    if hasattr(obj, "columns") and hasattr(obj, "to_dict"):  # pandas DataFrame
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
        if col.lower() in ("file", "name", "identity", "id") and arr.dtype.kind in "OUS":
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


def import_w2w(
    folder: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    n_components: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Any:
    """Build a :class:`~w2wkit.space.WeightSpace` from the official release.

    Parameters
    ----------
    folder : str or os.PathLike
        Folder holding the release files (see the module docstring).
    allow_pickle : bool
        Must be true: the release is made of pickles.
    n_components : int, optional
        Components to keep (default: the width of ``proj_1000pc.pt``, else
        all of ``V``).
    progress : callable, optional
        ``progress(stage, done, total)``.
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
        Without ``allow_pickle``, for missing files, inconsistent shapes or
        non-finite values.
    FormatError
        For a file that cannot be loaded as tensors with ``weights_only=True``
        (every pickle is loaded that way; none is ever loaded unsafely).
    """
    from w2wkit.collection import file_sha256
    from w2wkit.space import WeightSpace

    root = Path(folder)
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
            path=root,
            hint="pass `allow_pickle=True` if you trust these files",
        )
    if not root.is_dir():
        raise SpaceError("release folder not found", path=root)
    missing = [f for f in REQUIRED if not (root / f).is_file()]
    if missing:
        raise SpaceError(f"not a weights2weights release: missing {', '.join(missing)}", path=root)
    cfg_path = root / "adapter_config.json"
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

    proj = None
    if (root / "proj_1000pc.pt").is_file():
        proj = _np(_load(root / "proj_1000pc.pt"), root / "proj_1000pc.pt")
    weights = None
    if (root / "all_weights.pt").is_file():
        weights = _np(_load(root / "all_weights.pt", mmap=True), root / "all_weights.pt")
        if weights.ndim != 2 or weights.shape[1] != d:
            raise SpaceError(
                f"all_weights.pt has shape {list(weights.shape)}, expected (N, {d})", path=root
            )
    if proj is not None and (proj.ndim != 2 or not np.isfinite(proj).all()):
        raise SpaceError(
            "proj_1000pc.pt must be a finite (N, K) matrix"
            + ("" if proj.ndim != 2 else " (it holds NaN/Inf values)"),
            path=root / "proj_1000pc.pt",
        )
    if weights is not None and not _finite_rows(weights):
        raise SpaceError("all_weights.pt holds NaN/Inf values", path=root / "all_weights.pt")
    if proj is None and weights is None:
        raise SpaceError(
            "need proj_1000pc.pt or all_weights.pt for the training coefficients", path=root
        )
    k = n_components or (proj.shape[1] if proj is not None else v.shape[1])
    if k > v.shape[1]:
        raise SpaceError(
            f"{k} exceeds the {v.shape[1]} columns of V.pt", path=root, param="n_components"
        )

    # negative std entries (the release's bug): move the sign into the components
    sign = np.where(std < 0, -1.0, 1.0)
    scale = np.abs(std)
    rms = float(np.sqrt(np.mean(scale**2)))
    scale = np.maximum(scale, max(1e-6 * rms, float(np.finfo(np.float32).tiny)))
    comps = (v[:, :k].astype(np.float64) * sign[:, None]).T
    # the release's coefficients used the original std; zero-std entries are re-scaled
    if proj is not None and k <= proj.shape[1]:
        coef = proj[:, :k].astype(np.float32)
    else:
        assert weights is not None
        coef = np.zeros((weights.shape[0], k), np.float32)
        block = max(1, (64 << 20) // (4 * d))
        for s0 in range(0, weights.shape[0], block):
            z = (weights[s0 : s0 + block].astype(np.float64) - mean) / scale
            coef[s0 : s0 + block] = z @ comps.T
            if progress is not None:
                progress("project", min(s0 + block, weights.shape[0]), weights.shape[0])
    n = coef.shape[0]
    if weights is not None and weights.shape[0] != n:
        raise SpaceError(f"all_weights.pt has {weights.shape[0]} rows, proj has {n}", path=root)
    if n < 2:
        raise SpaceError("the release has fewer than 2 models", path=root)
    if weights is not None:
        total_sq = 0.0
        block = max(1, (64 << 20) // (4 * d))
        for s0 in range(0, n, block):
            z = (weights[s0 : s0 + block].astype(np.float64) - mean) / scale
            total_sq += float(np.sum(z * z))
        total_var = total_sq / (n - 1)
    else:
        total_var = float(d)  # standardised coordinates have unit variance each

    labels: dict[str, np.ndarray] | None = None
    names = [f"w2w_{i:05d}" for i in range(n)]
    table = None
    if (root / "identity_df.pt").exists():
        table = _load_label_table(root / "identity_df.pt", warn)
    if table is not None:
        lab, idx_names = _labels(table, n, root / "identity_df.pt", warn)
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
    weights_file = "all_weights.pt" if weights is not None else "proj_1000pc.pt"
    space.manifest_ = [
        {"name": names[i], "file": weights_file, "format": "w2w-release", "sha256": None, "row": i}
        for i in range(n)
    ]
    space.labels_ = labels
    space.directions_ = {}
    hashes = {}
    small = [f for f in sorted(root.iterdir()) if f.is_file() and f.suffix in (".pt", ".json")]
    for f in small:
        hashes[f.name] = file_sha256(f)
    space.info_ = {
        "solver_used": "imported",
        "n_passes": 0,
        "source": {
            "kind": "weights2weights release",
            "folder": str(root),
            "files": hashes,
            "negative_std_entries": int((std < 0).sum()),
            "zero_std_entries": int((std == 0).sum()),
            "adapter_config": config,
        },
    }
    return space
