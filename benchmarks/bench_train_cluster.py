"""``w2wkit train --cluster local:2`` vs one process with both cores: models/hour, same run.

The miniature world's base architecture (``_common.world_base``: untrained, the step time
does not depend on the weights), pictures of ``--models`` identities as PNG instance
folders, the world's recipe (rank 1, ``to_q``/``to_v``, 4 pictures per model and step).
Two cases, interleaved ``--rounds`` times in this process, each timed whole (the driver's
checks and picture decoding, the training, the files, the manifest):

- ``one_process``: the anchor, :func:`w2wkit.train` with torch using ``--threads`` (2)
  threads, every model in one batch;
- ``cluster_local2``: :func:`w2wkit.train` with ``client=`` a ``local:2`` cluster (two
  worker processes, one thread each), ``--models / 2`` models per chunk (one chunk per
  worker). The cluster is started and its workers have loaded the pipeline (a warm-up run)
  before the first timed round; the start and that first load are reported apart
  (``cluster_start_s``, ``cluster_cold_run_s``).

The ratio is the one-process time over the cluster time (models/hour of the cluster over
those of the anchor; target >= 0.9). One JSON line per case, appended to
``results/train_cluster.jsonl``::

    python benchmarks/bench_train_cluster.py --steps 20 --models 8 --threads 2
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import machine, world_base


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the anchor")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_cluster.jsonl"))
    a = ap.parse_args()
    rounds = a.rounds
    import numpy as np
    import torch
    from PIL import Image

    from w2wkit.cluster import open_client
    from w2wkit.stio import file_sha256
    from w2wkit.training import Recipe, train
    from w2wkit.world.lora import LoraSettings

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp())
    base, jobs, imgs = world_base(tmp, a.models)
    for j, im in zip(jobs, imgs, strict=True):
        d = tmp / "people" / j.name
        d.mkdir(parents=True)
        for k, pic in enumerate(im):
            Image.fromarray(pic).save(d / f"{k}.png")
    ls = LoraSettings(steps=a.steps, threads=a.threads)
    recipe = Recipe(steps=a.steps, batch=ls.batch, lr=ls.lr, targets=ls.targets)
    warm = Recipe(steps=1, batch=ls.batch, lr=ls.lr, targets=ls.targets)
    per_chunk = max(1, a.models // 2)
    times: dict[str, list[float]] = {"one_process": [], "cluster_local2": []}
    same_files = True
    train(tmp / "people", base, tmp / "warm1", warm, models_per_batch=a.models, device=a.device)
    t0 = time.perf_counter()
    with open_client("local:2") as client:
        start_s = time.perf_counter() - t0
        threads = sorted(set(client.run(torch.get_num_threads).values()))
        t0 = time.perf_counter()
        train(tmp / "people", base, tmp / "warm2", warm, models_per_batch=per_chunk,
              device=a.device, client=client)  # fmt: skip
        cold_s = time.perf_counter() - t0
        for r in range(rounds):
            for case in (
                ("one_process", "cluster_local2")
                if r % 2 == 0
                else ("cluster_local2", "one_process")
            ):
                out = tmp / f"{case}-{r}"
                t0 = time.perf_counter()
                if case == "one_process":
                    train(tmp / "people", base, out, recipe, models_per_batch=a.models,
                          device=a.device)  # fmt: skip
                else:
                    train(tmp / "people", base, out, recipe, models_per_batch=per_chunk,
                          device=a.device, client=client)  # fmt: skip
                times[case].append(time.perf_counter() - t0)
            sha = [
                {p.name: file_sha256(p) for p in (tmp / f"{c}-{r}").glob("*.safetensors")}
                for c in times
            ]
            same_files = same_files and sha[0].keys() == sha[1].keys()
    anchor = statistics.median(times["one_process"])
    rows = []
    for case, ts in times.items():
        sec = statistics.median(ts)
        rows.append(
            {
                "bench": "train_cluster",
                "case": case,
                "models": a.models,
                "steps": a.steps,
                "seconds_per_run": sec,
                "runs_s": ts,
                "models_per_hour": 3600 * a.models / sec,
                "ratio_vs_one_process": anchor / sec,
                "threads": a.threads if case == "one_process" else threads,
                "models_per_batch": a.models if case == "one_process" else per_chunk,
                "cluster_start_s": start_s,
                "cluster_cold_run_s": cold_s,
                "files_complete": same_files,
                "device": a.device,
                "machine": machine(),
                "numpy": np.__version__,
            }
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
            print(json.dumps(row))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
