from __future__ import annotations

import numpy as np
import pytest
from _spacehelpers import SHAPES, layout, random_models

from w2wkit.adapter import Adapter, DeltaLayer, LoraLayer
from w2wkit.errors import LayoutError
from w2wkit.layout import WeightLayout


def test_flatten_is_a_then_b_per_module_in_order():
    ad = random_models(1)[0]
    lay = WeightLayout.from_adapter(ad)
    expected = np.concatenate(
        [np.concatenate([layer.down.ravel(), layer.up.ravel()]) for layer in ad.layers.values()]
    )
    vec = lay.flatten(ad)
    assert vec.dtype == np.float32 and vec.shape == (lay.dim,)
    np.testing.assert_array_equal(vec, expected)
    assert lay.dim == sum(2 * o + 2 * i for o, i in SHAPES.values())
    slots = lay.slots
    assert [s.factor for s in slots[:2]] == ["down", "up"]
    assert slots[1].offset == slots[0].stop and slots[-1].stop == lay.dim


def test_unflatten_round_trip_and_alpha_kept():
    ad = random_models(1, rank=3)[0]
    lay = WeightLayout.from_adapter(ad)
    back = lay.unflatten(lay.flatten(ad))
    for m, layer in ad.items():
        np.testing.assert_array_equal(back[m].down, layer.down)
        np.testing.assert_array_equal(back[m].up, layer.up)
        assert back[m].alpha == layer.alpha


def test_other_alpha_is_folded_into_up_keeping_the_delta():
    ad = random_models(1)[0]
    lay = WeightLayout.from_adapter(ad)
    other = Adapter(
        {m: LoraLayer(lay_.down, lay_.up, alpha=lay_.alpha * 4) for m, lay_ in ad.items()}
    )
    back = lay.unflatten(lay.flatten(other))
    for m in ad:
        np.testing.assert_allclose(back[m].delta(), other[m].delta(), rtol=1e-6)


def test_signature_is_stable_and_order_independent():
    lay = layout()
    assert lay.signature == layout().signature
    assert len(lay.signature) == 16
    reordered = WeightLayout(
        [(m, (2, i), (o, 2), 2.0, False) for m, (o, i) in reversed(list(SHAPES.items()))]
    )
    assert reordered.signature == lay.signature
    assert layout(rank=3).signature != lay.signature
    assert WeightLayout.from_dict(lay.to_dict()) == lay


def test_mismatch_is_named():
    lay = layout(rank=2)
    ad = random_models(1, rank=3)[0]
    with pytest.raises(LayoutError, match=r"to_q has down \(3, 8\)"):
        lay.flatten(ad)
    fewer = Adapter(dict(list(random_models(1)[0].layers.items())[:2]))
    with pytest.raises(LayoutError, match="missing module"):
        lay.flatten(fewer)
    with pytest.raises(LayoutError, match="shape"):
        lay.unflatten(np.zeros(lay.dim + 1, np.float32))


def test_delta_layers_are_refused_with_a_hint():
    ad = Adapter({"unet.x.to_q": DeltaLayer(np.ones((4, 4), np.float32), "loha")})
    with pytest.raises(LayoutError, match='use `representation="delta"`'):
        WeightLayout.from_adapter(ad)


def test_damaged_layout_dict():
    d = layout().to_dict()
    d["signature"] = "0" * 16
    with pytest.raises(LayoutError, match="signature mismatch"):
        WeightLayout.from_dict(d)
