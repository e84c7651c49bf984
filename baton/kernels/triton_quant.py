"""Triton kernel for FP8 (e4m3) quantization per row: one pass, x -> (x8, scale).

One program per row (a token's activations, a weight's output channel): it reads the row,
takes its absolute maximum, and writes x / scale saturated to +-448 as FP8 and the scale
(amax / 448, floored at 1e-12) as float32: reference.quantize_rows' maths, so the results
match it exactly. It replaces five elementwise launches per linear layer (abs, amax, divide,
clamp, cast).

Tried and dropped (commit e98e647): a skinny FP8 Triton matmul for decode's few rows. Timed
alone on an H200 it was no faster than torch._scaled_mm (both launch-bound at 1-64 rows),
and without promoting partial sums its FP8 wgmma accumulation lost precision (1.3e-3
relative at K = 4096 against float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FP8_MAX = tl.constexpr(448.0)  # constexprs: compiled kernels read no plain globals
_INV_FP8_MAX = tl.constexpr(1.0 / 448.0)


@triton.jit
def fp8_row_scale(amax):
    """A row's scale from its absolute maximum: amax * fp32(1/448), as the reference computes
    it (torch on CUDA divides by a scalar that way), floored at 1e-12."""
    return tl.maximum(amax * _INV_FP8_MAX, 1e-12)


@triton.jit
def fp8_saturate(x, scale):
    """x / scale (an IEEE division as torch does it; Triton's `/` may not be) saturated to
    +-448, in float32: what is cast to FP8. Every kernel that quantizes rows (this one, the
    fused norm and silu_and_mul in triton_elementwise) goes through these two."""
    return tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -_FP8_MAX), _FP8_MAX)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, n, sx, sq, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0).to(tl.float32)
    scale = fp8_row_scale(tl.max(tl.abs(x), 0))
    q = fp8_saturate(x, scale)
    tl.store(q_ptr + row * sq + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


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
