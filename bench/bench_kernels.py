"""Kernel benchmark on one CUDA GPU: our Triton kernels against torch's SDPA backends and
the device's own copy bandwidth.

- decode attention (Llama-3.1-8B heads: 32 q / 8 kv, head dim 128, bf16, pages of 16 tokens):
  our paged kernel vs SDPA's cuDNN and flash backends on contiguous K/V, as KV bytes read
  per second (every variant reads the same unique K/V bytes once) and the ratio to cuDNN;
- prefill attention, causal, 16k tokens per call at 1k..16k per sequence: TFLOP/s vs SDPA
  flash and cuDNN (ours reads K/V from the paged cache);
- elementwise and cache kernels: bytes/s against the HBM bandwidth of a large d2d copy
  (2 x bytes / time), measured in the same run.

Each variant is checked against the reference (or, where the reference would not fit, an
independent variant) on the GPU before it is timed; data is random, never zeros. Times are
medians of triton.testing.do_bench (L2 flushed between calls). Prints one table last;
writes JSON to $OUT/kernels.json when OUT is set.

    python -m bench.bench_kernels [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from baton.kernels import reference as ref
from baton.kernels import triton_attention, triton_ops

HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DEV = "cuda"
MAX_KV_BYTES = 9e9  # one copy of K/V per shape (paged + contiguous both held)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.isnan().any():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_ms(fn, graph: bool = True) -> float:
    """Median ms of fn; replayed from a CUDA graph (as the engine runs decode) when it captures,
    so Python launch overhead, which a graph removes in serving, stays out of small shapes."""
    if graph:
        g = cuda_graph(fn)
        if g is not None:
            return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def cuda_graph(fn):
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
        return g
    except Exception as e:  # noqa: BLE001 -- a variant that cannot be captured is timed eagerly
        print(f"  (not capturable, timed eagerly: {type(e).__name__}: {str(e)[:100]})", flush=True)
        torch.cuda.synchronize()
        return None


class Rows:
    """The result table; each row is printed as it is added, so a crash keeps the earlier ones."""

    KEYS = ("section", "case", "variant", "ms", "rate", "unit", "ratio", "err", "note")

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, **row):
        self.rows.append(row)
        print(
            "  " + "  ".join(f"{k}={row[k]}" for k in self.KEYS if row.get(k) is not None),
            flush=True,
        )

    def run(self, section, case, variant, fn, *, amount, unit, expect=None, err=None, base=None):
        """Check fn() against expect (or take a precomputed err), time it, add a row.

        Returns the rate in amount/s, or None when the variant failed or was wrong.
        """
        row = {"section": section, "case": case, "variant": variant}
        try:
            got = fn()
            torch.cuda.synchronize()
            if expect is not None:
                err = rel_err(got, expect)
            if err is not None and not err < TOL:
                self.add(**row, err=f"{err:.2e}", note="WRONG, not timed")
                return None
            ms = bench_ms(fn)
        except Exception as e:  # noqa: BLE001 -- a backend refusing a shape is a result
            self.add(**row, note=f"failed: {type(e).__name__}: {str(e)[:120]}")
            return None
        rate = amount / (ms * 1e-3)
        self.add(
            **row,
            ms=round(ms, 4),
            rate=round(rate / UNITS[unit], 1),
            unit=unit,
            ratio=round(rate / base, 3) if base else None,
            err=f"{err:.1e}" if err is not None else None,
        )
        return rate


TOL = 2e-2  # bf16 outputs, relative Frobenius error
UNITS = {"GB/s": 1e9, "TFLOP/s": 1e12}


# ----------------------------------------------------------------------------- decode


def paged_copy(k: torch.Tensor, v: torch.Tensor):
    """Contiguous [B, Hkv, L, D] K/V -> a paged cache with shuffled blocks + its block table."""
    b, hkv, length, d = k.shape
    per_seq = length // PAGE
    num_blocks = b * per_seq
    bt = torch.randperm(num_blocks, device=DEV).view(b, per_seq).to(torch.int32)
    kv = torch.empty(2, num_blocks, PAGE, hkv, d, dtype=k.dtype, device=DEV)
    for i, src in enumerate((k, v)):
        pages = src.permute(0, 2, 1, 3).reshape(b * per_seq, PAGE, hkv, d)
        kv[i][bt.view(-1).long()] = pages
    return kv, bt


def decode_case(rows: Rows, b: int, length: int):
    kv_bytes = b * length * HKV * D * 2 * DTYPE.itemsize  # unique K/V bytes, read once
    case = f"B={b} ctx={length}"
    if kv_bytes > MAX_KV_BYTES:
        rows.add(section="decode", case=case, variant="-", note="skipped: memory")
        return
    q = torch.randn(b, HQ, D, device=DEV, dtype=DTYPE)
    k = torch.randn(b, HKV, length, D, device=DEV, dtype=DTYPE)
    v = torch.randn(b, HKV, length, D, device=DEV, dtype=DTYPE)
    kv, bt = paged_copy(k, v)
    ctx = torch.full((b,), length, dtype=torch.int32, device=DEV)
    scale = D**-0.5
    out = torch.empty_like(q)

    def ours():
        return triton_attention.decode_attention_into(out, q, kv, ctx, bt, scale)

    def sdpa(backend):
        def fn():
            with sdpa_kernel(backend):
                o = scaled_dot_product_attention(
                    q.view(b, HQ, 1, D), k, v, scale=scale, enable_gqa=True
                )
            return o.view(b, HQ, D)

        return fn

    # The reference materialises float K/V for every row: check our kernel on a few rows
    # against it, then the SDPA variants against our whole output.
    n_ref = min(b, 2)
    ours_out = ours().clone()
    err = rel_err(
        ours_out[:n_ref], ref.decode_attention(q[:n_ref], kv, ctx[:n_ref], bt[:n_ref], scale)
    )
    sms = triton_attention._sm_count(q.device)
    splits = triton_attention.decode_config(b, HKV, bt.shape[1] * PAGE, D, sms)["num_splits"]
    amount = {"amount": kv_bytes, "unit": "GB/s"}
    base = rows.run(
        "decode", case, "sdpa_cudnn", sdpa(SDPBackend.CUDNN_ATTENTION), expect=ours_out, **amount
    )
    rows.run(
        "decode",
        case,
        "sdpa_flash",
        sdpa(SDPBackend.FLASH_ATTENTION),
        expect=ours_out,
        base=base,
        **amount,
    )
    rows.run("decode", case, f"triton(splits={splits})", ours, err=err, base=base, **amount)


# ----------------------------------------------------------------------------- prefill


def prefill_case(rows: Rows, b: int, s: int):
    case = f"B={b} S={s}"
    q = torch.randn(b, HQ, s, D, device=DEV, dtype=DTYPE)
    k = torch.randn(b, HKV, s, D, device=DEV, dtype=DTYPE)
    v = torch.randn(b, HKV, s, D, device=DEV, dtype=DTYPE)
    kv, bt = paged_copy(k, v)
    scale = D**-0.5
    q_tok = q.permute(0, 2, 1, 3).reshape(b * s, HQ, D).contiguous()
    cu = torch.arange(0, b + 1, device=DEV, dtype=torch.int32) * s
    ctx = torch.full((b,), s, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q_tok)

    def ours():
        return triton_attention.prefill_attention_into(out, q_tok, kv, cu, ctx, bt, scale, s)

    def sdpa(backend):
        def fn():
            with sdpa_kernel(backend):
                o = scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=scale, enable_gqa=True
                )
            return o.permute(0, 2, 1, 3).reshape(b * s, HQ, D)

        return fn

    # Oracle: the reference on the first sequence while its float scores fit (S <= 2k);
    # beyond, the flash backend. The SDPA variants are then checked against our output.
    ours_out = ours().clone()
    if s <= 2048:
        err = rel_err(
            ours_out[:s], ref.prefill_attention(q_tok[:s], kv, cu[:2], ctx[:1], bt[:1], scale)
        )
    else:
        err = rel_err(ours_out, sdpa(SDPBackend.FLASH_ATTENTION)())
    amount = {"amount": 4 * b * HQ * D * s * (s + 1) / 2, "unit": "TFLOP/s"}  # causal
    base = rows.run(
        "prefill", case, "sdpa_flash", sdpa(SDPBackend.FLASH_ATTENTION), expect=ours_out, **amount
    )
    rows.run(
        "prefill",
        case,
        "sdpa_cudnn",
        sdpa(SDPBackend.CUDNN_ATTENTION),
        expect=ours_out,
        base=base,
        **amount,
    )
    rows.run("prefill", case, "triton", ours, err=err, base=base, **amount)


# ----------------------------------------------------------------------------- elementwise


def copy_bandwidth() -> float:
    n = 1 << 30  # 1 GiB
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    # Eager: a graphed memcpy node ran slower here (2.4 vs 3.0 TB/s).
    ms = bench_ms(lambda: dst.copy_(src), graph=False)
    return 2 * n / (ms * 1e-3)


def bench_elementwise(rows: Rows, t: int):
    hbm = copy_bandwidth()
    rows.add(
        section="elementwise",
        case="1 GiB d2d copy",
        variant="torch copy_",
        rate=round(hbm / 1e9, 1),
        unit="GB/s",
        ratio=1.0,
    )
    hidden, inter, es, eps = 4096, 14336, DTYPE.itemsize, 1e-6

    def randn(*shape):
        return torch.randn(*shape, device=DEV, dtype=DTYPE)

    x, r, gate_up = randn(t, hidden), randn(t, hidden), randn(t, 2 * inter)
    w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(DTYPE)
    pos = torch.randint(0, 32768, (t,), device=DEV)
    inv = 500000.0 ** (-torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D)
    ang = torch.arange(32768, device=DEV, dtype=torch.float32)[:, None] * inv[None, :]
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1)
    qkv = randn(t, (HQ + 2 * HKV) * D)
    q, k = qkv[:, : HQ * D].view(t, HQ, D), qkv[:, HQ * D : (HQ + HKV) * D].view(t, HKV, D)
    num_blocks = 2 * t // PAGE
    cache = randn(2, num_blocks, PAGE, HKV, D)
    slots = torch.randperm(num_blocks * PAGE, device=DEV)[:t]
    kn, vn = randn(t, HKV, D), randn(t, HKV, D)
    kv_bytes = 2 * t * HKV * D * es

    def flat(tensors):
        return torch.cat([a.flatten() for a in tensors])

    def stored():
        return ref.gather_kv(cache, slots)

    # name, timed call, (ours, reference) as one tensor each for the check, bytes read + written
    cases = [
        (
            f"rms_norm [{t},{hidden}]",
            lambda: triton_ops.rms_norm(x, w, eps),
            (lambda: triton_ops.rms_norm(x, w, eps), lambda: ref.rms_norm(x, w, eps)),
            2 * t * hidden * es,
        ),
        (
            f"fused_add_rms_norm [{t},{hidden}]",
            lambda: triton_ops.fused_add_rms_norm(x, r, w, eps),
            (
                lambda: flat(triton_ops.fused_add_rms_norm(x, r, w, eps)),
                lambda: flat(ref.fused_add_rms_norm(x, r, w, eps)),
            ),
            4 * t * hidden * es,
        ),
        (
            f"rotary_embedding T={t} q/k views of qkv",
            lambda: triton_ops.rotary_embedding(pos, q, k, cos_sin),
            (
                lambda: flat(triton_ops.rotary_embedding(pos, q, k, cos_sin)),
                lambda: flat(ref.rotary_embedding(pos, q, k, cos_sin)),
            ),
            2 * t * (HQ + HKV) * D * es + t * D * 4,
        ),
        (
            f"silu_and_mul [{t},{2 * inter}]",
            lambda: triton_ops.silu_and_mul(gate_up),
            (lambda: triton_ops.silu_and_mul(gate_up), lambda: ref.silu_and_mul(gate_up)),
            3 * t * inter * es,
        ),
        (
            f"store_kv T={t}",
            lambda: triton_ops.store_kv(kn, vn, cache, slots),
            (
                lambda: (triton_ops.store_kv(kn, vn, cache, slots), stored())[1],
                lambda: torch.stack([kn, vn]),
            ),
            2 * kv_bytes,
        ),
        (
            f"gather_kv T={t}",
            lambda: triton_ops.gather_kv(cache, slots),
            (lambda: triton_ops.gather_kv(cache, slots), lambda: ref.gather_kv(cache, slots)),
            2 * kv_bytes,
        ),
    ]
    for case, timed, (ours, expect), nbytes in cases:
        try:
            err = rel_err(ours(), expect())
        except Exception as e:  # noqa: BLE001
            rows.add(section="elementwise", case=case, variant="triton", note=f"failed: {e}"[:160])
            continue
        rows.run(
            "elementwise", case, "triton", timed, err=err, base=hbm, amount=nbytes, unit="GB/s"
        )


# ----------------------------------------------------------------------------- main


def print_table(rows: list[dict]):
    table = [["" if r.get(k) is None else str(r[k]) for k in Rows.KEYS] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(Rows.KEYS)]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(Rows.KEYS, widths)))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
    print(
        "ratio: decode = rate / sdpa_cudnn's, prefill = rate / sdpa_flash's, "
        "elementwise = rate / copy bandwidth (2 x bytes / time of a 1 GiB d2d copy)"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few shapes only")
    p.add_argument("--only", choices=["decode", "prefill", "elementwise"], default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU")
        return 1
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    started = time.time()
    rows = Rows()
    if args.only in (None, "decode"):
        print("decode attention", flush=True)
        for length in [4096, 32768] if args.quick else [1024, 4096, 32768]:
            for b in [1, 64] if args.quick else [1, 16, 64, 256]:
                decode_case(rows, b, length)
                torch.cuda.empty_cache()
    if args.only in (None, "prefill"):
        print("prefill attention", flush=True)
        for s in [1024, 16384] if args.quick else [1024, 2048, 4096, 8192, 16384]:
            prefill_case(rows, max(1, 16384 // s), s)  # 16k tokens a call
            torch.cuda.empty_cache()
    if args.only in (None, "elementwise"):
        print("elementwise", flush=True)
        bench_elementwise(rows, 16384)
    meta = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "seconds": round(time.time() - started, 1),
        "decode_shape": {"hq": HQ, "hkv": HKV, "d": D, "page": PAGE, "dtype": str(DTYPE)},
    }
    print_table(rows.rows)
    print(json.dumps(meta))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kernels.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows.rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
