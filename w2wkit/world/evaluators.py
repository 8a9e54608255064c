"""Evaluators of the miniature world: attribute classifiers and identity embedders.

Small torch CNNs trained on procedural renders (with their full nuisance):

- **attribute classifier** (one per concept): one sigmoid output per binary
  attribute of the concept's schema, trained with binary cross-entropy;
- **identity embedder** (one per concept): a unit-norm embedding trained as a
  cosine-softmax classifier with an additive margin (CosFace) over many
  training identities / breeds; the class weights are thrown away.
  **ID score** = cosine similarity of two embeddings (the paper's metric).

Both are saved together as one ``evaluators.safetensors`` (float16) plus
``evaluators.json`` (architecture, attribute names, held-out metrics).
torch is imported inside the functions.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.errors import W2WError
from w2wkit.world import HELDOUT_CONCEPT

__all__ = [
    "EvalSettings",
    "Evaluators",
    "load_evaluators",
    "make_net",
    "roc_auc_verification",
    "save_evaluators",
    "train_attribute_classifier",
    "train_embedder",
]

WEIGHTS = "evaluators.safetensors"
CONFIG = "evaluators.json"


@dataclass
class EvalSettings:
    """Training budget of one evaluator network.

    Attributes
    ----------
    width : int
        Channels of the first conv stage (doubled twice).
    emb_dim : int
        Embedding size of the identity embedder.
    steps, batch, lr : Adam training (cosine decay).
    margin, scale : CosFace margin and logit scale of the embedder.
    seed : int
    budget_s : float or None
        Stop early after this many seconds (the steps done are recorded).
    device : str
    """

    width: int = 32
    emb_dim: int = 64
    steps: int = 2000
    batch: int = 128
    lr: float = 2e-3
    margin: float = 0.2
    scale: float = 16.0
    seed: int = 0
    budget_s: float | None = None
    device: str = "cpu"


def make_net(n_out: int, width: int = 32) -> Any:
    """The CNN: 3 conv stages on 32x32 (GroupNorm, SiLU, max-pool), 2x2 pool, 2 linear.

    Input ``(n, 3, H, W)`` in [-1, 1]; output ``(n, n_out)``.
    """
    import torch.nn as nn

    def stage(i: int, o: int) -> list:
        return [
            nn.Conv2d(i, o, 3, padding=1),
            nn.GroupNorm(8, o),
            nn.SiLU(),
            nn.Conv2d(o, o, 3, padding=1),
            nn.GroupNorm(8, o),
            nn.SiLU(),
        ]

    c = int(width)
    return nn.Sequential(
        *stage(3, c),
        nn.MaxPool2d(2),
        *stage(c, 2 * c),
        nn.MaxPool2d(2),
        *stage(2 * c, 4 * c),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * c, 128),
        nn.SiLU(),
        nn.Linear(128, n_out),
    )


def _to_input(images: np.ndarray, device: str) -> Any:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _train_loop(
    net: Any,
    head: Any,
    loss_fn: Any,
    images: np.ndarray,
    targets: Any,
    s: EvalSettings,
    progress: Any = None,
) -> dict[str, Any]:
    import torch

    dev = s.device
    net.to(dev).train()
    params = list(net.parameters()) + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.Adam(params, lr=s.lr)
    total = [s.steps]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + np.cos(np.pi * min(1.0, k / max(1, total[0]))))
    )
    rng = np.random.default_rng(s.seed)
    # on a GPU the whole uint8 set lives there (tens of MB): no per-step copies
    pool = torch.from_numpy(np.ascontiguousarray(images)).to(dev) if dev != "cpu" else None
    t0 = time.perf_counter()
    ema, done = None, 0
    step = -1
    while step + 1 < total[0]:
        step += 1
        if s.budget_s is not None and step == 30:
            if str(dev).startswith("cuda"):
                torch.cuda.synchronize()
            # shorten the run (and its cosine schedule) to what fits the budget
            per = (time.perf_counter() - t0) / 30
            total[0] = max(31, min(total[0], int(30 + (s.budget_s - per * 30) / per)))
        idx = rng.integers(0, len(images), s.batch)
        if pool is not None:
            x = pool[torch.from_numpy(idx).to(dev)].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        else:
            x = _to_input(images[idx], dev)
        flip = torch.from_numpy(rng.random(s.batch) < 0.5).to(dev)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        loss = loss_fn(net(x), targets[torch.from_numpy(idx).to(targets.device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        done = step + 1
        if progress is not None:
            progress(done, total[0])
        if s.budget_s is not None and time.perf_counter() - t0 > 1.2 * s.budget_s:
            break
    net.eval()
    return {
        "steps": done,
        "planned_steps": s.steps,
        "seconds": time.perf_counter() - t0,
        "loss": ema,
    }


def train_attribute_classifier(
    images: np.ndarray, labels: np.ndarray, settings: EvalSettings | None = None
) -> tuple[Any, dict[str, Any]]:
    """Train a multi-label attribute classifier.

    Parameters
    ----------
    images : numpy.ndarray
        ``(n, H, W, 3)`` uint8 renders.
    labels : numpy.ndarray
        ``(n, k)`` 0/1 attributes of each picture's instance.

    Returns
    -------
    net : torch.nn.Module
        Outputs ``(n, k)`` logits.
    log : dict
        Steps, seconds, final loss.
    """
    import torch

    s = settings or EvalSettings()
    torch.manual_seed(s.seed)
    net = make_net(labels.shape[1], s.width)
    y = torch.as_tensor(np.asarray(labels, np.float32), device=s.device)
    log = _train_loop(net, None, torch.nn.functional.binary_cross_entropy_with_logits, images, y, s)
    return net, log


def train_embedder(
    images: np.ndarray,
    classes: np.ndarray,
    settings: EvalSettings | None = None,
    progress: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Train an identity embedder (cosine softmax with additive margin).

    Parameters
    ----------
    images : numpy.ndarray
        ``(n, H, W, 3)`` uint8.
    classes : numpy.ndarray
        ``(n,)`` int identity of each picture (0 .. C-1).
    progress : callable, optional
        ``progress(steps_done, steps_planned)`` after every step.

    Returns
    -------
    net : torch.nn.Module
        Outputs ``(n, emb_dim)`` (normalise for cosines).
    log : dict
    """
    import torch
    import torch.nn.functional as F

    s = settings or EvalSettings()
    torch.manual_seed(s.seed)
    n_cls = int(classes.max()) + 1
    net = make_net(s.emb_dim, s.width)
    head = torch.nn.Linear(s.emb_dim, n_cls, bias=False).to(s.device)

    def loss_fn(e: Any, y: Any) -> Any:
        cos = F.normalize(e, dim=1) @ F.normalize(head.weight, dim=1).T
        cos = cos - s.margin * F.one_hot(y, n_cls)
        return F.cross_entropy(s.scale * cos, y)

    y = torch.as_tensor(np.asarray(classes, np.int64), device=s.device)
    log = _train_loop(net, head, loss_fn, images, y, s, progress)
    return net, log


def roc_auc_verification(emb: np.ndarray, owners: np.ndarray) -> float:
    """Verification ROC-AUC: cosines of same-owner pairs vs different-owner pairs.

    Parameters
    ----------
    emb : numpy.ndarray
        ``(n, d)`` embeddings.
    owners : numpy.ndarray
        ``(n,)`` identity of each.
    """
    from sklearn.metrics import roc_auc_score

    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = e @ e.T
    iu = np.triu_indices(len(e), 1)
    same = (owners[:, None] == owners[None, :])[iu]
    return float(roc_auc_score(same, cos[iu]))


class Evaluators:
    """Loaded evaluators: ``attributes(concept, images)``, ``embed``, ``id_score``.

    Parameters
    ----------
    nets : dict
        ``("attr"|"emb", concept) -> torch.nn.Module`` (eval mode).
    config : dict
        The ``evaluators.json`` content.
    device : str
    """

    def __init__(
        self, nets: dict[tuple[str, str], Any], config: dict[str, Any], device: str = "cpu"
    ) -> None:
        self.nets = nets
        self.config = config
        self.device = device

    @property
    def concepts(self) -> list[str]:
        """Concepts with at least one evaluator."""
        return sorted({c for _, c in self.nets})

    def attribute_names(self, concept: str) -> list[str]:
        """Output order of ``attributes(concept, ...)``."""
        return list(self.config["attributes"][concept])

    def _net(self, kind: str, concept: str) -> Any:
        if (kind, concept) not in self.nets:
            raise W2WError(
                f"no {kind} evaluator for concept '{concept}' (known: {', '.join(self.concepts)})",
                key="concept",
            )
        return self.nets[(kind, concept)]

    def _run(self, net: Any, images: np.ndarray, batch: int = 1024) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for s in range(0, len(images), batch):
                out.append(net(_to_input(images[s : s + batch], self.device)).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)

    def attributes(self, concept: str, images: np.ndarray) -> np.ndarray:
        """Attribute probabilities ``(n, k)`` of uint8 pictures ``(n, H, W, 3)``."""
        logits = self._run(self._net("attr", concept), images)
        return 1.0 / (1.0 + np.exp(-logits))

    def embed(self, concept: str, images: np.ndarray) -> np.ndarray:
        """Unit-norm identity embeddings ``(n, d)`` of uint8 pictures ``(n, H, W, 3)``."""
        e = self._run(self._net("emb", concept), images)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    def id_score(self, a: np.ndarray, b: np.ndarray, concept: str = HELDOUT_CONCEPT) -> np.ndarray:
        """ID score: cosine of embeddings, matrix ``(len(a), len(b))``.

        ``a`` and ``b`` are uint8 pictures ``(n, H, W, 3)`` or embeddings ``(n, d)``.
        """
        ea = self.embed(concept, a) if a.ndim == 4 else _unit(a)
        eb = self.embed(concept, b) if b.ndim == 4 else _unit(b)
        return ea @ eb.T


def _unit(e: np.ndarray) -> np.ndarray:
    e = np.asarray(e, np.float32)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def save_evaluators(
    folder: str | os.PathLike[str],
    nets: dict[tuple[str, str], Any],
    attributes: dict[str, list[str]],
    settings: EvalSettings,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``evaluators.safetensors`` (float16) and ``evaluators.json`` into ``folder``."""
    from w2wkit.stio import atomic_path, write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, outs = {}, {}
    for (kind, concept), net in nets.items():
        for k, v in net.state_dict().items():
            tensors[f"{kind}.{concept}.{k}"] = v.detach().float().cpu().numpy()
        outs[f"{kind}.{concept}"] = int(net[-1].out_features)
    write_safetensors(
        folder / WEIGHTS,
        tensors,
        dtypes=dict.fromkeys(tensors, "F16"),
        overwrite=True,
    )
    config = {
        "format": "w2wkit-evaluators/1",
        "width": settings.width,
        "emb_dim": settings.emb_dim,
        "outputs": outs,
        "attributes": attributes,
        "settings": asdict(settings),
        "metrics": metrics or {},
    }
    with atomic_path(folder / CONFIG, overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(config, indent=1, default=str))
    return folder


def load_evaluators(folder: str | os.PathLike[str], device: str = "cpu") -> Evaluators:
    """Load the evaluators written by :func:`save_evaluators` (float32 on ``device``)."""
    import torch

    from w2wkit.stio import read_safetensors

    folder = Path(folder)
    cfg_path = folder / CONFIG
    if not cfg_path.exists() or not (folder / WEIGHTS).exists():
        raise W2WError("no evaluators here (evaluators.json + .safetensors)", path=folder)
    config = json.loads(cfg_path.read_text())
    st = read_safetensors(folder / WEIGHTS)
    nets = {}
    for key, n_out in config["outputs"].items():
        kind, concept = key.split(".", 1)
        net = make_net(int(n_out), int(config["width"]))
        prefix = f"{key}."
        state = {
            k[len(prefix) :]: torch.from_numpy(np.asarray(v, np.float32))
            for k, v in st.tensors.items()
            if k.startswith(prefix)
        }
        net.load_state_dict(state)
        nets[(kind, concept)] = net.to(device).eval()
    return Evaluators(nets, config, device)
