"""The safetensors reader refuses what the format's own parser refuses, and never blocks.

Every damaged file here is written byte by byte. Each was read without
complaint by the earlier hand-written reader (or crashed it with a
RecursionError); each must now be one :class:`FormatError` naming the file.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from w2wkit.cli.main import cli
from w2wkit.errors import FormatError
from w2wkit.stio import read_header, read_safetensors, write_safetensors

F32x2 = np.array([1.5, -2.0], dtype="<f4").tobytes()


def _entry(begin: int, end: int, shape: list[int], dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _raw(header: str | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """``header`` (JSON text) padded to 8 bytes, behind its length (or ``length``)."""
    head = header.encode() if isinstance(header, str) else header
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head) if length is None else length) + head + data


def _file(tmp_path: Path, raw: bytes, name: str = "x.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(raw)
    return path


def _obj(*pairs: tuple[str, str]) -> str:
    """JSON object text from ``(key, value text)`` pairs (json.dumps cannot repeat a key)."""
    return "{" + ",".join(f'"{k}":{v}' for k, v in pairs) + "}"


A = json.dumps(_entry(0, 8, [2]))
DAMAGED = {
    # two tensors share the same bytes: writing one would change the other
    "aliased": (_obj(("a", A), ("b", A)), F32x2, "overlaps that of 'a'"),
    "overlap": (
        json.dumps({"a": _entry(0, 8, [2]), "b": _entry(4, 12, [2])}),
        F32x2 + F32x2[:4],
        "overlaps that of 'a'",
    ),
    "gap": (
        json.dumps({"a": _entry(0, 4, [1]), "b": _entry(8, 12, [1])}),
        F32x2 + F32x2[:4],
        "gap of 4 bytes",
    ),
    "gap_at_start": (json.dumps({"a": _entry(4, 8, [1])}), F32x2, "gap of 4 bytes"),
    "trailing": (json.dumps({"a": _entry(0, 8, [2])}), F32x2 + b"evil", "4 bytes after"),
    "trailing_no_tensor": ("{}", b"evil", "4 bytes after"),
    # accepted by the reference parser too (it keeps the last), refused here
    "duplicate_key": (_obj(("a", A), ("a", A)), F32x2, "appears twice"),
    "duplicate_metadata_key": (
        _obj(("__metadata__", _obj(("k", '"1"'), ("k", '"2"'))), ("a", A)),
        F32x2,
        "appears twice",
    ),
    "deep_metadata": (
        _obj(("__metadata__", "[" * 5000 + "]" * 5000), ("a", A)),
        F32x2,
        "nested more than",
    ),
    "deep_extra_field": (
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + "[" * 100 + "]" * 100 + "}}",
        F32x2,
        "nested more than",
    ),
    # Python's json accepts a lone surrogate; the safetensors parser does not
    "lone_surrogate": (
        _obj(("__metadata__", _obj(("k", '"\\ud800"'))), ("a", A)),
        F32x2,
        "safetensors parser",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_header_is_one_format_error(tmp_path, case):
    header, data, words = DAMAGED[case]
    path = _file(tmp_path, _raw(header, data))
    with pytest.raises(FormatError, match=words) as info:
        read_safetensors(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)
    with pytest.raises(FormatError):  # the header alone is enough to refuse it
        read_header(path)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (struct.pack("<Q", 2**64 - 1) + b"{}      ", "header length"),
        (struct.pack("<Q", 0) + F32x2, "header length 0"),
        (_raw("{}", length=4096), "truncated safetensors header"),
        (_raw(json.dumps({"a": _entry(0, 8, [2])}), F32x2, length=16), "not JSON"),
        (b"\x01\x00\x00", "shorter than"),
    ],
    ids=["huge", "zero", "past_the_end", "cuts_the_json", "short"],
)
def test_bad_header_length(tmp_path, raw, words):
    path = _file(tmp_path, raw)
    with pytest.raises(FormatError, match=words) as info:
        read_safetensors(path)
    assert str(info.value).startswith(str(path))


def test_valid_files_still_read(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "b": rng.standard_normal((3, 5)).astype(np.float32),
        "a": rng.standard_normal((2,)).astype(np.float16),
        "empty": np.zeros((0, 4), np.float32),
        "w": rng.standard_normal((4, 4)).astype(np.float32),
    }
    path = tmp_path / "ok.safetensors"
    write_safetensors(
        path, arrays, metadata={"m": "v"}, dtypes={"w": "BF16", "b": "F32", "a": "F16"}
    )
    st = read_safetensors(path)
    assert list(st.tensors) == list(arrays)  # header order
    assert st.dtypes == {"b": "F32", "a": "F16", "empty": "F32", "w": "BF16"}
    assert st.metadata == {"m": "v"} and st.all_finite()
    np.testing.assert_array_equal(st.tensors["b"], arrays["b"])
    np.testing.assert_array_equal(st.tensors["a"], arrays["a"])
    assert st.tensors["w"].dtype == np.float32 and st.tensors["empty"].shape == (0, 4)
    entries, meta = read_header(path)
    assert meta == {"m": "v"} and entries["w"]["dtype"] == "BF16"
    # unpadded header, leading space, tensors listed out of offset order
    raw = _raw(
        " " + _obj(("b", json.dumps(_entry(4, 8, [1]))), ("a", json.dumps(_entry(0, 4, [1]))))
    )
    raw = raw[8:].rstrip(b" ")
    raw = struct.pack("<Q", len(raw)) + raw + F32x2
    st = read_safetensors(_file(tmp_path, raw, "unpadded.safetensors"))
    assert list(st.tensors) == ["b", "a"] and st.tensors["b"][0] == -2.0


def test_a_cached_header_is_still_checked_against_the_file_size(tmp_path):
    header = json.dumps({"a": _entry(0, 8, [2])})
    good = _file(tmp_path, _raw(header, F32x2), "good.safetensors")
    other = _file(tmp_path, _raw(header, F32x2[::-1]), "other.safetensors")
    longer = _file(tmp_path, _raw(header, F32x2 + b"more"), "longer.safetensors")
    assert read_safetensors(good).tensors["a"].tolist() == [1.5, -2.0]
    # same header, other data: read from this file, not from the first
    assert read_safetensors(other).tensors["a"].tolist() != [1.5, -2.0]
    with pytest.raises(FormatError, match="4 bytes after"):
        read_safetensors(longer)


def test_damaged_file_through_the_cli_is_one_line(tmp_path):
    header, data, _ = DAMAGED["aliased"]
    path = _file(tmp_path, _raw(header, data))
    res = CliRunner().invoke(cli, ["inspect", str(path)])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "overlaps" in lines[0]


# ----------------------------------------------------------------------------- not regular files


@contextmanager
def _deadline(seconds: float):
    """Fail (instead of hanging the suite) when the block takes longer than ``seconds``."""

    def _late(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, _late)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


needs_fifo = pytest.mark.skipif(sys.platform == "win32", reason="needs os.mkfifo and SIGALRM")


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.safetensors"
    os.mkfifo(path)
    return path


@needs_fifo
def test_fifo_is_refused_without_opening_it(fifo):
    with _deadline(10):
        with pytest.raises(FormatError, match="FIFO") as info:
            read_safetensors(fifo)
        with pytest.raises(FormatError, match="FIFO"):
            read_header(fifo)
    assert str(info.value).startswith(str(fifo))


@needs_fifo
@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{src}"],
        ["convert", "{src}", "--to", "kohya", "-o", "{out}"],
        ["convert", "{src}", "--to", "peft", "-o", "{out}", "--allow-pickle"],
    ],
    ids=["inspect", "convert", "convert_pickle_allowed"],
)
def test_fifo_through_the_cli_exits_1_at_once(tmp_path, fifo, args):
    src = fifo
    if "--allow-pickle" in args:
        src = tmp_path / "pipe.pt"
        os.mkfifo(src)
    out = tmp_path / "out.safetensors"
    argv = [a.format(src=src, out=out) for a in args]
    with _deadline(20):
        res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "FIFO" in lines[0] and str(src) in lines[0], res.output
    assert not out.exists()


@needs_fifo
def test_fifo_inside_a_peft_folder_is_refused(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 1, "lora_alpha": 1}')
    os.mkfifo(folder / "adapter_model.safetensors")
    with _deadline(20):
        res = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert res.exit_code == 1 and "FIFO" in res.output, res.output
    os.unlink(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").write_bytes(
        _raw(json.dumps({"a": _entry(0, 8, [2])}), F32x2)
    )
    os.unlink(folder / "adapter_config.json")
    os.mkfifo(folder / "adapter_config.json")
    with _deadline(20):
        res = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert res.exit_code == 1 and "FIFO" in res.output, res.output


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_character_device_is_refused():
    with _deadline(10):
        with pytest.raises(FormatError, match="character device"):
            read_safetensors("/dev/null")
        res = CliRunner().invoke(cli, ["inspect", "/dev/null"])
    assert res.exit_code == 1 and "character device" in res.output, res.output


@pytest.mark.parametrize(
    ("meta", "words"),
    [
        (_obj(("k", '"\\ud800"')), "safetensors parser"),
        (_obj(("k", "1")), "strings to strings"),
        (_obj(("k", '"1"'), ("k", '"2"')), "appears twice"),
        ("[" * 100 + "]" * 100, "strings to strings"),
    ],
    ids=["lone_surrogate", "number", "duplicate", "deep"],
)
def test_metadata_is_checked_when_the_tensor_entries_were_seen_before(tmp_path, meta, words):
    entries = ("a", A)
    first = _file(tmp_path, _raw(_obj(("__metadata__", _obj(("k", '"v"'))), entries), F32x2), "1")
    other = _file(tmp_path, _raw(_obj(("__metadata__", _obj(("k", '"w"'))), entries), F32x2), "2")
    assert read_safetensors(first).metadata == {"k": "v"}
    assert read_safetensors(other).metadata == {"k": "w"}  # its own metadata, same entries
    bad = _file(tmp_path, _raw(_obj(("__metadata__", meta), entries), F32x2), "3")
    with pytest.raises(FormatError, match=words):
        read_safetensors(bad)
    longer = _file(
        tmp_path, _raw(_obj(("__metadata__", _obj(("k", '"x"'))), entries), F32x2 + b"more"), "4"
    )
    with pytest.raises(FormatError, match="4 bytes after"):
        read_safetensors(longer)


def test_memory_mapped_read_validates_the_same(tmp_path, monkeypatch):
    import w2wkit.stio as stio

    monkeypatch.setattr(stio, "_MMAP_THRESHOLD", 1)
    header, data, _ = DAMAGED["aliased"]
    with pytest.raises(FormatError, match="overlaps"):
        read_safetensors(_file(tmp_path, _raw(header, data)))
    ok = _file(tmp_path, _raw(_obj(("a", A)), F32x2), "ok.safetensors")
    assert read_safetensors(ok).tensors["a"].tolist() == [1.5, -2.0]


def test_mutated_files_never_pass_what_the_reference_parser_refuses(tmp_path):
    """400 random mutations of a valid file: one FormatError or a file both parsers accept."""
    import random

    from safetensors import deserialize

    rng = random.Random(18)
    base = tmp_path / "base.safetensors"
    write_safetensors(
        base,
        {
            "a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.ones(3, np.float16),
            "c": np.zeros((2, 2), np.float32),
        },
        metadata={"k": "v"},
        dtypes={"c": "BF16"},
    )
    raw0 = base.read_bytes()
    n0 = struct.unpack("<Q", raw0[:8])[0]
    head0, data0 = raw0[8 : 8 + n0].decode(), raw0[8 + n0 :]
    tokens = ["0", "4", "8", "24", "-1", "1e400", "NaN", '"F32"', '"X"', "[]", "{}", "null"]
    tokens += [",", ":", "{", "}", "[", "]", '"__metadata__"', '"\\ud800"', '"a"']
    accepted = 0
    for i in range(400):
        kind = i % 4
        if kind == 0:  # a token spliced into the header
            j = rng.randrange(len(head0))
            text = head0[:j] + rng.choice(tokens) + head0[j + rng.randrange(6) :]
            raw = struct.pack("<Q", len(text.encode())) + text.encode() + data0
        elif kind == 1:  # data cut short or extended
            raw = raw0[: rng.randrange(len(raw0))] if i % 8 == 1 else raw0 + bytes(i % 7 + 1)
        elif kind == 2:  # other offsets and shapes
            header = json.loads(head0)
            key = rng.choice("abc")
            header[key]["data_offsets"] = [rng.randrange(40), rng.randrange(40)]
            if rng.random() < 0.3:
                header[key]["shape"] = [rng.randrange(5) for _ in range(rng.randrange(3))]
            text = json.dumps(header)
            raw = struct.pack("<Q", len(text)) + text.encode() + data0
        else:  # entries reordered, sometimes one repeated
            items = list(json.loads(head0).items())
            rng.shuffle(items)
            if rng.random() < 0.5:
                items.append(rng.choice(items))
            text = _obj(*((k, json.dumps(v)) for k, v in items))
            raw = struct.pack("<Q", len(text)) + text.encode() + data0
        path = _file(tmp_path, raw, f"m{i % 5}.safetensors")
        try:
            deserialize(raw)
            reference_ok = True
        except Exception:
            reference_ok = False
        try:
            read_safetensors(path)
        except FormatError:
            continue
        assert reference_ok, raw[:300]
        accepted += 1
    assert accepted > 20  # the mutations are not all fatal
