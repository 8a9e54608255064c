"""Atomic, crash-safe output: files, folders and sets of entries in a folder.

Every w2wkit writer publishes through this module, so that an output is
either the old one or the new one, complete, whatever happens to the process
(an exception, Ctrl-C, ``SIGKILL``, power loss after the rename).

Temporary names
---------------
Every temporary carries a recognisable tag, the writer's process id and a
random token, and lies next to (or inside) the output it belongs to:

``.NAME.w2wtmp-PID-TOKEN[SUFFIX]``
    The new ``NAME`` (file or folder) being written. Never visible under
    ``NAME`` until it is complete.
``.NAME.w2wold-PID-TOKEN``
    The previous folder ``NAME``, set aside for the moment of a swap (only
    where the file system cannot exchange two names in one step).
``FOLDER/.w2wstage-PID-TOKEN/``
    Entries of ``FOLDER`` being written together (:func:`atomic_entries`).
``FOLDER/.w2wpublish-PID-TOKEN/``
    The same entries once all are written, being moved into ``FOLDER``.
``FOLDER/.w2wreplaced-PID-TOKEN/``
    Folder entries of ``FOLDER`` replaced by those, deleted at the end.

Commit points and recovery
--------------------------
* A file: ``fsync`` of the new file, then ``os.replace`` onto the final name
  (the commit point), then ``fsync`` of the folder.
* A folder: every file of the new folder is synced, then it takes the final
  name. Where an old folder exists, the two are exchanged in one step
  (``renameat2(RENAME_EXCHANGE)``, Linux) and the old one (now under the
  temporary name) is deleted. Elsewhere the old folder is renamed aside
  (``w2wold``), the new one renamed in (the commit point), the old deleted.
* Entries of a folder (``sample``, ``world export-loras``): all are written
  into a ``w2wstage`` folder; renaming it to ``w2wpublish`` is the commit
  point; then each entry is moved to its final name and the folder removed.

Before every write of an output, what a writer of that same output left when
it was killed (its process id no longer runs on this machine) is repaired:

* ``w2wtmp`` and ``w2wstage``: deleted - they were never published.
* ``w2wold``: put back under ``NAME`` when ``NAME`` is missing (the swap was
  killed between its two renames, so the command did not finish and the old
  output stays), deleted otherwise (the new one was published).
* ``w2wpublish``: its remaining entries are moved into place (every one was
  complete when it got that name, so the new output is finished), then it
  and its ``w2wreplaced`` folder are deleted.

Test hook: with ``W2WKIT_TEST_DIE_AFTER=k`` in the environment, the process
kills itself (``SIGKILL``) right after the ``k``-th low-level step (a file
or folder complete, a rename, an exchange, a removal) this module performs.
The variable is read once, at import; unset, a step costs one comparison.
``W2WKIT_TEST_NO_EXCHANGE=1`` disables the one-step exchange (to test the
rename-aside path on Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from w2wkit.errors import OUTPUT_EXISTS, FormatError

__all__ = [
    "atomic_entries",
    "atomic_path",
    "is_temporary",
    "recover",
    "recover_entries",
    "temp_path",
    "write_bytes",
]

TMP_TAG = "w2wtmp"
OLD_TAG = "w2wold"
STAGE_TAG = "w2wstage"
PUBLISH_TAG = "w2wpublish"
REPLACED_TAG = "w2wreplaced"

#: ``KIND-PID-TOKEN`` after ``.NAME.w2w`` (rest of a per-output temporary name).
_OUTPUT_LEFTOVER = re.compile(r"(tmp|old)-(\d+)-([0-9a-f]{8})")
#: A folder-entries temporary (inside the folder).
_ENTRIES_LEFTOVER = re.compile(r"\.w2w(stage|publish|replaced)-(\d+)-([0-9a-f]{8})$")
#: Any temporary of this module.
_ANY_TEMPORARY = re.compile(
    r"^\..*\.w2w(tmp|old)-\d+-[0-9a-f]{8}|^\.w2w(stage|publish|replaced)-\d+-[0-9a-f]{8}$"
)


def _env_int(name: str) -> int:
    try:
        return max(0, int(os.environ.get(name, "") or 0))
    except ValueError:
        return 0


_DIE_AFTER = _env_int("W2WKIT_TEST_DIE_AFTER")
_USE_EXCHANGE = sys.platform == "linux" and not os.environ.get("W2WKIT_TEST_NO_EXCHANGE")
_steps = 0


def _step() -> None:
    """One low-level step done (test hook: die after the k-th)."""
    global _steps
    if _DIE_AFTER:
        _steps += 1
        if _steps >= _DIE_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- system calls

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_renameat2_fn: object = None  # None: not looked up yet; False: unavailable


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or file system lacks it."""
    global _renameat2_fn
    if not _USE_EXCHANGE:
        return False
    if _renameat2_fn is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
            fn.argtypes += [ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2_fn = fn
        except (OSError, AttributeError):
            _renameat2_fn = False
    if _renameat2_fn is False:
        return False
    res = _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, refusing (FormatError) when ``dst`` exists."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise FormatError(OUTPUT_EXISTS, path=dst) from None
    if os.path.lexists(dst):
        raise FormatError(OUTPUT_EXISTS, path=dst)
    os.rename(src, dst)


def _fsync(path: Path, *, folder: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if folder:  # some systems cannot open folders: their metadata is synced with the files
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not folder or exc.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Sync a file, or every file and folder under a folder."""
    if not _is_dir(path):
        _fsync(path)
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            f = os.path.join(root, name)
            if not os.path.islink(f):
                _fsync(Path(f))
        _fsync(Path(root), folder=True)


def _is_dir(path: Path) -> bool:
    """A folder, not a link to one."""
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree; no error when it is gone."""
    try:
        if _is_dir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may still run here (unknown counts as running)."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


#: Public name: other modules tag their scratch space with pids too.
process_alive = _alive


def _token() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


# ----------------------------------------------------------------------------- names


def temp_path(final: str | os.PathLike[str], suffix: str = "", *, token: str | None = None) -> Path:
    """A fresh temporary name for ``final``: ``.NAME.w2wtmp-PID-TOKEN[SUFFIX]`` beside it.

    Parameters
    ----------
    final : str or os.PathLike
        The output the temporary belongs to.
    suffix : str
        Kept at the end (writers that pick a format by the suffix need it).
    token : str, optional
        ``PID-TOKEN`` to use (default: a new one for this process).

    Returns
    -------
    pathlib.Path
        A path that does not exist yet; :func:`recover` of ``final`` deletes
        it once this process has ended.
    """
    final = Path(final)
    return final.with_name(f".{final.name}.{TMP_TAG}-{token or _token()}{suffix}")


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is one of this module's temporaries."""
    return bool(_ANY_TEMPORARY.match(name))


def recover(path: str | os.PathLike[str]) -> list[str]:
    """Repair what killed writers of the output ``path`` left (see the module docstring).

    Parameters
    ----------
    path : str or os.PathLike
        An output file or folder.

    Returns
    -------
    list of str
        One line per action (``"removed NAME"``, ``"restored NAME"``).
    """
    final = Path(path)
    try:
        listing = os.listdir(final.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return _recover_output(final, listing)


def _recover_output(final: Path, listing: Iterable[str]) -> list[str]:
    prefix = f".{final.name}.w2w"
    done = []
    for entry in sorted(e for e in listing if e.startswith(prefix)):
        m = _OUTPUT_LEFTOVER.match(entry, len(prefix))
        if not m or _alive(int(m[2])):
            continue
        leftover = final.parent / entry
        if m[1] == "old" and not os.path.lexists(final):
            os.rename(leftover, final)  # the swap was cut between its renames: keep the old
            done.append(f"restored {final}")
        else:
            _remove(leftover)
            done.append(f"removed {leftover}")
    return done


# ----------------------------------------------------------------------------- one output


def _kind(path: Path) -> str:
    return "folder" if _is_dir(path) else "file"


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Move the complete ``tmp`` to ``final`` (see the module docstring)."""
    if not os.path.lexists(tmp):
        raise FormatError("the writer produced no output", path=final)
    exists = os.path.lexists(final)
    if exists and not overwrite:
        raise FormatError(OUTPUT_EXISTS, path=final)
    if exists and _kind(tmp) != _kind(final):
        raise FormatError(f"output exists and is a {_kind(final)}", path=final)
    _fsync_tree(tmp)
    _step()  # complete, not yet published
    if not _is_dir(tmp):
        if overwrite:
            os.replace(tmp, final)
        else:
            _rename_noreplace(tmp, final)
        _step()
    elif not exists:
        _rename_noreplace(tmp, final)
        _step()
    elif _renameat2(tmp, final, _RENAME_EXCHANGE):
        _step()  # final is the new folder; tmp holds the old one
        _remove(tmp)
        _step()
    else:
        aside = final.with_name(f".{final.name}.{OLD_TAG}-" + tmp.name.split(f".{TMP_TAG}-")[-1])
        os.rename(final, aside)
        _step()
        os.rename(tmp, final)  # the commit point
        _step()
        _remove(aside)
        _step()
    _fsync(final.parent, folder=True)


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, overwrite: bool = False, suffix: str = ""
) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place on success.

    The caller creates a file or a folder at the yielded path. Leftovers of
    killed writers of ``path`` are repaired first (:func:`recover`). On an
    exception the temporary is deleted and ``path`` is untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Final destination (file or folder).
    overwrite : bool
        Allow replacing an existing destination (of the same kind).
    suffix : str
        Suffix of the temporary name.

    Yields
    ------
    pathlib.Path
        ``.NAME.w2wtmp-PID-TOKEN[SUFFIX]`` in the same folder (not created).

    Raises
    ------
    FormatError
        When ``path`` exists and ``overwrite`` is false, or exists as the
        other kind (file or folder) of what was written.
    """
    final = Path(path)
    recover(final)  # first: an interrupted swap may put the old output back
    if os.path.lexists(final) and not overwrite:
        raise FormatError(OUTPUT_EXISTS, path=final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final, suffix)
    try:
        yield tmp
        _publish(tmp, final, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(tmp)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to the file ``path`` atomically; returns ``path``."""
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


# ----------------------------------------------------------------------------- entries of a folder


def recover_entries(folder: str | os.PathLike[str], names: Iterable[str] = ()) -> list[str]:
    """Repair what killed :func:`atomic_entries` writers of ``folder`` left.

    Parameters
    ----------
    folder : str or os.PathLike
        The output folder.
    names : iterable of str
        Entries whose own leftovers (:func:`recover`) are repaired too.

    Returns
    -------
    list of str
        One line per action.
    """
    folder = Path(folder)
    if not _is_dir(folder):
        return []
    listing = os.listdir(folder)
    done: list[str] = []
    dead: dict[str, dict[str, Path]] = {}
    for entry in listing:
        m = _ENTRIES_LEFTOVER.match(entry)
        if m and not _alive(int(m[2])):
            dead.setdefault(f"{m[2]}-{m[3]}", {})[m[1]] = folder / entry
    for token, parts in sorted(dead.items()):
        if "publish" in parts:  # every entry was complete: finish publishing them
            _finish(parts["publish"], folder, folder / f".{REPLACED_TAG}-{token}")
            done.append(f"published {parts['publish']}")
        for kind in ("stage", "replaced"):
            if kind in parts and os.path.lexists(parts[kind]):
                _remove(parts[kind])
                done.append(f"removed {parts[kind]}")
    if done:
        listing = os.listdir(folder)
    for name in names:
        done += _recover_output(folder / name, listing)
    return done


def _finish(publish: Path, folder: Path, replaced: Path) -> None:
    """Move every entry of ``publish`` into ``folder``, then delete both temporaries."""
    for name in sorted(os.listdir(publish)):
        src, dst = publish / name, folder / name
        if os.path.lexists(dst) and (_is_dir(src) or _is_dir(dst)):
            # a folder cannot replace or be replaced by os.replace: set the old one aside
            replaced.mkdir(exist_ok=True)
            _remove(replaced / name)
            os.rename(dst, replaced / name)
            _step()
        os.replace(src, dst)
        _step()
    _fsync(folder, folder=True)
    _remove(publish)
    _remove(replaced)
    _step()


@contextlib.contextmanager
def atomic_entries(
    folder: str | os.PathLike[str], names: Iterable[str], *, overwrite: bool = False
) -> Iterator[Path]:
    """Write several entries of ``folder`` as one output.

    Every name is checked up front: without ``overwrite`` the first that
    exists is refused, before anything is written. The caller writes the
    entries, under their final names, into the yielded folder; when it
    returns they are published together. A new ``folder`` is written as a
    whole and renamed into place; in an existing one, other files are left
    alone and a crash after the commit point is completed by the next write
    (see the module docstring).

    Parameters
    ----------
    folder : str or os.PathLike
        The output folder (created if missing).
    names : iterable of str
        The entries that will be written (plain names, no separators).
    overwrite : bool
        Replace existing entries of the same kind.

    Yields
    ------
    pathlib.Path
        The staging folder (exists, empty).

    Raises
    ------
    FormatError
        An entry exists (without ``overwrite``), ``folder`` is not a folder,
        or a written entry would replace one of the other kind.
    """
    folder = Path(folder)
    names = list(names)
    for name in names:
        if not name or os.sep in name or name in (".", "..") or is_temporary(name):
            raise FormatError(f"invalid output name {name!r}", path=folder)
    if os.path.lexists(folder) and not _is_dir(folder):
        raise FormatError("output exists and is not a folder", path=folder)
    if not os.path.lexists(folder):
        recover(folder)
    if not os.path.lexists(folder):
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            _step()
            yield tmp
        return
    recover_entries(folder, names)
    _check_clashes(folder, names, overwrite)
    token = _token()
    stage = folder / f".{STAGE_TAG}-{token}"
    stage.mkdir()
    _step()
    try:
        yield stage
        written = sorted(os.listdir(stage))
        _check_clashes(folder, written, overwrite)
        for name in written:
            if os.path.lexists(folder / name) and _kind(stage / name) != _kind(folder / name):
                raise FormatError(
                    f"output exists and is a {_kind(folder / name)}", path=folder / name
                )
        _fsync_tree(stage)
        _step()  # complete, not yet published
        publish = folder / f".{PUBLISH_TAG}-{token}"
        os.rename(stage, publish)  # the commit point
        _fsync(folder, folder=True)
        _step()
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(stage)
        raise
    _finish(publish, folder, folder / f".{REPLACED_TAG}-{token}")


def _check_clashes(folder: Path, names: Iterable[str], overwrite: bool) -> None:
    if overwrite:
        return
    for name in names:
        if os.path.lexists(folder / name):
            raise FormatError(OUTPUT_EXISTS, path=folder / name)
