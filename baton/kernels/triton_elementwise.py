"""Triton kernels for the per-token ops: rms_norm (optionally with the residual add fused),
neox rotary embedding, and silu_and_mul.

Each is one pass over memory: read the inputs once, write the outputs once, arithmetic in
float32, roundings where the reference rounds (so bf16 results match it bit for bit up to
the order of a sum). Inputs may be strided views (q/k sliced out of a fused qkv output);
only the last dimension must be contiguous. Outputs are new contiguous tensors, as the
reference returns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton.kernels.triton_quant import fp8_row_scale, fp8_saturate

# Elements one program handles: 4096 keeps 8-16 elements in flight per thread at 8 warps.
_TILE = 4096


def _rows3(x: torch.Tensor) -> torch.Tensor:
    """x as [A, B, N] with a unit last stride; a view whenever the strides allow one."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _warps(elems: int) -> int:
    return max(1, min(16, elems // 512))


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    out_ptr,
    sum_ptr,
    n_rows,
    B,
    sxa,
    sxb,
    sra,
    srb,
    eps,
    scale_ptr,
    N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RES: tl.constexpr,
    FP8_OUT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    a = (rows // B).to(tl.int64)
    b = (rows % B).to(tl.int64)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < N)
    x = tl.load(x_ptr + (a * sxa + b * sxb)[:, None] + cols[None, :], mask=mask, other=0.0)
    flat = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if HAS_RES:
        r = tl.load(r_ptr + (a * sra + b * srb)[:, None] + cols[None, :], mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + flat, s, mask=mask)
        xf = s.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=1) / N
    y = (xf * tl.rsqrt(mean_sq + eps)[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    if FP8_OUT:
        # the norm's output rounded to x's dtype (as rms_norm returns it), then triton_quant's
        # per-row quantization of it: the same maths, so the same bytes as the two kernels
        o = (w[None, :] * y).to(x.dtype).to(tl.float32)
        scale = fp8_row_scale(tl.max(tl.abs(o), 1))
        q = fp8_saturate(o, scale[:, None])
        tl.store(out_ptr + flat, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + rows, scale, mask=rows < n_rows)
    else:
        tl.store(out_ptr + flat, (w[None, :] * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_into(out, summed, x, residual, weight, eps, scale=None):
    """rms_norm(x [+ residual]) into contiguous `out`; x + residual into `summed` if given.
    With `scale` [rows] float32, `out` is FP8: the output quantized per row (rms_norm_fp8)."""
    n = x.shape[-1]
    assert weight.shape == (n,) and weight.is_contiguous()
    assert out.shape == x.shape and out.is_contiguous()
    x3 = _rows3(x)
    r3 = _rows3(residual) if residual is not None else x3
    a, b = x3.shape[0], x3.shape[1]
    s = summed if residual is not None else out
    assert s.shape == x.shape and s.is_contiguous()
    rows = a * b
    if rows == 0:
        return out, s
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(64, _TILE // block_n))
    _rms_norm_kernel[(triton.cdiv(rows, block_m),)](
        x3,
        r3,
        weight,
        out,
        s,
        rows,
        b,
        x3.stride(0),
        x3.stride(1),
        r3.stride(0),
        r3.stride(1),
        eps,
        out if scale is None else scale,
        N=n,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_RES=residual is not None,
        FP8_OUT=scale is not None,
        num_warps=_warps(block_m * block_n),
    )
    return out, s


def _norm_out(x, weight):
    return torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_into(_norm_out(x, weight), None, x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    assert residual.shape == x.shape and residual.dtype == x.dtype
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return rms_norm_into(_norm_out(x, weight), summed, x, residual, weight, eps)


def rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """reference.rms_norm_fp8 in one pass: the norm's output goes out as FP8 and a scale a row."""
    assert torch.result_type(weight, x) == x.dtype, "the norm's output dtype must be x's"
    x8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    summed = None
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rms_norm_into(x8, summed, x, residual, weight, eps, scale=scale)
    return x8, scale, summed


@triton.jit
def _rotate(
    x_ptr,
    o_ptr,
    stride_t,
    stride_h,
    t,
    cos,
    sin,
    H: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    mask = (h[:, None] < H) & (d[None, :] < HALF)
    src = x_ptr + t.to(tl.int64) * stride_t + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = o_ptr + t.to(tl.int64) * (H * 2 * HALF) + h[:, None] * (2 * HALF) + d[None, :]
    ty = o_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos - x2 * sin).to(ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(ty), mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cs_ptr,
    qo_ptr,
    ko_ptr,
    sqt,
    sqh,
    skt,
    skh,
    scs,
    HQ: tl.constexpr,
    HK: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    cs = cs_ptr + pos * scs + d
    cos = tl.load(cs, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs + HALF, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate(q_ptr, qo_ptr, sqt, sqh, t, cos, sin, HQ, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate(k_ptr, ko_ptr, skt, skh, t, cos, sin, HK, HALF, BLOCK_HK, BLOCK_HALF)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    return rotary_embedding_into(q_out, k_out, positions, q, k, cos_sin_cache)


def rotary_embedding_into(q_out, k_out, positions, q, k, cos_sin_cache):
    """rotary_embedding into contiguous q_out [T, Hq, D] and k_out [T, Hkv, D]."""
    t, hq, d = q.shape
    hk = k.shape[1]
    assert d % 2 == 0 and cos_sin_cache.shape[-1] == d and k.shape[2] == d
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    assert q_out.shape == q.shape and q_out.is_contiguous()
    assert k_out.shape == k.shape and k_out.is_contiguous()
    if t == 0:
        return q_out, k_out
    half = d // 2
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    block_half = triton.next_power_of_2(half)
    _rotary_kernel[(t,)](
        positions,
        q,
        k,
        cs,
        q_out,
        k_out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cs.stride(0),
        HQ=hq,
        HK=hk,
        HALF=half,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_HALF=block_half,
        num_warps=_warps(2 * block_hq * block_half),
    )
    return q_out, k_out


@triton.jit
def _silu_mul(x_ptr, row, stride_x, cols, mask, I: tl.constexpr):
    """silu(gate) * up of one row's columns `cols`, in float32."""
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0).to(tl.float32)
    return gate / (1.0 + tl.exp(-gate)) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, I: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    y = _silu_mul(x_ptr, row, stride_x, cols, mask, I)
    tl.store(out_ptr + row * I + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, q_ptr, s_ptr, stride_x, I: tl.constexpr, BLOCK: tl.constexpr):
    """One program a row: silu_and_mul's output (rounded to x's dtype, as silu_and_mul returns
    it) quantized as triton_quant does. Two passes over the row: its absolute maximum, then
    the FP8 values (the row's inputs are re-read, from L2 at these sizes)."""
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, I, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        y = _silu_mul(x_ptr, row, stride_x, cols, cols < I, I).to(x_ptr.dtype.element_ty)
        amax = tl.maximum(amax, tl.abs(y.to(tl.float32)))
    scale = fp8_row_scale(tl.max(amax, 0))
    for start in range(0, I, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < I
        y = _silu_mul(x_ptr, row, stride_x, cols, mask, I).to(x_ptr.dtype.element_ty).to(tl.float32)
        q = fp8_saturate(y, scale)
        tl.store(q_ptr + row * I + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
    return silu_and_mul_into(out, x)


def silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.silu_and_mul_fp8 in one kernel: (x8 [..., I] FP8, scale [..., 1] float32)."""
    inner = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty((*x.shape[:-1], inner), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    if x2.shape[0] and inner:
        block = min(triton.next_power_of_2(inner), _TILE)
        _silu_and_mul_fp8_kernel[(x2.shape[0],)](x2, q, scale, x2.stride(0), I=inner, BLOCK=block,
                                                 num_warps=_warps(block))
    return q, scale


def silu_and_mul_into(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    two_i = x.shape[-1]
    inner = two_i // 2
    assert out.shape == (*x.shape[:-1], inner) and out.is_contiguous()
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    if rows == 0 or inner == 0:
        return out
    block = min(triton.next_power_of_2(inner), _TILE // 2)
    _silu_and_mul_kernel[(rows, triton.cdiv(inner, block))](
        x2,
        out,
        x2.stride(0),
        I=inner,
        BLOCK=block,
        num_warps=_warps(block),
    )
    return out
