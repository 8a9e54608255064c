#!/usr/bin/env bash
# Retrain one concept's zoo of the shipped world on a GPU machine, measure, pack for the trip back.
#
#   bash scripts/retrain_zoo_gpu.sh "$OUT"                      # dog, 1200 steps, cuda
#   CONCEPT=dog STEPS=2400 bash scripts/retrain_zoo_gpu.sh "$OUT"
#   DEVICE=cpu MODELS=4 bash scripts/retrain_zoo_gpu.sh /tmp/x   # local check (slow)
#
# Run from the repository root; the repo is imported through PYTHONPATH (carried .whl/
# wheels are unpacked when diffusers is missing, as in build_world_gpu.sh). The shipped
# world is copied to $WORK, its zoo of CONCEPT retrained (w2wkit.world.retrain,
# the CLI's `world retrain-zoo`), both concepts measured (`world measure` settings, the
# measurement recorded in the build log) and the changed files split into $OUT:
# world-files.tar.part-aa, ... (loras.safetensors, build_log.json, manifest.json);
# reassemble with `cat world-files.tar.part-* | tar xf - -C w2wkit/data/world` and run
# `w2wkit world verify`. MODELS limits the measured models (default: the test's 200).
set -u
OUT="${1:?usage: retrain_zoo_gpu.sh OUT_DIR}"
CONCEPT="${CONCEPT:-dog}"
STEPS="${STEPS:-1200}"
DEVICE="${DEVICE:-cuda}"
MODELS="${MODELS:-200}"
WORK="${WORK:-/tmp/w2w-world}"
export PYTHONUNBUFFERED=1 CONCEPT STEPS DEVICE MODELS WORK
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/w2w-site .whl/*.whl || { echo "wheel install failed"; exit 2; }
    export PYTHONPATH="/tmp/w2w-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "diffusers is not importable and no .whl/ wheels were carried"; exit 2
  fi
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$WORK" && cp -r w2wkit/data/world "$WORK"
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/retrain_stdout.txt" | grep -v -e "^Loading" -e "^$"
import json, os, sys
from w2wkit.world.retrain import retrain_zoo
from w2wkit.world import CONCEPTS
from w2wkit.world.measure import FidelitySettings, measure_world, record_measurement
w, c, dev = os.environ["WORK"], os.environ["CONCEPT"], os.environ["DEVICE"]
entry = retrain_zoo(w, c, steps=int(os.environ["STEPS"]), device=dev, progress=True)
print("retrain:", json.dumps({k: entry[k] for k in ("recipe_before", "recipe", "seconds", "mean_loss")}))
res = measure_world(w, settings=FidelitySettings(models=int(os.environ["MODELS"])), device=dev,
                    workers=min(8, os.cpu_count() or 1), progress=print)
record_measurement(w, res)
print("measure:", json.dumps({k: {m: res[k][m] for m in ("fidelity_top1", "fidelity_top1_per_image")}
                              for k in CONCEPTS}))
PYEOF
RC=${PIPESTATUS[0]}
rm -f "$OUT"/world-files.tar.part-*
tar cf - -C "$WORK" loras.safetensors build_log.json manifest.json \
  | split -b 16M -a 2 - "$OUT/world-files.tar.part-"
ls -l "$OUT"
echo "retrain_zoo_gpu: rc $RC"
exit "$RC"
