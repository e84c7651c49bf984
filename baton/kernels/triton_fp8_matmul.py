"""Triton FP8 matmul for decode's few rows: y = (x8 @ w8.T) * x_scale[m] * w_scale[n] (+ bias).

reference.fp8_matmul's maths (per-token activation scales, per-channel weight scales, float32
accumulation) for M <= MAX_ROWS rows, where torch._scaled_mm is tuned for large M. One
program per BLOCK_N output channels and every row (BLOCK_M = M padded to 16..64): the weight,
the bytes that matter at decode, is read once, 16 bytes a load, through Triton's pipelined
loads, and the program count (N / BLOCK_N, hundreds for Qwen3-8B's linears) fills the GPU.
At 64 rows the dot is an FP8 wgmma (its accumulation is not promoted every K step as cuBLAS
does: about 1e-3 relative against float32 at K = 4096, far under FP8's own rounding); at 16
rows and fewer Triton upcasts both operands to fp16 (exact) for mma.sync.

On the interpreter (CPU tests) the dot always takes the fp16 path: the same products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 64  # above: torch._scaled_mm (prefill)
# The tile per padded row count (16, 32, 64); None: torch._scaled_mm measured faster there.
# The best total over Qwen3-8B's four decode linears in bench/bench_fp8.py's linear sweep on
# an H200 (which sets these for its own run): at 1-16 rows 32 channels x 128 of K, 6 stages,
# at 64 rows 32 x 256, 4 stages; _scaled_mm took 1.3-1.6x as long (docs/PERFORMANCE.md).
TILES = {16: dict(block_n=32, block_k=128, num_warps=4, num_stages=6),
         32: dict(block_n=32, block_k=256, num_warps=4, num_stages=4),
         64: dict(block_n=32, block_k=256, num_warps=4, num_stages=4)}
_ANY_TILE = dict(block_n=64, block_k=128, num_warps=4, num_stages=4)  # a call where TILES says None


def handles(m: int) -> bool:
    """Whether this kernel (not torch._scaled_mm) multiplies m rows on CUDA."""
    return 0 < m <= MAX_ROWS and TILES[max(16, triton.next_power_of_2(m))] is not None


@triton.jit
def _fp8_matmul_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, sx, sw, sy,
                       HAS_BIAS: tl.constexpr, F8_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_row = x_ptr + rm.to(tl.int64)[:, None] * sx
    w_row = w_ptr + rn.to(tl.int64)[:, None] * sw
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + rk) < K
        x = tl.load(x_row + k0 + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_row + k0 + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if F8_DOT:
            acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc = tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
    xs = tl.load(xs_ptr + rm, mask=m_mask, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=n_mask, other=0.0)
    # reference.fp8_matmul scales x and w before the product: the same up to float32 rounding
    y = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    dst = y_ptr + rm.to(tl.int64)[:, None] * sy + rn[None, :]
    tl.store(dst, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def fp8_matmul(x8: torch.Tensor, x_scale: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype,
               config: dict | None = None) -> torch.Tensor:
    """x8 [M, K] FP8 (M <= MAX_ROWS), x_scale [M, 1] float32, w8 [N, K] FP8, w_scale [N] float32."""
    m, k = x8.shape
    n = w8.shape[0]
    assert m <= MAX_ROWS and w8.shape[1] == k and x8.stride(1) == 1 and w8.stride(1) == 1
    assert x_scale.is_contiguous() and w_scale.is_contiguous()
    y = torch.empty((m, n), dtype=out_dtype, device=x8.device)
    if m == 0:
        return y
    block_m = max(16, triton.next_power_of_2(m))
    cfg = dict(TILES[block_m] or _ANY_TILE)
    cfg.update(config or {})
    _fp8_matmul_kernel[(triton.cdiv(n, cfg["block_n"]),)](
        x8, x_scale, w8, w_scale, y if bias is None else bias, y, m, n, k,
        x8.stride(0), w8.stride(0), y.stride(0),
        HAS_BIAS=bias is not None,
        F8_DOT=x8.device.type == "cuda",
        BLOCK_M=block_m, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y
