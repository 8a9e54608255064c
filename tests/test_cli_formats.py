"""``w2wkit inspect`` / ``w2wkit convert``: happy paths and every bad input."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from w2wkit.cli.main import cli
from w2wkit.formats import read_adapter
from w2wkit.stio import write_safetensors

MOD = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
MOD2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"


def kohya_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"{MOD}.lora_down.weight": rng.standard_normal((2, 8)).astype(np.float32),
        f"{MOD}.lora_up.weight": rng.standard_normal((8, 2)).astype(np.float32),
        f"{MOD}.alpha": np.array(1.0, dtype=np.float32),
        f"{MOD2}.lora_down.weight": rng.standard_normal((2, 4)).astype(np.float32),
        f"{MOD2}.lora_up.weight": rng.standard_normal((8, 2)).astype(np.float32),
        f"{MOD2}.alpha": np.array(2.0, dtype=np.float32),
    }


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    write_safetensors(path, kohya_tensors(), metadata={"ss_network_dim": "2"})
    return path


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    assert len(text.splitlines()) == 1, text
    assert text.startswith("error:")
    for needle in needles:
        assert needle in text, text


def test_inspect_table_and_json(good: Path) -> None:
    result = run("inspect", str(good))
    assert result.exit_code == 0, result.output
    assert "kohya" in result.output
    result = run("inspect", str(good), "--json")
    info = json.loads(result.output)
    assert info["format"] == "kohya"
    assert info["modules"] == 2
    assert info["ranks"] == {"2": 2}
    assert info["alphas"] == {"1": 1, "2": 1}
    assert info["bytes"] == good.stat().st_size
    assert info["parameters"] == 2 * 8 + 8 * 2 + 2 * 4 + 8 * 2


def test_inspect_folder(good: Path, tmp_path: Path) -> None:
    write_safetensors(tmp_path / "sub" / "b.safetensors", kohya_tensors(1))
    result = run("inspect", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)) == 2


@pytest.mark.parametrize("to", ["kohya", "diffusers", "peft"])
def test_convert_keeps_deltas(good: Path, tmp_path: Path, to: str) -> None:
    out = tmp_path / f"out-{to}"
    out = out.with_suffix(".safetensors") if to != "peft" else out
    result = run("convert", str(good), "--to", to, "-o", str(out))
    assert result.exit_code == 0, result.output
    a, b = read_adapter(good), read_adapter(out)
    assert b.format == to
    assert list(a.layers) == list(b.layers)
    for module in a.layers:
        np.testing.assert_allclose(b[module].delta(), a[module].delta(), rtol=1e-6, atol=0)
    assert b.metadata["w2wkit.made_by"] == "w2wkit convert"


def _write_raw(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _bad_cases(tmp: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    t = kohya_tensors()
    no_up = {k: v for k, v in t.items() if not k.startswith(f"{MOD}.lora_up")}
    mism = dict(t)
    mism[f"{MOD}.lora_up.weight"] = np.ones((8, 3), np.float32)
    nan = dict(t)
    nan[f"{MOD}.lora_down.weight"] = np.full((2, 8), np.nan, np.float32)
    inf = dict(t)
    inf[f"{MOD}.lora_up.weight"] = np.full((8, 2), np.inf, np.float32)
    dora = dict(t)
    dora[f"{MOD}.dora_scale"] = np.ones((1, 8), np.float32)
    cases: dict[str, tuple[Path, tuple[str, ...]]] = {
        "empty": (_write_raw(tmp / "empty.safetensors", b""), ("empty",)),
        "truncated": (
            _write_raw(tmp / "trunc.safetensors", struct.pack("<Q", 400) + b'{"a":'),
            ("truncated",),
        ),
        "garbage": (_write_raw(tmp / "junk.safetensors", b"\x89PNG\r\n\x1a\n" * 8), ("not a",)),
    }
    for name, tensors, needles in (
        ("no_up", no_up, (MOD, "lora_up")),
        ("mismatch", mism, (MOD, "mismatch")),
        ("nan", nan, (MOD, "NaN")),
        ("inf", inf, (MOD, "Inf")),
        ("dora", dora, ("DoRA",)),
        ("unknown", {"model.layer.weight": np.ones(3, np.float32)}, ("model.layer.weight",)),
    ):
        path = tmp / f"{name}.safetensors"
        write_safetensors(path, tensors)
        cases[name] = (path, needles)
    return cases


@pytest.mark.parametrize(
    "case", ["empty", "truncated", "garbage", "no_up", "mismatch", "nan", "inf", "dora", "unknown"]
)
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_bad_inputs_give_one_line_and_no_output(tmp_path: Path, case: str, command: str) -> None:
    path, needles = _bad_cases(tmp_path)[case]
    out = tmp_path / "out" / "result.safetensors"
    args = [command, str(path)]
    if command == "convert":
        args += ["--to", "diffusers", "-o", str(out)]
    result = run(*args)
    assert_one_line_error(result, path.name, *needles)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_folder_without_loras(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(run("inspect", str(tmp_path)), "no LoRA files")


def test_unreadable_file(tmp_path: Path) -> None:
    folder_named_like_file = tmp_path / "x.safetensors"
    folder_named_like_file.mkdir()
    (folder_named_like_file / "inner.txt").write_text("x")
    dangling = tmp_path / "gone.safetensors"
    dangling.symlink_to(tmp_path / "does-not-exist")
    assert_one_line_error(run("inspect", str(dangling)), "gone.safetensors")
    result = run(
        "convert",
        str(folder_named_like_file),
        "--to",
        "kohya",
        "-o",
        str(tmp_path / "o.safetensors"),
    )
    assert_one_line_error(result, "x.safetensors")
    if os.geteuid() != 0:  # root reads any file regardless of mode
        locked = tmp_path / "locked.safetensors"
        write_safetensors(locked, kohya_tensors())
        locked.chmod(0)
        assert_one_line_error(run("inspect", str(locked)), "locked.safetensors")


def test_existing_output_needs_force(good: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    assert_one_line_error(
        run("convert", str(good), "--to", "kohya", "-o", str(out)), "exists", "--force"
    )
    assert out.read_bytes() == b"keep me"
    result = run("convert", str(good), "--to", "kohya", "-o", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert read_adapter(out).format == "kohya"


def test_pickle_refused_without_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    path.write_bytes(b"not really a pickle")
    assert_one_line_error(run("inspect", str(path)), "old.pt", "--allow-pickle")
