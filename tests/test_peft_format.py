"""Native PEFT folders: exact round trips, PEFT's alpha rules, components, bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import safetensors.numpy as stn

from w2wkit.errors import FormatError
from w2wkit.formats import detect_format, load_source, read_adapter, write_adapter
from w2wkit.stio import read_safetensors
from w2wkit.testing import random_adapter

Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
V = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
TEQ = "text_model.encoder.layers.0.self_attn.q_proj"
SHAPES = {
    f"unet.{Q}": (16, 16),
    f"unet.{V}": (16, 16),
    "unet.conv_in": (8, 4, 3, 3),
    f"text_encoder.{TEQ}": (12, 12),
    "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj": (20, 20),
}


def _adapter(dtype="F32"):
    ranks = {m: (1, 2, 1, 3, 2)[i] for i, m in enumerate(SHAPES)}
    alphas = {m: (1.0, 0.5, 1.0, 6.0, 3.5)[i] for i, m in enumerate(SHAPES)}
    ad = random_adapter(SHAPES, rank=ranks, alpha=alphas, seed=2, dtype=dtype)
    ad.metadata = {"ss_output_name": "x"}
    return ad


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_round_trip_is_exact(tmp_path, dtype):
    ad = _adapter(dtype)
    out = tmp_path / "lora"
    prov = {"w2wkit.made_by": "test"}
    write_adapter(ad, out, format="peft", provenance=prov)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "text_encoder",
        "text_encoder_2",
    ]
    assert detect_format(load_source(out)) == "peft"
    back = read_adapter(out)
    assert back.format == "peft"
    assert list(back.layers) == list(ad.layers)  # already grouped by component
    assert back.metadata == {**ad.metadata, **prov}
    for m, layer in ad.items():
        assert back[m].down.tobytes() == layer.down.tobytes()
        assert back[m].up.tobytes() == layer.up.tobytes()
        assert (back[m].alpha, back[m].rslora, back[m].dtype) == (layer.alpha, False, dtype)


def test_written_config_is_a_plain_lora_config(tmp_path):
    out = tmp_path / "lora"
    write_adapter(_adapter(), out, format="peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is False
    assert (cfg["r"], cfg["lora_alpha"]) == (1, 1)
    assert cfg["rank_pattern"] == {V: 2} and cfg["alpha_pattern"] == {V: 0.5}
    assert cfg["target_modules"] == [Q, V, "conv_in"]
    keys = stn.load_file(str(out / "adapter_model.safetensors"))
    assert f"base_model.model.{Q}.lora_A.weight" in keys
    te = stn.load_file(str(out / "text_encoder" / "adapter_model.safetensors"))
    assert "base_model.model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in te
    assert (
        read_safetensors(out / "adapter_model.safetensors").metadata["w2wkit.component"] == "unet"
    )


def _peft_folder(tmp_path, config, tensors, name="ext"):
    out = tmp_path / name
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(config))
    stn.save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def _factors(modules, rng, r=2, n=8):
    t = {}
    for mod in modules:
        rr = r[mod] if isinstance(r, dict) else r
        t[f"base_model.model.{mod}.lora_A.weight"] = rng.standard_normal((rr, n)).astype(np.float32)
        t[f"base_model.model.{mod}.lora_B.weight"] = rng.standard_normal((n, rr)).astype(np.float32)
    return t


def test_peft_alpha_rules_and_guessed_component(tmp_path):
    rng = np.random.default_rng(0)
    t = _factors([Q, V], rng, r={Q: 2, V: 4})
    cfg = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 8,
        "rank_pattern": {"up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": 4},
        "alpha_pattern": {"attn1.to_v": 2},
        "use_rslora": True,
        "target_modules": ["to_q", "to_v"],
    }
    ad = read_adapter(_peft_folder(tmp_path, cfg, t))
    assert list(ad.layers) == [f"unet.{Q}", f"unet.{V}"]
    assert ad[f"unet.{Q}"].alpha == 8.0 and ad[f"unet.{V}"].alpha == 2.0
    a, b = t[f"base_model.model.{V}.lora_A.weight"], t[f"base_model.model.{V}.lora_B.weight"]
    np.testing.assert_allclose(ad[f"unet.{V}"].delta(), 2.0 / math.sqrt(4) * b @ a, rtol=1e-6)


def test_text_encoder_guessed_from_names(tmp_path):
    rng = np.random.default_rng(0)
    t = _factors(["encoder.layers.0.self_attn.q_proj"], rng)
    ad = read_adapter(_peft_folder(tmp_path, {"r": 2, "lora_alpha": 2}, t))
    assert list(ad.layers) == [f"text_encoder.{TEQ}"]


def test_unknown_component_needs_header_entry(tmp_path):
    t = _factors(["blocks.0.attn.qkv"], np.random.default_rng(0))
    with pytest.raises(FormatError, match=r"w2wkit\.component"):
        read_adapter(_peft_folder(tmp_path, {"r": 2}, t))


def test_missing_lora_alpha_uses_peft_default(tmp_path):
    t = _factors([Q], np.random.default_rng(0), r=8)
    ad = read_adapter(_peft_folder(tmp_path, {"r": 8}, t))
    assert ad[f"unet.{Q}"].alpha == 8.0  # LoraConfig's default lora_alpha


def test_dora_refused_from_config_and_from_keys(tmp_path):
    rng = np.random.default_rng(0)
    t = _factors([Q], rng)
    with pytest.raises(FormatError) as exc:
        read_adapter(_peft_folder(tmp_path, {"r": 2, "use_dora": True}, t, "a"))
    assert "DoRA" in str(exc.value) and "use_dora" in str(exc.value)
    assert "not an additive delta" in str(exc.value) and "\n" not in str(exc.value)
    t[f"base_model.model.{Q}.lora_magnitude_vector"] = np.ones(8, np.float32)
    with pytest.raises(FormatError, match=r"DoRA.*magnitude"):
        read_adapter(_peft_folder(tmp_path, {"r": 2}, t, "b"))


def test_lora_a_without_b_and_shape_mismatch(tmp_path):
    rng = np.random.default_rng(0)
    t = _factors([Q], rng)
    del t[f"base_model.model.{Q}.lora_B.weight"]
    with pytest.raises(FormatError) as exc:
        read_adapter(_peft_folder(tmp_path, {"r": 2}, t, "a"))
    assert f"base_model.model.{Q}.lora_A.weight" in str(exc.value)
    assert "adapter_model.safetensors" in str(exc.value) or "a" in str(exc.value)
    t = _factors([Q], rng)
    t[f"base_model.model.{Q}.lora_B.weight"] = np.ones((8, 3), np.float32)
    with pytest.raises(FormatError, match="mismatch"):
        read_adapter(_peft_folder(tmp_path, {"r": 2}, t, "b"))


def test_non_finite_values(tmp_path):
    t = _factors([Q], np.random.default_rng(0))
    t[f"base_model.model.{Q}.lora_A.weight"][0, 0] = np.nan
    with pytest.raises(FormatError, match="NaN"):
        read_adapter(_peft_folder(tmp_path, {"r": 2, "lora_alpha": 2}, t))


@pytest.mark.parametrize(
    ("config_text", "needle"),
    [
        ("{not json", "adapter_config.json is not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"r": "two"}), "r must be a number"),
        (json.dumps({"r": 2, "peft_type": "LOHA"}), "LOHA"),
        (json.dumps({"r": 2, "rank_pattern": [1]}), "rank_pattern"),
        (json.dumps({"r": 4}), "rank 4"),
    ],
)
def test_bad_adapter_config(tmp_path, config_text, needle):
    out = tmp_path / "bad"
    out.mkdir()
    (out / "adapter_config.json").write_text(config_text)
    stn.save_file(_factors([Q], np.random.default_rng(0)), str(out / "adapter_model.safetensors"))
    with pytest.raises(FormatError) as exc:
        read_adapter(out)
    text = str(exc.value)
    assert needle in text and "\n" not in text and str(out) in text


def test_pickle_weights_need_opt_in(tmp_path):
    torch = pytest.importorskip("torch")
    out = tmp_path / "pk"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    t = _factors([Q], np.random.default_rng(0))
    torch.save({k: torch.from_numpy(v) for k, v in t.items()}, out / "adapter_model.bin")
    with pytest.raises(FormatError, match="pickle"):
        read_adapter(out)
    ad = read_adapter(out, allow_pickle=True)
    assert ad.format == "peft" and ad[f"unet.{Q}"].alpha == 4.0


def test_failed_write_leaves_nothing(tmp_path):
    ad = _adapter()
    ad.layers["vae.encoder.conv_in"] = ad.layers.pop("unet.conv_in")
    with pytest.raises(FormatError, match="component"):
        write_adapter(ad, tmp_path / "out", format="peft")
    assert list(tmp_path.iterdir()) == []


def test_folder_discovery_counts_a_multi_component_adapter_once(tmp_path):
    from w2wkit.formats import discover_lora_files

    write_adapter(_adapter(), tmp_path / "zoo" / "one", format="peft")
    write_adapter(_adapter(), tmp_path / "zoo" / "two", format="peft")
    assert discover_lora_files(tmp_path / "zoo") == [tmp_path / "zoo" / n for n in ("one", "two")]


def test_bare_peft_state_dict_file_reads_with_alpha_equal_rank(tmp_path):
    rng = np.random.default_rng(0)
    t = {k.removeprefix("base_model.model."): v for k, v in _factors([Q, V], rng, r=3).items()}
    path = tmp_path / "bare.safetensors"
    stn.save_file(t, str(path))
    src = load_source(path)
    assert detect_format(src) == "peft"
    ad = read_adapter(path)
    assert set(ad.layers) == {f"unet.{Q}", f"unet.{V}"}
    assert {layer.alpha for layer in ad.layers.values()} == {3.0}
