"""Experimental decode-attention variants over an FP8 cache, timed by bench/fp8_kernel_sweep.py (issue 26).

K_MODE / V_MODE: 0 fp8 loads + Triton cast, 1 fp8 loads + inline-asm cast, 3 (K only) FP8 dot with q
quantized per row, 4 int32-word loads + asm unpack, 5 int32-word loads + shift unpack. SWAP: the dots
transposed (tokens as M: K @ q^T and V^T @ P^T), so M >= 64 and Hopper wgmma applies.
"""
import triton, triton.language as tl
from baton.kernels.triton_attention import _kv_tile_offsets

@triton.jit
def _cvt_e4m3_f16(x):
    # 4 e4m3 bytes in one 32-bit register -> 4 fp16 (two cvt.rn.f16x2.e4m3x2)
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; "
        "cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r", [x], dtype=tl.float16, is_pure=True, pack=4)

@triton.jit
def _unpack_words_asm(w):
    # int32 words of 4 e4m3 bytes [R, C] -> fp16 [R, 4C] in memory order
    o0, o1, o2, o3 = tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; .reg .b32 a, b; mov.b32 {lo, hi}, $4; "
        "cvt.rn.f16x2.e4m3x2 a, lo; cvt.rn.f16x2.e4m3x2 b, hi; "
        "mov.b32 {$0, $1}, a; mov.b32 {$2, $3}, b; }",
        "=h,=h,=h,=h,r", [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)
    x = tl.join(tl.join(o0, o2), tl.join(o1, o3))
    return tl.reshape(x, [w.shape[0], 4 * w.shape[1]])

@triton.jit
def _unpack_words_plain(w):
    o0 = (w & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    o1 = ((w >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    o2 = ((w >> 16) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    o3 = ((w >> 24) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    x = tl.join(tl.join(o0, o2), tl.join(o1, o3))
    return tl.reshape(x, [w.shape[0], 4 * w.shape[1]])

@triton.jit(do_not_specialize=["num_splits"])
def decode_var(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    sqb, sqh, skb, sks, skh, sbt, sob, soh, scale_log2, num_splits,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, DOT_PREC: tl.constexpr,
    K_MODE: tl.constexpr, V_MODE: tl.constexpr, SWAP: tl.constexpr):
    b = tl.program_id(0); kvh = tl.program_id(1); split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    chunk = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, ctx)
    g = tl.arange(0, G_PAD); d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    hd_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + heads[:, None] * sqh + d[None, :], mask=hd_mask, other=0.0)
    if K_MODE == 3:  # fp8 dot: q per row to e4m3
        qf = q.to(tl.float32)
        qs = tl.maximum(tl.max(tl.abs(qf), 1) / 448.0, 1e-12)
        q = (qf / qs[:, None]).to(tl.float8e4nv)
        qk_scale = qs * scale_log2
    else:
        q = q.to(tl.float16)
        qk_scale = tl.full([G_PAD], 1.0, tl.float32) * scale_log2
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * sbt
    kv_head_off = kvh.to(tl.int64) * skh
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        tok, n_mask = _kv_tile_offsets(bt_row, offs, end, kv_head_off, skb, sks, PAGE)
        kv_mask = n_mask[:, None] & (d[None, :] < HEAD_DIM)
        if K_MODE >= 4:
            d4 = tl.arange(0, BLOCK_D // 4)
            wmask = n_mask[:, None] & (d4[None, :] < HEAD_DIM // 4)
            kw = tl.load(k_ptr.to(tl.pointer_type(tl.int32)) + tok[:, None] // 4 + d4[None, :], mask=wmask, other=0)
        else:
            kr = tl.load(k_ptr + tok[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if V_MODE >= 4:
            d4 = tl.arange(0, BLOCK_D // 4)
            wmask = n_mask[:, None] & (d4[None, :] < HEAD_DIM // 4)
            vw = tl.load(v_ptr.to(tl.pointer_type(tl.int32)) + tok[:, None] // 4 + d4[None, :], mask=wmask, other=0)
        else:
            vr = tl.load(v_ptr + tok[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if K_MODE == 0:
            k = kr.to(tl.float16)
        elif K_MODE == 1:
            k = _cvt_e4m3_f16(kr.to(tl.uint8, bitcast=True))
        elif K_MODE == 4:
            k = _unpack_words_asm(kw)
        elif K_MODE == 5:
            k = _unpack_words_plain(kw)
        else:
            k = kr
        if V_MODE == 0:
            v = vr.to(tl.float16)
        elif V_MODE == 1:
            v = _cvt_e4m3_f16(vr.to(tl.uint8, bitcast=True))
        elif V_MODE == 4:
            v = _unpack_words_asm(vw)
        else:
            v = _unpack_words_plain(vw)
        if SWAP:
            qk = tl.trans(tl.dot(k, tl.trans(q)))
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale[:, None]
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if SWAP:
            acc = acc * alpha[:, None] + tl.trans(tl.dot(tl.trans(v), tl.trans(p.to(tl.float16))))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if DIRECT:
        dst = out_ptr + b.to(tl.int64) * sob + heads[:, None] * soh + d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=hd_mask)
    else:
        row = (b.to(tl.int64) * tl.num_programs(1) * GROUP + heads) * num_splits + split
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=hd_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g < GROUP)
