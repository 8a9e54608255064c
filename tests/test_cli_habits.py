"""CLI habits: one way to name the space, -q/-v everywhere, --for notes, the variance plot."""

from __future__ import annotations

import numpy as np
import pytest
from _spacehelpers import random_models
from click.testing import CliRunner

from w2wkit.cli.cmd_space import variance_figure, variance_marks
from w2wkit.cli.main import cli
from w2wkit.formats import read_adapter, write_adapter
from w2wkit.testing import random_adapter


def _walk(group, prefix=()):
    import click

    for name in group.list_commands(None):
        cmd = group.get_command(None, name)
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, (*prefix, name))


def test_every_command_takes_quiet_and_verbose():
    missing = [
        " ".join(path)
        for path, cmd in _walk(cli)
        if not {"-q", "--quiet", "-v", "--verbose"}
        <= {o for p in cmd.params for o in getattr(p, "opts", [])}
    ]
    assert not missing, missing


def test_every_command_that_reads_a_space_names_it_with_space():
    reads = ["info", "directions", "project", "sample", "apply", "invert"]
    for name in reads:
        cmd = cli.get_command(None, name)
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert "--space" in opts, name


@pytest.fixture
def space_dir(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    for i, ad in enumerate(random_models(8, seed=4)):
        write_adapter(ad, folder / f"m{i}.safetensors", format="kohya")
    out = tmp_path / "faces"
    res = CliRunner().invoke(cli, ["-q", "fit", str(folder), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout == ""  # -q: no result line, no progress
    return out


def test_info_and_directions_take_space_option(space_dir, tmp_path):
    run = CliRunner().invoke
    a = run(cli, ["info", "--space", str(space_dir), "--plot", str(tmp_path / "a.png")])
    b = run(cli, ["info", str(space_dir), "--plot", str(tmp_path / "b.png")])
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    assert "components for 90% / 99%" in a.output
    res = run(cli, ["info", str(space_dir), "--space", str(tmp_path / "other")])
    assert res.exit_code == 2 and "two spaces given" in res.output
    res = run(cli, ["directions", "--space", str(space_dir), "--list"])
    assert res.exit_code == 1 and str(space_dir) in res.stderr  # read that space
    assert "no directions" in res.stderr and "--space SPACE" in res.stderr
    res = run(cli, ["info", "-q", "--space", str(space_dir), "--plot", str(tmp_path / "c.png")])
    assert res.exit_code == 0 and res.stdout == ""
    assert (tmp_path / "c.png").is_file()
    res = run(cli, ["info", "--space", str(space_dir), "--plot", str(tmp_path / "d.png")])
    assert "representation" in res.stdout  # -q of an earlier run does not stick


def test_variance_marks_and_figure():
    ratio = np.array([0.5, 0.3, 0.1, 0.05, 0.04, 0.01])
    assert variance_marks(ratio) == {0.9: 3, 0.99: 5}
    assert variance_marks(np.array([0.5, 0.2])) == {}
    fig = variance_figure(ratio, 40, title="faces")
    ax = fig.axes[0]
    assert "N=40" in ax.get_title() and "k=6" in ax.get_title() and "faces" in ax.get_title()
    texts = {t.get_text() for t in ax.texts}
    assert texts == {"90%: 3", "99%: 5"}
    assert ax.get_xscale() == "linear"
    big = variance_figure(np.full(2000, 1 / 2000), 10_000)
    assert big.axes[0].get_xscale() == "log" and "k=2,000" in big.axes[0].get_title()


def test_convert_for_notes_and_folds(tmp_path):
    shapes = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320),
        "unet.conv_in": (320, 4, 3, 3),
    }
    ad = random_adapter(
        shapes, rank=2, alpha={m: a for m, a in zip(shapes, (1.0, 8.0), strict=True)}
    )
    src = tmp_path / "in.safetensors"
    write_adapter(ad, src, format="diffusers")
    run = CliRunner().invoke
    out = tmp_path / "k.safetensors"
    res = run(cli, ["convert", str(src), "--for", "kohya-scripts", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "folded" in res.stderr and "--keep-alphas" in res.stderr
    assert "sd-scripts" in res.stderr and "unet.conv_in" in res.stderr
    back = read_adapter(out)
    assert len({la.alpha for la in back.layers.values()}) == 1
    for m, la in ad.items():
        np.testing.assert_allclose(back[m].delta(), la.delta(), rtol=1e-5, atol=1e-8)
    res = run(cli, ["convert", str(src), "--for", "comfyui", "--keep-alphas", "-o", str(out)])
    assert res.exit_code == 1 and "exists" in res.stderr
    res = run(
        cli,
        ["convert", str(src), "--for", "comfyui", "--keep-alphas", "-o", str(out), "--force"],
    )
    assert res.exit_code == 0 and "folded" not in res.stderr
    assert {la.alpha for la in read_adapter(out).layers.values()} == {1.0, 8.0}
    res = run(
        cli,
        [
            "convert",
            str(src),
            "--to",
            "diffusers",
            "--for",
            "comfyui",
            "-o",
            str(tmp_path / "d.safetensors"),
        ],
    )
    assert res.exit_code == 0
    assert "ComfyUI" in res.stderr and "to_q" in res.stderr
    res = run(cli, ["convert", str(src), "-o", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2 and "--to FORMAT or --for LOADER" in res.output


@pytest.mark.parametrize(("target", "fmt"), [("comfyui", "kohya"), ("diffusers", "diffusers")])
def test_sample_for_a_loader_writes_its_format(space_dir, tmp_path, target, fmt):
    out = tmp_path / "samples"
    res = CliRunner().invoke(
        cli, ["sample", "--space", str(space_dir), "-n", "2", "-o", str(out), "--for", target]
    )
    assert res.exit_code == 0, res.output
    assert read_adapter(out / "sample_0001.safetensors").format == fmt
