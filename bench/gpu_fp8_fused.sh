#!/usr/bin/env bash
# One short device call for the fused activation quantization (issue 26): gpu_fp8.sh's CUDA
# FP8 tests and bench_fp8.py on decode steps and 8k prefill for bf16, FP8 KV + weights, and
# the same with each linear quantizing its input apart (side by side in one process), then
# the decode-attention tile sweep alone (after, so that the engine rows run the tiles in the
# code).
#   run:  bash bench/gpu_fp8_fused.sh      (JSON and logs under $OUT, the sweep's in $OUT/sweep)
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/baton-out} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
TEST_TIMEOUT=${TEST_TIMEOUT:-70} BENCH_TIMEOUT=${BENCH_TIMEOUT:-200} FP8_SWEEP=0 FP8_ARGS= \
  bash bench/gpu_fp8.sh --skip attention,linear,matmul,push \
  --variants "${FP8_VARIANTS:-bf16,fp8 KV + weights,fp8 KV + W (quant apart)}"
[ "${FP8_SWEEP:-1}" = 0 ] && exit 0
mkdir -p "$OUT/sweep"
s=$SECONDS
OUT=$OUT/sweep timeout ${SWEEP_TIMEOUT:-90} python3 bench/bench_fp8.py --skip linear,matmul,push,decode \
  > "$OUT/sweep/fp8.log" 2>&1
echo "=== attention sweep rc=$? in $((SECONDS - s)) s"; grep -E "^  (fp8|bf16)|Traceback|Error" "$OUT/sweep/fp8.log" | tail -30
