"""Module names: kohya <-> canonical module paths, and the real architectures' tables.

Canonical module paths are diffusers module names with a component prefix
(``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``,
``text_encoder_2....``). kohya-ss/sd-scripts writes the same names with every
``.`` turned into ``_`` and a prefix per component (``lora_unet_``,
``lora_te_`` for SD1.x, ``lora_te1_``/``lora_te2_`` for SDXL); for SDXL the
UNet part uses the original (sgm/LDM) block numbering
(``input_blocks.4.1.transformer_blocks.0.attn1.to_q``).

Everything here is driven by tables:

* :data:`KOHYA_PREFIXES` - kohya prefix <-> component;
* a *vocabulary* of name segments (``down_blocks``, ``to_q``, ``self_attn``,
  ...) used to put the dots back into an underscored name
  (:func:`split_segments`);
* :data:`SGM_TOP_LEVEL`, :data:`SGM_RESNET`, :data:`SGM_MIDDLE` - the sgm
  <-> diffusers renames of the UNet;
* ``w2wkit/data/module_tables.json`` - every ``Linear``/``Conv2d`` of the
  full-size SD1.5 and SDXL UNets and their CLIP text encoders with its weight
  shape, derived from diffusers'/transformers' model classes instantiated on
  the ``meta`` device (regenerate with ``python -m w2wkit.names --regenerate``).

This module never imports torch except in :func:`derive_module_tables`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from w2wkit.errors import FormatError

__all__ = [
    "FAMILIES",
    "KOHYA_PREFIXES",
    "SGM_RESNET",
    "SGM_TOP_LEVEL",
    "derive_module_tables",
    "diffusers_to_sgm",
    "families_fitting",
    "guess_family",
    "is_kohya_name",
    "kohya_to_module",
    "kohya_uses_sgm",
    "load_module_tables",
    "metadata_family",
    "module_table",
    "module_to_kohya",
    "sdxl_evidence",
    "sgm_to_diffusers",
    "split_segments",
    "vocabulary",
]

#: Families with shipped module tables.
FAMILIES = ("sd1", "sdxl")

#: kohya prefix -> component. ``lora_te_`` is SD1.x's single text encoder,
#: ``lora_te1_``/``lora_te2_`` are SDXL's two.
KOHYA_PREFIXES: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}

#: sgm top-level modules of the SDXL UNet <-> diffusers names.
SGM_TOP_LEVEL: dict[str, str] = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}

#: sgm ResBlock inner modules <-> diffusers ResnetBlock2D names.
SGM_RESNET: dict[str, str] = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

#: sgm middle_block children <-> diffusers mid_block children.
SGM_MIDDLE: dict[str, str] = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}

# First segment after an sgm block child index tells which kind of child it is.
_SGM_CHILD_KIND: dict[str, str] = {
    "in_layers": "resnets",
    "out_layers": "resnets",
    "emb_layers": "resnets",
    "skip_connection": "resnets",
    "norm": "attentions",
    "proj_in": "attentions",
    "proj_out": "attentions",
    "transformer_blocks": "attentions",
    "op": "downsamplers",
    "conv": "upsamplers",
}
# Allowed child index of each kind inside an sgm input/output block.
_SGM_CHILD_INDEX: dict[str, tuple[str, ...]] = {
    "resnets": ("0",),
    "attentions": ("1",),
    "downsamplers": ("0",),
    "upsamplers": ("1", "2"),
}
_SGM_HEADS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")

# Segments that appear in UNet2DConditionModel / CLIP / sgm names beyond those
# of the two shipped tables (other block types, other configs, sgm spellings).
_EXTRA_SEGMENTS = (
    "input_blocks middle_block output_blocks in_layers out_layers emb_layers "
    "skip_connection time_embed label_emb op out norm transformer_blocks proj_in proj_out "
    "down_blocks mid_block up_blocks attentions resnets downsamplers upsamplers "
    "conv_in conv_out conv_norm_out conv_act time_embedding time_emb_proj conv_shortcut "
    "class_embedding encoder_hid_proj add_embedding linear_1 linear_2 cond_proj "
    "to_q to_k to_v to_out to_add_out add_q_proj add_k_proj add_v_proj norm_cross "
    "attn1 attn2 attn3 ff net proj norm1 norm2 norm3 conv1 conv2 conv "
    "text_model encoder layers self_attn q_proj k_proj v_proj out_proj mlp fc1 fc2 "
    "layer_norm1 layer_norm2 final_layer_norm embeddings token_embedding position_embedding "
    "text_projection"
).split()

_DATA_FILE = Path(__file__).resolve().parent / "data" / "module_tables.json"
_TABLE_VERSION = 1


# --------------------------------------------------------------------------- tables


@functools.cache
def load_module_tables() -> dict[str, dict[str, tuple[int, ...]]]:
    """Load the shipped module tables (torch-free).

    Returns
    -------
    dict
        ``family -> {module path -> weight shape}`` with module paths in
        model order, shapes ``(out, in)`` or ``(out, in, kh, kw)``.
    """
    try:
        raw = json.loads(_DATA_FILE.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"cannot read module tables: {exc}", path=_DATA_FILE) from None
    if raw.get("version") != _TABLE_VERSION:
        raise FormatError(f"module tables version {raw.get('version')!r} unknown", path=_DATA_FILE)
    return {
        fam: {name: tuple(shape) for name, shape in modules}
        for fam, modules in raw["families"].items()
    }


def module_table(family: str) -> dict[str, tuple[int, ...]]:
    """Every ``Linear``/``Conv2d`` module of a family's full-size model.

    Parameters
    ----------
    family : {"sd1", "sdxl"}

    Returns
    -------
    dict of str to tuple of int
        ``module path -> weight shape`` in model order.
    """
    tables = load_module_tables()
    if family not in tables:
        raise FormatError(f"unknown model family {family!r}; known: {', '.join(tables)}")
    return tables[family]


@functools.cache
def _family_sets() -> dict[str, frozenset[str]]:
    return {fam: frozenset(table) for fam, table in load_module_tables().items()}


def guess_family(
    module_paths: Iterable[str] | Mapping[str, Sequence[int]],
    *,
    sgm_names: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Guess the base model family an adapter's modules belong to.

    Parameters
    ----------
    module_paths : iterable of str, or mapping of str to shape
        Canonical module paths; when a mapping, the values are the layers'
        delta shapes ``(out, in[, kh, kw])`` and are used to tell apart
        modules whose names exist in both families.
    sgm_names : bool
        The file named its UNet modules the sgm/LDM way (``input_blocks``,
        ``middle_block``, ``output_blocks``; see :func:`kohya_uses_sgm`).
        kohya-ss writes SDXL files that way and SD1.x files with diffusers
        names, so a file that fits SDXL is SDXL even when its canonical
        paths (``input_blocks.4.1...`` -> ``down_blocks.1.attentions.0...``)
        and shapes also exist in SD1.5.
    metadata : mapping of str to str, optional
        The file's metadata; ``ss_base_model_version`` or
        ``modelspec.architecture`` decide between families the modules both fit.

    Returns
    -------
    {"sd1", "sdxl", "unknown"}
        ``"sdxl"`` when every module exists in the SDXL tables (with the
        same shape, when given) and not all of them in the SD1.5 ones, or
        when ``text_encoder_2`` modules, sgm names or SDXL metadata are
        present and all modules fit SDXL; ``"sd1"`` the other way round;
        ``"unknown"`` otherwise (for example a tiny test model). Names
        common to both families with no other evidence resolve to ``"sd1"``.
    """
    fits = families_fitting(module_paths)
    sd1, sdxl = "sd1" in fits, "sdxl" in fits
    if sdxl and (not sd1 or sdxl_evidence(module_paths, sgm_names=sgm_names, metadata=metadata)):
        return "sdxl"
    if sd1:
        return "sd1"
    return "unknown"


def families_fitting(module_paths: Iterable[str] | Mapping[str, Sequence[int]]) -> set[str]:
    """The families whose full-size model has every module (with that shape, when given).

    Parameters
    ----------
    module_paths : iterable of str, or mapping of str to shape
        As for :func:`guess_family`.

    Returns
    -------
    set of str
        A subset of :data:`FAMILIES`; empty for no modules.
    """
    shapes = dict(module_paths) if isinstance(module_paths, Mapping) else None
    paths = list(shapes) if shapes is not None else list(module_paths)
    if not paths:
        return set()
    tables = load_module_tables()

    def fits(fam: str) -> bool:
        table = tables[fam]
        for p in paths:
            ref = table.get(p)
            if ref is None:
                return False
            if shapes is not None and shapes[p] is not None:
                got = tuple(int(s) for s in shapes[p])
                if got != ref and not (len(ref) == 4 and got == (ref[0], ref[1] * ref[2] * ref[3])):
                    return False
        return True

    return {fam for fam in FAMILIES if fam in tables and fits(fam)}


def sdxl_evidence(
    module_paths: Iterable[str] | Mapping[str, Sequence[int]],
    *,
    sgm_names: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> bool:
    """Whether anything besides the module table says SDXL.

    ``text_encoder_2`` modules, sgm UNet names (see :func:`kohya_uses_sgm`) or
    SDXL training metadata (see :func:`metadata_family`).
    """
    paths = list(module_paths)
    has_te2 = any(str(p).startswith("text_encoder_2.") for p in paths)
    return has_te2 or sgm_names or metadata_family(metadata or {}) == "sdxl"


def metadata_family(metadata: Mapping[str, str]) -> str | None:
    """The family a file's training metadata names (kohya-ss, modelspec), if any.

    Parameters
    ----------
    metadata : mapping of str to str
        A LoRA file's metadata.

    Returns
    -------
    {"sd1", "sdxl"} or None
    """
    version = str(metadata.get("ss_base_model_version", "")).lower()
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def kohya_uses_sgm(keys: Iterable[str]) -> bool:
    """Whether a file's kohya UNet keys use sgm/LDM block names (SDXL files do).

    Parameters
    ----------
    keys : iterable of str
        Tensor keys, e.g. ``lora_unet_input_blocks_4_1_proj_in.lora_down.weight``.

    Returns
    -------
    bool
        True when any ``lora_unet_`` key starts with ``input_blocks``,
        ``middle_block`` or ``output_blocks``.
    """
    heads = ("input_blocks_", "middle_block_", "output_blocks_")
    return any(
        k.startswith("lora_unet_") and k[len("lora_unet_") :].startswith(heads) for k in keys
    )


def derive_module_tables() -> dict[str, dict[str, tuple[int, ...]]]:
    """Build the module tables from diffusers'/transformers' classes on ``meta``.

    No weights are allocated and nothing is downloaded: the configurations of
    SD1.5 (UNet + CLIP ViT-L/14 text encoder) and SDXL (UNet + CLIP ViT-L/14 +
    OpenCLIP ViT-bigG/14 with projection) are written here in code.

    Returns
    -------
    dict
        ``family -> {module path -> weight shape}`` for every ``Linear`` and
        ``Conv2d`` module, in ``named_modules`` order.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_l = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    }
    clip_bigg = {
        "vocab_size": 49408,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 1280,
    }
    sd15_unet = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    }
    sdxl_unet = {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }

    def linear_and_conv(prefix: str, model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        # transformers >= 5 flattened CLIPTextModel (no ``text_model`` child);
        # files (kohya, diffusers, older PEFT) and our canonical paths keep the
        # classic ``text_model.`` level, so put it back.
        if prefix.startswith("text_encoder") and not hasattr(model, "text_model"):
            prefix = f"{prefix}.text_model"
        return {
            f"{prefix}.{name}": tuple(int(s) for s in mod.weight.shape)
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d)
        }

    with torch.device("meta"):
        out = {
            "sd1": {
                **linear_and_conv("unet", UNet2DConditionModel(**sd15_unet)),
                **linear_and_conv("text_encoder", CLIPTextModel(CLIPTextConfig(**clip_l))),
            },
            "sdxl": {
                **linear_and_conv("unet", UNet2DConditionModel(**sdxl_unet)),
                **linear_and_conv("text_encoder", CLIPTextModel(CLIPTextConfig(**clip_l))),
                **linear_and_conv(
                    "text_encoder_2", CLIPTextModelWithProjection(CLIPTextConfig(**clip_bigg))
                ),
            },
        }
    return out


def _tables_json(tables: Mapping[str, Mapping[str, Sequence[int]]]) -> str:
    # One module per line: compact yet diff-friendly.
    lines = ["{", f'"version": {_TABLE_VERSION},', '"families": {']
    fams = list(tables)
    for i, fam in enumerate(fams):
        lines.append(f'"{fam}": [')
        items = list(tables[fam].items())
        for j, (name, shape) in enumerate(items):
            comma = "," if j < len(items) - 1 else ""
            lines.append(json.dumps([name, list(shape)], separators=(",", ":")) + comma)
        lines.append("]" + ("," if i < len(fams) - 1 else ""))
    lines += ["}", "}"]
    return "\n".join(lines) + "\n"


def regenerate_tables(path: str | Path | None = None) -> Path:
    """Derive the tables on the ``meta`` device and write the JSON file.

    Parameters
    ----------
    path : str or pathlib.Path, optional
        Output file; default the shipped ``w2wkit/data/module_tables.json``.
    """
    from w2wkit.stio import atomic_path

    out = Path(path) if path is not None else _DATA_FILE
    text = _tables_json(derive_module_tables())
    with atomic_path(out, overwrite=True) as tmp:
        Path(tmp).write_text(text)
    load_module_tables.cache_clear()
    _family_sets.cache_clear()
    vocabulary.cache_clear()
    _split_cached.cache_clear()
    return out


# --------------------------------------------------------------------------- segments


@functools.cache
def vocabulary() -> frozenset[str]:
    """Known name segments: every segment of the shipped tables plus extras.

    A *segment* is one dot-separated part of a module path that is not a
    number (``down_blocks``, ``to_q``, ``self_attn``, ``fc1``).
    """
    words = set(_EXTRA_SEGMENTS)
    try:
        tables = load_module_tables()
    except FormatError:  # tables missing: the hand list still works
        tables = {}
    for table in tables.values():
        for path in table:
            words.update(s for s in path.split(".") if not s.isdigit())
    return frozenset(words)


def split_segments(underscored: str, vocab: Iterable[str] | None = None) -> list[str]:
    """Put the dots back into a module name whose dots became underscores.

    The name is cut at underscores into *atoms*; atoms are grouped into the
    fewest segments such that every segment is a known vocabulary word or a
    number, by dynamic programming. Atoms that fit no word stay single
    segments (the fewest such atoms are used).

    Parameters
    ----------
    underscored : str
        For example ``down_blocks_0_attentions_0_proj_in``.
    vocab : iterable of str, optional
        Segment vocabulary; default :func:`vocabulary`.

    Returns
    -------
    list of str
        For example ``["down_blocks", "0", "attentions", "0", "proj_in"]``.
    """
    if vocab is None:
        return list(_split_cached(underscored))
    return _split(underscored, frozenset(vocab))


@functools.lru_cache(maxsize=65536)
def _split_cached(underscored: str) -> tuple[str, ...]:
    return tuple(_split(underscored, vocabulary()))


def _split(underscored: str, vocab: frozenset[str]) -> list[str]:
    atoms = underscored.split("_")
    n = len(atoms)
    longest = max((w.count("_") + 1 for w in vocab), default=1)
    inf = (n + 1, n + 1)
    # best[i] = (unknown atoms, segments) for atoms[i:], choice[i] = end of first segment
    best: list[tuple[int, int]] = [inf] * (n + 1)
    choice = [0] * (n + 1)
    best[n] = (0, 0)
    for i in range(n - 1, -1, -1):
        for j in range(i + 1, min(n, i + longest) + 1):
            word = "_".join(atoms[i:j])
            if word in vocab or (j == i + 1 and word.isdigit()):
                unknown = 0
            elif j == i + 1:
                unknown = 1
            else:
                continue
            rest = best[j]
            cost = (rest[0] + unknown, rest[1] + 1)
            if cost < best[i]:
                best[i], choice[i] = cost, j
    segments, i = [], 0
    while i < n:
        j = choice[i]
        segments.append("_".join(atoms[i:j]))
        i = j
    return segments


# --------------------------------------------------------------------------- sgm


_SGM_TOP_INV = {v: k for k, v in SGM_TOP_LEVEL.items()}
_SGM_RESNET_INV = {v: k for k, v in SGM_RESNET.items()}
_SGM_MIDDLE_INV = {v: k for k, v in SGM_MIDDLE.items()}
_RE_SGM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)$")
_RE_SGM_MIDDLE = re.compile(r"^middle_block\.(\d+)\.(.+)$")
_RE_DIFF_BLOCK = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$"
)
_RE_DIFF_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")

#: Which SDXL up blocks hold attentions (decides where sgm puts the upsampler).
SDXL_UP_BLOCK_ATTENTION = (True, True, False)


def _rename_prefix(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def sgm_to_diffusers(path: str, *, layers_per_block: int = 2) -> str:
    """Translate a UNet-internal sgm/LDM module name to its diffusers name.

    Parameters
    ----------
    path : str
        Dotted name inside the UNet, e.g. ``input_blocks.4.1.proj_in``.
    layers_per_block : int
        ``L`` of the UNet (2 for SDXL). Down block ``i`` layer ``j`` is
        ``input_blocks.{(L+1)i+j+1}``, its downsampler
        ``input_blocks.{(L+1)(i+1)}.0.op``; up block ``i`` (``L+1`` layers)
        layer ``j`` is ``output_blocks.{(L+1)i+j}``.

    Returns
    -------
    str
        e.g. ``down_blocks.1.attentions.1.proj_in``.

    Raises
    ------
    FormatError
        When the name is not an sgm UNet module name.
    """
    if path in SGM_TOP_LEVEL:
        return SGM_TOP_LEVEL[path]
    per = layers_per_block + 1
    m = _RE_SGM_BLOCK.match(path)
    if m:
        head, idx, child, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        kind = _SGM_CHILD_KIND.get(rest.split(".", 1)[0])
        if kind is None or child not in _SGM_CHILD_INDEX[kind]:
            raise FormatError(f"unknown sgm UNet module {path!r}")
        if head == "input_blocks":
            if idx == 0:
                raise FormatError(f"unknown sgm UNet module {path!r}")
            block, layer = divmod(idx - 1, per)
            if kind == "downsamplers":
                # the downsampler sits alone at the last position of a block
                if layer != per - 1:
                    raise FormatError(f"unexpected downsampler position in {path!r}")
                rest = "conv" + rest[len("op") :]
                return f"down_blocks.{block}.downsamplers.0.{rest}"
            if kind == "resnets":
                rest = _rename_prefix(rest, SGM_RESNET)
            return f"down_blocks.{block}.{kind}.{layer}.{rest}"
        block, layer = divmod(idx, per)
        if kind == "upsamplers":
            return f"up_blocks.{block}.upsamplers.0.{rest}"
        if kind == "downsamplers":
            raise FormatError(f"unknown sgm UNet module {path!r}")
        if kind == "resnets":
            rest = _rename_prefix(rest, SGM_RESNET)
        return f"up_blocks.{block}.{kind}.{layer}.{rest}"
    m = _RE_SGM_MIDDLE.match(path)
    if m and m.group(1) in SGM_MIDDLE:
        child, rest = SGM_MIDDLE[m.group(1)], m.group(2)
        if child.startswith("resnets"):
            rest = _rename_prefix(rest, SGM_RESNET)
        return f"mid_block.{child}.{rest}"
    raise FormatError(f"unknown sgm UNet module {path!r}")


def diffusers_to_sgm(
    path: str,
    *,
    layers_per_block: int = 2,
    up_block_attention: Sequence[bool] = SDXL_UP_BLOCK_ATTENTION,
) -> str:
    """Translate a UNet-internal diffusers module name to sgm/LDM numbering.

    Inverse of :func:`sgm_to_diffusers`.

    Parameters
    ----------
    path : str
        e.g. ``up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_k``.
    layers_per_block : int
        ``L`` of the UNet (2 for SDXL).
    up_block_attention : sequence of bool
        Whether each up block has attentions; an up block's upsampler is
        child 2 of its last sgm output block when it has, child 1 otherwise.

    Returns
    -------
    str
        e.g. ``output_blocks.2.1.transformer_blocks.0.attn2.to_k``.
    """
    if path in _SGM_TOP_INV:
        return _SGM_TOP_INV[path]
    per = layers_per_block + 1
    m = _RE_DIFF_BLOCK.match(path)
    if m:
        head, block, kind, layer, rest = (
            m.group(1),
            int(m.group(2)),
            m.group(3),
            int(m.group(4)),
            m.group(5),
        )
        if kind == "resnets":
            rest = _rename_prefix(rest, _SGM_RESNET_INV)
        if head == "down_blocks":
            if kind == "downsamplers":
                rest = _rename_prefix(rest, {"conv": "op"})
                return f"input_blocks.{per * (block + 1)}.0.{rest}"
            if kind == "upsamplers":
                raise FormatError(f"no sgm name for diffusers module {path!r}")
            child = 0 if kind == "resnets" else 1
            return f"input_blocks.{per * block + layer + 1}.{child}.{rest}"
        if kind == "downsamplers":
            raise FormatError(f"no sgm name for diffusers module {path!r}")
        if kind == "upsamplers":
            has_attn = block < len(up_block_attention) and up_block_attention[block]
            return f"output_blocks.{per * block + per - 1}.{2 if has_attn else 1}.{rest}"
        child = 0 if kind == "resnets" else 1
        return f"output_blocks.{per * block + layer}.{child}.{rest}"
    m = _RE_DIFF_MID.match(path)
    if m:
        child = f"{m.group(1)}.{m.group(2)}"
        if child not in _SGM_MIDDLE_INV:
            raise FormatError(f"no sgm name for diffusers module {path!r}")
        rest = m.group(3)
        if m.group(1) == "resnets":
            rest = _rename_prefix(rest, _SGM_RESNET_INV)
        return f"middle_block.{_SGM_MIDDLE_INV[child]}.{rest}"
    raise FormatError(f"no sgm name for diffusers module {path!r}")


# --------------------------------------------------------------------------- kohya


_PREFIXES_LONGEST = sorted(KOHYA_PREFIXES, key=len, reverse=True)


def is_kohya_name(name: str) -> bool:
    """True when ``name`` starts with a kohya component prefix."""
    return name.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"))


@functools.lru_cache(maxsize=65536)
def kohya_to_module(kname: str, *, layers_per_block: int = 2) -> str:
    """Canonical module path of a kohya module name.

    sgm (SDXL) UNet names are recognised by their first segment
    (``input_blocks``, ``middle_block``, ``output_blocks``, ``time_embed``,
    ``label_emb``, ``out``) and renumbered to diffusers names.

    Parameters
    ----------
    kname : str
        e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``.
    layers_per_block : int
        ``L`` used for sgm numbering (2 for SDXL).

    Returns
    -------
    str
        e.g. ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``.

    Raises
    ------
    FormatError
        When the name has no kohya prefix or is an unknown sgm name.
    """
    for prefix in _PREFIXES_LONGEST:
        if kname.startswith(prefix):
            component = KOHYA_PREFIXES[prefix]
            body = kname[len(prefix) :]
            break
    else:
        raise FormatError(
            "not a kohya module name (expected lora_unet_, lora_te_, lora_te1_ or lora_te2_)",
            key=kname,
        )
    if not body:
        raise FormatError("empty kohya module name", key=kname)
    dotted = ".".join(_split_cached(body))
    if component == "unet" and dotted.split(".", 1)[0] in _SGM_HEADS:
        try:
            dotted = sgm_to_diffusers(dotted, layers_per_block=layers_per_block)
        except FormatError as exc:
            raise FormatError(exc.message, key=kname) from None
    return f"{component}.{dotted}"


def module_to_kohya(
    path: str,
    *,
    sgm: bool = False,
    dual_text_encoders: bool = False,
    layers_per_block: int = 2,
    up_block_attention: Sequence[bool] = SDXL_UP_BLOCK_ATTENTION,
) -> str:
    """kohya module name of a canonical module path.

    Parameters
    ----------
    path : str
        e.g. ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``.
    sgm : bool
        Number UNet modules the sgm/LDM way (SDXL files).
    dual_text_encoders : bool
        Use ``lora_te1_`` for ``text_encoder`` (SDXL); default ``lora_te_``.
    layers_per_block, up_block_attention
        See :func:`diffusers_to_sgm`.

    Returns
    -------
    str
        e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``.

    Raises
    ------
    FormatError
        When the component is not ``unet``, ``text_encoder`` or
        ``text_encoder_2``, or (with ``sgm``) the UNet module has no sgm name.
    """
    return _module_to_kohya(
        path, sgm, dual_text_encoders, layers_per_block, tuple(up_block_attention)
    )


_COMPONENT_PREFIX = {
    ("unet", False): "lora_unet_",
    ("unet", True): "lora_unet_",
    ("text_encoder", False): "lora_te_",
    ("text_encoder", True): "lora_te1_",
    ("text_encoder_2", False): "lora_te2_",
    ("text_encoder_2", True): "lora_te2_",
}


@functools.lru_cache(maxsize=65536)
def _module_to_kohya(
    path: str, sgm: bool, dual: bool, layers_per_block: int, up_attn: tuple[bool, ...]
) -> str:
    component, _, inner = path.partition(".")
    prefix = _COMPONENT_PREFIX.get((component, dual))
    if prefix is None or not inner:
        raise FormatError(
            "module has no kohya name (component must be unet, text_encoder or text_encoder_2)",
            key=path,
        )
    if component == "unet" and sgm:
        try:
            inner = diffusers_to_sgm(
                inner, layers_per_block=layers_per_block, up_block_attention=up_attn
            )
        except FormatError as exc:
            raise FormatError(exc.message, key=path) from None
    return prefix + "_".join(inner.split("."))


# --------------------------------------------------------------------------- CLI


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m w2wkit.names", description="Module-name tables of SD1.5 and SDXL."
    )
    parser.add_argument(
        "--regenerate",
        action="store_true",
        help="derive the tables on the meta device and rewrite the shipped JSON file",
    )
    parser.add_argument("--output", help="write the tables here instead of the shipped file")
    parser.add_argument("--check", action="store_true", help="exit 1 if the shipped file is stale")
    args = parser.parse_args(argv)
    if args.check:
        fresh = _tables_json(derive_module_tables())
        return 0 if _DATA_FILE.read_text() == fresh else 1
    if args.regenerate or args.output:
        out = regenerate_tables(args.output)
        counts = {fam: len(t) for fam, t in json.loads(out.read_text())["families"].items()}
        print(f"wrote {out}: {counts}")
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
