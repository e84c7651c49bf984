#!/usr/bin/env bash
# Everything the GPU machine checks and times, in one device call (see docs/PERFORMANCE.md):
#   device run:  bash bench/gpu_all.sh      (carry .whl: bash ../shared/device/wheels.sh ucx; ... web)
# Each part has its own time cap and log under $OUT; a table per part is printed last.
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/baton-out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
part() {  # name, seconds, command...
  local name=$1 t=$2; shift 2
  local s=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: rc=$? in $((SECONDS - s)) s" | tee -a "$OUT/summary.txt"
}
[ -n "${SKIP_CHECK:-}" ] || part check_gpu 90 python3 bench/check_gpu.py
part engine 170 python3 bench/bench_engine.py ${ENGINE_ARGS:-}
part disagg 130 python3 bench/bench_disagg.py
[ -n "${SKIP_KVT:-}" ] || part kvtransfer 70 python3 bench/bench_kvtransfer.py --tokens 1024,4096,16384 --requests 3
for name in check_gpu engine disagg kvtransfer; do
  echo "----- $name"; tail -n 14 "$OUT/$name.log"
done
# two GPUs (nvidia-h100-x2): the prefill pod on GPU 0 pushes to the decode pod on GPU 1
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  part disagg2 150 python3 bench/bench_disagg.py --prefill-device cuda:0 --decode-device cuda:1 --tag 2gpu
  echo "----- disagg2"; tail -n 4 "$OUT/disagg2.log"
fi
