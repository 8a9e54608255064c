"""Evaluation: metrics against independent references, a tiny end-to-end run, CLI, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402

from w2wkit import evaluation as E  # noqa: E402
from w2wkit.errors import W2WError  # noqa: E402


@pytest.fixture
def micro(eval_micro_world: Path) -> Path:
    return eval_micro_world  # shared (tests/conftest.py): read only


# ------------------------------------------------------------------ metrics


def test_id_score_and_rmse_match_independent_formulas() -> None:
    from sklearn.metrics import mean_squared_error
    from sklearn.metrics.pairwise import cosine_similarity

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 7)), rng.standard_normal((3, 7))
    assert E.id_score(a, b) == pytest.approx(cosine_similarity(a, b).mean(), abs=1e-12)
    np.testing.assert_allclose(E.id_matrix(a, b), cosine_similarity(a, b), atol=1e-12)
    x = rng.random((4, 8, 8, 3))
    y = rng.random((4, 8, 8, 3))
    ref = [np.sqrt(mean_squared_error(x[i].ravel(), y[i].ravel())) for i in range(4)]
    np.testing.assert_allclose(E.pixel_rmse(x, y), ref, rtol=1e-12)
    u8 = (x * 255).astype(np.uint8)
    np.testing.assert_allclose(E.pixel_rmse(u8, u8), 0.0)
    s = E.summarize([1.0, 3.0, float("nan")])
    assert s == {"mean": 2.0, "std": 1.0, "n": 2}


def test_stylise_styles() -> None:
    from w2wkit.concepts.identity.generator import IdentityGenerator

    gen = IdentityGenerator()
    img = gen.render(gen.instance(0), 2, seed=1)
    post = E.stylise(img, "posterised")
    assert post.shape == img.shape and post.dtype == np.uint8
    # 2 bits per channel: at most 4 levels, multiples of 64
    assert set(np.unique(post)) <= {0, 64, 128, 192}
    line = E.stylise(img, "line drawing")
    assert (line == 255).mean() > 0.5  # mostly white paper
    assert np.all(line[..., 0] == line[..., 1])  # grey lines
    painted = E.stylise(img, "painted")
    assert not np.array_equal(painted, img)
    with pytest.raises(W2WError, match="unknown style"):
        E.stylise(img, "cubist")


def test_pixel_evaluators_read_attributes_and_identity(tmp_path: Path) -> None:
    from w2wkit.concepts.identity.generator import IdentityGenerator

    gen = IdentityGenerator()
    ev = E.PixelEvaluators.fit(gen, n_attr=300, n_ids=40, per_id=4, seed=321)
    # independent check on new identities: the generator's ground truth
    insts = gen.instances(80, seed=4321)
    imgs = np.concatenate([gen.render(i, 1, seed=9) for i in insts])
    probs = ev.attribute_probs(imgs)
    for attr in ("dark_hair", "beard"):
        j = ev.attributes.index(attr)
        truth = np.array([i.attributes[attr] for i in insts])
        acc = np.mean((probs[:, j] > 0.5) == truth)
        majority = max(truth.mean(), 1 - truth.mean())
        assert acc > majority, (attr, acc, majority)
    # identity: same-identity pairs score higher than different-identity pairs
    a = gen.render(insts[0], 4, seed=1)
    b = gen.render(insts[1], 4, seed=2)
    ea, eb = ev.embed(a), ev.embed(b)
    same = E.id_matrix(ea, ea)[np.triu_indices(4, 1)].mean()
    assert same > E.id_score(ea, eb)
    ev.save(tmp_path / "ev.npz")
    back = E.PixelEvaluators.load(tmp_path / "ev.npz")
    np.testing.assert_array_equal(back.embed(a), ev.embed(a))
    (tmp_path / "bad.npz").write_bytes(b"not npz")
    with pytest.raises(W2WError, match="cannot read evaluators"):
        E.PixelEvaluators.load(tmp_path / "bad.npz")


def test_edit_oracle_draws_the_identity_again_with_the_attribute() -> None:
    from w2wkit.concepts.identity.generator import IdentityGenerator

    gen = IdentityGenerator()
    insts = gen.instances(30, seed=2)

    class Pixels:  # an "embedder" that sees every pixel, a classifier that says yes
        attributes = ("beard",)
        name = "pixels"

        def embed(self, x: np.ndarray) -> np.ndarray:
            return x.reshape(len(x), -1).astype(np.float64) + 1.0

        def attribute_probs(self, x: np.ndarray) -> np.ndarray:
            return np.full((len(x), 1), 0.9)

    men = [i for i in insts if i.attributes["male"]]
    beard = E.edit_oracle(Pixels(), gen, men, "beard", n_images=2, seed=5)
    assert beard["n"] == sum(not i.attributes["beard"] for i in men) > 0  # only those lacking it
    assert 0.5 < beard["id_score"] < 1.0  # the beard changes pixels
    assert beard["success"] == 1.0
    glasses = E.edit_oracle(Pixels(), gen, insts, "glasses", n_images=2, seed=5)
    assert glasses["n"] == sum(not i.attributes["glasses"] for i in insts)
    assert np.isnan(glasses["success"])  # the classifier has no glasses output
    old = [i for i in insts if i.attributes["old"]]
    none = E.edit_oracle(Pixels(), gen, old, "old", n_images=1)
    assert none["n"] == 0 and np.isnan(none["id_score"])


# ------------------------------------------------------------------ baselines


def test_demo_on_micro_world(micro: Path, tmp_path: Path) -> None:
    from PIL import Image

    from w2wkit.demo import DemoSettings, run_demo
    from w2wkit.formats import read_adapter

    w = E.load_eval_world(micro)
    tiny = DemoSettings(n_components=6, inversion_steps=3, render_steps=2, seeds=2)
    res = run_demo(tmp_path / "d", world=w, settings=tiny, log=None, progress=False)
    for name in ("samples.png", "edits.png", "inversion.png", "explained_variance.png"):
        assert (tmp_path / "d" / "images" / name).stat().st_size > 0
    assert res["inversion"]["steps"] == 3 and res["inversion"]["recipe"]["n_components"] == 6
    html = (tmp_path / "d" / "report.html").read_text()
    assert "images/samples.png" in html and "images/edits.png" in html
    # the edited files carry the edit record and the space's layout
    ed = read_adapter(tmp_path / "d" / "loras" / "edit_beard_glasses.safetensors")
    assert "beard" in ed.metadata["w2wkit.edits"] and len(ed.layers) == len(w.zoo and ed.layers)
    # a user picture of another size: resized, and the demo says so
    big = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "me.png")
    notes: list[str] = []
    run_demo(
        tmp_path / "u",
        world=w,
        settings=tiny,
        image=tmp_path / "me.png",
        log=notes.append,
        progress=False,
    )
    assert any("64x64 resized" in n for n in notes)
    # bad input: one line each, nothing written
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(W2WError, match=r"bad\.png") as exc:
        run_demo(tmp_path / "b", world=w, settings=tiny, image=tmp_path / "bad.png", log=None)
    assert "\n" not in str(exc.value) and not (tmp_path / "b").exists()
    Image.fromarray(np.full((5, 7), 255, np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(W2WError, match="mask"):
        run_demo(
            tmp_path / "m",
            world=w,
            settings=tiny,
            image=tmp_path / "me.png",
            mask=tmp_path / "m.png",
            log=None,
            progress=False,
        )


def test_space_pipeline_mismatch_names_modules(micro: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from w2wkit.adapter import Adapter, LoraLayer
    from w2wkit.demo import DemoSettings, run_demo

    w = E.load_eval_world(micro)
    rng = np.random.default_rng(0)
    ads = [
        Adapter({"unet.no_such_block.to_q": LoraLayer(rng.random((1, 8)), rng.random((8, 1)), 1.0)})
        for _ in range(4)
    ]
    bad = replace(w, zoo=ads, zoo_names=[f"m{i}" for i in range(4)], labels={})
    with pytest.raises(W2WError, match=r"no_such_block\.to_q"):
        run_demo(
            tmp_path / "d",
            world=bad,
            settings=DemoSettings(n_components=2),
            log=None,
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []  # a failed demo leaves no folder, no temporary


def test_pick_strength_takes_the_smallest_strength_reaching_the_target() -> None:
    rows = [
        {"strength": 4.0, "success": 0.9},
        {"strength": 1.0, "success": 0.1},
        {"strength": 2.0, "success": 0.8},
    ]
    assert E.pick_strength(rows, 0.8) == (2.0, True)
    assert E.pick_strength(rows, 0.85) == (4.0, True)
    # none reaches it: the most successful, the smallest among ties
    assert E.pick_strength(rows, 0.95) == (4.0, False)
    ties = [{"strength": 3.0, "success": 0.5}, {"strength": 1.5, "success": 0.5}]
    assert E.pick_strength(ties, 0.9) == (1.5, False)


def test_excluded_by_finds_the_values_that_never_carry_the_attribute() -> None:
    rng = np.random.default_rng(0)
    male = rng.integers(0, 2, 400).astype(float)
    beard = (male == 1) & (rng.random(400) < 0.4)
    glasses = rng.integers(0, 2, 400).astype(float)
    labels = {"male": male, "beard": beard.astype(float), "glasses": glasses}
    assert E.excluded_by(labels, "beard") == {"male": 0.0}
    assert E.excluded_by(labels, "glasses") == {}
    # too few models hold the value: no rule (support)
    few = {**labels, "male": np.where(np.arange(400) < 5, 0.0, 1.0), "beard": labels["beard"]}
    few["beard"][:5] = 0.0
    assert "male" not in E.excluded_by(few, "beard")
    # missing labels are ignored, a rate above the threshold is no rule
    labels["male"][:10] = np.nan
    assert E.excluded_by(labels, "beard") == {"male": 0.0}
    beard2 = labels["beard"].copy()
    beard2[np.flatnonzero(male == 0)[:20]] = 1.0
    assert E.excluded_by({**labels, "beard": beard2}, "beard") == {}
    assert E.plausible({"male": True, "glasses": False}, {"male": 0.0})
    assert not E.plausible({"male": False}, {"male": 0.0})
    assert E.plausible({}, {"male": 0.0})  # unknown: kept


def test_edit_prompt() -> None:
    from w2wkit.baselines import edit_prompt
    from w2wkit.concepts import get_pack

    specs = {a.name: a for a in get_pack("identity").attributes}
    assert edit_prompt(specs["beard"]) == "a photo of sks person with a beard"
    assert edit_prompt(specs["old"]) == "a photo of old sks person"


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_eval_tiny_end_to_end(micro: Path, tmp_path: Path) -> None:
    w = E.load_eval_world(micro)
    out = tmp_path / "ev"
    res = E.run_eval(w, "tiny", out, progress=False)
    saved = json.loads((out / "results.json").read_text())
    assert saved["checks"].keys() == res["checks"].keys()
    for key in ("space", "inversion", "editing", "ood", "sampling", "scaling", "fidelity"):
        assert key in saved, key
    inv = saved["inversion"]
    means = []
    for m in ("w2w", "dreambooth_single", "dreambooth_multi"):
        per = inv[m]["per_identity"]
        assert inv[m]["id_score"]["n"] == len(per) == 2
        assert inv[m]["id_score"]["mean"] == pytest.approx(np.mean(per), abs=1e-12)
        means.append(inv[m]["id_score"]["mean"])
    # the micro world's LoRAs are a few steps from one base, so the three methods render
    # nearly the same pictures: their ID scores agree (measured spread 4e-4; a row swapped
    # between identities or methods, or a score of other pictures, moves it further)
    assert max(means) - min(means) < 0.01, means
    assert inv["ratio_w2w_to_multi"] == pytest.approx(means[0] / means[2])
    # the timings: DreamBooth (multi) is the held-out training, timed once and reused; the
    # per-picture w2w and single-image DreamBooth times fit in the section's wall time
    assert inv["dreambooth_multi"]["seconds"] == saved["heldout_models"]["seconds"]
    spent = sum(inv[m]["seconds"]["mean"] * 2 for m in ("w2w", "dreambooth_single"))
    assert 0 < spent < inv["seconds"] < saved["seconds"]
    assert len(saved["editing"]["attributes"]) >= 3
    assert [r["strength"] for r in saved["editing"]["sweep"]] == [1.0, 2.0]
    # strengths calibrated per attribute on zoo models (never the held-out identities)
    assert saved["editing"]["calibrated"] is True
    zoo = set(w.zoo_names)
    calibrated = [a for a in saved["editing"]["attributes"].values() if a["calibration"]]
    assert calibrated, "no attribute was calibrated"
    for attr in calibrated:
        cal = attr["calibration"]
        assert set(cal["models"]) <= zoo and len(cal["models"]) <= 2
        assert [r["strength"] for r in cal["table"]] == [1.0, 2.0]
        assert attr["strength"] == cal["strength"] == E.pick_strength(cal["table"], 0.8)[0]
    for attr in saved["editing"]["attributes"].values():  # the perfect edit, for reference
        assert attr["oracle"]["n"] == attr["n_identities"]  # the same identities
    assert saved["editing"]["overall"]["oracle"]["n"] > 0
    assert {r["n_models"] for r in saved["scaling"]["rows"]} == {6, 11}
    assert [r["components"] for r in saved["scaling"]["components_rows"]] == [2, 6]
    assert saved["fidelity"]["identity"]["n_candidates"] == 6
    cum = saved["space"]["cumulative"]
    assert bool(np.all(np.diff(cum) >= 0)) and cum[-1] <= 1 + 1e-9
    html = (out / "report.html").read_text()
    assert "Inversion" in html and "Editing" in html and "Targets" in html
    assert "perfect edit" in html
    for rel in list(saved["images"].values()) + list(saved["plots"].values()):
        assert (out / rel).stat().st_size > 0
        assert rel in html
    # deterministic given the seed
    again = E.run_eval(w, "tiny", tmp_path / "ev2", progress=False, sections=("space", "sampling"))
    assert again["sampling"]["intra_model_id"] == pytest.approx(saved["sampling"]["intra_model_id"])
    with pytest.raises(W2WError, match=r"output exists \(pass `overwrite=True`"):
        E.run_eval(w, "tiny", out, progress=False)


def test_calibration_renders_edits_as_they_are_measured(micro: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    w = E.load_eval_world(micro)
    # delayed injection below every timestep: the edited models are never used, so the
    # calibration's renders equal the unedited model's (ID score 1). Rendered without
    # injection, strength 40 moves this micro world's ID score to ~0.9997.
    s = replace(E.PROFILES["tiny"], edit_inject_t=-1.0, edit_sweep=(40.0,), edit_strength=40.0)
    res = E.run_eval(w, s, tmp_path / "ev", progress=False, sections=("space", "editing"))
    tables = [a["calibration"]["table"] for a in res["editing"]["attributes"].values()]
    assert tables and all(r["id_score"] == pytest.approx(1.0, abs=1e-6) for t in tables for r in t)
    # so is the strength sweep (the trade-off curve of the report)
    sweep = res["editing"]["sweep"]
    assert sweep and all(r["id_score"]["mean"] == pytest.approx(1.0, abs=1e-6) for r in sweep)


def test_calibration_on_heldout_models_never_evaluated(micro: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    w = E.load_eval_world(micro)  # 3 held-out identities
    s = replace(
        E.PROFILES["tiny"],
        n_heldout=1,
        edit_calibration_pool="heldout",
        edit_calibration_identities=5,  # capped at the 2 identities left
    )
    res = E.run_eval(w, s, tmp_path / "ev", progress=False, sections=("space", "editing"))
    evaluated = {f"heldout-{w.heldout[0].index}"}
    pool = {f"heldout-{i.index}" for i in w.heldout[1:]}
    cals = [a["calibration"] for a in res["editing"]["attributes"].values() if a["calibration"]]
    assert cals, "nothing was calibrated"
    for cal in cals:
        assert cal["pool"] == "heldout"
        assert set(cal["models"]) <= pool and not set(cal["models"]) & evaluated
    # the pool may not overlap the evaluated identities; unknown pools are refused
    for bad, match in (
        (replace(s, n_heldout=3), "beyond the 3 evaluated \\(the world has 3\\)"),
        (replace(s, edit_calibration_pool="both"), "must be 'zoo' or 'heldout'"),
    ):
        with pytest.raises(W2WError, match=match):
            E.run_eval(w, bad, tmp_path / "bad", progress=False, sections=("space", "editing"))
        assert not (tmp_path / "bad").exists()  # refused before any output


def test_eval_cli(micro: Path, tmp_path: Path) -> None:
    from w2wkit.cli.main import cli

    out = tmp_path / "cli"
    r = CliRunner().invoke(
        cli,
        [
            "eval",
            "--world",
            str(micro),
            "--profile",
            "tiny",
            "-o",
            str(out),
            "--sections",
            "space,sampling",
            "--inject-t",
            "off",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "report:" in r.output and (out / "report.html").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["edit_inject_t"] is None  # default 700
    assert E.EvalSettings().edit_inject_t == 700.0
    assert E.EvalSettings().edit_calibration_pool == "heldout"
    r = CliRunner().invoke(cli, ["eval", "--inject-t", "late", "-o", str(tmp_path / "y")])
    assert r.exit_code == 1 and "--inject-t must be a timestep" in r.output
    r = CliRunner().invoke(cli, ["eval", "--world", str(micro), "-o", str(out)])
    assert r.exit_code == 1 and "output exists (pass --force to replace it)" in r.output
    r = CliRunner().invoke(cli, ["eval", "--sections", "space,colour", "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "unknown section(s) colour" in r.output
    assert "Traceback" not in r.output


def test_load_world_errors(tmp_path: Path) -> None:
    with pytest.raises(W2WError, match="world folder not found"):
        E.load_eval_world(tmp_path / "nope")
    (tmp_path / "world.json").write_text(json.dumps({"format": "w2wkit-micro-world", "zoo": []}))
    with pytest.raises(W2WError):
        E.load_eval_world(tmp_path)


def test_world_records_its_training_prompt(micro: Path, tmp_path: Path) -> None:
    from w2wkit.evaluation.worlds import PHOTO_PROMPT
    from w2wkit.formats.registry import read_adapter

    prompt = "a photo of sks person"  # the shipped world's zoo prompt too
    meta = json.loads((micro / "world.json").read_text())
    assert meta["prompt"] == prompt
    w = E.load_eval_world(micro)
    assert w.instance_prompt == prompt == PHOTO_PROMPT.format(w.pack.instance_prompt)
    # the zoo files were trained with it (provenance in the file)
    first = read_adapter(micro / meta["zoo"][0]["file"])
    assert prompt in json.dumps(first.metadata)
    # a world from before the prompt was recorded falls back to the pack's bare prompt
    import shutil

    old = tmp_path / "old"
    shutil.copytree(micro, old)
    del meta["prompt"]
    (old / "world.json").write_text(json.dumps(meta))
    assert E.load_eval_world(old).instance_prompt == "sks person"


def test_eval_report_is_replaced_whole_and_keeps_the_world_built_in_it(
    micro: Path, tmp_path: Path
) -> None:
    """--force: nothing of the old report survives; OUTPUT/micro-world is reused and kept."""
    from w2wkit.cli.main import cli

    out = tmp_path / "ev"
    shutil.copytree(micro, out / "micro-world")
    (out / "images").mkdir()
    (out / "images" / "stale.png").write_bytes(b"a grid of the old report")
    (out / "results.json").write_text('{"old": true}')
    args = ["eval", "--world", "micro", "--profile", "tiny", "-o", str(out), "--sections", "space"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "output exists (pass --force" in r.output
    r = CliRunner().invoke(cli, [*args, "--force"])
    assert r.exit_code == 0, r.output
    assert "building a micro world" not in r.output  # the world in the output was reused
    assert not (out / "images" / "stale.png").exists()
    res = json.loads((out / "results.json").read_text())
    assert "old" not in res and res["complete"] and "space" in res
    meta = json.loads((micro / "world.json").read_text())
    for z in meta["zoo"]:  # the world is still there, whole
        assert (out / "micro-world" / z["file"]).read_bytes() == (micro / z["file"]).read_bytes()
    assert E.load_eval_world(out / "micro-world").name.startswith("micro")
    assert [p.name for p in tmp_path.iterdir()] == ["ev"]  # no temporary left


def test_eval_stopped_early_publishes_its_finished_sections(
    micro: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each publication is a whole report: the old one is gone, the finished sections are in."""
    out = tmp_path / "ev"
    out.mkdir()
    (out / "stale.txt").write_text("old report")

    def stop(ev: object) -> None:
        raise KeyboardInterrupt

    from w2wkit.evaluation.sections import sampling

    monkeypatch.setattr(sampling, "run", stop)
    w = E.load_eval_world(micro)
    with pytest.raises(KeyboardInterrupt):
        E.run_eval(w, "tiny", out, sections=("space", "sampling"), progress=False, overwrite=True)
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is False and "space" in res
    assert "Partial run" in (out / "report.html").read_text()
    assert all((out / rel).exists() for rel in res["plots"].values())
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ev"]  # the working folder is removed


def test_demo_mask_needs_image_in_the_callers_terms(micro: Path, tmp_path: Path) -> None:
    from PIL import Image

    from w2wkit.cli.main import cli
    from w2wkit.demo import run_demo

    Image.new("L", (8, 8), 255).save(tmp_path / "m.png")  # a real mask: only the image lacks
    with pytest.raises(W2WError, match="`mask` needs `image`"):
        run_demo(tmp_path / "d", world=micro, mask=tmp_path / "m.png", log=None, progress=False)
    r = CliRunner().invoke(
        cli,
        [
            "demo",
            "--world",
            str(micro),
            "--mask",
            str(tmp_path / "m.png"),
            "-o",
            str(tmp_path / "d"),
        ],
    )
    assert r.exit_code == 1 and "--mask needs --image" in r.output, r.output
    assert not (tmp_path / "d").exists()
    (tmp_path / "f").write_text("a file")
    r = CliRunner().invoke(cli, ["demo", "--synthetic", "--force", "-o", str(tmp_path / "f")])
    assert r.exit_code == 1 and "output exists and is not a folder" in r.output, r.output
    assert (tmp_path / "f").read_text() == "a file"


@pytest.mark.slow
def test_eval_killed_at_every_step_leaves_a_whole_report(micro: Path, tmp_path: Path) -> None:
    """SIGKILL at every atomic step of ``run_eval --force``: the old report or a whole new one."""
    import os
    import signal
    import subprocess
    import sys

    def files(folder: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()
        }

    def whole_new(folder: Path) -> bool:
        res = json.loads((folder / "results.json").read_text())
        refs = [*res["images"].values(), *res["plots"].values()]
        assert all((folder / r).stat().st_size > 0 for r in refs)
        assert "Partial run" in (folder / "report.html").read_text() or res["complete"]
        return "space" in res and not (folder / "stale.txt").exists()

    w = E.load_eval_world(micro)
    old = tmp_path / "old"
    E.run_eval(w, "tiny", old, sections=("space",), progress=False)
    (old / "stale.txt").write_text("old report")
    code = (
        "import sys; from w2wkit import evaluation as E; "
        "E.run_eval(E.load_eval_world(sys.argv[1]), 'tiny', sys.argv[2], sections=('space',), "
        "progress=False, overwrite=True)"
    )
    seen, k = [], 0
    while True:
        k += 1
        out = tmp_path / f"k{k}" / "ev"
        shutil.copytree(old, out)
        env = {**os.environ, "W2WKIT_TEST_DIE_AFTER": str(k)}
        proc = subprocess.run(
            [sys.executable, "-c", code, str(micro), str(out)], env=env, capture_output=True
        )
        if proc.returncode == 0:
            break  # k is past the last step
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        seen.append("old" if files(out) == files(old) else "new" if whole_new(out) else "mix")
        E.run_eval(w, "tiny", out, sections=("space",), progress=False, overwrite=True)
        assert whole_new(out) and json.loads((out / "results.json").read_text())["complete"]
        assert [p.name for p in out.parent.iterdir()] == ["ev"], f"step {k}: temporaries left"
        shutil.rmtree(out.parent)
    assert "mix" not in seen and seen[0] == "old" and seen[-1] == "new", seen
