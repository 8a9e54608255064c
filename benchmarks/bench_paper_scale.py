"""Benchmark: the randomized solver out of core at the paper's scale.

N = 64,974 models x d = 99,648 numbers (rank-1 LoRAs on to_q/to_v of every
attention module of the SD1.5 UNet, the weights2weights layout), k = 1000.
The synthetic matrix (``_synth.PowerLawData``: power law + noise floor around
k) is written as LoRA-layout shard files: one safetensors file per 1024 models
holding, per module in layout order, the stacked factors
``base_model.model.<module>.lora_A.weight`` (models, 1, in) and ``lora_B``
(models, out, 1) -- the official release's flattening order (down, mid, up
blocks; A then B). The solver reads them back shard by shard (plain reads, no
memory map), standardises nothing (centring happens in a first pass, as the
WeightSpace does), and runs ``fit_pca(solver="randomized")``.

Reported (JSON lines): wall time and peak RSS (VmHWM) of the run, passes over
the data, accuracy against a run of the same solver with twice the passes
(the same seed and state continued: identical to a separate run), and the
floor measured in the same run: ``sum over passes of max(time to read the data
once, time of that pass's products at the measured GFLOP/s)``.

    python benchmarks/bench_paper_scale.py                  # full size, 26 GB on disk
    python benchmarks/bench_paper_scale.py --n 4000 --k 200 # small
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import column_mean, gemm_gflops, machine, peak_rss_gb, rel_errors, reset_peak_rss
from _synth import GEN_BLOCK, PowerLawData

CROSS_DIM = 768


def sd15_lora_layout() -> list[tuple[str, int, int]]:
    """(module, in_features, out_features) of to_q/to_v in SD1.5's UNet attention blocks."""
    blocks: list[tuple[str, int]] = []
    for i, c in enumerate((320, 640, 1280)):
        blocks += [(f"down_blocks.{i}.attentions.{j}", c) for j in range(2)]
    blocks.append(("mid_block.attentions.0", 1280))
    for i, c in zip((1, 2, 3), (1280, 640, 320), strict=True):
        blocks += [(f"up_blocks.{i}.attentions.{j}", c) for j in range(3)]
    layout = []
    for name, c in blocks:
        tb = f"{name}.transformer_blocks.0"
        layout += [
            (f"{tb}.attn1.to_q", c, c),
            (f"{tb}.attn1.to_v", c, c),
            (f"{tb}.attn2.to_q", c, c),
            (f"{tb}.attn2.to_v", CROSS_DIM, c),
        ]
    return layout


def slots() -> list[tuple[str, tuple[int, int], int, int]]:
    """(key, per-model shape, column offset, size) in flattening order: A then B per module."""
    out = []
    offset = 0
    for module, fin, fout in sd15_lora_layout():
        for key, shape in (
            (f"base_model.model.{module}.lora_A.weight", (1, fin)),
            (f"base_model.model.{module}.lora_B.weight", (fout, 1)),
        ):
            size = shape[0] * shape[1]
            out.append((key, shape, offset, size))
            offset += size
    return out


D_PAPER = sum(s[3] for s in slots())
assert D_PAPER == 99_648


def write_shards(folder: Path, n: int, k: int, seed: int) -> float:
    """Write the synthetic collection as shard files; returns seconds."""
    from w2wkit.stio import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    gen = PowerLawData(n, D_PAPER, k, seed=seed)
    t = time.perf_counter()
    for b in range(gen.n_blocks()):
        path = folder / f"shard_{b:05d}.safetensors"
        if path.exists():
            continue
        z = gen.block(b)
        rows = z.shape[0]
        tensors = {
            key: np.ascontiguousarray(z[:, off : off + size]).reshape(rows, *shape)
            for key, shape, off, size in slots()
        }
        meta = {"rows": f"{b * GEN_BLOCK}-{b * GEN_BLOCK + rows}", "layout": "stacked LoRA factors"}
        write_safetensors(path, tensors, metadata=meta)
        del z, tensors
    return time.perf_counter() - t


def shard_blocks(folder: Path, mean: np.ndarray | None = None):
    """A BlockFn: one row block per shard, assembled from its per-module tensors."""
    files = sorted(folder.glob("shard_*.safetensors"))
    layout = {key: (off, size) for key, _, off, size in slots()}

    def blocks() -> Iterator[np.ndarray]:
        for path in files:
            with open(path, "rb", buffering=0) as fh:
                (hlen,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(hlen))
                header.pop("__metadata__", None)
                base = 8 + hlen
                rows = next(iter(header.values()))["shape"][0]
                block = np.empty((rows, D_PAPER), dtype=np.float32)
                order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
                for key, entry in order:
                    off, size = layout[key]
                    lo, hi = entry["data_offsets"]
                    tmp = np.empty((rows, size), dtype=np.float32)
                    view = memoryview(tmp).cast("B")
                    got = 0
                    while got < hi - lo:
                        r = os.preadv(fh.fileno(), [view[got:]], base + lo + got)
                        if not r:
                            raise OSError(f"{path}: short read")
                        got += r
                    block[:, off : off + size] = tmp
            if mean is not None:
                block -= mean
            yield block

    return blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=64_974)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-iter", type=int, default=None, help="full passes (default: solver's)")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--data-dir", default=os.environ.get("W2W_BENCH_DIR", "/tmp/w2w_bench"))
    ap.add_argument("--keep", action="store_true", help="keep the shard files")
    ap.add_argument("--no-reference", action="store_true", help="skip the twice-the-passes run")
    args = ap.parse_args()

    from w2wkit import solvers

    q = solvers.DEFAULT_N_ITER if args.n_iter is None else args.n_iter
    q_ref = 2 * q + 1  # (q + 1) reads -> 2 (q + 1) reads
    folder = Path(args.data_dir) / f"paper_{args.n}x{D_PAPER}_k{args.k}_s{args.seed}"
    base = {
        "bench": "paper_scale",
        "n": args.n,
        "d": D_PAPER,
        "k": args.k,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "machine": machine(),
        "data": "LoRA-layout safetensors shards (1024 models each, 128 tensors)",
    }
    write_s = write_shards(folder, args.n, args.k, args.seed)
    data_gb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e9
    print(json.dumps({**base, "case": "write", "seconds": write_s, "data_gb": data_gb}), flush=True)

    width = args.block_size or solvers.default_block_size(args.k, q)
    gflops = gemm_gflops(D_PAPER, width)
    import gc

    gc.collect()
    rss_reset = reset_peak_rss()  # the peak of writing the shards is not the solver's

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    mean = column_mean(shard_blocks(folder), args.n, D_PAPER)
    read_s = time.perf_counter() - t0  # one pass: read + assemble (+ a column sum)

    def progress(stage: str, done: int, total: int) -> None:
        if done == total:  # one line per pass, on stderr
            print(f"{time.perf_counter() - t0:8.1f}s {stage}", file=sys.stderr, flush=True)

    stream = solvers._Stream(shard_blocks(folder, mean), args.n, D_PAPER, progress)
    runs = solvers._randomized_checkpoints(
        stream,
        args.k,
        [q] if args.no_reference else [q, q_ref],
        args.seed,
        solvers._ops("cpu"),
        block_size=args.block_size,
    )
    res = next(runs)
    wall = time.perf_counter() - t0
    rss = peak_rss_gb()
    passes = res.n_passes + 1  # + the mean pass
    prod_s = 2.0 * args.n * D_PAPER * width / (gflops * 1e9)  # one product with a block
    # q full passes (Z and Z^T), one half pass (Z), the mean pass (read only)
    floor = q * max(read_s, 2 * prod_s) + max(read_s, prod_s) + read_s
    line = {
        **base,
        "case": "w2wkit randomized",
        "wall_s": wall,
        "peak_rss_gb": rss,
        "peak_rss_reset_before_run": rss_reset,
        "passes": passes,
        "n_iter": q,
        "block_size": res.info["block_size"],
        "krylov_dim": res.info["krylov_dim"],
        "read_pass_s": read_s,
        "gemm_gflops": gflops,
        "product_s": prod_s,
        "floor_s": floor,
        "floor_issue_formula_s": passes * max(read_s, 2 * prod_s),
        "wall_over_floor": wall / floor,
        "loadavg_1min_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "data_gb": data_gb,
    }
    print(json.dumps(line), flush=True)
    if not args.no_reference:
        t1 = time.perf_counter()
        ref = next(runs)
        ref_wall = wall + (time.perf_counter() - t1)
        errs = rel_errors(res.singular_values, ref.singular_values)
        captured = float(np.sum(res.scores.astype(np.float64) ** 2))
        captured_ref = float(np.sum(ref.scores.astype(np.float64) ** 2))
        print(
            json.dumps(
                {
                    **base,
                    "case": "w2wkit randomized vs twice the passes",
                    "anchor": f"same solver, n_iter={q_ref} ({ref.n_passes + 1} passes)",
                    "anchor_wall_s_if_run_alone": ref_wall,
                    "anchor_passes": ref.n_passes + 1,
                    **errs,
                    "captured_variance_ratio": captured / captured_ref,
                    "explained_variance_ratio_k": captured / ((res.total_variance) * (args.n - 1)),
                    "peak_rss_gb_with_anchor": peak_rss_gb(),
                }
            ),
            flush=True,
        )
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
