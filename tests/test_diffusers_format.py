"""The diffusers LoRA format: exact round trips, diffusers' alpha rules, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy as stn

from w2wkit.adapter import Adapter, DeltaLayer
from w2wkit.errors import FormatError
from w2wkit.formats import detect_format, load_source, read_adapter, write_adapter
from w2wkit.stio import read_safetensors
from w2wkit.testing import random_adapter

Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
K2 = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
TEQ = "text_model.encoder.layers.0.self_attn.q_proj"
SHAPES = {
    f"unet.{Q}": (16, 16),
    f"unet.{K2}": (16, 12),
    "unet.conv_in": (8, 4, 3, 3),
    f"text_encoder.{TEQ}": (12, 12),
    "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj": (20, 20),
}


def _adapter(dtype="F32", **kw):
    ranks = {m: i % 3 + 1 for i, m in enumerate(SHAPES)}
    alphas = {m: (0.5, 4.0, 3.0, 0.5, 1.25)[i] for i, m in enumerate(SHAPES)}
    ad = random_adapter(SHAPES, rank=ranks, alpha=alphas, seed=1, dtype=dtype, **kw)
    ad.metadata = {"ss_network_dim": "3", "note": "héllo"}
    return ad


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_round_trip_is_exact(tmp_path, dtype):
    ad = _adapter(dtype)
    prov = {"w2wkit.made_by": "test", "w2wkit.inputs": '["a.safetensors"]'}
    path = tmp_path / "x.safetensors"
    write_adapter(ad, path, format="diffusers", provenance=prov)
    back = read_adapter(path)
    assert back.format == "diffusers"
    assert list(back.layers) == list(ad.layers)
    assert back.metadata == {**ad.metadata, **prov}
    for m, layer in ad.items():
        got = back[m]
        assert got.down.tobytes() == layer.down.tobytes(), m
        assert got.up.tobytes() == layer.up.tobytes(), m
        assert (got.alpha, got.rslora, got.dtype) == (layer.alpha, layer.rslora, dtype)
    # stored dtypes checked with the reference library's view of the header
    assert set(read_safetensors(path).dtypes.values()) == {dtype}


def test_written_header_follows_diffusers_layout(tmp_path):
    ad = _adapter()
    path = tmp_path / "x.safetensors"
    write_adapter(ad, path, format="diffusers")
    tensors = stn.load_file(str(path))
    assert f"unet.{Q}.lora_A.weight" in tensors
    assert f"text_encoder.{TEQ}.lora_B.weight" in tensors
    meta = read_safetensors(path).metadata
    cfg = json.loads(meta["lora_adapter_metadata"])
    # ranks 1,2,3,1,2 per module in SHAPES order; alphas .5,4,3,.5,1.25
    assert cfg["unet.r"] == 1 and cfg["unet.lora_alpha"] == 0.5
    assert cfg["unet.rank_pattern"] == {K2: 2, "conv_in": 3}
    assert cfg["unet.alpha_pattern"] == {K2: 4, "conv_in": 3}
    # text-encoder names without text_model. so they match flattened CLIP too
    assert cfg["text_encoder.target_modules"] == ["encoder.layers.0.self_attn.q_proj"]
    assert cfg["text_encoder_2.r"] == 2 and cfg["text_encoder_2.lora_alpha"] == 1.25
    assert meta["format"] == "pt"


def test_mixed_rslora_keeps_every_delta(tmp_path):
    ad = _adapter()
    first = next(iter(ad.layers))
    ad.layers[first].rslora = True
    path = tmp_path / "x.safetensors"
    write_adapter(ad, path, format="diffusers")
    back = read_adapter(path)
    for m, layer in ad.items():
        np.testing.assert_allclose(back[m].delta(), layer.delta(), rtol=1e-6, atol=0)


def test_reads_hand_written_metadata_like_peft(tmp_path):
    rng = np.random.default_rng(0)
    t = {}
    for mod, r in ((Q, 2), (K2, 4)):
        t[f"unet.{mod}.lora_A.weight"] = rng.standard_normal((r, 8)).astype(np.float32)
        t[f"unet.{mod}.lora_B.weight"] = rng.standard_normal((8, r)).astype(np.float32)
    t[f"text_encoder.{TEQ}.lora_A.weight"] = rng.standard_normal((2, 8)).astype(np.float32)
    t[f"text_encoder.{TEQ}.lora_B.weight"] = rng.standard_normal((8, 2)).astype(np.float32)
    # unet: r=2, alpha 6; attn2 modules by a short pattern get r 4 / alpha 1
    meta = {
        "unet.r": 2,
        "unet.lora_alpha": 6,
        "unet.rank_pattern": {"attn2.to_k": 4},
        "unet.alpha_pattern": {"attn2.to_k": 1},
        "unet.target_modules": ["to_q", "to_k"],
    }
    path = tmp_path / "x.safetensors"
    stn.save_file(t, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    ad = read_adapter(path)
    assert ad[f"unet.{Q}"].alpha == 6.0 and ad[f"unet.{K2}"].alpha == 1.0
    # no metadata for the text encoder: alpha = r
    assert ad[f"text_encoder.{TEQ}"].alpha == 2.0
    b, a = (t[f"unet.{Q}.lora_{f}.weight"].astype(np.float64) for f in "BA")
    np.testing.assert_allclose(ad[f"unet.{Q}"].delta(), 6 / 2 * b @ a, rtol=1e-5, atol=1e-6)


def test_older_spellings_and_flattened_text_encoder_names(tmp_path):
    rng = np.random.default_rng(1)
    t = {
        f"unet.{Q}.lora.down.weight": rng.standard_normal((2, 16)).astype(np.float32),
        f"unet.{Q}.lora.up.weight": rng.standard_normal((16, 2)).astype(np.float32),
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": (
            rng.standard_normal((1, 12)).astype(np.float32)
        ),
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": (
            rng.standard_normal((12, 1)).astype(np.float32)
        ),
    }
    path = tmp_path / "old.safetensors"
    stn.save_file(t, str(path))
    assert detect_format(load_source(path)) == "diffusers"
    ad = read_adapter(path)
    assert set(ad.layers) == {f"unet.{Q}", f"text_encoder.{TEQ}"}
    np.testing.assert_allclose(
        ad[f"unet.{Q}"].delta(), t[f"unet.{Q}.lora.up.weight"] @ t[f"unet.{Q}.lora.down.weight"]
    )


def _save(tmp_path, t, meta=None):
    path = tmp_path / "bad.safetensors"
    stn.save_file(t, str(path), metadata=meta)
    return path


def _pair(r=2, out=8, inp=8, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((r, inp)).astype(np.float32),
        rng.standard_normal((out, r)).astype(np.float32),
    )


def _assert_one_line(exc, *needles):
    text = str(exc.value)
    assert "\n" not in text
    for n in needles:
        assert n in text, text


def test_lora_a_without_lora_b(tmp_path):
    a, _ = _pair()
    path = _save(tmp_path, {f"unet.{Q}.lora_A.weight": a})
    with pytest.raises(FormatError) as exc:
        read_adapter(path, format="diffusers")
    _assert_one_line(exc, str(path), f"unet.{Q}.lora_A.weight", "without")


def test_shape_mismatch(tmp_path):
    a, _ = _pair(r=2)
    _, b = _pair(r=3)
    path = _save(tmp_path, {f"unet.{Q}.lora_A.weight": a, f"unet.{Q}.lora_B.weight": b})
    with pytest.raises(FormatError) as exc:
        read_adapter(path)
    _assert_one_line(exc, str(path), "mismatch")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values(tmp_path, bad):
    a, b = _pair()
    b[1, 0] = bad
    path = _save(tmp_path, {f"unet.{Q}.lora_A.weight": a, f"unet.{Q}.lora_B.weight": b})
    with pytest.raises(FormatError) as exc:
        read_adapter(path)
    _assert_one_line(exc, str(path), f"unet.{Q}", "NaN" if np.isnan(bad) else "Inf")


def test_dora_refused_with_reason(tmp_path):
    a, b = _pair()
    t = {
        f"unet.{Q}.lora_A.weight": a,
        f"unet.{Q}.lora_B.weight": b,
        f"unet.{Q}.lora_magnitude_vector": np.ones(8, np.float32),
    }
    with pytest.raises(FormatError) as exc:
        read_adapter(_save(tmp_path, t), format="diffusers")
    _assert_one_line(exc, "DoRA", "not an additive delta", "lora_magnitude_vector")


def test_bad_metadata_json_and_rank_disagreement(tmp_path):
    a, b = _pair()
    t = {f"unet.{Q}.lora_A.weight": a, f"unet.{Q}.lora_B.weight": b}
    with pytest.raises(FormatError) as exc:
        read_adapter(_save(tmp_path, t, {"lora_adapter_metadata": "{nope"}))
    _assert_one_line(exc, "lora_adapter_metadata", "not JSON")
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4})}
    with pytest.raises(FormatError) as exc:
        read_adapter(_save(tmp_path, t, meta))
    _assert_one_line(exc, "rank 4", "rank 2")


def test_unexpected_key_named(tmp_path):
    a, b = _pair()
    t = {f"unet.{Q}.lora_A.weight": a, f"unet.{Q}.lora_B.weight": b, "unet.foo": a}
    with pytest.raises(FormatError) as exc:
        read_adapter(_save(tmp_path, t), format="diffusers")
    _assert_one_line(exc, "unet.foo")


def test_delta_layers_refused_without_output(tmp_path):
    ad = Adapter({f"unet.{Q}": DeltaLayer(np.zeros((4, 4), np.float32), "loha")})
    path = tmp_path / "x.safetensors"
    with pytest.raises(FormatError, match="full delta"):
        write_adapter(ad, path, format="diffusers")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    write_adapter(_adapter(), path, format="diffusers")
    with pytest.raises(FormatError, match="exists"):
        write_adapter(_adapter(), path, format="diffusers")
    write_adapter(_adapter(), path, format="diffusers", overwrite=True)
