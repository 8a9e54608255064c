"""Inversion: objective and optimiser vs an independent reference, batching, bad input, CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from _invert_world import block_images, normalise_vae  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from w2wkit.cli.main import cli  # noqa: E402
from w2wkit.errors import FormatError, LayoutError, SpaceError, W2WError  # noqa: E402
from w2wkit.formats import read_adapter  # noqa: E402
from w2wkit.invert import (  # noqa: E402
    MINIATURE_SETTINGS,
    PAPER_SETTINGS,
    default_settings,
    inversion_loss,
    invert,
)
from w2wkit.space import WeightSpace  # noqa: E402
from w2wkit.testing import (  # noqa: E402
    attention_modules,
    component_module,
    module_shapes,
    random_adapter,
)


@pytest.fixture(scope="module")
def setup(tiny_pipe):
    """Tiny pipeline (VAE latents normalised) and a 5-component space of random LoRAs."""
    pipe = copy.deepcopy(tiny_pipe)  # normalise_vae changes the VAE
    images = block_images(4, seed=3)
    normalise_vae(pipe, images)
    shapes = module_shapes(pipe, attention_modules(pipe))
    ads = [random_adapter(shapes, rank=1, alpha=1.0, seed=i, scale=0.5) for i in range(8)]
    space = WeightSpace(5).fit(ads)
    return pipe, space, images


def _cpu(**kw):
    return {"device": "cpu", **kw}


# ---------------------------------------------------------------- reference


def _reference(
    pipe, space, image, mask, k, steps, lr, seed, window, prompt="sks person", v_pred=False
):
    """Adam (torch.optim) on the coefficients with weights W + s B A applied by
    ``torch.func.functional_call``: no per-sample patch, no w2wkit code."""
    import torch.nn.functional as F
    from torch.func import functional_call

    unet = pipe.unet
    lay = space.layout_
    comps = torch.as_tensor(space.components_[:k])
    scale = torch.as_tensor(space.scale_)
    mean = torch.as_tensor(space.mean_)
    sf = pipe.vae.config.scaling_factor
    with torch.no_grad():
        x = torch.as_tensor(image)[None].permute(0, 3, 1, 2) * 2 - 1
        lat = pipe.vae.encode(x).latent_dist.mean * sf
        emb = pipe.encode_prompt([prompt], "cpu", 1, False, None)[0]
    m = None
    if mask is not None:
        m = F.interpolate(torch.as_tensor(mask)[None, None], size=lat.shape[2:], mode="area")
    names = {}
    for mod in lay.modules:
        sub = mod.split(".", 1)[1]
        names[mod] = sub + ".weight"
    base_w = {mod: component_module(pipe, mod).weight.detach() for mod in lay.modules}
    c = torch.zeros(1, k, requires_grad=True)
    opt = torch.optim.Adam([c], lr=lr)
    g = torch.Generator().manual_seed(seed)
    ac = pipe.scheduler.alphas_cumprod
    losses = []
    for step in range(steps):
        # timesteps: uniform, stratified per window of `window` steps (documented draw order)
        if step % window == 0:
            perm = torch.randperm(window, generator=g)
        u = torch.rand(1, generator=g).item()
        t = torch.tensor([min(999, int((int(perm[step % window]) + u) * 1000 / window))])
        noise = torch.randn(lat.shape[1:], generator=g)[None]
        flat = (c @ comps) * scale + mean
        params = {}
        for mod in lay.modules:
            d_slot, u_slot = lay.slots_of(mod)
            down = flat[0, d_slot.offset : d_slot.stop].reshape(d_slot.shape)
            up = flat[0, u_slot.offset : u_slot.stop].reshape(u_slot.shape)
            params[names[mod]] = base_w[mod] + lay.scale(mod) * up @ down
        a = ac[t].view(1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        pred = functional_call(unet, params, (noisy, t), {"encoder_hidden_states": emb}).sample
        target = a.sqrt() * noise - (1 - a).sqrt() * lat if v_pred else noise
        err = (pred - target) ** 2
        loss = err.mean() if m is None else (err * m).sum() / (m.sum() * err.shape[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return c.detach().double().numpy()[0], np.array(losses)


def test_matches_independent_reference_with_mask(setup):
    pipe, space, images = setup
    mask = np.zeros((16, 16), np.float32)
    mask[2:12, 4:14] = 1.0
    mask[12:, :] = 0.5
    ref_c, ref_l = _reference(pipe, space, images[0], mask, k=4, steps=6, lr=0.2, seed=7, window=4)
    res = invert(
        space, pipe, images[:1], n_components=4, steps=6, lr=0.2, mask=mask, seed=7, window=4,
        early_stopping=False, **_cpu(),
    )  # fmt: skip
    assert res.coefficients.shape == (1, 5)
    assert res.coefficients[0, 4] == 0.0  # components beyond n_components stay at zero
    # float32 rounding differs (W x + (x A^T) B^T vs (W + B A) x); Adam's first steps
    # move every coordinate by ~lr, so agreement to 1e-3 of lr checks every step
    np.testing.assert_allclose(res.coefficients[0, :4], ref_c, atol=2e-4)
    np.testing.assert_allclose(res.losses[0], ref_l, rtol=1e-4)
    assert np.abs(ref_c).max() > 0.3  # it moved (more than one Adam step of 0.2)


def test_v_prediction_matches_reference(setup):
    from diffusers import DDIMScheduler

    pipe, space, images = setup
    old = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(old.config, prediction_type="v_prediction")
    try:
        ref_c, ref_l = _reference(
            pipe, space, images[1], None, k=3, steps=4, lr=0.2, seed=3, window=4, v_pred=True
        )
        res = invert(
            space, pipe, images[1:2], n_components=3, steps=4, lr=0.2, seed=3, window=4,
            early_stopping=False, **_cpu(),
        )  # fmt: skip
    finally:
        pipe.scheduler = old
    np.testing.assert_allclose(res.coefficients[0, :3], ref_c, atol=2e-4)
    np.testing.assert_allclose(res.losses[0], ref_l, rtol=1e-4)


def test_bfloat16_close_to_float32(setup):
    pipe, space, images = setup
    kw = dict(n_components=5, steps=5, lr=0.1, seed=0, early_stopping=False, device="cpu")
    f32 = invert(space, pipe, images[:1], **kw)
    try:
        b16 = invert(space, pipe, images[:1], dtype="bfloat16", **kw)
    finally:
        pipe.to(torch.float32)
    assert b16.settings["dtype"] == "bfloat16"
    # bf16 keeps ~3 significant digits: losses agree to a few percent
    np.testing.assert_allclose(b16.losses, f32.losses, rtol=0.05)
    assert np.isfinite(b16.coefficients).all()


def test_text_encoder_modules_are_trained(setup):
    """A space over the text encoder's q/v projections: prompts are re-encoded with
    each sample's LoRA every step, and the loss gradient reaches those coefficients."""
    pipe, _, images = setup
    te = attention_modules(pipe, ("q_proj", "v_proj"), component="text_encoder")
    shapes = module_shapes(pipe, te)
    space = WeightSpace(3).fit([random_adapter(shapes, seed=i, scale=0.5) for i in range(5)])
    res = invert(space, pipe, images[:2], steps=3, lr=0.1, early_stopping=False, **_cpu())
    assert np.abs(res.coefficients).min() > 0.05  # every coefficient moved (Adam: ~lr per step)
    assert np.abs(res.coefficients[0] - res.coefficients[1]).max() > 1e-3


def test_batch_equals_each_image_alone(setup):
    pipe, space, images = setup
    kw = dict(n_components=5, steps=40, lr=0.3, window=5, patience=2, min_delta=0.05, **_cpu())
    kw["early_stopping"] = True  # off by default in every recipe
    batch = invert(space, pipe, images[:3], seed=[11, 12, 13], **kw)
    assert batch.steps_run.min() < 40  # early stopping acted (per image)
    for i in range(3):
        alone = invert(space, pipe, images[i : i + 1], seed=[11 + i], **kw)
        assert alone.steps_run[0] == batch.steps_run[i]
        # tolerance: float32 rounding of batched vs single matmuls (observed ~3e-6)
        np.testing.assert_allclose(alone.coefficients[0], batch.coefficients[i], atol=1e-4)
        np.testing.assert_allclose(alone.losses[0], batch.losses[i], rtol=1e-4, equal_nan=True)
    # different images give different models
    assert np.abs(batch.coefficients[0] - batch.coefficients[1]).max() > 0.1


def test_result_adapters_and_loss_api(setup):
    pipe, space, images = setup
    res = invert(space, pipe, images[:2], steps=3, n_components=2, early_stopping=False, **_cpu())
    assert len(res.adapters) == 2 and res.losses.shape == (2, 3)
    ref = space.inverse_transform(res.coefficients)
    for a, b in zip(res.adapters, ref, strict=True):
        for m in a.layers:
            np.testing.assert_array_equal(a.layers[m].down, b.layers[m].down)
            np.testing.assert_array_equal(a.layers[m].up, b.layers[m].up)
    meta = json.loads(res.adapters[0].metadata["w2wkit.inversion"])
    assert meta["n_components"] == 2 and meta["steps_run"] == 3
    loss = inversion_loss(space, pipe, images[:2], res.coefficients, n_samples=4, **_cpu())
    assert loss.shape == (2,) and np.isfinite(loss).all()


def test_default_prompt_is_the_one_the_space_records(setup):
    pipe, _, images = setup
    shapes = module_shapes(pipe, attention_modules(pipe))
    ads = [random_adapter(shapes, rank=1, alpha=1.0, seed=i, scale=0.5) for i in range(4)]
    for ad in ads:
        ad.metadata["w2wkit.world.prompt"] = "a photo of sks person"
    space = WeightSpace(2).fit(ads)
    said = []
    res = invert(space, pipe, images[:1], steps=1, notice=said.append, **_cpu())
    assert res.settings["prompt"] == "a photo of sks person"
    assert res.settings["prompt_source"] == "space" and "metadata" in said[0]
    res = invert(space, pipe, images[:1], steps=1, prompt="sks person", **_cpu())
    assert (res.settings["prompt"], res.settings["prompt_source"]) == ("sks person", "argument")
    _, bare, _ = setup  # random adapters without metadata: the concept's, else "sks person"
    res = invert(bare, pipe, images[:1], steps=1, concept="dog", **_cpu())
    assert (res.settings["prompt"], res.settings["prompt_source"]) == ("sks dog", "concept")
    assert invert(bare, pipe, images[:1], steps=1, **_cpu()).settings["prompt"] == "sks person"


def test_default_settings(setup):
    pipe, space, images = setup
    # no recipe stops early unless asked
    assert not any(
        r.early_stopping for r in (*PAPER_SETTINGS.values(), *MINIATURE_SETTINGS.values())
    )
    res = invert(space, pipe, images[:1], steps=30, lr=5.0, window=5, patience=1, **_cpu())
    assert res.settings["early_stopping"] is False and res.steps_run[0] == 30
    s = default_settings(space)
    assert s.n_components == 5 and s.lr == MINIATURE_SETTINGS["standard"].lr
    # miniature: OOD inputs use the standard recipe (measured, docs/invert.md)
    assert default_settings(space, ood=True) == default_settings(space)
    assert default_settings(space, ood=True).steps == MINIATURE_SETTINGS["ood"].steps

    class Big:  # SD-sized space: the paper's recipe
        class layout_:
            dim = 99648

        n_components_ = 20000

    assert default_settings(Big) == PAPER_SETTINGS["standard"]
    assert default_settings(Big, ood=True) == PAPER_SETTINGS["ood"]
    assert default_settings(Big, concept="dog").n_components == 100


# ---------------------------------------------------------------- bad input


def test_unreadable_and_missing_image(setup, tmp_path):
    pipe, space, _ = setup
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(FormatError, match=r"broken\.png: cannot read the image") as exc:
        invert(space, pipe, [str(bad)], steps=1, **_cpu())
    assert "\n" not in str(exc.value)
    with pytest.raises(FormatError, match=r"nope\.png: image not found"):
        invert(space, pipe, [str(tmp_path / "nope.png")], steps=1, **_cpu())


def test_wrong_size_is_resized_with_notice(setup, tmp_path):
    from PIL import Image

    pipe, space, images = setup
    big = tmp_path / "big.png"
    Image.fromarray((np.kron(images[0], np.ones((4, 5, 1))) * 255).astype(np.uint8)).save(big)
    notes = []
    res = invert(space, pipe, [str(big)], steps=2, notice=notes.append, **_cpu())
    assert res.notices == notes
    assert notes == [f"{big}: 80x64 resized to the pipeline's 16x16 (centre-cropped)"]
    with pytest.warns(UserWarning, match="resized"):
        invert(space, pipe, [str(big)], steps=1, **_cpu())


def test_mask_of_wrong_shape(setup):
    pipe, space, images = setup
    with pytest.raises(W2WError, match=r"mask has shape \(5, 7\), need \(H, W\) = 16x16 or 8x8"):
        invert(space, pipe, images[:1], mask=np.ones((5, 7)), steps=1, **_cpu())
    with pytest.raises(W2WError, match="3 masks for 2 images"):
        invert(space, pipe, images[:2], mask=np.ones((3, 16, 16)), steps=1, **_cpu())
    with pytest.raises(W2WError, match="mask is all zero"):
        invert(space, pipe, images[:1], mask=np.zeros((8, 8)), steps=1, **_cpu())
    # latent-sized masks are accepted
    invert(space, pipe, images[:1], mask=np.ones((8, 8)), steps=1, **_cpu())


def test_space_and_pipeline_that_do_not_match(setup):
    pipe, space, images = setup
    shapes = module_shapes(pipe, attention_modules(pipe))
    odd = dict(shapes)
    odd["unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q"] = (16, 16)
    odd["unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_v"] = (16, 16)
    other = WeightSpace(2).fit([random_adapter(odd, seed=i) for i in range(3)])
    with pytest.raises(LayoutError) as exc:
        invert(other, pipe, images[:1], steps=1, **_cpu())
    msg = str(exc.value)
    assert msg.startswith("2 of the space's 18 modules are not in the pipeline: ")
    assert "down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q" in msg
    assert "\n" not in msg
    delta = WeightSpace(2, representation="delta").fit(
        [random_adapter(shapes, seed=i) for i in range(3)]
    )
    with pytest.raises(SpaceError, match="inversion needs a factors space"):
        invert(delta, pipe, images[:1], steps=1, **_cpu())
    with pytest.raises(SpaceError, match="parameter n_components: 9 must be between"):
        invert(space, pipe, images[:1], n_components=9, steps=1, **_cpu())


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def files(setup, tmp_path_factory):
    from PIL import Image

    pipe, space, images = setup
    root = tmp_path_factory.mktemp("invert-cli")
    pipe.save_pretrained(root / "pipe")
    space.save(root / "space")
    paths = []
    for i in range(2):
        p = root / f"face{i}.png"
        Image.fromarray((images[i] * 255).round().astype(np.uint8)).save(p)
        paths.append(p)
    mask = root / "mask.png"
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(mask)
    return root, paths, mask


def _run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.mark.parametrize("fmt", ["kohya", "peft", "for:diffusers"])
def test_cli_writes_one_lora_per_image(files, tmp_path, fmt):
    root, paths, mask = files
    out = tmp_path / "out"
    args = ["invert", *map(str, paths), "--space", str(root / "space"), "--base"]
    args += [str(root / "pipe"), "-o", str(out), "--steps", "3", "-k", "3", "--device", "cpu"]
    target = fmt.removeprefix("for:") if fmt.startswith("for:") else None
    args += ["--mask", str(mask), "--seed", "5"]
    args += ["--for", target] if target else ["--format", fmt]
    fmt = target or fmt  # --for diffusers writes diffusers files
    res = _run(args)
    assert res.exit_code == 0, res.output
    assert "wrote 2 models" in res.output
    coef = np.load(out / "coefficients.npy")
    assert coef.shape == (2, 5) and np.all(coef[:, 3:] == 0) and np.abs(coef).max() > 0
    report = json.loads((out / "inversion.json").read_text())
    assert report["settings"]["n_components"] == 3 and report["settings"]["seeds"] == [5, 6]
    space = WeightSpace.load(root / "space")
    for i, name in enumerate(["face0", "face1"]):
        ad = read_adapter(out / (name if fmt == "peft" else f"{name}.safetensors"))
        assert ad.format == fmt
        want = space.inverse_transform(coef[i])[0]
        for m, layer in want.layers.items():
            np.testing.assert_allclose(ad.layers[m].delta(), layer.delta(), atol=1e-6)
        assert ad.metadata["w2wkit.made_by"] == "w2wkit invert"
        assert json.loads(ad.metadata["w2wkit.inversion"])["seed"] == 5 + i
    # an existing output needs --force; then it is replaced
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "output exists (pass --force to replace it)" in res.output
    assert _run([*args, "--force", "--ood"]).exit_code == 0


def test_cli_bad_image_is_one_line_and_writes_nothing(files, tmp_path):
    root, _, _ = files
    bad = tmp_path / "x.jpg"
    bad.write_text("garbage")
    out = tmp_path / "out"
    args = ["invert", str(bad), "--space", str(root / "space"), "--base", str(root / "pipe")]
    res = CliRunner().invoke(cli, [*args, "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 1
    assert "x.jpg: cannot read the image" in res.output
    assert not out.exists()


def test_save_names_duplicates_and_refuses_foreign_folders(setup, tmp_path):
    pipe, space, images = setup
    res = invert(space, pipe, images[:2], steps=1, **_cpu())
    res.names = ["face", "face"]  # e.g. a/face.png and b/face.png
    files = res.save(tmp_path / "out", format="diffusers", inputs=["a/face.png", "b/face.png"])
    assert [f.name for f in files] == ["face.safetensors", "face_1.safetensors"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FormatError, match="not written by an inversion"):
        res.save(foreign, overwrite=True)
    assert (foreign / "keep.txt").exists()
