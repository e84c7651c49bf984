"""Triton attention over the paged KV cache: prefill ("extend") and split-context decode.

Both kernels read K/V straight from the cache `[2, blocks, block_size, Hkv, D]` through the
block table: a tile of BLOCK_N tokens spans several pages, so each program loads the tile's
block ids (one per token, cached in L1), and computes every token's row address. Softmax is
online (flash-attention style) in base 2 with the scale folded into log2(e).

Prefill: grid (q blocks, Hq, batch), one program per BLOCK_M new tokens of one head; keys
left of the causal diagonal run an unmasked loop, the diagonal tiles a masked one; the
longest-working q blocks launch first.

Decode (flash-decoding): grid (batch, Hkv, splits). A program takes every query head of one
KV head (padded to 16 rows for tl.dot), so each K/V tile is loaded once for the whole GQA
group, over its share of the context: each sequence's own context is cut into `splits`
equal BLOCK_N-aligned chunks inside the kernel. The split count comes from shapes only
(batch x Hkv against the SM count, and the table's width as the longest possible context),
so the launch is CUDA-graph capturable: no host reads of lengths, no shape that depends on
them. With one split the kernel writes the output directly; otherwise it writes a partial
output and log-sum-exp per split and a second kernel combines them.

A sequence with context 0 (a CUDA-graph padding row) gets zeros, where the reference's
softmax over nothing gives NaN.

An FP8 (e4m3) cache is read as it is stored and upcast in registers, tile by tile (its scale
is 1.0, per tensor: nothing to multiply). With a bf16 q the dots then run in fp16 (DOT_F16:
q and p converted once, K/V by one instruction per pair, e4m3 -> fp16 being exact), not
bf16. Decode reads an FP8 cache as int32 words (KV_WORDS) and unpacks each word into four
fp16 in registers: loaded as FP8, Triton fed V to the dot through byte-wide shared-memory
reads (LDS.U8, one per element), as no ldmatrix transposes 8-bit data. And it loads each
tile's block ids one tile ahead (PREFETCH_BT): with the ids loaded in the same iteration,
Triton's pipeliner kept one K/V buffer; a loop-carried id lets it keep two or three. On an
H200 (one run, CUDA-graph timing) these took decode attention over an FP8 cache from 0.63 /
0.49 of HBM bandwidth at 64 x 4k / 16 x 32k to 0.68 / 0.63 (bf16: 1.0); what is left is
instruction latency, see docs/PERFORMANCE.md, "FP8 (issue 26)".
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634

# Decode splits: enough programs for ~2.5 per SM, each split at least MIN_TILES_PER_SPLIT tiles.
# Swept on an H100 (132 SMs, 32/8 heads, D 128, bf16, CUDA-graph timing): the best split counts
# were 3 at batch 16, 1 at batch >= 64, ~40 at batch 1 x 32k, 10-16 at batch 4 x 8k, which this
# rule reproduces. More programs (4-5 per SM) lost 5-15% to the partially filled last wave.
# Tried and dropped: prefetching the next tile's block ids by hand (no gain, some losses), and
# combining the splits inside the main kernel by "last program reduces" with an atomic counter
# (1-12% slower than the separate combine launch).
DECODE_PROGRAMS_PER_SM = 2.5
DECODE_MIN_TILES_PER_SPLIT = 2
DECODE_MAX_SPLITS = 128


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter on CPU: pretend to be an H100, so tests run the GPU heuristics
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 caches are for tests and CPU parity: keep their dots exact, not tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _dot_f16(q: torch.Tensor, kv_layer: torch.Tensor) -> bool:
    return kv_layer.dtype == torch.float8_e4m3fn and q.dtype == torch.bfloat16


@triton.jit
def _kv_tile_offsets(bt_row, offs, limit, kv_head_off, skb, sks, PAGE: tl.constexpr):
    """Row offsets of tokens `offs` in one KV head of the cache, and which are < limit."""
    n_mask = offs < limit
    blk = tl.load(bt_row + offs // PAGE, mask=n_mask, other=0).to(tl.int64)
    return blk * skb + (offs % PAGE) * sks + kv_head_off, n_mask


@triton.jit
def _e4m3_words_to_f16(w, ASM: tl.constexpr):
    """int32 words [R, C] of 4 e4m3 bytes each -> fp16 [R, 4C] in memory order (exact).

    ASM: two cvt.rn.f16x2.e4m3x2 a word (sm_89+); else shifts and Triton's casts (the
    interpreter's path, the same values)."""
    if ASM:
        b0, b1, b2, b3 = tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; .reg .b32 a, b; mov.b32 {lo, hi}, $4; "
            "cvt.rn.f16x2.e4m3x2 a, lo; cvt.rn.f16x2.e4m3x2 b, hi; "
            "mov.b32 {$0, $1}, a; mov.b32 {$2, $3}, b; }",
            "=h,=h,=h,=h,r", [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
            is_pure=True, pack=1)
    else:
        b0 = (w & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        b1 = ((w >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        b2 = ((w >> 16) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        b3 = ((w >> 24) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    # join adds a minor dim: join(join(b0, b2), join(b1, b3))[..., i, j] is byte 2i + j
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), [w.shape[0], 4 * w.shape[1]])


# ----------------------------------------------------------------------------- decode


@triton.jit(do_not_specialize=["num_splits"])
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    ctx_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    sqb,
    sqh,
    skb,
    sks,
    skh,
    sbt,
    sob,
    soh,
    scale_log2,
    num_splits,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_F16: tl.constexpr = False,
    KV_WORDS: tl.constexpr = False,
    CVT_ASM: tl.constexpr = False,
    PREFETCH_BT: tl.constexpr = False,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    chunk = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, ctx)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    hd_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = tl.load(
        q_ptr + b.to(tl.int64) * sqb + heads[:, None] * sqh + d[None, :], mask=hd_mask, other=0.0
    )
    if DOT_F16:
        q = q.to(tl.float16)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * sbt
    kv_head_off = kvh.to(tl.int64) * skh
    if PREFETCH_BT:
        offs = start + tl.arange(0, BLOCK_N)
        blk_next = tl.load(bt_row + offs // PAGE, mask=offs < end, other=0)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        if PREFETCH_BT:  # the tile's block ids came with the last tile: see decode_config
            n_mask = offs < end
            tok = blk_next.to(tl.int64) * skb + (offs % PAGE) * sks + kv_head_off
            ahead = offs + BLOCK_N
            blk_next = tl.load(bt_row + ahead // PAGE, mask=ahead < end, other=0)
        else:
            tok, n_mask = _kv_tile_offsets(bt_row, offs, end, kv_head_off, skb, sks, PAGE)
        if KV_WORDS:  # an FP8 cache as int32 words (strides in words): 16-byte loads, see above
            w4 = tl.arange(0, BLOCK_D // 4)
            w_mask = n_mask[:, None] & (w4[None, :] < HEAD_DIM // 4)
            kw = tl.load(k_ptr + tok[:, None] + w4[None, :], mask=w_mask, other=0)
            vw = tl.load(v_ptr + tok[:, None] + w4[None, :], mask=w_mask, other=0)
            k = _e4m3_words_to_f16(kw, CVT_ASM).to(q.dtype)
            v = _e4m3_words_to_f16(vw, CVT_ASM).to(q.dtype)
        else:
            kv_mask = n_mask[:, None] & (d[None, :] < HEAD_DIM)
            k = tl.load(k_ptr + tok[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
            v = tl.load(v_ptr + tok[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if DIRECT:  # one split: no partials
        dst = out_ptr + b.to(tl.int64) * sob + heads[:, None] * soh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=hd_mask)
    else:
        # Partials are [B, Hq, num_splits, HEAD_DIM] float32 and [B, Hq, num_splits].
        row = (b.to(tl.int64) * tl.num_programs(1) * GROUP + heads) * num_splits + split
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=hd_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g < GROUP)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_combine_kernel(
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    sob,
    soh,
    num_splits,
    S_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, BLOCK_D)
    row = (b.to(tl.int64) * tl.num_programs(1) + h) * num_splits + s
    lse = tl.load(part_lse_ptr + row, mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    denom = tl.sum(w, 0)
    mask = (s[:, None] < num_splits) & (d[None, :] < HEAD_DIM)
    o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    dst = out_ptr + b.to(tl.int64) * sob + h * soh + d
    tl.store(dst, res.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# The tiles (and programs per SM) over an FP8 cache, head_dim <= 128, from bench/bench_fp8.py's
# sweep on an H200 (Qwen3-8B heads, scattered pages, CUDA-graph timing; docs/PERFORMANCE.md,
# "FP8 (issue 26)"). Both prefetch block ids. "wide": the batch alone fills the GPU (batch x
# KV heads >= DECODE_PROGRAMS_PER_SM per SM, one split): 2 warps, the cache read as int32
# words, 0.68-0.69 of HBM at 64 x 4k (4 warps 0.60; split 2 or 4 ways 0.68, no gain). "split":
# the context is split across programs: 2 warps, FP8 loads, 12 programs per SM, 0.715 of HBM
# at 16 x 32k (run 6: 351 us a layer; 4 warps at 6 per SM, the tile before, 0.63 and 398 us):
# a tile bound by instruction latency gains from more programs in flight.
DECODE_FP8_TILES = {
    "wide": {"block_n": 64, "num_warps": 2, "num_stages": 3, "kv_words": True, "prefetch_bt": True,
             "programs_per_sm": DECODE_PROGRAMS_PER_SM},
    "split": {"block_n": 64, "num_warps": 2, "num_stages": 3, "kv_words": False, "prefetch_bt": True,
              "programs_per_sm": 12},
}


def decode_config(batch: int, kv_heads: int, max_tokens: int, head_dim: int, num_sms: int,
                  kv_fp8: bool = False) -> dict:
    """Tile and split choice from shapes alone (CUDA-graph safe). max_tokens: table width x page."""
    # 64 tokens (4 pages of 16) x 4 warps x 3 stages was within 1-2% of the best tile everywhere
    # in the sweep (32..128 tokens, 4/8 warps, 2..4 stages).
    tile = {"block_n": 64 if head_dim <= 128 else 32, "num_warps": 4, "num_stages": 3}
    per_sm = DECODE_PROGRAMS_PER_SM
    programs = batch * kv_heads
    if kv_fp8 and head_dim <= 128:
        tile = dict(DECODE_FP8_TILES["wide" if programs >= per_sm * num_sms else "split"])
        per_sm = tile.pop("programs_per_sm")
    want = triton.cdiv(int(per_sm * num_sms), programs)
    most = max(1, max_tokens // (DECODE_MIN_TILES_PER_SPLIT * tile["block_n"]))
    splits = max(1, min(want, most, DECODE_MAX_SPLITS))
    return {**tile, "num_splits": splits}


def decode_attention_into(
    out: torch.Tensor,
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    config: dict | None = None,
) -> torch.Tensor:
    """decode_attention writing into `out` [B, Hq, D]; `config` overrides decode_config."""
    bsz, hq, d = q.shape
    page, hkv = kv_layer.shape[2], kv_layer.shape[3]
    assert hq % hkv == 0 and kv_layer.shape[4] == d and kv_layer.stride(4) == 1
    assert block_tables.stride(1) == 1 and out.stride(2) == 1
    if bsz == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    group = hq // hkv
    cfg = decode_config(bsz, hkv, block_tables.shape[1] * page, d, _sm_count(q.device),
                        kv_layer.dtype == torch.float8_e4m3fn)
    cfg.update(config or {})
    splits = cfg["num_splits"]
    k_cache, v_cache = kv_layer[0], kv_layer[1]
    words = cfg.get("kv_words", False) and kv_layer.dtype == torch.float8_e4m3fn and d % 4 == 0
    if words:  # FP8 bytes read as int32 words: the strides below are then in words
        k_cache, v_cache = k_cache.view(torch.int32), v_cache.view(torch.int32)
    if splits > 1:
        part_o = torch.empty((bsz, hq, splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((bsz, hq, splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # unused
    block_d = triton.next_power_of_2(d)
    _decode_kernel[(bsz, hkv, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_o,
        part_lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        scale * _LOG2E,
        splits,
        GROUP=group,
        G_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d,
        BLOCK_D=block_d,
        PAGE=page,
        BLOCK_N=cfg["block_n"],
        DIRECT=splits == 1,
        DOT_PREC=_dot_precision(q.dtype),
        DOT_F16=_dot_f16(q, kv_layer),
        KV_WORDS=words,
        CVT_ASM=q.device.type == "cuda",
        PREFETCH_BT=cfg.get("prefetch_bt", False),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _decode_combine_kernel[(bsz, hq)](
            part_o,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            splits,
            S_PAD=triton.next_power_of_2(splits),
            HEAD_DIM=d,
            BLOCK_D=block_d,
            num_warps=4 if splits * block_d >= 2048 else 2,
        )
    return out


def decode_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return decode_attention_into(out, q, kv_layer, context_lens, block_tables, scale)


# ----------------------------------------------------------------------------- prefill


@triton.jit
def _prefill_tiles(
    acc,
    l_i,
    m_i,
    q,
    q_pos,
    k_ptr,
    v_ptr,
    bt_row,
    kv_head_off,
    skb,
    sks,
    lo,
    hi,
    ctx,
    scale_log2,
    d,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        tok, n_mask = _kv_tile_offsets(bt_row, offs, ctx, kv_head_off, skb, sks, PAGE)
        if MASKED:
            kv_mask = n_mask[:, None] & (d[None, :] < HEAD_DIM)
        else:
            kv_mask = d[None, :] < HEAD_DIM  # every token of an unmasked tile is < ctx
        k = tl.load(k_ptr + tok[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        v = tl.load(v_ptr + tok[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        if MASKED:
            visible = (offs[None, :] <= q_pos[:, None]) & n_mask[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    cu_ptr,
    ctx_ptr,
    bt_ptr,
    sqt,
    sqh,
    sot,
    soh,
    skb,
    sks,
    skh,
    sbt,
    scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
    DOT_F16: tl.constexpr = False,
):
    # Last q blocks first: they see the most keys, so the long programs start early.
    mb = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    m_start = mb * BLOCK_M
    if m_start >= q_len:
        return
    ctx = tl.load(ctx_ptr + b)
    prefix = ctx - q_len

    offs_m = m_start + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    q_mask = m_mask[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + rows[:, None] * sqt + h * sqh + d[None, :], mask=q_mask, other=0.0)
    if DOT_F16:
        q = q.to(tl.float16)
    q_pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * sbt
    kv_head_off = (h // GROUP).to(tl.int64) * skh
    # Keys up to the block's first position are visible to every row: no mask needed.
    full_end = ((prefix + m_start + 1) // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _prefill_tiles(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        k_ptr,
        v_ptr,
        bt_row,
        kv_head_off,
        skb,
        sks,
        0,
        full_end,
        ctx,
        scale_log2,
        d,
        HEAD_DIM,
        PAGE,
        BLOCK_N,
        False,
        DOT_PREC,
    )
    diag_end = tl.minimum(prefix + m_start + BLOCK_M, ctx)
    acc, l_i, m_i = _prefill_tiles(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        k_ptr,
        v_ptr,
        bt_row,
        kv_head_off,
        skb,
        sks,
        full_end,
        diag_end,
        ctx,
        scale_log2,
        d,
        HEAD_DIM,
        PAGE,
        BLOCK_N,
        True,
        DOT_PREC,
    )

    o = acc / l_i[:, None]
    dst = out_ptr + rows[:, None] * sot + h * soh + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_config(head_dim: int, dtype: torch.dtype) -> dict:
    # 128 x 128 tiles, 8 warps, 2 stages: best of a 48-config sweep on an H100 at 4k and 16k
    # tokens (366 / 406 TFLOP/s against SDPA flash's 326 / 350). float32 (tests) and head dims
    # over 128 take smaller tiles to stay inside shared memory.
    if dtype == torch.float32 or head_dim > 128:
        return {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}
    return {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 2}


def prefill_attention_into(
    out: torch.Tensor,
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """prefill_attention writing into `out` [T, Hq, D]; `config` overrides prefill_config."""
    t, hq, d = q.shape
    bsz = context_lens.shape[0]
    page, hkv = kv_layer.shape[2], kv_layer.shape[3]
    assert hq % hkv == 0 and kv_layer.shape[4] == d and kv_layer.stride(4) == 1
    assert block_tables.stride(1) == 1 and out.stride(2) == 1
    if t == 0 or bsz == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    cfg = prefill_config(d, q.dtype)
    cfg.update(config or {})
    k_cache, v_cache = kv_layer[0], kv_layer[1]
    grid = (triton.cdiv(max_q_len, cfg["block_m"]), hq, bsz)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        cu_seqlens_q,
        context_lens,
        block_tables,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        scale * _LOG2E,
        GROUP=hq // hkv,
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        PAGE=page,
        BLOCK_M=cfg["block_m"],
        BLOCK_N=cfg["block_n"],
        DOT_PREC=_dot_precision(q.dtype),
        DOT_F16=_dot_f16(q, kv_layer),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def prefill_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return prefill_attention_into(
        out, q, kv_layer, cu_seqlens_q, context_lens, block_tables, scale, max_q_len
    )
