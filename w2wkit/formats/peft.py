"""Native PEFT adapter folders (``PeftModel.save_pretrained`` / ``from_pretrained``).

A folder holds ``adapter_config.json`` (a ``LoraConfig``: ``r``,
``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``,
``target_modules``...) and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (an adapter
name such as ``.lora_A.default.weight`` is tolerated). ``adapter_model.bin``
is read only with ``allow_pickle`` (the registry enforces it). Alphas are
resolved per module exactly as PEFT does (see
:func:`w2wkit.formats._peftlike.config_alpha`).

Which component?
----------------
A PEFT folder wraps one model, so the pipeline component (``unet``,
``text_encoder``, ``text_encoder_2``) is not part of its keys. w2wkit records it
in the safetensors header of ``adapter_model.safetensors`` as
``w2wkit.component`` (invisible to PEFT, which ignores header metadata; a field
in ``adapter_config.json`` would make PEFT warn about an unknown argument on
every load). Without that entry the component is guessed from the module
names: ``down_blocks``/``mid_block``/``up_blocks``/``conv_in``... ->
``unet``; ``text_model``/``encoder.layers``... -> ``text_encoder`` (a second
SDXL text encoder cannot be told apart by name; it needs the header entry).

Multi-component adapters
------------------------
The ``unet`` (or ``transformer``) part is written at the top level of the
folder (the first component when there is neither); every further component
goes to a subfolder named after it
(``out/text_encoder/adapter_config.json`` + ``adapter_model.safetensors``),
each a complete PEFT adapter (load it with
``PeftModel.from_pretrained(model, out, subfolder="text_encoder")``). The
reader reads the top level and then every subfolder named after a component
that holds an ``adapter_config.json``, in :data:`w2wkit.adapter.COMPONENTS`
order. Module order is kept within a component; a multi-component adapter
comes back grouped by component (top level first).

Metadata
--------
``adapter_config.json`` is a plain ``LoraConfig`` dict (``peft_type``
``"LORA"``, ``r``/``lora_alpha`` the most common rank/alpha, full module names
in ``rank_pattern``/``alpha_pattern`` for the modules that differ,
``target_modules`` the full module names). Text-encoder module names are
written without the ``text_model.`` level (the transformers >= 5 flattened
``CLIPTextModel``; the reader accepts both), except those of
``text_encoder_2``, whose ``CLIPTextModelWithProjection`` kept the level.
The adapter's own metadata and the provenance entries go to the top-level
safetensors header, next to ``format: pt`` and ``w2wkit.component``; the
reader drops those two again.

DoRA (``use_dora: true`` or ``lora_magnitude_vector`` keys) is refused: it is
not an additive delta.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from w2wkit.adapter import COMPONENTS, Adapter
from w2wkit.errors import FormatError
from w2wkit.formats._peftlike import (
    DORA_MESSAGE,
    KeyRule,
    assemble,
    canonical_module,
    config_alpha,
    external_module,
    guess_component,
    lora_config_fields,
    lora_layers_only,
    match_keys,
    put_lora_factors,
    refuse_dora,
    text_encoder_by_width,
)
from w2wkit.formats.base import (
    PEFT_CONFIG,
    Source,
    WriteOptions,
    load_source,
)
from w2wkit.stio import atomic_path, write_safetensors

__all__ = ["COMPONENT_KEY", "PeftFormat"]

#: safetensors header entry naming the pipeline component.
COMPONENT_KEY = "w2wkit.component"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."

RULES: tuple[KeyRule, ...] = (
    KeyRule(
        re.compile(
            r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>A|B)(?:\.[\w-]+)?\.weight$"
        ),
        factor_names={"A": "down", "B": "up"},
    ),
)
#: Keys without the ``base_model.model.`` prefix (``get_peft_model_state_dict``
#: saved as is): read when there is no config, as a low-confidence match.
BARE_RULES: tuple[KeyRule, ...] = (
    KeyRule(
        re.compile(
            r"^(?P<module>(?!unet\.|text_encoder|lora_)[\w.]+)\.lora_(?P<factor>A|B)\.weight$"
        ),
        factor_names={"A": "down", "B": "up"},
    ),
)


def _config_error(src: Source, message: str, key: str | None = None) -> FormatError:
    cfg_path = Path(src.weights_path).parent / PEFT_CONFIG
    return FormatError(message, path=cfg_path, key=key)


def _check_config(src: Source) -> dict[str, Any]:
    cfg = src.config or {}
    if cfg.get("use_dora"):
        raise _config_error(src, DORA_MESSAGE, key="use_dora")
    ptype = cfg.get("peft_type", "LORA")
    if str(ptype).upper() != "LORA":
        raise _config_error(
            src, f"peft_type {ptype!r} is not supported (only LORA)", key="peft_type"
        )
    for field in ("r", "lora_alpha"):
        if field in cfg and (
            isinstance(cfg[field], bool) or not isinstance(cfg[field], int | float)
        ):
            raise _config_error(src, f"{field} must be a number, got {cfg[field]!r}", key=field)
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field) is not None and not isinstance(cfg[field], dict):
            raise _config_error(src, f"{field} must be a JSON object", key=field)
    if cfg.get("lora_bias"):
        raise _config_error(
            src, "LoRA bias (lora_bias=true) is not supported: not a pure B@A delta", "lora_bias"
        )
    return cfg


def _delta_shapes(
    src: Source, matched: dict[str, tuple[str | None, str, str]], keys: set[str]
) -> dict[str, tuple[int, ...]]:
    """``text_encoder.<module> -> (out, in[, kh, kw])`` of the modules of ``keys``."""
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for key in keys:
        _, module, factor = matched[key]
        parts.setdefault(module, {})[factor] = tuple(src.tensors[key].shape)
    out = {}
    for module, f in parts.items():
        if "down" in f and "up" in f and len(f["down"]) >= 2 and len(f["up"]) >= 2:
            out[canonical_module("text_encoder", module)] = (f["up"][0], *f["down"][1:])
    return out


def _component_from_folder(src: Source) -> str | None:
    """The component a PEFT folder's own name says (``.../text_encoder_2``), if any."""
    name = Path(src.weights_path).parent.name
    return name if name in COMPONENTS else None


def _read_one(src: Source, component_hint: str | None = None) -> Adapter:
    refuse_dora(src)
    cfg = _check_config(src) if src.config is not None else None
    rules = RULES if any(k.startswith(_PREFIX) for k in src.tensors) else BARE_RULES
    matched, unmatched = match_keys(src, rules)
    if unmatched:
        msg = "unexpected key for the PEFT LoRA format"
        raise FormatError(msg, path=src.path, key=unmatched[0])
    component = src.metadata.get(COMPONENT_KEY) or component_hint
    if component is None and src.config is not None:
        component = _component_from_folder(src)
    if component is not None and component not in COMPONENTS:
        raise FormatError(f"unknown component {component!r}", path=src.path, key=COMPONENT_KEY)
    guessed: dict[str, str] = {}
    for key, (_, module, _factor) in matched.items():
        comp = component or guess_component(module)
        if comp is None:
            raise FormatError(
                "cannot tell which pipeline component this module belongs to",
                path=src.path,
                key=key,
                hint=f"add a '{COMPONENT_KEY}' entry to the safetensors header",
            )
        guessed[key] = comp
    if component is None and any(c.startswith("text_encoder") for c in guessed.values()):
        # no header entry and no component folder name: a CLIP-L and an OpenCLIP-bigG
        # text encoder share their module names, so their widths decide
        texts = {k for k, c in guessed.items() if c.startswith("text_encoder")}
        second = "text_encoder_2" in {guessed[k] for k in texts}
        shapes = _delta_shapes(src, matched, texts)
        which = text_encoder_by_width(shapes, "text_encoder_2" if second else "text_encoder")
        for k in texts:
            guessed[k] = which
    canon = {}
    for key, (_, module, factor) in matched.items():
        comp = guessed[key]
        canon[key] = (comp, canonical_module(comp, module), factor)

    def alpha_for(module: str, rank: int, alpha_t: float | None) -> tuple[float, bool]:
        if cfg is None:
            return float(rank), False
        rest = module.split(".", 1)[1]
        names = [rest]
        if rest.startswith("text_model."):
            names.append(rest.removeprefix("text_model."))
        where = f"{PEFT_CONFIG} r/lora_alpha"
        return config_alpha(cfg, names, rank, where=where, path=src.path)

    meta = {k: v for k, v in src.metadata.items() if k != COMPONENT_KEY}
    if meta.get("format") == "pt":
        del meta["format"]
    return assemble(src, canon, alpha_for=alpha_for, metadata=meta)


class PeftFormat:
    """PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``)."""

    name = "peft"
    writable = True
    description = "PEFT folder (adapter_config.json + adapter_model.safetensors, base_model.model.)"

    def sniff(self, src: Source) -> float:
        """1 for PEFT folders; 0.9 for ``base_model.model.`` keys; 0.5 for bare keys."""
        if src.config is not None:
            return 1.0
        keys = list(src.tensors)
        if not keys:
            return 0.0
        if all(k.startswith(_PREFIX) for k in keys):
            matched, _ = match_keys(src, RULES)
            return 0.9 * len(matched) / len(keys)
        matched, _ = match_keys(src, BARE_RULES)
        if len(matched) == len(keys) and all(
            guess_component(m) is not None for _, m, _ in matched.values()
        ):
            return 0.5
        return 0.0

    def read(self, src: Source) -> Adapter:
        """Read the folder (and its component subfolders) into one adapter."""
        adapter = _read_one(src)
        folder = Path(src.weights_path).parent
        if src.config is None:
            return adapter
        root = Path(src.path)
        if root.is_dir() and root.resolve() != folder.resolve():
            # the training layout: ``root/unet/``, ``root/text_encoder/``... and no
            # adapter at the top; ``src`` is its first component folder
            folder = root
        for comp in COMPONENTS:
            sub = folder / comp
            if (
                not (sub / PEFT_CONFIG).is_file()
                or sub.resolve() == Path(src.weights_path).parent.resolve()
            ):
                continue
            part = _read_one(load_source(sub), component_hint=comp)
            for module, layer in part.layers.items():
                if module in adapter.layers:
                    raise FormatError(
                        "module appears both at the top level and in a subfolder",
                        path=sub,
                        key=module,
                    )
                adapter.layers[module] = layer
        return adapter

    def write(self, adapter: Adapter, path: Path, options: WriteOptions) -> None:
        """Write a PEFT folder (one subfolder per extra component), atomically."""
        layers = lora_layers_only(adapter, str(path), self.name)
        by_comp: dict[str, dict[str, Any]] = {}
        names: dict[str, str] = {}
        for module, layer in layers.items():
            # CLIPTextModel lost its text_model level in transformers 5,
            # CLIPTextModelWithProjection (SDXL's second encoder) kept it
            second = module.startswith("text_encoder_2.")
            comp, rest = external_module(module, flatten_text=not second)
            if comp not in COMPONENTS:
                raise FormatError(f"unknown component {comp!r}", path=path, key=module)
            by_comp.setdefault(comp, {})[module] = layer
            names[module] = rest
        top = next((c for c in ("unet", "transformer") if c in by_comp), next(iter(by_comp)))
        order = [top, *(c for c in COMPONENTS if c in by_comp and c != top)]
        by_comp = {c: by_comp[c] for c in order}
        with atomic_path(path, overwrite=options.overwrite) as tmp:
            tmp.mkdir()
            for i, (comp, comp_layers) in enumerate(by_comp.items()):
                folder = tmp if i == 0 else tmp / comp
                folder.mkdir(exist_ok=True)
                tensors, dtypes = {}, {}
                for module, layer in comp_layers.items():
                    key = f"{_PREFIX}{names[module]}"
                    put_lora_factors(tensors, dtypes, key, layer, options.dtype)
                meta: dict[str, str] = {}
                if i == 0:
                    meta.update({k: v for k, v in adapter.metadata.items() if k != COMPONENT_KEY})
                    meta.update(options.provenance)
                meta.setdefault("format", "pt")
                meta[COMPONENT_KEY] = comp
                config = {
                    "peft_type": "LORA",
                    "base_model_name_or_path": None,
                    "task_type": None,
                    "bias": "none",
                    "lora_dropout": 0.0,
                    "fan_in_fan_out": False,
                    "inference_mode": True,
                    "init_lora_weights": True,
                    "use_dora": False,
                    **lora_config_fields(comp_layers, names),
                }
                (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
                try:
                    write_safetensors(
                        folder / WEIGHTS_NAME, tensors, metadata=meta, dtypes=dtypes, finite=True
                    )
                except FormatError as exc:  # name the output, not its temporary folder
                    where = path / WEIGHTS_NAME if i == 0 else path / comp / WEIGHTS_NAME
                    raise type(exc)(exc.message, path=where, key=exc.key, hint=exc.hint) from None
