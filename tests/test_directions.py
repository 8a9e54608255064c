"""Pure direction core on planted synthetic coefficients (no WeightSpace)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import null_space

from w2wkit.directions import (
    PROBES,
    calibrate,
    cosine_matrix,
    cross_validated_score,
    disentangle,
    disentangle_sequential,
    fit_probe,
    group_direction,
    make_planted,
    prepare_labels,
    score_direction,
)
from w2wkit.errors import DirectionError


@pytest.fixture(scope="module")
def world():
    return make_planted(2000, 40, n_attributes=4, correlation=0.3, seed=0)


@pytest.mark.parametrize("method", PROBES)
def test_each_probe_recovers_its_planted_direction(world, method):
    for name in ("a0", "a1", "a2", "a3"):
        res = fit_probe(world.P, world.labels[name], method, cv=0)
        cos = float(res.filter @ world.readouts[name])
        assert cos >= 0.95, (method, name, cos)


def test_lstsq_is_pinv_of_centred_coefficients(world):
    y = world.labels["a2"].copy()
    y[::7] = np.nan
    res = fit_probe(world.P, y, "lstsq", cv=0)
    m = ~np.isnan(y)
    Pc = world.P[m] - world.P[m].mean(axis=0)
    ref = np.linalg.pinv(Pc) @ (y[m] - y[m].mean())
    np.testing.assert_allclose(res.filter, ref / np.linalg.norm(ref), atol=1e-10)
    # on fully centred scores this is the paper's pinv(P) @ y
    P0 = world.P - world.P.mean(axis=0)
    ref0 = np.linalg.pinv(P0) @ world.labels["a2"]
    got = fit_probe(P0, world.labels["a2"], "lstsq", cv=0).filter
    np.testing.assert_allclose(got, ref0 / np.linalg.norm(ref0), atol=1e-10)


def test_lstsq_pattern_of_binary_label_is_class_mean_difference(world):
    y = world.labels["a0"]
    res = fit_probe(world.P, y, "lstsq", cv=0)
    ref = world.P[y == 1].mean(axis=0) - world.P[y == 0].mean(axis=0)
    np.testing.assert_allclose(res.pattern, ref / np.linalg.norm(ref), atol=1e-10)


def test_cross_validated_scores_match_sklearn(world):
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = world.labels["a1"]
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    ref = cross_val_score(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
        world.P,
        y.astype(int),
        cv=folds,
    ).mean()
    got = cross_validated_score(world.P, y, "logistic", cv=5, random_state=0)
    assert got == pytest.approx(ref, abs=1e-9)
    cont = make_planted(600, 10, binary=False, seed=1)
    yc = cont.labels["a0"]
    ref_r2 = cross_val_score(
        LinearRegression(), cont.P, yc, cv=KFold(5, shuffle=True, random_state=0), scoring="r2"
    ).mean()
    got_r2 = cross_validated_score(cont.P, yc, "lstsq", cv=5, random_state=0)
    assert got_r2 == pytest.approx(ref_r2, abs=1e-9)
    res = fit_probe(world.P, y, "lstsq")
    assert 0.8 < res.score <= 1.0 and res.task == "binary"


def test_disentangle_removes_the_correlated_attribute(world):
    r0 = fit_probe(world.P, world.labels["a0"], "lstsq", cv=0)
    r1 = fit_probe(world.P, world.labels["a1"], "lstsq", cv=0)
    d0, d1 = world.readouts["a0"], world.readouts["a1"]
    assert abs(r0.filter @ d1) > 0.2  # correlated before
    v = disentangle(r0.filter, [r1.filter])
    assert abs(v @ r1.filter) < 1e-12
    assert abs(v @ d1) < 0.05
    assert v @ d0 >= 0.9
    # the same with a set: a1 and a2 at once; a null-space reference
    r2 = fit_probe(world.P, world.labels["a2"], "lstsq", cv=0)
    v2 = disentangle(r0.filter, [r1.filter, r2.filter])
    N = null_space(np.stack([r1.filter, r2.filter]))
    ref = N @ (N.T @ r0.filter)
    np.testing.assert_allclose(v2, ref / np.linalg.norm(ref), atol=1e-10)


def test_pattern_disentangled_against_filters_keeps_other_scores(world):
    # The pattern of a0 moves a1 (correlated); made orthogonal to a1's filter it
    # no longer changes a1's true score.
    r0 = fit_probe(world.P, world.labels["a0"], "lstsq", cv=0)
    r1 = fit_probe(world.P, world.labels["a1"], "lstsq", cv=0)
    d1 = world.readouts["a1"]
    sd1 = (world.P @ d1).std(ddof=1)
    _, s_before = calibrate(world.P, r0.pattern)
    before = abs(s_before * r0.pattern @ d1) / sd1
    v = disentangle(r0.pattern, [r1.filter])
    _, s_after = calibrate(world.P, v)
    after = abs(s_after * v @ d1) / sd1
    assert before > 0.2 and after < 0.05


def test_sequential_projections_leave_residue_qr_does_not():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(30)
    others = np.stack([base + 0.3 * rng.standard_normal(30) for _ in range(3)])
    v = rng.standard_normal(30) + 2 * base
    seq = disentangle_sequential(v, others)
    qr = disentangle(v, others)
    cos_seq = np.abs(cosine_matrix([seq, *others])[0, 1:])
    cos_qr = np.abs(cosine_matrix([qr, *others])[0, 1:])
    assert cos_seq.max() > 0.05
    assert cos_qr.max() < 1e-12


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 10_000),
    st.integers(1, 6),
    st.floats(0.0, 0.999),
)
def test_disentangle_is_orthogonal_to_every_member(seed, m, mix):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(12)
    others = mix * base + (1 - mix) * rng.standard_normal((m, 12))
    v = rng.standard_normal(12)
    out = disentangle(v, others)
    assert np.linalg.norm(out) == pytest.approx(1.0)
    assert np.abs(others @ out).max() <= 1e-10 * np.abs(others).max() * 12


def test_disentangle_degenerate_members_and_span_error():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(8)
    others = np.stack([a, 2 * a, np.zeros(8)])  # rank 1
    v = disentangle(rng.standard_normal(8), others)
    assert abs(v @ a) < 1e-12
    with pytest.raises(DirectionError, match="span"):
        disentangle(3 * a, [a])


def test_calibrate_uses_sample_std(world):
    v = world.readouts["a3"]
    mean, std = calibrate(world.P, v)
    proj = world.P @ v
    assert mean == pytest.approx(proj.mean())
    assert std == pytest.approx(proj.std(ddof=1), rel=1e-12)


def test_group_direction_is_difference_of_means():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((30, 6))
    b = rng.standard_normal((20, 6)) + np.array([0, 3, 0, 0, 0, 1.0])
    res = group_direction(a, b)
    ref = b.mean(axis=0) - a.mean(axis=0)
    np.testing.assert_allclose(res.filter, ref / np.linalg.norm(ref), atol=1e-12)
    assert res.method == "groups" and res.score >= 0.85
    probe = group_direction(a, b, method="logistic")
    assert probe.filter @ res.filter > 0.8


def test_score_direction_prefers_the_right_direction(world):
    y = world.labels["a2"]
    good = score_direction(world.P, y, world.readouts["a2"])
    bad = score_direction(world.P, y, world.readouts["a3"])
    assert good > 0.85 and bad < 0.65


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ([1.0, 1.0, 1.0, np.nan], "one class"),
        ([np.nan, np.nan, 1.0, 0.0], "at least 3"),
        ([0.0, 1.0, np.inf, 0.0], "infinite"),
        (["a", "b", "c", "d"], "not numeric"),
    ],
)
def test_bad_labels(labels, match):
    with pytest.raises(DirectionError, match=match) as info:
        prepare_labels(np.array(labels, dtype=object), "beard")
    assert "\n" not in str(info.value) and "beard" in str(info.value)


def test_continuous_label_with_classifier_probe_is_refused():
    w = make_planted(100, 5, binary=False, seed=0)
    with pytest.raises(DirectionError, match="binary"):
        fit_probe(w.P, w.labels["a0"], "svm")
    with pytest.raises(DirectionError, match="unknown probe"):
        fit_probe(w.P, w.labels["a0"], "pca")
