"""world/oracle.py: a world's evaluators judged per concept, and the perfect edit through them."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from w2wkit.concepts.identity.generator import IdentityGenerator  # noqa: E402
from w2wkit.world.evaluators import Evaluators, make_net  # noqa: E402
from w2wkit.world.oracle import WorldEvaluators, edit_oracle, to_uint8, unit  # noqa: E402


@pytest.fixture(scope="module")
def evaluators() -> Evaluators:
    """Two concepts with different (untrained, seeded) networks."""
    torch.manual_seed(0)
    nets = {}
    for concept, n_attr in (("identity", 3), ("dog", 2)):
        nets[("attr", concept)] = make_net(n_attr, width=8).eval()
        nets[("emb", concept)] = make_net(6, width=8).eval()
    config = {
        "attributes": {"identity": ["beard", "glasses", "old"], "dog": ["spots", "ears"]},
        "metrics": {"auc": 0.5},
    }
    return Evaluators(nets, config)


def test_world_evaluators_judge_one_concept_in_uint8(evaluators: Evaluators) -> None:
    rng = np.random.default_rng(0)
    floats = rng.random((4, 32, 32, 3))
    pics = to_uint8(floats)
    np.testing.assert_array_equal(pics, np.round(floats * 255).astype(np.uint8))
    for concept in ("identity", "dog"):
        judge = WorldEvaluators(evaluators, concept)
        assert judge.attributes == evaluators.attribute_names(concept)
        assert judge.metrics == {"metrics": {"auc": 0.5}}
        p = judge.attribute_probs(floats)  # floats in [0, 1] are judged as their uint8 picture
        assert p.dtype == np.float64 and p.shape == (4, len(judge.attributes))
        np.testing.assert_array_equal(p, evaluators.attributes(concept, pics))
        np.testing.assert_array_equal(judge.embed(floats), evaluators.embed(concept, pics))
    assert not np.allclose(
        WorldEvaluators(evaluators, "identity").embed(pics),
        WorldEvaluators(evaluators, "dog").embed(pics),
    )


def test_edit_oracle_through_world_evaluators(evaluators: Evaluators) -> None:
    gen = IdentityGenerator()
    insts = gen.instances(6, seed=3)
    judge = WorldEvaluators(evaluators, "identity")
    res = edit_oracle(judge, gen, insts, "glasses", n_images=2, seed=1)
    lacking = [i for i in insts if not i.attributes["glasses"]]
    assert res["n"] == len(lacking) > 0
    # the ID score by hand: same-seed pictures with and without glasses
    ids = []
    for inst in lacking:
        plain = gen.render(inst, 2, seed=1, size=32)
        added = gen.render(gen.edited(inst, "glasses", True), 2, seed=1, size=32)
        ids.append(np.sum(unit(judge.embed(plain)) * unit(judge.embed(added)), axis=1).mean())
    assert res["id_score"] == pytest.approx(float(np.mean(ids)), abs=1e-12)
    assert 0.0 <= res["success"] <= 1.0
