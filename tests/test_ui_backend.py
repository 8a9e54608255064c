"""``w2wkit ui`` without a browser: upload checks, seed lists, the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from w2wkit.errors import FormatError, W2WError
from w2wkit.ui.backend import MAX_PIXELS, check_picture, check_upload


def test_uploads_are_checked_as_pictures(tmp_path: Path) -> None:
    from PIL import Image

    ok = tmp_path / "ok.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ok)
    assert check_picture(ok) == ok
    text = tmp_path / "face.png"
    text.write_text("<html>not a picture</html>")
    with pytest.raises(FormatError, match=r"face\.png.*not a picture"):
        check_picture(text)
    with pytest.raises(FormatError, match=r"at most 0\.0 MB"):
        check_upload(ok, 10, "picture")
    # a small file that decodes to a huge picture (a decompression bomb) is refused unread
    side = int(MAX_PIXELS**0.5) + 1
    bomb = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(bomb)
    assert bomb.stat().st_size < 2**20
    with pytest.raises(FormatError, match="pixels"):
        check_picture(bomb)
    with pytest.raises(W2WError, match="no picture uploaded"):
        check_picture(None)


def test_seed_lists() -> None:
    pytest.importorskip("gradio")
    from w2wkit.ui.app import parse_seeds

    assert parse_seeds("0-3") == (0, 1, 2, 3)
    assert parse_seeds("5, 7,9") == (5, 7, 9)
    for bad in ("", "a", "0-100", "1;2"):
        with pytest.raises(W2WError, match="seeds"):
            parse_seeds(bad)


def test_cli_ui_help_and_bad_limit() -> None:
    from click.testing import CliRunner

    from w2wkit.cli.main import cli

    res = CliRunner().invoke(cli, ["ui", "--help"])
    assert res.exit_code == 0 and "127.0.0.1" in res.output
    res = CliRunner().invoke(cli, ["ui", "--max-upload-mb", "0"])
    assert res.exit_code == 1 and "max-upload-mb" in res.output and "Traceback" not in res.output
