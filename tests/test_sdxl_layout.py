"""SDXL-size spaces end to end: the SDXL UNet rank-1 q/v layout with the real module names.

A collection of kohya files of the layout kohya-ss writes for SDXL (rank 1 on
``to_q``/``to_v`` of all 140 attention modules of the full-size SDXL UNet: 280
modules, 725,760 numbers per model, sgm names such as
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) goes through
``fit -> directions -> sample -> apply -> convert`` on the command line. What
comes out must keep the layout, be SDXL in every format, follow the key rules
of ComfyUI, A1111 and kohya sd-scripts (``tests/_loader_rules.py``, which
derives the sgm numbering independently of w2wkit) and, in the slow tests,
load into the real SDXL UNet architecture (built from its config on the
``meta`` device: no weights, no download) through diffusers'
``StableDiffusionXLPipeline.load_lora_weights`` and through PEFT.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from _loader_rules import (
    a1111_apply,
    a1111_compvis,
    a1111_layers,
    comfyui_apply,
    comfyui_key,
    comfyui_key_map,
    sd_scripts_apply,
    sd_scripts_key,
    sd_scripts_modules,
)
from click.testing import CliRunner

from w2wkit.cli.main import cli
from w2wkit.formats import read_adapter, write_adapter
from w2wkit.layout import WeightLayout
from w2wkit.names import guess_family, module_table
from w2wkit.space import WeightSpace
from w2wkit.stio import read_safetensors
from w2wkit.synthetic import planted_collection, sdxl_qv_shapes
from w2wkit.testing import random_adapter

D_SDXL_QV = 725_760
N_MODELS = 14

#: The SDXL base UNet's configuration (diffusers' ``unet/config.json`` of
#: stable-diffusion-xl-base-1.0, the entries that decide module names and shapes).
SDXL_UNET = {
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

#: Modules spanning every kind of position: down/mid/up blocks, the deepest
#: transformer block, self- and cross-attention, the last up block with attentions.
SPOT_CHECK = (
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_v",
    "unet.down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v",
    "unet.mid_block.attentions.0.transformer_blocks.5.attn1.to_v",
    "unet.up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_q",
    "unet.up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_q",
)


def _cli(args: list[str], cwd) -> str:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    """A planted SDXL q/v collection taken through fit, directions, sample, apply, convert."""
    root = tmp_path_factory.mktemp("sdxl")
    planted = planted_collection(
        root / "loras",
        N_MODELS,
        shapes=sdxl_qv_shapes(),
        n_latent=6,
        attributes=("male", "old"),
        correlated=None,
        alpha=1.0,
        fmt="kohya",
        seed=5,
    )
    space_dir = root / "space"
    _cli(["fit", root / "loras", "-o", space_dir, "-k", 6, "--labels", planted.labels_path], root)
    _cli(["directions", "--space", space_dir], root)
    out = {"planted": planted, "root": root, "space": space_dir, "samples": {}}
    for fmt in ("kohya", "diffusers", "peft"):
        folder = root / f"samples_{fmt}"
        _cli(
            ["sample", "--space", space_dir, "-n", 2, "-o", folder, "--format", fmt, "--seed", 3],
            root,
        )
        out["samples"][fmt] = folder / ("sample_0001" + ("" if fmt == "peft" else ".safetensors"))
    src = planted.files[0]
    edited = root / "edited.safetensors"
    _cli(["apply", src, "--space", space_dir, "--edit", "male=1.5", "-o", edited], root)
    out["edited"] = edited
    for fmt in ("diffusers", "peft"):
        dst = root / f"edited_{fmt}" if fmt == "peft" else root / f"edited_{fmt}.safetensors"
        _cli(["convert", edited, "--to", fmt, "-o", dst], root)
        out[f"edited_{fmt}"] = dst
    return out


def _tensors(path) -> dict[str, np.ndarray]:
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        path = path / "adapter_model.safetensors"
    return {k: np.asarray(v) for k, v in read_safetensors(path).tensors.items()}


def _kohya_files(run) -> list:
    return [run["planted"].files[0], run["samples"]["kohya"], run["edited"]]


def _all_files(run) -> list:
    return [
        *_kohya_files(run),
        run["samples"]["diffusers"],
        run["samples"]["peft"],
        run["edited_diffusers"],
        run["edited_peft"],
    ]


def test_the_layout_is_sdxl_qv_with_real_names():
    shapes = sdxl_qv_shapes()
    table = module_table("sdxl")
    assert len(shapes) == 280 and sum(o + i for o, i in shapes.values()) == D_SDXL_QV
    assert all(table[m] == s for m, s in shapes.items())
    blocks = {m.rsplit(".", 2)[0] for m in shapes}
    assert len(blocks) == 70  # 10 + 60 transformer blocks (widths 640 and 1280), each attn1+attn2


def test_one_sdxl_model_round_trips_with_kohya_names(tmp_path):
    ad = random_adapter(sdxl_qv_shapes(), rank=1, seed=2)
    f = write_adapter(ad, tmp_path / "one.safetensors", format="kohya")
    names = {k.split(".", 1)[0] for k in _tensors(f)}
    assert names == {sd_scripts_key("sdxl", m) for m in sdxl_qv_shapes()}
    assert names <= set(comfyui_key_map("sdxl")) and names <= set(sd_scripts_modules("sdxl"))
    assert {_a1111_target(n) for n in names} <= set(a1111_layers("sdxl"))
    back = read_adapter(f)
    lay = WeightLayout.from_adapter(back)
    assert lay.dim == D_SDXL_QV
    np.testing.assert_array_equal(lay.flatten(back), lay.flatten(ad))


@pytest.mark.slow
def test_the_table_is_the_real_sdxl_unet(meta_sdxl_unet):
    """Rebuild the q/v modules from the SDXL config on the meta device (no weights)."""
    real = {
        f"unet.{n}": tuple(mod.weight.shape)
        for n, mod in meta_sdxl_unet.named_modules()
        if n.endswith((".to_q", ".to_v"))
    }
    assert real == sdxl_qv_shapes()


@pytest.mark.slow
def test_collection_files_use_kohya_sdxl_names(sdxl_run):
    keys = set(_tensors(sdxl_run["planted"].files[0]))
    expected = {sd_scripts_key("sdxl", m) for m in sdxl_qv_shapes()}
    assert {k.split(".", 1)[0] for k in keys} == expected
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_v.lora_up.weight" in keys
    assert not any("down_blocks" in k for k in keys)


@pytest.mark.slow
def test_fit_keeps_the_layout(sdxl_run):
    space = WeightSpace.load(sdxl_run["space"])
    lay = space.layout_
    assert lay.dim == D_SDXL_QV and len(lay) == 280
    assert set(lay.modules) == set(sdxl_qv_shapes())
    assert space.components_.shape == (6, D_SDXL_QV)
    assert set(space.directions_) == {"male", "old"}
    # the space reproduces its training models: coefficients map back to the files
    first = read_adapter(sdxl_run["planted"].files[0])
    back = space.inverse_transform(space.coefficients_[:1])[0]
    x, y = lay.flatten(first), lay.flatten(back)
    assert np.linalg.norm(x - y) <= 0.05 * np.linalg.norm(x - space.mean_)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["sample", "edited"])
def test_outputs_are_sdxl_in_every_format_with_equal_numbers(sdxl_run, which):
    if which == "sample":
        files = [sdxl_run["samples"][f] for f in ("kohya", "diffusers", "peft")]
    else:
        files = [sdxl_run["edited"], sdxl_run["edited_diffusers"], sdxl_run["edited_peft"]]
    space = WeightSpace.load(sdxl_run["space"])
    ref = None
    for f in files:
        ad = read_adapter(f)
        assert guess_family({m: la.delta_shape for m, la in ad.items()}) == "sdxl"
        assert WeightLayout.from_adapter(ad).signature == space.layout_.signature
        row = space.layout_.flatten(ad)
        ref = row if ref is None else ref
        np.testing.assert_allclose(row, ref, rtol=1e-6, atol=1e-7)
    if which == "sample":  # a sample lies in the space: nothing outside it
        ad = read_adapter(files[0])
        assert float(space.residual(ad)[0]) < 1e-3
    else:  # the edit moved the model along the direction, the rest is kept
        src = space.layout_.flatten(read_adapter(sdxl_run["planted"].files[0]))
        c_src = space.transform(read_adapter(sdxl_run["planted"].files[0]))[0]
        c_out = space.transform(read_adapter(files[0]))[0]
        assert not np.allclose(ref, src)
        moved = c_out - c_src
        u = space.directions_["male"].vector
        cos = float(moved @ u / (np.linalg.norm(moved) * np.linalg.norm(u)))
        assert cos > 0.99


@pytest.mark.slow
def test_diffusers_and_peft_outputs_use_diffusers_names(sdxl_run):
    modules = sdxl_qv_shapes()
    d = set(_tensors(sdxl_run["samples"]["diffusers"]))
    assert d == {f"{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    p = set(_tensors(sdxl_run["samples"]["peft"]))
    inner = {m.removeprefix("unet.") for m in modules}
    assert p == {f"base_model.model.{m}.lora_{ab}.weight" for m in inner for ab in "AB"}


def _a1111_target(name: str) -> str:
    """The layer A1111 matches a kohya module name to (as ``a1111_apply`` resolves it)."""
    target = a1111_compvis(name)
    if target not in a1111_layers("sdxl"):
        target = name.replace("lora_unet", "diffusion_model")
    return target


@pytest.mark.slow
@pytest.mark.parametrize(
    "loader",
    [
        ("comfyui", comfyui_apply, comfyui_key),
        ("a1111", a1111_apply, lambda fam, m: _a1111_target(sd_scripts_key(fam, m))),
        ("kohya-scripts", sd_scripts_apply, sd_scripts_key),
    ],
    ids=lambda x: x[0],
)
def test_kohya_outputs_follow_the_loaders_key_rules(sdxl_run, loader):
    """Every module name is one the loader maps; spot-checked modules get exactly the delta."""
    name, apply, key = loader
    known = {
        "comfyui": set(comfyui_key_map("sdxl")),
        "a1111": set(a1111_layers("sdxl")),
        "kohya-scripts": set(sd_scripts_modules("sdxl")),
    }[name]
    for f in _kohya_files(sdxl_run):
        tensors = _tensors(f)
        names = {k.split(".", 1)[0] for k in tensors}
        if name == "a1111":
            names = {_a1111_target(n) for n in names}
        assert names <= known, sorted(names - known)[:3]
        # full deltas of 280 full-size weights would take GBs: apply the rules to a subset
        ad = read_adapter(f)
        sub_names = {sd_scripts_key("sdxl", m) for m in SPOT_CHECK}
        subset = {k: v for k, v in tensors.items() if k.split(".", 1)[0] in sub_names}
        patches, unused = apply(subset, "sdxl")
        assert not unused
        assert len(patches) == len(SPOT_CHECK)
        for m in SPOT_CHECK:
            target = comfyui_key("sdxl", m) if name == "comfyui" else key("sdxl", m)
            np.testing.assert_allclose(patches[target], ad.layers[m].delta(), rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- real loaders (slow)


@pytest.fixture(scope="module")
def meta_sdxl_unet():
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET)


def _wrapped(unet, adapter_name: str) -> dict[str, tuple[int, float]]:
    """PEFT-wrapped modules of ``unet`` for ``adapter_name``: rank and scaling."""
    out = {}
    for n, mod in unet.named_modules():
        lora_a = getattr(mod, "lora_A", None)
        if lora_a is not None and adapter_name in lora_a:
            out[f"unet.{n}"] = (int(mod.r[adapter_name]), float(mod.scaling[adapter_name]))
    return out


@pytest.mark.slow
def test_kohya_and_diffusers_outputs_load_in_diffusers_sdxl(sdxl_run, meta_sdxl_unet, monkeypatch):
    """``StableDiffusionXLPipeline.load_lora_weights`` on the real SDXL UNet architecture.

    The UNet lives on the meta device, so the loaded LoRA tensors have no values
    there; the state dict diffusers hands to the UNet (after its own kohya/sgm
    conversion) is captured on the way and compared number for number.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet = meta_sdxl_unet
    pipe = StableDiffusionXLPipeline(
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )
    seen: list[dict] = []
    original = UNet2DConditionModel.load_lora_adapter

    def spy(self, state_dict, *args, **kwargs):
        seen.append(dict(state_dict))
        return original(self, state_dict, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "load_lora_adapter", spy)
    modules = sdxl_qv_shapes()
    for i, f in enumerate(
        [sdxl_run["samples"]["kohya"], sdxl_run["edited"], sdxl_run["samples"]["diffusers"]]
    ):
        ad = read_adapter(f)
        name = f"a{i}"
        pipe.load_lora_weights(str(f), adapter_name=name)
        wrapped = _wrapped(unet, name)
        assert set(wrapped) == set(modules)
        for m, (r, scaling) in wrapped.items():
            assert r == 1 and scaling == pytest.approx(ad.layers[m].scale, rel=1e-6)
        sd = {k.removeprefix("unet."): v for k, v in seen[-1].items() if k.startswith("unet.")}
        if not any("lora_A" in k for k in sd):  # kohya: diffusers finishes the conversion here
            sd = convert_unet_state_dict_to_peft(sd)
        assert len(sd) == 2 * len(modules)
        for m in modules:
            inner = m.removeprefix("unet.")
            a = sd[f"{inner}.lora_A.weight"].float().numpy()
            b = sd[f"{inner}.lora_B.weight"].float().numpy()
            np.testing.assert_array_equal(a, ad.layers[m].down)
            np.testing.assert_array_equal(b, ad.layers[m].up)


@pytest.mark.slow
def test_peft_outputs_load_in_peft_sdxl(sdxl_run, meta_sdxl_unet):
    """PEFT's own loader: every key of the folder matches a module of the real SDXL UNet."""
    import json

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    unet = meta_sdxl_unet
    for i, folder in enumerate([sdxl_run["samples"]["peft"], sdxl_run["edited_peft"]]):
        ad = read_adapter(folder)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        known = set(LoraConfig.__dataclass_fields__)
        config = LoraConfig(**{k: v for k, v in cfg.items() if k in known})
        name = f"p{i}"
        inject_adapter_in_model(config, unet, adapter_name=name)
        wrapped = _wrapped(unet, name)
        assert set(wrapped) == set(sdxl_qv_shapes())
        for m, (r, scaling) in wrapped.items():
            assert r == 1 and scaling == pytest.approx(ad.layers[m].scale, rel=1e-6)
        tensors = _tensors(folder)
        import torch

        sd = {
            k.removeprefix("base_model.model."): torch.from_numpy(np.array(v))
            for k, v in tensors.items()
        }
        res = set_peft_model_state_dict(unet, sd, adapter_name=name)
        assert not res.unexpected_keys
        assert not [k for k in res.missing_keys if f".{name}." in k]
