"""The references themselves against independent formulas, so no kernel's oracle is its own.

Attention goes through torch's scaled_dot_product_attention in float64 on K/V gathered token
by token from the paged cache (GQA expanded by hand, causal mask built from positions); rope
through a complex-number rotation with a real frequency table; the rest through their
textbook formulas in float64; the cache ops through plain Python loops over slots.
"""

import pytest
import torch
import torch.nn.functional as F

from baton.kernels import reference as ref


def close(a, b, tol):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() < tol


def contiguous_kv(kv_layer, block_table, n):
    """Token t of a sequence lives at slot block_table[t // bs] * bs + t % bs."""
    bs = kv_layer.shape[2]
    rows = [kv_layer[:, int(block_table[t // bs]), t % bs] for t in range(n)]  # each [2, Hkv, D]
    kv = torch.stack(rows, dim=1)  # [2, n, Hkv, D]
    return kv[0], kv[1]


def sdpa(q, k, v, scale, q_positions):
    """q [Lq, Hq, D], k/v [Lk, Hkv, D]; query at position p sees keys 0..p."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    mask = torch.arange(k.shape[0])[None, :] <= q_positions[:, None]
    out = F.scaled_dot_product_attention(
        q.double().transpose(0, 1),
        k.double().transpose(0, 1),
        v.double().transpose(0, 1),
        attn_mask=mask,
        scale=scale,
    )
    return out.transpose(0, 1)


def random_tables(context_lens, bs, num_blocks):
    width = max((c + bs - 1) // bs for c in context_lens) + 2
    perm = torch.randperm(num_blocks)
    rows, at = [], 0
    for c in context_lens:
        n = (c + bs - 1) // bs
        rows.append(torch.cat([perm[at : at + n], torch.randint(0, num_blocks, (width - n,))]))
        at += n
    return torch.stack(rows).int()


@pytest.mark.parametrize("hq,hkv,bs", [(4, 4, 4), (8, 2, 16), (6, 1, 8)])
def test_prefill_reference_matches_sdpa(hq, hkv, bs):
    seqs = [(13, 13), (40, 9), (7, 1)]  # (context, new tokens): with and without prefix
    d, scale = 16, 0.3
    ctx = [c for c, _ in seqs]
    kv = torch.randn(2, 30, bs, hkv, d)
    bt = random_tables(ctx, bs, 30)
    q_lens = [n for _, n in seqs]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), hq, d)
    got = ref.prefill_attention(q, kv, cu, torch.tensor(ctx, dtype=torch.int32), bt, scale)
    for i, (c, n) in enumerate(seqs):
        k, v = contiguous_kv(kv, bt[i], c)
        expect = sdpa(q[cu[i] : cu[i + 1]], k, v, scale, torch.arange(c - n, c))
        assert close(got[cu[i] : cu[i + 1]], expect, 1e-5)


@pytest.mark.parametrize("hq,hkv,bs", [(4, 4, 4), (8, 2, 16), (32, 8, 16)])
def test_decode_reference_matches_sdpa(hq, hkv, bs):
    ctx = [1, 50, 17, 33]
    d, scale = 32, 0.2
    kv = torch.randn(2, 40, bs, hkv, d)
    bt = random_tables(ctx, bs, 40)
    q = torch.randn(len(ctx), hq, d)
    got = ref.decode_attention(q, kv, torch.tensor(ctx, dtype=torch.int32), bt, scale)
    for i, c in enumerate(ctx):
        k, v = contiguous_kv(kv, bt[i], c)
        expect = sdpa(q[i : i + 1], k, v, scale, torch.tensor([c - 1]))
        assert close(got[i : i + 1], expect, 1e-5)


def test_rotary_reference_is_a_complex_rotation():
    t, hq, hkv, d, base = 5, 3, 1, 16, 10000.0
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(64, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [pos, D/2]
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1).float()
    positions = torch.tensor([0, 3, 63, 10, 3])
    q, k = torch.randn(t, hq, d), torch.randn(t, hkv, d)
    got_q, got_k = ref.rotary_embedding(positions, q, k, cache)
    turn = torch.polar(torch.ones_like(angles), angles)[positions][:, None, :]  # e^{i*angle}

    def rotate(x):  # neox: element j pairs with element j + D/2
        z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * turn
        return torch.cat([z.real, z.imag], dim=-1)

    assert close(got_q, rotate(q), 1e-6) and close(got_k, rotate(k), 1e-6)
    # a rotation keeps each pair's length
    assert torch.allclose(got_q.norm(dim=-1), q.norm(dim=-1), rtol=1e-5)


def test_rms_norm_and_fused_add_reference_formulas():
    x, r, w, eps = torch.randn(6, 48), torch.randn(6, 48), torch.randn(48), 1e-6
    xd = x.double()
    expect = xd / torch.sqrt((xd * xd).sum(-1, keepdim=True) / 48 + eps) * w.double()
    assert close(ref.rms_norm(x, w, eps), expect, 1e-6)
    out, s = ref.fused_add_rms_norm(x, r, w, eps)
    assert torch.equal(s, x + r)
    sd = (x + r).double()
    assert close(out, sd / torch.sqrt(sd.pow(2).mean(-1, keepdim=True) + eps) * w.double(), 1e-6)


def test_silu_and_mul_reference_formula():
    x = torch.randn(4, 3, 2 * 20)
    gate, up = x[..., :20].double(), x[..., 20:].double()
    assert close(ref.silu_and_mul(x), gate / (1 + torch.exp(-gate)) * up, 1e-6)


def test_cache_references_follow_slots():
    bs, hkv, d = 4, 2, 8
    kv = torch.randn(2, 6, bs, hkv, d)
    slots = torch.tensor([5, -1, 0, 23, 9])
    k, v = torch.randn(5, hkv, d), torch.randn(5, hkv, d)
    expect = kv.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            expect[0, s // bs, s % bs] = k[i]
            expect[1, s // bs, s % bs] = v[i]
    ref.store_kv(k, v, kv, slots)
    assert torch.equal(kv, expect)
    keep = torch.tensor([5, 0, 23, 9])
    buf = ref.gather_kv(kv, keep)
    for i, s in enumerate(keep.tolist()):
        assert torch.equal(buf[:, i], kv[:, s // bs, s % bs])
    other = torch.zeros(2, 3, 8, hkv, d)  # another block size
    dst = torch.tensor([17, 2, 8, 23])
    ref.scatter_kv(buf, other, dst)
    for i, s in enumerate(dst.tolist()):
        assert torch.equal(other[:, s // 8, s % 8], buf[:, i])
