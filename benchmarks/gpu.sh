#!/usr/bin/env bash
# The GPU benchmark run: every GPU figure of docs/benchmarks.md in one script, both sides on the GPU.
#
# Usage, in the repository root of a machine with a CUDA GPU, JAX's CUDA plugin, torch and
# torchvision:   RESULTS=dir [PYTHON=python3] bash benchmarks/gpu.sh [stage ...]
# Stages (default: all, in this order of importance): train_step (batch 2), inference (whole
# calls), inference_stages (per stage, export, paste, data set), shapes,
# train_step_b8, end_to_end (train.py's loop vs the step alone, R50-FPN batch 2 and 8, f32 and
# bf16), input (the input pipeline on 1-16 host cores), step_memory (the compiled step's memory
# by model part, without and with model.remat),
# conv_impl (bf16 step with model.conv_impl=cpu beside xla), ops (NMS). Each runs
# under its own time limit, so a machine taken back early keeps what came before; logs and JSON go to $RESULTS (default benchmarks/results/gpu). Wheels of
# packages the machine lacks (ml_collections, pycocotools) may wait in .whl/ and are installed to
# /tmp/site.
set -u
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
STAGES=${*:-train_step inference inference_stages shapes train_step_b8 end_to_end input step_memory conv_impl ops}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
start=$(date +%s)

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND with a limit, log to $RESULTS/NAME.log
  local name=$1 limit=$2
  shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  echo "== $name (limit ${limit} s, at $(($(date +%s) - start)) s)"
  timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  echo "== $name: exit status $? after $(($(date +%s) - start)) s"
  grep -v '^{' "$RESULTS/$name.log" | tail -n 22
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import jax, flax, optax, torch, torchvision; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'torchvision', torchvision.__version__, jax.devices())"
} 2>&1 | tee "$RESULTS/env.log"

# R50-FPN train step at 800 x 1216, batch 2: torchvision (CUDA, f32 and autocast bf16) vs ours.
stage train_step "${TRAIN_LIMIT:-330}" "$PY" benchmarks/train_step.py --device gpu \
  --sides torchvision,ours --dtypes float32,bfloat16 --device-batch 2 --runs 10 --threads 8 \
  --conv-impl xla --no-flops --out "$RESULTS/train_step.json"
# Inference, the whole call at batch 1, 2 and 8 in float32 and bfloat16 (torchvision under
# torch.autocast): one compilation per batch and dtype. Then per stage at batch 1 and 8 in
# float32, with the export, mask paste and data set (64 JPEGs) rows.
stage inference "${INFER_LIMIT:-300}" "$PY" benchmarks/inference.py --device gpu \
  --batches 1,2,8 --dtypes float32,bfloat16 --whole_only --runs 10 --threads 8 \
  --out "$RESULTS/inference.json"
stage inference_stages "${INFER_STAGES_LIMIT:-420}" "$PY" benchmarks/inference.py --device gpu \
  --batches 1,8 --dtypes float32 --dataset_images 64 --runs 10 --threads 8 \
  --out "$RESULTS/inference_stages.json"
# The shapes demo model's img/s (the CPU demo's config on a GPU).
stage shapes "${SHAPES_LIMIT:-60}" "$PY" benchmarks/train_step.py --device gpu --sides shapes \
  --dtypes float32 --runs 10 --threads 8 --no-flops --out "$RESULTS/shapes.json"
# Batch 8 (more work per launch): both sides, both precisions.
stage train_step_b8 "${B8_LIMIT:-330}" "$PY" benchmarks/train_step.py --device gpu \
  --sides torchvision,ours --dtypes float32,bfloat16 --device-batch 8 --runs 10 --threads 8 \
  --conv-impl xla --remat none,backbone+fpn+rpn_head --no-flops \
  --out "$RESULTS/train_step_b8.json"
# End to end: train.py's loop (tf.data from COCO-sized JPEGs on disk, prefetch to the GPU) vs the
# step alone, R50-FPN at batch 2 and 8 in f32 and bf16; the generated data set is shared. Its
# 640x480 images stand for COCO 2017's, so they cross on COCO's 640x640 raw canvas.
stage end_to_end "${E2E_LIMIT:-600}" bash -c '
  for batch in 2 8; do for dtype in float32 bfloat16; do
    "$0" benchmarks/end_to_end.py --config=configs/fpn_r50.py --steps=60 \
      --config.train.global_batch_size=$batch --config.model.dtype=$dtype \
      --config.data.raw_canvas_size="(640,640)" \
      --config.model.conv_impl=xla --root="$1/e2e_data" --out="$1/end_to_end_b${batch}_${dtype}.json" \
      | tail -n 8
  done; done' "$PY" "$RESULTS"
# The input pipeline on 1, 4, 8 and 16 of this host's cores (each cell pinned to them; the
# COCO-like set on COCO's 640² raw canvas and on the full canvas) and its one-thread batch
# assembly: the cores 8 GPUs need.
stage input "${INPUT_LIMIT:-300}" bash -c '
  for raw in 640,640 0,0; do
    "$0" benchmarks/input_pipeline.py --data coco_like --threads 1,4,8,16 --batches 48 \
      --raw_canvas $raw --out "$1/input_pipeline_raw${raw/,/x}.json" | tail -n 12
  done' "$PY" "$RESULTS"
# What the compiled step reserves (XLA's memory analysis, the buffers live at its peak by model
# part), batch 2 and 8, f32 and bf16, the mask branch whole or in pieces of 32 RoIs per image.
stage step_memory "${MEM_LIMIT:-360}" "$PY" benchmarks/step_memory.py --batches 2,8 \
  --chunks 32 --remats none,backbone+fpn+rpn_head --conv-impls xla --dtypes float32,bfloat16 \
  --out "$RESULTS/step_memory.json"
# The CPU kernels' forms on the GPU beside stock flax (bf16, batch 2): what they cost there.
stage conv_impl "${IMPL_LIMIT:-150}" "$PY" benchmarks/train_step.py --device gpu \
  --sides ours --dtypes bfloat16 --device-batch 2 --runs 10 --threads 8 --conv-impl xla,cpu \
  --no-flops --out "$RESULTS/conv_impl.json"
# NMS forms (tiled vs one box per loop iteration) on the GPU; torchvision's NMS on the CPU.
stage ops "${OPS_LIMIT:-90}" "$PY" benchmarks/ops.py --skip-roi-align --repeats 20 \
  --tile-sizes 64,128,512,1024 \
  --out "$RESULTS/ops.json"
echo "== done after $(($(date +%s) - start)) s"
