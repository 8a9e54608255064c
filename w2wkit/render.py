"""Render many different LoRA models of one base pipeline in shared batches.

All models of a weight space share a layout (same modules, same ranks), so
instead of loading and unloading one adapter per model, the renderer replaces
each targeted ``Linear``/``Conv2d`` of the pipeline with a wrapper that adds,
for batch element ``b``, its own low-rank update::

    y_b = base(x_b) + (x_b @ A_{m(b)}^T) @ (s_{m(b)} B_{m(b)})^T

where ``m(b)`` is the model that sample ``b`` renders and ``s`` the model's
LoRA scale (``alpha / r``, folded into ``B``). One UNet call then denoises
samples of many models at once; classifier-free guidance doubles the batch and
both halves use the sample's own weights.

Delayed edit injection (weights2weights): with ``edited`` models and
``inject_t=T``, each sample uses its original model while the scheduler
timestep ``t > T`` and its edited model for ``t <= T``. ``T >=
num_train_timesteps - 1`` therefore renders the edited model throughout and
``T < 0`` the original one.

Every sample draws its initial noise (and any scheduler noise) from its own
``torch.Generator`` seeded with the sample's seed, exactly as
``StableDiffusionPipeline(generator=torch.Generator().manual_seed(seed))``
does for one image, so a model's image does not depend on which other models
share its batch.

torch and diffusers are imported when a function needs them; importing this
module is cheap.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.errors import OUTPUT_EXISTS, FormatError, LayoutError, W2WError

__all__ = [
    "DTYPES",
    "LoraPatch",
    "RenderResult",
    "Renderer",
    "load_pipeline",
    "make_grid",
    "per_sample_lora",
    "render",
    "resolve_device",
    "stack_adapters",
]

#: Accepted spellings of the compute dtype.
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}

#: Pipeline components whose layers the renderer can patch.
SUPPORTED_COMPONENTS = ("unet", "text_encoder")

ModelLike = Adapter | str | os.PathLike[str] | None


# --------------------------------------------------------------------------- devices


def resolve_device(device: str | None = "auto") -> str:
    """``"auto"``/``None`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = str(device)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise W2WError(
            f"'{dev}' asked for but torch sees no CUDA GPU",
            param="device",
            hint='use `device="cpu"`',
        )
    return dev


def _torch_device(device: str) -> Any:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _torch_dtype(dtype: str | Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPES.get(str(dtype).lower())
    if name is None:
        raise W2WError(
            f"unknown dtype '{dtype}'", param="dtype", hint="use float32, float16 or bfloat16"
        )
    return getattr(torch, name)


# --------------------------------------------------------------------------- pipelines


def load_pipeline(
    spec: str | os.PathLike[str] | Any,
    *,
    device: str | None = "auto",
    dtype: str | Any = "float32",
    allow_download: bool = False,
) -> Any:
    """Open a Stable Diffusion pipeline and move it to ``device``/``dtype``.

    Parameters
    ----------
    spec : str, os.PathLike or diffusers.StableDiffusionPipeline
        A folder written by ``save_pretrained`` (``model_index.json`` inside),
        a pipeline object (moved in place), or, only with
        ``allow_download=True``, a hub id.
    device : str, optional
        ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"``...
    dtype : str or torch.dtype
        ``float32``, ``float16`` or ``bfloat16``.
    allow_download : bool
        Let a string that is not an existing folder be fetched from the hub.

    Returns
    -------
    diffusers.StableDiffusionPipeline

    Raises
    ------
    FormatError
        The folder is missing or not a readable diffusers pipeline.
    """
    torch_dtype = _torch_dtype(dtype)
    dev = resolve_device(device)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        with _quiet():
            from diffusers import StableDiffusionPipeline

        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise FormatError(
                    "not a diffusers pipeline folder (model_index.json missing)", path=path
                )
            kwargs: dict[str, Any] = {"local_files_only": True}
        elif path.exists():
            raise FormatError("a pipeline must be a folder, not a file", path=path)
        elif allow_download and str(spec).count("/") == 1 and not str(spec).startswith((".", "/")):
            kwargs = {}
        else:
            raise FormatError("pipeline folder not found", path=path)
        try:
            with _quiet():
                pipe = StableDiffusionPipeline.from_pretrained(
                    str(spec),
                    torch_dtype=torch_dtype,
                    safety_checker=None,
                    requires_safety_checker=False,
                    **kwargs,
                )
        except W2WError:
            raise
        except Exception as exc:  # diffusers raises many types for bad folders
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FormatError(f"cannot load the pipeline: {first}", path=path) from exc
    else:
        pipe = spec
    _check_pipeline(pipe)
    if pipe.unet.device != _torch_device(dev) or pipe.unet.dtype != torch_dtype:
        pipe.to(dev, torch_dtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence diffusers/transformers progress bars, info lines and FutureWarnings."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_bar, t_bar = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)
        if d_bar:
            dlog.enable_progress_bar()
        if t_bar:
            tlog.enable_progress_bar()


def _check_pipeline(pipe: Any) -> None:
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, comp, None) is None:
            raise W2WError(
                f"the pipeline has no {comp}; the renderer needs a Stable Diffusion 1.x/2.x "
                f"pipeline ({type(pipe).__name__} given)"
            )
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise W2WError(
            f"{type(pipe).__name__} has two text encoders (SDXL); the renderer supports "
            "Stable Diffusion 1.x/2.x pipelines"
        )


def _resolve_module(pipe: Any, path: str) -> Any | None:
    """The torch module a canonical module path names, or ``None``."""
    component, _, rest = path.partition(".")
    model = getattr(pipe, component, None)
    if model is None or not rest:
        return None
    if rest.startswith("text_model.") and not hasattr(model, "text_model"):
        rest = rest[len("text_model.") :]
    try:
        return model.get_submodule(rest)
    except AttributeError:
        return None


# --------------------------------------------------------------------------- adapters


def _name_of(model: ModelLike, i: int) -> str:
    if model is None:
        return "base"
    if isinstance(model, Adapter):
        if model.metadata.get("name"):
            return str(model.metadata["name"])
        return Path(model.source).stem if model.source else f"model {i}"
    return Path(model).stem


def _as_adapter(model: ModelLike, allow_pickle: bool = False) -> Adapter | None:
    if model is None or isinstance(model, Adapter):
        return model
    from w2wkit.formats.registry import read_adapter

    return read_adapter(model, allow_pickle=allow_pickle)


@dataclass
class StackedLayer:
    """The factors of one module for ``M`` models, scale folded into ``up``.

    Attributes
    ----------
    down : numpy.ndarray
        float32, ``(M, r, in)`` or ``(M, r, in, kh, kw)``; zero rows pad
        models of smaller rank (an exact no-op).
    up : numpy.ndarray
        float32, ``(M, out, r)`` holding ``scale_m * B_m``.
    """

    down: np.ndarray
    up: np.ndarray


def _describe(adapter: Adapter | None, i: int) -> str:
    if adapter is None:
        return "base"
    return adapter.source or f"adapter #{i}"


def stack_adapters(adapters: Sequence[Adapter | None]) -> dict[str, StackedLayer]:
    """Stack the factors of models that target the same modules.

    Parameters
    ----------
    adapters : sequence of Adapter or None
        ``None`` is the base model (zero update). Every adapter must consist
        of :class:`~w2wkit.adapter.LoraLayer` and target the same modules with
        the same factor shapes up to the rank; smaller ranks are zero-padded.

    Returns
    -------
    dict of str to StackedLayer
        In the module order of the first adapter.

    Raises
    ------
    LayoutError
        Non-LoRA layers, different module sets (naming the modules), or
        factor shapes that differ beyond the rank.
    """
    real = [(i, a) for i, a in enumerate(adapters) if a is not None]
    if not real:
        return {}
    i0, first = real[0]
    modules = list(first.layers)
    ref = set(modules)
    for i, a in real:
        for module, layer in a.items():
            if not isinstance(layer, LoraLayer):
                raise LayoutError(
                    f"layer is a {getattr(layer, 'kind', 'delta')} delta, not a LoRA; the renderer "
                    "needs factorised layers",
                    path=a.source,
                    key=module,
                )
        mods = set(a.layers)
        if mods != ref:
            missing = [m for m in modules if m not in mods]
            extra = [m for m in a.layers if m not in ref]
            parts = []
            if missing:
                parts.append(
                    f"lacks {len(missing)} module(s) of {_describe(first, i0)} ({missing[0]}...)"
                )
            if extra:
                parts.append(f"has {len(extra)} module(s) it does not ({extra[0]}...)")
            raise LayoutError(
                "adapters target different modules: " + "; ".join(parts), path=_describe(a, i)
            )
    out: dict[str, StackedLayer] = {}
    n = len(adapters)
    for module in modules:
        layers = [None if a is None else a.layers[module] for a in adapters]
        f0 = first.layers[module]
        assert isinstance(f0, LoraLayer)
        in_shape, out_f = f0.in_shape, f0.out_features
        for i, layer in enumerate(layers):
            if layer is None:
                continue
            assert isinstance(layer, LoraLayer)
            if layer.in_shape != in_shape or layer.out_features != out_f:
                raise LayoutError(
                    f"delta shape {layer.delta_shape} differs from {f0.delta_shape} of "
                    f"{_describe(first, i0)}",
                    path=_describe(adapters[i], i),
                    key=module,
                )
        r = max(layer.rank for layer in layers if layer is not None)  # type: ignore[union-attr]
        down = np.zeros((n, r, *in_shape), np.float32)
        up = np.zeros((n, out_f, r), np.float32)
        for i, layer in enumerate(layers):
            if layer is None:
                continue
            assert isinstance(layer, LoraLayer)
            k = layer.rank
            down[i, :k] = layer.down
            up[i, :, :k] = layer.up.reshape(out_f, k).astype(np.float64) * layer.scale
        out[module] = StackedLayer(down=down, up=up)
    return out


def _require_modules(pipe: Any, modules: Sequence[str], whose: str, hint: str) -> None:
    """One :class:`LayoutError` naming (three of) the ``modules`` that ``pipe`` lacks.

    ``whose`` names the modules' owner in the message (``"the space's"``).
    """
    missing = [m for m in modules if _resolve_module(pipe, m) is None]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise LayoutError(
            f"{len(missing)} of {whose} {len(modules)} modules are not in the pipeline: "
            + ", ".join(missing[:3])
            + more,
            hint=hint,
        )


def _check_against_pipeline(pipe: Any, stacked: Mapping[str, StackedLayer]) -> None:
    import torch

    bad_comp = sorted({m.split(".", 1)[0] for m in stacked} - set(SUPPORTED_COMPONENTS))
    if bad_comp:
        raise LayoutError(
            f"adapters target component(s) {', '.join(bad_comp)}; the renderer patches "
            f"{' and '.join(SUPPORTED_COMPONENTS)} only"
        )
    _require_modules(
        pipe, list(stacked), "the adapters'", "the adapters were made for another base model"
    )
    for module, st in stacked.items():
        mod = _resolve_module(pipe, module)
        if isinstance(mod, torch.nn.Linear):
            want = (mod.out_features, mod.in_features)
            got = (st.up.shape[1], *st.down.shape[2:])
            if st.down.ndim != 3 or tuple(got) != want:
                raise LayoutError(
                    f"delta shape {tuple(got)} does not fit the Linear weight {want}", key=module
                )
        elif isinstance(mod, torch.nn.Conv2d):
            want = tuple(mod.weight.shape)
            got = (st.up.shape[1], *st.down.shape[2:])
            if st.down.ndim == 3 and want[2:] == (1, 1):
                want = want[:2]  # linear-style factors on a 1x1 conv
            if tuple(got) != want:
                raise LayoutError(
                    f"delta shape {tuple(got)} does not fit the Conv2d weight {want}", key=module
                )
            if mod.groups != 1:
                raise LayoutError("grouped convolutions are not supported", key=module)
        else:
            raise LayoutError(
                f"module is a {type(mod).__name__}; the renderer patches Linear and Conv2d layers",
                key=module,
            )


# --------------------------------------------------------------------------- patched layers


class _Selector:
    """Which bank row each batch element uses (one per pipeline component)."""

    def __init__(self) -> None:
        self.index: Any = None  # torch.LongTensor (batch,) or None (base model)


def _make_wrapper(base: Any, down: Any, up: Any, selector: _Selector) -> Any:
    """Build the per-sample LoRA wrapper module for ``base`` (Linear or Conv2d)."""
    import torch
    import torch.nn.functional as F

    class BatchedLora(torch.nn.Module):
        """``base(x) + per-sample low-rank update``; see :mod:`w2wkit.render`."""

        def __init__(self) -> None:
            super().__init__()
            self.base_layer = base
            self.register_buffer("lora_down", down, persistent=False)  # (M, r, in[, kh, kw])
            self.register_buffer("lora_up", up, persistent=False)  # (M, out, r)
            self.selector = selector
            self.conv = isinstance(base, torch.nn.Conv2d)

        def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
            y = self.base_layer(x, *args, **kwargs)
            idx = self.selector.index
            if idx is None:
                return y
            n = x.shape[0]
            if idx.shape[0] != n:
                raise RuntimeError(
                    f"per-sample LoRA: batch of {n} but {idx.shape[0]} model indices"
                )
            a = self.lora_down.index_select(0, idx)
            b = self.lora_up.index_select(0, idx)
            if not self.conv:
                h = torch.bmm(x.reshape(n, -1, x.shape[-1]), a.transpose(1, 2))  # (n, L, r)
                return y + torch.bmm(h, b.transpose(1, 2)).reshape(y.shape)
            r = a.shape[1]
            if a.ndim == 3:  # linear-style factors on a 1x1 conv
                a = a[..., None, None]
            c, hgt, wid = x.shape[1:]
            h = F.conv2d(
                x.reshape(1, n * c, hgt, wid),
                a.reshape(n * r, *a.shape[2:]),
                stride=base.stride,
                padding=base.padding,
                dilation=base.dilation,
                groups=n,
            )  # (1, n*r, H', W')
            h = h.reshape(n, r, -1)
            return y + torch.bmm(b, h).reshape(y.shape)

    return BatchedLora()


class LoraPatch:
    """Handle on the per-sample LoRA wrappers installed by :func:`per_sample_lora`.

    Attributes
    ----------
    selectors : dict of str to object
        Per component (``"unet"``, ``"text_encoder"``): ``.index``, a
        ``torch.LongTensor`` of shape ``(batch,)`` naming the bank row of each
        batch element, or ``None`` for the bare base model.
    wrappers : dict of str to torch.nn.Module
        ``module path -> wrapper``; its ``lora_down`` is ``(M, r, in[, kh,
        kw])`` and ``lora_up`` ``(M, out, r)`` with the scale folded in.
    """

    def __init__(self) -> None:
        self.selectors: dict[str, _Selector] = {c: _Selector() for c in SUPPORTED_COMPONENTS}
        self.wrappers: dict[str, Any] = {}

    def set_index(self, component: str, index: Any) -> None:
        """Route batch element ``b`` of ``component`` to bank row ``index[b]``."""
        self.selectors[component].index = index

    def set_factors(self, module: str, down: Any, up: Any) -> None:
        """Replace a module's bank (tensors may require grad: inversion).

        Parameters
        ----------
        module : str
        down : torch.Tensor
            ``(M, r, in)`` (or ``(M, r, in, kh, kw)`` for a conv).
        up : torch.Tensor
            ``(M, out, r)``, LoRA scale included.
        """
        w = self.wrappers[module]
        w.lora_down = down
        w.lora_up = up


@contextlib.contextmanager
def per_sample_lora(
    pipe: Any, stacked: Mapping[str, StackedLayer], device: str, dtype: Any
) -> Iterator[LoraPatch]:
    """Swap the targeted modules for per-sample LoRA wrappers; restore them on exit.

    Parameters
    ----------
    pipe : diffusers.StableDiffusionPipeline
    stacked : mapping of str to StackedLayer
        Initial banks (see :func:`stack_adapters`); check them first with
        :meth:`Renderer.check` or ``_check_against_pipeline``.
    device : str
    dtype : torch.dtype

    Yields
    ------
    LoraPatch
        Indices start as ``None`` (base model) for every component.
    """
    import torch

    patch = LoraPatch()
    swapped: list[tuple[Any, str, Any]] = []
    try:
        for module, st in stacked.items():
            base = _resolve_module(pipe, module)
            comp, _, rest = module.partition(".")
            parent_path, _, attr = module.rpartition(".")
            parent = _resolve_module(pipe, parent_path) if "." in rest else getattr(pipe, comp)
            down = torch.from_numpy(st.down).to(device=device, dtype=dtype)
            up = torch.from_numpy(st.up).to(device=device, dtype=dtype)
            wrapper = _make_wrapper(base, down, up, patch.selectors[comp])
            setattr(parent, attr, wrapper)
            swapped.append((parent, attr, base))
            patch.wrappers[module] = wrapper
        yield patch
    finally:
        for parent, attr, base in reversed(swapped):
            setattr(parent, attr, base)


# --------------------------------------------------------------------------- results


@dataclass
class RenderResult:
    """Images of ``models x prompts x seeds``.

    Attributes
    ----------
    images : numpy.ndarray
        float32 in ``[0, 1]``, shape ``(n_models, n_prompts, n_seeds, H, W, 3)``.
    names : list of str
        Row label of each model.
    prompts : list of str
    seeds : list of int
    info : dict
        Settings used (steps, guidance, device, dtype, inject_t...).
    """

    images: np.ndarray
    names: list[str]
    prompts: list[str]
    seeds: list[int]
    info: dict[str, Any] = field(default_factory=dict)

    def grid(self, cell: int | None = None) -> Any:
        """The labelled grid as a ``PIL.Image`` (rows = models, columns = prompt x seed)."""
        cols = [f"{p}\nseed {s}" for p in self.prompts for s in self.seeds]
        n_m, n_p, n_s = self.images.shape[:3]
        flat = self.images.reshape(n_m, n_p * n_s, *self.images.shape[3:])
        return make_grid(flat, self.names, cols, cell=cell)

    def save_grid(
        self, path: str | os.PathLike[str], *, overwrite: bool = False, cell: int | None = None
    ) -> Path:
        """Write :meth:`grid` as PNG atomically; return the path."""
        from w2wkit.stio import atomic_path

        out = Path(path)
        if out.exists() and not overwrite:
            raise FormatError(OUTPUT_EXISTS, path=out)
        img = self.grid(cell=cell)
        with atomic_path(out, overwrite=overwrite, suffix=".png") as tmp:
            img.save(tmp, format="PNG")
        return out


def make_grid(
    images: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    cell: int | None = None,
) -> Any:
    """Lay images out in a labelled grid.

    Parameters
    ----------
    images : numpy.ndarray
        ``(rows, cols, H, W, 3)`` floats in ``[0, 1]`` (or uint8).
    row_labels, col_labels : sequence of str
        One label per row / column.
    cell : int, optional
        Side of a cell in pixels; images are resized (nearest for
        upscaling) so that the longer side equals it. Default: the image size,
        but at least 96 pixels so labels stay readable.

    Returns
    -------
    PIL.Image.Image
    """
    from PIL import Image, ImageDraw, ImageFont

    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    rows, cols, h, w = arr.shape[:4]
    side = cell or max(96, h, w)
    ch, cw = (side, max(1, round(w * side / h))) if h >= w else (max(1, round(h * side / w)), side)
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(s: str) -> tuple[int, int]:
        x0, y0, x1, y1 = probe.textbbox((0, 0), s, font=font)
        return x1 - x0, y1 - y0

    def fit(s: str, width: int) -> str:
        if text_size(s)[0] <= width:
            return s
        while s and text_size(s + "...")[0] > width:
            s = s[:-1]
        return s + "..."

    line_h = max(text_size("Ag|")[1], 10) + 4
    left = min(220, max([text_size(s)[0] for s in row_labels] + [40]) + 12)
    n_lines = max([len(str(s).split("\n")) for s in col_labels] + [1])
    top = n_lines * line_h + 4
    pad = 2
    grid = Image.new("RGB", (left + cols * (cw + pad), top + rows * (ch + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        for k, part in enumerate(str(label).split("\n")):
            xy = (left + j * (cw + pad) + 2, 3 + k * line_h)
            draw.text(xy, fit(part, cw - 4), fill="black", font=font)
    for i, label in enumerate(row_labels):
        y = top + i * (ch + pad)
        draw.text((4, y + ch // 2 - line_h // 2 + 3), fit(label, left - 8), fill="black", font=font)
        for j in range(cols):
            tile = Image.fromarray(arr[i, j])
            if (tile.height, tile.width) != (ch, cw):
                up = ch >= tile.height
                tile = tile.resize((cw, ch), Image.NEAREST if up else Image.LANCZOS)
            grid.paste(tile, (left + j * (cw + pad), y))
    return grid


# --------------------------------------------------------------------------- renderer


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


class Renderer:
    """Render many LoRA models of one Stable Diffusion pipeline in shared batches.

    Parameters
    ----------
    pipeline : str, os.PathLike or diffusers.StableDiffusionPipeline
        A pipeline folder or object (see :func:`load_pipeline`; an object is
        moved to ``device``/``dtype`` in place).
    device : str, optional
        ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"``...
    dtype : str or torch.dtype
        Compute dtype: ``float32``, ``float16`` or ``bfloat16``.
    allow_download : bool
        Allow a hub id for ``pipeline`` (user-triggered paths only).

    Examples
    --------
    >>> r = Renderer("./pipe")                                    # doctest: +SKIP
    >>> res = r.render(["a.safetensors", "b.safetensors"], ["a photo of sks person"],
    ...                seeds=[0, 1], steps=25)                    # doctest: +SKIP
    >>> res.save_grid("grid.png")                                 # doctest: +SKIP
    """

    def __init__(
        self,
        pipeline: str | os.PathLike[str] | Any,
        *,
        device: str | None = "auto",
        dtype: str | Any = "float32",
        allow_download: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = _torch_dtype(dtype)
        self.pipe = load_pipeline(
            pipeline, device=self.device, dtype=self.dtype, allow_download=allow_download
        )

    # ---------------------------------------------------------------- helpers
    def _encode(self, prompts: list[str], negative: list[str], cfg: bool) -> tuple[Any, Any]:
        pos, neg = self.pipe.encode_prompt(prompts, self.device, 1, cfg, negative if cfg else None)
        return pos, neg

    def prepare(
        self,
        models: Sequence[ModelLike] | np.ndarray,
        *,
        edited: Sequence[ModelLike] | np.ndarray | None = None,
        space: Any = None,
        allow_pickle: bool = False,
    ) -> tuple[list[Adapter | None], list[Adapter | None] | None, list[str]]:
        """Read files / unproject coefficients into adapters and check the layout.

        Parameters
        ----------
        models : sequence of Adapter, path or None, or numpy.ndarray
            ``None`` renders the base model. A ``(n, k)`` array is a batch of
            coefficient vectors of ``space`` (``space.inverse_transform``).
        edited : same as ``models``, optional
            The edited model of each model (delayed injection).
        space : WeightSpace, optional
            Needed when coefficients are given.

        Returns
        -------
        (list, list or None, list of str)
            Original adapters, edited adapters, row names.
        """

        def convert(items: Any, what: str) -> tuple[list[Adapter | None], list[str]]:
            if isinstance(items, np.ndarray):
                if space is None:
                    raise W2WError(f"{what} given as coefficients but no space", key=what)
                coef = np.atleast_2d(items)
                ads = list(space.inverse_transform(coef))
                return ads, [f"point {i}" for i in range(len(ads))]
            items = list(items)
            return [_as_adapter(m, allow_pickle) for m in items], [
                _name_of(m, i) for i, m in enumerate(items)
            ]

        originals, names = convert(models, "models")
        if not originals:
            raise W2WError("no models to render", key="models")
        edits = None
        if edited is not None:
            edits, _ = convert(edited, "edited")
            if len(edits) != len(originals):
                raise W2WError(
                    f"{len(edits)} edited models for {len(originals)} models; give one each",
                    param="edited",
                )
        return originals, edits, names

    def check(self, models: Sequence[Adapter | None]) -> dict[str, StackedLayer]:
        """Stack ``models`` and check they fit the pipeline (no rendering).

        Raises
        ------
        LayoutError
            Different module sets, non-LoRA layers, modules missing from the
            pipeline (named), shapes that do not fit, unsupported components.
        """
        stacked = stack_adapters(models)
        _check_against_pipeline(self.pipe, stacked)
        return stacked

    # ---------------------------------------------------------------- main entry
    def render(
        self,
        models: Sequence[ModelLike] | np.ndarray,
        prompts: str | Sequence[str] = "a photo of sks person",
        seeds: int | Sequence[int] = (0,),
        *,
        steps: int = 25,
        guidance: float = 7.5,
        negative_prompt: str = "",
        height: int | None = None,
        width: int | None = None,
        edited: Sequence[ModelLike] | np.ndarray | None = None,
        inject_t: float | None = None,
        names: Sequence[str] | None = None,
        space: Any = None,
        batch_size: int = 16,
        eta: float = 0.0,
        allow_pickle: bool = False,
        progress: Callable[[int, int], None] | None = None,
    ) -> RenderResult:
        """Render every model for every prompt and seed.

        Parameters
        ----------
        models : sequence of Adapter, path or None, or numpy.ndarray
            The models (rows). ``None`` is the base model; a ``(n, k)`` array is
            coefficients of ``space``. Adapters must target the same modules
            (ranks may differ: smaller ones are zero-padded, an exact no-op).
        prompts : str or sequence of str
        seeds : int or sequence of int
            One ``torch.Generator().manual_seed(seed)`` per image.
        steps : int
            Scheduler steps.
        guidance : float
            Classifier-free guidance scale (``<= 1`` disables it).
        negative_prompt : str
        height, width : int, optional
            Image size; default the UNet's sample size times the VAE factor.
        edited : same as ``models``, optional
            Edited model per model, used for timesteps ``t <= inject_t``.
        inject_t : float, optional
            Delayed-injection threshold in scheduler timesteps (0..999).
            Required with ``edited``.
        names : sequence of str, optional
            Row labels (default: file stems).
        space : WeightSpace, optional
            To turn coefficient arrays into adapters.
        batch_size : int
            Images per UNet call (doubled by classifier-free guidance).
        eta : float
            DDIM eta (as the diffusers pipeline).
        allow_pickle : bool
            Let model paths be ``.pt``/``.bin`` pickles.
        progress : callable, optional
            ``progress(done_images, total_images)`` after each batch.

        Returns
        -------
        RenderResult
            ``images`` of shape ``(n_models, n_prompts, n_seeds, H, W, 3)``.
        """
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        seeds = [int(seeds)] if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
        if not prompts:
            raise W2WError("give at least one prompt", param="prompts")
        if not seeds:
            raise W2WError("give at least one seed", param="seeds")
        if steps < 1:
            raise W2WError(f"must be >= 1, got {steps}", param="steps")
        if batch_size < 1:
            raise W2WError(f"must be >= 1, got {batch_size}", param="batch_size")
        if (edited is None) != (inject_t is None):
            raise W2WError(
                "delayed injection needs both `edited` models and `inject_t`", param="inject_t"
            )
        originals, edits, row_names = self.prepare(
            models, edited=edited, space=space, allow_pickle=allow_pickle
        )
        if names is not None:
            row_names = [str(n) for n in names]
            if len(row_names) != len(originals):
                raise W2WError(f"{len(row_names)} names for {len(originals)} models", param="names")
        n_models = len(originals)
        bank_models = originals + (edits or [])
        stacked = self.check(bank_models)
        te_patched = any(m.startswith("text_encoder.") for m in stacked)

        pipe = self.pipe
        unet = pipe.unet
        vsf = getattr(pipe, "vae_scale_factor", 8)
        height = int(height or unet.config.sample_size * vsf)
        width = int(width or unet.config.sample_size * vsf)
        if height % vsf or width % vsf:
            raise W2WError(f"image size {height}x{width} must be a multiple of {vsf}", param="size")
        cfg = guidance > 1.0 and unet.config.time_cond_proj_dim is None
        lat_shape = (unet.config.in_channels, height // vsf, width // vsf)

        # one item per image: (model, prompt, seed), model-major
        items = [
            (m, p, s)
            for m in range(n_models)
            for p in range(len(prompts))
            for s in range(len(seeds))
        ]
        total = len(items)
        out = np.zeros((n_models, len(prompts), len(seeds), height, width, 3), np.float32)

        import inspect

        sched_cls = type(pipe.scheduler)
        step_params = set(inspect.signature(pipe.scheduler.step).parameters)

        patch_cm = per_sample_lora(pipe, stacked, self.device, self.dtype)
        with torch.inference_mode(), patch_cm as patch:
            sel = patch.selectors
            # prompt embeddings shared by all models when the text encoder is not patched
            shared = None
            if not te_patched:
                sel["text_encoder"].index = None
                shared = self._encode(prompts, [negative_prompt] * len(prompts), cfg)
            done = 0
            for chunk in _chunks(total, batch_size):
                batch = [items[i] for i in chunk]
                mi = torch.tensor([b[0] for b in batch], device=self.device)
                orig_idx = mi
                edit_idx = mi + n_models if edits is not None else mi

                def embeds(idx: Any, batch: list[tuple[int, int, int]] = batch) -> Any:
                    if shared is not None:
                        pi = torch.tensor([b[1] for b in batch], device=self.device)
                        pos = shared[0].index_select(0, pi)
                        neg = shared[1].index_select(0, pi) if cfg else None
                    else:
                        sel["text_encoder"].index = idx
                        pos, neg = self._encode(
                            [prompts[b[1]] for b in batch], [negative_prompt] * len(batch), cfg
                        )
                        sel["text_encoder"].index = None
                    return torch.cat([neg, pos]) if cfg else pos

                emb_orig = embeds(orig_idx)
                emb_edit = embeds(edit_idx) if (edits is not None and te_patched) else emb_orig

                gens = [torch.Generator(device="cpu").manual_seed(seeds[b[2]]) for b in batch]
                # a copy, not from_config: from_config re-defaults keys the pipeline fixed
                # after construction (e.g. steps_offset), changing the timesteps
                scheduler = copy.deepcopy(pipe.scheduler)
                scheduler.set_timesteps(steps, device=self.device)
                latents = randn_tensor(
                    (len(batch), *lat_shape),
                    generator=gens,
                    device=torch.device(self.device),
                    dtype=self.dtype,
                )
                latents = latents * scheduler.init_noise_sigma
                extra: dict[str, Any] = {}
                if "eta" in step_params:
                    extra["eta"] = eta
                if "generator" in step_params:
                    extra["generator"] = gens
                for t in scheduler.timesteps:
                    use_edit = edits is not None and float(t) <= float(inject_t)  # type: ignore[arg-type]
                    idx = edit_idx if use_edit else orig_idx
                    emb = emb_edit if use_edit else emb_orig
                    sel["unet"].index = torch.cat([idx, idx]) if cfg else idx
                    inp = torch.cat([latents] * 2) if cfg else latents
                    inp = scheduler.scale_model_input(inp, t)
                    noise = unet(inp, t, encoder_hidden_states=emb, return_dict=False)[0]
                    if cfg:
                        unc, txt = noise.chunk(2)
                        noise = unc + guidance * (txt - unc)
                    latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
                sel["unet"].index = None
                img = pipe.vae.decode(
                    latents / pipe.vae.config.scaling_factor, return_dict=False, generator=gens
                )[0]
                img = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
                for k, (m, p, s) in enumerate(batch):
                    out[m, p, s] = img[k]
                done += len(batch)
                if progress is not None:
                    progress(done, total)

        info = {
            "steps": steps,
            "guidance": guidance,
            "negative_prompt": negative_prompt,
            "height": height,
            "width": width,
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "scheduler": sched_cls.__name__,
            "inject_t": inject_t,
            "batch_size": batch_size,
            "modules": len(stacked),
        }
        return RenderResult(out, row_names, prompts, seeds, info)


def render(
    pipeline: str | os.PathLike[str] | Any,
    models: Sequence[ModelLike] | np.ndarray,
    prompts: str | Sequence[str] = "a photo of sks person",
    seeds: int | Sequence[int] = (0,),
    *,
    device: str | None = "auto",
    dtype: str | Any = "float32",
    **kwargs: Any,
) -> RenderResult:
    """``Renderer(pipeline, device=, dtype=).render(models, prompts, seeds, **kwargs)``."""
    return Renderer(pipeline, device=device, dtype=dtype).render(models, prompts, seeds, **kwargs)
