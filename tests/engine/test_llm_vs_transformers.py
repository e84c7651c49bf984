"""Greedy token ids equal transformers' generate through every engine path."""

from __future__ import annotations

import random

import pytest

from baton import LLM, SamplingParams
from tests.engine.hf_reference import hf_greedy

LENGTHS = [1, 3, 16, 17, 40, 97, 200, 333]
NEW = 24

MODES = {
    "cold": dict(),
    "chunked": dict(max_num_batched_tokens=24),  # long prompts take many steps
    "preempt": dict(num_kv_blocks=48, block_size=8),  # 384 tokens for ~700 of prompts
    "block4": dict(block_size=4),
}


def random_prompts(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in LENGTHS]


def run(llm: LLM, prompts, **kw) -> list:
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0, **kw))
    llm.engine.block_manager.check_idle()  # every block free or cached with ref count 0
    assert llm.engine.stats().free_blocks == llm.engine.stats().total_blocks
    return outs


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_equals_transformers(tiny_models, arch, mode):
    model = tiny_models(arch)
    prompts = random_prompts(2048, seed=len(arch))
    want = [hf_greedy(model, p, NEW, stop_at_eos=False) for p in prompts]
    llm = LLM(model, **MODES[mode])
    got = run(llm, prompts, ignore_eos=True)
    assert [o.token_ids for o in got] == want
    assert all(o.finish_reason == "length" for o in got)
    if mode == "preempt":
        assert llm.engine.scheduler.num_preemptions > 0
    if mode == "chunked":
        assert llm.engine.scheduler.max_num_batched_tokens < max(LENGTHS)


def test_untied_embeddings(tiny_models):
    model = tiny_models("llama", tie_word_embeddings=False)
    prompts = random_prompts(2048, seed=7)[:4]
    want = [hf_greedy(model, p, NEW, stop_at_eos=False) for p in prompts]
    assert [o.token_ids for o in run(LLM(model), prompts, ignore_eos=True)] == want


def test_prefix_cache_hits_give_the_same_tokens(tiny_qwen3):
    rng = random.Random(3)
    system = [rng.randrange(3, 2048) for _ in range(100)]
    prompts = [system + [rng.randrange(3, 2048) for _ in range(n)] for n in (1, 5, 30, 64)]
    prompts += [prompts[2]]  # the same prompt twice in one batch
    want = [hf_greedy(tiny_qwen3, p, NEW, stop_at_eos=False) for p in prompts]
    llm = LLM(tiny_qwen3, block_size=16)
    first = run(llm, prompts, ignore_eos=True)
    second = run(llm, prompts, ignore_eos=True)  # the whole batch again: all prefixes cached
    assert [o.token_ids for o in first] == want
    assert [o.token_ids for o in second] == want
    # second pass: every prompt finds its full blocks (all but the last token) cached
    for o, p in zip(second, prompts):
        assert o.num_cached_tokens == (len(p) - 1) // 16 * 16
    assert first[0].num_cached_tokens == 0


def test_hits_after_preemption_and_eviction(tiny_qwen3):
    """A cache so small that blocks are evicted and re-computed keeps tokens exact."""
    prompts = random_prompts(2048, seed=11)
    want = [hf_greedy(tiny_qwen3, p, NEW, stop_at_eos=False) for p in prompts]
    llm = LLM(tiny_qwen3, num_kv_blocks=30, block_size=16, max_num_batched_tokens=64)
    for _ in range(2):
        assert [o.token_ids for o in run(llm, prompts, ignore_eos=True)] == want


def test_eos_ends_generation_like_transformers(tiny_models):
    model = tiny_models("qwen3")
    prompts = random_prompts(2048, seed=5)
    want = [hf_greedy(model, p, 64, stop_at_eos=True) for p in prompts]
    llm = LLM(model)
    got = llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0))
    assert [o.token_ids for o in got] == want
    for o in got:
        assert o.finish_reason == ("stop" if o.token_ids[-1] in llm.engine.model_cfg.eos_token_ids else "length")
