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

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from w2wkit.collection import DeltaFactors
from w2wkit.errors import LayoutError, SpaceError, W2WError
from w2wkit.layout import WeightLayout
from w2wkit.stio import json_default

if TYPE_CHECKING:
    from w2wkit.space import WeightSpace

__all__ = ["load_space", "save_directions", "save_space"]

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _arrays_of(space: WeightSpace) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
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
            arrays[f"delta.{i}.up"] = np.asarray(fac.up[m], np.float32)
            arrays[f"delta.{i}.down"] = np.asarray(fac.down[m], np.float32)
            arrays[f"delta.{i}.owner"] = np.asarray(fac.owner[m], np.int64)
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
    from w2wkit.space import FORMAT_VERSION
    from w2wkit.stio import write_safetensors

    recover(path)  # a save killed mid-swap: put the old folder back first
    if path.exists():
        if not overwrite:
            raise SpaceError("output exists (use --force to overwrite)", path=path)
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
            "n_components": int(space.n_components),
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
        dtypes = {k: "I64" for k, v in arrays.items() if v.dtype == np.int64}
        write_safetensors(tmp / "arrays.safetensors", arrays, dtypes=dtypes)
        f = tmp / "arrays.safetensors"
        meta["arrays"] = {
            "file": "arrays.safetensors",
            "bytes": f.stat().st_size,
            "sha256": _sha256(f),
            "shapes": {k: list(v.shape) for k, v in arrays.items()},
        }
        text = json.dumps(meta, indent=1, allow_nan=True, default=json_default)
        write_bytes(tmp / "space.json", text.encode("utf-8"))
    return path


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
    digest = _sha256(tmp)
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


def _load_directions(path: Path, space_meta: dict, k: int, read_safetensors, Direction) -> dict:
    """The directions of the side file of ``path`` (see :func:`save_directions`)."""
    jpath = path / DIRECTIONS_JSON
    meta = _read_described_json(jpath, DIRECTIONS_FORMAT, "a w2wkit directions file")
    if meta.get("format_version") != 1:
        raise SpaceError(
            f"directions.json has format version {meta.get('format_version')!r}; "
            "this w2wkit reads version 1",
            path=jpath,
            hint="upgrade w2wkit",
        )
    if meta.get("space_arrays_sha256") != space_meta["arrays"].get("sha256"):
        raise SpaceError(
            "directions.json belongs to another space (its arrays hash differs)",
            path=jpath,
            hint="refit the directions with `w2wkit directions`",
        )
    fname = str(meta.get("file"))
    if Path(fname).name != fname:  # the side file lives in the space folder, nowhere else
        raise SpaceError(f"directions.json names a file outside the space: {fname!r}", path=jpath)
    f = path / fname
    if not f.is_file():
        raise SpaceError(f"directions arrays file {meta.get('file')} is missing", path=path)
    if f.stat().st_size != meta.get("bytes") or _sha256(f) != meta.get("sha256"):
        raise SpaceError("directions arrays file is damaged (size or SHA-256 mismatch)", path=f)
    arrays = read_safetensors(f).tensors
    out = {}
    for name, dmeta in (meta.get("directions") or {}).items():
        key = f"direction.{name}"
        if key not in arrays or arrays[key].shape != (k,):
            raise SpaceError(f"direction {name!r} is missing or has the wrong shape", path=f)
        if not np.isfinite(arrays[key]).all():
            raise SpaceError("array holds NaN or Inf values", path=f, key=key)
        out[name] = Direction.from_dict(dmeta, arrays[key])
    return out


def _read_described_json(path: Path, fmt: str, what: str) -> dict:
    """A JSON object whose ``format`` is ``fmt``; one clear error otherwise."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpaceError(f"{path.name} is damaged ({exc})", path=path) from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise SpaceError(f"{path.name} is not {what}", path=path)
    return meta


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def load_space(cls: type[WeightSpace], path: Path, *, verify: bool = False) -> WeightSpace:
    """Read a space folder written by :func:`save_space`."""
    from w2wkit import __version__
    from w2wkit.space import FORMAT_VERSION, Direction
    from w2wkit.stio import read_safetensors

    if path.is_file() and path.name == "space.json":
        path = path.parent
    meta_path = path / "space.json"
    if not path.exists():
        raise SpaceError("no such space folder", path=path, hint="fit one with `w2wkit fit`")
    if not meta_path.is_file():
        raise SpaceError("not a w2wkit space (no space.json)", path=path)
    meta = _read_described_json(meta_path, FORMAT_NAME, "a w2wkit space description")
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
        return _build(cls, path, meta, verify, read_safetensors, Direction)
    except SpaceError:
        raise
    except W2WError as exc:
        raise SpaceError(f"space is damaged: {exc}", path=path) from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise SpaceError(f"space.json is damaged or incomplete ({exc!r})", path=meta_path) from None


def _build(cls, path: Path, meta: dict, verify: bool, read_safetensors, Direction) -> WeightSpace:
    info = meta["arrays"]
    f = path / info["file"]
    if not f.is_file():
        raise SpaceError(f"arrays file {info['file']} is missing", path=path)
    size = f.stat().st_size
    if size != int(info["bytes"]):
        raise SpaceError(
            f"arrays file is damaged (size {size} bytes, expected {info['bytes']})", path=f
        )
    if verify and _sha256(f) != info.get("sha256"):
        raise SpaceError("arrays file is damaged (SHA-256 mismatch)", path=f)
    st = read_safetensors(f)
    arrays = st.tensors
    for key, shape in info["shapes"].items():
        if key not in arrays:
            raise SpaceError("array missing from arrays file", path=f, key=key)
        if list(arrays[key].shape) != list(shape):
            raise SpaceError(
                f"array has shape {list(arrays[key].shape)}, space.json says {shape}",
                path=f,
                key=key,
            )
    params = meta["parameters"]
    space = cls(
        int(params["n_components"]),
        representation=meta["representation"],
        standardize=bool(meta["standardize"]),
        solver=params.get("solver", "auto"),
        random_state=params.get("random_state"),
        device=params.get("device", "cpu"),
        scale_floor=float(params.get("scale_floor", 1e-6)),
    )
    if space.representation not in ("factors", "delta"):
        raise SpaceError(f"unknown representation {space.representation!r}", path=path)
    try:
        space.layout_ = WeightLayout.from_dict(meta["layout"])
    except LayoutError as exc:
        raise SpaceError(f"layout in space.json is damaged: {exc}", path=path) from None
    n, k = int(meta["n_models"]), int(meta["n_components"])
    space.manifest_ = list(meta["manifest"])
    space.n_components_ = k
    space.total_variance_ = float(meta["total_variance"])
    space.info_ = {
        "solver_used": meta.get("solver_used"),
        "n_passes": meta.get("n_passes"),
        "source": meta.get("source", {}),
        "w2wkit_version": meta.get("w2wkit_version"),
        "created": meta.get("created"),
    }
    for name in _STAT_ARRAYS:
        setattr(space, name + "_", arrays[name])
    space.coefficients_ = arrays["coefficients"]
    if space.coefficients_.shape != (n, k) or len(space.manifest_) != n:
        raise SpaceError(
            f"coefficients have shape {space.coefficients_.shape}, expected ({n}, {k})", path=f
        )
    if space.representation == "factors":
        space.mean_ = arrays["mean"]
        space.scale_ = arrays["scale"]
        space.components_ = arrays["components"]
        d = space.layout_.dim
        if space.components_.shape != (k, d) or space.mean_.shape != (d,):
            raise SpaceError(f"components do not match the layout (d={d}, k={k})", path=f)
        if not (np.isfinite(space.scale_).all() and (space.scale_ > 0).all()):
            raise SpaceError("scale has zero, negative or non-finite entries", path=f)
    else:
        dmeta = meta["delta"]
        mods = [e["module"] for e in dmeta["modules"]]
        fac = DeltaFactors(
            modules=mods,
            out_features={e["module"]: int(e["out"]) for e in dmeta["modules"]},
            in_shape={e["module"]: tuple(int(s) for s in e["in_shape"]) for e in dmeta["modules"]},
            up={m: arrays[f"delta.{i}.up"] for i, m in enumerate(mods)},
            down={m: arrays[f"delta.{i}.down"] for i, m in enumerate(mods)},
            owner={m: arrays[f"delta.{i}.owner"] for i, m in enumerate(mods)},
            max_rank={e["module"]: int(e["max_rank"]) for e in dmeta["modules"]},
            n_models=n,
        )
        space.delta_ = fac
        space.delta_modules_ = mods
        space.beta_ = arrays["beta"]
        space.gram_colmean_ = arrays["gram_colmean"]
        space.gram_mean_ = float(dmeta["gram_mean"])
        space.scale_ = arrays["scale"]
        space.mean_ = None
        space.components_ = None
        if space.beta_.shape != (n, k) or space.scale_.shape != (len(mods),):
            raise SpaceError("delta arrays do not match space.json", path=f)
    labels = list(meta.get("labels") or [])
    space.labels_ = {a: arrays[f"labels.{a}"] for a in labels} if labels else None
    space.directions_ = {}
    for name, dmeta in (meta.get("directions") or {}).items():
        space.directions_[name] = Direction.from_dict(dmeta, arrays[f"direction.{name}"])
    if (path / DIRECTIONS_JSON).is_file():
        space.directions_ = _load_directions(path, meta, k, read_safetensors, Direction)
    for key, val in arrays.items():
        if val.dtype.kind == "f" and not key.startswith("labels.") and not np.isfinite(val).all():
            raise SpaceError("array holds NaN or Inf values", path=f, key=key)
    return space


def remove_space(path: Path) -> None:
    """Delete a space folder (only if it looks like one)."""
    if (path / "space.json").is_file():
        shutil.rmtree(path)
