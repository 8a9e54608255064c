"""Run ``w2wkit eval`` on the shipped world, sized to a time budget (CPU or GPU).

Usage::

    python benchmarks/eval_world.py OUT_DIR [--budget SECONDS] [--device auto]
        [--profile full] [--world PATH] [--calibrate-on heldout|zoo]

It times one multi-image DreamBooth training and one inversion first, then
picks the number of held-out identities so that the whole evaluation fits
the budget, runs it (results.json and report.html are rewritten after every
section, so a run stopped early keeps its finished sections), and prints one
JSON line with the headline numbers and the device. ``OUT_DIR/eval.tar.gz``
holds the whole output folder (report, grids, plots).
"""

from __future__ import annotations

import argparse
import json
import math
import tarfile
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--budget", type=float, default=420.0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--profile", default="full")
    ap.add_argument("--world", default=None)
    ap.add_argument("--max-heldout", type=int, default=100)
    ap.add_argument(
        "--calibrate-on", default=None, choices=("zoo", "heldout"), help="edit calibration pool"
    )
    args = ap.parse_args()

    import torch

    from w2wkit import evaluation as E

    t_all = time.perf_counter()
    from w2wkit.devices import resolve_device

    device = resolve_device(args.device)
    world = E.load_eval_world(args.world, device=device)
    s = replace(E.PROFILES[args.profile], device=device, batch_size=128 if device != "cpu" else 32)
    if args.calibrate_on:
        s = replace(s, edit_calibration_pool=args.calibrate_on)

    # timing probe: one DreamBooth (zoo recipe) and one inversion
    from w2wkit.baselines import BaselineModels

    models = BaselineModels(world.base, world.lora_settings, device=device)
    inst = world.heldout[-1]
    imgs = world.generator.render(inst, s.n_train_images or world.lora_settings.n_images, seed=1)
    models.dreambooth(imgs[:2], world.pack.instance_prompt, steps=5)  # warm-up
    t0 = time.perf_counter()
    models.dreambooth(imgs, world.pack.instance_prompt)
    t_db = time.perf_counter() - t0
    from w2wkit.invert import default_settings, invert

    space = E.fit_space(world.zoo[:50], world.zoo_names[:50], 20, {})
    t0 = time.perf_counter()
    invert(space, world.base, imgs[:1], steps=50, early_stopping=False, device=device)
    t_step = (time.perf_counter() - t0) / 50  # one picture alone; batches are cheaper per picture
    del models
    steps = s.inversion_steps or default_settings(space).steps
    ood_steps = s.ood_steps or default_settings(space, ood=True).steps
    # per held-out identity: multi + single DreamBooth, w2w inversion, ~30 renders;
    # OOD and scaling use their own (smaller) counts
    per_id = 2 * t_db + steps * t_step + 3.0
    ood = len(s.styles) * (ood_steps * t_step + t_db + 2.0)
    n_inv = len(s.scaling_sizes) + len(s.inversion_k_sweep)
    scaling = n_inv * (steps * t_step + 2.0)
    fixed = 60.0 + 20.0
    n_avail = len(world.heldout)
    if s.edit_calibration_pool == "heldout":  # calibration identities: trained, never evaluated
        fixed += s.edit_calibration_identities * t_db
        n_avail -= s.edit_calibration_identities  # keep the whole pool
    spare = args.budget - (time.perf_counter() - t_all) - fixed
    # spend about half on the main held-out set, a quarter each on OOD and scaling
    n = int(max(2, min(args.max_heldout, n_avail, 0.5 * spare / per_id)))
    n_ood = int(max(1, min(n, 0.25 * spare / ood)))
    n_scale = int(max(1, min(n, 0.25 * spare / scaling)))
    s = replace(s, n_heldout=n, ood_heldout=n_ood, scaling_heldout=n_scale)
    probe = {
        "dreambooth_seconds": t_db,
        "inversion_step_seconds": t_step,
        "n_heldout": n,
        "ood_heldout": n_ood,
        "scaling_heldout": n_scale,
    }
    print(json.dumps({"probe": probe, "device": device}), flush=True)
    out = args.out / "eval"
    res = E.run_eval(world, s, out, progress=False, overwrite=True)
    with tarfile.open(args.out / "eval.tar.gz", "w:gz") as tar:
        tar.add(out, arcname="eval")

    def m(x: dict | float | None) -> float | None:
        if isinstance(x, float):  # e.g. the perfect edit's mean ID score
            return x
        return None if not x else x.get("mean")

    inv, ed = res.get("inversion", {}), res.get("editing", {}).get("overall", {})
    line = {
        "case": "eval_world",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "world": res["world"]["name"],
        "n_models": res["world"].get("n_models"),
        "probe": probe,
        "inversion_id": {
            k: m(inv.get(k, {}).get("id_score"))
            for k in ("w2w", "dreambooth_single", "dreambooth_multi")
        },
        "inversion_seconds": {
            k: m(inv.get(k, {}).get("seconds"))
            for k in ("w2w", "dreambooth_single", "dreambooth_multi")
        },
        "editing_id": {k: m(ed.get(k, {}).get("id_score")) for k in ed},
        "editing_success": {k: m(ed.get(k, {}).get("success")) for k in ed},
        "checks": {k: v["pass"] for k, v in res["checks"].items()},
        "seconds": time.perf_counter() - t_all,
    }
    print(json.dumps(line, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))


if __name__ == "__main__":
    main()
