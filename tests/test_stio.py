"""The torch-free safetensors reader/writer."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import safetensors.numpy as stn
from hypothesis import given, settings
from hypothesis import strategies as st

from w2wkit.errors import FormatError
from w2wkit.stio import from_storage, read_safetensors, to_storage, write_safetensors


def test_round_trip_matches_reference_library(tmp_path):
    arrays = {
        "a": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
        "b": np.arange(7, dtype=np.float16),
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, arrays, metadata={"k": "v"})
    ref = stn.load_file(str(path))
    for key, value in arrays.items():
        np.testing.assert_array_equal(ref[key], value)
    back = read_safetensors(path)
    assert back.metadata == {"k": "v"}
    assert back.dtypes == {"a": "F32", "b": "F16"}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=64))
def test_bf16_narrowing_is_exact_for_bf16_values(bits):
    raw = np.array(bits, dtype=np.uint16)
    wide = from_storage(raw, "BF16")
    finite = np.isfinite(wide)
    np.testing.assert_array_equal(to_storage(wide, "BF16")[finite], raw[finite])


def test_existing_output_refused_and_no_partial_file(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": np.zeros(2, np.float32)})
    with pytest.raises(FormatError, match="exists"):
        write_safetensors(path, {"a": np.ones(2, np.float32)})
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"abc", "not a safetensors"),
        (struct.pack("<Q", 500) + b"{}", "truncated"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (
            struct.pack("<Q", 64)
            + b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'.ljust(64)
            + b"\0" * 8,
            "out of bounds",
        ),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=message) as info:
        read_safetensors(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
