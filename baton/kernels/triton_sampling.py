"""Triton batched sampler: one program per row, top-k/top-p/min-p without sorting, Gumbel-max.

Equals `sampling_reference.sample_tokens` (whose docstring fixes the Philox mapping and the
kept-set semantics) token for token. How a row gets its token without sorting V logits:

1. one pass: max m of s = x / T, its lowest id (the greedy answer), and badness (NaN, +inf,
   or nothing above -inf). Greedy and bad rows stop here. Rows with no top_k or min_p (no
   threshold to find: temperature alone, or with top_p) also take step 3's candidate and Z0
   in this same pass (Z0 rescaled as the max grows) and go straight to step 4.
2. top_k (0 < k < V): the k-th largest s by a 16-ary search on the float's order-preserving
   int32 key: each pass counts the tokens at or above 16 pivots at once (spaced in value and
   in key, see the kernel): exact whatever k and the values, ~3 passes on real logits.
   min_p is a closed form: m + log(min_p). t0 = the larger of the two thresholds.
3. one pass: the Gumbel-max candidate c over {s >= t0} and the kept mass Z0 = sum exp(s - m).
4. top_p by rejection (as FlashInfer's sampler, made deterministic by the fixed noise): c is
   in the top-p set iff the mass strictly above s_c is < top_p * Z0 (one pass, no noise). If
   not, every token at or below s_c is out too, so the next candidate is the Gumbel-max over
   {s > s_c} (one pass) — the same token the reference's argmax over the exact top-p set
   gives, since that set lies between the two. A candidate is drawn from the renormalised
   distribution, so with top_p = 0.95 it is accepted at once ~95% of the time: flat logits
   (a kept set of most of the vocabulary) cost nothing extra.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

_R = 1024  # rows of the [R, 4] tile: 4096 tokens per step, 4 per Philox call
_SBLOCK = 1024  # tokens per step of the top-k search ([SBLOCK, NPIV] compares)
TOPK_LIMIT = 1024  # top_k up to this: k-th values from torch.topk, above: the in-kernel search
_NPIV = 16  # pivots per search pass (the 16th is never above the 15th's bracket: see below)


@triton.jit
def _key(s):
    """float32 -> int32 in the floats' order (negative floats' magnitude bits flipped)."""
    b = s.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _unkey(k):
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _uniform(seed, pos, quad, lane):
    """U[0, 1) [R, 4] for token ids quad * 4 + lane: Philox with key = seed, counter =
    (quad, pos, 0, 0), word `lane`, made a float as tl.rand does."""
    w0, w1, w2, w3 = tl.randint4x(seed, (pos << 32) + quad)
    w = tl.where(lane == 0, w0[:, None], tl.where(lane == 1, w1[:, None], tl.where(lane == 2, w2[:, None], w3[:, None])))
    return uint_to_uniform_float(w)


@triton.jit
def _gumbel(seed, pos, quad, lane):
    return -tl.log(-tl.log(_uniform(seed, pos, quad, lane)))


@triton.jit
def _tile(base, start, tile, V, scale):
    """Token ids, in-range mask and scaled logits s = x / T of the [R, 4] tile at `start`."""
    idx = start + tile
    ok = idx < V
    return idx, ok, tl.math.div_rn(tl.load(base + idx, mask=ok, other=float("-inf")).to(tl.float32), scale)


@triton.jit
def _fold_best(score, s, idx, V, best, c, sc):
    """Fold one tile into a running Gumbel-max: (best score, its lowest token id, that token's s)."""
    bm = tl.max(score)
    bi = tl.min(tl.where(score == bm, idx, V))
    bs = tl.sum(tl.where(idx == bi, s, 0.0))
    take = bm > best
    return tl.maximum(best, bm), tl.where(take, bi, c), tl.where(take, bs, sc)


@triton.jit
def _sample_kernel(
    x_ptr, stride_x, V, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, pos_ptr,
    tok_ptr, bad_ptr, greedy_below, kth_ptr,
    R: tl.constexpr, SBLOCK: tl.constexpr, NPIV: tl.constexpr, HAS_KTH: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_x
    BLOCK: tl.constexpr = 4 * R
    T = tl.load(temp_ptr + row)
    sampled = T >= greedy_below
    scale = tl.where(sampled, T, 1.0)
    quads = tl.arange(0, R)
    lane = tl.arange(0, 4)[None, :]
    tile = quads[:, None] * 4 + lane
    NEG = float("-inf")
    k = tl.load(topk_ptr + row)
    top_p = tl.load(topp_ptr + row)
    min_p = tl.load(minp_ptr + row)
    # no threshold to find first (temperature alone, as OpenAI clients send, or with top_p):
    # one pass gives the badness, the max, the Gumbel-max candidate over every token and the
    # mass Z0 (rescaled as the max grows); top_p then needs only its rejection check
    plain = sampled & ((k <= 0) | (k >= V)) & (min_p <= 0.0)

    # 1. max, its lowest id, badness (and for plain rows the candidate and Z0)
    m = tl.full([], NEG, tl.float32)
    arg = tl.full([], 0, tl.int32)
    nbad = tl.full([], 0, tl.int32)
    fin_lo = tl.full([], float("inf"), tl.float32)  # smallest finite s, and how many are finite
    nfin = tl.full([], 0, tl.int32)
    z0 = tl.full([], 0.0, tl.float32)
    c = tl.full([], 0, tl.int32)  # the candidate token and its s
    sc = tl.full([], NEG, tl.float32)
    seed = tl.load(seed_ptr + row)
    pos = tl.load(pos_ptr + row).to(tl.int64)
    if plain:
        best = tl.full([], NEG, tl.float32)
        for start in range(0, V, BLOCK):
            idx, ok, s = _tile(base, start, tile, V, scale)
            nbad += tl.sum(((s != s) | (s == float("inf"))).to(tl.int32))
            m_new = tl.maximum(m, tl.max(s))
            live = m_new > NEG
            z0 = tl.where(live, z0 * tl.exp(m - m_new), 0.0) + tl.sum(
                tl.where(ok & (s > NEG), tl.exp(s - m_new), 0.0))
            m = m_new
            score = tl.where(ok, s + _gumbel(seed, pos, (start // 4 + quads).to(tl.int64), lane), NEG)
            best, c, sc = _fold_best(score, s, idx, V, best, c, sc)
    for start in range(0, tl.where(plain, 0, V), BLOCK):
        idx, ok, s = _tile(base, start, tile, V, scale)
        nbad += tl.sum(((s != s) | (s == float("inf"))).to(tl.int32))
        fin = s > NEG
        fin_lo = tl.minimum(fin_lo, tl.min(tl.where(fin, s, float("inf"))))
        nfin += tl.sum(fin.to(tl.int32))
        bm = tl.max(s)
        bi = tl.min(tl.where(s == bm, idx, V))
        arg = tl.where(bm > m, bi, arg)
        m = tl.maximum(m, bm)
    bad = (nbad > 0) | (m == NEG)
    token = arg

    if sampled & (~plain) & (nbad == 0) & (m > NEG):
        t0 = tl.where(min_p > 0, m + tl.log(tl.maximum(min_p, 1e-30)), NEG)

        # 2. top-k threshold: the largest token key t with count(key >= t) >= k. Invariant:
        # lo is a token's key, count(>= lo) >= k > count(>= hi). Pivots: 8 spaced evenly in
        # value (fast on real logits), 7 in key (the top one lies strictly inside (lo, hi)
        # while hi - lo >= 2: progress whatever the values), and lo + 1 (ends the search as
        # soon as lo is the answer). A pivot that keeps >= k tokens snaps up to the smallest
        # token key at or above it (same count), so lo stays a token's key; ties (bf16) and
        # distinct values end alike, in ~3 passes on real logits, <= 12 ever.
        if HAS_KTH:
            if (k > 0) & (k < V):  # the k-th largest x, found by torch.topk: / T keeps the order
                t0 = tl.maximum(t0, tl.math.div_rn(tl.load(kth_ptr + row).to(tl.float32), scale))
        elif (k > 0) & (k < V):
            lo = _key(fin_lo).to(tl.int64)  # every finite token is >= it
            hi = _key(m).to(tl.int64) + 1
            if nfin < k:  # fewer than k finite tokens: the k-th is -inf, all stay
                lo = _key(tl.full([], NEG, tl.float32)).to(tl.int64)
                hi = lo + 1
            j = tl.arange(0, NPIV)
            frac = ((j % (NPIV // 2)) + 1).to(tl.float32) / (NPIV // 2 + 1)
            jk = ((j % (NPIV // 2)) + 1).to(tl.int64)
            while hi - lo > 1:
                lo_v = _unkey(lo.to(tl.int32))
                hi_v = _unkey((hi - 1).to(tl.int32))
                pv = _key(lo_v + (hi_v - lo_v) * frac).to(tl.int64)
                pk = tl.where(jk == 1, lo + 1, lo + (hi - lo) * jk // (NPIV // 2 + 1))
                piv = tl.where(j < NPIV // 2, pv, pk)
                piv = tl.minimum(tl.maximum(piv, lo), hi).to(tl.int32)
                cnt = tl.zeros([NPIV], tl.int32)
                snap = tl.full([NPIV], 2**31 - 1, tl.int32)
                for start in range(0, V, SBLOCK):
                    sidx = start + tl.arange(0, SBLOCK)
                    sok = sidx < V
                    s = tl.math.div_rn(tl.load(base + sidx, mask=sok, other=NEG).to(tl.float32), scale)
                    key = _key(s)[:, None]
                    hit = (key >= piv[None, :]) & sok[:, None]
                    cnt += tl.sum(hit.to(tl.int32), axis=0)
                    snap = tl.minimum(snap, tl.min(tl.where(hit, key, 2**31 - 1), axis=0))
                lo = tl.maximum(lo, tl.max(tl.where(cnt >= k, snap, lo.to(tl.int32))).to(tl.int64))
                hi = tl.minimum(hi, tl.min(tl.where(cnt < k, piv, hi.to(tl.int32))).to(tl.int64))
            t0 = tl.maximum(t0, _unkey(lo.to(tl.int32)))

        # 3. the Gumbel-max candidate over {s >= t0}, and the kept mass
        z0 = tl.full([], 0.0, tl.float32)
        best = tl.full([], NEG, tl.float32)
        c = arg
        sc = m
        for start in range(0, V, BLOCK):
            idx, ok, s = _tile(base, start, tile, V, scale)
            keep = ok & (s >= t0)
            z0 += tl.sum(tl.where(keep, tl.exp(s - m), 0.0))
            score = tl.where(keep, s + _gumbel(seed, pos, (start // 4 + quads).to(tl.int64), lane), NEG)
            best, c, sc = _fold_best(score, s, idx, V, best, c, sc)

    if sampled & (nbad == 0) & (m > NEG):
        # 4. top-p by rejection
        if top_p < 1.0:
            done = tl.full([], 0, tl.int32)
            while done == 0:
                above = tl.full([], 0.0, tl.float32)
                for start in range(0, V, BLOCK):
                    idx, ok, s = _tile(base, start, tile, V, scale)
                    above += tl.sum(tl.where(ok & (s > sc), tl.exp(s - m), 0.0))
                if above < top_p * z0:
                    done = 1
                else:
                    best = tl.full([], NEG, tl.float32)
                    nc = c
                    ns = sc
                    for start in range(0, V, BLOCK):
                        idx, ok, s = _tile(base, start, tile, V, scale)
                        up = ok & (s > sc)
                        score = tl.where(up, s + _gumbel(seed, pos, (start // 4 + quads).to(tl.int64), lane), NEG)
                        best, nc, ns = _fold_best(score, s, idx, V, best, nc, ns)
                    # no finite score above s_c (every u there was 0: p ~ 2**-31 each): keep c
                    if best == NEG:
                        done = 1
                    c = nc
                    sc = ns
        token = c

    tl.store(tok_ptr + row, tl.where(bad, 0, token).to(tl.int64))
    tl.store(bad_ptr + row, bad.to(tl.uint8))


def sample_tokens(
    x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, greedy_below: float,
    max_top_k: int = 0, r: int = _R, sblock: int = _SBLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As sampling_reference.sample_tokens; no host sync. `max_top_k`: the largest top_k of
    the batch when the host knows it; up to TOPK_LIMIT, torch.topk finds each row's k-th
    value (faster than the in-kernel search for small k). `r`/`sblock`: tile sizes (tests)."""
    assert x.stride(-1) == 1
    B, V = x.shape
    kth = None
    kk = min(max_top_k, V - 1)  # rows with k >= V cut nothing; every other row's k is <= kk
    if 0 < kk <= TOPK_LIMIT and B:
        vals = torch.topk(x, kk, dim=-1).values
        kth = vals.gather(1, (top_k.to(torch.int64).clamp(1, kk) - 1)[:, None])[:, 0]
    tokens = torch.empty(B, dtype=torch.int64, device=x.device)
    bad = torch.empty(B, dtype=torch.uint8, device=x.device)
    if B:
        _sample_kernel[(B,)](
            x, x.stride(0), V, temperature.float(), top_k.to(torch.int32), top_p.float(), min_p.float(),
            seeds.to(torch.int64), positions.to(torch.int64), tokens, bad, greedy_below,
            tokens if kth is None else kth,
            R=r, SBLOCK=sblock, NPIV=_NPIV, HAS_KTH=kth is not None, num_warps=8,
        )
    return tokens, bad.view(torch.bool)


@triton.jit
def _noise_kernel(seed_ptr, pos_ptr, out_ptr, V, R: tl.constexpr, UNIFORM: tl.constexpr):
    """The noise alone, [B, V] float32 (U[0, 1) or Gumbel): to test the Philox mapping."""
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(seed_ptr + row)
    pos = tl.load(pos_ptr + row).to(tl.int64)
    quads = tl.arange(0, R)
    lane = tl.arange(0, 4)[None, :]
    for start in range(0, V, 4 * R):
        idx = start + quads[:, None] * 4 + lane
        if UNIFORM:
            g = _uniform(seed, pos, (start // 4 + quads).to(tl.int64), lane)
        else:
            g = _gumbel(seed, pos, (start // 4 + quads).to(tl.int64), lane)
        tl.store(out_ptr + row * V + idx, g, mask=idx < V)


def noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int, uniform: bool = False,
          r: int = _R) -> torch.Tensor:
    out = torch.empty(seeds.shape[0], vocab_size, dtype=torch.float32, device=seeds.device)
    _noise_kernel[(seeds.shape[0],)](
        seeds.to(torch.int64), positions.to(torch.int64), out, vocab_size, R=r, UNIFORM=uniform)
    return out


@triton.jit
def _bitmask_kernel(x_ptr, m_ptr, V, W, stride_x, stride_m, BLOCK: tl.constexpr):
    """One tile of one row: the tokens whose bit is 0 (or past the mask's 32*W) get -inf; the
    allowed ones are not written."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    word = offs // 32
    inb = offs < V
    words = tl.load(m_ptr + row * stride_m + word, mask=inb & (word < W), other=0)
    banned = ((words >> (offs % 32)) & 1) == 0
    tl.store(x_ptr + row * stride_x + offs, tl.full([BLOCK], float("-inf"), tl.float32).to(x_ptr.dtype.element_ty),
             mask=inb & banned)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """sampling_reference.apply_bitmask in one pass: ~3 bytes per logit written at most, against
    the reference's [B, 32*W] int32 unpacking (several passes, 39 MB at batch 64 x 152k)."""
    B, V = logits.shape
    assert logits.stride(1) == 1 and bitmask.stride(1) == 1 and bitmask.dtype == torch.int32
    if B:
        _bitmask_kernel[(B, triton.cdiv(V, block))](logits, bitmask, V, bitmask.shape[1], logits.stride(0),
                                                     bitmask.stride(0), BLOCK=block)
    return logits
