"""Procedural generators of the miniature world: determinism, labels, correlations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from w2wkit.concepts.base import Instance
from w2wkit.concepts.dog.generator import DogGenerator
from w2wkit.concepts.identity.generator import IdentityGenerator
from w2wkit.errors import W2WError


@pytest.fixture(scope="module")
def idgen() -> IdentityGenerator:
    return IdentityGenerator()


@pytest.fixture(scope="module")
def doggen() -> DogGenerator:
    return DogGenerator()


@pytest.mark.parametrize("which", ["identity", "dog"])
def test_deterministic_by_seed(which: str, idgen: IdentityGenerator, doggen: DogGenerator) -> None:
    gen = idgen if which == "identity" else doggen
    a = gen.instance(5, seed=0)
    b = gen.instance(5, seed=0)
    assert a == b
    im1 = gen.render(a, 3, seed=11)
    im2 = gen.render(b, 3, seed=11)
    assert im1.shape == (3, 32, 32, 3) and im1.dtype == np.uint8
    np.testing.assert_array_equal(im1, im2)
    assert not np.array_equal(im1, gen.render(a, 3, seed=12))
    # the pictures of one call differ from each other (nuisance)
    assert not np.array_equal(im1[0], im1[1])
    # another instance, same render seed: other pictures
    assert not np.array_equal(im1, gen.render(gen.instance(6, seed=0), 3, seed=11))


def test_identity_seed_changes_population(idgen: IdentityGenerator) -> None:
    a = np.array([i.vector() for i in idgen.instances(20, seed=0)])
    b = np.array([i.vector() for i in idgen.instances(20, seed=1)])
    assert a.shape == (20, 13 + len(idgen.param_names))
    assert not np.allclose(a, b)
    # instances are independent of how many are drawn and from where
    assert idgen.instances(3, seed=0, start=4)[0] == idgen.instance(4, seed=0)


def test_size_is_configurable(idgen: IdentityGenerator, doggen: DogGenerator) -> None:
    assert idgen.render(idgen.instance(0), 2, size=48).shape == (2, 48, 48, 3)
    assert doggen.render(doggen.instance(0), 1, size=64).shape == (1, 64, 64, 3)


def test_instance_round_trip(idgen: IdentityGenerator) -> None:
    inst = idgen.instance(3, seed=2)
    back = Instance.from_dict(inst.to_dict())
    assert back == inst
    np.testing.assert_array_equal(idgen.render(back, 2, seed=1), idgen.render(inst, 2, seed=1))
    assert inst.name == "identity-s2-000003"


def test_identity_attribute_correlations(idgen: IdentityGenerator) -> None:
    insts = idgen.instances(4000, seed=3)
    names = [s.name for s in idgen.attributes]
    assert len(names) >= 10
    assert names == list(insts[0].attributes)
    A = np.array([i.attribute_vector() for i in insts]).astype(bool)
    col = {n: A[:, k] for k, n in enumerate(names)}
    # every attribute occurs and is not universal
    assert np.all(A.mean(0) > 0.05) and np.all(A.mean(0) < 0.8)
    # beards only on men, lipstick only on women, long hair never with baldness
    assert not np.any(col["beard"] & ~col["male"])
    assert not np.any(col["lipstick"] & col["male"])
    assert not np.any(col["bald"] & col["long_hair"])
    # correlated as in real data
    assert col["bald"][col["old"]].mean() > 3 * col["bald"][~col["old"]].mean()
    assert np.corrcoef(col["beard"], col["wide_face"])[0, 1] > 0.3
    assert np.corrcoef(col["old"], col["dark_hair"])[0, 1] < -0.2
    # continuous parameters agree with the binary ones
    P = {n: np.array([i.params[n] for i in insts]) for n in idgen.param_names}
    assert P["skin_light"][col["pale_skin"]].min() > P["skin_light"][~col["pale_skin"]].max()
    assert P["face_w"][col["wide_face"]].min() > P["face_w"][~col["wide_face"]].max()
    jaw_square = P["jaw"] > 0.5
    assert jaw_square[col["beard"]].mean() > 0.8 and jaw_square[~col["beard"]].mean() < 0.4


def _probe_accuracy(X: np.ndarray, Y: np.ndarray, n_train: int) -> tuple[np.ndarray, np.ndarray]:
    acc, base = [], []
    for j in range(Y.shape[1]):
        clf = LogisticRegression(C=0.5, max_iter=400).fit(X[:n_train], Y[:n_train, j])
        acc.append(clf.score(X[n_train:], Y[n_train:, j]))
        p = Y[n_train:, j].mean()
        base.append(max(p, 1 - p))
    return np.array(acc), np.array(base)


@pytest.mark.slow  # 30 s of rendering and classifying: the full lane runs it
def test_identity_labels_match_pictures(idgen: IdentityGenerator) -> None:
    """A linear probe on the pixels reads every attribute from canonical renders.

    If the labels did not match the pictures (e.g. a shuffled schema), the probe
    could not beat the majority class.
    """
    insts = idgen.instances(700, seed=7)
    X = np.concatenate([idgen.render(i, 1, seed=1, canonical=True) for i in insts])
    X = X.reshape(len(X), -1).astype(np.float32) / 255.0
    Y = np.array([i.attribute_vector() for i in insts])
    acc, base = _probe_accuracy(X, Y, 500)
    # error well below the majority-class error for every attribute
    assert np.all(1 - acc <= 0.6 * (1 - base)), dict(
        zip([s.name for s in idgen.attributes], acc, strict=True)
    )
    # and the clearest attributes are readable under full nuisance too
    Xn = np.concatenate([idgen.render(i, 1, seed=2) for i in insts])
    Xn = Xn.reshape(len(Xn), -1).astype(np.float32) / 255.0
    names = [s.name for s in idgen.attributes]
    cols = [names.index(n) for n in ("beard", "dark_hair", "pale_skin", "long_hair")]
    acc_n, base_n = _probe_accuracy(Xn, Y[:, cols], 500)
    assert np.all(1 - acc_n <= 0.5 * (1 - base_n)), acc_n


def test_dog_catalogue_is_large_and_distinct(doggen: DogGenerator) -> None:
    cat = doggen.catalogue
    assert len(cat) >= 200
    vecs = np.array([b.vector() for b in cat])
    assert len(np.unique(vecs.round(6), axis=0)) == len(cat)
    A = vecs[:, : len(doggen.attributes)]
    assert np.all(A.mean(0) > 0.1) and np.all(A.mean(0) < 0.9)
    # geometry parameters agree with the attributes
    P = {n: np.array([b.params[n] for b in cat]) for n in doggen.param_names}
    names = [s.name for s in doggen.attributes]
    col = {n: A[:, k].astype(bool) for k, n in enumerate(names)}
    assert P["size"][col["large"]].min() > P["size"][~col["large"]].max()
    assert P["snout_len"][col["long_snout"]].min() > P["snout_len"][~col["long_snout"]].max()
    assert P["leg_len"][col["short_legs"]].max() < P["leg_len"][~col["short_legs"]].min()
    # curly coats go with floppy ears
    assert (
        col["floppy_ears"][col["curly_coat"]].mean() > col["floppy_ears"][~col["curly_coat"]].mean()
    )
    with pytest.raises(W2WError, match="outside the catalogue"):
        doggen.instance(len(cat))


def test_dog_labels_match_pictures(doggen: DogGenerator) -> None:
    cat = doggen.catalogue
    X = np.concatenate([doggen.render(b, 4, seed=3, canonical=True) for b in cat])
    X = X.reshape(len(X), -1).astype(np.float32) / 255.0
    Y = np.repeat(np.array([b.attribute_vector() for b in cat]), 4, axis=0)
    names = [s.name for s in doggen.attributes]
    cols = [names.index(n) for n in ("large", "dark_coat", "long_snout", "short_legs")]
    acc, base = _probe_accuracy(X, Y[:, cols], 4 * 170)  # held-out breeds
    assert np.all(1 - acc <= 0.6 * (1 - base)), acc
    # attributes drawn from the label itself change the picture where expected
    b = cat[0]
    for name in ("floppy_ears", "spotted", "curly_coat", "two_tone"):
        flipped = dataclasses.replace(b, attributes={**b.attributes, name: not b.attributes[name]})
        d = np.abs(
            doggen.render(b, 2, seed=4, canonical=True).astype(int)
            - doggen.render(flipped, 2, seed=4, canonical=True).astype(int)
        )
        assert (d.max(axis=-1) > 40).sum() >= 6, name


def test_captions_name_the_attributes(idgen: IdentityGenerator, doggen: DogGenerator) -> None:
    for inst in idgen.instances(50, seed=0):
        text = idgen.caption(inst)
        assert text.startswith("a photo of ") and text.split(" with ")[0].endswith("person")
        for spec in idgen.attributes:
            if spec.adjective:
                continue
            if spec.name == "dark_hair" and inst.attributes["bald"]:
                continue
            assert (spec.phrase in text) == inst.attributes[spec.name], (spec.name, text)
        assert ("old" in text.split()) == inst.attributes["old"]
        assert "sks" not in text
    # dropping phrases is deterministic by seed and only removes words
    inst = next(i for i in idgen.instances(50) if sum(i.attributes.values()) >= 5)
    full = set(idgen.caption(inst).replace(",", "").split())
    r1 = idgen.caption(inst, np.random.default_rng(0), drop=0.5)
    r2 = idgen.caption(inst, np.random.default_rng(0), drop=0.5)
    assert r1 == r2 and set(r1.replace(",", "").split()) <= full | {"a", "an"}
    breed = next(b for b in doggen.catalogue if b.attributes["floppy_ears"])
    assert "floppy ears" in doggen.caption(breed)
    assert doggen.caption(breed).split(" with ")[0].endswith("dog")


def test_vary_toggles_transient_attributes_and_keeps_the_nuisance(
    idgen: IdentityGenerator,
) -> None:
    from w2wkit.concepts.identity.generator import TRANSIENT_ATTRIBUTES, plausible

    man = next(i for i in idgen.instances(40) if i.attributes["male"] and not i.attributes["beard"])
    woman = next(i for i in idgen.instances(40) if not i.attributes["male"])
    for inst in (man, woman):
        plain = idgen.render(inst, 6, seed=3)
        # vary=0 is the plain render (world v1's pictures are unchanged)
        np.testing.assert_array_equal(idgen.render(inst, 6, seed=3, vary=0.0), plain)
        # vary=1 toggles every plausible transient attribute in every picture, with the
        # nuisance of the plain picture: the same pixels as drawing the toggled identity
        flipped = {
            k: (not v) if k in TRANSIENT_ATTRIBUTES and plausible(inst.attributes, k) else v
            for k, v in inst.attributes.items()
        }
        other = dataclasses.replace(inst, attributes=flipped)
        # flags only (world v1.1's embedder): the toggled flags, the same parameters
        np.testing.assert_array_equal(
            idgen.render(inst, 6, seed=3, vary=1.0, vary_tied=False),
            idgen.render(other, 6, seed=3),
        )
        # tied (default): each toggle as edited() makes it, so ageing greys the hair too
        tied = inst
        for k in TRANSIENT_ATTRIBUTES:
            if plausible(inst.attributes, k):
                tied = idgen.edited(tied, k, not tied.attributes[k])
        assert tied.params != inst.params  # "old" toggled: the hair colour moved
        np.testing.assert_array_equal(
            idgen.render(inst, 6, seed=3, vary=1.0), idgen.render(tied, 6, seed=3)
        )
        assert not np.array_equal(
            idgen.render(inst, 6, seed=3, vary=1.0), idgen.render(other, 6, seed=3)
        )
        # in between: some pictures toggled, some not; deterministic by seed
        part = idgen.render(inst, 12, seed=4, vary=0.3)
        np.testing.assert_array_equal(part, idgen.render(inst, 12, seed=4, vary=0.3))
        plain12 = idgen.render(inst, 12, seed=4)
        same = [np.array_equal(a, b) for a, b in zip(part, plain12, strict=True)]
        assert 0 < sum(same) < 12
    # no beard for women, no lipstick for men
    assert not plausible(woman.attributes, "beard") and plausible(woman.attributes, "lipstick")
    assert plausible(man.attributes, "beard") and not plausible(man.attributes, "lipstick")


def test_edited_identity_follows_the_population_ties(idgen: IdentityGenerator) -> None:
    from w2wkit.concepts.identity.generator import _GREY

    young = next(i for i in idgen.instances(40) if not i.attributes["old"])
    older = idgen.edited(young, "old")
    assert older.attributes == {**young.attributes, "old": True}
    hair = [young.params[k] for k in ("hair_r", "hair_g", "hair_b")]
    grey = [older.params[k] for k in ("hair_r", "hair_g", "hair_b")]
    to_grey = np.array(_GREY)
    assert np.linalg.norm(np.array(grey) - to_grey) < np.linalg.norm(np.array(hair) - to_grey)
    back = idgen.edited(older, "old", False)
    for k, v in young.params.items():
        assert back.params[k] == pytest.approx(v, abs=1e-6), k
    # the classifier-free ground truth: the edit adds grey hair and wrinkles to the picture
    assert not np.array_equal(idgen.render(young, 1, seed=2), idgen.render(older, 1, seed=2))
    glasses = idgen.edited(young, "glasses", not young.attributes["glasses"])
    assert glasses.params == young.params
