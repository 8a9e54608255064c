"""World evaluators: training lowers the loss, save/load round trip, ID score, AUC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from w2wkit.concepts.identity.generator import IdentityGenerator  # noqa: E402
from w2wkit.errors import W2WError  # noqa: E402
from w2wkit.world.evaluators import (  # noqa: E402
    EvalSettings,
    Evaluators,
    load_evaluators,
    roc_auc_verification,
    save_evaluators,
    train_attribute_classifier,
    train_embedder,
)
from w2wkit.world.pictures import render_instances  # noqa: E402


@pytest.fixture(scope="module")
def data() -> dict:
    torch.set_num_threads(1)
    gen = IdentityGenerator()
    n, k = 24, 3
    specs = [(i, 2000) for i in range(n)]
    x = render_instances("identity", specs, k, seed=1).reshape(-1, 32, 32, 3)
    y = np.repeat(np.stack([gen.instance(i, s).attribute_vector() for i, s in specs]), k, 0)
    return {"x": x, "y": y, "cls": np.repeat(np.arange(n), k), "attrs": gen.attributes}


def test_render_instances_parallel_equals_serial() -> None:
    specs = [(i, 0) for i in range(16)]
    a = render_instances("identity", specs, 2, seed=3, workers=1)
    b = render_instances("identity", specs, 2, seed=3, workers=2)
    assert a.shape == (16, 2, 32, 32, 3)
    np.testing.assert_array_equal(a, b)


def test_train_save_load_and_scores(data: dict, tmp_path: Path) -> None:
    s = EvalSettings(width=8, emb_dim=16, steps=40, batch=16, lr=3e-3)
    attr, log_a = train_attribute_classifier(data["x"], data["y"], s)
    emb, log_e = train_embedder(data["x"], data["cls"], s)
    assert log_a["steps"] == 40 and log_a["loss"] < np.log(2)  # BCE at chance is log 2
    assert np.isfinite(log_e["loss"])
    names = {"identity": [a.name for a in data["attrs"]]}
    save_evaluators(tmp_path, {("attr", "identity"): attr, ("emb", "identity"): emb}, names, s)
    ev = load_evaluators(tmp_path)
    with torch.no_grad():
        x = torch.from_numpy(data["x"][:8]).permute(0, 3, 1, 2).float() / 127.5 - 1
        ref_logits = attr(x).numpy()
    p = ev.attributes("identity", data["x"][:8])
    assert p.shape == (8, len(names["identity"]))
    # float16 storage: probabilities agree to ~1e-2
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-ref_logits)), atol=2e-2)
    # the embedder has learned something: training identities separate (chance 0.5)
    auc = roc_auc_verification(ev.embed("identity", data["x"]), data["cls"])
    print("train AUC", auc)
    assert auc > 0.6
    e = ev.embed("identity", data["x"][:6])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    score = ev.id_score(data["x"][:6], data["x"][:6])
    np.testing.assert_allclose(np.diag(score), 1.0, atol=1e-5)
    np.testing.assert_allclose(score, score.T, atol=1e-6)
    np.testing.assert_allclose(ev.id_score(e, e), score, atol=1e-5)
    with pytest.raises(W2WError, match="known: identity"):
        ev.embed("cat", data["x"][:2])
    with pytest.raises(W2WError, match="no evaluators"):
        load_evaluators(tmp_path / "nowhere")


def test_verification_auc_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    owners = np.repeat(np.arange(6), 3)
    emb = rng.normal(size=(18, 4)) + 1.5 * rng.normal(size=(6, 4))[owners]
    auc = roc_auc_verification(emb, owners)
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    pos, neg = [], []
    for i in range(18):
        for j in range(i + 1, 18):
            (pos if owners[i] == owners[j] else neg).append(e[i] @ e[j])
    pos, neg = np.array(pos), np.array(neg)
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert auc == pytest.approx(brute)
    assert isinstance(Evaluators({}, {"attributes": {}}).concepts, list)
