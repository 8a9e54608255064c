"""``w2wkit train`` / ``w2wkit.train``: a dataset of LoRAs from folders of pictures.

On the tiny SD pipeline (``tiny_pipe_dir``, 16 px pictures): batched training equals
one-at-a-time training, the files load in diffusers, train -> fit -> directions -> apply
works, a killed run resumes to the same files, and each bad input is one line + exit 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from w2wkit.cli.main import cli
from w2wkit.formats.registry import read_adapter
from w2wkit.training import MANIFEST, Recipe, train

NAMES = ["ann", "bob", "cat", "dan", "eve", "fay"]
LABELS = {"ann": 0, "bob": 1, "cat": 0, "dan": 1, "eve": 0, "fay": 1}
STEPS = 3


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def make_people(root: Path, names=NAMES, sizes=((16, 16), (20, 24))) -> Path:
    """Instance folders of small random pictures (two sizes) and a labels.csv."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in names:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for j in range(3):
            h, w = sizes[j % len(sizes)]
            pic = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            pic[..., 0] = 200 if LABELS.get(name) else 30  # a visible attribute
            Image.fromarray(pic).save(d / f"{j}.png")
    rows = "".join(f"{n},{LABELS.get(n, 0)}\n" for n in names)
    (root / "labels.csv").write_text("name,red\n" + rows)
    return root


RECIPE = Recipe(steps=STEPS, batch=2, lr=1e-3, targets=("to_q", "to_v"))


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    return make_people(tmp_path_factory.mktemp("train") / "people")


@pytest.fixture(scope="module")
def trained(people, tiny_pipe_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "out"
    notes = []
    plan = train(
        people, tiny_pipe_dir, out, RECIPE, models_per_batch=3, device="cpu", warn=notes.append
    )
    assert plan.written == NAMES and not plan.failed_names
    assert sum("resized and center-cropped" in n for n in notes) == 1  # said once
    return out


def factors(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ad = read_adapter(path)
    return {k: (v.down, v.up) for k, v in ad.layers.items()}


def test_output_folder(trained):
    man = json.loads((trained / MANIFEST).read_text())
    assert man["recipe"]["steps"] == STEPS and man["recipe"]["rank"] == 1
    assert len(man["base"]["sha256"]) == 64
    from w2wkit.stio import file_sha256

    seeds = set()
    for n in NAMES:
        e = man["models"][n]
        assert e["status"] == "done" and np.isfinite(e["loss"])
        assert e["sha256"] == file_sha256(trained / f"{n}.safetensors")
        seeds.add(e["seed"])
        f = factors(trained / f"{n}.safetensors")
        assert len(f) > 0 and all(np.abs(b).max() > 0 for _, b in f.values())  # trained
    assert len(seeds) == len(NAMES)
    assert (trained / "labels.csv").read_text().startswith("name,red")
    # the shared initialisation: every model's A started equal, so after few steps they are close
    a = [factors(trained / f"{n}.safetensors") for n in NAMES]
    key = next(iter(a[0]))
    assert not np.array_equal(a[0][key][1], a[1][key][1])


def test_batched_equals_one_at_a_time(trained, people, tiny_pipe_dir, tmp_path):
    out = tmp_path / "alone"
    train(people, tiny_pipe_dir, out, RECIPE, models_per_batch=1, device="cpu")
    for n in NAMES:
        fa, fb = factors(trained / f"{n}.safetensors"), factors(out / f"{n}.safetensors")
        assert fa.keys() == fb.keys()
        for k in fa:
            np.testing.assert_allclose(fa[k][0], fb[k][0], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(fa[k][1], fb[k][1], rtol=1e-4, atol=1e-6)


def test_resume_is_a_no_op_and_recipe_is_checked(trained, people, tiny_pipe_dir):
    before = {n: os.stat(trained / f"{n}.safetensors").st_mtime_ns for n in NAMES}
    plan = train(people, tiny_pipe_dir, trained, RECIPE, models_per_batch=3, device="cpu")
    assert plan.written == [] and plan.done == len(NAMES)
    assert before == {n: os.stat(trained / f"{n}.safetensors").st_mtime_ns for n in NAMES}
    res = run(["train", people, "--base", tiny_pipe_dir, "-o", trained, "--steps", STEPS + 1])
    assert res.exit_code == 1
    assert "another recipe" in res.output and "--force" in res.output


def test_loras_load_in_diffusers(trained, tiny_pipe):
    import copy

    from w2wkit.testing import unet_weights

    pipe = copy.deepcopy(tiny_pipe)
    f = trained / "bob.safetensors"
    ad = read_adapter(f)
    mods = list(ad.layers)
    before = unet_weights(pipe, mods)
    pipe.load_lora_weights(str(f), adapter_name="bob")
    pipe.fuse_lora(adapter_names=["bob"])
    after = unet_weights(pipe, mods)
    for m in mods:
        delta = ad.layers[m].delta().astype(np.float64)
        err = np.abs(after[m] - before[m] - delta).max() / max(np.abs(delta).max(), 1e-12)
        assert err <= 1e-4, m


def test_fit_directions_apply(trained, tmp_path):
    space = tmp_path / "space"
    res = run(["fit", trained, "-o", space, "-k", 4, "--labels", trained / "labels.csv"])
    assert res.exit_code == 0, res.output
    res = run(["directions", "--space", space])
    assert res.exit_code == 0, res.output
    out = tmp_path / "edited.safetensors"
    res = run(
        ["apply", trained / "ann.safetensors", "--space", space, "--edit", "red=1", "-o", out]
    )
    assert res.exit_code == 0, res.output
    a, b = factors(trained / "ann.safetensors"), factors(out)
    assert a.keys() == b.keys()
    assert any(not np.allclose(a[k][1], b[k][1]) for k in a)


def test_dry_run_plans_without_writing(people, tiny_pipe_dir, tmp_path):
    out = tmp_path / "plan"
    res = run(
        ["train", people, "--base", tiny_pipe_dir, "-o", out, "--steps", 10,
         "--models-per-batch", 4, "--targets", "to_q,to_v", "--device", "cpu", "--dry-run"]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "models: 6 (0 done, 0 failed, 6 to train)" in res.output
    assert "batches: 2" in res.output and "estimated time" in res.output
    assert not out.exists()


def test_diverged_model_is_marked_failed(tiny_pipe_dir, tmp_path):
    people = make_people(tmp_path / "p", names=["ann", "bob"])
    out = tmp_path / "out"
    notes = []
    recipe = Recipe(steps=3, batch=1, lr=1e30, targets=("to_q", "to_v"))
    plan = train(people, tiny_pipe_dir, out, recipe, models_per_batch=2, warn=notes.append)
    assert sorted(plan.failed_names) == ["ann", "bob"]
    man = json.loads((out / MANIFEST).read_text())
    assert all(man["models"][n]["status"] == "failed" for n in ("ann", "bob"))
    assert not list(out.glob("*.safetensors"))
    assert any("'ann' diverged" in n for n in notes)


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_files(trained, people, tiny_pipe_dir, tmp_path):
    out = tmp_path / "killed"
    args = [
        sys.executable, "-m", "w2wkit.cli.main", "-q", "train", str(people),
        "--base", str(tiny_pipe_dir), "-o", str(out), "--steps", str(STEPS), "--batch", "2",
        "--lr", "1e-3", "--targets", "to_q,to_v", "--models-per-batch", "3", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "W2WKIT_TEST_TRAIN_DIE_AFTER": "2"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    man = json.loads((out / MANIFEST).read_text())
    assert sorted(man["models"]) == ["ann", "bob"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "ann.safetensors",
        "bob.safetensors",
    ]
    kept = {n: os.stat(out / f"{n}.safetensors").st_mtime_ns for n in ("ann", "bob")}
    plan = train(people, tiny_pipe_dir, out, RECIPE, models_per_batch=3, device="cpu")
    assert plan.written == NAMES[2:]
    assert kept == {n: os.stat(out / f"{n}.safetensors").st_mtime_ns for n in ("ann", "bob")}
    for n in NAMES:
        fa, fb = factors(trained / f"{n}.safetensors"), factors(out / f"{n}.safetensors")
        for k in fa:
            np.testing.assert_allclose(fa[k][0], fb[k][0], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(fa[k][1], fb[k][1], rtol=1e-4, atol=1e-6)
    assert not [p for p in out.iterdir() if ".w2wtmp" in p.name]


# ----------------------------------------------------------------------------- bad input


def _one_line_error(res, *needles):
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _train(src, base, out, *extra):
    return run(["train", src, "--base", base, "-o", out, "--steps", 1, "--device", "cpu", *extra])


def test_instance_folder_without_pictures(tiny_pipe_dir, tmp_path):
    people = make_people(tmp_path / "p", names=["ann"])
    (people / "empty").mkdir()
    (people / "empty" / "notes.md").write_text("x")
    _one_line_error(_train(people, tiny_pipe_dir, tmp_path / "o"), "empty", "without pictures")
    assert not (tmp_path / "o").exists()


def test_unreadable_picture_refused_or_skipped(tiny_pipe_dir, tmp_path):
    people = make_people(tmp_path / "p", names=["ann", "bob"])
    (people / "bob" / "broken.png").write_bytes(b"not a png")
    _one_line_error(_train(people, tiny_pipe_dir, tmp_path / "o"), "broken.png", "unreadable")
    assert not (tmp_path / "o").exists()
    res = _train(people, tiny_pipe_dir, tmp_path / "o", "--skip-bad-images")
    assert res.exit_code == 0, res.output
    assert "skipped an unreadable picture" in res.output and "broken.png" in res.output
    assert (tmp_path / "o" / "bob.safetensors").is_file()


def test_duplicate_instance_names(tiny_pipe_dir, tmp_path):
    people = make_people(tmp_path / "p", names=["ann", "Ann"])
    _one_line_error(_train(people, tiny_pipe_dir, tmp_path / "o"), "duplicate", "ann")


def test_incomplete_pipeline_folder(people, tiny_pipe_dir, tmp_path):
    import shutil

    broken = tmp_path / "pipe"
    shutil.copytree(tiny_pipe_dir, broken)
    shutil.rmtree(broken / "vae")
    _one_line_error(_train(people, broken, tmp_path / "o"), "vae", "incomplete")
    (broken / "model_index.json").unlink()
    _one_line_error(_train(people, broken, tmp_path / "o"), "model_index.json")


def test_absent_targets_listed_with_near_matches(people, tiny_pipe_dir, tmp_path):
    line = _one_line_error(
        _train(people, tiny_pipe_dir, tmp_path / "o", "--targets", "to_q,to_vv,attn3"),
        "to_vv",
        "attn3",
    )
    assert "near matches" in line and "to_v" in line


def test_manifest_input(tiny_pipe_dir, people, tmp_path):
    rows = [f"{n},{people.name}/{n}/0.png,a photo\n" for n in ("ann", "bob")]
    man = people.parent / "list.csv"
    man.write_text("instance,picture,caption\n" + "".join(rows))
    res = _train(man, tiny_pipe_dir, tmp_path / "o", "--targets", "to_q")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o").glob("*.safetensors")) == [
        "ann.safetensors",
        "bob.safetensors",
    ]
    bad = people.parent / "bad.jsonl"
    bad.write_text('{"instance": "ann"}\n')
    _one_line_error(_train(bad, tiny_pipe_dir, tmp_path / "o2"), "row 1", "picture")


def test_out_of_memory_halves_the_batch(trained, people, tiny_pipe_dir, tmp_path, monkeypatch):
    import w2wkit
    from w2wkit.diffusion.dreambooth import DreamBooth

    assert w2wkit.train is train  # the API name
    real = DreamBooth.train
    sizes = []

    def tight(self, images, *a, **kw):
        sizes.append(len(images))
        if len(images) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, images, *a, **kw)

    monkeypatch.setattr(DreamBooth, "train", tight)
    notes = []
    out = tmp_path / "oom"
    plan = train(
        people, tiny_pipe_dir, out, RECIPE, models_per_batch=6, device="cpu", warn=notes.append
    )
    assert sizes == [6, 3, 1, 1, 1, 1, 1, 1]
    assert plan.models_per_batch == 1 and plan.written == NAMES
    assert [n for n in notes if "out of memory" in n] == [
        "out of memory: models per batch halved to 3",
        "out of memory: models per batch halved to 1",
    ]
    for n in NAMES:
        fa, fb = factors(trained / f"{n}.safetensors"), factors(out / f"{n}.safetensors")
        for k in fa:
            np.testing.assert_allclose(fa[k][1], fb[k][1], rtol=1e-4, atol=1e-6)
