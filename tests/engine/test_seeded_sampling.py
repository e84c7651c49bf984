"""Counter-based sampling through the engine: a seeded request's tokens are a function of its
seed, prompt and parameters alone — the same alone, inside a batch of 64 mixed requests at any
row, after preemption and through chunked prefill — and requests without a seed differ."""

from __future__ import annotations

import random

import pytest

from baton.engine.config import EngineConfig
from baton.engine.engine import LLMEngine
from baton.engine.sampling_params import SamplingParams

MINE = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, top_k=40, seed=1234, ignore_eos=True)


def run(engine: LLMEngine, reqs: list[tuple[str, list[int], SamplingParams]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {rid: [] for rid, _, _ in reqs}
    for r in reqs:
        engine.add_request(*r)
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert o.finish_reason != "error", o.error
            out[o.request_id] += o.new_token_ids
    engine.block_manager.check_idle()
    return out


def others(vocab: int, n: int, seed: int) -> list[tuple[str, list[int], SamplingParams]]:
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 90))]
        kind = i % 4
        params = [SamplingParams(max_tokens=rng.randrange(1, 30), temperature=0),
                  SamplingParams(max_tokens=rng.randrange(1, 30), temperature=0.7, seed=i),
                  SamplingParams(max_tokens=rng.randrange(1, 30), temperature=1.3, min_p=0.05),  # no seed
                  SamplingParams(max_tokens=rng.randrange(1, 30), temperature=0.9, top_k=5, seed=10**6 + i,
                                 logprobs=2)][kind]
        reqs.append((f"o{i}", prompt, params))
    return reqs


@pytest.fixture(scope="module")
def prompt(tiny_qwen3):
    return [random.Random(7).randrange(3, 2000) for _ in range(41)]


@pytest.fixture(scope="module")
def alone(tiny_qwen3, prompt):
    return run(LLMEngine(tiny_qwen3), [("mine", prompt, MINE)])["mine"]


@pytest.mark.parametrize("row", [0, 17, 63])
def test_same_tokens_at_any_row_of_a_mixed_batch(tiny_qwen3, prompt, alone, row):
    reqs = others(2000, 63, seed=row)
    reqs.insert(row, ("mine", prompt, MINE))
    got = run(LLMEngine(tiny_qwen3, EngineConfig(max_num_seqs=64)), reqs)
    assert got["mine"] == alone


def test_same_tokens_after_preemption_and_through_chunked_prefill(tiny_qwen3, prompt, alone):
    # a cache too small for everyone (sequences are preempted and recomputed) and a step budget
    # smaller than the prompt (chunked prefill)
    engine = LLMEngine(tiny_qwen3, EngineConfig(num_kv_blocks=40, block_size=4, max_num_batched_tokens=16))
    reqs = others(2000, 12, seed=99)
    reqs.insert(5, ("mine", prompt, MINE))
    got = run(engine, reqs)
    assert engine.scheduler.num_preemptions > 0
    assert got["mine"] == alone


def test_the_draw_depends_on_the_seed_and_requests_without_one_differ(tiny_qwen3, prompt, alone):
    other_seed = SamplingParams(**{**MINE.__dict__, "seed": 4321})
    unseeded = SamplingParams(**{**MINE.__dict__, "seed": None})
    got = run(LLMEngine(tiny_qwen3), [("b", prompt, other_seed), ("c", prompt, unseeded),
                                       ("d", prompt, unseeded)])
    assert got["b"] != alone
    assert got["c"] != got["d"]
