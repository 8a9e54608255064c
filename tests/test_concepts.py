"""Concept packs: built-ins, entry-point discovery, run-time registration, errors."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import w2wkit.concepts as concepts
from w2wkit.concepts import (
    ConceptError,
    ConceptPack,
    ProceduralGenerator,
    get_pack,
    list_packs,
    register_pack,
)
from w2wkit.errors import W2WError

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_packs() -> None:
    assert {"identity", "dog"} <= set(list_packs())
    ident = get_pack("identity")
    assert isinstance(ident, ConceptPack)
    assert (ident.instance_prompt, ident.class_prompt) == ("sks person", "person")
    assert ident.n_components == 1000 and ident.n_components_inversion == 10000
    assert len(ident.attributes) >= 10
    dog = get_pack("dog")
    assert (dog.instance_prompt, dog.class_prompt) == ("sks dog", "dog")
    for pack in (ident, dog):
        gen = pack.generator()
        assert isinstance(gen, ProceduralGenerator)
        assert tuple(gen.attributes) == tuple(pack.attributes)
        assert pack.class_prompt in pack.instance_prompt
    assert get_pack(ident) is ident


def test_unknown_concept_lists_known_ones() -> None:
    with pytest.raises(W2WError) as info:
        get_pack("unicorn")
    msg = str(info.value)
    assert isinstance(info.value, ConceptError)
    assert "unicorn" in msg and "identity" in msg and "dog" in msg and "\n" not in msg


def test_identity_face_mask() -> None:
    pack = get_pack("identity")
    gen = pack.generator()
    images = gen.render(gen.instance(0), 2, canonical=True)
    m = pack.mask(images)
    assert m.shape == (2, 32, 32) and m.dtype == np.float32
    assert m.min() == 0.0 and m.max() == 1.0
    assert m[0, 14, 16] == 1.0 and m[0, 0, 0] == 0.0 and m[0, 31, 31] == 0.0
    # the face (skin pixels around the nose) is inside, the background corners outside
    assert get_pack("dog").mask(images) is None


def _write_dist(tmp: Path, name: str, body: str, entry: str) -> None:
    (tmp / f"{name}.py").write_text(textwrap.dedent(body))
    info = tmp / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[w2wkit.concepts]\n{entry}\n")


def test_entry_point_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_dist(
        tmp_path,
        "fake_cars",
        """
        from w2wkit.concepts import AttributeSpec, SimplePack

        def make():
            return SimplePack(
                name="car",
                instance_prompt="sks car",
                class_prompt="car",
                attributes=(AttributeSpec("red", "red", adjective=True),),
                n_components=20,
                n_components_inversion=20,
            )
        """,
        "car = fake_cars:make",
    )
    _write_dist(
        tmp_path, "fake_broken", "raise ImportError('no wheels')\n", "lorry = fake_broken:P"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {"car", "lorry", "identity", "dog"} <= set(list_packs())
    car = get_pack("car")
    assert car.instance_prompt == "sks car" and car.generator() is None
    with pytest.raises(ConceptError, match=r"'lorry' \(fake_broken:P\) failed to load"):
        get_pack("lorry")


def test_register_pack_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(concepts, "_RUNTIME", {})
    spec = importlib.util.spec_from_file_location(
        "third_party_pack", ROOT / "examples" / "third_party_pack.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["third_party_pack"] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules["third_party_pack"]
    register_pack(mod.PACK)
    assert "house" in list_packs()
    pack = get_pack("house")
    gen = pack.generator()
    assert isinstance(gen, ProceduralGenerator)
    h = gen.instance(3)
    a = gen.render(h, 2, seed=1)
    assert a.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(a, gen.render(gen.instance(3), 2, seed=1))
    assert gen.caption(h).startswith("a photo of a")
    with pytest.raises(ConceptError, match="already registered"):
        register_pack(mod.PACK)
    register_pack(mod.PACK, overwrite=True)

    class NotAPack:
        name = "thing"

    with pytest.raises(ConceptError, match="lacks instance_prompt"):
        register_pack(NotAPack())


def test_packs_own_their_prompt_and_edit_rules() -> None:
    from w2wkit.concepts import SimplePack, full_prompt

    assert full_prompt("identity") == "a photo of sks person"
    assert full_prompt(get_pack("dog")) == "a photo of sks dog"
    custom = SimplePack("car", "sks car", "car", prompt_template="a drawing of {}, side view")
    assert full_prompt(custom) == "a drawing of sks car, side view"
    ident, dog = get_pack("identity"), get_pack("dog")
    assert ident.transient_attributes == ("beard", "glasses", "lipstick", "old")
    assert dog.transient_attributes == () and custom.transient_attributes == ()
    gen = ident.generator()
    woman = next(i for i in gen.instances(20) if not i.attributes["male"])
    man = next(i for i in gen.instances(20) if i.attributes["male"])
    assert not ident.plausible(woman.attributes, "beard") and ident.plausible(
        man.attributes, "beard"
    )
    assert ident.plausible(woman.attributes, "lipstick") and not ident.plausible(
        man.attributes, "lipstick"
    )
    assert ident.plausible(man.attributes, "glasses")
    breed = dog.generator().instance(0)
    assert all(dog.plausible(breed.attributes, a.name) for a in dog.attributes)


def test_an_older_pack_without_a_template_gets_the_photo_sentence() -> None:
    from w2wkit.concepts import full_prompt

    class Minimal:  # a third-party pack written before prompt_template existed
        name, instance_prompt, class_prompt = "boat", "sks boat", "boat"
        attributes, n_components, n_components_inversion = (), 10, 10

    assert full_prompt(Minimal()) == "a photo of sks boat"


def _concept_names_in(path: Path) -> list[str]:
    """Where a module names a built-in concept: a string that is exactly a pack's name, or an
    import of a pack's own module."""
    import ast

    names = {"identity", "dog"}
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and node.value in names:
            found.append(f"{path.name}:{node.lineno}: {node.value!r}")
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[:2] == ["w2wkit", "concepts"] and len(parts) > 2 and parts[2] in names:
                found.append(f"{path.name}:{node.lineno}: from {node.module}")
    return found


def test_no_code_outside_the_packs_names_a_concept(tmp_path: Path) -> None:
    """world/ and the CLI ask the packs; the world's composition is named once."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from w2wkit.concepts.identity.generator import plausible\n"
        "from w2wkit.concepts import get_pack\n"
        "x = 'dog' if y == 'dogs' else 'identity card'\n"
    )
    assert [h.split(": ", 1)[1] for h in _concept_names_in(bad)] == [
        "from w2wkit.concepts.identity.generator",
        "'dog'",
    ]
    world_init = ROOT / "w2wkit" / "world" / "__init__.py"
    files = [
        *sorted((ROOT / "w2wkit" / "world").glob("*.py")),
        *sorted((ROOT / "cli").glob("*.py")),
    ]
    found = [hit for f in files if f != world_init for hit in _concept_names_in(f)]
    assert not found, "\n".join(found)
    # the one allowed place names them
    assert len(_concept_names_in(world_init)) == 3
    from w2wkit.world import CONCEPTS, HELDOUT_CONCEPT

    assert set(CONCEPTS) <= set(list_packs()) and HELDOUT_CONCEPT in CONCEPTS
