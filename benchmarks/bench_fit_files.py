"""Benchmark: ``fit`` end to end from kohya files, w2wkit vs the script a user would write.

For each N: N rank-1 SD1.5 kohya LoRAs (the paper's layout, d = 99,648) are
written to a folder (``_kohya_synth.write_factor_collection``: a power law that
flattens into noise around k, plus a shared initialisation), k = min(1000, N-1).
Two contenders run in fresh processes, in interleaved rounds:

``w2wkit``
    ``WeightSpace(k).fit(Collection(folder), profile=True)`` (what ``w2wkit fit
    DIR -k K --profile`` does, without writing the space): wall time, peak RSS,
    its floor (:mod:`w2wkit.floor`, rates measured in the same process) and the
    singular values.
``user``
    a ``safetensors.numpy.load_file`` loop, ``np.stack``, scikit-learn
    ``PCA(n_components=k, svd_solver="randomized")`` with its defaults.

Accuracy: relative error of the top-k singular values against an exact float64
reference computed once per folder (eigenvalues of the float64 Gram matrix of
the centred rows; w2wkit standardises each coordinate, so its reference is that
of the standardised rows). Ratios are against the user script measured in the
same run; ``speedup_bound`` is the user's time over w2wkit's floor, the most
speed w2wkit's method can show on this machine (where a speed target is above it,
the target is above the hardware, not the code).

    python benchmarks/bench_fit_files.py --n 1000 3000 --rounds 1

Where the user's script cannot fit in memory (30k: its peak is ~3x the rows' size),
``--user-cap-gb 18`` runs it under that address-space cap, so it ends in a recorded
``MemoryError`` (and the number of files it read) instead of swapping the machine;
``--no-reference`` skips the float64 reference, whose N x N Gram and held rows do
not fit there either.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, peak_rss_gb, rel_errors, run_worker

_USER_FILES_READ = 0


def _user_rows(folder: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    global _USER_FILES_READ
    files = sorted(folder.glob("*.safetensors"))
    rows = []
    for f in files:
        t = load_file(str(f))
        rows.append(np.concatenate([t[key].ravel() for key in sorted(t) if "alpha" not in key]))
        _USER_FILES_READ += 1
    return np.stack(rows)


def worker_user(folder: Path, k: int) -> dict:
    import os
    import resource

    import safetensors.numpy  # noqa: F401  (loaded before the cap)
    from sklearn.decomposition import PCA

    cap = os.environ.get("W2W_USER_CAP_GB")
    if cap:  # an address-space cap: a script that cannot fit fails fast, not by swapping
        limit = int(float(cap) * 1e9)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    t = time.perf_counter()
    try:
        x = _user_rows(folder)
        pca = PCA(n_components=k, svd_solver="randomized", random_state=0).fit(x)
    except MemoryError:
        return {
            "failed": f"MemoryError under a {cap} GB address-space cap",
            "wall_s": time.perf_counter() - t,
            "peak_rss_gb": peak_rss_gb(),
            "files_read": _USER_FILES_READ,
        }
    wall = time.perf_counter() - t
    return {"wall_s": wall, "peak_rss_gb": peak_rss_gb(), "sv": pca.singular_values_.tolist()}


def worker_w2wkit(folder: Path, k: int, row_cache: bool = True) -> dict:
    from w2wkit.collection import Collection
    from w2wkit.space import WeightSpace

    t = time.perf_counter()
    space = WeightSpace(k, row_cache=row_cache).fit(Collection(folder))
    wall = time.perf_counter() - t
    rss = peak_rss_gb()
    prof = space._profile(Collection(folder))  # rates measured after the timed fit
    return {
        "wall_s": wall,
        "peak_rss_gb": rss,
        "sv": space.singular_values_.tolist(),
        "solver": space.info_["solver_used"],
        "rows_from": space.info_.get("rows_from"),
        "floor_s": prof["floor_seconds"],
        "profile": prof,
    }


def worker_delta(folder: Path, k: int) -> dict:
    import shutil
    import tempfile

    from w2wkit.collection import Collection
    from w2wkit.space import WeightSpace

    t = time.perf_counter()
    space = WeightSpace(k, representation="delta").fit(Collection(folder))
    wall = time.perf_counter() - t
    rss = peak_rss_gb()
    prof = space._profile(Collection(folder))
    # save and load (factor stacks streamed to and from the arrays file, float32), when
    # the disk holds the saved stacks
    fac = space.delta_
    stack_bytes = sum(fac.factor_bytes(m) for m in fac.modules)
    free = shutil.disk_usage(folder.parent).free
    base = {
        "wall_s": wall,
        "peak_rss_gb": rss,
        "sv": space.singular_values_.tolist(),
        "floor_s": prof["floor_seconds"],
        "profile": prof,
        "solver": space.info_["solver_used"],
        "kernel_dtypes": sorted({fac.kernel_dtype(m) for m in fac.modules}),
        "max_cancel": max(fac.cancel.values()),
        "spilled_gb": fac.spill.spilled_bytes / 1e9 if fac.spill is not None else None,
        "read_from_files_segments": len(fac.spill.sources) if fac.spill is not None else 0,
    }
    if stack_bytes > 0.8 * free:
        base["save_skipped"] = (
            f"the float32 stacks ({stack_bytes / 1e9:.1f} GB) do not fit the free disk "
            f"({free / 1e9:.1f} GB)"
        )
        return base
    out = Path(tempfile.mkdtemp(prefix="w2w-bench-space-", dir=folder.parent))
    try:
        t = time.perf_counter()
        space.save(out / "space")
        save_s = time.perf_counter() - t
        t = time.perf_counter()
        back = WeightSpace.load(out / "space")
        load_s = time.perf_counter() - t
        saved_gb = (out / "space" / "arrays.safetensors").stat().st_size / 1e9
        del back
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        **base,
        "save_s": save_s,
        "load_s": load_s,
        "saved_gb": saved_gb,
        "peak_rss_after_save_load_gb": peak_rss_gb(),
    }


def delta_subset_error(folder: Path, n_sub: int, k: int) -> float:
    """Max relative singular-value error of a delta fit on the first ``n_sub`` files
    against the SVD of their materialised, per-layer scaled deltas (float64)."""
    from w2wkit.collection import Collection
    from w2wkit.formats.registry import read_adapter
    from w2wkit.space import WeightSpace

    files = sorted(folder.glob("*.safetensors"))[:n_sub]
    space = WeightSpace(k, representation="delta").fit(Collection(files))
    ads = [read_adapter(f) for f in files]
    # the materialised kernel, one module at a time (a module's dense deltas in memory)
    gram = np.zeros((len(ads), len(ads)))
    for m in space.delta_modules_:
        x = np.stack([ad.layers[m].delta().astype(np.float64).ravel() for ad in ads])
        x -= x.mean(0)
        gram += (x @ x.T) / ((x**2).sum() / x.size)
        del x
    w = np.linalg.eigvalsh(gram)[::-1][:k]
    s = np.sqrt(np.clip(w, 0, None))
    return float(np.max(np.abs(space.singular_values_ - s) / s))


def reference(folder: Path, k: int) -> dict:
    """Exact float64 singular values of the centred and of the standardised rows (cached)."""
    cache = folder / f"reference_k{k}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from w2wkit.collection import Collection

    rows = Collection(folder).scan_factors(in_memory=True)
    x = rows.data
    n = x.shape[0]
    mean = rows.mean
    std = np.sqrt(rows.var)
    out = {}
    for name, scale in (("centred", None), ("standardised", std)):
        g = np.zeros((n, n))
        # float64 Gram in column stripes (bounded memory): G += Xc[:, j] Xc[:, j]^T
        for lo in range(0, x.shape[1], 4096):
            blk = x[:, lo : lo + 4096].astype(np.float64) - mean[lo : lo + 4096]
            if scale is not None:
                blk /= np.maximum(scale[lo : lo + 4096], 1e-30)
            g += blk @ blk.T
        w = np.linalg.eigvalsh(g)[::-1][:k]
        out[name] = np.sqrt(np.clip(w, 0, None)).tolist()
    cache.write_text(json.dumps(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="*", default=[1000, 3000])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--root", type=Path, default=Path("/tmp/w2w-bench-fit"))
    ap.add_argument("--worker", choices=("user", "w2wkit", "delta"))
    ap.add_argument("--delta", type=int, nargs="*", default=[], help="delta case sizes")
    ap.add_argument("--delta-ranks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument(
        "--delta-ffn", action="store_true", help="delta case: attention and feed-forward linears"
    )
    ap.add_argument("--delta-dtype", default="F32", choices=("F32", "F16"))
    ap.add_argument("--workers", type=int, default=1, help="processes writing the files")
    ap.add_argument("--delete", action="store_true", help="delete the delta files after")
    ap.add_argument("--user-cap-gb", type=float, help="address-space cap of the user's script (GB)")
    ap.add_argument("--no-reference", action="store_true", help="skip the exact float64 reference")
    ap.add_argument("--folder", type=Path)
    ap.add_argument("--k", type=int)
    ap.add_argument(
        "--no-row-cache", action="store_true", help="w2wkit reads the files on every pass"
    )
    a = ap.parse_args()
    if a.worker:
        fn = {"user": worker_user, "w2wkit": worker_w2wkit, "delta": worker_delta}[a.worker]
        extra = {"row_cache": False} if a.worker == "w2wkit" and a.no_row_cache else {}
        print(json.dumps(fn(a.folder, a.k, **extra)))
        return
    from _kohya_synth import write_delta_collection, write_factor_collection

    for n in a.delta:
        k = min(1000, n - 1)
        tag = ("_ffn" if a.delta_ffn else "") + ("_f16" if a.delta_dtype == "F16" else "")
        folder = a.root / f"delta_{n}_r{'-'.join(map(str, a.delta_ranks))}{tag}"
        t = time.perf_counter()
        write_delta_collection(
            folder,
            n,
            ranks=tuple(a.delta_ranks),
            attention_only=not a.delta_ffn,
            dtype=a.delta_dtype,
            workers=a.workers,
        )
        gen_s = time.perf_counter() - t
        w = run_worker(__file__, ["--worker", "delta", "--folder", str(folder), "--k", str(k)])
        err = delta_subset_error(folder, 24, 10)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        line = {
            "case": "fit_files_delta",
            "n": n,
            "k": k,
            "ranks": a.delta_ranks,
            "modules": (
                "SD1.5 attention q/k/v/out + feed-forward (160)"
                if a.delta_ffn
                else "SD1.5 attention q/k/v/out (128)"
            ),
            "files_gb": size / 1e9,
            "gen_s": gen_s,
            "w2wkit_s": w["wall_s"],
            "w2wkit_rss_gb": w["peak_rss_gb"],
            "floor_s": w["floor_s"],
            "wall_over_floor": w["wall_s"] / w["floor_s"],
            "subset24_max_rel_sv_err_vs_materialised": err,
            "solver": w["solver"],
            "file_dtype": a.delta_dtype,
            **{
                key: w.get(key)
                for key in (
                    "save_s",
                    "load_s",
                    "saved_gb",
                    "peak_rss_after_save_load_gb",
                    "save_skipped",
                    "kernel_dtypes",
                    "max_cancel",
                    "spilled_gb",
                    "read_from_files_segments",
                )
            },
            "phases": w["profile"]["phases"],
            "rates": w["profile"]["rates"],
            "machine": machine(),
        }
        print(json.dumps(line), flush=True)
        if a.delete:
            shutil.rmtree(folder, ignore_errors=True)

    for n in a.n:
        k = min(1000, n - 1)
        folder = a.root / f"factors_{n}"
        t = time.perf_counter()
        write_factor_collection(folder, n, k, workers=a.workers)
        gen_s = time.perf_counter() - t
        ref = None if a.no_reference else reference(folder, k)
        env = dict(os.environ)
        if a.user_cap_gb:
            env["W2W_USER_CAP_GB"] = str(a.user_cap_gb)
        for r in range(a.rounds):
            res = {}
            for who in ("w2wkit", "user"):
                args = ["--worker", who, "--folder", str(folder), "--k", str(k)]
                if who == "w2wkit" and a.no_row_cache:
                    args.append("--no-row-cache")
                res[who] = run_worker(__file__, args, env=env)
            w, u = res["w2wkit"], res["user"]
            e_w = e_u = None
            if ref is not None:
                e_w = rel_errors(np.array(w["sv"]), np.array(ref["standardised"]))
                if "sv" in u:
                    e_u = rel_errors(np.array(u["sv"]), np.array(ref["centred"]))
            done = "failed" not in u
            line = {
                "case": "fit_files_factors",
                "n": n,
                "d": 99_648,
                "k": k,
                "round": r,
                "gen_s": gen_s,
                "w2wkit_s": w["wall_s"],
                "user_s": u["wall_s"],
                "user_failed": u.get("failed"),
                "user_files_read": u.get("files_read"),
                "speedup": u["wall_s"] / w["wall_s"] if done else None,
                "w2wkit_rss_gb": w["peak_rss_gb"],
                "user_rss_gb": u["peak_rss_gb"],
                "rss_ratio": w["peak_rss_gb"] / u["peak_rss_gb"] if done else None,
                "w2wkit_err": e_w,
                "user_err": e_u,
                "accuracy_gain": (
                    e_u["mean_rel_err"] / max(e_w["mean_rel_err"], 1e-300) if e_u else None
                ),
                "floor_s": w["floor_s"],
                "wall_over_floor": w["wall_s"] / w["floor_s"],
                # the most speed w2wkit's method can have here: the user's time over the
                # floor measured in the same run (a fit cannot beat its floor)
                "speedup_bound": u["wall_s"] / w["floor_s"] if done else None,
                "solver": w["solver"],
                "rows_from": w.get("rows_from"),
                "phases": w["profile"]["phases"],
                "rates": w["profile"]["rates"],
                "machine": machine(),
            }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
