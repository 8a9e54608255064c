"""The formats registry: an explicit built-in list plus entry points, no import side effects."""

from __future__ import annotations

import subprocess
import sys

import pytest

from w2wkit.formats import registry


class _EP:
    def __init__(self, name, obj=None, error=None):
        self.name, self.value, self._obj, self._error = name, f"toy:{name}", obj, error

    def load(self):
        if self._error is not None:
            raise self._error
        return self._obj


class ToyFormat:
    name = "toy"
    writable = False
    description = "a third-party format"

    def sniff(self, src):
        return 0.0

    def read(self, src):  # pragma: no cover - never sniffed
        raise NotImplementedError


@pytest.fixture
def fresh_registry(monkeypatch):
    saved = dict(dict.items(registry.FORMATS))
    monkeypatch.setattr(registry, "_LOADED", False)
    dict.clear(registry.FORMATS)
    yield registry
    dict.clear(registry.FORMATS)
    dict.update(registry.FORMATS, saved)
    registry._DETECTED.clear()


def test_importing_a_format_module_registers_nothing():
    code = (
        "import w2wkit.formats.kohya, w2wkit.formats.peft\n"
        "from w2wkit.formats import registry as r\n"
        "print(dict.__len__(r.FORMATS))\n"
        "print(sorted(r.FORMATS))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "0"  # nothing until the registry is read
    assert lines[1] == "['diffusers', 'kohya', 'legacy', 'lycoris', 'peft', 'w2w-model']"


def test_entry_points_add_formats_and_a_broken_one_only_warns(fresh_registry, monkeypatch):
    import importlib.metadata

    eps = [_EP("toy", ToyFormat), _EP("broken", error=ImportError("no module named toyx"))]
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda group=None: eps if group == registry.ENTRY_POINT_GROUP else [],
    )
    with pytest.warns(UserWarning, match=r"'broken' .* failed to load: no module named toyx"):
        names = sorted(fresh_registry.FORMATS)
    assert names == ["diffusers", "kohya", "legacy", "lycoris", "peft", "toy", "w2w-model"]
    assert isinstance(fresh_registry.FORMATS["toy"], ToyFormat)
    assert "toy" not in fresh_registry.writable_formats()


def test_register_format_at_run_time(fresh_registry):
    fresh_registry.register_format(ToyFormat)
    assert "toy" in fresh_registry.FORMATS and "kohya" in fresh_registry.FORMATS
