"""FP8 on the GPU, each number against a ceiling measured in the same run (issue 26).

1. Ceilings: HBM bandwidth (2 x bytes/s of a 2 GiB device copy), and the FP8 and bf16
   matmul rates (torch._scaled_mm with per-row/per-column scales, and a bf16 matmul) on
   Qwen3-8B's prefill shapes.
2. Decode step, Qwen3-8B shapes (random weights, CUDA graphs, the whole engine step as
   bench_engine.py times it), bf16 against FP8 KV, FP8 weights, both: each against its own
   memory roofline (weight bytes + KV bytes read) / HBM bandwidth, and the speed-up over
   bf16 at the same batch x context (targets: >= 0.80 of roofline, >= 1.6x at 64 x 4k for
   FP8 KV + weights); FP8 KV alone at 16 x 32k.
3. Prefill, one 8k-token prompt, one engine step: the model's TFLOP/s with FP8 weights and
   with bf16, against the FP8 and bf16 matmul rates of (1); and each linear alone (the
   per-token activation quantization included) against _scaled_mm on pre-quantized inputs.
4. Offline throughput, nano-vllm's workload (Qwen3-0.6B shapes, bench_engine.workload):
   bf16 against FP8 KV + weights (--offline).
5. KV push bytes: one layer of a 4k-token Qwen3-8B request as the wire moves it.
Run: python bench/bench_fp8.py [--offline]; JSON goes to $OUT/fp8.json when OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import LLMEngine
from baton.engine.quant import Fp8Linear, quantize_rows
from baton.engine.sampling_params import SamplingParams
from baton.kvtransfer.layout import KVLayout
from bench.bench_engine import CONFIGS, decode_steps, hbm_bandwidth, offline_run, profile_decode, workload

VARIANTS = {
    "bf16": {},
    "fp8 KV": dict(kv_cache_dtype="fp8"),
    "fp8 weights": dict(quantization="fp8"),
    "fp8 KV + weights": dict(kv_cache_dtype="fp8", quantization="fp8"),
}
# the same engine with each FP8 linear quantizing its input in a kernel of its own, as before
# the norms and silu_and_mul took it over (not an option of the engine: set on the class here)
UNFUSED = "fp8 KV + W (quant apart)"
# (batch, context) per variant; 16 x 32k is the long-context point for FP8 KV
POINTS = {
    "bf16": [(1, 1024), (16, 4096), (64, 4096), (16, 32768)],
    "fp8 KV": [(16, 4096), (64, 4096), (16, 32768)],
    "fp8 weights": [(1, 1024), (64, 4096)],
    "fp8 KV + weights": [(1, 1024), (16, 4096), (64, 4096), (16, 32768)],
    UNFUSED: [(1, 1024), (64, 4096)],
}
PREFILL_TOKENS = 8192


def timed(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    times = []
    for _ in range(reps):
        ev[0].record()
        fn()
        ev[1].record()
        ev[1].synchronize()
        times.append(ev[0].elapsed_time(ev[1]) / 1e3)
    return sorted(times)[len(times) // 2]


def model_bytes(engine: LLMEngine) -> int:
    m = engine.runner.model
    return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])


def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    h, d = cfg.hidden_size, cfg.head_dim
    return {"qkv": ((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h), "o": (h, cfg.num_heads * d),
            "gate_up": (2 * cfg.intermediate_size, h), "down": (h, cfg.intermediate_size)}


def matmul_ceilings(cfg, m: int) -> list[dict]:
    """Per linear of the model at m tokens: bf16 matmul, _scaled_mm on FP8 inputs already
    quantized, and Fp8Linear (quantizing the activations per token inside)."""
    rows = []
    for name, (n, k) in linear_shapes(cfg).items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        f8 = Fp8Linear.from_linear(lin)
        x8, xs = quantize_rows(x)
        flops = 2 * m * n * k
        t_bf16 = timed(lambda: x @ w.t())
        t_mm = timed(lambda: torch._scaled_mm(x8, f8.weight8.t(), scale_a=xs, scale_b=f8.weight_scale[None],
                                              out_dtype=torch.bfloat16))
        t_lin = timed(lambda: f8(x))
        err = ((f8(x).float() - x.float() @ w.float().t()).norm() / (x.float() @ w.float().t()).norm()).item()
        rows.append(dict(linear=name, m=m, n=n, k=k, bf16_tflops=round(flops / t_bf16 / 1e12, 1),
                         scaled_mm_tflops=round(flops / t_mm / 1e12, 1),
                         fp8_linear_tflops=round(flops / t_lin / 1e12, 1), fp8_rel_err=round(err, 4)))
        print("matmul", rows[-1], flush=True)
    return rows


def graph_time(fn, reps: int = 10) -> float:
    """Seconds per call of fn, replayed from a CUDA graph of `reps` calls (median of 5): how
    the engine's decode step runs its kernels, without the launch cost of eager calls."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ts = []
    for _ in range(5):
        ev[0].record()
        g.replay()
        ev[1].record()
        ev[1].synchronize()
        ts.append(ev[0].elapsed_time(ev[1]) / 1e3 / reps)
    return sorted(ts)[2]


def linear_sweep(bw: float) -> tuple[list[dict], dict]:
    """Decode's linears (Qwen3-8B shapes) at 1, 16 and 64 rows, CUDA-graph timed: bf16 matmul,
    the activation quantization alone, torch._scaled_mm and the Triton FP8 matmul over tiles,
    on the same quantized inputs. Per padded row count (16: 1 and 16 rows; 64) the tile with
    the least total time over the four linears, or None where _scaled_mm's total is less:
    set into triton_fp8_matmul.TILES for the engine runs below, and returned."""
    from baton.engine.config import ModelConfig
    from baton.kernels import reference as ref
    from baton.kernels import triton_fp8_matmul as tfm

    tiles = [dict(block_n=32, block_k=256, num_warps=4, num_stages=4),
             dict(block_n=64, block_k=128, num_warps=4, num_stages=4),
             dict(block_n=16, block_k=256, num_warps=4, num_stages=4),
             dict(block_n=64, block_k=256, num_warps=4, num_stages=3),
             dict(block_n=32, block_k=128, num_warps=4, num_stages=6),
             dict(block_n=128, block_k=128, num_warps=4, num_stages=4)]
    shapes = linear_shapes(ModelConfig.from_dir(CONFIGS / "qwen3-8b"))
    rows, totals = [], {}
    for m in (1, 16, 64):
        bucket = max(16, 1 << (m - 1).bit_length())
        for name, (n, k) in shapes.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            x8, xs = quantize_rows(x)
            w8, ws = quantize_rows(w)
            ws = ws.view(-1)
            expect = ref.fp8_matmul(x8, xs, w8, ws, None, torch.float32)
            r = dict(m=m, linear=name, n=n, k=k, fp8_weight_us=round(n * k / bw * 1e6, 2))
            r["bf16_us"] = graph_time(lambda: x @ w.t()) * 1e6
            r["quant_us"] = graph_time(lambda: quantize_rows(x)) * 1e6
            r["scaled_mm_us"] = graph_time(lambda: torch._scaled_mm(
                x8, w8.t(), scale_a=xs, scale_b=ws[None], out_dtype=torch.bfloat16)) * 1e6
            totals[(bucket, "scaled_mm")] = totals.get((bucket, "scaled_mm"), 0.0) + r["scaled_mm_us"]
            for i, t in enumerate(tiles):
                try:
                    y = tfm.fp8_matmul(x8, xs, w8, ws, None, torch.float32, t)
                    err = ((y - expect).norm() / expect.norm()).item()
                    us = graph_time(lambda: tfm.fp8_matmul(x8, xs, w8, ws, None, torch.bfloat16, t)) * 1e6
                except Exception as e:  # noqa: BLE001 (a tile that does not compile: recorded)
                    r[f"tile{i}_error"] = str(e)[:200]
                    us, err = float("inf"), 1.0
                r[f"tile{i}_us"], r[f"tile{i}_err"] = round(us, 2), round(err, 6)
                totals[(bucket, i)] = totals.get((bucket, i), 0.0) + (us if err < 1e-2 else float("inf"))
            rows.append({kk: (round(v, 2) if isinstance(v, float) else v) for kk, v in r.items()})
            print("linear", rows[-1], flush=True)
    chosen = {}
    for bucket in (16, 64):
        best = min(range(len(tiles)), key=lambda i: totals[(bucket, i)])
        use = totals[(bucket, best)] < totals[(bucket, "scaled_mm")]
        chosen[bucket] = dict(tiles[best]) if use else None
        print(f"linear rows <= {bucket}: triton best {tiles[best]} {totals[(bucket, best)]:.1f} us, "
              f"scaled_mm {totals[(bucket, 'scaled_mm')]:.1f} us over the four linears", flush=True)
    tfm.TILES.update(chosen)
    tfm.TILES[32] = chosen[64]  # not measured: 32 rows take the 64-row choice
    return rows, {str(k): v for k, v in chosen.items()}


def attention_sweep(bw: float) -> tuple[list[dict], dict]:
    """Decode attention alone, one layer of Qwen3-8B (32 q heads, 8 KV heads, D 128), pages
    scattered (a random block table), CUDA-graph timed: bf16 cache against FP8 cache over
    tiles and read paths (kv_words: the cache read as int32 words, unpacked in registers;
    prefetch_bt: each tile's block ids loaded with the tile before, so Triton pipelines the
    K/V loads 2-3 tiles deep). Returns the rows and the best FP8 tile per regime (64 x 4k:
    "wide", one split; 16 x 32k: "split"), which the engine runs below take
    (triton_attention.DECODE_FP8_TILES). "of HBM" is against the copy bandwidth (read +
    write): reads alone can pass 1.0."""
    from baton.kernels import triton_attention as ta

    rows, total = [], {}
    pps = ta.DECODE_PROGRAMS_PER_SM
    words = dict(kv_words=True, programs_per_sm=pps)
    tiles = [dict(block_n=64, num_warps=4, num_stages=3, prefetch_bt=True, **words),
             dict(block_n=64, num_warps=4, num_stages=4, prefetch_bt=True, **words),
             dict(block_n=64, num_warps=2, num_stages=3, prefetch_bt=True, **words),
             dict(block_n=128, num_warps=4, num_stages=3, prefetch_bt=True, **words),
             # 2 warps over more programs: at 64 x 4k the batch gives ~4 programs an SM, so these
             # split the context 2 and 4 ways (a latency-bound tile gains from more in flight)
             dict(block_n=64, num_warps=2, num_stages=3, prefetch_bt=True, kv_words=False, programs_per_sm=6),
             dict(block_n=64, num_warps=2, num_stages=3, prefetch_bt=True, kv_words=False, programs_per_sm=12),
             dict(block_n=64, num_warps=2, num_stages=3, prefetch_bt=True, kv_words=True, programs_per_sm=6),
             dict(block_n=64, num_warps=4, num_stages=3, prefetch_bt=True, kv_words=True, programs_per_sm=6),
             dict(block_n=64, num_warps=4, num_stages=3, prefetch_bt=False, **words),
             dict(block_n=64, num_warps=2, num_stages=3, prefetch_bt=True, kv_words=False, programs_per_sm=pps),
             dict(block_n=64, num_warps=2, num_stages=3, prefetch_bt=False, kv_words=False, programs_per_sm=pps)]
    real_tiles = {k: dict(v) for k, v in ta.DECODE_FP8_TILES.items()}
    for batch, ctx in ((64, 4096), (16, 32768)):
        nblk = batch * ctx // 16
        bt = torch.randperm(nblk, device="cuda").to(torch.int32).view(batch, -1)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        kv16 = torch.randn(2, nblk, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
        kv8 = kv16.to(torch.float8_e4m3fn)
        expect = ta.decode_attention(q, kv8.to(torch.bfloat16), lens, bt, 128**-0.5).float()
        bf16_tile = {k: v for k, v in ta.decode_config(batch, 8, ctx, 128, ta._sm_count(q.device)).items()
                     if k != "num_splits"}
        cases = [("bf16", kv16, dict(bf16_tile, programs_per_sm=pps)),
                 ("bf16 + prefetch_bt", kv16, dict(bf16_tile, programs_per_sm=pps, prefetch_bt=True))]
        cases += [("fp8", kv8, t) for t in tiles]
        for name, kv, tile in cases:
            ta.DECODE_FP8_TILES = {"wide": dict(tile), "split": dict(tile)}
            cfg = {} if name == "fp8" else {k: v for k, v in tile.items() if k != "programs_per_sm"}
            try:
                dt = graph_time(lambda: ta.decode_attention_into(out, q, kv, lens, bt, 128**-0.5, cfg), reps=5)
                err = ((out.float() - expect).norm() / expect.norm()).item()
            except Exception as e:  # noqa: BLE001 (a tile that does not compile: recorded)
                rows.append(dict(case=name, batch=batch, ctx=ctx, tile=tile, error=str(e)[:200]))
                print("attention", rows[-1], flush=True)
                total[(batch, str(tile))] = float("inf")
                continue
            nbytes = kv.numel() * kv.element_size()
            splits = ta.decode_config(batch, 8, ctx, 128, ta._sm_count(q.device), kv.dtype == torch.float8_e4m3fn)
            rows.append(dict(case=name, batch=batch, ctx=ctx, tile=tile, splits=splits["num_splits"],
                             us=round(dt * 1e6, 1), of_hbm=round(nbytes / dt / bw, 3), rel_err=round(err, 4)))
            print("attention", rows[-1], flush=True)
            if name == "fp8":
                total[(batch, str(tile))] = dt if err < 2e-2 else float("inf")
        del kv16, kv8
        torch.cuda.empty_cache()
    ta.DECODE_FP8_TILES = real_tiles
    for regime, batch in (("wide", 64), ("split", 16)):
        ta.DECODE_FP8_TILES[regime] = dict(min(tiles, key=lambda t: total.get((batch, str(t)), float("inf"))))
    return rows, ta.DECODE_FP8_TILES


def fill_kv(engine: LLMEngine) -> None:
    """Random KV (never zeros), layer by layer through bf16 for an FP8 cache."""
    kv = engine.runner.kv_cache
    for layer in range(kv.shape[0]):
        kv[layer].copy_(torch.randn(kv.shape[1:], device=kv.device, dtype=torch.bfloat16))


def make_engine(**opts) -> LLMEngine:
    # 33,000 blocks of 16 hold 16 x 32k (and 64 x 4k) with room for the decode steps
    return LLMEngine(CONFIGS / "qwen3-8b", EngineConfig(
        load_format="random", max_num_seqs=64, max_model_len=32768 + 256, num_kv_blocks=33000,
        enable_prefix_caching=False, **opts))


def prefill_step(engine: LLMEngine, tokens: int) -> float:
    """Seconds of the engine step that prefills one `tokens`-token prompt (best of 3)."""
    best = float("inf")
    for rep in range(4):
        prompt = [1000 + (i * 7919 + rep) % 90000 for i in range(tokens)]
        engine.add_request(f"p{rep}", prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        torch.cuda.synchronize()
        t = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize()
        if rep:  # the first compiles
            best = min(best, time.perf_counter() - t)
    return best


def prefill_flops(cfg, t: int) -> float:
    linear = sum(n * k for n, k in linear_shapes(cfg).values()) * cfg.num_layers + cfg.hidden_size * cfg.vocab_size / t
    attn = 2 * 2 * cfg.num_heads * cfg.head_dim * t * t / 2 * cfg.num_layers  # causal QK^T and PV
    return 2 * linear * t + attn


def bench_decode(bw: float, prefill: bool = True, variants=(*VARIANTS, UNFUSED)) -> tuple[list[dict], list[dict]]:
    rows, prefill_rows = [], []
    try:  # the class flag is set per variant; a failure must not leave it off for what follows
        for name in variants:
            opts = VARIANTS[name if name != UNFUSED else "fp8 KV + weights"]
            Fp8Linear.takes_fp8 = name != UNFUSED  # read as CUDA graphs are captured, in the engine
            try:
                engine = make_engine(**opts)
            except Exception as e:  # noqa: BLE001 (recorded in the rows, printed)
                rows.append(dict(variant=name, error=f"{type(e).__name__}: {e}"[:500]))
                print("decode", rows[-1], flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            fill_kv(engine)
            wb = model_bytes(engine)
            kv_tok = engine.model_cfg.kv_bytes_per_token(engine.runner.kv_dtype.itemsize)
            for batch, ctx in POINTS[name]:
                floor = (wb + batch * ctx * kv_tok) / bw
                dt = decode_steps(engine, batch, ctx)
                rows.append(dict(variant=name, batch=batch, ctx=ctx, step_ms=round(dt * 1e3, 3),
                                 roofline_ms=round(floor * 1e3, 3), of_roofline=round(floor / dt, 3),
                                 weight_gb=round(wb / 1e9, 2), kv_bytes_per_token=kv_tok))
                print("decode", rows[-1], flush=True)
            if name == "fp8 KV + weights":  # where the step's time goes, kernel by kernel
                print(profile_decode(engine, 64, 4096).split("by CPU time")[0], flush=True)
            if prefill and name in ("bf16", "fp8 weights", "fp8 KV + weights", UNFUSED):
                dt = prefill_step(engine, PREFILL_TOKENS)
                prefill_rows.append(dict(variant=name, tokens=PREFILL_TOKENS, step_s=round(dt, 4),
                                         tflops=round(prefill_flops(engine.model_cfg, PREFILL_TOKENS) / dt / 1e12, 1)))
                print("prefill", prefill_rows[-1], flush=True)
            del engine
            gc.collect()
            torch.cuda.empty_cache()
            print(f"after {name}: {torch.cuda.memory_allocated() / 1e9:.1f} GB still allocated", flush=True)
    finally:
        Fp8Linear.takes_fp8 = True
    base = {(r["batch"], r["ctx"]): r["step_ms"] for r in rows if r["variant"] == "bf16" and "error" not in r}
    for r in rows:
        if "error" not in r and (r["batch"], r["ctx"]) in base:
            r["speedup_vs_bf16"] = round(base[(r["batch"], r["ctx"])] / r["step_ms"], 3)
    return rows, prefill_rows


def bench_offline() -> list[dict]:
    reqs = workload(256)
    offline_run([(p, 32) for p, _ in reqs[:64]], 0.0, kv_cache_dtype="fp8", quantization="fp8")  # compile
    out = []
    for name in ("bf16", "fp8 KV + weights"):
        produced, dt = offline_run(reqs, 0.6, **VARIANTS[name])
        out.append(dict(variant=name, output_tokens=produced, seconds=round(dt, 2), tok_s=round(produced / dt, 1)))
        print("offline", out[-1], flush=True)
    return out


def push_bytes() -> list[dict]:
    from baton.engine.config import ModelConfig

    cfg = ModelConfig.from_dir(CONFIGS / "qwen3-8b")
    return [dict(kv=name, tokens=4096, layer_bytes=KVLayout(cfg.num_layers, cfg.kv_layer_shape(4096), dt).layer_nbytes,
                 request_bytes=cfg.num_layers * KVLayout(1, cfg.kv_layer_shape(4096), dt).layer_nbytes)
            for name, dt in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--offline", action="store_true", help="also the offline throughput (about a minute)")
    p.add_argument("--decode-only", action="store_true", help="skip the matmul ceilings and the prefill steps")
    p.add_argument("--skip", default="", help="parts to skip, comma-separated: attention, linear, matmul, push")
    p.add_argument("--variants", default="", help=f"decode variants to run, comma-separated (default: all of "
                   f"{', '.join([*VARIANTS, UNFUSED])})")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    variants = [v for v in a.variants.split(",") if v] or [*VARIANTS, UNFUSED]
    if unknown := set(variants) - {*VARIANTS, UNFUSED}:
        p.error(f"unknown variants {sorted(unknown)}")
    from baton.engine.config import ModelConfig

    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    res["hbm_bytes_per_s"] = bw = hbm_bandwidth()
    print(f"HBM {bw / 1e9:.0f} GB/s", flush=True)
    res["errors"] = []
    # one device call for everything: a part that fails is recorded (and printed) and the
    # rest still runs
    matmul = None if a.decode_only else lambda: matmul_ceilings(ModelConfig.from_dir(CONFIGS / "qwen3-8b"), PREFILL_TOKENS)
    for key, fn in (("attention", lambda: attention_sweep(bw)), ("linear", lambda: linear_sweep(bw)), ("matmul", matmul),
                    ("decode", lambda: bench_decode(bw, prefill=not a.decode_only, variants=variants)),
                    ("push", push_bytes), ("offline", bench_offline if a.offline else None)):
        if fn is None or key in skip:
            continue
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 (recorded and printed, not swallowed)
            import traceback

            traceback.print_exc()
            res["errors"].append(f"{key}: {type(e).__name__}: {e}")
            out = ([], []) if key == "decode" else []
        if os.environ.get("OUT"):  # after every part: a run cut short keeps what it measured
            Path(os.environ["OUT"], "fp8.json").write_text(json.dumps({**res, key: out}, indent=1, default=str))
        if key == "attention":
            res["attention"], res["fp8_tile"] = out if out else ([], None)
        elif key == "linear":
            res["linear"], res["fp8_matmul_tiles"] = out if out else ([], None)
        elif key == "decode":
            res["decode"], res["prefill"] = out
        else:
            res[key] = out
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fp8.json").write_text(json.dumps(res, indent=1, default=str))
    print_tables(res)
    return 0


def print_tables(res: dict) -> None:
    print(f"\n{res['device']}, HBM {res['hbm_bytes_per_s'] / 1e9:.0f} GB/s")
    print(f"{'variant':<24} {'batch':>5} {'ctx':>6} {'step ms':>8} {'roof ms':>8} {'of roof':>7} {'x bf16':>6}")
    for r in res.get("decode", []):
        if "error" in r:
            print(f"{r['variant']:<24} ERROR {r['error'][:200]}")
            continue
        print(f"{r['variant']:<24} {r['batch']:>5} {r['ctx']:>6} {r['step_ms']:>8} {r['roofline_ms']:>8} "
              f"{r['of_roofline']:>7} {r.get('speedup_vs_bf16', ''):>6}")
    print(f"decode attention alone (one layer), FP8 tiles taken: {res.get('fp8_tile')}")
    for r in res.get("attention", []):
        t = r["tile"]
        t = (f"{t['block_n']}/{t['num_warps']}w/{t['num_stages']}s/{t['programs_per_sm']}pps"
             + ("/words" if t.get("kv_words") else "") + ("/pf" if t.get("prefetch_bt") else ""))
        if "error" in r:
            print(f"  {r['case']:<18} {r['batch']:>3} x {r['ctx']:<6} {t:<28} ERROR {r['error'][:80]}")
            continue
        print(f"  {r['case']:<18} {r['batch']:>3} x {r['ctx']:<6} {t:<28} splits {r['splits']:>3} {r['us']:>8} us "
              f"{r['of_hbm']:>6} of HBM  err {r['rel_err']}")
    print(f"decode linears, Triton FP8 matmul tiles taken (None: _scaled_mm): {res.get('fp8_matmul_tiles')}")
    for r in res.get("linear", []):
        best = min((v, kk) for kk, v in r.items() if kk.startswith("tile") and kk.endswith("_us"))
        print(f"  m {r['m']:>3} {r['linear']:<8} bf16 {r['bf16_us']:>7} quant {r['quant_us']:>6} scaled_mm "
              f"{r['scaled_mm_us']:>7} triton best {best[0]:>7} ({best[1]}) us; FP8 weight bytes alone {r['fp8_weight_us']} us")
    mm = res.get("matmul", [])
    print("linear (m=8192)   bf16 / scaled_mm / Fp8Linear TFLOP/s, FP8 rel err")
    for r in mm:
        print(f"  {r['linear']:<8} {r['n']:>6}x{r['k']:<6} {r['bf16_tflops']:>7} {r['scaled_mm_tflops']:>7} "
              f"{r['fp8_linear_tflops']:>7}  {r['fp8_rel_err']}")
    for r in res.get("prefill", []):
        print(f"prefill {r['tokens']} tokens, {r['variant']:<12}: {r['step_s'] * 1e3:.1f} ms, {r['tflops']} TFLOP/s (model)")
    for r in res.get("push", []):
        print(f"KV push, 4k tokens, {r['kv']}: {r['request_bytes'] / 2**20:.0f} MiB")
    for r in res.get("offline", []):
        print(f"offline {r['variant']:<18} {r['tok_s']} tok/s")
    for e in res["errors"]:
        print("ERROR", e[:300])


if __name__ == "__main__":
    raise SystemExit(main())
