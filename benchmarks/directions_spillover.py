"""Spill-over of filter vs pattern directions on planted data.

For every planted world, seed, probe and target attribute, a training model is
edited by calibrated strength 1.0 along the probe's filter and along its
pattern; the change of every attribute that is independent of the target is
measured in standard deviations of that attribute's true score, per one
standard deviation of change of the target's true score. Also reported: the
size of the edit in the population's Mahalanobis metric (per one std of target
change). Prints one JSON line per (world, probe, kind) with means over
targets and seeds; the anchor is the same measurement for the other kind in
the same run (``ratio`` = pattern / filter spill).

Run: ``OMP_NUM_THREADS=1 python benchmarks/directions_spillover.py`` (~1 min).
"""

from __future__ import annotations

import json
import time

import numpy as np

from w2wkit.probes import KINDS, PROBES, fit_probe
from w2wkit.synthetic import make_planted, spillover

WORLDS = {
    "readout": {"world": "readout"},
    "generative-orthogonal": {"world": "generative", "orthogonal_loadings": True},
    "generative-random": {"world": "generative", "orthogonal_loadings": False},
}


def main(seeds: int = 3, n: int = 2000, k: int = 40, n_attributes: int = 6) -> list[dict]:
    rows = []
    for wname, opts in WORLDS.items():
        acc: dict[tuple[str, str], list[dict]] = {}
        t0 = time.perf_counter()
        for seed in range(seeds):
            world = make_planted(n, k, n_attributes=n_attributes, seed=seed, **opts)
            for method in PROBES:
                for target in world.labels:
                    res = fit_probe(world.P, world.labels[target], method, cv=0)
                    for kind in KINDS:
                        acc.setdefault((method, kind), []).append(
                            spillover(world, target, res.vector(kind))
                        )
        for method in PROBES:
            f = acc[(method, "filter")]
            for kind in KINDS:
                m = acc[(method, kind)]
                row = {
                    "bench": "directions_spillover",
                    "world": wname,
                    "probe": method,
                    "kind": kind,
                    "n": n,
                    "k": k,
                    "seeds": seeds,
                    "spill_mean": float(np.mean([x["spill_mean"] for x in m])),
                    "spill_max": float(np.max([x["spill_max"] for x in m])),
                    "distance": float(np.mean([x["distance"] for x in m])),
                    "target_std_per_strength": float(np.mean([x["target_std"] for x in m])),
                    "anchor_filter_spill_mean": float(np.mean([x["spill_mean"] for x in f])),
                }
                row["ratio"] = row["spill_mean"] / row["anchor_filter_spill_mean"]
                row["seconds_world"] = round(time.perf_counter() - t0, 2)
                rows.append(row)
                print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
