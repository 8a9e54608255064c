"""Streaming PCA solvers against numpy's SVD and scikit-learn's PCA."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA

from w2wkit import collection, solvers
from w2wkit.errors import SpaceError
from w2wkit.solvers import choose_solver, fit_pca, top_eigh

SOLVER_NAMES = ["exact", "gram", "randomized"]


def blocks_of(z: np.ndarray, sizes: list[int] | int):
    """A BlockFn over ``z`` with the given block sizes (cycled) or a fixed size."""
    n = z.shape[0]
    if isinstance(sizes, int):
        sizes = [sizes]

    def blocks():
        i = 0
        j = 0
        while i < n:
            b = sizes[j % len(sizes)]
            yield z[i : i + b].astype(np.float32)
            i += b
            j += 1

    return blocks


def planted(n: int, d: int, rank: int, seed: int, noise: float = 0.0) -> np.ndarray:
    """Centred matrix with singular values 10, 9, ... (rank ``rank``) plus noise."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((d, rank)))
    s = np.linspace(10.0, 10.0 - 0.5 * (rank - 1), rank)
    z = (u * s) @ v.T + noise * rng.standard_normal((n, d))
    z -= z.mean(axis=0)
    return z.astype(np.float32).astype(np.float64)


def power_law(n: int, d: int, seed: int, alpha: float = 0.7, noise: float = 0.02):
    """Centred power-law spectrum plus a noise floor (a flat-ish tail)."""
    rng = np.random.default_rng(seed)
    r = min(n, d) // 2
    u, _ = np.linalg.qr(rng.standard_normal((n, r)))
    v, _ = np.linalg.qr(rng.standard_normal((d, r)))
    s = np.arange(1, r + 1, dtype=np.float64) ** -alpha
    z = (u * s) @ v.T + noise / np.sqrt(d) * rng.standard_normal((n, d))
    z -= z.mean(axis=0)
    return z.astype(np.float32).astype(np.float64)


def max_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal angle (rad) between the row spaces of a and b."""
    return float(np.max(subspace_angles(a.T.astype(np.float64), b.T.astype(np.float64))))


@pytest.fixture(scope="module")
def low_rank():
    return planted(300, 517, rank=8, seed=1)


@pytest.mark.parametrize("solver", [*SOLVER_NAMES, "auto"])
@pytest.mark.parametrize("k", [5, 8])
def test_planted_low_rank_matches_numpy_and_sklearn(low_rank, solver, k):
    z = low_rank
    res = fit_pca(blocks_of(z, [61, 17, 300]), *z.shape, k, solver=solver, n_oversamples=4)
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    ref = PCA(n_components=k, svd_solver="full").fit(z)
    assert res.components.shape == (k, z.shape[1])
    assert res.components.dtype == np.float32
    assert res.scores.shape == (z.shape[0], k)
    assert max_angle(res.components, vt[:k]) < 1e-3
    assert max_angle(res.components, ref.components_) < 1e-3
    np.testing.assert_allclose(res.singular_values, s[:k], rtol=1e-4)
    np.testing.assert_allclose(res.singular_values, ref.singular_values_, rtol=1e-4)
    # scores are Z @ components.T, components orthonormal
    np.testing.assert_allclose(res.scores, z @ res.components.T.astype(np.float64), atol=1e-4)
    gram = res.components.astype(np.float64) @ res.components.T
    np.testing.assert_allclose(gram, np.eye(k), atol=1e-5)
    np.testing.assert_allclose(res.total_variance, (z**2).sum() / (z.shape[0] - 1), rtol=1e-5)
    assert res.solver in SOLVER_NAMES
    # signs: each component's largest entry is positive
    idx = np.argmax(np.abs(res.components), axis=1)
    assert np.all(res.components[np.arange(k), idx] > 0)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_solvers_agree_with_each_other_and_sklearn_scores(solver):
    z = planted(257, 300, rank=6, seed=3, noise=1e-3)
    k = 4
    res = fit_pca(blocks_of(z, 100), *z.shape, k, solver=solver)
    ref = PCA(n_components=k, svd_solver="full").fit(z)
    scores = ref.transform(z)
    # same subspace, same coefficients up to the sign of each component
    signs = np.sign(np.sum(res.components * ref.components_, axis=1))
    np.testing.assert_allclose(res.scores * signs, scores, atol=2e-4)


def test_randomized_with_noise_top_k_within_1e3():
    z = power_law(600, 1500, seed=5)
    k = 40
    s = np.linalg.svd(z, compute_uv=False)
    res = fit_pca(blocks_of(z, 257), *z.shape, k, solver="randomized")
    rel = np.abs(res.singular_values - s[:k]) / s[:k]
    assert rel.max() < 1e-3, rel.max()
    assert res.n_passes == solvers.DEFAULT_N_ITER + 1
    # the Rayleigh-Ritz values never exceed the true ones (up to float32 rounding)
    assert np.all(res.singular_values <= s[:k] * (1 + 1e-5))


def test_randomized_more_passes_is_more_accurate():
    z = power_law(500, 1200, seed=6, alpha=0.3, noise=0.1)
    k = 60
    s = np.linalg.svd(z, compute_uv=False)[:k]
    errs = []
    for q in (0, 1, 2, 4, 6):
        res = fit_pca(
            blocks_of(z, 300), *z.shape, k, solver="randomized", n_iter=q, n_oversamples=10
        )
        assert res.info["block_size"] == k + 10
        errs.append(np.mean(np.abs(res.singular_values - s) / s))
    assert all(a > 5 * b for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < 1e-6
    # the default (half-width blocks, 6 passes) on this very flat spectrum
    res = fit_pca(blocks_of(z, 300), *z.shape, k, solver="randomized")
    assert res.info["block_size"] < k
    assert np.mean(np.abs(res.singular_values - s) / s) < 1e-3


def test_randomized_checkpoints_equal_separate_runs():
    z = power_law(400, 900, seed=7)
    k = 30
    stream = solvers._Stream(blocks_of(z, 300), *z.shape, None)
    ops = solvers._ops("cpu")
    results = list(solvers._randomized_checkpoints(stream, k, [1, 2], 3, ops, block_size=40))
    for q, res in zip((1, 2), results, strict=True):
        alone = fit_pca(
            blocks_of(z, 300),
            *z.shape,
            k,
            solver="randomized",
            n_iter=q,
            random_state=3,
            block_size=40,
        )
        np.testing.assert_allclose(res.singular_values, alone.singular_values, rtol=1e-6)
        assert max_angle(res.components, alone.components) < 1e-4
    assert results[0].n_passes == 2  # one full pass and the half pass
    assert results[1].n_passes == 4  # + the Z^T-only pass that resumes, + one full + half


def test_deterministic_given_seed():
    z = power_law(300, 700, seed=8)
    a = fit_pca(blocks_of(z, 300), *z.shape, 10, solver="randomized", random_state=11, n_iter=0)
    b = fit_pca(blocks_of(z, 300), *z.shape, 10, solver="randomized", random_state=11, n_iter=0)
    c = fit_pca(blocks_of(z, 300), *z.shape, 10, solver="randomized", random_state=12, n_iter=0)
    np.testing.assert_array_equal(a.components, b.components)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.array_equal(a.singular_values, c.singular_values)


def test_gram_with_several_stripes(monkeypatch):
    z = power_law(270, 400, seed=9)
    # stripes of 37 rows, blocks that straddle them
    monkeypatch.setattr(solvers, "_GRAM_STRIPE_BYTES", 37 * 400 * 8)
    monkeypatch.setattr(solvers, "_STREAM_BLOCKS_HELD", 0)  # the whole budget for the stripe
    res = fit_pca(blocks_of(z, [50, 260]), *z.shape, 12, solver="gram")
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    assert res.info["stripes"] == 8
    assert res.n_passes == 9
    np.testing.assert_allclose(res.singular_values, s[:12], rtol=1e-7)
    assert max_angle(res.components, vt[:12]) < 1e-5
    # float32 products (the large-problem path)
    monkeypatch.setattr(solvers, "_GRAM_FLOAT64_MAX_FLOPS", 0.0)
    res32 = fit_pca(blocks_of(z, [50, 260]), *z.shape, 12, solver="gram")
    assert res32.info["product_dtype"] == "float32"
    np.testing.assert_allclose(res32.singular_values, s[:12], rtol=1e-5)
    assert max_angle(res32.components, vt[:12]) < 1e-3
    np.testing.assert_allclose(res32.scores, z @ res32.components.T.astype(np.float64), atol=1e-4)


def test_stripe_leaves_room_for_the_blocks_a_pass_holds(monkeypatch):
    """The stripe budget minus the blocks in flight: more stripes, the same result."""
    z = power_law(270, 400, seed=9)
    monkeypatch.setattr(solvers, "_GRAM_STRIPE_BYTES", 200 * 400 * 8)
    held = fit_pca(blocks_of(z, [50, 260]), *z.shape, 12, solver="gram")
    monkeypatch.setattr(solvers, "_STREAM_BLOCKS_HELD", 0)
    whole = fit_pca(blocks_of(z, [50, 260]), *z.shape, 12, solver="gram")
    assert held.info["stripes"] > whole.info["stripes"]
    np.testing.assert_allclose(held.singular_values, whole.singular_values, rtol=1e-10)


def test_sign_fix_a_chunk_of_vectors_at_a_time(monkeypatch):
    rng = np.random.default_rng(3)
    for axis in (0, 1):
        a = rng.standard_normal((37, 23))
        expected = a.copy()
        solvers._fix_signs(expected, axis=axis)
        monkeypatch.setattr(solvers, "_COMPONENT_CHUNK_BYTES", 8 * 37 * 2)  # 2-3 vectors a chunk
        got = a.copy()
        solvers._fix_signs(got, axis=axis)
        monkeypatch.undo()
        np.testing.assert_array_equal(got, expected)
        assert (got.max(axis=axis) >= -got.min(axis=axis)).all()


def test_streamed_gram_components_in_column_chunks(monkeypatch):
    """The components pass multiplies a column chunk at a time (ragged last chunk)."""
    z = power_law(270, 400, seed=9)
    monkeypatch.setattr(solvers, "_GRAM_STRIPE_BYTES", 100 * 400 * 8)
    whole = fit_pca(blocks_of(z, [50, 260]), *z.shape, 12, solver="gram")
    monkeypatch.setattr(solvers, "_COMPONENT_CHUNK_BYTES", 12 * 8 * 37)  # 37 columns a chunk
    chunked = fit_pca(blocks_of(z, [50, 260]), *z.shape, 12, solver="gram")
    np.testing.assert_allclose(chunked.components, whole.components, rtol=1e-12, atol=1e-14)
    vt = np.linalg.svd(z, full_matrices=False)[2]
    assert max_angle(chunked.components, vt[:12]) < 1e-5


def test_gram_in_memory_is_one_pass():
    z = power_law(270, 400, seed=9)
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    for flops, dtype, rtol, angle in ((None, "float64", 1e-7, 1e-5), (0.0, "float32", 1e-5, 1e-3)):
        mp = pytest.MonkeyPatch()
        if flops is not None:
            mp.setattr(solvers, "_GRAM_FLOAT64_MAX_FLOPS", flops)
        res = fit_pca(blocks_of(z, [50, 260]), *z.shape, 12, solver="gram")
        mp.undo()
        assert {k: v for k, v in res.info.items() if k != "timings"} == {
            "stripes": 1,
            "product_dtype": dtype,
        }
        assert set(res.info["timings"]) == {"read", "gram", "eigen", "components"}
        assert res.n_passes == 1
        np.testing.assert_allclose(res.singular_values, s[:12], rtol=rtol)
        assert max_angle(res.components, vt[:12]) < angle
        np.testing.assert_allclose(res.total_variance, (z**2).sum() / 269, rtol=1e-6)


def test_krylov_eigh_matches_dense_on_a_slowly_decaying_spectrum():
    rng = np.random.default_rng(3)
    n, k = 700, 40
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = 1.0 / np.arange(1, n + 1) + 1e-3 * rng.random(n)  # flat, noisy tail
    g = (q * lam) @ q.T
    calls = []
    real = solvers._krylov_eigh
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(solvers, "_krylov_eigh", lambda *a: calls.append(a[2:4]) or real(*a))
        w, v = top_eigh(g, k, method="krylov")
    assert calls == [(32, 11)]
    ref = np.sort(lam)[::-1][:k]
    np.testing.assert_allclose(w, ref, rtol=1e-8)
    np.testing.assert_allclose(v.T @ v, np.eye(k), atol=1e-10)
    np.testing.assert_allclose(g @ v, v * w, atol=1e-7)
    _, vd = top_eigh(g, k, method="dense")
    np.testing.assert_allclose(np.abs(np.sum(v * vd, axis=0)), 1.0, atol=1e-6)
    with pytest.raises(SpaceError, match="unknown method 'lobpcg'"):
        top_eigh(g, k, method="lobpcg")


def test_krylov_eigh_survives_an_exhausted_krylov_space(monkeypatch):
    # rank 5 < the Krylov basis (12 blocks of 32 = 384 <= 400 columns): the blocks lose
    # directions, random ones replace them
    calls = []
    real = solvers._krylov_eigh
    monkeypatch.setattr(solvers, "_krylov_eigh", lambda *a: calls.append(a[2:4]) or real(*a))
    rng = np.random.default_rng(4)
    a = rng.standard_normal((400, 5))
    g = a @ a.T
    w, v = top_eigh(g, 12, method="krylov")
    assert calls == [(32, 11)]
    ref = np.linalg.eigvalsh(g)[::-1][:12]
    np.testing.assert_allclose(w[:5], ref[:5], rtol=1e-8)
    np.testing.assert_allclose(w[5:], 0.0, atol=1e-8 * ref[0])
    np.testing.assert_allclose(v.T @ v, np.eye(12), atol=1e-10)


def test_k_beyond_rank_gives_orthonormal_components():
    z = planted(40, 30, rank=3, seed=10)
    for solver in SOLVER_NAMES:
        res = fit_pca(blocks_of(z, 7), *z.shape, 6, solver=solver)
        c = res.components.astype(np.float64)
        np.testing.assert_allclose(c @ c.T, np.eye(6), atol=1e-5)
        np.testing.assert_allclose(res.singular_values[3:], 0.0, atol=1e-4)
        np.testing.assert_allclose(res.scores, z @ c.T, atol=1e-4)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(20, 120),
    d=st.integers(20, 120),
    sizes=st.lists(st.integers(1, 70), min_size=1, max_size=4),
    solver=st.sampled_from(SOLVER_NAMES),
    seed=st.integers(0, 2**16),
)
def test_property_any_block_sizes(n, d, sizes, solver, seed):
    rank = min(n, d) // 3 + 1
    z = planted(n, d, rank=rank, seed=seed)
    k = max(1, rank - 1)
    res = fit_pca(blocks_of(z, sizes), n, d, k, solver=solver, n_oversamples=5, n_iter=2)
    s = np.linalg.svd(z, compute_uv=False)
    np.testing.assert_allclose(res.singular_values, s[:k], rtol=1e-4)
    np.testing.assert_allclose(res.scores, z @ res.components.T.astype(np.float64), atol=1e-4)
    assert np.all(np.diff(res.singular_values) <= 1e-9)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 60), seed=st.integers(0, 2**16), data=st.data())
def test_top_eigh_matches_numpy(n, seed, data):
    k = data.draw(st.integers(1, n))
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n + 3))
    g = a @ a.T
    w, v = top_eigh(g, k)
    ref = np.linalg.eigvalsh(g)[::-1][:k]
    np.testing.assert_allclose(w, ref, rtol=1e-9, atol=1e-9 * ref[0])
    np.testing.assert_allclose(g @ v, v * w, atol=1e-7 * ref[0])
    np.testing.assert_allclose(v.T @ v, np.eye(k), atol=1e-9)


def test_progress_reports_every_pass():
    z = power_law(300, 500, seed=2)
    calls = []
    res = fit_pca(
        blocks_of(z, 100),
        *z.shape,
        5,
        solver="randomized",
        n_iter=1,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    finished = [c for c in calls if c[1] == c[2] == 300]
    assert len(finished) == res.n_passes == 2
    assert len({c[0] for c in finished}) == 2


def test_gram_reports_its_steps():
    z = power_law(300, 500, seed=2)
    calls = []
    fit_pca(
        blocks_of(z, 100),
        *z.shape,
        5,
        solver="gram",
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    done = [c[0] for c in calls if c[1] == c[2]]
    assert done == ["gram: read", "gram: Z Z^T", "gram: top-k eigenpairs", "gram: components"]


def test_choose_solver():
    assert choose_solver(100, 1000, 10) == "exact"
    assert choose_solver(5_000, 99_648, 1000) == "gram"
    assert choose_solver(64_974, 99_648, 1000) == "randomized"
    assert choose_solver(100_000, 20_000, 50) == "randomized"


def test_errors_are_one_line_space_errors():
    z = power_law(50, 40, seed=0)
    with pytest.raises(SpaceError, match="n_components=41"):
        fit_pca(blocks_of(z, 10), 50, 40, 41)
    with pytest.raises(SpaceError, match="unknown solver 'svd'"):
        fit_pca(blocks_of(z, 10), 50, 40, 3, solver="svd")
    with pytest.raises(SpaceError, match="expected 60"):
        fit_pca(blocks_of(z, 10), 60, 40, 3, solver="gram")
    with pytest.raises(SpaceError, match="more than the declared 40 rows"):
        fit_pca(blocks_of(z, 10), 40, 40, 3, solver="exact")
    with pytest.raises(SpaceError, match=r"shape \(10, 40\), expected \(rows, 41\)"):
        fit_pca(blocks_of(z, 10), 50, 41, 3)
    bad = z.copy()
    bad[23, 5] = np.nan
    for solver in SOLVER_NAMES:
        with pytest.raises(SpaceError, match="row 23 of the data has NaN"):
            fit_pca(blocks_of(bad, 300), 50, 40, 3, solver=solver)
    with pytest.raises(SpaceError) as info:
        fit_pca(blocks_of(z, 10), 50, 40, 3, device="tpu")
    assert "\n" not in str(info.value)


def test_cuda_request_without_gpu_is_a_clear_error():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    z = power_law(50, 40, seed=0)
    with pytest.raises(SpaceError, match="torch sees no CUDA GPU"):
        fit_pca(blocks_of(z, 10), 50, 40, 3, solver="randomized", device="cuda")


@pytest.mark.parametrize("solver", ["gram", "randomized"])
def test_cuda_matches_cpu(solver):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    z = power_law(600, 1500, seed=5)
    cpu = fit_pca(blocks_of(z, 257), *z.shape, 40, solver=solver)
    gpu = fit_pca(blocks_of(z, 257), *z.shape, 40, solver=solver, device="cuda")
    np.testing.assert_allclose(gpu.singular_values, cpu.singular_values, rtol=1e-4)
    assert max_angle(gpu.components, cpu.components) < 1e-2
    np.testing.assert_allclose(gpu.scores, z @ gpu.components.T.astype(np.float64), atol=1e-4)


@pytest.mark.parametrize("solver", ["gram", "randomized"])
def test_torch_backend_matches_numpy(monkeypatch, solver):
    """The device code path (torch ops), run on torch's CPU device."""
    pytest.importorskip("torch")
    monkeypatch.setattr(solvers, "_GRAM_FLOAT64_MAX_FLOPS", 0.0)  # float32 products
    z = power_law(300, 700, seed=4)
    ref = fit_pca(blocks_of(z, 128), *z.shape, 20, solver=solver)
    monkeypatch.setattr(solvers, "_ops", lambda device: solvers._TorchOps("cpu"))
    res = fit_pca(blocks_of(z, 128), *z.shape, 20, solver=solver, device="cuda")
    assert res.info.get("device", "cpu") == "cpu"
    np.testing.assert_allclose(res.singular_values, ref.singular_values, rtol=1e-4)
    assert max_angle(res.components, ref.components) < 1e-2
    np.testing.assert_allclose(res.scores, z @ res.components.T.astype(np.float64), atol=1e-4)


def test_krylov_basis_stays_orthonormal_on_a_flat_spectrum():
    z = power_law(400, 900, seed=12, alpha=0.2, noise=0.2)
    stream = solvers._Stream(blocks_of(z, 256), *z.shape, None)
    res = next(solvers._randomized_checkpoints(stream, 30, [8], 0, solvers._ops("cpu")))
    assert res.info["krylov_dim"] == 9 * res.info["block_size"]
    # the basis itself: rebuild it through the checkpoint's internals
    krylov = solvers._BlockKrylov(
        solvers._Stream(blocks_of(z, 256), *z.shape, None),
        25,
        900,
        np.random.default_rng(0),
        solvers._ops("cpu"),
    )
    for _ in range(8):
        krylov.full_pass()
        krylov.extend()
    k = np.concatenate(krylov.basis, axis=1).astype(np.float64)
    np.testing.assert_allclose(k.T @ k, np.eye(k.shape[1]), atol=2e-5)


def test_errors_raised_by_the_block_function_propagate():
    z = power_law(600, 50, seed=0)

    def blocks():
        yield z[:300].astype(np.float32)
        raise OSError("disk gone")

    for solver in SOLVER_NAMES:
        with pytest.raises(OSError, match="disk gone"):
            fit_pca(blocks, 600, 50, 3, solver=solver)


def test_prefetch_off_gives_identical_results(monkeypatch):
    z = power_law(500, 300, seed=13)
    a = fit_pca(blocks_of(z, 256), *z.shape, 10, solver="randomized", n_iter=2)
    monkeypatch.setattr(solvers, "PREFETCH", False)
    b = fit_pca(blocks_of(z, 256), *z.shape, 10, solver="randomized", n_iter=2)
    np.testing.assert_array_equal(a.singular_values, b.singular_values)
    np.testing.assert_array_equal(a.components, b.components)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_center_equals_fitting_centred_data(solver, monkeypatch):
    # a large common offset (like the shared initialisation of LoRA factors) on top
    # of a small spread: the solver's float64 column sums must recover the centred fit
    z = power_law(260, 300, seed=5)
    offset = 50.0 + np.random.default_rng(6).standard_normal(300)
    raw = (z + offset).astype(np.float32)
    centred = raw.astype(np.float64) - raw.astype(np.float64).mean(axis=0)
    plain = fit_pca(blocks_of(centred, 70), *z.shape, 6, solver=solver, block_size=8)
    monkeypatch.setattr(collection, "_BULK_MIN_BYTES", 0)  # the memory-map buffers too
    res = fit_pca(blocks_of(raw, 70), *z.shape, 6, solver=solver, block_size=8, center=True)
    np.testing.assert_allclose(res.mean, raw.astype(np.float64).mean(axis=0), rtol=1e-12)
    # float32 rounding of the offset data (eps * 50) bounds the agreement
    np.testing.assert_allclose(res.singular_values, plain.singular_values, rtol=2e-3)
    assert max_angle(res.components, plain.components) < 2e-2
    np.testing.assert_allclose(res.total_variance, plain.total_variance, rtol=1e-3)
    assert plain.mean is None
    # exact and the in-memory gram centre in memory; the randomized solver makes one
    # more pass for the means
    assert res.n_passes == plain.n_passes + (solver == "randomized")


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_center_names_the_nan_row(solver):
    z = power_law(50, 40, seed=0) + 3.0
    z[31, 7] = np.inf
    with pytest.raises(SpaceError, match="row 31 of the data has NaN"):
        fit_pca(blocks_of(z, 20), 50, 40, 3, solver=solver, center=True)


def test_gram_reports_its_centring_step():
    z = power_law(300, 500, seed=2) + 1.0
    calls = []
    fit_pca(
        blocks_of(z, 100),
        *z.shape,
        5,
        solver="gram",
        center=True,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    done = [c[0] for c in calls if c[1] == c[2]]
    assert done[:3] == ["gram: read", "gram: centre", "gram: Z Z^T"]


def test_top_eigh_krylov_takes_a_float32_matrix_as_it_is():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((600, 300))
    g64 = a @ a.T
    g32 = g64.astype(np.float32)
    w64, v64 = top_eigh(g64, 20, method="krylov")
    w32, v32 = top_eigh(g32, 20, method="krylov", product_dtype=np.float32)
    np.testing.assert_allclose(w32, w64, rtol=1e-5)
    np.testing.assert_allclose(np.abs(np.sum(v32 * v64, axis=0)), 1.0, atol=1e-4)
    assert g32.dtype == np.float32  # not converted in place


def test_bulk_empty_gives_writable_c_arrays(monkeypatch):
    small = solvers.bulk_empty((3, 4), np.float32)
    assert small.shape == (3, 4) and small.dtype == np.float32
    monkeypatch.setattr(collection, "_BULK_MIN_BYTES", 0)
    big = solvers.bulk_empty((50, 7), np.float64)
    assert big.shape == (50, 7) and big.dtype == np.float64
    assert big.flags.c_contiguous and big.flags.writeable
    big[:] = 2.5
    assert float(big.sum()) == 2.5 * 350


def test_fit_pca_array_in_place_components_equal_the_copying_path():
    from w2wkit.collection import bulk_empty
    from w2wkit.solvers import fit_pca_array

    z64 = power_law(300, 60_000, seed=5)
    _, s, vt = np.linalg.svd(z64, full_matrices=False)
    ref = fit_pca_array(z64.astype(np.float32), 8, solver="gram")
    z = bulk_empty(z64.shape, np.float32)  # an anonymous map: the other rows' pages are given back
    z[...] = z64
    res = fit_pca_array(z, 8, solver="gram", overwrite=True)
    assert np.shares_memory(res.components, z)  # written over the rows, no new buffer
    np.testing.assert_array_equal(res.components, ref.components)
    np.testing.assert_array_equal(res.singular_values, ref.singular_values)
    np.testing.assert_allclose(res.singular_values, s[:8], rtol=1e-7)
    assert max_angle(res.components, vt[:8]) < 1e-5


def columns_of(z: np.ndarray, reads: list | None = None):
    """A ColumnFn over ``z`` (fresh float32 chunks); ``reads`` records the chunk bounds."""

    def columns(lo: int, hi: int) -> np.ndarray:
        if reads is not None:
            reads.append((lo, hi))
        return np.array(z[:, lo:hi], dtype=np.float32, order="C")

    return columns


@pytest.mark.parametrize("flops", [None, 0.0])
def test_gram_over_column_chunks_equals_the_exact_svd(monkeypatch, flops):
    """Two reads a column chunk at a time (ragged last chunk), float64 and float32 products."""
    if flops is not None:
        monkeypatch.setattr(solvers, "_GRAM_FLOAT64_MAX_FLOPS", flops)
    z = power_law(270, 1000, seed=9)
    reads: list = []
    # a budget for ~300-column chunks in the first read
    res = solvers.fit_gram_columns(
        columns_of(z, reads), *z.shape, 12, budget=8 * 270 * 270 * 2 + 300 * 270 * 4 * 5
    )
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    assert res.solver == "gram" and res.n_passes == 2
    w_gram, w_comp = res.info["column_chunks"]
    assert 256 <= w_gram < 1000 and 256 <= w_comp <= 1000
    assert reads[0] == (0, w_gram) and reads[-1][1] == 1000  # every column, both reads
    assert sum(hi - lo for lo, hi in reads) == 2000
    exact = flops is None
    assert res.info["product_dtype"] == ("float64" if exact else "float32")
    np.testing.assert_allclose(res.singular_values, s[:12], rtol=1e-7 if exact else 1e-5)
    assert max_angle(res.components, vt[:12]) < (1e-5 if exact else 1e-3)
    np.testing.assert_allclose(res.scores, z @ res.components.T.astype(np.float64), atol=1e-4)
    # the same answer as the streamed row solver
    rows = fit_pca(blocks_of(z, [50, 260]), *z.shape, 12, solver="gram")
    np.testing.assert_allclose(res.singular_values, rows.singular_values, rtol=1e-6)
    assert max_angle(res.components, rows.components) < 1e-3


def test_gram_over_column_chunks_names_a_row_with_nan():
    z = power_law(60, 300, seed=2)
    z[17, 250] = np.nan
    with pytest.raises(SpaceError, match=r"row 17 .*NaN"):
        solvers.fit_gram_columns(columns_of(z), *z.shape, 5, budget=8 * 60 * 60 * 2 + 10**6)


def test_gram_stripes_skip_the_rows_before_them(monkeypatch):
    """A block function that takes ``start=`` is asked only for the stripe's rows and after."""
    z = power_law(270, 400, seed=9)
    monkeypatch.setattr(solvers, "_GRAM_STRIPE_BYTES", 100 * 400 * 8)
    monkeypatch.setattr(solvers, "_STREAM_BLOCKS_HELD", 0)
    starts: list[int] = []

    def seekable(start: int = 0):
        starts.append(start)
        for lo in range(start, 270, 40):
            yield z[lo : lo + 40].astype(np.float32)

    res = fit_pca(seekable, *z.shape, 12, solver="gram")
    plain = fit_pca(blocks_of(z, 40), *z.shape, 12, solver="gram")
    assert res.info["stripes"] == 3
    assert starts == [0, 0, 100, 200, 0]  # block-size peek, 3 stripes, components
    np.testing.assert_allclose(res.singular_values, plain.singular_values, rtol=1e-12)
    np.testing.assert_allclose(res.components, plain.components, rtol=1e-10, atol=1e-12)


def test_randomized_ritz_float32_products_keep_the_accuracy(monkeypatch):
    """Large problems multiply the Rayleigh-Ritz chunks in float32 (added in float64):
    the same singular values and subspace as the float64 products, to float32 rounding."""
    z = power_law(700, 1500, seed=11)
    k = 40
    s = np.linalg.svd(z, compute_uv=False)[:k]
    wide = fit_pca(blocks_of(z, 257), *z.shape, k, solver="randomized", random_state=3)
    assert wide.info["ritz_product_dtype"] == "float64"
    monkeypatch.setattr(solvers, "_GRAM_FLOAT64_MAX_FLOPS", 0.0)
    low = fit_pca(blocks_of(z, 257), *z.shape, k, solver="randomized", random_state=3)
    assert low.info["ritz_product_dtype"] == "float32"
    np.testing.assert_allclose(low.singular_values, wide.singular_values, rtol=2e-6)
    np.testing.assert_allclose(low.singular_values, s, rtol=1e-3)
    assert max_angle(low.components[: k // 2], wide.components[: k // 2]) < 1e-3
    # scores stay the exact product of the data with the components
    np.testing.assert_allclose(
        low.scores, z @ low.components.T.astype(np.float64), atol=2e-4 * np.abs(low.scores).max()
    )


@pytest.mark.parametrize("method", ["dense", "krylov"])
def test_widened_gram_is_whole_and_exact(monkeypatch, method):
    """float32 rows with float64 products (column stripes widened, each ?syrk added in
    place): the eigensolver gets a Gram with both triangles, equal to the float64 product
    (the krylov method multiplies by the whole matrix), and the fit agrees with an SVD."""
    from w2wkit.solvers import fit_pca_array

    z = power_law(80, 3000, seed=11).astype(np.float32)
    monkeypatch.setattr(solvers, "_GRAM_FLOAT64_MAX_FLOPS", 1e12)  # widened
    seen = []
    real = solvers.top_eigh

    def spy(gram, k, **kw):
        seen.append(gram.copy())
        return real(gram, k, method=method, **kw)

    monkeypatch.setattr(solvers, "top_eigh", spy)
    # 256-column stripes (the smallest): 11 full ones and a short last one
    monkeypatch.setattr(solvers, "_gram_stripe_columns", lambda n: 256)
    res = fit_pca_array(z, 6, solver="gram")
    (g,) = seen
    z64 = z.astype(np.float64)
    np.testing.assert_array_equal(g, g.T)
    np.testing.assert_allclose(g, z64 @ z64.T, rtol=1e-12, atol=1e-9)
    _, s, vt = np.linalg.svd(z64, full_matrices=False)
    np.testing.assert_allclose(res.singular_values, s[:6], rtol=1e-9)
    assert max_angle(res.components, vt[:6]) < 1e-5
