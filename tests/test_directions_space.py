"""Directions inside a fitted WeightSpace: calibration, exact edits, composition."""

from __future__ import annotations

import json

import numpy as np
import pytest

space_mod = pytest.importorskip("w2wkit.space", reason="w2wkit.space (WeightSpace) not merged yet")

from _directions_world import planted_collection  # noqa: E402

from w2wkit import directions as D  # noqa: E402
from w2wkit.errors import DirectionError  # noqa: E402

WeightSpace = space_mod.WeightSpace
# Delta spaces re-compress each layer by SVD; at full rank (min(out, in) = 12
# or 16 here) the re-compression is exact, at a lower rank it is not.
FULL_RANK = 16


@pytest.fixture(scope="module")
def collection():
    return planted_collection(n=120, k=8, seed=0)


@pytest.fixture(scope="module", params=["factors", "delta"])
def space(request, collection):
    adapters, labels, _ = collection
    sp = WeightSpace(n_components=8, representation=request.param).fit(adapters)
    D.fit_directions(sp, labels)
    return sp


def _rank(space):
    return FULL_RANK if space.representation == "delta" else None


def _deltas(adapter):
    return {m: layer.delta().astype(np.float64) for m, layer in adapter.items()}


def test_fit_directions_stores_calibrated_directions(space, collection):
    _, labels, _ = collection
    P = np.asarray(space.coefficients_, dtype=np.float64)
    assert set(space.directions_) == {"a0", "a1", "a2", "a3"}
    for name, d in space.directions_.items():
        assert d.kind == D.DEFAULT_KIND and d.method == "lstsq"
        assert np.linalg.norm(d.vector) == pytest.approx(1.0)
        proj = P @ d.vector
        assert d.proj_std == pytest.approx(proj.std(ddof=1), rel=1e-12)
        assert d.proj_mean == pytest.approx(proj.mean(), abs=1e-9)
        assert 0.75 < d.score <= 1.0
        # the other kind is stored too, and the stored pattern is Cov(P) @ filter
        filt = D.direction_vector(d, "filter")
        Pc = P - P.mean(axis=0)
        ref = Pc.T @ (Pc @ filt)
        np.testing.assert_allclose(d.vector, ref / np.linalg.norm(ref), atol=1e-9)
        y = labels[name]
        assert d.info["label_stats"]["n_positive"] == int(y.sum())


@pytest.mark.parametrize("strength", [1.7, -0.6])
def test_edit_moves_projection_by_exactly_s_std(space, collection, strength):
    adapters, _, _ = collection
    for row in (3, 57):
        a = adapters[row]
        d = space.directions_["a2"]
        out = D.edit(space, a, {"a2": strength}, rank=_rank(space))
        moved = (space.transform(out)[0] - space.transform(a)[0]) @ d.vector
        assert moved == pytest.approx(strength * d.proj_std, rel=1e-6)


def test_strength_zero_returns_input_deltas_exactly(space, collection):
    a = collection[0][5]
    out = space.edit(a, {"a1": 0.0})  # the WeightSpace method
    ref, got = _deltas(a), _deltas(out)
    assert list(got) == list(ref)
    for m in ref:
        np.testing.assert_array_equal(got[m], ref[m])


def test_edits_compose(space, collection):
    a = collection[0][8]
    r = _rank(space)
    both = D.edit(space, a, {"a0": 1.2, "a3": -0.7}, rank=r)
    seq = D.edit(space, D.edit(space, a, {"a0": 1.2}, rank=r), {"a3": -0.7}, rank=r)
    for m, ref in _deltas(both).items():
        got = _deltas(seq)[m]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), m
    hist = json.loads(seq.metadata[D.EDIT_METADATA_KEY])
    assert [h["strengths"] for h in hist] == [{"a0": 1.2}, {"a3": -0.7}]


def test_project_drops_residual_and_mean_model(space, collection):
    a = collection[0][11]
    d = space.directions_["a0"]
    delta = 0.9 * d.proj_std * d.vector
    out = D.edit(space, a, {"a0": 0.9}, keep_residual=False, rank=_rank(space))
    np.testing.assert_allclose(
        space.transform(out)[0], space.transform(a)[0] + delta, atol=1e-4 * d.proj_std
    )
    mean = D.edit(space, None, {"a0": 0.9}, rank=_rank(space))
    np.testing.assert_allclose(
        space.transform(mean)[0], space.coef_mean_ + delta, atol=1e-4 * d.proj_std
    )
    assert json.loads(mean.metadata[D.EDIT_METADATA_KEY])[0]["input"] == "mean model"


def test_disentangle_in_space(space, collection):
    _, labels, _ = collection
    before = space.directions_["a0"]
    try:
        d, rep = D.disentangle_direction(space, "a0", ["a1"], labels=labels["a0"], store=False)
    finally:
        space.directions_["a0"] = before
    filt1 = D.direction_vector(space.directions_["a1"], "filter")
    assert abs(d.vector @ filt1) < 1e-10
    assert abs(rep.before[0, 1]) > abs(rep.after[0, 1])
    assert d.info["orthogonal_to"] == ["a1"]
    assert d.info["disentangled"]["score_after"] > 0.6
    P = np.asarray(space.coefficients_, dtype=np.float64)
    assert d.proj_std == pytest.approx((P @ d.vector).std(ddof=1), rel=1e-12)


def test_edit_orthogonal_to_keeps_other_probe_score(space, collection):
    a = collection[0][2]
    out = D.edit(space, a, {"a0": 2.0}, orthogonal_to=["a1"], rank=_rank(space))
    filt1 = D.direction_vector(space.directions_["a1"], "filter")
    change = (space.transform(out)[0] - space.transform(a)[0]) @ filt1
    plain = D.edit(space, a, {"a0": 2.0}, rank=_rank(space))
    change_plain = (space.transform(plain)[0] - space.transform(a)[0]) @ filt1
    assert abs(change) < 1e-5 * abs(change_plain)


def test_group_direction_in_space(space, collection):
    adapters, labels, _ = collection
    y = labels["a2"]
    ga = [a for a, v in zip(adapters, y, strict=True) if v == 0]
    gb = [a for a, v in zip(adapters, y, strict=True) if v == 1]
    d = D.group_direction_in_space(space, "g", ga, gb, store=False)
    P = np.asarray(space.coefficients_, dtype=np.float64)
    ref = P[y == 1].mean(axis=0) - P[y == 0].mean(axis=0)
    np.testing.assert_allclose(d.vector, ref / np.linalg.norm(ref), atol=1e-5)
    assert d.method == "groups"


def test_save_load_keeps_directions(space, tmp_path):
    space.save(tmp_path / "sp")
    back = WeightSpace.load(tmp_path / "sp")
    assert set(back.directions_) == set(space.directions_)
    for n, d in space.directions_.items():
        b = back.directions_[n]
        np.testing.assert_allclose(b.vector, d.vector, rtol=0, atol=1e-12)
        assert b.proj_std == d.proj_std and b.kind == d.kind
        np.testing.assert_allclose(
            D.direction_vector(b, "filter"), D.direction_vector(d, "filter"), atol=1e-12
        )


def test_bad_edits(space, collection):
    a = collection[0][0]
    with pytest.raises(DirectionError, match=r"unknown direction 'age'; available: a0, a1"):
        D.edit(space, a, {"age": 1.0})
    for bad in ("x", float("nan"), float("inf"), None):
        with pytest.raises(DirectionError, match="strength"):
            D.edit(space, a, {"a0": bad})
    with pytest.raises(DirectionError, match="no edit"):
        D.edit(space, a, {})
    empty = WeightSpace(n_components=2).fit(collection[0][:10])
    with pytest.raises(DirectionError, match="no directions"):
        D.edit(empty, a, {"a0": 1.0})


def test_labels_no_overlap_and_one_class(space, collection, tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,beard\nnobody.safetensors,1\nghost.safetensors,0\n")
    with pytest.raises(DirectionError, match="no label row names a model"):
        D.fit_directions(space, csv)
    n = space.coefficients_.shape[0]
    with pytest.raises(DirectionError, match="one class"):
        D.fit_directions(space, {"beard": np.ones(n)})


def test_merge_api_example_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "merge_api.py"
    spec = importlib.util.spec_from_file_location("merge_api_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(tmp_path)
    out = capsys.readouterr().out
    assert "equals the weighted delta sum" in out and (tmp_path / "edited.safetensors").is_file()
