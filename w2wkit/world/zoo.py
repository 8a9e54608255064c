"""The dataset of models: many rank-1 LoRAs trained at once, in one batch.

Every target ``Linear`` of the UNet (``to_q``/``to_v`` of all attention
modules by default) is replaced by a :class:`MultiLoraLinear` that holds the
factors of ``M`` models stacked, ``A`` of shape ``(M, r, in)`` and ``B`` of
shape ``(M, out, r)``, and a per-sample model index. A batch mixes the samples
of all ``M`` models and each sample goes through its own model's LoRA::

    out[s] = W x[s] + (alpha / r) * B[idx[s]] @ A[idx[s]] @ x[s]

The loss is the sum over models of each model's own mean loss, so each model's
gradient is exactly the gradient it would get alone (the UNet has no
batch-coupling layer: GroupNorm and attention are per sample). Adam is
elementwise, so one optimizer over the stacked tensors is ``M`` independent
optimizers (no weight decay, no clipping). Every model starts from the same
initialisation (peft's: ``A`` from ``torch.manual_seed(init_seed)``, ``B = 0``),
the paper's shared seed. The per-model random draws (picture index, noise,
timestep) come from a per-model generator in the same order as
:class:`w2wkit.world.lora.LoraTrainer`, which trains one model at a time; the
test checks that both give the same adapter.

torch, diffusers and peft are imported inside the functions.
"""

from __future__ import annotations

import copy
import csv
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.errors import W2WError
from w2wkit.render import resolve_device
from w2wkit.stio import file_sha256
from w2wkit.world.lora import LoraSettings
from w2wkit.world.tokenizer import token_ids

__all__ = [
    "MultiLoraLinear",
    "ZooJob",
    "ZooSettings",
    "ZooTrainer",
    "install_multi_lora",
    "sample_images",
    "train_zoo",
    "write_labels",
    "write_start",
    "zoo_jobs",
]


@dataclass
class ZooSettings(LoraSettings):
    """The zoo recipe: :class:`LoraSettings` plus batching and prior options.

    Attributes
    ----------
    chunk : int
        Models trained together in one batch (0: 8 on CPU, 1024 on CUDA).
    class_prompt : str or None
        Prompt of the prior-preservation samples (``"person"``); None: none.
    prior_weight : float
        Weight of the prior-preservation loss (0 disables it). The prior
        pictures are renders of other instances of the concept (the class
        distribution the base model was trained on).
    n_prior : int
        Prior pictures per model (drawn from a shared pool).
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    """

    chunk: int = 0
    class_prompt: str | None = None
    prior_weight: float = 0.0
    n_prior: int = 10
    device: str = "auto"


@dataclass(frozen=True)
class ZooJob:
    """One model of the zoo: which instance, which renders, which seed.

    Attributes
    ----------
    name : str
        Output stem (the instance name).
    concept : str
        Concept pack name.
    index, inst_seed : int
        ``generator.instance(index, inst_seed)``.
    number : int
        Position of the model in the zoo (its noise seed is derived from it).
    """

    name: str
    concept: str
    index: int
    inst_seed: int
    number: int


def zoo_jobs(concept: str, n: int, inst_seed: int = 0, start: int = 0, first: int = 0) -> list:
    """Jobs for instances ``start .. start + n - 1`` of ``concept``.

    ``first`` is the zoo number of the first job (noise seeds follow it).
    """
    from w2wkit.world.pictures import generator

    gen = generator(concept)
    out = []
    for k in range(n):
        inst = gen.instance(start + k, inst_seed)
        out.append(ZooJob(inst.name, concept, start + k, inst_seed, first + k))
    return out


def render_job(job: ZooJob, n_images: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Training renders of a job's instance, shape ``(n_images, size, size, 3)`` uint8."""
    from w2wkit.world.pictures import generator

    gen = generator(job.concept)
    return gen.render(gen.instance(job.index, job.inst_seed), n_images, seed=seed, size=size)


def _multi_lora_class() -> Any:
    import torch

    class _MultiLoraLinear(torch.nn.Module):
        """A frozen Linear plus ``M`` stacked LoRAs selected per sample."""

        def __init__(self, base: Any, n_models: int, rank: int, alpha: float, down: Any) -> None:
            super().__init__()
            self.base = base
            self.rank = int(rank)
            self.scale = float(alpha) / float(rank)
            dev, dt = base.weight.device, base.weight.dtype
            self.A = torch.nn.Parameter(
                down.to(dev, dt).unsqueeze(0).expand(n_models, -1, -1).clone()
            )
            self.B = torch.nn.Parameter(
                torch.zeros(n_models, base.out_features, rank, device=dev, dtype=dt)
            )
            self.index: Any = None  # LongTensor (batch,) or None (base model)

        def forward(self, x: Any) -> Any:
            y = self.base(x)
            if self.index is None:
                return y
            a = self.A[self.index]  # (b, r, in)
            b = self.B[self.index]  # (b, out, r)
            h = torch.einsum("b...i,bri->b...r", x, a)
            return y + self.scale * torch.einsum("b...r,bor->b...o", h, b)

    return _MultiLoraLinear


class MultiLoraLinear:
    """Factory of the torch module (torch is imported lazily).

    ``MultiLoraLinear(base, n_models, rank, alpha, down)`` returns a
    ``torch.nn.Module`` with parameters ``A`` ``(M, r, in)`` (every model
    starts from ``down``, shape ``(r, in)``) and ``B`` ``(M, out, r)`` (zeros),
    and an ``index`` attribute: a LongTensor ``(batch,)`` of model numbers, or
    None to run the base layer alone.
    """

    def __new__(cls, base: Any, n_models: int, rank: int, alpha: float, down: Any) -> Any:
        return _multi_lora_class()(base, n_models, rank, alpha, down)


def install_multi_lora(
    unet: Any, targets: Sequence[str], n_models: int, rank: int, alpha: float, downs: dict
) -> dict[str, Any]:
    """Replace ``targets`` of ``unet`` by :class:`MultiLoraLinear` modules.

    Parameters
    ----------
    downs : dict of str to torch.Tensor
        Initial ``A`` ``(r, in)`` per target (shared by all models).

    Returns
    -------
    dict
        Target name -> installed module (idempotent: already installed
        modules are replaced by fresh ones around their base layer).
    """
    out = {}
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        old = getattr(parent, leaf)
        base = getattr(old, "base", old)
        mod = MultiLoraLinear(base, n_models, rank, alpha, downs[name])
        setattr(parent, leaf, mod)
        out[name] = mod
    return out


def set_index(modules: dict[str, Any], index: Any) -> None:
    """Route every sample of the next forward pass through model ``index[s]``."""
    for m in modules.values():
        m.index = index


def peft_init(unet: Any, targets: Sequence[str], rank: int, alpha: float, seed: int) -> dict:
    """peft's initial ``A`` per target after ``torch.manual_seed(seed)``.

    The same call as :class:`w2wkit.world.lora.LoraTrainer` makes, on a copy
    of the UNet, so that both trainers start from identical factors.
    """
    import torch
    from peft import LoraConfig

    probe = copy.deepcopy(unet).cpu()
    torch.manual_seed(int(seed))
    probe.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    )
    params = dict(probe.named_parameters())
    return {t: params[f"{t}.lora_A.default.weight"].detach().clone() for t in targets}


def _is_target(name: str, targets: Sequence[str]) -> bool:
    """Whether module ``name`` is targeted: equal to or ending in ``.<target>`` (as peft)."""
    return any(name == t or name.endswith("." + t) for t in targets)


class ZooTrainer:
    """Trains chunks of instance LoRAs on one base pipeline, all at once.

    Parameters
    ----------
    base : path
        Folder of the base pipeline.
    settings : ZooSettings, optional
    """

    def __init__(self, base: str | os.PathLike[str], settings: ZooSettings | None = None) -> None:
        import torch
        from diffusers import StableDiffusionPipeline

        self.settings = s = settings or ZooSettings()
        if s.threads:
            torch.set_num_threads(s.threads)
        self.device = resolve_device(s.device)
        if self.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.base = str(base)
        # float32 whatever the folder stores (a shipped world's base is float16)
        pipe = StableDiffusionPipeline.from_pretrained(
            self.base, local_files_only=True, torch_dtype=torch.float32
        )
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            m.requires_grad_(False)
            m.eval()
        self.pipe = pipe
        self.targets = [n for n, _ in pipe.unet.named_modules() if _is_target(n, s.targets)]
        if not self.targets:
            raise W2WError(
                f"no UNet module is named {list(s.targets)}", path=self.base, key="targets"
            )
        self.init_down = peft_init(pipe.unet, self.targets, s.rank, s.alpha, s.init_seed)
        pipe.to(self.device)
        self.modules: dict[str, Any] = {}
        self._ehs: dict[str, Any] = {}

    def embed(self, prompt: str) -> Any:
        """Text-encoder hidden states of ``prompt``, shape ``(1, L, D)``."""
        import torch

        if prompt not in self._ehs:
            ids = token_ids(self.pipe.tokenizer, [prompt]).to(self.device)
            with torch.no_grad():
                self._ehs[prompt] = self.pipe.text_encoder(ids)[0]
        return self._ehs[prompt]

    def encode(self, images: np.ndarray) -> Any:
        """Scaled VAE latents (posterior means) of uint8 pictures ``(n, H, W, 3)``."""
        import torch

        vae = self.pipe.vae
        out = []
        with torch.no_grad():
            for s in range(0, len(images), 512):
                x = torch.from_numpy(images[s : s + 512]).to(self.device)
                x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
                out.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
        return torch.cat(out)

    def _install(self, n_models: int) -> None:
        s = self.settings
        self.modules = install_multi_lora(
            self.pipe.unet, self.targets, n_models, s.rank, s.alpha, self.init_down
        )

    def train_chunk(
        self,
        images: Sequence[np.ndarray],
        prompt: str,
        seeds: Sequence[int],
        prior: np.ndarray | None = None,
        budget_s: float | None = None,
        start: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> tuple[list[Adapter], np.ndarray]:
        """Train ``M = len(images)`` LoRAs together from the shared initialisation.

        Parameters
        ----------
        images : sequence of numpy.ndarray
            Per model, its renders ``(n_j, H, W, 3)`` uint8.
        prompt : str
            Instance prompt (``"sks person"``).
        seeds : sequence of int
            Per model, the seed of its noise / timestep / picture draws.
        prior : numpy.ndarray, optional
            Pool of class pictures ``(p, H, W, 3)`` for prior preservation
            (used when ``settings.prior_weight > 0``).
        budget_s : float, optional
            Stop early after this many seconds (steps done are recorded).
        start : dict, optional
            Factors to continue training from instead of the shared
            initialisation: target -> ``(A (M, r, in), B (M, out, r))``, one row
            per model (a fresh Adam state).
        on_step : callable, optional
            Called with the number of steps done after each step.

        Returns
        -------
        adapters : list of Adapter
            One per model, ``unet.<module>`` -> LoraLayer.
        losses : numpy.ndarray
            ``(M,)``: mean instance loss of each model over the last 20% of steps.
        """
        import torch

        s = self.settings
        m = len(images)
        if m == 0:
            return [], np.zeros(0)
        self._install(m)
        dev = self.device
        if start is not None:
            with torch.no_grad():
                for t, mod in self.modules.items():
                    if t not in start:
                        raise W2WError(f"the start factors have no module {t}", key=t)
                    a, b_ = (torch.as_tensor(np.asarray(x, np.float32)) for x in start[t])
                    if a.shape != mod.A.shape or b_.shape != mod.B.shape:
                        raise W2WError(
                            f"start factors of shape {tuple(a.shape)} / {tuple(b_.shape)}, "
                            f"expected {tuple(mod.A.shape)} / {tuple(mod.B.shape)}",
                            key=t,
                        )
                    mod.A.copy_(a.to(mod.A.device, mod.A.dtype))
                    mod.B.copy_(b_.to(mod.B.device, mod.B.dtype))
        lats = [self.encode(im) for im in images]
        counts = [len(x) for x in lats]
        offsets = torch.tensor(np.concatenate([[0], np.cumsum(counts)[:-1]]), device=dev)
        lat = torch.cat(lats)
        use_prior = s.prior_weight > 0 and prior is not None and len(prior) > 0
        plat = self.encode(prior) if use_prior else None
        ehs = self.embed(prompt)
        cls_ehs = self.embed(s.class_prompt or "") if use_prior else None
        sched = self.pipe.scheduler
        n_t = sched.config.num_train_timesteps
        acp = sched.alphas_cumprod.to(dev, torch.float32)
        gens = [torch.Generator().manual_seed(int(sd)) for sd in seeds]
        params = [p for mod in self.modules.values() for p in (mod.A, mod.B)]
        opt = torch.optim.Adam(params, lr=s.lr, weight_decay=0.0)
        owner = torch.arange(m, device=dev).repeat_interleave(s.batch)
        b = s.batch
        shape = (b, *lat.shape[1:])
        n_rows = 2 * m * b if use_prior else m * b
        index = torch.cat([owner, owner]) if use_prior else owner
        ehs_all = (
            torch.cat([ehs.expand(m * b, -1, -1), cls_ehs.expand(m * b, -1, -1)])
            if use_prior
            else ehs.expand(n_rows, -1, -1)
        )
        history = []
        t0 = time.perf_counter()
        unet = self.pipe.unet
        for _step in range(s.steps):
            idx, noise, tt, pidx, pnoise, ptt = [], [], [], [], [], []
            for j, g in enumerate(gens):  # the order LoraTrainer draws in
                idx.append(torch.randint(0, counts[j], (b,), generator=g))
                noise.append(torch.randn(shape, generator=g))
                tt.append(torch.randint(0, n_t, (b,), generator=g))
                if use_prior:
                    pidx.append(torch.randint(0, len(plat), (b,), generator=g))
                    pnoise.append(torch.randn(shape, generator=g))
                    ptt.append(torch.randint(0, n_t, (b,), generator=g))
            rows = (torch.stack(idx).to(dev) + offsets[:, None]).reshape(-1)
            x0 = lat[rows]
            nz = torch.cat(noise).to(dev)
            t = torch.cat(tt).to(dev)
            if use_prior:
                x0 = torch.cat([x0, plat[torch.cat(pidx).to(dev)]])
                nz = torch.cat([nz, torch.cat(pnoise).to(dev)])
                t = torch.cat([t, torch.cat(ptt).to(dev)])
            a = acp[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * nz
            set_index(self.modules, index)
            pred = unet(xt, t, encoder_hidden_states=ehs_all).sample
            per = ((pred.float() - nz) ** 2).mean(dim=(1, 2, 3))
            inst = per[: m * b].view(m, b).mean(1)
            loss = inst.sum()
            if use_prior:
                loss = loss + s.prior_weight * per[m * b :].view(m, b).mean(1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(inst.detach())
            if on_step is not None:
                on_step(len(history))
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                break
        set_index(self.modules, None)
        hist = torch.stack(history).cpu().numpy()
        tail = hist[int(0.8 * len(hist)) :] if len(hist) > 1 else hist
        self.steps_done = len(history)
        return self.adapters(), tail.mean(0)

    def adapters(self) -> list[Adapter]:
        """The current factors of the installed models as Adapters (UNet module order)."""
        s = self.settings
        downs = {n: mod.A.detach().cpu().numpy() for n, mod in self.modules.items()}
        ups = {n: mod.B.detach().cpu().numpy() for n, mod in self.modules.items()}
        m = next(iter(downs.values())).shape[0]
        out = []
        for j in range(m):
            layers = {
                f"unet.{n}": LoraLayer(
                    down=downs[n][j].copy(), up=ups[n][j].copy(), alpha=float(s.alpha)
                )
                for n in self.targets
            }
            out.append(Adapter(layers=layers, metadata={}))
        return out


# ---------------------------------------------------------------------------
# sampling many models at once


def sample_images(
    pipe: Any,
    modules: dict[str, Any],
    model_index: Sequence[int] | None,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 20,
    guidance: float = 3.0,
    batch: int = 512,
) -> np.ndarray:
    """Render one picture per (model, prompt, seed) triple with DDIM + CFG.

    Parameters
    ----------
    pipe : StableDiffusionPipeline
        With its UNet patched by :func:`install_multi_lora` (``modules``)
        holding the stacked LoRAs; ``model_index`` None renders the base.
    model_index : sequence of int or None
        ``(n,)`` model of each picture.
    prompts, seeds : sequences of length n
        Prompt and noise seed of each picture.

    Returns
    -------
    numpy.ndarray
        ``(n, H, W, 3)`` uint8.
    """
    import torch
    from diffusers import DDIMScheduler

    dev = pipe.unet.device
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    tok = pipe.tokenizer
    n = len(seeds)
    cfg = pipe.unet.config
    out = []
    with torch.no_grad():
        uniq = sorted(set(prompts) | {""})
        ids = token_ids(tok, uniq).to(dev)
        table = dict(zip(uniq, pipe.text_encoder(ids)[0], strict=True))
        for s0 in range(0, n, batch):
            sl = slice(s0, min(n, s0 + batch))
            k = sl.stop - sl.start
            lat = torch.stack(
                [
                    torch.randn(
                        (cfg.in_channels, cfg.sample_size, cfg.sample_size),
                        generator=torch.Generator().manual_seed(int(sd)),
                    )
                    for sd in seeds[sl]
                ]
            ).to(dev)
            cond = torch.stack([table[p] for p in prompts[sl]])
            unc = table[""].expand(k, -1, -1)
            ehs = torch.cat([unc, cond])
            if model_index is not None and modules:
                idx = torch.as_tensor(np.asarray(model_index[sl]), device=dev)
                set_index(modules, torch.cat([idx, idx]))
            else:
                set_index(modules, None)
            sched.set_timesteps(steps)
            lat = lat * sched.init_noise_sigma
            for t in sched.timesteps:
                inp = torch.cat([lat, lat])
                e = pipe.unet(inp, t, encoder_hidden_states=ehs).sample
                eu, ec = e.chunk(2)
                lat = sched.step(eu + guidance * (ec - eu), t, lat).prev_sample
            img = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
            img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            out.append(img.permute(0, 2, 3, 1).cpu().numpy())
        set_index(modules, None)
    return np.concatenate(out)


def load_stacks(trainer_pipe: Any, targets: Sequence[str], stacks: dict, alpha: float) -> dict:
    """Install stacked factors ``{target: (A (M,r,in), B (M,out,r))}`` in the UNet."""
    import torch

    unet = trainer_pipe.unet
    first = next(iter(stacks.values()))
    m, r = first[0].shape[0], first[0].shape[1]
    mods = install_multi_lora(
        unet, targets, m, r, alpha, {t: torch.zeros(r, stacks[t][0].shape[2]) for t in targets}
    )
    dev = unet.device
    with torch.no_grad():
        for t, mod in mods.items():
            mod.A.copy_(torch.as_tensor(stacks[t][0]).to(dev))
            mod.B.copy_(torch.as_tensor(stacks[t][1]).to(dev))
    for mod in mods.values():
        mod.requires_grad_(False)
    return mods


# ---------------------------------------------------------------------------
# the zoo: chunks, files, workers, labels, manifest


def _chunk_size(settings: ZooSettings, device: str) -> int:
    if settings.chunk:
        return int(settings.chunk)
    return 1024 if device.startswith("cuda") else 8


def _model_seed(settings: ZooSettings, job: ZooJob, draw_round: int = 0) -> int:
    # the same seed LoraTrainer.train_many gives the job at position `number`
    seed = settings.seed * 1_000_003 + job.number
    if draw_round:  # a continuation round draws its pictures, noise and timesteps apart
        # (torch's CPU generator keeps the low 32 bits of a seed: mix within them)
        seed = (seed + int(draw_round) * 2_654_435_761) % 2**32
    return seed


def write_start(
    path: str | os.PathLike[str], names: Sequence[str], stacks: dict[str, tuple]
) -> Path:
    """Write the factors a zoo continues training from (one file, one row per model).

    Parameters
    ----------
    path : path
        The ``.safetensors`` file to write.
    names : sequence of str
        Model names, in the rows' order.
    stacks : dict
        Target -> ``(A (M, r, in), B (M, out, r))``.
    """
    from w2wkit.stio import write_safetensors

    tensors = {}
    for t, (a, b) in stacks.items():
        tensors[f"down.{t}"] = np.ascontiguousarray(a, np.float32)
        tensors[f"up.{t}"] = np.ascontiguousarray(b, np.float32)
    write_safetensors(path, tensors, metadata={"names": json.dumps(list(names))}, overwrite=True)
    return Path(path)


def _read_start(path: str | os.PathLike[str]) -> tuple[dict[str, int], dict[str, tuple]]:
    from w2wkit.stio import read_safetensors

    st = read_safetensors(path)
    rows = {n: i for i, n in enumerate(json.loads(st.metadata["names"]))}
    stacks = {
        k.removeprefix("down."): (v, st.tensors["up." + k.removeprefix("down.")])
        for k, v in st.tensors.items()
        if k.startswith("down.")
    }
    return rows, stacks


def _check_start(path: str, jobs: Sequence[ZooJob]) -> None:
    """Refuse a start file that lacks one of ``jobs`` (its header only)."""
    from w2wkit.stio import read_header

    _, meta = read_header(path)
    try:
        names = set(json.loads(meta["names"]))
    except (KeyError, ValueError) as exc:
        raise W2WError("not a start-factors file (no model names)", path=path) from exc
    gone = [j.name for j in jobs if j.name not in names]
    if gone:
        more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
        raise W2WError(f"the start factors have no model {gone[0]}{more}", path=path)


def _write_model(
    adapter: Adapter, path: Path, job: ZooJob, prompt: str, base: str, s: ZooSettings, loss: float
) -> None:
    from w2wkit.formats.registry import provenance_metadata, write_adapter

    adapter.metadata.update(
        provenance_metadata(
            "w2wkit.world.zoo",
            [base],
            instance=job.name,
            concept=job.concept,
            prompt=prompt,
            loss=f"{loss:.6f}",
            settings=json.dumps(asdict(s), sort_keys=True),
        )
    )
    write_adapter(adapter, path, format=s.format, overwrite=True)


def _run_chunks(
    trainer: ZooTrainer | str,
    settings: ZooSettings,
    chunks: list[list[ZooJob]],
    out_dir: str,
    prompt: str,
    images: Callable[[ZooJob], np.ndarray] | None,
    prior: np.ndarray | None,
    deadline: float | None,
    on_model: Callable[[int], None] | None = None,
    start: str | None = None,
    draw_round: int = 0,
    on_partial: Callable[[float], None] | None = None,
) -> list[dict[str, Any]]:
    if not isinstance(trainer, ZooTrainer):  # a base pipeline folder
        trainer = ZooTrainer(trainer, settings)
    rows, stacks = _read_start(start) if start is not None else ({}, {})
    base = trainer.base
    out = Path(out_dir)
    records: list[dict[str, Any]] = []
    pending = sum(len(c) for c in chunks)
    for chunk in chunks:
        if deadline is not None and time.time() > deadline:
            break
        share = len(chunk) / max(1, pending)  # of the time left, for this chunk
        pending -= len(chunk)
        todo = [j for j in chunk if not (out / f"{j.name}.safetensors").exists()]
        if not todo:
            continue
        t0 = time.perf_counter()
        imgs = [
            images(j) if images is not None else render_job(j, settings.n_images, settings.seed)
            for j in todo
        ]
        seeds = [_model_seed(settings, j, draw_round) for j in todo]
        init = None
        if start is not None:  # train_zoo checked that the file has every model
            sel = [rows[j.name] for j in todo]
            init = {t: (a[sel], b[sel]) for t, (a, b) in stacks.items()}
        left = None if deadline is None else max(1.0, (deadline - time.time()) * share)
        on_step = None
        if on_partial is not None:
            m_now, n_steps = len(todo), max(1, settings.steps)

            def on_step(k: int, m_now: int = m_now, n_steps: int = n_steps) -> None:
                on_partial(m_now * min(k, n_steps) / n_steps)

        oom = False
        try:
            adapters, losses = trainer.train_chunk(
                imgs, prompt, seeds, prior=prior, budget_s=left, start=init, on_step=on_step
            )
        except RuntimeError as exc:  # CUDA out of memory: train the chunk in two halves
            if "out of memory" not in str(exc).lower() or len(todo) < 2:
                raise
            oom = True
        if oom:
            import gc

            import torch

            trainer.modules = {}
            gc.collect()
            torch.cuda.empty_cache()
            half = len(todo) // 2
            records += _run_chunks(
                trainer,
                settings,
                [todo[:half], todo[half:]],
                out_dir,
                prompt,
                images,
                prior,
                deadline,
                on_model,
                start,
                draw_round,
                on_partial,
            )
            continue
        dt = time.perf_counter() - t0
        for j, ad, ls in zip(todo, adapters, losses, strict=True):
            _write_model(ad, out / f"{j.name}.safetensors", j, prompt, base, settings, float(ls))
            records.append(
                {
                    "name": j.name,
                    "status": "trained",
                    "loss": float(ls),
                    "seconds": dt / len(todo),
                    "steps": trainer.steps_done,
                }
            )
        if on_model is not None:
            on_model(len(todo))
        if on_partial is not None:
            on_partial(0.0)
    return records


def _worker(args: tuple) -> list[dict[str, Any]]:
    base, settings, chunks, out_dir, prompt, deadline, start, draw_round, note = args
    from w2wkit.world.base_model import _quiet

    _quiet()
    last = [0.0]

    def on_partial(models: float) -> None:
        # the share of the running chunk done, for the parent's progress bar
        now = time.time()
        if models == 0.0 or now - last[0] >= 2.0:
            last[0] = now
            Path(note).write_text(f"{models:.4f}")

    return _run_chunks(
        base,
        settings,
        chunks,
        out_dir,
        prompt,
        None,
        None,
        deadline,
        None,
        start,
        draw_round,
        on_partial,
    )


def _partial(notes: Sequence[Path]) -> float:
    """Models' worth of steps the workers' running chunks have done (their notes)."""
    total = 0.0
    for f in notes:
        try:
            total += float(f.read_text() or 0.0)
        except (OSError, ValueError):  # not written yet, or being written
            pass
    return total


def train_zoo(
    base: str | os.PathLike[str],
    jobs: Sequence[ZooJob],
    out_dir: str | os.PathLike[str],
    prompt: str,
    settings: ZooSettings | None = None,
    *,
    workers: int = 1,
    images: Callable[[ZooJob], np.ndarray] | None = None,
    prior: np.ndarray | None = None,
    budget_s: float | None = None,
    progress: bool = True,
    start: str | os.PathLike[str] | None = None,
    draw_round: int = 0,
) -> dict[str, Any]:
    """Train the LoRA of every job (skipping finished files) and write them.

    Parameters
    ----------
    base : path
        Base pipeline folder.
    jobs : sequence of ZooJob
        The models; file ``<out_dir>/<job.name>.safetensors`` each.
    prompt : str
        Instance prompt.
    workers : int
        CPU processes (each trains its share of the chunks); 1 runs inline.
    images : callable, optional
        ``job -> (n, H, W, 3)`` uint8 training pictures (default: render
        ``settings.n_images`` pictures with ``settings.seed``). Inline only.
    budget_s : float, optional
        No new chunk starts after this many seconds.
    start : path, optional
        A file of :func:`write_start`: every model continues training from its
        row there instead of the shared initialisation.
    draw_round : int
        0 for a model's first training; a continuation round ``k >= 1`` seeds
        the model's picture, noise and timestep draws apart from earlier rounds.

    Returns
    -------
    dict
        ``trained``, ``skipped``, ``missing`` counts, ``seconds``,
        ``models_per_hour`` and per-model ``records``.
    """
    s = settings or ZooSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise W2WError("zoo jobs have duplicate names", key="jobs")
    done = {j.name for j in jobs if (out / f"{j.name}.safetensors").exists()}
    todo = [j for j in jobs if j.name not in done]
    device = resolve_device(s.device)
    start = str(start) if start is not None else None
    if start is not None and todo:  # refuse before training anything, in any worker mode
        _check_start(start, todo)
    size = _chunk_size(s, device)
    if todo:  # balanced chunks (1100 models at 1024 -> 550 + 550)
        n_chunks = -(-len(todo) // size)
        size = -(-len(todo) // n_chunks)
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    t0 = time.time()
    deadline = t0 + budget_s if budget_s is not None else None
    records: list[dict[str, Any]] = []
    bar = _Bar(
        len(todo), f"zoo ({device}, {len(chunks)} chunk(s))", enabled=progress, unit="models"
    )
    with bar:
        if workers <= 1 or device != "cpu" or len(chunks) <= 1:
            records = _run_chunks(
                str(base),
                s,
                chunks,
                str(out),
                prompt,
                images,
                prior,
                deadline,
                bar.advance,
                start,
                draw_round,
                bar.partial,
            )
        else:
            ctx = mp.get_context("spawn")
            shares = [chunks[w::workers] for w in range(workers)]
            notes_dir = Path(tempfile.mkdtemp(prefix="w2wkit-zoo-progress-"))
            notes = [notes_dir / f"worker{w}.txt" for w in range(workers)]
            args = [
                (str(base), s, sh, str(out), prompt, deadline, start, draw_round, str(note))
                for sh, note in zip(shares, notes, strict=True)
                if sh
            ]
            try:
                with ctx.Pool(len(args)) as pool:
                    res = pool.map_async(_worker, args)
                    while not res.ready():
                        res.wait(1.0)
                        n_now = sum((out / f"{j.name}.safetensors").exists() for j in todo)
                        bar.set(n_now, _partial(notes))
                    for r in res.get():
                        records.extend(r)
            finally:
                shutil.rmtree(notes_dir, ignore_errors=True)
    seconds = time.time() - t0
    missing = [j.name for j in jobs if not (out / f"{j.name}.safetensors").exists()]
    trained = len(records)
    steps = [r["steps"] for r in records]
    return {
        "steps_min": min(steps) if steps else None,
        "steps_planned": s.steps,
        "trained": trained,
        "skipped": len(done),
        "missing": len(missing),
        "seconds": seconds,
        "models_per_hour": trained / seconds * 3600 if trained and seconds > 0 else None,
        "chunk": size,
        "device": device,
        "records": records,
    }


class _Bar:
    """A rich progress bar with ETA (a no-op when disabled).

    When the console is not a terminal (a log file, CI), rich's live bar would
    show nothing until the end; the bar then prints a plain line at most every
    ``every_s`` seconds instead (done / total, elapsed, ETA). Besides whole
    units done, the bar counts a fraction in progress (:meth:`partial`: the
    models' worth of steps a running chunk has done), so a long chunk moves the
    percentage and the ETA before its models are written.
    """

    def __init__(
        self,
        total: int,
        label: str,
        enabled: bool = True,
        every_s: float = 30.0,
        unit: str = "",
    ) -> None:
        self.total, self.label, self.enabled = total, label, enabled and total > 0
        self.unit = f" {unit}" if unit else ""
        self.every_s = float(every_s)
        self._p: Any = None
        self._lines: Any = None
        self._done = 0.0
        self._part = 0.0
        self._t0 = self._last = 0.0

    def __enter__(self) -> _Bar:
        if not self.enabled:
            return self
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            self._lines = console
            self._t0 = time.time()
            self._line(force=True)  # a log shows that the work started, and its size
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._p = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self._p.__enter__()
        self._task = self._p.add_task(self.label, total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)
        elif self._lines is not None and exc[0] is None:
            self._line(force=True)

    def _line(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        spent = now - self._t0
        done = self._progress()
        eta = f"{spent / done * (self.total - done):.0f} s" if done > 0 else "?"
        self._lines.print(
            f"{self.label}: {int(self._done)}/{self.total}{self.unit} "
            f"({100 * done / self.total:.0f}%), {spent:.0f} s elapsed, ETA {eta}",
            highlight=False,
            soft_wrap=True,
        )

    def advance(self, n: int) -> None:
        """``n`` more models finished."""
        self._done += n
        self._show()

    def partial(self, models: float) -> None:
        """The running chunk has done ``models`` models' worth of its steps."""
        self._part = float(models)
        self._show()

    def set(self, done: int, part: float = 0.0) -> None:
        """``done`` models finished, ``part`` models' worth of steps in running chunks."""
        self._done, self._part = float(done), float(part)
        self._show()

    def _progress(self) -> float:
        return max(0.0, min(float(self.total), self._done + self._part))

    def _show(self) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=self._progress())
        elif self._lines is not None:
            self._line()


def write_labels(jobs: Sequence[ZooJob], path: str | os.PathLike[str]) -> Path:
    """Labels CSV of the jobs' ground-truth binary attributes (``name`` column first)."""
    from w2wkit.stio import atomic_path
    from w2wkit.world.pictures import generator

    rows, header = [], None
    for j in jobs:
        inst = generator(j.concept).instance(j.index, j.inst_seed)
        if header is None:
            header = ["name", *inst.attributes.keys()]
        rows.append([j.name, *(int(v) for v in inst.attributes.values())])
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header or ["name"])
        w.writerows(rows)
    return path


def write_zoo_manifest(
    folder: str | os.PathLike[str], jobs: Sequence[ZooJob], info: dict[str, Any]
) -> Path:
    """The zoo folder's ``manifest.json``: settings, one entry per model (file, sha256, instance).

    Not the shipped world's manifest (:func:`w2wkit.world.shipped.write_manifest`).
    """
    from w2wkit.stio import atomic_path

    folder = Path(folder)
    models = []
    for j in jobs:
        f = folder / f"{j.name}.safetensors"
        if f.exists():
            models.append(
                {
                    "name": j.name,
                    "file": f.name,
                    "sha256": file_sha256(f),
                    "concept": j.concept,
                    "index": j.index,
                    "inst_seed": j.inst_seed,
                }
            )
    path = folder / "manifest.json"
    with atomic_path(path, overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps({**info, "models": models}, indent=1, default=str))
    return path
