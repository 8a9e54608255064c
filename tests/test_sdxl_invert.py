"""Inversion on SDXL (tiny SDXL-architecture pipeline): both text encoders, pooled embedding
and size/crop conditioning, against an independent reference built on diffusers' own SDXL
conditioning; the loss falls, the result loads in w2wkit and diffusers and renders."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from _invert_world import block_images, normalise_vae  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from w2wkit.cli.main import cli  # noqa: E402
from w2wkit.formats import read_adapter  # noqa: E402
from w2wkit.invert import inversion_loss, invert  # noqa: E402
from w2wkit.space import WeightSpace  # noqa: E402
from w2wkit.testing import (  # noqa: E402
    attention_modules,
    component_module,
    module_shapes,
    random_adapter,
)

PROMPT = "a photo of sks person"
UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def _space(shapes, n=8, k=5, scale=3.0):
    """A space of ``n`` random rank-1 LoRAs (large enough that coefficients move the loss)."""
    ads = [random_adapter(shapes, rank=1, alpha=1.0, seed=i, scale=scale) for i in range(n)]
    return WeightSpace(k).fit(ads)


@pytest.fixture(scope="module")
def xl(tiny_sdxl_pipe):
    """Tiny SDXL pipeline (VAE latents normalised), images, a space of its UNet's attention."""
    pipe = copy.deepcopy(tiny_sdxl_pipe)  # normalise_vae changes the VAE
    images = block_images(2, seed=3)
    normalise_vae(pipe, images)
    space = _space(module_shapes(pipe, attention_modules(pipe, UNET_ATTN)))
    return pipe, space, images


# ---------------------------------------------------------------- reference


def _reference(pipe, space, image, k, steps, lr, seed, window, prompt=PROMPT):
    """Adam (torch.optim) on the coefficients, the LoRA merged into the weights by
    ``torch.func.functional_call``, the conditioning from diffusers' SDXL pipeline
    (``encode_prompt`` and ``_get_add_time_ids``): no w2wkit code."""
    from torch.func import functional_call

    unet = pipe.unet
    lay = space.layout_
    comps = torch.as_tensor(space.components_[:k])
    scale = torch.as_tensor(space.scale_)
    mean = torch.as_tensor(space.mean_)
    sf = pipe.vae.config.scaling_factor
    h, w = image.shape[:2]
    with torch.no_grad():
        x = torch.as_tensor(image)[None].permute(0, 3, 1, 2) * 2 - 1
        lat = pipe.vae.encode(x).latent_dist.mean * sf
        emb, _, pooled, _ = pipe.encode_prompt(
            prompt=[prompt],
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        time_ids = pipe._get_add_time_ids(
            (h, w),
            (0, 0),
            (h, w),
            dtype=emb.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        )
    cond = {"text_embeds": pooled, "time_ids": time_ids}
    base_w = {m: component_module(pipe, m).weight.detach() for m in lay.modules}
    c = torch.zeros(1, k, requires_grad=True)
    opt = torch.optim.Adam([c], lr=lr)
    g = torch.Generator().manual_seed(seed)
    ac = pipe.scheduler.alphas_cumprod
    for step in range(steps):
        if step % window == 0:
            perm = torch.randperm(window, generator=g)
        u = torch.rand(1, generator=g).item()
        t = torch.tensor([min(999, int((int(perm[step % window]) + u) * 1000 / window))])
        noise = torch.randn(lat.shape[1:], generator=g)[None]
        flat = (c @ comps) * scale + mean
        params = {}
        for m in lay.modules:
            d_slot, u_slot = lay.slots_of(m)
            down = flat[0, d_slot.offset : d_slot.stop].reshape(d_slot.shape)
            up = flat[0, u_slot.offset : u_slot.stop].reshape(u_slot.shape)
            params[m.split(".", 1)[1] + ".weight"] = base_w[m] + lay.scale(m) * up @ down
        a = ac[t].view(1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        kw = {"encoder_hidden_states": emb, "added_cond_kwargs": cond}
        pred = functional_call(unet, params, (noisy, t), kw).sample
        loss = ((pred - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return c.detach().double().numpy()[0]


def test_sdxl_inversion_matches_an_independent_reference(xl):
    pipe, space, images = xl
    ref = _reference(pipe, space, images[0], k=3, steps=4, lr=0.2, seed=7, window=4)
    res = invert(
        space, pipe, images[:1], n_components=3, steps=4, lr=0.2, seed=7, window=4,
        prompt=PROMPT, device="cpu",
    )  # fmt: skip
    assert np.abs(ref).max() > 0.1  # it moved
    np.testing.assert_allclose(res.coefficients[0, :3], ref, atol=1e-4)
    assert np.all(res.coefficients[0, 3:] == 0)


@pytest.mark.slow
def test_sdxl_inversion_lowers_the_loss(xl):
    """40 steps from the mean model: the objective on fixed draws falls (1.196 -> 1.105)."""
    pipe, space, images = xl
    res = invert(space, pipe, images[:1], steps=40, lr=0.5, seed=1, prompt=PROMPT, device="cpu")
    assert np.isfinite(res.coefficients).all() and np.isfinite(res.losses).all()
    kw = {"n_samples": 8, "prompt": PROMPT, "device": "cpu"}
    before = inversion_loss(space, pipe, images[:1], np.zeros(space.n_components_), **kw)
    after = inversion_loss(space, pipe, images[:1], res.coefficients, **kw)
    assert after[0] < before[0] * 0.97, (before, after)


def test_sdxl_inversion_loads_in_diffusers_and_renders(xl, tmp_path):
    from w2wkit.diffusion import Renderer
    from w2wkit.testing import unet_weights

    pipe, space, images = xl
    inverted = invert(space, pipe, images[:1], steps=3, lr=0.5, prompt=PROMPT, device="cpu")
    assert np.isfinite(inverted.coefficients).all() and np.abs(inverted.coefficients).max() > 0
    files = inverted.save(tmp_path / "inv", space="space", base="tiny-sdxl")
    ad = read_adapter(files[0])
    assert set(ad.layers) == set(space.layout_.modules)
    for m, layer in inverted.adapters[0].items():
        np.testing.assert_allclose(ad.layers[m].delta(), layer.delta(), atol=1e-6)
    # the file loads in diffusers' SDXL pipeline with its delta
    other = copy.deepcopy(pipe)
    mods = list(ad.layers)
    before = unet_weights(other, mods)
    other.load_lora_weights(str(files[0]), adapter_name="inv")
    other.fuse_lora(adapter_names=["inv"])
    after = unet_weights(other, mods)
    for m in mods:
        delta = ad.layers[m].delta().astype(np.float64)
        err = np.abs(after[m] - before[m] - delta).max() / max(np.abs(delta).max(), 1e-12)
        assert err <= 1e-4, m
    # and renders with the engine
    r = Renderer(copy.deepcopy(pipe), device="cpu")
    res = r.render([None, files[0]], PROMPT, seeds=[0], steps=2, guidance=3.0)
    assert np.isfinite(res.images).all()
    assert np.abs(res.images[1] - res.images[0]).max() > 1e-3


def test_sdxl_text_encoder_spaces_batch_as_alone(xl):
    """Both text encoders in the space: each image's prompt goes through its own LoRA."""
    pipe, _, images = xl
    mods = attention_modules(pipe, ("to_q",))
    mods += attention_modules(pipe, ("q_proj",), "text_encoder")
    mods += attention_modules(pipe, ("q_proj",), "text_encoder_2")
    space = _space(module_shapes(pipe, mods), k=3)
    kw = {"steps": 3, "lr": 0.3, "prompt": PROMPT, "device": "cpu", "window": 3}
    both = invert(space, pipe, images, seed=[4, 5], **kw)
    for i in range(2):
        alone = invert(space, pipe, images[i : i + 1], seed=[4 + i], **kw)
        np.testing.assert_allclose(both.coefficients[i], alone.coefficients[0], atol=1e-4)
    assert np.abs(both.coefficients[0] - both.coefficients[1]).max() > 1e-3
    # a space of the second text encoder only: its gradient reaches the coefficients
    only2 = _space(module_shapes(pipe, attention_modules(pipe, ("q_proj",), "text_encoder_2")))
    res = invert(only2, pipe, images[:1], **{**kw, "steps": 2})
    assert np.abs(res.coefficients).max() > 1e-3


def test_cli_invert_on_an_sdxl_folder(xl, tiny_sdxl_pipe_dir, tmp_path):
    from PIL import Image

    _, space, images = xl
    space.save(tmp_path / "space")
    pic = tmp_path / "face.png"
    Image.fromarray((images[0] * 255).astype(np.uint8)).save(pic)
    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli,
        ["invert", str(pic), "--space", str(tmp_path / "space"), "--base",
         str(tiny_sdxl_pipe_dir), "-o", str(out), "--steps", "2", "--device", "cpu",
         "--prompt", PROMPT],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    ad = read_adapter(out / "face.safetensors")
    assert set(ad.layers) == set(space.layout_.modules)


def test_sdxl_float16_inversion_encodes_in_float32(xl):
    """A float16 SDXL VAE that asks for it (``force_upcast``) encodes in float32, then stays
    float16; the float16 inversion follows the float32 one."""
    pipe, space, images = xl
    half = copy.deepcopy(pipe)
    assert half.vae.config.force_upcast
    kw = {"steps": 3, "lr": 0.2, "seed": 2, "prompt": PROMPT, "device": "cpu"}
    ref = invert(space, copy.deepcopy(pipe), images[:1], **kw)
    res = invert(space, half, images[:1], dtype="float16", **kw)
    assert half.vae.dtype == torch.float16 and half.unet.dtype == torch.float16
    assert np.isfinite(res.coefficients).all() and np.isfinite(res.losses).all()
    np.testing.assert_allclose(res.coefficients, ref.coefficients, atol=0.05)
    np.testing.assert_allclose(res.losses, ref.losses, rtol=0.05)
