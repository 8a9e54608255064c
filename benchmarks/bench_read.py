"""Read many rank-1 SD1.5-layout kohya LoRAs: w2wkit (validating) vs a plain safetensors loop.

w2wkit checks every header with the ``safetensors`` package's own parser and
its own rules, once per tensor layout (files of one training run share it;
metadata is checked per file); the last case empties that cache before every
file, so each header is parsed twice (cold).

Each LoRA holds ``to_q``/``to_v`` of SD1.5's 64 attention projections at rank 1
(99,648 numbers) with real kohya key names from :mod:`w2wkit.names`. The
anchor is ``safetensors.numpy.load_file`` in a plain loop over the same files,
measured in the same run. One JSON line per case::

    python benchmarks/bench_read.py            # 2,000 files
    python benchmarks/bench_read.py --n 200    # quicker
    python benchmarks/bench_read.py --unique-headers   # every file its own metadata
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_files(folder: Path, n: int, seed: int = 0, unique: bool = False) -> tuple[list[Path], int]:
    """Write ``n`` kohya files; return them and the numbers per file.

    ``unique`` gives every file its own metadata entry (as trainers do), so
    no two headers are equal.
    """
    from w2wkit.adapter import Adapter, LoraLayer
    from w2wkit.formats import write_adapter
    from w2wkit.names import module_table

    table = module_table("sd1")
    modules = [
        p
        for p in table
        if p.startswith("unet.") and ".attn" in p and p.endswith((".to_q", ".to_v"))
    ]
    assert len(modules) == 64, len(modules)
    numbers = sum(table[m][0] + table[m][1] for m in modules)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        layers = {}
        for m in modules:
            out, inp = table[m]
            down = rng.standard_normal((1, inp), dtype=np.float32)
            up = rng.standard_normal((out, 1), dtype=np.float32)
            layers[m] = LoraLayer(down, up, 1.0)
        path = folder / f"lora_{i:05d}.safetensors"
        meta = {"ss_network_dim": "1"}
        if unique:
            meta["ss_output_name"] = f"lora_{i:05d}"
        write_adapter(Adapter(layers, meta), path)
        files.append(path)
    return files, numbers


def time_cases(cases: dict, files: list[Path], repeat: int) -> dict[str, float]:
    """Best wall time of each case over ``repeat`` rounds, cases interleaved per round."""
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeat):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for f in files:
                fn(f)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="number of LoRA files")
    parser.add_argument("--repeat", type=int, default=5, help="passes per case (best kept)")
    parser.add_argument("--dir", help="folder for the files (default: a temporary folder)")
    parser.add_argument(
        "--unique-headers",
        action="store_true",
        help="give every file its own metadata entry (no header is seen twice)",
    )
    args = parser.parse_args(argv)

    import safetensors.numpy as stn

    from w2wkit import stio
    from w2wkit.formats import read_adapter

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files, numbers = make_files(Path(tmp), args.n, unique=args.unique_headers)
        nbytes = sum(os.path.getsize(f) for f in files)
        # warm the page cache and the name caches once
        for f in files[: min(10, len(files))]:
            stn.load_file(str(f))
            read_adapter(f)
        cases = {
            "safetensors.numpy.load_file (anchor)": lambda f: stn.load_file(str(f)),
            "w2wkit read_adapter (validating)": lambda f: read_adapter(f),
            "w2wkit read_adapter (format=kohya, validating)": lambda f: read_adapter(
                f, format="kohya"
            ),
            # every header as if never seen: both header parsers run for each file
            "w2wkit read_adapter (validating, layout cache emptied per file)": lambda f: (
                stio._LAYOUTS.clear(),
                read_adapter(f),
            ),
        }
        anchor = None
        timings = time_cases(cases, files, args.repeat)
        for name, seconds in timings.items():
            fps = len(files) / seconds
            anchor = anchor or fps
            line = {
                "benchmark": "read_kohya_rank1_sd15"
                + ("_unique_headers" if args.unique_headers else ""),
                "case": name,
                "files": len(files),
                "numbers_per_file": numbers,
                "seconds": round(seconds, 4),
                "files_per_s": round(fps, 1),
                "MB_per_s": round(nbytes / seconds / 1e6, 1),
                "ratio_to_anchor": round(fps / anchor, 3),
            }
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
