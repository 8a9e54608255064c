"""The parts of ``w2wkit train``'s recipe beyond the paper's defaults.

On the tiny SD pipeline (``tiny_pipe_dir``, 16 px pictures): per-picture captions,
per-model loss records, prior preservation with cached class pictures, a LoRA on the
text encoder, flip / random-crop augmentations and the ``--check`` grids. Every option
keeps the trainer's promise: a model trained in a batch equals the model trained alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from w2wkit.cli.main import cli
from w2wkit.formats.registry import read_adapter
from w2wkit.training import (
    CHECK_DIR,
    CLASS_DIR,
    LOSS_DIR,
    MANIFEST,
    Recipe,
    caption_prompt,
    train,
)

NAMES = ["ann", "bob", "cat"]
BASE = Recipe(steps=3, batch=2, lr=1e-3, targets=("to_q", "to_v"))


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def make_people(root: Path, captions: dict[str, list[str]] | None = None) -> Path:
    """Three instance folders of three small random pictures (16x16, 20x24, 24x16)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    sizes = ((16, 16), (20, 24), (24, 16))
    for k, name in enumerate(NAMES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for j, (h, w) in enumerate(sizes):
            pic = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            pic[:, : w // 3, k] = 250  # a left-right asymmetric mark (a flip changes it)
            Image.fromarray(pic).save(d / f"{j}.png")
            if captions and name in captions:
                (d / f"{j}.txt").write_text(captions[name][j])
    return root


def factors(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ad = read_adapter(path)
    return {k: (v.down, v.up) for k, v in ad.layers.items()}


def assert_same(
    dir_a: Path, dir_b: Path, names=NAMES, exact: bool = False, atol: float = 1e-6
) -> None:
    for n in names:
        fa, fb = factors(dir_a / f"{n}.safetensors"), factors(dir_b / f"{n}.safetensors")
        assert fa.keys() == fb.keys()
        for k in fa:
            for x, y in zip(fa[k], fb[k], strict=True):
                if exact:
                    np.testing.assert_array_equal(x, y)
                else:
                    np.testing.assert_allclose(x, y, rtol=1e-4, atol=atol)


def differ(dir_a: Path, dir_b: Path, name: str = "ann") -> bool:
    fa, fb = factors(dir_a / f"{name}.safetensors"), factors(dir_b / f"{name}.safetensors")
    return any(not np.allclose(fa[k][1], fb[k][1], rtol=1e-3, atol=1e-6) for k in fa)


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    return make_people(tmp_path_factory.mktemp("recipe") / "people")


@pytest.fixture(scope="module")
def plain(people, tiny_pipe_dir, tmp_path_factory) -> Path:
    """The paper's recipe, three models in one batch."""
    out = tmp_path_factory.mktemp("recipe") / "plain"
    train(people, tiny_pipe_dir, out, BASE, models_per_batch=3, device="cpu")
    return out


# ----------------------------------------------------------------------------- recipe


def test_new_fields_leave_the_manifest_of_the_papers_recipe_alone(plain):
    d = BASE.as_dict()
    for name in ("captions", "prior_preservation", "text_encoder", "flip", "random_crop"):
        assert name not in d
    assert json.loads((plain / MANIFEST).read_text())["recipe"] == d
    assert replace(BASE, flip=True).as_dict()["flip"] is True


# ----------------------------------------------------------------------------- captions


def test_caption_rule():
    r = Recipe(captions=True)
    assert caption_prompt(None, r) == r.instance_prompt
    assert caption_prompt("sks person, smiling", r) == "sks person, smiling"
    assert caption_prompt("a red shirt", r) == f"{r.instance_prompt}, a red shirt"
    assert caption_prompt("a photo of (SKS) man", r) == "a photo of (SKS) man"  # a word, any case
    assert caption_prompt("a sksx man", r) == f"{r.instance_prompt}, a sksx man"  # not the word
    assert caption_prompt("a red shirt", Recipe()) == Recipe().instance_prompt  # captions off


def test_captions_change_the_model_and_equal_captions_do_not(plain, tiny_pipe_dir, tmp_path):
    caps = {n: ["a red shirt", "sks person outdoors", "blue light"] for n in NAMES}
    captioned = make_people(tmp_path / "cap", caps)
    out = tmp_path / "cap-out"
    notes: list[str] = []
    recipe = replace(BASE, captions=True)
    train(captioned, tiny_pipe_dir, out, recipe, models_per_batch=3, device="cpu",
          warn=notes.append)  # fmt: skip
    assert any("caption is its prompt" in n for n in notes)
    assert differ(plain, out)
    man = json.loads((out / MANIFEST).read_text())
    assert (
        man["recipe"]["captions"] is True and man["models"]["ann"]["captions"][0] == "a red shirt"
    )
    # batched = alone with captions
    alone = tmp_path / "cap-alone"
    train(captioned, tiny_pipe_dir, alone, recipe, models_per_batch=1, device="cpu")
    assert_same(out, alone)
    # every caption = the instance prompt: the very same models as without captions
    same = make_people(tmp_path / "same", {n: [BASE.instance_prompt] * 3 for n in NAMES})
    out_same = tmp_path / "same-out"
    train(same, tiny_pipe_dir, out_same, recipe, models_per_batch=3, device="cpu")
    assert_same(plain, out_same, exact=True)


# ----------------------------------------------------------------------------- loss records


def test_loss_record_per_model(plain, people, tiny_pipe_dir, tmp_path):
    man = json.loads((plain / MANIFEST).read_text())
    alone = tmp_path / "alone"
    train(people, tiny_pipe_dir, alone, BASE, models_per_batch=1, device="cpu")
    for n in NAMES:
        rec = json.loads((plain / LOSS_DIR / f"{n}.json").read_text())
        assert rec["model"] == n and rec["steps"] == BASE.steps == len(rec["loss"])
        assert all(np.isfinite(v) for v in rec["loss"])
        # with 3 steps the last 20% is the last step: the record ends on the manifest's loss
        assert rec["loss"][-1] == pytest.approx(man["models"][n]["loss"], rel=1e-7)
        assert rec["final_loss"] == man["models"][n]["loss"]
        solo = json.loads((alone / LOSS_DIR / f"{n}.json").read_text())
        np.testing.assert_allclose(rec["loss"], solo["loss"], rtol=1e-5)
    assert not [p for p in (plain / LOSS_DIR).iterdir() if ".w2wtmp" in p.name]


def test_loss_record_tail_rule(people, tiny_pipe_dir, tmp_path):
    out = tmp_path / "long"
    recipe = replace(BASE, steps=10, batch=1)
    train(people, tiny_pipe_dir, out, recipe, models_per_batch=3, device="cpu")
    man = json.loads((out / MANIFEST).read_text())
    for n in NAMES:
        rec = json.loads((out / LOSS_DIR / f"{n}.json").read_text())
        assert len(rec["loss"]) == 10
        tail = np.asarray(rec["loss"][8:], np.float32)  # the last 20% of the steps
        assert float(tail.mean()) == pytest.approx(man["models"][n]["loss"], rel=1e-6)


# ----------------------------------------------------------------------------- prior


@pytest.mark.slow
def test_prior_preservation(plain, people, tiny_pipe_dir, tmp_path):
    recipe = replace(BASE, prior_preservation=True, num_class_images=3, prior_weight=1.0,
                     class_prompt="a photo of a person")  # fmt: skip
    out = tmp_path / "prior"
    notes: list[str] = []
    train(people, tiny_pipe_dir, out, recipe, models_per_batch=3, device="cpu",
          warn=notes.append)  # fmt: skip
    assert sum("rendering 3 class pictures" in n for n in notes) == 1
    (key,) = list((out / CLASS_DIR).iterdir())
    pngs = sorted(key.glob("*.png"))
    assert len(pngs) == 3 and (key / "class.json").is_file()
    from PIL import Image

    pix = np.stack([np.asarray(Image.open(p)) for p in pngs]).astype(float)
    assert pix.std() > 1 and not np.array_equal(pix[0], pix[1])  # rendered, one seed each
    assert differ(plain, out)
    rec = json.loads((out / LOSS_DIR / "ann.json").read_text())
    assert len(rec["prior_loss"]) == 3 and all(np.isfinite(rec["prior_loss"]))
    # batched = alone, the class pictures read from a shared cache (not rendered again)
    alone = tmp_path / "prior-alone"
    notes.clear()
    train(people, tiny_pipe_dir, alone, recipe, models_per_batch=1, device="cpu",
          class_dir=out / CLASS_DIR, warn=notes.append)  # fmt: skip
    assert not any("rendering" in n for n in notes)
    assert not (alone / CLASS_DIR).exists()
    assert_same(out, alone)
    # the weight is part of the loss: weight 0 trains as without prior preservation
    zero = tmp_path / "prior-zero"
    train(people, tiny_pipe_dir, zero, replace(recipe, prior_weight=0.0), models_per_batch=3,
          device="cpu", class_dir=out / CLASS_DIR)  # fmt: skip
    assert_same(plain, zero)


def test_prior_preservation_resume_reuses_the_class_pictures(people, tiny_pipe_dir, tmp_path):
    recipe = replace(BASE, steps=2, prior_preservation=True, num_class_images=2)
    out = tmp_path / "prior"
    train(people, tiny_pipe_dir, out, recipe, models_per_batch=3, device="cpu")
    (key,) = list((out / CLASS_DIR).iterdir())
    stamp = {p.name: os.stat(p).st_mtime_ns for p in key.iterdir()}
    # a killed run: the last model never written
    man = json.loads((out / MANIFEST).read_text())
    del man["models"]["cat"]
    (out / MANIFEST).write_text(json.dumps(man))
    first = factors(out / "cat.safetensors")
    (out / "cat.safetensors").unlink()
    notes: list[str] = []
    plan = train(people, tiny_pipe_dir, out, recipe, models_per_batch=3, device="cpu",
                 warn=notes.append)  # fmt: skip
    assert plan.written == ["cat"] and not any("rendering" in n for n in notes)
    assert stamp == {p.name: os.stat(p).st_mtime_ns for p in key.iterdir()}
    again = factors(out / "cat.safetensors")
    for k in first:
        np.testing.assert_allclose(first[k][1], again[k][1], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- text encoder


@pytest.fixture(scope="module")
def with_te(people, tiny_pipe_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recipe") / "te"
    train(people, tiny_pipe_dir, out, replace(BASE, text_encoder=True), models_per_batch=3,
          device="cpu")  # fmt: skip
    return out


def test_text_encoder_lora_is_trained_per_model(with_te, people, tiny_pipe_dir, tmp_path):
    ad = read_adapter(with_te / "ann.safetensors")
    te = [m for m in ad.layers if m.startswith("text_encoder.")]
    unet = [m for m in ad.layers if m.startswith("unet.")]
    assert te and unet
    assert all(m.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj", "out_proj") for m in te)
    assert all(np.abs(ad.layers[m].up).max() > 0 for m in te)  # trained
    from safetensors import safe_open

    with safe_open(str(with_te / "ann.safetensors"), "np") as f:
        assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in f.keys())
    alone = tmp_path / "te-alone"
    train(people, tiny_pipe_dir, alone, replace(BASE, text_encoder=True), models_per_batch=1,
          device="cpu")  # fmt: skip
    # float32 round-off of the text encoder's batched matmuls reaches Adam's first steps as
    # ~1e-6 differences of factors that move ~1e-3 per step; a mixed-up row would move 1e-3
    assert_same(with_te, alone, atol=1e-5)
    fb = factors(with_te / "bob.safetensors")
    fa = factors(with_te / "ann.safetensors")
    assert any(not np.allclose(fa[m][1], fb[m][1]) for m in te)  # each model its own rows


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_text_encoder_lora_loads_in_diffusers(with_te, people, tiny_pipe, tiny_pipe_dir,
                                              tmp_path, fmt):  # fmt: skip
    import copy

    from w2wkit.testing import unet_weights

    src = with_te
    if fmt != "kohya":
        src = tmp_path / fmt
        train(people, tiny_pipe_dir, src, replace(BASE, text_encoder=True), models_per_batch=3,
              device="cpu", format=fmt)  # fmt: skip
    f = src / "cat.safetensors"
    ad = read_adapter(f)
    mods = list(ad.layers)
    assert any(m.startswith("text_encoder.") for m in mods)
    pipe = copy.deepcopy(tiny_pipe)
    before = unet_weights(pipe, mods)
    pipe.load_lora_weights(str(f), adapter_name="cat")
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=["cat"])
    after = unet_weights(pipe, mods)
    for m in mods:
        delta = ad.layers[m].delta().astype(np.float64)
        err = np.abs(after[m] - before[m] - delta).max() / max(np.abs(delta).max(), 1e-12)
        assert err <= 1e-4, m


def test_check_renders_the_text_encoder_lora(with_te, people, tiny_pipe_dir, tmp_path):
    import shutil

    out = tmp_path / "te"
    shutil.copytree(with_te, out)
    recipe = replace(BASE, text_encoder=True)
    plan = train(people, tiny_pipe_dir, out, recipe, device="cpu", check=True, check_seeds=(0,),
                 check_steps=2)  # fmt: skip
    assert plan.written == [] and plan.checked == NAMES  # done before: grids only
    from PIL import Image

    from w2wkit.adapter import Adapter
    from w2wkit.diffusion.sampler import Renderer

    # the grid is the render of the whole model, its text-encoder part included
    r = Renderer(tiny_pipe_dir, device="cpu")
    ad = read_adapter(out / "ann.safetensors")
    full = r.render([ad], BASE.instance_prompt, [0], steps=2, names=["ann"])
    saved = np.asarray(Image.open(out / CHECK_DIR / "ann.png").convert("RGB"))
    np.testing.assert_array_equal(saved, np.asarray(full.grid()))
    unet = Adapter(layers={k: v for k, v in ad.layers.items() if k.startswith("unet.")})
    part = r.render([unet], BASE.instance_prompt, [0], steps=2, names=["ann"])
    assert not np.allclose(full.images, part.images)


def test_fit_keeps_the_text_encoder_modules(with_te, tmp_path):
    space = tmp_path / "space"
    res = run(["fit", with_te, "-o", space, "-k", 2])
    assert res.exit_code == 0, res.output
    from w2wkit.space import WeightSpace

    ws = WeightSpace.load(space)
    ad = ws.inverse_transform(ws.transform([read_adapter(with_te / "ann.safetensors")]))[0]
    assert any(m.startswith("text_encoder.") for m in ad.layers)


# ----------------------------------------------------------------------------- augmentations


@pytest.mark.slow
def test_flip_and_random_crop(plain, people, tiny_pipe_dir, tmp_path):
    flip = tmp_path / "flip"
    train(people, tiny_pipe_dir, flip, replace(BASE, flip=True), models_per_batch=3, device="cpu")
    assert differ(plain, flip)
    notes: list[str] = []
    both = replace(BASE, flip=True, random_crop=True)
    crop = tmp_path / "crop"
    train(people, tiny_pipe_dir, crop, both, models_per_batch=3, device="cpu", warn=notes.append)
    assert any("randomly cropped" in n for n in notes)
    assert differ(flip, crop)
    # batched = alone (the crops are VAE-encoded per step in batches of another size: float32
    # round-off of ~1e-6 in factors that move ~1e-3 per step; a mixed-up draw moves 1e-3)
    alone = tmp_path / "crop-alone"
    train(people, tiny_pipe_dir, alone, both, models_per_batch=1, device="cpu")
    assert_same(crop, alone, atol=1e-5)
    # resume = uninterrupted: the first model's file and entry lost, trained again alone
    man = json.loads((crop / MANIFEST).read_text())
    del man["models"]["ann"]
    (crop / MANIFEST).write_text(json.dumps(man))
    (crop / "ann.safetensors").unlink()
    plan = train(people, tiny_pipe_dir, crop, both, models_per_batch=3, device="cpu")
    assert plan.written == ["ann"]
    assert_same(crop, alone, names=["ann"], exact=True)  # alone in its batch, as `alone`


# ----------------------------------------------------------------------------- check


def test_check_grids(people, tiny_pipe_dir, tmp_path):
    from PIL import Image

    from w2wkit.diffusion.sampler import Renderer

    out = tmp_path / "checked"
    args = ["train", people, "--base", tiny_pipe_dir, "-o", out, "--steps", 2, "--lr", 1e-2,
            "--targets", "to_q,to_v", "--device", "cpu", "--check", "--check-seeds", "0,1",
            "--check-steps", 3]  # fmt: skip
    res = run(args)
    assert res.exit_code == 0, res.output
    assert "check grids of 3 models" in res.output
    grids = {n: out / CHECK_DIR / f"{n}.png" for n in NAMES}
    assert all(g.is_file() for g in grids.values())
    # the grid is the engine's render of the written model: finite, not constant
    r = Renderer(tiny_pipe_dir, device="cpu")
    direct = r.render([out / "bob.safetensors"], "a photo of sks person", [0, 1], steps=3,
                      names=["bob"])  # fmt: skip
    assert np.isfinite(direct.images).all()
    assert all(direct.images[0, 0, s].std() > 1e-3 for s in range(2))
    saved = np.asarray(Image.open(grids["bob"]).convert("RGB"))
    np.testing.assert_array_equal(saved, np.asarray(direct.grid()))
    # a resumed run renders the new model only
    stamp = {n: os.stat(g).st_mtime_ns for n, g in grids.items()}
    man = json.loads((out / MANIFEST).read_text())
    del man["models"]["cat"]
    (out / MANIFEST).write_text(json.dumps(man))
    (out / "cat.safetensors").unlink()
    grids["cat"].unlink()
    plan = train(people, tiny_pipe_dir, out, Recipe(steps=2, lr=1e-2, targets=("to_q", "to_v")),
                 device="cpu", check=True, check_seeds=(0, 1), check_steps=3)  # fmt: skip
    assert plan.written == ["cat"] and plan.checked == ["cat"]
    assert grids["cat"].is_file()
    assert all(os.stat(grids[n]).st_mtime_ns == stamp[n] for n in ("ann", "bob"))


def test_help_lists_the_options():
    res = run(["train", "--help"])
    for opt in (
        "--captions",
        "--prior-preservation",
        "--class-prompt",
        "--num-class-images",
        "--prior-weight",
        "--text-encoder",
        "--flip",
        "--random-crop",
        "--check",
    ):
        assert opt in res.output, opt  # fmt: skip


def test_dry_run_with_prior_preservation_writes_nothing(people, tiny_pipe_dir, tmp_path):
    out = tmp_path / "plan"
    res = run(["train", people, "--base", tiny_pipe_dir, "-o", out, "--steps", 5,
               "--targets", "to_q,to_v", "--device", "cpu", "--dry-run", "--prior-preservation",
               "--num-class-images", 7, "--text-encoder", "--flip", "--random-crop"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "prior preservation: 7 class pictures" in res.output and "estimated time" in res.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--prior-preservation", "--num-class-images", "0"], "--num-class-images"),
        (["--prior-preservation", "--prior-weight", "nan"], "--prior-weight"),
        (["--captions", "--instance-token", " "], "--instance-token"),
        (["--check", "--check-seeds", "a,b"], "--check-seeds"),
    ],
)
def test_bad_option_values(people, tiny_pipe_dir, tmp_path, extra, needle):
    res = run(["train", people, "--base", tiny_pipe_dir, "-o", tmp_path / "o", "--steps", 1,
               "--device", "cpu", *extra])  # fmt: skip
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_diverged_model_keeps_its_loss_record(tiny_pipe_dir, tmp_path):
    people = make_people(tmp_path / "p")
    out = tmp_path / "out"
    recipe = Recipe(steps=3, batch=1, lr=1e30, targets=("to_q", "to_v"))
    plan = train(people, tiny_pipe_dir, out, recipe, models_per_batch=3, device="cpu")
    assert sorted(plan.failed_names) == NAMES
    rec = json.loads((out / LOSS_DIR / "ann.json").read_text())  # strict JSON: null, not NaN
    assert len(rec["loss"]) == 3 and rec["loss"][0] is not None
    assert np.isfinite(rec["loss"][0]) and rec["loss"][-1] is None and rec["final_loss"] is None
