"""Invert images into a weight space: one model per image, only coefficients trained.

weights2weights inverts a single image by optimising the coefficients of the
first ``k`` principal components of the space (initialised at zero, the mean
model) with the standard epsilon-prediction loss of diffusion training:

    loss(c) = E_{t ~ U[0, T), eps ~ N(0, I)} || m * (eps_theta(c)(x_t, t, "sks person") - eps) ||^2

where ``x_t`` is the VAE latent of the image noised to timestep ``t`` and
``m`` an optional mask (e.g. the face) downsampled to the latent grid. The
model ``theta(c)`` is the base model plus the LoRA at ``x = (c @ V_k) * s + mu``
(the space's components, scale and mean); only ``c`` is trained, with Adam.

On an SDXL pipeline the UNet is conditioned as the renderer and the trainer
condition it (:mod:`w2wkit.diffusion.conditioning`): the prompt through both text
encoders, the pooled embedding and the size/crop conditioning of the picture size.

Timesteps are uniform in ``[0, T)``, stratified over windows of steps (each
window visits every bin of ``[0, T)`` once), so that the windowed loss means
used for early stopping are comparable.

Several images are inverted in one batch: every image has its own coefficient
vector, its own random stream (timesteps and noise), its own Adam state and its
own early stopping, and the UNet applies each sample's LoRA through
:func:`w2wkit.diffusion.bank.per_sample_lora`. A batch therefore gives each image the
result it would get alone (up to float rounding of batched matmuls).

torch and diffusers are imported inside the functions that need them.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter
from w2wkit.errors import OUTPUT_EXISTS, FormatError, SpaceError, W2WError

__all__ = [
    "MARKER",
    "MINIATURE_SETTINGS",
    "PAPER_SETTINGS",
    "InversionResult",
    "InversionSettings",
    "default_settings",
    "inversion_loss",
    "invert",
    "load_images",
    "load_masks",
    "open_image",
]

ImageLike = str | os.PathLike[str] | np.ndarray | Any  # Any: PIL.Image.Image


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class InversionSettings:
    """Recipe of one inversion mode.

    Attributes
    ----------
    n_components : int
        Principal components optimised (capped at the space's ``k``).
    lr : float
        Adam step size, in coefficient units.
    steps : int
        Maximum optimisation steps per image.
    early_stopping : bool
        Whether :func:`invert` stops an image early by default (all recipes:
        no; on the miniature world, loss-based stopping cut the ID score of
        inversions, see docs/invert.md).
    """

    n_components: int
    lr: float
    steps: int
    early_stopping: bool = False


#: The paper's recipes (SD1.5, 99,648-dimensional identity space): real photos
#: and out-of-distribution inputs (paintings, sketches...).
PAPER_SETTINGS = {
    "standard": InversionSettings(n_components=10000, lr=0.1, steps=400),
    "ood": InversionSettings(n_components=1000, lr=1.0, steps=800),
}

#: Scaled recipes for the miniature world (~10k dimensions, ~1000 models): all
#: the space's components (at most 1000), lr 0.3, 400 steps. Out-of-distribution
#: inputs use the same recipe: on stylised held-out renders it beat the paper's
#: OOD scaling (a tenth of the components, 10x the step) by 0.33 (posterised) and
#: 0.14 (painted) in ID score. See docs/invert.md for how they were chosen.
MINIATURE_SETTINGS = {
    "standard": InversionSettings(n_components=1000, lr=0.3, steps=400),
    "ood": InversionSettings(n_components=1000, lr=0.3, steps=400),
}

#: Spaces at least this wide get the paper's recipe by default, smaller ones the miniature one.
PAPER_SIZE_DIM = 50_000


def _concept_pack(concept: Any) -> Any:
    if concept is None:
        return None
    if isinstance(concept, str):
        from w2wkit.concepts import get_pack

        return get_pack(concept)
    return concept


def default_settings(space: Any, *, ood: bool = False, concept: Any = None) -> InversionSettings:
    """The recipe :func:`invert` uses when ``n_components``/``lr``/``steps`` are not given.

    Spaces with ``d >= 50,000`` dimensions (SD-sized) get :data:`PAPER_SETTINGS`,
    smaller ones :data:`MINIATURE_SETTINGS`. A concept pack's
    ``n_components_inversion`` replaces the standard mode's component count.
    The count is capped at the space's ``k`` (the OOD count keeps its ratio to
    the standard one when the cap bites: ``k // 10``, at least 1, for the
    paper's recipes).

    Parameters
    ----------
    space : WeightSpace
    ood : bool
        Out-of-distribution mode.
    concept : str or ConceptPack, optional

    Returns
    -------
    InversionSettings
    """
    table = PAPER_SETTINGS if space.layout_.dim >= PAPER_SIZE_DIM else MINIATURE_SETTINGS
    base = table["ood" if ood else "standard"]
    pack = _concept_pack(concept)
    n = base.n_components
    if pack is not None and not ood:
        n = int(pack.n_components_inversion)
    k = int(space.n_components_)
    if ood:
        std = table["standard"].n_components
        ratio = base.n_components / std
        n = min(n, max(1, round(min(k, std) * ratio)))
    n = max(1, min(n, k))
    return InversionSettings(
        n_components=n, lr=base.lr, steps=base.steps, early_stopping=base.early_stopping
    )


# --------------------------------------------------------------------------- images


def _image_size(pipe: Any) -> tuple[int, int]:
    vsf = int(getattr(pipe, "vae_scale_factor", 8))
    side = int(pipe.unet.config.sample_size) * vsf
    return side, side


def _describe_image(item: Any, i: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    return f"image #{i}"


def _fit_to(img: Any, size: tuple[int, int]) -> Any:
    """Centre-crop ``img`` (PIL) to the aspect of ``size`` (H, W), then resize."""
    from PIL import Image

    h, w = size
    iw, ih = img.size
    target = w / h
    if abs(iw / ih - target) > 1e-6:
        if iw / ih > target:
            nw = max(1, round(ih * target))
            left = (iw - nw) // 2
            img = img.crop((left, 0, left + nw, ih))
        else:
            nh = max(1, round(iw / target))
            top = (ih - nh) // 2
            img = img.crop((0, top, iw, top + nh))
    if img.size != (w, h):
        img = img.resize((w, h), Image.LANCZOS)
    return img


def open_image(item: Any, mode: str = "RGB") -> Any:
    """Decode one picture (a path, PIL image or ``(H, W[, C])`` array) as a PIL image.

    Raises
    ------
    FormatError
        Naming the file, for a missing or undecodable picture.
    """
    return _to_pil(item, 0, mode)


def _to_pil(item: Any, i: int, mode: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return item.convert(mode)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise FormatError("image not found", path=path)
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert(mode)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise FormatError(
                f"cannot read the image ({type(exc).__name__}); use PNG or JPEG", path=path
            ) from None
    arr = np.asarray(item)
    if arr.dtype == np.uint8:
        f = arr.astype(np.float32) / 255.0
    else:
        f = arr.astype(np.float32)
        if not np.isfinite(f).all():
            raise W2WError("image contains NaN or Inf", key=f"image #{i}")
        if f.min() < -1e-3 or f.max() > 1 + 1e-3:
            raise W2WError(
                f"float image values must lie in [0, 1] (got {f.min():.3g}..{f.max():.3g})",
                key=f"image #{i}",
            )
    if mode == "RGB":
        if f.ndim == 2:
            f = np.repeat(f[..., None], 3, axis=-1)
        if f.ndim != 3 or f.shape[-1] not in (3, 4):
            raise W2WError(f"image array has shape {arr.shape}, need (H, W, 3)", key=f"image #{i}")
        f = f[..., :3]
    elif f.ndim != 2:
        raise W2WError(f"mask array has shape {arr.shape}, need (H, W)", key=f"mask #{i}")
    # float PIL image per channel keeps precision; "F" mode is single channel
    if mode == "RGB":
        return [Image.fromarray(np.ascontiguousarray(f[..., c]), mode="F") for c in range(3)]
    return Image.fromarray(np.ascontiguousarray(f), mode="F")


def _resize_any(pil: Any, size: tuple[int, int]) -> np.ndarray:
    if isinstance(pil, list):  # float channels
        chans = [np.asarray(_fit_to(c, size), dtype=np.float32) for c in pil]
        return np.clip(np.stack(chans, axis=-1), 0.0, 1.0)
    out = np.asarray(_fit_to(pil, size), dtype=np.float32)
    if pil.mode in ("RGB", "L"):
        out = out / 255.0
    return np.clip(out, 0.0, 1.0)


def _size_of(pil: Any) -> tuple[int, int]:
    p = pil[0] if isinstance(pil, list) else pil
    return p.size[1], p.size[0]


def load_images(
    images: ImageLike | Sequence[ImageLike],
    size: tuple[int, int],
    *,
    notice: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, list[str], list[tuple[int, int]]]:
    """Read and resize images for inversion.

    Parameters
    ----------
    images : path, PIL image, numpy array or a sequence of them
        PNG/JPEG files (anything Pillow reads), PIL images, ``(H, W, 3)``
        arrays (uint8, or float in ``[0, 1]``) or one ``(n, H, W, 3)`` array.
    size : tuple of int
        ``(height, width)`` of the pipeline's images.
    notice : callable, optional
        Receives one line per resized image (default: ``warnings.warn``).

    Returns
    -------
    (numpy.ndarray, list of str, list of tuple)
        ``(n, H, W, 3)`` float32 in ``[0, 1]``, a name per image, and each
        image's original ``(height, width)``.

    Raises
    ------
    FormatError
        An unreadable or missing file (named).
    """
    items = _as_items(images, image=True)
    if not items:
        raise W2WError("no images to invert", key="images")
    say = notice or (lambda msg: warnings.warn(msg, stacklevel=3))
    out = np.zeros((len(items), *size, 3), np.float32)
    names, sizes = [], []
    for i, item in enumerate(items):
        pil = _to_pil(item, i, "RGB")
        orig = _size_of(pil)
        if orig != tuple(size):
            say(
                f"{_describe_image(item, i)}: {orig[1]}x{orig[0]} resized to the pipeline's "
                f"{size[1]}x{size[0]}" + (" (centre-cropped)" if _crops(orig, size) else "")
            )
        out[i] = _resize_any(pil, size)
        sizes.append(orig)
        name = Path(item).stem if isinstance(item, (str, os.PathLike)) else f"image_{i:03d}"
        names.append(name)
    return out, names, sizes


def _crops(orig: tuple[int, int], size: tuple[int, int]) -> bool:
    return abs(orig[1] / orig[0] - size[1] / size[0]) > 1e-6


def _as_items(obj: Any, image: bool) -> list[Any]:
    if isinstance(obj, np.ndarray):
        if obj.ndim == (4 if image else 3):
            return list(obj)
        return [obj]
    if isinstance(obj, (str, os.PathLike)):
        return [obj]
    try:
        from PIL import Image

        if isinstance(obj, Image.Image):
            return [obj]
    except ImportError:  # pragma: no cover
        pass
    return list(obj)


def load_masks(
    mask: ImageLike | Sequence[ImageLike],
    n_images: int,
    size: tuple[int, int],
    latent_size: tuple[int, int],
    original_sizes: Sequence[tuple[int, int]] = (),
) -> np.ndarray:
    """Masks for ``n_images`` images, at image resolution.

    Parameters
    ----------
    mask : path, PIL image, numpy array or a sequence of them
        One mask for all images or one per image. A file is read as grey
        levels (white = 1). An array must be ``(H, W)`` or ``(n, H, W)`` at
        the pipeline's image size, the latent size, or the original size of
        the images (then resized like them); values in ``[0, 1]``.
    n_images : int
    size : tuple of int
        Pipeline image ``(height, width)``.
    latent_size : tuple of int
        Latent ``(height, width)``.
    original_sizes : sequence of tuple of int
        Each image's size before resizing.

    Returns
    -------
    numpy.ndarray
        ``(n_images, H, W)`` float32 in ``[0, 1]``.

    Raises
    ------
    W2WError
        Wrong shape or count (naming both), values outside ``[0, 1]``, an
        all-zero mask, an unreadable file.
    """
    items = _as_items(mask, image=False)
    if len(items) not in (1, n_images):
        raise W2WError(
            f"{len(items)} masks for {n_images} images; give one, or one per image", param="mask"
        )
    out = np.zeros((n_images, *size), np.float32)
    for j in range(n_images):
        item = items[0] if len(items) == 1 else items[j]
        from_file = isinstance(item, (str, os.PathLike))
        if not from_file and not hasattr(item, "convert"):
            arr = np.asarray(item)
            allowed = [tuple(size), tuple(latent_size)]
            if j < len(original_sizes) and tuple(original_sizes[j]) not in allowed:
                allowed.append(tuple(original_sizes[j]))
            if arr.ndim != 2 or tuple(arr.shape) not in allowed:
                want = " or ".join(f"{h}x{w}" for h, w in allowed)
                raise W2WError(
                    f"mask has shape {arr.shape}, need (H, W) = {want} (image size, latent size "
                    "or the image's own size), one for all images or one per image",
                    key="mask",
                )
        pil = _to_pil(item, j, "L")
        m = _resize_any(pil, size)
        if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
            raise W2WError("mask values must lie in [0, 1]", param="mask")
        if m.max() <= 0:
            raise W2WError("mask is all zero (nothing to fit)", key=f"mask #{j}")
        out[j] = m
    return out


# --------------------------------------------------------------------------- result

#: What marks a folder as written by :meth:`InversionResult.save` (``overwrite`` may replace it).
MARKER = "inversion.json"


def _unique_names(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for name in names:
        cand, j = name, 1
        while cand in seen:
            cand = f"{name}_{j}"
            j += 1
        seen.add(cand)
        out.append(cand)
    return out


def _check_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FormatError("output exists and is not a folder", path=out)
    if any(out.iterdir()):
        if not overwrite:
            raise FormatError(OUTPUT_EXISTS, path=out)
        if not (out / MARKER).is_file():
            raise FormatError(
                f"output folder is not empty and was not written by an inversion (no {MARKER}); "
                "refusing to replace it",
                path=out,
            )


@dataclass
class InversionResult:
    """What :func:`invert` returns.

    Attributes
    ----------
    coefficients : numpy.ndarray
        ``(n, k)`` float64, ``k`` the space's component count; entries
        beyond ``n_components`` are zero. ``space.inverse_transform`` takes it.
    adapters : list of Adapter
        The models, one per image (layout of the space, provenance metadata).
    losses : numpy.ndarray
        ``(n, steps)`` float64 training loss per image and step (NaN after
        the image stopped early).
    steps_run : numpy.ndarray
        ``(n,)`` int, steps each image ran.
    seconds : float
        Wall time of the optimisation (encoding included, loading excluded).
    names : list of str
        Image names (file stems).
    settings : dict
        n_components, lr, steps, ood, prompt, seeds, device, dtype...
    notices : list of str
        Resizing notices and the like.
    """

    coefficients: np.ndarray
    adapters: list[Adapter]
    losses: np.ndarray
    steps_run: np.ndarray
    seconds: float
    names: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    def save(
        self,
        out: str | os.PathLike[str],
        *,
        format: str = "kohya",
        overwrite: bool = False,
        inputs: Sequence[str] = (),
        space: str | None = None,
        base: str | None = None,
    ) -> list[Path]:
        """Write one LoRA per image, ``coefficients.npy`` and ``inversion.json`` to ``out``.

        The folder is written to a temporary sibling and swapped into place
        (:func:`w2wkit.atomic.atomic_path`): a crash leaves the old folder or
        the new one, whole.
        An existing folder is replaced only with ``overwrite`` and only if it
        is empty or holds an ``inversion.json`` (was written here).

        Parameters
        ----------
        out : str or os.PathLike
            Output folder.
        format : {"kohya", "diffusers", "peft"}
        overwrite : bool
        inputs : sequence of str
            The image files (provenance), one per image.
        space, base : str, optional
            Space folder and pipeline (provenance).

        Returns
        -------
        list of pathlib.Path
            The LoRA files (folders for PEFT), in image order.

        Raises
        ------
        FormatError
            The output exists (without ``overwrite``) or is not ours.
        """
        import json

        from w2wkit.atomic import atomic_path, recover, write_bytes
        from w2wkit.formats import provenance_metadata, write_adapter

        dest = Path(out)
        recover(dest)  # an earlier save killed mid-swap: put its old folder back first
        _check_output(dest, overwrite)
        names = _unique_names(self.names or [f"image_{i:03d}" for i in range(len(self.adapters))])
        inputs = [str(x) for x in inputs] or list(names)
        # checked above: an existing folder may be replaced (it is empty, or ours and overwrite)
        with atomic_path(dest, overwrite=dest.exists()) as tmp:
            tmp.mkdir()
            files = []
            for i, (name, ad) in enumerate(zip(names, self.adapters, strict=True)):
                fname = name if format == "peft" else f"{name}.safetensors"
                extra: dict[str, Any] = {
                    "image": Path(inputs[i]).name,
                    "index": i,
                    "inversion": {
                        **{k: v for k, v in self.settings.items() if k != "seeds"},
                        "seed": self.settings.get("seeds", [None] * len(names))[i],
                        "steps_run": int(self.steps_run[i]),
                    },
                }
                if base is not None:
                    extra["base"] = str(base)
                srcs = ([str(space)] if space is not None else []) + [inputs[i]]
                prov = provenance_metadata("w2wkit invert", srcs, **extra)
                write_adapter(ad, tmp / fname, format=format, provenance=prov)
                files.append(fname)
            with atomic_path(tmp / "coefficients.npy", suffix=".npy") as npy:
                np.save(npy, self.coefficients)
            report = {
                "made_by": "w2wkit invert",
                "space": None if space is None else str(space),
                "base": None if base is None else str(base),
                "format": format,
                "images": inputs,
                "files": files,
                "coefficients": "coefficients.npy",
                "settings": self.settings,
                "steps_run": [int(x) for x in self.steps_run],
                "final_loss": [float(v) for v in self.final_loss()],
                "seconds": self.seconds,
                "notices": self.notices,
            }
            write_bytes(tmp / MARKER, json.dumps(report, indent=2).encode("utf-8"))
        return [dest / f for f in files]

    def final_loss(self, window: int = 20) -> np.ndarray:
        """``(n,)`` mean training loss over each image's last ``window`` steps."""
        out = np.zeros(len(self.losses))
        for i, row in enumerate(self.losses):
            done = row[: int(self.steps_run[i])]
            out[i] = float(np.mean(done[-window:])) if done.size else math.nan
        return out


# --------------------------------------------------------------------------- the engine


def _check_space(space: Any) -> None:
    if not getattr(space, "is_fitted", False):
        raise SpaceError("the space is not fitted")
    if space.representation != "factors" or space.components_ is None:
        raise SpaceError(
            f"inversion needs a factors space (this one is {space.representation!r})",
            hint='fit one with `WeightSpace(representation="factors").fit()`',
        )


def _check_space_pipeline(space: Any, pipe: Any) -> None:
    """One error naming the space's modules the pipeline lacks (or a shape that does not fit)."""
    from w2wkit.diffusion.bank import check_against_pipeline, require_modules

    require_modules(
        pipe,
        space.layout_.modules,
        "the space's",
        "the space was fitted on LoRAs of another base model",
    )
    check_against_pipeline(pipe, _zero_stack(space, 1))


def _zero_stack(space: Any, n: int) -> dict[str, Any]:
    from w2wkit.diffusion.bank import StackedLayer

    lay = space.layout_
    out = {}
    for m in lay.modules:
        down, up = lay.slots_of(m)
        r = down.shape[0]
        out[m] = StackedLayer(
            down=np.zeros((n, *down.shape), np.float32),
            up=np.zeros((n, up.shape[0], r), np.float32),
        )
    return out


#: The pipeline components that hold text encoders (SDXL has two).
_TEXT_ENCODERS = ("text_encoder.", "text_encoder_2.")


def _encode_latents(pipe: Any, images: np.ndarray, device: str, dtype: Any) -> Any:
    """Scaled VAE latents (posterior means) ``(n, C, h, w)`` float32 of ``(n, H, W, 3)`` images.

    One image at a time (independent of the batch). As diffusers' pipelines: a
    float16 SDXL VAE that asks for it (``force_upcast``) encodes in float32, and an SDXL
    VAE with ``latents_mean``/``latents_std`` is normalised by them (the inverse of
    the renderer's decoding); otherwise ``shift_factor``, if any, is subtracted.
    """
    import torch

    from w2wkit.diffusion.conditioning import is_sdxl
    from w2wkit.diffusion.quiet import quiet

    vae = pipe.vae
    cfg = vae.config
    sf = float(cfg.scaling_factor)
    shift = getattr(cfg, "shift_factor", None) or 0.0
    mean = getattr(cfg, "latents_mean", None)
    std = getattr(cfg, "latents_std", None)
    sdxl = is_sdxl(pipe)  # SD1.x/SD2.x pipelines encode in the compute dtype, as before
    upcast = sdxl and vae.dtype == torch.float16 and bool(getattr(cfg, "force_upcast", False))
    run_dtype = torch.float32 if upcast else dtype
    if upcast:
        with quiet():
            vae.to(torch.float32)
    try:
        with torch.no_grad():
            x = torch.as_tensor(images).permute(0, 3, 1, 2).to(device=device, dtype=run_dtype)
            lat = []
            for i in range(x.shape[0]):
                z = vae.encode(x[i : i + 1] * 2 - 1).latent_dist.mean
                if sdxl and mean is not None and std is not None:
                    m = torch.tensor(mean).view(1, -1, 1, 1).to(z)
                    s = torch.tensor(std).view(1, -1, 1, 1).to(z)
                    lat.append((z - m) * sf / s)
                else:  # in the compute dtype, as before SDXL
                    lat.append((z - shift) * sf)
            return torch.cat(lat).float()
    finally:
        if upcast:
            with quiet():
                vae.to(torch.float16)


class _Problem:
    """Everything fixed during an inversion: latents, masks, embeddings, basis."""

    def __init__(
        self,
        space: Any,
        pipe: Any,
        images: np.ndarray,
        masks: np.ndarray | None,
        prompt: str,
        n_components: int,
        device: str,
        dtype: Any,
    ) -> None:
        import torch

        from w2wkit.diffusion.schedule import alphas_cumprod, prediction_type

        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.space = space
        lay = space.layout_
        self.k = n_components
        # copies: a loaded space's arrays may be read-only memory maps
        self.basis = torch.from_numpy(
            np.array(space.components_[:n_components], dtype=np.float32)
        ).to(device)
        self.scale = torch.from_numpy(np.array(space.scale_, dtype=np.float32)).to(device)
        self.mean = torch.from_numpy(np.array(space.mean_, dtype=np.float32)).to(device)
        self.slots = []
        for m in lay.modules:
            down, up = lay.slots_of(m)
            self.slots.append(
                (
                    m,
                    down.offset,
                    down.stop,
                    down.shape,
                    up.offset,
                    up.stop,
                    up.shape,
                    float(lay.scale(m)),
                )
            )
        self.te_patched = any(m.startswith(_TEXT_ENCODERS) for m in lay.modules)
        sched = pipe.scheduler
        self.T = int(sched.config.num_train_timesteps)
        self.alphas_cumprod = alphas_cumprod(sched, device)
        self.prediction_type = prediction_type(sched)
        self.latents = _encode_latents(pipe, images, device, dtype)
        self.latent_shape = tuple(self.latents.shape[1:])
        self.size = (int(images.shape[1]), int(images.shape[2]))
        if masks is None:
            self.masks = None
        else:
            import torch.nn.functional as F

            m = torch.as_tensor(masks, dtype=torch.float32)[:, None]
            m = F.interpolate(m, size=self.latent_shape[1:], mode="area")
            self.masks = m.to(device)
        self.prompt = prompt
        self._emb: tuple[Any, Any] | None = None
        if not self.te_patched:
            with torch.no_grad():
                self._emb = self._encode(1)

    def _encode(self, n: int) -> tuple[Any, Any]:
        """``(hidden states (n, L, D), pooled (n, P) or None)`` of the prompt (SDXL: pooled)."""
        from w2wkit.diffusion.conditioning import encode_prompts

        pos, _, pooled, _ = encode_prompts(self.pipe, [self.prompt] * n, self.device)
        return pos, pooled

    def factors(self, coef: Any) -> Any:
        """Flat models ``(n, d)`` float32 from coefficients ``(n, k)``."""
        return (coef @ self.basis) * self.scale + self.mean

    def set_models(self, patch: Any, coef: Any) -> None:
        x = self.factors(coef)
        n = x.shape[0]
        for m, d0, d1, dshape, u0, u1, ushape, s in self.slots:
            down = x[:, d0:d1].reshape(n, *dshape).to(self.dtype)
            up = (x[:, u0:u1].reshape(n, ushape[0], dshape[0]) * s).to(self.dtype)
            patch.set_factors(m, down, up)

    def embeddings(self, patch: Any, n: int) -> tuple[Any, Any]:
        """``(hidden states, pooled or None)`` for ``n`` images (each through its own LoRA)."""
        import torch

        if self._emb is not None:
            pos, pooled = self._emb
            return pos.expand(n, -1, -1), (None if pooled is None else pooled.expand(n, -1))
        comps = [c for c in ("text_encoder", "text_encoder_2") if c in patch.selectors]
        for c in comps:
            patch.set_index(c, torch.arange(n, device=self.device))
        try:
            return self._encode(n)
        finally:
            for c in comps:
                patch.set_index(c, None)

    def losses(self, patch: Any, coef: Any, rows: Any, t: Any, noise: Any) -> Any:
        """Per-image loss ``(n,)`` for images ``rows`` with draws ``t (n,)``, ``noise``."""
        import torch

        from w2wkit.diffusion.conditioning import added_cond
        from w2wkit.diffusion.loss import denoising_loss
        from w2wkit.diffusion.schedule import noisy, target

        n = coef.shape[0]
        self.set_models(patch, coef)
        lat = self.latents.index_select(0, rows)
        acp = self.alphas_cumprod
        x_t = noisy(lat, noise, t, acp)
        want = target(lat, noise, t, acp, self.prediction_type)
        patch.set_index("unet", torch.arange(n, device=self.device))
        emb, pooled = self.embeddings(patch, n)
        pred = self.pipe.unet(
            x_t.to(self.dtype),
            t.to(self.device),
            encoder_hidden_states=emb,
            return_dict=False,
            **added_cond(pooled, self.size),  # SDXL: pooled prompt and size/crop; SD: nothing
        )[0]
        patch.set_index("unet", None)
        mask = None if self.masks is None else self.masks.index_select(0, rows)
        return denoising_loss(pred, want, mask)


def _seeds(seed: int | Sequence[int], n: int) -> list[int]:
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise W2WError(
            f"{len(seeds)} seeds for {n} images; give one, or one per image", param="seed"
        )
    return seeds


def _default_prompt(prompt: str | None, space: Any, pack: Any) -> tuple[str, str]:
    """The conditioning prompt and where it came from.

    An explicit ``prompt`` wins; then the prompt every training model of the
    space names in its metadata (``space.training_prompt_``); then the concept
    pack's instance prompt; then ``"sks person"``.
    """
    if prompt is not None:
        return str(prompt), "argument"
    recorded = getattr(space, "training_prompt_", None)
    if recorded:
        return str(recorded), "space"
    if pack is not None:
        return str(pack.instance_prompt), "concept"
    return "sks person", "default"


def _prepare(
    space: Any,
    pipeline: Any,
    images: Any,
    mask: Any,
    device: str | None,
    dtype: Any,
    notices: list[str],
    notice: Callable[[str], None] | None,
    concept: Any,
) -> tuple[Any, np.ndarray, list[str], np.ndarray | None, str, Any]:
    from w2wkit.devices import resolve_device
    from w2wkit.devices import torch_dtype as _torch_dtype
    from w2wkit.diffusion.pipeline import load_pipeline

    _check_space(space)
    dev = resolve_device(device)
    tdtype = _torch_dtype(dtype)
    pipe = load_pipeline(pipeline, device=dev, dtype=tdtype, sdxl=True)
    _check_space_pipeline(space, pipe)

    def say(msg: str) -> None:
        notices.append(msg)
        if notice is not None:
            notice(msg)
        else:
            warnings.warn(msg, stacklevel=4)

    size = _image_size(pipe)
    arr, names, sizes = load_images(images, size, notice=say)
    vsf = int(getattr(pipe, "vae_scale_factor", 8))
    lat_size = (size[0] // vsf, size[1] // vsf)
    masks = None
    if isinstance(mask, str) and mask == "auto":
        pack = _concept_pack(concept)
        made = None if pack is None else pack.mask(arr)
        if made is None:
            raise W2WError("mask='auto' needs a concept pack that defines a mask", key="mask")
        masks = np.clip(np.asarray(made, np.float32), 0, 1)
    elif mask is not None:
        masks = load_masks(mask, len(arr), size, lat_size, sizes)
    return pipe, arr, names, masks, dev, tdtype


def invert(
    space: Any,
    pipeline: Any,
    images: ImageLike | Sequence[ImageLike],
    *,
    n_components: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    mask: Any = None,
    prompt: str | None = None,
    concept: Any = None,
    ood: bool = False,
    early_stopping: bool | None = None,
    window: int | None = None,
    patience: int = 3,
    min_delta: float = 0.01,
    batch_size: int | None = None,
    device: str | None = "auto",
    dtype: Any = "float32",
    seed: int | Sequence[int] = 0,
    progress: bool | Callable[[int, int, float], None] = False,
    notice: Callable[[str], None] | None = None,
) -> InversionResult:
    """Invert each image into a model of ``space`` (only coefficients are trained).

    Parameters
    ----------
    space : WeightSpace
        A fitted factors space whose modules are in ``pipeline``.
    pipeline : str, os.PathLike or diffusers pipeline
        The base model the space's LoRAs were trained on, SD1.x/SD2.x or SDXL
        (an object is moved to ``device``/``dtype`` in place).
    images : path, PIL image, array, or a sequence of them
        One model per image. Images are centre-cropped to the pipeline's
        aspect and resized to its resolution, with a notice.
    n_components : int, optional
        Components optimised (the first ``n``). Default: the recipe's
        (:func:`default_settings`), capped at the space's ``k``.
    steps : int, optional
        Maximum Adam steps per image (default: the recipe's).
    lr : float, optional
        Adam step size (default: the recipe's).
    mask : path, array, sequence, or "auto", optional
        Region to fit (see :func:`load_masks`); applied to prediction and
        target in latent space after area-downsampling. ``"auto"`` asks the
        concept pack (e.g. the identity pack's face mask).
    prompt : str, optional
        Conditioning prompt. Default: the prompt the space's training models
        name in their metadata (:attr:`WeightSpace.training_prompt_`, e.g. the
        miniature world's ``"a photo of sks person"``), else the concept pack's
        instance prompt, else ``"sks person"``.
    concept : str or ConceptPack, optional
        Supplies the default prompt, component count and ``mask="auto"``.
    ood : bool
        Out-of-distribution recipe (paper, SD-sized spaces: a tenth of the
        components, 10x step, 2x steps; miniature: the standard recipe, which
        measured better on stylised inputs).
    early_stopping : bool, optional
        Stop an image when the mean loss over a window of steps has not
        improved by ``min_delta`` (relative) for ``patience`` windows.
        Default: the recipe's (off for every built-in recipe).
    window : int, optional
        Steps per window (default ``max(10, steps // 20)``). Timesteps are
        uniform in ``[0, T)`` and stratified per window: the ``W`` steps of a
        window visit each of ``W`` equal bins of ``[0, T)`` once, in random
        order (``t = floor((perm[j] + u) T / W)``, ``u ~ U[0, 1)``), so the
        window means that early stopping compares are not dominated by
        which timesteps happened to be drawn.
    patience : int
    min_delta : float
    batch_size : int, optional
        Images per UNet call (default: all).
    device : str, optional
        ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"``...
    dtype : str or torch.dtype
        UNet compute dtype (``float32``, ``float16``, ``bfloat16``);
        coefficients, basis and loss stay float32.
    seed : int or sequence of int
        Seed of each image's random stream (timesteps and noise); an int
        ``s`` gives image ``i`` the seed ``s + i``.
    progress : bool or callable
        ``True``: a rich progress bar; a callable gets ``(step, steps,
        mean_loss)`` after every step.
    notice : callable, optional
        Receives notices (resizing) as one line each; default
        ``warnings.warn``.

    Returns
    -------
    InversionResult
    """
    notices: list[str] = []
    t0 = time.perf_counter()
    pipe, arr, names, masks, dev, tdtype = _prepare(
        space, pipeline, images, mask, device, dtype, notices, notice, concept
    )
    pack = _concept_pack(concept)
    rec = default_settings(space, ood=ood, concept=pack)
    k_space = int(space.n_components_)
    k = rec.n_components if n_components is None else int(n_components)
    if not 1 <= k <= k_space:
        raise SpaceError(f"{k} must be between 1 and the space's k={k_space}", param="n_components")
    steps = rec.steps if steps is None else int(steps)
    early_stopping = rec.early_stopping if early_stopping is None else bool(early_stopping)
    lr = rec.lr if lr is None else float(lr)
    if steps < 1:
        raise W2WError(f"must be >= 1, got {steps}", param="steps")
    if not lr > 0:
        raise W2WError(f"must be > 0, got {lr}", param="lr")
    prompt, prompt_source = _default_prompt(prompt, space, pack)
    if prompt_source == "space":
        msg = f"prompt '{prompt}' (the space's training models name it in their metadata)"
        notices.append(msg)
        if notice is not None:
            notice(msg)
    n = len(arr)
    seeds = _seeds(seed, n)
    win = int(window) if window else max(10, steps // 20)
    bs = n if batch_size is None else max(1, int(batch_size))

    coef = np.zeros((n, k_space), np.float64)
    losses = np.full((n, steps), np.nan)
    steps_run = np.zeros(n, np.int64)

    frozen = []
    for comp in ("unet", "text_encoder", "text_encoder_2", "vae"):
        model = getattr(pipe, comp, None)
        if model is not None:
            for p in model.parameters():
                if p.requires_grad:
                    frozen.append(p)
                    p.requires_grad_(False)
    try:
        problem = _Problem(space, pipe, arr, masks, prompt, k, dev, tdtype)
        bar = _ProgressBar(progress, steps * n)
        with bar:
            for start in range(0, n, bs):
                rows = list(range(start, min(n, start + bs)))
                c, ls, sr = _optimise(
                    problem,
                    rows,
                    [seeds[i] for i in rows],
                    steps,
                    lr,
                    early_stopping,
                    win,
                    patience,
                    min_delta,
                    bar,
                )
                coef[rows, :k] = c
                losses[rows] = ls
                steps_run[rows] = sr
    finally:
        for p in frozen:
            p.requires_grad_(True)
    seconds = time.perf_counter() - t0
    settings = {
        "n_components": k,
        "lr": lr,
        "steps": steps,
        "ood": bool(ood),
        "prompt": prompt,
        "prompt_source": prompt_source,
        "seeds": seeds,
        "masked": masks is not None,
        "device": dev,
        "dtype": str(tdtype).replace("torch.", ""),
        "early_stopping": bool(early_stopping),
        "window": win,
        "patience": patience,
        "min_delta": min_delta,
        "batch_size": bs,
    }
    adapters = space.inverse_transform(coef)
    for name, ad, sr in zip(names, adapters, steps_run, strict=True):
        ad.metadata.update(
            {
                "name": name,
                "w2wkit.made_by": "w2wkit invert",
                "w2wkit.inversion": _json(
                    {**{k_: v for k_, v in settings.items() if k_ != "seeds"}, "steps_run": int(sr)}
                ),
            }
        )
    return InversionResult(
        coefficients=coef,
        adapters=adapters,
        losses=losses,
        steps_run=steps_run,
        seconds=seconds,
        names=names,
        settings=settings,
        notices=notices,
    )


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)


class _ProgressBar:
    """The inversion's progress: the one :class:`w2wkit.progress.Bar` (with the loss) and/or a
    callback ``progress(step, steps, loss)``."""

    def __init__(self, progress: Any, total: int) -> None:
        from w2wkit.progress import Bar

        self.callback = progress if callable(progress) else None
        self.bar = Bar(
            total,
            "inverting",
            enabled=progress is True,
            unit="steps",
            transient=True,
            fields={"loss": "-"},
        )

    def __enter__(self) -> _ProgressBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def update(self, advance: int, step: int, steps: int, loss: float) -> None:
        self.bar.update(advance, loss=f"{loss:.4f}")
        if self.callback is not None:
            self.callback(step, steps, loss)


def _optimise(
    problem: _Problem,
    rows: list[int],
    seeds: list[int],
    steps: int,
    lr: float,
    early_stopping: bool,
    window: int,
    patience: int,
    min_delta: float,
    bar: _ProgressBar,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adam on the coefficients of ``rows``; per-image state, draws and stopping."""
    import torch

    from w2wkit.diffusion.bank import per_sample_lora

    n, k, dev = len(rows), problem.k, problem.device
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    coef = torch.zeros(n, k, dtype=torch.float32, device=dev)
    m1 = torch.zeros_like(coef)
    m2 = torch.zeros_like(coef)
    t_adam = np.zeros(n, np.int64)
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    strata: list[Any] = [None] * n
    losses = np.full((n, steps), np.nan)
    active = np.ones(n, bool)
    best = np.full(n, np.inf)
    bad = np.zeros(n, np.int64)
    steps_run = np.zeros(n, np.int64)
    row_t = torch.as_tensor(rows, device=dev)
    T = problem.T
    with per_sample_lora(problem.pipe, _zero_stack(problem.space, n), dev, problem.dtype) as patch:
        for step in range(steps):
            act = np.flatnonzero(active)
            if act.size == 0:
                break
            # each image's draws come from its own generator, active or not in a batch
            ts, noises = [], []
            pos = step % window
            for i in act:
                if pos == 0:
                    strata[i] = torch.randperm(window, generator=gens[i])
                u = float(torch.rand(1, generator=gens[i]).item())
                ts.append(min(T - 1, int((int(strata[i][pos]) + u) * T / window)))
                noises.append(torch.randn(problem.latent_shape, generator=gens[i]))
            t = torch.as_tensor(ts, dtype=torch.long)
            noise = torch.stack(noises).to(dev)
            act_t = torch.as_tensor(act, device=dev)
            c = coef.index_select(0, act_t).detach().requires_grad_(True)
            per = problem.losses(patch, c, row_t.index_select(0, act_t), t, noise)
            per.sum().backward()
            g = c.grad
            with torch.no_grad():
                t_adam[act] += 1
                b1 = torch.as_tensor(1 - beta1 ** t_adam[act], dtype=torch.float32, device=dev)
                b2 = torch.as_tensor(1 - beta2 ** t_adam[act], dtype=torch.float32, device=dev)
                mm = m1.index_select(0, act_t) * beta1 + (1 - beta1) * g
                vv = m2.index_select(0, act_t) * beta2 + (1 - beta2) * g * g
                m1[act_t] = mm
                m2[act_t] = vv
                upd = lr * (mm / b1[:, None]) / ((vv / b2[:, None]).sqrt() + eps)
                coef[act_t] = coef.index_select(0, act_t) - upd
            vals = per.detach().double().cpu().numpy()
            losses[act, step] = vals
            steps_run[act] = step + 1
            if early_stopping and (step + 1) % window == 0:
                for j in act:
                    wm = float(np.mean(losses[j, step + 1 - window : step + 1]))
                    if wm < best[j] * (1 - min_delta):
                        best[j] = wm
                        bad[j] = 0
                    else:
                        bad[j] += 1
                        if bad[j] >= patience:
                            active[j] = False
            bar.update(int(act.size), step + 1, steps, float(vals.mean()))
        left = steps * n - int(steps_run.sum())
        if left:
            bar.update(left, steps, steps, float("nan"))
    return coef.double().cpu().numpy(), losses, steps_run


def inversion_loss(
    space: Any,
    pipeline: Any,
    images: ImageLike | Sequence[ImageLike],
    coefficients: np.ndarray,
    *,
    n_samples: int = 16,
    mask: Any = None,
    prompt: str | None = None,
    device: str | None = "auto",
    dtype: Any = "float32",
    seed: int = 1234,
) -> np.ndarray:
    """The inversion objective at given coefficients, on fixed draws.

    Every image is scored on the same ``n_samples`` (timestep, noise) pairs
    (a stratified timestep grid ``(j + 0.5) T / n_samples`` and noise from
    ``seed``), so values at different coefficients are comparable.

    Parameters
    ----------
    space, pipeline, images, mask, prompt, device, dtype
        As :func:`invert`.
    coefficients : numpy.ndarray
        ``(n, k')`` with ``k' <= k`` (missing components are zero), one row
        per image, or ``(k',)`` for all images.
    n_samples : int
    seed : int

    Returns
    -------
    numpy.ndarray
        ``(n,)`` float64 mean masked MSE per image.
    """
    import torch

    from w2wkit.diffusion.bank import per_sample_lora

    notices: list[str] = []
    pipe, arr, _, masks, dev, tdtype = _prepare(
        space, pipeline, images, mask, device, dtype, notices, lambda _m: None, None
    )
    prompt, _ = _default_prompt(prompt, space, None)
    n = len(arr)
    c = np.asarray(coefficients, np.float64)
    if c.ndim == 1:
        c = np.broadcast_to(c, (n, c.shape[0]))
    if c.ndim != 2 or c.shape[0] != n or c.shape[1] > space.n_components_:
        raise SpaceError(f"coefficients have shape {np.shape(coefficients)}, need ({n}, <=k)")
    k = c.shape[1]
    with torch.no_grad():
        problem = _Problem(space, pipe, arr, masks, prompt, max(k, 1), dev, tdtype)
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn((n_samples, *problem.latent_shape), generator=g)
        ts = [int((j + 0.5) * problem.T / n_samples) for j in range(n_samples)]
        out = np.zeros(n)
        coef = torch.from_numpy(np.array(c, dtype=np.float32)).to(dev)
        rows = torch.arange(n, device=dev)
        with per_sample_lora(pipe, _zero_stack(space, n), dev, tdtype) as patch:
            for j in range(n_samples):
                t = torch.full((n,), ts[j], dtype=torch.long)
                nz = noise[j : j + 1].expand(n, *problem.latent_shape).to(dev)
                out += problem.losses(patch, coef, rows, t, nz).double().cpu().numpy()
    return out / n_samples
