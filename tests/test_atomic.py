"""w2wkit.atomic: temporaries, recovery of killed writers, folder swaps, staged entries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from w2wkit import atomic
from w2wkit.atomic import atomic_entries, atomic_path, is_temporary, recover, recover_entries
from w2wkit.errors import FormatError


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def _names(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _temporaries(folder: Path) -> list[str]:
    return [n for n in _names(folder) if ".w2w" in n]


@pytest.fixture(params=[True, False], ids=["exchange", "rename-aside"])
def exchange(request, monkeypatch) -> bool:
    monkeypatch.setattr(atomic, "_USE_EXCHANGE", request.param and sys.platform == "linux")
    return request.param


def test_temporary_names_carry_the_pid_and_vanish(tmp_path: Path) -> None:
    out = tmp_path / "a.safetensors"
    with atomic_path(out, suffix=".png") as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(f".a.safetensors.w2wtmp-{os.getpid()}-")
        assert tmp.name.endswith(".png") and is_temporary(tmp.name)
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and _names(tmp_path) == ["a.safetensors"]
    with pytest.raises(FormatError, match="output exists"), atomic_path(out) as tmp:
        pytest.fail("not reached")
    with pytest.raises(RuntimeError), atomic_path(out, overwrite=True) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError
    assert out.read_bytes() == b"new" and _names(tmp_path) == ["a.safetensors"]


def test_leftovers_of_dead_writers_are_removed_live_ones_kept(tmp_path, dead_pid) -> None:
    out = tmp_path / "m.safetensors"
    dead_file = tmp_path / f".m.safetensors.w2wtmp-{dead_pid}-0123abcd"
    dead_dir = tmp_path / f".m.safetensors.w2wtmp-{dead_pid}-0123abce.png"
    live = tmp_path / f".m.safetensors.w2wtmp-{os.getppid()}-0123abcd"  # our parent runs
    other = tmp_path / f".n.safetensors.w2wtmp-{dead_pid}-0123abcd"  # another output's
    dead_file.write_bytes(b"half")
    dead_dir.mkdir()
    (dead_dir / "x").write_bytes(b"half")
    live.write_bytes(b"busy")
    other.write_bytes(b"half")
    with atomic_path(out) as tmp:
        tmp.write_bytes(b"ok")
    assert _names(tmp_path) == sorted([live.name, other.name, "m.safetensors"])


def test_a_swap_cut_between_its_renames_is_undone(tmp_path, dead_pid) -> None:
    out = tmp_path / "space"
    (tmp_path / f".space.w2wold-{dead_pid}-0123abcd").mkdir()  # the old space, set aside
    (tmp_path / f".space.w2wold-{dead_pid}-0123abcd" / "space.json").write_text("old")
    (tmp_path / f".space.w2wtmp-{dead_pid}-0123abcd").mkdir()  # the new one, complete
    (tmp_path / f".space.w2wtmp-{dead_pid}-0123abcd" / "space.json").write_text("new")
    assert recover(out) and (out / "space.json").read_text() == "old"
    assert _names(tmp_path) == ["space", "space/space.json"]
    # the old one set aside while the new one is in place: deleted
    (tmp_path / f".space.w2wold-{dead_pid}-0123abcd").mkdir()
    assert recover(out) == [f"removed {tmp_path / f'.space.w2wold-{dead_pid}-0123abcd'}"]
    assert (out / "space.json").read_text() == "old"


def test_folder_replace_never_deletes_first(tmp_path, exchange, monkeypatch) -> None:
    out = tmp_path / "space"
    out.mkdir()
    (out / "f").write_text("old")
    seen = []
    rename, rmtree = os.rename, atomic.shutil.rmtree

    def spy_rmtree(path, *a, **k):
        seen.append(("rmtree", Path(path).name, (out / "f").read_text()))  # out is whole here
        return rmtree(path, *a, **k)

    monkeypatch.setattr(atomic.shutil, "rmtree", spy_rmtree)
    with atomic_path(out, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "new" and _names(tmp_path) == ["space", "space/f"]
    assert [s[2] for s in seen] == ["new"]  # the old one was removed only once the new was in
    assert os.rename is rename


def test_kinds_must_match(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    with (
        pytest.raises(FormatError, match="is a folder"),
        atomic_path(tmp_path / "d", overwrite=True) as t,
    ):
        t.write_bytes(b"x")
    assert _names(tmp_path) == ["d"]


def test_entries_refuse_the_first_clash_before_writing(tmp_path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "b").write_text("old b")
    (out / "c").write_text("old c")
    with pytest.raises(FormatError, match=r"o/b: output exists"):
        with atomic_entries(out, ["a", "b", "c"]):
            pytest.fail("not reached")
    assert _names(out) == ["b", "c", "keep.txt"]
    with atomic_entries(out, ["a", "b", "c", "p"], overwrite=True) as stage:
        for n in "abc":
            (stage / n).write_text(f"new {n}")
        (stage / "p").mkdir()
        (stage / "p" / "x").write_text("new p")
    assert [(out / n).read_text() for n in "abc"] == ["new a", "new b", "new c"]
    assert (out / "keep.txt").read_text() == "mine" and (out / "p" / "x").read_text() == "new p"
    assert _temporaries(tmp_path) == []
    with atomic_entries(out, ["p"], overwrite=True) as stage:  # a folder entry replaced
        (stage / "p").mkdir()
        (stage / "p" / "y").write_text("newer p")
    assert _names(out / "p") == ["y"] and _temporaries(tmp_path) == []


def test_entries_into_a_new_folder_appear_at_once(tmp_path) -> None:
    out = tmp_path / "new"
    with atomic_entries(out, ["a"]) as stage:
        (stage / "a").write_text("a")
        assert not out.exists()
    assert _names(tmp_path) == ["new", "new/a"]


def test_killed_entries_are_finished_or_dropped(tmp_path, dead_pid) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "a").write_text("old a")
    (out / "p").mkdir()
    publish = out / f".w2wpublish-{dead_pid}-0123abcd"  # committed: a published, b and p not
    publish.mkdir()
    (publish / "b").write_text("new b")
    (publish / "p").mkdir()
    (publish / "p" / "x").write_text("new p")
    (out / f".w2wreplaced-{dead_pid}-0123abcd").mkdir()
    stage = out / f".w2wstage-{dead_pid}-0123abce"  # never committed
    stage.mkdir()
    (stage / "a").write_text("half")
    assert recover_entries(out)
    assert (out / "a").read_text() == "old a" and (out / "b").read_text() == "new b"
    assert _names(out) == ["a", "b", "p", "p/x"]


def test_hook_is_off_unless_set() -> None:
    assert atomic._DIE_AFTER == 0  # the suite itself never runs with the hook
