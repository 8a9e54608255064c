"""Shared test fixtures: one tiny pipeline, one micro base and two micro worlds per worker.

Every fixture here is session-scoped (under ``pytest -n 2`` each worker process builds
its own, once) and SHARED: a test that changes the object must change a copy
(``copy.deepcopy(tiny_pipe)``, ``shutil.copytree(micro_world, tmp_path / "w")``).
A guard checks this: after every test that used one of them, the object must be
as it was built (the pipeline's weights bit for bit, the folders' files, sizes and
modification times), or the test fails naming it.

Threads: with ``-n 2`` on a 2-core machine each worker gets one BLAS and one torch
thread (two would make four busy threads on two cores; OpenBLAS then spends most
of its time waiting: the randomized-solver tests ran 10x slower). A value already
set in the environment wins.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

_THREADS = int(os.environ["OPENBLAS_NUM_THREADS"])


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_worker() -> Iterator[None]:
    """Limit BLAS and torch threads (numpy may have loaded BLAS before this file)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=_THREADS):
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            yield
            return
        torch.set_num_threads(_THREADS)
        yield


# ------------------------------------------------------------------ fingerprints


def _pipe_fingerprint(pipe: Any) -> str:
    """sha256 over every parameter and buffer of the pipeline's models, and its scheduler's
    settings."""
    h = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        for key, t in model.state_dict().items():
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    # (save_pretrained adds ``_class_name`` and ``_diffusers_version``: metadata, not settings)
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    h.update(repr(sorted(config.items())).encode())
    return h.hexdigest()


def _folder_fingerprint(root: Path) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of every file under ``root``, sorted."""
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    )


_SHARED: dict[str, tuple[Callable[[], Any], Any]] = {}


def _share(name: str, obj: Any, fingerprint: Callable[[], Any]) -> Any:
    _SHARED[name] = (fingerprint, fingerprint())
    return obj


@pytest.fixture(autouse=True)
def _shared_fixtures_left_unchanged(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that changed a shared fixture (it must have changed a copy)."""
    yield
    for name in request.fixturenames:
        if name in _SHARED:
            fingerprint, before = _SHARED[name]
            if fingerprint() != before:
                _SHARED.pop(name)  # report it once
                pytest.fail(
                    f"{request.node.nodeid} changed the shared fixture `{name}`: "
                    "change a copy (copy.deepcopy / shutil.copytree) instead",
                    pytrace=False,
                )


# ------------------------------------------------------------------ diffusion


@pytest.fixture(scope="session")
def tiny_pipe() -> Any:
    """``w2wkit.testing.tiny_pipeline(seed=0)``, float32 on the CPU. Read only."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from w2wkit.testing import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    return _share("tiny_pipe", pipe, lambda: _pipe_fingerprint(pipe))


@pytest.fixture(scope="session")
def tiny_pipe_dir(tiny_pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_pipe`` saved with ``save_pretrained`` (a diffusers folder). Read only."""
    out = tmp_path_factory.mktemp("tiny-pipe") / "pipe"
    tiny_pipe.save_pretrained(out)
    return _share("tiny_pipe_dir", out, lambda: _folder_fingerprint(out))


@pytest.fixture(scope="session")
def tiny_sdxl_pipe() -> Any:
    """``w2wkit.testing.tiny_sdxl_pipeline(seed=0)`` (SDXL), float32 on the CPU. Read only."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from w2wkit.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(seed=0)
    return _share("tiny_sdxl_pipe", pipe, lambda: _pipe_fingerprint(pipe))


@pytest.fixture(scope="session")
def tiny_sdxl_pipe_dir(tiny_sdxl_pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_sdxl_pipe`` saved with ``save_pretrained``. Read only."""
    out = tmp_path_factory.mktemp("tiny-sdxl-pipe") / "pipe"
    tiny_sdxl_pipe.save_pretrained(out)
    return _share("tiny_sdxl_pipe_dir", out, lambda: _folder_fingerprint(out))


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro world base pipeline folder (1 UNet and 1 VAE step). Read only."""
    pytest.importorskip("torch")
    from w2wkit.world import base_model as B

    out = tmp_path_factory.mktemp("world") / "base"
    B.build_base(out, B.BaseSettings.micro(unet_steps=1, vae_steps=1))
    return _share("micro_base", out, lambda: _folder_fingerprint(out))


# ------------------------------------------------------------------ worlds


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``world build --profile micro`` (base, zoo, held-out set, evaluators, ``shipped/``).

    Read only: a test that resumes, revises or damages it works on a copy.
    """
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from w2wkit.world.builder import build_world

    out = tmp_path_factory.mktemp("worldbuild")
    build_world(out, "micro", device="cpu", workers=1)
    return _share("micro_world", out, lambda: _folder_fingerprint(out))


@pytest.fixture(scope="session")
def eval_micro_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``evaluation.build_micro_world`` with 12 zoo models and 3 held-out ones. Read only."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from w2wkit import evaluation as E

    out = tmp_path_factory.mktemp("eval") / "micro"
    E.build_micro_world(out, n_models=12, n_heldout=3)
    return _share("eval_micro_world", out, lambda: _folder_fingerprint(out))
