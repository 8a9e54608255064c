"""The shipped miniature world: a compact folder the package finds at run time.

Layout (``w2wkit/data/world/`` in the package, or any folder)::

    manifest.json          sha256 and size of every other file, counts
    build_log.json         settings, times and metrics of the build
    pipeline/              the base StableDiffusionPipeline, float16 weights
    loras.safetensors      every zoo LoRA, stacked per concept and module
    labels_<concept>.csv   ground-truth binary attributes of the zoo models
    evaluators.safetensors attribute classifiers + identity embedders (float16)
    evaluators.json
    heldout.npz            held-out identities: renders, parameters, attributes
    heldout.json

``loras.safetensors`` holds, for each concept ``c`` and target module ``t``,
``c.down.t`` of shape ``(M, r, in)`` and ``c.up.t`` of shape ``(M, out, r)``;
its metadata entry ``w2wkit.world.loras`` (JSON) gives the module order, the
rank and alpha, and per concept the model names, in order, and the prompt.
:meth:`World.export_loras` writes them out as ordinary LoRA files.

Everything here is numpy-only except :meth:`World.load_pipeline` and
:meth:`World.evaluators` (torch, diffusers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.errors import W2WError
from w2wkit.stio import file_sha256
from w2wkit.world import HELDOUT_CONCEPT

__all__ = [
    "WORLD_ENV",
    "World",
    "load_world",
    "pack_world",
    "package_world_dir",
    "read_manifest",
    "read_stacks",
    "repair_world",
    "revision",
    "verify_world",
    "world_dir",
    "write_manifest",
]

#: Environment variable naming a world folder (overrides the packaged one).
WORLD_ENV = "W2WKIT_WORLD"
MANIFEST = "manifest.json"
LORAS = "loras.safetensors"
STACK_KEY = "w2wkit.world.loras"
FORMAT = "w2wkit-world/1"
#: Folder of the files a revision is rewriting, as they were (removed when it ends).
BACKUP = ".revision-backup"
JOURNAL = "journal.json"


def package_world_dir() -> Path:
    """``w2wkit/data/world`` inside the installed package."""
    return Path(__file__).resolve().parent.parent / "data" / "world"


def world_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The world folder: ``path``, else ``$W2WKIT_WORLD``, else the packaged one.

    Raises
    ------
    W2WError
        If there is no manifest there.
    """
    if path is not None:
        root = Path(path)
    elif os.environ.get(WORLD_ENV):
        root = Path(os.environ[WORLD_ENV])
    else:
        root = package_world_dir()
    if not (root / MANIFEST).exists():
        raise W2WError(
            "no shipped world here (manifest.json missing)",
            path=root,
            hint="build one with `build_world(install=True)`",
        )
    return root


def write_manifest(folder: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
    """Write ``manifest.json`` listing every file of ``folder`` (sha256, bytes)."""
    from w2wkit.stio import atomic_path

    folder = Path(folder)
    files = {
        rel: {"sha256": file_sha256(folder / rel), "bytes": (folder / rel).stat().st_size}
        for rel in _world_files(folder)
    }
    old = read_manifest(folder) if (folder / MANIFEST).exists() else {}
    data = {
        **{k: v for k, v in old.items() if k != "files"},
        **(extra or {}),
        "format": FORMAT,
        "total_bytes": sum(v["bytes"] for v in files.values()),
        "files": files,
    }
    with atomic_path(folder / MANIFEST, overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1))
    return folder / MANIFEST


def verify_world(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Check every file of the manifest (present, sha256).

    Returns
    -------
    dict
        ``files`` checked and ``total_bytes``.

    Raises
    ------
    W2WError
        Naming the first missing or corrupted file.
    """
    root = world_dir(path)
    if (root / BACKUP / JOURNAL).exists():
        raise W2WError(
            "a revision of this world (a retrained zoo or embedder) was interrupted",
            path=root / BACKUP,
            hint="`repair_world()` keeps it if it had written everything, "
            "else puts the files back as they were before it",
        )
    return _check_hashes(root)


def _world_files(root: Path) -> list[str]:
    """Every file of the world folder that the manifest must list (posix, relative).

    The same set :func:`write_manifest` hashes: all files but ``manifest.json``
    and anything under a hidden (``.``) name.
    """
    out = []
    for f in sorted(root.rglob("*")):
        parts = f.relative_to(root).parts
        if f.is_file() and f.name != MANIFEST and not any(x.startswith(".") for x in parts):
            out.append(f.relative_to(root).as_posix())
    return out


def read_manifest(root: Path) -> dict[str, Any]:
    """The world's ``manifest.json``, strictly read and type-checked.

    Raises
    ------
    W2WError
        One line naming the manifest for a file that is not JSON, not an
        object, has a ``files`` entry of the wrong type, or names a file
        outside the world folder.
    """
    from w2wkit.jsonio import as_int, field, read_json

    path = root / MANIFEST
    man = read_json(path, what="the world manifest", error=W2WError)
    files = field(man, "files", dict, path=path)
    for rel, info in files.items():
        key = f"files.{rel}"
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
            raise W2WError("names a file outside the world folder", path=path, key=key)
        if not isinstance(info, dict):
            raise W2WError(f"must be an object, got {info!r}"[:100], path=path, key=key)
        sha = info.get("sha256")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise W2WError(
                f"is not a SHA-256 digest: {sha!r}"[:100], path=path, key=f"{key}.sha256"
            )
        if "bytes" in info:
            as_int(info["bytes"], path=path, key=f"{key}.bytes", error=W2WError, minimum=0)
    total = man.get("total_bytes")
    if total is not None:
        as_int(total, path=path, key="total_bytes", error=W2WError, minimum=0)
    return man


def _check_hashes(root: Path) -> dict[str, Any]:
    man = read_manifest(root)
    files = man["files"]
    for rel, info in files.items():
        f = root / rel
        if not f.is_file():
            raise W2WError("shipped world file is missing", path=f)
        size = info.get("bytes")
        if (size is not None and f.stat().st_size != int(size)) or file_sha256(f) != info["sha256"]:
            raise W2WError(
                "shipped world file is corrupted (sha256 does not match the manifest)",
                path=f,
                hint="restore it, or rebuild the world with `build_world()`",
            )
    extra = [rel for rel in _world_files(root) if rel not in files]
    if extra:
        more = f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""
        raise W2WError(
            f"file is not listed in the world manifest{more}: added to the world, or its "
            "entry was removed",
            path=root / extra[0],
            hint="remove the file, or restore or rebuild the world with `build_world()`",
        )
    return {"files": len(files), "total_bytes": man.get("total_bytes")}


@contextmanager
def revision(root: str | os.PathLike[str], files: Sequence[str]) -> Iterator[Path]:
    """Rewrite some of a world's files so that an interruption can be undone.

    Several files change together in a revision (a retrained stack or
    evaluators, the build log, the manifest), and no file system replaces
    several files at once. Before the body runs, ``files``, ``build_log.json``
    and ``manifest.json`` are copied into ``<root>/.revision-backup/`` and a
    journal listing them is written last. When the body returns the backup is
    removed; when it raises, the files are put back and the error goes on. When
    the process dies instead, the backup stays: :func:`verify_world` (and so
    every command that loads the world) then names the interruption, and
    :func:`repair_world` (``w2wkit world verify --repair``) finishes it.

    Parameters
    ----------
    root : path
        The world folder.
    files : sequence of str
        Paths relative to ``root`` that the body rewrites (besides the build
        log and the manifest).

    Yields
    ------
    pathlib.Path
        The world folder.
    """
    root = Path(root)
    backup = root / BACKUP
    if (backup / JOURNAL).exists():
        raise W2WError(
            "an earlier revision of this world was interrupted",
            path=backup,
            hint="run `repair_world()` first",
        )
    shutil.rmtree(backup, ignore_errors=True)  # a backup cut short: nothing was rewritten
    names = [*dict.fromkeys([*files, "build_log.json", MANIFEST])]
    backup.mkdir()
    existed = [rel for rel in names if (root / rel).exists()]
    for rel in existed:
        (backup / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, backup / rel)
    journal = {"files": names, "existed": existed}
    (backup / JOURNAL).write_text(json.dumps(journal))  # written last: the backup is complete
    try:
        yield root
    except BaseException:
        _restore(root)
        raise
    shutil.rmtree(backup)


def _restore(root: Path) -> None:
    from w2wkit.stio import atomic_path

    backup = root / BACKUP
    if not (backup / JOURNAL).exists():  # already finished (e.g. repaired meanwhile)
        return
    journal = json.loads((backup / JOURNAL).read_text())
    for rel in journal["files"]:
        if rel in journal["existed"]:  # copied back (a restore cut short can run again)
            with atomic_path(root / rel, overwrite=True) as tmp:
                shutil.copy2(backup / rel, tmp)
        elif (root / rel).exists():  # the revision created it
            (root / rel).unlink()
    shutil.rmtree(backup)


def repair_world(path: str | os.PathLike[str] | None = None) -> str:
    """Finish what an interrupted :func:`revision` left.

    Returns
    -------
    str
        ``"none"`` (nothing was interrupted), ``"kept"`` (the revision had
        written everything, its backup was removed) or ``"restored"`` (its
        files were put back as they were before it).
    """
    root = world_dir(path)
    backup = root / BACKUP
    if not backup.exists():
        return "none"
    if not (backup / JOURNAL).exists():  # interrupted while backing up: nothing was rewritten
        shutil.rmtree(backup)
        return "none"
    try:
        _check_hashes(root)
    except W2WError:
        _restore(root)
        return "restored"
    shutil.rmtree(backup)
    return "kept"


class World:
    """A shipped world folder (see the module docstring).

    Parameters
    ----------
    root : path
        The folder (with ``manifest.json``).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self._stack_meta: dict[str, Any] | None = None
        self._tensors: dict[str, np.ndarray] | None = None

    # -- paths -----------------------------------------------------------
    @property
    def pipeline_dir(self) -> Path:
        """The base pipeline folder (``StableDiffusionPipeline.from_pretrained``)."""
        return self.root / "pipeline"

    @property
    def evaluators_dir(self) -> Path:
        """Folder of ``evaluators.safetensors`` / ``.json`` (the world root)."""
        return self.root

    @property
    def build_log(self) -> dict[str, Any]:
        """The build log (settings, times, metrics)."""
        p = self.root / "build_log.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def labels_path(self, concept: str) -> Path:
        """CSV of the ground-truth attributes of ``concept``'s zoo models."""
        self._check_concept(concept)
        return self.root / f"labels_{concept}.csv"

    # -- stacked LoRAs ---------------------------------------------------
    def _load_stack(self) -> None:
        if self._tensors is None:
            from w2wkit.stio import read_safetensors

            st = read_safetensors(self.root / LORAS)
            try:
                self._stack_meta = json.loads(st.metadata[STACK_KEY])
            except (KeyError, json.JSONDecodeError):
                raise W2WError(f"no valid '{STACK_KEY}' metadata", path=self.root / LORAS) from None
            self._tensors = st.tensors

    @property
    def stack_meta(self) -> dict[str, Any]:
        """Metadata of the stacked LoRAs (targets, rank, alpha, per-concept names)."""
        self._load_stack()
        assert self._stack_meta is not None
        return self._stack_meta

    @property
    def concepts(self) -> list[str]:
        """Concepts of the zoo (``identity``, ``dog``)."""
        return list(self.stack_meta["concepts"])

    def _check_concept(self, concept: str) -> None:
        if concept not in self.concepts:
            raise W2WError(
                f"unknown concept '{concept}' (known: {', '.join(self.concepts)})", key="concept"
            )

    def names(self, concept: str) -> list[str]:
        """Model names of ``concept``, in stack order."""
        self._check_concept(concept)
        return list(self.stack_meta["concepts"][concept]["names"])

    def prompt(self, concept: str) -> str:
        """Instance prompt the concept's LoRAs were trained with."""
        self._check_concept(concept)
        return str(self.stack_meta["concepts"][concept]["prompt"])

    @property
    def targets(self) -> list[str]:
        """UNet module names with a LoRA (no ``unet.`` prefix), in order."""
        return list(self.stack_meta["targets"])

    def stack(self, concept: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{target: (A (M, r, in), B (M, out, r))}`` float32 for ``concept``."""
        self._check_concept(concept)
        self._load_stack()
        assert self._tensors is not None
        return {
            t: (
                np.asarray(self._tensors[f"{concept}.down.{t}"], np.float32),
                np.asarray(self._tensors[f"{concept}.up.{t}"], np.float32),
            )
            for t in self.targets
        }

    def adapter(self, concept: str, model: int | str) -> Adapter:
        """One zoo model as an :class:`Adapter` (by position or name)."""
        names = self.names(concept)
        if isinstance(model, str):
            if model not in names:
                raise W2WError(f"no model named '{model}' in the {concept} zoo", key="model")
            model = names.index(model)
        if not 0 <= int(model) < len(names):
            raise W2WError(f"model {model} is outside 0..{len(names) - 1}", key="model")
        alpha = float(self.stack_meta["alpha"])
        self._load_stack()
        assert self._tensors is not None
        i = int(model)
        # widen this model's rows only (the stacks hold every model, in float16)
        layers = {
            f"unet.{t}": LoraLayer(
                down=np.array(self._tensors[f"{concept}.down.{t}"][i], np.float32),
                up=np.array(self._tensors[f"{concept}.up.{t}"][i], np.float32),
                alpha=alpha,
            )
            for t in self.targets
        }
        meta = {
            "w2wkit.world.concept": concept,
            "w2wkit.world.instance": names[int(model)],
            "w2wkit.world.prompt": self.prompt(concept),
        }
        return Adapter(layers=layers, metadata=meta)

    def export_loras(
        self,
        out: str | os.PathLike[str],
        concept: str = HELDOUT_CONCEPT,
        *,
        format: str = "diffusers",
        overwrite: bool = False,
        models: Sequence[int] | None = None,
    ) -> list[Path]:
        """Write the zoo of ``concept`` as ordinary LoRA files + ``labels.csv``.

        ``w2wkit fit OUT`` then fits a space on them. Every output is checked
        before anything is written (an existing one is refused without
        ``overwrite``); the files are staged and published together
        (:func:`w2wkit.atomic.atomic_entries`).

        Returns
        -------
        list of Path
            The LoRA files written.
        """
        from w2wkit.atomic import atomic_entries
        from w2wkit.formats.registry import write_adapter

        names = self.names(concept)
        out = Path(out)
        idx = list(range(len(names)) if models is None else dict.fromkeys(models))
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(names):
                raise W2WError(
                    f"model {i!r} is outside 0..{len(names) - 1}", key="models", param="models"
                )
        files = [f"{names[i]}.safetensors" for i in idx]
        lab = self.labels_path(concept)
        extra = ["labels.csv"] if lab.exists() else []
        # every file is checked first, written to a staging folder, then published at once
        with atomic_entries(out, [*files, *extra], overwrite=overwrite) as stage:
            for i, fname in zip(idx, files, strict=True):
                write_adapter(self.adapter(concept, i), stage / fname, format=format)
            if extra:
                shutil.copyfile(lab, stage / "labels.csv")
        return [out / f for f in files]

    # -- other parts -----------------------------------------------------
    def load_pipeline(self, device: str = "cpu", dtype: str = "float32") -> Any:
        """The base ``StableDiffusionPipeline`` (weights shipped in float16)."""
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            str(self.pipeline_dir), torch_dtype=getattr(torch, dtype), local_files_only=True
        )
        return pipe.to(device)

    def evaluators(self, device: str = "cpu") -> Any:
        """The :class:`w2wkit.world.evaluators.Evaluators` of the world."""
        from w2wkit.world.evaluators import load_evaluators

        return load_evaluators(self.evaluators_dir, device)

    def heldout(self) -> dict[str, Any]:
        """Held-out identities: arrays of ``heldout.npz`` plus ``heldout.json`` entries."""
        with np.load(self.root / "heldout.npz") as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads((self.root / "heldout.json").read_text())
        return {**meta, **arrays}

    def verify(self) -> dict[str, Any]:
        """Check the manifest hashes (see :func:`verify_world`)."""
        return verify_world(self.root)

    def summary(self) -> dict[str, Any]:
        """Counts, sizes and the headline metrics of the build log."""
        log = self.build_log
        phases = log.get("phases", {})
        metrics = phases.get("metrics", {}).get("result", {})
        evals = phases.get("evaluators", {}).get("result", {})
        return {
            "root": str(self.root),
            "total_bytes": self.manifest.get("total_bytes"),
            "files": len(self.manifest.get("files", {})),
            "models": {c: len(self.names(c)) for c in self.concepts},
            "prompts": {c: self.prompt(c) for c in self.concepts},
            "targets": len(self.targets),
            "rank": self.stack_meta.get("rank"),
            "heldout": len(json.loads((self.root / "heldout.json").read_text())["names"])
            if (self.root / "heldout.json").exists()
            else 0,
            "device": log.get("device"),
            "gpu": log.get("gpu"),
            "profile": log.get("profile", {}).get("name"),
            "seconds": {k: round(v.get("seconds", 0.0), 1) for k, v in phases.items()},
            "metrics": metrics,
            "evaluators": evals,
            "measurements": log.get("measurements", []),
            "revisions": log.get("revisions", []),
        }


def load_world(path: str | os.PathLike[str] | None = None, verify: bool = True) -> World:
    """Open the shipped world (``path``, ``$W2WKIT_WORLD`` or the packaged one).

    Parameters
    ----------
    verify : bool
        Check the manifest's sha256 of every file first (about 0.1 s).
    """
    root = world_dir(path)
    if verify:
        verify_world(root)
    return World(root)


def pack_world(
    work: str | os.PathLike[str], dest: str | os.PathLike[str], log: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Pack a built work folder (``world build``) into the compact shipped layout.

    Written into a temporary sibling folder, then swapped in
    (:func:`w2wkit.atomic.atomic_path`); the manifest is written last.

    Returns
    -------
    dict
        Bytes per file and in total.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    from w2wkit.atomic import atomic_path
    from w2wkit.concepts import full_prompt, get_pack
    from w2wkit.stio import write_safetensors
    from w2wkit.world.profiles import profile, zoo_jobs_for

    work, dest = Path(work), Path(dest)
    with atomic_path(dest, overwrite=True) as tmp:
        tmp.mkdir()
        pipe = StableDiffusionPipeline.from_pretrained(str(work / "base"), local_files_only=True)
        pipe.to(torch.float16)
        pipe.save_pretrained(str(tmp / "pipeline"), safe_serialization=True)
        # stacked LoRAs
        prof_json = (log or {}).get("profile") or {}
        prof = profile(
            prof_json.get("name", "full"), seed=int(prof_json.get("base", {}).get("seed", 0))
        )
        for key in ("n_identities", "n_dogs"):
            if key in prof_json:
                setattr(prof, key, int(prof_json[key]))
        tensors: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"format": "w2wkit-lora-stack/1", "concepts": {}}
        for concept, jobs in zoo_jobs_for(prof).items():
            stacks, names = read_stacks(work / "zoo" / concept, jobs)
            if not names:
                continue
            meta["targets"] = list(stacks)
            first = next(iter(stacks.values()))
            meta["rank"] = int(first[0].shape[1])
            meta["alpha"] = float(prof.zoo.alpha)
            meta["concepts"][concept] = {
                "names": names,
                "prompt": full_prompt(concept),
                "class_prompt": get_pack(concept).class_prompt,
            }
            # float16, as LoRAs are usually shared (rounding 5e-4 relative): a model of the
            # 28-module zoo recipe is 10,240 numbers, 1,200 models 24.6 MB (49 MB in float32)
            for t, (a, b) in stacks.items():
                tensors[f"{concept}.down.{t}"] = a.astype(np.float16)
                tensors[f"{concept}.up.{t}"] = b.astype(np.float16)
            lab = work / "zoo" / concept / "labels.csv"
            if lab.exists():
                shutil.copyfile(lab, tmp / f"labels_{concept}.csv")
        write_safetensors(tmp / LORAS, tensors, metadata={STACK_KEY: json.dumps(meta)})
        for name in ("evaluators.safetensors", "evaluators.json"):
            shutil.copyfile(work / "evaluators" / name, tmp / name)
        for name in ("heldout.npz", "heldout.json"):
            shutil.copyfile(work / "heldout" / name, tmp / name)
        if log is not None:
            (tmp / "build_log.json").write_text(json.dumps(log, indent=1, default=str))
        write_manifest(tmp, {"counts": {c: len(v["names"]) for c, v in meta["concepts"].items()}})
    sizes = {
        f.relative_to(dest).as_posix(): f.stat().st_size for f in dest.rglob("*") if f.is_file()
    }
    return {"bytes": sizes, "total_bytes": sum(sizes.values())}


def read_stacks(folder: Path, jobs: Sequence[Any]) -> tuple[dict, list[str]]:
    """Stack the zoo files of a concept: ``{target: (A (M,r,in), B (M,out,r))}``.

    ``jobs`` are the concept's :class:`w2wkit.world.zoo.ZooJob` s; a job without
    its file in ``folder`` is left out. Returns the stacks (float32) and the
    names of the models stacked, in job order.
    """
    from w2wkit.formats.registry import read_adapter

    names, downs, ups = [], {}, {}
    for j in jobs:
        f = folder / f"{j.name}.safetensors"
        if not f.exists():
            continue
        ad = read_adapter(f)
        names.append(j.name)
        for key, layer in ad.layers.items():
            t = key.removeprefix("unet.")
            downs.setdefault(t, []).append(np.asarray(layer.down, np.float32))
            ups.setdefault(t, []).append(np.asarray(layer.up, np.float32))
    return {t: (np.stack(downs[t]), np.stack(ups[t])) for t in downs}, names
