"""Synthetic kohya LoRA collections for the end-to-end ``fit`` benchmarks.

``factors``: rank-1 LoRAs on ``to_q``/``to_v`` of every SD1.5 attention module
(the paper's layout, d = 99,648), whose flattened factors are one row of
:class:`_synth.PowerLawData` (a power law that flattens into noise around k)
plus one shared initialisation (the common offset real LoRA factors have).

``delta``: LoRAs of mixed ranks (drawn from a list) and alphas over a list of
modules (real SD1.5 names), factors drawn from a low-dimensional latent model so
the collection has structure to find.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synth import GEN_BLOCK, PowerLawData

from w2wkit.adapter import Adapter, LoraLayer
from w2wkit.formats import write_adapter
from w2wkit.synthetic import sd15_qv_shapes

D_QV = 99_648


def write_factor_collection(
    folder: Path, n: int, k: int, seed: int = 0, workers: int = 1
) -> list[Path]:
    """Write ``n`` rank-1 kohya files (``model_00000.safetensors`` ...); skip existing ones.

    ``workers``: processes writing generation blocks in parallel (the same files whatever
    the count: each block's rows depend only on the seed and the block's index).
    """
    folder.mkdir(parents=True, exist_ok=True)
    gen = PowerLawData(n, D_QV, k, seed=seed)
    files = []
    todo = []
    for b in range(gen.n_blocks()):
        paths = [folder / f"model_{b * GEN_BLOCK + i:05d}.safetensors" for i in range(GEN_BLOCK)]
        paths = paths[: min(GEN_BLOCK, n - b * GEN_BLOCK)]
        files += paths
        if not all(p.exists() for p in paths):
            todo.append(b)
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        jobs = [(folder, n, k, seed, todo[w::workers]) for w in range(workers)]
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.starmap(_write_factor_blocks, jobs)
    else:
        _write_factor_blocks(folder, n, k, seed, todo)
    return files


def _write_factor_blocks(folder: Path, n: int, k: int, seed: int, blocks: list[int]) -> None:
    """Write the files of the generation blocks ``blocks`` (see :func:`write_factor_collection`)."""
    shapes = sd15_qv_shapes()
    gen = PowerLawData(n, D_QV, k, seed=seed)
    init_rng = np.random.default_rng([seed, 7])
    # shared initialisation: ten times the rows' typical entry size
    typical = float(np.sqrt(np.mean(gen.block(0)[:64] ** 2)))
    init = init_rng.standard_normal(D_QV).astype(np.float32) * np.float32(10 * typical)
    for b in blocks:
        paths = [folder / f"model_{b * GEN_BLOCK + i:05d}.safetensors" for i in range(GEN_BLOCK)]
        paths = paths[: min(GEN_BLOCK, n - b * GEN_BLOCK)]
        z = gen.block(b) + init
        for row, path in zip(z, paths, strict=True):
            layers = {}
            off = 0
            for module, (out_f, in_f) in shapes.items():
                down = row[off : off + in_f].reshape(1, in_f).copy()
                off += in_f
                up = row[off : off + out_f].reshape(out_f, 1).copy()
                off += out_f
                layers[module] = LoraLayer(down=down, up=up, alpha=1.0)
            write_adapter(Adapter(layers), path, format="kohya", overwrite=True)


def sd15_linear_shapes(attention_only: bool = False) -> dict[str, tuple[int, int]]:
    """``unet.<module> -> (out, in)`` of the SD1.5 UNet's attention (and feed-forward) linears."""
    from w2wkit.names import module_table

    keep = (".to_q", ".to_k", ".to_v", ".to_out.0")
    if not attention_only:
        keep += (".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out")
    out = {}
    for path, shape in module_table("sd1").items():
        if path.startswith("unet.") and path.endswith(keep) and len(shape) == 2:
            out[path] = (int(shape[0]), int(shape[1]))
    return out


def write_delta_collection(
    folder: Path,
    n: int,
    ranks: tuple[int, ...] = (4, 8, 16, 32, 64),
    seed: int = 0,
    attention_only: bool = False,
    n_latent: int = 16,
    dtype: str = "F32",
    workers: int = 1,
) -> list[Path]:
    """Write ``n`` kohya files of mixed ranks and alphas over SD1.5 linears; skip existing.

    ``dtype``: the files' storage dtype (``"F16"`` as most published LoRAs);
    ``workers``: processes writing files in parallel (same files whatever the count).
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"lora_{i:05d}.safetensors" for i in range(n)]
    todo = [i for i, p in enumerate(files) if not p.exists()]
    args = (folder, ranks, seed, attention_only, n_latent, dtype)
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        chunks = [todo[w::workers] for w in range(workers)]
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.starmap(_write_delta_files, [(*args, c) for c in chunks])
    else:
        _write_delta_files(*args, todo)
    return files


def _write_delta_files(
    folder: Path,
    ranks: tuple[int, ...],
    seed: int,
    attention_only: bool,
    n_latent: int,
    dtype: str,
    indices: list[int],
) -> None:
    shapes = sd15_linear_shapes(attention_only)
    rng0 = np.random.default_rng([seed, 0])
    # per module a latent basis of down rows (n_latent, in) and up columns (out, n_latent)
    bases = {
        m: (
            rng0.standard_normal((n_latent, fin), dtype=np.float32) / np.float32(np.sqrt(fin)),
            rng0.standard_normal((fout, n_latent), dtype=np.float32) * np.float32(0.01),
        )
        for m, (fout, fin) in shapes.items()
    }
    for i in indices:
        path = folder / f"lora_{i:05d}.safetensors"
        rng = np.random.default_rng([seed, 1, i])
        r = int(rng.choice(ranks))
        alpha = float(rng.choice([1.0, r / 2, float(r)]))
        mix = rng.standard_normal((n_latent, r)).astype(np.float32)
        layers = {}
        for m, (_, fin) in shapes.items():
            bd, bu = bases[m]
            down = (mix.T @ bd) + np.float32(0.1) * rng.standard_normal((r, fin), dtype=np.float32)
            up = (bu @ mix) * np.float32(r / alpha / r)
            layers[m] = LoraLayer(down=down, up=up, alpha=alpha, dtype=dtype)
        write_adapter(Adapter(layers), path, format="kohya", overwrite=True)


if __name__ == "__main__":  # pragma: no cover - a manual helper
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=("factors", "delta"))
    ap.add_argument("folder", type=Path)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--attention-only", action="store_true")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    if a.kind == "factors":
        write_factor_collection(a.folder, a.n, min(a.k, a.n - 1), workers=a.workers)
    else:
        write_delta_collection(a.folder, a.n, attention_only=a.attention_only)
