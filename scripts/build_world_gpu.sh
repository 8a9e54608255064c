#!/usr/bin/env bash
# Build the miniature world on a GPU machine and pack it for the trip back.
#
#   bash scripts/build_world_gpu.sh "$OUT"            # full-gpu profile, cuda
#   PROFILE=micro DEVICE=cpu bash scripts/build_world_gpu.sh /tmp/x   # local check
#   EVALUATORS_FROM=w2wkit/data/world bash scripts/build_world_gpu.sh "$OUT"
#       # copy the shipped world's evaluators instead of training them (they do not
#       # depend on the base): their share of the budget goes to the other phases
#
# Run from the repository root. Installs nothing from a network: if diffusers
# is missing and wheels were carried in .whl/, they are unpacked into
# /tmp/w2w-site. The repo is imported through PYTHONPATH (no CLI needed).
# Hard wall-clock guard: WALL seconds in total (default 540 = 9 min: fits a 600 s
# device command after a 1-2 minute machine start in a 15-minute device budget); the
# build itself gets BUDGET seconds (default WALL - 45) and scales its phases.
# Output in $OUT: world.tar.part-aa, -ab, ... (each <= 16 MiB, at most 8;
# reassemble with `cat world.tar.part-* | tar xf -`), build_log.json and
# build_stdout.txt.
set -u
OUT="${1:?usage: build_world_gpu.sh OUT_DIR}"
PROFILE="${PROFILE:-full-gpu}"
DEVICE="${DEVICE:-cuda}"
WALL="${WALL:-540}"
BUDGET="${BUDGET:-$((WALL - 45))}"
WORK="${WORK:-/tmp/w2w-world-work}"
SEED="${SEED:-0}"
EVALUATORS_FROM="${EVALUATORS_FROM:-}"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
say() { echo "[build_world_gpu +$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$OUT" "$WORK"
PY="${PYTHON:-python3}"

if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    say "diffusers missing: installing carried wheels from .whl/ into /tmp/w2w-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/w2w-site .whl/*.whl || { say "wheel install failed"; exit 2; }
    export PYTHONPATH="/tmp/w2w-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "diffusers is not importable and no .whl/ wheels were carried"; exit 2
  fi
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF'
import importlib, sys
mods = ["torch", "diffusers", "transformers", "peft", "safetensors", "sklearn", "rich", "PIL"]
for m in mods:
    try:
        v = getattr(importlib.import_module(m), "__version__", "?")
        print(f"  {m} {v}")
    except Exception as exc:  # noqa: BLE001
        print(f"  {m} MISSING: {exc}"); sys.exit(3)
import torch
print("  cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
[ $? -eq 0 ] || { say "environment check failed"; exit 3; }

say "build: profile=$PROFILE device=$DEVICE budget=${BUDGET}s work=$WORK evaluators=${EVALUATORS_FROM:-train}"
REUSE=()
[ -n "$EVALUATORS_FROM" ] && REUSE=(--evaluators-from "$EVALUATORS_FROM")
LEFT=$(( WALL - ( $(date +%s) - T0 ) - 15 ))
[ "$LEFT" -lt 5 ] && LEFT=5
timeout --signal=TERM --kill-after=5 "$LEFT" "$PY" -m w2wkit.world.builder \
  --out "$WORK" --profile "$PROFILE" --device "$DEVICE" --seed "$SEED" --budget "$BUDGET" \
  "${REUSE[@]}" 2>&1 | tee "$OUT/build_stdout.txt" | grep -v -e "Processor" -e "^$"
RC=${PIPESTATUS[0]}
say "build exit code $RC"

cp -f "$WORK/build_log.json" "$OUT/build_log.json" 2>/dev/null || true
if [ -f "$WORK/shipped/manifest.json" ]; then
  SRC=(-C "$WORK" shipped)
  say "packing the shipped world"
else
  # the build did not finish: carry back everything made so far (resumable)
  SRC=(-C "$WORK" --exclude=shipped --exclude='.*' .)
  say "no shipped world: packing the work folder instead (resume with world build --out)"
fi
rm -f "$OUT"/world.tar.part-*
tar cf - "${SRC[@]}" | split -b 16M -a 2 - "$OUT/world.tar.part-"
N=$(ls "$OUT"/world.tar.part-* | wc -l)
ls -l "$OUT"
if [ "$N" -gt 8 ]; then say "WARNING: $N parts (> 8)"; fi
say "done: $N part(s), build rc $RC"
exit "$RC"
