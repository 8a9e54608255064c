from __future__ import annotations

import json

import numpy as np
import pytest
from _spacehelpers import random_models

from w2wkit.directions import Direction
from w2wkit.errors import DirectionError, SpaceError
from w2wkit.space import WeightSpace


@pytest.fixture(scope="module", params=["factors", "delta"])
def fitted(request):
    models = random_models(10, seed=2)
    space = WeightSpace(4, representation=request.param, solver="exact").fit(
        models, labels={"beard": [0, 1] * 5}
    )
    v = np.zeros(4)
    v[1] = 1.0
    space.directions_["beard"] = Direction("beard", v, "lstsq", score=0.9, info={"n": 10})
    return space, models


def test_save_load_round_trip(tmp_path, fitted):
    space, models = fitted
    out = space.save(tmp_path / "sp")
    assert sorted(p.name for p in out.iterdir()) == ["arrays.safetensors", "space.json"]
    meta = json.loads((out / "space.json").read_text())
    assert meta["format_version"] == 1 and meta["representation"] == space.representation
    assert meta["manifest"][3]["name"] == "model_0003" and meta["labels"] == ["beard"]
    loaded = WeightSpace.load(out, verify=True)
    np.testing.assert_array_equal(loaded.coefficients_, space.coefficients_)
    np.testing.assert_allclose(loaded.transform(models[:2]), space.transform(models[:2]))
    c = space.sample(2, seed=0)
    for a, b in zip(loaded.inverse_transform(c), space.inverse_transform(c), strict=True):
        for m in a:
            np.testing.assert_array_equal(a[m].delta(), b[m].delta())
    assert loaded.layout_ == space.layout_
    np.testing.assert_array_equal(loaded.labels_["beard"], [0, 1] * 5)
    d = loaded.directions_["beard"]
    assert d.score == 0.9 and d.info == {"n": 10} and d.vector[1] == 1.0
    with pytest.raises(SpaceError, match="output exists"):
        space.save(out)
    space.save(out, overwrite=True)


def test_future_version_and_damage(tmp_path, fitted):
    space, _ = fitted
    out = space.save(tmp_path / "sp")
    meta = json.loads((out / "space.json").read_text())
    meta["format_version"] = 99
    (out / "space.json").write_text(json.dumps(meta))
    with pytest.raises(SpaceError, match=r"format version 99.*newer.*upgrade"):
        WeightSpace.load(out)
    meta["format_version"] = 1
    (out / "space.json").write_text(json.dumps(meta))
    raw = bytearray((out / "arrays.safetensors").read_bytes())
    (out / "arrays.safetensors").write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(SpaceError, match="damaged"):
        WeightSpace.load(out)
    raw[-3] ^= 0xFF
    (out / "arrays.safetensors").write_bytes(bytes(raw))
    with pytest.raises(SpaceError, match=r"SHA-256"):
        WeightSpace.load(out, verify=True)
    (out / "space.json").write_text("{not json")
    with pytest.raises(SpaceError, match=r"space\.json is damaged"):
        WeightSpace.load(out)
    with pytest.raises(SpaceError, match="no such space"):
        WeightSpace.load(tmp_path / "nope")


def test_refuses_to_replace_a_folder_that_is_not_a_space(tmp_path, fitted):
    space, _ = fitted
    precious = tmp_path / "loras"
    precious.mkdir()
    (precious / "a.safetensors").write_bytes(b"x")
    with pytest.raises(SpaceError, match="not a w2wkit space"):
        space.save(precious, overwrite=True)
    assert (precious / "a.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_labels_from_files(tmp_path):
    models = random_models(4, seed=3)
    space = WeightSpace(2, solver="exact").fit(models)
    csv = tmp_path / "labels.csv"
    csv.write_text("file,beard,age\nmodel_0000.safetensors,1,30\nmodel_0002,no,\n")
    space.set_labels(csv)
    np.testing.assert_array_equal(space.labels_["beard"][[0, 2]], [1.0, 0.0])
    assert np.isnan(space.labels_["beard"][1]) and np.isnan(space.labels_["age"][2])
    js = tmp_path / "labels.json"
    js.write_text(json.dumps([{"name": "model_0001", "smile": True}]))
    space.set_labels(js)
    assert space.labels_["smile"][1] == 1.0
    csv.write_text("file,beard\nmodel_0000,1\nstranger.safetensors,0\nother,1\n")
    with pytest.raises(DirectionError, match=r"2 label row.*stranger\.safetensors, other"):
        space.set_labels(csv)
    csv.write_text("file,beard\nmodel_0000,maybe\n")
    with pytest.raises(DirectionError, match="'maybe' in row 'model_0000', column 'beard'"):
        space.set_labels(csv)
    csv.write_text("file,beard\nx,1\n")
    with pytest.raises(DirectionError, match="no label row names a model"):
        space.set_labels(csv)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
def test_training_prompt_from_file_metadata(tmp_path, fmt):
    from w2wkit.formats import write_adapter

    models = random_models(4, seed=5)
    for i, ad in enumerate(models):
        ad.metadata["w2wkit.world.prompt"] = "a photo of sks person"
        name = f"m{i}" + ("" if fmt == "peft" else ".safetensors")
        write_adapter(ad, tmp_path / "loras" / name, format=fmt)
    space = WeightSpace(2, solver="exact").fit(sorted((tmp_path / "loras").iterdir()))
    assert space.training_prompt_ == "a photo of sks person"
    space.save(tmp_path / "space")
    assert WeightSpace.load(tmp_path / "space").training_prompt_ == "a photo of sks person"
    # models that disagree, or one without the key: no recorded prompt
    models[1].metadata["w2wkit.world.prompt"] = "a photo of sks dog"
    assert WeightSpace(2, solver="exact").fit(models).training_prompt_ is None
    del models[1].metadata["w2wkit.world.prompt"]
    assert WeightSpace(2, solver="exact").fit(models).training_prompt_ is None


def test_delta_factors_saved_and_loaded_in_blocks(tmp_path, monkeypatch):
    # a delta space's factor stacks are written a block of models at a time and read
    # back from the file in blocks: the file holds exactly the stacks, the loaded space
    # reads the same factors and gives the same coefficients; a NaN planted in a saved
    # stack is refused on load, naming the array
    import w2wkit.persist as persist
    from w2wkit.collection import _SavedFactors
    from w2wkit.stio import read_safetensors

    models = random_models(9, rank=3, seed=21)
    space = WeightSpace(4, representation="delta").fit(models)
    monkeypatch.setattr(persist, "_FACTOR_BLOCK_BYTES", 64)  # many blocks per module
    path = space.save(tmp_path / "space")
    st = read_safetensors(path / "arrays.safetensors").tensors
    fac = space.delta_
    for i, m in enumerate(space.delta_modules_):
        np.testing.assert_array_equal(st[f"delta.{i}.up"], fac.up[m])
        np.testing.assert_array_equal(st[f"delta.{i}.down"], fac.down[m])
        np.testing.assert_array_equal(st[f"delta.{i}.owner"], fac.owner[m])
    back = WeightSpace.load(path)
    assert isinstance(back.delta_.spill, _SavedFactors)
    for m in space.delta_modules_:
        segs = fac.segments(m)
        for lo, hi in ((0, len(segs)), (1, 3), (len(segs) - 1, len(segs))):
            for a, b in zip(back.delta_.block(m, lo, hi), fac.block(m, lo, hi), strict=True):
                np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(back.transform(models), space.transform(models), rtol=1e-6)
    # saved again from the loaded space (factors read from its file): the same bytes
    again = back.save(tmp_path / "again")
    assert (again / "arrays.safetensors").read_bytes() == (path / "arrays.safetensors").read_bytes()
    # a NaN in the second module's down stack
    raw = bytearray((path / "arrays.safetensors").read_bytes())
    hlen = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8 : 8 + hlen])
    lo = head["delta.1.down"]["data_offsets"][0] + 8 + hlen
    raw[lo + 4 : lo + 8] = np.float32(np.nan).tobytes()
    (path / "arrays.safetensors").write_bytes(bytes(raw))
    with pytest.raises(SpaceError, match=r"NaN or Inf") as err:
        WeightSpace.load(path, verify=False)
    assert err.value.key == "delta.1"
