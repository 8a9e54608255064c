"""Loading a space checks what it reads: hashes, file names, the type of every field."""

from __future__ import annotations

import json
import os
import struct

import pytest
from _spacehelpers import random_models
from click.testing import CliRunner

from w2wkit.cli.main import cli
from w2wkit.errors import SpaceError
from w2wkit.space import WeightSpace


@pytest.fixture(scope="module", params=["factors", "delta"])
def saved(request, tmp_path_factory):
    space = WeightSpace(3, representation=request.param, solver="exact").fit(
        random_models(6, seed=3), labels={"beard": [0, 1] * 3}
    )
    return space.save(tmp_path_factory.mktemp("sp") / "space")


@pytest.fixture
def copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "space")


def _flip_coefficient_byte(folder):
    """Flip the lowest mantissa byte of the first coefficient (stays finite)."""
    f = folder / "arrays.safetensors"
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    begin = header["coefficients"]["data_offsets"][0]
    raw[8 + n + begin] ^= 0x01
    f.write_bytes(bytes(raw))


def _edit(folder, change):
    meta = json.loads((folder / "space.json").read_text())
    change(meta)
    (folder / "space.json").write_text(json.dumps(meta))


def _cli(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_a_flipped_byte_is_caught_by_default(copy):
    _flip_coefficient_byte(copy)
    with pytest.raises(SpaceError, match=r"arrays\.safetensors: arrays file is damaged \(SHA-256"):
        WeightSpace.load(copy)
    WeightSpace.load(copy, verify=False)  # the user's choice: no hash, still every other check


def test_cli_checks_hashes_unless_no_verify(copy, tmp_path):
    _flip_coefficient_byte(copy)
    for args in (["info", copy], ["sample", "--space", copy, "-o", tmp_path / "s", "--seed", "0"]):
        res = _cli(args)
        assert res.exit_code == 1, res.output
        assert "SHA-256 mismatch" in res.output and "--no-verify" in res.output
        assert "Traceback" not in res.output
    res = _cli(["info", copy, "--no-verify", "--plot", tmp_path / "p.png"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("name", ["../arrays.safetensors", "/etc/passwd", "sub/arrays.safetensors"])
def test_files_must_lie_in_the_space_folder(copy, name):
    (copy.parent / "arrays.safetensors").write_bytes((copy / "arrays.safetensors").read_bytes())
    _edit(copy, lambda m: m["arrays"].__setitem__("file", name))
    with pytest.raises(SpaceError, match=r"key 'arrays\.file': names a file outside the space"):
        WeightSpace.load(copy, verify=False)


def test_a_link_out_of_the_folder_is_refused(copy):
    outside = copy.parent / "elsewhere.safetensors"
    os.replace(copy / "arrays.safetensors", outside)
    (copy / "arrays.safetensors").symlink_to(outside)
    with pytest.raises(SpaceError, match="link leading outside the space folder"):
        WeightSpace.load(copy)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda m: m.__setitem__("parameters", ["n_components", 3]), "parameters"),
        (lambda m: m.__setitem__("directions", [1, 2]), "directions"),
        (lambda m: m["parameters"].__setitem__("n_components", "three"), "parameters.n_components"),
        (lambda m: m.__setitem__("standardize", "yes"), "standardize"),
        (lambda m: m.__setitem__("manifest", [1, 2]), "manifest[0]"),
        (lambda m: m.__setitem__("labels", "beard"), "labels"),
        (
            lambda m: m["layout"]["modules"][0].__setitem__("down", [2, "x"]),
            "layout.modules[0].down",
        ),
        (lambda m: m.__setitem__("n_models", 10**30), "n_models"),
        (lambda m: m["arrays"].__setitem__("bytes", None), "arrays.bytes"),
        (lambda m: m["arrays"].__setitem__("shapes", {"mean": 7}), "arrays.shapes.mean"),
    ],
)
def test_wrong_typed_fields_give_one_space_error(copy, change, key):
    _edit(copy, change)
    with pytest.raises(SpaceError) as info:
        WeightSpace.load(copy)
    assert f"key '{key}'" in str(info.value) and "space.json" in str(info.value)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ('"n_models": Infinity', "non-standard number Infinity"),
        ('"n_models": 1e400', "does not fit a float"),
        ('"total_variance": -Infinity', "non-standard number -Infinity"),
    ],
)
def test_non_finite_numbers_give_one_space_error(copy, text, expect):
    meta = (copy / "space.json").read_text()
    key = text.split(":")[0]
    start = meta.index(key)
    end = meta.index(",", start)
    (copy / "space.json").write_text(meta[:start] + text + meta[end:])
    with pytest.raises(SpaceError, match=rf"space\.json is damaged: .*{expect}"):
        WeightSpace.load(copy)
    res = _cli(["info", copy])
    assert res.exit_code == 1 and "space.json is damaged" in res.output
    assert "Traceback" not in res.output and "internal error" not in res.output


def test_deep_nesting_gives_one_space_error(copy):
    _edit(copy, lambda m: m.__setitem__("source", "DEEP"))
    meta = (copy / "space.json").read_text()
    (copy / "space.json").write_text(meta.replace('"DEEP"', "[" * 100_000 + "]" * 100_000))
    with pytest.raises(SpaceError, match=r"space\.json is damaged: .*nested"):
        WeightSpace.load(copy)


def test_a_nan_score_written_by_save_still_loads(saved, tmp_path):
    import numpy as np

    from w2wkit.directions import Direction

    space = WeightSpace.load(saved)
    space.directions_["odd"] = Direction("odd", np.eye(3)[0], "lstsq", score=float("nan"))
    out = space.save(tmp_path / "nan-score")
    assert "NaN" in (out / "space.json").read_text()
    assert WeightSpace.load(out).directions_["odd"].score is None
