"""Saving and loading a :class:`~w2wkit.space.WeightSpace` folder.

Artifact (format version 1), one folder::

    SPACE/
      space.json          # what the space is (see below)
      arrays.safetensors  # every array, memory-mapped on load when large

``space.json`` holds: ``format`` (``"w2wkit-space"``), ``format_version``,
``w2wkit_version``, ``created``, ``representation``, ``standardize``,
``parameters`` (n_components, solver, random_state, device, scale_floor),
``solver_used``, ``n_passes``, ``n_models``, ``n_components``,
``total_variance``, ``layout`` (:meth:`WeightLayout.to_dict`), ``delta``
(delta spaces: modules, shapes, ranks), ``manifest`` (name, file, format,
sha256, row per training model), ``labels`` (attribute names), ``directions``
(name -> :meth:`Direction.to_dict`), ``arrays`` (file name, bytes, sha256 and
the expected shape of every array), ``source`` (extra provenance, e.g. of an
imported release).

Loading (:func:`load_space`) reads ``space.json`` strictly (no ``Infinity``,
no numbers overflowing a float, at most 64 levels of nesting; a ``NaN`` reads
as ``null``), checks the type of every field it uses, refuses file names that
leave the folder (``../x``, absolute paths, links leading out) and, unless
``verify=False`` (the CLI's ``--no-verify``), compares the SHA-256 of
``arrays.safetensors`` with the one recorded here. Every failure is one
:class:`~w2wkit.errors.SpaceError` naming the file and the key.

``w2wkit directions`` adds or replaces directions without rewriting the space:
``directions.json`` (format ``w2wkit-space-directions``, version 1: the
SHA-256 of the space's ``arrays.safetensors`` it belongs to, the file name,
size and SHA-256 of its arrays, ``directions`` name -> ``Direction.to_dict``)
and ``directions-<sha12>.safetensors`` (``direction.<name>`` (k,) F64). When
present it holds the space's whole set of directions and supersedes those in
``space.json``; :meth:`WeightSpace.save` folds them back into one folder.

Arrays: ``mean`` (d,) F32, ``scale`` (d,) F32 [factors] or (L,) F64 [delta],
``components`` (k, d) F32 [factors], ``singular_values``,
``explained_variance``, ``explained_variance_ratio``, ``coef_mean``,
``coef_std`` (k,) F64, ``coefficients`` (N, k) F32, ``labels.<attr>`` (N,)
F64, ``direction.<name>`` (k,) F64; delta spaces add ``beta`` (N, k) F64,
``gram_colmean`` (N,) F64 and per module ``delta.<i>.up`` (out, R_i) F32,
``delta.<i>.down`` (R_i, in) F32, ``delta.<i>.owner`` (R_i,) I64.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from w2wkit.collection import DeltaFactors
from w2wkit.edits import Direction
from w2wkit.errors import OUTPUT_EXISTS, LayoutError, SpaceError, W2WError
from w2wkit.layout import WeightLayout
from w2wkit.stio import file_sha256, json_default

if TYPE_CHECKING:  # annotations only: the space imports this module, never the reverse
    from w2wkit.space import WeightSpace

__all__ = ["FORMAT_VERSION", "load_space", "save_directions", "save_space"]

#: Version of the saved-space format this code writes and the newest it reads.
FORMAT_VERSION = 1

FORMAT_NAME = "w2wkit-space"
#: The directions side file of a space folder (see :func:`save_directions`).
DIRECTIONS_FORMAT = "w2wkit-space-directions"
DIRECTIONS_JSON = "directions.json"
#: Per-component statistics, saved under their name (the space holds ``<name>_``).
_STAT_ARRAYS = (
    "singular_values",
    "explained_variance",
    "explained_variance_ratio",
    "coef_mean",
    "coef_std",
)


class _FactorTensor:
    """A delta space's factor stack (``up`` or ``down`` of one module), written to the
    arrays file block by block (never held whole)."""

    def __init__(self, module: str, part: str, shape: tuple[int, int]) -> None:
        self.module, self.part, self.shape = module, part, shape
        self.dtype = np.dtype(np.float32)


#: Factor bytes per block when a delta space's stacks are written or checked.
_FACTOR_BLOCK_BYTES = 32 << 20


def _factor_blocks(fac: Any, m: str) -> list[tuple[int, int, int, int]]:
    """``(lo, hi, c0, c1)``: segments ``lo:hi`` of module ``m`` (terms ``c0:c1``) in
    blocks of about :data:`_FACTOR_BLOCK_BYTES` (an eighth of the memory budget when
    that is less)."""
    import math

    from w2wkit.collection import memory_budget

    limit = min(_FACTOR_BLOCK_BYTES, memory_budget() // 8)  # a block and its copies
    width = fac.out_features[m] + math.prod(fac.in_shape[m])
    segs = fac.segments(m)
    out = []
    lo, acc = 0, 0
    col = 0
    c0 = 0
    for j, (_, r, _) in enumerate(segs):
        if acc and (acc + r) * width * 4 > limit:
            out.append((lo, j, c0, col))
            lo, acc, c0 = j, 0, col
        acc += r
        col += r
    if lo < len(segs):
        out.append((lo, len(segs), c0, col))
    return out


def _fill_factor(fac: Any, t: _FactorTensor, write: Any) -> None:
    """Write ``t``'s stack (float32) through ``write(byte_offset, array)``, a block of
    models at a time: ``down`` rows are contiguous, ``up`` columns are one run per row."""
    total = t.shape[1] if t.part == "up" else t.shape[0]
    for lo, hi, c0, _ in _factor_blocks(fac, t.module):
        up, down, _ = fac.block(t.module, lo, hi)
        if t.part == "down":
            write(4 * c0 * t.shape[1], np.asarray(down, np.float32))
        else:
            up = np.asarray(up, np.float32)
            for o in range(t.shape[0]):
                write(4 * (o * total + c0), up[o])
        del up, down
    if total == 0:
        write(0, np.empty(0, np.float32))


def _arrays_of(space: WeightSpace) -> dict[str, Any]:
    """The arrays of a saved space; a delta space's factor stacks as
    :class:`_FactorTensor` placeholders (written block by block)."""
    import math

    arrays: dict[str, Any] = {}
    if space.representation == "factors":
        arrays["mean"] = np.asarray(space.mean_, np.float32)
        arrays["scale"] = np.asarray(space.scale_, np.float32)
        arrays["components"] = np.asarray(space.components_, np.float32)
    else:
        arrays["scale"] = np.asarray(space.scale_, np.float64)
        arrays["beta"] = np.asarray(space.beta_, np.float64)
        arrays["gram_colmean"] = np.asarray(space.gram_colmean_, np.float64)
        fac = space.delta_
        for i, m in enumerate(space.delta_modules_):
            r = sum(rank for _, rank, _ in fac.segments(m))
            in_f = math.prod(fac.in_shape[m])
            arrays[f"delta.{i}.up"] = _FactorTensor(m, "up", (fac.out_features[m], r))
            arrays[f"delta.{i}.down"] = _FactorTensor(m, "down", (r, in_f))
            segs = fac.segments(m)
            owner = np.repeat(
                np.array([j for j, _, _ in segs], np.int64), [rank for _, rank, _ in segs]
            )
            arrays[f"delta.{i}.owner"] = owner
    for name in _STAT_ARRAYS:
        arrays[name] = np.asarray(getattr(space, name + "_"), np.float64)
    arrays["coefficients"] = np.asarray(space.coefficients_, np.float32)
    for attr, vals in (space.labels_ or {}).items():
        arrays[f"labels.{attr}"] = np.asarray(vals, np.float64)
    for name, d in space.directions_.items():
        arrays[f"direction.{name}"] = np.asarray(d.vector, np.float64)
    return arrays


def save_space(space: WeightSpace, path: Path, *, overwrite: bool = False) -> Path:
    """Write ``space`` to the folder ``path`` atomically (see module docstring).

    The folder is written under a temporary name beside ``path`` and swapped
    in (:func:`w2wkit.atomic.atomic_path`): a crash leaves the old space or
    the new one, and the next save repairs what a killed one left.
    """
    from w2wkit import __version__
    from w2wkit.atomic import atomic_path, recover, write_bytes
    from w2wkit.stio import write_safetensors

    recover(path)  # a save killed mid-swap: put the old folder back first
    if path.exists():
        if not overwrite:
            raise SpaceError(OUTPUT_EXISTS, path=path)
        if not path.is_dir() or not (path / "space.json").is_file():
            raise SpaceError(
                "output exists and is not a w2wkit space; refusing to replace it", path=path
            )
    arrays = _arrays_of(space)
    meta: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "w2wkit_version": __version__,
        "created": _now(),
        "representation": space.representation,
        "standardize": bool(space.standardize),
        "parameters": {
            "n_components": None if space.n_components is None else int(space.n_components),
            "solver": space.solver,
            "random_state": space.random_state,
            "device": space.device,
            "scale_floor": float(space.scale_floor),
        },
        "solver_used": space.info_.get("solver_used"),
        "n_passes": space.info_.get("n_passes"),
        "n_models": len(space.manifest_),
        "n_components": int(space.n_components_),
        "total_variance": float(space.total_variance_),
        "layout": space.layout_.to_dict(),
        "manifest": space.manifest_,
        "labels": list(space.labels_ or {}),
        "directions": {name: d.to_dict() for name, d in space.directions_.items()},
        "source": space.info_.get("source", {}),
    }
    if space.representation == "delta":
        fac = space.delta_
        meta["delta"] = {
            "modules": [
                {
                    "module": m,
                    "out": fac.out_features[m],
                    "in_shape": list(fac.in_shape[m]),
                    "max_rank": fac.max_rank[m],
                }
                for m in space.delta_modules_
            ],
            "gram_mean": float(space.gram_mean_),
        }
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.mkdir()
        f = tmp / "arrays.safetensors"
        if any(isinstance(v, _FactorTensor) for v in arrays.values()):
            _write_streamed(f, arrays, space.delta_)
        else:
            dtypes = {k: "I64" for k, v in arrays.items() if v.dtype == np.int64}
            write_safetensors(f, arrays, dtypes=dtypes)
        meta["arrays"] = {
            "file": "arrays.safetensors",
            "bytes": f.stat().st_size,
            "sha256": file_sha256(f),
            "shapes": {k: list(v.shape) for k, v in arrays.items()},
        }
        text = json.dumps(meta, indent=1, allow_nan=True, default=json_default)
        write_bytes(tmp / "space.json", text.encode("utf-8"))
    return path


def _write_streamed(f: Path, arrays: dict[str, Any], fac: Any) -> None:
    """The arrays file of a delta space: small arrays whole, factor stacks in blocks
    (the peak is one block, whatever the number of models)."""
    from w2wkit.stio import write_safetensors_streamed

    names = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64"}
    specs = []
    for key, v in arrays.items():
        if not isinstance(v, _FactorTensor) and v.dtype not in names:
            raise SpaceError(f"cannot save array of dtype {v.dtype}", key=key)
        specs.append((key, names[np.dtype(v.dtype)], tuple(v.shape)))

    def fill(key: str, write: Any) -> None:
        v = arrays[key]
        if isinstance(v, _FactorTensor):
            _fill_factor(fac, v, write)
        else:
            write(0, np.ascontiguousarray(v))

    write_safetensors_streamed(f, specs, fill)


def save_directions(space: WeightSpace, path: Path) -> Path:
    """Write ``space.directions_`` beside the saved space at ``path``.

    The space's own files are left as they are (at the paper's scale they hold
    hundreds of MB); the arrays file is named after its content hash and
    ``directions.json``, written last by an atomic rename, is the commit point,
    so an interrupted write leaves the previous directions readable. Files of
    earlier directions are removed afterwards.

    Parameters
    ----------
    space : WeightSpace
        A space loaded from (or saved to) ``path``.
    path : pathlib.Path
        The space folder.

    Returns
    -------
    pathlib.Path
        The ``directions.json`` written.
    """
    from w2wkit.atomic import recover, temp_path
    from w2wkit.stio import write_json, write_safetensors

    recover(path / "directions.safetensors")  # what a killed save left
    meta_path = path / "space.json"
    if not meta_path.is_file():
        raise SpaceError("not a w2wkit space (no space.json)", path=path)
    try:
        space_sha = json.loads(meta_path.read_text())["arrays"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpaceError(f"space.json is damaged ({exc!r})", path=meta_path) from None
    arrays = {
        f"direction.{name}": np.asarray(d.vector, np.float64)
        for name, d in space.directions_.items()
    }
    tmp = temp_path(path / "directions.safetensors")  # named after its hash below
    write_safetensors(tmp, arrays)  # itself atomic
    digest = file_sha256(tmp)
    name = f"directions-{digest[:12]}.safetensors"
    tmp.replace(path / name)
    meta = {
        "format": DIRECTIONS_FORMAT,
        "format_version": 1,
        "space_arrays_sha256": space_sha,
        "file": name,
        "bytes": (path / name).stat().st_size,
        "sha256": digest,
        "directions": {n: d.to_dict() for n, d in space.directions_.items()},
    }
    write_json(path / DIRECTIONS_JSON, meta)
    for old in path.glob("directions-*.safetensors"):
        if old.name != name:
            old.unlink()
    return path / DIRECTIONS_JSON


def _load_directions(path: Path, space_sha: str, k: int, read_safetensors) -> dict:
    """The directions of the side file of ``path`` (see :func:`save_directions`)."""
    jpath = path / DIRECTIONS_JSON
    meta = _read_described_json(jpath, DIRECTIONS_FORMAT, "a w2wkit directions file")
    get = _Fields(jpath)
    version = get.integer(meta, "format_version", minimum=0)
    if version != 1:
        raise SpaceError(
            f"directions.json has format version {version!r}; this w2wkit reads version 1",
            path=jpath,
            hint="upgrade w2wkit",
        )
    if get.text(meta, "space_arrays_sha256") != space_sha:
        raise SpaceError(
            "directions.json belongs to another space (its arrays hash differs)",
            path=jpath,
            hint="refit the directions with `fit_directions()`",
        )
    f = _member(path, get.text(meta, "file"), jpath, "file")
    if not f.is_file():
        raise SpaceError(f"directions arrays file {f.name} is missing", path=path)
    expected = get.integer(meta, "bytes", minimum=0)
    sha = get.text(meta, "sha256")
    # The side file is small (k float64 per direction): always hashed.
    if f.stat().st_size != expected or file_sha256(f) != sha:
        raise SpaceError("directions arrays file is damaged (size or SHA-256 mismatch)", path=f)
    arrays = read_safetensors(f).tensors
    out = {}
    for name, dmeta in get.mapping(meta, "directions", default={}).items():
        key = f"direction.{name}"
        if key not in arrays or arrays[key].shape != (k,):
            raise SpaceError(f"direction {name!r} is missing or has the wrong shape", path=f)
        if not np.isfinite(arrays[key]).all():
            raise SpaceError("array holds NaN or Inf values", path=f, key=key)
        out[name] = _direction(get, name, dmeta, arrays[key], "directions")
    return out


def _read_described_json(path: Path, fmt: str, what: str) -> dict:
    """A JSON object whose ``format`` is ``fmt``; one clear error otherwise.

    Read strictly (:func:`w2wkit.jsonio.read_json`): no ``NaN``/``Infinity``
    literals, no numbers overflowing a float, at most 64 levels of nesting.
    """
    meta = _strict_json(path)
    if meta.get("format") != fmt:
        raise SpaceError(f"{path.name} is not {what}", path=path)
    return meta


def _strict_json(path: Path) -> dict:
    """The JSON object in ``path``, read strictly (see :mod:`w2wkit.jsonio`).

    The one exception: a ``NaN`` literal reads as ``null``, because
    :func:`save_space` (``json.dumps(allow_nan=True)``) spells an undefined
    direction score that way. ``Infinity`` and numbers overflowing a float are
    still refused. Every failure is one :class:`SpaceError`
    (``<name> is damaged: ...``).
    """
    from w2wkit.jsonio import read_json

    try:
        return read_json(
            path, what="the file", error=SpaceError, unique_keys=True, nan_as_null=True
        )
    except SpaceError as exc:
        raise SpaceError(f"{path.name} is damaged: {exc.message}", path=path) from None


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class _Fields:
    """Typed reads of the fields of one JSON file; every failure is one :class:`SpaceError`.

    ``where`` prefixes the key in messages (``parameters.n_components``).
    """

    #: Largest size (in elements along one axis) a space.json may declare.
    MAX_DIM = 1 << 40

    def __init__(self, path: Path) -> None:
        self.path = path

    def get(self, obj: dict, key: str, types, where: str = "", default=...):
        from w2wkit.jsonio import field

        try:
            return field(obj, key, types, path=self.path, error=SpaceError, default=default)
        except SpaceError as exc:
            raise SpaceError(exc.message, path=self.path, key=where + key) from None

    def text(self, obj: dict, key: str, where: str = "", default=...):
        return self.get(obj, key, str, where, default)

    def mapping(self, obj: dict, key: str, where: str = "", default=...) -> dict:
        """An object; ``null`` reads as ``{}``."""
        if key in obj and obj[key] is None:
            return {}
        return self.get(obj, key, dict, where, default)

    def items(self, obj: dict, key: str, where: str = "", default=...) -> list:
        """A list; ``null`` reads as ``[]``."""
        if key in obj and obj[key] is None:
            return []
        return self.get(obj, key, list, where, default)

    def integer(
        self, obj: dict, key: str, where: str = "", default=..., minimum: int | None = None
    ):
        from w2wkit.jsonio import as_int

        value = self.get(obj, key, int, where, default)
        if value is None or value is default:
            return value
        return as_int(
            value,
            path=self.path,
            key=where + key,
            error=SpaceError,
            minimum=minimum,
            maximum=self.MAX_DIM,
        )

    def number(self, obj: dict, key: str, where: str = "", default=...):
        from w2wkit.jsonio import as_float

        value = self.get(obj, key, float, where, default)
        if value is None or value is default:
            return value
        return as_float(value, path=self.path, key=where + key, error=SpaceError)

    def ints(self, value, key: str, lengths: tuple[int, ...], minimum: int = 1) -> tuple:
        """A list of ``lengths`` integers >= ``minimum`` (a shape)."""
        from w2wkit.jsonio import as_int

        if not isinstance(value, list) or len(value) not in lengths:
            raise SpaceError(
                f"must be a list of {' or '.join(map(str, lengths))} integers, got {value!r}"[:120],
                path=self.path,
                key=key,
            )
        out = []
        for v in value:
            if not isinstance(v, int) or isinstance(v, bool):
                raise SpaceError(f"must hold integers, got {v!r}"[:80], path=self.path, key=key)
            out.append(
                as_int(
                    v,
                    path=self.path,
                    key=key,
                    error=SpaceError,
                    minimum=minimum,
                    maximum=self.MAX_DIM,
                )
            )
        return tuple(out)


def _member(folder: Path, name: str, meta_path: Path, key: str) -> Path:
    """``folder / name``, refused unless it is a plain file name inside ``folder``.

    A space's files must lie in its folder: ``../x``, absolute paths, sub-folders
    and links that lead out of the folder are refused.
    """
    pure = Path(name)
    if not name or name in (".", "..") or pure.is_absolute() or pure.name != name:
        raise SpaceError(
            f"names a file outside the space folder: {name!r}", path=meta_path, key=key
        )
    f = folder / name
    try:
        inside = f.resolve().parent == folder.resolve()
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise SpaceError(
            f"{name!r} is a link leading outside the space folder", path=meta_path, key=key
        )
    return f


def _direction(get: _Fields, name: str, dmeta: Any, vector: np.ndarray, where: str) -> Direction:
    """A :class:`Direction` from its checked description (``Direction.to_dict``)."""
    w = f"{where}.{name}."
    if not isinstance(dmeta, dict):
        raise SpaceError("must be an object", path=get.path, key=f"{where}.{name}")
    get.text(dmeta, "name", w)
    get.text(dmeta, "method", w, default="imported")
    get.text(dmeta, "kind", w, default="filter")
    score = dmeta.get("score")
    if score is not None:
        get.number(dmeta, "score", w)
    get.number(dmeta, "proj_mean", w, default=0.0)
    std = get.number(dmeta, "proj_std", w, default=1.0)
    if std < 0:
        raise SpaceError(f"must be >= 0, got {std}", path=get.path, key=w + "proj_std")
    get.mapping(dmeta, "info", w, default={})
    return Direction.from_dict(dmeta, vector)


def _layout(get: _Fields, data: Any) -> WeightLayout:
    """The layout described in space.json, every field type-checked."""
    if not isinstance(data, dict):
        raise SpaceError("must be an object", path=get.path, key="layout")
    mods = get.items(data, "modules", "layout.")
    rows = []
    for i, m in enumerate(mods):
        w = f"layout.modules[{i}]."
        if not isinstance(m, dict):
            raise SpaceError("must be an object", path=get.path, key=w[:-1])
        down = get.ints(get.get(m, "down", list, w), w + "down", (2, 4))
        up = get.ints(get.get(m, "up", list, w), w + "up", (2, 4))
        alpha = get.number(m, "alpha", w)
        rslora = get.get(m, "rslora", (bool, type(None)), w, default=False)
        rows.append((get.text(m, "module", w), down, up, alpha, bool(rslora)))
    get.get(data, "signature", (str, type(None)), "layout.", default=None)
    try:
        return WeightLayout.from_dict({"modules": mods, "signature": data.get("signature")})
    except LayoutError as exc:
        raise SpaceError(f"layout in space.json is damaged: {exc}", path=get.path) from None


def load_space(cls: type[WeightSpace], path: Path, *, verify: bool = True) -> WeightSpace:
    """Read a space folder written by :func:`save_space`.

    Every field of ``space.json`` is type-checked, the files it names must lie
    in the folder, and (unless ``verify`` is false) the SHA-256 of the arrays
    file is compared with the one recorded when it was written.
    """
    from w2wkit import __version__
    from w2wkit.stio import read_safetensors

    if path.is_file() and path.name == "space.json":
        path = path.parent
    meta_path = path / "space.json"
    if not path.exists():
        from w2wkit.atomic import recover

        recover(path)  # a swap cut between its renames (off Linux): put the old folder back
    if not path.exists():
        raise SpaceError("no such space folder", path=path, hint="fit one with `WeightSpace.fit()`")
    if not meta_path.is_file():
        raise SpaceError("not a w2wkit space (no space.json)", path=path)
    meta = _read_described_json(meta_path, FORMAT_NAME, "a w2wkit space description")
    get = _Fields(meta_path)
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise SpaceError(f"space.json has an invalid format_version {version!r}", path=meta_path)
    if version > FORMAT_VERSION:
        raise SpaceError(
            f"space format version {version} (written by w2wkit "
            f"{meta.get('w2wkit_version', '?')}) is newer than this w2wkit {__version__} "
            f"reads (up to {FORMAT_VERSION})",
            path=path,
            hint="upgrade w2wkit",
        )
    if version < 1:
        raise SpaceError(f"unknown space format version {version}", path=meta_path)
    try:
        return _build(cls, path, meta, get, verify, read_safetensors)
    except SpaceError:
        raise
    except W2WError as exc:
        raise SpaceError(f"space is damaged: {exc}", path=path) from None
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
        raise SpaceError(f"space.json is damaged or incomplete ({exc!r})", path=meta_path) from None


def _build(
    cls, path: Path, meta: dict, get: _Fields, verify: bool, read_safetensors
) -> WeightSpace:
    meta_path = get.path
    info = get.mapping(meta, "arrays")
    f = _member(path, get.text(info, "file", "arrays."), meta_path, "arrays.file")
    expected = get.integer(info, "bytes", "arrays.", minimum=0)
    sha = get.text(info, "sha256", "arrays.")
    shapes = get.mapping(info, "shapes", "arrays.")
    for key, shape in shapes.items():
        get.ints(shape, f"arrays.shapes.{key}", tuple(range(5)), minimum=0)
    if not f.is_file():
        raise SpaceError(f"arrays file {f.name} is missing", path=path)
    size = f.stat().st_size
    if size != expected:
        raise SpaceError(f"arrays file is damaged (size {size} bytes, expected {expected})", path=f)
    if verify and file_sha256(f) != sha:
        raise SpaceError(
            "arrays file is damaged (SHA-256 mismatch)",
            path=f,
            hint="restore the space or refit it; `verify=False` skips this check",
        )
    if meta.get("representation") == "delta":
        # the factor stacks stay in the file (read in blocks on use), the rest is read
        arrays: dict[str, Any] = _read_delta_arrays(f)
    else:
        arrays = read_safetensors(f).tensors
    for key, shape in shapes.items():
        if key not in arrays:
            raise SpaceError("array missing from arrays file", path=f, key=key)
        if list(arrays[key].shape) != list(shape):
            raise SpaceError(
                f"array has shape {list(arrays[key].shape)}, space.json says {shape}",
                path=f,
                key=key,
            )
    for key in ("coefficients", *_STAT_ARRAYS):
        if key not in arrays:
            raise SpaceError("array missing from arrays file", path=f, key=key)
    params = get.mapping(meta, "parameters")
    p = "parameters."
    representation = get.text(meta, "representation")
    if representation not in ("factors", "delta"):
        raise SpaceError(f"unknown representation {representation!r}", path=path)
    random_state = get.get(params, "random_state", (int, str, type(None)), p, default=None)
    if isinstance(random_state, str):  # a generator object, saved as its repr
        random_state = None
    asked_k = (  # null: the space chose its own (n_components=None)
        None
        if params.get("n_components", 0) is None
        else get.integer(params, "n_components", p, minimum=1)
    )
    space = cls(
        asked_k,
        representation=representation,
        standardize=get.get(meta, "standardize", bool),
        solver=get.text(params, "solver", p, default="auto"),
        random_state=random_state,
        device=get.text(params, "device", p, default="cpu"),
        scale_floor=get.number(params, "scale_floor", p, default=1e-6),
    )
    space.layout_ = _layout(get, get.get(meta, "layout", dict))
    n = get.integer(meta, "n_models", minimum=0)
    k = get.integer(meta, "n_components", minimum=1)
    manifest = get.items(meta, "manifest")
    for i, entry in enumerate(manifest):
        w = f"manifest[{i}]."
        if not isinstance(entry, dict):
            raise SpaceError("must be an object", path=meta_path, key=w[:-1])
        get.text(entry, "name", w)
        for opt in ("file", "format", "sha256", "prompt"):
            get.get(entry, opt, (str, type(None)), w, default=None)
        get.get(entry, "row", (int, type(None)), w, default=None)
    space.manifest_ = list(manifest)
    space.n_components_ = k
    space.total_variance_ = get.number(meta, "total_variance")
    space.info_ = {
        "solver_used": get.get(meta, "solver_used", (str, type(None)), default=None),
        "n_passes": get.get(meta, "n_passes", (int, type(None)), default=None),
        "source": get.mapping(meta, "source", default={}),
        "w2wkit_version": get.get(meta, "w2wkit_version", (str, type(None)), default=None),
        "created": get.get(meta, "created", (str, type(None)), default=None),
    }
    for name in _STAT_ARRAYS:
        setattr(space, name + "_", arrays[name])
    space.coefficients_ = arrays["coefficients"]
    if space.coefficients_.shape != (n, k) or len(space.manifest_) != n:
        raise SpaceError(
            f"coefficients have shape {space.coefficients_.shape}, expected ({n}, {k})", path=f
        )
    if space.representation == "factors":
        for key in ("mean", "scale", "components"):
            if key not in arrays:
                raise SpaceError("array missing from arrays file", path=f, key=key)
        space.mean_ = arrays["mean"]
        space.scale_ = arrays["scale"]
        space.components_ = arrays["components"]
        d = space.layout_.dim
        if space.components_.shape != (k, d) or space.mean_.shape != (d,):
            raise SpaceError(f"components do not match the layout (d={d}, k={k})", path=f)
        if not (np.isfinite(space.scale_).all() and (space.scale_ > 0).all()):
            raise SpaceError("scale has zero, negative or non-finite entries", path=f)
    else:
        dmeta = get.mapping(meta, "delta")
        mods: list[str] = []
        out_f: dict[str, int] = {}
        in_s: dict[str, tuple[int, ...]] = {}
        max_rank: dict[str, int] = {}
        for i, e in enumerate(get.items(dmeta, "modules", "delta.")):
            w = f"delta.modules[{i}]."
            if not isinstance(e, dict):
                raise SpaceError("must be an object", path=meta_path, key=w[:-1])
            m = get.text(e, "module", w)
            if m in out_f:
                raise SpaceError(f"module {m!r} listed twice", path=meta_path, key=w + "module")
            mods.append(m)
            out_f[m] = get.integer(e, "out", w, minimum=1)
            in_s[m] = get.ints(get.get(e, "in_shape", list, w), w + "in_shape", (1, 3))
            max_rank[m] = get.integer(e, "max_rank", w, minimum=1)
        for i in range(len(mods)):
            for part in ("up", "down", "owner"):
                if f"delta.{i}.{part}" not in arrays:
                    raise SpaceError(
                        "array missing from arrays file", path=f, key=f"delta.{i}.{part}"
                    )
        for key in ("beta", "gram_colmean", "scale"):
            if key not in arrays:
                raise SpaceError("array missing from arrays file", path=f, key=key)
        fac = _saved_factors(f, arrays, mods, out_f, in_s, max_rank, n)
        space.delta_ = fac
        space.delta_modules_ = mods
        space.beta_ = arrays["beta"]
        space.gram_colmean_ = arrays["gram_colmean"]
        space.gram_mean_ = get.number(dmeta, "gram_mean", "delta.")
        space.scale_ = arrays["scale"]
        space.mean_ = None
        space.components_ = None
        if space.beta_.shape != (n, k) or space.scale_.shape != (len(mods),):
            raise SpaceError("delta arrays do not match space.json", path=f)
    labels = get.items(meta, "labels", default=[])
    for i, a in enumerate(labels):
        if not isinstance(a, str):
            raise SpaceError(
                f"must be a string, got {a!r}"[:80], path=meta_path, key=f"labels[{i}]"
            )
        if f"labels.{a}" not in arrays:
            raise SpaceError("array missing from arrays file", path=f, key=f"labels.{a}")
    space.labels_ = {a: arrays[f"labels.{a}"] for a in labels} if labels else None
    space.directions_ = {}
    for name, dm in get.mapping(meta, "directions", default={}).items():
        if f"direction.{name}" not in arrays:
            raise SpaceError("array missing from arrays file", path=f, key=f"direction.{name}")
        vec = arrays[f"direction.{name}"]
        space.directions_[name] = _direction(get, name, dm, vec, "directions")
    if (path / DIRECTIONS_JSON).is_file():
        space.directions_ = _load_directions(path, sha, k, read_safetensors)
    for key, val in arrays.items():
        if isinstance(val, _StoredTensor):
            continue  # the factor stacks: checked block by block below
        if val.dtype.kind == "f" and not key.startswith("labels.") and not np.isfinite(val).all():
            raise SpaceError("array holds NaN or Inf values", path=f, key=key)
    if space.representation == "delta":
        _check_saved_factors(space.delta_, space.delta_modules_, f)
    return space


class _StoredTensor:
    """A tensor of the arrays file left on disk: its shape, dtype and byte offset."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> None:
        self.shape, self.dtype, self.offset = shape, dtype, offset


_SPACE_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8")}


def _read_delta_arrays(f: Path) -> dict[str, Any]:
    """The arrays of a delta space's file, its ``delta.<i>.up``/``down`` stacks left on
    disk (:class:`_StoredTensor`); the header is validated as every read's is."""
    import os
    import re

    from w2wkit.stio import read_header

    entries, _ = read_header(f, reference=False)  # the reference parser maps the file
    out: dict[str, Any] = {}
    with open(f, "rb", buffering=0) as fh:
        start = 8 + int.from_bytes(fh.read(8), "little")
        for key, info in entries.items():
            dt = _SPACE_DTYPES.get(info["dtype"])
            if dt is None:
                raise SpaceError(f"array has dtype {info['dtype']}", path=f, key=key)
            lo, hi = info["data_offsets"]
            shape = tuple(int(x) for x in info["shape"])
            if re.fullmatch(r"delta\.\d+\.(up|down)", key):
                if dt != _SPACE_DTYPES["F32"] or len(shape) != 2:
                    raise SpaceError("factor stack must be a 2-D F32 array", path=f, key=key)
                out[key] = _StoredTensor(shape, dt, start + lo)
                continue
            buf = bytearray(hi - lo)
            view = memoryview(buf)
            at = start + lo
            while view:
                got = os.preadv(fh.fileno(), [view], at)
                if got <= 0:
                    raise SpaceError("arrays file is truncated", path=f, key=key)
                view, at = view[got:], at + got
            out[key] = np.frombuffer(buf, dtype=dt).reshape(shape)
    return out


def _saved_factors(
    f: Path,
    arrays: dict[str, Any],
    mods: list[str],
    out_f: dict[str, int],
    in_s: dict[str, tuple[int, ...]],
    max_rank: dict[str, int],
    n: int,
) -> DeltaFactors:
    """The loaded space's factors, read from ``f`` in blocks (see ``_SavedFactors``)."""
    import math

    from w2wkit.collection import _LazyFactors, _SavedFactors

    places = {}
    owners = {}
    for i, m in enumerate(mods):
        up, down = arrays[f"delta.{i}.up"], arrays[f"delta.{i}.down"]
        owner = np.asarray(arrays[f"delta.{i}.owner"])
        r = owner.shape[0] if owner.ndim == 1 else -1
        in_f = math.prod(in_s[m])
        if up.shape != (out_f[m], r) or down.shape != (r, in_f):
            raise SpaceError(
                f"factor stacks {list(up.shape)} / {list(down.shape)} do not match module "
                f"{m!r} (out {out_f[m]}, in {in_f}, {r} terms)",
                path=f,
                key=f"delta.{i}",
            )
        if r and (
            np.any(np.diff(owner) < 0) or owner[0] < 0 or owner[-1] >= n
        ):  # sorted model indices
            raise SpaceError("owner is not sorted model indices", path=f, key=f"delta.{i}.owner")
        places[m] = (up.offset, down.offset, r, out_f[m], in_f)
        owners[m] = owner
    store = _SavedFactors(f, places, owners)
    fac = DeltaFactors(
        modules=mods,
        out_features=out_f,
        in_shape=in_s,
        up={},
        down={},
        owner={},
        max_rank=max_rank,
        n_models=n,
        spill=store,  # type: ignore[arg-type]
    )
    fac.up = _LazyFactors(fac, 0)
    fac.down = _LazyFactors(fac, 1)
    fac.owner = _LazyFactors(fac, 2)
    return fac


def _check_saved_factors(fac: DeltaFactors, mods: list[str], f: Path) -> None:
    """Refuse NaN/Inf in the saved factor stacks, a block of models at a time."""
    for i, m in enumerate(mods):
        for lo, hi, _, _ in _factor_blocks(fac, m):
            up, down, _ = fac.block(m, lo, hi)
            if not (np.isfinite(up).all() and np.isfinite(down).all()):
                raise SpaceError("array holds NaN or Inf values", path=f, key=f"delta.{i}")
