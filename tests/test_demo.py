"""``w2wkit demo``: runs at its default settings on whatever world this checkout has."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from w2wkit.cli.main import cli
from w2wkit.evaluation import shipped_world_available

HAS_WORLD = shipped_world_available()


def test_demo_synthetic(tmp_path: Path) -> None:
    """Without a shipped world this is the default demo (and it says so); else --synthetic."""
    out = tmp_path / "demo"
    (out / "images").mkdir(parents=True)  # an old report: --force replaces it whole
    (out / "images" / "old_grid.png").write_bytes(b"old")
    (out / "report.html").write_text("old")
    args = ["demo", "-o", str(out), "--force"] + (["--synthetic"] if HAS_WORLD else [])
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert not (out / "images" / "old_grid.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary left
    if not HAS_WORLD:
        assert "synthetic demo" in r.output  # it says it fell back
    assert f"report: {out / 'report.html'}" in r.output.replace("\n", "")
    res = json.loads((out / "demo.json").read_text())
    # calibrated edits: each direction's projection moved by exactly its strength (in stds)
    for name, st in res["edit"]["strengths"].items():
        assert res["edit"]["moved_std"][name] == pytest.approx(st, rel=1e-6)
    # planted: 24-dimensional signal, so 24 components hold nearly all the variance
    assert res["explained_variance_first_24"] > 0.95
    assert len(list((out / "exported").glob("*.safetensors"))) == 5
    html = (out / "report.html").read_text()
    assert "No miniature world" in html and "explained_variance.png" in html
    assert (out / "images" / "explained_variance.png").stat().st_size > 0
    # the exported files read back as kohya LoRAs of the SD1.5 layout
    from w2wkit.formats import read_adapter

    ad = read_adapter(out / "exported" / "sample_0.safetensors")
    assert ad.format == "kohya" and len(ad.layers) == 64


@pytest.mark.slow
@pytest.mark.skipif(not HAS_WORLD, reason="no shipped miniature world in this checkout")
def test_demo_default_world(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    r = CliRunner().invoke(cli, ["demo", "-o", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "demo.json").read_text())
    for name in ("samples.png", "edits.png", "inversion.png", "explained_variance.png"):
        assert (out / "images" / name).stat().st_size > 0
    assert len(list((out / "loras").glob("*.safetensors"))) >= 4 + 3 + 1
    loss0, loss1 = res["inversion"]["loss_first_last"]
    assert np.isfinite(loss0) and np.isfinite(loss1)
    assert "report:" in r.output


def test_demo_synthetic_flag_and_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = CliRunner().invoke(cli, ["demo", "--synthetic", "-o", str(out)])
    assert r.exit_code == 1 and "output exists (pass --force" in r.output, r.output
    assert "Traceback" not in r.output and (out / "keep.txt").read_text() == "x"


def test_demo_image_unreadable_on_a_micro_world(tmp_path: Path, micro_world: Path) -> None:
    """The fast lane's version of the next test: the micro world (9 LoRAs) loads in a second."""
    (tmp_path / "me.png").write_bytes(b"nope")
    args = ["demo", "--world", str(micro_world / "shipped"), "--image", str(tmp_path / "me.png")]
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "cannot read" in r.output and "me.png" in r.output, r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


# with the shipped world this loads its 1,000 LoRAs first (about 40 s on one CPU core)
@(pytest.mark.slow if HAS_WORLD else lambda f: f)
def test_demo_image_needs_a_world(tmp_path: Path) -> None:
    (tmp_path / "me.png").write_bytes(b"nope")
    args = ["demo", "--image", str(tmp_path / "me.png"), "-o", str(tmp_path / "o")]
    if HAS_WORLD:
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1 and "cannot read" in r.output
    else:
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1 and "--image needs a miniature world" in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_demo_first_screen_panel(eval_micro_world: Path, tmp_path: Path) -> None:
    """The report opens on a sample, the best edit and an inversion: large pictures, captions."""
    import re

    from PIL import Image

    from w2wkit import evaluation as E
    from w2wkit.demo import DemoSettings, run_demo

    w = E.load_eval_world(eval_micro_world)
    tiny = DemoSettings(n_components=6, inversion_steps=3, render_steps=2, seeds=2)
    res = run_demo(tmp_path / "d", world=w, settings=tiny, log=None, progress=False)
    html = (tmp_path / "d" / "report.html").read_text()
    body = html.split("<body>", 1)[1]
    # the panel comes first, before any other section
    assert body.index("class=panel") < body.index("<h2>")
    figs = re.findall(r"<figure><img src=\"([^\"]+)\"[^>]*><figcaption>(.*?)</figcaption>", body)
    assert [f for f, _ in figs] == [
        "images/first_sample.png",
        "images/first_edit.png",
        "images/first_inversion.png",
    ]
    caps = [c for _, c in figs]
    best = res["first_screen"]["edit"]
    assert "sampled" in caps[0] and "2 seeds" in caps[0]
    # the edit's caption carries its classifier probabilities and ID score, as measured
    assert best["edit"] in caps[1] and f"{best['id_score']:.2f}" in caps[1]
    assert f"{best['p_before']:.2f} before, {best['p_after']:.2f} after" in caps[1]
    assert best["edit"] in [r[0] for r in res["edits"]["rows"]]
    inv = res["inversion"]
    assert "inversion" in caps[2].lower() and f"{inv['id_score']:.2f}" in caps[2]
    for f, _ in figs:  # large enough to judge: each at least 256 px wide
        with Image.open(tmp_path / "d" / f) as im:
            assert im.width >= 256, (f, im.size)
    # the script that takes docs/demo.png: the first screen shows the three figures
    import shutil

    if shutil.which("chromium") or shutil.which("chromium-browser"):
        import importlib.util

        root = Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location(
            "demo_screenshot", root / "scripts" / "demo_screenshot.py"
        )
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        shot = mod.screenshot(tmp_path / "d", tmp_path / "shot.png")
        with Image.open(shot) as im:
            assert im.size == (1280, 900)
            px = np.asarray(im.convert("RGB"))
        # the panel's pictures are on it: many non-white, non-grey pixels in the top half
        top = px[: 900 // 2].astype(int)
        coloured = (np.ptp(top, axis=2) > 20).mean()
        assert coloured > 0.02, coloured
