#!/usr/bin/env bash
# The device checks of "One diffusion engine and `w2wkit train`", as one run on a lent GPU:
# bench_train_sdxl.py with SDXL's UNet at 1024 px (128x128 latents) in bf16 and fp16, and
# SD1.5's UNet at 512 px in bf16 and fp32 (random weights; the step time does not depend
# on them). Each line: models/hour of `w2wkit train` vs the one-at-a-time PEFT loop in the
# same precision and vs the bare UNet's forward + backward; peak GPU memory per model.
#
#   bash benchmarks/gpu_train.sh            # results in $OUT (or /tmp/w2w-gpu)
#
# A machine without diffusers/peft takes them from .whl/ (wheels carried with the tree:
# pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 -d .whl diffusers peft importlib_metadata zipp).
set -uo pipefail
OUT=${OUT:-/tmp/w2w-gpu}
mkdir -p "$OUT"
# Only the wheels whose module the machine lacks are installed (to /tmp/site), so the
# machine's own torch/numpy stay in charge.
export PYTHONPATH=$PWD
need=$(python3 - <<'PY'
import importlib.util as u
wheels = {"diffusers": "diffusers", "peft": "peft", "transformers": "transformers",
          "tokenizers": "tokenizers", "huggingface_hub": "huggingface_hub",
          "hf_xet": "hf_xet", "safetensors": "safetensors", "accelerate": "accelerate",
          "click": "click", "rich": "rich", "markdown_it": "markdown_it_py",
          "mdurl": "mdurl", "pygments": "pygments", "regex": "regex",
          "filelock": "filelock", "fsspec": "fsspec", "tqdm": "tqdm", "yaml": "pyyaml",
          "packaging": "packaging", "psutil": "psutil", "PIL": "pillow",
          "requests": "requests", "urllib3": "urllib3", "idna": "idna",
          "certifi": "certifi", "charset_normalizer": "charset_normalizer",
          "importlib_metadata": "importlib_metadata", "zipp": "zipp",
          "typing_extensions": "typing_extensions"}
missing = [m for m in wheels if u.find_spec(m) is None]
print(" ".join(wheels[m] for m in missing))
PY
)
if [ -n "$need" ]; then
  echo "installing from .whl: $need"
  files=()
  for w in $need; do files+=( $(ls .whl/ | grep -i "^${w}-" | sed 's|^|.whl/|') ); done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${files[@]}"
  export PYTHONPATH=/tmp/site:$PWD
fi
python3 -c "import torch, diffusers, peft, w2wkit.training; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)" || exit 3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
b=benchmarks/bench_train_sdxl.py
res=$OUT/train_gpu.jsonl
# STEPS_SDXL / STEPS_SD15 / REPEATS: a few steps say whether it runs; tens of steps and 2
# rounds give the steady-state rates (the first steps carry the kernels' warm-up).
SX=${STEPS_SDXL:-3}; S15=${STEPS_SD15:-5}; R=${REPEATS:-1}
# SCALE multiplies the per-case time limits (for the longer runs).
common=(--device cuda --batch 1 --repeats "$R" --threads 8 --out "$res")
# ONLY: the cases to run, e.g. ONLY="sdxl-bf16 sd15-bf16" (default: all four).
ONLY=${ONLY:-"sdxl-bf16 sd15-bf16 sdxl-fp16 sd15-fp32"}
run() {  # one case; 4 models first, 2 when 4 do not fit
  local limit=$1; shift
  [[ " $ONLY " == *" $2-$4 "* ]] || return 0
  timeout "$limit" python3 $b "${common[@]}" "$@" --models 4 2>&1 | tail -3 ||
    timeout "$limit" python3 $b "${common[@]}" "$@" --models 2 2>&1 | tail -3
}
run $((200*${SCALE:-1})) --preset sdxl --precision bf16 --steps "$SX"
run $((120*${SCALE:-1})) --preset sd15 --precision bf16 --steps "$S15"
run $((150*${SCALE:-1})) --preset sdxl --precision fp16 --steps "$SX"
run $((100*${SCALE:-1})) --preset sd15 --precision fp32 --steps "$S15"
wc -l "$res"
