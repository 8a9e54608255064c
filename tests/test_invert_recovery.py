"""Inversion finds the model an image belongs to, and lowers the loss (trained toy world).

The tiny random pipeline cannot show this: its denoiser knows nothing about
images. ``_invert_world.train_toy_world`` trains the tiny UNet jointly with one
rank-1 LoRA per image (shared initialisation, prompt "sks person"), so each
LoRA carries its image's identity as the zoo's LoRAs do (about 15 s on one
core). The images given to the inversion are the models' own training images
(the tiny random VAE cannot decode renders that re-encode to the same latents,
so "the model's own render" is checked on the miniature world, not here).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from _invert_world import train_toy_world  # noqa: E402

from w2wkit.invert import inversion_loss, invert  # noqa: E402
from w2wkit.space import WeightSpace  # noqa: E402

N_MODELS = 6


#: Trains a toy world of models first (about 20 s): the full lane runs it.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy():
    torch.set_num_threads(1)
    world = train_toy_world(N_MODELS, steps=250, seed=0)
    space = WeightSpace(N_MODELS - 1).fit(world.adapters)
    targets = [0, 1, 2, 3]
    res = invert(
        space, world.pipe, world.images[targets], steps=120, lr=0.3, seed=100, device="cpu"
    )
    return world, space, targets, res


def test_models_are_specific_to_their_images(toy):
    """Precondition of the world: model j fits image j best (fixed draws)."""
    world, space, targets, _ = toy
    c = space.coefficients_.astype(np.float64)
    table = np.stack(
        [
            inversion_loss(
                space, world.pipe, world.images[targets], np.repeat(c[i : i + 1], 4, 0),
                n_samples=16, device="cpu",
            )
            for i in range(N_MODELS)
        ]
    )  # fmt: skip
    assert list(table.argmin(axis=0)) == targets


def test_inversion_lowers_the_loss(toy):
    world, space, targets, res = toy
    before = inversion_loss(space, world.pipe, world.images[targets], np.zeros(5), device="cpu")
    after = inversion_loss(space, world.pipe, world.images[targets], res.coefficients, device="cpu")
    # the loss of the model trained on each image: the level inversion should reach
    own = np.array(
        [
            inversion_loss(space, world.pipe, world.images[j : j + 1], c[j], device="cpu")[0]
            for j, c in ((j, space.coefficients_) for j in targets)
        ]
    )
    assert np.all(after < 0.95 * before), (before, after)
    assert np.all(after < 1.02 * own), (after, own)
    # (the per-step training loss is too noisy to compare: each step draws its own t)


def test_recovers_the_images_model(toy):
    _, space, targets, res = toy
    c = space.coefficients_.astype(np.float64)
    rng = np.random.default_rng(0)
    for row, j in enumerate(targets):
        d = np.linalg.norm(c - res.coefficients[row], axis=1)
        other = rng.choice([i for i in range(N_MODELS) if i != j])
        assert d[j] < d[other], (j, d)  # the check: closer than a random model
        assert int(np.argmin(d)) == j, (j, d)  # stronger: the nearest training model
        assert d[j] < 0.5 * np.linalg.norm(c[j])  # and much closer than the mean model
