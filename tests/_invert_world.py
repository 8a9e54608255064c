"""A trained toy world for the inversion tests (tiny pipeline, seconds on one core).

The tiny test pipeline's random VAE gives latents with a standard deviation of
about 0.03, so noise drowns every image and the epsilon-prediction loss hardly
depends on the image. As the miniature world's builder does, the VAE's
``scaling_factor`` is set so that latents have unit standard deviation. Then the
UNet and one rank-1 LoRA per image (``to_q``/``to_v``, the same initialisation
for every model) are trained jointly on ``M`` images with the prompt
"sks person": the only thing telling the images apart is each model's LoRA,
so the LoRAs carry the identities, as the zoo's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer


def block_images(n: int, seed: int = 0, side: int = 16, blocks: int = 4) -> np.ndarray:
    """``(n, side, side, 3)`` float32 images of random ``blocks x blocks`` colour tiles."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 1, (n, blocks, blocks, 3))
    rep = side // blocks
    return np.kron(low, np.ones((1, rep, rep, 1))).astype(np.float32)


def normalise_vae(pipe: Any, images: np.ndarray) -> None:
    """Set ``vae.config.scaling_factor`` to ``1 / std`` of the images' latent means."""
    import torch

    with torch.no_grad():
        x = torch.as_tensor(images).permute(0, 3, 1, 2) * 2 - 1
        lat = pipe.vae.encode(x).latent_dist.mean
    pipe.vae.register_to_config(scaling_factor=float(1.0 / lat.std()))


@dataclass
class ToyWorld:
    pipe: Any
    images: np.ndarray
    adapters: list[Adapter]


def train_toy_world(n_models: int = 6, steps: int = 300, seed: int = 0) -> ToyWorld:
    """Jointly train the tiny UNet and one LoRA per image (see the module docstring)."""
    import torch

    from w2wkit.render import StackedLayer, per_sample_lora
    from w2wkit.testing import attention_modules, module_shapes, tiny_pipeline

    torch.manual_seed(seed)
    pipe = tiny_pipeline(seed=seed)
    images = block_images(n_models, seed=seed)
    normalise_vae(pipe, images)
    mods = attention_modules(pipe)
    shapes = module_shapes(pipe, mods)
    for p in [*pipe.vae.parameters(), *pipe.text_encoder.parameters()]:
        p.requires_grad_(False)
    sf = pipe.vae.config.scaling_factor
    with torch.no_grad():
        x = torch.as_tensor(images).permute(0, 3, 1, 2) * 2 - 1
        lat = pipe.vae.encode(x).latent_dist.mean * sf
        emb = pipe.encode_prompt(["sks person"], "cpu", 1, False, None)[0]
    g = torch.Generator().manual_seed(seed)
    n = n_models
    down = {
        m: (torch.randn(1, 1, shapes[m][1], generator=g) / shapes[m][1] ** 0.5)
        .repeat(n, 1, 1)
        .requires_grad_(True)
        for m in mods
    }
    up = {m: torch.zeros(n, shapes[m][0], 1, requires_grad=True) for m in mods}
    opt = torch.optim.Adam(
        [
            {"params": [*down.values(), *up.values()], "lr": 1e-2},
            {"params": list(pipe.unet.parameters()), "lr": 2e-3},
        ]
    )
    ac = pipe.scheduler.alphas_cumprod
    bank = {
        m: StackedLayer(
            np.zeros((n, 1, shapes[m][1]), np.float32), np.zeros((n, shapes[m][0], 1), np.float32)
        )
        for m in mods
    }
    with per_sample_lora(pipe, bank, "cpu", torch.float32) as patch:
        patch.set_index("unet", torch.arange(n))
        for _ in range(steps):
            for m in mods:
                patch.set_factors(m, down[m], up[m])
            t = torch.randint(0, 1000, (n,), generator=g)
            noise = torch.randn(lat.shape, generator=g)
            a = ac[t].view(n, 1, 1, 1)
            pred = pipe.unet(
                a.sqrt() * lat + (1 - a).sqrt() * noise,
                t,
                encoder_hidden_states=emb.expand(n, -1, -1),
            ).sample
            loss = ((pred - noise) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in pipe.unet.parameters():
        p.requires_grad_(False)
    adapters = [
        Adapter(
            {
                m: LoraLayer(
                    down=down[m][i].detach().numpy().copy(),
                    up=up[m][i].detach().numpy().copy(),
                    alpha=1.0,
                )
                for m in mods
            },
            {"name": f"toy{i}"},
        )
        for i in range(n)
    ]
    for p in pipe.unet.parameters():
        p.requires_grad_(True)
    return ToyWorld(pipe, images, adapters)
