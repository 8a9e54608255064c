"""Mixed-precision training (``Recipe.precision``, ``DreamBooth(precision=)``, ``RowAdam``).

bf16/fp16 store the frozen UNet and text encoders in half and run them under autocast;
the LoRA factors, their Adam state and the loss stay float32; fp16 adds a loss scale per
model. On the CPU both run (slowly for fp16); the checks are the ones that carry to a
GPU: batched training equals one-at-a-time training in the same precision, the engine
equals a diffusers-style peft loop in the same precision, the result stays near fp32,
and a model whose fp16 gradients overflow skips its step alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from w2wkit.cli.main import cli  # noqa: E402
from w2wkit.diffusion.dreambooth import DreamBooth, RowAdam  # noqa: E402
from w2wkit.errors import W2WError  # noqa: E402
from w2wkit.formats.registry import read_adapter  # noqa: E402
from w2wkit.training import MANIFEST, Recipe  # noqa: E402

PROMPT = "a photo of sks person"
LR = 1e-3


def pictures(n_models: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8) for _ in range(n_models)]


def delta_stack(adapters) -> np.ndarray:
    return np.stack(
        [np.concatenate([layer.delta().ravel() for layer in ad.layers.values()]) for ad in adapters]
    )


# ------------------------------------------------------------------------------ RowAdam


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 4),
    width=st.integers(1, 6),
    steps=st.integers(1, 5),
    lr=st.floats(1e-4, 1e-1),
    log_scale=st.integers(0, 16),
    seed=st.integers(0, 2**16),
)
def test_row_adam_is_adam_per_model(m, width, steps, lr, log_scale, seed):
    # finite gradients: every model's rows move as torch's Adam moves them (the loss
    # scale, a power of two, divides out exactly)
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(m, 2, width, generator=g)
    grads = [torch.randn(m, 2, width, generator=g) for _ in range(steps)]
    a = p0.clone().requires_grad_(True)
    ref = torch.optim.Adam([a], lr=lr, weight_decay=0.0)
    b = p0.clone().requires_grad_(True)
    ours = RowAdam([b], m, lr=lr, init_scale=2.0**log_scale)
    for gr in grads:
        a.grad = gr.clone()
        ref.step()
        b.grad = gr * ours.scale.view(-1, 1, 1)
        ours.step()
    torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-7)
    assert ours.steps.tolist() == [steps] * m and ours.skipped.sum() == 0


def test_row_adam_skips_an_overflowing_model_alone():
    # model 1's scaled gradient overflows at step 2: it keeps its rows, moments and step
    # count and halves its scale; the others move exactly as Adam without it
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 4, generator=g)
    grads = [torch.randn(3, 4, generator=g) for _ in range(3)]
    b = p0.clone().requires_grad_(True)
    ours = RowAdam([b], 3, lr=0.01, init_scale=8.0)
    alone = p0[[0, 2]].clone().requires_grad_(True)
    ref = torch.optim.Adam([alone], lr=0.01, weight_decay=0.0)
    one = p0[[1]].clone().requires_grad_(True)  # model 1 alone: it skips step 2 (index 1)
    ref1 = torch.optim.Adam([one], lr=0.01, weight_decay=0.0)
    for k, gr in enumerate(grads):
        scaled = gr * ours.scale.view(-1, 1)
        if k == 1:
            scaled[1, 2] = float("inf")
        b.grad = scaled
        ours.step()
        alone.grad = gr[[0, 2]].clone()
        ref.step()
        if k != 1:
            one.grad = gr[[1]].clone()
            ref1.step()
        if k == 1:
            assert ours.scale.tolist() == [8.0, 4.0, 8.0]
    torch.testing.assert_close(b.detach()[[0, 2]], alone.detach())
    torch.testing.assert_close(b.detach()[[1]], one.detach())
    assert ours.steps.tolist() == [3, 2, 3] and ours.skipped.tolist() == [0, 1, 0]


def test_row_adam_grows_the_scale_after_a_run_of_finite_steps():
    b = torch.zeros(2, 3, requires_grad=True)
    ours = RowAdam([b], 2, lr=0.1, init_scale=4.0, growth_interval=2)
    for _ in range(2):
        b.grad = torch.ones(2, 3) * ours.scale.view(-1, 1)
        ours.step()
    assert ours.scale.tolist() == [8.0, 8.0]


# ------------------------------------------------------------------------------ engine


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_half_precision_batched_equals_alone_and_stays_near_fp32(
    kind, precision, tiny_pipe_dir, tiny_sdxl_pipe_dir
):
    base = tiny_pipe_dir if kind == "sd" else tiny_sdxl_pipe_dir
    imgs = pictures(3)
    ref = DreamBooth(base, targets=("to_q", "to_v"), device="cpu")
    full, _ = ref.train(imgs, PROMPT, [4, 5, 6], steps=3, batch=2, lr=LR)
    db = DreamBooth(base, targets=("to_q", "to_v"), device="cpu", precision=precision)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert next(db.pipe.unet.parameters()).dtype == half
    assert next(db.pipe.text_encoder.parameters()).dtype == half
    assert next(db.pipe.vae.parameters()).dtype == torch.float32  # SDXL's VAE overflows in fp16
    # the shared initialisation does not depend on the precision
    for t in db.targets:
        torch.testing.assert_close(db.init_down[t], ref.init_down[t])
    together, losses = db.train(imgs, PROMPT, [4, 5, 6], steps=3, batch=2, lr=LR)
    assert all(p.dtype == torch.float32 for p in db.bank.parameters())
    assert np.isfinite(losses).all()
    alone = [db.train([imgs[j]], PROMPT, [4 + j], steps=3, batch=2, lr=LR)[0][0] for j in range(3)]
    a, b = delta_stack(together), delta_stack(alone)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())
    # half arithmetic, the same training: Adam's first steps move by about lr times the
    # sign of each gradient, which half rounding flips where a gradient is near zero
    c = delta_stack(full)
    cos = float(np.sum(a * c) / (np.linalg.norm(a) * np.linalg.norm(c)))
    assert 0.98 < cos < 1.0, cos


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_engine_equals_a_peft_loop(precision, tiny_sdxl_pipe_dir):
    # diffusers' --mixed_precision recipe (the UNet in half, the LoRA parameters cast
    # back to float32, autocast, GradScaler for fp16) and the engine agree
    from w2wkit.testing import peft_dreambooth_sdxl

    recipe = Recipe(steps=3, batch=2, lr=LR, targets=("to_q", "to_v"), precision=precision)
    imgs = pictures(2, seed=3)
    db = DreamBooth(tiny_sdxl_pipe_dir, targets=recipe.targets, device="cpu", precision=precision)
    ours, _ = db.train(imgs, PROMPT, [11, 12], steps=3, batch=2, lr=LR)
    for j in range(2):
        ref, _ = peft_dreambooth_sdxl(
            tiny_sdxl_pipe_dir, recipe, imgs[j], PROMPT, seed=11 + j, precision=precision
        )
        x, y = delta_stack([ours[j]]).ravel(), delta_stack([ref]).ravel()
        # the two loops round in half at different places (bf16 keeps 8 bits, fp16 11),
        # and Adam's first steps follow each gradient's sign: measured 0.17 / 0.08
        # (bf16) and 0.020 / 0.005 (fp16) relative, 1e-6 in fp32
        rel = np.linalg.norm(x - y) / np.linalg.norm(y)
        cos = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
        limit, min_cos = {"bf16": (0.3, 0.97), "fp16": (0.05, 0.998)}[precision]
        assert rel <= limit and cos >= min_cos, (rel, cos)


def test_unknown_precision_is_one_error(tiny_pipe_dir):
    with pytest.raises(W2WError, match="precision") as err:
        DreamBooth(tiny_pipe_dir, device="cpu", precision="fp8")
    assert err.value.param == "precision"
    with pytest.raises(W2WError, match="precision"):
        Recipe(precision="half").check()


# ------------------------------------------------------------------------------ train


def test_train_cli_in_bf16_records_the_precision(tmp_path, tiny_pipe_dir):
    from PIL import Image

    people = tmp_path / "people"
    for j, name in enumerate(("ann", "bob")):
        (people / name).mkdir(parents=True)
        for k, pic in enumerate(pictures(2, seed=j)[0]):
            Image.fromarray(pic).save(people / name / f"{k}.png")
    out = tmp_path / "out"
    args = ["train", people, "--base", tiny_pipe_dir, "-o", out, "--steps", "2"]
    args += ["--targets", "to_q,to_v", "--device", "cpu", "--precision", "bf16"]
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["recipe"]["precision"] == "bf16"
    for name in ("ann", "bob"):
        ad = read_adapter(Path(out) / f"{name}.safetensors")
        assert all(np.isfinite(layer.up).all() for layer in ad.layers.values())
    # the same OUT with another precision is another recipe: refused, the models kept
    args[-1] = "fp32"
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "recipe" in res.output
    # an fp32 recipe's manifest reads as before (precision left out at its default)
    assert "precision" not in Recipe().as_dict()


def test_full_size_unet_configs_are_the_published_models():
    # the GPU benchmark's presets build SD1.5's and SDXL's UNets (random weights); on the
    # meta device nothing is allocated: only the architecture is counted
    from diffusers import UNet2DConditionModel

    from w2wkit.testing import SD15_UNET, SDXL_UNET

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(in_channels=4, out_channels=4, **SD15_UNET)
        sdxl = UNet2DConditionModel(
            in_channels=4,
            out_channels=4,
            cross_attention_dim=768 + 1280,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=6 * 256 + 1280,
            **SDXL_UNET,
        )
    assert sum(p.numel() for p in sd15.parameters()) == 859_520_964
    assert sum(p.numel() for p in sdxl.parameters()) == 2_567_463_684
    n_attn = sum(1 for n, _ in sdxl.named_modules() if n.endswith("attn1.to_q"))
    assert n_attn == 70  # transformer blocks: down 2x2 + 2x10, mid 10, up 3x10 + 3x2
