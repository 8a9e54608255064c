from __future__ import annotations

import numpy as np
import pytest
from _spacehelpers import pad_rank, random_models, regauge, split_alpha
from hypothesis import given, settings
from hypothesis import strategies as st

from w2wkit.adapter import Adapter, DeltaLayer
from w2wkit.collection import Collection
from w2wkit.errors import LayoutError, SpaceError
from w2wkit.formats import read_adapter, write_adapter
from w2wkit.space import WeightSpace, compress_factors

K = 5


@pytest.fixture(scope="module")
def models():
    return random_models(12, rank=2, seed=11)


@pytest.fixture(scope="module")
def reference(models):
    return WeightSpace(K, representation="delta").fit(models)


def _variants(models):
    out = []
    for i, ad in enumerate(models):
        kind = i % 4
        if kind == 0:
            out.append(regauge(ad, seed=i))
        elif kind == 1:
            out.append(pad_rank(ad, extra=2))
        elif kind == 2:
            out.append(split_alpha(ad, factor=4.0))
        else:
            out.append(regauge(pad_rank(ad, 1), seed=100 + i))
    return out


def _same_space(a: WeightSpace, b: WeightSpace, tol=1e-5):
    scale = np.abs(a.coefficients_).max()
    np.testing.assert_allclose(b.coefficients_, a.coefficients_, atol=tol * scale)
    np.testing.assert_allclose(b.singular_values_, a.singular_values_, rtol=tol)
    np.testing.assert_allclose(b.explained_variance_ratio_, a.explained_variance_ratio_, rtol=tol)


def test_delta_gram_matches_materialised_deltas(models, reference):
    # independent reference: PCA of the materialised, per-layer scaled delta matrix
    x = np.stack(
        [np.concatenate([layer.delta().ravel() for layer in ad.layers.values()]) for ad in models]
    ).astype(np.float64)
    sizes = [layer.delta().size for layer in models[0].layers.values()]
    bounds = np.cumsum([0, *sizes])
    xc = x - x.mean(0)
    for j in range(len(sizes)):
        block = xc[:, bounds[j] : bounds[j + 1]]
        xc[:, bounds[j] : bounds[j + 1]] = block / np.sqrt((block**2).sum() / block.size)
    s = np.linalg.svd(xc, compute_uv=False)
    np.testing.assert_allclose(reference.singular_values_, s[:K], rtol=1e-5)


def test_gauge_ranks_alphas_give_the_same_space(models, reference):
    space = WeightSpace(K, representation="delta").fit(_variants(models))
    _same_space(reference, space)
    c = reference.coefficients_[:3].astype(np.float64)
    np.testing.assert_allclose(space.transform(models[:3]), c, atol=1e-5 * np.abs(c).max())


def test_formats_give_the_same_space(tmp_path, models, reference):
    for i, ad in enumerate(_variants(models)):
        fmt = ("kohya", "diffusers", "peft")[i % 3]
        name = f"m{i:02d}" + ("" if fmt == "peft" else ".safetensors")
        write_adapter(ad, tmp_path / name, format=fmt)
    coll = Collection(tmp_path)
    space = WeightSpace(K, representation="delta").fit(coll)
    assert {e["format"] for e in space.manifest_} == {"kohya", "diffusers", "peft"}
    _same_space(reference, space)


def test_factors_representation_is_not_gauge_invariant(models):
    # same ranks and alphas so both collections share one factor layout
    gauged = [regauge(ad, seed=i) for i, ad in enumerate(models)]
    a = WeightSpace(K, representation="factors", solver="exact").fit(models)
    b = WeightSpace(K, representation="factors", solver="exact").fit(gauged)
    rel = np.abs(a.singular_values_ - b.singular_values_) / a.singular_values_
    assert rel.max() > 1e-2
    diff = np.abs(np.abs(a.coefficients_) - np.abs(b.coefficients_)).max()
    assert diff > 0.1 * np.abs(a.coefficients_).max()
    # while the delta representation does not move
    _same_space(
        WeightSpace(K, representation="delta").fit(models),
        WeightSpace(K, representation="delta").fit(gauged),
    )


def test_reconstruction_round_trip_and_energy(reference, models):
    rng = np.random.default_rng(0)
    c = rng.standard_normal((3, K)) * reference.coef_std_
    full = reference.inverse_transform(c, rank=24)  # >= N * r: no truncation
    assert all(e["overall"] == pytest.approx(1.0) for e in reference.last_energy_)
    np.testing.assert_allclose(reference.transform(full), c, atol=1e-5 * np.abs(c).max())
    low = reference.inverse_transform(c)  # default: the collection's rank (2)
    energy = reference.last_energy_
    m = next(iter(models[0].layers))
    assert low[0][m].rank == 2 and low[0][m].alpha == 2.0
    assert 0 < energy[0]["overall"] < 1
    assert float(low[0].metadata["w2wkit.energy_kept"]) == pytest.approx(energy[0]["overall"])
    # the rank-2 layer is the best rank-2 approximation (Eckart-Young) of the full one
    target = full[0][m].delta().astype(np.float64)
    s = np.linalg.svd(target, compute_uv=False)
    err = np.linalg.norm(low[0][m].delta() - target) ** 2
    assert err == pytest.approx(np.sum(s[2:] ** 2), rel=1e-4)
    assert energy[0]["layers"][m] == pytest.approx(np.sum(s[:2] ** 2) / np.sum(s**2), rel=1e-5)
    # idempotent projection
    p1 = reference.inverse_transform(reference.transform(models[:2]), rank=24)
    p2 = reference.inverse_transform(reference.transform(p1), rank=24)
    for a, b in zip(p1, p2, strict=True):
        for mod in a:
            np.testing.assert_allclose(a[mod].delta(), b[mod].delta(), atol=1e-5)


def test_compress_factors_matches_svd():
    rng = np.random.default_rng(1)
    up, down = rng.standard_normal((9, 6)), rng.standard_normal((6, 7))
    u, d, kept, total = compress_factors(up, down, 3)
    s = np.linalg.svd(up @ down, compute_uv=False)
    assert total == pytest.approx(np.sum(s**2))
    assert kept == pytest.approx(np.sum(s[:3] ** 2))
    assert np.linalg.norm(u @ d - up @ down) ** 2 == pytest.approx(np.sum(s[3:] ** 2))
    u, d, _, _ = compress_factors(up, down, 10)  # zero-padded beyond the rank
    assert u.shape == (9, 10) and np.allclose(u @ d, up @ down, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(energy=st.floats(0.05, 1.0), seed=st.integers(0, 2**16), cap=st.none() | st.integers(1, 6))
def test_compress_factors_energy_picks_the_smallest_sufficient_rank(energy, seed, cap):
    rng = np.random.default_rng(seed)
    up, down = rng.standard_normal((9, 6)), rng.standard_normal((6, 7))
    s2 = np.linalg.svd(up @ down, compute_uv=False) ** 2
    u, d, kept, total = compress_factors(up, down, cap, energy=energy)
    r = u.shape[1]
    assert d.shape[0] == r and 1 <= r <= 6
    need = int(np.argmax(np.cumsum(s2) >= energy * s2.sum() * (1 - 1e-12))) + 1
    assert r == (need if cap is None else min(need, cap))
    assert kept == pytest.approx(np.sum(s2[:r]))
    if cap is None or cap >= need:
        assert kept >= energy * total * (1 - 1e-9)


def test_energy_makes_delta_edits_near_exact(reference, models, tmp_path):
    dc = np.array([0.5, -1.0, 0.0, 0.3, 0.1])
    default = reference.shift(models[0], dc)  # adapter rank + space rank: truncated
    low = reference.last_energy_[0]["overall"]
    near = reference.shift(models[0], dc, energy=0.99999)
    kept = reference.last_energy_[0]
    assert low < 0.99999 <= kept["overall"]
    assert min(kept["layers"].values()) >= 0.99999 * (1 - 1e-9)
    exact = reference.coefficients_[0] + dc
    err_default = np.abs(reference.transform(default)[0] - exact).max()
    err_near = np.abs(reference.transform(near)[0] - exact).max()
    assert err_near < 0.1 * err_default
    ranks = {layer.rank for layer in near.layers.values()}
    assert max(ranks) > 3  # beyond the default rank where the energy needs it
    from w2wkit.formats.registry import read_adapter

    for fmt in ("kohya", "diffusers", "peft"):  # per-layer ranks survive every writer
        path = tmp_path / (fmt if fmt == "peft" else f"{fmt}.safetensors")
        write_adapter(near, path, format=fmt)
        back = read_adapter(path)
        for m, layer in near.layers.items():
            assert back[m].rank == layer.rank
            np.testing.assert_allclose(back[m].delta(), layer.delta(), atol=1e-6)
    capped = reference.shift(models[0], dc, energy=0.99999, rank=3)
    assert {layer.rank for layer in capped.layers.values()} <= {1, 2, 3}
    sampled = reference.inverse_transform(np.zeros(K), energy=0.5)[0]
    assert reference.last_energy_[0]["overall"] >= 0.5
    assert all(layer.rank >= 1 for layer in sampled.layers.values())


def test_energy_is_refused_where_it_means_nothing(reference, models):
    with pytest.raises(SpaceError, match=r"energy must lie in \(0, 1\], got 1.5"):
        reference.shift(models[0], np.zeros(K) + 0.1, energy=1.5)
    factors = WeightSpace(3).fit(models)
    with pytest.raises(SpaceError, match="only a delta space"):
        factors.inverse_transform(np.zeros(3), energy=0.9)


def test_shift_in_delta_space(reference, models):
    same = reference.shift(models[0], np.zeros(K))
    for m, layer in models[0].items():
        np.testing.assert_array_equal(same[m].delta(), layer.delta())
    dc = np.array([0.5, -1.0, 0.0, 0.3, 0.1])
    moved = reference.shift(models[0], dc, rank=30)
    expect = reference.coefficients_[0] + dc
    np.testing.assert_allclose(reference.transform(moved)[0], expect, atol=1e-4)


def test_lycoris_deltas_and_missing_modules(models):
    # a LoHa-like exact delta and a model lacking one module join the space
    first = next(iter(models[0].layers))
    loha = Adapter(
        {
            m: (DeltaLayer(layer.delta(), "loha") if m == first else layer)
            for m, layer in models[1].items()
        }
    )
    partial = Adapter({m: layer for m, layer in models[2].items() if m != first})
    space = WeightSpace(3, representation="delta").fit([models[0], loha, partial, *models[3:]])
    np.testing.assert_allclose(
        space.transform(models[1]), space.transform(loha), atol=1e-5 * space.coef_std_.max()
    )
    bad = Adapter({first: DeltaLayer(np.ones((3, 3), np.float32))})
    with pytest.raises(LayoutError, match="delta shape"):
        space.transform(bad)


def test_blocked_kernel_equals_one_block(tmp_path, models, reference, monkeypatch):
    # mixed ranks from files, the kernel built from blocks of ~3 rank-one terms (many
    # block pairs, blocks cutting through no model) equals the one-block kernel
    import w2wkit.space as space_mod

    for i, ad in enumerate(_variants(models)):
        write_adapter(ad, tmp_path / f"m{i:02d}.safetensors", format="kohya")
    one = WeightSpace(K, representation="delta").fit(Collection(tmp_path))
    assert len(space_mod._model_blocks(one.delta_.owner[one.delta_modules_[0]])) == 1
    monkeypatch.setattr(space_mod, "_GRAM_BLOCK_TERMS", 3)
    blocked = WeightSpace(K, representation="delta").fit(Collection(tmp_path))
    assert len(space_mod._model_blocks(blocked.delta_.owner[blocked.delta_modules_[0]])) > 3
    _same_space(one, blocked, tol=1e-9)
    _same_space(reference, blocked)
    assert set(blocked.info_["timings"]) == {"read", "gram", "eigen"}


def _mixed_module_sets(models):
    # mixed ranks, alphas and gauges, and two models that lack a module each
    out = _variants(models)
    mods = list(models[0].layers)
    out[3] = Adapter({m: layer for m, layer in out[3].items() if m != mods[0]})
    out[6] = Adapter({m: layer for m, layer in out[6].items() if m != mods[-1]})
    return out


@pytest.mark.parametrize(
    ("tight", "dtype"), [(False, "F32"), (True, "F32"), (False, "F16"), (True, "BF16")]
)
def test_spilled_fit_from_files_equals_in_memory(tmp_path, models, monkeypatch, tight, dtype):
    # a fit from files reads the factors back in blocks, from the files themselves
    # (F32, F16: views of the file's bytes) or from a spill file (BF16, widened on
    # read); every result (coefficients, projection, reconstruction, samples,
    # save/load) equals the fit of the same adapters held in memory
    import w2wkit.collection as coll_mod

    mixed = _mixed_module_sets(models)
    folder = tmp_path / "loras"
    folder.mkdir()
    for i, ad in enumerate(mixed):
        write_adapter(ad, folder / f"m{i:02d}.safetensors", format="kohya", dtype=dtype)
    if dtype != "F32":  # the in-memory reference holds the values the files hold
        mixed = [read_adapter(f) for f in sorted(folder.glob("*.safetensors"))]
    mem = WeightSpace(K, representation="delta").fit(mixed)
    assert mem.delta_.spill is None
    reads = []
    if tight:
        # a budget of a few kB: blocks of a model or so, no module read whole
        monkeypatch.setattr(coll_mod, "memory_budget", lambda: 4096)
        original = coll_mod._FactorSpill.read

        def counted(self, module, width, lo, hi, out_f=0):
            reads.append((module, lo, hi))
            return original(self, module, width, lo, hi, out_f)

        monkeypatch.setattr(coll_mod._FactorSpill, "read", counted)
        original_src = coll_mod._FactorSpill._read_source

        def counted_src(self, src, out, out_f):
            reads.append(("source", src))
            return original_src(self, src, out, out_f)

        monkeypatch.setattr(coll_mod._FactorSpill, "_read_source", counted_src)
    fil = WeightSpace(K, representation="delta").fit(Collection(folder, cache_dir=tmp_path))
    spill = fil.delta_.spill
    n_segments = sum(len(fil.delta_.segments(m)) for m in fil.delta_modules_)
    if dtype == "BF16":
        assert spill.path.is_file() and not spill.sources
        assert spill.path.parent.parent == tmp_path
    else:  # nothing copied: every segment is read from its model's file
        assert spill.path is None and spill.spilled_bytes == 0
        assert len(spill.sources) == n_segments
        assert not list(tmp_path.glob("w2wkit-deltas-*"))
    if tight and dtype == "F32":
        assert sum(1 for r in reads if r[0] == "source") > 4 * n_segments
    elif tight:
        assert all(hi - lo < len(mixed) for _, lo, hi in reads[: len(mixed)])
        assert len(reads) > 4 * len(fil.delta_modules_)
    monkeypatch.undo()
    _same_space(mem, fil, tol=1e-6)
    np.testing.assert_allclose(fil.scale_, mem.scale_, rtol=1e-6)
    np.testing.assert_allclose(fil.transform(models), mem.transform(models), atol=1e-4)
    coeffs = mem.sample(3, seed=1)
    np.testing.assert_allclose(fil.sample(3, seed=1), coeffs)
    for a, b in zip(fil.inverse_transform(coeffs), mem.inverse_transform(coeffs), strict=True):
        assert set(a.layers) == set(b.layers)
        for m in a.layers:
            np.testing.assert_allclose(a.layers[m].delta(), b.layers[m].delta(), atol=1e-5)
    # the modules some models lack count as zero: the rank of each stack is the models' sum
    m0 = models[0].layers
    first = next(iter(m0))
    assert fil.delta_.total_rank[first] == sum(
        layer_factors_rank(ad, first) for ad in mixed if first in ad.layers
    )
    saved = fil.save(tmp_path / "space")
    back = WeightSpace.load(saved)
    # the loaded space reads its factors from the saved arrays file in blocks
    from w2wkit.collection import _SavedFactors

    assert isinstance(back.delta_.spill, _SavedFactors)
    assert back.delta_.spill.path == saved / "arrays.safetensors"
    np.testing.assert_allclose(back.transform(models), mem.transform(models), atol=1e-4)
    a = back.inverse_transform(coeffs)[0]
    b = mem.inverse_transform(coeffs)[0]
    for m in a.layers:
        np.testing.assert_allclose(a.layers[m].delta(), b.layers[m].delta(), atol=1e-5)
    path = spill.path
    fil.delta_.close()
    assert path is None or not path.exists()
    assert all(f.is_file() for f in folder.glob("*.safetensors"))  # the models stay


def test_delta_space_read_from_files_refuses_a_changed_file(tmp_path, models):
    # a delta space fitted from files reads their factors until saved: a file replaced
    # in between is named, never read as if it were the same model
    folder = tmp_path / "loras"
    folder.mkdir()
    for i, ad in enumerate(models[:5]):
        write_adapter(ad, folder / f"m{i:02d}.safetensors", format="kohya")
    space = WeightSpace(2, representation="delta").fit(Collection(folder))
    victim = folder / "m03.safetensors"
    write_adapter(models[5], victim, format="kohya", overwrite=True)
    with pytest.raises(SpaceError, match="changed since") as err:
        space.transform(models[0])
    assert str(err.value.path) == str(victim)
    victim.unlink()
    with pytest.raises(SpaceError, match="cannot read") as err:
        space.transform(models[0])
    assert str(err.value.path) == str(victim)


def layer_factors_rank(ad, m):
    from w2wkit.collection import layer_factors

    return layer_factors(ad.layers[m])[0].shape[1]


def test_sketched_kernel_when_the_kernel_does_not_fit(tmp_path, models, monkeypatch):
    # a budget below the N x N kernel: the randomized eigensolver applies the kernel,
    # rebuilt from the spilled factors each pass; with k + p >= N its range is the whole
    # centred space, so the result equals the exact kernel's
    import w2wkit.collection as coll_mod

    mixed = _mixed_module_sets(models)
    folder = tmp_path / "loras"
    folder.mkdir()
    for i, ad in enumerate(mixed):
        write_adapter(ad, folder / f"m{i:02d}.safetensors", format="kohya")
    mem = WeightSpace(K, representation="delta").fit(mixed)
    monkeypatch.setattr(coll_mod, "memory_budget", lambda: 3 * 8 * len(mixed) ** 2 - 1)
    sk = WeightSpace(K, representation="delta").fit(Collection(folder))
    monkeypatch.undo()
    assert sk.info_["solver_used"] == "gram-sketch" and sk.info_["n_passes"] > 1
    assert mem.info_["solver_used"] == "gram"
    _same_space(mem, sk, tol=1e-6)
    np.testing.assert_allclose(sk.gram_colmean_, mem.gram_colmean_, rtol=1e-6)
    np.testing.assert_allclose(sk.beta_, mem.beta_, atol=1e-6 * np.abs(mem.beta_).max())
    np.testing.assert_allclose(sk.transform(models), mem.transform(models), atol=1e-4)


def test_sketched_kernel_finds_a_planted_spectrum(monkeypatch):
    # N = 60 models near a 3-dimensional family (k + p < N - 1: a genuine sketch): the
    # randomized eigensolver's top values and coefficients equal the exact kernel's
    import w2wkit.collection as coll_mod
    from w2wkit.adapter import LoraLayer

    rng = np.random.default_rng(3)
    shapes = {"a": (12, 10), "b": (8, 14)}
    base = {
        m: (rng.standard_normal((o, 2)), rng.standard_normal((3, 2, i)))
        for m, (o, i) in shapes.items()
    }
    ads = []
    for _ in range(60):
        w = rng.standard_normal(3)
        layers = {}
        for m, (_o, i) in shapes.items():
            up, downs = base[m]
            down = np.einsum("l,lri->ri", w, downs) + 0.1 * rng.standard_normal((2, i))
            layers[m] = LoraLayer(down=down.astype(np.float32), up=up.astype(np.float32), alpha=2.0)
        ads.append(Adapter(layers))
    exact = WeightSpace(3, representation="delta").fit(ads)
    monkeypatch.setattr(coll_mod, "memory_budget", lambda: 3 * 8 * 60**2 - 1)
    sk = WeightSpace(3, representation="delta").fit(ads)
    assert sk.info_["solver_used"] == "gram-sketch"
    np.testing.assert_allclose(sk.singular_values_, exact.singular_values_, rtol=1e-6)
    np.testing.assert_allclose(
        sk.coefficients_, exact.coefficients_, atol=1e-5 * np.abs(exact.coefficients_).max()
    )


def test_spill_folder_that_cannot_be_made_is_one_error(tmp_path, models):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    folder = tmp_path / "loras"
    folder.mkdir()
    for i, ad in enumerate(models[:4]):  # BF16: widened on read, so spilled
        write_adapter(ad, folder / f"m{i:02d}.safetensors", format="kohya", dtype="BF16")
    with pytest.raises(SpaceError, match="spill file") as err:
        WeightSpace(2, representation="delta").fit(Collection(folder, cache_dir=blocker / "cache"))
    assert str(err.value.path) == str(blocker / "cache")


@pytest.mark.parametrize("ratio", [0.0, 1e12])
def test_output_summed_dense_or_factored_is_the_same(reference, monkeypatch, ratio):
    # a module's output sum_i gamma_i delta_i either as stacked factors (few terms) or
    # as a dense out x in sum built block by block (bounded whatever N is): same layers
    import w2wkit.space as space_mod

    c = np.random.default_rng(3).standard_normal((2, K)) * reference.coef_std_
    base = reference.inverse_transform(c, rank=24)
    e0 = [dict(e["layers"]) for e in reference.last_energy_]
    monkeypatch.setattr(space_mod, "_DENSE_SUM_RATIO", ratio)
    monkeypatch.setattr(space_mod, "_GRAM_BLOCK_TERMS", 3)  # several blocks of models
    other = reference.inverse_transform(c, rank=24)
    for a, b in zip(base, other, strict=True):
        for m in a.layers:
            np.testing.assert_allclose(b[m].delta(), a[m].delta(), atol=1e-6)
    for e, f in zip(e0, reference.last_energy_, strict=True):
        assert f["layers"] == pytest.approx(e, rel=1e-9)
    # the cross products of transform, in blocks of models, are unchanged too
    x = reference.transform(base)
    np.testing.assert_allclose(x, c, atol=1e-5 * np.abs(c).max())


def test_kernel_precision_follows_the_factors_cancellation(models, reference, monkeypatch):
    # factors in a near-orthogonal gauge (random LoRAs) get float32 kernel products,
    # within 1e-5 of the float64 kernel; factors regauged by a random r x r matrix
    # (their products cancel) keep float64 and the space stays the same as before
    import w2wkit.collection as coll_mod

    fac = Collection(adapters=models).scan_deltas()
    assert all(1.0 <= fac.cancel[m] <= coll_mod.F32_KERNEL_CANCEL for m in fac.modules)
    assert {fac.kernel_dtype(m) for m in fac.modules} == {"float32"}
    skewed = Collection(adapters=_variants(models)).scan_deltas()
    assert max(skewed.cancel.values()) > coll_mod.F32_KERNEL_CANCEL
    assert "float64" in {skewed.kernel_dtype(m) for m in skewed.modules}
    monkeypatch.setattr(coll_mod, "F32_KERNEL_CANCEL", 0.0)  # float64 everywhere
    f64 = WeightSpace(K, representation="delta").fit(models)
    _same_space(f64, reference, tol=1e-5)
    rel = np.abs(reference.singular_values_ - f64.singular_values_) / f64.singular_values_
    assert 0 < rel.max() < 1e-5  # float32 was used, and it is close


@pytest.mark.parametrize("mapped", [False, True])
def test_delta_factors_read_from_the_files_not_copied(tmp_path, models, monkeypatch, mapped):
    # files read into memory or memory-mapped (above the size threshold): every
    # segment is a place in its file, nothing is spilled, and the factors read back
    # equal the adapters'
    import w2wkit.stio as stio

    if mapped:
        monkeypatch.setattr(stio, "_MMAP_THRESHOLD", 0)
    folder = tmp_path / "loras"
    folder.mkdir()
    for i, ad in enumerate(models[:4]):
        write_adapter(ad, folder / f"m{i:02d}.safetensors", format="kohya", dtype="F16")
    fac = Collection(folder, cache_dir=tmp_path).scan_deltas()
    assert fac.spill.spilled_bytes == 0 and fac.spill.path is None
    ads = [read_adapter(f) for f in sorted(folder.glob("*.safetensors"))]
    for m in fac.modules:
        up, down, owner = fac.block(m, 0, len(fac.segments(m)))
        for i, ad in enumerate(ads):
            got = up[:, owner == i] @ down[owner == i]
            np.testing.assert_allclose(got, ad[m].delta(), rtol=1e-6, atol=1e-9)
    fac.close()
