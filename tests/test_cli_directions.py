"""``w2wkit directions`` and ``w2wkit apply`` end to end, bad input included."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

space_mod = pytest.importorskip("w2wkit.space", reason="w2wkit.space (WeightSpace) not merged yet")

from _directions_world import MODULE_SHAPES, planted_collection  # noqa: E402

from w2wkit import directions as D  # noqa: E402
from w2wkit.cli.main import cli  # noqa: E402
from w2wkit.formats.registry import read_adapter, write_adapter  # noqa: E402

WeightSpace = space_mod.WeightSpace


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder of kohya files, a labels CSV and a fitted space ./w2w-space."""
    root = tmp_path_factory.mktemp("dirs")
    adapters, labels, _ = planted_collection(n=60, k=6, seed=1)
    loras = root / "loras"
    for i, a in enumerate(adapters):
        write_adapter(a, loras / f"m{i:03d}.safetensors", format="kohya")
    rows = ["file,a0,a1,a2,a3"]
    for i in range(len(adapters)):
        vals = [labels[n][i] for n in ("a0", "a1", "a2", "a3")]
        cells = ["" if (i == 4 and j == 2) else f"{v:g}" for j, v in enumerate(vals)]
        rows.append(f"m{i:03d}.safetensors," + ",".join(cells))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    WeightSpace(n_components=6).fit(loras).save(root / "bare-space")
    return root


@pytest.fixture(scope="module")
def fitted(world):
    """./w2w-space: a copy of the bare space with directions fitted by the CLI."""
    import shutil

    sp_path = world / "w2w-space"
    shutil.copytree(world / "bare-space", sp_path)
    res = CliRunner().invoke(
        cli, ["directions", str(sp_path), "--labels", str(world / "labels.csv")]
    )
    assert res.exit_code == 0, res.output
    return sp_path


def run(args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def one_line_error(res):
    assert res.exit_code != 0
    text = res.stderr.strip()
    assert text and "\n" not in text, text
    assert "Traceback" not in res.output
    return text


def test_directions_fit_and_list(fitted):
    sp = WeightSpace.load(fitted)
    assert set(sp.directions_) == {"a0", "a1", "a2", "a3"}
    d = sp.directions_["a2"]
    assert d.kind == "pattern" and d.method == "lstsq" and d.info["n_labelled"] == 59
    res = run(["directions", fitted, "--list"])
    assert res.exit_code == 0, res.output
    for word in ("a0", "a3", "lstsq", "pattern", "cosines"):
        assert word in res.output
    res = run(["directions", fitted, "--list", "--json"])
    listed = json.loads(res.output)
    assert listed["a1"]["score"] == pytest.approx(sp.directions_["a1"].score)


def test_directions_method_kind_disentangle(world, tmp_path):
    import shutil

    sp_path = tmp_path / "sp"
    shutil.copytree(world / "bare-space", sp_path)
    args = ["directions", sp_path, "--labels", world / "labels.csv", "--method", "logistic"]
    res = run([*args, "--kind", "filter", "--disentangle", "a0=a1,a2"])
    assert res.exit_code == 0, res.output
    assert "disentangled a0" in res.output and "score" in res.output
    sp = WeightSpace.load(sp_path)
    a0 = sp.directions_["a0"]
    assert a0.method == "logistic" and a0.kind == "filter"
    assert a0.info["orthogonal_to"] == ["a1", "a2"]
    for other in ("a1", "a2"):
        assert abs(a0.vector @ D.direction_vector(sp.directions_[other], "filter")) < 1e-10
    # disentangle existing directions without refitting
    res = run(["directions", sp_path, "--disentangle", "a3=a2"])
    assert res.exit_code == 0, res.output
    sp = WeightSpace.load(sp_path)
    assert sp.directions_["a3"].info["orthogonal_to"] == ["a2"]
    assert sp.directions_["a0"].info["orthogonal_to"] == ["a1", "a2"]


def test_apply_as_typed_edits_mean_model_in_cwd(fitted, world, monkeypatch):
    monkeypatch.chdir(world)
    res = run(["apply", "--direction", "a2", "--strength", "1.5"])
    assert res.exit_code == 0, res.output
    out = world / "mean_a2+1.5.safetensors"
    assert out.is_file()
    sp = WeightSpace.load(fitted)
    edited = read_adapter(out)
    assert edited.format == "kohya"
    d = sp.directions_["a2"]
    np.testing.assert_allclose(
        sp.transform(edited)[0], sp.coef_mean_ + 1.5 * d.proj_std * d.vector, atol=1e-4
    )
    hist = json.loads(edited.metadata[D.EDIT_METADATA_KEY])
    assert hist[0]["strengths"] == {"a2": 1.5} and hist[0]["input"] == "mean model"
    assert edited.metadata["w2wkit.made_by"] == "w2wkit apply"
    # again without --force: refused, file untouched
    before = out.read_bytes()
    text = one_line_error(run(["apply", "--direction", "a2", "--strength", "1.5"]))
    assert "exists" in text and "--force" in text
    assert out.read_bytes() == before
    assert run(["apply", "--direction", "a2", "--strength", "1.5", "--force"]).exit_code == 0


def test_apply_input_keeps_format_and_moves_exactly(fitted, world, tmp_path):
    src = world / "loras" / "m007.safetensors"
    out = tmp_path / "older.safetensors"
    res = run(
        ["apply", src, "--direction", "a1", "--strength", "-0.8", "--space", fitted, "-o", out]
    )
    assert res.exit_code == 0, res.output
    sp = WeightSpace.load(fitted)
    a, e = read_adapter(src), read_adapter(out)
    assert e.format == a.format == "kohya"
    d = sp.directions_["a1"]
    moved = (sp.transform(e)[0] - sp.transform(a)[0]) @ d.vector
    assert moved == pytest.approx(-0.8 * d.proj_std, rel=1e-6)
    # several edits at once, another format, residual dropped
    out2 = tmp_path / "multi.safetensors"
    res = run(
        [
            "apply",
            src,
            "--space",
            fitted,
            "--edit",
            "a0=1",
            "--edit",
            "a3=-0.5",
            "--format",
            "diffusers",
            "--project",
            "-o",
            out2,
        ]
    )
    assert res.exit_code == 0, res.output
    e2 = read_adapter(out2)
    assert e2.format == "diffusers"
    hist = json.loads(e2.metadata[D.EDIT_METADATA_KEY])
    assert hist[-1]["strengths"] == {"a0": 1.0, "a3": -0.5} and not hist[-1]["keep_residual"]


def test_groups_direction(fitted, world, tmp_path):
    import shutil

    sp_path = tmp_path / "sp"
    shutil.copytree(fitted, sp_path)
    y = np.array(
        [
            float(line.split(",")[3] or "nan")
            for line in (world / "labels.csv").read_text().splitlines()[1:]
        ]
    )
    for grp, val in (("A", 0.0), ("B", 1.0)):
        (tmp_path / grp).mkdir()
        for i in np.flatnonzero(y == val)[:12]:
            shutil.copy(world / "loras" / f"m{i:03d}.safetensors", tmp_path / grp)
    res = run(["directions", sp_path, "--groups", tmp_path / "A", tmp_path / "B", "--name", "g2"])
    assert res.exit_code == 0, res.output
    sp = WeightSpace.load(sp_path)
    assert sp.directions_["g2"].method == "groups"
    assert sp.directions_["g2"].vector @ sp.directions_["a2"].vector > 0.5


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (
            ["--direction", "age", "--strength", "1"],
            "unknown direction 'age'; available: a0, a1, a2, a3",
        ),
        (["--direction", "a0", "--strength", "abc"], "not a number"),
        (["--direction", "a0", "--strength", "nan"], "not finite"),
        (["--direction", "a0", "--strength", "inf"], "not finite"),
        (["--direction", "a0"], "needs --strength"),
        (["--edit", "a0"], "NAME=STRENGTH"),
        ([], "nothing to apply"),
        (["--direction", "a0", "--strength", "1", "--energy", "0.9"], "only a delta space"),
        (["--direction", "a0", "--strength", "1", "--energy", "0"], "energy must lie in (0, 1]"),
    ],
)
def test_apply_bad_input(fitted, world, tmp_path, extra, needle):
    out = tmp_path / "x.safetensors"
    res = run(["apply", world / "loras" / "m001.safetensors", "--space", fitted, "-o", out, *extra])
    assert needle in one_line_error(res)
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_missing_space_and_space_without_directions(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = one_line_error(run(["apply", "--direction", "a0", "--strength", "1"]))
    assert "./w2w-space" in text and "w2wkit fit" in text and "--space" in text
    bare = world / "bare-space"
    text = one_line_error(run(["apply", "--direction", "a0", "--strength", "1", "--space", bare]))
    assert "no directions" in text
    assert "no directions" in one_line_error(run(["directions", bare, "--list"]))
    assert "no labels" in one_line_error(run(["directions", bare]))
    assert list(tmp_path.iterdir()) == []


def test_bad_labels(world, tmp_path):
    import shutil

    sp_path = tmp_path / "sp"
    shutil.copytree(world / "bare-space", sp_path)
    none = tmp_path / "none.csv"
    none.write_text("file,beard\nstranger.safetensors,1\nother.safetensors,0\n")
    assert "no label row" in one_line_error(run(["directions", sp_path, "--labels", none]))
    one = tmp_path / "one.csv"
    one.write_text("file,beard\n" + "".join(f"m{i:03d}.safetensors,1\n" for i in range(10)))
    text = one_line_error(run(["directions", sp_path, "--labels", one]))
    assert "one class" in text and "beard" in text
    assert WeightSpace.load(sp_path).directions_ == {}


def test_applied_files_load_in_diffusers(fitted, world, tmp_path, tiny_pipe):
    import copy

    from w2wkit.testing import attention_modules, module_shapes, relative_error, unet_weights

    pipe = copy.deepcopy(tiny_pipe)  # LoRAs are loaded into it below
    mods = attention_modules(pipe, ("to_q", "to_v"))
    assert module_shapes(pipe, mods) == MODULE_SHAPES
    before = unet_weights(pipe, mods)
    src = world / "loras" / "m010.safetensors"
    for fmt in ("kohya", "diffusers"):
        out = tmp_path / f"edit_{fmt}.safetensors"
        res = run(
            [
                "apply",
                src,
                "--space",
                fitted,
                "--edit",
                "a0=1.5",
                "--edit",
                "a1=-1",
                "--format",
                fmt,
                "-o",
                out,
            ]
        )
        assert res.exit_code == 0, res.output
        edited = read_adapter(out)
        pipe.load_lora_weights(str(out), adapter_name=fmt)
        pipe.fuse_lora(adapter_names=[fmt])
        after = unet_weights(pipe, mods)
        for m in mods:
            delta = edited[m].delta().astype(np.float64)
            assert relative_error(after[m] - before[m], delta) <= 1e-4, (fmt, m)
        pipe.unfuse_lora()
        pipe.unload_lora_weights()


def test_apply_energy_in_a_delta_space(world, tmp_path):
    sp_path = tmp_path / "delta-space"
    WeightSpace(n_components=6, representation="delta").fit(world / "loras").save(sp_path)
    res = run(["directions", sp_path, "--labels", world / "labels.csv"])
    assert res.exit_code == 0, res.output
    src = world / "loras" / "m001.safetensors"
    outs = {}
    for tag, extra in (("default", []), ("energy", ["--energy", "0.9999"])):
        out = tmp_path / f"{tag}.safetensors"
        res = run(["apply", src, "--space", sp_path, "--edit", "a0=2", "-o", out, *extra])
        assert res.exit_code == 0, res.output
        assert "energy kept" in res.output
        outs[tag] = read_adapter(out)
    kept = {t: float(a.metadata["w2wkit.energy_kept"]) for t, a in outs.items()}
    assert kept["default"] < 0.9999 <= kept["energy"]
    sp = WeightSpace.load(sp_path)
    expect = D.edit_delta(sp, {"a0": 2.0})
    base = sp.transform(read_adapter(src))[0]
    errs = {
        t: np.linalg.norm(sp.transform(a)[0] - base - expect) / np.linalg.norm(expect)
        for t, a in outs.items()
    }
    assert errs["energy"] < 0.01 < errs["default"]
    bad = tmp_path / "samples"
    res = run(["sample", "--space", sp_path, "-n", "1", "-o", bad, "--energy", "2"])
    assert "energy must lie in (0, 1], got 2" in one_line_error(res)
    assert not bad.exists()
    good = tmp_path / "good"
    res = run(["sample", "--space", sp_path, "-n", "2", "-o", good, "--energy", "0.99"])
    assert res.exit_code == 0, res.output
    files = sorted(good.glob("sample_*.safetensors"))
    assert len(files) == 2
    for f in files:
        assert float(read_adapter(f).metadata["w2wkit.energy_kept"]) >= 0.99


def test_directions_are_saved_beside_the_space_untouched(world, tmp_path):
    import hashlib
    import shutil

    sp_path = tmp_path / "space"
    shutil.copytree(world / "bare-space", sp_path)

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    before = {n: digest(sp_path / n) for n in ("space.json", "arrays.safetensors")}
    res = run(["directions", sp_path, "--labels", world / "labels.csv"])
    assert res.exit_code == 0, res.output
    assert {n: digest(sp_path / n) for n in before} == before  # the space itself is not rewritten
    first = sorted(p.name for p in sp_path.glob("directions-*.safetensors"))
    assert len(first) == 1 and (sp_path / "directions.json").is_file()
    sp = WeightSpace.load(sp_path)
    assert sorted(sp.directions_) == ["a0", "a1", "a2", "a3"]
    # a second run replaces the side file and removes the old arrays file
    res = run(["directions", sp_path, "--disentangle", "a0=a1"])
    assert res.exit_code == 0, res.output
    second = sorted(p.name for p in sp_path.glob("directions-*.safetensors"))
    assert len(second) == 1 and second != first
    sp2 = WeightSpace.load(sp_path, verify=True)
    assert "disentangled" in sp2.directions_["a0"].info
    np.testing.assert_array_equal(sp2.directions_["a2"].vector, sp.directions_["a2"].vector)
    # saving elsewhere folds the directions into one self-contained folder
    sp2.save(tmp_path / "copy")
    assert not (tmp_path / "copy" / "directions.json").exists()
    meta = json.loads((tmp_path / "copy" / "space.json").read_text())
    assert sorted(meta["directions"]) == ["a0", "a1", "a2", "a3"]
    copy = WeightSpace.load(tmp_path / "copy")
    np.testing.assert_array_equal(copy.directions_["a0"].vector, sp2.directions_["a0"].vector)


def test_damaged_or_foreign_directions_file_is_named(world, fitted, tmp_path):
    import shutil

    sp_path = tmp_path / "space"
    shutil.copytree(fitted, sp_path)
    arrays = next(sp_path.glob("directions-*.safetensors"))
    raw = bytearray(arrays.read_bytes())
    raw[-3] ^= 0xFF
    arrays.write_bytes(bytes(raw))
    res = run(["info", sp_path])
    text = one_line_error(res)
    assert "directions arrays file is damaged" in text and arrays.name in text
    # a side file copied from another space
    other = tmp_path / "other"
    shutil.copytree(fitted, other)
    WeightSpace(n_components=5).fit(world / "loras").save(tmp_path / "refit")
    for p in list(other.glob("directions*")):
        shutil.copy(p, tmp_path / "refit" / p.name)
    res = run(["info", tmp_path / "refit"])
    assert "belongs to another space" in one_line_error(res)
    # a side file pointing outside its folder
    meta = json.loads((other / "directions.json").read_text())
    meta["file"] = "../" + meta["file"]
    (other / "directions.json").write_text(json.dumps(meta))
    assert "outside the space" in one_line_error(run(["info", other]))
