"""SDXL in the diffusion engine and in ``w2wkit train`` (tiny SDXL-architecture pipeline).

``tiny_sdxl_pipe`` has the SDXL architecture with random weights: two CLIP text
encoders (the second with a projection), a UNet with ``addition_embed_type="text_time"``,
a tiny VAE. On it: the renderer equals diffusers' ``StableDiffusionXLPipeline``; the
per-sample LoRA bank renders many models as each one fused; batched training equals one
model at a time and a peft loop in the style of diffusers' ``train_dreambooth_lora_sdxl``;
the trained files load in diffusers and PEFT; train -> fit -> directions -> apply ->
render works end to end.

Adam and float32: a batch runs the base layers' matrix products on more rows than one
model alone, so gradients agree to float32 rounding (~1e-5 of their scale,
``test_batched_gradients_equal_alone``). Adam divides each gradient entry by its own
magnitude plus ``eps = 1e-8``: on entries whose gradient is near ``eps`` that rounding
becomes up to ~1% of one step (``lr``). The Adam comparisons therefore allow
``rtol 1e-4`` plus ``atol = 1e-2 * lr`` (the values are ~``steps * lr``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from w2wkit.cli.main import cli
from w2wkit.formats.registry import read_adapter
from w2wkit.training import MANIFEST, Recipe, train

NAMES = ["ann", "bob", "cat", "dan"]
LABELS = {"ann": 0, "bob": 1, "cat": 0, "dan": 1}
LR = 1e-3
RECIPE = Recipe(steps=3, batch=2, lr=LR, targets=("to_q", "to_v"))
PROMPT = "a photo of sks person"


def run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def make_people(root: Path, names=NAMES) -> Path:
    """Instance folders of three 16 px random pictures each (one 20x24) and a labels.csv."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for name in names:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for j, (h, w) in enumerate(((16, 16), (20, 24), (16, 16))):
            pic = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            pic[..., 0] = 200 if LABELS.get(name) else 30
            Image.fromarray(pic).save(d / f"{j}.png")
    rows = "".join(f"{n},{LABELS.get(n, 0)}\n" for n in names)
    (root / "labels.csv").write_text("name,red\n" + rows)
    return root


def factors(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ad = read_adapter(path)
    return {k: (v.down, v.up) for k, v in ad.layers.items()}


def assert_same_training(fa, fb, lr=LR):
    """Equal up to float32 rounding through Adam (see the module docs)."""
    assert fa.keys() == fb.keys()
    for k in fa:
        for x, y in zip(fa[k], fb[k], strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-2 * lr, err_msg=k)


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    return make_people(tmp_path_factory.mktemp("xl") / "people")


@pytest.fixture(scope="module")
def trained(people, tiny_sdxl_pipe_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("xl") / "out"
    plan = train(people, tiny_sdxl_pipe_dir, out, RECIPE, models_per_batch=4, device="cpu")
    assert plan.written == NAMES and not plan.failed_names
    return out


# ----------------------------------------------------------------------------- rendering


def test_renderer_equals_the_diffusers_sdxl_pipeline(tiny_sdxl_pipe):
    import torch

    from w2wkit.diffusion import Renderer

    r = Renderer(copy.deepcopy(tiny_sdxl_pipe), device="cpu")
    assert r.sdxl
    prompts = [PROMPT, "a dog"]
    res = r.render([None], prompts, seeds=[0, 3], steps=3, guidance=5.0)
    assert res.images.shape == (1, 2, 2, 16, 16, 3)
    for i, p in enumerate(prompts):
        for j, s in enumerate((0, 3)):
            ref = tiny_sdxl_pipe(
                p,
                num_inference_steps=3,
                guidance_scale=5.0,
                generator=torch.Generator().manual_seed(s),
                output_type="np",
            ).images[0]
            np.testing.assert_allclose(res.images[0, i, j], ref, atol=1e-5)
    # a negative prompt is encoded (not zeros) and changes the picture
    neg = r.render([None], prompts[:1], seeds=[0], steps=3, guidance=5.0, negative_prompt="dog")
    ref = tiny_sdxl_pipe(
        PROMPT,
        negative_prompt="dog",
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    np.testing.assert_allclose(neg.images[0, 0, 0], ref, atol=1e-5)
    assert np.abs(neg.images[0, 0, 0] - res.images[0, 0, 0]).max() > 1e-3


def test_float16_sdxl_decodes_in_float32_and_stays_float16(tiny_sdxl_pipe):
    from w2wkit.diffusion import Renderer

    kw = {"seeds": [0], "steps": 2, "guidance": 3.0}
    ref = Renderer(copy.deepcopy(tiny_sdxl_pipe), device="cpu").render([None], [PROMPT], **kw)
    half = Renderer(copy.deepcopy(tiny_sdxl_pipe), device="cpu", dtype="float16")
    assert half.pipe.vae.config.force_upcast
    res = half.render([None], [PROMPT], **kw)
    assert str(half.pipe.vae.dtype) == "torch.float16"  # upcast for the decode only
    assert np.isfinite(res.images).all()
    np.testing.assert_allclose(res.images, ref.images, atol=5e-3)


def _fused(pipe, adapter):
    """A copy of ``pipe`` with ``adapter``'s delta added to its weights."""
    import torch

    from w2wkit.testing import component_module

    out = copy.deepcopy(pipe)
    with torch.no_grad():
        for m, layer in adapter.items():
            w = component_module(out, m).weight
            w += torch.from_numpy(layer.delta().astype(np.float32)).reshape(w.shape)
    return out


def test_bank_renders_many_sdxl_models_as_each_fused(tiny_sdxl_pipe):
    from w2wkit.diffusion import Renderer
    from w2wkit.testing import attention_modules, module_shapes, random_adapter

    pipe = tiny_sdxl_pipe
    mods = attention_modules(pipe, ("to_q", "to_k", "to_v", "to_out.0"))
    mods += attention_modules(pipe, ("q_proj", "v_proj"), "text_encoder")
    mods += attention_modules(pipe, ("q_proj", "v_proj"), "text_encoder_2")
    shapes = module_shapes(pipe, mods)
    models = [random_adapter(shapes, rank=1 + i, seed=i, scale=0.3) for i in range(3)]
    kw = {"seeds": [0, 1], "steps": 2, "guidance": 4.0}
    many = Renderer(copy.deepcopy(pipe), device="cpu").render(
        [None, *models], [PROMPT, "a dog"], batch_size=5, **kw
    )
    base = many.images[0]
    for i, ad in enumerate(models):
        alone = Renderer(_fused(pipe, ad), device="cpu").render([None], [PROMPT, "a dog"], **kw)
        np.testing.assert_allclose(many.images[i + 1], alone.images[0], atol=2e-4)
        assert np.abs(many.images[i + 1] - base).max() > 1e-2  # the LoRA matters


def test_sdxl_delayed_injection_switches_models(tiny_sdxl_pipe):
    """Both text encoders patched: the edited model's pooled and hidden states switch too."""
    from w2wkit.diffusion import Renderer
    from w2wkit.testing import attention_modules, module_shapes, random_adapter

    pipe = tiny_sdxl_pipe
    mods = attention_modules(pipe, ("to_q", "to_v"))
    mods += attention_modules(pipe, ("q_proj",), "text_encoder")
    mods += attention_modules(pipe, ("q_proj",), "text_encoder_2")
    shapes = module_shapes(pipe, mods)
    a, b = (random_adapter(shapes, seed=s, scale=0.3) for s in (1, 2))
    r = Renderer(copy.deepcopy(pipe), device="cpu")
    kw = {"seeds": [0], "steps": 2, "guidance": 4.0}
    plain = r.render([a, b], [PROMPT], **kw).images
    late = r.render([a], [PROMPT], edited=[b], inject_t=999, **kw).images
    never = r.render([a], [PROMPT], edited=[b], inject_t=-1, **kw).images
    np.testing.assert_allclose(late[0], plain[1], atol=1e-5)
    np.testing.assert_allclose(never[0], plain[0], atol=1e-5)
    assert np.abs(plain[0] - plain[1]).max() > 1e-2


# ----------------------------------------------------------------------------- training


def test_output_folder(trained):
    man = json.loads((trained / MANIFEST).read_text())
    assert man["recipe"]["steps"] == RECIPE.steps
    for n in NAMES:
        assert man["models"][n]["status"] == "done"
        f = factors(trained / f"{n}.safetensors")
        assert all(k.startswith("unet.") for k in f)
        # the SDXL UNet's attention projections: self- and cross-attention, every block
        assert any(".attn2.to_q" in k for k in f) and any("mid_block" in k for k in f)
        assert all(np.abs(b).max() > 0 for _, b in f.values())


def test_batched_equals_one_at_a_time(trained, people, tiny_sdxl_pipe_dir, tmp_path):
    out = tmp_path / "alone"
    train(people, tiny_sdxl_pipe_dir, out, RECIPE, models_per_batch=1, device="cpu")
    for n in NAMES:
        assert_same_training(
            factors(trained / f"{n}.safetensors"), factors(out / f"{n}.safetensors")
        )


def test_batched_gradients_equal_alone(tiny_sdxl_pipe_dir, monkeypatch):
    """With plain SGD the factors are sums of gradients: each model's own, to rounding."""
    import torch

    from w2wkit.diffusion.dreambooth import DreamBooth

    monkeypatch.setattr(
        torch.optim, "Adam", lambda params, lr, weight_decay=0.0: torch.optim.SGD(params, lr=lr)
    )
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8) for _ in range(3)]
    db = DreamBooth(tiny_sdxl_pipe_dir, targets=("to_q", "to_v"), device="cpu")
    together, _ = db.train(imgs, PROMPT, [5, 6, 7], steps=2, batch=2, lr=1.0)
    for j in range(3):
        alone = db.train([imgs[j]], PROMPT, [5 + j], steps=2, batch=2, lr=1.0)[0][0]
        for k, layer in together[j].items():
            ref = alone.layers[k].up
            assert np.abs(ref).max() > 0
            np.testing.assert_allclose(layer.up, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    other = db.train([imgs[1]], PROMPT, [5], steps=2, batch=2, lr=1.0)[0][0]  # it can fail
    k = next(iter(other.layers))
    assert (
        np.abs(other.layers[k].up - together[0].layers[k].up).max()
        > 1e-3 * np.abs(together[0].layers[k].up).max()
    )


def test_engine_equals_a_peft_sdxl_loop(people, tiny_sdxl_pipe_dir):
    """The engine (two models in a batch) against diffusers-style peft, one model each."""
    from w2wkit.diffusion.dreambooth import DreamBooth
    from w2wkit.testing import peft_dreambooth_sdxl
    from w2wkit.training import read_instances

    insts, _ = read_instances(people)
    from w2wkit.training import load_pictures

    imgs = [load_pictures(i, 16) for i in insts[:2]]
    db = DreamBooth(tiny_sdxl_pipe_dir, targets=RECIPE.targets, device="cpu")
    ours, _ = db.train(imgs, PROMPT, [11, 12], steps=3, batch=2, lr=LR)
    for j in range(2):
        ref, _ = peft_dreambooth_sdxl(tiny_sdxl_pipe_dir, RECIPE, imgs[j], PROMPT, seed=11 + j)
        assert_same_training(
            {k: (v.down, v.up) for k, v in ours[j].items()},
            {k: (v.down, v.up) for k, v in ref.items()},
        )


def test_loras_load_in_diffusers_sdxl(trained, tiny_sdxl_pipe):
    from w2wkit.testing import unet_weights

    pipe = copy.deepcopy(tiny_sdxl_pipe)
    f = trained / "bob.safetensors"
    ad = read_adapter(f)
    mods = list(ad.layers)
    before = unet_weights(pipe, mods)
    pipe.load_lora_weights(str(f), adapter_name="bob")
    pipe.fuse_lora(adapter_names=["bob"])
    after = unet_weights(pipe, mods)
    for m in mods:
        delta = ad.layers[m].delta().astype(np.float64)
        err = np.abs(after[m] - before[m] - delta).max() / max(np.abs(delta).max(), 1e-12)
        assert err <= 1e-4, m


def test_peft_output_loads_in_peft(people, tiny_sdxl_pipe_dir, tiny_sdxl_pipe, tmp_path):
    from peft import PeftModel

    out = tmp_path / "peft"
    recipe = Recipe(steps=1, batch=1, lr=LR, targets=("to_q", "to_v"))
    train(people, tiny_sdxl_pipe_dir, out, recipe, models_per_batch=4, format="peft")
    ad = read_adapter(out / "cat")
    unet = PeftModel.from_pretrained(copy.deepcopy(tiny_sdxl_pipe.unet), str(out / "cat"))
    unet = unet.merge_and_unload()
    for m, layer in ad.items():
        rest = m.split(".", 1)[1]
        w = unet.get_submodule(rest).weight.detach().double().numpy()
        base = tiny_sdxl_pipe.unet.get_submodule(rest).weight.detach().double().numpy()
        delta = layer.delta().astype(np.float64)
        # float32 weights: the merged weight is rounded at the scale of the weight itself
        assert np.abs(w - base - delta).max() <= 1e-4 * np.abs(delta).max(), m


def test_train_fit_directions_apply_render(trained, people, tiny_sdxl_pipe_dir, tmp_path):
    from PIL import Image

    space = tmp_path / "space"
    res = run(["fit", trained, "-o", space, "-k", 3, "--labels", trained / "labels.csv"])
    assert res.exit_code == 0, res.output
    res = run(["directions", "--space", space])
    assert res.exit_code == 0, res.output
    edited = tmp_path / "ann+.safetensors"
    res = run(["apply", trained / "ann.safetensors", "--space", space, "--edit", "red=1",
               "-o", edited])  # fmt: skip
    assert res.exit_code == 0, res.output
    a, b = factors(trained / "ann.safetensors"), factors(edited)
    assert any(not np.allclose(a[k][1], b[k][1]) for k in a)
    grid = tmp_path / "grid.png"
    res = run(["render", "--base", tiny_sdxl_pipe_dir, trained / "ann.safetensors", edited,
               "--steps", 2, "--seeds", "0", "--device", "cpu", "-o", grid])  # fmt: skip
    assert res.exit_code == 0, res.output
    img = np.asarray(Image.open(grid))
    assert img.shape[0] >= 2 * 96


def test_cli_train_on_sdxl_and_an_incomplete_sdxl_folder(people, tiny_sdxl_pipe_dir, tmp_path):
    import shutil

    out = tmp_path / "o"
    res = run(["train", people, "--base", tiny_sdxl_pipe_dir, "-o", out, "--steps", 1,
               "--targets", "to_q", "--device", "cpu", "--dry-run"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "models: 4 (0 done, 0 failed, 4 to train)" in res.output and not out.exists()
    broken = tmp_path / "xl"
    shutil.copytree(tiny_sdxl_pipe_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    res = run(["train", people, "--base", broken, "-o", out, "--steps", 1])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "text_encoder_2" in lines[0] and "incomplete" in lines[0]


def test_full_size_sdxl_attention_loras_get_sdxl_kohya_names(tmp_path):
    """What ``train`` writes for a full SDXL UNet: its attention projections, sgm-named."""
    import safetensors.numpy as sn

    from w2wkit.formats.registry import write_adapter
    from w2wkit.names import module_table
    from w2wkit.testing import random_adapter

    table = module_table("sdxl")
    shapes = {
        k: v
        for k, v in table.items()
        if k.startswith("unet.") and k.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))
    }
    assert len(shapes) == 4 * 140  # 70 transformer blocks x 2 attentions
    path = tmp_path / "xl.safetensors"
    write_adapter(random_adapter(shapes), path, format="kohya")
    keys = {k.split(".")[0] for k in sn.load_file(str(path))}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_out_0" in keys
    assert not any("down_blocks" in k for k in keys)
    back = read_adapter(path)
    assert set(back.layers) == set(shapes)


@pytest.mark.slow
def test_recipe_options_on_sdxl(people, tiny_sdxl_pipe, tiny_sdxl_pipe_dir, tmp_path):
    """Captions, text-encoder LoRA, prior preservation and flip on SDXL: batched = alone."""
    import dataclasses
    import shutil

    from w2wkit.testing import unet_weights

    src = tmp_path / "people"
    shutil.copytree(people, src)
    (src / "ann" / "0.txt").write_text("sks person with glasses")
    recipe = dataclasses.replace(
        RECIPE,
        steps=2,
        captions=True,
        text_encoder=True,
        prior_preservation=True,
        num_class_images=2,
        flip=True,
    )
    together, alone = tmp_path / "together", tmp_path / "alone"
    train(src, tiny_sdxl_pipe_dir, together, recipe, models_per_batch=4, device="cpu")
    train(src, tiny_sdxl_pipe_dir, alone, recipe, models_per_batch=1, device="cpu")
    for n in NAMES:
        assert_same_training(
            factors(together / f"{n}.safetensors"), factors(alone / f"{n}.safetensors")
        )
    f = together / "ann.safetensors"
    ad = read_adapter(f)
    mods = list(ad.layers)
    te = [m for m in mods if m.startswith("text_encoder.")]
    # trained, but for the last layer: SDXL reads the penultimate hidden states
    last = [m for m in te if ".layers.1." in m]
    assert te and all(np.abs(ad.layers[m].up).max() > 0 for m in te if m not in last)
    assert last and all(np.abs(ad.layers[m].up).max() == 0 for m in last)
    # the first text encoder's LoRA loads into the SDXL pipeline with the file's delta
    pipe = copy.deepcopy(tiny_sdxl_pipe)
    before = unet_weights(pipe, mods)
    pipe.load_lora_weights(str(f), adapter_name="ann")
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=["ann"])
    after = unet_weights(pipe, mods)
    for m in mods:
        delta = ad.layers[m].delta().astype(np.float64)
        err = np.abs(after[m] - before[m] - delta).max() / max(np.abs(delta).max(), 1e-12)
        assert err <= 1e-4, m
