"""GPU check of the solvers (device="cuda"): agreement with the CPU and timing.

Needs only numpy, scipy and torch with a GPU. Prints JSON lines:

* ``agree``: gram and randomized on a power-law + noise matrix, cuda vs cpu
  (singular values, principal angles, scores == Z @ components.T);
* ``timing``: randomized fit of an (N, d) matrix streamed from host memory,
  cuda vs cpu in the same run (CPU only if ``--cpu-timing``).

    python benchmarks/gpu_check.py --n 20000 --d 99648 --k 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _synth import GEN_BLOCK, PowerLawData

from w2wkit.solvers import fit_pca


def max_angle(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.linalg import subspace_angles

    return float(np.max(subspace_angles(a.T.astype(np.float64), b.T.astype(np.float64))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--d", type=int, default=99_648)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--cpu-timing", action="store_true")
    args = ap.parse_args()
    import torch

    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "cuda": torch.cuda.is_available(),
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            }
        )
    )

    gen = PowerLawData(1500, 6000, 60, seed=1)
    z = gen.rows(0, 1500)
    z -= z.mean(axis=0)

    def blocks():
        for lo in range(0, z.shape[0], 400):
            yield z[lo : lo + 400]

    for solver in ("gram", "randomized"):
        cpu = fit_pca(blocks, *z.shape, 60, solver=solver)
        t = time.perf_counter()
        gpu = fit_pca(blocks, *z.shape, 60, solver=solver, device="cuda")
        gpu_s = time.perf_counter() - t
        zv = z.astype(np.float64) @ gpu.components.T.astype(np.float64)
        print(
            json.dumps(
                {
                    "case": "agree",
                    "solver": solver,
                    "seconds_cuda": gpu_s,
                    "sv_max_rel_diff": float(
                        np.max(
                            np.abs(gpu.singular_values - cpu.singular_values) / cpu.singular_values
                        )
                    ),
                    "max_angle_rad": max_angle(gpu.components, cpu.components),
                    "scores_max_abs_err": float(np.max(np.abs(gpu.scores - zv))),
                    "scores_scale": float(np.max(np.abs(zv))),
                }
            ),
            flush=True,
        )

    big = PowerLawData(args.n, args.d, args.k, seed=0)
    t = time.perf_counter()
    data = np.concatenate([big.block(b) for b in range(big.n_blocks())])
    gen_s = time.perf_counter() - t

    def big_blocks():
        for lo in range(0, args.n, GEN_BLOCK):
            yield data[lo : lo + GEN_BLOCK]

    for device in ("cuda", "cpu") if args.cpu_timing else ("cuda",):
        t = time.perf_counter()
        res = fit_pca(big_blocks, args.n, args.d, args.k, solver="randomized", device=device)
        print(
            json.dumps(
                {
                    "case": "timing",
                    "device": device,
                    "n": args.n,
                    "d": args.d,
                    "k": args.k,
                    "seconds": time.perf_counter() - t,
                    "passes": res.n_passes,
                    "block_size": res.info["block_size"],
                    "krylov_dim": res.info["krylov_dim"],
                    "s_first": float(res.singular_values[0]),
                    "s_last": float(res.singular_values[-1]),
                    "data_gen_s": gen_s,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
