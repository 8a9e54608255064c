"""One space, one base model family; sgm (SDXL) names are not taken for SD1 paths."""

from __future__ import annotations

import numpy as np
import pytest

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.collection import Collection, model_family
from w2wkit.errors import LayoutError
from w2wkit.formats import read_adapter, write_adapter
from w2wkit.names import guess_family, kohya_uses_sgm, module_to_kohya
from w2wkit.space import WeightSpace
from w2wkit.stio import write_safetensors

#: Paths (and shapes) that exist in both SD1.5 and SDXL: SDXL's input_blocks.4 /
#: input_blocks.5 are renamed to exactly these.
SHARED = {
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640),
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v": (640, 640),
}
SD1_ONLY = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320)}
SDXL_ONLY = {"unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": (640, 640)}


#: What kohya-ss records in an SD1.5 LoRA.
SD1_META = {"ss_base_model_version": "sd_v1"}


def _adapter(shapes, seed, metadata=None):
    rng = np.random.default_rng(seed)
    return Adapter(
        {
            m: LoraLayer(
                down=rng.standard_normal((1, i)).astype(np.float32),
                up=rng.standard_normal((o, 1)).astype(np.float32),
                alpha=1.0,
            )
            for m, (o, i) in shapes.items()
        },
        dict(metadata or {}),
    )


def _write_sgm(ad, path):
    """A kohya file with sgm UNet names, as kohya-ss writes SDXL LoRAs."""
    tensors = {}
    for m, layer in ad.items():
        k = module_to_kohya(m, sgm=True)
        tensors[f"{k}.lora_down.weight"] = layer.down
        tensors[f"{k}.lora_up.weight"] = layer.up
        tensors[f"{k}.alpha"] = np.array(layer.alpha, np.float32)
    write_safetensors(path, tensors)


def test_guess_family_does_not_alias_sgm_names_to_sd1():
    assert guess_family(SHARED) == "sd1"  # names and shapes alone are ambiguous
    assert guess_family(SHARED, sgm_names=True) == "sdxl"
    assert guess_family(SHARED, metadata={"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert guess_family(SD1_ONLY, sgm_names=True) == "sd1"  # an LDM-named SD1 file
    assert kohya_uses_sgm(["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"])
    assert not kohya_uses_sgm(["lora_unet_down_blocks_1_attentions_0_proj_in.alpha"])


def test_an_sgm_named_file_is_sdxl(tmp_path):
    f = tmp_path / "xl.safetensors"
    _write_sgm(_adapter(SHARED, 0), f)
    ad = read_adapter(f)
    assert set(ad.layers) == set(SHARED)  # the same canonical paths as an SD1 file
    assert model_family(ad, f) == "sdxl"
    g = tmp_path / "sd1.safetensors"
    write_adapter(_adapter(SHARED, 1, SD1_META), g, format="kohya")
    assert model_family(read_adapter(g), g) == "sd1"
    h = tmp_path / "plain.safetensors"  # nothing tells: it conflicts with neither
    write_adapter(_adapter(SHARED, 2), h, format="kohya")
    assert model_family(read_adapter(h), h) == "sd1 or sdxl"


@pytest.mark.parametrize("representation", ["factors", "delta"])
def test_sd1_and_aliased_sdxl_files_are_not_fitted_together(tmp_path, representation):
    for i in range(3):
        ad = _adapter(SHARED, i, SD1_META)
        write_adapter(ad, tmp_path / f"sd1_{i}.safetensors", format="kohya")
    for i in range(2):
        _write_sgm(_adapter(SHARED, 10 + i), tmp_path / f"xl_{i}.safetensors")
    with pytest.raises(LayoutError) as info:
        WeightSpace(2, representation=representation).fit(Collection(tmp_path))
    msg = str(info.value)
    assert "different base model families" in msg
    assert "sd1: 3 models (e.g. " in msg and "sd1_0.safetensors" in msg
    assert "sdxl: 2 models (e.g. " in msg and "xl_0.safetensors" in msg


def test_sd1_and_sdxl_modules_are_not_mixed_in_a_delta_space():
    models = [_adapter(SD1_ONLY, i) for i in range(3)] + [_adapter(SDXL_ONLY, 5)]
    with pytest.raises(LayoutError, match=r"sd1: 3 models \(e\.g\. model_0000\); sdxl: 1 model"):
        WeightSpace(2, representation="delta").fit(models)


def test_one_family_and_undecided_models_still_fit(tmp_path):
    from _spacehelpers import random_models

    WeightSpace(2, representation="delta").fit(random_models(4, seed=0))  # unknown family
    models = [_adapter(SHARED, i) for i in range(4)]  # could be either
    assert WeightSpace(2).fit(models).n_components_ == 2
    for i in range(2):  # SDXL files, one of them written without sgm names
        write_adapter(_adapter(SHARED, i), tmp_path / f"plain_{i}.safetensors", format="kohya")
        _write_sgm(_adapter(SHARED, 5 + i), tmp_path / f"xl_{i}.safetensors")
    assert WeightSpace(2).fit(Collection(tmp_path)).n_components_ == 2


def test_convert_keeps_an_sgm_named_sdxl_file_sdxl(tmp_path):
    """Read back and written again, the aliased SDXL file keeps its sgm (SDXL) names."""
    from w2wkit.stio import read_safetensors

    f = tmp_path / "xl.safetensors"
    _write_sgm(_adapter(SHARED, 0), f)
    out = write_adapter(read_adapter(f), tmp_path / "again.safetensors", format="kohya")
    keys = set(read_safetensors(out).tensors)
    assert keys == set(read_safetensors(f).tensors)
    assert all("input_blocks" in k for k in keys)
    assert model_family(read_adapter(out), out) == "sdxl"
