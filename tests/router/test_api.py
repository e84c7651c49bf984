"""The router's OpenAI API through the official `openai` client, against real (fake-engine) pods."""

from __future__ import annotations

import dataclasses
import json
import time

import httpx
import openai
import pytest

from baton.engine.sampling_params import SamplingParams
from baton.engine.tokenizer import Tokenizer
from baton.router.app import create_app
from baton.router.settings import RouterSettings
from tests.stack import free_port, wait_for
from tests.router.fake_pod import FakePod, ServerThread, start_pod

pytestmark = pytest.mark.e2e
MAX_LEN = 256
TEXT = "The quick brown fox jumps over the lazy dog. Hello world, hello there!"


def router_settings(model_dir, pods, **kw) -> RouterSettings:
    base = {
        "model": str(model_dir),
        "served_model_name": "tiny",
        "host": "127.0.0.1",
        "port": free_port(),
        "pods": pods,
        "max_model_len": MAX_LEN,
        "refresh_interval_s": 0.1,
        "stale_after_s": 1.0,
        "first_token_timeout_s": 5.0,
        "token_timeout_s": 5.0,
        "connect_timeout_s": 1.0,
    }
    return RouterSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def stack(model_dir, tmp_path_factory):
    """Two fake pods and a router over them (static pods, no Redis)."""
    from baton.kvindex.hashing import model_identity, model_seed

    seed = model_seed(model_identity(model_dir))
    tok = Tokenizer(model_dir)
    pods = [FakePod(name=f"pod{i}", seed=seed, model="tiny", eos_token_ids=tok.eos_token_ids)
            for i in range(2)]
    servers = [start_pod(p, free_port()) for p in pods]
    s = router_settings(model_dir, [p.url for p in pods])
    router = ServerThread(create_app(s), s.port).start()
    base = f"http://127.0.0.1:{s.port}"
    wait_for(lambda: _ready(base), "router ready", 10)
    yield {"pods": pods, "base": base, "tok": tok}
    router.stop()
    for srv in servers:
        srv.stop()


@pytest.fixture
def st(stack):
    for p in stack["pods"]:
        p.token_delay_s = p.first_token_delay_s = 0.0
        p.fail_next = p.drop_next = 0
        p.tokens_per_line = 1
        p.requests.clear()
        p.aborted.clear()
        p.finished.clear()
    return stack


@pytest.fixture
def client(st):
    return openai.OpenAI(base_url=st["base"] + "/v1", api_key="x", max_retries=0, timeout=20)


def _ready(base) -> bool:
    try:
        return httpx.get(base + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _aborted(st, n):
    wait_for(lambda: sum(len(p.aborted) for p in st["pods"]) == n, f"{n} aborts at the pods", 5)


def echo(tok: Tokenizer, prompt_ids, max_tokens, offset=0, stop_ids=None):
    """What a fake pod generates: (token ids, text, finish_reason)."""
    stop_ids = set(tok.eos_token_ids if stop_ids is None else stop_ids)
    out = []
    for i in range(max_tokens):
        t = prompt_ids[(offset + i) % len(prompt_ids)]
        out.append(t)
        if t in stop_ids:
            return out, tok.decode(out), "stop"
    return out, tok.decode(out), "length"


def chat_prompt(tok, messages):
    return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)


# -- the happy paths -------------------------------------------------------------------------------


def test_models_health_ready_metrics(st, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(st["base"] + "/health").json() == {"status": "ok"}
    assert httpx.get(st["base"] + "/ready").json() == {"ready": True, "live_pods": 2, "live_prefill_pods": 0}
    client.completions.create(model="tiny", prompt=TEXT, max_tokens=2)
    m = httpx.get(st["base"] + "/metrics").text
    for name in (
        "baton_router_requests_total",
        "baton_router_ttft_seconds",
        "baton_router_itl_seconds",
        "baton_router_e2e_seconds",
        "baton_router_routing_decisions_total",
        "baton_router_redis_errors",
    ):
        assert name in m
    assert 'baton_router_requests_total{endpoint="completions",status="200"}' in m


def test_chat_non_stream(st, client):
    tok = st["tok"]
    messages = [{"role": "user", "content": "Hello wörld 🎉"}]
    ids = chat_prompt(tok, messages)
    out, text, finish = echo(tok, ids, 50)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=50)
    assert r.choices[0].message.content == text and text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish == "stop"
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(out)
    assert r.usage.total_tokens == len(ids) + len(out)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    sent = next(b for p in st["pods"] for b in p.requests)
    assert sent["prompt_token_ids"] == ids
    # the pod stopped at EOS itself: the router sends SamplingParams, EOS handling is the engine's
    assert sent["sampling"]["ignore_eos"] is False and sent["sampling"]["stop_token_ids"] == []
    assert dataclasses.asdict(SamplingParams(**sent["sampling"])) == sent["sampling"]
    assert sent["sampling"]["max_tokens"] == 50 and sent["sampling"]["top_k"] == 0


def test_chat_stream_with_usage(st, client):
    tok = st["tok"]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "日本語 please"},
    ]
    ids = chat_prompt(tok, messages)
    out, text, _ = echo(tok, ids, 40)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_completion_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(out)
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_string_and_token_ids(st, client):
    tok = st["tok"]
    ids = tok.encode(TEXT)
    _, text, _ = echo(tok, ids, 7)
    r = client.completions.create(model="tiny", prompt=TEXT, max_tokens=7)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens == len(ids)
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=7)
    assert r2.choices[0].text == text
    # A batch of prompts: one choice per prompt, in order.
    r3 = client.completions.create(model="tiny", prompt=[ids[:5], ids[5:12]], max_tokens=3)
    assert [c.index for c in r3.choices] == [0, 1]
    assert r3.choices[1].text == echo(tok, ids[5:12], 3)[1]
    assert r3.usage.prompt_tokens == 12
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="tiny", prompt=TEXT, max_tokens=7, stream=True)
        if c.choices
    )
    assert streamed == text


def _stop_inside(tok, ids, n):
    """A stop string that straddles a token boundary inside the echoed text, and the text before it."""
    pieces = [tok.decode([t]) for t in ids[:n]]
    for i in range(3, n - 2):
        if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2:
            stop = pieces[i][-2:] + pieces[i + 1][:2]
            full = tok.decode(ids[:n])
            return stop, full[: full.index(stop)]
    raise AssertionError("no suitable stop string")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_split_across_tokens(st, client, stream):
    tok = st["tok"]
    ids = tok.encode(TEXT)
    stop, want = _stop_inside(tok, ids, len(ids))
    for p in st["pods"]:
        p.token_delay_s = 0.01  # still generating when the stop string shows up
    kw = {
        "model": "tiny",
        "prompt": TEXT,
        "max_tokens": 200,
        "stop": [stop, "never-there"],
        "ignore_eos": True,
    }
    if stream:
        chunks = list(
            client.completions.create(
                stream=True,
                extra_body={"ignore_eos": True},
                **{k: v for k, v in kw.items() if k != "ignore_eos"},
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [
            c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
        ]
        assert finish == ["stop"]
        assert all(stop not in c.choices[0].text for c in chunks if c.choices)
    else:
        r = client.completions.create(
            extra_body={"ignore_eos": True}, **{k: v for k, v in kw.items() if k != "ignore_eos"}
        )
        text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert finish == "stop"
        assert r.usage.completion_tokens < 200
    assert text == want
    sent = next(b for p in st["pods"] for b in p.requests)["sampling"]
    assert sent["ignore_eos"] is True
    assert not set(st["tok"].eos_token_ids) & set(sent["stop_token_ids"])
    # The router closed the pod stream: the pod aborted instead of generating 200 tokens.
    _aborted(st, 1)
    assert not any(p.finished for p in st["pods"])


def test_n_and_seed(st, client):
    tok = st["tok"]
    ids = tok.encode(TEXT)
    r = client.completions.create(model="tiny", prompt=TEXT, max_tokens=4, n=3, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, c in enumerate(r.choices):
        assert c.text == echo(tok, ids, 4, offset=5 + i)[1]
    seeds = sorted(b["sampling"]["seed"] for p in st["pods"] for b in p.requests)
    assert seeds == [5, 6, 7]
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(ids)
    # Chat, streamed, n=2: each index gets its own role chunk, text and finish.
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            n=2,
            seed=1,
            max_tokens=6,
            stream=True,
        )
    )
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    cids = chat_prompt(tok, [{"role": "user", "content": "hi"}])
    assert texts == {i: echo(tok, cids, 6, offset=1 + i)[1] for i in (0, 1)}


def test_logprobs(st, client):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert content[0].logprob == -0.5 and [t.logprob for t in content[0].top_logprobs] == [
        -1.0,
        -2.0,
    ]
    sent = next(b for p in st["pods"] for b in p.requests)["sampling"]
    assert sent["logprobs"] == 2 and sent["temperature"] == 0
    r = client.completions.create(model="tiny", prompt=TEXT, max_tokens=3, logprobs=1)
    lp = r.choices[0].logprobs
    assert (
        len(lp.tokens) == 3
        and lp.token_logprobs == [-0.5] * 3
        and all(len(t) == 1 for t in lp.top_logprobs)
    )
    assert "".join(lp.tokens) == r.choices[0].text
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert r.choices[0].logprobs is None


# -- errors ------------------------------------------------------------------------------------------


def _post(st, path, payload, raw=False):
    body = payload if raw else json.dumps(payload)
    return httpx.post(
        st["base"] + path, content=body, headers={"content-type": "application/json"}, timeout=10
    )


def _assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "payload,param",
    [
        ({"model": "tiny", "messages": MSG, "max_tokens": -1}, "max_tokens"),
        ({"model": "tiny", "messages": MSG, "max_tokens": "5"}, "max_tokens"),
        ({"model": "tiny", "messages": MSG, "temperature": "hot"}, "temperature"),
        ({"model": "tiny", "messages": MSG, "temperature": 3.0}, "temperature"),
        ({"model": "tiny", "messages": MSG, "top_p": 0}, "top_p"),
        ({"model": "tiny", "messages": MSG, "n": 0}, "n"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": "hi"}, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": MSG}, "model"),
        ({"model": "tiny", "messages": MSG, "top_logprobs": 2}, "top_logprobs"),
        (
            {"model": "tiny", "messages": MSG, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ({"model": "tiny", "messages": MSG, "stop": [""]}, "stop"),
    ],
)
def test_chat_bad_params_are_400(st, payload, param):
    _assert_error(_post(st, "/v1/chat/completions", payload), 400, param)


def test_malformed_json_is_400(st):
    err = _assert_error(
        _post(st, "/v1/chat/completions", '{"model": "tiny", "messages": [', raw=True), 400
    )
    assert "JSON" in err["message"]
    _assert_error(_post(st, "/v1/completions", "[1, 2]", raw=True), 400)


def test_unknown_model_is_404(st, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MSG)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    _assert_error(httpx.get(st["base"] + "/v1/nowhere"), 404)


def test_too_long_prompt_is_400(st, client):
    tok = st["tok"]
    long_text = "hello world " * 200
    assert len(tok.encode(long_text)) > MAX_LEN
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=long_text, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    ids = tok.encode(TEXT)
    with pytest.raises(openai.BadRequestError):  # prompt fits, prompt + max_tokens does not
        client.completions.create(model="tiny", prompt=ids, max_tokens=MAX_LEN - len(ids) + 1)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=MAX_LEN - len(ids))
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[10**6], max_tokens=1)
    assert e.value.body["param"] == "prompt"
    assert not any(p.requests[:-1] for p in st["pods"] if len(p.requests) > 1)


# -- pods failing, clients leaving ---------------------------------------------------------------------


def test_retry_on_another_pod_before_first_token(st, client):
    bad, good = st["pods"]
    good.running = 50  # looks busy, so the first pick is the bad pod
    try:
        time.sleep(0.3)  # a state poll sees it
        bad.fail_next = 1
        r = client.completions.create(model="tiny", prompt=TEXT, max_tokens=3)
        assert r.choices[0].finish_reason == "length"
        assert len(bad.requests) == 1 and len(good.requests) == 1
        bad.drop_next = 1  # a 200 whose stream ends before any token: retried too
        r = client.completions.create(model="tiny", prompt=TEXT, max_tokens=3)
        assert r.choices[0].finish_reason == "length" and len(good.requests) == 2
        # Every pod failing: a 503 after the budget, not a hang.
        bad.fail_next, good.fail_next = 1, 1
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny", prompt=TEXT, max_tokens=3)
        assert e.value.status_code == 503
        # the pods' URLs and the failures are for the log, not the client (issue 25)
        assert "127.0.0.1" not in e.value.response.text and "PodFailed" not in e.value.response.text
    finally:
        good.running = 0
    assert "baton_router_pod_retries_total 4.0" in httpx.get(st["base"] + "/metrics").text


def test_client_disconnect_aborts_at_pod(st):
    for p in st["pods"]:
        p.token_delay_s = 0.05
    body = {"model": "tiny", "prompt": TEXT, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", st["base"] + "/v1/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # got a token; now hang up
    _aborted(st, 1)
    # Not streaming: the client times out and leaves; the router notices and aborts too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(st["base"] + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
    _aborted(st, 2)
    # Gone before the first token, streamed or not: the router's wait for the first event ends
    # with the client (its watcher), and the pod aborts; the router answers no one and counts 499.
    for p in st["pods"]:
        p.first_token_delay_s = 3.0
    for stream in (True, False):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(st["base"] + "/v1/completions", json={**body, "stream": stream}, timeout=0.5)
    _aborted(st, 4)
    assert not any(p.finished for p in st["pods"])
    metrics = httpx.get(st["base"] + "/metrics").text
    assert 'baton_router_requests_total{endpoint="completions",status="499"} 4.0' in metrics
    assert "baton_router_in_flight_requests 0.0" in metrics


def test_no_pod_ready_is_503(model_dir):
    s = router_settings(model_dir, ["http://127.0.0.1:9"])  # nothing listens there
    server = ServerThread(create_app(s), s.port).start()
    try:
        base = f"http://127.0.0.1:{s.port}"
        assert httpx.get(base + "/ready").status_code == 503
        assert httpx.get(base + "/health").status_code == 200
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=10)
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="tiny", messages=MSG)
        assert e.value.status_code == 503 and e.value.body["code"] == "no_pods_ready"
        with pytest.raises(openai.InternalServerError):
            list(client.chat.completions.create(model="tiny", messages=MSG, stream=True))
    finally:
        server.stop()


def test_many_concurrent_requests(st):
    import asyncio

    tok = st["tok"]
    for p in st["pods"]:
        p.token_delay_s = 0.002
        p.tokens_per_line = 2

    async def main():
        client = openai.AsyncOpenAI(
            base_url=st["base"] + "/v1", api_key="x", max_retries=0, timeout=30
        )

        async def one(i):
            prompt = f"{i} {TEXT}"
            if i % 2:
                chunks = [
                    c
                    async for c in await client.completions.create(
                        model="tiny", prompt=prompt, max_tokens=20, n=2, seed=i, stream=True
                    )
                ]
                texts = [
                    "".join(
                        c.choices[0].text for c in chunks if c.choices and c.choices[0].index == k
                    )
                    for k in (0, 1)
                ]
            else:
                r = await client.completions.create(
                    model="tiny", prompt=prompt, max_tokens=20, n=2, seed=i
                )
                texts = [c.text for c in r.choices]
            ids = tok.encode(prompt)
            assert texts == [echo(tok, ids, 20, offset=i + k)[1] for k in (0, 1)]

        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(32))), 60)
        await client.close()

    asyncio.run(main())
    assert sum(len(p.requests) for p in st["pods"]) == 64
    assert min(len(p.requests) for p in st["pods"]) > 8  # load spread over both pods
