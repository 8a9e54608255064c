"""The compatibility matrix: every format w2wkit writes, in every loader, against its own rules.

ComfyUI, A1111 and kohya sd-scripts are checked with re-implementations of their
key rules (``tests/_loader_rules.py``) on the full-size SD1.5 and SDXL module
names; diffusers and PEFT by really loading the files into tiny SD1 and SDXL
pipelines built from configs. In every cell, what the loader applies must be
exactly w2wkit's delta, and what it drops or mis-scales must be exactly what
``w2wkit.formats.targets.loader_gaps`` predicts (the gaps w2wkit warns about).
The adapters have mixed ranks and mixed per-module alphas, linear and conv
layers, UNet and text encoders (the table is in docs/formats.md).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from _loader_rules import EMULATED

from w2wkit.formats import read_adapter, write_adapter
from w2wkit.formats.targets import TARGETS, loader_gaps
from w2wkit.names import module_table
from w2wkit.stio import read_safetensors
from w2wkit.testing import random_adapter, relative_error

A = "attentions.0.transformer_blocks.0"
MODULES = {
    "sd1": [
        f"unet.down_blocks.0.{A}.attn1.to_q",
        f"unet.down_blocks.0.{A}.attn2.to_out.0",
        f"unet.down_blocks.1.{A}.ff.net.0.proj",
        "unet.down_blocks.0.attentions.0.proj_in",  # conv 1x1
        "unet.down_blocks.0.resnets.0.conv1",  # conv 3x3
        "unet.down_blocks.1.resnets.0.time_emb_proj",
        "unet.down_blocks.1.resnets.0.conv_shortcut",
        "unet.down_blocks.0.downsamplers.0.conv",
        "unet.up_blocks.2.upsamplers.0.conv",
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_v",
        f"unet.mid_block.{A}.attn2.to_k",
        "unet.mid_block.resnets.1.time_emb_proj",
        "unet.conv_in",
        "unet.time_embedding.linear_1",
        "unet.conv_out",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder.text_model.encoder.layers.11.self_attn.out_proj",
        "text_encoder.text_model.encoder.layers.3.mlp.fc1",
    ],
    "sdxl": [
        f"unet.down_blocks.1.{A}.attn1.to_q",
        "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
        "unet.down_blocks.1.attentions.0.proj_in",  # linear in SDXL
        "unet.down_blocks.0.resnets.1.conv1",
        "unet.down_blocks.1.resnets.0.conv_shortcut",
        "unet.down_blocks.0.downsamplers.0.conv",
        "unet.up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2",
        "unet.up_blocks.1.upsamplers.0.conv",
        "unet.up_blocks.2.resnets.2.time_emb_proj",
        f"unet.mid_block.{A}.attn1.to_k",
        "unet.mid_block.resnets.0.time_emb_proj",
        "unet.conv_in",
        "unet.add_embedding.linear_2",
        "unet.time_embedding.linear_2",
        "text_encoder.text_model.encoder.layers.0.self_attn.v_proj",
        "text_encoder.text_model.encoder.layers.5.mlp.fc2",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj",
        "text_encoder_2.text_model.encoder.layers.7.mlp.fc1",
        "text_encoder_2.text_projection",
    ],
}


def mixed(shapes, seed=0):
    """Mixed ranks (2, 3, 4) and mixed alphas (most common 4; also 1, 0.5, 16)."""
    mods = list(shapes)
    ranks = {m: (2, 3, 4)[i % 3] for i, m in enumerate(mods)}
    alphas = {m: (4.0, 4.0, 1.0, 4.0, 0.5, 16.0)[i % 6] for i, m in enumerate(mods)}
    return random_adapter(shapes, rank=ranks, alpha=alphas, seed=seed, scale=0.2)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def full_size(request):
    table = module_table(request.param)
    return request.param, mixed({m: table[m] for m in MODULES[request.param]})


def _tensors(path):
    return {} if path.is_dir() else dict(read_safetensors(path).tensors)


@pytest.mark.parametrize(
    "target",
    [
        # a1111 and kohya-scripts get the same kohya file as comfyui (only the notes differ)
        pytest.param(t, marks=pytest.mark.slow) if t in ("a1111", "kohya-scripts") else t
        for t in TARGETS
    ],
)
def test_emulated_loaders_agree_with_w2wkit(tmp_path, full_size, target):
    """ComfyUI, A1111 and sd-scripts rules, on a file written --for each target."""
    family, adapter = full_size
    notes: list[str] = []
    fmt = TARGETS[target]
    path = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    write_adapter(adapter, path, target=target, warn=notes.append)
    written = read_adapter(path)
    lora = _tensors(path)
    for loader, (apply, key_of) in EMULATED.items():
        patches, unused = apply(lora, family)
        gaps = loader_gaps(written, fmt, loader)
        dropped = {m for g in gaps if "scale" not in g.reason for m in g.modules}
        misscaled = {m for g in gaps if "scale" in g.reason for m in g.modules}
        expected_keys = {key_of(family, m) for m in adapter.layers if m not in dropped}
        assert set(patches) == expected_keys, (loader, target)
        for m in adapter.layers:
            if m in dropped:
                continue
            err = relative_error(patches[key_of(family, m)], adapter[m].delta())
            if m in misscaled:
                assert err > 1e-3, (loader, m)
            else:
                assert err < 1e-6, (loader, target, m, err)
        if loader == target:
            # what the named loader leaves out (its own limits) was said when writing
            assert all(g.message(fmt) in notes for g in gaps), (notes, gaps)
            assert len(unused) == 3 * len(dropped)  # down, up, alpha of each dropped module
            if loader == "comfyui":  # ComfyUI reads every module w2wkit writes for it
                assert not gaps and not unused
    # every kohya file has one alpha for all modules (folded): same deltas everywhere
    if fmt == "kohya":
        assert len({float(la.alpha) for la in written.layers.values()}) == 1
        assert any("folded" in n for n in notes)
        for m, la in adapter.items():
            assert relative_error(written[m].delta(), la.delta()) < 1e-6


def test_keep_alphas_keeps_them(tmp_path, full_size):
    family, adapter = full_size
    path = tmp_path / "k.safetensors"
    notes: list[str] = []
    write_adapter(adapter, path, target="comfyui", keep_alphas=True, warn=notes.append)
    assert not notes
    back = read_adapter(path)
    assert {m: la.alpha for m, la in back.items()} == {m: la.alpha for m, la in adapter.items()}
    # the loaders that read .alpha per module apply them right
    for loader in ("comfyui", "a1111", "kohya-scripts"):
        apply, key_of = EMULATED[loader]
        patches, _ = apply(_tensors(path), family)
        for m, la in adapter.items():
            if key_of(family, m) in patches:
                assert relative_error(patches[key_of(family, m)], la.delta()) < 1e-6


@pytest.mark.parametrize(
    ("fmt", "target", "words"),
    [
        ("diffusers", "comfyui", ["ComfyUI", "to_q", "attention-processor"]),
        ("kohya", "kohya-scripts", ["sd-scripts", "unet.conv_in", "strict=False"]),
        ("kohya", "a1111", ["A1111", "text_projection"]),
        ("peft", "comfyui", ["ComfyUI", "not loaded"]),
    ],
)
def test_partial_reads_warn_naming_loader_and_keys(tmp_path, full_size, fmt, target, words):
    family, adapter = full_size
    if target == "a1111" and family == "sd1":
        pytest.skip("SD1 has no text_projection: A1111 reads every SD1 kohya module")
    notes: list[str] = []
    path = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    write_adapter(adapter, path, format=fmt, target=target, warn=notes.append)
    text = " ".join(notes)
    for w in words:
        assert w in text, (w, notes)


# ------------------------------------------------------------------ really loading


def tiny_sdxl_pipeline(seed=0):
    """A complete, random ``StableDiffusionXLPipeline`` from configs (two text encoders)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from w2wkit.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 12,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
    )

    def clip(cls, **extra):
        torch.manual_seed(seed)
        cfg = CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=12,
            intermediate_size=24,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=tok.model_max_length,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **extra,
        )
        return cls(cfg).eval()

    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=clip(CLIPTextModel),
        text_encoder_2=clip(CLIPTextModelWithProjection, projection_dim=12),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(),
    )


def _linear_conv(pipe, component, patterns):
    import torch

    from w2wkit.testing import component_module

    model = getattr(pipe, component)
    flattened = component.startswith("text_encoder") and not hasattr(model, "text_model")
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d) and any(
            name.endswith(p) for p in patterns
        ):
            full = f"text_model.{name}" if flattened and name != "text_projection" else name
            out[f"{component}.{full}"] = tuple(mod.weight.shape)
            assert component_module(pipe, f"{component}.{full}") is mod
    return out


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def tiny(request, tiny_pipe):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    pipe = tiny_pipe if request.param == "sd1" else tiny_sdxl_pipeline()
    unet_p = ("attn1.to_q", "attn2.to_out.0", "proj_in", "resnets.0.conv1", "time_emb_proj")
    te_p = ("self_attn.q_proj", "mlp.fc1")
    shapes = {**_linear_conv(pipe, "unet", unet_p), **_linear_conv(pipe, "text_encoder", te_p)}
    if request.param == "sdxl":
        shapes.update(_linear_conv(pipe, "text_encoder_2", (*te_p, "text_projection")))
    return request.param, pipe, mixed(shapes, seed=1)


def _weights(pipe, modules):
    from w2wkit.testing import component_module

    out = {}
    for m in modules:
        mod = component_module(pipe, m)
        mod = getattr(mod, "base_layer", mod)
        out[m] = mod.weight.detach().double().numpy().copy()
    return out


def _check(before, after, adapter, gaps):
    dropped = {m for g in gaps if "scale" not in g.reason for m in g.modules}
    misscaled = {m for g in gaps if "scale" in g.reason for m in g.modules}
    for m, la in adapter.items():
        change = after[m] - before[m]
        if m in dropped:
            assert np.abs(change).max() == 0, m
        elif m in misscaled:
            assert relative_error(change, la.delta()) > 1e-3, m
        else:  # fused weights equal base + delta
            assert relative_error(after[m], before[m] + la.delta()) < 1e-6, m
            assert relative_error(change, la.delta()) < 1e-4, m


def _diffusers_load(pipe, path):
    p = copy.deepcopy(pipe)
    p.load_lora_weights(str(path))
    p.fuse_lora(components=[c for c in ("unet", "text_encoder", "text_encoder_2") if hasattr(p, c)])
    return p


def _peft_load(pipe, folder):
    from peft import PeftModel

    p = copy.copy(pipe)
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        sub = folder if comp == "unet" else folder / comp
        if (sub / "adapter_config.json").is_file():
            model = PeftModel.from_pretrained(copy.deepcopy(getattr(pipe, comp)), str(sub))
            setattr(p, comp, model.merge_and_unload())
    return p


@pytest.mark.parametrize("target", ["diffusers", "peft", "comfyui"])
def test_really_loaded_in_diffusers_and_peft(tmp_path, tiny, target):
    """diffusers reads the diffusers and kohya files, PEFT the folder; gaps as predicted."""
    _family, pipe, adapter = tiny
    fmt = TARGETS[target]
    path = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    write_adapter(adapter, path, target=target, warn=lambda m: None)
    written = read_adapter(path)
    before = _weights(pipe, adapter.layers)
    if fmt == "peft":
        after = _weights(_peft_load(pipe, path), adapter.layers)
        assert not loader_gaps(written, fmt, "peft")
        _check(before, after, adapter, [])
        return
    after = _weights(_diffusers_load(pipe, path), adapter.layers)
    _check(before, after, adapter, loader_gaps(written, fmt, "diffusers"))
    if fmt == "diffusers":
        assert not loader_gaps(written, fmt, "diffusers")


def test_unfolded_alphas_are_misscaled_by_diffusers(tmp_path, tiny):
    """Why kohya output folds alphas: with --keep-alphas diffusers gets them wrong."""
    _family, pipe, adapter = tiny
    unet_only = type(adapter)({m: la for m, la in adapter.items() if m.startswith("unet.")})
    path = tmp_path / "k.safetensors"
    write_adapter(unet_only, path, format="kohya", keep_alphas=True)
    gaps = loader_gaps(read_adapter(path), "kohya", "diffusers")
    assert any("scale" in g.reason for g in gaps)
    after = _weights(_diffusers_load(pipe, path), unet_only.layers)
    _check(_weights(pipe, unet_only.layers), after, unet_only, gaps)


def test_sgm_named_sdxl_kohya_loads_in_diffusers(tmp_path, tiny):
    """SDXL kohya files use sgm names (w2wkit.names with the tiny UNet's 1 layer per block)."""
    from safetensors.numpy import save_file

    from w2wkit.formats.targets import fold_alphas
    from w2wkit.names import module_to_kohya

    family, pipe, adapter = tiny
    if family != "sdxl":
        pytest.skip("sgm names are SDXL's")
    unet, _ = fold_alphas(type(adapter)({m: la for m, la in adapter.items() if m[:5] == "unet."}))
    tensors = {}
    for m, la in unet.items():
        k = module_to_kohya(
            m,
            sgm=True,
            dual_text_encoders=True,
            layers_per_block=1,
            up_block_attention=(True, False),
        )
        assert k.startswith(
            ("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")
        )
        tensors |= {f"{k}.lora_down.weight": la.down, f"{k}.lora_up.weight": la.up}
        tensors[f"{k}.alpha"] = np.array(la.alpha, np.float32)
    path = tmp_path / "sgm.safetensors"
    save_file(tensors, str(path))
    after = _weights(_diffusers_load(pipe, path), unet.layers)
    _check(_weights(pipe, unet.layers), after, unet, [])
