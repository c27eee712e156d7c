#!/usr/bin/env bash
# The GPU benchmark run: every figure of one lease of a GPU machine, both sides on the GPU.
#
# Usage, in the repository root of a machine with a CUDA GPU, JAX's CUDA plugin, torch and
# torchvision:   OUT=dir bash benchmarks/gpu.sh [python]
# Stages run in order of importance, each under its own time limit, so a lease that ends early
# keeps what came before; logs and JSON go to $OUT (default benchmarks/results/gpu). Wheels of
# packages the machine lacks (ml_collections) may wait in .whl/ and are installed to /tmp/site.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PY=${1:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
start=$(date +%s)

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND with a limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s, at $(($(date +%s) - start)) s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit status $? after $(($(date +%s) - start)) s"
  grep -v '^{' "$OUT/$name.log" | tail -n 22
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import jax, flax, optax, torch, torchvision; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'torchvision', torchvision.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.log"

# R50-FPN train step at 800 x 1216, batch 2: torchvision (CUDA, f32 and autocast bf16) vs ours.
stage train_step "${TRAIN_LIMIT:-330}" "$PY" benchmarks/train_step.py --device gpu \
  --sides torchvision,ours --dtypes float32,bfloat16 --device-batch 2 --runs 10 --threads 8 \
  --no-flops --out "$OUT/train_step.json"
# Inference per stage, batch 1 and 2.
stage inference "${INFER_LIMIT:-150}" "$PY" benchmarks/inference.py --device gpu \
  --batches 1,2 --runs 10 --threads 8 --out "$OUT/inference.json"
# The shapes demo model's img/s (the CPU demo's config on a GPU).
stage shapes "${SHAPES_LIMIT:-60}" "$PY" benchmarks/train_step.py --device gpu --sides shapes \
  --dtypes float32 --runs 10 --threads 8 --no-flops --out "$OUT/shapes.json"
echo "== done after $(($(date +%s) - start)) s"
