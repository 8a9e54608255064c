"""The diffusion engine's parts: sampler entry points, schedulers, the bank's two modes,
schedule helpers, pipeline kinds and the quiet context.

The renderer's equality with diffusers is tests/test_render.py; the trainable bank's
batched training against a peft loop is tests/test_world_zoo.py.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from w2wkit.diffusion import (  # noqa: E402
    Renderer,
    install_bank,
    load_pipeline,
    pipeline_kind,
    quiet,
    stack_adapters,
    stack_factors,
)
from w2wkit.diffusion.schedule import alphas_cumprod, noisy, target  # noqa: E402
from w2wkit.errors import W2WError  # noqa: E402
from w2wkit.testing import attention_modules, module_shapes, random_adapter  # noqa: E402

PROMPT = "a photo of sks person"


@pytest.fixture(scope="module")
def renderer(tiny_pipe):
    return Renderer(copy.deepcopy(tiny_pipe), device="cpu")


@pytest.fixture(scope="module")
def adapters(tiny_pipe):
    shapes = module_shapes(tiny_pipe, attention_modules(tiny_pipe))
    return [random_adapter(shapes, rank=1, alpha=1.0, seed=s, scale=0.5) for s in (1, 2)]


def test_sample_equals_render_for_each_model_prompt_and_seed(renderer, adapters):
    grid = renderer.render([*adapters, None], [PROMPT, "a dog"], [0, 7], steps=3).images
    bank = stack_adapters(adapters)
    got = renderer.sample(bank, [1, 0, 1], [PROMPT, "a dog", "a dog"], [7, 0, 0], steps=3)
    assert got.shape == (3, *grid.shape[3:])
    for img, ref in zip(got, [grid[1, 0, 1], grid[0, 1, 0], grid[1, 1, 0]], strict=True):
        assert float(np.abs(img - ref).max()) < 1e-5
    base = renderer.sample(None, None, [PROMPT], [7], steps=3)[0]
    assert float(np.abs(base - grid[2, 0, 1]).max()) < 1e-5
    assert float(np.abs(base - got[0]).max()) > 0.01  # the models are not ignored


def test_sample_refuses_mismatched_lists_and_indices(renderer, adapters):
    bank = stack_adapters(adapters)
    with pytest.raises(W2WError, match="one of each per picture"):
        renderer.sample(bank, [0, 1], [PROMPT], [0, 1], steps=1)
    with pytest.raises(W2WError, match=r"model indices must be in 0\.\.1"):
        renderer.sample(bank, [2], [PROMPT], [0], steps=1)


def test_a_named_scheduler_renders_as_diffusers_with_that_scheduler(tiny_pipe, renderer):
    from diffusers import EulerDiscreteScheduler

    assert type(tiny_pipe.scheduler) is not EulerDiscreteScheduler
    ref_pipe = copy.deepcopy(tiny_pipe)
    ref_pipe.scheduler = EulerDiscreteScheduler.from_config(ref_pipe.scheduler.config)
    ref = ref_pipe(
        PROMPT,
        num_inference_steps=4,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).images[0]
    res = renderer.render([None], PROMPT, 5, steps=4, guidance=3.0, scheduler="euler")
    assert res.info["scheduler"] == "EulerDiscreteScheduler"
    assert float(np.abs(res.images[0, 0, 0] - ref).max()) < 1e-4
    own = renderer.render([None], PROMPT, 5, steps=4, guidance=3.0)
    assert float(np.abs(own.images - res.images).max()) > 1e-3
    with pytest.raises(W2WError, match="unknown scheduler 'nope'"):
        renderer.render([None], PROMPT, 5, steps=1, scheduler="nope")


def test_trainable_bank_gives_each_row_only_its_samples_gradient(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe)
    mods = attention_modules(pipe)
    rng = np.random.default_rng(0)
    factors = {}
    for m, (out_f, in_f) in module_shapes(pipe, mods).items():
        factors[m] = (rng.normal(size=(3, 1, in_f)), rng.normal(size=(3, out_f, 1)))
    bank = install_bank(pipe, factors, "cpu", torch.float32, scale=0.5, trainable=True)
    assert all(p.requires_grad for p in bank.parameters())
    unet = pipe.unet
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim)
    bank.set_index("unet", torch.tensor([2, 0]))
    out = unet(x, torch.tensor([10, 10]), encoder_hidden_states=ehs).sample
    out[0].pow(2).mean().backward()  # only sample 0, which uses row 2
    grads = [w.lora_up.grad for w in bank.wrappers.values()]
    assert all(g[1].abs().max() == 0 and g[0].abs().max() == 0 for g in grads)
    assert any(g[2].abs().max() > 0 for g in grads)
    # removing the bank gives the pipeline back its own layers
    bank.remove()
    assert all(
        type(pipe.unet.get_submodule(m.removeprefix("unet."))).__name__ == "Linear" for m in mods
    )


def test_stack_factors_folds_alpha_over_rank_into_up():
    a = np.ones((2, 2, 3), np.float32)
    b = np.full((2, 4, 2), 3.0, np.float32)
    st = stack_factors({"mid.to_q": (a, b)}, alpha=8.0)["unet.mid.to_q"]
    np.testing.assert_array_equal(st.down, a)
    np.testing.assert_array_equal(st.up, 12.0)  # 3 * 8 / 2


def test_noising_and_targets_match_the_scheduler(tiny_pipe):
    sched = copy.deepcopy(tiny_pipe.scheduler)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    acp = alphas_cumprod(sched)
    torch.testing.assert_close(noisy(x0, eps, t, acp), sched.add_noise(x0, eps, t))
    torch.testing.assert_close(
        target(x0, eps, t, acp, "v_prediction"), sched.get_velocity(x0, eps, t)
    )
    assert target(x0, eps, t, acp) is eps
    with pytest.raises(W2WError, match="sample"):
        target(x0, eps, t, acp, "sample")


def test_an_sdxl_folder_is_recognised_and_refused_by_the_renderer(tmp_path):
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["t", "C"]})
    )
    assert pipeline_kind(tmp_path) == "sdxl"
    with pytest.raises(W2WError, match="SDXL"):
        load_pipeline(tmp_path, device="cpu")


def test_quiet_restores_what_it_silenced():
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_info()
    dlog.enable_progress_bar()
    try:
        with pytest.raises(RuntimeError), quiet():
            assert dlog.get_verbosity() == dlog.ERROR
            assert not dlog.is_progress_bar_enabled()
            raise RuntimeError("inside")
        assert dlog.get_verbosity() == dlog.INFO and dlog.is_progress_bar_enabled()

        @quiet()
        def work() -> int:
            return dlog.get_verbosity()

        assert work() == dlog.ERROR and dlog.get_verbosity() == dlog.INFO
    finally:
        dlog.set_verbosity(level)
