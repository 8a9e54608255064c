"""kohya format: exact round trips, naming schemes, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy as stn

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.errors import FormatError
from w2wkit.formats import detect_format, load_source, read_adapter, write_adapter
from w2wkit.formats.kohya import UNET_NAMES_KEY
from w2wkit.names import module_table
from w2wkit.stio import read_safetensors, write_safetensors

KOHYA_META = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_tag_frequency": '{"a": {"b": 1}}',
    "modelspec.architecture": "stable-diffusion-v1/lora",
}


def _layer(rng, shape, rank, alpha, dtype="F32"):
    out, inp, *k = shape
    down = rng.standard_normal((rank, inp, *k)).astype(np.float32)
    up = rng.standard_normal((out, rank, *([1, 1] if k else []))).astype(np.float32)
    if dtype == "F16":
        down, up = down.astype(np.float16), up.astype(np.float16)
    elif dtype == "BF16":  # values exactly representable in bfloat16
        down = (down.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
        up = (up.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    return LoraLayer(down, up, alpha, dtype=dtype)


def _adapter(family, n=12, seed=0, dtype="F32"):
    rng = np.random.default_rng(seed)
    table = module_table(family)
    picks = [p for p in table if p.startswith("unet.") and p.endswith(("to_q", "to_v"))][:n]
    picks += [p for p in table if p.endswith("conv1")][:2]  # LoCon layers
    picks += [p for p in table if p.startswith("text_encoder") and p.endswith("q_proj")][:2]
    if family == "sdxl":
        picks += [p for p in table if p.startswith("text_encoder_2.")][:2]
    layers = {}
    for i, p in enumerate(picks):
        rank = 1 + i % 3
        alpha = [1.0, 0.5, 3.0, 16.0][i % 4]  # alpha != r included
        layers[p] = _layer(rng, table[p], rank, alpha, dtype)
    return Adapter(layers, dict(KOHYA_META))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_round_trip_bit_identical(tmp_path, family, dtype):
    adapter = _adapter(family, dtype=dtype)
    first = tmp_path / "a.safetensors"
    write_adapter(adapter, first)
    back = read_adapter(first)
    assert back.format == "kohya"
    # reading records that an SDXL file named its UNet the sgm way (kohya-ss's SDXL names)
    assert back.metadata.pop(UNET_NAMES_KEY, None) == ("sgm" if family == "sdxl" else None)
    assert back.metadata == adapter.metadata
    assert list(back.layers) == list(adapter.layers)
    for module, layer in adapter.items():
        got = back[module]
        assert got.dtype == dtype
        assert got.alpha == layer.alpha
        np.testing.assert_array_equal(got.down, layer.down.astype(np.float32))
        np.testing.assert_array_equal(got.up, layer.up.astype(np.float32))
        assert got.down.shape == layer.down.shape and got.up.shape == layer.up.shape
    # a second write is byte-identical (tensors, dtypes and metadata)
    second = tmp_path / "b.safetensors"
    write_adapter(read_adapter(first), second)
    assert first.read_bytes() == second.read_bytes()
    # the reference library reads the same numbers (it has no numpy bfloat16)
    if dtype != "BF16":
        ref = stn.load_file(str(first))
        raw = read_safetensors(first)
        for key, value in ref.items():
            np.testing.assert_array_equal(raw.tensors[key], value)


def test_key_names_follow_family(tmp_path):
    sd1 = tmp_path / "sd1.safetensors"
    sdxl = tmp_path / "sdxl.safetensors"
    write_adapter(_adapter("sd1"), sd1)
    write_adapter(_adapter("sdxl"), sdxl)
    k1 = set(stn.load_file(str(sd1)))
    k2 = set(stn.load_file(str(sdxl)))
    assert (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
        in k1
    )
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in k1
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight" in k2
    assert any(k.startswith("lora_te1_") for k in k2) and any(k.startswith("lora_te2_") for k in k2)
    assert not any("down_blocks" in k for k in k2)


def test_alpha_exact_and_f32_scalar(tmp_path):
    rng = np.random.default_rng(1)
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    adapter = Adapter({path: _layer(rng, (320, 320), 4, 3.0)})
    out = tmp_path / "x.safetensors"
    write_adapter(adapter, out, provenance={"w2wkit.made_by": "test"})
    raw = read_safetensors(out)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"
    assert raw.dtypes[key] == "F32" and raw.tensors[key].shape == ()
    assert float(raw.tensors[key]) == 3.0
    assert raw.metadata == {"w2wkit.made_by": "test"}
    back = read_adapter(out)
    assert back[path].alpha == 3.0 and back[path].rank == 4
    # delta = alpha / r * up @ down, computed independently
    ref = 3.0 / 4 * adapter[path].up.astype(np.float64) @ adapter[path].down.astype(np.float64)
    np.testing.assert_allclose(back[path].delta(), ref, rtol=1e-5, atol=1e-5)


def test_missing_alpha_means_rank(tmp_path):
    rng = np.random.default_rng(2)
    out = tmp_path / "x.safetensors"
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    write_safetensors(
        out,
        {
            f"{name}.lora_down.weight": rng.standard_normal((3, 768)).astype(np.float32),
            f"{name}.lora_up.weight": rng.standard_normal((3072, 3)).astype(np.float32),
        },
    )
    layer = read_adapter(out)["text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    assert layer.alpha == 3.0 and layer.scale == 1.0


def test_dtype_override(tmp_path):
    adapter = _adapter("sd1", n=2)
    out = tmp_path / "x.safetensors"
    write_adapter(adapter, out, dtype="F16")
    raw = read_safetensors(out)
    assert {raw.dtypes[k] for k in raw.tensors if not k.endswith(".alpha")} == {"F16"}


def _write(tmp_path, tensors, name="bad.safetensors"):
    path = tmp_path / name
    write_safetensors(path, tensors)
    return path


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize(
    ("tensors", "message", "key"),
    [
        (
            {f"{Q}.lora_down.weight": np.zeros((1, 320), np.float32)},
            "no matching",
            f"{Q}.lora_down.weight",
        ),
        (
            {f"{Q}.lora_up.weight": np.zeros((320, 1), np.float32)},
            "no matching",
            f"{Q}.lora_up.weight",
        ),
        (
            {
                f"{Q}.lora_down.weight": np.zeros((2, 320), np.float32),
                f"{Q}.lora_up.weight": np.zeros((320, 3), np.float32),
            },
            "shape mismatch",
            f"{Q}.lora_up.weight",
        ),
        (
            {
                f"{Q}.lora_down.weight": np.zeros((1, 320), np.float32),
                f"{Q}.lora_up.weight": np.zeros((320, 1), np.float32),
                f"{Q}.lora_middle.weight": np.zeros((1,), np.float32),
            },
            "unknown key",
            f"{Q}.lora_middle.weight",
        ),
        (
            {
                f"{Q}.lora_down.weight": np.zeros((1, 320), np.float32),
                f"{Q}.lora_up.weight": np.zeros((320, 1), np.float32),
                "something_else": np.zeros((1,), np.float32),
            },
            "unknown key",
            "something_else",
        ),
        (
            {
                f"{Q}.lora_down.weight": np.zeros((1, 320), np.float32),
                f"{Q}.lora_up.weight": np.zeros((320, 1), np.float32),
                f"{Q}.dora_scale": np.ones((320, 1), np.float32),
            },
            "not an additive delta",
            f"{Q}.dora_scale",
        ),
    ],
)
def test_bad_input_one_line_error_names_file_and_key(tmp_path, tensors, message, key):
    path = _write(tmp_path, tensors)
    with pytest.raises(FormatError, match=message) as info:
        read_adapter(path, format="kohya")
    text = str(info.value)
    assert "\n" not in text
    assert str(path) in text and key in text
    if "dora" in key:  # auto-detection reaches the same refusal
        with pytest.raises(FormatError, match="magnitude"):
            read_adapter(path)


def test_sniff_prefers_kohya_over_lycoris(tmp_path):
    kohya = _write(
        tmp_path,
        {
            f"{Q}.lora_down.weight": np.zeros((1, 320), np.float32),
            f"{Q}.lora_up.weight": np.zeros((320, 1), np.float32),
        },
        "k.safetensors",
    )
    loha = _write(
        tmp_path,
        {f"{Q}.hada_w1_a": np.zeros((320, 1), np.float32), f"{Q}.alpha": np.ones((), np.float32)},
        "l.safetensors",
    )
    assert detect_format(load_source(kohya)) == "kohya"
    assert detect_format(load_source(loha)) == "lycoris"


def test_writer_refuses_delta_layers(tmp_path):
    from w2wkit.adapter import DeltaLayer

    adapter = Adapter({"unet.conv_in": DeltaLayer(np.zeros((320, 4, 3, 3), np.float32), "loha")})
    out = tmp_path / "x.safetensors"
    with pytest.raises(FormatError, match="not low-rank factors"):
        write_adapter(adapter, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_found_on_fast_and_mixed_paths(tmp_path, dtype, bad):
    adapter = _adapter("sd1", n=3, dtype=dtype)  # F16/BF16 factors with F32 alpha: mixed
    out = tmp_path / "x.safetensors"
    write_adapter(adapter, out)  # (the writer refuses NaN/Inf: put it in afterwards)
    st = read_safetensors(out)
    tensors = {k: np.array(v) for k, v in st.tensors.items()}
    up_key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[up_key][2, 0] = bad
    write_safetensors(out, tensors, metadata=st.metadata, dtypes=st.dtypes, overwrite=True)
    with pytest.raises(FormatError, match="NaN" if np.isnan(bad) else "Inf") as info:
        read_adapter(out)
    assert str(out) in str(info.value) and "lora_up.weight" in str(info.value)
