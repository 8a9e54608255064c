"""Imports every built-in format module so each registers itself."""

import importlib

for _name in ("kohya", "diffusers", "peft", "legacy", "lycoris"):
    try:
        importlib.import_module(f"w2wkit.formats.{_name}")
    except ModuleNotFoundError as exc:  # pragma: no cover - during development only
        if exc.name != f"w2wkit.formats.{_name}":
            raise
