"""Layers that cannot be read, deltas too big to expand, values that cannot be written.

- rank 0 and zero-size factors are refused on read (``inspect``/``convert``);
- a small LyCORIS file whose deltas are out of proportion to it is refused,
  naming the file and module, before any delta is allocated;
- writers refuse a value that narrowing to the storage dtype would turn into
  Inf (``--dtype fp16``, or an up factor stored in the down factor's dtype),
  and any NaN/Inf in a LoRA they write; no output file appears.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import w2wkit.formats.lycoris as lycoris
from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.cli.main import cli
from w2wkit.errors import FormatError
from w2wkit.formats import read_adapter, write_adapter
from w2wkit.stio import read_safetensors, write_safetensors

K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # SD1.5: 320 x 320
D = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # diffusers key prefix


def _cli(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(res, *needles: str) -> str:
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _save(tmp_path: Path, tensors: dict, name: str = "in.safetensors", **kw) -> Path:
    path = tmp_path / name
    write_safetensors(path, tensors, **kw)
    return path


# ----------------------------------------------------------------------------- degenerate layers


DEGENERATE = {
    "kohya_rank0": (
        {
            f"{K}.lora_down.weight": np.zeros((0, 320), np.float32),
            f"{K}.lora_up.weight": np.zeros((320, 0), np.float32),
            f"{K}.alpha": np.array(1.0, np.float32),
        },
        "rank 0",
    ),
    "kohya_rank0_no_alpha": (
        {
            f"{K}.lora_down.weight": np.zeros((0, 320), np.float32),
            f"{K}.lora_up.weight": np.zeros((320, 0), np.float32),
        },
        "rank 0",
    ),
    "kohya_zero_in": (
        {
            f"{K}.lora_down.weight": np.zeros((4, 0), np.float32),
            f"{K}.lora_up.weight": np.ones((320, 4), np.float32),
        },
        "zero-size",
    ),
    "kohya_zero_out": (
        {
            f"{K}.lora_down.weight": np.ones((4, 320), np.float32),
            f"{K}.lora_up.weight": np.zeros((0, 4), np.float32),
        },
        "zero-size",
    ),
    "diffusers_rank0": (
        {
            f"{D}.lora_A.weight": np.zeros((0, 640), np.float32),
            f"{D}.lora_B.weight": np.zeros((640, 0), np.float32),
        },
        "rank 0",
    ),
    "lokr_zero_size": (
        {
            f"{K}.lokr_w1": np.zeros((0, 16), np.float32),
            f"{K}.lokr_w2": np.ones((20, 20), np.float32),
        },
        "zero-size",
    ),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_layer_is_refused_on_read(tmp_path, case):
    tensors, words = DEGENERATE[case]
    path = _save(tmp_path, tensors)
    with pytest.raises(FormatError, match=words) as info:
        read_adapter(path)
    assert str(path) in str(info.value)
    _one_line_error(_cli("inspect", path), str(path), words)
    out = tmp_path / "out.safetensors"
    _one_line_error(_cli("convert", path, "--to", "kohya", "-o", out), words)
    assert not out.exists()


def test_rank_mismatch_is_refused(tmp_path):
    path = _save(
        tmp_path,
        {
            f"{K}.lora_down.weight": np.ones((4, 320), np.float32),
            f"{K}.lora_up.weight": np.ones((320, 3), np.float32),
        },
    )
    _one_line_error(_cli("inspect", path), str(path), "mismatch")


def test_validate_refuses_rank0_built_in_code():
    layer = LoraLayer(np.zeros((0, 8), np.float32), np.zeros((8, 0), np.float32), 1.0)
    with pytest.raises(FormatError, match="rank 0"):
        Adapter({"unet.x.to_q": layer}).validate()


# ----------------------------------------------------------------------------- LyCORIS expansion


def test_small_lokr_claiming_a_huge_delta_is_refused_before_allocating(tmp_path, monkeypatch):
    # the case: a ~170 kB LoKr whose Kronecker product is 25,000 x 25,000
    # (2.5 GB as float32, twice that in the float64 it is computed in)
    rng = np.random.default_rng(0)
    path = _save(
        tmp_path,
        {
            f"{K}.lokr_w1": rng.standard_normal((200, 200)).astype(np.float32),
            f"{K}.lokr_w2_a": rng.standard_normal((125, 1)).astype(np.float32),
            f"{K}.lokr_w2_b": rng.standard_normal((1, 125)).astype(np.float32),
            f"{K}.alpha": np.array(1.0, np.float32),
        },
    )
    assert path.stat().st_size < 200_000

    def never(*args, **kwargs):  # a regression fails here instead of allocating 5 GB
        raise AssertionError("the delta was computed")

    monkeypatch.setattr(lycoris, "lokr_delta", never)
    monkeypatch.setattr(lycoris, "loha_delta", never)
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="out of proportion") as info:
            read_adapter(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20
    assert str(path) in str(info.value) and K in str(info.value)
    _one_line_error(_cli("inspect", path), str(path), K, "out of proportion")


def test_expansion_bound_is_relative_to_the_file(tmp_path, monkeypatch):
    # rank-1 factors on both Kronecker sides: 256 stored numbers, 4096 x 4096 delta
    rng = np.random.default_rng(1)
    tensors = {
        f"{K}.lokr_w1_a": rng.standard_normal((64, 1)).astype(np.float32),
        f"{K}.lokr_w1_b": rng.standard_normal((1, 64)).astype(np.float32),
        f"{K}.lokr_w2_a": rng.standard_normal((64, 1)).astype(np.float32),
        f"{K}.lokr_w2_b": rng.standard_normal((1, 64)).astype(np.float32),
    }
    path = _save(tmp_path, tensors)
    assert (
        lycoris.expanded_size(
            "lokr",
            {"k1a": (64, 1), "k1b": (1, 64)}
            | {
                "k2a": (64, 1),
                "k2b": (1, 64),
            },
        )
        == 4096 * 4096
    )
    # under the 1 GiB floor it is read (64 MiB of delta)
    assert read_adapter(path)[
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ].delta_shape == (4096, 4096)
    # with a 1 MiB floor, 64 MiB from a ~1.5 kB file is far past 8192 x its size
    monkeypatch.setattr(lycoris, "EXPAND_FLOOR", 1 << 20)
    with pytest.raises(FormatError, match="out of proportion"):
        read_adapter(path)
    # a full-rank Kronecker pair of the same delta size is in proportion
    full = _save(
        tmp_path,
        {
            f"{K}.lokr_w1": rng.standard_normal((64, 64)).astype(np.float16),
            f"{K}.lokr_w2": rng.standard_normal((64, 64)).astype(np.float16),
        },
        name="full.safetensors",
    )
    assert read_adapter(full)[
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ].delta_shape == (4096, 4096)


def test_loha_expansion_counts_broadcasting(tmp_path, monkeypatch):
    # (N, 1) * (1, M) broadcasts to N x M: counted as such
    shapes = {"w1a": (3000, 1), "w1b": (1, 1), "w2a": (1, 1), "w2b": (1, 5000)}
    assert lycoris.expanded_size("loha", shapes) == 3000 * 5000


# ----------------------------------------------------------------------------- narrowing on write


def _kohya_file(tmp_path: Path, up_value: float, *, down="F32", up="F32") -> Path:
    rng = np.random.default_rng(2)
    down_arr = rng.standard_normal((2, 320)).astype(np.float32)
    up_arr = rng.standard_normal((320, 2)).astype(np.float32)
    up_arr[5, 1] = up_value
    return _save(
        tmp_path,
        {
            f"{K}.lora_down.weight": down_arr,
            f"{K}.lora_up.weight": up_arr,
            f"{K}.alpha": np.array(2.0, np.float32),
        },
        dtypes={f"{K}.lora_down.weight": down, f"{K}.lora_up.weight": up},
    )


@pytest.mark.parametrize("to", ["kohya", "diffusers", "peft"])
def test_convert_to_fp16_refuses_values_above_65504(tmp_path, to):
    src = _kohya_file(tmp_path, 70000.0)
    out = tmp_path / ("out" if to == "peft" else "out.safetensors")
    res = _cli("convert", src, "--to", to, "--dtype", "fp16", "-o", out)
    _one_line_error(res, "70000 does not fit F16", "lora_", "Inf", "option --dtype")
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))  # no temporary left either
    # the same file in fp32 or bf16 is fine
    assert _cli("convert", src, "--to", to, "--dtype", "fp32", "-o", out).exit_code == 0


@pytest.mark.parametrize("to", ["kohya", "diffusers", "peft"])
def test_up_factor_in_the_down_factors_dtype_is_refused(tmp_path, to):
    # down stored as F16, up as F32 with a value F16 cannot hold: the layer's
    # dtype is the down factor's, so both factors would be written as F16
    src = _kohya_file(tmp_path, 1e5, down="F16", up="F32")
    assert read_safetensors(src).dtypes[f"{K}.lora_up.weight"] == "F32"
    out = tmp_path / ("out" if to == "peft" else "out.safetensors")
    res = _cli("convert", src, "--to", to, "-o", out)
    _one_line_error(res, "does not fit F16", "Inf", "down factor's dtype", "option --dtype")
    assert not out.exists()


def test_bf16_rounding_to_inf_is_refused(tmp_path):
    src = _kohya_file(tmp_path, 3.4e38)
    out = tmp_path / "out.safetensors"
    _one_line_error(_cli("convert", src, "--to", "kohya", "--dtype", "bf16", "-o", out), "BF16")
    assert not out.exists()


def test_writers_refuse_nan_and_inf(tmp_path):
    down = np.ones((2, 320), np.float32)
    up = np.ones((320, 2), np.float32)
    up[0, 0] = np.nan
    adapter = Adapter(
        {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (
                LoraLayer(down, up, 1.0)
            )
        }
    )
    for fmt in ("kohya", "diffusers", "peft"):
        out = tmp_path / f"nan_{fmt}"
        with pytest.raises(FormatError, match="NaN") as info:
            write_adapter(adapter, out, format=fmt)
        assert str(out) in str(info.value)
        assert not out.exists()


def test_plain_writes_keep_nan_where_it_was_stored(tmp_path):
    # non-LoRA arrays (e.g. missing labels) may hold NaN; narrowing may not make one
    path = tmp_path / "arrays.safetensors"
    write_safetensors(path, {"labels": np.array([1.0, np.nan])})
    assert np.isnan(read_safetensors(path).tensors["labels"][1])
    with pytest.raises(FormatError, match="1e\\+300 does not fit F32"):
        write_safetensors(tmp_path / "b.safetensors", {"x": np.array([1e300])}, dtypes={"x": "F32"})
    assert not (tmp_path / "b.safetensors").exists()
