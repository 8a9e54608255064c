"""Shared machinery of the PEFT-shaped formats (diffusers, PEFT, legacy).

These formats store one ``down``/``up`` pair per module under keys that a
table of regular expressions recognises, and describe alphas the way
``peft.LoraConfig`` does: one ``r`` and ``lora_alpha`` plus ``rank_pattern``
and ``alpha_pattern`` overrides keyed by module name, matched with PEFT's rule
(a pattern key ``k`` matches module ``m`` when ``re.match(rf"(.*\\.)?({k})$", m)``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter, DeltaLayer, LoraLayer, degenerate_factors
from w2wkit.errors import FormatError
from w2wkit.formats.base import Source

__all__ = [
    "DORA_MESSAGE",
    "KeyRule",
    "assemble",
    "canonical_module",
    "config_alpha",
    "external_module",
    "guess_component",
    "lora_config_fields",
    "match_keys",
    "pattern_value",
    "put_lora_factors",
    "text_encoder_by_width",
]

DORA_MESSAGE = (
    "DoRA adapter refused: DoRA rescales each weight column by a learned magnitude "
    "(W' = m * (W + BA) / ||W + BA||), so its effect is not an additive delta B@A "
    "and cannot join a LoRA weight space"
)

#: First module-name segments that identify a UNet module.
_UNET_HEADS = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "mid_block",
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding",
        "add_embedding",
        "encoder_hid_proj",
        "class_embedding",
    }
)
#: First segments that identify a CLIP text encoder module.
_TEXT_HEADS = frozenset({"text_model", "encoder", "embeddings", "final_layer_norm"})
#: Text-encoder modules that sit beside ``text_model``, not inside it.
_TOP_LEVEL_TEXT = frozenset({"text_projection"})


@dataclass(frozen=True)
class KeyRule:
    """One row of a key table.

    Attributes
    ----------
    regex : re.Pattern
        Full-key pattern with named groups ``module`` and optionally
        ``component`` and ``factor``.
    factor : str, optional
        ``"down"``, ``"up"`` or ``"alpha"`` when the pattern has no
        ``factor`` group.
    factor_names : mapping of str to str
        Translation of the ``factor`` group (``{"A": "down", "B": "up"}``).
    module_map : tuple of (str, str)
        Regex substitutions applied to the captured module name (e.g. the
        attention-processor spelling ``processor.to_out_lora`` -> ``to_out.0``).
    """

    regex: re.Pattern[str]
    factor: str | None = None
    factor_names: Mapping[str, str] | None = None
    module_map: tuple[tuple[str, str], ...] = ()

    def match(self, key: str) -> tuple[str | None, str, str] | None:
        """``(component or None, module, factor)`` for a matching key."""
        m = self.regex.match(key)
        if m is None:
            return None
        groups = m.groupdict()
        factor = self.factor
        if factor is None:
            raw = groups["factor"]
            factor = (self.factor_names or {}).get(raw, raw)
        module = groups["module"]
        for pat, rep in self.module_map:
            module = re.sub(pat, rep, module)
        return groups.get("component"), module, factor


def match_keys(
    src: Source, rules: Sequence[KeyRule]
) -> tuple[dict[str, tuple[str | None, str, str]], list[str]]:
    """Apply a key table to every tensor key.

    Returns
    -------
    matched : dict
        ``key -> (component, module, factor)``.
    unmatched : list of str
        Keys no rule recognised, in file order.
    """
    matched: dict[str, tuple[str | None, str, str]] = {}
    unmatched: list[str] = []
    for key in src.tensors:
        for rule in rules:
            hit = rule.match(key)
            if hit is not None:
                matched[key] = hit
                break
        else:
            unmatched.append(key)
    return matched, unmatched


def refuse_dora(src: Source) -> None:
    """Raise the DoRA :class:`FormatError` when ``src`` holds DoRA weights."""
    for key in src.tensors:
        if "lora_magnitude_vector" in key or key.endswith(".dora_scale"):
            raise FormatError(DORA_MESSAGE, path=src.path, key=key)


def guess_component(module: str) -> str | None:
    """Guess the pipeline component of an unprefixed module name.

    ``down_blocks.``/``mid_block.``/``up_blocks.``... -> ``"unet"``;
    ``text_model.``/``encoder.layers.``... -> ``"text_encoder"`` (a second
    text encoder cannot be told apart by name); otherwise ``None``.
    """
    head = module.split(".", 1)[0]
    if head in _UNET_HEADS:
        return "unet"
    if head in _TEXT_HEADS:
        return "text_encoder"
    if head in _TOP_LEVEL_TEXT:
        return "text_encoder_2"  # only CLIPTextModelWithProjection (SDXL's second) has it
    return None


def text_encoder_by_width(
    modules: Mapping[str, Sequence[int]], component: str = "text_encoder"
) -> str:
    """Which SDXL text encoder a set of text-encoder layers fits, by their widths.

    Parameters
    ----------
    modules : mapping of str to shape
        Canonical paths (under ``component``) -> delta shapes ``(out, in[, ...])``.
    component : str
        The component the paths were guessed to belong to.

    Returns
    -------
    str
        ``"text_encoder_2"`` when every layer has the shape of the full-size
        OpenCLIP ViT-bigG/14 module of that name and not the CLIP ViT-L/14 one
        (e.g. ``q_proj`` 1280 x 1280, not 768 x 768), else ``component``.
    """
    from w2wkit.names import module_table

    if not modules or component not in ("text_encoder", "text_encoder_2"):
        return component
    table = module_table("sdxl")

    def fits(comp: str) -> bool:
        for path, shape in modules.items():
            rest = path.split(".", 1)[1]
            ref = table.get(f"{comp}.{rest}")
            got = tuple(int(s) for s in shape)
            if ref is None or (got != ref and got != (ref[0], int(np.prod(ref[1:])))):
                return False
        return True

    if fits("text_encoder_2") and not fits("text_encoder"):
        return "text_encoder_2"
    if fits("text_encoder") and not fits("text_encoder_2"):
        return "text_encoder"
    return component


def canonical_module(component: str, module: str) -> str:
    """Canonical path: component prefix, text encoders with ``text_model.``.

    transformers >= 5 flattened ``CLIPTextModel`` (no ``text_model`` level);
    canonical paths keep the level so files from either layout agree.
    """
    if (
        component.startswith("text_encoder")
        and not module.startswith("text_model.")
        and module.split(".", 1)[0] not in _TOP_LEVEL_TEXT
    ):
        module = f"text_model.{module}"
    return f"{component}.{module}"


def external_module(module: str, *, flatten_text: bool) -> tuple[str, str]:
    """Split a canonical path into ``(component, module name in the component)``.

    With ``flatten_text``, a text encoder's ``text_model.`` level is dropped
    (the transformers >= 5 layout; such a name still suffix-matches the older
    layout in PEFT's ``target_modules`` and pattern rules).
    """
    component, rest = module.split(".", 1)
    if flatten_text and component.startswith("text_encoder"):
        rest = rest.removeprefix("text_model.")
    return component, rest


def pattern_value(patterns: Mapping[str, Any], module: str) -> Any | None:
    """Value of the first PEFT pattern key matching ``module`` (or None)."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            if module == key or module.endswith("." + key):
                return value
    return None


def config_alpha(
    config: Mapping[str, Any], names: Iterable[str], rank: int, *, where: str, path: str
) -> tuple[float, bool]:
    """Alpha and rsLoRA flag PEFT gives a module under a ``LoraConfig`` dict.

    Parameters
    ----------
    config : mapping
        ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
        ``use_rslora`` (PEFT defaults for missing fields: 8, 8, {}, {}, False).
    names : iterable of str
        Spellings of the module name to try against the patterns (e.g. with
        and without ``text_model.``).
    rank : int
        The stored rank; must equal the rank the config gives the module.
    where, path : str
        Field and file named in errors.

    Returns
    -------
    alpha : float
    rslora : bool
    """
    names = list(names)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise FormatError("rank_pattern/alpha_pattern must be JSON objects", path=path, key=where)
    cfg_r = config.get("r", 8)
    cfg_alpha = config.get("lora_alpha", 8)
    r = a = None
    for name in names:
        r = pattern_value(rank_pattern, name) if r is None else r
        a = pattern_value(alpha_pattern, name) if a is None else a
    r = cfg_r if r is None else r
    a = cfg_alpha if a is None else a
    try:
        r_val, a_val = int(r), float(a)
    except (TypeError, ValueError):
        msg = f"non-numeric r/lora_alpha ({r!r}, {a!r})"
        raise FormatError(msg, path=path, key=where) from None
    if r_val != rank:
        raise FormatError(
            f"config gives module {names[0]} rank {r_val} but its tensors have rank {rank}",
            path=path,
            key=where,
        )
    if not math.isfinite(a_val):
        raise FormatError(f"lora_alpha is {a_val}", path=path, key=where)
    return a_val, bool(config.get("use_rslora", False))


def assemble(
    src: Source,
    matched: Mapping[str, tuple[str, str, str]],
    *,
    alpha_for: Any,
    metadata: Mapping[str, str],
) -> Adapter:
    """Pair factors per module and build the adapter.

    Parameters
    ----------
    src : Source
        The parsed file (for tensors, dtypes and error messages).
    matched : mapping
        ``key -> (component, module, factor)`` with the component resolved;
        module names already canonical (prefix included).
    alpha_for : callable
        ``alpha_for(module, rank, alpha_tensor_or_None) -> (alpha, rslora)``.
    metadata : mapping of str to str
        Metadata for the adapter.

    Raises
    ------
    FormatError
        A ``down`` without ``up`` (or the reverse), a duplicated factor.
    """
    parts: dict[str, dict[str, str]] = {}
    for key, (_component, module, factor) in matched.items():
        slot = parts.setdefault(module, {})
        if factor in slot:
            raise FormatError(
                f"duplicate {factor} factor for module {module} (also in {slot[factor]!r})",
                path=src.path,
                key=key,
            )
        slot[factor] = key
    layers: dict[str, LoraLayer | DeltaLayer] = {}
    for module, slot in parts.items():
        if "down" not in slot or "up" not in slot:
            have, miss = ("down", "up") if "down" in slot else ("up", "down")
            if have not in slot:
                raise FormatError(
                    f"alpha without LoRA factors for module {module}",
                    path=src.path,
                    key=slot["alpha"],
                )
            raise FormatError(
                f"{have} factor without its {miss} factor (module {module})",
                path=src.path,
                key=slot[have],
            )
        down = np.asarray(src.tensors[slot["down"]])
        up = np.asarray(src.tensors[slot["up"]])
        if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
            raise FormatError(
                f"up/down shape mismatch for module {module}: up {tuple(up.shape)}, "
                f"down {tuple(down.shape)}",
                path=src.path,
                key=slot["up"],
            )
        why = degenerate_factors(down.shape, up.shape)
        if why is not None:
            raise FormatError(why, path=src.path, key=slot["down"])
        alpha_t = None
        if "alpha" in slot:
            arr = np.asarray(src.tensors[slot["alpha"]])
            if arr.size != 1:
                raise FormatError(
                    f"alpha must be a scalar, got shape {tuple(arr.shape)}",
                    path=src.path,
                    key=slot["alpha"],
                )
            alpha_t = float(arr.reshape(()))
        alpha, rslora = alpha_for(module, int(down.shape[0]), alpha_t)
        dtype = src.dtypes.get(slot["down"], "F32")
        if dtype not in ("F32", "F16", "BF16"):
            dtype = "F32"
        layers[module] = LoraLayer(
            down=down.astype(np.float32, copy=False) if down.dtype != np.float32 else down,
            up=up.astype(np.float32, copy=False) if up.dtype != np.float32 else up,
            alpha=float(alpha),
            rslora=bool(rslora),
            dtype=dtype,
        )
    return Adapter(layers=layers, metadata=dict(metadata), source=src.path)


def lora_config_fields(layers: Mapping[str, LoraLayer], names: Mapping[str, str]) -> dict[str, Any]:
    """``LoraConfig`` fields that make PEFT apply exactly these layers.

    ``r`` and ``lora_alpha`` are the most common rank and alpha (ties: first
    seen); modules that differ get ``rank_pattern``/``alpha_pattern`` entries
    keyed by their full name, so no pattern can match another module.
    Layers with rsLoRA scaling are written with ``use_rslora`` when all of
    them use it; in a mix, rsLoRA layers get the plain alpha
    ``alpha * sqrt(r)``, which gives the same scale.

    Parameters
    ----------
    layers : mapping of str to LoraLayer
        Canonical path -> layer (one component).
    names : mapping of str to str
        Canonical path -> module name as written in the config.

    Returns
    -------
    dict
        ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
        ``use_rslora``, ``target_modules``.
    """
    flags = {layer.rslora for layer in layers.values()}
    use_rslora = flags == {True}
    ranks = {m: layer.rank for m, layer in layers.items()}
    alphas: dict[str, float] = {}
    for m, layer in layers.items():
        a = float(layer.alpha)
        if layer.rslora and not use_rslora:
            a = a * layer.rank / math.sqrt(layer.rank)
        alphas[m] = a
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": int(r),
        "lora_alpha": _json_number(lora_alpha),
        "rank_pattern": {names[m]: int(v) for m, v in ranks.items() if v != r},
        "alpha_pattern": {names[m]: _json_number(v) for m, v in alphas.items() if v != lora_alpha},
        "use_rslora": use_rslora,
        "target_modules": [names[m] for m in layers],
    }


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


def lora_layers_only(adapter: Adapter, path: str, fmt: str) -> dict[str, LoraLayer]:
    """The adapter's layers, refusing full-delta (LyCORIS) layers."""
    out: dict[str, LoraLayer] = {}
    for module, layer in adapter.layers.items():
        if not isinstance(layer, LoraLayer):
            raise FormatError(
                f"layer is a full delta ({layer.kind}); the {fmt} format stores only "
                "low-rank factors (re-compress it to a LoRA first)",
                path=path,
                key=module,
            )
        if "." not in module:
            raise FormatError("module path has no component prefix", path=path, key=module)
        out[module] = layer
    if not out:
        raise FormatError("adapter has no layers to write", path=path)
    return out


def storage_dtype(layer: LoraLayer, override: str | None) -> str:
    """Storage dtype of a layer's factors."""
    return override or layer.dtype or "F32"


def put_lora_factors(
    tensors: dict[str, np.ndarray],
    dtypes: dict[str, str],
    key: str,
    layer: LoraLayer,
    override: str | None,
) -> None:
    """Store a layer's factors as ``{key}.lora_A.weight`` (down) and ``{key}.lora_B.weight`` (up).

    Both get :func:`storage_dtype` ``(layer, override)`` in ``dtypes``.
    """
    dt = storage_dtype(layer, override)
    for factor, arr in (("lora_A", layer.down), ("lora_B", layer.up)):
        tensors[f"{key}.{factor}.weight"] = arr
        dtypes[f"{key}.{factor}.weight"] = dt
