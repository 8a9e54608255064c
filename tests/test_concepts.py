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
