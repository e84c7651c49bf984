"""Serving measurements through the router: routing policies, and colocated against disaggregated.

Each mode starts its own processes exactly as `baton up` does (baton.launcher: Redis, pods, routers
on free loopback ports, each log a file), waits for them with deadlines, warms them up, drives the
router with `baton bench` (in-process: same workloads, JSON and plots), and stops every process,
on error too (SIGTERM included):

  routing  prefix-aware against round-robin routing, two colocated pods (GPU 0 and GPU 1, or
           both on GPU 0), the shared-system-prompt workload: prefix-cache hit rate (cached /
           prompt tokens), TTFT p50/p99, throughput. Each pod's KV cache holds about 70% of the
           tenants' system prompts: the two caches together hold them all, one alone does not.
           With room for every tenant on every pod, round robin would only pay one extra miss
           per tenant per pod, which says nothing about the policy (tests/router/test_e2e_routing.py).
  pd1      one GPU (issue 14): a request-rate sweep of the random workload against one colocated
           pod, then against a prefill pod and a decode pod sharing the GPU: TTFT, TPOT and
           goodput under the SLOs (TTFT <= 1 s, TPOT <= 50 ms).
  pd2      two GPUs (issue 15): the mixed workload (2k-token prompts with 16-token answers among
           64-token prompts with 256-token answers) swept against 2 colocated pods (one per GPU),
           then 1 prefill (GPU 0) + 1 decode (GPU 1), behind the same router; and the TTFT of a
           4k-token prompt alone and under load, for both.

Model: Qwen3-8B shapes (bench/configs/qwen3-8b) with random weights for every mode. Routing wins
by skipping prefill of cached prompts, and an 8B model's 2k-token prefill (~70 ms on an H100) is
what a hit saves; Qwen3-0.6B's (~5 ms) would vanish under the router's own per-request cost, and
its KV per token (112 KiB) is nearly the 8B's (144 KiB), so it would not relieve the cache
pressure the routing mode sets up either. The directory made here holds the config and a
tokenizer padded to the config's 151,936 ids (every id decodes to a word, so random output
streams text the bench can time).

Memory: every pod gets a fixed --num-kv-blocks rather than a --gpu-memory-utilization share.
The engine sizes its cache as free memory - (1 - utilization) x total, measured when the pod
starts: a second pod on the same GPU counts the first's memory against its own share (and two
starting at once race), so utilization cannot split a GPU. Fixed blocks can, and give every
configuration the same cache: 4,000 blocks (64k tokens, 9 GiB for Qwen3-8B) per serving or
prefill pod in pd1/pd2 (two such pods with 16.4 GB of weights each share one 80 GB GPU, as
bench/bench_disagg.py does), and 0.7 x the tenants' system-prompt blocks (1,434, 3.2 GiB) per
pod in the routing mode.

Output: logs, per-run JSON (`baton bench` schema) and PNG plots under --out-dir; at the end all of
it (not the model directory) in ONE archive, --results/serving.tar.gz, beside
--results/serving-summary.json (the device returns at most 8 files). A short table is printed.

Run on the GPU machine, alone in one device call (~6 min), carrying .whl
and .redis.tar.xz; $OUT receives the archive and summary:
    W="--no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site"
    python3 -m pip install -q $W .whl/*.whl && PYTHONPATH=/tmp/site:$PWD python3 bench/bench_serving.py
with --modes routing,pd1,pd2 (any subset) to choose; by default routing,pd1 on one GPU, routing,pd2
on two.
Rehearse on a CPU (tiny model, tiny loads, all three modes, ~3 min on 2 cores):
    python bench/bench_serving.py --smoke [--redis .redis]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `python bench/bench_serving.py` from a checkout
if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))  # imported as a module (the tests): its neighbours

import engine_options
import httpx

from baton.bench import workloads as wl
from baton.launcher import Stack, free_port, start_redis

MODES = ("routing", "pd1", "pd2", "sampling", "served")
BLOCK_SIZE = 16  # the pods' and the router's default
PY = [sys.executable, "-m", "baton.cli"]

# Defaults per machine: the GPU run, and --smoke's tiny model and loads on a CPU.
GPU = {
    "config": str(REPO / "bench" / "configs" / "qwen3-8b"), "kv_blocks": 4000, "routing_kv_blocks": None,
    "tenants": 16, "system_tokens": 2048, "question_len": "32:96", "routing_output_len": "64:128",
    "routing_requests": 192, "routing_rate": None,
    "pd1_rates": "2,4,8,16", "pd1_input_len": "512:2048", "pd1_output_len": "64:256",
    "pd2_rates": "4,8,16,24", "long_input": "2048", "short_output": "16", "short_input": "64", "long_output": "256",
    "point_s": 15.0, "slo_ttft_ms": 1000.0, "slo_tpot_ms": 50.0,
    "probe_len": 4096, "probe_alone": 3, "probe_count": 4, "probe_load_rate": 16.0, "probe_load_s": 12.0,
    "warmup_lens": "4104,96", "ready_timeout_s": 300.0, "request_timeout_s": 120.0,
    "sampling_requests": 384, "sampling_concurrency": 128, "sampling_input_len": "256:1024",
    "sampling_output_len": "256", "sampling_kv_blocks": 20000, "router_workers": 1,
    "served_runs": "default,greedy", "bench_client": "asyncio", "router_channels": "on",
    "engine_options": "",
}
SMOKE = GPU | {
    "config": None, "kv_blocks": 256, "routing_kv_blocks": 16, "tenants": 4, "system_tokens": 64, "question_len": "4:12",
    "routing_output_len": "2:4", "routing_requests": 24, "routing_rate": 6.0,
    "pd1_rates": "2,4", "pd1_input_len": "16:48", "pd1_output_len": "4:8",
    "pd2_rates": "2,4", "long_input": "64", "short_output": "2", "short_input": "8", "long_output": "12",
    "point_s": 3.0, "probe_len": 256, "probe_alone": 2, "probe_count": 2, "probe_load_rate": 3.0, "probe_load_s": 4.0,
    "warmup_lens": "40,8", "ready_timeout_s": 120.0, "request_timeout_s": 60.0,
    "sampling_requests": 16, "sampling_concurrency": 4, "sampling_input_len": "16:48",
    "sampling_output_len": "8", "sampling_kv_blocks": 256,
}
HELP = {
    "kv_blocks": "KV blocks of each pod in pd1 and pd2 (default 4000)",
    "router_workers": "each router's --workers (default 1, the router's own default)",
    "served_runs": "served: which rows, of default,greedy (default both)",
    "bench_client": "baton bench --http-client: asyncio (default) or httpx",
    "router_channels": "on (the router's default: one channel per pod) or off (--no-pod-channels: a stream per request)",
    "engine_options": "engine options of the pods and of served's offline engine, NAME=VALUE,... "
                      "(EngineConfig fields, e.g. max_prefill_tokens_when_decoding=2048,split_mixed_steps=false)",
    "routing_kv_blocks": "KV blocks of each pod in routing (default 0.7 x the tenants' system-prompt blocks)",
    "routing_rate": "routing: Poisson req/s (default 6 per GPU)",
    "point_s": "pd1/pd2: seconds of arrivals per sweep point (default 15)",
    "probe_len": "pd2: tokens of the probe prompt (default 4096)",
    "probe_load_rate": "pd2: req/s of the mixed load the probes run under (default 16)",
    "warmup_lens": "prompt lengths each pod serves before anything is timed (default 4104,96)",
}
# Qwen3 shapes small enough for two CPU cores (what `baton make-tiny-model` makes).
TINY_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 2048, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 4096,
    "tie_word_embeddings": True, "eos_token_id": 2, "bos_token_id": 0, "attention_bias": False,
}


# -- set-up: model directory, Redis, devices ---------------------------------------------------

def make_model_dir(dest: Path, config: dict) -> Path:
    """config.json plus a ChatML tokenizer whose ids cover the config's whole vocabulary.

    The BPE tokenizer of `baton make-tiny-model` has 2,048 ids; ids above those become plain
    vocabulary entries " w<id>" (never produced by encoding, decoded as a word), so a random-weight
    model's output over 151,936 ids streams text. Prompts use the real 2,048 ids.
    """
    from tokenizers import Tokenizer as HFTokenizer

    from baton.modelzoo import hf_files, tiny

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    vocab_size = config["vocab_size"]
    doc = json.loads(tiny.train_tokenizer(min(vocab_size, 2048)).to_str())
    vocab = doc["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        word = f"\u0120w{i}"  # byte-level BPE: \u0120 is the space byte
        vocab[word if word not in vocab else word + "_"] = i
    tok = HFTokenizer.from_str(json.dumps(doc))
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"padded tokenizer has {tok.get_vocab_size()} ids, the config {vocab_size}")
    tok.save(str(dest / "tokenizer.json"))
    hf_files.write_tokenizer_config(dest, chat_template=tiny.CHATML_TEMPLATE, eos_token="<|im_end|>",
                                    pad_token="<|endoftext|>", bos_token=None, unk_token=None,
                                    model_max_length=config["max_position_embeddings"])
    return dest


def use_redis(choice: str) -> str:
    """Make `redis-server` findable on PATH (launcher.start_redis runs it); returns which one.

    auto: the installed one, else the bundle .redis (bench/bundle_redis.sh), else .redis.tar.xz
    unpacked into .redis. A directory: that bundle, even where one is installed.
    """
    if choice == "auto" and shutil.which("redis-server"):
        return shutil.which("redis-server")
    bundle = REPO / ".redis" if choice == "auto" else Path(choice).resolve()
    archive = bundle.with_name(bundle.name + ".tar.xz")
    if not (bundle / "bin" / "redis-server").exists() and archive.exists():
        with tarfile.open(archive) as t:
            t.extractall(bundle.parent, filter="data")
    exe = bundle / "bin" / "redis-server"
    if not exe.exists():
        raise RuntimeError(f"no redis-server on PATH and no bundle at {bundle}: run bench/bundle_redis.sh "
                           "where redis-server is installed and carry .redis (or .redis.tar.xz)")
    os.environ["PATH"] = f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return str(exe)


def gpu_count() -> int:
    import torch  # the driver process only counts: pods own the GPUs

    return torch.cuda.device_count()


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in out.splitlines() if ln.strip()]


def check_imports(modes: list[str]) -> None:
    """Fail before starting anything when a service's package is missing (the GPU machine has
    none of these unless bench/gpu_all.sh installed the carried wheels)."""
    import importlib.util

    need = ["fastapi", "uvicorn", "redis", "msgpack", "prometheus_client", "tokenizers"]
    if {"pd1", "pd2"} & set(modes):
        need.append("ucxx")
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"missing Python packages: {', '.join(missing)} (see bench/gpu_all.sh)")


# -- services -----------------------------------------------------------------------------------

@dataclass
class Pod:
    name: str
    role: str  # colocated, decode or prefill
    device: str
    kv_blocks: int
    url: str = ""


@dataclass
class Deployment:
    dir: Path
    pods: list[Pod]
    routers: dict[str, str] = field(default_factory=dict)  # policy -> base URL
    warmup: dict = field(default_factory=dict)  # start-up and warm-up seconds, warm-up KV transfers

    def serving(self) -> list[Pod]:
        return [p for p in self.pods if p.role != "prefill"]

    def prefill_url(self) -> str | None:
        return next((p.url for p in self.pods if p.role == "prefill"), None)


@dataclass
class Context:
    args: argparse.Namespace
    out: Path
    model: str
    devices: list[str]
    vocab_size: int
    tokenizer: object = None

    def maker(self) -> wl.PromptMaker:
        if self.tokenizer is None:
            from baton.engine.tokenizer import Tokenizer

            self.tokenizer = Tokenizer(self.model)
        return wl.PromptMaker(self.tokenizer, as_ids=True)


@contextmanager
def deployment(ctx: Context, name: str, pods: list[Pod], policies: tuple[str, ...] = ("prefix",)):
    """Redis, `pods` (started together) and one router per policy; warmed up; all stopped after."""
    a = ctx.args
    d = ctx.out / name
    d.mkdir(parents=True, exist_ok=True)
    stack = Stack(d)
    started = time.monotonic()
    services = {}
    try:
        redis_url = start_redis(stack)
        # pods refuse /internal/* without the shared token (docs/SECURITY.md); env, not argv,
        # so services.json does not record it
        env = {"BATON_INTERNAL_TOKEN": TOKEN}
        children = []
        for pod in pods:
            port = free_port()
            pod.url = f"http://127.0.0.1:{port}"
            cmd = "prefill" if pod.role == "prefill" else "decode"
            argv = PY + [cmd, "--model", ctx.model, "--port", str(port), "--device", pod.device,
                         "--redis-url", redis_url, "--load-format", "random", "--num-kv-blocks", str(pod.kv_blocks),
                         "--log-level", "warning", "--drain-timeout-s", "2"]
            argv += engine_options.flags(a.engine_options)
            if cmd == "decode":
                argv += ["--role", pod.role] + (["--ucx-port", "0"] if pod.role == "decode" else [])
            services[pod.name] = argv
            children.append(stack.spawn(pod.name, argv, pod.url + "/ready", env=env))
        for c in children:  # they start in parallel; each wait has its own deadline
            stack.wait_ready(c, a.ready_timeout_s)
        dep = Deployment(d, pods)
        for policy in policies:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            argv = PY + ["router", "--workers", str(a.router_workers), "--model", ctx.model, "--host", "127.0.0.1",
                         "--port", str(port), *(["--no-pod-channels"] if a.router_channels == "off" else []),
                         "--redis-url", redis_url, "--policy", policy, "--log-level", "warning",
                         "--drain-timeout-s", "2"]
            services[f"router-{policy}"] = argv
            stack.wait_ready(stack.spawn(f"router-{policy}", argv, url + "/ready", env=env), 60)
            wait_live_pods(url, len(dep.serving()), 30)
            dep.routers[policy] = url
        (d / "services.json").write_text(json.dumps(services, indent=1))
        dep.warmup["start_s"] = round(time.monotonic() - started, 1)
        warm_up(ctx, dep)
        dep.warmup["warmup_s"] = round(time.monotonic() - started - dep.warmup["start_s"], 1)
        print(f"[{name}] {len(pods)} pod(s) and {len(policies)} router(s) ready in {dep.warmup['start_s']:.0f} s, "
              f"warmed up in {dep.warmup['warmup_s']:.0f} s", flush=True)
        yield dep
    finally:
        stack.stop(grace_s=20)


def wait_live_pods(router: str, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    live = 0
    while time.monotonic() < deadline:
        try:
            live = httpx.get(router + "/ready", timeout=5, trust_env=False).json().get("live_pods", 0)
        except (httpx.HTTPError, ValueError):
            live = 0
        if live >= n:
            return
        time.sleep(0.3)
    raise RuntimeError(f"router {router} sees {live} of {n} pods after {timeout_s:.0f} s")


# The internal token of the bench's services, and the header that carries it to a pod.
TOKEN = secrets.token_urlsafe(32)
AUTH = {"X-Baton-Token": TOKEN}


def generate(pod_url: str, prompt: list[int], max_tokens: int, prefill: str | None, timeout_s: float) -> None:
    """One request on a pod's internal API (docs/CONTRACTS.md), read to its end."""
    body = {"request_id": f"warm-{random.getrandbits(48):x}", "prompt_token_ids": prompt,
            "sampling": {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
    if prefill:
        body["prefill"] = {"url": prefill}
    with httpx.stream("POST", pod_url + "/internal/generate", json=body, timeout=timeout_s, trust_env=False,
                      headers=AUTH) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line and "error" in (msg := json.loads(line)):
                raise RuntimeError(f"warm-up on {pod_url} failed: {msg['error']}")


def warm_up(ctx: Context, dep: Deployment) -> None:
    """Compile every pod's prefill kernels (Triton, first use) and open the KV connections before
    anything is timed; prove each router answers; a disaggregated set must really transfer KV."""
    rng = random.Random(7)
    lens = [int(x) for x in ctx.args.warmup_lens.split(",")]
    prefill = dep.prefill_url()
    for pod in dep.serving():
        for n in lens:
            prompt = [rng.randrange(10, min(ctx.vocab_size, 2048)) for _ in range(n)]
            generate(pod.url, prompt, 4, prefill if pod.role == "decode" else None, ctx.args.request_timeout_s)
    if prefill:
        decode = next(p for p in dep.pods if p.role == "decode")
        stats = httpx.get(decode.url + "/internal/transfer_stats", timeout=10, trust_env=False, headers=AUTH).json()
        dep.warmup["transfers"] = {k: v for k, v in stats.items() if k.startswith("outcome_")}
        if stats.get("outcome_ok", 0) < 1:
            raise RuntimeError(f"the disaggregated warm-up fell back to local prefill: {stats}")
    for url in dep.routers.values():
        r = httpx.post(url + "/v1/completions", timeout=ctx.args.request_timeout_s, trust_env=False,
                       json={"model": served_model(url), "prompt": [11, 12, 13, 14], "max_tokens": 2,
                             "ignore_eos": True})
        if r.status_code != 200:
            raise RuntimeError(f"router {url} answered {r.status_code}: {r.text[:300]}")


def served_model(router: str) -> str:
    return httpx.get(router + "/v1/models", timeout=10, trust_env=False).json()["data"][0]["id"]


def scrape(url: str) -> dict[str, float]:
    """Counter samples (`*_total`) and histograms' buckets, sums and counts of a service's /metrics."""
    out = {}
    try:
        text = httpx.get(url + "/metrics", timeout=10, trust_env=False).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            if "_total" in name or "_bucket{" in name or name.partition("{")[0].endswith(("_sum", "_count")):
                out[name] = float(value)
    return out


def counters(dep: Deployment) -> dict[str, dict[str, float]]:
    return {p.name: scrape(p.url) for p in dep.pods} | {f"router-{k}": scrape(u) for k, u in dep.routers.items()}


def delta(before: dict, after: dict) -> dict:
    return {svc: {k: round(v - before.get(svc, {}).get(k, 0.0), 3) for k, v in m.items()
                  if v != before.get(svc, {}).get(k, 0.0)} for svc, m in after.items()}


# -- measurements -------------------------------------------------------------------------------

def bench(ctx: Context, dep: Deployment, out: Path, argv: list[str], seed: int, policy: str = "prefix") -> dict:
    """`baton bench` against the deployment's router, results to `out` (labelled by its stem);
    returns the results document, with the services' counter deltas over the run as "services"."""
    from baton.bench.cli import run as bench_run

    before = counters(dep)
    rc = bench_run(["--base-url", dep.routers[policy], "--endpoint", "completions", "--tokenizer", ctx.model,
                    "--no-progress", "--timeout", str(ctx.args.request_timeout_s), "--seed", str(seed),
                    "--http-client", ctx.args.bench_client,
                    "--label", out.stem, "--out", str(out), *argv])
    doc = json.loads(out.read_text())
    doc["services"] = delta(before, counters(dep))
    out.write_text(json.dumps(doc, indent=1) + "\n")
    if rc != 0:
        raise RuntimeError(f"baton bench {out.stem}: every request of a point failed (rc {rc}); see {out}")
    return doc


def plots(docs_dir: Path, files: list[Path]) -> None:
    from baton.bench.cli import compare

    compare([str(f) for f in files] + ["--plot", str(docs_dir / "plots")])


def rows(doc: dict) -> list[dict]:
    def r(x, n=1):
        return None if x is None else round(x, n)

    out = []
    for p in doc["points"]:
        s = p["summary"]
        out.append({"rate": p["value"], "completed": s["completed"], "errors": s["errors"],
                    "req_s": r(s["request_throughput"], 2), "out_tok_s": r(s["output_throughput"]),
                    "hit_rate": r(s["prefix_cache_hit_rate"], 3),
                    "ttft_p50_ms": r(s["ttft_ms"]["p50"]), "ttft_p99_ms": r(s["ttft_ms"]["p99"]),
                    "tpot_p50_ms": r(s["tpot_ms"]["p50"]), "tpot_p99_ms": r(s["tpot_ms"]["p99"]),
                    "itl_p99_ms": r(s["itl_ms"]["p99"]), "e2e_p50_ms": r(s["e2e_ms"]["p50"]),
                    "goodput": r(s["goodput"], 2), "slo_attainment": r(s["slo_attainment"], 3)})
    return out


def sweep_argv(a: argparse.Namespace, rates: str, workload: list[str]) -> list[str]:
    # enough requests that the highest rate still runs the whole point; the duration cap ends each point
    n = math.ceil(1.25 * max(float(x) for x in rates.split(",")) * a.point_s) + 1
    return [*workload, "--num-requests", str(n), "--request-rate", rates, "--max-duration", str(a.point_s),
            "--slo-ttft-ms", str(a.slo_ttft_ms), "--slo-tpot-ms", str(a.slo_tpot_ms)]


def transfers(doc: dict) -> dict:
    """The decode pods' KV transfer outcomes over a run (local prefill is a fallback, not the design)."""
    out: dict[str, float] = {}
    for m in doc["services"].values():
        for k, v in m.items():
            if k.startswith("baton_pod_kv_transfers_total"):
                outcome = k.split('outcome="', 1)[1].split('"', 1)[0]
                out[outcome] = out.get(outcome, 0) + v
    return out


def mode_routing(ctx: Context) -> dict:
    a = ctx.args
    devices = [ctx.devices[0], ctx.devices[1 % len(ctx.devices)]]
    system_blocks = a.tenants * math.ceil(a.system_tokens / BLOCK_SIZE)
    kv = a.routing_kv_blocks or math.ceil(0.7 * system_blocks)
    # 6 req/s per GPU: with 16 tenants' 2k-token prompts and ~100-token answers an H100 is about
    # 60% busy under prefix routing and 75% under round robin (two pods' decode steps each read
    # the weights) -- loaded enough for misses to show in TTFT, short of saturation
    rate = a.routing_rate or 6.0 * len(set(devices))
    pods = [Pod(f"colocated-{i}", "colocated", dev, kv) for i, dev in enumerate(devices)]
    workload = ["--workload", "shared-prefix", "--tenants", str(a.tenants), "--system-tokens", str(a.system_tokens),
                "--question-len", a.question_len, "--output-len", a.routing_output_len,
                "--num-requests", str(a.routing_requests), "--request-rate", f"{rate:g}",
                "--max-duration", str(a.routing_requests / rate * 1.5 + 10)]
    res: dict = {"devices": devices, "kv_blocks_per_pod": kv, "tenant_system_blocks": system_blocks,
                 "rate": rate, "requests": a.routing_requests, "tenants": a.tenants,
                 "system_tokens": a.system_tokens, "results": {}}
    files = []
    with deployment(ctx, "routing", pods, policies=("prefix", "round_robin")) as dep:
        # distinct seeds: the second policy must not find the first one's tenants cached
        for policy, seed in (("prefix", 100), ("round_robin", 200)):
            files.append(dep.dir / f"{policy}.json")
            doc = bench(ctx, dep, files[-1], workload, seed, policy)
            per_pod = {svc: sum(v for k, v in m.items() if k.startswith("baton_pod_requests_total"))
                       for svc, m in doc["services"].items() if svc.startswith("colocated")}
            res["results"][policy] = rows(doc)[0] | {"requests_per_pod": per_pod}
        res["start"] = dep.warmup
    plots(ctx.out / "routing", files)
    return res


def mode_pd(ctx: Context, name: str) -> dict:
    """pd1: colocated vs prefill + decode on one GPU (random workload); pd2: 2 colocated vs
    prefill GPU 0 + decode GPU 1 (mixed workload), plus the 4k-token probes."""
    a = ctx.args
    if name == "pd1":
        d0 = d1 = ctx.devices[0]
        rates = a.pd1_rates
        workload = ["--workload", "random", "--input-len", a.pd1_input_len, "--output-len", a.pd1_output_len]
        colocated = [Pod("colocated-0", "colocated", d0, a.kv_blocks)]
    else:
        d0, d1 = ctx.devices[0], ctx.devices[1]
        rates = a.pd2_rates
        workload = ["--workload", "mixed", "--long-input", a.long_input, "--short-output", a.short_output,
                    "--short-input", a.short_input, "--long-output", a.long_output]
        colocated = [Pod("colocated-0", "colocated", d0, a.kv_blocks), Pod("colocated-1", "colocated", d1, a.kv_blocks)]
    disagg = [Pod("prefill-0", "prefill", d0, a.kv_blocks), Pod("decode-0", "decode", d1, a.kv_blocks)]
    argv = sweep_argv(a, rates, workload)
    res: dict = {"workload": workload, "rates": rates, "point_s": a.point_s, "kv_blocks_per_pod": a.kv_blocks,
                 "slo": {"ttft_ms": a.slo_ttft_ms, "tpot_ms": a.slo_tpot_ms}, "results": {}}
    files = []
    for label, pods in (("colocated", colocated), ("disagg", disagg)):
        res[f"{label}_devices"] = [f"{p.role}@{p.device}" for p in pods]
        with deployment(ctx, f"{name}/{label}", pods) as dep:
            files.append(ctx.out / name / f"{label}.json")
            doc = bench(ctx, dep, files[-1], argv, seed=300)  # the same prompts for both configurations
            res["results"][label] = rows(doc)
            res[f"{label}_start"] = dep.warmup
            if label == "disagg":
                res["kv_transfers"] = transfers(doc)
            if name == "pd2":
                res.setdefault("ttft_4k", {})[label] = probe(ctx, dep)
    plots(ctx.out / name, files)
    if "ttft_4k" in res:
        (ctx.out / name / "ttft_4k.json").write_text(json.dumps(res["ttft_4k"], indent=1) + "\n")
    return res


def mode_sampling(ctx: Context) -> dict:
    """One colocated pod: the same requests with the server's default temperature (none sent,
    so 1.0 — what users send) and greedy (temperature 0), output tok/s and latencies."""
    a = ctx.args
    workload = ["--workload", "random", "--input-len", a.sampling_input_len, "--output-len",
                a.sampling_output_len, "--num-requests", str(a.sampling_requests),
                "--concurrency", str(a.sampling_concurrency)]
    res: dict = {"workload": workload, "results": {}}
    files = []
    with deployment(ctx, "sampling", [Pod("colocated-0", "colocated", ctx.devices[0], a.sampling_kv_blocks)]) as dep:
        # a discarded first round under the same load (sampled and greedy): what a first run
        # alone would pay (allocations, shapes seen first) must not land on either measured run
        warm = [x if x != str(a.sampling_requests) else str(a.sampling_concurrency) for x in workload]
        bench(ctx, dep, dep.dir / "warmup-default.json", warm, 400)
        bench(ctx, dep, dep.dir / "warmup-greedy.json", warm + ["--temperature", "0"], 450)
        # different prompts per run (seeds): the second run must not find the first one's cached
        for label, extra, seed in (("default (T=1.0)", [], 500), ("greedy", ["--temperature", "0"], 600)):
            files.append(dep.dir / f"{'greedy' if extra else 'default'}.json")
            res["results"][label] = rows(bench(ctx, dep, files[-1], workload + extra, seed))[0]
        res["start"] = dep.warmup
    d, g = (res["results"][k]["out_tok_s"] for k in ("default (T=1.0)", "greedy"))
    res["default_of_greedy"] = round(d / g, 3) if d and g else None
    return res


def same_requests(ctx: Context, workload: list[str], seed: int) -> list[tuple[list[int], int]]:
    """The (prompt ids, max_tokens) `baton bench` sends for `workload` with `seed` (its point 0)."""
    from baton.bench.cli import build_parser, make_workload

    args = build_parser().parse_args(workload + ["--seed", str(seed)])
    return [(list(t.content), t.output_tokens) for s in make_workload(args, seed, ctx.maker()) for t in s.turns]


def quantile_ms(samples: dict, name: str, q: float, labels: str = "") -> float | None:
    """The q-quantile of histogram `name` (its samples whose labels contain `labels`), in ms,
    interpolated within its bucket as Prometheus' histogram_quantile does."""
    buckets = sorted((float(k.rpartition('le="')[2].rstrip('"}')), v) for k, v in samples.items()
                     if k.startswith(name + "_bucket{") and labels in k)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank, lo, below = q * buckets[-1][1], 0.0, 0.0
    for le, cum in buckets:
        if cum >= rank:
            if le == float("inf"):
                return round(1e3 * lo, 2)
            return round(1e3 * (lo + (le - lo) * (rank - below) / max(cum - below, 1e-9)), 2)
        lo, below = le, cum
    return None


def step_times(before: dict, after: dict) -> dict:
    """Where a run's inter-token gaps come from (issue 23): the pod's engine steps by kind (how
    many, p50 / p99 of the time between back-to-back steps' tokens), the inter-token p99 the
    pod and the router each saw, and each process's garbage-collection pauses."""
    def run(svc: str) -> dict:  # every sample, zeros too: a bucket's lower edge is the one before
        return {k: v - before.get(svc, {}).get(k, 0.0) for k, v in after.get(svc, {}).items()}

    pod_svc = next((k for k in after if not k.startswith("router-")), None)
    router_svc = next((k for k in after if k.startswith("router-")), None)
    pod, router = run(pod_svc), run(router_svc)
    name = "baton_pod_engine_step_seconds"
    out: dict = {"pod_itl_p99_ms": quantile_ms(pod, "baton_pod_inter_token_latency_seconds", 0.99),
                 "router_itl_p99_ms": quantile_ms(router, "baton_router_itl_seconds", 0.99)}
    for kind in ("decode", "mixed", "prefill"):
        n = pod.get(f'{name}_count{{kind="{kind}"}}', 0.0)
        out[kind] = {"steps": int(n), "seconds": round(pod.get(f'{name}_sum{{kind="{kind}"}}', 0.0), 3),
                     "p50_ms": quantile_ms(pod, name, 0.5, f'kind="{kind}"'),
                     "p99_ms": quantile_ms(pod, name, 0.99, f'kind="{kind}"')} if n else {"steps": 0}
    for who, samples in (("pod", pod), ("router", router)):
        gc_name = f"baton_{who}_gc_pause_seconds"
        out[f"{who}_gc"] = {g: {"count": int(samples.get(f'{gc_name}_count{{generation="{g}"}}', 0)),
                                "ms": round(1e3 * samples.get(f'{gc_name}_sum{{generation="{g}"}}', 0.0), 1),
                                "p99_ms": quantile_ms(samples, gc_name, 0.99, f'generation="{g}"')}
                            for g in "012"}
    return out


def pod_ttft_mean_ms(before: dict, after: dict) -> float | None:
    """The pod's own mean arrival-to-first-token over a run (its histogram's sum / count)."""
    d = delta(before, after)
    pod = next(iter(d.values()), {})
    n = pod.get("baton_pod_time_to_first_token_seconds_count")
    return round(1000 * pod["baton_pod_time_to_first_token_seconds_sum"] / n, 1) if n else None


def mode_served(ctx: Context) -> dict:
    """Issue 23: the same requests offline (the engine alone, same concurrency) and served
    through the router by one colocated pod, with the server's default temperature (none sent)
    and greedy: served / offline output tok/s, ITL p99 against TPOT p99, and the served TTFT
    beside the engine's own time to first token."""
    a = ctx.args
    workload = ["--workload", "random", "--input-len", a.sampling_input_len, "--output-len",
                a.sampling_output_len, "--num-requests", str(a.sampling_requests),
                "--concurrency", str(a.sampling_concurrency)]
    warm = [x if x != str(a.sampling_requests) else str(a.sampling_concurrency) for x in workload]
    runs = [r for r in [("default (T=1.0)", None, 500), ("greedy", 0.0, 600)]
            if r[0].split()[0] in a.served_runs.split(",")]
    # warm-ups draw prompts of their own: with seed - 100 the greedy warm-up's were the default
    # row's first 128 (33% prefix hits in that row, none in greedy's; rows before 2026-12-03)
    warm_seed = {seed: seed + 50 for _, _, seed in runs}
    d = ctx.out / "served"
    d.mkdir(parents=True, exist_ok=True)
    plan = [{"label": f"warm-{label}", "temperature": t, "timed": False,
             "requests": same_requests(ctx, warm, warm_seed[seed])} for label, t, seed in runs]
    plan += [{"label": label, "temperature": t, "requests": same_requests(ctx, workload, seed)}
             for label, t, seed in runs]
    (d / "runs.json").write_text(json.dumps(plan))
    cmd = [sys.executable, str(REPO / "bench" / "offline_requests.py"), "--model", ctx.model, "--runs",
           str(d / "runs.json"), "--concurrency", str(a.sampling_concurrency), "--num-kv-blocks",
           str(a.sampling_kv_blocks), "--device", ctx.devices[0], "--out", str(d / "offline.json")]
    if a.engine_options:
        cmd += ["--engine-options", a.engine_options]
    with open(d / "offline.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=a.ready_timeout_s + 120)
    offline = json.loads((d / "offline.json").read_text())["runs"]
    res: dict = {"workload": workload, "offline": offline, "results": {}}
    with deployment(ctx, "served-pod", [Pod("colocated-0", "colocated", ctx.devices[0], a.sampling_kv_blocks)]) as dep:
        for label, t, seed in runs:  # the same warm-up as offline, then the same requests
            bench(ctx, dep, dep.dir / f"warm-{seed}.json", warm + ([] if t is None else ["--temperature", "0"]),
                  warm_seed[seed])
        for label, t, seed in runs:
            before = counters(dep)
            f = dep.dir / f"{'greedy' if t is not None else 'default'}.json"
            row = rows(bench(ctx, dep, f, workload + ([] if t is None else ["--temperature", "0"]), seed))[0]
            after = counters(dep)
            row["pod_ttft_mean_ms"] = pod_ttft_mean_ms(before, after)
            row["pod_steps"] = step_times(before, after)
            off = offline[label]
            row |= {"offline_out_tok_s": off["out_tok_s"], "offline_ttft_p50_ms": off["ttft_p50_ms"],
                    "served_of_offline": round(row["out_tok_s"] / off["out_tok_s"], 3),
                    "itl_p99_of_tpot_p99": round(row["itl_p99_ms"] / row["tpot_p99_ms"], 2)
                    if row["itl_p99_ms"] is not None and row["tpot_p99_ms"] else None}
            res["results"][label] = row
        res["start"] = dep.warmup
    return res


def probe(ctx: Context, dep: Deployment) -> dict:
    """TTFT of a --probe-len prompt sent alone (a few, one after another), then at evenly spaced
    times while the mode's workload runs at --probe-load-rate."""
    from baton.bench.metrics import RequestRecord, summarize
    from baton.bench.payload import RequestOptions
    from baton.bench.runner import Load, Target

    a = ctx.args
    maker = ctx.maker()
    rng = random.Random(11)
    prompts = [maker.make(rng, a.probe_len) for _ in range(a.probe_alone + a.probe_count)]
    url = dep.routers["prefix"]
    target = Target(url + "/v1/completions", RequestOptions("completions", served_model(url)), {},
                    a.request_timeout_s, a.bench_client)
    n_bg = math.ceil(1.25 * a.probe_load_rate * a.probe_load_s) + 1
    bg = wl.mixed_workload(n_bg, 400, maker, wl.parse_range(a.long_input), wl.parse_range(a.short_output),
                           wl.parse_range(a.short_input), wl.parse_range(a.long_output))
    times = [a.probe_load_s * (0.25 + 0.6 * i / max(1, a.probe_count - 1)) for i in range(a.probe_count)]
    alone, loaded, records, duration = asyncio.run(
        _probe(target, prompts, a.probe_alone, times, bg, Load("rate", a.probe_load_rate), a.probe_load_s))

    def ms(recs: list[RequestRecord]) -> list[float | None]:
        return [round(r.ttft_s * 1e3, 1) if r.ok and r.ttft_s is not None else None for r in recs]

    def median(xs: list[float | None]) -> float | None:
        xs = [x for x in xs if x is not None]
        return round(statistics.median(xs), 1) if xs else None

    s = summarize(records, duration, a.slo_ttft_ms, a.slo_tpot_ms)
    return {"prompt_tokens": a.probe_len, "alone_ms": ms(alone), "under_load_ms": ms(loaded),
            "alone_median_ms": median(ms(alone)), "under_load_median_ms": median(ms(loaded)),
            "errors": [r.error for r in alone + loaded if not r.ok],
            "load": {"rate": a.probe_load_rate, "seconds": a.probe_load_s, "completed": s["completed"],
                     "errors": s["errors"], "ttft_p50_ms": median([s["ttft_ms"]["p50"]]),
                     "tpot_p50_ms": median([s["tpot_ms"]["p50"]])}}


async def _probe(target, prompts, n_alone, times, bg_sessions, load, load_s):
    from baton.bench.client import Client, send
    from baton.bench.metrics import RequestRecord
    from baton.bench.payload import request_body
    from baton.bench.progress import Progress
    from baton.bench.runner import run_point

    def body(ids) -> dict:
        return request_body(target.options, wl.Session(0, (wl.Turn(ids, len(ids), 2),)), 0, [])

    async with Client(target.headers, target.timeout_s, target.http_client) as http:
        async def one(ids, at: float | None = None, t0: float = 0.0) -> RequestRecord:
            if at is not None:
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            rec = RequestRecord(session=-1, turn=0, turn_input_tokens=len(ids), max_tokens=2)
            await send(http, target.url, body(ids), target.timeout_s, rec)
            return rec

        alone = []
        for ids in prompts[:n_alone]:
            alone.append(await one(ids))
            await asyncio.sleep(0.3)
        t0 = time.perf_counter()
        background = asyncio.create_task(
            run_point(target, bg_sessions, load, 400, load_s, Progress(len(bg_sessions), "", False)))
        loaded = await asyncio.gather(*(one(ids, at, t0) for ids, at in zip(prompts[n_alone:], times)))
        records, duration = await background
    return alone, list(loaded), records, duration


# -- report ---------------------------------------------------------------------------------------

def table(summary: dict) -> str:
    def f(x, n=1):
        return "-" if x is None else f"{x:.{n}f}"

    lines = []
    m = summary["modes"]
    if r := m.get("sampling", {}).get("results"):
        lines.append(f"sampling: 1 colocated pod, {' '.join(m['sampling']['workload'])}")
        lines.append(f"  {'run':<16} {'out tok/s':>9} {'TTFT p50':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'ITL p99':>8}")
        for label, x in r.items():
            lines.append(f"  {label:<16} {f(x['out_tok_s']):>9} {f(x['ttft_p50_ms']):>9} {f(x['tpot_p50_ms']):>9} "
                         f"{f(x['tpot_p99_ms']):>9} {f(x['itl_p99_ms']):>8}")
        lines.append(f"  default / greedy output tok/s: {m['sampling']['default_of_greedy']}")
    if r := m.get("served", {}).get("results"):
        lines.append(f"served (issue 23): 1 colocated pod via the router vs the engine offline, same requests, "
                     f"{' '.join(m['served']['workload'])}")
        lines.append(f"  {'run':<16} {'out tok/s':>9} {'offline':>8} {'served/off':>10} {'TTFT p50':>9} "
                     f"{'off TTFT':>8} {'pod TTFT':>8} {'TPOT p99':>9} {'ITL p99':>8} {'ITL/TPOT':>8}")
        for label, x in r.items():
            lines.append(f"  {label:<16} {f(x['out_tok_s']):>9} {f(x['offline_out_tok_s']):>8} "
                         f"{f(x['served_of_offline'], 3):>10} {f(x['ttft_p50_ms']):>9} {f(x['offline_ttft_p50_ms']):>8} "
                         f"{f(x['pod_ttft_mean_ms']):>8} {f(x['tpot_p99_ms']):>9} {f(x['itl_p99_ms']):>8} "
                         f"{f(x['itl_p99_of_tpot_p99'], 2):>8}")
            if st := x.get("pod_steps"):
                kinds = ", ".join(f"{k} {st[k]['steps']} ({f(st[k].get('p50_ms'), 1)} / {f(st[k].get('p99_ms'), 1)})"
                                  for k in ("decode", "mixed", "prefill"))
                lines.append(f"    ITL p99 at the pod {f(st['pod_itl_p99_ms'], 1)} ms, at the router "
                             f"{f(st['router_itl_p99_ms'], 1)} ms; pod steps (p50 / p99 ms): {kinds}")
                for who in ("pod", "router"):
                    lines.append(f"    {who} GC pauses (count, ms in all, p99 ms) by generation: " + ", ".join(
                        f"{g}: {x['count']} / {x['ms']} / {f(x['p99_ms'], 1)}" for g, x in st[f"{who}_gc"].items()))
    if r := m.get("routing", {}).get("results"):
        info = m["routing"]
        lines.append(f"routing: 2 colocated pods ({' + '.join(info['devices'])}), {info['tenants']} tenants x "
                     f"{info['system_tokens']}-token system prompts, {info['requests']} requests at "
                     f"{info['rate']:g} req/s, {info['kv_blocks_per_pod']} KV blocks/pod")
        lines.append(f"  {'policy':<12} {'hit %':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'req/s':>7} {'out tok/s':>9}"
                     f"  requests per pod")
        for policy, x in r.items():
            hit = None if x["hit_rate"] is None else 100 * x["hit_rate"]
            lines.append(f"  {policy:<12} {f(hit):>6} {f(x['ttft_p50_ms']):>9} {f(x['ttft_p99_ms']):>9} "
                         f"{f(x['req_s'], 2):>7} {f(x['out_tok_s']):>9}  {list(x['requests_per_pod'].values())}")
    for name in ("pd1", "pd2"):
        if not (info := m.get(name, {})).get("results"):
            continue
        lines.append(f"{name}: SLO TTFT <= {info['slo']['ttft_ms']:g} ms, TPOT <= {info['slo']['tpot_ms']:g} ms; "
                     f"colocated {info['colocated_devices']}, disagg {info['disagg_devices']}")
        lines.append(f"  {'config':<10} {'rate':>5} {'ok/err':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
                     f"{'TPOT p99':>9} {'goodput':>8} {'SLO %':>6}")
        for label, pts in info["results"].items():
            for x in pts:
                att = None if x["slo_attainment"] is None else 100 * x["slo_attainment"]
                lines.append(f"  {label:<10} {x['rate']:>5} {str(x['completed']) + '/' + str(x['errors']):>8} "
                             f"{f(x['ttft_p50_ms']):>9} {f(x['ttft_p99_ms']):>9} {f(x['tpot_p50_ms']):>9} "
                             f"{f(x['tpot_p99_ms']):>9} {f(x['goodput'], 2):>8} {f(att):>6}")
        if "kv_transfers" in info:
            lines.append(f"  disagg KV transfers into the decode pod: {info['kv_transfers']} (warm-up: "
                         f"{info.get('disagg_start', {}).get('transfers')})")
        for label, p in (info.get("ttft_4k") or {}).items():
            lines.append(f"  {p['prompt_tokens']}-token prompt TTFT, {label}: alone {p['alone_ms']} ms, under "
                         f"{p['load']['rate']:g} req/s {p['under_load_ms']} ms")
    for name, err in summary["errors"].items():
        lines.append(f"{name}: FAILED: {err}")
    return "\n".join(lines)


def archive(out: Path, results: Path, summary: dict) -> Path:
    """Everything under `out` but the model directory, as results/serving.tar.gz, and the summary
    beside it (the device returns at most 8 files)."""
    results.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=1) + "\n"
    (out / "serving-summary.json").write_text(text)
    (results / "serving-summary.json").write_text(text)
    path = results / "serving.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for p in sorted(out.iterdir()):
            if p.name != "model" and p.resolve() != path.resolve():
                t.add(p, arcname=f"serving/{p.name}")
    return path


# -- main -----------------------------------------------------------------------------------------

def parse(argv: list[str] | None) -> argparse.Namespace:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--smoke", action="store_true")
    defaults = SMOKE if pre.parse_known_args(argv)[0].smoke else GPU
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Defaults shown are the GPU run's; "
                                "--smoke changes them to tiny ones.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU rehearsal: tiny model, tiny loads, all modes")
    p.add_argument("--modes", default="auto", help=f"comma-separated of {', '.join(MODES)}; auto: "
                   "routing,pd1 on one GPU, routing,pd2 on two, all with --smoke")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: torch.cuda.device_count())")
    p.add_argument("--config", default=defaults["config"], help="config.json dir of the model shapes")
    p.add_argument("--out-dir", default=None, help="work dir (default: /tmp/baton-serving with $OUT set, "
                   "else bench/results/serving)")
    p.add_argument("--results", default=None, help="where serving.tar.gz and serving-summary.json go "
                   "(default: $OUT, else the work dir)")
    p.add_argument("--redis", default="auto", help="auto (redis-server on PATH, else .redis) or a bundle dir")
    g = p.add_argument_group("sizes")
    for k, v in defaults.items():
        if k == "config":
            continue
        kind = type(GPU[k]) if GPU[k] is not None else (float if k.endswith("rate") else int)
        g.add_argument("--" + k.replace("_", "-"), type=kind, default=v, help=HELP.get(k, f"default {GPU[k]}"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    out = Path(a.out_dir or ("/tmp/baton-serving" if os.environ.get("OUT") else REPO / "bench/results/serving"))
    results = Path(a.results or os.environ.get("OUT") or out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    def on_term(signum, frame):  # `timeout` and the device stop us with SIGTERM: clean up, archive
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.monotonic()
    summary: dict = {"schema": "baton.serving/1", "created": datetime.now(UTC).isoformat(timespec="seconds"),
                     "args": vars(a), "modes": {}, "errors": {}}
    try:
        gpus = 0 if a.smoke else (a.gpus if a.gpus is not None else gpu_count())
        if not a.smoke and gpus < 1:
            raise RuntimeError("no GPU here: rehearse with --smoke")
        devices = ["cpu", "cpu"] if a.smoke else [f"cuda:{i}" for i in range(min(gpus, 2))]
        modes = a.modes.split(",") if a.modes != "auto" else (
            list(MODES) if a.smoke else ["routing", "pd2" if gpus >= 2 else "pd1"])
        if bad := [m for m in modes if m not in MODES]:
            raise RuntimeError(f"unknown mode(s) {bad}; choose from {MODES}")
        if "pd2" in modes and len(devices) < 2:
            raise RuntimeError("pd2 needs two GPUs")
        check_imports(modes)
        summary["host"] = {"gpus": gpu_names(), "devices": devices, "python": sys.version.split()[0],
                           "redis_server": use_redis(a.redis)}
        config = TINY_CONFIG if a.config is None else json.loads(Path(a.config, "config.json").read_text())
        model = make_model_dir(out / "model", config)
        summary["model"] = {"config": a.config or "tiny", "load_format": "random"} | {
            k: config[k] for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
        ctx = Context(a, out, str(model), devices, config["vocab_size"])
        print(f"bench_serving: modes {modes} on {devices}; work dir {out}", flush=True)
        for mode in modes:
            t0 = time.monotonic()
            try:
                summary["modes"][mode] = (mode_routing(ctx) if mode == "routing" else mode_sampling(ctx)
                                          if mode == "sampling" else mode_served(ctx) if mode == "served"
                                          else mode_pd(ctx, mode))
            except (RuntimeError, OSError, httpx.HTTPError, ValueError) as e:
                summary["errors"][mode] = f"{type(e).__name__}: {e}"[:4000]
                print(f"[{mode}] failed: {e}", file=sys.stderr, flush=True)
            summary["modes"].setdefault(mode, {})["wall_s"] = round(time.monotonic() - t0, 1)
            print(f"[{mode}] done in {time.monotonic() - t0:.0f} s", flush=True)
    except KeyboardInterrupt:
        summary["errors"]["interrupted"] = "stopped by a signal; results so far are archived"
    except RuntimeError as e:
        summary["errors"]["setup"] = str(e)
    finally:
        summary["wall_s"] = round(time.monotonic() - t_start, 1)
        path = archive(out, results, summary)
        print("\n" + table(summary), flush=True)
        print(f"\nbench_serving: {path} and {results / 'serving-summary.json'} ({summary['wall_s']:.0f} s)")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
