"""Benchmark: ``fit --cluster local:2`` against the single process on the same 2 cores.

N rank-1 SD1.5 kohya LoRAs (the paper's layout, d = 99,648, written by
``_kohya_synth.write_factor_collection`` as in ``bench_fit_files.py``), k = min(1000, N - 1).
For each solver, two contenders run in fresh processes, interleaved (single, cluster, single,
cluster ... per round):

``single``  (the anchor)
    ``WeightSpace(k, solver=S).fit(Collection(folder))`` -- what ``w2wkit fit DIR -k K`` does,
    numpy/OpenBLAS with both cores.
``cluster``
    the same call with ``client=`` a ``LocalCluster`` of 2 worker processes with 1 thread each
    (``open_client("local:2")``, what ``--cluster local:2`` starts): the scan and every pass run
    as tasks on the workers, which read the files themselves. The cluster's start-up is timed
    apart (``startup_s``); ``wall_s`` is the fit.

Reported: the wall-time ratio cluster / single (target <= 1.25x), peak RSS of the driver and of
each worker, and the agreement of the results (largest relative singular-value difference and
the largest principal angle between the two component subspaces). From the cluster's task
stream: the seconds each kind of task took, per file, per row or per tile, the per-block costs
``docs/scale.md`` projects from.

    python benchmarks/bench_cluster_fit.py --n 10000 --solvers auto randomized --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, peak_rss_gb

RESULTS = Path(__file__).resolve().parent / "results" / "bench_cluster_fit.jsonl"


def _worker_peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _task_costs(stream: list[dict]) -> dict:
    """Seconds of compute per kind of task (key ``w2wkit-KIND-...``) and their count."""
    out: dict[str, dict[str, float]] = {}
    for rec in stream:
        key = str(rec.get("key", ""))
        if not key.startswith("w2wkit-"):
            continue
        kind = key.split("-")[1]
        secs = sum(
            s["stop"] - s["start"] for s in rec.get("startstops", ()) if s["action"] == "compute"
        )
        slot = out.setdefault(kind, {"tasks": 0, "seconds": 0.0})
        slot["tasks"] += 1
        slot["seconds"] += secs
    return out


def worker(args: argparse.Namespace) -> None:
    from w2wkit.collection import Collection
    from w2wkit.space import WeightSpace

    k = args.k
    out: dict = {"mode": args.worker, "solver": args.solver}
    space = WeightSpace(k, solver=args.solver, random_state=0)
    if args.worker == "single":
        t0 = time.perf_counter()
        space.fit(Collection(args.folder))
        out["wall_s"] = time.perf_counter() - t0
        out["peak_rss_gb"] = peak_rss_gb()
    else:
        from distributed import get_task_stream

        from w2wkit.cluster import open_client

        t0 = time.perf_counter()
        with open_client("local:2") as client:
            out["startup_s"] = time.perf_counter() - t0
            with get_task_stream(client) as ts:
                t1 = time.perf_counter()
                space.fit(Collection(args.folder), client=client)
                out["wall_s"] = time.perf_counter() - t1
            out["peak_rss_gb"] = peak_rss_gb()
            out["worker_peak_rss_gb"] = sorted(client.run(_worker_peak_rss_gb).values())
            out["task_costs"] = _task_costs(ts.data)
    out["solver_used"] = space.info_["solver_used"]
    out["n_passes"] = space.info_["n_passes"]
    out["timings"] = space.info_["timings"]
    np.save(args.save, space.components_)
    np.save(args.save.replace(".npy", "_sv.npy"), space.singular_values_)
    print(json.dumps(out))


def _run(script: str, argv: list[str]) -> dict:
    import subprocess

    proc = subprocess.run(
        [sys.executable, script, *argv], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"worker failed: {' '.join(argv)}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal angle (rad) between the row spaces of ``a`` and ``b`` (k, d), from
    k x k products only: the cosines are the singular values of ``La^-1 A B^T Lb^-T``."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    la = np.linalg.cholesky(a64 @ a64.T)
    lb = np.linalg.cholesky(b64 @ b64.T)
    m = np.linalg.solve(la, np.linalg.solve(lb, (a64 @ b64.T).T).T)
    cos = np.linalg.svd(m, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - float(np.min(cos)) ** 2)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--k", type=int, default=None, help="default min(1000, N - 1)")
    p.add_argument("--solvers", nargs="+", default=["auto"])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "w2w_cluster")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--worker", choices=["single", "cluster"])
    p.add_argument("--folder", default=None)
    p.add_argument("--solver", default="auto")
    p.add_argument("--save", default=None)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from _kohya_synth import write_factor_collection

    n = args.n
    k = args.k or min(1000, n - 1)
    folder = args.data_dir / f"n{n}"
    t0 = time.perf_counter()
    write_factor_collection(folder, n, k)
    gen_s = time.perf_counter() - t0
    scratch = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    script = str(Path(__file__).resolve())
    try:
        for solver in args.solvers:
            for r in range(args.rounds):
                runs = {}
                for mode in ("single", "cluster"):
                    save = str(scratch / f"{mode}.npy")
                    argv = ["--worker", mode, "--folder", str(folder), "--k", str(k)]
                    argv += ["--solver", solver, "--save", save]
                    runs[mode] = _run(script, argv)
                    runs[mode]["load_after"] = os.getloadavg()[0]
                ca, cb = (np.load(scratch / f"{m}.npy") for m in ("single", "cluster"))
                sa, sb = (np.load(scratch / f"{m}_sv.npy") for m in ("single", "cluster"))
                record = {
                    "bench": "cluster_fit",
                    "n": n,
                    "d": 99_648,
                    "k": k,
                    "solver": solver,
                    "round": r,
                    "single": runs["single"],
                    "cluster": runs["cluster"],
                    "ratio_wall": runs["cluster"]["wall_s"] / runs["single"]["wall_s"],
                    "ratio_wall_with_startup": (
                        runs["cluster"]["wall_s"] + runs["cluster"]["startup_s"]
                    )
                    / runs["single"]["wall_s"],
                    "sv_max_rel_diff": float(np.max(np.abs(sb / sa - 1.0))),
                    "sv_mean_rel_diff": float(np.mean(np.abs(sb / sa - 1.0))),
                    "subspace_angle_rad": _angle(ca, cb),
                    # the top half: singular values well apart from the noise floor at k
                    "subspace_angle_top_half_rad": _angle(ca[: k // 2], cb[: k // 2]),
                    "generate_s": gen_s,
                    "machine": machine(),
                }
                del ca, cb
                print(json.dumps(record), flush=True)
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                with open(RESULTS, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
