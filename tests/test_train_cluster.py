"""``w2wkit train --cluster`` / ``train(client=)`` on a real LocalCluster (2 processes, loopback).

The same run trained by one process and by the cluster gives the same files bit for bit
(CPU, one thread per process: same batches, same arithmetic) and the same manifest; a
worker killed right after it published a model changes nothing (the chunk runs again
elsewhere, the published model is kept, not written again); the bad inputs are one line
each with no output left behind.

A worker that "cannot see" a file is made real with a path only the driver process can
resolve: ``/proc/self/fd/N/...`` where the driver holds a descriptor ``N`` of the folder
(Linux); a worker process has no descriptor ``N``, exactly as a worker on another machine
without the shared file system has no such folder.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("distributed")

from w2wkit.cli.main import cli
from w2wkit.cluster import open_client
from w2wkit.errors import W2WError
from w2wkit.stio import file_sha256
from w2wkit.training import MANIFEST, Recipe, train

NAMES = ["ann", "bob", "cat", "dan"]
RECIPE = Recipe(steps=3, batch=2, lr=1e-3, targets=("to_q", "to_v"))
CLI_RECIPE = ["--steps", 3, "--batch", 2, "--lr", 1e-3, "--targets", "to_q,to_v"]
PER_CHUNK = 2  # two chunks of two models: one per worker


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    """Four instance folders of two small random pictures each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cluster") / "people"
    rng = np.random.default_rng(1)
    for name in NAMES:
        (root / name).mkdir(parents=True)
        for j in range(2):
            pic = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pic).save(root / name / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def single(people, tiny_pipe_dir, tmp_path_factory) -> Path:
    """The run trained by this process (the reference)."""
    out = tmp_path_factory.mktemp("cluster") / "single"
    plan = train(people, tiny_pipe_dir, out, RECIPE, models_per_batch=PER_CHUNK, device="cpu")
    assert plan.written == NAMES
    return out


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    """The die hook's marker: while it exists the hook is disarmed."""
    path = tmp_path_factory.mktemp("cluster") / "died"
    path.write_text("disarmed")
    return path


@pytest.fixture(scope="module")
def cluster(marker):
    """``open_client("local:2")``; its workers carry the (disarmed) die hook."""
    patch = pytest.MonkeyPatch()
    patch.setenv("W2WKIT_TEST_CLUSTER_DIE", f"1:{marker}")  # inherited by the worker processes
    try:
        with open_client("local:2") as client:
            yield client
    finally:
        patch.undo()


def files(out: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(out.glob("*.safetensors"))}


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def no_leftovers(out: Path) -> None:
    assert not [p.name for p in out.iterdir() if ".w2w" in p.name]


@pytest.mark.slow  # a LocalCluster of two processes
def test_cluster_equals_single_process_bit_for_bit(
    cluster, people, tiny_pipe_dir, single, tmp_path
):
    out = tmp_path / "out"
    address = cluster.scheduler.address  # the CLI connects to the running cluster
    res = run(
        ["train", people, "--base", tiny_pipe_dir, "-o", out, *CLI_RECIPE,
         "--models-per-batch", PER_CHUNK, "--device", "cpu", "--cluster", address]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "cluster: 2 workers" in res.output and "wrote 4 LoRAs" in res.output
    assert files(out) == files(single) and len(files(out)) == len(NAMES)
    assert manifest(out) == manifest(single)
    no_leftovers(out)
    # resume: nothing to do, nothing rewritten
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    plan = train(people, tiny_pipe_dir, out, RECIPE, models_per_batch=2, client=cluster)
    assert plan.written == [] and plan.done == len(NAMES)
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}


@pytest.mark.slow  # a LocalCluster of two processes
def test_worker_killed_mid_chunk_changes_nothing(
    cluster, marker, people, tiny_pipe_dir, single, tmp_path
):
    out = tmp_path / "killed"
    marker.unlink()  # arm: the first worker to publish a model ends its process right after
    pids = set(cluster.run(os.getpid).values())
    plan = train(
        people, tiny_pipe_dir, out, RECIPE, models_per_batch=PER_CHUNK, device="cpu",
        client=cluster,
    )  # fmt: skip
    dead_pid, name, mtime = marker.read_text().split()
    assert int(dead_pid) in pids and int(dead_pid) not in set(cluster.run(os.getpid).values())
    assert plan.written == NAMES and not plan.failed_names
    assert files(out) == files(single)  # bit for bit, nothing lost
    assert manifest(out) == manifest(single)
    # the model the dead worker had published was kept by the second run of its chunk
    assert (out / name).stat().st_mtime_ns == int(mtime)
    no_leftovers(out)


@pytest.mark.slow  # a LocalCluster of two processes
def test_dry_run_on_the_cluster(cluster, people, tiny_pipe_dir, tmp_path):
    out = tmp_path / "plan"
    res = run(
        ["train", people, "--base", tiny_pipe_dir, "-o", out, *CLI_RECIPE, "--device", "cpu",
         "--models-per-batch", 1, "--cluster", cluster.scheduler.address, "--dry-run"]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "models: 4 (0 done, 0 failed, 4 to train)" in res.output
    assert "batches: 4" in res.output and "estimated time" in res.output
    assert not out.exists()


@pytest.mark.slow  # a LocalCluster of two processes
def test_cluster_with_recipe_options_equals_single_process(
    cluster, people, tiny_pipe_dir, tmp_path
):
    import dataclasses
    import shutil

    src = tmp_path / "people"
    shutil.copytree(people, src)
    (src / "ann" / "0.txt").write_text("a photo of sks person smiling")
    (src / "bob" / "1.txt").write_text("in the rain")
    recipe = dataclasses.replace(RECIPE, captions=True, flip=True, text_encoder=True)
    a, b = tmp_path / "single", tmp_path / "cluster"
    train(src, tiny_pipe_dir, a, recipe, models_per_batch=PER_CHUNK, device="cpu")
    plan = train(
        src, tiny_pipe_dir, b, recipe, models_per_batch=PER_CHUNK, device="cpu", client=cluster
    )
    assert plan.written == NAMES
    assert files(b) == files(a) and manifest(b) == manifest(a)
    losses = sorted(p.name for p in (a / "losses").iterdir())
    assert losses == [f"{n}.json" for n in NAMES]
    for name in losses:
        assert (b / "losses" / name).read_bytes() == (a / "losses" / name).read_bytes()
    no_leftovers(b)


@pytest.mark.slow  # a LocalCluster of two processes
def test_prior_preservation_refused_on_a_cluster(cluster, people, tiny_pipe_dir, tmp_path):
    import dataclasses

    recipe = dataclasses.replace(RECIPE, prior_preservation=True)
    with pytest.raises(W2WError, match="prior preservation is not available on a cluster"):
        train(people, tiny_pipe_dir, tmp_path / "o", recipe, client=cluster)
    assert not (tmp_path / "o").exists()


@pytest.fixture
def driver_only():
    """``driver_only(folder)``: a path to ``folder`` that only this process can resolve."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd (Linux)")
    opened = []

    def make(folder: Path) -> Path:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        high = os.dup2(fd, 900 + len(opened))
        os.close(fd)
        opened.append(high)
        return Path(f"/proc/self/fd/{high}")

    yield make
    for fd in opened:
        os.close(fd)


@pytest.mark.slow  # a LocalCluster of two processes
def test_worker_that_cannot_see_the_pictures(cluster, people, tiny_pipe_dir, tmp_path, driver_only):
    hidden = driver_only(people)
    out = tmp_path / "out"
    with pytest.raises(W2WError) as info:
        train(hidden, tiny_pipe_dir, out, RECIPE, models_per_batch=2, client=cluster)
    line = str(info.value)
    assert "\n" not in line and "cannot see" in line and "worker tcp://127.0.0.1:" in line
    assert f"{hidden}/ann/0.png" in line
    assert not out.exists()


@pytest.mark.slow  # a LocalCluster of two processes
def test_worker_that_cannot_see_the_base(cluster, people, tiny_pipe_dir, tmp_path, driver_only):
    hidden = driver_only(tiny_pipe_dir)
    out = tmp_path / "out"
    with pytest.raises(W2WError) as info:
        train(people, hidden, out, RECIPE, models_per_batch=2, client=cluster)
    line = str(info.value)
    assert "\n" not in line and "cannot see" in line and f"{hidden}/model_index.json" in line
    assert not out.exists()


def _one_line_error(res, *needles):
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.slow  # the connection timeout (10 s)
def test_unreachable_scheduler(people, tiny_pipe_dir, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    out = tmp_path / "out"
    res = run(["train", people, "--base", tiny_pipe_dir, "-o", out, "--cluster", address])
    _one_line_error(res, address, "cannot reach")
    assert not out.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="paths")
def test_missing_scheduler_file(people, tiny_pipe_dir, tmp_path):
    out = tmp_path / "out"
    sched = tmp_path / "scheduler.json"
    res = run(["train", people, "--base", tiny_pipe_dir, "-o", out, "--cluster", sched])
    _one_line_error(res, str(sched), "scheduler file not found")
    assert not out.exists()


def test_chunks_ask_for_a_gpu_when_the_workers_declare_one():
    from w2wkit.train_cluster import _task_resources

    cpu = {"tcp://a:1": {"resources": {}}, "tcp://b:1": {}}
    gpu = {"tcp://a:1": {"resources": {"GPU": 1}}, "tcp://b:1": {"resources": {"GPU": 1}}}
    notes: list[str] = []
    assert _task_resources(cpu, "cpu", notes.append) is None
    assert _task_resources(cpu, "auto", notes.append) is None
    assert _task_resources(gpu, "cpu", notes.append) is None
    assert notes == []
    assert _task_resources(gpu, "auto", notes.append) == {"GPU": 1}
    assert _task_resources(gpu, "cuda:0", notes.append) == {"GPU": 1}
    assert _task_resources(cpu, "cuda", notes.append) is None
    assert len(notes) == 1 and "--resources GPU=1" in notes[0]
