"""kohya <-> canonical module names and the meta-device module tables."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from w2wkit.errors import FormatError
from w2wkit.names import (
    derive_module_tables,
    diffusers_to_sgm,
    guess_family,
    kohya_to_module,
    load_module_tables,
    module_table,
    module_to_kohya,
    sgm_to_diffusers,
    split_segments,
)

ATTN_PROJ = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


@pytest.fixture(scope="module")
def fresh_tables():
    """Tables derived now from diffusers/transformers classes on the meta device."""
    return derive_module_tables()


def test_shipped_tables_equal_fresh_meta_derivation(fresh_tables):
    shipped = load_module_tables()
    assert list(shipped) == list(fresh_tables) == ["sd1", "sdxl"]
    for fam in shipped:
        assert list(shipped[fam].items()) == list(fresh_tables[fam].items())


def test_table_sizes_match_known_architectures(fresh_tables):
    sd1_attn = [p for p in fresh_tables["sd1"] if p.startswith("unet.") and ATTN_PROJ.search(p)]
    sdxl_attn = [p for p in fresh_tables["sdxl"] if p.startswith("unet.") and ATTN_PROJ.search(p)]
    # SD1.5: 16 transformer blocks x 2 attentions x 4 projections
    assert len(sd1_attn) == 128
    # SDXL: (2*2 + 2*10 down, 10 mid, 3*2 + 3*10 up) = 70 blocks x 8 projections
    assert len(sdxl_attn) == 560
    # the w2w layout: to_q/to_v of SD1.5's 64 attention projections, rank 1
    qv = [p for p in sd1_attn if p.endswith(("to_q", "to_v"))]
    assert sum(sum(fresh_tables["sd1"][p][:2]) for p in qv) == 99_648
    assert fresh_tables["sdxl"]["text_encoder_2.text_projection"] == (1280, 1280)
    assert fresh_tables["sd1"]["text_encoder.text_model.encoder.layers.11.mlp.fc2"] == (768, 3072)


def test_sd15_attention_projections_round_trip(fresh_tables):
    paths = [p for p in fresh_tables["sd1"] if p.startswith("unet.") and ATTN_PROJ.search(p)]
    for path in paths:
        kname = module_to_kohya(path)
        # independent spelling: kohya SD1 names are the diffusers names with '_' for '.'
        assert kname == "lora_unet_" + path[len("unet.") :].replace(".", "_")
        assert kohya_to_module(kname) == path


def _diffusers_reference(knames):
    """Map SDXL kohya names through diffusers' own conversion code."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_unet_lora_key,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    sd = {f"{k}.lora_down.weight": k for k in knames}
    mapped = _maybe_map_sgm_blocks_to_diffusers(sd, SimpleNamespace(layers_per_block=2))
    out = {}
    for key, kname in mapped.items():
        name = _convert_unet_lora_key(key).replace(".processor", "")
        name = re.sub(r"\.to_out_lora\.down\.weight$", ".to_out.0", name)
        name = re.sub(r"(_lora|\.lora)\.down\.weight$", "", name)
        out[kname] = "unet." + name
    return out


def test_sdxl_attention_projections_round_trip_with_sgm_numbering(fresh_tables):
    paths = [p for p in fresh_tables["sdxl"] if p.startswith("unet.") and ATTN_PROJ.search(p)]
    knames = {p: module_to_kohya(p, sgm=True) for p in paths}
    assert all(k.startswith("lora_unet_") for k in knames.values())
    assert not any(
        "down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in knames.values()
    )
    reference = _diffusers_reference(knames.values())
    for path, kname in knames.items():
        assert reference[kname] == path
        assert kohya_to_module(kname) == path


def test_every_sdxl_unet_module_agrees_with_diffusers_conversion(fresh_tables):
    paths = [p for p in fresh_tables["sdxl"] if p.startswith("unet.")]
    knames = {p: module_to_kohya(p, sgm=True) for p in paths}
    reference = _diffusers_reference(knames.values())
    assert len(reference) == len(paths)
    for path, kname in knames.items():
        assert reference[kname] == path, kname
        assert kohya_to_module(kname) == path


@pytest.mark.parametrize(
    ("diffusers", "sgm"),
    [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1."),
        ("down_blocks.1.attentions.1.proj_in", "input_blocks.5.1."),
        ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", "input_blocks.8.1."),
        ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0."),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0."),
        ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0."),
        ("mid_block.resnets.0.time_emb_proj", "middle_block.0."),
        ("mid_block.attentions.0.transformer_blocks.3.ff.net.2", "middle_block.1."),
        ("mid_block.resnets.1.conv2", "middle_block.2."),
        ("up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0", "output_blocks.2.1."),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2."),
        ("up_blocks.1.resnets.0.conv1", "output_blocks.3.0."),
        ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0."),
    ],
)
def test_sgm_numbering_examples(diffusers, sgm):
    name = diffusers_to_sgm(diffusers)
    assert name.startswith(sgm)
    assert sgm_to_diffusers(name) == diffusers


def test_sgm_inner_resnet_and_top_level_names():
    assert diffusers_to_sgm("down_blocks.0.resnets.1.conv1") == "input_blocks.2.0.in_layers.2"
    assert diffusers_to_sgm("up_blocks.1.resnets.0.conv2") == "output_blocks.3.0.out_layers.3"
    assert diffusers_to_sgm("mid_block.resnets.0.time_emb_proj") == "middle_block.0.emb_layers.1"
    assert diffusers_to_sgm("down_blocks.0.downsamplers.0.conv") == "input_blocks.3.0.op"
    assert diffusers_to_sgm("conv_in") == "input_blocks.0.0"
    assert diffusers_to_sgm("add_embedding.linear_1") == "label_emb.0.0"
    assert kohya_to_module("lora_unet_out_2") == "unet.conv_out"
    assert kohya_to_module("lora_unet_time_embed_2") == "unet.time_embedding.linear_2"


@pytest.mark.parametrize(
    ("kname", "path"),
    [
        (
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        ),
        (
            "lora_te1_text_model_encoder_layers_11_mlp_fc1",
            "text_encoder.text_model.encoder.layers.11.mlp.fc1",
        ),
        (
            "lora_te2_text_model_encoder_layers_31_self_attn_out_proj",
            "text_encoder_2.text_model.encoder.layers.31.self_attn.out_proj",
        ),
        ("lora_te2_text_projection", "text_encoder_2.text_projection"),
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        ),
        ("lora_unet_time_embedding_linear_1", "unet.time_embedding.linear_1"),
        (
            "lora_unet_up_blocks_3_resnets_2_time_emb_proj",
            "unet.up_blocks.3.resnets.2.time_emb_proj",
        ),
        (
            "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
            "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        ),
    ],
)
def test_kohya_names_both_ways(kname, path):
    assert kohya_to_module(kname) == path
    dual = kname.startswith(("lora_te1_", "lora_te2_"))
    assert module_to_kohya(path, dual_text_encoders=dual) == kname


def test_text_encoder_tables_round_trip(fresh_tables):
    for fam, dual in (("sd1", False), ("sdxl", True)):
        for path in fresh_tables[fam]:
            if path.startswith("text_encoder"):
                kname = module_to_kohya(path, dual_text_encoders=dual)
                prefix = {"text_encoder": "lora_te1_" if dual else "lora_te_"}.get(
                    path.split(".")[0], "lora_te2_"
                )
                assert kname == prefix + path.split(".", 1)[1].replace(".", "_")
                assert kohya_to_module(kname) == path


def test_tiny_model_names_round_trip():
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        te = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
            )
        )
    paths = [
        f"{prefix}.{n}"
        for prefix, model in (("unet", unet), ("text_encoder", te))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    ]
    for path in paths:
        kname = "lora_" + ("unet_" if path.startswith("unet.") else "te_")
        kname += path.split(".", 1)[1].replace(".", "_")
        assert kohya_to_module(kname) == path
    shapes = {
        f"{prefix}.{n}": tuple(m.weight.shape)
        for prefix, model in (("unet", unet), ("text_encoder", te))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    }
    assert guess_family(shapes) == "unknown"


def test_split_segments_uses_vocabulary_and_digits():
    assert split_segments("down_blocks_10_attentions_0_proj_in") == [
        "down_blocks",
        "10",
        "attentions",
        "0",
        "proj_in",
    ]
    assert split_segments("to_out_0") == ["to_out", "0"]
    assert split_segments("foo_bar_1", vocab=["foo_bar"]) == ["foo_bar", "1"]
    assert split_segments("zz_to_q") == ["zz", "to_q"]


def test_guess_family():
    sd1 = module_table("sd1")
    sdxl = module_table("sdxl")
    assert guess_family(sd1) == "sd1"
    assert guess_family(sdxl) == "sdxl"
    assert guess_family(list(sd1)) == "sd1"
    assert guess_family(list(sdxl)) == "sdxl"
    common = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert common in sd1 and common in sdxl
    # same name, told apart by its shape (cross-attention width 768 vs 2048)
    assert guess_family({common: sd1[common]}) == "sd1"
    assert guess_family({common: sdxl[common]}) == "sdxl"
    assert guess_family({"unet.foo": (1, 1)}) == "unknown"
    assert guess_family([]) == "unknown"


def test_bad_names_raise_format_error():
    with pytest.raises(FormatError, match="not a kohya module name"):
        kohya_to_module("unet_down_blocks_0")
    with pytest.raises(FormatError, match="sgm"):
        kohya_to_module("lora_unet_input_blocks_4_7_transformer_blocks_0_attn1_to_q")
    with pytest.raises(FormatError, match="kohya name"):
        module_to_kohya("transformer.blocks.0")
