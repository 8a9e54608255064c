"""Every class of bad input in docs/reliability.md is refused as promised."""

from __future__ import annotations

import os
import threading

import pytest
from _bad_inputs import CASES
from click.testing import CliRunner

from w2wkit.cli.main import cli


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_cleanly(tmp_path, case):
    args, outputs = case.build(tmp_path)
    fifos = [a for a in args if isinstance(a, os.PathLike) and _is_fifo(a)]
    opened: list[str] = []
    stop = threading.Event()
    watchers = [
        threading.Thread(target=_unblock, args=(f, opened, stop), daemon=True) for f in fifos
    ]
    for w in watchers:
        w.start()
    try:
        res = CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        stop.set()
        for w in watchers:
            w.join()
    assert not opened, f"a FIFO was opened for reading: {opened}"
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    err = res.stderr.strip()
    assert "Traceback" not in res.output
    assert res.exit_code == case.exit_code, f"exit {res.exit_code}: {res.output}"
    if case.exit_code == 1:
        assert err.startswith("error: ") and "\n" not in err, err
        assert "internal error" not in err, err
        for frag in case.expect:
            assert frag.lower() in err.lower(), (frag, err)
    else:
        assert case.warn in err, err
    for path in outputs:
        assert not path.exists(), path
    # no temporary leftovers next to the outputs
    for path in outputs:
        if path.parent.exists():
            assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}")]


def _is_fifo(path) -> bool:
    import stat

    try:
        return stat.S_ISFIFO(os.lstat(path).st_mode)
    except OSError:
        return False


def _unblock(fifo, opened: list[str], stop: threading.Event) -> None:
    """Open ``fifo`` for writing as soon as a reader has it open (noting that), so a
    command that wrongly reads the FIFO ends instead of blocking the test forever."""
    while not stop.wait(0.05):
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody reads it
            continue
        opened.append(str(fifo))
        os.close(fd)
        return
