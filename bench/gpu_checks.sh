#!/usr/bin/env bash
# The GPU checks of this repository on a machine with JAX and no TensorFlow, in one run: the loss and head tests on
# the GPU, then JAX training speed of r50 and MobileFaceNet (bench/train_throughput.py --backend jax).
# Wheels missing there (keras, namex, optree) go in .whl/ and are installed to /tmp/site first.
# Usage, from the repository root: OUT=results bash bench/gpu_checks.sh   (logs in $OUT)
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT" /tmp/no_tensorflow/tensorflow
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
echo 'raise ImportError("TensorFlow is not installed on this machine")' > /tmp/no_tensorflow/tensorflow/__init__.py
export PYTHONPATH=/tmp/no_tensorflow:/tmp/site:$PWD KERAS_BACKEND=jax PYTHONUNBUFFERED=1
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import jax, keras; print(jax.__version__, keras.__version__, jax.devices())"; } 2>&1 | tee "$OUT/env.log"

bench() {  # network precision [extra environment]
  echo "== $1 $2 ${3:-}"
  env ${3:-} timeout "${BENCH_TIMEOUT:-110}" $PY bench/train_throughput.py --backend jax --network "$1" \
    --batch "${BATCH:-256}" --precision "$2" --steps "${STEPS:-30}" --classes 10000 2>&1 | grep -E "RESULT|Error" | tail -3
}

bench r50 mixed_bfloat16 | tee -a "$OUT/bench.log"
timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider tests/test_losses.py tests/test_partial_fc.py \
  -m "not slow" 2>&1 | tail -25 | tee "$OUT/tests.log"
bench r50 float32 | tee -a "$OUT/bench.log"
bench r50 float32 JAX_DEFAULT_MATMUL_PRECISION=highest | tee -a "$OUT/bench.log"
bench mobilefacenet float32 | tee -a "$OUT/bench.log"
bench mobilefacenet mixed_bfloat16 | tee -a "$OUT/bench.log"
