"""Degenerate numbers in the space commands: refused naming the option, nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from _spacehelpers import random_models
from click.testing import CliRunner

from w2wkit import directions as D
from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.cli.main import cli
from w2wkit.directions import Direction
from w2wkit.errors import DirectionError, FormatError, SpaceError
from w2wkit.formats import write_adapter
from w2wkit.space import WeightSpace


@pytest.fixture(scope="module")
def spaces(tmp_path_factory):
    root = tmp_path_factory.mktemp("degenerate")
    out = {}
    for rep in ("factors", "delta"):
        space = WeightSpace(3, representation=rep, solver="exact").fit(random_models(6, seed=5))
        space.directions_["male"] = Direction("male", np.eye(3)[0], "lstsq", proj_std=2.0)
        out[rep] = (space, space.save(root / rep))
    return out


def _cli(args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _one_line(res):
    assert res.exit_code == 1, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def _rank0(ad: Adapter) -> Adapter:
    return Adapter(
        {
            m: LoraLayer(
                down=np.zeros((0, layer.down.shape[1]), np.float32),
                up=np.zeros((layer.up.shape[0], 0), np.float32),
                alpha=1.0,
            )
            for m, layer in ad.items()
        }
    )


@pytest.mark.parametrize("rep", ["factors", "delta"])
def test_fit_refuses_rank_zero_layers(rep):
    models = random_models(5, seed=1)
    models[2] = _rank0(models[2])
    with pytest.raises(FormatError, match=r"model_0002: key 'unet\..*': degenerate .* rank 0"):
        WeightSpace(2, representation=rep).fit(models)


def test_cli_fit_refuses_a_rank_zero_file(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    models = random_models(5, seed=1)
    models[3] = _rank0(models[3])
    for i, ad in enumerate(models):
        try:
            write_adapter(ad, folder / f"m{i}.safetensors", format="kohya")
        except FormatError:
            pytest.skip("the writer already refuses rank-0 layers")
    res = _cli(["fit", folder, "-o", tmp_path / "sp"])
    line = _one_line(res)
    assert "m3.safetensors" in line and "rank 0" in line
    assert not (tmp_path / "sp").exists()


def test_fit_k_zero_names_the_option(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    for i, ad in enumerate(random_models(4, seed=1)):
        write_adapter(ad, folder / f"m{i}.safetensors", format="kohya")
    line = _one_line(_cli(["fit", folder, "-o", tmp_path / "sp", "-k", "0"]))
    assert "option -k/--components: must be a positive integer, got 0" in line


@pytest.mark.parametrize("rank", [0, -1])
def test_sample_rank_zero_is_refused(spaces, tmp_path, rank):
    space, path = spaces["delta"]
    with pytest.raises(SpaceError, match=r"parameter rank: must be an integer >= 1"):
        space.inverse_transform(space.sample(1, seed=0), rank=rank)
    out = tmp_path / "samples"
    line = _one_line(_cli(["sample", "--space", path, "-o", out, "--rank", rank, "--seed", "0"]))
    assert f"option --rank: must be an integer >= 1, got {rank}" in line
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("temperature", ["nan", "inf", "-1"])
def test_sample_temperature_names_the_option(spaces, tmp_path, temperature):
    _, path = spaces["factors"]
    out = tmp_path / "samples"
    line = _one_line(_cli(["sample", "--space", path, "-o", out, "--temperature", temperature]))
    assert "option --temperature: must be a finite number >= 0" in line


@pytest.mark.parametrize("value", ["1e300", "-1e5", "inf", "nan", "1e400"])
def test_apply_refuses_absurd_strengths(spaces, tmp_path, value):
    _, path = spaces["factors"]
    out = tmp_path / "edited.safetensors"
    line = _one_line(_cli(["apply", "--space", path, "--edit", f"male={value}", "-o", out]))
    assert "key 'male'" in line and "strength" in line
    assert not out.exists()


@pytest.mark.parametrize("rep", ["factors", "delta"])
def test_an_edit_that_overflows_is_refused_before_writing(spaces, rep):
    space, _ = spaces[rep]
    huge = Direction("huge", np.eye(3)[1], "lstsq", proj_std=1e300)
    space.directions_["huge"] = huge
    try:
        with pytest.raises(
            DirectionError, match=r"key 'huge': the edit huge=1000 gives non-finite"
        ):
            D.edit(space, None, {"huge": 1000})
        with pytest.raises(DirectionError, match="non-finite"):
            D.edit(space, random_models(1, seed=9)[0], {"huge": 1000})
    finally:
        del space.directions_["huge"]
    assert np.isfinite(
        D.edit(space, None, {"male": 1.5})[next(iter(space.layout_.modules))].up
    ).all()


@pytest.mark.parametrize("value", ["1.5", None, True, [1.5]])
def test_the_api_takes_numbers_only(spaces, value):
    """``edit()`` takes numbers; text is parsed once, by the caller (the CLI's type)."""
    space, _ = spaces["factors"]
    with pytest.raises(
        DirectionError, match=r"parameter strengths: key 'male': strength .* is not a number"
    ):
        D.edit(space, None, {"male": value})
    assert D.edit(space, None, {"male": np.float32(1.5)}).metadata["w2wkit.edits"]


def test_the_cli_parses_a_strength_once(spaces, tmp_path, monkeypatch):
    import w2wkit.edits as E

    calls = []
    real = E.parse_strength
    monkeypatch.setattr(E, "parse_strength", lambda *a, **k: calls.append(a) or real(*a, **k))
    _, path = spaces["factors"]
    out = tmp_path / "edited.safetensors"
    res = _cli(["apply", "--space", path, "--edit", "male=1.5", "-o", out])
    assert res.exit_code == 0, res.output
    assert calls == [("1.5", "male")]
