"""Probe the miniature inversion recipe on the eval's own held-out inputs.

Usage::

    python scripts/inversion_probe.py OUT.jsonl N_HELDOUT VARIANT [VARIANT ...]

A variant is ``k=999,steps=200,lr=0.3,stop=1,window=10,patience=3,min_delta=0.01``
(any subset; defaults: the eval's ``full`` profile and the recipe's); ``style=painted``
(``posterised``, ``line_drawing``) stylises the inputs as the eval's OOD section. The first N
held-out identities of the shipped world are inverted exactly as ``w2wkit eval``'s
inversion section does (same input picture, mask, prompt, seeds, space of 999
components) and scored the same way (ID score of the renders against 8 other renders
of the identity), so the numbers compare with the eval's DreamBooth baselines at the
same N. One JSON line per variant. Used for docs/eval.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np


def parse(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=")
        out[key] = value if key == "style" else float(value)
    return out


def main(argv: list[str]) -> None:
    from w2wkit import evaluation as E
    from w2wkit.invert import invert

    out_path, n = argv[0], int(argv[1])
    world = E.load_eval_world(None, device="cpu")
    s = replace(E.PROFILES["full"], device="cpu", batch_size=32, n_heldout=n)
    ev = E.EvalContext(world, s, Path(tempfile.mkdtemp(prefix="w2w-invprobe-")), None)
    k_inv = min(int(s.inversion_space_components), len(world.zoo) - 1)
    space = E.fit_space(world.zoo, world.zoo_names, k_inv, {})
    heldout = world.heldout[:n]
    refs = [ev.embed(ev.real(inst, s.n_eval_images, seed=s.seed + 99)) for inst in heldout]
    inputs = np.concatenate([ev.real(inst, 1, seed=s.seed + 5) for inst in heldout])
    for text in argv[2:]:
        v = parse(text)
        pictures = inputs
        if "style" in v:  # the eval's OOD inputs: stylised, scored against realistic renders
            pictures = E.stylise(inputs, v["style"].replace("_", " "))
        t0 = time.perf_counter()
        res = invert(
            space,
            ev.renderer.pipe,
            pictures,
            n_components=int(v["k"]) if "k" in v else s.inversion_components,
            steps=int(v["steps"]) if "steps" in v else s.inversion_steps,
            lr=v.get("lr", s.inversion_lr),
            mask=world.pack.mask(pictures),
            concept=world.pack,
            prompt=world.instance_prompt,
            early_stopping=bool(v["stop"]) if "stop" in v else None,
            window=int(v["window"]) if "window" in v else None,
            patience=int(v.get("patience", 3)),
            min_delta=v.get("min_delta", 0.01),
            device="cpu",
            seed=s.seed,
            progress=False,
            notice=lambda m: None,
        )
        sec = time.perf_counter() - t0
        imgs = ev.render(space.inverse_transform(res.coefficients), desc="probe")
        ids = [E.id_score(ev.embed(imgs[i, 0]), refs[i]) for i in range(n)]
        rec = {
            "variant": text,
            "n": n,
            "id_mean": float(np.mean(ids)),
            "id_std": float(np.std(ids)),
            "per_identity": [float(x) for x in ids],
            "settings": {k: res.settings[k] for k in ("n_components", "lr", "steps")},
            "steps_run_mean": float(np.mean(res.steps_run)),
            "seconds_per_image": sec / n,
        }
        print(json.dumps(rec), flush=True)
        with open(out_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
