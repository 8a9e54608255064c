"""Old diffusers attention-processor LoRA names (read only)."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.numpy as stn

from w2wkit.adapter import Adapter
from w2wkit.errors import FormatError
from w2wkit.formats import FORMATS, detect_format, load_source, read_adapter, write_adapter

ATT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def _legacy(prefix="", rank=2, seed=0, alphas=None):
    rng = np.random.default_rng(seed)
    t = {}
    for proc in PROJ:
        base = f"{prefix}{ATT}.processor.{proc}_lora"
        t[f"{base}.down.weight"] = rng.standard_normal((rank, 8)).astype(np.float32)
        t[f"{base}.up.weight"] = rng.standard_normal((8, rank)).astype(np.float32)
        if alphas is not None:
            t[f"{base}.network_alpha"] = np.array(alphas[proc], np.float32)
    return t


@pytest.mark.parametrize("prefix", ["", "unet."])
def test_reads_processor_names_with_alpha_equal_rank(tmp_path, prefix):
    t = _legacy(prefix)
    path = tmp_path / "attn_procs.safetensors"
    stn.save_file(t, str(path))
    src = load_source(path)
    assert detect_format(src) == "legacy"
    scores = {name: fmt.sniff(src) for name, fmt in FORMATS.items() if name != "legacy"}
    assert all(s < 0.5 for s in scores.values()), scores
    ad = read_adapter(path)
    assert set(ad.layers) == {f"unet.{ATT}.{p}" for p in PROJ.values()}  # file order is sorted
    for proc, name in PROJ.items():
        base = f"{prefix}{ATT}.processor.{proc}_lora"
        layer = ad[f"unet.{ATT}.{name}"]
        assert layer.alpha == 2.0
        np.testing.assert_array_equal(layer.down, t[f"{base}.down.weight"])
        np.testing.assert_allclose(
            layer.delta(), t[f"{base}.up.weight"] @ t[f"{base}.down.weight"], rtol=1e-6
        )


def test_network_alpha_keys(tmp_path):
    alphas = {"to_q": 1.0, "to_k": 0.5, "to_v": 4.0, "to_out": 2.0}
    path = tmp_path / "a.safetensors"
    stn.save_file(_legacy("unet.", rank=4, alphas=alphas), str(path))
    ad = read_adapter(path)
    assert {m.rsplit(".", 1)[-1] if "to_out" not in m else "to_out": ad[m].alpha for m in ad} == {
        "to_q": 1.0,
        "to_k": 0.5,
        "to_v": 4.0,
        "to_out": 2.0,
    }


def test_down_without_up(tmp_path):
    t = _legacy()
    key = f"{ATT}.processor.to_v_lora.up.weight"
    del t[key]
    path = tmp_path / "a.safetensors"
    stn.save_file(t, str(path))
    with pytest.raises(FormatError) as exc:
        read_adapter(path)
    text = str(exc.value)
    assert str(path) in text and "to_v_lora.down.weight" in text and "\n" not in text


def test_not_writable(tmp_path):
    with pytest.raises(FormatError, match="cannot write"):
        write_adapter(Adapter(), tmp_path / "x.safetensors", format="legacy")
    assert list(tmp_path.iterdir()) == []
