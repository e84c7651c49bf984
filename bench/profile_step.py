"""Where a decode step's time goes, on a GPU: the diagnosis behind the engine roofline rows.

1. Each Qwen3-8B weight matmul alone (F.linear, bf16, CUDA-graph replays) at the decode
   batch sizes: bytes/s against the HBM bandwidth of the same run. This is the ceiling the
   decode step can reach, since weights are most of its bytes.
2. torch.profiler over engine decode steps: wall time per step, GPU-busy time per step
   (sum of kernel times), the gap (CPU work the GPU waits for), and the top kernels with
   their time and count per step.
Run: python bench/profile_step.py; writes $OUT/profile_step.json and profile_step.txt.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import CONFIGS, hbm_bandwidth, inject, time_steps  # noqa: E402

from baton.engine.config import EngineConfig  # noqa: E402
from baton.engine.engine import LLMEngine  # noqa: E402


def graph_time(fn, reps: int = 50) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps / 10


def matmuls(bw: float) -> list[dict]:
    h, inter, hq, hkv, d, vocab = 4096, 12288, 32, 8, 128, 151936
    shapes = {"qkv": (hq * d + 2 * hkv * d, h), "o": (h, hq * d), "gate_up": (2 * inter, h),
              "down": (h, inter), "lm_head": (vocab, h)}
    rows = []
    for m in (1, 8, 16, 64, 256):
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            dt = graph_time(lambda: F.linear(x, w))
            nbytes = (n * k + m * k + m * n) * 2
            rows.append(dict(m=m, op=name, us=round(dt * 1e6, 1), gbs=round(nbytes / dt / 1e9),
                             of_bw=round(nbytes / dt / bw, 3)))
            del w, x
    return rows


def profile_points(points) -> tuple[list[dict], str]:
    from torch.profiler import ProfilerActivity, profile

    max_ctx = max(c for _, c in points) + 256
    engine = LLMEngine(CONFIGS / "qwen3-8b", EngineConfig(
        load_format="random", max_num_seqs=256, max_model_len=max_ctx, enable_prefix_caching=False))
    engine.runner.kv_cache.normal_()
    rows, text = [], []
    steps = 5
    for batch, ctx in points:
        inject(engine, batch, ctx)
        wall = time_steps(engine, steps)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        for rid in list(engine.seqs):
            engine.abort_request(rid)
        per = defaultdict(lambda: [0.0, 0])
        busy = 0.0
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                dur = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
                per[e.name[:70]][0] += dur
                per[e.name[:70]][1] += 1
                busy += dur
        busy_ms = busy / steps / 1e3
        top = sorted(per.items(), key=lambda kv: -kv[1][0])[:14]
        rows.append(dict(batch=batch, ctx=ctx, wall_ms=round(wall * 1e3, 3), gpu_busy_ms=round(busy_ms, 3),
                         kernels_per_step=round(sum(c for _, c in per.values()) / steps, 1),
                         top=[dict(name=n, us_per_step=round(t / steps, 1), per_step=c / steps) for n, (t, c) in top]))
        text.append(f"\n== batch {batch} x ctx {ctx}: wall {wall*1e3:.2f} ms/step, GPU busy {busy_ms:.2f} ms/step, "
                    f"{rows[-1]['kernels_per_step']} kernels/step")
        for n, (tt, c) in top:
            text.append(f"  {tt/steps:9.1f} us  x{c/steps:6.1f}  {n}")
        text.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    del engine
    torch.cuda.empty_cache()
    return rows, "\n".join(text)


def main() -> None:
    bw = hbm_bandwidth()
    print(f"HBM bandwidth (2 x copy): {bw/1e9:.0f} GB/s", flush=True)
    mm = matmuls(bw)
    prof_rows, text = profile_points([(1, 1024), (8, 4096), (64, 2048), (256, 1024)])
    out = Path(os.environ.get("OUT", "/tmp"))
    (out / "profile_step.json").write_text(json.dumps(dict(hbm_gbs=bw / 1e9, matmul=mm, steps=prof_rows), indent=1))
    (out / "profile_step.txt").write_text(text)
    print(text)
    print("\nmatmul (bf16, graph replays): m op us GB/s of_bw")
    for r in mm:
        print(f"  {r['m']:4d} {r['op']:8s} {r['us']:8.1f} {r['gbs']:6d} {r['of_bw']:.3f}")
    print("\nstep: batch ctx wall_ms gpu_busy_ms kernels")
    for r in prof_rows:
        print(f"  {r['batch']:4d} {r['ctx']:5d} {r['wall_ms']:8.2f} {r['gpu_busy_ms']:8.2f} {r['kernels_per_step']}")


if __name__ == "__main__":
    main()
