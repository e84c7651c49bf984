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
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from baton import LLM, SamplingParams
from baton.engine.tokenizer import Tokenizer
from tests.stack import ServiceStack

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
        redis = st.redis()
        with ThreadPoolExecutor(2) as ex:  # two pods start in parallel: half the wait
            pods = list(
                ex.map(
                    lambda _: st.pod("decode", tiny_qwen3, redis_url=redis.url, num_kv_blocks=512),
                    range(2),
                )
            )
        router = st.router(tiny_qwen3, redis_url=redis.url)
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=60)
        yield {
            "pods": pods,
            "router": router,
            "client": client,
            "model": client.models.list().data[0].id,
        }


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    return Tokenizer(tiny_qwen3)


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3, num_kv_blocks=512, block_size=BLOCK)


def chat_ids(tok, messages) -> list[int]:
    """The prompt ids the router builds for a chat request."""
    return tok.encode(
        tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False
    )


def engine(llm, tok, prompts, **kw):
    """The oracle: the engine's outputs, with the stop ids the router sends (EOS unless ignored)."""
    kw.setdefault("temperature", 0.0)
    if not kw.get("ignore_eos"):
        kw.setdefault("stop_token_ids", list(tok.eos_token_ids))
    return llm.generate(prompts, SamplingParams(**kw))


def read_chat_stream(stream) -> tuple[dict[int, str], dict[int, str], object]:
    texts, finish, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


def read_completion_stream(stream) -> tuple[dict[int, str], dict[int, str], object]:
    texts, finish, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


def pod_metric(pod, prefix: str) -> float:
    return sum(v for k, v in pod.metrics().items() if k.startswith(prefix))


def wait_pods_idle(pods, timeout_s: float = 10.0) -> float:
    """Seconds until every pod holds no KV block and no open request; fails at the deadline."""
    t0 = time.monotonic()
    while True:
        m = [p.metrics() for p in pods]
        held = [(x["baton_pod_kv_blocks_used"], x["baton_pod_open_requests"]) for x in m]
        if all(h == (0, 0) for h in held):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"pods still hold (kv_blocks_used, open_requests) = {held}")
        time.sleep(0.1)


# -- tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_is_the_engines_tokens(served, tok, llm, stream):
    c, model = served["client"], served["model"]
    ids = chat_ids(tok, MESSAGES)
    want = engine(llm, tok, [ids], max_tokens=24)[0]
    if stream:
        texts, finish, usage = read_chat_stream(
            c.chat.completions.create(
                model=model,
                messages=MESSAGES,
                max_tokens=24,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
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
    c, model = served["client"], served["model"]
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
    texts, finish, usage = read_completion_stream(
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
    c, model = served["client"], served["model"]
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
    c, model = served["client"], served["model"]
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
        texts, finish, _ = read_chat_stream(c.chat.completions.create(stream=True, **kw))
        text, reason = texts[0], finish[0]
    else:
        r = c.chat.completions.create(**kw)
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert text == full[:at]
    assert reason == "stop"


def test_max_tokens_is_exact(served, tok, llm):
    c, model = served["client"], served["model"]
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
    c, model = served["client"], served["model"]
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
    streamed, finish, _ = read_chat_stream(c.chat.completions.create(stream=True, **kw))
    assert [streamed[i] for i in range(3)] == texts and set(finish.values()) == {"length"}


def test_seed_reproducible_at_temperature(served):
    c, model = served["client"], served["model"]

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


def test_usage_counts_and_cached_tokens_on_a_repeat(served, tok):
    c, model = served["client"], served["model"]
    msgs = [
        {"role": "system", "content": "Counting usage. " + SYSTEM * 4},  # new, several blocks
        {"role": "user", "content": "When is __debug__ False?"},
    ]
    ids = chat_ids(tok, msgs)
    r1 = c.chat.completions.create(model=model, messages=msgs, max_tokens=4, temperature=0)
    assert r1.usage.prompt_tokens == len(ids)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    time.sleep(1.0)  # the pod publishes its cached blocks every 0.2 s; let the index see them
    texts, _, usage = read_chat_stream(
        c.chat.completions.create(
            model=model,
            messages=msgs,
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert texts[0] == r1.choices[0].message.content
    cached = usage.prompt_tokens_details.cached_tokens
    assert usage.prompt_tokens == len(ids)
    # every full block but the one holding the last prompt token (which is always computed)
    assert cached == (len(ids) - 1) // BLOCK * BLOCK > 0


# -- bad input and clients that leave -------------------------------------------------------

M = "MODEL"  # replaced by the served model's name
CHAT, COMPL = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
BAD = [
    # (path, body (dict, or raw bytes), status, param the error names (or None))
    (CHAT, b'{"model": "x", "messages": [', 400, None),
    (COMPL, b"not json at all", 400, None),
    (CHAT, {"model": M, "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": M, "messages": USER, "max_tokens": "5"}, 400, "max_tokens"),
    (CHAT, {"model": M, "messages": USER, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"model": M, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    (COMPL, {"model": M, "prompt": 5}, 400, "prompt"),
    (CHAT, {"model": M, "messages": USER, "max_tokens": -1}, 400, "max_tokens"),
    (COMPL, {"model": M, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"model": M, "messages": USER, "n": 0}, 400, "n"),
    (CHAT, {"model": "no-such-model", "messages": USER}, 404, "model"),
    (COMPL, {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    (CHAT, {"model": M, "messages": []}, 400, "messages"),
    (COMPL, {"model": M, "prompt": []}, 400, "prompt"),
    (COMPL, {"model": M, "prompt": [5] * 5000}, 400, "prompt"),  # over max_model_len (4096)
    (CHAT, {"model": M, "messages": [{"role": "user", "content": "x " * 5000}]}, 400, "messages"),
    (COMPL, {"model": M, "prompt": [5] * 10, "max_tokens": 4090}, 400, "prompt"),
    (COMPL, {"model": M, "prompt": [1, 2, 10**6]}, 400, "prompt"),  # outside the vocabulary
]


def test_bad_input_gets_openai_errors_and_leaks_nothing(served):
    base, model = served["router"].url, served["model"]
    for path, body, status, param in BAD:
        if isinstance(body, bytes):
            r = httpx.post(
                base + path,
                content=body,
                headers={"content-type": "application/json"},
                timeout=30,
                trust_env=False,
            )
        else:
            body = {k: (model if v == M else v) for k, v in body.items()}
            r = httpx.post(base + path, json=body, timeout=30, trust_env=False)
        case = f"{path} {body!r:.120}"
        assert r.status_code == status, (case, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, case
        assert isinstance(err["message"], str) and err["message"], case
        assert err["type"] == "invalid_request_error", (case, err)
        assert status != 404 or err["code"] == "model_not_found", (case, err)
        assert err["param"] == param, (case, err)
    # the official client maps them to its exception classes
    c = served["client"]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=USER)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=model, messages=USER, max_tokens=-3)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=model, messages=[])
    wait_pods_idle(served["pods"], timeout_s=5)
    # and the stack still serves
    r = c.chat.completions.create(model=model, messages=USER, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1
    wait_pods_idle(served["pods"], timeout_s=5)


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
    pods, base = served["pods"], served["router"].url
    for leave_after in (1, 3, 5, 10, 20):
        aborted = sum(pod_metric(p, 'baton_pod_requests_total{status="abort"}') for p in pods)
        held, chunks = 0.0, 0
        with httpx.stream(
            "POST",
            base + COMPL,
            json=_long_request(served["model"], True),
            timeout=30,
            trust_env=False,
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():  # leaving this loop early closes the connection
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    chunks += 1
                    if chunks == leave_after:
                        # still reading: the request runs on a pod and holds blocks there
                        held = sum(pod_metric(p, "baton_pod_kv_blocks_used") for p in pods)
                        break
        assert chunks == leave_after and held > 0
        # the connection is closed: router -> pod abort -> blocks back, long before 4000 tokens
        wait_pods_idle(pods, timeout_s=10)
        now = sum(pod_metric(p, 'baton_pod_requests_total{status="abort"}') for p in pods)
        assert now == aborted + 1
    assert sum(pod_metric(p, "baton_pod_generation_tokens_total") for p in pods) < 3000


def test_client_gone_before_a_non_streamed_answer_frees_the_blocks(served):
    pods, base = served["pods"], served["router"].url
    aborted = sum(pod_metric(p, 'baton_pod_requests_total{status="abort"}') for p in pods)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            base + COMPL, json=_long_request(served["model"], False), timeout=1.0, trust_env=False
        )
    wait_pods_idle(pods, timeout_s=10)
    assert (
        sum(pod_metric(p, 'baton_pod_requests_total{status="abort"}') for p in pods) == aborted + 1
    )
