"""The real checkpoint: SmolLM2-135M-Instruct (converted from the pip-shipped GGUF)."""

from __future__ import annotations

import random

import pytest

from baton import LLM, SamplingParams
from baton.engine.tokenizer import Tokenizer
from tests.engine.hf_reference import hf_greedy

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "hi",
    "List three prime numbers.",
]
SYSTEM = ("You are a concise assistant for a company that builds serving systems for large "
          "language models. Answer in one sentence, and never make up facts. ") * 3
NEW = 16


@pytest.fixture(scope="module")
def prompts(smollm2):
    tok = Tokenizer(smollm2)
    chat = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
            for q in QUESTIONS]
    shared = [tok.encode(tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": q}]), add_special_tokens=False)
              for q in QUESTIONS[:2]]
    rng = random.Random(0)
    raw = [[rng.randrange(0, 49152) for _ in range(n)] for n in (1, 7, 300)]
    return chat + shared + raw + [chat[0]]  # the first prompt again: a full repeat


@pytest.fixture(scope="module")
def expected(smollm2, prompts):
    return [hf_greedy(smollm2, p, NEW, stop_at_eos=True) for p in prompts]


@pytest.fixture(scope="module")
def default_llm(smollm2):
    """The engine with its defaults: cold in the greedy test, then asked for Paris (a build is
    seconds: its KV cache is allocated and NaN-filled)."""
    return LLM(smollm2)


@pytest.mark.parametrize("options", [
    dict(),
    dict(max_num_batched_tokens=32, num_kv_blocks=40),  # chunked prefill and preemption
], ids=["cold-then-cached", "chunked-preempt"])
def test_greedy_equals_transformers(smollm2, prompts, expected, options, request):
    llm = LLM(smollm2, **options) if options else request.getfixturevalue("default_llm")
    params = SamplingParams(max_tokens=NEW, temperature=0)
    first = llm.generate(prompts, params)
    assert [o.token_ids for o in first] == expected
    second = llm.generate(prompts, params)  # every prompt's prefix is cached now
    assert [o.token_ids for o in second] == expected
    if not options:
        assert all(o.num_cached_tokens > 0 for o, p in zip(second, prompts) if len(p) > 16)
    else:
        assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.block_manager.check_idle()


def test_answers_paris(smollm2, default_llm):
    tok = Tokenizer(smollm2)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    out = default_llm.generate([tok.encode(prompt, add_special_tokens=False)],
                               SamplingParams(max_tokens=20, temperature=0))
    assert "Paris" in out[0].text
