"""The offline engine as the oracle of end-to-end tests: the prompt ids the router builds (or
random ones), and what `baton.LLM` (token-exact against transformers, tests/engine) generates
for them with the stop ids the router sends."""

from __future__ import annotations

import random

from baton import SamplingParams


def random_prompt(seed: int | random.Random, n: int) -> list[int]:
    """n token ids of the tiny models' trained vocabulary, from `seed` (or from an rng, going on)."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    return [rng.randrange(3, 2048) for _ in range(n)]


def chat_ids(tok, messages) -> list[int]:
    """The prompt ids the router builds for a chat request."""
    return tok.encode(
        tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False
    )


def router_params(tok, **kw) -> SamplingParams:
    """SamplingParams as the router fills them in: greedy unless told, EOS stops unless ignored."""
    kw.setdefault("temperature", 0.0)
    if not kw.get("ignore_eos"):
        kw.setdefault("stop_token_ids", list(tok.eos_token_ids))
    return SamplingParams(**kw)


def engine(llm, tok, prompts, **kw):
    """The engine's outputs for `prompts` under router_params(tok, **kw)."""
    return llm.generate(prompts, router_params(tok, **kw))
