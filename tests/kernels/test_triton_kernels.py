"""Every Triton kernel against its plain-torch reference, on fresh random inputs.

On CPU the kernels run in Triton's interpreter (set before triton is imported), which
cannot compute in bf16, so CPU runs cover float32 and float16; BATON_KERNEL_TESTS_CUDA=1 on
a GPU host runs the same tests compiled, bf16 included, plus CUDA-graph capture. Outputs
are pre-filled with NaN through the kernels' `*_into` launchers so an unwritten element fails.
Sizes are small: the interpreter costs milliseconds per program per loop step.
"""

import os

ON_CUDA = os.environ.get("BATON_KERNEL_TESTS_CUDA") == "1"
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from baton.kernels import reference as ref
from baton.kernels import (
    triton_attention,
    triton_cache,
    triton_elementwise,
    triton_ops,
)

DEV = "cuda" if ON_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
# ||out - ref|| / ||ref||: float32 dots are exact here ("ieee"), half types round p and outputs.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel_err(out: torch.Tensor, expect: torch.Tensor) -> float:
    assert out.shape == expect.shape and out.dtype == expect.dtype
    assert not out.isnan().any(), "unwritten (NaN) or NaN-producing output"
    return (
        (out.double() - expect.double()).norm() / expect.double().norm().clamp_min(1e-30)
    ).item()


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def paged_cache(num_blocks, block_size, hkv, d, dtype):
    return torch.randn(2, num_blocks, block_size, hkv, d, device=DEV).to(dtype)


def block_tables_for(context_lens, block_size, num_blocks, width_extra=1):
    """Each sequence gets distinct random blocks; rows are padded with valid ids past their end."""
    need = [(c + block_size - 1) // block_size for c in context_lens]
    width = max(need) + width_extra
    perm = torch.randperm(num_blocks)
    assert sum(need) <= num_blocks
    rows, at = [], 0
    for n in need:
        own = perm[at : at + n]
        at += n
        pad = torch.randint(0, num_blocks, (width - n,))
        rows.append(torch.cat([own, pad]))
    return torch.stack(rows).to(torch.int32).to(DEV)


# ----------------------------------------------------------------------------- cache ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,hkv,d", [(4, 1, 16), (16, 2, 64), (16, 3, 40)])
def test_store_kv(dtype, block_size, hkv, d):
    num_blocks, n = 9, 23
    kv = paged_cache(num_blocks, block_size, hkv, d, dtype)
    slots = torch.randperm(num_blocks * block_size)[:n].to(DEV)
    slots[::5] = -1  # skipped
    # k and v as strided views of a fused buffer, as the model produces them
    kv_src = torch.randn(n, 3 * hkv, d, device=DEV).to(dtype)
    k, v = kv_src[:, hkv : 2 * hkv], kv_src[:, 2 * hkv :]
    expect = kv.clone()
    ref.store_kv(k, v, expect, slots)
    triton_ops.store_kv(k, v, kv, slots)
    assert torch.equal(kv, expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,hkv,d", [(4, 2, 16), (16, 8, 32), (8, 3, 24)])
def test_gather_then_scatter_into_other_layout(dtype, block_size, hkv, d):
    src = paged_cache(11, block_size, hkv, d, dtype)
    n = 29
    slots = torch.randperm(11 * block_size)[:n].to(DEV)
    out = nan_like((2, n, hkv, d), dtype)
    triton_cache.gather_kv_into(out, src, slots)
    assert torch.equal(out, ref.gather_kv(src, slots))
    assert torch.equal(triton_ops.gather_kv(src, slots), out)
    # The receiver's cache has another block size and its own block ids.
    other_bs = 16 if block_size != 16 else 4
    dst = paged_cache(20, other_bs, hkv, d, dtype)
    dst_slots = torch.randperm(20 * other_bs)[:n].to(DEV)
    expect = dst.clone()
    ref.scatter_kv(out, expect, dst_slots)
    triton_ops.scatter_kv(out, dst, dst_slots)
    assert torch.equal(dst, expect)
    assert torch.equal(ref.gather_kv(dst, dst_slots), out)


# ----------------------------------------------------------------------------- decode

DECODE_CASES = [
    # batch context_lens, hq, hkv, d, block_size
    ([1], 8, 8, 32, 4),
    ([37, 100, 5], 8, 2, 64, 16),
    ([130, 17], 16, 4, 32, 4),
    ([64, 1, 65], 16, 2, 16, 16),  # group 8
    ([77], 32, 1, 32, 16),  # group 32: pad rows past 16
    ([33, 200], 6, 2, 48, 8),  # group 3, head dim not a power of two
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctx,hq,hkv,d,bs", DECODE_CASES)
@pytest.mark.parametrize(
    "config", [None, {"num_splits": 1, "block_n": 16}, {"num_splits": 3, "block_n": 32}]
)
def test_decode_attention(dtype, ctx, hq, hkv, d, bs, config):
    bsz = len(ctx)
    num_blocks = sum((c + bs - 1) // bs for c in ctx) + 3
    kv = paged_cache(num_blocks, bs, hkv, d, dtype)
    bt = block_tables_for(ctx, bs, num_blocks)
    context_lens = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    q = torch.randn(bsz, hq, d, device=DEV).to(dtype)
    scale = d**-0.5
    out = nan_like(q.shape, dtype)
    triton_attention.decode_attention_into(out, q, kv, context_lens, bt, scale, config)
    assert rel_err(out, ref.decode_attention(q, kv, context_lens, bt, scale)) < TOL[dtype]


def test_decode_splits_cover_long_context_and_empty_rows():
    """Many splits, some empty for the short row; a context-0 (padding) row gives zeros."""
    dtype, bs, hq, hkv, d = torch.float32, 16, 4, 2, 32
    ctx = [300, 3, 0]
    kv = paged_cache(40, bs, hkv, d, dtype)
    bt = block_tables_for([max(c, 1) for c in ctx], bs, 40)
    context_lens = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    q = torch.randn(3, hq, d, device=DEV)
    out = nan_like(q.shape, dtype)
    triton_attention.decode_attention_into(
        out, q, kv, context_lens, bt, 0.2, {"num_splits": 9, "block_n": 16}
    )
    expect = ref.decode_attention(q[:2], kv, context_lens[:2], bt[:2], 0.2)
    assert rel_err(out[:2], expect) < TOL[dtype]
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_decode_split_heuristic_fills_gpu_from_shapes():
    cfg = triton_attention.decode_config
    assert cfg(1, 8, 32768, 128, 132)["num_splits"] >= 32  # batch 1, long context: many splits
    assert cfg(256, 8, 4096, 128, 132)["num_splits"] == 1  # already thousands of programs
    assert cfg(1, 8, 64, 128, 132)["num_splits"] == 1  # a one-tile context is not split


# ----------------------------------------------------------------------------- prefill

PREFILL_CASES = [
    # (context_len, q_len) per sequence, hq, hkv, d, block_size
    ([(5, 5)], 2, 2, 16, 4),
    ([(37, 37), (80, 45), (9, 1)], 4, 2, 64, 16),  # no prefix, prefix hit, one-token extend
    ([(70, 3), (20, 20)], 4, 4, 32, 4),
    ([(90, 45)], 12, 3, 48, 8),  # group 4, head dim not a power of two
    ([(33, 17), (1, 1), (130, 70)], 4, 1, 32, 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqs,hq,hkv,d,bs", PREFILL_CASES)
@pytest.mark.parametrize(
    "config", [None, {"block_m": 16, "block_n": 16}, {"block_m": 16, "block_n": 32}]
)
def test_prefill_attention(dtype, seqs, hq, hkv, d, bs, config):
    ctx = [c for c, _ in seqs]
    q_lens = [n for _, n in seqs]
    num_blocks = sum((c + bs - 1) // bs for c in ctx) + 2
    kv = paged_cache(num_blocks, bs, hkv, d, dtype)
    bt = block_tables_for(ctx, bs, num_blocks)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    context_lens = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), hq, d, device=DEV).to(dtype)
    scale = d**-0.5
    out = nan_like(q.shape, dtype)
    triton_attention.prefill_attention_into(
        out, q, kv, cu, context_lens, bt, scale, max(q_lens), config
    )
    expect = ref.prefill_attention(q, kv, cu, context_lens, bt, scale)
    assert rel_err(out, expect) < TOL[dtype]
    if config is None:  # the public entry point, max_q_len left to the kernel
        assert (
            rel_err(triton_ops.prefill_attention(q, kv, cu, context_lens, bt, scale), expect)
            < TOL[dtype]
        )


def test_prefill_after_store_matches_decode_of_last_token():
    """store_kv the new tokens, then prefill; its last row equals decode of that token."""
    dtype, bs, hq, hkv, d = torch.float32, 4, 4, 2, 32
    prefix, new = 10, 7
    kv = paged_cache(8, bs, hkv, d, dtype)
    bt = torch.tensor([[5, 2, 7, 0, 1]], dtype=torch.int32, device=DEV)
    pos = torch.arange(prefix, prefix + new, device=DEV)
    slots = bt[0, pos // bs].long() * bs + pos % bs
    triton_ops.store_kv(
        torch.randn(new, hkv, d, device=DEV), torch.randn(new, hkv, d, device=DEV), kv, slots
    )
    ctx = torch.tensor([prefix + new], dtype=torch.int32, device=DEV)
    q = torch.randn(new, hq, d, device=DEV)
    cu = torch.tensor([0, new], dtype=torch.int32, device=DEV)
    pre = triton_ops.prefill_attention(q, kv, cu, ctx, bt, 0.3, new)
    dec = triton_ops.decode_attention(q[-1:].contiguous(), kv, ctx, bt, 0.3)
    assert rel_err(pre[-1:], dec) < 1e-5


def poison_outside_context(kv, bt, ctx, bs):
    """NaN in every cache slot that no sequence's context covers (what torch.empty may hold)."""
    keep = torch.zeros(kv.shape[1] * bs, dtype=torch.bool, device=kv.device)
    for row, n in zip(bt.tolist(), ctx):
        pos = torch.arange(n)
        keep[torch.tensor(row)[pos // bs] * bs + pos % bs] = True
    flat = kv.view(2, -1, *kv.shape[3:])
    flat[:, ~keep] = float("nan")


def test_attention_never_reads_slots_outside_the_context():
    """Slots past a context (a block's unwritten tail, padding ids) may hold NaN: no output may."""
    dtype, bs, hq, hkv, d = torch.float32, 8, 4, 2, 32
    ctx = [13, 1, 40]
    kv = paged_cache(12, bs, hkv, d, dtype)
    bt = block_tables_for(ctx, bs, 12)
    clean = kv.clone()
    poison_outside_context(kv, bt, ctx, bs)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEV)
    q = torch.randn(len(ctx), hq, d, device=DEV)
    want = ref.decode_attention(q, clean, lens, bt, 0.2)
    assert rel_err(ref.decode_attention(q, kv, lens, bt, 0.2), want) < 1e-6
    out = nan_like(q.shape, dtype)
    triton_attention.decode_attention_into(out, q, kv, lens, bt, 0.2, {"num_splits": 2, "block_n": 16})
    assert rel_err(out, want) < TOL[dtype]
    q_lens = [5, 1, 9]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32, device=DEV)
    qp = torch.randn(sum(q_lens), hq, d, device=DEV)
    want = ref.prefill_attention(qp, clean, cu, lens, bt, 0.2)
    assert rel_err(ref.prefill_attention(qp, kv, cu, lens, bt, 0.2), want) < 1e-6
    out = nan_like(qp.shape, dtype)
    triton_attention.prefill_attention_into(out, qp, kv, cu, lens, bt, 0.2, max(q_lens), None)
    assert rel_err(out, want) < TOL[dtype]


# ----------------------------------------------------------------------------- elementwise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 96), (5, 3, 40), (33, 128)])
def test_rms_norm_and_fused_add(dtype, shape):
    x = torch.randn(shape, device=DEV).to(dtype)
    r = torch.randn(shape, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEV)).to(dtype)
    out = nan_like(shape, dtype)
    triton_elementwise.rms_norm_into(out, None, x, None, w, 1e-6)
    assert rel_err(out, ref.rms_norm(x, w, 1e-6)) < TOL[dtype]
    out, s = nan_like(shape, dtype), nan_like(shape, dtype)
    triton_elementwise.rms_norm_into(out, s, x, r, w, 1e-6)
    expect_out, expect_s = ref.fused_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, expect_s)
    assert rel_err(out, expect_out) < TOL[dtype]
    got_out, got_s = triton_ops.fused_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(got_s, expect_s) and rel_err(got_out, expect_out) < TOL[dtype]


def test_rms_norm_on_strided_heads_and_mixed_weight_dtype():
    """Per-head q-norm on a view sliced from a fused qkv output; fp32 weight promotes."""
    torch.manual_seed(0)  # fixed inputs: on rare draws fp32 rounding alone came to 1.06e-5
    t, hq, hkv, d = 6, 4, 2, 32
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEV).to(torch.float16)
    q = qkv[:, : hq * d].view(t, hq, d)
    w = torch.randn(d, device=DEV)
    got = triton_ops.rms_norm(q, w, 1e-5)
    assert got.dtype == torch.float32
    assert rel_err(got, ref.rms_norm(q, w, 1e-5)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,hq,hkv,d", [(1, 2, 1, 16), (9, 4, 2, 64), (5, 6, 3, 40)])
def test_rotary_embedding(dtype, t, hq, hkv, d):
    max_pos = 50
    cache = torch.randn(max_pos, d, device=DEV)  # any values: the kernel must only read them right
    positions = torch.randint(0, max_pos, (t,), device=DEV)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEV).to(dtype)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    q_out, k_out = nan_like(q.shape, dtype), nan_like(k.shape, dtype)
    triton_elementwise.rotary_embedding_into(q_out, k_out, positions, q, k, cache)
    eq, ek = ref.rotary_embedding(positions, q, k, cache)
    assert rel_err(q_out, eq) < TOL[dtype] and rel_err(k_out, ek) < TOL[dtype]
    gq, gk = triton_ops.rotary_embedding(positions, q, k, cache)
    assert rel_err(gq, eq) < TOL[dtype] and rel_err(gk, ek) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 16), (7, 2 * 50), (2, 3, 2 * 96)])
def test_silu_and_mul(dtype, shape):
    x = torch.randn(shape, device=DEV).to(dtype)
    out = nan_like((*shape[:-1], shape[-1] // 2), dtype)
    triton_elementwise.silu_and_mul_into(out, x)
    assert rel_err(out, ref.silu_and_mul(x)) < TOL[dtype]
    assert rel_err(triton_ops.silu_and_mul(x), ref.silu_and_mul(x)) < TOL[dtype]


# ----------------------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU")
def test_decode_attention_is_cuda_graph_capturable():
    bs, hq, hkv, d = 16, 32, 8, 128
    ctx = torch.tensor([1000, 17, 4000, 1], dtype=torch.int32, device=DEV)
    kv = paged_cache(600, bs, hkv, d, torch.bfloat16)
    bt = block_tables_for(ctx.tolist(), bs, 600, width_extra=4)
    q = torch.randn(4, hq, d, device=DEV, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    triton_attention.decode_attention_into(out, q, kv, ctx, bt, 0.1)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_attention.decode_attention_into(out, q, kv, ctx, bt, 0.1)
    for _ in range(2):  # new values in the same buffers, replayed
        q.copy_(torch.randn_like(q))
        ctx.copy_(torch.randint(1, 4000, (4,), device=DEV, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        assert rel_err(out, ref.decode_attention(q, kv, ctx, bt, 0.1)) < TOL[torch.bfloat16]


@pytest.mark.skipif(not ON_CUDA, reason="races and reuse of buffers show only on a GPU")
@pytest.mark.parametrize("splits", [2, 5, 42])
def test_decode_repeated_launches_are_identical(splits):
    """Split partials and their combine: repeated launches give bit-identical, correct results."""
    bs, hq, hkv, d = 16, 32, 8, 128
    ctx_list = [4000, 1, 2500, 4095, 17, 0, 3000, 4096]
    ctx = torch.tensor(ctx_list, dtype=torch.int32, device=DEV)
    kv = paged_cache(2400, bs, hkv, d, torch.bfloat16)
    bt = block_tables_for([max(c, 1) for c in ctx_list], bs, 2400)
    q = torch.randn(len(ctx_list), hq, d, device=DEV, dtype=torch.bfloat16)
    cfg = {"num_splits": splits}
    first = triton_attention.decode_attention_into(
        torch.empty_like(q), q, kv, ctx, bt, 0.1, cfg
    ).clone()
    expect = ref.decode_attention(q[:5], kv, ctx[:5], bt[:5], 0.1)
    assert rel_err(first[:5], expect) < TOL[torch.bfloat16]
    assert torch.equal(first[5], torch.zeros_like(first[5]))
    for _ in range(50):
        out = torch.full_like(q, float("nan"))
        triton_attention.decode_attention_into(out, q, kv, ctx, bt, 0.1, cfg)
        assert torch.equal(out, first)
