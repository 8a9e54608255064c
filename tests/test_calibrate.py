"""Calibrated, visible strengths (w2wkit.calibrate): measured, stored, shown, generalising."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from w2wkit.calibrate import CalibrationSettings, calibrate_direction, candidates, measure_edit
from w2wkit.edits import calibration_of, strength_range

PROMPT = "a photo of sks person"


@pytest.fixture(scope="module")
def micro(eval_micro_world: Path) -> dict[str, Any]:
    """A space of the micro world's 12 zoo files, with directions, a renderer, a classifier."""
    from w2wkit import evaluation as E
    from w2wkit.collection import Collection
    from w2wkit.directions import fit_directions
    from w2wkit.render import Renderer
    from w2wkit.space import WeightSpace

    w = E.load_eval_world(eval_micro_world, device="cpu")
    space = WeightSpace(n_components=11, random_state=0).fit(Collection([Path(p) for p in w.zoo]))
    labels = {a: v for a, v in w.labels.items() if len(np.unique(v)) == 2}
    space.set_labels(labels)
    fit_directions(space, labels, cv=2)
    return {"space": space, "renderer": Renderer(w.base, device="cpu"), "clf": w.evaluators}


FAST = CalibrationSettings(n_models=3, seeds=2, steps=2, strengths=(1.0, 4.0))


def test_plausibility_comes_from_the_pack(micro: dict[str, Any]) -> None:
    from w2wkit.concepts import SimplePack, get_pack

    space = micro["space"]
    male = space.labels_["male"]
    lacking = [i for i, b in enumerate(space.labels_["beard"]) if b == 0]
    pool, implausible = candidates(space, "beard", get_pack("identity"))
    # the identity pack's rule: beards only on men, so every woman lacking one is left out
    assert pool == [i for i in lacking if male[i] == 1]
    assert implausible == sum(1 for i in lacking if male[i] == 0) > 0
    # a pack without a rule (and no pack) keeps every model lacking the attribute
    bare = SimplePack(name="bare", instance_prompt="sks person", class_prompt="person")
    assert candidates(space, "beard", bare) == (lacking, 0)
    assert candidates(space, "beard", None) == (lacking, 0)
    assert candidates(space, "beard", "identity", exclude=pool[:1])[0] == pool[1:]


def test_calibration_is_stored_saved_and_shown(micro: dict[str, Any], tmp_path: Path) -> None:
    import copy

    from w2wkit.directions import disentangle_direction
    from w2wkit.space import WeightSpace

    space = copy.deepcopy(micro["space"])
    assert strength_range(space.directions_["male"])["calibrated"] is False
    rec = calibrate_direction(
        space,
        "male",
        micro["renderer"],
        micro["clf"],
        pack="identity",
        settings=FAST,
        prompt=PROMPT,
    )
    assert rec["strength"] in FAST.strengths and rec["n_models"] == 3
    assert rec["table"][0]["strength"] == 0.0  # the unedited pictures first
    # the stored claim: the monotone fit at the strength, its lower bound, on 3 x 2 pictures
    at = next(r for r in rec["curve"] if r["strength"] == rec["strength"])
    assert rec["success"] == pytest.approx(at["fit"]) and rec["n_pictures"] == at["n"] == 6
    assert rec["success_lower"] == pytest.approx(at["lower"])
    assert rec["success_lower"] <= rec["success"]
    assert rec["pool"] == len(candidates(space, "male", "identity")[0]) >= 3
    assert rec["reached"] == (rec["success_lower"] >= rec["target"])
    assert all(space.labels_["male"][i] == 0 for i in rec["rows"])
    json.dumps(rec, allow_nan=False)  # strict JSON: it is saved in the space
    rng = strength_range(space.directions_["male"])
    assert rng["calibrated"] and rng["default"] == rec["strength"]
    assert rng["high"] == pytest.approx(1.5 * rec["strength"]) == -rng["low"]

    space.save(tmp_path / "s")
    back = WeightSpace.load(tmp_path / "s")
    assert calibration_of(back.directions_["male"]) == rec
    assert calibration_of(back.directions_["old"]) is None  # never calibrated
    # a changed vector (here: disentangled) is not shown with the old strength
    disentangle_direction(back, "male", ["old"])
    assert calibration_of(back.directions_["male"]) is None
    assert strength_range(back.directions_["male"])["calibrated"] is False


def test_the_cli_lists_calibration(
    micro: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import copy

    from click.testing import CliRunner

    from w2wkit.cli import common
    from w2wkit.cli.main import cli

    # a wide table whatever the worker's console settled on (rows are matched whole)
    monkeypatch.setattr(common.console, "_width", 300)

    space = copy.deepcopy(micro["space"])
    calibrate_direction(
        space,
        "male",
        micro["renderer"],
        micro["clf"],
        pack="identity",
        settings=FAST,
        prompt=PROMPT,
    )
    space.save(tmp_path / "s")
    runner = CliRunner(env={"COLUMNS": "300"})
    res = runner.invoke(cli, ["directions", str(tmp_path / "s"), "--list"])
    assert res.exit_code == 0, res.output

    def row(name: str) -> str:
        return next(x for x in res.output.splitlines() if re.match(rf"^\W*{name}\b", x))

    rec = space.directions_["male"].info["calibration"]
    strength = rec["strength"]
    assert f"{strength:g} sd: " in row("male")
    # the claim: its lower bound and confidence, on how many pictures of how large a pool
    assert f">= {rec['success_lower']:.0%} at 90% confidence" in row("male")
    assert f"{rec['n_pictures']} pictures of a pool of {rec['pool']}" in row("male")
    assert "uncalibrated" in row("old")
    res = runner.invoke(cli, ["info", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "calibrated" in res.output
    # apply: a calibrated direction's default strength is the calibrated one
    out = tmp_path / "edited.safetensors"
    args = ["apply", "--space", str(tmp_path / "s"), "--direction", "male", "-o", str(out)]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    from w2wkit.formats.registry import read_adapter

    history = json.loads(read_adapter(out).metadata["w2wkit.edits"])
    assert history[-1]["strengths"] == {"male": strength}
    res = runner.invoke(cli, [*args[:4], "old", "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 1 and "needs --strength" in res.output


def test_measure_edit_refuses_unknown_attribute(micro: dict[str, Any]) -> None:
    from w2wkit.errors import DirectionError

    class NoAttrs:
        attributes = ("other",)

        def attribute_probs(self, images: np.ndarray) -> np.ndarray:
            return np.zeros((len(images), 1))

    with pytest.raises(DirectionError, match="no output for 'male'"):
        measure_edit(micro["space"], "male", [1.0], [0], micro["renderer"], NoAttrs())


@pytest.mark.slow
def test_stored_strength_holds_on_held_out_models(tmp_path: Path) -> None:
    """Shipped world, ``old``: calibrated on 40 zoo models, checked on 40 others (minutes).

    The claim checked: at the stored strength, models the calibration never saw
    succeed at the stored target, by a one-sided exact binomial test at the 5%
    level (H0: success >= 80%); the control - a quarter of the strength - must be
    rejected by the same test, so the check can fail. Why not a micro world: its
    classifier does not see these edits (``old`` on the 40-model micro world:
    success 1.0 and probability 0.77 at every strength from 0 to 16 sd), so a
    held-out claim there could neither hold nor fail for a reason. Why not
    ``beard``: on 48 zoo men it peaks at 40 of 48 (6 sd), a bound of 0.75, so
    its calibration says "missed" (docs/directions.md).
    """
    from w2wkit.calibrate import ConceptClassifier, check_heldout
    from w2wkit.render import Renderer
    from w2wkit.ui.worldspace import world_models, world_space
    from w2wkit.world.shipped import load_world

    w = load_world()
    space, _ = world_space(w, "identity", calibrate=False, n_components=200, folder=tmp_path / "s")
    r = Renderer(w.pipeline_dir, device="cpu")
    clf = ConceptClassifier(w.evaluators(), "identity")
    models = world_models(w, "identity", space)
    s = CalibrationSettings(n_models=40, seeds=1, strengths=(1.0, 2.0, 3.0, 4.0, 6.0))
    prompt = w.prompt("identity")
    rec = calibrate_direction(
        space, "old", r, clf, pack="identity", settings=s, models=models, prompt=prompt
    )
    assert rec["reached"] and rec["success_unedited"] <= 0.25, rec["curve"]
    assert rec["success_lower"] >= 0.8 and rec["n_pictures"] == 40
    held = check_heldout(space, "old", r, clf, pack="identity", n_models=40, models=models)
    assert not set(held["rows"]) & set(rec["rows"]) and held["n_models"] == 40
    assert held["unedited"]["success"] <= 0.25  # they lack it before the edit
    at, quarter = held["at"]
    assert at["fraction"] == 1.0 and quarter["fraction"] == 0.25
    assert at["consistent"], held  # P(X <= k | 40, 0.8) > 0.05
    assert not quarter["consistent"] and quarter["k"] < at["k"], held  # the control fails
