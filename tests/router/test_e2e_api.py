"""The OpenAI API end to end on real colocated pods (CPU): served tokens equal the offline engine's.

One stack for the module: a real redis-server, two colocated pods and the router, each a
process started as `baton up` starts it (tests/stack.py). The offline engine
(`baton.LLM`, token-exact against transformers in tests/engine) is the oracle: the prompt ids
are the router's own (chat template, then the tokenizer), so the served tokens must be the
engine's tokens for those ids, greedy or seeded. Then bad input: OpenAI's error shape and
status, and no KV block left held on any pod, also after clients that leave mid-request.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from baton import LLM
from baton.engine.tokenizer import Tokenizer
from baton.kvindex.hashing import model_identity, model_seed
from tests.oracle import chat_ids, engine
from tests.router.bad_requests import BAD, COMPL, USER, check_error, request_kw
from tests.stack import ServiceStack, index_hits, wait_for, wait_idle

pytestmark = pytest.mark.e2e

BLOCK = 16
SYSTEM = "You answer questions about the Python language reference, briefly and exactly."
MESSAGES = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What does the assert statement do when optimization is on?"},
]


@pytest.fixture(scope="module")
def served(tiny_qwen3, tmp_path_factory):
    with ServiceStack(tmp_path_factory.mktemp("e2e-api")) as st:
        yield st.serve(tiny_qwen3, num_kv_blocks=512)


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    return Tokenizer(tiny_qwen3)


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, num_kv_blocks=512, block_size=BLOCK)


def read_stream(stream) -> tuple[dict[int, str], dict[int, str], object]:
    """A chat or completions stream's text and finish_reason per choice index, and its usage."""
    texts, finish, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = (c.delta.content or "") if hasattr(c, "delta") else c.text
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


def greedy_chat_stream(served, messages, max_tokens: int):
    """read_stream of a greedy chat completion streamed with usage."""
    return read_stream(served.client.chat.completions.create(
        model=served.model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}))


# -- tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_is_the_engines_tokens(served, tok, llm, stream):
    c, model = served.client, served.model
    ids = chat_ids(tok, MESSAGES)
    want = engine(llm, tok, [ids], max_tokens=24)[0]
    if stream:
        texts, finish, usage = greedy_chat_stream(served, MESSAGES, 24)
        text, reason = texts[0], finish[0]
    else:
        r = c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, temperature=0)
        text, reason, usage = r.choices[0].message.content, r.choices[0].finish_reason, r.usage
        assert r.choices[0].message.role == "assistant"
    assert text == tok.decode(want.token_ids)
    assert reason == want.finish_reason
    assert usage.prompt_tokens == len(ids)  # the tokenizer's count of the templated prompt
    assert usage.completion_tokens == len(want.token_ids)
    assert usage.total_tokens == len(ids) + len(want.token_ids)


def test_completions_token_ids_are_the_engines(served, tok, llm):
    """A batch of token-id prompts of different lengths; logprobs name every served token."""
    c, model = served.client, served.model
    prompts = [
        tok.encode("The extended form of the assert statement", add_special_tokens=False),
        tok.encode(
            "Assignment statements are used to (re)bind names to values and to modify "
            "attributes or items of mutable objects",
            add_special_tokens=False,
        ),
    ]
    want = engine(llm, tok, prompts, max_tokens=12, ignore_eos=True, logprobs=1)
    r = c.completions.create(
        model=model,
        prompt=prompts,
        max_tokens=12,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    assert [ch.index for ch in r.choices] == [0, 1]
    for ch, w in zip(r.choices, want):
        assert ch.text == tok.decode(w.token_ids)
        assert ch.finish_reason == "length"
        assert ch.logprobs.tokens == [
            tok.decode([t], skip_special_tokens=False) for t in w.token_ids
        ]
        assert ch.logprobs.token_logprobs == pytest.approx([e[0][1] for e in w.logprobs], abs=1e-3)
    assert r.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert r.usage.completion_tokens == 24

    # streamed, one prompt: the same text, chunk by chunk
    texts, finish, usage = read_stream(
        c.completions.create(
            model=model,
            prompt=prompts[1],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert texts[0] == tok.decode(want[1].token_ids) and finish[0] == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompts[1]), 12)


def test_completions_string_prompt_is_the_engines(served, tok, llm):
    c, model = served.client, served.model
    prompt = "Assert statements are a convenient way to insert debugging assertions"
    want = engine(llm, tok, [tok.encode(prompt)], max_tokens=10)[0]
    r = c.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == tok.decode(want.token_ids)
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == len(want.token_ids)


def _stop_string(text: str) -> tuple[str, int]:
    """A 3-character stop string whose first occurrence is well inside `text`."""
    for p in range(6, len(text) - 3):
        s = text[p : p + 3]
        if s.strip() and text.find(s) == p:
            return s, p
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_text_right_before_it(served, tok, llm, stream):
    c, model = served.client, served.model
    msgs = [{"role": "user", "content": "Name the targets of an assignment statement."}]
    full = tok.decode(
        engine(llm, tok, [chat_ids(tok, msgs)], max_tokens=32, ignore_eos=True)[0].token_ids
    )
    stop, at = _stop_string(full)
    kw = {
        "model": model,
        "messages": msgs,
        "max_tokens": 32,
        "temperature": 0,
        "stop": [stop, "\x00never"],
        "extra_body": {"ignore_eos": True},
    }
    if stream:
        texts, finish, _ = read_stream(c.chat.completions.create(stream=True, **kw))
        text, reason = texts[0], finish[0]
    else:
        r = c.chat.completions.create(**kw)
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert text == full[:at]
    assert reason == "stop"


def test_max_tokens_is_exact(served, tok, llm):
    c, model = served.client, served.model
    for limit in (1, 7):
        r = c.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_completion_tokens=limit,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        want = engine(llm, tok, [chat_ids(tok, MESSAGES)], max_tokens=limit, ignore_eos=True)[0]
        assert r.usage.completion_tokens == limit
        assert r.choices[0].finish_reason == "length"
        assert r.choices[0].message.content == tok.decode(want.token_ids)


def test_n_choices_with_seed_are_reproducible_and_the_engines(served, tok, llm):
    """n=3 at temperature 0.9 with seed 7: choice i samples with seed 7 + i, as the engine does."""
    c, model = served.client, served.model
    kw = {
        "model": model,
        "messages": MESSAGES,
        "n": 3,
        "max_tokens": 16,
        "temperature": 0.9,
        "seed": 7,
        "extra_body": {"ignore_eos": True},
    }
    first = c.chat.completions.create(**kw)
    again = c.chat.completions.create(**kw)
    texts = [ch.message.content for ch in first.choices]
    assert [ch.index for ch in first.choices] == [0, 1, 2]
    assert texts == [ch.message.content for ch in again.choices]
    assert len(set(texts)) > 1  # each choice samples on its own
    ids = chat_ids(tok, MESSAGES)
    want = [
        engine(llm, tok, [ids], max_tokens=16, temperature=0.9, seed=7 + i, ignore_eos=True)[0]
        for i in range(3)
    ]
    assert texts == [tok.decode(w.token_ids) for w in want]
    assert first.usage.completion_tokens == 48 and first.usage.prompt_tokens == len(ids)

    # streamed n: the same three texts, interleaved by index
    streamed, finish, _ = read_stream(c.chat.completions.create(stream=True, **kw))
    assert [streamed[i] for i in range(3)] == texts and set(finish.values()) == {"length"}


def test_seed_reproducible_at_temperature(served):
    c, model = served.client, served.model

    def sample(seed):
        r = c.completions.create(
            model=model,
            prompt="The simple form of assert",
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].text

    base = sample(1234)
    assert sample(1234) == base
    assert any(sample(s) != base for s in (1, 2, 3))  # a different seed usually differs


def test_usage_counts_and_cached_tokens_on_a_repeat(served, tok, tiny_qwen3):
    c, model = served.client, served.model
    msgs = [
        {"role": "system", "content": "Counting usage. " + SYSTEM * 4},  # new, several blocks
        {"role": "user", "content": "When is __debug__ False?"},
    ]
    ids = chat_ids(tok, msgs)
    r1 = c.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0)
    assert r1.usage.prompt_tokens == len(ids)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    # the pod publishes its cached blocks every 0.2 s: the index has them before the repeat
    seed = model_seed(model_identity(tiny_qwen3))
    full = (len(ids) - 1) // BLOCK
    wait_for(lambda: full in index_hits(served.redis.url, seed, ids).values(), "blocks indexed", 5)
    texts, _, usage = greedy_chat_stream(served, msgs, 4)
    assert texts[0] == r1.choices[0].message.content
    cached = usage.prompt_tokens_details.cached_tokens
    assert usage.prompt_tokens == len(ids)
    # every full block but the one holding the last prompt token (which is always computed)
    assert cached == (len(ids) - 1) // BLOCK * BLOCK > 0


# -- bad input and clients that leave -------------------------------------------------------


def test_bad_input_gets_openai_errors_and_leaks_nothing(served):
    base, model = served.router.url, served.model
    for path, body, status, param in BAD:
        r = httpx.post(base + path, **request_kw(body, model), timeout=30, trust_env=False)
        check_error(r, status, param, f"{path} {body!r:.120}")
    # the official client maps them to its exception classes
    c = served.client
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=USER)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=model, messages=USER, max_tokens=-3)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=model, messages=[])
    wait_idle(*served.pods, timeout_s=5)
    # and the stack still serves
    r = c.chat.completions.create(model=model, messages=USER, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1
    wait_idle(*served.pods, timeout_s=5)


def _long_request(model, stream: bool) -> dict:
    # ~4000 tokens take over ten seconds here: finishing is not what frees the blocks
    return {
        "model": model,
        "prompt": "The assert statement",
        "max_tokens": 4000,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def test_client_gone_mid_stream_frees_the_pods_blocks(served):
    """Clients leave a stream at different points; each time the pod's blocks come back.

    (Several times: the router once lost such an abort now and then, see pod_client.py.)
    """
    pods, base = served.pods, served.router.url
    for leave_after in (1, 3, 5, 10, 20):
        aborted = sum(p.metric("baton_pod_requests_total", status="abort") for p in pods)
        held, chunks = 0.0, 0
        with httpx.stream(
            "POST",
            base + COMPL,
            json=_long_request(served.model, True),
            timeout=30,
            trust_env=False,
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():  # leaving this loop early closes the connection
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    chunks += 1
                    if chunks == leave_after:
                        # still reading: the request runs on a pod and holds blocks there
                        held = sum(p.metric("baton_pod_kv_blocks_used") for p in pods)
                        break
        assert chunks == leave_after and held > 0
        # the connection is closed: router -> pod abort -> blocks back, long before 4000 tokens
        wait_idle(*pods, timeout_s=10)
        now = sum(p.metric("baton_pod_requests_total", status="abort") for p in pods)
        assert now == aborted + 1
    assert sum(p.metric("baton_pod_generation_tokens_total") for p in pods) < 3000


def test_client_gone_before_a_non_streamed_answer_frees_the_blocks(served):
    pods, base = served.pods, served.router.url
    aborted = sum(p.metric("baton_pod_requests_total", status="abort") for p in pods)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            base + COMPL, json=_long_request(served.model, False), timeout=1.0, trust_env=False
        )
    wait_idle(*pods, timeout_s=10)
    assert sum(p.metric("baton_pod_requests_total", status="abort") for p in pods) == aborted + 1
