"""Held-out check of a calibrated direction: success on models the calibration never drew.

For a space calibrated with ``w2wkit directions SPACE --calibrate`` (shipped world),
draws ``--models`` models of the calibration's pool (lacking the attribute,
plausible for it) that it did not use, renders them unedited, at the stored
strength and at a quarter of it, and prints one JSON line: successes, 90% Wilson
intervals and the one-sided exact binomial test of "success >= target"
(``w2wkit.calibrate.check_heldout``).

    .venv/bin/w2wkit directions SPACE --calibrate --names beard
    .venv/bin/python benchmarks/calibration_heldout.py SPACE beard
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("space", type=Path)
    ap.add_argument("name")
    ap.add_argument("--models", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--concept", default="identity")
    args = ap.parse_args()

    from w2wkit.calibrate import ConceptClassifier, check_heldout
    from w2wkit.cli.calibration import space_models
    from w2wkit.render import Renderer
    from w2wkit.space import WeightSpace
    from w2wkit.world.shipped import load_world

    space = WeightSpace.load(args.space)
    w = load_world()
    r = Renderer(w.pipeline_dir, device="cpu")
    clf = ConceptClassifier(w.evaluators(), args.concept)
    t = time.perf_counter()
    res = check_heldout(
        space,
        args.name,
        r,
        clf,
        pack=args.concept,
        n_models=args.models,
        seed=args.seed,
        fractions=(1.0, 0.25),
        models=space_models(space, w, args.concept),
    )
    rec = space.directions_[args.name].info["calibration"]
    keys = ("strength", "success", "success_lower", "success_observed", "confidence")
    keys += ("n_pictures", "pool", "reached", "curve")
    res["calibration"] = {k: rec.get(k) for k in keys}
    res["seconds"] = round(time.perf_counter() - t, 1)
    res.pop("rows")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
