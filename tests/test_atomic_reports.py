"""Report folders (``w2wkit demo``) are published whole: kill the writer (SIGKILL) and look.

The writer is :func:`w2wkit.demo.run_synthetic_demo` on a small planted
collection (the cheapest real report writer: LoRA files, a space, plots,
HTML, JSON). ``W2WKIT_TEST_DIE_AFTER=k`` kills it right after the ``k``-th
low-level step of :mod:`w2wkit.atomic`. An uninterrupted run (in-process)
counts the steps ``K`` and gives the new report; each killed run starts from
a copy of an old report that holds a file the new one does not write, and
must leave:

* the old report exactly (same files, same bytes), or a complete new one
  with nothing of the old;
* after a rerun: the new report, no temporary, nothing of the old.

The default run kills once, just before the publication (the whole report
is written, not yet swapped in); the sweep over every ``k`` is slow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from w2wkit import atomic
from w2wkit.demo import run_synthetic_demo
from w2wkit.errors import FormatError

N_MODELS = 12
WRITER = (
    "import sys; from w2wkit.demo import run_synthetic_demo; "
    f"run_synthetic_demo(sys.argv[1], n_models={N_MODELS}, seed=1, overwrite=True, log=None, "
    "progress=False)"
)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes), temporaries included."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def _temporaries(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".w2w" in p.name]


def _is_new(files: dict[str, bytes], new: dict[str, bytes]) -> bool:
    """A complete new report: the new report's files (timings differ: JSON/HTML by name)."""
    if set(files) != set(new):
        return False
    if json.loads(files["demo.json"])["n_models"] != N_MODELS:
        return False
    return all(files[n] == new[n] for n in new if n.endswith(".safetensors"))


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """An old report (seed 0, plus a file of the user's) and the new report's files (seed 1)."""
    root = tmp_path_factory.mktemp("reports")
    old = root / "old"
    run_synthetic_demo(old, n_models=N_MODELS, seed=0, log=None, progress=False)
    (old / "images" / "stale.png").write_bytes(b"a plot of the old report")
    new = root / "new"
    run_synthetic_demo(new, n_models=N_MODELS, seed=1, log=None, progress=False)
    return old, _files(new)


def _count_steps(old: Path, d: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """Steps of an uninterrupted replacement of a copy of ``old`` (in-process)."""
    shutil.copytree(old, d / "report")
    monkeypatch.setattr(atomic, "_DIE_AFTER", 10**9)
    monkeypatch.setattr(atomic, "_steps", 0)
    run_synthetic_demo(
        d / "report", n_models=N_MODELS, seed=1, overwrite=True, log=None, progress=False
    )
    steps = atomic._steps
    monkeypatch.setattr(atomic, "_DIE_AFTER", 0)
    return steps


def _write(out: Path, die_after: int) -> int:
    """Run the writer in a subprocess that kills itself after step ``die_after``."""
    env = {**os.environ, "W2WKIT_TEST_DIE_AFTER": str(die_after)}
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, str(out)], env=env, capture_output=True, timeout=300
    )
    return proc.returncode


def _kill_at(k: int, steps: int, old: Path, new: dict[str, bytes], d: Path) -> str:
    """Kill a replacement of ``old`` at step ``k``; check, rerun, check. Returns old/new."""
    out = d / "report"
    shutil.copytree(old, out)
    before = _files(old)
    rc = _write(out, die_after=k)
    assert rc == -signal.SIGKILL, f"step {k} of {steps}: exit {rc}, not killed"
    got = _files(out)
    if got == before:
        seen = "old"
    else:
        assert _is_new(got, new), f"step {k} of {steps}: neither the old report nor the new"
        seen = "new"
    # the rerun (in-process: this process's pid differs from the killed writer's)
    run_synthetic_demo(out, n_models=N_MODELS, seed=1, overwrite=True, log=None, progress=False)
    after = _files(out)
    assert _is_new(after, new), f"step {k}: the rerun did not write the new report"
    assert "images/stale.png" not in after
    assert _temporaries(d) == [], f"step {k}: the rerun left {_temporaries(d)}"
    return seen


def test_killed_demo_before_publishing_leaves_the_old_report(reports, tmp_path, monkeypatch):
    old, new = reports
    steps = _count_steps(old, tmp_path / "count", monkeypatch)
    assert steps > 3
    d = tmp_path / "k"
    d.mkdir()
    # step K-2: every file of the new report written and synced, not yet swapped in
    assert _kill_at(steps - 2, steps, old, new, d) == "old"


@pytest.mark.slow
def test_killed_demo_at_every_step(reports, tmp_path, monkeypatch):
    old, new = reports
    steps = _count_steps(old, tmp_path / "count", monkeypatch)
    seen = []
    for k in range(1, steps + 1):
        d = tmp_path / f"k{k}"
        d.mkdir()
        seen.append(_kill_at(k, steps, old, new, d))
        shutil.rmtree(d)
    # the exchange is the commit point: before it the old report, from it on the new one
    assert seen == ["old"] * (steps - 2) + ["new"] * 2, seen


def test_replacing_a_report_keeps_nothing_of_the_old(reports, tmp_path):
    old, new = reports
    out = tmp_path / "report"
    shutil.copytree(old, out)
    (out / "notes.txt").write_text("the user's file in the old report folder")
    with pytest.raises(FormatError, match=r"output exists \(pass `overwrite=True`"):
        run_synthetic_demo(out, n_models=N_MODELS, seed=1, log=None, progress=False)
    assert _files(out)["notes.txt"]  # refused: untouched
    res = run_synthetic_demo(
        out, n_models=N_MODELS, seed=1, overwrite=True, log=None, progress=False
    )
    assert res["report"] == str(out / "report.html")
    assert _is_new(_files(out), new)  # no stale plot, no notes.txt: the folder was replaced
    assert _temporaries(tmp_path) == []
    # the space records its training files where they are now, not in the staging folder
    manifest = json.loads((out / "space" / "space.json").read_text())["manifest"]
    assert manifest and all(Path(m["file"]).parent == out / "loras" for m in manifest)
    # an empty folder (e.g. made by mkdtemp) is filled without `overwrite`
    empty = tmp_path / "empty"
    empty.mkdir()
    run_synthetic_demo(empty, n_models=N_MODELS, seed=1, log=None, progress=False)
    assert _is_new(_files(empty), new)
