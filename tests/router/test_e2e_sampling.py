"""Seeded sampling end to end with the official openai client: the same tokens (and logprobs,
to float32 rounding) from a colocated pod and from a prefill pod + decode pod (the first token sampled on the
prefill pod, the rest on the decode pod, from the seed alone), and requests without a seed
differ from each other."""

from __future__ import annotations

import pytest

from tests.stack import ServiceStack

pytestmark = pytest.mark.e2e

PROMPTS = ["the cache of the router", "a token", "return the value of the block index table " * 3]


def answers(client, model: str) -> list[tuple[str, list, list]]:
    out = []
    for i, prompt in enumerate(PROMPTS):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=1.0, top_p=0.9,
                                      seed=1000 + i, logprobs=3, n=2, extra_body={"ignore_eos": True})
        for c in r.choices:
            assert c.finish_reason == "length"
            out.append((c.text, c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.top_logprobs))
    return out


@pytest.fixture(scope="module")
def disagg(tiny_qwen3, tmp_path_factory):
    """One prefill pod + decode pod for the module: both tests ask it (a start is most of a test)."""
    with ServiceStack(tmp_path_factory.mktemp("disagg")) as st:
        yield st.serve(tiny_qwen3, roles=("prefill", "decode"), num_kv_blocks=512)


def test_seeded_tokens_and_logprobs_colocated_equal_disaggregated(tiny_qwen3, disagg, tmp_path):
    with ServiceStack(tmp_path / "colocated") as st:
        colocated = st.serve(tiny_qwen3, roles=("colocated",), num_kv_blocks=512)
        want = answers(colocated.client, colocated.model)
        # no seed: every request draws its own, so two identical requests differ
        unseeded = [colocated.client.completions.create(
            model=colocated.model, prompt=PROMPTS[0], max_tokens=16, temperature=1.0,
            extra_body={"ignore_eos": True}).choices[0].text for _ in range(2)]
        assert unseeded[0] != unseeded[1]
    got = answers(disagg.client, disagg.model)
    decode = next(p for p in disagg.pods if p.role == "decode")
    assert decode.transfer_stats().get("outcome_ok", 0) >= len(PROMPTS)  # the KV really travelled
    # the same tokens; logprobs to float32 rounding (a batch's composition -- here the n
    # choices prefilled together on one pod, apart on the other -- changes the last bits)
    assert [(text, tokens) for text, tokens, _, _ in got] == [(text, tokens) for text, tokens, _, _ in want]
    for (_, _, lp, top), (_, _, want_lp, want_top) in zip(got, want):
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert [list(t) for t in top] == [list(t) for t in want_top]
        assert [v for t in top for v in t.values()] == pytest.approx(
            [v for t in want_top for v in t.values()], abs=1e-4)
    # the n choices of one request differ (seed + choice index), and the seeds matter
    assert want[0][0] != want[1][0]


def test_logit_bias_100_forces_that_token(tiny_qwen3, disagg):
    """OpenAI's logit_bias (token ids as string keys) through the router to a real sampler: +100
    on one token makes it every token, sampled or greedy, on the prefill pod's first token too."""
    from baton.engine.tokenizer import Tokenizer

    tok = Tokenizer(tiny_qwen3)
    forced = 100
    want = tok.decode([forced] * 6)
    # PROMPTS[0] is shorter than a block: nothing of it is cached, the prefill pod computes it
    c = disagg.client
    for temperature in (1.0, 0.0):
        r = c.completions.create(model=disagg.model, prompt=PROMPTS[0], max_tokens=6, temperature=temperature,
                                 seed=3, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
        assert r.choices[0].text == want
    r = c.chat.completions.create(model=disagg.model, messages=[{"role": "user", "content": "hi"}],
                                  max_tokens=6, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want
