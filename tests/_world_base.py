"""Shared builder for the world trainer tests: a micro base pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest


def micro_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro world base pipeline (1 UNet and 1 VAE step) in a fresh temporary folder."""
    import torch

    from w2wkit.world import build as B

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("world") / "base"
    B.build_base(out, B.BaseSettings.micro(unet_steps=1, vae_steps=1))
    return out
