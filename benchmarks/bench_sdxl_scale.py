"""Benchmark: an SDXL-size space on this machine, single process, out of core.

N rank-1 LoRAs on ``to_q``/``to_v`` of every attention module of the SDXL UNet
(280 modules, d = 725,760 numbers per model, 2.9 MB a file) are written as
kohya files with the real SDXL module names (sgm numbering,
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, as kohya-ss
writes SDXL LoRAs). Their flattened factors are rows of a power law that
flattens into noise around k (the hard case, as in ``_synth.PowerLawData``, but
with a sparse random right factor: a dense one costs as much to generate as the
fit at this d) plus a shared initialisation ten times the rows' size (the common offset
of real LoRA factors).

Cases, each in a fresh process, one after the other:

``w2wkit``
    ``WeightSpace(k).fit(Collection(folder), profile=True)`` (what ``w2wkit fit
    DIR -k K --profile`` does, without writing the space): wall time, peak RSS
    (VmHWM), passes, solver, and the floor of the same fit at this machine's
    rates measured in the same process right after it (:mod:`w2wkit.floor`:
    file read, GEMM/SYRK, eigensolver).
``sklearn``
    The script a user would write (``safetensors.numpy.load_file`` loop,
    ``np.stack``, ``PCA(k, svd_solver="randomized")``) under an address-space
    cap (``RLIMIT_AS``, default 8 GB): it needs the whole matrix in memory;
    what happens is reported (the error, after how many files and seconds).
``reference``
    Accuracy. The default solver at this size is ``gram`` (N x N Gram matrix,
    out of core a column chunk at a time), which has no pass count to double, so the anchor
    is stronger than a twice-the-passes run: the exact top-k singular values of
    the same standardised rows from a float64 Gram matrix (column stripes of
    the row cache), compared with w2wkit's.

``--cluster SPEC`` passes ``client=`` to ``WeightSpace.fit`` (``w2wkit fit
--cluster``) and reports each worker's peak RSS. The singular values of every
``w2wkit`` case are kept next to the data (``--keep``): a later case on the same
files is compared with the earlier ones, and the reference with all of them
(``--skip w2wkit`` runs only scikit-learn and the reference).

    python benchmarks/bench_sdxl_scale.py --n 5000            # 14.5 GB of files
    python benchmarks/bench_sdxl_scale.py --n 10000           # 29 GB (+29 GB row cache)

The generated files (and row caches) are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, peak_rss_gb, rel_errors

ROWS_PER_BLOCK = 512
COL_CHUNK = 32_768


def sdxl_generator(n: int, d: int, k: int, seed: int = 0, nnz: int = 4):
    """Row blocks of ``U diag(s) V^T + E + init`` with a sparse random ``V^T``.

    ``s_j = j^-0.5`` for ``j <= 1.5 k``; ``V^T`` has ``nnz`` Gaussian entries per
    column (about ``nnz d / r`` per row, so its rows are nearly orthonormal) -- a
    dense ``V^T`` would cost as many flops to generate as the fit itself at this
    ``d``; uniform noise whose top singular value is about ``s_k``; ``init`` a
    shared offset ten times the rows' typical entry. Returns ``block(b) -> (rows, d)``
    float32 and the number of blocks.
    """
    r = min(int(1.5 * k), n, d)
    s = (np.arange(1, r + 1, dtype=np.float64) ** -0.5).astype(np.float32)
    eps = np.float32(float(s[min(k, r) - 1]) / (np.sqrt(n) + np.sqrt(d)))
    from scipy import sparse

    rng0 = np.random.default_rng([seed, 2])
    idx = rng0.integers(0, r, size=(nnz, d))
    val = rng0.standard_normal((nnz, d), dtype=np.float32) * np.float32(np.sqrt(r / (nnz * d)))
    cols = np.broadcast_to(np.arange(d), (nnz, d))
    # V (d, r), row c holding column c of V^T
    v = sparse.csr_matrix((val.ravel(), (cols.ravel(), idx.ravel())), shape=(d, r))
    del idx, val, cols
    typical = float(np.sqrt(np.sum(s.astype(np.float64) ** 2) / (n * d) + float(eps) ** 2))
    init = np.random.default_rng([seed, 7]).standard_normal(d).astype(np.float32)
    init *= np.float32(10 * typical)

    def block(b: int) -> np.ndarray:
        lo = b * ROWS_PER_BLOCK
        m = min(ROWS_PER_BLOCK, n - lo)
        rng = np.random.default_rng([seed, 1, b])
        u = rng.standard_normal((m, r), dtype=np.float32)
        u *= s * np.float32(1.0 / np.sqrt(n))
        z = rng.random((m, d), dtype=np.float32)
        z -= np.float32(0.5)
        z *= np.float32(eps * np.sqrt(12.0))
        z += init
        ut = np.ascontiguousarray(u.T)
        for c in range(0, d, COL_CHUNK):
            z[:, c : c + COL_CHUNK] += (v[c : c + COL_CHUNK] @ ut).T
        return z

    return block, -(-n // ROWS_PER_BLOCK)


def write_collection(folder: Path, n: int, k: int, seed: int = 0) -> float:
    """Write ``n`` SDXL rank-1 kohya files (skips existing ones); returns seconds."""
    from rich.progress import Progress

    from w2wkit.adapter import Adapter, LoraLayer
    from w2wkit.formats import write_adapter
    from w2wkit.synthetic import sdxl_qv_shapes

    shapes = sdxl_qv_shapes()
    d = sum(a + b for a, b in shapes.values())
    folder.mkdir(parents=True, exist_ok=True)
    block, n_blocks = sdxl_generator(n, d, k, seed)
    meta = {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": "1"}
    t = time.perf_counter()
    with Progress(transient=True) as bar:
        task = bar.add_task("writing SDXL kohya files", total=n)
        for b in range(n_blocks):
            paths = [
                folder / f"sdxl_{i:05d}.safetensors"
                for i in range(b * ROWS_PER_BLOCK, min(n, (b + 1) * ROWS_PER_BLOCK))
            ]
            if all(p.exists() for p in paths):
                bar.advance(task, len(paths))
                continue
            z = block(b)
            for row, path in zip(z, paths, strict=True):
                layers, off = {}, 0
                for module, (out_f, in_f) in shapes.items():
                    down = row[off : off + in_f].reshape(1, in_f)
                    off += in_f
                    up = row[off : off + out_f].reshape(out_f, 1)
                    off += out_f
                    layers[module] = LoraLayer(down=down, up=up, alpha=1.0)
                write_adapter(Adapter(layers, dict(meta)), path, format="kohya", overwrite=True)
                bar.advance(task)
            del z
    return time.perf_counter() - t


# ------------------------------------------------------------------ workers


def worker_w2wkit(folder: Path, k: int, cache: Path, cluster: str | None) -> dict:
    from w2wkit.collection import Collection
    from w2wkit.space import WeightSpace

    space = WeightSpace(k)
    kwargs = {}
    if cluster:
        if "client" not in inspect.signature(space.fit).parameters:
            raise SystemExit(
                "--cluster: WeightSpace.fit takes no client= in this checkout "
                "(the Dask fit of issue 21 is not merged); run without --cluster"
            )
        from w2wkit.cluster import open_client

        with open_client(cluster) as client:
            kwargs["client"] = client
            out = _fit(space, Collection(folder, cache_dir=cache), kwargs)
            # peak resident memory of every worker process (the driver's is peak_rss_gb)
            out["worker_peak_rss_gb"] = sorted(client.run(peak_rss_gb).values())
            return out
    return _fit(space, Collection(folder, cache_dir=cache), kwargs)


def _fit(space, coll, kwargs) -> dict:
    t = time.perf_counter()
    space.fit(coll, profile=True, progress=True, **kwargs)
    prof = space.info_["profile"]
    wall = space.info_["wall_seconds"]
    return {
        "wall_s": wall,
        "wall_incl_rates_s": time.perf_counter() - t,
        "peak_rss_gb": peak_rss_gb(),
        "solver": space.info_["solver_used"],
        "n_passes_solver": space.info_["n_passes"],
        "floor_s": prof["floor_seconds"],
        "wall_over_floor": wall / prof["floor_seconds"],
        "phases": prof["phases"],
        "rates": prof["rates"],
        "sv": space.singular_values_.tolist(),
    }


def worker_sklearn(folder: Path, k: int, cap_gb: float) -> dict:
    cap = int(cap_gb * 1e9)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    files = sorted(folder.glob("*.safetensors"))
    t = time.perf_counter()
    done = 0
    try:
        from safetensors.numpy import load_file
        from sklearn.decomposition import PCA

        rows = []
        for f in files:
            tens = load_file(str(f))
            rows.append(
                np.concatenate([tens[key].ravel() for key in sorted(tens) if "alpha" not in key])
            )
            done += 1
        x = np.stack(rows)
        del rows
        pca = PCA(n_components=k, svd_solver="randomized", random_state=0).fit(x)
        return {
            "outcome": "finished",
            "wall_s": time.perf_counter() - t,
            "peak_rss_gb": peak_rss_gb(),
            "sv": pca.singular_values_.tolist(),
        }
    except MemoryError as exc:
        return {
            "outcome": f"MemoryError ({exc or 'allocation failed'})",
            "files_read": done,
            "of_files": len(files),
            "seconds_until_error": time.perf_counter() - t,
            "peak_rss_gb": peak_rss_gb(),
        }


def reference(folder: Path, k: int, cache: Path) -> dict:
    """Exact float64 singular values of the standardised rows (w2wkit's preprocessing)."""
    from w2wkit.collection import Collection

    t = time.perf_counter()
    rows = Collection(folder, cache_dir=cache).scan_factors()
    read_s = time.perf_counter() - t
    try:
        # column stripes of the row cache read with one pread per row (a memory map of a
        # cache larger than RAM re-reads it many times over: readahead pages evicted before
        # the next stripe uses them)
        x = rows.data
        n, d = x.shape
        std = np.sqrt(rows.var)
        floor = max(1e-6 * float(np.sqrt(np.mean(rows.var))), float(np.finfo(np.float32).tiny))
        scale = np.maximum(std, floor)
        g = np.zeros((n, n))
        for lo in range(0, d, COL_CHUNK // 2):
            hi = min(d, lo + COL_CHUNK // 2)
            part = x.read_columns(lo, hi) if hasattr(x, "read_columns") else x[:, lo:hi]
            blk = np.asarray(part, dtype=np.float64)
            del part
            blk -= rows.mean[lo:hi]
            blk /= scale[lo:hi]
            g += blk @ blk.T
            del blk
        w = np.linalg.eigvalsh(g)[::-1][:k]
    finally:
        rows.close()
    return {
        "sv": np.sqrt(np.clip(w, 0, None)).tolist(),
        "read_s": read_s,
        "wall_s": time.perf_counter() - t,
        "peak_rss_gb": peak_rss_gb(),
    }


# --------------------------------------------------------------------- main


def _run(args: list[str]) -> dict:
    import subprocess

    proc = subprocess.run(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"outcome": f"process exited {proc.returncode}", "stdout_tail": proc.stdout[-400:]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/w2w_sdxl_bench"))
    ap.add_argument("--sklearn-cap-gb", type=float, default=8.0)
    ap.add_argument("--cluster", default=None, help="local:N | tcp://HOST:PORT | scheduler file")
    ap.add_argument("--skip", nargs="*", default=[], choices=("w2wkit", "sklearn", "reference"))
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--results", type=Path, default=None, help="append the JSON lines here")
    ap.add_argument("--worker", choices=("w2wkit", "sklearn", "reference"))
    a = ap.parse_args()
    folder = a.data_dir / f"sdxl_qv_{a.n}_s{a.seed}"
    cache = a.data_dir / "cache"
    if a.worker:
        cache.mkdir(parents=True, exist_ok=True)
        if a.worker == "w2wkit":
            out = worker_w2wkit(folder, a.k, cache, a.cluster)
        elif a.worker == "sklearn":
            out = worker_sklearn(folder, a.k, a.sklearn_cap_gb)
        else:
            out = reference(folder, a.k, cache)
        print(json.dumps(out), flush=True)
        return

    def emit(line: dict) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if a.results:
            with open(a.results, "a") as fh:
                fh.write(text + "\n")

    base = {
        "bench": "sdxl_scale",
        "n": a.n,
        "k": a.k,
        "d": 725_760,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "machine": machine(),
        "free_disk_gb_before": shutil.disk_usage(a.data_dir.parent).free / 1e9,
    }
    try:
        gen_s = write_collection(folder, a.n, a.k, a.seed)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9
        emit({**base, "case": "write", "seconds": gen_s, "files_gb": size})
        common = ["--n", str(a.n), "--k", str(a.k), "--seed", str(a.seed)]
        common += ["--data-dir", str(a.data_dir)]
        # singular values of each w2wkit run are kept next to the data: a later run (the
        # cluster, the reference) is compared with the earlier ones
        svs = {p.stem[3:]: np.load(p) for p in sorted(a.data_dir.glob(f"sv_{folder.name}_*.npy"))}
        sv = None
        if "w2wkit" not in a.skip:
            load0 = os.getloadavg()[0]
            cl = ["--cluster", a.cluster] if a.cluster else []
            w = _run(["--worker", "w2wkit", *common, *cl])
            sv = w.pop("sv", None)
            tag = f"{folder.name}_{'cluster' if a.cluster else 'single'}"
            line = {
                **base,
                "case": "w2wkit fit" + (f" --cluster {a.cluster}" if a.cluster else ""),
                "loadavg_1min_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
                **w,
            }
            if sv is not None:
                sv = np.array(sv)
                for other, sv_o in svs.items():
                    if other != tag:
                        line[f"sv_max_rel_diff_vs_{other.rsplit('_', 1)[1]}"] = float(
                            np.max(np.abs(sv - sv_o) / sv_o)
                        )
                np.save(a.data_dir / f"sv_{tag}.npy", sv)
                svs[tag] = sv
            emit(line)
        if "sklearn" not in a.skip:
            cap = ["--sklearn-cap-gb", str(a.sklearn_cap_gb)]
            s = _run(["--worker", "sklearn", *common, *cap])
            s.pop("sv", None)
            emit({**base, "case": f"scikit-learn PCA under RLIMIT_AS {a.sklearn_cap_gb} GB", **s})
        if "reference" not in a.skip and svs:
            r = _run(["--worker", "reference", *common])
            ref = r.pop("sv", None)
            for tag, sv_t in svs.items():
                line = {**base, "case": f"accuracy of {tag} vs exact float64 reference", **r}
                if ref is not None:
                    line.update(rel_errors(np.array(sv_t), np.array(ref)))
                    line["captured_variance_ratio"] = float(
                        np.sum(np.square(sv_t)) / np.sum(np.square(ref))
                    )
                emit(line)
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
            for p in a.data_dir.glob(f"sv_{folder.name}_*.npy"):
                p.unlink()
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
