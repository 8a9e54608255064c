"""Probe edit settings on the shipped world: components of the edit space and probe kind.

Usage::

    OMP_NUM_THREADS=1 python scripts/edit_probe.py OUT.jsonl [K ...] [--kinds pattern,filter]
        [--all-models] [--inject T] [--attrs beard,glasses,old]

For each K (default 50 100 200) an identity space of K components is fitted on the
shipped zoo with its labels, directions are fitted (linear probe, the default
``pattern`` and the ``filter`` kind) and, for each of ``beard``, ``glasses`` and
``old``, 6 zoo models lacking the attribute (seed 17; by default only models for
which the attribute is plausible, as the eval's calibration pool:
:func:`w2wkit.evaluate.excluded_by`; ``--all-models`` drops that rule) are edited at
strengths 1, 2, 3, 4, 6, 8, disentangled from the correlated attributes as
``w2wkit eval`` does. Every edit is rendered with 4 seeds (20 DDIM steps, CFG 3,
the world's prompt); success is the classifier's reading of the attribute, ID the
cosine of identity embeddings to the unedited model's picture of the same seed.
``--inject T`` renders with delayed injection (the unedited model for timesteps
``t > T``, the edited one after). One JSON line per (K, kind, attribute, strength).
Used for docs/eval.md ("Edit strengths are calibrated").
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main(argv: list[str]) -> None:
    from w2wkit.collection import Collection
    from w2wkit.directions import fit_directions
    from w2wkit.evaluate import _correlated, _edit_disentangled, excluded_by
    from w2wkit.labels import read_labels
    from w2wkit.render import Renderer
    from w2wkit.space import WeightSpace
    from w2wkit.world.shipped import load_world

    out = argv[0]
    kinds = ["pattern", "filter"]
    if "--kinds" in argv:
        i = argv.index("--kinds")
        kinds = argv[i + 1].split(",")
        argv = argv[:i] + argv[i + 2 :]
    plausible = "--all-models" not in argv
    argv = [a for a in argv if a != "--all-models"]
    inject = None
    if "--inject" in argv:
        i = argv.index("--inject")
        inject = float(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    rep, rank, energy = "factors", None, None
    for flag in ("--representation", "--rank", "--energy"):
        if flag in argv:
            i = argv.index(flag)
            val = argv[i + 1]
            argv = argv[:i] + argv[i + 2 :]
            if flag == "--representation":
                rep = val
            elif flag == "--rank":
                rank = int(val)
            else:
                energy = float(val)
    attrs = ["beard", "glasses", "old"]
    if "--attrs" in argv:
        i = argv.index("--attrs")
        attrs = argv[i + 1].split(",")
        argv = argv[:i] + argv[i + 2 :]
    ks = [int(k) for k in argv[1:]] or [50, 100, 200]
    w = load_world()
    names = w.names("identity")
    zoo = [w.adapter("identity", i) for i in range(len(names))]
    labels = read_labels(w.labels_path("identity"), names)
    labels = {a: v for a, v in labels.items() if len(np.unique(v[np.isfinite(v)])) == 2}
    ev = w.evaluators()
    cols = ev.attribute_names("identity")
    renderer = Renderer(w.pipeline_dir, device="cpu")
    prompt = w.prompt("identity")
    seeds = [0, 1, 2, 3]
    strengths = [1.0, 2.0, 3.0, 4.0, 6.0, 8.0]
    for k in ks:
        space = WeightSpace(n_components=k, representation=rep, random_state=0).fit(
            Collection.from_adapters(zoo, names=names)
        )
        space.set_labels(labels)
        for kind in kinds:
            fit_directions(space, labels, kind=kind, cv=5)
            for attr in attrs:
                t0 = time.time()
                others = _correlated(labels, attr, 0.15, list(space.directions_))
                keep = labels[attr] == 0
                rule = excluded_by(labels, attr) if plausible else {}
                for a, v in rule.items():
                    keep &= labels[a] != v
                pool = np.flatnonzero(keep)
                pick = np.random.default_rng(17).choice(pool, 6, replace=False)
                models, originals = [], []
                for i in pick:
                    models.append(zoo[int(i)])
                    models += [
                        _edit_disentangled(
                            space, zoo[int(i)], attr, st, others, rank=rank, energy=energy
                        )[0]
                        for st in strengths
                    ]
                    originals += [zoo[int(i)]] * (1 + len(strengths))
                kw = {"steps": 20, "guidance": 3.0}
                if inject is not None:  # original model while t > inject, edited after
                    kw.update(edited=models, inject_t=inject)
                    models = originals
                imgs = renderer.render(models, prompt, seeds, **kw).images
                imgs = imgs.reshape(len(pick), 1 + len(strengths), len(seeds), 32, 32, 3)
                u8 = (imgs * 255).round().clip(0, 255).astype(np.uint8)
                emb = ev.embed("identity", u8.reshape(-1, 32, 32, 3)).reshape(
                    len(pick), 1 + len(strengths), len(seeds), -1
                )
                probs = ev.attributes("identity", u8.reshape(-1, 32, 32, 3))[:, cols.index(attr)]
                ok = probs.reshape(len(pick), 1 + len(strengths), len(seeds)) > 0.5
                for j, st in enumerate([0.0, *strengths]):
                    rec = {
                        "k": k,
                        "representation": rep,
                        "rank": rank,
                        "energy": energy,
                        "kind": kind,
                        "excluded_by": rule,
                        "inject_t": inject,
                        "attr": attr,
                        "strength": st,
                        "success": float(ok[:, j].mean()),
                        "id": float(np.sum(emb[:, j] * emb[:, 0], axis=-1).mean()),
                        "cv_score": space.directions_[attr].score,
                        "seconds": time.time() - t0,
                    }
                    print(json.dumps(rec), flush=True)
                    with open(out, "a") as fh:
                        fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
