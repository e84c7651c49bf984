"""What a step that decodes and prefills at once costs, on a GPU: the numbers behind the
prompt-token cap of steps that decode (`max_prefill_tokens_when_decoding`, issue 23).

A batch of `--decodes` running sequences (context `--ctx`) decodes every step; before each
timed step new prompts of C tokens in all arrive (at most --prompt-len each; max_tokens 1,
so they leave after their step). For C = 0 the step is a plain decode step (the CUDA
graph). Otherwise, each a row: "one pass" runs decodes and prompt chunks in one eager
forward pass; "split" replays the decodes' graph and runs the prompt chunks eagerly after
it; "split+graph" (the engine's default on a GPU) runs the prompt chunks as a prefill graph. Per C: wall time per step and GPU-busy time per
step (the sum of its kernels' times, torch.profiler): wall above busy is CPU time the GPU
waited for. What a mixed step costs streams is its wall time against the decode step's.
Run: python bench/bench_mixed_step.py [--out FILE]; also on the CPU with a tiny config (--smoke).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import CONFIGS, inject  # noqa: E402

from baton.engine.config import EngineConfig  # noqa: E402
from baton.engine.engine import LLMEngine  # noqa: E402
from baton.engine.sampling_params import SamplingParams  # noqa: E402

SAMPLED = SamplingParams(max_tokens=4096, ignore_eos=True)  # the API's default temperature, 1.0
ONE = SamplingParams(max_tokens=1, ignore_eos=True)
IDS = itertools.count()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mixed_steps(engine: LLMEngine, chunk: int, reps: int, rng: random.Random, prompt_len: int) -> list[float]:
    """Wall seconds of `reps` steps, each with new prompts of `chunk` tokens in all beside the decodes."""
    dev, top = engine.runner.device, engine.model_cfg.vocab_size
    times = []
    for _ in range(reps):
        left = chunk
        while left:
            n = min(left, prompt_len)
            engine.add_request(f"p{next(IDS)}", [rng.randrange(top // 4, top // 2) for _ in range(n)], ONE)
            left -= n
        sync(dev)
        t = time.perf_counter()
        engine.step()
        sync(dev)
        times.append(time.perf_counter() - t)
    return times


def gpu_busy(engine: LLMEngine, chunk: int, rng: random.Random, prompt_len: int, steps: int = 3):
    """(GPU-busy ms per step, the top kernels' ms per step), or (None, []) off CUDA."""
    if engine.runner.device.type != "cuda":
        return None, []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        mixed_steps(engine, chunk, steps, rng, prompt_len)
    per: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:60]] = per.get(e.name[:60], 0.0) + e.device_time_total
    top = sorted(per.items(), key=lambda kv: -kv[1])[:8]
    return sum(per.values()) / steps / 1e3, [(n, round(t / steps / 1e3, 3)) for n, t in top]


def host_cost(engine: LLMEngine, chunk: int, rng: random.Random, prompt_len: int, steps: int = 5) -> str:
    """Where a mixed step's host time goes: cProfile over `steps` steps (own time per
    function), and the host time of one launch of each kind of op the eager pass runs."""
    import cProfile
    import io
    import pstats

    from baton.kernels import ops

    prof = cProfile.Profile()
    prof.enable()
    mixed_steps(engine, chunk, steps, rng, prompt_len)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(28)
    lines = [f"host profile of {steps} steps with {chunk} prompt tokens (split={engine.runner.split_mixed})",
             text.getvalue()]
    dev, cfg = engine.runner.device, engine.model_cfg
    x = torch.randn(chunk, cfg.hidden_size, device=dev, dtype=engine.runner.dtype)
    w = torch.ones(cfg.hidden_size, device=dev, dtype=engine.runner.dtype)
    lin = engine.runner.model.layers[0].mlp.gate_up_proj
    cases = {"ops.rms_norm (Triton)": lambda: ops.rms_norm(x, w, 1e-6),
             "ops.fused_add_rms_norm (Triton)": lambda: ops.fused_add_rms_norm(x, x, w, 1e-6),
             "ops.silu_and_mul (Triton)": lambda: ops.silu_and_mul(lin(x)),
             "gate_up nn.Linear (cuBLAS)": lambda: lin(x),
             "torch.add (ATen)": lambda: x + x}
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        sync(dev)
        t = time.perf_counter()
        for _ in range(200):
            fn()
        host = (time.perf_counter() - t) / 200
        sync(dev)
        lines.append(f"  host time per call, {name}: {host * 1e6:.1f} us")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(CONFIGS / "qwen3-0.6b"))
    ap.add_argument("--decodes", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=640)
    ap.add_argument("--chunks", default="0,256,512,1024,2048,4096,8192,16384")
    ap.add_argument("--prompt-len", type=int, default=640, help="longest new prompt (C is split into such)")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--host-profile", type=int, default=512, help="C of the host-time profile (0: none)")
    ap.add_argument("--smoke", action="store_true", help="CPU: few, small steps (give a small --config)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.smoke:
        a.decodes, a.ctx, a.chunks, a.reps, a.prompt_len, a.host_profile = 4, 32, "0,16,64", 2, 32, 16
    chunks = [int(c) for c in a.chunks.split(",")]
    engine = LLMEngine(a.config, EngineConfig(load_format="random", num_kv_blocks=20000 if not a.smoke else 256,
                                              max_num_batched_tokens=max(chunks) + a.decodes,
                                              max_prefill_tokens_when_decoding=max(chunks) + a.decodes))
    rng = random.Random(0)
    inject(engine, a.decodes, a.ctx, SAMPLED)
    mixed_steps(engine, 0, 3, rng, a.prompt_len)
    rows = []
    graphs = engine.runner.prefill_graphs
    ways = {"one pass": (False, {}), "split": (True, {}), "split+graph": (True, graphs)} if graphs else \
        {"one pass": (False, {}), "split": (True, {})}
    for c in chunks:
        for way, (split, prefill) in ((("decode", (True, graphs)),) if c == 0 else ways.items()):
            engine.runner.split_mixed, engine.runner.prefill_graphs = split, prefill
            mixed_steps(engine, c, 2, rng, a.prompt_len)  # warm-up: first use of these shapes
            wall = sorted(mixed_steps(engine, c, a.reps, rng, a.prompt_len))[a.reps // 2]
            busy, top = gpu_busy(engine, c, rng, a.prompt_len)
            rows.append(dict(chunk=c, way=way,
                             wall_ms=round(wall * 1e3, 3), gpu_busy_ms=busy and round(busy, 3), top_kernels=top))
    if a.host_profile:
        engine.runner.split_mixed, engine.runner.prefill_graphs = engine.config.split_mixed_steps, graphs
        print(host_cost(engine, a.host_profile, rng, a.prompt_len))
    base = rows[0]["wall_ms"] if chunks[0] == 0 else None
    for r in rows:
        r["x_decode_step"] = round(r["wall_ms"] / base, 2) if base else None
    doc = dict(schema="baton.mixed_step/1", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), config=a.config,
               decodes=a.decodes, ctx=a.ctx, prompt_len=a.prompt_len, device=str(engine.runner.device),
               gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None, rows=rows)
    if a.out:
        Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    for r in rows:
        if r["chunk"] == 2048 and r["top_kernels"]:
            print(f"top kernels, C=2048, {r['way']}: " + ", ".join(f"{n} {t:.2f}" for n, t in r["top_kernels"]))
    print(f"{a.decodes} decodes at ctx ~{a.ctx} + new prompts of C tokens (<= {a.prompt_len} each) per step, "
          f"median of {a.reps}")
    print(f"{'C':>6} {'way':>11} {'wall ms':>9} {'GPU busy ms':>12} {'x decode':>9}")
    for r in rows:
        busy = f"{r['gpu_busy_ms']:.2f}" if r["gpu_busy_ms"] is not None else "-"
        print(f"{r['chunk']:>6} {r['way']:>11} {r['wall_ms']:>9.2f} {busy:>12} {r['x_decode_step'] or 0:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
