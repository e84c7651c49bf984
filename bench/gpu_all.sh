#!/usr/bin/env bash
# Everything the GPU machine checks and times (see docs/PERFORMANCE.md). The parts together
# outrun one device call (10 min), so PARTS picks them; each has its own time cap and log
# under $OUT, and a table per part is printed last:
#   device run 1:  PARTS="check engine profile disagg kvtransfer" bash bench/gpu_all.sh
#   device run 2:  PARTS="serving" bash bench/gpu_all.sh          (two GPUs: routing, pd2)
#   device run 3:  PARTS="disagg2 kvtransfer2 serving" SERVING_MODES=pd1 bash bench/gpu_all.sh
#   device run 4:  PARTS="check disagg disagg_mps" then PARTS="disagg2 disagg_coalesce disagg_mps"
#                  (issue 13, on the two-GPU machine)
#   device run 5:  PARTS="check kernels sampler engine serving" KERNEL_TESTS=tests/kernels/test_sampling.py
#                  SERVING_MODES=sampling SERVING_TIMEOUT=200 SERVING_ARGS="--config bench/configs/qwen3-0.6b"
#                  (issue 21: sampling; carry .whl and .redis.tar.xz)
#   device run 6:  PARTS="serving grammar served_w4" SERVING_MODES=served SERVING_TIMEOUT=300
#                  SERVING_ARGS="--config bench/configs/qwen3-0.6b" (issues 22 and 23; carry .whl with
#                  xgrammar and apache-tvm-ffi, and .redis.tar.xz)
# Carry .whl (bash ../shared/device/wheels.sh ucx; ... web) and, for serving, .redis.tar.xz (bash bench/bundle_redis.sh).
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/baton-out} PYTHONUNBUFFERED=1
PARTS=${PARTS:-check engine profile disagg kvtransfer}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
NGPU=$(nvidia-smi -L | wc -l)
has() { [[ " $PARTS " == *" $1 "* ]]; }
part() {  # name, seconds, command...
  local name=$1 t=$2; shift 2
  local s=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: rc=$? in $((SECONDS - s)) s" | tee -a "$OUT/summary.txt"
}
has check && part check_gpu 180 python3 bench/check_gpu.py
has kernels && part kernels 200 env BATON_KERNEL_TESTS_CUDA=1 python3 -m pytest -q -p no:cacheprovider ${KERNEL_TESTS:-tests/kernels}
has sampler && part sampler 120 python3 bench/bench_sampler.py --out "$OUT/sampler.json"
has engine && part engine 330 python3 bench/bench_engine.py ${ENGINE_ARGS:-}
has profile && part profile 90 python3 bench/profile_step.py
# issue 23: what a step costs with C prompt tokens beside 128 decodes (the cap of steps that decode)
has mixed_step && part mixed_step 150 python3 bench/bench_mixed_step.py --out "$OUT/mixed_step.json"
has disagg && part disagg 160 python3 bench/bench_disagg.py
# one GPU, 4 layers to a message (9 messages a 4k request instead of 36): fewer times the
# decode pod's context takes the GPU from the prefill pod's
has disagg_coalesce && part disagg_coalesce 160 python3 bench/bench_disagg.py --tag=-64m \
  --prefill-args="--min-message-bytes 67108864"
# the same one-GPU run with both pods as clients of one CUDA MPS server (their kernels share
# the SMs instead of time-slicing), the prefill pod at MPS's lower client priority; the
# daemon is this script's own (pipe and log under /tmp) and quits after the part
if has disagg_mps; then
  if command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/baton-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/baton-mps/log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d; then
      part disagg_mps 170 python3 bench/bench_disagg.py --tag=-mps --prefill-env CUDA_MPS_CLIENT_PRIORITY=1
      echo get_server_list | nvidia-cuda-mps-control > "$OUT/mps-servers.txt" 2>&1
      echo quit | nvidia-cuda-mps-control
      cp "$CUDA_MPS_LOG_DIRECTORY"/control.log "$OUT/mps-control.log" 2>/dev/null
    else
      echo "=== disagg_mps: the MPS daemon did not start" | tee -a "$OUT/summary.txt"
    fi
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  else
    echo "=== disagg_mps: no nvidia-cuda-mps-control here" | tee -a "$OUT/summary.txt"
  fi
fi
has kvtransfer && part kvtransfer 120 python3 bench/bench_kvtransfer.py --tokens 1024,4096,16384 --requests 3
# two GPUs (nvidia-h100-x2): the prefill pod on GPU 0 pushes to the decode pod on GPU 1
if has disagg2 && [ "$NGPU" -ge 2 ]; then
  part disagg2 170 python3 bench/bench_disagg.py --prefill-device cuda:0 --decode-device cuda:1 --tag 2gpu
fi
if has kvtransfer2 && [ "$NGPU" -ge 2 ]; then
  part kvtransfer2 120 python3 bench/bench_kvtransfer.py --device cuda:0 --rx-device cuda:1 --tag=-2gpu --requests 3
fi
# Serving through the router (bench/bench_serving.py): prefix-aware vs round-robin routing,
# colocated vs disaggregated (one GPU: pd1, issue 14; two GPUs: pd2, issue 15).
# Writes $OUT/serving.tar.gz and $OUT/serving-summary.json; SERVING_MODES overrides the modes.
if has serving; then
  if [ "$NGPU" -ge 2 ]; then modes=${SERVING_MODES:-routing,pd2}; else modes=${SERVING_MODES:-routing,pd1}; fi
  part serving ${SERVING_TIMEOUT:-580} python3 bench/bench_serving.py --modes "$modes" ${SERVING_ARGS:-}
fi
# issue 22: a json_schema-constrained decode batch against an unconstrained one
has grammar && part grammar 240 python3 bench/bench_grammar.py ${GRAMMAR_ARGS:-}
# issue 23: the served mode again with 4 router processes (--workers 4); its own archive under $OUT/w4
if has served_w4; then
  mkdir -p "$OUT/w4"
  part served_w4 300 python3 bench/bench_serving.py --modes served --router-workers 4 --results "$OUT/w4" \
    --out-dir /tmp/baton-serving-w4 ${SERVING_ARGS:-}
fi
# issue 23: served (default temperature only) with baton bench on httpx, the load generator
# before 6b3ec6d, beside the serving part's asyncio client in the same call
if has served_httpx; then
  mkdir -p "$OUT/httpx"
  part served_httpx 240 python3 bench/bench_serving.py --modes served --served-runs default --bench-client httpx \
    --results "$OUT/httpx" --out-dir /tmp/baton-serving-httpx ${SERVING_ARGS:-}
fi
# issue 23: served with the router's pod streams one per request (--no-pod-channels), the path
# before channels, beside the serving part's channels in the same call
if has served_streams; then
  mkdir -p "$OUT/streams"
  part served_streams 240 python3 bench/bench_serving.py --modes served --router-channels off \
    --results "$OUT/streams" --out-dir /tmp/baton-serving-streams ${SERVING_ARGS:-}
fi
# issue 23: served again with each engine variant of SERVED_VARIANTS, side by side with the
# serving part's defaults in one call; a variant is bench_serving's --engine-options
# (NAME=VALUE,...; e.g. split_mixed_steps=false or max_prefill_tokens_when_decoding=2048),
# each under $OUT/variant<i>
if has served_variants; then
  i=0
  for v in ${SERVED_VARIANTS:-split_mixed_steps=false}; do
    i=$((i + 1))
    mkdir -p "$OUT/variant$i"
    echo "variant$i: $v" >> "$OUT/summary.txt"
    part served_variant$i 240 python3 bench/bench_serving.py --modes served --engine-options "$v" \
      --results "$OUT/variant$i" --out-dir "/tmp/baton-serving-variant$i" ${SERVING_ARGS:-}
  done
fi
# issue 23: the router alone (sim pods, zero model time) at ROUTER_RATE new streams/s, with 1..8
# router processes (--workers) on this host's cores; carry .redis.tar.xz and .smolsim (SmolLM2's config and
# tokenizer, no weights: bench_router.py --model)
if has router_cpu; then
  for w in ${ROUTER_WORKERS:-1 2 4 8}; do
    part router_w$w 120 python3 bench/bench_router.py --model "${ROUTER_MODEL:-.smolsim}" --pods 8 \
      --rate "${ROUTER_RATE:-1000}" --seconds 5 --streams 64 --relay-tokens 2000 --router-arg=--workers=$w \
      ${ROUTER_ARGS:-} --out "$OUT/router-w$w.json"
  done
fi
if has router_ab; then
  # This tree's router against a base's, alternating, on the same host in one call: ROUTER_BASE
  # is a tarball of the base's baton/ (git archive <ref> baton | gzip). The bench is this
  # tree's in both; a run's processes import baton from their working directory.
  mkdir -p /tmp/router-base && tar xzf "$ROUTER_BASE" -C /tmp/router-base
  for i in 1 2; do
    for side in base now; do
      d=$PWD; [ $side = base ] && d=/tmp/router-base
      part router_ab_${side}_$i 120 bash -c "cd $d && PYTHONPATH=/tmp/site:$d python3 $PWD/bench/bench_router.py \
        --model $PWD/${ROUTER_MODEL:-.smolsim} --pods 8 --rate ${ROUTER_RATE:-1000} --seconds 5 --skip relay \
        ${ROUTER_ARGS:-} --out $OUT/router-ab-$side-$i.json"
    done
  done
fi
if has router_relay1; then  # one token per pod frame, as when a GPU pod keeps up
  part router_relay1 120 python3 bench/bench_router.py --model "${ROUTER_MODEL:-.smolsim}" --pods 8 \
    --streams 64 --relay-tokens 600 --skip ttft,floor --pod-arg=--sim-decode-step-s=0.005 \
    --out "$OUT/router-relay1.json"
fi
for name in router_ab_base_1 router_ab_now_1 router_ab_base_2 router_ab_now_2 router_relay1 router_w1 router_w2 router_w4 router_w8 $(cd "$OUT" && ls served_variant*.log 2>/dev/null | sed "s/.log$//") mixed_step served_streams served_httpx check_gpu kernels sampler engine grammar served_w4 profile disagg disagg_coalesce disagg_mps kvtransfer disagg2 kvtransfer2 serving; do
  [ -f "$OUT/$name.log" ] || continue
  echo "----- $name"; tail -n 16 "$OUT/$name.log"
done
if ls "$OUT"/router-*.json >/dev/null 2>&1; then  # the router's rows, one line each
  python3 - "$OUT"/router-*.json <<'PY'
import json, sys
for f in sys.argv[1:]:
    r = json.load(open(f))
    t, fl, rl, a = r.get("ttft_router", {}), r.get("ttft_floor", {}), r.get("relay_router", {}), r.get("added_ttft_ms", {})
    print(f.rsplit("/", 1)[1], "| req us", t.get("router_cpu_us_per_request"), "| ttft p50/p99", t.get("ttft_ms_p50"),
          t.get("ttft_ms_p99"), "| added", a.get("p50"), a.get("p99"), "| rate", t.get("achieved_rate"),
          "| floor us", fl.get("floor_cpu_us_per_request"), fl.get("ttft_ms_p50"), "| tok us", rl.get("router_cpu_us_per_token"),
          rl.get("tokens_per_s"))
PY
fi
# the device returns at most 8 files: everything goes back in one archive
( cd "$OUT" && find . -maxdepth 1 -type f ! -name results.tar.gz ! -name 'serving*' -printf '%f\n' \
    | tar czf results.tar.gz -T - && find . -maxdepth 1 -type f ! -name results.tar.gz ! -name 'serving*' -delete )
