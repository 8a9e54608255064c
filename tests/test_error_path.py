"""The command line's one error path: one plain-text line and exit 1, whatever fails."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
from _spacehelpers import random_models
from click.testing import CliRunner

from w2wkit.cli.main import cli
from w2wkit.formats import write_adapter


def _invoke(args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def _one_line(res):
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    text = res.stderr.strip()
    assert text.startswith("error: ") and "\n" not in text, text
    assert "Traceback" not in res.output
    return text


@pytest.fixture
def lora(tmp_path):
    return write_adapter(random_models(1, seed=0)[0], tmp_path / "m.safetensors", format="kohya")


@pytest.mark.parametrize("name", ["x[/b]y.safetensors", "[bold]a[/bold].safetensors", "[red]"])
def test_markup_in_names_is_printed_as_text(tmp_path, name):
    bad = tmp_path / name
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not a safetensors file at all")
    text = _one_line(_invoke(["inspect", bad]))
    assert name in text  # nothing swallowed as markup, nothing crashed


def test_control_characters_never_reach_the_terminal(tmp_path):
    bad = tmp_path / "evil\x1b[2Jname.safetensors"
    bad.write_bytes(b"junk")
    text = _one_line(_invoke(["inspect", bad]))
    assert "\x1b" not in text and "evilname" in text.replace("[2J", "")


def _explode(*_a, **_k):
    raise RuntimeError("a bug [/b] in w2wkit")


def test_unexpected_error_is_one_line_without_debug(monkeypatch, lora):
    import w2wkit.cli.cmd_formats as mod

    monkeypatch.setattr(mod, "summarize", _explode)
    text = _one_line(_invoke(["inspect", lora]))
    assert "internal error: RuntimeError: a bug [/b] in w2wkit" in text
    assert "re-run with --debug" in text


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(monkeypatch, lora, how):
    import w2wkit.cli.cmd_formats as mod

    monkeypatch.setattr(mod, "summarize", _explode)
    if how == "flag":
        res = _invoke(["--debug", "inspect", lora])
    else:
        res = _invoke(["inspect", lora], env={"W2WKIT_DEBUG": "1"})
    assert isinstance(res.exception, RuntimeError)  # re-raised, so a traceback prints


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "disk is full"),
        (errno.EROFS, "read-only"),
        (errno.EACCES, "permission"),
        (errno.EEXIST, "--force"),
    ],
)
def test_os_errors_while_writing_are_one_line(monkeypatch, tmp_path, lora, code, words):
    import os

    import w2wkit.formats.kohya as kohya

    def failing(*_a, **_k):
        raise OSError(code, os.strerror(code), str(tmp_path / "out.safetensors"))

    monkeypatch.setattr(kohya, "write_safetensors", failing)
    text = _one_line(
        _invoke(["convert", lora, "--to", "kohya", "-o", tmp_path / "out.safetensors"])
    )
    assert "out.safetensors" in text and words in text


def test_output_under_a_file_is_one_line(tmp_path, lora):
    text = _one_line(_invoke(["convert", lora, "--to", "kohya", "-o", lora / "out.safetensors"]))
    assert "m.safetensors" in text


def test_real_process_prints_no_traceback(tmp_path):
    """The installed entry point, in its own process: one line on stderr, exit 1."""
    bad = tmp_path / "a[/b].safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00" * 7)
    proc = subprocess.run(
        [sys.executable, "-c", "from w2wkit.cli.main import main; main()", "inspect", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "a[/b].safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_library_messages_speak_of_parameters_and_the_cli_of_flags(tmp_path, lora):
    from w2wkit.errors import FormatError
    from w2wkit.formats import read_adapter

    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(FormatError) as info:  # the API: the parameter that allows it
        write_adapter(read_adapter(lora), out, format="kohya")
    assert "`overwrite=True`" in str(info.value) and "--force" not in str(info.value)
    text = _one_line(_invoke(["convert", lora, "--to", "kohya", "-o", out]))  # the CLI: its flag
    assert "--force" in text and "overwrite" not in text


def test_cli_wording_maps_references_to_the_invoked_commands_flags():
    import click

    from w2wkit.cli.common import cli_wording

    ctx = click.Context(cli)
    ctx.invoked_subcommand = "fit"
    assert cli_wording('use `representation="delta"`', ctx) == "use --representation delta"
    assert cli_wording("pass `overwrite=True`", ctx) == "pass --force"
    assert cli_wording("parameter n_components: too big", ctx, "n_components") == (
        "option -k/--components: too big"
    )
    assert cli_wording("set `no_such_thing=3`", ctx) == "set `no_such_thing=3`"


def test_out_of_memory_names_the_file(monkeypatch, lora):
    import w2wkit.formats.registry as registry

    def exhausted(*_a, **_k):
        raise MemoryError

    monkeypatch.setattr(registry, "detect_format", exhausted)
    text = _one_line(_invoke(["inspect", lora]))
    assert "m.safetensors" in text and "out of memory" in text


def test_notes_carry_no_control_characters(capsys):
    from w2wkit.cli.common import note

    note("label table\x1b[2J at evil\x07path skipped")
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "evilpath" in err


def test_a_full_disk_under_the_row_cache_names_it(monkeypatch, tmp_path):
    """ENOSPC while the scan writes the row cache: one line naming the cache file (the
    disk that filled up), no space written."""
    import os

    import w2wkit.collection as collection

    folder = tmp_path / "loras"
    for i, ad in enumerate(random_models(6, seed=3)):
        write_adapter(ad, folder / f"m{i}.safetensors", format="kohya")
    monkeypatch.setattr(collection, "memory_budget", lambda: 1000)  # rows go to disk
    monkeypatch.setattr(collection.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def full(self, view, at):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(collection._RowFile, "_write_all", full)
    text = _one_line(_invoke(["fit", folder, "-o", tmp_path / "sp", "-k", "2"]))
    assert "rows.npy" in text and "disk is full" in text, text
    assert not (tmp_path / "sp").exists()
    assert not any((tmp_path / "tmp").iterdir())  # the row cache removed
