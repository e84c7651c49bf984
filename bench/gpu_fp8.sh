#!/usr/bin/env bash
# FP8 (issue 26) on the lent GPU in one device call: the FP8 kernel and engine tests compiled
# on CUDA, bench/bench_fp8.py (ceilings, decode steps, prefill, KV push bytes; offline
# throughput with FP8_ARGS=--offline), then bench/fp8_kernel_sweep.py (decode attention
# variants and linears alone). Logs and JSON under $OUT.
#   run:  bash bench/gpu_fp8.sh [bench_fp8.py arguments]   (after FP8_ARGS; quoted as given)
# (SmolLM2's accuracy runs where the pip-shipped model is: bench/fp8_accuracy.py; the model
# cannot travel to the device machine, see docs/PERFORMANCE.md "FP8 (issue 26)".)
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/baton-out} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
s=$SECONDS
BATON_KERNEL_TESTS_CUDA=1 timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_fp8_kernels.py tests/engine/test_fp8.py > "$OUT/fp8_tests.log" 2>&1
echo "=== tests rc=$? in $((SECONDS - s)) s"; grep -E "passed|failed|FAILED|Error" "$OUT/fp8_tests.log" | tail -8
s=$SECONDS
timeout ${BENCH_TIMEOUT:-400} python3 bench/bench_fp8.py ${FP8_ARGS:-} "$@" > "$OUT/fp8.log" 2>&1
rc=$?
grep -E "Traceback|Error" "$OUT/fp8.log" | head -5
sed -n '/^NVIDIA\|^$/,$p' "$OUT/fp8.log" | tail -75
echo "=== bench rc=$rc in $((SECONDS - s)) s"
[ "${FP8_SWEEP:-1}" = 0 ] && exit 0
s=$SECONDS
timeout ${SWEEP_TIMEOUT:-150} python3 bench/fp8_kernel_sweep.py > "$OUT/fp8_sweep.log" 2>&1
echo "=== kernel sweep rc=$? in $((SECONDS - s)) s"; grep -E "Traceback|Error" "$OUT/fp8_sweep.log" | head -5
