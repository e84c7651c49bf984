"""Triton kernels that move K/V rows between the paged cache and flat buffers by slot.

A program copies the K and V rows (all KV heads) of a few tokens in one tile; a negative
slot is skipped by masking (no branch, so the grid never depends on the slot values).
Addresses are 64-bit: a large cache's K/V offsets pass 2**31 elements. Rows going into an
FP8 (e4m3) cache from a wider dtype are clamped to +-448 in float32 first: the same
saturating cast as reference.to_cache_dtype (scale 1.0, per tensor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_rows_kernel(
    src_k,
    src_v,
    dst_k,
    dst_v,
    slot_ptr,
    n,
    src_stride_t,
    src_stride_h,  # flat side (per token, per head), or cache side
    dst_stride_t,
    dst_stride_h,
    cache_stride_b,
    cache_stride_s,  # paged side: per block, per slot in a block
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    TO_CACHE: tl.constexpr,
    SATURATE: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slot_ptr + i, mask=i < n, other=-1).to(tl.int64)
    keep = slot >= 0
    slot = tl.where(keep, slot, 0)
    page_off = (slot // PAGE) * cache_stride_b + (slot % PAGE) * cache_stride_s
    h = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM) & keep[:, None, None]
    page_off = page_off[:, None, None]
    flat_t = i.to(tl.int64)[:, None, None]
    if TO_CACHE:
        src = flat_t * src_stride_t + h * src_stride_h + d
        dst = page_off + h * dst_stride_h + d
    else:
        src = page_off + h * src_stride_h + d
        dst = flat_t * dst_stride_t + h * dst_stride_h + d
    k = tl.load(src_k + src, mask=mask)
    v = tl.load(src_v + src, mask=mask)
    if SATURATE:  # into FP8 from a wider dtype
        k = tl.minimum(tl.maximum(k.to(tl.float32), -448.0), 448.0)
        v = tl.minimum(tl.maximum(v.to(tl.float32), -448.0), 448.0)
    tl.store(dst_k + dst, k.to(dst_k.dtype.element_ty), mask=mask)
    tl.store(dst_v + dst, v.to(dst_v.dtype.element_ty), mask=mask)


TOKENS_PER_PROGRAM = 4


def _check_layer(kv_layer: torch.Tensor) -> None:
    assert kv_layer.dim() == 5 and kv_layer.shape[0] == 2, (
        "kv_layer is [2, blocks, block_size, Hkv, D]"
    )
    assert kv_layer.stride(4) == 1 and kv_layer.stride(2) == kv_layer.shape[3] * kv_layer.stride(3)


def _lastdim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(src_k, src_v, dst_k, dst_v, slots, flat_k, kv_layer, to_cache: bool) -> None:
    n = slots.shape[0]
    if n == 0:
        return
    hkv, d = kv_layer.shape[3], kv_layer.shape[4]
    cache_k = kv_layer[0]
    flat_sh = flat_k.stride(1)
    flat_st = flat_k.stride(0)
    if to_cache:
        src_st, src_sh, dst_st, dst_sh = flat_st, flat_sh, 0, cache_k.stride(2)
    else:
        src_st, src_sh, dst_st, dst_sh = 0, cache_k.stride(2), flat_st, flat_sh
    block_h, block_d = triton.next_power_of_2(hkv), triton.next_power_of_2(d)
    block_t = TOKENS_PER_PROGRAM if block_h * block_d <= 1024 else 1
    _copy_rows_kernel[(triton.cdiv(n, block_t),)](
        src_k,
        src_v,
        dst_k,
        dst_v,
        slots,
        n,
        src_st,
        src_sh,
        dst_st,
        dst_sh,
        cache_k.stride(0),
        cache_k.stride(1),
        NUM_HEADS=hkv,
        HEAD_DIM=d,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        PAGE=kv_layer.shape[2],
        TO_CACHE=to_cache,
        SATURATE=dst_k.dtype == torch.float8_e4m3fn and src_k.dtype != dst_k.dtype,
        num_warps=4 if block_t * block_h * block_d >= 1024 else 1,
    )


def store_kv(
    k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    _check_layer(kv_layer)
    k, v = _lastdim_contiguous(k), _lastdim_contiguous(v)
    if k.stride() != v.stride():  # e.g. Qwen3: k comes out of k_norm, v is a view of qkv
        k, v = k.contiguous(), v.contiguous()
    _launch(k, v, kv_layer[0], kv_layer[1], slot_mapping, k, kv_layer, to_cache=True)


def gather_kv(kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    shape = (2, slot_mapping.shape[0], kv_layer.shape[3], kv_layer.shape[4])
    return gather_kv_into(
        torch.empty(shape, dtype=kv_layer.dtype, device=kv_layer.device), kv_layer, slot_mapping
    )


def gather_kv_into(
    out: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor
) -> torch.Tensor:
    """gather_kv into a contiguous [2, n, Hkv, D] buffer (slots must be >= 0)."""
    _check_layer(kv_layer)
    assert out.is_contiguous() and out.shape == (2, slot_mapping.shape[0], *kv_layer.shape[3:])
    _launch(
        kv_layer[0], kv_layer[1], out[0], out[1], slot_mapping, out[0], kv_layer, to_cache=False
    )
    return out


def scatter_kv(buf: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    store_kv(buf[0], buf[1], kv_layer, slot_mapping)
