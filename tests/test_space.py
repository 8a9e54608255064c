from __future__ import annotations

import numpy as np
import pytest
from _spacehelpers import adapters_from_rows, layout, planted_rows, principal_angle
from sklearn.decomposition import PCA

from w2wkit.errors import SpaceError
from w2wkit.space import WeightSpace


def _standardised(x):
    # independent reference: numpy mean and ddof=0 std (scikit-learn's StandardScaler)
    return (x - x.mean(0)) / x.std(0)


@pytest.fixture(scope="module")
def planted():
    lay = layout(rank=2)
    x = planted_rows(40, lay, true_rank=6, seed=3)
    return lay, x, adapters_from_rows(x, lay)


@pytest.mark.parametrize("solver", ["exact", "auto"])
def test_noise_free_subspace_matches_numpy_and_sklearn(planted, solver):
    _lay, x, ads = planted
    space = WeightSpace(6, solver=solver).fit(ads)
    z = _standardised(x)
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    assert principal_angle(space.components_, vt[:6]) < 1e-3
    np.testing.assert_allclose(space.singular_values_, s[:6], rtol=1e-4)
    sk = PCA(n_components=6, svd_solver="full").fit(z)
    assert principal_angle(space.components_, sk.components_) < 1e-3
    np.testing.assert_allclose(space.singular_values_, sk.singular_values_, rtol=1e-4)
    np.testing.assert_allclose(space.explained_variance_, sk.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(
        space.explained_variance_ratio_, sk.explained_variance_ratio_, rtol=1e-4, atol=1e-7
    )
    # coefficients are the scores of the standardised rows
    np.testing.assert_allclose(
        np.abs(space.coefficients_), np.abs(sk.transform(z)), rtol=1e-3, atol=1e-4
    )
    assert space.scale_.min() > 0
    assert np.allclose(space.scale_, x.std(0), rtol=1e-5)


def test_unstandardised_matches_plain_pca(planted):
    _, x, ads = planted
    space = WeightSpace(5, standardize=False, solver="exact").fit(ads)
    sk = PCA(n_components=5, svd_solver="full").fit(x)
    assert principal_angle(space.components_, sk.components_) < 1e-3
    np.testing.assert_allclose(space.singular_values_, sk.singular_values_, rtol=1e-4)
    np.testing.assert_array_equal(space.scale_, 1.0)


def test_randomized_solver_with_noise():
    lay = layout(rank=2)
    x = planted_rows(60, lay, true_rank=8, noise=0.05, seed=4)
    space = WeightSpace(8, solver="randomized", random_state=0).fit(adapters_from_rows(x, lay))
    s = np.linalg.svd(_standardised(x), compute_uv=False)
    np.testing.assert_allclose(space.singular_values_, s[:8], rtol=1e-3)


def test_transform_inverse_round_trip_and_idempotent_projection(planted):
    lay, x, ads = planted
    space = WeightSpace(4, solver="exact").fit(ads)
    rng = np.random.default_rng(0)
    c = rng.standard_normal((5, 4)) * space.coef_std_
    back = space.transform(space.inverse_transform(c))
    np.testing.assert_allclose(back, c, atol=1e-4 * np.abs(c).max())
    # inverse_transform(transform(.)) is an orthogonal projection in the standardised metric
    p1 = space.inverse_transform(space.transform(ads[:3]))
    p2 = space.inverse_transform(space.transform(p1))
    for a, b in zip(p1, p2, strict=True):
        np.testing.assert_allclose(lay.flatten(a), lay.flatten(b), atol=1e-5)
    z = (x[:3] - space.mean_) / space.scale_
    zp = (np.stack([lay.flatten(a) for a in p1]) - space.mean_) / space.scale_
    # residual orthogonal to the components
    assert np.abs((z - zp) @ space.components_.T).max() < 1e-3
    # training coefficients are what transform gives
    np.testing.assert_allclose(space.transform(ads[:5]), space.coefficients_[:5], atol=1e-4)


def test_sampled_models_have_the_layout(planted):
    lay, _, ads = planted
    space = WeightSpace(4, solver="exact").fit(ads)
    c = space.sample(300, seed=1)
    assert c.shape == (300, 4)
    np.testing.assert_array_equal(c, space.sample(300, seed=1))
    assert np.all(np.abs(c.std(0) / space.coef_std_ - 1) < 0.15)
    assert np.allclose(space.sample(3, seed=1, temperature=0.0), space.coef_mean_)
    full = space.sample(2000, seed=2, covariance="full")
    np.testing.assert_allclose(full.std(0), space.coef_std_, rtol=0.1)
    for ad in space.inverse_transform(c[:2]):
        assert type(lay).from_adapter(ad) == lay


def test_nearest_by_cosine(planted):
    _, _, ads = planted
    space = WeightSpace(4, solver="exact").fit(ads)
    hits = space.nearest(space.coefficients_[[7, 12]] * 2.0, n=3)
    assert [h[0][0] for h in hits] == [7, 12]
    assert hits[0][0][1] == "model_0007"
    assert hits[0][0][2] == pytest.approx(1.0)
    assert hits[0][0][2] >= hits[0][1][2] >= hits[0][2][2]


def test_shift(planted):
    _lay, _, ads = planted
    space = WeightSpace(4, solver="exact").fit(ads)
    same = space.shift(ads[0], np.zeros(4))
    for m, layer in ads[0].items():
        np.testing.assert_array_equal(same[m].delta(), layer.delta())
    dc = np.array([1.0, -0.5, 0.0, 0.25])
    moved = space.shift(ads[0], dc)
    np.testing.assert_allclose(space.transform(moved)[0], space.coefficients_[0] + dc, atol=1e-4)
    # the residual outside the subspace is kept ...
    assert space.residual(moved)[0] > 0.01
    # ... or dropped
    proj = space.shift(ads[0], dc, keep_residual=False)
    assert space.residual(proj)[0] < 1e-3


def test_bad_inputs(planted):
    _, _, ads = planted
    with pytest.raises(SpaceError, match="exceeds N-1=39"):
        WeightSpace(40).fit(ads)
    with pytest.raises(SpaceError, match="at least 2 models"):
        WeightSpace(1).fit(ads[:1])
    with pytest.raises(SpaceError, match="unknown representation"):
        WeightSpace(2, representation="product").fit(ads)
    with pytest.raises(SpaceError, match="not fitted"):
        WeightSpace(2).transform(ads[0])
    space = WeightSpace(3, solver="exact").fit(ads)
    with pytest.raises(SpaceError, match=r"need \(n, 3\)"):
        space.inverse_transform(np.zeros((2, 5)))
    with pytest.raises(SpaceError, match="NaN"):
        space.inverse_transform(np.full(3, np.nan))
    with pytest.raises(SpaceError, match="identical"):
        WeightSpace(1).fit([ads[0], ads[0], ads[0]])


def test_constant_coordinates_get_a_positive_floor(planted):
    lay, x, _ = planted
    x = x.copy()
    x[:, :5] = 0.25  # zero variance
    space = WeightSpace(3, solver="exact").fit(adapters_from_rows(x, lay))
    assert np.all(space.scale_ > 0) and np.isfinite(space.scale_).all()
    assert np.all(space.scale_[:5] < 1e-4)
    assert np.isfinite(space.coefficients_).all()


def test_rows_on_disk_take_the_column_gram_and_match_the_in_memory_fit(tmp_path, monkeypatch):
    """Rows too large for the budget: a row cache on disk, the gram solver over column
    chunks (two reads), the same space as the in-memory fit; the scan's statistics too."""
    from w2wkit import solvers
    from w2wkit.collection import Collection
    from w2wkit.synthetic import planted_collection

    folder = tmp_path / "loras"
    shapes = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (700, 600)}
    planted_collection(folder, 90, shapes=shapes, n_latent=6)
    ref = WeightSpace(8, solver="gram").fit(Collection(folder))
    assert ref.info_["n_passes"] == 0  # in memory: no pass over a row cache
    monkeypatch.setattr(solvers, "memory_budget", lambda: 300_000)  # 256-column chunks
    monkeypatch.setattr(solvers, "MIN_COLUMN_CHUNK", 256)
    calls: list = []
    real = solvers.fit_gram_columns
    monkeypatch.setattr(
        solvers,
        "fit_gram_columns",
        lambda *a, **k: calls.append((*a[1:3], k.get("budget"))) or real(*a, **k),
    )
    got = WeightSpace(8, solver="gram").fit(Collection(folder, cache_dir=tmp_path / "cache"))
    assert calls == [(90, 1300, None)]  # rows beyond the budget: its widest chunks
    assert got.info_["n_passes"] == 2
    # the chunks come from the files (cached); only the template's row went to a row cache
    assert got.info_["rows_from"] == "files + row cache of 1 rows"
    np.testing.assert_allclose(got.singular_values_, ref.singular_values_, rtol=1e-5)
    # chunks narrower than MIN_COLUMN_CHUNK: the row stripes instead (still the same space)
    monkeypatch.setattr(solvers, "MIN_COLUMN_CHUNK", 4096)
    calls.clear()
    rows = WeightSpace(8, solver="gram").fit(Collection(folder, cache_dir=tmp_path / "cache"))
    assert calls == [] and rows.info_["n_passes"] > 2
    np.testing.assert_allclose(rows.singular_values_, ref.singular_values_, rtol=1e-5)
    assert principal_angle(got.components_, ref.components_) < 1e-3
    np.testing.assert_allclose(got.mean_, ref.mean_, rtol=1e-6, atol=1e-9)


def test_rows_stay_on_disk_only_where_that_halves_the_memory(monkeypatch):
    # SD1.5's rank-1 rows (d = 99,648), k = 1000, a 16 GB budget: held, the rows and the
    # N x N Gram; streamed, the Gram, the components and three 8192-column chunks. 3k rows
    # stay in memory (streaming would hold 0.61 of it and cost a third more time), 10k go
    # to the column Gram (0.50: 5.27 -> 2.96 GB measured); the randomized fits of larger N
    # and narrow rows are not affected
    from w2wkit import solvers

    monkeypatch.setattr(solvers, "memory_budget", lambda: 16 << 30)
    space = WeightSpace(1000)
    d = 99_648
    assert space._in_memory(3000, d) and space._column_gram(3000, d, 1000)
    assert not space._in_memory(10_000, d) and space._column_gram(10_000, d, 1000)
    held = 4 * 10_000 * d + solvers.column_gram_bytes(10_000, d, 0, width=0)
    assert solvers.column_gram_bytes(10_000, d, 1000) <= 0.5 * held
    assert not WeightSpace(999)._in_memory(30_000, d)  # randomized: streamed anyway
    assert WeightSpace(8, solver="gram")._in_memory(90, 1300)


def test_a_file_rewritten_between_the_column_grams_two_reads_is_named(tmp_path, monkeypatch):
    """The column Gram reads its chunks from the files twice; a file rewritten between the
    two reads (after the Gram, before the components) is named, never mixed in."""
    import os

    from w2wkit import solvers
    from w2wkit.collection import Collection
    from w2wkit.synthetic import planted_collection

    folder = tmp_path / "loras"
    shapes = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (700, 600)}
    planted_collection(folder, 40, shapes=shapes, n_latent=6)
    monkeypatch.setattr(solvers, "memory_budget", lambda: 150_000)  # 256-column chunks
    monkeypatch.setattr(solvers, "MIN_COLUMN_CHUNK", 256)
    victim = sorted(folder.glob("*.safetensors"))[7]
    real = solvers._gram_eigen

    def rewrite_then_eigen(*args, **kwargs):
        data = bytearray(victim.read_bytes())
        data[-4:] = np.float32(0.5).tobytes()
        victim.write_bytes(bytes(data))
        st = victim.stat()
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        return real(*args, **kwargs)

    monkeypatch.setattr(solvers, "_gram_eigen", rewrite_then_eigen)
    space = WeightSpace(5, solver="gram")
    with pytest.raises(SpaceError, match=victim.stem) as err:
        space.fit(Collection(folder, cache_dir=tmp_path / "cache"))
    assert "changed during the fit" in str(err.value)
    assert space.info_.get("rows_from") is None  # nothing fitted


def test_the_files_are_read_in_place_while_they_fit_the_page_cache(monkeypatch):
    # 10k SD1.5 rank-1 rows (4 GB) on disk for the column Gram, 30k (12 GB) for the
    # randomized passes: read from the files' cached pages, no row cache written; a
    # machine whose page cache they would outgrow writes the row cache
    from w2wkit import collection, solvers

    monkeypatch.setattr(solvers, "memory_budget", lambda: 16 << 30)
    d = 99_648
    monkeypatch.setattr(collection, "physical_memory", lambda: 23 << 30)
    assert WeightSpace(1000)._rows_in_files(10_000, d)
    assert WeightSpace(999)._rows_in_files(30_000, d)  # the randomized passes (12 GB)
    assert WeightSpace(999, row_cache=False)._rows_in_files(30_000, d)
    monkeypatch.setattr(collection, "physical_memory", lambda: 4 << 30)
    assert not WeightSpace(1000)._rows_in_files(10_000, d)
    assert WeightSpace(1000, row_cache=False)._rows_in_files(10_000, d)
    monkeypatch.setattr(collection, "physical_memory", lambda: 20 << 30)  # 65k: 26 GB
    assert not WeightSpace(999)._rows_in_files(65_000, d)


def test_streamed_rows_are_read_from_their_files(tmp_path, monkeypatch):
    """Without a row cache a randomized fit reads its rows from the models' own files on
    every pass: nothing but the template's row is written to a row cache, and the result
    is the bits of the fit from a row cache; a file rewritten between two passes is
    named."""
    import os

    from w2wkit import collection as coll_mod
    from w2wkit.collection import Collection
    from w2wkit.formats import read_adapter, write_adapter
    from w2wkit.synthetic import planted_collection

    folder = tmp_path / "loras"
    shapes = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (300, 200)}
    planted_collection(folder, 70, shapes=shapes, n_latent=6)
    cache = tmp_path / "cache"
    written = []
    passes = []
    real_blocks = coll_mod.FactorRows.blocks
    on_pass = [lambda: None]

    def blocks(self, *a, **k):
        passes.append(1)
        written.extend(p.stat().st_blocks * 512 for p in cache.glob("*/rows.npy"))
        if len(passes) == 2:
            on_pass[0]()
        return real_blocks(self, *a, **k)

    monkeypatch.setattr(coll_mod.FactorRows, "blocks", blocks)
    got = WeightSpace(5, solver="randomized", row_cache=False).fit(
        Collection(folder, cache_dir=cache)
    )
    assert got.info_["rows_from"] == "files + row cache of 1 rows"
    assert got.info_["n_passes"] > 2
    assert written and max(written) <= 4 * 500 + 65536  # a sparse file of one row
    # the default reads these files in place too (they fit the page cache): the reference
    # from a row cache, as where the files outgrow it
    with monkeypatch.context() as m:
        m.setattr(WeightSpace, "_rows_in_files", lambda self, n, d: False)
        ref = WeightSpace(5, solver="randomized").fit(Collection(folder, cache_dir=cache))
    assert ref.info_["rows_from"] == "row cache"
    default = WeightSpace(5, solver="randomized").fit(Collection(folder, cache_dir=cache))
    assert default.info_["rows_from"] == "files + row cache of 1 rows"
    np.testing.assert_array_equal(default.components_, got.components_)
    np.testing.assert_array_equal(got.singular_values_, ref.singular_values_)
    np.testing.assert_array_equal(got.components_, ref.components_)
    np.testing.assert_array_equal(got.coefficients_, ref.coefficients_)
    victim = sorted(folder.glob("*.safetensors"))[9]
    other = read_adapter(sorted(folder.glob("*.safetensors"))[3])

    def rewrite():
        write_adapter(other, victim, format="kohya", overwrite=True)
        st = victim.stat()
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**6))

    passes.clear()
    on_pass[0] = rewrite
    with pytest.raises(SpaceError, match="changed during the fit") as info:
        WeightSpace(5, solver="randomized", row_cache=False).fit(Collection(folder))
    assert victim.name in str(info.value)
