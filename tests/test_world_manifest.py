"""`world verify`: a damaged manifest is one line; every file must be listed."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from w2wkit.cli.main import cli
from w2wkit.errors import W2WError
from w2wkit.world.shipped import verify_world, write_manifest


@pytest.fixture
def world(tmp_path):
    root = tmp_path / "world"
    (root / "pipeline").mkdir(parents=True)
    (root / "labels_identity.csv").write_text("file,male\na,1\n")
    (root / "evaluators.json").write_text("{}")
    (root / "pipeline" / "model_index.json").write_text('{"a": 1}')
    (root / ".revision-notes").write_text("hidden files are not part of the world")
    write_manifest(root)
    assert verify_world(root)["files"] == 3
    return root


def _verify_cli(root):
    res = CliRunner().invoke(cli, ["world", "verify", "--world", str(root)])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert "Traceback" not in res.output and "internal error" not in res.output
    return lines[0]


def _manifest(root, change):
    man = json.loads((root / "manifest.json").read_text())
    change(man)
    (root / "manifest.json").write_text(json.dumps(man))


def test_a_file_missing_from_the_manifest_fails_verify(world):
    # someone tampers with a file and deletes its entry so the hash is not checked
    (world / "labels_identity.csv").write_text("file,male\na,0\n")
    _manifest(world, lambda m: m["files"].pop("labels_identity.csv"))
    with pytest.raises(W2WError, match="not listed in the world manifest") as info:
        verify_world(world)
    assert "labels_identity.csv" in str(info.value)
    assert "labels_identity.csv" in _verify_cli(world)


def test_an_added_file_fails_verify(world):
    (world / "pipeline" / "extra.bin").write_bytes(b"\0")
    assert "pipeline/extra.bin: file is not listed" in _verify_cli(world)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("{not json", "the world manifest is not valid JSON"),
        ("[1, 2]", "the world manifest is not a JSON object"),
        ('{"files": [1]}', "key 'files': must be an object"),
        ('{"files": {"a": "x"}}', "key 'files.a': must be an object"),
        ('{"files": {"a": {"sha256": 5}}}', "key 'files.a.sha256': is not a SHA-256 digest"),
        ('{"files": {"../x": {"sha256": "%s"}}}' % ("0" * 64), "outside the world folder"),
        ('{"files": {}, "total_bytes": 1e400}', "not valid JSON"),
        ('{"files": {}, "total_bytes": "many"}', "key 'total_bytes'"),
        ("[" * 100_000 + "]" * 100_000, "nested"),
    ],
)
def test_a_damaged_manifest_is_one_line(world, text, expect):
    (world / "manifest.json").write_text(text)
    with pytest.raises(W2WError, match=r"manifest\.json"):
        verify_world(world)
    line = _verify_cli(world)
    assert "manifest.json" in line and expect in line


@pytest.mark.parametrize("model", [5000, -1])
def test_export_refuses_a_model_outside_the_zoo(tmp_path, model):
    from w2wkit.world.shipped import load_world

    with pytest.raises(W2WError, match=r"model .* is outside 0\.\."):
        load_world(verify=False).export_loras(tmp_path / "out", "dog", models=[0, model])
    assert not (tmp_path / "out").exists()


def test_a_zoo_adapter_owns_its_arrays():
    from w2wkit.world.shipped import load_world

    w = load_world(verify=False)
    a = w.adapter("dog", 1)
    layer = next(iter(a.layers.values()))
    layer.down[...] = 7.0
    assert not (next(iter(w.adapter("dog", 1).layers.values())).down == 7.0).all()
