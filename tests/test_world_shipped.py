"""`world build` (micro) end to end: shipped files load, hashes match, resume, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402

from w2wkit.cli.main import cli  # noqa: E402
from w2wkit.errors import W2WError  # noqa: E402
from w2wkit.formats.registry import read_adapter  # noqa: E402
from w2wkit.world.builder import build_world  # noqa: E402
from w2wkit.world.shipped import load_world, verify_world  # noqa: E402


@pytest.fixture
def work(micro_world: Path) -> Path:
    return micro_world  # shared (tests/conftest.py): read only, copy it to change it


def test_shipped_files_load_and_hashes_match(work: Path) -> None:
    root = work / "shipped"
    man = json.loads((root / "manifest.json").read_text())
    assert {"pipeline/unet/diffusion_pytorch_model.safetensors", "loras.safetensors"} <= set(
        man["files"]
    )
    for rel, info in man["files"].items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == info["sha256"]
    assert man["total_bytes"] == sum((root / r).stat().st_size for r in man["files"])
    w = load_world(root)
    assert w.concepts == ["identity", "dog"]
    assert len(w.names("identity")) == 6 and len(w.names("dog")) == 3
    # the stacked LoRA of a model is its trained file, stored in float16
    name = w.names("identity")[2]
    trained = read_adapter(work / "zoo" / "identity" / f"{name}.safetensors")
    shipped = w.adapter("identity", name)
    assert list(shipped.layers) == list(trained.layers)
    stored = safetensors.numpy.load_file(str(root / "loras.safetensors"))
    assert {v.dtype for v in stored.values()} == {np.dtype(np.float16)}
    for k, layer in trained.layers.items():
        assert shipped.layers[k].down.dtype == np.float32
        np.testing.assert_array_equal(shipped.layers[k].down, layer.down.astype(np.float16))
        np.testing.assert_array_equal(shipped.layers[k].up, layer.up.astype(np.float16))
    held = w.heldout()
    assert held["renders"].shape == (3, 3, 32, 32, 3) and len(held["names"]) == 3
    assert not set(held["names"]) & set(w.names("identity"))
    assert held["vectors"].shape[1] == len(held["attribute_names"]) + len(held["param_names"])
    ev = w.evaluators()
    assert ev.attributes("dog", held["renders"][0]).shape == (3, 8)
    pipe = w.load_pipeline()
    assert pipe.unet.dtype == torch.float32
    img = pipe("a photo of a person", num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 32, 32, 3)
    log = w.build_log
    assert {"base", "zoo", "heldout", "evaluators", "metrics", "pack"} <= set(log["phases"])
    m = log["phases"]["metrics"]["result"]
    assert m["identity"]["fidelity_models"] == 3 and m["identity"]["candidates"] == 3
    assert m["explained_variance_identity"]["models"] == 6


def test_export_and_fit_and_cli(work: Path, tmp_path: Path) -> None:
    root = work / "shipped"
    r = CliRunner()
    res = r.invoke(cli, ["world", "export-loras", "--world", str(root), "-o", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    files = sorted((tmp_path / "e").glob("*.safetensors"))
    assert len(files) == 6 and (tmp_path / "e" / "labels.csv").exists()
    res = r.invoke(cli, ["fit", str(tmp_path / "e"), "-o", str(tmp_path / "sp"), "-k", "3"])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli, ["world", "info", "--world", str(root)])
    assert res.exit_code == 0 and "identity: 6" in res.output, res.output
    assert "'a photo of sks person'" in res.output  # the prompt the LoRAs were trained with
    res = r.invoke(cli, ["world", "verify", "--world", str(root)])
    assert res.exit_code == 0 and "ok" in res.output
    res = r.invoke(
        cli,
        [
            "world",
            "export-loras",
            "--world",
            str(root),
            "-o",
            str(tmp_path / "x"),
            "--concept",
            "cat",
        ],
    )
    assert res.exit_code == 1 and "known: identity, dog" in res.output


def test_export_checks_every_output_first(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    out.mkdir()
    (out / "labels.csv").write_text("mine")  # only labels.csv clashes: it used to be overwritten
    (out / "keep.txt").write_text("mine")
    args = ["world", "export-loras", "--world", str(work / "shipped"), "-o", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "labels.csv: output exists" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "labels.csv"]
    assert (out / "labels.csv").read_text() == "mine"
    res = CliRunner().invoke(cli, [*args, "--force"])
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("*.safetensors"))) == 6 and (out / "keep.txt").read_text() == "mine"
    assert (out / "labels.csv").read_text() != "mine"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_corrupted_file_is_named(work: Path, tmp_path: Path) -> None:
    copy = tmp_path / "w"
    shutil.copytree(work / "shipped", copy)
    target = copy / "evaluators.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(W2WError, match="corrupted") as exc:
        verify_world(copy)
    assert "evaluators.safetensors" in str(exc.value)
    res = CliRunner().invoke(cli, ["world", "verify", "--world", str(copy)])
    assert res.exit_code == 1 and "evaluators.safetensors" in res.output
    assert len(res.output.strip().splitlines()) == 1
    with pytest.raises(W2WError, match=r"manifest\.json missing"):
        load_world(tmp_path / "nothing")


def test_interrupted_build_resumes(micro_world: Path, tmp_path: Path) -> None:
    # on a copy (copytree keeps the modification times the resume is judged by): this test
    # deletes and rebuilds part of the build, which the other tests here read
    work = tmp_path / "build"
    shutil.copytree(micro_world, work)
    unet = work / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    t_unet = unet.stat().st_mtime_ns
    zoo = work / "zoo" / "identity"
    kept = sorted(zoo.glob("*.safetensors"))[:-1]
    t_kept = [f.stat().st_mtime_ns for f in kept]
    # simulate a build stopped inside the zoo phase: one model and the rest missing
    sorted(zoo.glob("*.safetensors"))[-1].unlink()
    (zoo / "manifest.json").unlink()
    for p in ("metrics.json",):
        (work / p).unlink()
    shutil.rmtree(work / "shipped")
    log = build_world(work, "micro", device="cpu", workers=1)
    zlog = log["phases"]["zoo"]["result"]["identity"]
    assert zlog["trained"] == 1 and zlog["skipped"] == 5
    assert unet.stat().st_mtime_ns == t_unet
    assert [f.stat().st_mtime_ns for f in kept] == t_kept
    assert log["phases"]["base"].get("resumed") is True
    assert (work / "shipped" / "manifest.json").exists()
    verify_world(work / "shipped")
    # the metrics phase rendered through the engine's sampler without a swallowed error
    metrics = json.loads((work / "metrics.json").read_text())
    for key in ("base_prompting", "sampled_identity_models"):
        assert "error" not in metrics[key], metrics[key]


def test_unknown_concept_for_zoo_command(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        cli, ["world", "zoo", str(tmp_path), "-o", str(tmp_path / "z"), "--concept", "cat"]
    )
    assert res.exit_code == 1 and "identity" in res.output and "dog" in res.output


def test_gpu_profile_only_widens_the_base_batch() -> None:
    from dataclasses import replace

    from w2wkit.world.profiles import GPU_BASE_BATCH, GPU_BASE_STEPS, PROFILES, profile

    assert PROFILES == ("full", "full-gpu", "full-cpu", "micro")
    full, gpu = profile("full", seed=3, device="cuda"), profile("full-gpu", seed=3, device="cuda")
    assert full.base.unet_batch == 8 and gpu.base.unet_batch == GPU_BASE_BATCH == 64
    assert gpu.base.unet_steps == GPU_BASE_STEPS
    assert gpu.name == "full-gpu"
    # everything else, the zoo recipe included, is the full profile's
    base = replace(
        gpu.base, unet_batch=8, unet_lr=full.base.unet_lr, unet_steps=full.base.unet_steps
    )
    assert replace(gpu, name="full", base=base) == full


def test_reused_evaluators_give_their_time_share_to_the_other_phases() -> None:
    from w2wkit.world.builder import PHASE_SHARES, _Clock

    plain, free = _Clock(1000.0), _Clock(1000.0, free=("evaluators",))
    # the UNet's share of the time left at the VAE phase grows by the evaluators' share
    rest = sum(list(PHASE_SHARES.values())[1:])
    assert plain.share("unet", "vae") == pytest.approx(PHASE_SHARES["unet"] / rest)
    assert free.share("unet", "vae") == pytest.approx(
        PHASE_SHARES["unet"] / (rest - PHASE_SHARES["evaluators"])
    )
    assert free.share("evaluators", "vae") == 0.0
    assert sum(free.share(p, "render") for p in PHASE_SHARES) == pytest.approx(1.0)
    assert _Clock(None).budget("unet") is None


def test_cpu_profile_only_changes_the_base_threads_and_steps() -> None:
    from dataclasses import replace

    from w2wkit.world.profiles import CPU_BASE_STEPS, CPU_BASE_THREADS, profile

    full, cpu = profile("full", seed=2), profile("full-cpu", seed=2)
    assert cpu.base.threads == CPU_BASE_THREADS == 2 and cpu.base.unet_steps == CPU_BASE_STEPS
    same = replace(
        cpu,
        name="full",
        base=replace(cpu.base, threads=full.base.threads, unet_steps=full.base.unet_steps),
    )
    assert same == full
    # the packed world must stay within 40 MB: 1,000 identities + 200 breeds
    assert (full.n_identities, full.n_dogs) == (1000, 200)


def test_build_can_reuse_the_evaluators_of_another_world(work: Path, tmp_path: Path) -> None:
    # a rebuild that resumes base, zoo and held-out set from the first build and takes the
    # evaluators of its packed world instead of training them
    second = tmp_path / "second"
    second.mkdir()
    for part in ("base", "zoo", "heldout"):
        shutil.copytree(work / part, second / part)
    res = CliRunner().invoke(
        cli,
        [
            "world",
            "build",
            "--out",
            str(second),
            "--profile",
            "micro",
            "--device",
            "cpu",
            "--workers",
            "1",
            "--evaluators-from",
            str(work / "shipped"),
        ],
    )
    assert res.exit_code == 0, res.output
    for name in ("evaluators.safetensors", "evaluators.json"):
        want = (work / "shipped" / name).read_bytes()
        assert (second / "evaluators" / name).read_bytes() == want
        assert (second / "shipped" / name).read_bytes() == want
    rec = json.loads((second / "build_log.json").read_text())["phases"]["evaluators"]["result"]
    assert rec["reused_from"] == str(work / "shipped")
    assert set(rec["sha256"]) == {"evaluators.safetensors", "evaluators.json"}
    assert "identity" in rec and "dog" in rec  # the source's metrics


def test_reusing_evaluators_refuses_bad_sources(work: Path, tmp_path: Path) -> None:
    from w2wkit.world.builder import _reuse_evaluators

    with pytest.raises(W2WError, match="no evaluators to reuse") as info:
        _reuse_evaluators(tmp_path / "ev", tmp_path)
    assert "evaluators.safetensors" in str(info.value)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(work / "shipped" / "evaluators.safetensors", other / "evaluators.safetensors")
    desc = json.loads((work / "shipped" / "evaluators.json").read_text())
    desc["attributes"]["identity"] = ["beard"]
    (other / "evaluators.json").write_text(json.dumps(desc))
    with pytest.raises(W2WError, match="other attributes"):
        _reuse_evaluators(tmp_path / "ev", other)
    (other / "evaluators.json").write_text("{not json")
    with pytest.raises(W2WError, match="not an evaluators description"):
        _reuse_evaluators(tmp_path / "ev", other)
    assert not (tmp_path / "ev").exists()  # nothing partial
    # the build refuses a bad source before its first phase, and writes nothing
    args = ["--out", str(tmp_path / "b"), "--profile", "micro", "--device", "cpu"]
    res = CliRunner().invoke(cli, ["world", "build", *args, "--evaluators-from", str(other)])
    assert res.exit_code == 1 and "evaluators.json" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "b").exists()


def test_measure_repeats_the_builds_fidelity_test(work: Path, tmp_path: Path) -> None:
    from w2wkit.world.measure import FidelitySettings, fidelity_settings, measure_world
    from w2wkit.world.profiles import profile

    built = load_world(work / "shipped").build_log["phases"]["metrics"]["result"]["identity"]
    s = fidelity_settings(profile("micro"))
    res = measure_world(work / "shipped", ("identity",), s)["identity"]
    # same models drawn; generations differ only by the float16 storage of the stack
    assert res["tested_models"] == built["tested_models"]
    assert res["fidelity_settings"] == built["fidelity_settings"]
    assert abs(res["id_score_gen_vs_own_refs"] - built["id_score_gen_vs_own_refs"]) < 0.05
    # the top-1 recorded by the build is the one this direct re-run computes (same models and
    # candidates; the float16 storage moved the scores by about 1e-5, no ranking)
    assert res["fidelity_top1"] == built["fidelity_top1"]
    assert res["fidelity_top1_per_image"] == built["fidelity_top1_per_image"]
    more = measure_world(work / "shipped", ("dog",), FidelitySettings(models=2, generations=3))
    assert more["dog"]["generations_per_model"] == 3 and more["dog"]["candidates"] == 3
    # CLI: JSON out, refuses to replace it, bad values and concepts are one line
    r = CliRunner()
    args = ["world", "measure", "--world", str(work / "shipped"), "--concept", "identity"]
    out = tmp_path / "m.json"
    res = r.invoke(cli, [*args, "--models", "2", "--steps", "1", "-o", str(out)])
    assert res.exit_code == 0 and "fidelity top-1" in res.output, res.output
    assert json.loads(out.read_text())["identity"]["fidelity_models"] == 2
    res = r.invoke(cli, [*args, "-o", str(out)])
    assert res.exit_code == 1 and "--force" in res.output
    for bad, word in (("--generations=0", "generations"), ("--candidates=1", "candidates")):
        res = r.invoke(cli, [*args, bad])
        assert res.exit_code == 1 and word in res.output and "Traceback" not in res.output
    res = r.invoke(cli, ["world", "measure", "--world", str(work / "shipped"), "--concept", "cat"])
    assert res.exit_code == 1 and "known: identity, dog" in res.output
    # --record: the build log gains the measurement, the world still verifies
    copy = tmp_path / "world"
    shutil.copytree(work / "shipped", copy)
    args = ["world", "measure", "--world", str(copy), "--models", "2", "--steps", "1"]
    res = r.invoke(cli, [*args, "--record"])
    assert res.exit_code == 0 and "recorded in" in res.output, res.output
    entry = load_world(copy).build_log["measurements"][-1]
    assert entry["identity"]["fidelity_models"] == 2 and "dog" in entry and "when" in entry
    # the entry names the evaluators that scored it
    weights = (copy / "evaluators.safetensors").read_bytes()
    assert entry["evaluators_sha256"] == hashlib.sha256(weights).hexdigest()[:16]
    assert r.invoke(cli, ["world", "verify", "--world", str(copy)]).exit_code == 0
    res = r.invoke(cli, ["world", "info", "--world", str(copy)])
    assert res.exit_code == 0 and "re-measured" in res.output, res.output
    assert entry["evaluators_sha256"][:8] in res.output  # which evaluators scored it
    # a damaged world is refused before anything is measured or recorded
    with open(copy / "heldout.json", "a") as fh:
        fh.write(" ")
    res = r.invoke(cli, [*args, "--record"])
    assert res.exit_code == 1 and "heldout.json" in res.output and "Traceback" not in res.output
    assert len(json.loads((copy / "build_log.json").read_text())["measurements"]) == 1


def test_measure_defaults_are_the_full_profiles() -> None:
    from w2wkit.world.measure import FidelitySettings, fidelity_settings
    from w2wkit.world.profiles import profile

    assert FidelitySettings() == fidelity_settings(profile("full"))
    assert FidelitySettings() == fidelity_settings(profile("full-gpu"))


def test_retrain_embedder_replaces_only_the_identity_embedder(work: Path, tmp_path: Path) -> None:
    from w2wkit.world.profiles import profile_from_log
    from w2wkit.world.retrain import retrain_embedder

    root = tmp_path / "w"
    shutil.copytree(work / "shipped", root)
    before = safetensors.numpy.load_file(str(root / "evaluators.safetensors"))
    # the micro build trained its embedder with transient attributes varied (0.3);
    # training again without variation gives another embedder
    res = CliRunner().invoke(
        cli, ["world", "retrain-embedder", "--world", str(root), "--vary", "0", "--steps", "12"]
    )
    assert res.exit_code == 0, res.output
    assert "verification ROC-AUC" in res.output and "perfect glasses edit" in res.output
    after = safetensors.numpy.load_file(str(root / "evaluators.safetensors"))
    assert after.keys() == before.keys()
    changed = {k for k in after if not np.allclose(after[k], before[k], rtol=2e-3, atol=1e-5)}
    assert changed and all(k.startswith("emb.identity.") for k in changed)
    for k in after:  # the other evaluators: bit for bit
        if not k.startswith("emb.identity."):
            np.testing.assert_array_equal(after[k], before[k])
    verify_world(root)  # the manifest was rewritten
    log = json.loads((root / "build_log.json").read_text())
    (rev,) = log["revisions"]
    assert rev["vary"] == 0.0 and rev["training"]["steps"] == 12
    assert set(rev["after"]["transient_id"]) == {"beard", "glasses", "lipstick", "old"}
    info = json.loads((root / "evaluators.json").read_text())
    assert info["metrics"]["identity"]["verification_auc"] == rev["after"]["verification_auc"]
    assert info["embedder_settings"]["vary"] == 0.0
    w = load_world(root)
    assert w.evaluators().embed("identity", np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 16)
    assert "revision" in CliRunner().invoke(cli, ["world", "info", "--world", str(root)]).output
    # deterministic given the settings and the thread count (another thread count sums in
    # another order, which Adam amplifies); the call leaves the thread count as it was
    threads = torch.get_num_threads()
    runs = []
    for _ in range(2):
        retrain_embedder(root, vary=0.3, threads=1, progress=False)
        runs.append(safetensors.numpy.load_file(str(root / "evaluators.safetensors")))
    assert torch.get_num_threads() == threads
    for k in before:
        np.testing.assert_array_equal(runs[0][k], runs[1][k])
    # logs of worlds built before the option trained without variation
    prof = json.loads((root / "build_log.json").read_text())["profile"]
    prof.pop("eval_id_vary")
    prof.pop("eval_id_vary_tied")
    assert profile_from_log(prof).eval_id_vary == 0.0
    # ... and before the tied variation, world v1.1's retrain toggled the flags alone
    assert not profile_from_log(prof).eval_id_vary_tied
    assert rev["vary_tied"] is True and info["embedder_settings"]["vary_tied"] is True
    # --flags-only trains world v1.1's way (the attribute flags toggled alone)
    cmd = ["world", "retrain-embedder", "--world", str(root), "--steps", "2", "--flags-only"]
    assert CliRunner().invoke(cli, cmd).exit_code == 0
    last = json.loads((root / "build_log.json").read_text())["revisions"][-1]
    assert last["vary_tied"] is False
    settings = json.loads((root / "evaluators.json").read_text())["embedder_settings"]
    assert settings["vary_tied"] is False


def test_retrain_embedder_dog_replaces_only_the_dog_embedder(work: Path, tmp_path: Path) -> None:
    root = tmp_path / "w"
    shutil.copytree(work / "shipped", root)
    before = safetensors.numpy.load_file(str(root / "evaluators.safetensors"))
    settings_before = json.loads((root / "evaluators.json").read_text()).get(
        "embedder_settings", {}
    )
    res = CliRunner().invoke(
        cli,
        ["world", "retrain-embedder", "--world", str(root), "--concept", "dog", "--steps", "12"],
    )
    assert res.exit_code == 0, res.output
    assert "dog embedder retrained" in res.output and "perfect" not in res.output
    after = safetensors.numpy.load_file(str(root / "evaluators.safetensors"))
    changed = {k for k in after if not np.array_equal(after[k], before[k])}
    assert changed and all(k.startswith("emb.dog.") for k in changed)
    verify_world(root)
    (rev,) = json.loads((root / "build_log.json").read_text())["revisions"]
    assert rev["concept"] == "dog" and rev["vary"] is None and rev["training"]["steps"] == 12
    assert "transient_id" not in rev["after"]
    # "before" re-scores the build's embedder on re-rendered pictures: the build's own number
    auc_built = json.loads((work / "shipped" / "evaluators.json").read_text())["metrics"]["dog"]
    assert rev["before"]["verification_auc"] == auc_built["verification_auc"]
    info = json.loads((root / "evaluators.json").read_text())
    assert info["metrics"]["dog"]["verification_auc"] == rev["after"]["verification_auc"]
    # the identity embedder's settings stay recorded beside the dog's
    assert info["embedder_settings"]["dog"]["steps"] == 12
    for key in ("identity", "vary"):
        assert info["embedder_settings"].get(key) == settings_before.get(key)
    shown = CliRunner().invoke(cli, ["world", "info", "--world", str(root)]).output
    assert "dog embedder retrained" in shown and "perfect-edit" not in shown


def test_retrain_embedder_refuses_bad_input(work: Path, tmp_path: Path) -> None:
    root = tmp_path / "w"
    shutil.copytree(work / "shipped", root)
    cmd = ["world", "retrain-embedder", "--world", str(root)]
    res = CliRunner().invoke(cli, [*cmd, "--vary", "2"])
    assert res.exit_code == 2 and "--vary" in res.output
    res = CliRunner().invoke(cli, [*cmd, "--concept", "cat"])
    assert res.exit_code == 2 and "--concept" in res.output
    for extra in (["--vary", "0.3"], ["--flags-only"], ["--tied"]):
        res = CliRunner().invoke(cli, [*cmd, "--concept", "dog", *extra])
        assert res.exit_code == 1 and "identity embedder only" in res.output
    assert "Traceback" not in res.output
    if not torch.cuda.is_available():  # one line, not a traceback
        res = CliRunner().invoke(cli, [*cmd, "--device", "cuda"])
        assert res.exit_code == 1 and "option --device: 'cuda' asked for" in res.output
    weights = (root / "evaluators.safetensors").read_bytes()
    (root / "heldout.json").write_text("{}")  # damaged: refused before any work
    res = CliRunner().invoke(cli, ["world", "retrain-embedder", "--world", str(root)])
    assert res.exit_code != 0 and "heldout.json" in res.output
    assert "Traceback" not in res.output
    assert (root / "evaluators.safetensors").read_bytes() == weights
    assert not (root / ".retrain-embedder").exists()


def _stack(root: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(root / "loras.safetensors"))


def test_retrain_zoo_replaces_only_that_concept(work: Path, tmp_path: Path) -> None:
    from w2wkit.world.retrain import retrain_zoo

    root = tmp_path / "w"
    shutil.copytree(work / "shipped", root)
    before = _stack(root)
    wdir = tmp_path / "train"
    res = CliRunner().invoke(
        cli,
        ["world", "retrain-zoo", "--world", str(root), "--concept", "dog", "--steps", "5"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    assert "dog zoo retrained: 3 models" in res.output and "steps 3 -> 5" in res.output
    after = _stack(root)
    assert after.keys() == before.keys()
    changed = {k for k in after if not np.array_equal(after[k], before[k])}
    assert changed and all(k.startswith("dog.") for k in changed)  # identity: bit for bit
    assert {after[k].dtype for k in after} == {np.dtype(np.float16)}
    verify_world(root)  # the manifest was rewritten
    w = load_world(root)
    assert w.stack_meta["concepts"]["dog"]["recipe"]["steps"] == 5
    assert "recipe" not in w.stack_meta["concepts"]["identity"]
    (rev,) = w.build_log["revisions"]
    assert rev["kind"] == "zoo" and rev["concept"] == "dog" and rev["models"] == 3
    assert rev["recipe_before"]["steps"] == 3 and rev["recipe"]["steps"] == 5
    assert rev["mean_loss"] is not None and rev["trained"] == 3
    shown = CliRunner().invoke(cli, ["world", "info", "--world", str(root)]).output
    assert "dog zoo retrained" in shown and "steps 3 ->" in shown  # (the table wraps)
    # the default work folder is temporary: nothing is left beside the world
    assert sorted(p.name for p in root.iterdir()) == sorted(
        p.name for p in (work / "shipped").iterdir()
    )
    # the stacked model is the trained file (float16); a kept work folder resumes:
    # finished models are skipped, a missing one is trained again
    entry = retrain_zoo(root, "dog", steps=5, work=wdir, progress=False)
    assert entry["trained"] == 3 and entry["recipe_before"]["steps"] == 5
    files = sorted(wdir.glob("*.safetensors"))
    assert len(files) == 3 and (wdir / "recipe.json").exists()
    first = _stack(root)
    name = load_world(root).names("dog")[1]
    ad = read_adapter(wdir / f"{name}.safetensors")
    t = load_world(root).targets[0]
    np.testing.assert_array_equal(
        first[f"dog.down.{t}"][1], ad.layers[f"unet.{t}"].down.astype(np.float16)
    )
    (wdir / f"{name}.safetensors").unlink()
    # (how the models are split into chunks is not part of the recipe)
    entry = retrain_zoo(root, "dog", steps=5, work=wdir, chunk=1, progress=False)
    assert entry["trained"] == 1 and entry["skipped"] == 2
    again = _stack(root)
    for k in first:  # deterministic per model (the seeds are the model's own)
        np.testing.assert_allclose(
            again[k].astype(np.float32), first[k].astype(np.float32), rtol=1e-2, atol=1e-3
        )
    # the same recipe trained afresh gives the same models, bit for bit
    retrain_zoo(root, "dog", steps=5, work=tmp_path / "fresh", threads=1, progress=False)
    fresh = _stack(root)
    for k in first:
        np.testing.assert_array_equal(fresh[k], first[k])
    # a later revision starts from the current recipe (steps 5), not the build's
    entry = retrain_zoo(root, "dog", lr=2e-3, work=tmp_path / "lr", progress=False)
    assert entry["recipe_before"] == {"steps": 5, "lr": 1e-3, "batch": 2, "n_images": 3}
    assert entry["recipe"] == {**entry["recipe_before"], "lr": 2e-3}
    verify_world(root)


def test_retrain_zoo_continues_the_current_models(work: Path, tmp_path: Path) -> None:
    from w2wkit.world.retrain import recipe_rounds, retrain_zoo, total_steps

    root = tmp_path / "w"
    shutil.copytree(work / "shipped", root)
    before = _stack(root)
    cmd = ["world", "retrain-zoo", "--world", str(root), "--concept", "dog"]
    res = CliRunner().invoke(cli, [*cmd, "--continue", "--steps", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "continued for 2 steps (5 in all)" in res.output  # the build trained 3
    after = _stack(root)
    lr = load_world(root).stack_meta["concepts"]["dog"]["recipe"]["lr"]
    for k in after:
        moved = np.abs(after[k].astype(np.float32) - before[k].astype(np.float32)).max()
        if k.startswith("identity."):
            assert moved == 0
        elif ".up." in k:  # two Adam steps from the shipped factors, not a fresh model
            assert 0 < moved <= 2 * lr * 1.01 + 1e-3  # (+ float16 rounding)
    w = load_world(root)
    recipe = w.stack_meta["concepts"]["dog"]["recipe"]
    assert recipe["continued_from"] == {"steps": 3, "lr": lr, "batch": 2, "n_images": 3}
    assert total_steps(recipe) == 5
    rev = w.build_log["revisions"][-1]
    assert rev["continued"] and rev["total_steps"] == 5
    shown = CliRunner().invoke(cli, ["world", "info", "--world", str(root)]).output
    assert "dog zoo retrained" in shown and "continued" in shown  # (the table wraps)
    # a second continuation chains the rounds; a retrain from scratch starts the chain anew
    entry = retrain_zoo(root, "dog", steps=1, continue_training=True, progress=False)
    assert [r["steps"] for r in recipe_rounds(entry["recipe"])] == [3, 2, 1]
    assert entry["total_steps"] == 6
    entry = retrain_zoo(root, "dog", steps=4, progress=False)
    assert "continued_from" not in entry["recipe"] and entry["total_steps"] == 4
    assert entry["recipe_before"]["continued_from"]["steps"] == 2
    # a kept work folder of a from-scratch run does not hold continued models
    wdir = tmp_path / "train"
    retrain_zoo(root, "dog", steps=1, work=wdir, progress=False)
    res = CliRunner().invoke(cli, [*cmd, "--continue", "--work", str(wdir)])
    assert res.exit_code == 1 and "another world or recipe" in res.output
    verify_world(root)


def test_retrain_zoo_refuses_bad_input(work: Path, tmp_path: Path) -> None:
    from w2wkit.world.retrain import retrain_zoo

    root = tmp_path / "w"
    shutil.copytree(work / "shipped", root)
    stack = (root / "loras.safetensors").read_bytes()
    cmd = ["world", "retrain-zoo", "--world", str(root)]
    for extra, name in (
        (["--concept", "cat"], "--concept"),
        (["--steps", "0"], "--steps"),
        (["--lr", "0"], "--lr"),
        (["--images", "0"], "--images"),
        (["--chunk", "0"], "--chunk"),
    ):
        res = CliRunner().invoke(cli, [*cmd, *extra])
        assert res.exit_code == 2 and name in res.output, res.output
    for kw, key in (
        ({"steps": 0}, "steps"),
        ({"lr": float("nan")}, "lr"),
        ({"batch": -1}, "batch"),
        ({"chunk": 0}, "chunk"),
    ):
        with pytest.raises(W2WError, match=key):
            retrain_zoo(root, "dog", progress=False, **kw)
    with pytest.raises(W2WError, match="unknown concept"):
        retrain_zoo(root, "cat", progress=False)
    # a work folder of another recipe, or with LoRA files of unknown origin, is refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "recipe.json").write_text(json.dumps({"world": "elsewhere"}))
    res = CliRunner().invoke(cli, [*cmd, "--work", str(other)])
    assert res.exit_code == 1 and "another world or recipe" in res.output
    assert str(other) in res.output and "Traceback" not in res.output
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "x.safetensors").write_bytes(b"")
    res = CliRunner().invoke(cli, [*cmd, "--work", str(stray)])
    assert res.exit_code == 1 and "no recipe.json" in res.output
    if not torch.cuda.is_available():
        res = CliRunner().invoke(cli, [*cmd, "--device", "cuda"])
        assert res.exit_code == 1 and "option --device: 'cuda' asked for" in res.output
    (root / "heldout.json").write_text("{}")  # damaged: refused before any work
    res = CliRunner().invoke(cli, cmd)
    assert res.exit_code == 1 and "heldout.json" in res.output and "Traceback" not in res.output
    assert (root / "loras.safetensors").read_bytes() == stack


def test_an_interrupted_revision_is_undone_or_kept(work: Path, tmp_path: Path) -> None:
    from w2wkit.world.shipped import BACKUP, repair_world, revision, write_manifest

    root = tmp_path / "w"
    shutil.copytree(work / "shipped", root)
    names = ["loras.safetensors", "build_log.json", "manifest.json"]
    original = {n: (root / n).read_bytes() for n in names}
    # the body raises: every file is put back and the error goes on
    with pytest.raises(RuntimeError, match="boom"), revision(root, ["loras.safetensors"]):
        (root / "loras.safetensors").write_bytes(b"half written")
        (root / "new.txt").write_text("x")
        raise RuntimeError("boom")
    assert {n: (root / n).read_bytes() for n in names} == original
    assert not (root / BACKUP).exists()
    (root / "new.txt").unlink()
    # the process dies half-way (the context is entered and never left): every command that
    # loads the world names the interruption; --repair restores the files as they were
    cm = revision(root, ["loras.safetensors"])
    cm.__enter__()
    (root / "loras.safetensors").write_bytes(b"half written")
    (root / "build_log.json").write_text("{}")
    with pytest.raises(W2WError, match="interrupted"):
        load_world(root)
    res = CliRunner().invoke(cli, ["world", "verify", "--world", str(root)])
    assert res.exit_code == 1 and "--repair" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["world", "verify", "--world", str(root), "--repair"])
    assert res.exit_code == 0 and "restored" in res.output and "ok:" in res.output
    assert {n: (root / n).read_bytes() for n in names} == original
    assert not (root / BACKUP).exists()
    # it dies after writing every file: --repair keeps the revision
    cm = revision(root, ["labels_dog.csv"])
    cm.__enter__()
    (root / "labels_dog.csv").write_text((root / "labels_dog.csv").read_text() + "\n")
    write_manifest(root)  # (the backup folder is not listed)
    assert BACKUP not in (root / "manifest.json").read_text()
    assert repair_world(root) == "kept"
    assert (root / "labels_dog.csv").read_text().endswith("\n\n")
    verify_world(root)
    # a backup cut short (no journal) means nothing was rewritten
    (root / BACKUP).mkdir()
    assert repair_world(root) == "none" and not (root / BACKUP).exists()
    assert repair_world(root) == "none"


def test_retrain_zoo_failing_while_writing_leaves_the_world_as_it_was(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import w2wkit.stio
    from w2wkit.world.retrain import retrain_zoo

    root = tmp_path / "w"
    shutil.copytree(work / "shipped", root)
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}

    def fail(*args: object, **kw: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(w2wkit.stio, "write_json", fail)  # the build log, after the stack
    with pytest.raises(OSError, match="disk full"):
        retrain_zoo(root, "dog", steps=1, progress=False)
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before
    verify_world(root)
