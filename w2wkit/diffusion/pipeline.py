"""Opening a Stable Diffusion pipeline: SD1.x/SD2.x or SDXL, dtype, device, CPU offload.

The pipeline class comes from the folder's ``model_index.json`` (``_class_name``,
as diffusers writes it): an SDXL pipeline (two text encoders, size/crop
conditioning) opens as ``StableDiffusionXLPipeline``, every other Stable
Diffusion folder as ``StableDiffusionPipeline``. The renderer
(:class:`~w2wkit.diffusion.sampler.Renderer`), inversion (:func:`w2wkit.invert.invert`)
and the DreamBooth loop open both kinds (``sdxl=True``); ``sdxl=False`` (the
default) is for code that works on SD1.x/SD2.x pipelines only and refuses an
SDXL pipeline in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from w2wkit.devices import resolve_device, torch_device, torch_dtype
from w2wkit.diffusion.quiet import quiet
from w2wkit.errors import FormatError, W2WError

__all__ = [
    "SUPPORTED_COMPONENTS",
    "check_pipeline",
    "load_pipeline",
    "pipeline_kind",
    "resolve_module",
]

#: Pipeline components whose layers the per-sample LoRA bank can patch.
SUPPORTED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def pipeline_kind(spec: str | os.PathLike[str] | Any) -> str:
    """``"sdxl"`` or ``"sd"`` for a pipeline folder (its ``model_index.json``) or object."""
    if isinstance(spec, (str, os.PathLike)):
        index = Path(spec) / "model_index.json"
        try:
            meta = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "sd"
        name = str(meta.get("_class_name", ""))
        return "sdxl" if "XL" in name or "text_encoder_2" in meta else "sd"
    return "sdxl" if getattr(spec, "text_encoder_2", None) is not None else "sd"


def check_pipeline(pipe: Any, sdxl: bool = False) -> None:
    """Refuse a pipeline that lacks a part the engine uses (or an SDXL one unless ``sdxl``).

    Raises
    ------
    W2WError
        Naming the missing component, or the SDXL pipeline.
    """
    comps = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    if sdxl and pipeline_kind(pipe) == "sdxl":
        comps += ("text_encoder_2", "tokenizer_2")
    for comp in comps:
        if getattr(pipe, comp, None) is None:
            raise W2WError(
                f"the pipeline has no {comp}; the engine needs a Stable Diffusion 1.x/2.x "
                f"or SDXL pipeline ({type(pipe).__name__} given)"
            )
    if not sdxl and pipeline_kind(pipe) == "sdxl":
        raise W2WError(
            f"{type(pipe).__name__} has two text encoders (SDXL); this works on "
            "Stable Diffusion 1.x/2.x pipelines only (open it with sdxl=True where SDXL is "
            "supported: rendering, inversion, training)"
        )


def load_pipeline(
    spec: str | os.PathLike[str] | Any,
    *,
    device: str | None = "auto",
    dtype: str | Any = "float32",
    allow_download: bool = False,
    sdxl: bool = False,
    offload: bool = False,
) -> Any:
    """Open a Stable Diffusion pipeline and move it to ``device``/``dtype``.

    Parameters
    ----------
    spec : str, os.PathLike or diffusers pipeline
        A folder written by ``save_pretrained`` (``model_index.json`` inside),
        a pipeline object (moved in place), or, only with
        ``allow_download=True``, a hub id.
    device : str, optional
        ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"``...
    dtype : str or torch.dtype
        ``float32``, ``float16`` or ``bfloat16``.
    allow_download : bool
        Let a string that is not an existing folder be fetched from the hub.
    sdxl : bool
        Accept an SDXL pipeline (opened as ``StableDiffusionXLPipeline``): the
        renderer, inversion and the DreamBooth loop do.
    offload : bool
        On a CUDA device, keep the models on the CPU and move each to the GPU
        while it runs (diffusers' ``enable_model_cpu_offload``); ignored on the CPU.

    Returns
    -------
    diffusers.StableDiffusionPipeline or diffusers.StableDiffusionXLPipeline
        Progress bar disabled.

    Raises
    ------
    FormatError
        The folder is missing or not a readable diffusers pipeline.
    W2WError
        A component is missing, or an SDXL pipeline without ``sdxl=True``.
    """
    tdtype = torch_dtype(dtype)
    dev = resolve_device(device)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
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
        kind = pipeline_kind(path) if path.is_dir() else "sd"
        if kind == "sdxl" and not sdxl:
            raise W2WError(
                "the pipeline is SDXL (two text encoders); this works on "
                "Stable Diffusion 1.x/2.x pipelines only (open it with sdxl=True where SDXL "
                "is supported: rendering, inversion, training)",
                path=path,
            )
        with quiet():
            import diffusers

            cls = (
                diffusers.StableDiffusionXLPipeline
                if kind == "sdxl"
                else diffusers.StableDiffusionPipeline
            )
        extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        try:
            with quiet():
                pipe = cls.from_pretrained(str(spec), torch_dtype=tdtype, **extra, **kwargs)
        except W2WError:
            raise
        except Exception as exc:  # diffusers raises many types for bad folders
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FormatError(f"cannot load the pipeline: {first}", path=path) from exc
    else:
        pipe = spec
    check_pipeline(pipe, sdxl=sdxl)
    if offload and dev.startswith("cuda") and hasattr(pipe, "enable_model_cpu_offload"):
        pipe.to("cpu", tdtype)
        pipe.enable_model_cpu_offload(device=dev)
    elif pipe.unet.device != torch_device(dev) or pipe.unet.dtype != tdtype:
        pipe.to(dev, tdtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_module(pipe: Any, path: str) -> Any | None:
    """The torch module a canonical module path (``unet.down_blocks...``) names, or ``None``."""
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
