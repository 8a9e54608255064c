"""The scan's native helper (w2wkit/_native/scan.c through w2wkit.native) against Python."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _spacehelpers import random_models
from hypothesis import given, settings
from hypothesis import strategies as st

from w2wkit import native as nv
from w2wkit.adapter import Adapter
from w2wkit.collection import Collection, _ColumnStats, anon_map
from w2wkit.formats import write_adapter

NATIVE = nv.native()
needs_native = pytest.mark.skipif(NATIVE is None, reason="the native helper is not built here")


def test_native_helper_is_built():
    # an install on a machine with a C compiler builds it (setup.py); CI's does
    if os.environ.get("W2WKIT_NATIVE", "1") == "0":
        pytest.skip("turned off by W2WKIT_NATIVE=0")
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here: the scan runs its Python path")
    assert nv.library_file() is not None, "w2wkit/_scan*.so missing: pip install -e . builds it"
    assert NATIVE is not None


def test_native_helper_can_be_turned_off():
    code = "from w2wkit.native import native; print(native() is None)"
    env = {**os.environ, "W2WKIT_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


def _buffer(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 buffer (as the scan's)."""
    return np.frombuffer(anon_map(-(-nbytes // 4096) * 4096), dtype=np.uint8)


@needs_native
def test_read_files_hash_and_stat_each_file(tmp_path):
    span = 3 * 4096
    sizes = [0, 1, 4095, 4096, 4097, span - 1, span, span + 10]
    paths = []
    for j, size in enumerate(sizes):
        p = tmp_path / f"f{j}.bin"
        p.write_bytes(os.urandom(size))
        paths.append(p)
    paths += [tmp_path / "absent", tmp_path]  # a missing file, a directory
    m = len(paths)
    buf = _buffer(m * span)
    digests = np.zeros((m, 32), np.uint8)
    info = np.zeros((m, 6), np.int64)
    NATIVE.read_files([os.fsencode(p) for p in paths], buf.ctypes.data, span, digests, info, 1)
    for k, size in enumerate(sizes):
        data = paths[k].read_bytes()
        st_ = os.stat(paths[k])
        assert info[k, nv.SIZE] == size and info[k, nv.MTIME_NS] == st_.st_mtime_ns
        assert info[k, nv.HELD] in (0, 1) and info[k, nv.READ_DIRECT] == 0
        if size < span:
            assert info[k, nv.GOT] == size
            assert bytes(buf[k * span : k * span + size]) == data
            assert digests[k].tobytes() == hashlib.sha256(data).digest()
        else:  # read to the end of its slot, not hashed: the caller reads it another way
            assert info[k, nv.GOT] == span
    assert info[-2, nv.GOT] == -errno.ENOENT
    assert info[-1, nv.GOT] == -errno.EINVAL  # not a regular file


@st.composite
def _rows_case(draw):
    """A data section laid out as runs of a row in any order, alphas between them."""
    sizes = draw(st.lists(st.integers(1, 40), min_size=1, max_size=8))
    order = draw(st.permutations(range(len(sizes))))
    n_alpha = draw(st.integers(0, 3))
    m = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    pad = draw(st.lists(st.integers(0, 7), min_size=m, max_size=m))  # header bytes
    bad = draw(
        st.lists(
            st.sampled_from(["ok", "ok", "nan", "inf", "alpha", "skip"]), min_size=m, max_size=m
        )
    )
    return sizes, list(order), n_alpha, m, seed, pad, bad


@needs_native
@settings(max_examples=60, deadline=None)
@given(case=_rows_case(), with_sums=st.booleans(), copy=st.booleans())
def test_gather_equals_the_python_copy_and_numpy_sums(case, with_sums, copy):
    sizes, order, n_alpha, m, seed, pad, bad = case
    rng = np.random.default_rng(seed)
    d = sum(sizes)
    offsets = np.cumsum([0, *sizes])
    # the file: alphas first, then the runs in ``order``
    runs, c = [], n_alpha
    for j in order:
        runs.append((offsets[j], offsets[j + 1], c))
        c += sizes[j]
    runs_t = np.array(sorted(runs), dtype=np.int64).reshape(-1, 3)
    alpha_index = np.arange(n_alpha, dtype=np.int64)
    alpha_value = rng.standard_normal(n_alpha).astype(np.float32)
    span = 4096
    buf = _buffer(m * span)
    start = np.zeros(m, np.int64)
    rows = rng.standard_normal((m, d)).astype(np.float32) * 3 + 1
    ok = np.ones(m, np.uint8)
    for k in range(m):
        start[k] = 8 + pad[k]
        data = np.empty(c, np.float32)
        data[:n_alpha] = alpha_value
        for a, b, cc in runs_t:
            data[cc : cc + b - a] = rows[k, a:b]
        if bad[k] in ("nan", "inf"):
            data[n_alpha + rng.integers(d)] = np.nan if bad[k] == "nan" else -np.inf
        if bad[k] == "alpha" and n_alpha:
            data[rng.integers(n_alpha)] += 1
        if bad[k] == "skip":
            ok[k] = 0
        raw = data.tobytes()
        buf[k * span + start[k] : k * span + start[k] + len(raw)] = np.frombuffer(raw, np.uint8)
    want = ok.astype(bool) & np.array(
        [b not in ("nan", "inf") and not (b == "alpha" and n_alpha) for b in bad]
    )
    out = np.full((m, d), -7.0, np.float32)
    shift = rng.standard_normal(d)
    total, total_sq = rng.standard_normal(d), rng.random(d)
    t0, q0 = total.copy(), total_sq.copy()
    sums = (shift, total, total_sq) if with_sums else None
    kept = NATIVE.gather(
        buf.ctypes.data, span, start, runs_t, alpha_index, alpha_value, out, ok, sums, copy
    )
    assert kept == want.sum()
    np.testing.assert_array_equal(ok.astype(bool), want)
    if copy:
        np.testing.assert_array_equal(out[want], rows[want])
    else:  # checked and summed only
        assert (out == -7.0).all()
    t = rows[want].astype(np.float64) - shift
    if with_sums:
        np.testing.assert_allclose(total, t0 + t.sum(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(total_sq, q0 + (t * t).sum(axis=0), rtol=1e-12, atol=1e-12)
    else:
        np.testing.assert_array_equal(total, t0)


@needs_native
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), d=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_stats_equal_numpy(n, d, seed):
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal((n, d)) * 5 + 100).astype(np.float32)
    shift = block[0].astype(np.float64)
    total, total_sq = np.zeros(d), np.zeros(d)
    NATIVE.stats(block, shift, total, total_sq)
    t = block.astype(np.float64) - shift
    np.testing.assert_allclose(total, t.sum(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(total_sq, (t * t).sum(axis=0), rtol=1e-12, atol=1e-12)
    # and a _ColumnStats adds a block through it as through numpy
    cs = _ColumnStats(d)
    cs.add_block(block)
    mean, var = cs.result()
    np.testing.assert_allclose(mean, block.astype(np.float64).mean(axis=0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(var, block.astype(np.float64).var(axis=0), rtol=1e-9, atol=1e-9)


@needs_native
def test_a_file_larger_than_its_slot_is_read_apart(tmp_path, monkeypatch):
    # metadata beyond the 64 KiB a slot leaves for it: the file is read by read_row, the
    # same row, statistics and hash as the reader's
    from w2wkit import collection

    models = random_models(5, seed=21)
    models[3] = Adapter(dict(models[3].layers), {"ss_note": "x" * (100 << 10)})
    folder = tmp_path / "loras"
    folder.mkdir()
    paths = []
    for i, ad in enumerate(models):
        paths.append(folder / f"m{i}.safetensors")
        write_adapter(ad, paths[-1], format="kohya")
    apart = []
    real = collection._KohyaRows.read_row

    def spy(self, path, out, where=None):
        apart.append(path.name)
        return real(self, path, out, where)

    monkeypatch.setattr(collection._KohyaRows, "read_row", spy)
    fast_coll = Collection(folder)
    fast = fast_coll.scan_factors(in_memory=True)
    assert apart == ["m3.safetensors"]
    monkeypatch.setattr(Collection, "_kohya_template", lambda self, i, ad: None)
    slow_coll = Collection(folder)
    slow = slow_coll.scan_factors(in_memory=True)
    np.testing.assert_array_equal(fast.data, slow.data)
    np.testing.assert_allclose(fast.var, slow.var, rtol=1e-9, atol=1e-15)
    assert fast_coll.manifest == slow_coll.manifest
    assert fast_coll.manifest[3]["sha256"] == hashlib.sha256(paths[3].read_bytes()).hexdigest()
