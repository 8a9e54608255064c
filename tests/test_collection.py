from __future__ import annotations

import hashlib
import itertools
import os

import numpy as np
import pytest
from _spacehelpers import direct_io_works, evict, random_models
from hypothesis import given, settings
from hypothesis import strategies as st

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.collection import Collection
from w2wkit.errors import FormatError, LayoutError, SpaceError
from w2wkit.formats import write_adapter
from w2wkit.layout import WeightLayout


@pytest.fixture(params=["native", "python"])
def scan_path(request, monkeypatch):
    """Run a scan test on both paths: the native helper (w2wkit.native) and Python."""
    from w2wkit import collection
    from w2wkit.native import native

    if request.param == "native":
        if native() is None:
            pytest.skip("the native helper is not built here (test_native_helper_is_built)")
    else:
        monkeypatch.setattr(collection, "native", lambda: None)
    return request.param


def _write(models, folder, fmt="kohya"):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ad in enumerate(models):
        p = folder / f"m{i:02d}.safetensors"
        write_adapter(ad, p, format=fmt)
        paths.append(p)
    return paths


def test_rows_stream_in_blocks_with_numpy_statistics(tmp_path):
    models = random_models(9, seed=1)
    paths = _write(models, tmp_path / "loras")
    coll = Collection(tmp_path / "loras", cache_dir=tmp_path / "cache")
    rows = coll.scan_factors()
    lay = WeightLayout.from_adapter(models[0])
    expected = np.stack([lay.flatten(m) for m in models])
    assert not isinstance(rows.data, np.ndarray)  # cache on disk (plain reads and writes)
    blocks = list(rows.blocks(block_rows=4))
    assert [b.shape[0] for b in blocks] == [4, 4, 1]
    assert all(b.dtype == np.float32 for b in blocks)
    np.testing.assert_allclose(np.concatenate(blocks), expected, rtol=0, atol=0)
    np.testing.assert_allclose(rows.mean, expected.astype(np.float64).mean(0), atol=1e-7)
    np.testing.assert_allclose(rows.var, expected.astype(np.float64).var(0), atol=1e-6)
    man = coll.manifest
    assert [e["row"] for e in man] == list(range(9))
    assert man[3]["name"] == "m03" and man[3]["format"] == "kohya"
    assert man[3]["sha256"] == hashlib.sha256(paths[3].read_bytes()).hexdigest()
    rows.close()
    assert not list((tmp_path / "cache").glob("*/rows.npy"))


def test_block_rows_reach_the_pass_size_within_the_budget(tmp_path, monkeypatch):
    # rows of 99,648 floats: 64 MiB holds 168 of them; a block is made at least the 256
    # rows a solver pass would otherwise coalesce it to (a copy), unless the memory
    # budget's eighth holds fewer; and the row file reads every block into a buffer of its
    # own that the fit may standardise in place
    import w2wkit.collection as collection
    from w2wkit.solvers import _MIN_BLOCK_ROWS

    models = random_models(3, seed=2)
    _write(models, tmp_path / "loras")
    coll = Collection(tmp_path / "loras", cache_dir=tmp_path / "cache")
    rows = coll.scan_factors()
    assert _MIN_BLOCK_ROWS == collection.STREAM_MIN_ROWS

    def block_rows(d: int) -> int:  # the block size depends on the row width only
        wide = collection.FactorRows(rows.layout, np.empty((0, d), np.float32), rows.mean, rows.var)
        return wide.default_block_rows()

    monkeypatch.setattr(collection, "memory_budget", lambda: 16 << 30)
    assert block_rows(99_648) == collection.STREAM_MIN_ROWS
    assert block_rows(1_000) == (64 << 20) // 4000
    monkeypatch.setattr(collection, "memory_budget", lambda: 8 * 100 * 4 * 99_648)
    assert block_rows(99_648) == 100
    blocks = list(rows.blocks(block_rows=2))
    # blocks of the row file are its own buffers (a pass may standardise them in place):
    # writeable, and no two blocks alive at once share memory
    assert all(b.flags.writeable and b.flags.c_contiguous for b in blocks)
    assert not any(np.shares_memory(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1 :])
    rows.close()


def test_glob_and_list_sources(tmp_path):
    paths = _write(random_models(3), tmp_path)
    assert len(Collection(str(tmp_path / "m0*.safetensors"))) == 3
    coll = Collection(paths[:2])
    assert coll.names == ["m00", "m01"]


def test_mixed_layouts_list_groups_and_suggest_delta(tmp_path):
    _write(random_models(3, rank=2) + random_models(2, rank=4), tmp_path)
    with pytest.raises(LayoutError) as err:
        Collection(tmp_path).scan_factors()
    msg = str(err.value)
    assert "\n" not in msg
    assert "group 1: 3 model(s) [m00, m01, m02]" in msg
    assert "group 2: 2 model(s) [m03, m04]" in msg and "rank 4" in msg
    assert '`representation="delta"`' in msg and "--" not in msg


def test_nan_row_names_the_file(tmp_path):
    models = random_models(3)
    _write(models, tmp_path)
    bad = random_models(1)[0]
    first = next(iter(bad.layers.values()))
    first.up[0, 0] = np.nan
    from w2wkit.stio import write_safetensors

    # written raw (writers refuse NaN): kohya keys by hand
    tensors = {}
    for m, layer in bad.items():
        key = "lora_unet_" + m.split(".", 1)[1].replace(".", "_")
        tensors[key + ".lora_down.weight"] = layer.down
        tensors[key + ".lora_up.weight"] = layer.up
        tensors[key + ".alpha"] = np.array(layer.alpha, np.float32)
    write_safetensors(tmp_path / "zz_bad.safetensors", tensors)
    with pytest.raises(FormatError, match=r"zz_bad\.safetensors.*NaN"):
        Collection(tmp_path).scan_factors()


def test_single_model_and_empty_folder(tmp_path):
    _write(random_models(1), tmp_path / "one")
    with pytest.raises(SpaceError, match="at least 2 models"):
        Collection(tmp_path / "one").scan_factors()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpaceError, match="no models to fit"):
        Collection(tmp_path / "empty")


def test_delta_scan_accepts_ranks_and_formats(tmp_path):
    a = random_models(2, rank=2)
    b = random_models(2, rank=3, seed=5)
    _write(a, tmp_path / "k", fmt="kohya")
    _write(b, tmp_path / "d", fmt="diffusers")
    fac = Collection(tmp_path).scan_deltas()
    m = next(iter(a[0].layers))
    assert fac.up[m].shape[1] == 2 + 2 + 3 + 3 and fac.max_rank[m] == 3
    # files sort as d/m00, d/m01, k/m00, k/m01
    assert list(fac.owner[m]) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
    # model 0's delta is recovered from the stacked factors
    sel = fac.owner[m] == 0
    np.testing.assert_allclose(fac.up[m][:, sel] @ fac.down[m][sel], b[0][m].delta(), atol=1e-6)


def test_row_caches_of_killed_fits_are_removed(tmp_path):
    import os

    _write(random_models(3, seed=2), tmp_path / "loras")
    cache = tmp_path / "cache"
    dead = _dead_pid()
    (cache / f"w2w-rows-{dead}-abc").mkdir(parents=True)  # a killed fit's cache
    (cache / f"w2w-rows-{dead}-abc" / "rows.npy").write_bytes(b"x" * 64)
    (cache / f"w2w-rows-{os.getpid()}-live").mkdir()  # a running fit's cache
    rows = Collection(tmp_path / "loras", cache_dir=cache).scan_factors()
    names = sorted(p.name for p in cache.iterdir())
    assert f"w2w-rows-{dead}-abc" not in names
    assert f"w2w-rows-{os.getpid()}-live" in names
    rows.close()


def _dead_pid() -> int:
    """A pid no process can have (above the kernel's limit), so it is never reused."""
    from pathlib import Path

    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def test_kohya_rows_copied_from_file_bytes_equal_the_reader(tmp_path, monkeypatch, scan_path):
    # the fast path (rows copied straight from files laid out like the first) gives the
    # reader's rows, manifest and families; files it cannot vouch for (another alpha,
    # other metadata is fine) go through the reader; a NaN is refused by the reader
    from w2wkit.adapter import Adapter, LoraLayer

    models = random_models(7, seed=3)
    m5 = models[5]
    models[5] = Adapter(
        {
            name: LoraLayer(layer.down, layer.up / 2, alpha=layer.alpha * 2)
            for name, layer in m5.layers.items()
        },
        {"w2wkit.instance_prompt": "a photo of sks person"},
    )
    models[2] = Adapter(dict(models[2].layers), {"ss_note": "other metadata"})
    _write(models, tmp_path / "loras")
    calls = []
    orig = Collection.read

    def counting_read(self, i):
        calls.append(i)
        return orig(self, i)

    monkeypatch.setattr(Collection, "read", counting_read)
    fast_coll = Collection(tmp_path / "loras")
    fast = fast_coll.scan_factors(in_memory=True)
    assert calls == [0, 5]  # the template, and the file with another alpha
    monkeypatch.setattr(Collection, "_kohya_template", lambda self, i, ad: None)
    slow_coll = Collection(tmp_path / "loras")
    slow = slow_coll.scan_factors()
    np.testing.assert_array_equal(fast.data, np.asarray(slow.data))
    np.testing.assert_allclose(fast.mean, slow.mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(fast.var, slow.var, rtol=1e-9, atol=1e-15)
    assert fast_coll.manifest == slow_coll.manifest
    assert fast_coll.families == slow_coll.families
    assert fast_coll.manifest[5]["prompt"] == "a photo of sks person"
    assert (
        fast_coll.manifest[3]["sha256"]
        == hashlib.sha256((tmp_path / "loras" / "m03.safetensors").read_bytes()).hexdigest()
    )
    assert fast.in_memory and not slow.in_memory


def test_kohya_fast_path_leaves_bad_values_to_the_reader(tmp_path, scan_path):
    models = random_models(3, seed=4)
    paths = _write(models[:2], tmp_path / "loras")
    # write_adapter refuses a NaN: write one into a copy of a valid file's data bytes
    name = next(iter(models[1].layers))
    src = paths[1].read_bytes()
    first = np.asarray(models[1].layers[name].down, dtype=np.float32).tobytes()[:8]
    at = src.rfind(first)
    assert at > 0
    bad = src[:at] + np.float32(np.nan).tobytes() + src[at + 4 :]
    (tmp_path / "loras" / "m02.safetensors").write_bytes(bad)
    with pytest.raises(FormatError, match="m02"):
        Collection(tmp_path / "loras").scan_factors(in_memory=True)


def test_kohya_header_compared_as_text_around_its_metadata(tmp_path):
    # a file whose header is the template's text with only the metadata object replaced
    # skips the JSON parse of its tensor entries; any other change (an offset, a space,
    # a duplicated metadata key, a metadata value that is not an object) is not vouched
    # for by the text comparison
    from w2wkit.adapter import Adapter
    from w2wkit.collection import _KohyaRows

    models = random_models(2, seed=5)
    m0 = Adapter(dict(models[0].layers), {"ss_note": "template", "w2wkit.x": "1"})
    paths = _write([m0, models[1]], tmp_path / "loras")
    raw = paths[0].read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    text = raw[8 : 8 + hlen].decode()
    fast = _KohyaRows(paths[0], WeightLayout.from_adapter(m0))
    before, after = fast._head_around
    assert after is not None and before.endswith(":")
    assert fast._same_header(text.encode()) == {"ss_note": "template", "w2wkit.x": "1"}
    other = before + '{"a":"b\\u00e9","c":"{\\"x\\"}"}' + after
    assert fast._same_header(other.encode()) == {"a": "b\u00e9", "c": '{"x"}'}
    assert fast._same_header((before + '{"a":"1","a":"2"}' + after).encode()) is None
    assert fast._same_header((before + "[1]" + after).encode()) is None
    assert fast._same_header((before + '{"a":"1"} ' + after).encode()) is None
    moved = after.replace('"data_offsets":[0,', '"data_offsets":[4,', 1)
    assert moved != after
    assert fast._same_header((before + "{}" + moved).encode()) is None
    assert fast._same_header(b"\xff" + text.encode()) is None
    # and end to end: the other file's row, manifest and metadata equal the reader's
    out = np.empty(fast.perm.size, np.float32)
    meta, digest = fast.read_row(paths[1], out)
    from w2wkit.formats.registry import read_adapter

    assert meta == read_adapter(paths[1]).metadata
    assert digest == hashlib.sha256(paths[1].read_bytes()).hexdigest()
    np.testing.assert_array_equal(out, WeightLayout.from_adapter(m0).flatten(models[1]))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 90),
    d=st.integers(1, 9000),
    offset=st.floats(-1e3, 1e3),
    seed=st.integers(0, 2**16),
    by_row=st.booleans(),
)
def test_column_stats_match_numpy(n, d, offset, seed, by_row):
    """Shifted float64 sums a block / a row at a time (column chunks, partial blocks)."""
    from w2wkit.collection import _ColumnStats

    rng = np.random.default_rng(seed)
    x = (offset + rng.standard_normal((n, d))).astype(np.float32)
    stats = _ColumnStats(d)
    if by_row:
        for row in x:
            stats.add_row(row)
    else:
        for lo in range(0, n, 7):
            stats.add_block(x[lo : lo + 7])
    mean, var = stats.result()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(var, x64.var(axis=0), rtol=1e-9, atol=1e-9)
    assert stats.n == n


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    d=st.integers(1, 300),
    spread=st.floats(0.0, 1e3),
    seed=st.integers(0, 2**16),
)
def test_column_stats_merged_equal_one_pass(sizes, d, spread, seed):
    """Statistics summed in parts (each with its own shift: its first row) and merged
    equal those of one pass over all the rows, whatever the parts' sizes and offsets."""
    from w2wkit.collection import _ColumnStats

    rng = np.random.default_rng(seed)
    parts = [
        (spread * rng.standard_normal(d) + rng.standard_normal((m, d))).astype(np.float32)
        for m in sizes
    ]
    x = np.concatenate(parts)
    total = _ColumnStats(d)
    for part in parts:
        st_part = _ColumnStats(d)
        st_part.add_block(part)
        total.merge(st_part)
    assert total.n == x.shape[0]
    if x.shape[0] == 0:
        return
    mean, var = total.result()
    x64 = x.astype(np.float64)
    scale = 1.0 + np.abs(x64).max()
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(var, x64.var(axis=0), rtol=1e-9, atol=1e-12 * scale**2)


@pytest.mark.parametrize("target", ["memory", "row cache", "files"])
def test_reader_threads_take_runs_of_files(tmp_path, monkeypatch, target, scan_path):
    # the reader threads take runs of files (here 3); files the fast path declines fall at
    # the start, the middle and the end of runs, and a whole run is declined: rows,
    # statistics (summed per thread, merged), manifest and families equal the reader's
    from w2wkit import collection as coll

    monkeypatch.setattr(coll, "READ_RUN", 3)
    models = random_models(17, seed=11)
    for j in (4, 6, 9, 10, 11, 16):  # another alpha: read by the ordinary reader
        models[j] = Adapter(
            {
                name: LoraLayer(ly.down, ly.up / 2, alpha=ly.alpha * 2)
                for name, ly in models[j].layers.items()
            }
        )
    _write(models, tmp_path / "loras")
    kwargs = {"memory": {"in_memory": True}, "files": {"in_files": True}}.get(target, {})
    fast_coll = Collection(tmp_path / "loras", cache_dir=tmp_path / "c1")
    fast = fast_coll.scan_factors(**kwargs)
    assert fast_coll._fast_reader is not None
    with monkeypatch.context() as m:
        m.setattr(Collection, "_kohya_template", lambda self, i, ad: None)
        slow_coll = Collection(tmp_path / "loras", cache_dir=tmp_path / "c2")
        slow = slow_coll.scan_factors(in_memory=True)
    np.testing.assert_array_equal(_rows_of(fast), np.asarray(slow.data))
    np.testing.assert_allclose(fast.mean, slow.mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(fast.var, slow.var, rtol=1e-9, atol=1e-15)
    assert fast_coll.manifest == slow_coll.manifest
    assert fast_coll.families == slow_coll.families
    if target == "files":
        assert sorted(np.flatnonzero(fast.data.starts < 0)) == [0, 4, 6, 9, 10, 11, 16]
    fast.close()
    slow.close()


def test_rows_written_to_a_row_cache_a_run_at_a_time(tmp_path):
    from w2wkit.collection import _RowFile

    rows = _RowFile(tmp_path / "rows.npy", 5, 3)
    block = np.arange(9, dtype=np.float32).reshape(3, 3)
    rows.write_rows(1, block)
    rows[4] = np.full(3, 7.0, np.float32)
    got = np.load(tmp_path / "rows.npy")
    np.testing.assert_array_equal(got[1:4], block)
    np.testing.assert_array_equal(got[4], 7.0)
    with pytest.raises(ValueError, match="rows of shape"):
        rows.write_rows(3, block)  # past the last row
    with pytest.raises(ValueError, match="row of shape"):
        rows[0] = np.zeros(4, np.float32)


def test_buffered_row_cache_writes_go_in_pieces(tmp_path, monkeypatch):
    # one pwrite of a run of rows is split into pieces of at most BUFFERED_WRITE_BYTES
    # (large buffered writes cost the kernel far more), and the rows are the same
    import os

    import w2wkit.collection as collection

    monkeypatch.setattr(collection, "BUFFERED_WRITE_BYTES", 40)
    sizes = []
    real = os.pwrite

    def spy(fd, data, at):
        sizes.append(len(data))
        return real(fd, data, at)

    monkeypatch.setattr(os, "pwrite", spy)
    rows = collection._RowFile(tmp_path / "rows.npy", 6, 7)
    block = np.arange(35, dtype=np.float32).reshape(5, 7)
    rows.write_rows(1, block)
    assert sizes and max(sizes) <= 40 and sum(sizes) == block.nbytes
    np.testing.assert_array_equal(np.load(tmp_path / "rows.npy")[1:], block)


def _rows_of(rows):
    return np.concatenate(list(rows.blocks(block_rows=3)))


def test_rows_left_in_their_files_equal_the_row_cache(tmp_path, scan_path):
    # rows read again from the files on every pass (no row cache of the data): the same
    # bits as the row cache; only the template's file and a file the fast path declines
    # (another alpha) are written to a side cache, which close() removes
    from w2wkit.adapter import Adapter, LoraLayer
    from w2wkit.collection import _FileRows

    models = random_models(8, seed=5)
    m5 = models[5]
    models[5] = Adapter(
        {n: LoraLayer(ly.down, ly.up / 2, alpha=ly.alpha * 2) for n, ly in m5.layers.items()}
    )
    _write(models, tmp_path / "loras")
    cache = tmp_path / "cache"
    in_files = Collection(tmp_path / "loras", cache_dir=cache).scan_factors(in_files=True)
    cached = Collection(tmp_path / "loras", cache_dir=tmp_path / "c2").scan_factors()
    assert isinstance(in_files.data, _FileRows) and not isinstance(cached.data, _FileRows)
    assert in_files.data.side_rows == 2
    assert sorted(np.flatnonzero(in_files.data.starts < 0)) == [0, 5]
    np.testing.assert_array_equal(_rows_of(in_files), _rows_of(cached))
    np.testing.assert_array_equal(in_files.mean, cached.mean)
    np.testing.assert_array_equal(in_files.var, cached.var)
    np.testing.assert_array_equal(
        in_files.columns(3, 40), np.asarray(cached.data)[:, 3:40], strict=True
    )
    # the side cache is sparse: only its two rows hold blocks on disk
    (side,) = cache.glob("*/rows.npy")
    assert side.stat().st_blocks * 512 < 4 * (2 + 2) * in_files.dim + 65536
    in_files.close()
    cached.close()
    assert not list(cache.glob("*/rows.npy"))


def test_columns_read_from_the_files_equal_the_row_cache(tmp_path, monkeypatch):
    # the column Gram's chunks read straight from the files: for any column range, the
    # same bits as the row cache (side rows included), one preadv a file where the
    # file holds the range's runs close together, one a run where gaps are not allowed
    import w2wkit.collection as collection
    from w2wkit.adapter import Adapter, LoraLayer

    models = random_models(7, seed=11)
    m4 = models[4]
    models[4] = Adapter(
        {n: LoraLayer(ly.down, ly.up / 2, alpha=ly.alpha * 2) for n, ly in m4.layers.items()}
    )
    _write(models, tmp_path / "loras")
    in_files = Collection(tmp_path / "loras", cache_dir=tmp_path / "c1").scan_factors(in_files=True)
    cached = Collection(tmp_path / "loras", cache_dir=tmp_path / "c2").scan_factors()
    rows = np.asarray(cached.data)
    n, d = rows.shape
    tpl = in_files.data.template
    preads: list[int] = []
    real = os.preadv

    def counted(fd, buffers, offset, *args):
        preads.append(len(buffers))
        return real(fd, buffers, offset, *args)

    monkeypatch.setattr(collection.os, "preadv", counted)

    @settings(max_examples=40, deadline=None)
    @given(
        lo=st.integers(0, d),
        width=st.integers(0, d),
        gap=st.sampled_from([0, 4, collection.COLUMN_GAP_BYTES]),
        scale=st.floats(0.5, 2.0),
    )
    def check(lo, width, gap, scale):
        hi = min(d, lo + width)
        monkeypatch.setattr(collection, "COLUMN_GAP_BYTES", gap)
        tpl._column_plans.clear()
        preads.clear()

        def transform(piece, a, b):
            assert (a, b) == (lo, hi)
            piece *= np.float32(scale)
            return piece

        got = in_files.columns(lo, hi, transform)
        want = rows[:, lo:hi] * np.float32(scale)
        np.testing.assert_array_equal(got, want, strict=True)
        out = np.full((n, hi - lo), np.nan, dtype=np.float32)
        assert in_files.columns(lo, hi, out=out) is out
        np.testing.assert_array_equal(out, rows[:, lo:hi])
        if hi > lo:
            runs = len(tpl.column_runs(lo, hi))
            per_file = 1 if gap >= 4 else runs  # the alphas between runs are 4 bytes
            # 2 side rows (the template's file, the other alpha) read from the side cache
            assert len(preads) == 2 * (2 + (n - 2) * per_file)

    check()
    in_files.close()
    cached.close()


def test_rows_in_files_callable_and_other_formats(tmp_path):
    # a callable decides from (N, d); files the fast path never reads (diffusers format)
    # all go to the side cache, with the same rows
    from w2wkit.collection import _FileRows

    models = random_models(5, seed=6)
    _write(models, tmp_path / "loras", fmt="diffusers")
    seen = []

    def decide(n, d):
        seen.append((n, d))
        return True

    rows = Collection(tmp_path / "loras").scan_factors(in_files=decide)
    lay = WeightLayout.from_adapter(models[0])
    assert seen == [(5, lay.dim)]
    assert isinstance(rows.data, _FileRows) and rows.data.side_rows == 5
    np.testing.assert_array_equal(_rows_of(rows), np.stack([lay.flatten(m) for m in models]))
    rows.close()
    no = Collection(tmp_path / "loras").scan_factors(in_files=lambda n, d: False)
    assert not isinstance(no.data, _FileRows)
    no.close()


@pytest.mark.parametrize("read", ["rows", "columns"])
@pytest.mark.parametrize("change", ["rewritten", "removed", "truncated"])
def test_a_file_changed_during_the_fit_is_named(tmp_path, change, read, scan_path):
    import os

    models = random_models(6, seed=7)
    paths = _write(models, tmp_path / "loras")
    rows = Collection(tmp_path / "loras").scan_factors(in_files=True)
    _rows_of(rows)  # a pass reads every file
    victim = paths[3]
    if change == "rewritten":
        write_adapter(models[1], victim, format="kohya", overwrite=True)
        st = victim.stat()
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif change == "removed":
        victim.unlink()
    else:
        with open(victim, "r+b") as fh:
            fh.truncate(victim.stat().st_size - 4)
    said = "cannot read the file again" if change == "removed" else "changed during the fit"
    with pytest.raises(SpaceError, match="m03") as exc:
        if read == "rows":
            _rows_of(rows)
        else:
            rows.columns(2, rows.dim - 3)
    assert said in str(exc.value)
    rows.close()


def test_rows_read_around_the_page_cache_equal_the_buffered_ones(tmp_path, monkeypatch, scan_path):
    # files that outgrow the page cache are read with O_DIRECT (the scan decides from the
    # memory it sees): the same bits, the same stamp checks
    import w2wkit.collection as collection

    models = random_models(6, seed=8)
    paths = _write(models, tmp_path / "loras")
    rows = Collection(tmp_path / "loras").scan_factors(in_files=True)
    assert not rows.data.direct  # a few kB: the page cache
    buffered = _rows_of(rows)
    rows.close()
    monkeypatch.setattr(collection, "physical_memory", lambda: 1000)
    rows = Collection(tmp_path / "loras").scan_factors(in_files=True)
    assert rows.data.direct
    calls = []
    orig = collection._FileRows._read_direct

    def counting(self, i, out):
        got = orig(self, i, out)
        calls.append(got)
        return got

    monkeypatch.setattr(collection._FileRows, "_read_direct", counting)
    np.testing.assert_array_equal(_rows_of(rows), buffered)
    # five files read by the fast path (the template's row is in the side cache); a file
    # system without O_DIRECT falls back to buffered reads after the first refusal
    assert calls == [True] * 5 or (calls == [False] and not rows.data.direct)
    paths[2].unlink()
    with pytest.raises(SpaceError, match="m02"):
        _rows_of(rows)
    rows.close()
    # a row cache that outgrows the page cache: its blocks read with O_DIRECT (views of
    # pooled aligned buffers), the same bits
    cached = Collection(tmp_path / "loras", cache_dir=tmp_path / "c").scan_factors()
    assert isinstance(cached.data, collection._RowFile) and cached.data.direct
    assert cached.source in ("row cache, O_DIRECT", "row cache")
    for block_rows in (1, 2, 4):
        blocks = list(cached.blocks(block_rows=block_rows))
        assert all(b.flags.c_contiguous and b.flags.writeable for b in blocks)
        np.testing.assert_array_equal(np.concatenate(blocks)[:2], buffered[:2])
    cached.close()


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 3000),
    cuts=st.lists(st.integers(1, 39), max_size=8),
    seed=st.integers(0, 2**16),
)
def test_runs_written_around_the_page_cache_give_the_rows(tmp_path_factory, d, cuts, seed):
    """Runs of rows written with O_DIRECT (their whole pages) and through the page cache
    (the pages they share), in any order and from two threads, give every row's bits."""
    from concurrent.futures import ThreadPoolExecutor

    from w2wkit.collection import _RowFile, _scratch_block

    n = 40
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    folder = tmp_path_factory.mktemp("rows")
    rows = _RowFile(folder / "rows.npy", n, d)
    rows.write_direct = True
    edges = sorted({0, n, *cuts})
    runs = list(itertools.pairwise(edges))
    rng.shuffle(runs)

    def write(run):
        lo, hi = run
        block = _scratch_block(hi - lo, d, rows.write_phase(lo))
        block[:] = x[lo:hi]
        rows.write_rows(lo, block)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(write, runs))
    rows.end_writes()
    np.testing.assert_array_equal(np.load(folder / "rows.npy"), x)
    rows.direct = True  # and read back around the page cache
    np.testing.assert_array_equal(rows[0:n], x)
    os.close(rows.fd)


def test_the_scan_writes_a_row_cache_beyond_the_page_cache_around_it(
    tmp_path, monkeypatch, scan_path
):
    # a row cache the passes read with O_DIRECT is written with O_DIRECT by the reader
    # threads (runs of 3 rows of 4,044 bytes: unaligned, pages shared between runs)
    import w2wkit.collection as collection

    shapes = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (300, 251),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q": (257, 203),
    }
    models = random_models(11, rank=1, seed=9, shapes=shapes)
    _write(models, tmp_path / "loras")
    monkeypatch.setattr(collection, "READ_RUN", 3)
    expect = Collection(tmp_path / "loras").scan_factors(in_memory=True)
    monkeypatch.setattr(collection, "physical_memory", lambda: 1000)
    direct = []
    orig = collection._RowFile._write_direct

    def counting(self, fd, view, at):
        got = orig(self, fd, view, at)
        direct.append((got, at % 4096, len(view) % 4096))
        return got

    monkeypatch.setattr(collection._RowFile, "_write_direct", counting)
    cached = Collection(tmp_path / "loras", cache_dir=tmp_path / "c").scan_factors()
    assert isinstance(cached.data, collection._RowFile) and cached.data.direct
    (path,) = (tmp_path / "c").glob("*/rows.npy")
    np.testing.assert_array_equal(np.load(path), expect.data)
    np.testing.assert_array_equal(cached.mean, expect.mean)
    assert cached.data._direct_fd is None  # closed once the scan has written every row
    if direct_io_works(path):
        assert direct and all(ok and at == 0 and size == 0 for ok, at, size in direct)
    else:
        assert direct == [(False, 0, 0)] and not cached.data.write_direct
    cached.close()


def test_physical_memory_sees_the_memory_cgroup(tmp_path):
    import os

    from w2wkit.collection import physical_memory

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < physical_memory() <= ram
    proc = tmp_path / "cgroup"
    root = tmp_path / "sys"
    (root / "memory" / "jobs" / "a").mkdir(parents=True)
    (root / "memory" / "jobs" / "a" / "memory.limit_in_bytes").write_text("3000000\n")
    proc.write_text("9:pids:/\n4:memory:/jobs/a\n0::/\n")
    assert physical_memory(proc, root) == 3_000_000  # v1
    (root / "box").mkdir()
    (root / "box" / "memory.max").write_text("2000000\n")
    proc.write_text("0::/box\n")
    assert physical_memory(proc, root) == 2_000_000  # v2
    (root / "box" / "memory.max").write_text("max\n")
    assert physical_memory(proc, root) == ram  # no limit
    assert physical_memory(tmp_path / "absent", root) == ram


def test_block_pool_reuses_a_buffer_only_when_nothing_sees_it():
    from w2wkit.collection import _BlockPool

    def addr(a):
        return a.__array_interface__["data"][0]

    pool = _BlockPool(keep=1)
    a = pool.empty((3, 4))
    a[...] = 1
    first = addr(a)
    view = a[1:].T  # a view of a view keeps the buffer
    del a
    b = pool.empty((3, 4))
    assert addr(b) != first
    b[...] = 2
    assert (view == 1).all()
    del view
    c = pool.empty((3, 4))  # now nothing sees the first buffer: it is reused
    assert addr(c) == first
    assert addr(pool.empty((2, 4))) not in (first, addr(b))  # another size: a new one
    del b, c
    assert len(pool._free) == 1  # at most `keep` idle buffers


def _spy_reads(monkeypatch) -> list[str]:
    """Record every ``os.preadv`` as "direct" (O_DIRECT descriptor) or "buffered"."""
    import fcntl
    import os

    calls: list[str] = []
    real = os.preadv

    def spy(fd, buffers, offset, *flags):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls.append("direct")
        else:
            calls.append("buffered")
        return real(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", spy)
    # the native helper's reads: one per file, as its info tells
    from w2wkit import native as nv

    real_native = nv.Native.read_files

    def native_spy(self, paths, buf, span, digests, info, flags):
        real_native(self, paths, buf, span, digests, info, flags)
        for k in range(len(paths)):
            if info[k, nv.GOT] >= 0:
                calls.append("direct" if info[k, nv.READ_DIRECT] else "buffered")

    monkeypatch.setattr(nv.Native, "read_files", native_spy)
    return calls


def test_the_scan_reads_cold_files_around_the_page_cache(tmp_path, monkeypatch, scan_path):
    """Files the page cache holds are read from it; the others with O_DIRECT: the same
    rows, statistics and manifest (hashes) either way."""
    models = random_models(7, seed=9)
    paths = _write(models, tmp_path / "loras")
    calls = _spy_reads(monkeypatch)
    warm_coll = Collection(tmp_path / "loras")
    warm = warm_coll.scan_factors(in_memory=True)
    assert warm_coll._fast_reader.direct
    assert calls == ["buffered"] * 6  # the template (file 0) goes through the ordinary reader
    calls.clear()
    evict(paths)
    cold_coll = Collection(tmp_path / "loras")
    cold = cold_coll.scan_factors(in_memory=True)
    np.testing.assert_array_equal(np.asarray(cold.data), np.asarray(warm.data))
    np.testing.assert_array_equal(cold.mean, warm.mean)
    np.testing.assert_array_equal(cold.var, warm.var)
    assert [e["sha256"] for e in cold_coll.manifest] == [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in paths
    ]
    assert cold_coll.manifest == warm_coll.manifest
    if direct_io_works(paths[0]):
        # each file: the page cache does not have it, one O_DIRECT read of it whole
        assert calls == ["direct"] * 6
        assert cold_coll._fast_reader.direct
    else:  # refused once, then buffered reads
        assert "direct" not in calls and not cold_coll._fast_reader.direct


def test_the_scan_reads_through_the_page_cache_only_rows_the_passes_read_from_the_files(
    tmp_path, monkeypatch, scan_path
):
    """Cold files go around the page cache unless the passes read the rows from these
    files (then they want them cached); a row cache beyond the page cache is written
    around it too. At least DIRECT_SCAN_THREADS reader threads where they wait for the
    disk (cold files, or such writes); warm files and a cache that fits: read_threads()."""
    from concurrent import futures

    import w2wkit.collection as collection

    models = random_models(5, seed=12)
    paths = _write(models, tmp_path / "loras")
    calls = _spy_reads(monkeypatch)
    works = direct_io_works(paths[0])
    threads = []
    real_pool = futures.ThreadPoolExecutor

    def pool(workers, **kw):
        if kw.get("thread_name_prefix") == "w2wkit-read":
            threads.append(workers)
        return real_pool(workers, **kw)

    monkeypatch.setattr(futures, "ThreadPoolExecutor", pool)
    monkeypatch.setattr(collection, "read_threads", lambda: 1)
    cases = [
        ({"in_files": True}, 1 << 40, False, False),  # rows left in the files
        ({"cache_dir": tmp_path / "c"}, 1000, works, True),  # a row cache beyond the cache
        ({"cache_dir": tmp_path / "d"}, 1 << 40, works, False),  # one that fits it
        ({"in_memory": True}, 1 << 40, works, False),
    ]
    for kwargs, memory, direct, write_direct in cases:
        monkeypatch.setattr(collection, "physical_memory", lambda m=memory: m)
        evict(paths)
        # the kernel tells these files are not cached (not so on a file system that keeps
        # every page, tmpfs)
        cold = collection.files_cold(paths[1:])
        calls.clear()
        threads.clear()
        scan = {k: v for k, v in kwargs.items() if k != "cache_dir"}
        coll = Collection(tmp_path / "loras", cache_dir=kwargs.get("cache_dir"))
        space = coll.scan_factors(**scan)
        assert coll._fast_reader.direct == direct, kwargs
        assert calls == (["direct"] if direct else ["buffered"]) * 4, (kwargs, calls)
        if "cache_dir" in kwargs:
            assert space.data.write_direct == (write_direct and works), kwargs
        want = collection.DIRECT_SCAN_THREADS if write_direct or cold else 1
        assert threads == [want], (kwargs, threads)
        space.close()
    # warm files into a cache that fits: read_threads() threads, buffered reads
    monkeypatch.setattr(collection, "physical_memory", lambda: 1 << 40)
    for p in paths:
        p.read_bytes()
    assert not collection.files_cold(paths)
    threads.clear()
    coll = Collection(tmp_path / "loras", cache_dir=tmp_path / "w")
    coll.scan_factors().close()
    assert threads == [1]


def test_files_cold_samples_the_collection(tmp_path, monkeypatch):
    # the first, the last and evenly between; one file the page cache misses is enough
    import w2wkit.collection as collection

    paths = [tmp_path / f"f{i}" for i in range(11)]
    for p in paths:
        p.write_bytes(b"x" * 100)
    asked: list[str] = []
    cold = {str(paths[5])}

    def holds(fd, size):
        name = os.readlink(f"/proc/self/fd/{fd}")
        asked.append(name)
        return name not in cold

    monkeypatch.setattr(collection, "page_cache_holds", holds)
    assert collection.files_cold(paths)
    assert asked == [str(paths[j]) for j in (0, 2, 5)]  # stops at the first miss
    asked.clear()
    cold.clear()
    assert not collection.files_cold(paths)
    assert asked == [str(paths[j]) for j in (0, 2, 5, 8, 10)]
    monkeypatch.setattr(collection, "page_cache_holds", lambda fd, size: None)
    assert not collection.files_cold(paths)  # the kernel cannot tell: not cold
    assert not collection.files_cold([])
    paths[0].unlink()  # a file gone: the reader names it, the sample skips it
    monkeypatch.setattr(collection, "page_cache_holds", lambda fd, size: False)
    assert collection.files_cold(paths)


@pytest.mark.parametrize("call", ["cachestat", "mincore"])
def test_page_cache_residency_is_asked_of_the_kernel(tmp_path, monkeypatch, call):
    # cachestat(2) where the kernel has it, mincore(2) otherwise: the same answers
    import os

    from w2wkit import collection
    from w2wkit.collection import page_cache_holds

    asked = []
    for name in ("_cachestat_holds", "_mincore_holds"):
        real = getattr(collection, name)
        monkeypatch.setattr(
            collection, name, lambda fd, size, r=real, n=name: asked.append(n) or r(fd, size)
        )
    if call == "mincore":
        monkeypatch.setitem(collection._CACHESTAT, "works", False)
    elif collection._cachestat_call() is None or not collection._CACHESTAT["works"]:
        pytest.skip("no cachestat(2) here")
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(3 * 4096 + 5))
    evict([f])
    fd = os.open(f, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        assert page_cache_holds(fd, size) is False
        os.pread(fd, 4096, 0)  # one page read (and maybe its readahead)
        os.pread(fd, size, 0)
        assert page_cache_holds(fd, size) is True
        assert page_cache_holds(fd, 0) is True
    finally:
        os.close(fd)
    assert set(asked) == (
        {"_cachestat_holds"} if call == "cachestat" else {"_cachestat_holds", "_mincore_holds"}
    )


def test_a_refused_cachestat_falls_back_to_mincore(tmp_path, monkeypatch):
    import ctypes
    import errno
    import os

    from w2wkit import collection

    real = collection._cachestat_call()
    if real is None:
        pytest.skip("not a Linux machine cachestat(2) is known on")

    def refused(*args):
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(collection, "_cachestat_call", lambda: (real[0], refused, real[2]))
    monkeypatch.setitem(collection._CACHESTAT, "works", True)
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(8192))
    fd = os.open(f, os.O_RDONLY)
    try:
        os.pread(fd, 8192, 0)
        assert collection.page_cache_holds(fd, 8192) is True  # from mincore
    finally:
        os.close(fd)
    assert collection._CACHESTAT["works"] is False


@pytest.mark.parametrize("direct", [True, False])
def test_a_file_read_follows_a_file_that_grew(tmp_path, monkeypatch, direct):
    """The read goes to the file's end even past the size fstat gave (a file that grew),
    around the page cache or through it; the bytes are the file's."""
    import os

    import w2wkit.collection as collection

    models = random_models(2, seed=10)
    _write(models, tmp_path / "loras")
    coll = Collection(tmp_path / "loras")
    coll.scan_factors(in_memory=True)
    fast = coll._fast_reader
    fast.direct = direct
    big = tmp_path / "big.bin"  # several aligned blocks and a tail
    big.write_bytes(os.urandom(5 * 4096 + 123))
    evict([big])
    real = os.fstat

    def smaller(fd):
        st = list(real(fd))
        st[6] = 10  # st_size: the file "grew" after this fstat
        return os.stat_result(st)

    monkeypatch.setattr(collection.os, "fstat", smaller)
    raw, st = fast.read_file(big)
    assert bytes(raw) == big.read_bytes() and st.st_size == 10
    raw, _ = fast.read_file(big)  # again (cached when read through the page cache)
    assert bytes(raw) == big.read_bytes()
    assert fast.read_file(tmp_path / "absent") is None
    assert fast.read_file(tmp_path) is None  # not a regular file


def test_populate_faults_in_just_the_pages_of_a_block():
    # the scan's rows in memory: each run's rows faulted in by one madvise before the
    # copies (instead of a page fault a 4 KiB page); pages outside the block untouched
    import ctypes
    import sys

    import w2wkit.collection as collection

    if not sys.platform.startswith("linux"):
        pytest.skip("madvise(MADV_POPULATE_WRITE) is Linux's")
    page = 4096
    buf = collection.anon_map(64 * page)
    arr = np.frombuffer(buf, dtype=np.float32)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]

    def resident() -> list[int]:
        vec = (ctypes.c_ubyte * 64)()
        assert libc.mincore(arr.ctypes.data, 64 * page, vec) == 0
        return [i for i in range(64) if vec[i] & 1]

    assert resident() == []
    block = arr[1000 : 1000 + 5 * page // 4]  # bytes 4000..24480: pages 0-5
    collection.populate(block)
    if not collection._POPULATE["on"]:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
    assert resident() == list(range(6))
    assert not arr[: 6 * page // 4].any()  # fresh zero pages, nothing written
    collection.populate(arr[:0])  # empty: nothing
    assert resident() == list(range(6))
