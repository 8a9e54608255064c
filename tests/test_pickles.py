"""No pickled code runs, under any flag: crafted LoRA pickles given to every reading command."""

from __future__ import annotations

import pytest
from _spacehelpers import random_models
from click.testing import CliRunner

from w2wkit.cli.main import cli
from w2wkit.formats import write_adapter

torch = pytest.importorskip("torch")


class _Plant:
    """A pickle payload that would create ``target`` if its code ever ran."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').close()",))


@pytest.fixture(params=["whole", "inside-dict", "legacy"])
def planted(request, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    for i, ad in enumerate(random_models(3, seed=1)):
        write_adapter(ad, folder / f"m{i}.safetensors", format="kohya")
    target = tmp_path / "PWNED"
    payload = _Plant(target)
    if request.param == "inside-dict":
        payload = {"lora_unet_x.lora_down.weight": torch.zeros(1, 4), "evil": _Plant(target)}
    torch.save(
        payload, folder / "evil.pt", _use_new_zipfile_serialization=request.param != "legacy"
    )
    return folder, target


@pytest.mark.parametrize(
    "cmd",
    [
        ["inspect", "{f}/evil.pt", "--allow-pickle"],
        ["inspect", "{f}", "--allow-pickle"],
        ["convert", "{f}/evil.pt", "--to", "kohya", "-o", "{t}/out.safetensors", "--allow-pickle"],
        ["fit", "{f}", "-o", "{t}/space", "-k", "2", "--allow-pickle"],
    ],
)
def test_crafted_lora_pickle_never_runs(planted, tmp_path, cmd):
    folder, target = planted
    args = [a.format(f=folder, t=tmp_path) for a in cmd]
    res = CliRunner().invoke(cli, args)
    assert not target.exists()
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and res.stderr.count("\n") == 1
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "space").exists()


def test_pickles_are_not_read_without_the_flag(planted):
    folder, target = planted
    res = CliRunner().invoke(cli, ["inspect", str(folder / "evil.pt")])
    assert res.exit_code == 1 and "--allow-pickle" in res.stderr
    assert not target.exists()
