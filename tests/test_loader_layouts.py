"""SDXL names and folder layouts: text_projection, PEFT text-encoder folders, training layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from w2wkit.errors import FormatError
from w2wkit.formats import discover_lora_files, read_adapter, write_adapter
from w2wkit.names import guess_family, module_table
from w2wkit.stio import read_safetensors
from w2wkit.testing import random_adapter, relative_error

Q = "text_model.encoder.layers.0.self_attn.q_proj"
SDXL_ATTN = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def _sdxl_shapes(*modules: str) -> dict[str, tuple[int, ...]]:
    table = module_table("sdxl")
    return {m: table[m] for m in modules}


def _peft_folder(folder, modules, *, rank=2, alpha=4, seed=0, header=None):
    """A PEFT ``save_pretrained`` folder as PEFT writes it (no w2wkit header entry)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    tensors, deltas = {}, {}
    for name, (out_f, in_f) in modules.items():
        a = rng.standard_normal((rank, in_f)).astype(np.float32) * 0.1
        b = rng.standard_normal((out_f, rank)).astype(np.float32) * 0.1
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
        deltas[name] = alpha / rank * (b.astype(np.float64) @ a)
    save_file(
        tensors, str(folder / "adapter_model.safetensors"), metadata=header or {"format": "pt"}
    )
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return deltas


def test_text_projection_is_canonical_and_makes_the_file_sdxl(tmp_path):
    mods = ("text_encoder_2.text_projection", SDXL_ATTN, f"text_encoder_2.{Q}")
    ad = random_adapter(_sdxl_shapes(*mods), rank=2, seed=1)
    f = write_adapter(ad, tmp_path / "d.safetensors", format="diffusers")
    keys = list(read_safetensors(f).tensors)
    assert "text_encoder_2.text_projection.lora_A.weight" in keys
    back = read_adapter(f)
    assert "text_encoder_2.text_projection" in back.layers
    assert not any("text_model.text_projection" in m for m in back.layers)
    assert guess_family({m: la.delta_shape for m, la in back.items()}) == "sdxl"
    k = write_adapter(back, tmp_path / "k.safetensors", format="kohya")
    kkeys = set(read_safetensors(k).tensors)
    assert "lora_te2_text_projection.lora_down.weight" in kkeys
    assert any(x.startswith("lora_unet_input_blocks_4_1_") for x in kkeys)  # sgm names
    again = read_adapter(k)
    for m in mods:
        np.testing.assert_allclose(again[m].delta(), ad[m].delta(), rtol=1e-6)


@pytest.mark.parametrize(
    ("folder", "width", "expected"),
    [
        ("text_encoder_2", 1280, "text_encoder_2"),  # the folder name says it
        ("my_adapter", 1280, "text_encoder_2"),  # the widths say it
        ("my_adapter", 768, "text_encoder"),
        ("text_encoder", 768, "text_encoder"),
    ],
)
def test_peft_text_encoder_folder_component(tmp_path, folder, width, expected):
    deltas = _peft_folder(
        tmp_path / folder,
        {Q: (width, width), "text_model.encoder.layers.0.mlp.fc1": (width * 4, width)},
    )
    ad = read_adapter(tmp_path / folder)
    assert sorted(ad.layers) == sorted(f"{expected}.{m}" for m in deltas)
    for m, d in deltas.items():
        assert relative_error(ad[f"{expected}.{m}"].delta(), d) < 1e-6
    if expected == "text_encoder_2":
        out = write_adapter(ad, tmp_path / "k.safetensors", format="kohya")
        assert all(k.startswith("lora_te2_") for k in read_safetensors(out).tensors)


def test_peft_text_projection_folder_is_the_second_encoder(tmp_path):
    _peft_folder(tmp_path / "te", {"text_projection": (1280, 1280)})
    assert list(read_adapter(tmp_path / "te").layers) == ["text_encoder_2.text_projection"]


def test_training_layout_reads_as_one_adapter(tmp_path):
    root = tmp_path / "run"
    unet = _peft_folder(root / "unet", {SDXL_ATTN.split(".", 1)[1]: (640, 640)}, seed=1)
    te1 = _peft_folder(root / "text_encoder", {Q: (768, 768)}, seed=2, alpha=2)
    te2 = _peft_folder(root / "text_encoder_2", {Q: (1280, 1280)}, seed=3, alpha=8)
    ad = read_adapter(root)
    want = {
        **{f"unet.{m}": d for m, d in unet.items()},
        **{f"text_encoder.{m}": d for m, d in te1.items()},
        **{f"text_encoder_2.{m}": d for m, d in te2.items()},
    }
    assert sorted(ad.layers) == sorted(want)
    for m, d in want.items():
        assert relative_error(ad[m].delta(), d) < 1e-6
    # a collection sees one adapter there, not three
    assert discover_lora_files(tmp_path) == [root]
    assert discover_lora_files(root) == [root]
    # and it is written for SDXL loaders with SDXL names
    out = write_adapter(ad, tmp_path / "k.safetensors", format="kohya")
    prefixes = {k.split("_", 2)[1] for k in read_safetensors(out).tensors}
    assert prefixes == {"unet", "te1", "te2"}


def test_second_encoder_layers_under_sd1_prefixes_are_refused(tmp_path):
    ad = random_adapter({f"text_encoder.{Q}": (1280, 1280)}, rank=2)
    with pytest.raises(FormatError, match=r"second text encoder.*lora_te_") as err:
        write_adapter(ad, tmp_path / "k.safetensors", format="kohya")
    assert err.value.key == f"text_encoder.{Q}"
    assert not (tmp_path / "k.safetensors").exists()


def test_second_encoder_refusal_is_one_cli_line(tmp_path):
    from click.testing import CliRunner

    from w2wkit.cli.main import cli

    src = tmp_path / "d.safetensors"
    ad = random_adapter({f"text_encoder.{Q}": (1280, 1280)}, rank=2)
    write_adapter(ad, src, format="diffusers")
    res = CliRunner().invoke(
        cli, ["convert", str(src), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")]
    )
    assert res.exit_code == 1
    line = res.stderr.strip()
    assert "\n" not in line and "second text encoder" in line and "Traceback" not in res.output
