from __future__ import annotations

import json

import numpy as np
import pytest
from _spacehelpers import random_models
from click.testing import CliRunner

from w2wkit.cli.main import cli
from w2wkit.formats import read_adapter, write_adapter
from w2wkit.space import WeightSpace


@pytest.fixture
def loras(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    for i, ad in enumerate(random_models(8, seed=4)):
        write_adapter(ad, folder / f"m{i}.safetensors", format="kohya")
    return folder


def _run(args, cwd):
    """Run the CLI in ``cwd`` (where the default space folder lives)."""
    import os

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, args, catch_exceptions=False)
    finally:
        os.chdir(old)


def test_fit_info_project_sample(tmp_path, loras):
    labels = tmp_path / "labels.csv"
    labels.write_text("file,beard\nm0.safetensors,1\nm1,0\n")
    res = _run(["fit", str(loras), "--labels", str(labels)], tmp_path)
    assert res.exit_code == 0, res.output
    space_dir = tmp_path / "w2w-space"  # the documented default
    space = WeightSpace.load(space_dir)
    assert space.n_components_ == 7 and space.labels_["beard"][0] == 1.0

    res = _run(["info"], tmp_path)
    assert res.exit_code == 0, res.output
    assert "representation" in res.output and "factors" in res.output
    png = space_dir / "explained_variance.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = _run(["project", str(loras / "m3.safetensors")], tmp_path)
    assert res.exit_code == 0, res.output
    assert "relative reconstruction error 0.0" in res.output
    assert "m3" in res.output.split("nearest")[1]

    for fmt in ("kohya", "diffusers", "peft"):
        out = tmp_path / f"samples_{fmt}"
        res = _run(["sample", "-n", "2", "-o", str(out), "--format", fmt, "--seed", "1"], tmp_path)
        assert res.exit_code == 0, res.output
        name = "sample_0001" + ("" if fmt == "peft" else ".safetensors")
        ad = read_adapter(out / name)
        expect = space.inverse_transform(space.sample(2, seed=1))[1]
        for m in expect:
            np.testing.assert_allclose(ad[m].delta(), expect[m].delta(), rtol=1e-5, atol=1e-7)
        assert ad[next(iter(ad))].rank == space.layout_.rank(next(iter(ad)))


def test_delta_fit_of_mixed_ranks(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, ad in enumerate(random_models(3, rank=2) + random_models(3, rank=4, seed=9)):
        write_adapter(ad, folder / f"m{i}.safetensors", format="diffusers")
    res = _run(["fit", str(folder), "-o", "sp", "--representation", "delta", "-k", "3"], tmp_path)
    assert res.exit_code == 0, res.output
    res = _run(["sample", "--space", "sp", "-n", "1", "-o", "s", "--rank", "3"], tmp_path)
    assert res.exit_code == 0, res.output
    meta = read_adapter(tmp_path / "s" / "sample_0000.safetensors").metadata
    assert 0 < float(meta["w2wkit.energy_kept"]) <= 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["fit", "MIXED"], "--representation delta"),
        (["fit", "EMPTY"], "no models to fit"),
        (["fit", "ONE"], "at least 2 models"),
        (["fit", "LORAS", "-k", "50"], "exceeds N-1=7"),
        (["fit", "LORAS", "--labels", "BADLABELS"], "stranger"),
        (["info", "FUTURE"], "newer"),
        (["info", "nope"], "no such space"),
        (["import-w2w", "EMPTY"], "--allow-pickle"),
    ],
)
def test_bad_input_is_one_line(tmp_path, loras, args, needle):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "ONE").mkdir()
    write_adapter(random_models(1)[0], tmp_path / "ONE" / "a.safetensors", format="kohya")
    (tmp_path / "MIXED").mkdir()
    for i, ad in enumerate(random_models(2, rank=2) + random_models(1, rank=3)):
        write_adapter(ad, tmp_path / "MIXED" / f"x{i}.safetensors", format="kohya")
    (tmp_path / "BADLABELS").write_text("file,beard\nstranger,1\nm1,0\n")
    future = tmp_path / "FUTURE"
    WeightSpace(2).fit(random_models(4)).save(future)
    meta = json.loads((future / "space.json").read_text())
    meta["format_version"] = 7
    (future / "space.json").write_text(json.dumps(meta))
    args = [str(loras) if a == "LORAS" else a for a in args]
    res = CliRunner().invoke(cli, [str(tmp_path / a) if a.isupper() else a for a in args])
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], res.output
    assert needle in res.output


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_sample_checks_every_output_first_and_publishes_at_once(tmp_path, loras, fmt):
    assert _run(["fit", str(loras), "-o", "sp"], tmp_path).exit_code == 0
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "coefficients.npy").write_bytes(b"old")
    args = ["sample", "--space", "sp", "-n", "3", "-o", "s", "--seed", "2", "--format", fmt]
    res = _run(args, tmp_path)  # only coefficients.npy clashes: it used to be overwritten
    assert res.exit_code == 1 and "coefficients.npy: output exists" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == ["coefficients.npy", "keep.txt"]
    assert (out / "coefficients.npy").read_bytes() == b"old"
    (out / "coefficients.npy").unlink()
    second = "sample_0001" + ("" if fmt == "peft" else ".safetensors")
    (out / second).write_bytes(b"old")  # the second one clashes: nothing is written before it
    res = _run(args, tmp_path)
    assert res.exit_code == 1 and f"{second}: output exists" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", second]
    res = _run([*args, "--force"], tmp_path)  # a file replaced by a PEFT folder: refused whole
    if fmt == "peft":
        assert res.exit_code == 1 and "output exists and is a file" in res.output, res.output
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt", second]
        (out / second).unlink()
        res = _run([*args, "--force"], tmp_path)
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    stem = [f"sample_000{i}" + ("" if fmt == "peft" else ".safetensors") for i in range(3)]
    assert names == sorted(["coefficients.npy", "keep.txt", *stem])
    assert (out / "keep.txt").read_text() == "mine"
    assert np.load(out / "coefficients.npy").shape[0] == 3
    assert len(read_adapter(out / second).layers) == 4
    res = _run([*args, "--force"], tmp_path)  # again over its own outputs (folders for PEFT)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == names


def test_fit_without_a_row_cache_gives_the_same_space(tmp_path, loras):
    # --no-row-cache: a streamed fit reads the files on every pass; the space is the one
    # the row cache gives, bit for bit
    args = ["fit", str(loras), "-k", "3", "--solver", "randomized", "-o"]
    assert _run([*args, "cached"], tmp_path).exit_code == 0
    res = _run([*args, "files", "--no-row-cache"], tmp_path)
    assert res.exit_code == 0, res.output
    a = WeightSpace.load(tmp_path / "cached")
    b = WeightSpace.load(tmp_path / "files")
    np.testing.assert_array_equal(a.singular_values_, b.singular_values_)
    np.testing.assert_array_equal(a.components_, b.components_)
