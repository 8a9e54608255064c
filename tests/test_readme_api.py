"""The README's Python API snippet runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from _spacehelpers import random_models

from w2wkit.formats import read_adapter, write_adapter

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text()
    section = text.split("## The Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_snippet_runs_verbatim(tmp_path, monkeypatch):
    loras = tmp_path / "loras"
    loras.mkdir()
    models = random_models(12, seed=8)
    ages = np.linspace(20, 70, 11)
    for i, ad in enumerate(models[:11]):
        write_adapter(ad, loras / f"m{i}.safetensors", format="kohya")
    (tmp_path / "labels.csv").write_text(
        "file,age\n" + "".join(f"m{i},{a}\n" for i, a in enumerate(ages))
    )
    write_adapter(models[11], tmp_path / "me.safetensors", format="kohya")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_snippet(), str(README), "exec"), scope)  # the README's own code
    space = scope["space"]
    assert space.n_components_ == 10  # the default: capped at N-1
    assert scope["coeffs"].shape == (1, 10) and len(scope["new"]) == 4
    assert "age" in space.directions_
    older = read_adapter(tmp_path / "older.safetensors")
    me = read_adapter(tmp_path / "me.safetensors")
    moved = space.transform(older) - space.transform(me)
    assert float((moved @ space.directions_["age"].vector)[0]) > 0  # older along "age"
    assert set(scope["older"].deltas()) == set(me.layers)
    assert os.path.basename(os.getcwd()) == tmp_path.name
