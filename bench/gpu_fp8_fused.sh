#!/usr/bin/env bash
# One short device call for the fused activation quantization (issue 26): the FP8 CUDA tests,
# then decode steps and 8k prefill for bf16, FP8 KV + weights, and the same with each linear
# quantizing its input apart (side by side in one process), then the decode-attention tile
# sweep alone (after, so that the engine rows run the tiles in the code).
#   run:  bash bench/gpu_fp8_fused.sh      (JSON and logs under $OUT, the sweep's in $OUT/sweep)
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/baton-out} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT/sweep"
s=$SECONDS
BATON_KERNEL_TESTS_CUDA=1 timeout ${TEST_TIMEOUT:-70} python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_fp8_kernels.py tests/engine/test_fp8.py > "$OUT/fp8_tests.log" 2>&1
echo "=== tests rc=$? in $((SECONDS - s)) s"; grep -E "passed|failed|FAILED|Error" "$OUT/fp8_tests.log" | tail -8
s=$SECONDS
timeout ${BENCH_TIMEOUT:-200} python3 bench/bench_fp8.py --skip attention,linear,matmul,push \
  --variants "${FP8_VARIANTS:-bf16,fp8 KV + weights,fp8 KV + W (quant apart)}" > "$OUT/fp8.log" 2>&1
echo "=== bench rc=$? in $((SECONDS - s)) s"
grep -E "^decode|^prefill|Traceback|Error|quantize|rms_norm|silu" "$OUT/fp8.log" | cut -c1-220 | tail -40
[ "${FP8_SWEEP:-1}" = 0 ] && exit 0
s=$SECONDS
OUT=$OUT/sweep timeout ${SWEEP_TIMEOUT:-90} python3 bench/bench_fp8.py --skip linear,matmul,push,decode \
  > "$OUT/sweep/fp8.log" 2>&1
echo "=== attention sweep rc=$? in $((SECONDS - s)) s"; grep -E "^  (fp8|bf16)|Traceback|Error" "$OUT/sweep/fp8.log" | tail -30
