"""The sampler's kernels: Philox against its published answers, and the Triton sampler against
the torch reference, bit for bit (random words, uniforms, tokens, bad flags).

On CPU the Triton kernel runs in the interpreter (set before triton is imported), float32
and float16 only; BATON_KERNEL_TESTS_CUDA=1 on a GPU host runs it compiled, bf16 included.
Vocabularies are small (1000-5000) and tiles large: the interpreter costs ~4 ms per step.
"""

import os

ON_CUDA = os.environ.get("BATON_KERNEL_TESTS_CUDA") == "1"
if not ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from baton.kernels import sampling_reference as ref
from baton.kernels import triton_sampling

DEV = "cuda" if ON_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
EPS = 1e-5


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32_10: counter, key -> output."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, expect in cases:
        t = [torch.tensor([v], dtype=torch.int64) for v in ctr + key]
        out = ref.philox4x32(*t)
        assert [int(o) for o in out] == list(expect)


def _seeds_positions(n, gen):
    seeds = torch.randint(-(2**63), 2**63 - 1, (n,), generator=gen, dtype=torch.int64)
    seeds[0], seeds[1] = 0, -1  # 0 and 2**64 - 1
    positions = torch.randint(0, 2**31 - 1, (n,), generator=gen)
    positions[0] = 0
    return seeds.to(DEV), positions.to(DEV)


@pytest.mark.parametrize("V", [1000, 4099])
def test_noise_matches_reference(V):
    seeds, positions = _seeds_positions(6, torch.Generator().manual_seed(V))
    u = triton_sampling.noise(seeds, positions, V, uniform=True)
    assert torch.equal(u, ref.uniform(ref.random_bits(seeds, positions, V)))
    assert 0 <= u.min() and u.max() < 1
    g = triton_sampling.noise(seeds, positions, V)
    # the words and uniforms are exact; the log is the device's (differs by an ulp at most)
    torch.testing.assert_close(g, ref.gumbel(seeds, positions, V), rtol=2e-6, atol=2e-6)


def _params(n, V, gen):
    """Every parameter mixed over rows: greedy, temperature alone, top-k (tiny, mid, >= V),
    top-p (from tiny, which rejects many candidates, to 1), min-p, and their combinations."""
    r = lambda: torch.rand((), generator=gen).item()  # noqa: E731
    temps, ks, ps, mps = [], [], [], []
    for i in range(n):
        kind = i % 10  # the last two: temperature alone (the kernel's one-pass path)
        temps.append([0.0, 1e-40, 1.0, 0.7, 1.3, 0.5, 2.0, 1.0, 0.6, 1.0][kind])
        ks.append([0, 0, 0, 1 + int(r() * 20), 0, 300, V + 5, 40, 0, V][kind])
        ps.append([1.0, 1.0, 0.95, 1.0, 0.05 + 0.9 * r(), 0.9, 1.0, 0.3, 1.0, 1.0][kind])
        mps.append([0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.3 * r(), 0.02, 0.0, 0.0][kind])
    f = lambda v: torch.tensor(v, dtype=torch.float32, device=DEV)  # noqa: E731
    return f(temps), torch.tensor(ks, dtype=torch.int32, device=DEV), f(ps), f(mps)


def _both(x, temps, ks, ps, mps, seeds, positions):
    """The kernel both ways (k-th values searched in-kernel, and from torch.topk) and the reference."""
    got = triton_sampling.sample_tokens(x, temps, ks, ps, mps, seeds, positions, EPS, r=1024, sblock=2048)
    max_k = int(ks.max())
    if 0 < max_k:
        hinted = triton_sampling.sample_tokens(x, temps, ks, ps, mps, seeds, positions, EPS, max_k, r=1024)
        assert torch.equal(hinted[0], got[0]) and torch.equal(hinted[1], got[1])
    expect = ref.sample_tokens(x, temps, ks, ps, mps, seeds, positions, EPS)
    return got, expect


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,ties", [(1000, False), (4999, False), (2003, True)])
def test_tokens_match_reference(dtype, V, ties):
    gen = torch.Generator().manual_seed(V + int(ties))
    n = 16
    x = torch.randn(n, V, generator=gen) * 3
    if ties:  # coarse logits: ties at every threshold (top-k's k-th value, top-p groups, max)
        x = torch.round(x * 2) / 2
    x = x.to(dtype).to(DEV)
    temps, ks, ps, mps = _params(n, V, gen)
    seeds, positions = _seeds_positions(n, gen)
    (tok, bad), (etok, ebad) = _both(x, temps, ks, ps, mps, seeds, positions)
    assert torch.equal(bad, ebad) and not bad.any()
    assert torch.equal(tok, etok), (tok, etok)


def test_bad_rows_flag_only_themselves():
    gen = torch.Generator().manual_seed(5)
    V, n = 1500, 8
    x = torch.randn(n, V, generator=gen)
    x[1, 7] = float("nan")
    x[3, 100] = float("inf")
    x[5] = float("-inf")
    x[6, :-1] = float("-inf")  # one finite token: fine, and it must be the one drawn
    x[2, 10] = 3e38  # finite, but / 0.5 overflows: bad for a sampled row
    temps = torch.tensor([1.0, 1.0, 0.5, 0.0, 1.0, 1.0, 0.8, 0.0])
    ks = torch.tensor([0, 0, 0, 0, 5, 5, 0, 0], dtype=torch.int32)
    ps = torch.tensor([0.9, 1.0, 1.0, 1.0, 0.5, 0.5, 0.9, 1.0])  # rows 1, 2: temperature alone
    mps = torch.zeros(n)
    seeds, positions = _seeds_positions(n, gen)
    args = [t.to(DEV) for t in (x, temps, ks, ps, mps, seeds, positions)]
    (tok, bad), (etok, ebad) = _both(*args)
    assert bad.tolist() == [False, True, True, True, False, True, False, False]
    assert torch.equal(bad, ebad) and torch.equal(tok, etok)
    assert tok[6] == V - 1 and (tok[bad] == 0).all()


def test_kernel_batch_invariant():
    """A row alone gives the token it gives at any row of a batch."""
    gen = torch.Generator().manual_seed(9)
    V, n = 1200, 12
    x = torch.randn(n, V, generator=gen).to(DEV)
    temps, ks, ps, mps = _params(n, V, gen)
    seeds, positions = _seeds_positions(n, gen)
    tok, _ = triton_sampling.sample_tokens(x, temps, ks, ps, mps, seeds, positions, EPS, r=1024)
    for i in (2, 4, 7):
        sl = slice(i, i + 1)
        alone, _ = triton_sampling.sample_tokens(
            x[sl], temps[sl], ks[sl], ps[sl], mps[sl], seeds[sl], positions[sl], EPS, r=1024)
        assert alone.item() == tok[i].item()


def test_top_k_with_masked_tokens():
    """-inf tokens (masks): fewer finite tokens than k, exactly k, and more; ties at the k-th."""
    gen = torch.Generator().manual_seed(13)
    V, n = 1100, 6
    x = torch.randn(n, V, generator=gen)
    x[0, 10:] = float("-inf")  # 10 finite, k = 20
    x[1, 20:] = float("-inf")  # 20 finite, k = 20
    x[2, 500:] = float("-inf")  # 500 finite, k = 20
    x[3] = torch.round(x[3])  # heavy ties at the k-th value
    x[4, ::2] = float("-inf")
    x[5, :] = 1.0  # all equal: every token is the k-th
    temps = torch.ones(n)
    ks = torch.full((n,), 20, dtype=torch.int32)
    ps = torch.tensor([1.0, 0.5, 1.0, 0.7, 1.0, 0.5])
    seeds, positions = _seeds_positions(n, gen)
    args = [t.to(DEV) for t in (x, temps, ks, ps, torch.zeros(n), seeds, positions)]
    (tok, bad), (etok, ebad) = _both(*args)
    assert not bad.any() and not ebad.any()
    assert torch.equal(tok, etok), (tok, etok)


@pytest.mark.parametrize("V,W", [(1000, 32), (1000, 20), (4101, 129)], ids=["padded", "short-mask", "ragged"])
def test_bitmask_kernel_equals_the_reference(V, W):
    """Structured outputs' token mask: the Triton pass sets exactly the reference's -inf, for a
    mask wider than V (bits past V ignored), narrower (columns past 32*W banned), a row of all
    ones (untouched) and a row allowing one token."""
    gen = torch.Generator().manual_seed(V + W)
    for dtype in DTYPES:
        logits = torch.randn(4, V, generator=gen).to(dtype).to(DEV)
        mask = torch.randint(-2**31, 2**31 - 1, (4, W), generator=gen, dtype=torch.int64).to(torch.int32)
        mask[1] = -1
        mask[2] = 0
        mask[2, 3] = 1 << 5  # token 101 only
        mask = mask.to(DEV)
        want = ref.apply_bitmask(logits.clone(), mask)
        got = triton_sampling.apply_bitmask(logits.clone(), mask, block=1024)
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(got, want), dtype
        assert torch.equal(got[1, : min(V, 32 * W)], logits[1, : min(V, 32 * W)])
        assert torch.nonzero(~torch.isinf(got[2])).flatten().tolist() == [101]
