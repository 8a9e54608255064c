"""kohya-ss/sd-scripts LoRA files (also what ComfyUI and A1111 load).

Keys are ``<kohya module name>.<suffix>`` where the module name is
``lora_unet_...``/``lora_te_...``/``lora_te1_...``/``lora_te2_...`` (see
:mod:`w2wkit.names`) and the suffix comes from :data:`SUFFIXES`:

========================  ==============================================
``lora_down.weight``      A, ``(r, in)`` or ``(r, in, kh, kw)`` (LoCon)
``lora_up.weight``        B, ``(out, r)`` or ``(out, r, 1, 1)``
``alpha``                 scalar; absent means ``alpha = r``
========================  ==============================================

SD1.x files use diffusers module names, SDXL files the sgm/LDM UNet
numbering; the writer picks the scheme from the adapter's modules
(:func:`w2wkit.names.guess_family`). Metadata (``ss_*``, ``modelspec.*`` and
anything else) is kept as is.
"""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer, degenerate_factors
from w2wkit.errors import FormatError
from w2wkit.formats._peftlike import text_encoder_by_width
from w2wkit.formats.base import Source, WriteOptions
from w2wkit.names import (
    guess_family,
    is_kohya_name,
    kohya_to_module,
    kohya_uses_sgm,
    module_to_kohya,
)
from w2wkit.stio import write_safetensors

__all__ = ["REFUSED_SUFFIXES", "SUFFIXES", "KohyaFormat", "group_kohya_keys", "kohya_module"]

#: kohya suffix -> role in a :class:`~w2wkit.adapter.LoraLayer`.
SUFFIXES: dict[str, str] = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
}

#: Suffixes recognised but refused, with the reason.
REFUSED_SUFFIXES: dict[str, str] = {
    "dora_scale": (
        "DoRA layer refused: DoRA rescales each weight column by a learned magnitude "
        "(dora_scale) after adding B@A, so it is not an additive delta and cannot be "
        "represented as a LoRA"
    ),
}

#: Suffixes of LyCORIS algorithms other than LoRA/LoCon (read by ``lycoris``).
LYCORIS_SUFFIX_PREFIXES = ("hada_", "lokr_")

#: Metadata key recording that a kohya file named its UNet modules the sgm way
#: (an SDXL file as kohya-ss writes it); written back so the family survives.
UNET_NAMES_KEY = "w2wkit.unet_names"


def group_kohya_keys(
    src: Source, known: dict[str, str], refused: dict[str, str]
) -> dict[str, dict[str, str]]:
    """Group a file's keys by kohya module name.

    Parameters
    ----------
    src : Source
        The parsed file.
    known : dict of str to str
        Accepted suffixes (suffix -> role).
    refused : dict of str to str
        Suffixes to refuse (suffix -> reason).

    Returns
    -------
    dict
        ``kohya module name -> {role: tensor key}`` in file order.

    Raises
    ------
    FormatError
        Naming the file and key, for a key that is not ``<kohya name>.<known
        suffix>`` or whose suffix is refused.
    """
    parse = _key_parser(tuple(known.items()))
    groups: dict[str, dict[str, str]] = {}
    for key in src.tensors:
        parsed = parse(key)
        if parsed is None:
            kname, _, suffix = key.partition(".")
            if suffix in refused and is_kohya_name(kname):
                raise FormatError(refused[suffix], path=src.path, key=key)
            raise FormatError(
                f"unknown key in a {'LyCORIS' if 'hada_w1_a' in known else 'kohya'} file "
                f"(expected <lora_unet_|lora_te_|lora_te1_|lora_te2_ name>."
                f"{'|'.join(sorted(known))})",
                path=src.path,
                key=key,
            )
        kname, role = parsed
        group = groups.get(kname)
        if group is None:
            groups[kname] = {role: key}
        else:
            group[role] = key
    return groups


@functools.cache
def _key_parser(known: tuple[tuple[str, str], ...]):
    table = dict(known)

    @functools.lru_cache(maxsize=262144)
    def parse(key: str) -> tuple[str, str] | None:
        kname, dot, suffix = key.partition(".")
        role = table.get(suffix)
        if role is None or not dot or not is_kohya_name(kname):
            return None
        return kname, role

    return parse


def kohya_module(kname: str, path: str) -> str:
    """:func:`w2wkit.names.kohya_to_module` with the file named in errors."""
    try:
        return kohya_to_module(kname)
    except FormatError as exc:
        raise FormatError(exc.message, path=path, key=kname) from None


def read_alpha(src: Source, key: str | None) -> float | None:
    """Value of a scalar ``alpha`` tensor (``None`` when ``key`` is ``None``)."""
    if key is None:
        return None
    arr = src.tensors[key]
    if arr.size != 1:
        raise FormatError(
            f"alpha must be a scalar, got shape {list(arr.shape)}", path=src.path, key=key
        )
    return float(arr.reshape(-1)[0])


def lora_layer(src: Source, kname: str, roles: dict[str, str]) -> LoraLayer:
    """Build one :class:`LoraLayer` from a group of kohya keys.

    Raises
    ------
    FormatError
        Naming file and key for a missing factor or mismatched shapes.
    """
    down_key, up_key = roles.get("down"), roles.get("up")
    if down_key is None or up_key is None:
        have = down_key or up_key or roles.get("alpha")
        missing = "lora_up.weight" if up_key is None else "lora_down.weight"
        raise FormatError(f"has no matching {kname}.{missing}", path=src.path, key=have)
    down, up = src.tensors[down_key], src.tensors[up_key]
    if (
        down.ndim not in (2, 4)
        or up.ndim != down.ndim
        or up.shape[1] != down.shape[0]
        or (up.ndim == 4 and up.shape[2:] != (1, 1))
    ):
        raise FormatError(
            f"up/down shape mismatch: lora_up {list(up.shape)} does not fit "
            f"lora_down {list(down.shape)}",
            path=src.path,
            key=up_key,
        )
    why = degenerate_factors(down.shape, up.shape)
    if why is not None:
        raise FormatError(why, path=src.path, key=down_key)
    alpha = read_alpha(src, roles.get("alpha"))
    return LoraLayer(
        down,
        up,
        float(down.shape[0]) if alpha is None else alpha,
        dtype=src.dtypes.get(down_key, "F32"),
    )


_PREFIX_TUPLE = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_SUFFIX_TUPLE = tuple("." + s for s in (*SUFFIXES, *REFUSED_SUFFIXES))


def _alpha_array(alpha: float) -> tuple[np.ndarray, str]:
    """Scalar array storing ``alpha`` exactly (F32 when exact, else F64)."""
    f32 = np.float32(alpha)
    if float(f32) == float(alpha):
        return np.array(f32, dtype=np.float32), "F32"
    return np.array(alpha, dtype=np.float64), "F64"


def _refuse_second_encoder_as_first(shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Refuse ``text_encoder`` layers that have the widths of SDXL's second text encoder.

    Written as ``lora_te_``/``lora_te1_`` (the CLIP ViT-L/14 encoder's prefixes) no
    loader applies them: ComfyUI leaves them unloaded or hits shape mismatches,
    sd-scripts drops them silently (``strict=False``).
    """
    te1 = {m: s for m, s in shapes.items() if m.startswith("text_encoder.")}
    if te1 and text_encoder_by_width(te1) == "text_encoder_2":
        first = next(iter(te1))
        raise FormatError(
            f"{len(te1)} text-encoder layers have the widths of SDXL's second text encoder "
            "(OpenCLIP ViT-bigG, 1280) but are labelled text_encoder; written under "
            "lora_te_/lora_te1_ no loader would apply them",
            path=path,
            key=first,
            hint="read them as text_encoder_2 (a PEFT folder named text_encoder_2, "
            "or a 'w2wkit.component' header entry)",
        )


class KohyaFormat:
    """kohya-ss ``lora_down``/``lora_up``/``alpha`` files (SD1.x and SDXL)."""

    name = "kohya"
    writable = True
    description = "kohya-ss/sd-scripts LoRA (lora_unet_/lora_te_ keys; ComfyUI, A1111)"

    def sniff(self, src: Source) -> float:
        """0.9 when every key is a kohya LoRA key, less when some are not."""
        keys = src.tensors.keys()
        named = sum(map(str.startswith, keys, itertools.repeat(_PREFIX_TUPLE)))
        if not named:
            return 0.0
        suffixed = sum(map(str.endswith, keys, itertools.repeat(_SUFFIX_TUPLE)))
        if named == suffixed == len(keys):
            return 0.9
        if any(".hada_" in k or ".lokr_" in k for k in keys):
            return 0.1  # LyCORIS: the lycoris format reads it
        return 0.3 if suffixed else 0.0

    def read(self, src: Source) -> Adapter:
        """Translate the keys into canonical module paths.

        Raises
        ------
        FormatError
            For an unknown key, a DoRA layer, a factor without its partner,
            mismatched up/down shapes or an unknown module name.
        """
        groups = group_kohya_keys(src, SUFFIXES, REFUSED_SUFFIXES)
        layers = {}
        for kname, roles in groups.items():
            layers[kohya_module(kname, src.path)] = lora_layer(src, kname, roles)
        metadata = dict(src.metadata)
        if kohya_uses_sgm(groups):
            # kohya-ss names SDXL UNets the sgm way; remember it, since the canonical paths
            # of SDXL's input_blocks.4/5 coincide with SD1.5 paths and shapes
            metadata[UNET_NAMES_KEY] = "sgm"
        return Adapter(layers, metadata)

    def write(self, adapter: Adapter, path: Path, options: WriteOptions) -> None:
        """Write ``adapter`` as a kohya file (sgm names for SDXL).

        Alpha is stored as an F32 scalar (F64 when F32 would round it);
        factors keep each layer's storage dtype unless ``options.dtype``.
        rsLoRA layers are stored with ``alpha * sqrt(r)`` (kohya has no rsLoRA
        flag), which keeps the delta.

        Raises
        ------
        FormatError
            For a layer that is only a delta (LoHa/LoKr) or a module with no
            kohya name.
        """
        shapes = {}
        for module, layer in adapter.items():
            if not isinstance(layer, LoraLayer):
                raise FormatError(
                    f"layer is a {getattr(layer, 'kind', 'delta')} delta, not low-rank factors; "
                    "kohya files hold lora_down/lora_up pairs",
                    path=path,
                    key=module,
                    hint="re-factorise it (e.g. through a WeightSpace in delta representation)",
                )
            shapes[module] = layer.delta_shape
        family = guess_family(
            shapes,
            sgm_names=adapter.metadata.get(UNET_NAMES_KEY) == "sgm",
            metadata=adapter.metadata,
        )
        _refuse_second_encoder_as_first(shapes, path)
        sgm = family == "sdxl"
        dual = sgm or any(m.startswith("text_encoder_2.") for m in shapes)
        tensors: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for module, layer in adapter.items():
            try:
                kname = module_to_kohya(module, sgm=sgm, dual_text_encoders=dual)
            except FormatError as exc:
                raise FormatError(exc.message, path=path, key=module) from None
            if f"{kname}.lora_down.weight" in tensors:
                raise FormatError(f"two modules map to kohya name {kname!r}", path=path, key=module)
            dtype = options.dtype or layer.dtype
            alpha = layer.alpha * math.sqrt(layer.rank) if layer.rslora else layer.alpha
            tensors[f"{kname}.lora_down.weight"] = layer.down
            dtypes[f"{kname}.lora_down.weight"] = dtype
            tensors[f"{kname}.lora_up.weight"] = layer.up
            dtypes[f"{kname}.lora_up.weight"] = dtype
            tensors[f"{kname}.alpha"], dtypes[f"{kname}.alpha"] = _alpha_array(alpha)
        metadata = {**adapter.metadata, **options.provenance}
        metadata.pop(UNET_NAMES_KEY, None)  # the key names themselves say it in the file
        write_safetensors(
            path,
            tensors,
            metadata=metadata,
            dtypes=dtypes,
            overwrite=options.overwrite,
            finite=True,
        )
