"""``w2wkit ui --base SDXL``: the page's Python callbacks on the tiny SDXL pipeline and an
SDXL-layout space (no browser): sample, slider edit, invert a picture, download."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("gradio")

from w2wkit.formats.registry import read_adapter
from w2wkit.testing import attention_modules, module_shapes, random_adapter

PROMPT = "a photo of sks person"


@pytest.fixture(scope="module")
def xl_space(tiny_sdxl_pipe, tmp_path_factory) -> Path:
    """A saved space of 8 random LoRAs of the tiny SDXL UNet's attention, one direction."""
    from w2wkit.directions import fit_directions
    from w2wkit.space import WeightSpace

    shapes = module_shapes(tiny_sdxl_pipe, attention_modules(tiny_sdxl_pipe, ("to_q", "to_v")))
    ads = [random_adapter(shapes, rank=1, seed=i, scale=2.0) for i in range(8)]
    space = WeightSpace(4).fit(ads)
    fit_directions(space, {"red": np.array([0, 1, 0, 1, 1, 0, 1, 0], float)}, cv=2)
    out = tmp_path_factory.mktemp("ui-xl") / "space"
    space.save(out)
    return out


@pytest.fixture(scope="module")
def page(xl_space, tiny_sdxl_pipe_dir, tmp_path_factory):
    """The backend (no shipped world) and the page's callbacks by their trigger's elem_id."""
    from w2wkit.ui.app import build_app
    from w2wkit.ui.open import open_backend

    mp = pytest.MonkeyPatch()
    mp.setenv("W2WKIT_WORLD", str(tmp_path_factory.mktemp("no-world")))
    try:
        backend = open_backend(xl_space, tiny_sdxl_pipe_dir, prompt=PROMPT, device="cpu")
    finally:
        mp.undo()
    app = build_app(backend)
    fns = {}
    for bf in app.fns.values():
        for block_id, event in bf.targets:
            elem = getattr(app.blocks.get(block_id), "elem_id", None)
            if elem and bf.fn is not None:
                fns.setdefault((elem, event), bf)
    return backend, fns


def _call(bf, *args, **kw):
    """Run a callback; its outputs by the elem_id (or label) of their component."""
    out = bf.fn(*args, **kw)
    return {(getattr(c, "elem_id", None) or getattr(c, "label", None) or "state"): v
            for c, v in out.items()}  # fmt: skip


def _view(red=0.0, inject=1000):
    # prompt, seeds, steps, guidance, keep, injection step, one slider per direction
    return (PROMPT, "0,1", 2, 3.0, [], inject, red)


def test_sdxl_page_samples_edits_inverts_and_downloads(page, tiny_sdxl_pipe, tmp_path):
    from PIL import Image

    from w2wkit.testing import unet_weights
    from w2wkit.ui.backend import Session

    backend, fns = page
    assert backend.renderer.sdxl
    assert [n for n, _ in backend.directions()] == ["red"]
    session = Session()
    # sample -> pictures of the model (2 seeds of 16 px, side by side, enlarged)
    out = _call(fns[("sample", "click")], session, 3, 1.0, *_view())
    assert "sampled model" in out["status"], out["status"]
    a, b = out["original"], out["edited"]
    assert a.dtype == np.uint8 and a.shape[0] >= 128 and a.shape == b.shape
    np.testing.assert_array_equal(a, b)  # no edit yet
    # a slider moved -> only the edited pictures come back (the original ones stay on the page)
    moved = _call(fns[("dir-red", "release")], session, *_view(red=3.0))
    assert "Error" not in str(moved.get("status", "")), moved
    assert "original" not in moved
    assert np.abs(moved["edited"].astype(int) - a.astype(int)).max() > 0
    # delayed injection: the edited model for the late steps only -> other pictures again
    late = _call(fns[("dir-red", "release")], session, *_view(red=3.0, inject=500))
    assert np.abs(late["edited"].astype(int) - moved["edited"].astype(int)).max() > 0
    # invert an uploaded picture (tiny settings; not square: centre-cropped to 16x16)
    pic = tmp_path / "face.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(pic)
    seen: list[tuple[int, int]] = []

    def progress(done, desc=""):
        seen.append(done)

    inv = _call(
        fns[("invert", "click")], session, str(pic), 3, 0, True, *_view(), progress=progress
    )
    assert "inverted picture face.png: 3 steps" in inv["status"], inv["status"]
    assert "resized" in inv["status"] and seen and seen[-1] == (3, 3)
    assert np.isfinite(session.model.layers[next(iter(session.model.layers))].up).all()
    # download the edited model: it loads in w2wkit and in diffusers' SDXL pipeline
    got = _call(fns[("download", "click")], session, "kohya", "any (the format above)",
                *_view(red=2.0))  # fmt: skip
    assert "wrote 2 files" in got["status"], got["status"]
    lora = next(p for p in got["files"] if p.endswith(".safetensors"))
    ad = read_adapter(lora)
    want = backend.edited(session, {"red": 2.0})
    for m, layer in want.items():
        np.testing.assert_allclose(ad.layers[m].delta(), layer.delta(), atol=1e-5)
    pipe = copy.deepcopy(tiny_sdxl_pipe)
    mods = list(ad.layers)
    before = unet_weights(pipe, mods)
    pipe.load_lora_weights(lora, adapter_name="ui")
    pipe.fuse_lora(adapter_names=["ui"])
    after = unet_weights(pipe, mods)
    for m in mods:
        delta = ad.layers[m].delta().astype(np.float64)
        assert np.abs(after[m] - before[m] - delta).max() <= 1e-4 * np.abs(delta).max(), m


def test_sdxl_page_shows_bad_uploads_as_one_line(page, tmp_path):
    from w2wkit.ui.backend import Session

    _, fns = page
    text = tmp_path / "face.png"
    text.write_text("not a picture")
    out = _call(fns[("invert", "click")], Session(), str(text), 2, 0, False, *_view(),
                progress=lambda *a, **k: None)  # fmt: skip
    assert out["status"].startswith("**Error:**") and "not a picture" in out["status"]
    assert set(out) == {"status"}
