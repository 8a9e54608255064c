"""Per-instance LoRA trainer: same initialisation, standard files, resumable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


from w2wkit.concepts.identity.generator import IdentityGenerator  # noqa: E402
from w2wkit.formats.registry import read_adapter  # noqa: E402
from w2wkit.world.lora import LoraSettings, LoraTrainer, instance_jobs  # noqa: E402


@pytest.fixture
def base(micro_base: Path) -> Path:
    return micro_base  # shared (tests/conftest.py): read only


def test_loras_share_init_and_write_standard_files(base: Path, tmp_path: Path) -> None:
    s = LoraSettings(steps=3, batch=2, n_images=3, init_seed=5)
    trainer = LoraTrainer(base, s)
    n_attn = len(trainer.targets)
    assert n_attn > 0 and all(t.endswith(("to_q", "to_v")) for t in trainer.targets)
    init = trainer.to_adapter()
    # a second trainer (fresh process state) starts from the same factors
    other = LoraTrainer(base, dataclasses.replace(s, seed=9)).to_adapter()
    for key, layer in init.layers.items():
        np.testing.assert_array_equal(layer.down, other.layers[key].down)
        assert not layer.up.any()  # B starts at zero (peft default)
    gen = IdentityGenerator()
    jobs = instance_jobs(gen, gen.instances(2), s.n_images)
    recs = trainer.train_many(jobs, tmp_path / "zoo", "sks person")
    assert [r["status"] for r in recs] == ["trained", "trained"]
    files = sorted((tmp_path / "zoo").glob("*.safetensors"))
    assert [f.stem for f in files] == [j[0] for j in jobs]
    a, b = (read_adapter(f) for f in files)
    assert list(a.layers) == [f"unet.{t}" for t in trainer.targets]
    for layer in a.layers.values():
        assert layer.rank == 1 and layer.alpha == pytest.approx(s.alpha)
        assert layer.up.any()  # trained
    assert not all(np.array_equal(a.layers[k].up, b.layers[k].up) for k in a.layers)
    # resumable: finished models are skipped, nothing is rewritten
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = trainer.train_many(jobs, tmp_path / "zoo", "sks person")
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert not list((tmp_path / "zoo").glob(".*"))  # no temporary leftovers
    # diffusers loads the file and applies the same delta
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    name = trainer.targets[0]
    mod = pipe.unet.get_submodule(name)
    w0 = mod.weight.detach().clone()
    pipe.load_lora_weights(str(files[0]))
    pipe.fuse_lora()
    delta = pipe.unet.get_submodule(name).weight.detach() - w0
    np.testing.assert_allclose(delta.numpy(), a.layers[f"unet.{name}"].delta(), atol=1e-6)
