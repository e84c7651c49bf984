"""The batched sampler (CPU: the torch reference path) against a per-row reference written from
the definitions, its distribution, batch invariance, and the mutations those tests must catch."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from baton.engine.sampler import PenaltyState, SamplingTensors, new_seed, sample_batch
from baton.engine.sampling_params import SamplingParams
from baton.kernels import ops
from baton.kernels import sampling_reference as ref


# ------------------------------------------------------------------ per-row definitions
def kept_by_definition(s: torch.Tensor, p: SamplingParams) -> set[int]:
    """Tokens min-p, top-k and top-p keep, from their definitions, in float64, one row."""
    s64 = s.double()
    m = s64.max().item()
    prob = torch.exp(s64 - m)  # unnormalised: ratios are what min-p and top-p need
    kept = set(range(len(s)))
    if p.min_p > 0:
        kept = {i for i in kept if prob[i].item() >= p.min_p}
    if 0 < p.top_k < len(s):
        kth = sorted(s64.tolist(), reverse=True)[p.top_k - 1]
        kept = {i for i in kept if s64[i].item() >= kth}
    if p.top_p < 1:
        z = sum(prob[i].item() for i in kept)
        order = sorted(kept, key=lambda i: -s64[i].item())
        out, mass, j = set(), 0.0, 0
        while j < len(order):  # whole groups of equal values: keep while the mass before < top_p
            group = [i for i in order[j:] if s64[i].item() == s64[order[j]].item()]
            if mass / z >= p.top_p:
                break
            out.update(group)
            mass += sum(prob[i].item() for i in group)
            j += len(group)
        kept = out
    return kept


def row_reference(logits: torch.Tensor, p: SamplingParams, seed: int, pos: int,
                  prompt: list[int], output: list[int]) -> int:
    x = logits.float().clone()
    for tok, b in (p.logit_bias or {}).items():
        x[tok] += b
    if p.penalized:
        for tok in set(prompt) | set(output):
            x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
        for tok, c in Counter(output).items():
            x[tok] = x[tok] - p.frequency_penalty * c - p.presence_penalty
    if p.greedy:
        return int(torch.argmax(x))
    s = x / torch.tensor(p.temperature, dtype=torch.float32)
    g = ref.gumbel(torch.tensor([seed]), torch.tensor([pos]), len(s))[0]
    kept = kept_by_definition(s, p)
    score = torch.full_like(s, float("-inf"))
    idx = torch.tensor(sorted(kept))
    score[idx] = s[idx] + g[idx]
    return int(torch.argmax(score))


def random_params(gen: torch.Generator, V: int) -> SamplingParams:
    r = lambda: torch.rand((), generator=gen).item()  # noqa: E731
    pick = lambda xs: xs[int(r() * len(xs))]  # noqa: E731
    kw = dict(temperature=pick([0.0, 1e-40, 0.3, 0.7, 1.0, 1.0, 1.5]), top_k=pick([0, 0, 1, 5, 50, V + 1]),
              top_p=pick([1.0, 1.0, 0.95, 0.6, 0.1]), min_p=pick([0.0, 0.0, 0.05, 0.3]),
              logprobs=pick([None, None, 0, 3]))
    if r() < 0.5:
        kw.update(presence_penalty=pick([0.0, 1.5, -0.5]), frequency_penalty=pick([0.0, 0.7, -1.0]),
                  repetition_penalty=pick([1.0, 1.3, 0.8]))
    if r() < 0.4:
        kw["logit_bias"] = {int(r() * V): pick([-100.0, 5.0, 2.5, 100.0]) for _ in range(3)}
    return SamplingParams(**kw)


def test_batched_equals_per_row_reference():
    gen = torch.Generator().manual_seed(0)
    B, V = 48, 257
    logits = torch.randn(B, V, generator=gen) * 2
    params = [random_params(gen, V) for _ in range(B)]
    seeds = [new_seed() for _ in range(B)]
    positions = torch.randint(0, 4000, (B,), generator=gen).tolist()
    prompts = [torch.randint(0, V, (20,), generator=gen).tolist() for _ in range(B)]
    outputs = [torch.randint(0, V, (int(torch.randint(0, 30, (), generator=gen)),), generator=gen).tolist()
               for _ in range(B)]
    state = PenaltyState(B + 3, V, "cpu")
    slots = [(i * 7) % (B + 3) for i in range(B)]  # slots are storage, not rows
    for i in range(B):
        state.reset(slots[i], prompts[i], outputs[i])
    st = SamplingTensors.build(params, seeds, positions, "cpu", slots)
    out = sample_batch(logits, st, state)
    expect = [row_reference(logits[i], params[i], seeds[i], positions[i], prompts[i], outputs[i])
              for i in range(B)]
    assert out.tokens.tolist() == expect
    assert not out.bad.any()
    # logprobs: the raw logits' log_softmax, for the rows that asked
    lps = out.logprob_lists()
    for i, p in enumerate(params):
        if p.logprobs is None:
            assert lps[i] is None
            continue
        lp = torch.log_softmax(logits[i], -1)
        assert lps[i][0] == (expect[i], pytest.approx(lp[expect[i]].item(), abs=1e-6))
        top = torch.topk(lp, p.logprobs)
        assert [t for t, _ in lps[i][1:]] == top.indices.tolist()
    # appending the step's tokens counts them in each row's slot
    before = state.counts.clone()
    state.append(st.slots, out.tokens)
    for i in range(B):
        assert state.counts[slots[i], expect[i]] == before[slots[i], expect[i]] + 1


def test_greedy_tokens_and_logprobs_from_the_definitions():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 100, generator=gen)
    params = [SamplingParams(temperature=0, logprobs=k) for k in (None, 0, 2, 5, None)]
    out = sample_batch(logits, SamplingTensors.build(params, [1] * 5, [3] * 5, "cpu"))
    assert out.tokens.tolist() == logits.argmax(-1).tolist()
    lp = torch.log_softmax(logits, -1)
    for i, (got, p) in enumerate(zip(out.logprob_lists(), params)):
        if p.logprobs is None:
            assert got is None
            continue
        t = int(logits[i].argmax())
        top = torch.topk(lp[i], p.logprobs)
        want = [(t, float(lp[i, t]))] + list(zip(top.indices.tolist(), top.values.tolist()))
        assert [x for x, _ in got] == [x for x, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6)


# ------------------------------------------------------------------ distributions
DIST_CASES = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=6),
    SamplingParams(temperature=1.2, top_p=0.7),
    SamplingParams(temperature=1.0, min_p=0.15),
    SamplingParams(temperature=0.9, top_k=10, top_p=0.8, min_p=0.05),
]


def check_distribution(p: SamplingParams, vary: str, n: int = 12000) -> None:
    """n seeded draws (over positions of one seed, or over seeds at one position) against
    softmax(logits / T) renormalised over the kept set: chi-square at p ~ 1e-4 (fixed seeds,
    so the outcome is fixed too), and never a token outside the kept set."""
    gen = torch.Generator().manual_seed(11)
    V = 24
    logits = torch.randn(V, generator=gen) * 1.5
    st = SamplingTensors.build([p] * n, [1234567 + (i if vary == "seed" else 0) for i in range(n)],
                               [i if vary == "position" else 77 for i in range(n)], "cpu")
    tokens = sample_batch(logits.expand(n, V).contiguous(), st).tokens.tolist()
    s = logits / p.temperature
    kept = kept_by_definition(s, p)
    assert set(tokens) <= kept, f"drew {set(tokens) - kept} outside the kept set"
    idx = torch.tensor(sorted(kept))
    probs = torch.softmax(s[idx].double(), 0)
    counts = Counter(tokens)
    expected = (probs * n).tolist()
    observed = [counts[int(i)] for i in idx]
    # pool the bins expected under 5 into one
    bins, pool_e, pool_o = [], 0.0, 0
    for e, o in zip(expected, observed):
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
        else:
            bins.append((e, o))
    if pool_e > 0:
        bins.append((pool_e, pool_o))
    chi2 = sum((o - e) ** 2 / e for e, o in bins)
    dof = max(len(bins) - 1, 1)
    z = 3.72  # one-sided p = 1e-4; Wilson-Hilferty's chi-square quantile
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < crit, f"chi2 {chi2:.1f} >= {crit:.1f} with {dof} dof"


@pytest.mark.parametrize("p", DIST_CASES, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_distribution_over_positions(p):
    check_distribution(p, "position")


def test_distribution_over_seeds():
    check_distribution(DIST_CASES[4], "seed")


# ------------------------------------------------------------------ batch invariance
def check_batch_invariance() -> None:
    """A seeded row alone gives the token it gives at any row of a batch of 64 mixed rows."""
    gen = torch.Generator().manual_seed(3)
    B, V = 64, 300
    logits = torch.randn(B, V, generator=gen)
    params = [random_params(gen, V) for _ in range(B)]
    seeds = torch.randint(0, 2**62, (B,), generator=gen).tolist()
    positions = torch.randint(0, 500, (B,), generator=gen).tolist()
    state = PenaltyState(B, V, "cpu")
    for i in range(B):
        state.reset(i, torch.randint(0, V, (10,), generator=gen).tolist(),
                    torch.randint(0, V, (5,), generator=gen).tolist())
    # the row under test: sampled, seeded, with top-p; placed at several rows
    mine = SamplingParams(temperature=1.0, top_p=0.9, presence_penalty=0.5)
    row_logits = torch.randn(V, generator=gen)
    alone = sample_batch(row_logits[None], SamplingTensors.build([mine], [42], [17], "cpu", [5]), state).tokens
    for at in (0, 1, 31, 63):
        lg = logits.clone()
        lg[at] = row_logits
        ps, ss, pos, sl = list(params), list(seeds), list(positions), list(range(B))
        ps[at], ss[at], pos[at], sl[at] = mine, 42, 17, 5
        out = sample_batch(lg, SamplingTensors.build(ps, ss, pos, "cpu", sl), state).tokens
        assert out[at] == alone[0], f"row {at}: {out[at]} != {alone[0]} alone"


def test_batch_invariance():
    check_batch_invariance()


def test_seed_and_position_change_the_draw():
    V, n = 1000, 32
    flat = torch.zeros(n, V)
    p = [SamplingParams(temperature=1.0)] * n
    by_seed = sample_batch(flat, SamplingTensors.build(p, [new_seed() for _ in range(n)], [5] * n, "cpu"))
    by_pos = sample_batch(flat, SamplingTensors.build(p, [9] * n, list(range(n)), "cpu"))
    same = sample_batch(flat, SamplingTensors.build(p, [9] * n, [5] * n, "cpu"))
    assert len(set(by_seed.tokens.tolist())) > n // 2
    assert len(set(by_pos.tokens.tolist())) > n // 2
    assert len(set(same.tokens.tolist())) == 1


# ------------------------------------------------------------------ mutations the tests must catch
def test_a_draw_ignoring_the_position_fails(monkeypatch):
    real = ref.random_bits
    monkeypatch.setattr(ref, "random_bits", lambda s, pos, v: real(s, pos * 0, v))
    with pytest.raises(AssertionError):
        check_distribution(DIST_CASES[0], "position")


def test_a_row_index_leaking_into_the_seed_fails(monkeypatch):
    real = ref.random_bits
    monkeypatch.setattr(ref, "random_bits", lambda s, pos, v: real(s + torch.arange(len(s)), pos, v))
    with pytest.raises(AssertionError):
        check_batch_invariance()


# ------------------------------------------------------------------ no request hurts its batch
def test_non_finite_row_fails_alone():
    gen = torch.Generator().manual_seed(4)
    B, V = 6, 200
    logits = torch.randn(B, V, generator=gen)
    params = [SamplingParams(temperature=t, top_p=0.9) for t in (1.0, 0.0, 1.0, 0.5, 1.0, 0.0)]
    st = lambda rows: SamplingTensors.build([params[i] for i in rows], [7] * len(rows), rows, "cpu")  # noqa: E731
    clean = sample_batch(logits, st(list(range(B)))).tokens
    logits[1, 3] = float("nan")
    logits[4] = float("-inf")
    out = sample_batch(logits, st(list(range(B))))
    assert out.bad.tolist() == [False, True, False, False, True, False]
    ok = ~out.bad
    assert torch.equal(out.tokens[ok], clean[ok])
    assert (out.tokens[out.bad] == 0).all()


def test_tiny_temperature_is_greedy():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 500, generator=gen)
    p = SamplingParams(temperature=1e-40, top_p=0.9)
    assert p.greedy
    out = sample_batch(logits, SamplingTensors.build([p] * 4, [1, 2, 3, 4], [0] * 4, "cpu"))
    assert torch.equal(out.tokens, logits.argmax(-1)) and not out.bad.any()
    # and straight into the kernel facade, below the epsilon
    t = torch.full((4,), 1e-40)
    tok, bad = ops.sample_tokens(logits, t, torch.zeros(4, dtype=torch.int64), torch.full((4,), 0.9),
                                 torch.zeros(4), torch.arange(4), torch.zeros(4, dtype=torch.int64), 1e-5)
    assert torch.equal(tok, logits.argmax(-1)) and not bad.any()


def test_bf16_logits():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(8, 300, generator=gen).to(torch.bfloat16)
    params = [SamplingParams(temperature=1.0, top_k=20, top_p=0.9, logit_bias={3: 1.0})] * 8
    st = SamplingTensors.build(params, list(range(8)), list(range(8)), "cpu")
    out = sample_batch(logits, st)
    st32 = SamplingTensors.build(params, list(range(8)), list(range(8)), "cpu")
    assert torch.equal(out.tokens, sample_batch(logits.float(), st32).tokens)


@pytest.mark.parametrize("kw", [
    dict(min_p=-0.1), dict(min_p=1.5), dict(presence_penalty=2.5), dict(frequency_penalty=-2.1),
    dict(repetition_penalty=0.0), dict(logit_bias={1: 101.0}), dict(logit_bias={-1: 1.0}),
])
def test_params_validation(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
