"""``w2wkit ui`` without a browser: upload checks, seed lists, the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def test_export_for_a_loader_writes_its_format(
    micro_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download's "for the loader" choice: that loader's format, the same deltas."""
    import json

    from w2wkit.formats.registry import read_adapter
    from w2wkit.ui.backend import Session
    from w2wkit.ui.open import open_backend
    from w2wkit.world.shipped import World

    monkeypatch.setenv("W2WKIT_CACHE", str(tmp_path / "cache"))
    backend = open_backend(world=World(micro_world / "shipped"), calibrate=False, device="cpu")
    session = Session()
    backend.sample(session, 3, 1.0)
    name = backend.directions()[0][0]
    plain = backend.export(session, {name: 1.0}, format="diffusers")
    comfy = backend.export(session, {name: 1.0}, target="comfyui")
    a, b = read_adapter(plain[0]), read_adapter(comfy[0])
    assert a.format == "diffusers" and b.format == "kohya"  # ComfyUI reads kohya names whole
    for m, layer in a.layers.items():
        np.testing.assert_allclose(b.layers[m].delta(), layer.delta(), atol=1e-6)
    meta = json.loads(Path(comfy[1]).read_text())
    assert meta["for"] == "comfyui" and meta["format"] == "kohya"


def test_a_slider_move_renders_only_the_edited_pictures_exactly(
    micro_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A move: one render of the edited model, the renderer's pixels; a value seen before: none."""
    from w2wkit.ui.backend import Session, View, _strip
    from w2wkit.ui.open import open_backend
    from w2wkit.world.shipped import World

    monkeypatch.setenv("W2WKIT_CACHE", str(tmp_path / "cache"))
    backend = open_backend(world=World(micro_world / "shipped"), calibrate=False, device="cpu")
    calls: list[int] = []
    render = backend.renderer.render

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return render(*a, **k)

    monkeypatch.setattr(backend.renderer, "render", counted)
    session, view = Session(), View(prompt=backend.prompt, seeds=(0, 1), steps=2)
    backend.sample(session, 3, 1.0)
    name = backend.directions()[0][0]
    backend.pictures(session, {name: 0.0}, view=view)
    assert len(calls) == 1  # the original, kept
    got = backend.edited_strip(session, {name: 1.0}, view=view)
    assert len(calls) == 2  # the edited model only
    ref = render(
        [backend.edited(session, {name: 1.0})],
        prompts=view.prompt,
        seeds=[0, 1],
        steps=2,
        guidance=view.guidance,
    )
    np.testing.assert_array_equal(got, _strip(ref.images[0, 0]))  # the renderer's pixels
    other = backend.edited_strip(session, {name: -1.0}, view=view)
    assert len(calls) == 3 and not np.array_equal(other, got)
    # back to a value shown before: from the session's cache, no render
    np.testing.assert_array_equal(backend.edited_strip(session, {name: 1.0}, view=view), got)
    backend.probabilities(session, {name: 1.0}, view=view)
    assert len(calls) == 3
    # another model forgets the pictures of the previous one
    backend.sample(session, 4, 1.0)
    backend.edited_strip(session, {name: 1.0}, view=view)
    assert len(calls) == 5
