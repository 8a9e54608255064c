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
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ------------------------------------------------------------ the bank layer's own backward


def _bank_layer(in_f, out_f, down, up, scale, index, groups, dtype=torch.float64):
    from w2wkit.diffusion.bank import _layer_class, _Selector

    base = torch.nn.Linear(in_f, out_f).to(dtype).requires_grad_(False)
    sel = _Selector()
    sel.index, sel.groups = index, groups
    layer = _layer_class()(base, down, up, sel, scale=scale, trainable=True)
    return base, layer


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 3),
    k=st.integers(1, 3),
    length=st.integers(0, 4),
    in_f=st.integers(1, 5),
    out_f=st.integers(1, 5),
    rank=st.integers(1, 3),
    scale=st.sampled_from([1.0, 0.5, -2.0]),
    grouped=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bank_layer_values_and_gradients_equal_the_plain_formula(
    m, k, length, in_f, out_f, rank, scale, grouped, seed
):
    # y_b = base(x_b) + scale * x_b A_{i(b)}^T B_{i(b)}^T for every sample b, with the
    # gradients autograd gives that formula, grouped by model (no gather) or any index
    g = torch.Generator().manual_seed(seed)
    n = m * k
    index = (
        torch.arange(m).repeat_interleave(k) if grouped else torch.randint(0, m, (n,), generator=g)
    )
    shape = (n, in_f) if length == 0 else (n, length, in_f)
    down = torch.randn(m, rank, in_f, generator=g, dtype=torch.float64)
    up = torch.randn(m, out_f, rank, generator=g, dtype=torch.float64)
    base, layer = _bank_layer(
        in_f, out_f, down.clone(), up.clone(), scale, index, k if grouped else None
    )
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(*shape[:-1], out_f, generator=g, dtype=torch.float64)
    (layer(x) * w).sum().backward()

    a = down.clone().requires_grad_(True)
    b = up.clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    xs = x2 if length else x2[:, None, :]
    upd = torch.einsum("nli,nri,nor->nlo", xs, a[index], b[index]) * scale
    ref = base(x2) + (upd if length else upd[:, 0])
    (ref * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_down.grad, a.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_up.grad, b.grad, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-10, atol=1e-10)


def test_bank_layer_passes_gradcheck_and_refuses_a_wrong_grouping():
    from w2wkit.diffusion.bank import _layer_class

    update = _layer_class().update
    g = torch.Generator().manual_seed(0)
    for groups, index in ((2, torch.tensor([0, 0, 1, 1])), (None, torch.tensor([1, 0, 1, 1]))):
        for rank in (1, 2):
            x = torch.randn(4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
            y = torch.randn(4, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
            a = torch.randn(2, rank, 3, generator=g, dtype=torch.float64, requires_grad=True)
            b = torch.randn(2, 4, rank, generator=g, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(
                lambda x, y, a, b, i=index, k=groups: update.apply(x, y, a, b, i, k, 0.7),
                (x, y, a, b),
            )
    down, up = torch.zeros(2, 1, 3, dtype=torch.float64), torch.zeros(2, 4, 1, dtype=torch.float64)
    _, layer = _bank_layer(3, 4, down, up, 1.0, torch.tensor([0, 0, 1]), 2)
    with pytest.raises(RuntimeError, match="2 models x 2 samples"):
        layer(torch.randn(3, 3, dtype=torch.float64))


def test_bank_layer_under_bf16_autocast_updates_in_the_base_type_and_grads_stay_float32():
    # half-precision training: float32 factors, a bf16 base layer under autocast; the
    # output keeps the base layer's type, the factors' gradients are float32 and near the
    # float64 ones (bf16 keeps 8 bits)
    g = torch.Generator().manual_seed(1)
    down = torch.randn(2, 1, 16, generator=g) * 0.3
    up = torch.randn(2, 8, 1, generator=g) * 0.3
    index = torch.tensor([0, 0, 1, 1])
    base, layer = _bank_layer(16, 8, down.clone(), up.clone(), 1.0, index, 2, torch.bfloat16)
    x = torch.randn(4, 6, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_down.grad.dtype == torch.float32
    _, ref = _bank_layer(16, 8, down.double(), up.double(), 1.0, index, 2)
    ref.base_layer.weight.copy_(base.weight.double())
    ref.base_layer.bias.copy_(base.bias.double())
    ref(x.double()).sum().backward()
    for got, want in (
        (layer.lora_down.grad, ref.lora_down.grad),
        (layer.lora_up.grad, ref.lora_up.grad),
    ):
        rel = (got.double() - want).norm() / want.norm()
        assert rel < 2e-2, float(rel)
