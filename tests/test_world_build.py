"""The miniature world's base model: a micro build end to end, loaded back by diffusers."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from w2wkit.errors import W2WError  # noqa: E402
from w2wkit.world import base_model as B  # noqa: E402

MICRO = B.BaseSettings.micro()


def test_micro_build_loads_in_diffusers(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "base"
    t0 = time.perf_counter()
    log = B.build_base(out, MICRO)
    wall = time.perf_counter() - t0
    rec = json.loads((out / "world_base.json").read_text())
    # the recorded timings: what the call returned, inside the call's own wall time, and
    # per step = total / the steps it ran (the micro settings: no time budget, all steps)
    for phase, steps in (("vae", MICRO.vae_steps), ("unet", MICRO.unet_steps)):
        assert rec[phase]["seconds"] == log[phase]["seconds"]
        assert rec[phase]["steps"] == steps
        assert rec[phase]["seconds_per_step"] * steps == pytest.approx(rec[phase]["seconds"])
    assert 0 < rec["vae"]["seconds"] + rec["unet"]["seconds"] < wall
    assert np.isfinite(log["vae"]["mse"]) and np.isfinite(log["unet"]["loss"])
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    unet = pipe.unet
    # standard classes, the planned architecture
    assert type(unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert unet.config.sample_size == 16 and unet.config.in_channels == 4
    assert list(unet.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert pipe.vae.config.scaling_factor == pytest.approx(log["latents"]["scaling_factor"])
    sched = pipe.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (
        0.00085,
        0.012,
        "scaled_linear",
    )
    assert sched.num_train_timesteps == 1000
    # attention only at the lowest resolution: every to_q sits in down_blocks.1, mid, up_blocks.0
    targets = B.unet_lora_targets(unet)
    assert targets and all(
        t.startswith(("down_blocks.1.", "mid_block.", "up_blocks.0.")) for t in targets
    )
    # the rare token and the caption words are single tokens
    tok = pipe.tokenizer
    for word in ("sks", "person", "dog", "glasses", "beard", "floppy"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert tok.model_max_length == MICRO.text_positions
    # the VAE maps 32x32 RGB to 16x16x4 latents and back
    x = torch.zeros(1, 3, 32, 32)
    z = pipe.vae.encode(x).latent_dist.mean
    assert tuple(z.shape) == (1, 4, 16, 16)
    # and the loaded pipeline runs
    img = pipe(
        "a photo of a person with glasses",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    # the saved weights are the trained ones
    ref = diffusers.UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
    for (n1, p1), (n2, p2) in zip(unet.named_parameters(), ref.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    with pytest.raises(W2WError, match="output exists"):
        B.build_base(out, MICRO)


def test_rare_token_stays_untrained(tmp_path: Path) -> None:
    torch.manual_seed(0)
    s = dataclasses.replace(MICRO, unet_steps=4)
    data = B.render_dataset(s)
    assert B.rare_token_unused(data)
    tok = B.make_tokenizer(s, tmp_path / "tok")
    unet, te = B.make_unet(s), B.make_text_encoder(s, tok)
    emb = te.get_input_embeddings().weight
    sks = tok.convert_tokens_to_ids("sks</w>")
    person = tok.convert_tokens_to_ids("person</w>")
    before = emb.detach().clone()
    latents = np.random.default_rng(0).standard_normal((len(data.images), 4, 16, 16))
    B.train_unet(unet, te, tok, latents.astype(np.float32), data, s)
    after = te.get_input_embeddings().weight.detach()
    assert torch.equal(after[sks], before[sks])
    assert not torch.equal(after[person], before[person])
