"""Batched zoo trainer: equals one-model-at-a-time training, standard files, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


from w2wkit.errors import W2WError  # noqa: E402
from w2wkit.formats.registry import read_adapter  # noqa: E402
from w2wkit.testing import peft_dreambooth  # noqa: E402
from w2wkit.world.lora import LoraSettings, LoraTrainer  # noqa: E402
from w2wkit.world.zoo import (  # noqa: E402
    ZooSettings,
    ZooTrainer,
    render_job,
    train_zoo,
    write_labels,
    write_start,
    write_zoo_manifest,
    zoo_jobs,
)


@pytest.fixture
def base(micro_base: Path) -> Path:
    return micro_base  # shared (tests/conftest.py): read only


def test_batched_equals_single_model_training(base: Path) -> None:
    """Model j of a batch of 3 == a peft DreamBooth loop on model j alone, same draws; and the
    engine's one-model trainer (LoraTrainer) gives the same."""
    common = {"steps": 6, "batch": 2, "n_images": 3, "init_seed": 5, "lr": 5e-3, "device": "cpu"}
    zs = ZooSettings(**common)
    ls = LoraSettings(**{k: v for k, v in common.items() if k != "device"})
    jobs = zoo_jobs("identity", 3)
    imgs = [render_job(j, 3) for j in jobs]
    seeds = [11, 22, 33]
    adapters, losses = ZooTrainer(base, zs).train_chunk(imgs, "sks person", seeds)
    assert losses.shape == (3,) and np.isfinite(losses).all()
    one = LoraTrainer(base, ls)
    for j in (0, 2):
        single, _ = peft_dreambooth(base, ls, imgs[j], "sks person", seeds[j])
        alone, _ = one.train(imgs[j], "sks person", seed=seeds[j])
        for key, layer in alone.layers.items():  # the same loop with M = 1 (float rounding)
            tol = 1e-4 * np.abs(layer.up).max()
            np.testing.assert_allclose(layer.up, adapters[j].layers[key].up, rtol=0, atol=tol)
        assert list(single.layers) == list(adapters[j].layers)
        worst = 0.0
        for key, layer in single.layers.items():
            got = adapters[j].layers[key]
            scale = np.abs(layer.up).max()
            assert scale > 0  # trained
            worst = max(worst, np.abs(got.up - layer.up).max() / scale)
            # stated tolerance: 1e-4 of the update's size (float32 rounding, 6 Adam steps)
            np.testing.assert_allclose(got.down, layer.down, rtol=0, atol=1e-4 * scale + 1e-7)
            np.testing.assert_allclose(got.up, layer.up, rtol=0, atol=1e-4 * scale)
        assert worst < 1e-4
    # models of one batch differ (their own pictures and seeds)
    k = next(iter(adapters[0].layers))
    assert not np.allclose(adapters[0].layers[k].up, adapters[1].layers[k].up)


def test_prior_preservation_runs(base: Path) -> None:
    zs = ZooSettings(
        steps=2, batch=2, n_images=2, device="cpu", class_prompt="person", prior_weight=1.0
    )
    jobs = zoo_jobs("identity", 2)
    prior = render_job(zoo_jobs("identity", 1, inst_seed=7)[0], 4)
    ads, losses = ZooTrainer(base, zs).train_chunk(
        [render_job(j, 2) for j in jobs], "sks person", [1, 2], prior=prior
    )
    assert len(ads) == 2 and np.isfinite(losses).all()


def test_train_zoo_files_labels_manifest_resume_diffusers(base: Path, tmp_path: Path) -> None:
    zs = ZooSettings(steps=2, batch=2, n_images=2, device="cpu", chunk=2)
    jobs = zoo_jobs("identity", 3) + zoo_jobs("dog", 2, first=3)
    out = tmp_path / "zoo"
    # interrupted: only the first chunk (2 models) is there
    first = train_zoo(base, jobs[:2], out, "sks person", zs, progress=False)
    assert first["trained"] == 2
    mt = [(out / f"{j.name}.safetensors").stat().st_mtime_ns for j in jobs[:2]]
    res = train_zoo(base, jobs[:3], out, "sks person", zs, progress=False)
    assert res["skipped"] == 2 and res["trained"] == 1 and res["missing"] == 0
    assert [(out / f"{j.name}.safetensors").stat().st_mtime_ns for j in jobs[:2]] == mt
    dres = train_zoo(base, jobs[3:], out, "sks dog", zs, progress=False)
    assert dres["trained"] == 2
    assert not list(out.glob(".*"))
    write_labels(jobs[:3], out / "labels.csv")
    with open(out / "labels.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][0] == "name" and "beard" in rows[0] and len(rows) == 4
    from w2wkit.concepts.identity.generator import IdentityGenerator

    inst = IdentityGenerator().instance(1, 0)
    assert rows[2][rows[0].index("glasses")] == str(int(inst.attributes["glasses"]))
    man = json.loads(write_zoo_manifest(out, jobs, {"prompt": "x"}).read_text())
    assert len(man["models"]) == 5
    # diffusers applies exactly the file's delta
    from diffusers import StableDiffusionPipeline

    f = out / f"{jobs[0].name}.safetensors"
    ad = read_adapter(f)
    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    name = next(iter(ad.layers)).removeprefix("unet.")
    w0 = pipe.unet.get_submodule(name).weight.detach().clone()
    pipe.load_lora_weights(str(f))
    pipe.fuse_lora()
    delta = pipe.unet.get_submodule(name).weight.detach() - w0
    np.testing.assert_allclose(delta.numpy(), ad.layers[f"unet.{name}"].delta(), atol=1e-6)
    assert np.abs(ad.layers[f"unet.{name}"].delta()).max() > 0


@pytest.mark.slow
def test_worker_processes_match_inline(base: Path, tmp_path: Path) -> None:
    zs = ZooSettings(steps=2, batch=2, n_images=2, device="cpu", chunk=1)
    jobs = zoo_jobs("identity", 4)
    a = train_zoo(base, jobs, tmp_path / "a", "sks person", zs, progress=False)
    b = train_zoo(base, jobs, tmp_path / "b", "sks person", zs, workers=2, progress=False)
    assert a["trained"] == b["trained"] == 4
    for j in jobs:
        x = read_adapter(tmp_path / "a" / f"{j.name}.safetensors")
        y = read_adapter(tmp_path / "b" / f"{j.name}.safetensors")
        for k, layer in x.layers.items():
            np.testing.assert_allclose(y.layers[k].up, layer.up, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # starts worker processes twice (each imports torch): ~15 s; the fast lane
# continues models through test_world_shipped.py::test_retrain_zoo_continues_the_current_models
def test_continued_training_starts_from_the_given_factors(base: Path, tmp_path: Path) -> None:
    """A continuation round starts every model from its own row and draws apart."""
    lr = 1e-3
    zs = ZooSettings(steps=3, batch=2, n_images=2, device="cpu", chunk=1, lr=lr)
    jobs = zoo_jobs("identity", 3)
    train_zoo(base, jobs, tmp_path / "a", "sks person", zs, progress=False)
    first = {j.name: read_adapter(tmp_path / "a" / f"{j.name}.safetensors") for j in jobs}
    targets = [k.removeprefix("unet.") for k in first[jobs[0].name].layers]
    names = [j.name for j in jobs][::-1]  # rows in another order than the jobs
    stacks = {
        t: (
            np.stack([first[n].layers[f"unet.{t}"].down for n in names]),
            np.stack([first[n].layers[f"unet.{t}"].up for n in names]),
        )
        for t in targets
    }
    start = write_start(tmp_path / "start.safetensors", names, stacks)
    one = ZooSettings(steps=1, batch=2, n_images=2, device="cpu", chunk=1, lr=lr)
    kw = {"progress": False, "start": start}
    train_zoo(base, jobs, tmp_path / "c", "sks person", one, draw_round=1, **kw)
    train_zoo(base, jobs, tmp_path / "w", "sks person", one, draw_round=1, workers=2, **kw)
    two = ZooSettings(steps=2, batch=2, n_images=2, device="cpu", chunk=3, lr=lr)
    train_zoo(base, jobs, tmp_path / "r0", "sks person", two, draw_round=0, **kw)
    train_zoo(base, jobs, tmp_path / "r1", "sks person", two, draw_round=1, **kw)
    differ = 0
    for j in jobs:
        c = read_adapter(tmp_path / "c" / f"{j.name}.safetensors")
        w = read_adapter(tmp_path / "w" / f"{j.name}.safetensors")
        r0 = read_adapter(tmp_path / "r0" / f"{j.name}.safetensors")
        r1 = read_adapter(tmp_path / "r1" / f"{j.name}.safetensors")
        for k, layer in first[j.name].layers.items():
            # Adam's first step from the model's own factors moves each entry by lr at most
            step = np.abs(c.layers[k].up - layer.up).max()
            assert 0 < step <= lr * 1.001
            assert np.abs(c.layers[k].down - layer.down).max() <= lr * 1.001
            np.testing.assert_allclose(w.layers[k].up, c.layers[k].up, rtol=1e-5, atol=1e-7)
            differ += not np.allclose(r0.layers[k].up, r1.layers[k].up, rtol=0, atol=1e-6)
    assert differ  # round 1 draws other pictures, noise and timesteps than round 0
    # a start file without one of the models is refused, naming it
    with pytest.raises(W2WError, match=jobs[0].name):
        write_start(
            tmp_path / "part.safetensors",
            names[:2],
            {t: (a[:2], b[:2]) for t, (a, b) in stacks.items()},
        )
        train_zoo(
            base,
            jobs,
            tmp_path / "x",
            "sks person",
            one,
            progress=False,
            start=tmp_path / "part.safetensors",
        )
    # the same with worker processes: refused up front, one W2WError naming the model
    with pytest.raises(W2WError, match=jobs[0].name):
        train_zoo(
            base,
            jobs,
            tmp_path / "xw",
            "sks person",
            one,
            progress=False,
            start=tmp_path / "part.safetensors",
            workers=2,
        )
    assert not list((tmp_path / "xw").glob("*.safetensors"))  # refused before any training
    with pytest.raises(W2WError, match="not a start-factors file"):  # a LoRA file instead
        train_zoo(
            base,
            jobs,
            tmp_path / "xl",
            "sks person",
            one,
            progress=False,
            start=tmp_path / "a" / f"{jobs[0].name}.safetensors",
        )


def test_running_chunks_report_their_steps(base: Path, tmp_path: Path) -> None:
    """Progress inside a chunk: models' worth of steps, reset when its models are written."""
    from w2wkit.world.zoo import _partial, _run_chunks

    zs = ZooSettings(steps=3, batch=1, n_images=2, device="cpu", chunk=2)
    jobs = zoo_jobs("identity", 2)
    seen: list[float] = []
    _run_chunks(
        str(base), zs, [jobs], str(tmp_path), "sks person", None, None, None,
        on_partial=seen.append,
    )  # fmt: skip
    np.testing.assert_allclose(seen, [2 / 3, 4 / 3, 2.0, 0.0])
    # the parent sums the workers' notes; a note not (fully) written yet counts 0
    notes = [tmp_path / "w0.txt", tmp_path / "w1.txt", tmp_path / "w2.txt", tmp_path / "w3.txt"]
    notes[0].write_text("1.25")
    notes[1].write_text("0.5")
    notes[2].write_text("")
    assert _partial(notes) == 1.75


def test_sample_space_stays_in_the_zoo_span() -> None:
    from w2wkit.world.builder import _flatten, sample_space

    rng = np.random.default_rng(0)
    stacks = {
        "a.to_q": (rng.normal(size=(12, 1, 5)), rng.normal(size=(12, 7, 1))),
        "a.to_v": (rng.normal(size=(12, 1, 3)), rng.normal(size=(12, 4, 1))),
    }
    new = sample_space(stacks, 6, 4, np.random.default_rng(1))
    assert {t: (a.shape, b.shape) for t, (a, b) in new.items()} == {
        "a.to_q": ((6, 1, 5), (6, 7, 1)),
        "a.to_v": ((6, 1, 3), (6, 4, 1)),
    }
    x = _flatten(stacks)
    y = _flatten(new)
    centred = x - x.mean(0)
    # independent reference: least squares on the zoo's centred rows
    coef, *_ = np.linalg.lstsq(centred.T, (y - x.mean(0)).T, rcond=None)
    np.testing.assert_allclose(centred.T @ coef, (y - x.mean(0)).T, atol=1e-5)
    vt = np.linalg.svd(centred, full_matrices=False)[2]
    # only the first 4 principal directions are used
    resid = (y - x.mean(0)) @ vt[4:].T
    np.testing.assert_allclose(resid, 0, atol=1e-5)
