"""The factors scan alone (read, hash, check, copy, statistics): native helper vs Python path.

``Collection(folder).scan_factors(...)`` is the read phase of ``w2wkit fit``. This
times it in fresh processes, the native helper (``w2wkit/_native/scan.c``) and the
Python path (``W2WKIT_NATIVE=0``: the same code with the helper turned off, the
scan as it was before the helper) interleaved round by round, on the same files,
against two bounds measured in the same process:

``floor``
    :meth:`w2wkit.floor.Rates.file_seconds`, the fit's read floor: the slower of the
    page-cache read (one thread) and the SHA-256 of every byte spread over the cores.
``cpu bound``
    :meth:`w2wkit.floor.Rates.file_cpu_seconds`: the page-cache copy and the hash of
    every byte, plus the first touch of the rows held in memory, spread over the cores
    (on a machine whose cores copy the page cache themselves the floor's overlap of the
    read and the hash cannot happen).

Files: rank-1 SD1.5-layout kohya LoRAs from ``benchmarks/_kohya_synth.py`` (each with
metadata of its own), warmed into the page cache before each run (``--cold``: evicted
from it; the floor then counts the share the scan found cold at the disk's rate, measured
in the same process). One JSON line per run::

    python benchmarks/bench_scan.py --folder /tmp/w2w-bench-fit/n1000 --target memory
    python benchmarks/bench_scan.py --folder /tmp/w2w-bench-fit/n10000 --target files
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_worker


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def worker(folder: Path, target: str, cold: bool = False) -> dict:
    from w2wkit.collection import Collection
    from w2wkit.floor import measure_rates
    from w2wkit.native import native

    files = sorted(folder.glob("*.safetensors"))
    if cold:  # the page cache holds none of the files
        evict(files)
    else:  # warm: the page cache holds every file
        for f in files:
            f.read_bytes()
    coll = Collection(folder)
    kwargs = {"memory": {"in_memory": True}, "files": {"in_files": True}}.get(target, {})
    t0, c0 = time.perf_counter(), time.process_time()
    rows = coll.scan_factors(**kwargs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n, d = rows.n_rows, rows.dim
    source = rows.source
    rows.close()
    size = float(sum(f.stat().st_size for f in files))
    fast = coll._fast_reader
    share = (fast.cold_fraction() or 0.0) if fast is not None else 0.0
    rates = measure_rates(files, rows=n, disk=share > 0)
    floor = rates.file_seconds(size, cold=share)
    held = 4.0 * n * d if source == "memory" else 0.0
    bound = rates.file_cpu_seconds(size, cold=share, held_bytes=held)
    return {
        "path": "native" if native() is not None else "python",
        "n": n,
        "d": d,
        "target": source,
        "file_bytes": size,
        "seconds": wall,
        "cpu_seconds": cpu,
        "floor_seconds": floor,
        "cpu_bound_seconds": bound,
        "over_floor": wall / floor,
        "over_cpu_bound": wall / bound,
        "cold_share": share,
        "rates": rates.as_dict(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--target", choices=("memory", "files", "cache"), default="memory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="evict the files before each run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.folder, a.target, a.cold)))
        return
    for r in range(a.rounds):
        for path in ("native", "python"):
            env = {**os.environ, "W2WKIT_NATIVE": "1" if path == "native" else "0"}
            args = ["--worker", "--folder", str(a.folder), "--target", a.target]
            rec = run_worker(__file__, args + (["--cold"] if a.cold else []), env=env)
            rec.update({"benchmark": "scan", "round": r, "date": time.strftime("%Y-%m-%d")})
            rec["cold"] = a.cold
            assert rec["path"] == path, rec
            print(
                f"{path:7s} n={rec['n']} {rec['target']}: {rec['seconds']:.2f} s "
                f"(cpu {rec['cpu_seconds']:.2f} s) floor {rec['floor_seconds']:.2f} s "
                f"-> {rec['over_floor']:.2f}x, cpu bound {rec['cpu_bound_seconds']:.2f} s "
                f"-> {rec['over_cpu_bound']:.2f}x",
                flush=True,
            )
            if a.out is not None:
                with a.out.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
