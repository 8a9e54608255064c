"""The key rules of ComfyUI, A1111 and kohya sd-scripts, re-implemented from their documented facts.

Each ``*_apply`` function takes the tensors of a LoRA file and the model family
(``"sd1"``/``"sdxl"``, full size) and returns what that program would add to
each weight of its own model, keyed by the weight's name *in that program*,
plus the file's keys it leaves unused. Nothing here imports w2wkit's own name
translation: the LDM ("sgm") numbering of the UNet is derived below from the
block structure, the way these programs derive it, so a wrong name in a file
w2wkit writes shows up as an unused key or a missing weight.

Facts used (from the programs' sources, reading only):

* **ComfyUI** (``comfy/lora.py``): a key map from LoRA module names to model
  weights. UNet: ``lora_unet_<ldm name>`` and ``lora_unet_<diffusers name>``
  (underscores), ``<diffusers name>`` and ``unet.<diffusers name>`` where
  ``.to_`` is spelled ``.processor.to_`` and ``to_out.0`` as ``to_out`` (the old
  attention-processor names). CLIP (32 layers x ``mlp.fc1/fc2``,
  ``self_attn.q/k/v/out_proj``): SD1 ``lora_te_``/``lora_te1_`` and
  ``text_encoder.text_model...``; SDXL ``lora_te1_`` + ``text_encoder.`` for
  CLIP-L, ``lora_te2_`` + ``text_encoder_2.`` for CLIP-G, plus
  ``lora_te2_text_projection`` (and ``lora_te1_text_projection``). For each
  module it looks for ``.lora_up.weight``/``.lora_down.weight``,
  ``_lora.up.weight``, ``.lora_B.weight``/``.lora_A.weight``,
  ``.lora.up.weight`` and ``.lora_linear_layer.up.weight``; the patch is
  ``(alpha / rank) * up @ down`` with ``alpha`` from ``<module>.alpha`` and
  scale 1 without it (the header is not read).
* **A1111** (``extensions-builtin/Lora``): ``convert_diffusers_name_to_compvis``
  turns diffusers-numbered kohya names into LDM names with SD1 arithmetic;
  otherwise ``lora_unet`` becomes ``diffusion_model`` and ``lora_te1_text_model``
  ``0_transformer_text_model``; names are matched against the model's
  ``named_modules`` with dots as underscores (SD1 text encoder
  ``transformer_text_model_...``; SDXL ``0_transformer_...`` and OpenCLIP
  ``1_model_transformer_resblocks_N_{attn,attn_out_proj,mlp_c_fc,mlp_c_proj}``,
  q/k/v going to slices of ``attn.in_proj_weight``); only keys whose module
  part has no dot (``lora_...``) are considered. Scale ``alpha / dim``.
* **kohya sd-scripts** (``networks/lora.py``): ``LoRANetwork`` wraps the
  Linear/Conv2d children of ``Transformer2DModel``, ``ResnetBlock2D``,
  ``Downsample2D``, ``Upsample2D`` (UNet; SD1 with diffusers names, SDXL with
  LDM names) and ``CLIPAttention``/``CLIPMLP`` (text encoders; ``lora_te_``
  for SD1, ``lora_te1_``/``lora_te2_`` for SDXL), loads with ``strict=False``
  (unknown keys are ignored). Scale ``alpha / dim``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import numpy as np

from w2wkit.names import module_table

RESNET_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TOP_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}
CLIP_LAYER = (
    "mlp.fc1",
    "mlp.fc2",
    "self_attn.k_proj",
    "self_attn.q_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
)


@functools.cache
def unet_modules(family: str) -> list[str]:
    """Diffusers names (without ``unet.``) of the family's UNet Linear/Conv2d modules."""
    return [m[5:] for m in module_table(family) if m.startswith("unet.")]


@functools.cache
def text_modules(family: str, component: str) -> list[str]:
    """Module names (without the component) of a text encoder of the family."""
    p = component + "."
    return [m[len(p) :] for m in module_table(family) if m.startswith(p)]


@functools.cache
def _up_blocks_with_attention(family: str) -> frozenset[int]:
    return frozenset(
        int(m.split(".")[1])
        for m in unet_modules(family)
        if m.startswith("up_blocks.") and ".attentions." in m
    )


@functools.cache
def ldm_name(family: str, name: str) -> str:
    """LDM name of a diffusers UNet module: 3 input blocks per level (2 layers + sampler)."""
    up_attn = _up_blocks_with_attention(family)
    for k, v in TOP_LDM.items():
        if name == k:
            return v
    parts = name.split(".")
    if parts[0] == "down_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "downsamplers":
            return f"input_blocks.{3 * (i + 1)}.0.op"
        if kind == "resnets":
            return f"input_blocks.{1 + 3 * i + j}.0.{RESNET_LDM.get(rest, rest)}"
        return f"input_blocks.{1 + 3 * i + j}.1.{rest}"
    if parts[0] == "up_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "upsamplers":
            return f"output_blocks.{3 * i + 2}.{2 if i in up_attn else 1}.conv"
        if kind == "resnets":
            return f"output_blocks.{3 * i + j}.0.{RESNET_LDM.get(rest, rest)}"
        return f"output_blocks.{3 * i + j}.1.{rest}"
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{RESNET_LDM.get(rest, rest)}"
    raise KeyError(name)


def _u(name: str) -> str:
    return name.replace(".", "_")


def _delta(up: np.ndarray, down: np.ndarray, shape: tuple[int, ...], scale: float) -> np.ndarray:
    d = up.reshape(up.shape[0], -1).astype(np.float64) @ down.reshape(down.shape[0], -1).astype(
        np.float64
    )
    return (scale * d).reshape(shape)


# ------------------------------------------------------------------ ComfyUI


@functools.cache
def comfyui_weights(family: str) -> dict[str, tuple[int, ...]]:
    """ComfyUI's model weight keys with shapes (UNet in LDM names; CLIP-L, CLIP-G)."""
    table = module_table(family)
    out = {}
    for m in unet_modules(family):
        out[f"diffusion_model.{ldm_name(family, m)}.weight"] = table[f"unet.{m}"]
    clips = {
        "sd1": {"text_encoder": "clip_l"},
        "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    }
    for comp, clip in clips[family].items():
        for m in text_modules(family, comp):
            out[f"{clip}.transformer.{m}.weight"] = table[f"{comp}.{m}"]
    return out


@functools.cache
def comfyui_key_map(family: str) -> dict[str, str]:
    """LoRA module name -> ComfyUI weight key."""
    km: dict[str, str] = {}
    for m in unet_modules(family):
        w = f"diffusion_model.{ldm_name(family, m)}.weight"
        km[f"lora_unet_{_u(ldm_name(family, m))}"] = w
        km[f"lora_unet_{_u(m)}"] = w
        for prefix in ("", "unet."):
            k = prefix + m.replace(".to_", ".processor.to_")
            if k.endswith(".to_out.0"):
                k = k[:-2]
            km[k] = w
    l_present = False
    for b in range(32):
        for c in CLIP_LAYER:
            l_key = f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if f"text_encoder.text_model.encoder.layers.{b}.{c}" in module_table(family):
                km[f"lora_te_text_model_encoder_layers_{b}_{_u(c)}"] = l_key
                km[f"lora_te1_text_model_encoder_layers_{b}_{_u(c)}"] = l_key
                km[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = l_key
                l_present = True
            g_key = f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight"
            if f"text_encoder_2.text_model.encoder.layers.{b}.{c}" in module_table(family):
                assert l_present
                km[f"lora_te2_text_model_encoder_layers_{b}_{_u(c)}"] = g_key
                km[f"text_encoder_2.text_model.encoder.layers.{b}.{c}"] = g_key
    if "text_encoder_2.text_projection" in module_table(family):
        km["lora_te2_text_projection"] = "clip_g.transformer.text_projection.weight"
    return km


_COMFY_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)


def comfyui_apply(
    lora: Mapping[str, np.ndarray], family: str
) -> tuple[dict[str, np.ndarray], set[str]]:
    """What ComfyUI's LoRA loader adds to each weight, and the keys it does not load."""
    weights = comfyui_weights(family)
    loaded: set[str] = set()
    patches: dict[str, np.ndarray] = {}
    for x, w in comfyui_key_map(family).items():
        for up_s, down_s in _COMFY_PAIRS:
            if x + up_s in lora:
                up, down = lora[x + up_s], lora[x + down_s]
                alpha = lora.get(f"{x}.alpha")
                scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
                patches[w] = _delta(up, down, weights[w], scale)
                loaded |= {x + up_s, x + down_s} | ({f"{x}.alpha"} if alpha is not None else set())
                break
    return patches, set(lora) - loaded


def comfyui_key(family: str, module: str) -> str:
    """The ComfyUI weight a canonical module path is."""
    comp, _, rest = module.partition(".")
    if comp == "unet":
        return f"diffusion_model.{ldm_name(family, rest)}.weight"
    clip = "clip_g" if comp == "text_encoder_2" else "clip_l"
    return f"{clip}.transformer.{rest}.weight"


# ------------------------------------------------------------------ A1111


@functools.cache
def a1111_layers(family: str) -> dict[str, tuple[int, ...]]:
    """A1111's ``network_layer_mapping`` names and shapes (OpenCLIP q/k/v as ``attn:q``)."""
    table = module_table(family)
    out = {}
    for m in unet_modules(family):
        out[f"diffusion_model_{_u(ldm_name(family, m))}"] = table[f"unet.{m}"]
    te1 = "transformer_" if family == "sd1" else "0_transformer_"
    for m in text_modules(family, "text_encoder"):
        out[te1 + _u(m)] = table[f"text_encoder.{m}"]
    if family == "sdxl":
        for m in text_modules(family, "text_encoder_2"):
            mm = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", m)
            if mm is None:
                continue  # text_projection: a parameter in OpenCLIP, no layer
            b, c = mm.groups()
            base = f"1_model_transformer_resblocks_{b}"
            name = {
                "self_attn.q_proj": f"{base}_attn:q",
                "self_attn.k_proj": f"{base}_attn:k",
                "self_attn.v_proj": f"{base}_attn:v",
                "self_attn.out_proj": f"{base}_attn_out_proj",
                "mlp.fc1": f"{base}_mlp_c_fc",
                "mlp.fc2": f"{base}_mlp_c_proj",
            }[c]
            out[name] = table[f"text_encoder_2.{m}"]
    return out


_A1111_RESNET = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def a1111_compvis(key: str) -> str:
    """A1111's ``convert_diffusers_name_to_compvis`` (SD1 arithmetic, not SD2)."""

    def res(kind: str, rest: str) -> str:
        return _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest

    rules = (
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[0]}"),
        (r"lora_unet_conv.out(.*)", lambda m: f"diffusion_model_out_2{m[0]}"),
        (
            r"lora_unet_time.embedding.linear_(\d+)(.*)",
            lambda m: f"diffusion_model_time_embed_{int(m[0]) * 2 - 2}{m[1]}",
        ),
        (
            r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_input_blocks_{1 + int(m[0]) * 3 + int(m[2])}_"
                f"{1 if m[1] == 'attentions' else 0}_{res(m[1], m[3])}"
            ),
        ),
        (
            r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else int(m[1]) * 2}_"
                f"{res(m[0], m[2])}"
            ),
        ),
        (
            r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda m: (
                f"diffusion_model_output_blocks_{int(m[0]) * 3 + int(m[2])}_"
                f"{1 if m[1] == 'attentions' else 0}_{res(m[1], m[3])}"
            ),
        ),
        (
            r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
            lambda m: f"diffusion_model_input_blocks_{3 + int(m[0]) * 3}_0_op",
        ),
        (
            r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
            lambda m: (
                f"diffusion_model_output_blocks_{2 + int(m[0]) * 3}_"
                f"{2 if int(m[0]) > 0 else 1}_conv"
            ),
        ),
        (
            r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
            lambda m: f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}",
        ),
        (
            r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
            lambda m: (
                f"1_model_transformer_resblocks_{m[0]}_"
                + m[1]
                .replace("mlp_fc1", "mlp_c_fc")
                .replace("mlp_fc2", "mlp_c_proj")
                .replace("self_attn", "attn")
            ),
        ),
    )
    for pattern, build in rules:
        mm = re.match(pattern, key)
        if mm:
            return build(mm.groups())
    return key


def a1111_apply(
    lora: Mapping[str, np.ndarray], family: str
) -> tuple[dict[str, np.ndarray], set[str]]:
    """What A1111's Lora extension adds to each layer, and the keys it leaves unmatched."""
    layers = a1111_layers(family)
    groups: dict[str, dict[str, np.ndarray]] = {}
    unused: set[str] = set()
    for key, value in lora.items():
        name, _, part = key.partition(".")
        target = a1111_compvis(name)
        if target not in layers:
            mm = re.match(r"(.*)_([qkv])_proj$", target)
            if mm and f"{mm[1]}:{mm[2]}" in layers:
                target = f"{mm[1]}:{mm[2]}"
            elif "lora_unet" in name and name.replace("lora_unet", "diffusion_model") in layers:
                target = name.replace("lora_unet", "diffusion_model")
            elif "lora_te1_text_model" in name:
                target = name.replace("lora_te1_text_model", "0_transformer_text_model")
                if target not in layers:
                    target = name.replace("lora_te1_text_model", "transformer_text_model")
        if target not in layers:
            unused.add(key)
            continue
        groups.setdefault(target, {})[part] = value
    patches = {}
    for target, parts in groups.items():
        up, down = parts["lora_up.weight"], parts["lora_down.weight"]
        alpha = parts.get("alpha")
        scale = 1.0 if alpha is None else float(alpha) / up.shape[1]
        patches[target] = _delta(up, down, layers[target], scale)
    return patches, unused


def a1111_key(family: str, module: str) -> str:
    """The A1111 layer (or ``attn:q`` slice) a canonical module path is."""
    comp, _, rest = module.partition(".")
    if comp == "unet":
        return f"diffusion_model_{_u(ldm_name(family, rest))}"
    if comp == "text_encoder":
        return ("transformer_" if family == "sd1" else "0_transformer_") + _u(rest)
    mm = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)$", rest)
    if mm is None:
        return "<no layer>"
    b, c = mm.groups()
    base = f"1_model_transformer_resblocks_{b}"
    return {
        "self_attn.q_proj": f"{base}_attn:q",
        "self_attn.k_proj": f"{base}_attn:k",
        "self_attn.v_proj": f"{base}_attn:v",
        "self_attn.out_proj": f"{base}_attn_out_proj",
        "mlp.fc1": f"{base}_mlp_c_fc",
        "mlp.fc2": f"{base}_mlp_c_proj",
    }[c]


# ------------------------------------------------------------------ kohya sd-scripts


@functools.cache
def sd_scripts_modules(family: str) -> dict[str, tuple[int, ...]]:
    """``lora_name -> weight shape`` of every module sd-scripts' LoRANetwork can wrap."""
    table = module_table(family)
    out = {}
    for m in unet_modules(family):
        if not re.search(r"\.(attentions|resnets|downsamplers|upsamplers)\.\d+\.", f".{m}"):
            continue  # conv_in, conv_out, time/label embeddings sit outside the target blocks
        name = ldm_name(family, m) if family == "sdxl" else m
        out[f"lora_unet_{_u(name)}"] = table[f"unet.{m}"]
    te = {
        "sd1": {"text_encoder": "lora_te"},
        "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    }
    for comp, prefix in te[family].items():
        for m in text_modules(family, comp):
            if re.search(r"\.(self_attn|mlp)\.", m):
                out[f"{prefix}_{_u(m)}"] = table[f"{comp}.{m}"]
    return out


def sd_scripts_apply(
    lora: Mapping[str, np.ndarray], family: str
) -> tuple[dict[str, np.ndarray], set[str]]:
    """What ``create_network_from_weights`` + ``load_state_dict(strict=False)`` applies."""
    modules = sd_scripts_modules(family)
    patches = {}
    used: set[str] = set()
    names = {k.split(".", 1)[0] for k in lora if k.endswith(".lora_down.weight")}
    for name in names:
        if name not in modules:
            continue  # no such module in the network: strict=False ignores its keys
        down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
        alpha = lora.get(f"{name}.alpha")
        dim = down.shape[0]
        scale = (dim if alpha is None else float(alpha)) / dim
        patches[name] = _delta(up, down, modules[name], scale)
        used |= {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    return patches, set(lora) - used


def sd_scripts_key(family: str, module: str) -> str:
    """sd-scripts' LoRA module name of a canonical module path."""
    comp, _, rest = module.partition(".")
    if comp == "unet":
        return f"lora_unet_{_u(ldm_name(family, rest) if family == 'sdxl' else rest)}"
    prefix = {
        "sd1": {"text_encoder": "lora_te"},
        "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    }
    return f"{prefix[family][comp]}_{_u(rest)}"


EMULATED = {
    "comfyui": (comfyui_apply, comfyui_key),
    "a1111": (a1111_apply, a1111_key),
    "kohya-scripts": (sd_scripts_apply, sd_scripts_key),
}
