"""Property-based fuzzing of the command line with mutated valid inputs.

The property, for every mutation: the command exits 0 with a valid output, or
exits 1 with one plain-text line and no output - never an exception.
"""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from _spacehelpers import random_models
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from w2wkit.cli.main import cli
from w2wkit.formats import read_adapter, write_adapter
from w2wkit.space import WeightSpace

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)

#: JSON values a mutation may put anywhere.
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
#: Raw JSON spellings json.dumps cannot produce.
JSON_NASTY = st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "[" * 5000 + "]" * 5000, '"\\ud800"', "{"]
)


def _run(args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if res.exit_code not in (0, 1) or (
        res.exception is not None and not isinstance(res.exception, SystemExit)
    ):
        raise AssertionError(f"{args}: exit {res.exit_code}, {res.exception!r}\n{res.output}")
    if res.exit_code == 1:
        err = res.stderr.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert "internal error" not in err, f"{args}: {err}"  # an expected failure, handled
        assert "Traceback" not in res.output
    return res


def _check_lora_output(res, out):
    if res.exit_code == 0:
        ad = read_adapter(out)
        for layer in ad.layers.values():
            assert np.isfinite(layer.delta()).all()
    else:
        assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def valid_kohya(tmp_path_factory):
    folder = tmp_path_factory.mktemp("valid")
    return write_adapter(random_models(1, seed=3)[0], folder / "m.safetensors", format="kohya")


def _split(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header, body: bytes, *, text: str | None = None) -> bytes:
    head = (text if text is not None else json.dumps(header)).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(head)) + head + body


# ----------------------------------------------------------------- safetensors bytes


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_bytes(tmp_path, valid_kohya, data):
    raw = bytearray(valid_kohya.read_bytes())
    edits = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), min_size=1, max_size=6
        )
    )
    for pos, byte in edits:
        raw[pos] = byte
    cut = data.draw(st.none() | st.integers(0, len(raw)))
    blob = bytes(raw[:cut] if cut is not None else raw)
    src = tmp_path / "in.safetensors"
    src.write_bytes(blob)
    out = tmp_path / "out.safetensors"
    out.unlink(missing_ok=True)
    _run(["inspect", src])
    _check_lora_output(_run(["convert", src, "--to", "kohya", "-o", out]), out)


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(tmp_path, valid_kohya, data):
    header, body = _split(valid_kohya.read_bytes())
    keys = [k for k in header if k != "__metadata__"]
    key = data.draw(st.sampled_from(keys))
    what = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "body", "nasty"]))
    text = None
    if what == "dtype":
        header[key]["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I8", "U8", "x"]))
    elif what == "shape":
        header[key]["shape"] = data.draw(st.lists(st.integers(-2, 2**40), max_size=4) | JSON_VALUES)
    elif what == "data_offsets":
        header[key]["data_offsets"] = data.draw(
            st.lists(st.integers(-1, len(body) + 64), min_size=0, max_size=3) | JSON_VALUES
        )
    elif what == "entry":
        header[key] = data.draw(JSON_VALUES)
    elif what == "body":
        body = body + bytes(data.draw(st.integers(1, 64)))
    else:
        text = json.dumps(header).replace(
            json.dumps(header[key]["shape"]), data.draw(JSON_NASTY), 1
        )
    src = tmp_path / "in.safetensors"
    src.write_bytes(_join(header, body, text=text))
    out = tmp_path / "out.safetensors"
    out.unlink(missing_ok=True)
    _run(["inspect", src])
    _check_lora_output(_run(["convert", src, "--to", "diffusers", "-o", out]), out)


# ----------------------------------------------------------------- kohya alphas


@FUZZ
@given(
    alpha=st.floats(allow_nan=True, allow_infinity=True, width=32)
    | st.sampled_from([0.0, -1.0, 1e30])
)
def test_fuzz_kohya_alphas(tmp_path, valid_kohya, alpha):
    from w2wkit.stio import read_safetensors, write_safetensors

    st_file = read_safetensors(valid_kohya)
    tensors = dict(st_file.tensors)
    key = sorted(k for k in tensors if k.endswith(".alpha"))[0]
    tensors[key] = np.asarray(alpha, np.float32)
    src = tmp_path / "in.safetensors"
    write_safetensors(src, tensors, overwrite=True)
    out = tmp_path / "out.safetensors"
    out.unlink(missing_ok=True)
    shutil.rmtree(tmp_path / "peft", ignore_errors=True)
    _run(["inspect", src])
    _check_lora_output(
        _run(["convert", src, "--to", "peft", "-o", tmp_path / "peft"]), tmp_path / "peft"
    )
    _check_lora_output(_run(["convert", src, "--to", "kohya", "--dtype", "fp16", "-o", out]), out)


# ----------------------------------------------------------------- PEFT configs


@pytest.fixture(scope="module")
def valid_peft(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft")
    return write_adapter(random_models(1, seed=5)[0], folder / "adapter", format="peft")


@FUZZ
@given(data=st.data())
def test_fuzz_peft_config(tmp_path, valid_peft, data):
    src = tmp_path / "adapter"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(valid_peft, src)
    cfg_path = src / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    field = data.draw(st.sampled_from([*sorted(cfg), "rank_pattern", "alpha_pattern", "new"]))
    if data.draw(st.booleans()):
        cfg[field] = data.draw(JSON_VALUES)
        cfg_path.write_text(json.dumps(cfg))
    else:
        text = json.dumps({**cfg, field: "@@"}).replace('"@@"', data.draw(JSON_NASTY))
        cfg_path.write_text(text)
    out = tmp_path / "out.safetensors"
    out.unlink(missing_ok=True)
    _run(["inspect", src])
    _check_lora_output(_run(["convert", src, "--to", "kohya", "-o", out]), out)


# ----------------------------------------------------------------- spaces and labels


@pytest.fixture(scope="module")
def valid_space(tmp_path_factory):
    root = tmp_path_factory.mktemp("space")
    folder = root / "loras"
    folder.mkdir()
    for i, ad in enumerate(random_models(6, seed=7)):
        write_adapter(ad, folder / f"m{i}.safetensors", format="kohya")
    res = CliRunner().invoke(cli, ["fit", str(folder), "-o", str(root / "space"), "-k", "3"])
    assert res.exit_code == 0, res.output
    return root / "space", folder


def _fresh_space(valid_space, tmp_path):
    """A copy of the valid space for one example to damage."""
    space = tmp_path / "space"
    shutil.rmtree(space, ignore_errors=True)
    shutil.copytree(valid_space[0], space)
    return space


def _mutate_json_file(path, data):
    obj = json.loads(path.read_text())
    # walk to a random container and replace or drop one of its entries
    node = obj
    for _ in range(data.draw(st.integers(0, 3))):
        children = [
            k
            for k, v in (node.items() if isinstance(node, dict) else enumerate(node))
            if isinstance(v, dict | list) and v
        ]
        if not children:
            break
        node = node[data.draw(st.sampled_from(children))]
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    if not keys:
        return
    k = data.draw(st.sampled_from(keys))
    action = data.draw(st.sampled_from(["value", "drop", "nasty"]))
    if action == "drop" and isinstance(node, dict):
        del node[k]
        path.write_text(json.dumps(obj))
    elif action == "nasty":
        node[k] = "@@MARK@@"
        path.write_text(json.dumps(obj).replace('"@@MARK@@"', data.draw(JSON_NASTY), 1))
    else:
        node[k] = data.draw(JSON_VALUES)
        path.write_text(json.dumps(obj))


@FUZZ
@given(data=st.data())
def test_fuzz_space_json(tmp_path, valid_space, data):
    space = _fresh_space(valid_space, tmp_path)
    _mutate_json_file(space / "space.json", data)
    _run(["info", space])
    out = tmp_path / "samples"
    shutil.rmtree(out, ignore_errors=True)
    res = _run(["sample", "-n", "2", "--space", space, "-o", out])
    if res.exit_code == 0:
        files = sorted(out.glob("*.safetensors"))
        assert len(files) == 2
        for f in files:
            assert all(np.isfinite(l.delta()).all() for l in read_adapter(f).layers.values())
    else:
        assert not out.exists()


LABEL_CELLS = st.sampled_from(["1", "0", "0.5", "", "nan", "inf", "-inf", "1e400", "x", "m0", "m9"])


@FUZZ
@given(data=st.data())
def test_fuzz_labels(tmp_path, valid_space, data):
    space = _fresh_space(valid_space, tmp_path)
    cols = data.draw(
        st.lists(st.sampled_from(["file", "beard", "age", "beard", "name"]), min_size=1, max_size=4)
    )
    rows = data.draw(
        st.lists(st.lists(LABEL_CELLS, min_size=len(cols), max_size=len(cols)), max_size=7)
    )
    names = [f"m{i}" for i in range(6)]
    rows = [
        [names[i % 6] if c == "file" else v for c, v in zip(cols, r, strict=True)]
        for i, r in enumerate(rows)
    ]
    as_json = data.draw(st.booleans())
    if as_json:
        labels = tmp_path / "labels.json"
        text = json.dumps(
            {
                n: {c: v for c, v in zip(cols, r, strict=True)}
                for n, r in zip(names, rows, strict=False)
            }
        )
        if data.draw(st.booleans()):
            text = text.replace('"inf"', data.draw(JSON_NASTY), 1)
        labels.write_text(text)
    else:
        labels = tmp_path / "labels.csv"
        labels.write_text("\n".join(",".join(r) for r in [cols, *rows]) + "\n")
    before = (space / "space.json").read_bytes()
    res = _run(["directions", space, "--labels", labels])
    if res.exit_code == 1:
        assert (space / "space.json").read_bytes() == before
    else:
        WeightSpace.load(space)
