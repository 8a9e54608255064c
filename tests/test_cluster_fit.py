"""``fit`` on a Dask cluster (``client=``, ``--cluster``): a real LocalCluster on loopback.

One LocalCluster (2 worker processes, one thread each, 127.0.0.1) serves the whole module. The
cluster fit must equal the single-process fit (singular values to 1e-6 relative, subspace angle
below 1e-4 rad, same manifest and standardisation), survive a worker that dies mid-pass with the
same numbers, and fail with one line where the workers cannot see the files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from _spacehelpers import SHAPES, adapters_from_rows, layout, planted_rows
from click.testing import CliRunner

pytest.importorskip("distributed")

from w2wkit.cli.main import cli
from w2wkit.cluster import ClusterError, open_client
from w2wkit.collection import Collection
from w2wkit.errors import LayoutError, SpaceError
from w2wkit.formats import write_adapter
from w2wkit.space import WeightSpace

N = 48
K = 6


def _write_collection(folder: Path, n: int = N, seed: int = 0) -> Path:
    """``n`` rank-1 models: kohya files, and one PEFT folder (the ordinary reader's path)."""
    folder.mkdir(parents=True, exist_ok=True)
    lay = layout(rank=1, shapes=SHAPES)
    rows = planted_rows(n, lay, true_rank=8, noise=0.05, seed=seed)
    for i, ad in enumerate(adapters_from_rows(rows, lay)):
        if i == n - 1:
            write_adapter(ad, folder / f"m_{i:03d}", format="peft")
        else:
            write_adapter(ad, folder / f"m_{i:03d}.safetensors", format="kohya")
    return folder


@pytest.fixture(scope="module")
def client():
    with open_client("local:2") as c:
        yield c


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return _write_collection(tmp_path_factory.mktemp("cluster_fit") / "loras")


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal angle (rad) between the row spaces of ``a`` and ``b`` (k, d)."""
    qa = np.linalg.qr(a.astype(np.float64).T)[0]
    qb = np.linalg.qr(b.astype(np.float64).T)[0]
    resid = qb - qa @ (qa.T @ qb)
    return float(np.arcsin(min(1.0, np.linalg.norm(resid, 2))))


def _assert_same_fit(a: WeightSpace, b: WeightSpace) -> None:
    assert a.manifest_ == b.manifest_
    np.testing.assert_array_equal(a.mean_, b.mean_)
    np.testing.assert_array_equal(a.scale_, b.scale_)
    np.testing.assert_allclose(b.singular_values_, a.singular_values_, rtol=1e-6)
    assert _angle(a.components_, b.components_) < 1e-4
    assert b.total_variance_ == pytest.approx(a.total_variance_, rel=1e-9)
    # the coefficients are the same coordinates (same signs) up to rounding
    scale = float(np.abs(a.coefficients_).max())
    assert float(np.abs(a.coefficients_ - b.coefficients_).max()) < 1e-4 * scale


@pytest.mark.parametrize("solver", ["gram", "randomized"])
def test_cluster_fit_equals_single_process(client, models: Path, solver: str) -> None:
    single = WeightSpace(K, solver=solver, random_state=3).fit(Collection(models))
    dist = WeightSpace(K, solver=solver, random_state=3).fit(Collection(models), client=client)
    assert dist.info_["solver_used"] == single.info_["solver_used"] == solver
    assert dist.info_["cluster_workers"] == 2
    _assert_same_fit(single, dist)
    # the manifest names every file and its hash, the PEFT folder (ordinary reader) too
    assert dist.manifest_[-1]["format"] == "peft"
    assert all(e["sha256"] for e in dist.manifest_)


def test_reduction_order_fixes_the_result(client, models: Path) -> None:
    """Two runs (tasks placed as the scheduler likes) give the same bits."""
    a = WeightSpace(K, solver="randomized").fit(Collection(models), client=client)
    b = WeightSpace(K, solver="randomized").fit(Collection(models), client=client)
    np.testing.assert_array_equal(a.components_, b.components_)
    np.testing.assert_array_equal(a.singular_values_, b.singular_values_)


class _ExitOnKthTask:
    """A worker plugin: the worker that starts the ``k``-th task whose key begins with
    ``prefix`` exits at once (``os._exit``), once per marker folder, whichever worker it is."""

    def __init__(self, marker: str, prefix: str, k: int) -> None:
        self.marker, self.prefix, self.k = marker, prefix, k

    def setup(self, worker) -> None:
        pass

    def teardown(self, worker) -> None:
        pass

    def transition(self, key, start, finish, **kwargs) -> None:
        name = key if isinstance(key, str) else str(key)
        if finish != "executing" or not name.startswith(self.prefix):
            return
        folder = Path(self.marker)
        (folder / f"call-{uuid.uuid4().hex}").touch()
        calls = len(list(folder.glob("call-*")))
        if calls >= self.k:
            try:
                fd = os.open(folder / "fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os._exit(1)


def _kill_plugin(marker: Path, prefix: str, k: int):
    import cloudpickle
    from distributed.diagnostics.plugin import WorkerPlugin

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return type("ExitOnKthTask", (_ExitOnKthTask, WorkerPlugin), {})(str(marker), prefix, k)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("solver", "prefix", "k"),
    [
        ("randomized", "w2wkit-krylov-", 6),
        ("gram", "w2wkit-components-", 2),
        ("gram-columns", "w2wkit-gram-columns-", 2),
    ],
)
def test_worker_killed_mid_pass(
    client, models: Path, tmp_path: Path, solver: str, prefix: str, k: int, monkeypatch
) -> None:
    """A worker that dies mid-pass: its task runs again elsewhere, the result is the same."""
    from w2wkit import clusterfit
    from w2wkit.cluster import worker_count

    if solver == "gram-columns":  # rows not held: the column chunks of the files
        monkeypatch.setattr(clusterfit, "HELD_BYTES_PER_WORKER", 0)
        monkeypatch.setattr(clusterfit, "COLUMN_CHUNK_BYTES", 4 * N * 16)
        solver = "gram"

    reference = WeightSpace(K, solver=solver).fit(Collection(models), client=client)
    marker = tmp_path / "marker"
    marker.mkdir()
    name = f"exit-{uuid.uuid4().hex[:6]}"
    client.register_plugin(_kill_plugin(marker, prefix, k), name=name)
    try:
        again = WeightSpace(K, solver=solver).fit(Collection(models), client=client)
    finally:
        client.unregister_worker_plugin(name)
    assert (marker / "fired").exists(), "the worker was never killed"
    np.testing.assert_array_equal(again.components_, reference.components_)
    np.testing.assert_array_equal(again.singular_values_, reference.singular_values_)
    assert again.manifest_ == reference.manifest_
    client.wait_for_workers(2, timeout=60)
    assert worker_count(client) == 2  # the nanny restarted the dead one


def test_scan_refuses_mixed_layouts(client, tmp_path: Path) -> None:
    folder = _write_collection(tmp_path / "mixed", n=8)
    lay2 = layout(rank=2, shapes=SHAPES)
    rows = planted_rows(1, lay2, true_rank=1, seed=5)
    write_adapter(adapters_from_rows(rows, lay2)[0], folder / "rank2.safetensors", format="kohya")
    with pytest.raises(LayoutError) as single:
        WeightSpace(3).fit(Collection(folder))
    with pytest.raises(LayoutError) as dist:
        WeightSpace(3).fit(Collection(folder), client=client)
    # the same groups are listed
    assert str(dist.value).split(" (")[0] == str(single.value).split(" (")[0]


def test_workers_that_cannot_see_the_files(client, models: Path, tmp_path: Path) -> None:
    """Paths only this process can open: ``/proc/self/fd/FD/...`` names a folder through a
    descriptor of the process that opens it, and the workers do not hold that descriptor."""
    fd = os.open(models, os.O_RDONLY)
    high = os.dup2(fd, 917)
    os.close(fd)
    try:
        here = Path(f"/proc/self/fd/{high}")
        coll = Collection(here)
        assert len(coll) == N and os.access(coll.files[0], os.R_OK)
        with pytest.raises(ClusterError) as info:
            WeightSpace(K).fit(coll, client=client)
    finally:
        os.close(high)
    message = str(info.value)
    assert "\n" not in message
    assert "cannot read this file" in message and "workers must see the same files" in message
    assert f"/proc/self/fd/{high}/m_0" in message


def test_cluster_fit_refusals(client, models: Path) -> None:
    with pytest.raises(SpaceError, match="factors representation only"):
        WeightSpace(K, representation="delta").fit(Collection(models), client=client)
    lay = layout(rank=1, shapes=SHAPES)
    ads = adapters_from_rows(planted_rows(4, lay, true_rank=2), lay)
    with pytest.raises(SpaceError, match="in-memory adapters"):
        WeightSpace(2).fit(Collection.from_adapters(ads), client=client)


def test_changed_file_is_refused(models: Path, tmp_path: Path) -> None:
    """A file whose size or modification time moved since the scan is not read as the row."""
    from w2wkit.clusterfit import _Context, _read_rows

    lay = layout(rank=1, shapes=SHAPES)
    path = str(models / "m_000.safetensors")
    st = os.stat(path)
    zeros, ones = np.zeros(lay.dim, np.float32), np.ones(lay.dim, np.float32)
    ctx = _Context(lay, None, False, zeros, ones, path)
    row = _read_rows(ctx, [path], [(st.st_size, st.st_mtime_ns)])
    assert row.shape == (1, lay.dim) and np.isfinite(row).all()
    with pytest.raises(SpaceError, match="changed during the fit"):
        _read_rows(ctx, [path], [(st.st_size, st.st_mtime_ns - 1)])


def test_plain_fit_never_imports_dask(models: Path) -> None:
    code = (
        "import sys\n"
        "from w2wkit.space import WeightSpace\n"
        "from w2wkit.collection import Collection\n"
        f"WeightSpace(3).fit(Collection({str(models)!r}))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('distributed', 'dask')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- command line


def test_cli_missing_scheduler_file(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "space"
    res = CliRunner().invoke(
        cli, ["fit", str(models), "-o", str(out), "-k", "3", "--cluster", str(tmp_path / "s.json")]
    )
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "scheduler file not found" in lines[0], res.output
    assert "Traceback" not in res.output and not out.exists()


def test_cli_cluster_refuses_delta_before_starting(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "space"
    res = CliRunner().invoke(
        cli,
        ["fit", str(models), "-o", str(out), "--representation", "delta", "--cluster", "local:2"],
    )
    assert res.exit_code == 1
    assert "factors representation only" in res.output and "--cluster" in res.output
    assert not out.exists()


@pytest.mark.slow
def test_cli_unreachable_scheduler(models: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "space"
    argv = ["fit", str(models), "-o", str(out), "-k", "3", "--cluster", f"tcp://127.0.0.1:{port}"]
    res = subprocess.run(
        [sys.executable, "-m", "w2wkit.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and f"127.0.0.1:{port}" in err[0], res.stderr
    assert not out.exists()


@pytest.mark.slow
def test_cli_fit_cluster_writes_the_same_space(models: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "single", tmp_path / "cluster"
    common = ["-k", "4", "--solver", "randomized", "--seed", "1"]
    assert CliRunner().invoke(cli, ["fit", str(models), "-o", str(a), *common]).exit_code == 0
    argv = ["fit", str(models), "-o", str(b), *common, "--cluster", "local:2"]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 0, res.output
    sa, sb = WeightSpace.load(a), WeightSpace.load(b)
    _assert_same_fit(sa, sb)
    ja = json.loads((a / "space.json").read_text())
    jb = json.loads((b / "space.json").read_text())
    assert ja.get("n_components", 4) == jb.get("n_components", 4)


@pytest.mark.parametrize("solver", ["gram", "randomized"])
def test_passes_that_read_the_files_again(client, models: Path, solver: str) -> None:
    """``keep_rows=False``: nothing held between passes, every pass reads the files; the same
    numbers as the passes over the row blocks the workers keep."""
    from w2wkit.clusterfit import fit_pca_files, scan_files

    results = []
    for keep in (True, False):
        coll = Collection(models)
        rows = scan_files(client, coll, keep_rows=keep, files_per_task=10)
        assert (rows.sources is not None) == keep
        try:
            mean32 = rows.mean.astype(np.float32)
            scale32 = np.sqrt(rows.var).astype(np.float32)
            results.append(fit_pca_files(client, rows, K, mean32, scale32, solver=solver))
        finally:
            rows.release()
    kept, reread = results
    np.testing.assert_allclose(reread.singular_values, kept.singular_values, rtol=1e-6)
    assert _angle(kept.components, reread.components) < 1e-4
    assert reread.n_passes == kept.n_passes
    if solver == "gram":  # rows not held: the Gram solver goes a column chunk at a time
        assert "column_chunks" in reread.info and "tiles" in kept.info


def test_column_gram_when_the_rows_exceed_the_workers_share(
    client, models: Path, monkeypatch
) -> None:
    """Files larger than the workers' share: not held, the Gram fit reads column chunks of the
    files (the kohya files only where the columns lie, the PEFT folder whole); the same space
    as the single-process fit."""
    from w2wkit import clusterfit

    monkeypatch.setattr(clusterfit, "HELD_BYTES_PER_WORKER", 0)
    monkeypatch.setattr(clusterfit, "COLUMN_CHUNK_BYTES", 4 * N * 16)  # several chunks
    single = WeightSpace(K, solver="gram").fit(Collection(models))
    spread = WeightSpace(K, solver="gram").fit(Collection(models), client=client)
    _assert_same_fit(single, spread)
    assert spread.info_["n_passes"] == 2


def test_column_reads_follow_each_files_own_layout(client, tmp_path: Path, monkeypatch) -> None:
    """Files with the same tensors in another order in their data section (another writer):
    a scan block whose first file is such a file has its own fast-path template; the column
    tasks (which read where the first file's template says) read those files whole."""
    from safetensors.numpy import load_file

    from w2wkit import clusterfit
    from w2wkit.clusterfit import fit_pca_files, scan_files
    from w2wkit.stio import write_safetensors

    folder = _write_collection(tmp_path / "loras")
    for f in sorted(folder.glob("*.safetensors"))[24:]:  # the second scan block, reordered
        tensors = load_file(str(f))
        write_safetensors(f, dict(reversed(list(tensors.items()))), overwrite=True)
    monkeypatch.setattr(clusterfit, "COLUMN_CHUNK_BYTES", 4 * N * 16)
    single = WeightSpace(K, solver="gram").fit(Collection(folder))
    coll = Collection(folder)
    rows = scan_files(client, coll, keep_rows=False, files_per_task=24)
    # the first block's files (its first file built the template) are read where the columns
    # lie; the second block's template is another one: read whole
    assert rows.fast[:24] == [True] * 24 and not any(rows.fast[24:])
    try:
        res = fit_pca_files(
            client, rows, K, single.mean_, single.scale_, solver="gram", progress=None
        )
    finally:
        rows.release()
    assert "column_chunks" in res.info
    np.testing.assert_allclose(res.singular_values, single.singular_values_, rtol=1e-6)
    assert _angle(res.components, single.components_) < 1e-4
