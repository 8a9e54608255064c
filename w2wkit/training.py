"""``w2wkit.train``: a dataset of DreamBooth LoRAs from folders of the user's own pictures.

One model per instance (a person, a product, a pet), all trained with one recipe on one
base pipeline through the diffusion engine's
:class:`~w2wkit.diffusion.dreambooth.DreamBooth` loop: many models share one batch, each
trained exactly as if alone (its own picture / noise / timestep draws, its own mean
loss, the paper's shared initialisation).

Input
-----
- a folder of instance folders (``people/alice/*.jpg``...); a picture may have a caption
  in a ``.txt`` of the same stem; a ``labels.csv`` at the top is copied into the output
  (``w2wkit fit OUT --labels OUT/labels.csv`` works right away);
- or a CSV/JSONL manifest with the columns ``instance``, ``picture`` (relative to the
  manifest) and optionally ``caption``.

Output (``OUT``)
----------------
One LoRA per instance (``<instance>.safetensors``, or a folder for ``peft``), each
written atomically, and ``train_manifest.json`` (rewritten atomically after each model):
the recipe, the base pipeline's identity (a hash of its ``model_index.json`` and UNet
config), and per model its seed, final loss, file and sha256, or ``failed`` for a
diverged model (never written). A killed run resumes where it stopped; an ``OUT`` made
with another recipe is refused unless ``overwrite``.

Per-picture captions are read and recorded; by default training uses the instance
prompt for every sample (the paper's recipe). With ``Recipe(captions=True)`` a picture's
caption is the prompt of its samples (:func:`caption_prompt`: a caption that names the
rare token is used as it is, any other one follows the instance prompt,
``"<instance prompt>, <caption>"``, so the rare token stays bound to the instance);
pictures without a caption keep the instance prompt.

Beyond the paper's recipe (all off by default, each leaving the default results as
they were): prior preservation with class pictures the base model renders once
(cached under ``OUT/class_pictures/``, see :func:`class_pictures`), a LoRA on the text
encoder's attention projections too, a horizontal flip and a random crop. Each
model's per-step loss is written to ``OUT/losses/<instance>.json``; with ``check``
a grid per model is rendered to ``OUT/check/<instance>.png``.

The base may be a Stable Diffusion 1.x/2.x or an SDXL pipeline folder; on SDXL the engine
conditions the UNet on both text encoders, the pooled embedding and the pictures' size
(``tests/test_sdxl_engine.py``).

torch, diffusers and PIL are imported inside the functions.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.errors import FormatError, W2WError

__all__ = [
    "CHECK_DIR",
    "CLASS_DIR",
    "IMAGE_SUFFIXES",
    "LOSS_DIR",
    "MANIFEST",
    "Instance",
    "Recipe",
    "TrainPlan",
    "base_identity",
    "caption_prompt",
    "check_pipeline_folder",
    "check_targets",
    "class_pictures",
    "load_pictures",
    "read_instances",
    "train",
]

#: Picture file suffixes read from instance folders.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: The manifest written into the output folder.
MANIFEST = "train_manifest.json"
#: Per-model loss records (``OUT/losses/<instance>.json``).
LOSS_DIR = "losses"
#: Per-model check grids (``OUT/check/<instance>.png``).
CHECK_DIR = "check"
#: Default cache of the prior-preservation class pictures (``OUT/class_pictures/<key>/``).
CLASS_DIR = "class_pictures"
#: Sampling of the class pictures (base model, seeds ``0..N-1``): steps, guidance.
CLASS_RENDER = {"steps": 25, "guidance": 7.5}


@dataclass
class Recipe:
    """How every model of the dataset is trained (the paper's recipe by default).

    Attributes
    ----------
    rank, alpha : int, float
        LoRA rank and alpha (scale ``alpha / rank``).
    targets : tuple of str
        UNet module names (or name endings) that get a LoRA: the attention projections.
    steps, batch, lr : int, int, float
        Adam steps, pictures per model and step, learning rate.
    instance_prompt : str
        The prompt of every training sample, with the rare token ``sks``.
    resolution : int or None
        Side of the (square) training pictures; None: the pipeline's native size.
    init_seed : int
        The shared initialisation seed of every model.
    seed : int
        Seed of the per-model draws (model ``j`` of the sorted instances: ``seed * 1000003 + j``).
    captions : bool
        Condition each picture's samples on its caption (:func:`caption_prompt`)
        instead of the instance prompt.
    instance_token : str
        The rare token; a caption without it follows the instance prompt.
    prior_preservation : bool
        Add the prior-preservation loss on class pictures the base model renders.
    class_prompt : str
        Prompt of the class pictures (and of their training samples).
    num_class_images : int
        Class pictures rendered (once, cached).
    prior_weight : float
        Weight of the prior loss in each model's loss.
    text_encoder : bool
        Train a LoRA on the text encoder's attention projections too.
    flip : bool
        Mirror each training sample left-right with probability 1/2.
    random_crop : bool
        A random square crop of each resized picture per sample instead of the center crop.
    precision : {"fp32", "bf16", "fp16"}
        Arithmetic of the frozen base (:data:`w2wkit.diffusion.dreambooth.PRECISIONS`):
        bf16/fp16 store the UNet and text encoders in that type and run them under
        autocast; the LoRA factors, their Adam state and the loss stay float32.

    The fields after ``seed`` are left out of :meth:`as_dict` at their defaults, so
    a manifest of the paper's recipe reads as it did before they existed.
    """

    rank: int = 1
    alpha: float = 1.0
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    steps: int = 400
    batch: int = 1
    lr: float = 5e-4
    instance_prompt: str = "a photo of sks person"
    resolution: int | None = None
    init_seed: int = 0
    seed: int = 0
    captions: bool = False
    instance_token: str = "sks"
    prior_preservation: bool = False
    class_prompt: str = "a photo of a person"
    num_class_images: int = 100
    prior_weight: float = 1.0
    text_encoder: bool = False
    flip: bool = False
    random_crop: bool = False
    precision: str = "fp32"

    def check(self) -> None:
        """Refuse a value no training can use (one line naming the parameter)."""
        for name in ("rank", "steps", "batch"):
            if int(getattr(self, name)) < 1:
                raise W2WError(f"{name} must be at least 1", param=name)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise W2WError(f"lr must be a positive number, got {self.lr}", param="lr")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise W2WError(f"alpha must be a positive number, got {self.alpha}", param="alpha")
        if self.resolution is not None and int(self.resolution) < 8:
            raise W2WError("resolution must be at least 8 pixels", param="resolution")
        if not self.targets:
            raise W2WError("no target modules given", param="targets")
        from w2wkit.diffusion.dreambooth import PRECISIONS

        if self.precision not in PRECISIONS:
            raise W2WError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
                param="precision",
            )
        if self.captions and not self.instance_token.strip():
            raise W2WError("the instance token must not be empty", param="instance_token")
        if self.prior_preservation:
            if int(self.num_class_images) < 1:
                raise W2WError("num_class_images must be at least 1", param="num_class_images")
            if not (math.isfinite(self.prior_weight) and self.prior_weight >= 0):
                raise W2WError(
                    f"prior_weight must be a number >= 0, got {self.prior_weight}",
                    param="prior_weight",
                )
            if not self.class_prompt.strip():
                raise W2WError("the class prompt must not be empty", param="class_prompt")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (targets as a list; options at their defaults left out)."""
        d = asdict(self)
        d["targets"] = list(self.targets)
        for name in _OPTIONAL_FIELDS:
            if d[name] == _OPTIONAL_DEFAULTS[name]:
                del d[name]
        return d


#: Recipe fields added after the first manifests: left out of ``as_dict`` at their defaults.
_OPTIONAL_FIELDS = (
    "captions",
    "instance_token",
    "prior_preservation",
    "class_prompt",
    "num_class_images",
    "prior_weight",
    "text_encoder",
    "flip",
    "random_crop",
    "precision",
)
_OPTIONAL_DEFAULTS = {k: getattr(Recipe, k) for k in _OPTIONAL_FIELDS}


def caption_prompt(caption: str | None, recipe: Recipe) -> str:
    """The prompt of a picture's samples under ``recipe``.

    Without ``recipe.captions``, or for a picture without a caption: the instance
    prompt. Otherwise the caption when it names the rare token (as a word), else
    ``"<instance prompt>, <caption>"``.
    """
    if not recipe.captions or not caption:
        return recipe.instance_prompt
    token = recipe.instance_token.strip().casefold()
    words = {w.strip(".,;:!?()[]\"'").casefold() for w in caption.split()}
    return caption if token in words else f"{recipe.instance_prompt}, {caption}"


@dataclass
class Instance:
    """One model to train: its name, its pictures and their captions."""

    name: str
    pictures: list[Path]
    captions: list[str | None] = field(default_factory=list)


@dataclass
class TrainPlan:
    """What a run will do (``dry_run`` returns it without training).

    Attributes
    ----------
    models, done, failed, todo : int
        Instances in the input; already written; marked failed; left to train.
    steps : int
        Steps per model.
    models_per_batch, batches : int
        Models trained together; batches left.
    seconds_per_step : float or None
        Measured by a short warm-up (``dry_run`` only).
    estimated_s : float or None
        ``batches * steps * seconds_per_step``.
    written, failed_names : list of str
        Models written by this run; models that diverged.
    checked : list of str
        Models whose check grid this run rendered (``check``).
    notes : list of str
        Further lines of the plan (class pictures to render...).
    """

    models: int
    done: int
    failed: int
    todo: int
    steps: int
    models_per_batch: int
    batches: int
    seconds_per_step: float | None = None
    estimated_s: float | None = None
    written: list[str] = field(default_factory=list)
    failed_names: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The plan in a few lines of text."""
        lines = [
            f"models: {self.models} ({self.done} done, {self.failed} failed, {self.todo} to train)",
            f"steps per model: {self.steps}",
            f"models per batch: {self.models_per_batch}, batches: {self.batches}",
        ]
        if self.estimated_s is not None and self.seconds_per_step is not None:
            lines.append(
                f"estimated time: {_duration(self.estimated_s)} "
                f"({self.seconds_per_step * 1000:.1f} ms per batch step, measured)"
            )
        return "\n".join(lines + self.notes)


def _duration(seconds: float) -> str:
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# --------------------------------------------------------------------------- input


def _caption(picture: Path) -> str | None:
    txt = picture.with_suffix(".txt")
    if txt.is_file():
        try:
            return txt.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise FormatError(f"cannot read the caption: {exc}", path=txt) from None
    return None


def _check_names(names: Sequence[str], where: Path) -> None:
    seen: dict[str, str] = {}
    for n in names:
        if not n or n.startswith(".") or any(c in n for c in '/\\:*?"<>|'):
            raise W2WError(f"bad instance name {n!r}", path=where)
        key = n.casefold()
        if key in seen:
            raise W2WError(
                f"duplicate instance name: {seen[key]!r} and {n!r} would write the same file",
                path=where,
            )
        seen[key] = n


def read_instances(source: str | os.PathLike[str]) -> tuple[list[Instance], Path | None]:
    """The instances of a folder of instance folders or of a CSV/JSONL manifest.

    Parameters
    ----------
    source : path
        A folder (one sub-folder of pictures per instance, optional ``labels.csv``) or a
        ``.csv``/``.jsonl`` manifest (``instance``, ``picture``, optional ``caption``).

    Returns
    -------
    instances : list of Instance
        Sorted by name.
    labels : pathlib.Path or None
        The folder's ``labels.csv``.

    Raises
    ------
    FormatError, W2WError
        A missing source, an instance without pictures, duplicate names, a bad manifest.
    """
    src = Path(source)
    if src.is_dir():
        folders = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise FormatError("no instance folders inside", path=src)
        _check_names([p.name for p in folders], src)
        out = []
        for f in folders:
            pics = sorted(
                p for p in f.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not pics:
                raise FormatError(
                    "instance folder without pictures",
                    path=f,
                    hint=f"put {', '.join(IMAGE_SUFFIXES[:3])} files in it or remove it",
                )
            out.append(Instance(f.name, pics, [_caption(p) for p in pics]))
        labels = src / "labels.csv"
        return out, (labels if labels.is_file() else None)
    if not src.exists():
        raise FormatError("no such folder or manifest", path=src)
    rows = _manifest_rows(src)
    groups: dict[str, Instance] = {}
    for i, r in enumerate(rows):
        name = str(r.get("instance") or "").strip()
        pic = str(r.get("picture") or "").strip()
        if not name or not pic:
            raise FormatError(f"row {i + 1} needs 'instance' and 'picture'", path=src)
        p = Path(pic) if Path(pic).is_absolute() else src.parent / pic
        cap = r.get("caption")
        inst = groups.setdefault(name, Instance(name, [], []))
        inst.pictures.append(p)
        inst.captions.append(str(cap).strip() if cap not in (None, "") else None)
    if not groups:
        raise FormatError("the manifest lists no pictures", path=src)
    _check_names(list(groups), src)
    return [groups[k] for k in sorted(groups)], None


def _manifest_rows(src: Path) -> list[dict[str, Any]]:
    try:
        text = src.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"cannot read the manifest: {exc}", path=src) from None
    if src.suffix.lower() == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise FormatError(f"line {i + 1} is not JSON", path=src) from None
            if not isinstance(row, dict):
                raise FormatError(f"line {i + 1} is not a JSON object", path=src)
            rows.append(row)
        return rows
    if src.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not {"instance", "picture"} <= set(reader.fieldnames):
            raise FormatError("a manifest CSV needs the columns instance, picture", path=src)
        return list(reader)
    raise FormatError(
        "the input must be a folder of instance folders or a .csv/.jsonl manifest", path=src
    )


def load_pictures(
    inst: Instance,
    size: int,
    *,
    skip_bad: bool = False,
    warn: Callable[[str], None] | None = None,
    said: set[str] | None = None,
    center_crop: bool = True,
    kept: list[int] | None = None,
) -> np.ndarray | list[np.ndarray]:
    """An instance's pictures as ``(n, size, size, 3)`` uint8, resized and center-cropped.

    Parameters
    ----------
    inst : Instance
    size : int
        Side of the square training pictures.
    skip_bad : bool
        Skip an unreadable picture (told through ``warn``) instead of refusing it.
    warn : callable, optional
        ``warn(message)`` for notes (a skipped picture; resizing, said once per ``said``).
    said : set of str, optional
        Notes already given (shared between calls so that each is said once).
    center_crop : bool
        False: resize each picture to a short side of ``size`` and return the list of
        ``(h, w, 3)`` pictures uncropped (for a random crop per sample).
    kept : list of int, optional
        Filled with the indices (into ``inst.pictures``) of the pictures returned.

    Raises
    ------
    FormatError
        An unreadable picture (naming it), or no readable picture left.
    """
    from PIL import Image, UnidentifiedImageError

    said = said if said is not None else set()
    warn = warn or (lambda m: None)
    out = []
    for k, p in enumerate(inst.pictures):
        try:
            with Image.open(p) as im:
                im.load()
                rgb = im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            if skip_bad:
                if f"skip:{p}" not in said:
                    said.add(f"skip:{p}")
                    warn(f"skipped an unreadable picture: {p}")
                continue
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FormatError(
                f"unreadable picture ({reason})",
                path=p,
                hint="or skip it with `skip_bad_images=True`",
            ) from None
        w, h = rgb.size
        if not center_crop:
            if min(w, h) != size:
                if "resize" not in said:
                    said.add("resize")
                    warn(
                        f"pictures are resized to a short side of {size} and randomly cropped "
                        f"(first: {p.name} is {w}x{h})"
                    )
                scale = size / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                rgb = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
            out.append(np.asarray(rgb, dtype=np.uint8))
            if kept is not None:
                kept.append(k)
            continue
        if (w, h) != (size, size):
            if "resize" not in said:
                said.add("resize")
                warn(
                    f"pictures are resized and center-cropped to {size}x{size} "
                    f"(first: {p.name} is {w}x{h})"
                )
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            rgb = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            rgb = rgb.crop((left, top, left + size, top + size))
        out.append(np.asarray(rgb, dtype=np.uint8))
        if kept is not None:
            kept.append(k)
    if not out:
        raise FormatError(f"instance {inst.name!r} has no readable picture left", path=None)
    return np.stack(out) if center_crop else out


# --------------------------------------------------------------------------- the base pipeline


def check_pipeline_folder(path: str | os.PathLike[str]) -> Path:
    """Refuse a pipeline folder with a missing part (naming it); SD1.x/2.x or SDXL.

    Returns
    -------
    pathlib.Path
        The folder.
    """
    from w2wkit.diffusion.pipeline import pipeline_kind

    folder = Path(path)
    if not folder.is_dir():
        raise FormatError("pipeline folder not found", path=folder, param="base")
    index = folder / "model_index.json"
    if not index.is_file():
        raise FormatError(
            "incomplete pipeline folder: model_index.json is missing", path=folder, param="base"
        )
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FormatError(f"unreadable model_index.json: {exc}", path=index) from None
    xl = ("text_encoder_2", "tokenizer_2") if pipeline_kind(folder) == "sdxl" else ()
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", *xl):
        entry = meta.get(comp)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] is not None):
            raise FormatError(
                f"incomplete pipeline folder: model_index.json names no {comp}", path=index
            )
        sub = folder / comp
        if not sub.is_dir() or not any(sub.iterdir()):
            raise FormatError(f"incomplete pipeline folder: {comp}/ is missing", path=sub)
    for comp in ("unet", "vae", "text_encoder", *xl[:1]):
        sub = folder / comp
        if not (sub / "config.json").is_file():
            raise FormatError(
                f"incomplete pipeline folder: {comp}/config.json is missing", path=sub
            )
        if not any(p.suffix in (".safetensors", ".bin") for p in sub.iterdir()):
            raise FormatError(f"incomplete pipeline folder: {comp} has no weights", path=sub)
    return folder


def base_identity(path: str | os.PathLike[str]) -> str:
    """sha256 of the pipeline's ``model_index.json`` and ``unet/config.json`` (hex)."""
    h = hashlib.sha256()
    for rel in ("model_index.json", "unet/config.json"):
        p = Path(path) / rel
        h.update(rel.encode() + b"\0")
        h.update(p.read_bytes() if p.is_file() else b"")
    return h.hexdigest()


def check_targets(module_names: Sequence[str], targets: Sequence[str]) -> list[str]:
    """The UNet modules ``targets`` name; refuse targets no module has, with near matches.

    Parameters
    ----------
    module_names : sequence of str
        The UNet's module names (``named_modules``).
    targets : sequence of str
        Names or name endings (``to_q``, ``attn1.to_out.0``).

    Raises
    ------
    W2WError
        Listing the absent targets and the near matches among the UNet's name endings.
    """
    from w2wkit.diffusion.dreambooth import is_target

    absent = [t for t in targets if not any(is_target(n, [t]) for n in module_names)]
    if absent:
        endings = set()
        for n in module_names:
            parts = n.split(".")
            for k in range(1, min(3, len(parts)) + 1):
                endings.add(".".join(parts[-k:]))
        near = sorted({m for t in absent for m in difflib.get_close_matches(t, endings, 3)})
        raise W2WError(
            f"target module(s) absent from the UNet: {', '.join(absent)}"
            + (f"; near matches: {', '.join(near)}" if near else ""),
            param="targets",
        )
    return [n for n in module_names if is_target(n, targets)]


# --------------------------------------------------------------------------- manifest


def _read_manifest(out: Path) -> dict[str, Any] | None:
    from w2wkit.jsonio import read_json

    path = out / MANIFEST
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise FormatError("not a w2wkit training manifest", path=path)
    return data


def _write_manifest(out: Path, data: dict[str, Any]) -> None:
    from w2wkit.atomic import atomic_path

    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    with atomic_path(out / MANIFEST, overwrite=True) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def _file_name(name: str, fmt: str) -> str:
    return name if fmt == "peft" else f"{name}.safetensors"


def _die_hook(count: int) -> None:
    """Test hook: ``W2WKIT_TEST_TRAIN_DIE_AFTER=k`` kills the run after its k-th model."""
    k = os.environ.get("W2WKIT_TEST_TRAIN_DIE_AFTER", "")
    if k.isdigit() and int(k) > 0 and count >= int(k):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"


def _auto_models_per_batch(
    trainer: Any, pics: np.ndarray, recipe: Recipe, todo: int, extra: dict | None = None
) -> int:
    """From free memory on CUDA (one measured step of one model), 8 on the CPU."""
    import torch

    if not str(trainer.device).startswith("cuda"):
        return max(1, min(8, todo))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    trainer.train(
        [pics], recipe.instance_prompt, [0], steps=1, batch=recipe.batch, lr=recipe.lr,
        **(extra or {}),
    )  # fmt: skip
    trainer.release()
    per = max(1, torch.cuda.max_memory_allocated() - before)
    free, _ = torch.cuda.mem_get_info()
    return max(1, min(todo, int(0.8 * free / per)))


# --------------------------------------------------------------------------- one batch, one model
# (shared by the single-process loop below and the cluster workers, w2wkit/train_cluster.py)


def settings_key(settings: dict[str, Any]) -> str:
    """sha256 (hex) of a run's settings (recipe, base identity, format): the recipe hash.

    Written into every model's metadata (``w2wkit.recipe``) so that a worker that runs a
    chunk again can tell a finished model of the same recipe from anything else.
    """
    text = json.dumps(settings, sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def train_batch(
    trainer: Any,
    images: Sequence[np.ndarray],
    seeds: Sequence[int],
    recipe: Recipe,
    *,
    on_step: Callable[[int], None] | None = None,
    **options: Any,
) -> tuple[list[Any], np.ndarray]:
    """Train one batch of models with the recipe (the engine's DreamBooth loop).

    Parameters
    ----------
    trainer : DreamBooth
        The base pipeline, loaded once.
    images : sequence of numpy.ndarray
        Per model, its pictures ``(n_j, H, W, 3)`` uint8.
    seeds : sequence of int
        Per model, the seed of its draws.
    recipe : Recipe
    on_step : callable, optional
        Called with the number of steps done.
    **options
        The engine's options beyond the paper's recipe (``prompts``, ``flip``,
        ``crop_size``, ``prior``...), passed on.

    Returns
    -------
    adapters : list of Adapter
    losses : numpy.ndarray
        ``(M,)`` final losses.
    """
    return trainer.train(
        images,
        recipe.instance_prompt,
        list(seeds),
        steps=recipe.steps,
        batch=recipe.batch,
        lr=recipe.lr,
        on_step=on_step,
        **options,
    )


def _published(path: Path, key: str, seed: int) -> dict[str, Any] | None:
    """The manifest entry of a complete model file of recipe ``key`` and ``seed``, or None."""
    from w2wkit.stio import read_header

    f = path / "adapter_model.safetensors" if path.is_dir() else path
    try:
        meta = read_header(f)[1]
        loss = float(meta["w2wkit.loss"])
    except (OSError, W2WError, KeyError, ValueError):
        return None
    if meta.get("w2wkit.recipe") != key or meta.get("w2wkit.seed") != str(seed):
        return None
    return {"loss": loss}


def publish_model(
    inst: Instance,
    adapter: Any,
    loss: float,
    seed: int,
    recipe: Recipe,
    out: Path,
    format: str,
    key: str,
    *,
    keep_complete: bool = False,
) -> dict[str, Any]:
    """Write one trained model atomically; its manifest entry (``failed`` when it diverged).

    Parameters
    ----------
    inst : Instance
    adapter : Adapter
        The trained LoRA.
    loss : float
        Its final loss.
    seed : int
        Its seed.
    recipe : Recipe
    out : pathlib.Path
        The output folder.
    format : str
        The output format.
    key : str
        The recipe hash (:func:`settings_key`), written into the metadata.
    keep_complete : bool
        Leave a file that is already a complete model of this recipe and seed as it is
        (a chunk run again on a cluster): nothing is written twice.

    Returns
    -------
    dict
        ``seed``, ``pictures``, ``captions``, ``status`` and, when done, ``file``,
        ``sha256``, ``loss`` (and ``kept`` when an existing file was kept).
    """
    from w2wkit.formats.registry import provenance_metadata, write_adapter
    from w2wkit.stio import file_sha256

    finite = math.isfinite(float(loss)) and all(
        np.isfinite(layer.down).all() and np.isfinite(layer.up).all()
        for layer in adapter.layers.values()
    )
    entry: dict[str, Any] = {
        "seed": seed,
        "pictures": [str(p) for p in inst.pictures],
        "captions": inst.captions,
    }
    if not finite:
        entry.update(status="failed", reason="diverged (non-finite loss or weights)")
        return entry
    fname = _file_name(inst.name, format)
    old = _published(out / fname, key, seed) if keep_complete else None
    if old is None:
        adapter.metadata = provenance_metadata(
            "w2wkit train",
            [str(p) for p in inst.pictures],
            prompt=recipe.instance_prompt,
            instance=inst.name,
            seed=str(seed),
            recipe=key,
            loss=repr(float(loss)),
        )
        write_adapter(adapter, out / fname, format=format, overwrite=True)
    else:
        entry["kept"] = True
        loss = old["loss"]
    entry.update(status="done", file=fname, sha256=file_sha256(out / fname), loss=float(loss))
    return entry


# --------------------------------------------------------------------------- train


def class_pictures(
    pipe: Any,
    recipe: Recipe,
    size: int,
    identity: str,
    cache: str | os.PathLike[str],
    *,
    device: str = "auto",
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
) -> np.ndarray:
    """The prior-preservation class pictures: rendered once by the base model, then cached.

    ``recipe.num_class_images`` pictures of ``recipe.class_prompt`` (seeds ``0..N-1``,
    :data:`CLASS_RENDER` sampling) at ``size`` px, written atomically as PNGs into
    ``cache/<key>/`` where the key hashes the base identity, the class prompt, ``N``,
    the size and the sampling, so a resumed run or a later run with the same key
    reuses them. The pictures are always read back from the PNGs, so a first run
    and a run from the cache train on the same bytes.

    Parameters
    ----------
    pipe : diffusers pipeline or path
        The base pipeline (no LoRA installed).
    recipe : Recipe
    size : int
        Side of the pictures.
    identity : str
        :func:`base_identity` of the base.
    cache : path
        The cache folder.
    device : str
        Where to render (``auto``: the GPU when present).
    progress : bool
        Show a progress bar.
    warn : callable, optional
        Told when pictures are rendered.

    Returns
    -------
    numpy.ndarray
        ``(N, size, size, 3)`` uint8.
    """
    from PIL import Image

    from w2wkit.atomic import atomic_path
    from w2wkit.diffusion.sampler import Renderer
    from w2wkit.progress import Bar

    n = int(recipe.num_class_images)
    meta = {
        "base_sha256": identity,
        "class_prompt": recipe.class_prompt,
        "num_class_images": n,
        "resolution": int(size),
        "seeds": [0, n - 1],
        **CLASS_RENDER,
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache) / key
    files = [folder / f"{i:05d}.png" for i in range(n)]
    if not ((folder / "class.json").is_file() and all(f.is_file() for f in files)):
        (warn or (lambda m: None))(
            f"rendering {n} class pictures of {recipe.class_prompt!r} with the base model "
            f"(cached in {folder})"
        )
        renderer = Renderer(pipe, device=device)
        with Bar(n, "class pictures", enabled=progress, unit="pictures") as bar:
            res = renderer.render(
                [None],
                recipe.class_prompt,
                list(range(n)),
                steps=int(CLASS_RENDER["steps"]),
                guidance=float(CLASS_RENDER["guidance"]),
                height=size,
                width=size,
                progress=lambda done, total: bar.set(done),
            )
        imgs = res.images[0, 0]
        if not np.isfinite(imgs).all():
            raise W2WError("the base model rendered non-finite class pictures", path=folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder, overwrite=True) as tmp:
            tmp.mkdir()
            for f, img in zip(files, imgs, strict=True):
                Image.fromarray(np.round(img * 255).astype(np.uint8)).save(tmp / f.name)
            (tmp / "class.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return np.stack(out)


def _finite_list(values: Any) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in np.asarray(values).ravel()]


def _write_loss_record(
    out: Path,
    name: str,
    seed: int,
    loss: np.ndarray,
    prior: np.ndarray | None,
    final: float,
) -> None:
    """``OUT/losses/<name>.json``: the model's instance (and prior) loss at every step."""
    from w2wkit.atomic import atomic_path

    rec: dict[str, Any] = {
        "model": name,
        "seed": int(seed),
        "steps": len(loss),
        "loss": _finite_list(loss),
        "final_loss": float(final) if math.isfinite(float(final)) else None,
        "final_rule": "mean of the last 20% of the steps' losses (the manifest's loss)",
    }
    if prior is not None:
        rec["prior_loss"] = _finite_list(prior)
    folder = out / LOSS_DIR
    folder.mkdir(exist_ok=True)
    text = json.dumps(rec, separators=(",", ":"), allow_nan=False)
    with atomic_path(folder / f"{name}.json", overwrite=True) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def _render_checks(
    pipe: Any,
    device: str,
    out: Path,
    items: Sequence[tuple[str, str]],
    recipe: Recipe,
    seeds: Sequence[int],
    steps: int,
    size: int,
    *,
    progress: bool,
    warn: Callable[[str], None],
) -> list[str]:
    """Render ``OUT/check/<name>.png`` (instance prompt x ``seeds``) for ``(name, file)`` items.

    Returns the names whose grid was written; a non-finite render is told, not written.
    """
    from w2wkit.diffusion.sampler import Renderer, RenderResult
    from w2wkit.progress import Bar

    if not items:
        return []
    renderer = Renderer(pipe, device=device)
    (out / CHECK_DIR).mkdir(exist_ok=True)
    done = []
    with Bar(len(items), "check", enabled=progress, unit="models") as bar:
        for s in range(0, len(items), 8):
            part = items[s : s + 8]
            res = renderer.render(
                [out / f for _, f in part],
                recipe.instance_prompt,
                [int(x) for x in seeds],
                steps=int(steps),
                height=size,
                width=size,
                names=[n for n, _ in part],
            )
            for j, (name, _) in enumerate(part):
                imgs = res.images[j : j + 1]
                if not np.isfinite(imgs).all():
                    warn(f"the check render of {name!r} is not finite; no grid written")
                    continue
                row = RenderResult(imgs, [name], res.prompts, res.seeds, res.info)
                row.save_grid(out / CHECK_DIR / f"{name}.png", overwrite=True)
                done.append(name)
            bar.set(s + len(part))
    return done


def _step_progress(bar: Any, done: int, n: int, steps: int) -> Callable[[int], None]:
    def on_step(k: int) -> None:
        bar.set(done, n * k / steps)

    return on_step


def train(
    instances: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    recipe: Recipe | None = None,
    *,
    models_per_batch: int | str = "auto",
    format: str = "kohya",
    device: str = "auto",
    skip_bad_images: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
    check: bool = False,
    check_seeds: Sequence[int] = (0, 1, 2, 3),
    check_steps: int = 25,
    class_dir: str | os.PathLike[str] | None = None,
    client: Any = None,
) -> TrainPlan:
    """Train one LoRA per instance into ``out`` (resuming a killed run of the same recipe).

    Parameters
    ----------
    instances : path
        A folder of instance folders, or a CSV/JSONL manifest (see the module docs).
    base : path
        A Stable Diffusion 1.x/2.x or SDXL pipeline folder.
    out : path
        Output folder: one LoRA per instance, ``train_manifest.json``, ``labels.csv``.
    recipe : Recipe, optional
        The paper's recipe by default.
    models_per_batch : int or "auto"
        Models trained together (``auto``: from free memory; halved on out-of-memory).
    format : str
        Any writable w2wkit format (``kohya``, ``diffusers``, ``peft``...).
    device : str
        ``auto``, ``cpu``, ``cuda``...
    skip_bad_images : bool
        Skip unreadable pictures instead of refusing them.
    overwrite : bool
        Start over in an ``out`` that holds models of another recipe or base.
    dry_run : bool
        Measure a short warm-up and return the plan without writing anything.
    progress : bool
        Show a progress bar (models, models/h, ETA).
    warn : callable, optional
        ``warn(message)`` for notes (resizing, skipped pictures, diverged models,
        out-of-memory halving); default: nothing.
    check : bool
        After training, render a grid per model (the instance prompt x ``check_seeds``,
        ``check_steps`` sampler steps) into ``OUT/check/<instance>.png`` with the
        engine's renderer; models that have a grid already are not rendered again.
    check_seeds : sequence of int
    check_steps : int
    class_dir : path, optional
        Cache of the prior-preservation class pictures (default ``OUT/class_pictures``);
        share one between runs on the same base to render them once.
    client : dask.distributed.Client, optional
        Train on a Dask cluster (:mod:`w2wkit.train_cluster`): chunks of models become
        tasks, the workers write the models into ``out`` (a folder every worker sees),
        this process keeps the manifest. None: this process trains (dask is not imported).

    Returns
    -------
    TrainPlan
        The plan; after training, with ``written`` and ``failed_names``.

    Raises
    ------
    W2WError
        Bad input (one line naming the file, key or parameter); nothing half-written.
    """
    import torch

    from w2wkit.atomic import atomic_path
    from w2wkit.diffusion.dreambooth import TEXT_ENCODER_TARGETS, DreamBooth
    from w2wkit.diffusion.pipeline import load_pipeline
    from w2wkit.formats.registry import writable_formats
    from w2wkit.progress import Bar
    from w2wkit.stio import file_sha256

    recipe = recipe or Recipe()
    recipe.check()
    warn = warn or (lambda m: None)
    if format not in writable_formats():
        raise W2WError(
            f"unknown output format {format!r}; writable: {', '.join(writable_formats())}",
            param="format",
        )
    mpb_auto = models_per_batch == "auto"
    if not mpb_auto:
        try:
            mpb = int(models_per_batch)
        except (TypeError, ValueError):
            raise W2WError(
                f"models per batch must be a number or auto, got {models_per_batch!r}",
                param="models_per_batch",
            ) from None
        if mpb < 1:
            raise W2WError("models per batch must be at least 1", param="models_per_batch")
    insts, labels = read_instances(instances)
    base_dir = check_pipeline_folder(base)
    identity = base_identity(base_dir)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FormatError("the output must be a folder", path=out)
    settings = {
        "recipe": recipe.as_dict(),
        "base": {"path": str(base_dir), "sha256": identity},
        "format": format,
    }
    old = _read_manifest(out) if out.is_dir() else None
    if old is not None and (
        old.get("recipe") != settings["recipe"]
        or (old.get("base") or {}).get("sha256") != identity
        or old.get("format") != format
    ):
        if not overwrite:
            what = [
                k
                for k, same in (
                    ("recipe", old.get("recipe") == settings["recipe"]),
                    ("base model", (old.get("base") or {}).get("sha256") == identity),
                    ("format", old.get("format") == format),
                )
                if not same
            ]
            raise W2WError(
                f"the output folder holds models of another {' and '.join(what)}",
                path=out,
                hint="write elsewhere, or pass `overwrite=True` to train them again",
            )
        old = None
    elif (
        old is None
        and out.is_dir()
        and any((out / _file_name(i.name, format)).exists() for i in insts)
    ):
        if not overwrite:
            raise W2WError(
                "the output folder holds LoRA files without a training manifest",
                path=out,
                hint="write elsewhere, or pass `overwrite=True` to replace them",
            )
    models: dict[str, Any] = dict(old["models"]) if old else {}
    recipe_key = settings_key(settings)
    seeds = {i.name: recipe.seed * 1_000_003 + k for k, i in enumerate(insts)}

    def finished(name: str) -> bool:
        e = models.get(name)
        if not isinstance(e, dict):
            return False
        if e.get("status") == "failed":
            return True
        f = out / str(e.get("file", ""))
        return e.get("status") == "done" and f.exists() and file_sha256(f) == e.get("sha256")

    todo = [i for i in insts if not finished(i.name)]
    n_done = sum(1 for i in insts if finished(i.name) and models[i.name]["status"] == "done")
    n_failed = sum(1 for i in insts if finished(i.name) and models[i.name]["status"] == "failed")

    # the pipeline and the targets (before any picture is decoded for a long run)
    pipe = load_pipeline(base_dir, device="cpu", dtype=torch.float32, sdxl=True)
    names = [n for n, _ in pipe.unet.named_modules()]
    check_targets(names, recipe.targets)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = int(recipe.resolution or pipe.unet.config.sample_size * vae_scale)
    if size % vae_scale:
        raise W2WError(
            f"resolution {size} is not a multiple of the VAE's factor {vae_scale}",
            param="resolution",
        )
    said: set[str] = set()
    if any(c for i in insts for c in i.captions):
        if recipe.captions:
            warn(
                "each picture's caption is its prompt (a caption without "
                f"{recipe.instance_token!r} follows the instance prompt: "
                f"'{recipe.instance_prompt}, <caption>')"
            )
        else:
            warn(
                "captions are recorded in the manifest; every sample is trained with the "
                f"instance prompt {recipe.instance_prompt!r}"
            )
    if client is not None:  # the workers train; this process keeps the manifest
        from w2wkit.train_cluster import TrainOps, train_on_cluster

        for on, what in ((recipe.prior_preservation, "prior preservation"), (check, "check")):
            if on:
                raise W2WError(
                    f"{what} is not available on a cluster yet",
                    param="client",
                    hint="train on the cluster, then run again without a cluster to add it",
                )
        del pipe
        return train_on_cluster(
            client,
            insts=insts,
            todo=todo,
            labels=labels,
            base=base_dir,
            out=out,
            recipe=recipe,
            settings=settings,
            models=models,
            seeds=seeds,
            size=size,
            models_per_batch=None if mpb_auto else mpb,
            format=format,
            device=device,
            skip_bad_images=skip_bad_images,
            dry_run=dry_run,
            progress=progress,
            warn=warn,
            plan=TrainPlan(len(insts), n_done, n_failed, len(todo), recipe.steps, 1, 0),
            key=recipe_key,
            ops=TrainOps(
                load_pictures,
                train_batch,
                publish_model,
                _auto_models_per_batch,
                _is_oom,
                _write_manifest,
                _write_loss_record,
                caption_prompt,
            ),
            text_encoder_targets=TEXT_ENCODER_TARGETS if recipe.text_encoder else None,
        )
    trainer = DreamBooth(
        pipe,
        targets=recipe.targets,
        rank=recipe.rank,
        alpha=recipe.alpha,
        init_seed=recipe.init_seed,
        device=device,
        text_encoder_targets=TEXT_ENCODER_TARGETS if recipe.text_encoder else None,
        precision=recipe.precision,
    )
    if str(trainer.device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # as if alone: same numerics per model
    pictures: dict[str, Any] = {}
    prompts_of: dict[str, list[str]] = {}

    def pics(inst: Instance) -> Any:
        if inst.name not in pictures:
            kept: list[int] = []
            pictures[inst.name] = load_pictures(
                inst,
                size,
                skip_bad=skip_bad_images,
                warn=warn,
                said=said,
                center_crop=not recipe.random_crop,
                kept=kept,
            )
            caps = inst.captions
            prompts_of[inst.name] = [
                caption_prompt(caps[k] if k < len(caps) else None, recipe) for k in kept
            ]
        return pictures[inst.name]

    prior_pool: np.ndarray | None = None  # the class pictures, once rendered or read

    def options(chunk: Sequence[Instance], stand_in: bool = False) -> dict[str, Any]:
        """The engine's keyword arguments beyond the paper's recipe (none by default)."""
        kw: dict[str, Any] = {}
        if recipe.captions:
            kw["prompts"] = [prompts_of[i.name] for i in chunk]
        if recipe.flip:
            kw["flip"] = True
        if recipe.random_crop:
            kw["crop_size"] = size
        if recipe.prior_preservation:
            pool = prior_pool
            if pool is None and stand_in:  # for timing and memory: the same rows
                pool = np.zeros((1, size, size, 3), np.uint8)
            kw.update(prior=pool, class_prompt=recipe.class_prompt)
            kw["prior_weight"] = recipe.prior_weight
        return kw

    if todo and mpb_auto:
        first = pics(todo[0])
        mpb = _auto_models_per_batch(
            trainer, first, recipe, len(todo), options(todo[:1], stand_in=True)
        )
    elif not todo:
        mpb = max(1, mpb if not mpb_auto else 1)
    plan = TrainPlan(
        models=len(insts),
        done=n_done,
        failed=n_failed,
        todo=len(todo),
        steps=recipe.steps,
        models_per_batch=mpb,
        batches=math.ceil(len(todo) / mpb) if todo else 0,
    )
    cache = Path(class_dir) if class_dir is not None else out / CLASS_DIR
    if recipe.prior_preservation:
        plan.notes.append(
            f"prior preservation: {recipe.num_class_images} class pictures of "
            f"{recipe.class_prompt!r} (rendered once by the base model, cached in {cache})"
        )
    if dry_run:
        if todo:
            chunk = todo[:mpb]
            imgs = [pics(i) for i in chunk]  # also checks every picture of the first batch
            for i in todo[mpb:]:
                load_pictures(i, size, skip_bad=skip_bad_images, warn=warn, said=said)
            warm = min(3, recipe.steps)
            trainer.train(
                imgs,
                recipe.instance_prompt,
                [0] * len(chunk),
                steps=1,
                batch=recipe.batch,
                lr=recipe.lr,
                **options(chunk, stand_in=True),
            )  # first step: allocation, caches
            t0 = time.perf_counter()
            trainer.train(
                imgs,
                recipe.instance_prompt,
                [0] * len(chunk),
                steps=warm,
                batch=recipe.batch,
                lr=recipe.lr,
                **options(chunk, stand_in=True),
            )
            trainer.release()
            plan.seconds_per_step = (time.perf_counter() - t0) / warm
            plan.estimated_s = plan.seconds_per_step * recipe.steps * plan.batches
        return plan

    for k, i in enumerate(todo):  # every picture is checked before the first model trains
        if k < mpb:
            pics(i)  # the first batch's, kept
        else:
            load_pictures(i, size, skip_bad=skip_bad_images, warn=warn, said=said)
    out.mkdir(parents=True, exist_ok=True)
    if labels is not None:
        with atomic_path(out / "labels.csv", overwrite=True) as tmp:
            shutil.copyfile(labels, tmp)
    manifest = {**settings, "models": models, "w2wkit": "train"}
    _write_manifest(out, manifest)
    if recipe.prior_preservation and todo:
        prior_pool = class_pictures(
            trainer.pipe,
            recipe,
            size,
            identity,
            cache,
            device=str(trainer.device),
            progress=progress,
            warn=warn,
        )
    written = 0
    queue = list(todo)
    with Bar(len(insts), "train", enabled=progress, unit="models", fields={"loss": "-"}) as bar:
        bar.set(n_done + n_failed)
        while queue:
            chunk = queue[:mpb]
            base_done = len(insts) - len(queue)
            try:
                adapters, losses = train_batch(
                    trainer,
                    [pics(i) for i in chunk],
                    [seeds[i.name] for i in chunk],
                    recipe,
                    on_step=_step_progress(bar, base_done, len(chunk), recipe.steps),
                    **options(chunk),
                )
            except RuntimeError as exc:
                if not _is_oom(exc) or mpb == 1:
                    raise
                trainer.release()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                mpb = max(1, mpb // 2)
                plan.models_per_batch = mpb
                warn(f"out of memory: models per batch halved to {mpb}")
                continue
            trainer.release()
            for inst in chunk:  # pictures are held for the running batch only
                pictures.pop(inst.name, None)
            hist, prior_hist = trainer.history, trainer.prior_history
            for j, (inst, ad, loss) in enumerate(zip(chunk, adapters, losses, strict=True)):
                _write_loss_record(
                    out,
                    inst.name,
                    seeds[inst.name],
                    hist[:, j],
                    None if prior_hist is None else prior_hist[:, j],
                    float(loss),
                )
                entry = publish_model(
                    inst, ad, float(loss), seeds[inst.name], recipe, out, format, recipe_key
                )
                if entry["status"] == "failed":
                    plan.failed_names.append(inst.name)
                    warn(f"model {inst.name!r} diverged (non-finite loss); marked failed")
                else:
                    plan.written.append(inst.name)
                models[inst.name] = entry
                _write_manifest(out, manifest)
                written += 1
                bar.update(0, loss=f"{float(loss):.4f}")
                _die_hook(written)
            queue = queue[len(chunk) :]
            bar.set(len(insts) - len(queue))
    if check:
        missing = [
            (i.name, str(models[i.name]["file"]))
            for i in insts
            if models.get(i.name, {}).get("status") == "done"
            and not (out / CHECK_DIR / f"{i.name}.png").is_file()
        ]
        plan.checked = _render_checks(
            trainer.pipe,
            str(trainer.device),
            out,
            missing,
            recipe,
            check_seeds,
            check_steps,
            size,
            progress=progress,
            warn=warn,
        )
    return plan
