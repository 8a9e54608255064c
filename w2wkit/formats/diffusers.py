"""The diffusers LoRA file format (``pipe.save_lora_weights`` / ``load_lora_weights``).

Keys
----
``<component>.<module>.lora_A.weight`` (down, ``(r, in[, kh, kw])``) and
``<component>.<module>.lora_B.weight`` (up, ``(out, r[, 1, 1])``), with
``<component>`` one of ``unet``, ``text_encoder``, ``text_encoder_2``,
``transformer``. Also read: the older ``.lora.down.weight``/``.lora.up.weight``
and ``.lora_linear_layer.down.weight``/``.up.weight`` spellings, and a scalar
``<component>.<module>.alpha`` tensor when a converter left one.

Alpha
-----
diffusers (>= 0.34) keeps the ``peft.LoraConfig`` of each component in the
safetensors header entry ``lora_adapter_metadata``: one JSON object whose keys
are ``"<component>.<field>"`` (``"unet.r"``, ``"unet.lora_alpha"``,
``"unet.rank_pattern"``, ``"unet.alpha_pattern"``, ``"unet.use_rslora"``,
``"unet.target_modules"``, ...). On load diffusers strips the component
prefix and passes the fields to ``LoraConfig(**fields)``; PEFT then scales a
module by ``alpha / r`` with ``r``/``alpha`` taken from the first
``rank_pattern``/``alpha_pattern`` key that matches the module name
(``re.match(rf"(.*\\.)?({key})$", name)``), else ``r``/``lora_alpha``.
The reader resolves alphas the same way. A component without metadata gets
alpha = r (diffusers' convention: scale 1). A present component without
``lora_alpha`` gets PEFT's default 8, exactly as diffusers would load it.

Writer
------
Header metadata layout of a written file:

- ``format``: ``"pt"`` (what diffusers itself writes);
- ``lora_adapter_metadata``: JSON (sorted keys) with, per component,
  ``<c>.r`` (most common rank), ``<c>.lora_alpha`` (most common alpha),
  ``<c>.rank_pattern`` / ``<c>.alpha_pattern`` (full module name -> value, only
  for modules that differ), ``<c>.use_rslora``, ``<c>.target_modules`` (full
  module names), ``<c>.peft_type`` = ``"LORA"``. Text-encoder names are written
  without the ``text_model.`` level so they match both the transformers < 5
  and the flattened >= 5 ``CLIPTextModel``; tensor keys keep it (diffusers
  strips it when the model is flattened);
- the adapter's own metadata (e.g. kohya ``ss_*`` keys) and the provenance
  entries (``w2wkit.*``).

On read, ``format`` (when ``"pt"``) and ``lora_adapter_metadata`` are dropped
from :attr:`Adapter.metadata` (they are regenerated on write), so a round trip
gives back the same metadata plus any provenance added.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from w2wkit.adapter import Adapter
from w2wkit.errors import FormatError
from w2wkit.formats._peftlike import (
    KeyRule,
    assemble,
    canonical_module,
    config_alpha,
    external_module,
    lora_config_fields,
    lora_layers_only,
    match_keys,
    put_lora_factors,
    refuse_dora,
)
from w2wkit.formats.base import Source, WriteOptions
from w2wkit.stio import write_safetensors

__all__ = ["METADATA_KEY", "DiffusersFormat"]

#: Header entry holding the per-component LoraConfig fields.
METADATA_KEY = "lora_adapter_metadata"
_COMP = r"(?P<component>unet|text_encoder|text_encoder_2|transformer)"

#: Key table: (pattern, factor translation).
RULES: tuple[KeyRule, ...] = (
    KeyRule(
        re.compile(rf"^{_COMP}\.(?P<module>.+)\.lora_(?P<factor>A|B)\.weight$"),
        factor_names={"A": "down", "B": "up"},
    ),
    KeyRule(re.compile(rf"^{_COMP}\.(?P<module>.+)\.lora\.(?P<factor>down|up)\.weight$")),
    KeyRule(
        re.compile(rf"^{_COMP}\.(?P<module>.+)\.lora_linear_layer\.(?P<factor>down|up)\.weight$")
    ),
    KeyRule(re.compile(rf"^{_COMP}\.(?P<module>.+?)(?:\.lora)?\.alpha$"), factor="alpha"),
)
_RESERVED = (METADATA_KEY,)


def _adapter_metadata(src: Source) -> dict[str, dict[str, Any]]:
    """Per-component LoraConfig fields from the header (empty when absent)."""
    raw = src.metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        msg = f"header entry is not JSON: {exc}"
        raise FormatError(msg, path=src.path, key=METADATA_KEY) from None
    if not isinstance(data, dict):
        raise FormatError("header entry is not a JSON object", path=src.path, key=METADATA_KEY)
    out: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        comp, _, field = str(key).partition(".")
        if field:
            out.setdefault(comp, {})[field] = value
    return out


def _check_extra_keys(src: Source, unmatched: list[str]) -> None:
    refuse_dora(src)
    for key in unmatched:
        if key.endswith(".lora_B.bias"):
            raise FormatError(
                "LoRA bias (lora_bias=True) is not supported: the adapter is not a pure B@A delta",
                path=src.path,
                key=key,
            )
        raise FormatError("unexpected key for the diffusers LoRA format", path=src.path, key=key)


class DiffusersFormat:
    """diffusers ``unet.``/``text_encoder.`` LoRA files."""

    name = "diffusers"
    writable = True
    description = "diffusers (unet./text_encoder. prefixes, lora_A/lora_B, lora_adapter_metadata)"

    def sniff(self, src: Source) -> float:
        """Fraction of keys in diffusers spelling; 0 for PEFT folders."""
        if src.config is not None or not src.tensors:
            return 0.0
        matched, unmatched = match_keys(src, RULES)
        factors = sum(1 for _, _, f in matched.values() if f != "alpha")
        if not factors:
            return 0.0
        frac = len(matched) / len(src.tensors)
        return 1.0 if not unmatched else 0.8 * frac

    def read(self, src: Source) -> Adapter:
        """Read a diffusers LoRA file into the canonical adapter."""
        matched, unmatched = match_keys(src, RULES)
        _check_extra_keys(src, unmatched)
        configs = _adapter_metadata(src)
        canon = {
            key: (comp, canonical_module(comp, module), factor)
            for key, (comp, module, factor) in matched.items()
        }

        def alpha_for(module: str, rank: int, alpha_t: float | None) -> tuple[float, bool]:
            comp, rest = module.split(".", 1)
            cfg = configs.get(comp)
            if alpha_t is not None:
                return alpha_t, False
            if cfg is None:
                return float(rank), False
            names = [rest]
            if rest.startswith("text_model."):
                names.append(rest.removeprefix("text_model."))
            return config_alpha(cfg, names, rank, where=f"{METADATA_KEY} ({comp})", path=src.path)

        meta = {k: v for k, v in src.metadata.items() if k not in _RESERVED}
        if meta.get("format") == "pt":
            del meta["format"]
        return assemble(src, canon, alpha_for=alpha_for, metadata=meta)

    def write(self, adapter: Adapter, path: Path, options: WriteOptions) -> None:
        """Write a file ``StableDiffusionPipeline.load_lora_weights`` applies exactly."""
        layers = lora_layers_only(adapter, str(path), self.name)
        tensors = {}
        dtypes = {}
        by_comp: dict[str, dict[str, Any]] = {}
        names: dict[str, str] = {}
        for module, layer in layers.items():
            comp, rest = external_module(module, flatten_text=True)
            if comp not in ("unet", "text_encoder", "text_encoder_2", "transformer"):
                raise FormatError(
                    f"unknown component {comp!r} for the diffusers format", path=path, key=module
                )
            by_comp.setdefault(comp, {})[module] = layer
            names[module] = rest
            put_lora_factors(tensors, dtypes, module, layer, options.dtype)
        config: dict[str, Any] = {}
        for comp, comp_layers in by_comp.items():
            fields = lora_config_fields(comp_layers, names)
            fields["peft_type"] = "LORA"
            config.update({f"{comp}.{k}": v for k, v in fields.items()})
        meta = {k: v for k, v in adapter.metadata.items() if k not in _RESERVED}
        meta.setdefault("format", "pt")
        meta.update(options.provenance)
        meta[METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
        write_safetensors(
            path,
            tensors,
            metadata=meta,
            dtypes=dtypes,
            overwrite=options.overwrite,
            finite=True,
        )
