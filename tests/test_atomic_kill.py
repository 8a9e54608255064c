"""Kill real CLI writers (SIGKILL) at every step of their output and check what is left.

``W2WKIT_TEST_DIE_AFTER=k`` makes :mod:`w2wkit.atomic` kill its process right
after the ``k``-th low-level step (a file or folder complete, a rename, an
exchange, a removal). Each scenario counts its steps ``K`` with an
uninterrupted run (in-process, which also gives the new output), then for
each ``k`` runs the command in a subprocess killed at step ``k`` and checks:

* the output is the old one or the new one, complete and loadable (for
  ``sample`` into a folder that already holds outputs: every entry is, and
  the next write completes the new set);
* a rerun succeeds, gives the new output and leaves no temporary.

The default run kills at the steps around the commit point; the sweep over
every ``k`` is marked slow.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _spacehelpers import random_models
from click.testing import CliRunner

from w2wkit import atomic
from w2wkit.cli.main import cli
from w2wkit.formats import read_adapter, write_adapter
from w2wkit.space import WeightSpace

MAIN = "from w2wkit.cli.main import main; main()"


def _space_sig(path: Path) -> tuple:
    sp = WeightSpace.load(path, verify=True)
    return ("space", sp.n_components_, np.round(np.abs(sp.coefficients_), 3).tobytes())


def _lora_sig(path: Path) -> tuple:
    ad = read_adapter(path)
    return ("lora", tuple((m, round(float(np.abs(ly.delta()).sum()), 3)) for m, ly in ad.items()))


def _npy_sig(path: Path) -> tuple:
    return ("npy", np.round(np.load(path), 4).tobytes())


def _sig(path: Path) -> tuple | None:
    """What ``path`` holds, read the way users read it (None: missing)."""
    if not os.path.lexists(path):
        return None
    if path.suffix == ".npy":
        return _npy_sig(path)
    if (path / "space.json").exists():
        return _space_sig(path)
    return _lora_sig(path)


@dataclass
class Scenario:
    """A command, what exists before it, and the outputs it writes."""

    args: list[str]  # {d} is the scenario folder
    outputs: list[str]  # paths relative to {d}
    setup: Callable[[Path, Path], None]  # (folder, template)
    per_entry: bool = False  # outputs are entries of an existing folder (see module doc)
    env: dict[str, str] | None = None

    def argv(self, d: Path) -> list[str]:
        return [a.replace("{d}", str(d)) for a in self.args]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 tiny LoRAs, an old space (k=3), an old LoRA file and old samples."""
    root = tmp_path_factory.mktemp("kill-template")
    loras = root / "loras"
    loras.mkdir()
    models = random_models(8, seed=4)
    for i, ad in enumerate(models):
        write_adapter(ad, loras / f"m{i}.safetensors", format="kohya")
    write_adapter(models[1], root / "old.safetensors", format="kohya")
    r = CliRunner()
    res = r.invoke(cli, ["fit", str(loras), "-o", str(root / "sp_old"), "-k", "3"])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli, ["fit", str(loras), "-o", str(root / "sp_new"), "-k", "5"])
    assert res.exit_code == 0, res.output
    args = ["sample", "--space", str(root / "sp_new"), "-n", "2", "--seed", "0"]
    res = r.invoke(cli, [*args, "-o", str(root / "samples_old")])
    assert res.exit_code == 0, res.output
    (root / "samples_old" / "keep.txt").write_text("the user's own file")
    return root


def _copy(names: list[str]) -> Callable[[Path, Path], None]:
    def setup(d: Path, t: Path) -> None:
        for n in names:
            src, _, dst = n.partition(":")
            (shutil.copytree if (t / src).is_dir() else shutil.copy2)(t / src, d / (dst or src))

    return setup


_CONVERT = ["convert", "{d}/loras/m0.safetensors", "--to", "diffusers"]
_SAMPLE = ["sample", "--space", "{d}/sp_new", "-n", "3", "--seed", "1", "-o", "{d}/samples"]
_SAMPLES = [f"samples/sample_000{i}.safetensors" for i in range(3)] + ["samples/coefficients.npy"]

SCENARIOS = {
    "convert": Scenario(
        [*_CONVERT, "-o", "{d}/out.safetensors"],
        ["out.safetensors"],
        _copy(["loras"]),
    ),
    "convert-force": Scenario(
        [*_CONVERT, "-o", "{d}/old.safetensors", "--force"],
        ["old.safetensors"],
        _copy(["loras", "old.safetensors"]),
    ),
    "fit": Scenario(["fit", "{d}/loras", "-o", "{d}/sp", "-k", "5"], ["sp"], _copy(["loras"])),
    "fit-force": Scenario(
        ["fit", "{d}/loras", "-o", "{d}/sp_old", "-k", "5", "--force"],
        ["sp_old"],
        _copy(["loras", "sp_old"]),
    ),
    "fit-force-rename-aside": Scenario(
        ["fit", "{d}/loras", "-o", "{d}/sp_old", "-k", "5", "--force"],
        ["sp_old"],
        _copy(["loras", "sp_old"]),
        env={"W2WKIT_TEST_NO_EXCHANGE": "1"},
    ),
    "sample": Scenario(_SAMPLE, _SAMPLES, _copy(["sp_new"])),
    "sample-force": Scenario(
        [*_SAMPLE, "--force"],
        _SAMPLES,
        _copy(["sp_new", "samples_old:samples"]),
        per_entry=True,
    ),
}

#: Steps of the default run: the last few, where the old output is replaced.
FAST_STEPS = 3


def _prepare(scn: Scenario, template: Path, d: Path) -> None:
    d.mkdir()
    scn.setup(d, template)


def _state(scn: Scenario, d: Path) -> dict[str, tuple | None]:
    return {o: _sig(d / o) for o in scn.outputs}


def _temporaries(d: Path) -> list[str]:
    return [p.name for p in d.rglob("*") if ".w2w" in p.name]


def _count_steps(scn: Scenario, template: Path, d: Path, monkeypatch) -> tuple[int, dict]:
    """Run uninterrupted in-process: the number of steps and the new output."""
    _prepare(scn, template, d)
    monkeypatch.setattr(atomic, "_DIE_AFTER", 10**9)
    monkeypatch.setattr(atomic, "_steps", 0)
    if scn.env and "W2WKIT_TEST_NO_EXCHANGE" in scn.env:
        monkeypatch.setattr(atomic, "_USE_EXCHANGE", False)
    res = CliRunner().invoke(cli, scn.argv(d), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    steps = atomic._steps
    monkeypatch.setattr(atomic, "_DIE_AFTER", 0)
    monkeypatch.setattr(atomic, "_USE_EXCHANGE", sys.platform == "linux")
    return steps, _state(scn, d)


def _run(scn: Scenario, d: Path, argv: list[str], die_after: int | None) -> int:
    env = {**os.environ, **(scn.env or {})}
    env.pop("W2WKIT_TEST_DIE_AFTER", None)
    if die_after is not None:
        env["W2WKIT_TEST_DIE_AFTER"] = str(die_after)
    proc = subprocess.run(
        [sys.executable, "-c", MAIN, *argv], env=env, capture_output=True, text=True, timeout=120
    )
    if die_after is None:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.returncode


def _sweep(name: str, template: Path, tmp_path: Path, monkeypatch, fast: bool) -> None:
    scn = SCENARIOS[name]
    steps, new = _count_steps(scn, template, tmp_path / "reference", monkeypatch)
    old_dir = tmp_path / "old"
    _prepare(scn, template, old_dir)
    old = _state(scn, old_dir)
    assert all(new[o] is not None and new[o] != old[o] for o in scn.outputs), "vacuous scenario"
    assert steps >= 2
    ks = range(max(1, steps - FAST_STEPS), steps) if fast else range(1, steps + 1)
    leftovers = repaired = 0
    for k in ks:
        d = tmp_path / f"k{k}"
        _prepare(scn, template, d)
        rc = _run(scn, d, scn.argv(d), die_after=k)
        assert rc == -signal.SIGKILL, f"step {k} of {steps}: exit {rc}, not killed"
        got = _state(scn, d)
        leftovers += bool(_temporaries(d))
        if scn.per_entry:  # every entry whole, old or new; the next write completes the set
            for o in scn.outputs:
                assert got[o] in (old[o], new[o]), f"step {k}: {o} is neither old nor new"
            atomic.recover_entries(d / "samples", [Path(o).name for o in scn.outputs])
            got = _state(scn, d)
            assert got in (old, new), f"step {k}: recovery left a mix"
        else:
            if got not in (old, new) and scn.env and "W2WKIT_TEST_NO_EXCHANGE" in scn.env:
                # without an exchange the old folder is set aside for a moment; the next
                # write (or recover) puts it back
                assert all(v is None for v in got.values()), f"step {k}: {got}"
                for o in scn.outputs:
                    assert f"restored {d / o}" in atomic.recover(d / o)
                got = _state(scn, d)
                repaired += 1
            assert got in (old, new), f"step {k} of {steps}: output is neither old nor new"
        argv = scn.argv(d)
        if got == new and "--force" not in argv:
            argv.append("--force")  # the output is there: a plain rerun refuses, by design
        _run(scn, d, argv, die_after=None)
        assert _state(scn, d) == new, f"step {k}: the rerun did not write the new output"
        assert _temporaries(d) == [], f"step {k}: the rerun left {_temporaries(d)}"
        if (d / "samples" / "keep.txt").exists() or name == "sample-force":
            assert (d / "samples" / "keep.txt").read_text() == "the user's own file"
        shutil.rmtree(d)
    assert leftovers, "no kill left a temporary: the cleanup was not exercised"
    if scn.env and "W2WKIT_TEST_NO_EXCHANGE" in scn.env:
        assert repaired == 1, "the kill between the two renames of the swap was not exercised"


@pytest.mark.parametrize("name", ["convert-force", "fit-force", "fit-force-rename-aside"])
def test_killed_writer_leaves_old_or_new(name, template, tmp_path, monkeypatch) -> None:
    _sweep(name, template, tmp_path, monkeypatch, fast=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_killed_writer_at_every_step(name, template, tmp_path, monkeypatch) -> None:
    _sweep(name, template, tmp_path, monkeypatch, fast=False)
