"""Kernel micro-sweep for FP8 decode on a GPU (issue 26), each number against HBM measured here.

1. Decode attention alone, one Qwen3-8B layer (32 q / 8 KV heads, D 128) at 64 x 4k and 16 x 32k:
   bf16 cache; FP8 cache through the engine's kernel (fp8 loads, then int32-word loads with
   the in-register unpack, over tiles) and through bench/fp8_attention_variants.py (dots
   transposed for wgmma, FP8 QK^T). CUDA-graph timing, fraction of HBM bandwidth.
2. Decode linears at 1 / 16 / 64 rows (CUDA graphs): bf16 matmul, Fp8Linear (activation
   quantization and the FP8 matmul the facade picks), and at <= 16 rows a W8A16 Triton kernel
   (fp16 activations, FP8 weights unpacked in registers, no activation quantization).
   (bench_fp8.py's linear sweep times _scaled_mm against the Triton FP8 matmul.)
Run: python bench/fp8_kernel_sweep.py; JSON to $OUT/fp8_sweep.json when OUT is set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from baton.kernels import triton_attention as ta
from baton.engine.quant import Fp8Linear
from bench import fp8_attention_variants as fv
from bench.bench_engine import hbm_bandwidth
from bench.bench_fp8 import graph_time


def run_variant(out, q, kv, lens, bt, scale, kmode, vmode, swap, block_n=64, warps=4, stages=3):
    bsz, hq, d = q.shape
    hkv, page = kv.shape[3], kv.shape[2]
    cfg = ta.decode_config(bsz, hkv, bt.shape[1] * page, d, ta._sm_count(q.device), False)
    splits = cfg["num_splits"]
    part_o = torch.empty((bsz, hq, splits, d), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((bsz, hq, splits), dtype=torch.float32, device=q.device)
    k, v = kv[0], kv[1]

    def go():
        fv.decode_var[(bsz, hkv, splits)](
            q, k, v, bt, lens, out, part_o, part_lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            k.stride(2), bt.stride(0), out.stride(0), out.stride(1), scale * ta._LOG2E, splits,
            GROUP=hq // hkv, G_PAD=16, HEAD_DIM=d, BLOCK_D=d, PAGE=page, BLOCK_N=block_n, DIRECT=splits == 1,
            DOT_PREC="tf32", K_MODE=kmode, V_MODE=vmode, SWAP=swap, num_warps=warps, num_stages=stages)
        if splits > 1:
            ta._decode_combine_kernel[(bsz, hq)](part_o, part_lse, out, out.stride(0), out.stride(1), splits,
                                                 S_PAD=triton.next_power_of_2(splits), HEAD_DIM=d, BLOCK_D=d,
                                                 num_warps=4 if splits * d >= 2048 else 2)
    return go, splits


def attention(bw: float) -> list[dict]:
    rows = []
    engine_tiles = [dict(ta.DECODE_FP8_TILES["wide"]), dict(ta.DECODE_FP8_TILES["split"]),
                    dict(block_n=64, num_warps=2, num_stages=3, kv_words=False, prefetch_bt=False),
                    dict(block_n=32, num_warps=1, num_stages=3, kv_words=True, prefetch_bt=True)]
    for t in engine_tiles:
        t.setdefault("programs_per_sm", ta.DECODE_PROGRAMS_PER_SM)
    variants = [(0, 0, 1, 64, 4, 3), (4, 4, 1, 64, 4, 3), (4, 4, 1, 128, 8, 3), (3, 4, 1, 64, 4, 3),
                (5, 5, 0, 64, 4, 3)]
    for batch, ctx in ((64, 4096), (16, 32768)):
        nblk = batch * ctx // 16
        bt = torch.randperm(nblk, device="cuda").to(torch.int32).view(batch, -1)  # scattered pages
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        kv16 = torch.randn(2, nblk, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
        kv8 = kv16.to(torch.float8_e4m3fn)
        expect = ta.decode_attention(q, kv8.to(torch.bfloat16), lens, bt, 128**-0.5).float()
        cases = [("bf16 engine", kv16, lambda: ta.decode_attention_into(out, q, kv16, lens, bt, 128**-0.5), "")]
        for t in engine_tiles:
            def engine_call(t=t):
                # the engine's own tile and split choice, with this tile for every regime
                real = ta.DECODE_FP8_TILES
                ta.DECODE_FP8_TILES = {"wide": t, "split": t}
                try:
                    ta.decode_attention_into(out, q, kv8, lens, bt, 128**-0.5)
                finally:
                    ta.DECODE_FP8_TILES = real

            cases.append(("fp8 engine", kv8, engine_call,
                          f"{t['block_n']}/{t['num_warps']}w/{t['num_stages']}s/{t['programs_per_sm']}pps "
                          f"words={t['kv_words']} prefetch={t['prefetch_bt']}"))
        for km, vm, sw, bn, nw, ns in variants:
            try:
                go, _ = run_variant(out, q, kv8, lens, bt, 128**-0.5, km, vm, sw, bn, nw, ns)
            except Exception as e:  # noqa: BLE001
                rows.append(dict(case="variant", tile=f"K{km} V{vm} swap{sw} {bn}/{nw}w/{ns}s", error=str(e)[:200]))
                continue
            cases.append(("fp8 variant", kv8, go, f"K{km} V{vm} swap{sw} {bn}/{nw}w/{ns}s"))
        for name, kv, fn, tile in cases:
            try:
                dt = graph_time(fn, reps=5)
                err = ((out.float() - expect).norm() / expect.norm()).item()
            except Exception as e:  # noqa: BLE001 (a variant that does not compile: recorded)
                rows.append(dict(case=name, batch=batch, ctx=ctx, tile=tile, error=str(e)[:300]))
                print("attention", rows[-1], flush=True)
                continue
            nbytes = kv.numel() * kv.element_size()
            rows.append(dict(case=name, batch=batch, ctx=ctx, tile=tile, us=round(dt * 1e6, 1),
                             of_hbm=round(nbytes / dt / bw, 3), rel_err=round(err, 4)))
            print("attention", rows[-1], flush=True)
        del kv16, kv8
        torch.cuda.empty_cache()
    return rows


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, sx, sw, sy,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rw = tl.arange(0, BLOCK_K // 4)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * sx + k0 + rk[None, :], mask=rm[:, None] < M, other=0.0).to(tl.float16)
        w = tl.load(w_ptr + rn[:, None] * (sw // 4) + k0 // 4 + rw[None, :], mask=rn[:, None] < N, other=0)
        acc = tl.dot(x, tl.trans(ta._e4m3_words_to_f16(w, True)), acc)
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)
    tl.store(y_ptr + rm[:, None] * sy + rn[None, :], (acc * s[None, :]).to(tl.bfloat16),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def w8a16(x, w8, scale, block_n=32, block_k=256, warps=4, stages=4):
    m, k = x.shape
    n = w8.shape[0]
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x.device)
    _w8a16_kernel[(triton.cdiv(n, block_n),)](x, w8.view(torch.int32), scale, y, m, n, k, x.stride(0), w8.stride(0),
                                              y.stride(0), BLOCK_M=max(16, triton.next_power_of_2(m)),
                                              BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return y


def linears(bw: float) -> list[dict]:
    rows = []
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
    for m in (1, 16, 64):
        for name, (n, k) in shapes.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            lin.weight.data.normal_(0, 0.02)
            w = lin.weight.data
            f8 = Fp8Linear.from_linear(lin)
            exact = x.float() @ f8.dequantized().t()
            r = dict(m=m, linear=name, n=n, k=k)
            r["bf16_us"] = graph_time(lambda: x @ w.t()) * 1e6
            r["fp8_linear_us"] = graph_time(lambda: f8(x)) * 1e6
            if m <= 16:
                for bn, bk, nw, ns in ((32, 256, 4, 4), (16, 256, 4, 4), (64, 128, 4, 4)):
                    try:
                        y = w8a16(x, f8.weight8, f8.weight_scale, bn, bk, nw, ns)
                        r[f"w8a16_{bn}x{bk}_{nw}w{ns}s_us"] = graph_time(lambda: w8a16(x, f8.weight8, f8.weight_scale, bn, bk, nw, ns)) * 1e6
                        r[f"w8a16_{bn}x{bk}_err"] = ((y.float() - exact).norm() / exact.norm()).item()
                    except Exception as e:  # noqa: BLE001
                        r[f"w8a16_{bn}x{bk}_error"] = str(e)[:200]
            r["fp8_linear_err"] = ((f8(x).float() - exact).norm() / exact.norm()).item()
            r["weight_hbm_us_bf16"] = n * k * 2 / bw * 1e6
            r["weight_hbm_us_fp8"] = n * k / bw * 1e6
            rows.append({kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in r.items()})
            print("linear", rows[-1], flush=True)
    return rows


def main() -> int:
    bw = hbm_bandwidth()
    print(f"HBM {bw / 1e9:.0f} GB/s", flush=True)
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               hbm_bytes_per_s=bw)
    for key, fn in (("attention", attention), ("linears", linears)):
        try:
            res[key] = fn(bw)
        except Exception as e:  # noqa: BLE001 (recorded and printed; the other part still runs)
            import traceback

            traceback.print_exc()
            res[key + "_error"] = f"{type(e).__name__}: {e}"
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "fp8_sweep.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
