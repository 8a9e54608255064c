"""LyCORIS LoHa/LoKr: deltas equal the formulas computed independently here."""

from __future__ import annotations

import numpy as np
import pytest

from w2wkit.adapter import DeltaLayer
from w2wkit.errors import FormatError
from w2wkit.formats import read_adapter
from w2wkit.stio import write_safetensors

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
Q_PATH = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # SD1.5: (320, 320, 3, 3)
CONV_PATH = "unet.down_blocks.0.resnets.0.conv1"


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _kron(a, b):
    """Kronecker product by explicit block assembly (independent of np.kron)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    out = np.zeros((a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], *b.shape[2:]))
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i * b.shape[0] : (i + 1) * b.shape[0], j * b.shape[1] : (j + 1) * b.shape[1]] = (
                a[i, j] * b
            )
    return out


def _tucker(t, wa, wb):
    """W[p, q, k, l] = sum_ab t[a, b, k, l] wa[a, p] wb[b, q], by tensordot."""
    tmp = np.tensordot(wa.astype(np.float64), t.astype(np.float64), axes=([0], [0]))  # p b k l
    return np.moveaxis(np.tensordot(wb.astype(np.float64), tmp, axes=([0], [1])), 0, 1)


def _read(tmp_path, tensors):
    path = tmp_path / "ly.safetensors"
    write_safetensors(path, tensors)
    adapter = read_adapter(path)
    assert adapter.format == "lycoris"
    return adapter


def test_loha_linear(tmp_path):
    rng = np.random.default_rng(0)
    r, alpha = 4, 2.0
    w1a, w1b, w2a, w2b = (
        _rand(rng, 320, r),
        _rand(rng, r, 320),
        _rand(rng, 320, r),
        _rand(rng, r, 320),
    )
    adapter = _read(
        tmp_path,
        {
            f"{Q}.hada_w1_a": w1a,
            f"{Q}.hada_w1_b": w1b,
            f"{Q}.hada_w2_a": w2a,
            f"{Q}.hada_w2_b": w2b,
            f"{Q}.alpha": np.array(alpha, np.float32),
        },
    )
    layer = adapter[Q_PATH]
    assert isinstance(layer, DeltaLayer) and layer.kind == "loha"
    f = np.float64
    ref = (w1a.astype(f) @ w1b.astype(f)) * (w2a.astype(f) @ w2b.astype(f)) * (alpha / r)
    np.testing.assert_allclose(layer.delta(), ref, rtol=1e-5, atol=1e-5)


def test_loha_conv_flattened_is_reshaped_from_tables(tmp_path):
    rng = np.random.default_rng(1)
    r = 2
    tensors = {
        f"{CONV}.hada_w1_a": _rand(rng, 320, r),
        f"{CONV}.hada_w1_b": _rand(rng, r, 320 * 9),
        f"{CONV}.hada_w2_a": _rand(rng, 320, r),
        f"{CONV}.hada_w2_b": _rand(rng, r, 320 * 9),
    }  # no alpha: alpha = r
    layer = _read(tmp_path, tensors)[CONV_PATH]
    f = np.float64
    m1 = tensors[f"{CONV}.hada_w1_a"].astype(f) @ tensors[f"{CONV}.hada_w1_b"].astype(f)
    m2 = tensors[f"{CONV}.hada_w2_a"].astype(f) @ tensors[f"{CONV}.hada_w2_b"].astype(f)
    assert layer.delta_shape == (320, 320, 3, 3)
    np.testing.assert_allclose(
        layer.delta(), (m1 * m2).reshape(320, 320, 3, 3), rtol=1e-5, atol=1e-4
    )


def test_loha_tucker(tmp_path):
    rng = np.random.default_rng(2)
    r, alpha = 3, 1.5
    t1, t2 = _rand(rng, r, r, 3, 3), _rand(rng, r, r, 3, 3)
    w1a, w1b, w2a, w2b = (
        _rand(rng, r, 320),
        _rand(rng, r, 320),
        _rand(rng, r, 320),
        _rand(rng, r, 320),
    )
    layer = _read(
        tmp_path,
        {
            f"{CONV}.hada_t1": t1,
            f"{CONV}.hada_w1_a": w1a,
            f"{CONV}.hada_w1_b": w1b,
            f"{CONV}.hada_t2": t2,
            f"{CONV}.hada_w2_a": w2a,
            f"{CONV}.hada_w2_b": w2b,
            f"{CONV}.alpha": np.array(alpha, np.float16),
        },
    )[CONV_PATH]
    ref = _tucker(t1, w1a, w1b) * _tucker(t2, w2a, w2b) * (alpha / r)
    np.testing.assert_allclose(layer.delta(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decompose", ["none", "w2", "both"])
def test_lokr_linear(tmp_path, decompose):
    rng = np.random.default_rng(3)
    r, alpha = 4, 8.0
    # 320 = 16 * 20 (out), 320 = 16 * 20 (in)
    w1 = _rand(rng, 16, 16)
    w2 = _rand(rng, 20, 20)
    tensors = {f"{Q}.alpha": np.array(alpha, np.float32)}
    f = np.float64
    if decompose == "none":
        tensors |= {f"{Q}.lokr_w1": w1, f"{Q}.lokr_w2": w2}
        ref = _kron(w1, w2)  # both whole: scale 1 whatever alpha says
    elif decompose == "w2":
        w2a, w2b = _rand(rng, 20, r), _rand(rng, r, 20)
        tensors |= {f"{Q}.lokr_w1": w1, f"{Q}.lokr_w2_a": w2a, f"{Q}.lokr_w2_b": w2b}
        ref = _kron(w1, w2a.astype(f) @ w2b.astype(f)) * (alpha / r)
    else:
        w1a, w1b = _rand(rng, 16, r), _rand(rng, r, 16)
        w2a, w2b = _rand(rng, 20, r), _rand(rng, r, 20)
        tensors |= {
            f"{Q}.lokr_w1_a": w1a,
            f"{Q}.lokr_w1_b": w1b,
            f"{Q}.lokr_w2_a": w2a,
            f"{Q}.lokr_w2_b": w2b,
        }
        ref = _kron(w1a.astype(f) @ w1b.astype(f), w2a.astype(f) @ w2b.astype(f)) * (alpha / r)
    layer = _read(tmp_path, tensors)[Q_PATH]
    assert layer.kind == "lokr" and layer.delta_shape == (320, 320)
    np.testing.assert_allclose(layer.delta(), ref, rtol=1e-5, atol=1e-4)


def test_lokr_conv_tucker(tmp_path):
    rng = np.random.default_rng(4)
    r, alpha = 2, 1.0
    w1 = _rand(rng, 16, 16)
    t2, w2a, w2b = _rand(rng, r, r, 3, 3), _rand(rng, r, 20), _rand(rng, r, 20)
    layer = _read(
        tmp_path,
        {
            f"{CONV}.lokr_w1": w1,
            f"{CONV}.lokr_t2": t2,
            f"{CONV}.lokr_w2_a": w2a,
            f"{CONV}.lokr_w2_b": w2b,
            f"{CONV}.alpha": np.array(alpha, np.float32),
        },
    )[CONV_PATH]
    ref = _kron(w1, _tucker(t2, w2a, w2b)) * (alpha / r)
    assert layer.delta_shape == (320, 320, 3, 3)
    np.testing.assert_allclose(layer.delta(), ref, rtol=1e-4, atol=1e-4)


def test_incomplete_and_dora_refused(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "bad.safetensors"
    write_safetensors(
        path, {f"{Q}.hada_w1_a": _rand(rng, 320, 2), f"{Q}.hada_w1_b": _rand(rng, 2, 320)}
    )
    with pytest.raises(FormatError, match="incomplete LoHa") as info:
        read_adapter(path)
    assert str(path) in str(info.value) and Q in str(info.value)
    dora = tmp_path / "dora.safetensors"
    write_safetensors(
        dora,
        {
            f"{Q}.lokr_w1": _rand(rng, 16, 16),
            f"{Q}.lokr_w2": _rand(rng, 20, 20),
            f"{Q}.dora_scale": _rand(rng, 1, 320),
        },
    )
    with pytest.raises(FormatError, match="not an additive delta") as info:
        read_adapter(dora)
    assert f"{Q}.dora_scale" in str(info.value)
