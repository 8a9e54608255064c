"""The batched multi-model renderer equals rendering each model alone with diffusers.

References are the plain ``StableDiffusionPipeline.__call__`` of a copy of the
tiny pipeline whose weights have w2wkit's delta added (or, in one test,
diffusers' own ``load_lora_weights``), with the same seed per image.

Tolerance: images are compared as float32 arrays in ``[0, 1]`` (``output_type
="np"``); the maximum absolute pixel difference must stay below ``TOL = 1e-4``
(observed: ~3e-5 at most; batched matmuls and ``W x + B(A x)`` versus
``(W + BA) x`` differ only in float32 rounding). Every test also checks that the
models render visibly different images (difference > 0.01), so an equality can
not come from the LoRA being ignored.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from w2wkit.adapter import Adapter, DeltaLayer  # noqa: E402
from w2wkit.errors import FormatError, LayoutError, W2WError  # noqa: E402
from w2wkit.render import Renderer, load_pipeline, stack_adapters  # noqa: E402
from w2wkit.testing import (  # noqa: E402
    attention_modules,
    component_module,
    module_shapes,
    random_adapter,
    tiny_pipeline,
)

TOL = 1e-4
STEPS = 3
PROMPTS = ["a photo of sks person", "a dog with glasses"]
SEEDS = [0, 7]


@pytest.fixture(scope="module")
def renderer(tiny_pipe):
    return Renderer(copy.deepcopy(tiny_pipe), device="cpu")


def _adapters(pipe, modules, n=3, alphas=(1.0, 27.0, 3.0), ranks=(1, 1, 1), scale=0.5):
    """``n`` random adapters with the given alpha/rank cycles.

    Factors shrink with sqrt(alpha / r) so every delta has a similar size.
    """
    shapes = module_shapes(pipe, modules)
    out = []
    for i in range(n):
        r, a = ranks[i % len(ranks)], alphas[i % len(alphas)]
        s = scale / float(np.sqrt(a / r))
        out.append(random_adapter(shapes, rank=r, alpha=a, seed=10 + i, scale=s))
    return out


def _fused(pipe, adapter, sign=1.0):
    """A copy of ``pipe`` with ``sign * delta`` added to every targeted weight."""
    p = copy.deepcopy(pipe)
    _add(p, adapter, sign)
    return p


def _add(pipe, adapter, sign=1.0):
    with torch.no_grad():
        for module, layer in adapter.items():
            w = component_module(pipe, module).weight
            w += sign * torch.from_numpy(layer.delta()).reshape(w.shape)


def _reference(pipe, prompt, seed, steps=STEPS, guidance=5.0, **kw):
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kw,
    ).images[0]


def _assert_rows_match(res, pipes, guidance=5.0, steps=STEPS):
    for mi, p in enumerate(pipes):
        for pi, prompt in enumerate(res.prompts):
            for si, seed in enumerate(res.seeds):
                ref = _reference(p, prompt, seed, steps=steps, guidance=guidance)
                diff = float(np.abs(ref - res.images[mi, pi, si]).max())
                assert diff < TOL, (mi, prompt, seed, diff)


def _assert_distinct(images):
    for i in range(1, len(images)):
        assert float(np.abs(images[i] - images[0]).max()) > 0.01


def test_batch_of_models_equals_each_model_alone(tiny_pipe, renderer):
    # different alphas and one rank-2 model (zero-padded in the stack)
    mods = attention_modules(tiny_pipe, ("to_q", "to_k", "to_v", "to_out.0"))
    ads = _adapters(tiny_pipe, mods, n=3, ranks=(1, 2, 1))
    res = renderer.render(ads, PROMPTS, SEEDS, steps=STEPS, guidance=5.0, batch_size=5)
    assert res.images.shape == (3, 2, 2, 16, 16, 3)
    _assert_distinct(res.images)
    _assert_rows_match(res, [_fused(tiny_pipe, a) for a in ads])


def test_image_does_not_depend_on_batch_composition(tiny_pipe, renderer):
    mods = attention_modules(tiny_pipe)
    a, b, c = _adapters(tiny_pipe, mods, n=3)
    alone = renderer.render([b], PROMPTS[:1], SEEDS, steps=STEPS, batch_size=1).images[0]
    mixed = renderer.render([a, b, None, c], PROMPTS[:1], SEEDS, steps=STEPS, batch_size=8)
    assert float(np.abs(mixed.images[1] - alone).max()) < 1e-5
    assert mixed.names[2] == "base"
    # the base row is the untouched pipeline
    base = _reference(tiny_pipe, PROMPTS[0], SEEDS[1], guidance=7.5)
    assert float(np.abs(mixed.images[2, 0, 1] - base).max()) < TOL


def test_matches_diffusers_load_lora_weights(tmp_path, tiny_pipe, renderer):
    from w2wkit.formats import write_adapter

    mods = attention_modules(tiny_pipe, ("to_q", "to_v"))
    ads = _adapters(tiny_pipe, mods, n=2, alphas=(4.0, 0.5))
    res = renderer.render(ads, PROMPTS[:1], SEEDS[:1], steps=STEPS, guidance=5.0)
    _assert_distinct(res.images)
    pipe = copy.deepcopy(tiny_pipe)
    for i, ad in enumerate(ads):
        path = tmp_path / f"m{i}.safetensors"
        write_adapter(ad, path, format="diffusers")
        pipe.load_lora_weights(str(path), adapter_name=f"m{i}")
        ref = _reference(pipe, PROMPTS[0], SEEDS[0])
        pipe.unload_lora_weights()
        assert float(np.abs(ref - res.images[i, 0, 0]).max()) < TOL


def test_no_guidance_and_stochastic_scheduler(tiny_pipe):
    # DDPM draws fresh noise at every step from each sample's own generator
    pipe = tiny_pipeline(seed=0, scheduler="ddpm")
    mods = attention_modules(pipe)
    ads = _adapters(pipe, mods, n=2)
    r = Renderer(copy.deepcopy(pipe), device="cpu")
    for guidance in (1.0, 4.0):
        res = r.render(ads, PROMPTS[:1], SEEDS, steps=STEPS, guidance=guidance)
        _assert_distinct(res.images)
        _assert_rows_match(res, [_fused(pipe, a) for a in ads], guidance=guidance)


def test_text_encoder_and_conv_layers(tiny_pipe, renderer):
    convs = [
        f"unet.{n}"
        for n, m in tiny_pipe.unet.named_modules()
        if isinstance(m, torch.nn.Conv2d) and n.endswith(("conv1", "proj_in"))
    ]
    unet = attention_modules(tiny_pipe, ("to_q", "to_v")) + convs
    te = attention_modules(tiny_pipe, ("q_proj", "v_proj"), "text_encoder")
    assert any(m.endswith("conv1") for m in unet) and any(m.endswith("proj_in") for m in unet)
    ads = _adapters(tiny_pipe, unet + te, n=2, ranks=(2, 1), scale=0.3)
    assert component_module(tiny_pipe, unet[-1]).weight.ndim == 4
    res = renderer.render(ads, PROMPTS, SEEDS[:1], steps=STEPS, guidance=5.0)
    _assert_distinct(res.images)
    _assert_rows_match(res, [_fused(tiny_pipe, a) for a in ads])


@pytest.mark.parametrize("te", [False, True])
def test_delayed_injection(tiny_pipe, renderer, te):
    mods = attention_modules(tiny_pipe, ("to_q", "to_k", "to_v"))
    if te:
        mods += attention_modules(tiny_pipe, ("q_proj", "v_proj"), "text_encoder")
    orig, edit = _adapters(tiny_pipe, mods, n=2, scale=0.5)
    kw = {"steps": 4, "guidance": 5.0}
    plain = renderer.render([orig, edit], PROMPTS[:1], SEEDS, **kw).images
    _assert_distinct(plain)
    # T >= every timestep: the edited model throughout; T < 0: the original throughout
    late = renderer.render([orig], PROMPTS[:1], SEEDS, edited=[edit], inject_t=1000, **kw)
    early = renderer.render([orig], PROMPTS[:1], SEEDS, edited=[edit], inject_t=-1, **kw)
    assert float(np.abs(late.images[0] - plain[1]).max()) < 1e-5
    assert float(np.abs(early.images[0] - plain[0]).max()) < 1e-5

    # an intermediate T: diffusers with the weights swapped in place mid-way
    t_inject = 500
    mid = renderer.render([orig], PROMPTS[:1], SEEDS, edited=[edit], inject_t=t_inject, **kw)
    pipe = _fused(tiny_pipe, orig)
    pipe.scheduler.set_timesteps(4)
    ts = [int(t) for t in pipe.scheduler.timesteps]
    assert ts[0] > t_inject >= ts[-1]  # the switch happens inside the run
    assert not te or ts[0] > t_inject  # text-encoder edits apply from the switch on

    for si, seed in enumerate(SEEDS):
        p = copy.deepcopy(pipe)
        state = {"edited": False}
        if ts[0] <= t_inject:
            _add(p, orig, -1.0)
            _add(p, edit)
            state["edited"] = True
        embeds = {}
        if te:
            # prompt embeddings of the edited text encoder, used after the switch
            pe = _fused(tiny_pipe, edit)
            embeds["pos"], embeds["neg"] = pe.encode_prompt(PROMPTS[0], "cpu", 1, True, None)

        def swap(pp, i, t, cb, state=state, embeds=embeds):
            if not state["edited"] and i + 1 < len(ts) and ts[i + 1] <= t_inject:
                _add(pp, orig, -1.0)
                _add(pp, edit)
                state["edited"] = True
                if embeds:
                    return {"prompt_embeds": torch.cat([embeds["neg"], embeds["pos"]])}
            return {}

        ref = _reference(
            p,
            PROMPTS[0],
            seed,
            steps=4,
            guidance=5.0,
            callback_on_step_end=swap,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        )
        assert state["edited"]
        assert float(np.abs(ref - mid.images[0, 0, si]).max()) < TOL
        assert float(np.abs(mid.images[0, 0, si] - plain[0, 0, si]).max()) > 0.01
        assert float(np.abs(mid.images[0, 0, si] - plain[1, 0, si]).max()) > 0.01


def test_low_precision_runs_close_to_float32(tiny_pipe):
    mods = attention_modules(tiny_pipe)
    ads = _adapters(tiny_pipe, mods, n=2)
    ref = Renderer(copy.deepcopy(tiny_pipe), device="cpu").render(ads, PROMPTS[:1], SEEDS[:1])
    low = Renderer(copy.deepcopy(tiny_pipe), device="cpu", dtype="bf16").render(
        ads, PROMPTS[:1], SEEDS[:1]
    )
    assert low.info["dtype"] == "bfloat16"
    assert np.isfinite(low.images).all()
    assert float(np.abs(low.images - ref.images).mean()) < 0.05


def test_pipeline_left_unpatched(tiny_pipe, renderer):
    mods = attention_modules(tiny_pipe)
    before = {n: type(m) for n, m in renderer.pipe.unet.named_modules()}
    renderer.render(_adapters(tiny_pipe, mods, n=2), PROMPTS[:1], SEEDS[:1], steps=1)
    after = {n: type(m) for n, m in renderer.pipe.unet.named_modules()}
    assert before == after


def test_grid_png(tmp_path, tiny_pipe, renderer):
    from PIL import Image

    mods = attention_modules(tiny_pipe)
    res = renderer.render(
        _adapters(tiny_pipe, mods, n=2), PROMPTS, SEEDS, steps=1, names=["alice", "bob"]
    )
    out = res.save_grid(tmp_path / "grid.png")
    img = Image.open(out)
    assert img.width >= 4 * 96 and img.height >= 2 * 96
    with pytest.raises(FormatError, match="exists"):
        res.save_grid(tmp_path / "grid.png")
    res.save_grid(tmp_path / "grid.png", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


# ------------------------------------------------------------------ bad input


def test_different_module_sets_refused(tiny_pipe, renderer):
    a = _adapters(tiny_pipe, attention_modules(tiny_pipe, ("to_q", "to_v")), n=1)[0]
    b = _adapters(tiny_pipe, attention_modules(tiny_pipe, ("to_q",)), n=1)[0]
    b.source = "b.safetensors"
    with pytest.raises(LayoutError, match=r"b\.safetensors.*different modules.*to_v"):
        renderer.render([a, b], PROMPTS[:1], SEEDS[:1], steps=1)


def test_delta_layers_refused(tiny_pipe):
    a = _adapters(tiny_pipe, attention_modules(tiny_pipe), n=1)[0]
    m = next(iter(a.layers))
    d = Adapter({m: DeltaLayer(a.layers[m].delta(), kind="loha")}, source="l.safetensors")
    with pytest.raises(LayoutError, match="loha"):
        stack_adapters([d])


def test_modules_missing_from_pipeline(tiny_pipe, renderer):
    shapes = module_shapes(tiny_pipe, attention_modules(tiny_pipe))
    shapes["unet.mid_block.attentions.7.transformer_blocks.0.attn1.to_q"] = (16, 16)
    shapes["unet.nowhere.to_v"] = (16, 16)
    ad = random_adapter(shapes, seed=1)
    with pytest.raises(LayoutError, match=r"2 of .* not in the pipeline: .*attentions\.7.*nowhere"):
        renderer.render([ad], PROMPTS[:1], SEEDS[:1], steps=1)


def test_shape_mismatch_and_sdxl_components(tiny_pipe, renderer):
    mods = attention_modules(tiny_pipe)
    shapes = module_shapes(tiny_pipe, mods)
    shapes[mods[0]] = (shapes[mods[0]][0], shapes[mods[0]][1] + 1)
    with pytest.raises(LayoutError, match="does not fit"):
        renderer.render([random_adapter(shapes)], PROMPTS[:1], SEEDS[:1], steps=1)
    ad = random_adapter({"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": (12, 12)})
    with pytest.raises(LayoutError, match="text_encoder_2"):
        renderer.render([ad], PROMPTS[:1], SEEDS[:1], steps=1)


def test_bad_arguments(tiny_pipe, renderer):
    a = _adapters(tiny_pipe, attention_modules(tiny_pipe), n=1)[0]
    with pytest.raises(W2WError, match="edited"):
        renderer.render([a], PROMPTS[:1], edited=[a, a], inject_t=500, steps=1)
    with pytest.raises(W2WError, match="inject_t"):
        renderer.render([a], PROMPTS[:1], edited=[a], steps=1)
    with pytest.raises(W2WError, match="dtype"):
        Renderer(tiny_pipe, dtype="int8")
    with pytest.raises(W2WError, match="coefficients"):
        renderer.render(np.zeros((2, 3)), PROMPTS[:1])


def test_unreadable_pipeline_folder(tmp_path):
    with pytest.raises(FormatError, match="not found"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(FormatError, match=r"model_index\.json"):
        load_pipeline(tmp_path)
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"junk")
    with pytest.raises(FormatError, match="folder, not a file"):
        load_pipeline(f)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(FormatError, match="cannot load the pipeline"):
        load_pipeline(tmp_path)
    # a hub id is never fetched unless allowed
    with pytest.raises(FormatError, match="not found"):
        load_pipeline("runwayml/stable-diffusion-v1-5")


def test_pipeline_folder_and_coefficients(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    mods = attention_modules(tiny_pipe)
    ads = _adapters(tiny_pipe, mods, n=2)

    class LinearSpace:  # anything with inverse_transform((n, k)) -> adapters
        def inverse_transform(self, coef):
            return [ads[int(np.argmax(c))] for c in coef]

    r = Renderer(tmp_path / "pipe", device="cpu")
    res = r.render(np.eye(2)[::-1], PROMPTS[:1], SEEDS[:1], steps=2, space=LinearSpace())
    ref = Renderer(copy.deepcopy(tiny_pipe), device="cpu").render(
        ads[::-1], PROMPTS[:1], SEEDS[:1], steps=2
    )
    assert float(np.abs(res.images - ref.images).max()) < 1e-5
    assert res.names == ["point 0", "point 1"]


def test_import_does_not_load_torch():
    code = "import sys, w2wkit.render; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_per_sample_lora_gradients_match_fused_weights(tiny_pipe):
    """The hook inversion uses: differentiable per-sample factors, checked by autograd."""
    from torch.func import functional_call

    from w2wkit.render import per_sample_lora

    pipe = copy.deepcopy(tiny_pipe)
    unet = pipe.unet
    mods = attention_modules(pipe, ("to_q", "to_v"))
    ads = _adapters(pipe, mods, n=2, alphas=(1.0, 27.0))
    stacked = stack_adapters(ads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    emb = torch.randn(2, 16, 12, generator=g)
    w_out = torch.randn(2, 4, 8, 8, generator=g)
    downs = {m: torch.from_numpy(st.down).requires_grad_() for m, st in stacked.items()}
    ups = {m: torch.from_numpy(st.up).requires_grad_() for m, st in stacked.items()}
    with per_sample_lora(pipe, stacked, "cpu", torch.float32) as patch:
        for m in stacked:
            patch.set_factors(m, downs[m], ups[m])
        patch.set_index("unet", torch.tensor([0, 1]))
        out = unet(x, 500, encoder_hidden_states=emb).sample
        (out * w_out).sum().backward()
    assert type(unet.get_submodule(mods[0].split(".", 1)[1])) is torch.nn.Linear  # restored
    # reference: each sample alone through the plain UNet with W + up @ down
    for b in range(2):
        d_ref = {m: torch.from_numpy(stacked[m].down[b]).requires_grad_() for m in stacked}
        u_ref = {m: torch.from_numpy(stacked[m].up[b]).requires_grad_() for m in stacked}
        params = dict(unet.named_parameters())
        for m in stacked:
            key = m.split(".", 1)[1] + ".weight"
            params[key] = params[key].detach() + u_ref[m] @ d_ref[m]
        ref = functional_call(
            unet, params, (x[b : b + 1], 500), {"encoder_hidden_states": emb[b : b + 1]}
        )
        assert float((ref.sample - out[b : b + 1]).detach().abs().max()) < 1e-5
        (ref.sample * w_out[b : b + 1]).sum().backward()
        for m in stacked:
            gd, gr = downs[m].grad[b], d_ref[m].grad
            assert float(gr.abs().max()) > 0
            assert float((gd - gr).abs().max()) <= 1e-4 * float(gr.abs().max()) + 1e-6
            assert (
                float((ups[m].grad[b] - u_ref[m].grad).abs().max())
                <= 1e-4 * float(u_ref[m].grad.abs().max()) + 1e-6
            )
