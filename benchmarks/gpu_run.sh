#!/usr/bin/env bash
# The GPU comparison of issue 8, in one call: the project's ResNet-50 step and the plain Flax
# reference step, bf16, batch 256, synthetic 224 px data, one GPU, side by side; the WRN-28-10
# step of configs/fashion_mnist_wrn.py (issue 18); then two XLA flag variants of the project's
# ResNet-50 step. Prints two tables; JSON records and logs go to $OUT (13 files: the device tool
# returns 8, so point OUT elsewhere and tar it into the tool's $OUT). First results, one H200:
# benchmarks/NOTES.md "Session 20".
#
# The GPU image has JAX and Flax but no TensorFlow and no ml_collections (STACK-NOTES.md).
# ml_collections is pure Python: copy it (and tqdm, for a training run) from this machine into
# benchmarks/.vendor (git-ignored; --vendor also writes benchmarks/.data/fashion_mnist.npz for
# configs/fashion_mnist_wrn_arrays.py), then carry that folder with the device tool:
#   bash benchmarks/gpu_run.sh --vendor                       # here, once
#   run(command="bash benchmarks/gpu_run.sh", carry=["benchmarks/.vendor"], timeout_s=570)
# PyYAML, which ml_collections imports, is a Flax dependency and is there already.
#
# Environment: PEAK_TFLOPS (default 790: the measured bf16 matmul rate of an H200/H100 SXM, as in
# STACK-NOTES.md), PYTHON (python3), OUT (where results go; the device tool sets it), BUDGET_S
# (420: no new run starts after this many seconds, so the call ends inside its limit); and, only
# to try the script on a CPU, BATCH (256), IMAGE (224), STEPS (100), WINDOW (20) and WRN_BATCHES
# ('128 512': the WRN-28-10 batch sizes timed).
set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--vendor" ]; then
  py=${PYTHON:-/work/venv/bin/python}
  [ -x "$py" ] || py=python3
  src=$("$py" -c 'import ml_collections, os; print(os.path.dirname(ml_collections.__file__))') || {
    echo "error: $py cannot import ml_collections; pip install ml-collections first" >&2; exit 2; }
  tq=$("$py" -c 'import tqdm, os; print(os.path.dirname(tqdm.__file__))') || {
    echo "error: $py cannot import tqdm; pip install tqdm first" >&2; exit 2; }
  rm -rf benchmarks/.vendor && mkdir -p benchmarks/.vendor
  cp -r "$src" benchmarks/.vendor/ml_collections
  cp -r "$tq" benchmarks/.vendor/tqdm   # the training loop's progress bar (pure Python)
  find benchmarks/.vendor -name __pycache__ -prune -exec rm -rf {} +
  echo '*' > benchmarks/.vendor/.gitignore
  echo "copied $src and $tq -> benchmarks/.vendor ($(du -sh benchmarks/.vendor | cut -f1))"
  # Fashion-MNIST as an arrays file, for configs/fashion_mnist_wrn_arrays.py (needs TF here only).
  if [ ! -f benchmarks/.data/fashion_mnist.npz ]; then
    "$py" -m imgcls_jax.data.write_arrays --dataset=fashion_mnist --compress \
      --output=benchmarks/.data/fashion_mnist.npz || exit 2
  fi
  exit 0
fi

PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/imgcls_gpu_run}
PEAK=${PEAK_TFLOPS:-790}
STEPS=${STEPS:-100}
WINDOW=${WINDOW:-20}
BATCH=${BATCH:-256}
IMAGE=${IMAGE:-224}
BUDGET_S=${BUDGET_S:-420}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/benchmarks/.vendor${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv \
  | tee "$OUT/gpu.txt"
"$PY" - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib, sys
import jax, flax, optax
print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__,
      'optax', optax.__version__, jax.devices())
for m in ('ml_collections', 'tensorflow'):
  try:
    importlib.import_module(m)
    print(m, 'importable')
  except ImportError:
    print(m, 'NOT importable')
EOF

# --transfer_guard=log: a transfer inside the timing is logged (counted below), not fatal, so one
# surprise on a new JAX version cannot cost the whole device session.
COMMON=(--steps="$STEPS" --window="$WINDOW" --warmup=5 --peak_tflops="$PEAK" --json
        --transfer_guard=log)
PROJECT=(benchmarks/throughput.py --config=configs/imagenet_resnet50.py --config.batch_size="$BATCH"
         --image_size="$IMAGE" --config.mesh.num_devices=1 "${COMMON[@]}")
# Command buffers (CUDA graphs) by default hold FUSION, CUBLAS, CUBLASLT, CUSTOM_CALL, CUDNN and
# DYNAMIC_SLICE_FUSION thunks; cuDNN convolutions (CONVOLUTION) are not in that list, so a ResNet
# step is cut into many short graphs. Variant 1 adds them; variant 2 turns graphs off (control).
CMDBUF_CONV=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,CONVOLUTION
CMDBUF_OFF=--xla_gpu_enable_command_buffer=

bench() {  # name, then the command line
  local name=$1; shift
  if [ "$SECONDS" -ge "$BUDGET_S" ]; then
    echo "== $name: skipped (${SECONDS}s used of the ${BUDGET_S}s budget)"; return
  fi
  echo "== $name (t=${SECONDS}s)"
  timeout 240 "$PY" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  grep -v '^[IWE][0-9]\{4\} ' "$OUT/$name.log" | tail -n 6
  [ $rc -eq 0 ] || echo "   (exit status $rc; full log in $OUT/$name.log)"
}

bench project_default "${PROJECT[@]}"
bench flax_reference benchmarks/reference_flax.py --batch_size="$BATCH" --image_size="$IMAGE" \
  --dtype=bfloat16 "${COMMON[@]}"
# Issue 18: the step of configs/fashion_mnist_wrn.py (WRN-28-10, bf16, 28x28x1) at its batch, 128,
# and at 512; its images/s gives the wall of the config's 200 epochs (12M images) on this card.
WRN=(benchmarks/throughput.py --config=configs/fashion_mnist_wrn.py --config.mesh.num_devices=1
     "${COMMON[@]}")
WRN_JSON=()
for b in ${WRN_BATCHES:-128 512}; do
  bench "wrn_b$b" "${WRN[@]}" --config.batch_size="$b"
  WRN_JSON+=("$OUT/wrn_b$b.json")
done
bench project_cmdbuf_conv "${PROJECT[@]}" --xla_flags="$CMDBUF_CONV"
bench project_cmdbuf_off "${PROJECT[@]}" --xla_flags="$CMDBUF_OFF"

echo "== images/s, ratios against the reference (t=${SECONDS}s)"
"$PY" benchmarks/measure.py "$OUT/flax_reference.json" "$OUT/project_default.json" \
  "$OUT/project_cmdbuf_conv.json" "$OUT/project_cmdbuf_off.json" | tee "$OUT/table.txt"
echo "== WRN-28-10 on Fashion-MNIST (configs/fashion_mnist_wrn.py), batch ${WRN_BATCHES:-128 512}"
"$PY" benchmarks/measure.py "${WRN_JSON[@]}" | tee "$OUT/wrn_table.txt"
echo "== host <-> device transfers logged inside the timing windows (expected: 0 everywhere)"
grep -cE "(host-to-device|device-to-host|device-to-device) transfer" "$OUT"/*.log
