"""Engine benchmarks on a GPU, each against a ceiling measured in the same run.

1. HBM bandwidth: 2 x bytes/s of a large device-to-device copy (read + write).
2. Decode step, Qwen3-8B shapes (random weights), batch x context: time per engine step
   (CPU work between steps included) against the memory roofline
   (weight bytes + KV bytes read) / HBM bandwidth; greedy rows, and all rows sampled
   (temperature 1.0, top_p 0.95) beside them.
3. Offline throughput, Qwen3-0.6B shapes, 256 requests with input and output lengths
   uniform in 100-1024 (nano-vllm's workload), with LLM()'s default options: the headline
   samples at temperature 0.6 as nano-vllm's own benchmark does; greedy beside it, and the
   step token budget (max_num_batched_tokens) at 2k/8k/16k; output tokens/s against
   transformers' generate on the same GPU and against this workload's roofline.
Run: python bench/bench_engine.py [--quick]; JSON goes to $OUT/engine.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import LLMEngine
from baton.engine.llm import OFFLINE_DEFAULTS
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import Status

CONFIGS = Path(__file__).with_name("configs")


def hbm_bandwidth(nbytes: int = 2 << 30) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    a.random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * nbytes * reps / (time.perf_counter() - t)


def weight_bytes(engine: LLMEngine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())


GREEDY = SamplingParams(max_tokens=4096, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=4096, temperature=1.0, top_p=0.95, ignore_eos=True)


def inject(engine: LLMEngine, batch: int, ctx: int, params: SamplingParams = GREEDY) -> None:
    """Put `batch` sequences of `ctx` tokens straight into the running batch (their KV
    holds random values: decode time does not depend on them), one token left to compute."""
    sched, bm = engine.scheduler, engine.block_manager
    rng = random.Random(batch * 100003 + ctx)
    top = min(engine.model_cfg.vocab_size, 100000)  # a tiny model's vocabulary is smaller
    for i in range(batch):
        prompt = [rng.randrange(min(1000, top // 2), top) for _ in range(ctx)]
        engine.add_request(f"d{batch}-{ctx}-{i}", prompt, params)
    while sched.waiting:
        seq = sched.waiting.popleft()
        bm.admit(seq, [])
        bm.allocate(seq, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens - 1
        seq.status = Status.RUNNING
        sched.running.append(seq)


def time_steps(engine: LLMEngine, steps: int, warmup: int = 3) -> float:
    """Seconds per engine step over `steps` steps, after `warmup` untimed ones."""
    for _ in range(warmup):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def decode_steps(engine: LLMEngine, batch: int, ctx: int, steps: int = 20, params=GREEDY) -> float:
    inject(engine, batch, ctx, params)
    dt = time_steps(engine, steps)
    for rid in list(engine.seqs):
        engine.abort_request(rid)
    return dt


def profile_decode(engine: LLMEngine, batch: int, ctx: int) -> str:
    """torch profiler over a few decode steps: top kernels and the CPU time between steps."""
    from torch.profiler import ProfilerActivity, profile

    inject(engine, batch, ctx)
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    for rid in list(engine.seqs):
        engine.abort_request(rid)
    by_gpu = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15)
    by_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return f"decode step profile, batch {batch} x ctx {ctx}, 5 steps\n\nby GPU time\n{by_gpu}\n\nby CPU time\n{by_cpu}\n"


SAMPLED_POINTS = {(16, 4096), (64, 2048), (256, 1024)}  # all rows sampled, beside greedy


def bench_decode(bw: float, quick: bool) -> list[dict]:
    points = [(1, 1024), (1, 8192), (8, 4096), (16, 4096), (64, 2048), (128, 1024), (256, 1024)]
    if quick:
        points = [(1, 1024), (16, 4096), (64, 2048)]
    max_ctx = max(c for _, c in points) + 256
    engine = LLMEngine(CONFIGS / "qwen3-8b", EngineConfig(
        load_format="random", max_num_seqs=256, max_model_len=max_ctx, enable_prefix_caching=False))
    engine.runner.kv_cache.normal_()  # random KV, never zeros
    wb = weight_bytes(engine)
    kv_tok = engine.model_cfg.kv_bytes_per_token(2)
    rows = []
    for batch, ctx in points:
        if batch * (ctx + 64) > engine.block_manager.num_blocks * engine.config.block_size:
            continue
        floor = (wb + batch * ctx * kv_tok) / bw
        for name, params in (("greedy", GREEDY), ("sampled", SAMPLED)):
            if name == "sampled" and (batch, ctx) not in SAMPLED_POINTS:
                continue
            dt = decode_steps(engine, batch, ctx, params=params)
            rows.append(dict(rows=name, batch=batch, ctx=ctx, step_ms=round(dt * 1e3, 3),
                             roofline_ms=round(floor * 1e3, 3), of_roofline=round(floor / dt, 3),
                             tok_s=round(batch / dt, 1)))
            print("decode", rows[-1], flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "profile_decode.txt").write_text(profile_decode(engine, 64, 2048))
    del engine
    torch.cuda.empty_cache()
    return rows


def workload(n: int = 256, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(1000, 100000) for _ in range(rng.randint(100, 1024))], rng.randint(100, 1024))
            for _ in range(n)]


def workload_roofline(engine: LLMEngine, reqs, bw: float, peak_flops: float) -> float:
    """Output tokens/s if every step only streamed weights + live KV at HBM bandwidth and
    prefill ran at the matmul peak, all requests in one batch."""
    wb, kv_tok = weight_bytes(engine), engine.model_cfg.kv_bytes_per_token(2)
    params = wb / 2
    prefill = sum(2 * params * len(p) for p, _ in reqs) / peak_flops
    t = prefill
    for step in range(max(o for _, o in reqs)):
        live = [len(p) + step for p, o in reqs if o > step]
        t += (wb + sum(live) * kv_tok) / bw
    return sum(o for _, o in reqs) / t


def offline_run(reqs, temperature: float, **options) -> tuple[int, float]:
    """(output tokens, seconds) of LLM's engine with `options` over reqs, nano-vllm's way:
    every request added at once, steps until done (warm-up first: kernel compilation)."""
    engine = LLMEngine(CONFIGS / "qwen3-0.6b", EngineConfig(load_format="random", max_model_len=2304,
                                                           **(OFFLINE_DEFAULTS | options)))
    for i, (p, _) in enumerate(reqs[:4]):
        engine.add_request(f"w{i}", p, SamplingParams(max_tokens=8, temperature=temperature, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i, (p, o) in enumerate(reqs):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=o, temperature=temperature, ignore_eos=True))
    produced = 0
    while engine.has_unfinished_requests():
        produced += len(engine.step())
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    del engine
    torch.cuda.empty_cache()
    return produced, dt


def bench_offline(bw: float, quick: bool) -> dict:
    reqs = workload(64 if quick else 256)
    engine = LLMEngine(CONFIGS / "qwen3-0.6b", EngineConfig(load_format="random", max_model_len=2304))
    roof = workload_roofline(engine, reqs, bw, 800e12)
    del engine
    torch.cuda.empty_cache()
    # every kernel compiled (prefill shapes, the sampler) before any timed run
    offline_run([(p, 32) for p, _ in reqs[:64]], 0.6)
    offline_run([(p, 32) for p, _ in reqs[:64]], 0.0)
    runs = []  # the headline first: LLM()'s defaults, temperature 0.6
    for name, temperature, options in [
        ("sampled T=0.6, defaults", 0.6, {}), ("greedy, defaults", 0.0, {}),
        ("sampled T=0.6, max_num_batched_tokens 2048", 0.6, dict(max_num_batched_tokens=2048)),
        ("sampled T=0.6, max_num_batched_tokens 8192", 0.6, dict(max_num_batched_tokens=8192)),
        ("sampled T=0.6, max_num_batched_tokens 16384", 0.6, dict(max_num_batched_tokens=16384)),
    ]:
        produced, dt = offline_run(reqs, temperature, **options)
        runs.append(dict(run=name, output_tokens=produced, seconds=round(dt, 2), tok_s=round(produced / dt, 1),
                         of_roofline=round(produced / dt / roof, 3)))
        print("offline", runs[-1], flush=True)
    hf = hf_throughput(reqs[:64], quick)
    head, greedy = runs[0]["tok_s"], runs[1]["tok_s"]
    return dict(requests=len(reqs), runs=runs, baton_tok_s=head, greedy_tok_s=greedy,
                sampled_of_greedy=round(head / greedy, 3), transformers_tok_s=round(hf, 1),
                vs_transformers=round(head / hf, 1), roofline_tok_s=round(roof, 1),
                of_roofline=round(head / roof, 3))


def hf_throughput(reqs, quick: bool) -> float:
    """transformers' generate, one padded batch of 64 (256 ran out of memory), bf16, sdpa."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(CONFIGS / "qwen3-0.6b")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    new = 128 if quick else 256  # a fixed length for the batch; rate = generated tokens / time
    width = max(len(p) for p, _ in reqs)
    ids = torch.zeros(len(reqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, _) in enumerate(reqs):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return (out.shape[1] - width) * len(reqs) / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="decode,offline")
    args = ap.parse_args(argv)
    bw = hbm_bandwidth()
    res = dict(device=torch.cuda.get_device_name(), hbm_GBps=round(bw / 1e9, 1))
    only = args.only.split(",")
    if "decode" in only:
        res["decode"] = bench_decode(bw, args.quick)
    if "offline" in only:
        res["offline"] = bench_offline(bw, args.quick)
        print("offline", res["offline"], flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "engine.json").write_text(json.dumps(res, indent=1))
    print(f"\nengine on {res['device']}, HBM {res['hbm_GBps']} GB/s (2 x copy)")
    if "decode" in res:
        print(f"{'rows':>8} {'batch':>5} {'ctx':>6} {'step ms':>8} {'roofline ms':>11} {'of roofline':>11} {'tok/s':>8}")
        for r in res["decode"]:
            print(f"{r['rows']:>8} {r['batch']:>5} {r['ctx']:>6} {r['step_ms']:>8} {r['roofline_ms']:>11} "
                  f"{r['of_roofline']:>11} {r['tok_s']:>8}")
    if "offline" in res:
        o = res["offline"]
        for r in o["runs"]:
            print(f"offline {o['requests']} req, {r['run']:<45} {r['tok_s']:>9} tok/s  {r['of_roofline']:.0%} of roofline")
        print(f"headline (sampled, defaults) {o['baton_tok_s']} tok/s = {o['sampled_of_greedy']:.0%} of greedy; "
              f"transformers {o['transformers_tok_s']} ({o['vs_transformers']}x); roofline {o['roofline_tok_s']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
