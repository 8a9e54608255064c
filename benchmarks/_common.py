"""Shared helpers of the PCA benchmarks: readers, peak RSS, GEMM rate, worker runs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (VmHWM), in GB (1e9 bytes)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")  # pragma: no cover


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux ``clear_refs``); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:  # pragma: no cover
        return False


def machine() -> dict:
    """A short description of the machine the numbers come from."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": round(mem, 1)}


def npy_offset(path: str | Path) -> tuple[int, tuple[int, ...]]:
    """Byte offset of the data and the shape of a C-order float32 .npy file."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        if fortran or dtype != np.float32:
            raise ValueError(f"{path}: need a C-order float32 array")
        return fh.tell(), shape


def npy_blocks(
    path: str | Path, block_rows: int, mean: np.ndarray | None = None
) -> Callable[[], Iterator[np.ndarray]]:
    """A BlockFn over a float32 .npy file, read with plain reads (no memory map).

    Each block is a fresh array (the solvers prefetch one block ahead); ``mean``
    (d,) is subtracted when given.
    """
    offset, (n, d) = npy_offset(path)

    def blocks() -> Iterator[np.ndarray]:
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset)
            for lo in range(0, n, block_rows):
                m = min(block_rows, n - lo)
                block = np.empty((m, d), dtype=np.float32)
                view = memoryview(block).cast("B")
                got = 0
                while got < view.nbytes:
                    r = fh.readinto(view[got:])
                    if not r:
                        raise OSError(f"{path}: short read")
                    got += r
                if mean is not None:
                    block -= mean
                yield block

    return blocks


def column_mean(blocks: Callable[[], Iterator[np.ndarray]], n: int, d: int) -> np.ndarray:
    """Column means (float32) in one pass."""
    acc = np.zeros(d, dtype=np.float64)
    for block in blocks():
        acc += block.sum(axis=0, dtype=np.float64)
    return (acc / n).astype(np.float32)


def gemm_gflops(d: int, width: int, rows: int = 1024, repeats: int = 3) -> float:
    """Measured float32 GEMM rate (GFLOP/s) of a (rows, d) @ (d, width) product."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, d), dtype=np.float32)
    b = rng.standard_normal((d, width), dtype=np.float32)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * rows * d * width / best / 1e9


def rel_errors(s: np.ndarray, ref: np.ndarray) -> dict:
    """Mean, tail (last 10%) and max relative error of singular values."""
    s = np.asarray(s, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)[: len(s)]
    rel = np.abs(s - ref) / ref
    tail = max(1, len(ref) // 10)
    return {
        "mean_rel_err": float(rel.mean()),
        "tail_rel_err": float(rel[-tail:].mean()),
        "max_rel_err": float(rel.max()),
    }


def run_worker(script: str, args: list[str], env: dict | None = None) -> dict:
    """Run ``script --worker ...`` in a fresh process; return its last JSON line."""
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"worker failed: {' '.join(cmd)}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def training_args(doc: str, steps: int, results: str) -> Any:
    """The command line of the training benchmarks: steps, models, threads, device, out."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / results))
    return ap.parse_args()


def world_base(folder: Path, models: int) -> tuple[Path, list, list]:
    """The miniature world's base architecture (untrained) and ``models`` identities' pictures.

    Returns the pipeline folder, the zoo jobs and their training pictures (10 each, uint8).
    """
    from w2wkit.world import base_model as B
    from w2wkit.world.zoo import render_job, zoo_jobs

    s = B.BaseSettings(
        n_instances={"identity": 4, "dog": 2},
        images_per_instance={"identity": 1, "dog": 1},
        vae_steps=1,
        unet_steps=1,
    )
    B.build_base(folder / "base", s)
    jobs = zoo_jobs("identity", models)
    return folder / "base", jobs, [render_job(j, 10) for j in jobs]
