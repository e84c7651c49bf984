"""Triton kernels for FP8 (e4m3): quantization per row, and the skinny FP8 matmul of decode.

quantize_rows: one pass, x -> (x8, scale).

One program per row (a token's activations, a weight's output channel): it reads the row,
takes its absolute maximum, and writes x / scale saturated to +-448 as FP8 and the scale
(amax / 448, floored at 1e-12) as float32: reference.quantize_rows' maths, so the results
match it exactly. It replaces five elementwise launches per linear layer (abs, amax, divide,
clamp, cast), which at decode batch sizes cost more than the FP8 matmul they feed.

fp8_matmul_skinny: y = (x8 @ w8.T) * x_scale * w_scale (+ bias) for few rows (decode), the
scales applied in the epilogue. With torch._scaled_mm's row-wise FP8 kernel, decode steps
with FP8 weights ran no faster than bf16 on an H200 (0.99x at 64 x 4k, Qwen3-8B shapes); the
guess is too few programs for a narrow layer, so here each program owns BLOCK_N = 32 output
channels (a 4096-wide layer: 128 programs), streaming its weight rows through a pipeline.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FP8_MAX = tl.constexpr(448.0)  # constexprs: compiled kernels read no plain globals
_INV_FP8_MAX = tl.constexpr(1.0 / 448.0)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, n, sx, sq, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0).to(tl.float32)
    # the scale as amax * fp32(1/448), as the reference computes it (torch on CUDA divides by
    # a scalar that way); x / scale an IEEE division as torch does it (Triton's `/` may not be)
    scale = tl.maximum(tl.max(tl.abs(x), 0) * _INV_FP8_MAX, 1e-12)
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -_FP8_MAX), _FP8_MAX)
    tl.store(q_ptr + row * sq + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


@triton.jit
def _fp8_skinny_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, sam, sbn, scm,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a = a_ptr + rm[:, None].to(tl.int64) * sam + rk[None, :]
    b = b_ptr + rn[None, :].to(tl.int64) * sbn + rk[:, None]  # [BLOCK_K, BLOCK_N], K-major
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        a_t = tl.load(a, mask=(rm[:, None] < M) & (rk[None, :] < K - k), other=0.0)
        b_t = tl.load(b, mask=(rn[None, :] < N) & (rk[:, None] < K - k), other=0.0)
        acc = tl.dot(a_t, b_t, acc)
        a += BLOCK_K
        b += BLOCK_K
    sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
    sb = tl.load(sb_ptr + rn, mask=rn < N, other=0.0)
    c = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        c += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * scm + rn[None, :], c.to(c_ptr.dtype.element_ty), mask=mask)


SKINNY_MAX_ROWS = 64  # up to here decode's FP8 linears take fp8_matmul_skinny
SKINNY_TILE = {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}


def fp8_matmul_skinny(x8, x_scale, w8, w_scale, bias, out_dtype, tile=None):
    """x8 [M, K] and w8 [N, K] FP8 (K contiguous), x_scale [M, 1], w_scale [N] float32."""
    t = dict(SKINNY_TILE, **(tile or {}))
    m, k = x8.shape
    n = w8.shape[0]
    assert x8.stride(1) == 1 and w8.stride(1) == 1
    out = torch.empty((m, n), dtype=out_dtype, device=x8.device)
    block_m = 64  # Hopper's FP8 wgmma is 64 rows; rows past m are masked (decode is memory-bound)
    grid = (triton.cdiv(n, t["BLOCK_N"]), triton.cdiv(m, block_m))
    _fp8_skinny_kernel[grid](
        x8, w8, out, x_scale, w_scale, bias if bias is not None else w_scale, m, n, k,
        x8.stride(0), w8.stride(0), out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=t["BLOCK_N"], BLOCK_K=t["BLOCK_K"], num_warps=t["num_warps"], num_stages=t["num_stages"])
    return out


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 [M, K] float8_e4m3fn, scale [M, 1] float32)."""
    assert x.dim() == 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(k)
        _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block,
                                    num_warps=max(1, min(16, block // 1024)))
    return q, s
