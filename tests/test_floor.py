"""The floor model (w2wkit.floor): exact counts on small cases, and `fit --profile`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _spacehelpers import direct_io_works, evict

from w2wkit.floor import (
    Profile,
    Rates,
    delta_floor,
    eigen_cost,
    fit_floor,
    krylov_basis_columns,
    measure_rates,
    profile_table,
)

# round rates so that the seconds are easy to check by hand
RATES = Rates(
    read_bytes_per_s=1e9,
    copy_bytes_per_s=1e10,
    gemm_flops_per_s=1e11,
    syrk_flops_per_s=5e10,
    eigh_flops_per_s=1e9,
)


def test_gram_floor_counts():
    n, d, k = 100, 1000, 10
    phases = {p.name: p for p in fit_floor("gram", n, d, k, RATES, file_bytes=500_000)}
    assert list(phases) == ["read", "standardize", "gram", "eigen", "components"]
    assert phases["read"].bytes == 500_000 and phases["read"].seconds == pytest.approx(5e-4)
    assert phases["standardize"].bytes == 3 * 4 * n * d
    assert phases["gram"].flops == n * n * d  # one symmetric product
    # small enough for float64 products: the float64 rate (not measured here: half)
    assert phases["gram"].seconds == pytest.approx(n * n * d / 2.5e10)
    big = {p.name: p for p in fit_floor("gram", 2000, 100_000, k, RATES)}
    assert big["gram"].seconds == pytest.approx(2000**2 * 100_000 / 5e10)  # float32
    # N = 100 is too small for the Krylov basis: the dense solver, 4/3 N^3 + 2 N^2 k
    assert krylov_basis_columns(n, k) == 0
    dense = 4 / 3 * n**3 + 2 * n * n * k
    assert phases["eigen"].flops == pytest.approx(dense)
    assert phases["eigen"].seconds == pytest.approx(dense / 1e9)
    assert phases["components"].flops == 2 * n * k * d
    # without file sizes the read is the float32 rows
    assert fit_floor("gram", n, d, k, RATES)[0].bytes == 4 * n * d


def test_randomized_floor_counts():
    n, d, k = 1000, 5000, 20
    phases = {p.name: p for p in fit_floor("randomized", n, d, k, RATES, n_iter=3, block_size=15)}
    p = phases["passes"]
    assert p.bytes == 4 * 4 * n * d  # n_iter + 1 reads
    ortho = 2 * d * (4 * 15) ** 2  # the block Krylov basis of 4 blocks of 15
    assert p.flops == 3 * 4 * n * d * 15 + 2 * n * d * 15 + ortho  # 3 full passes + a half
    per_read = 4 * n * d / 1e9
    expect = 3 * max(per_read, 4 * n * d * 15 / 1e11) + max(per_read, 2 * n * d * 15 / 1e11)
    assert p.seconds == pytest.approx(expect + ortho / 1e11)


def test_read_floor_counts_the_manifest_hash():
    # the read phase hashes every file: with a slow SHA-256 the hash sets the floor,
    # spread over the threads; without a measured hash rate only the read counts
    slow_hash = Rates(1e9, 1e10, 1e11, 5e10, 1e9, hash_bytes_per_s=2.5e8)
    read = fit_floor("gram", 100, 1000, 10, slow_hash, file_bytes=1e9)[0]
    assert read.seconds == pytest.approx(slow_hash.file_seconds(1e9))
    assert read.seconds >= 1.0  # never below the read itself
    assert slow_hash.file_seconds(1e9, threads=2) == pytest.approx(2.0)
    assert slow_hash.file_seconds(1e9, threads=8) == pytest.approx(1.0)  # the read rate
    assert RATES.file_seconds(1e9, threads=1) == pytest.approx(1.0)


def test_the_read_cpu_bound_adds_the_copy_the_hash_and_the_row_memory():
    # on cores that copy the page cache themselves the read and the hash add up; bytes
    # from the disk are not copied by a core; rows held in memory are faulted in
    r = Rates(2e9, 1e10, 1e11, 5e10, 1e9, hash_bytes_per_s=1e9, touch_bytes_per_s=4e9)
    assert r.file_cpu_seconds(4e9, threads=1) == pytest.approx(2.0 + 4.0)
    assert r.file_cpu_seconds(4e9, threads=2) == pytest.approx(3.0)
    assert r.file_cpu_seconds(4e9, threads=2, cold=0.5) == pytest.approx((1.0 + 4.0) / 2)
    assert r.file_cpu_seconds(4e9, threads=2, held_bytes=2e9) == pytest.approx(3.25)
    # never below the floor, which lets the two overlap
    assert r.file_cpu_seconds(4e9, threads=2) >= r.file_seconds(4e9, threads=2)
    assert math.isnan(Rates(2e9, 1e10, 1e11, 5e10, 1e9).file_cpu_seconds(1e9))
    no_touch = Rates(2e9, 1e10, 1e11, 5e10, 1e9, hash_bytes_per_s=1e9)
    assert no_touch.file_cpu_seconds(4e9, 1, held_bytes=1e9) == pytest.approx(6.0)


def test_eigen_cost_picks_the_cheaper_method():
    # the basis fits (12 blocks of 32 columns) and the dense solve is slow: krylov
    n, k = 4000, 20
    m = krylov_basis_columns(n, k)
    assert m == 12 * 32
    method, _, seconds = eigen_cost(n, k, RATES)
    assert method == "krylov"
    assert seconds < (4 / 3 * n**3 + 2 * n * n * k) / 1e9
    # a fast dense solver wins
    fast = Rates(1e9, 1e10, 1e9, 1e9, 1e13)
    assert eigen_cost(n, k, fast)[0] == "dense"


def test_delta_floor_counts():
    from types import SimpleNamespace

    fac = SimpleNamespace(
        modules=["a", "b"],
        out_features={"a": 8, "b": 4},
        in_shape={"a": (6,), "b": (2, 3, 3)},
        total_rank={"a": 10, "b": 5},
        n_models=3,
    )
    phases = {p.name: p for p in delta_floor(fac, 2, RATES)}
    # one block per module: a full R x R product of each factor (2 R^2 (in + out)), and
    # the centred sum of squares (the summed delta, 2 R out in)
    kernel = 2 * 10 * 10 * (8 + 6) + 2 * 5 * 5 * (4 + 18)
    ss = 2 * 10 * 8 * 6 + 2 * 5 * 4 * 18
    assert phases["gram"].flops == kernel + ss
    assert phases["read"].bytes == 4 * (10 * 14 + 5 * 22)
    # float64 products at half the float32 GEMM rate when not measured
    # (the kernel's products overlap its factor reads: the slower of the two)
    expect = ss / 5e10 + max(4 * (10 * 14 + 5 * 22) / 1e9, kernel / 5e10)
    assert phases["gram"].seconds == pytest.approx(expect)
    # module a in blocks of 4 + 6 terms, read block by block: pairs (0,0), (0,1), (1,1)
    # and the bytes of blocks 0+1, then 1
    plan = {"a": ([4, 6], False), "b": ([5], True)}
    blocked = {p.name: p for p in delta_floor(fac, 2, RATES, blocks=plan)}
    ka = 2 * (4 * 4 + 4 * 6 + 6 * 6) * 14
    assert blocked["gram"].flops == ka + 2 * 5 * 5 * 22 + ss
    assert blocked["gram"].bytes == 4 * 14 * (10 + 6) + 4 * 22 * 5
    # the sketch: every pass rebuilds the blocks and applies them to N x c
    sk = {
        p.name: p
        for p in delta_floor(
            fac, 2, RATES, solver="gram-sketch", blocks=plan, sketch_columns=2, passes=4
        )
    }
    per_pass = ka + 2 * 5 * 5 * 22 + 2 * 3 * 3 * 2 * 2 + 4 * 3 * 2 * 2
    assert sk["gram"].flops == pytest.approx(ss + 4 * per_pass + 4 / 3 * 8 + 2 * 4 * 2)
    assert sk["gram"].bytes == 4 * blocked["gram"].bytes
    assert sk["eigen"].seconds == 0.0
    # files beyond the page cache: the read and the kernel's factor reads at the disk's rate
    slow_disk = Rates(1e9, 1e10, 1e11, 5e10, 1e9, disk_read_bytes_per_s=1e3)
    cold = {p.name: p for p in delta_floor(fac, 2, slow_disk, cold_files=True)}
    assert cold["read"].seconds == pytest.approx(4 * (10 * 14 + 5 * 22) / 1e3)
    assert cold["gram"].seconds == pytest.approx(ss / 5e10 + 4 * (10 * 14 + 5 * 22) / 1e3)
    warm = {p.name: p for p in delta_floor(fac, 2, slow_disk)}
    assert warm["gram"].seconds == pytest.approx(expect)


def test_profile_multiples_and_table():
    prof = Profile()
    prof.add("read", 2.0)
    with prof.phase("gram"):
        pass
    prof.add("gram", 1.0)
    floor = fit_floor("gram", 10, 100, 2, RATES)
    prof.set_floor(floor, RATES)
    out = prof.as_dict()
    read = out["phases"][0]
    assert read["phase"] == "read" and read["multiple"] == pytest.approx(2.0 / floor[0].seconds)
    assert out["floor_seconds"] == pytest.approx(sum(p.seconds for p in floor))
    rows = profile_table(out)
    assert rows[-1][0] == "total" and [r[0] for r in rows[:-1]] == ["read", "gram"]


def test_measured_rates_are_positive_and_cached(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(np.ones(1 << 18, np.float32).tobytes())
    r1 = measure_rates([f])
    r2 = measure_rates([f])
    assert r1 == r2  # cached per process
    rates = r1.as_dict()
    assert math.isnan(rates.pop("disk_read_bytes_per_s"))  # only measured when asked
    for v in rates.values():
        assert math.isfinite(v) and v > 0


def test_disk_read_rate_reads_around_the_page_cache(tmp_path):
    """The disk's rate: O_DIRECT reads of the files (nan where the file system refuses it)."""
    import os

    from w2wkit.floor import disk_read_rate

    files = []
    for i in range(12):
        f = tmp_path / f"m{i}.safetensors"
        f.write_bytes(os.urandom(100_000 + 517 * i))  # sizes not a multiple of the alignment
        files.append(f)
    rate = disk_read_rate(files, threads=3)
    if direct_io_works(files[0]):
        assert math.isfinite(rate) and rate > 0
        r = measure_rates(files, disk=True)
        assert math.isfinite(r.disk_read_bytes_per_s) and r.disk_read_bytes_per_s > 0
    else:
        assert math.isnan(rate)
    assert math.isnan(disk_read_rate([tmp_path / "missing"]))


def test_cold_files_are_read_at_the_disk_rate():
    disk = Rates(1e9, 1e10, 1e11, 5e10, 1e9, disk_read_bytes_per_s=2.5e8)
    assert disk.read_seconds(1e9) == pytest.approx(1.0)  # the page cache
    assert disk.read_seconds(1e9, cold=True) == pytest.approx(4.0)  # the disk
    assert RATES.read_seconds(1e9, cold=True) == pytest.approx(1.0)  # disk not measured
    # a quarter of the bytes from the disk (the scan found those files cold), the rest
    # from the page cache
    assert disk.read_seconds(1e9, cold=0.25) == pytest.approx(0.75 * 1.0 + 0.25 * 4.0)
    assert disk.read_seconds(1e9, cold=0.0) == pytest.approx(1.0)
    assert RATES.read_seconds(1e9, cold=0.5) == pytest.approx(1.0)
    warm = fit_floor("randomized", 1000, 5000, 20, disk, file_bytes=1e9, n_iter=3, block_size=15)
    cold = fit_floor(
        "randomized",
        1000,
        5000,
        20,
        disk,
        file_bytes=1e9,
        n_iter=3,
        block_size=15,
        cold_files=True,
        cold_rows=True,
    )
    assert warm[0].seconds == pytest.approx(1.0) and cold[0].seconds == pytest.approx(4.0)
    # a pass costs the larger of its read and its products: here the disk read
    n, d = 1000, 5000
    ortho = 2 * d * (4 * 15) ** 2
    assert cold[2].seconds == pytest.approx(4 * (4 * n * d / 2.5e8) + ortho / 1e11)
    assert cold[2].seconds > warm[2].seconds


def test_fit_profile_prints_phases(tmp_path):
    from click.testing import CliRunner

    from w2wkit.cli.main import cli
    from w2wkit.synthetic import planted_collection

    shapes = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (40, 30)}
    planted_collection(tmp_path / "loras", 12, shapes=shapes, n_latent=4)
    res = CliRunner().invoke(
        cli,
        [
            *("fit", str(tmp_path / "loras"), "-o", str(tmp_path / "sp"), "-k", "3"),
            *("--profile", "--solver", "gram"),
        ],
    )
    assert res.exit_code == 0, res.output
    for phase in ("read", "standardize", "gram", "eigen", "components", "total", "wall / floor"):
        assert phase in res.output
    assert "x its CPU bound here" in res.output
    # the bound counts the files' bytes and, rows held in memory, their memory
    from w2wkit.collection import Collection
    from w2wkit.space import WeightSpace

    space = WeightSpace(n_components=3, solver="gram").fit(
        Collection(tmp_path / "loras"), profile=True
    )
    prof = space.info_["profile"]
    assert space.info_["rows_from"] == "memory"
    rates = Rates(**prof["rates"])
    assert math.isfinite(rates.touch_bytes_per_s) and rates.touch_bytes_per_s > 0
    size = sum(p.stat().st_size for p in (tmp_path / "loras").iterdir())
    held = 4 * 12 * space.layout_.dim
    want = rates.file_cpu_seconds(size, held_bytes=held)
    assert prof["read_cpu_bound_seconds"] == pytest.approx(want)
    assert want > rates.file_cpu_seconds(size)


def test_the_solver_choice_measures_only_its_two_rates() -> None:
    """``top_eigh``'s choice needs GEMM and eigensolver rates, shared with the full set."""
    import math

    from w2wkit import floor

    floor._CACHE.pop("solver", None)
    floor._CACHE.pop("compute", None)
    r = floor.solver_rates()
    assert r.gemm_flops_per_s > 0 and r.eigh_flops_per_s > 0
    assert math.isnan(r.syrk_flops_per_s) and math.isnan(r.copy_bytes_per_s)
    assert "compute" not in floor._CACHE  # the rest of the rates was not measured
    full = floor.measure_rates()
    assert (full.gemm_flops_per_s, full.eigh_flops_per_s) == (
        r.gemm_flops_per_s,
        r.eigh_flops_per_s,
    )


def test_fit_profile_takes_the_disk_rate_for_files_beyond_the_page_cache(tmp_path, monkeypatch):
    """The profile's read floor: page-cache rate while the files fit in memory, the disk's
    (O_DIRECT) when they hold more than DIRECT_READ_RAM_FRACTION of it."""
    from w2wkit import collection
    from w2wkit.collection import Collection
    from w2wkit.space import WeightSpace
    from w2wkit.synthetic import planted_collection

    shapes = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (40, 30)}
    folder = tmp_path / "loras"
    files = planted_collection(folder, 12, shapes=shapes, n_latent=4).files
    space = WeightSpace(3, solver="gram").fit(Collection(folder), profile=True)
    warm = space.info_["profile"]
    assert math.isnan(warm["rates"]["disk_read_bytes_per_s"])
    monkeypatch.setattr(collection, "physical_memory", lambda *a, **k: 1024)
    cold = space._profile(Collection(folder))
    read = {r["phase"]: r for r in cold["phases"]}["read"]
    disk = cold["rates"]["disk_read_bytes_per_s"]
    if direct_io_works(files[0]):
        assert math.isfinite(disk) and disk > 0
        rates = Rates(**cold["rates"])
        assert read["floor_seconds"] == pytest.approx(rates.file_seconds(read["bytes"], cold=True))
        assert read["floor_seconds"] >= read["bytes"] / disk
    else:
        assert math.isnan(disk)


def test_fit_profile_counts_files_the_scan_found_cold_at_the_disk_rate(tmp_path):
    """Files that fit the page cache but were not in it when the scan read them come
    from the disk: the read floor takes them at its rate (their share measured by the
    scan), and files the page cache held at its own."""
    from w2wkit.collection import Collection, _mincore_calls
    from w2wkit.space import WeightSpace
    from w2wkit.synthetic import planted_collection

    shapes = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (40, 30)}
    folder = tmp_path / "loras"
    files = planted_collection(folder, 12, shapes=shapes, n_latent=4).files
    warm = WeightSpace(3, solver="gram").fit(Collection(folder), profile=True).info_["profile"]
    assert warm["cold_file_share"] == 0.0
    assert math.isnan(warm["rates"]["disk_read_bytes_per_s"])
    evict(files)  # out of the page cache
    coll = Collection(folder)
    space = WeightSpace(3, solver="gram").fit(coll, profile=True)
    cold = space.info_["profile"]
    if _mincore_calls() is None:  # the kernel tells nothing of residency here
        assert cold["cold_file_share"] == 0.0
        return
    # every file but the first (read by the ordinary reader) went through the fast one
    assert cold["cold_file_share"] == 1.0 == coll._fast_reader.cold_fraction()
    # the share is the fit's: a profile taken later, of another Collection, keeps it
    assert space._profile(Collection(folder))["cold_file_share"] == 1.0
    read = {r["phase"]: r for r in cold["phases"]}["read"]
    rates = Rates(**cold["rates"])
    if direct_io_works(files[0]):
        assert math.isfinite(rates.disk_read_bytes_per_s)
    assert read["floor_seconds"] == pytest.approx(rates.file_seconds(read["bytes"], cold=1.0))


def test_the_syrk_rate_is_probed_near_the_fits_rows(monkeypatch):
    # the SYRK rate grows with N: a fit's floor probes it on min(N, SYRK_PROBE_ROWS) rows
    # (at least the 1024 of the base probe) and keeps the faster of the two
    from w2wkit import floor

    monkeypatch.setattr(floor, "SYRK_PROBE_ROWS", 1536)
    for key in [k for k in floor._CACHE if isinstance(k, tuple) and k[0] == "syrk"]:
        floor._CACHE.pop(key)
    base = floor.measure_rates().syrk_flops_per_s
    assert floor.measure_rates(rows=500).syrk_flops_per_s == base
    assert not [k for k in floor._CACHE if isinstance(k, tuple) and k[0] == "syrk"]
    floor.measure_rates(rows=10**6)  # clamped to SYRK_PROBE_ROWS
    assert [k for k in floor._CACHE if isinstance(k, tuple) and k[0] == "syrk"] == [("syrk", 1536)]
    floor._CACHE[("syrk", 1536)] = 1e15
    assert floor.measure_rates(rows=2000).syrk_flops_per_s == 1e15
    floor._CACHE[("syrk", 1536)] = 1.0
    assert floor.measure_rates(rows=2000).syrk_flops_per_s == base
    floor._CACHE.pop(("syrk", 1536))
