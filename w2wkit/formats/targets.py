"""Loader-aware writing: which format each LoRA loader reads completely, and what it drops.

A *target* names the program that will load a written file:

==================  ============  ==================================================
target              format        what that loader reads (see docs/formats.md)
==================  ============  ==================================================
``comfyui``         ``kohya``     every UNet and text-encoder module, ``.alpha``
``a1111``           ``kohya``     every module but SDXL's ``text_projection``
``kohya-scripts``   ``kohya``     modules inside transformer/ResNet/sampler blocks and
                                  CLIP attention/MLP only
``diffusers``       ``diffusers`` everything, alphas from ``lora_adapter_metadata``
``peft``            ``peft``      everything (one ``save_pretrained`` folder per component)
==================  ============  ==================================================

:func:`loader_gaps` lists what a named loader would not read (or would read wrongly)
from an adapter written in a given format: the facts are those of
``docs/formats.md`` ("Compatibility matrix"), which the tests check against
re-implementations of each loader's key rules and against diffusers and PEFT
themselves. :func:`fold_alphas` gives every layer one alpha, moving the
difference into the up factor, so that diffusers' kohya converter (which
mis-scales modules whose alpha differs from the most common one) applies the
same deltas as every other loader.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.errors import FormatError

__all__ = [
    "LOADERS",
    "TARGETS",
    "Gap",
    "fold_alphas",
    "loader_gaps",
    "mixed_alphas",
    "target_format",
]

#: target -> the format that loader reads completely.
TARGETS: dict[str, str] = {
    "comfyui": "kohya",
    "a1111": "kohya",
    "kohya-scripts": "kohya",
    "diffusers": "diffusers",
    "peft": "peft",
}

#: target -> the loader's name in messages.
LOADERS: dict[str, str] = {
    "comfyui": "ComfyUI (LoraLoader)",
    "a1111": "A1111 stable-diffusion-webui (built-in Lora extension)",
    "kohya-scripts": "kohya sd-scripts (networks/lora.py)",
    "diffusers": "diffusers (load_lora_weights)",
    "peft": "PEFT (PeftModel.from_pretrained)",
}

# UNet attention projections ComfyUI maps only under the attention-processor
# spelling (``attn1.processor.to_q``) for diffusers-format files.
_ATTN_PROJ = re.compile(r"^unet\..*\.attn\d\.(to_q|to_k|to_v|to_out\.0)$")
# Blocks whose Linear/Conv2d children sd-scripts' LoRANetwork wraps.
_SD_SCRIPTS_UNET = re.compile(r"\.(attentions|resnets|downsamplers|upsamplers)\.\d+\.")
_SD_SCRIPTS_UNET_SGM = re.compile(r"\.(transformer_blocks|proj_in|proj_out)")
_SD_SCRIPTS_TEXT = re.compile(r"\.(self_attn|mlp)\.")


@dataclass(frozen=True)
class Gap:
    """Modules a loader does not read, or reads with a wrong scale.

    Attributes
    ----------
    target : str
        A key of :data:`TARGETS`.
    modules : tuple of str
        Canonical module paths concerned.
    reason : str
        Why, in a few words.
    """

    target: str
    modules: tuple[str, ...]
    reason: str

    def message(self, fmt: str) -> str:
        """One line naming the loader, how many modules, a few of them, and why."""
        shown = ", ".join(self.modules[:3]) + (
            f" and {len(self.modules) - 3} more" if len(self.modules) > 3 else ""
        )
        return (
            f"{LOADERS[self.target]} reads this {fmt} file only in part: "
            f"{len(self.modules)} modules {self.reason} ({shown})"
        )


def target_format(target: str) -> str:
    """The format :data:`TARGETS` gives ``target``.

    Raises
    ------
    FormatError
        For an unknown target (``param="target"``).
    """
    fmt = TARGETS.get(target)
    if fmt is None:
        raise FormatError(f"unknown loader {target!r}; known: {', '.join(TARGETS)}", param="target")
    return fmt


def _stored_alpha(layer: LoraLayer) -> float:
    """The alpha a kohya file stores for ``layer`` (rsLoRA as ``alpha * sqrt(r)``)."""
    return float(layer.alpha) * (math.sqrt(layer.rank) if layer.rslora else 1.0)


def mixed_alphas(adapter: Adapter) -> tuple[float, list[str]] | None:
    """The most common stored alpha and the modules that differ from it (None if uniform)."""
    layers = {m: la for m, la in adapter.items() if isinstance(la, LoraLayer)}
    if not layers:
        return None
    alphas = {m: _stored_alpha(la) for m, la in layers.items()}
    common = Counter(alphas.values()).most_common(1)[0][0]
    odd = [m for m, a in alphas.items() if a != common]
    return (common, odd) if odd else None


def fold_alphas(adapter: Adapter) -> tuple[Adapter, int]:
    """Give every layer the most common alpha, moving the rest into the up factor.

    ``alpha / r * B @ A`` is unchanged: a layer with alpha ``a`` becomes
    alpha ``a0`` with ``B' = B * a / a0`` (rsLoRA layers first become plain
    layers with alpha ``a * sqrt(r)``, as a kohya file stores them).

    Parameters
    ----------
    adapter : Adapter
        The adapter; not changed.

    Returns
    -------
    adapter : Adapter
        A new adapter (same metadata) whose layers share one alpha; ``adapter``
        itself when the alphas already agree.
    changed : int
        How many layers had their up factor rescaled.
    """
    mixed = mixed_alphas(adapter)
    if mixed is None:
        return adapter, 0
    common, odd = mixed
    if common == 0:
        raise FormatError("cannot fold alphas into a common alpha of 0")
    layers = dict(adapter.layers)
    for m in odd:
        la = layers[m]
        a = _stored_alpha(la)
        up = (la.up.astype(np.float64) * (a / common)).astype(np.float32)
        layers[m] = LoraLayer(down=la.down, up=up, alpha=common, rslora=False, dtype=la.dtype)
    out = Adapter(layers=layers, metadata=dict(adapter.metadata), source=adapter.source)
    out.format = adapter.format
    return out, len(odd)


def loader_gaps(adapter: Adapter, fmt: str, target: str) -> list[Gap]:
    """What ``target``'s loader would drop or mis-scale in ``adapter`` written as ``fmt``.

    Parameters
    ----------
    adapter : Adapter
        The adapter as it will be written (after any :func:`fold_alphas`).
    fmt : str
        ``"kohya"``, ``"diffusers"`` or ``"peft"``.
    target : str
        A key of :data:`TARGETS`.

    Returns
    -------
    list of Gap
        Empty when the loader reads the whole file with w2wkit's deltas.
    """
    target_format(target)
    mods = list(adapter.layers)
    everything = tuple(mods)
    gaps: list[Gap] = []

    def add(modules: list[str] | tuple[str, ...], reason: str) -> None:
        if modules:
            gaps.append(Gap(target, tuple(modules), reason))

    if target == "peft":
        if fmt != "peft":
            add(everything, "are not loaded (PEFT loads a save_pretrained folder, not a file)")
        return gaps
    if fmt == "peft":
        add(everything, "are not loaded (a PEFT folder's base_model.model. keys are not mapped)")
        return gaps
    if target == "diffusers":
        if fmt == "kohya":
            mixed = mixed_alphas(adapter)
            if mixed is not None:
                add(
                    [m for m in mixed[1] if _ATTN_PROJ.match(m)],
                    f"get a wrong scale (attention projections whose alpha differs from the "
                    f"most common one, {mixed[0]:g}: diffusers' kohya converter names their "
                    "alpha_pattern entries after the old attention processors, which match "
                    "no module)",
                )
            add(
                [m for m in mods if m.startswith("text_encoder") and ".self_attn." in m],
                "are not loaded (diffusers' kohya converter renames text-encoder attention "
                "projections to keys transformers >= 5 no longer has)",
            )
        return gaps
    if fmt == "diffusers":
        if target != "comfyui":
            add(everything, "are not loaded (only lora_unet_/lora_te keys are mapped)")
            return gaps
        add(
            [m for m in mods if _ATTN_PROJ.match(m)],
            "are dropped (to_q/to_k/to_v/to_out keys are mapped only in the "
            "attention-processor spelling)",
        )
        scaled = [
            m
            for m, la in adapter.items()
            if isinstance(la, LoraLayer) and (la.rslora or float(la.alpha) != la.rank)
        ]
        add(
            [m for m in mods if m.endswith(".text_projection")],
            "are not loaded (text_projection is mapped only under kohya names)",
        )
        add(scaled, "get scale 1 instead of alpha/r (lora_adapter_metadata is not read)")
        return gaps
    # kohya files
    if target == "a1111":
        add(
            [m for m in mods if m == "text_encoder_2.text_projection"],
            "are not loaded (OpenCLIP's text_projection is a parameter, not a layer)",
        )
    elif target == "kohya-scripts":
        outside = []
        for m in mods:
            comp, _, rest = m.partition(".")
            if comp == "unet":
                ok = bool(_SD_SCRIPTS_UNET.search(f".{rest}") or _SD_SCRIPTS_UNET_SGM.search(rest))
            else:
                ok = bool(_SD_SCRIPTS_TEXT.search(f".{rest}"))
            if not ok:
                outside.append(m)
        add(
            outside,
            "are dropped (LoRANetwork wraps only transformer, ResNet and sampler blocks "
            "and CLIP attention/MLP layers; it loads with strict=False)",
        )
    return gaps
