"""``w2wkit render``: grids from a pipeline folder and LoRA files; bad input."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402

from w2wkit.cli.cmd_render import parse_seeds, parse_size  # noqa: E402
from w2wkit.cli.main import cli  # noqa: E402
from w2wkit.errors import W2WError  # noqa: E402
from w2wkit.formats import write_adapter  # noqa: E402
from w2wkit.testing import (  # noqa: E402
    attention_modules,
    module_shapes,
    random_adapter,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_pipe, tiny_pipe_dir):
    root = tmp_path_factory.mktemp("render-cli")
    shapes = module_shapes(tiny_pipe, attention_modules(tiny_pipe))
    files = []
    for i in range(3):
        f = root / "loras" / f"m{i}.safetensors"
        f.parent.mkdir(exist_ok=True)
        write_adapter(random_adapter(shapes, seed=i, scale=0.5), f, format="diffusers")
        files.append(f)
    edit = root / "edit.safetensors"
    write_adapter(random_adapter(shapes, seed=9, scale=0.5), edit, format="kohya")
    other = root / "other.safetensors"
    odd = dict(shapes)
    odd["unet.down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q"] = (16, 16)
    write_adapter(random_adapter(odd, seed=5), other, format="diffusers")
    return {"root": root, "pipe": tiny_pipe_dir, "files": files, "edit": edit, "other": other}


def _run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_render_grid(world, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    args = ["render", "--base", str(world["pipe"]), str(world["root"] / "loras")]
    args += ["-p", "a photo of sks person", "-p", "a dog", "--seeds", "0-2", "--steps", "2"]
    res = _run([*args, "-o", str(out), "--device", "cpu", "--include-base", "--json"])
    assert res.exit_code == 0, res.output
    assert '"images": 24' in res.output  # (base + 3 models) x 2 prompts x 3 seeds
    img = np.asarray(Image.open(out))
    assert img.shape[0] >= 4 * 96 and img.shape[1] >= 6 * 96
    # existing output refused without --force, accepted with it
    res = _run([*args, "-o", str(out)])
    assert res.exit_code == 1 and "exists" in res.output
    assert _run([*args, "-o", str(out), "--force"]).exit_code == 0


def test_render_delayed_injection(world, tmp_path):
    out = tmp_path / "edit.png"
    args = ["render", "--base", str(world["pipe"]), str(world["files"][0]), "--steps", "2"]
    res = _run([*args, "--edited", str(world["edit"]), "--inject-after", "800", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file()
    res = _run([*args, "--edited", str(world["edit"]), "-o", str(out), "--force"])
    assert res.exit_code == 1 and "--inject-after" in res.output
    res = _run([*args, "--inject-after", "800", "-o", str(out), "--force"])
    assert res.exit_code == 1 and "--edited" in res.output


def test_render_bad_input(world, tmp_path):
    out = tmp_path / "g.png"
    base = ["render", "--base", str(world["pipe"]), "--steps", "1", "-o", str(out)]
    # modules absent from the pipeline: named, one line, no file left
    res = _run([*base, str(world["other"])])
    assert res.exit_code == 1
    assert "not in the pipeline" in res.output and "down_blocks.9" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    # adapters with different layouts
    res = _run([*base, str(world["files"][0]), str(world["other"])])
    assert res.exit_code == 1 and "different modules" in res.output
    # unreadable pipeline folder
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _run(["render", "--base", str(empty), str(world["files"][0]), "-o", str(out)])
    assert res.exit_code == 1 and "model_index.json" in res.output
    res = _run([*base, str(world["files"][0]), "--seeds", "a,b"])
    assert res.exit_code == 1 and "seed" in res.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "empty"]


def test_parse_helpers():
    assert parse_seeds("0,1, 5-7") == [0, 1, 5, 6, 7]
    assert parse_size("64") == (64, 64)
    assert parse_size("32x48") == (32, 48)
    assert parse_size(None) == (None, None)
    for bad in ("", "3-1", "x"):
        with pytest.raises(W2WError):
            parse_seeds(bad)
    with pytest.raises(W2WError):
        parse_size("big")
