"""Soak: hundreds of concurrent streamed requests through one router onto a colocated pod and a
prefill + decode pair (CPU, tiny model), while clients leave mid-stream and others send bad input.

Real processes (tests/stack.py): a redis-server, the three pods (small KV caches, so that the
burst also preempts, and finds the decode pod without room to reserve) and the router. Every
request is drawn from one seeded generator (SEED): chat or completions over a few shared system
prompts and documents, greedy or seeded, a few tokens each, all arriving within SPREAD_S, so
that most are open at once. Its kind says what the client does:
  stream  the official client, streamed with usage, read to the end
  whole   the official client, not streamed
  raw     httpx, streamed with usage and logprobs, read to the last byte: one [DONE], last
  leave   httpx, streamed (ignore_eos, 32 tokens): closes the response after 1 to 6 events
  cancel  the official client, streamed: its task is cancelled 0 to 0.3 s after the response
          began (one whose answer was whole by then is checked as an answer)
  early   a bare socket: the whole request, then the socket is closed before a byte is read
          (the router has the request and nobody to answer), streamed or not
  bad     one of tests/router/bad_requests.py's requests, streamed or not: its OpenAI error
Every answer is the offline engine's for its prompt (tests/oracle.py): text, finish_reason,
completion tokens (and the logprobs name as many), with one response id, never seen twice.
Afterwards the router has counted every request exactly once (200 or 499, or the bad ones' 4xx),
retried none, and no pod request failed or timed out; within a deadline every service is idle:
no KV block held, no request open, running or waiting, no reservation, staging buffer or
transfer left, one UCX connection between the pair, and nothing in flight in the router.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

from baton import LLM
from baton.engine.tokenizer import Tokenizer
from tests.oracle import chat_ids, engine, router_params
from tests.router.bad_requests import BAD, CHAT, COMPL, check_error, request_kw
from tests.stack import Service, ServiceStack, wait_idle

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SEED = 14  # every request, its kind, arrival and leaving point come from random.Random(SEED)
N = 240
SPREAD_S = 0.5  # requests arrive at random within this many seconds
# KV blocks of each pod: a burst of prompts of 4-6 blocks fills them, so the pods also preempt,
# and the decode pod also finds no room to reserve (it then queues the prompt and prefills it)
KV_BLOCKS = 48
KINDS = {"stream": 22, "whole": 10, "raw": 14, "leave": 18, "cancel": 14, "early": 10, "bad": 12}

SYSTEMS = [
    "You answer questions about the Python language reference, briefly and exactly.",
    "You are a terse assistant for a team that maintains a large serving system written in Python.",
    "Reply in one sentence. You know the assignment, assert and import statements well.",
]
QUESTIONS = [
    "What does the assert statement do?",
    "When is __debug__ False?",
    "What does an import statement bind?",
    "Name the targets of an assignment statement.",
]
DOCUMENTS = [
    (
        "Assignment statements are used to (re)bind names to values and to modify attributes "
        "or items of mutable objects. An assignment statement evaluates the expression list"
    ),
    (
        "The import statement finds a module, loading and initializing it if necessary, and "
        "then defines a name or names in the local namespace for the scope where it occurs"
    ),
]
TAILS = [" and then", " which means", ".", " Note that"]


@dataclass
class Request:
    i: int
    kind: str
    chat: bool
    body: dict | bytes  # the JSON body (bad: raw bytes, or JSON with the model named)
    start_s: float  # arrival, from the soak's start
    leave_after: float = 0  # leave: data events read; cancel, early: seconds before leaving
    error: tuple[int, str | None] | None = None  # bad: the status and param the error names

    @property
    def path(self) -> str:
        return CHAT if self.chat else COMPL


@dataclass
class Answer:
    """One complete answer as the client saw it."""

    ids: set[str]  # response ids (one)
    text: str
    finish_reasons: list[str]  # one per choice
    prompt_tokens: int
    completion_tokens: int
    logprob_tokens: int | None = None  # tokens named by streamed logprobs (raw)


@dataclass
class Outcome:
    answer: Answer | None = None
    left_after: int | None = None  # leave: data events read before closing
    cancelled: bool = False  # cancel: the task was cancelled before the answer was whole


def draw_requests(model: str) -> list[Request]:
    rng = random.Random(SEED)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=N)
    out = []
    for i, kind in enumerate(kinds):
        start_s = rng.uniform(0, SPREAD_S)
        if kind == "bad":
            path, body, status, param = rng.choice(BAD)
            if isinstance(body, dict):
                body = request_kw(body, model)["json"]
                if rng.random() < 0.5:
                    body["stream"] = True  # a bad streamed request gets the same error
            out.append(Request(i, kind, path == CHAT, body, start_s, error=(status, param)))
            continue
        chat = rng.random() < 0.5
        if chat:
            msgs = [
                {"role": "system", "content": rng.choice(SYSTEMS)},
                {"role": "user", "content": rng.choice(QUESTIONS)},
            ]
            body = {"model": model, "messages": msgs}
        else:
            body = {"model": model, "prompt": rng.choice(DOCUMENTS) + rng.choice(TAILS)}
        leave_after = 0.0
        if kind in ("leave", "early"):  # long enough to be running when the client goes
            body |= {"max_tokens": 32, "temperature": 0, "ignore_eos": True}
            leave_after = rng.randint(1, 6) if kind == "leave" else rng.uniform(0.0, 0.5)
        else:
            body["max_tokens"] = rng.randint(1, 8)
            if rng.random() < 0.2:  # seeded sampling: as reproducible as greedy
                body |= {"temperature": 0.9, "seed": rng.choice([3, 5])}
            else:
                body["temperature"] = 0
            if kind == "cancel":
                leave_after = rng.uniform(0.0, 0.3)
        if kind in ("stream", "raw", "cancel", "leave") or (kind == "early" and rng.random() < 0.7):
            body |= {"stream": True}
            if kind != "early":
                body["stream_options"] = {"include_usage": True}
        if kind == "raw":
            body |= {"logprobs": True} if chat else {"logprobs": 1}
        out.append(Request(i, kind, chat, body, start_s, leave_after))
    return out


def oracle_key(tok, body: dict) -> tuple:
    """(prompt ids, max_tokens, temperature, seed): what the answer to `body` depends on."""
    ids = chat_ids(tok, body["messages"]) if "messages" in body else tok.encode(body["prompt"])
    return tuple(ids), body["max_tokens"], body["temperature"], body.get("seed")


# -- clients ----------------------------------------------------------------------------------


async def official(client: openai.AsyncOpenAI, req: Request) -> Answer | None:
    """The official client; a cancel request's task is cancelled leave_after seconds after the
    response began (None then, unless the answer was whole by then)."""
    kw = dict(req.body)
    extra = {k: kw.pop(k) for k in ("ignore_eos",) if k in kw}
    create = client.chat.completions.create if req.chat else client.completions.create
    r = await create(**kw, extra_body=extra or None)
    if not kw.get("stream"):
        c = r.choices[0]
        text = c.message.content if req.chat else c.text
        return Answer(
            {r.id}, text, [c.finish_reason], r.usage.prompt_tokens, r.usage.completion_tokens
        )
    ids, text, finish, usage = set(), "", [], None
    try:
        async with r, asyncio.timeout(req.leave_after if req.kind == "cancel" else None):
            async for chunk in r:
                ids.add(chunk.id)
                if chunk.usage is not None:
                    assert usage is None, "usage twice"
                    usage = chunk.usage
                for c in chunk.choices:
                    text += (c.delta.content or "") if req.chat else c.text
                    if c.finish_reason:
                        finish.append(c.finish_reason)
    except TimeoutError:
        return None
    assert usage is not None, "no usage chunk"
    return Answer(ids, text, finish, usage.prompt_tokens, usage.completion_tokens)


async def raw(http: httpx.AsyncClient, req: Request) -> Answer:
    """The whole SSE body: exactly one [DONE], and nothing after it."""
    async with http.stream("POST", req.path, json=req.body) as r:
        assert r.status_code == 200, r.status_code
        events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usage) == 1 and chunks[-1]["usage"], "usage once, in the last chunk"
    text, finish, named = "", [], 0
    for c in chunks:
        for ch in c["choices"]:
            text += (ch["delta"].get("content") or "") if req.chat else ch["text"]
            if ch["finish_reason"]:
                finish.append(ch["finish_reason"])
            if ch["logprobs"]:
                named += len(ch["logprobs"]["content"] if req.chat else ch["logprobs"]["tokens"])
    u = usage[0]
    return Answer(
        {c["id"] for c in chunks}, text, finish, u["prompt_tokens"], u["completion_tokens"], named
    )


async def leave(http: httpx.AsyncClient, req: Request) -> int:
    """Read `leave_after` data events, then close the response (the connection goes with it)."""
    async with http.stream("POST", req.path, json=req.body) as r:
        assert r.status_code == 200, r.status_code
        n = 0
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                assert line != "data: [DONE]" and '"finish_reason": "' not in line, "ended first"
                n += 1
                if n == req.leave_after:
                    return n
    raise AssertionError(f"the stream ended after {n} events")


async def early(port: int, req: Request) -> None:
    """Send the whole request on a bare socket, then close it before reading a byte: the
    router has the request (it was in the socket before the close) and nobody to answer."""
    body = json.dumps(req.body).encode()
    head = f"POST {req.path} HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\n"
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await asyncio.sleep(req.leave_after)
    writer.close()
    await writer.wait_closed()


async def one(req: Request, http: httpx.AsyncClient, client, port: int) -> Outcome:
    out = Outcome()
    try:
        if req.kind == "bad":
            r = await http.post(req.path, **request_kw(req.body, ""))
            check_error(r, *req.error, f"{req.path} {req.body!r:.100}")
        elif req.kind in ("stream", "whole", "cancel"):
            out.answer = await official(client, req)
            out.cancelled = out.answer is None
        elif req.kind == "raw":
            out.answer = await raw(http, req)
        elif req.kind == "leave":
            out.left_after = await leave(http, req)
        else:
            await early(port, req)
    except Exception as e:
        raise AssertionError(f"request {req.i} ({req.kind}, seed {SEED}): {e!r}") from e
    return out


async def soak(router: Service, requests: list[Request]) -> tuple[list[Outcome], float, int]:
    """Every request's outcome, the seconds they took, and the most that were open at once."""
    # A connection for each request: a pooled one idle for the server's keep-alive timeout (5 s)
    # may be closed by the server just as it is reused, and the request fails without an
    # answer (a race of HTTP/1.1 itself, which clients meet by retrying; these do not retry).
    limits = httpx.Limits(max_connections=N + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=router.url, timeout=90, limits=limits, trust_env=False
    ) as http:
        client = openai.AsyncOpenAI(
            base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=90, http_client=http
        )
        t0 = time.monotonic()
        open_now, peak = 0, 0

        async def counted(req: Request) -> Outcome:
            nonlocal open_now, peak
            await asyncio.sleep(max(0.0, t0 + req.start_s - time.monotonic()))  # its arrival
            open_now += 1
            peak = max(peak, open_now)
            try:
                return await one(req, http, client, router.port)
            finally:
                open_now -= 1

        outcomes = await asyncio.gather(*(counted(r) for r in requests))
        return list(outcomes), time.monotonic() - t0, peak


# -- the test ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    return Tokenizer(tiny_qwen3)


def test_soak_mixed_clients_leave_nothing_behind(tiny_qwen3, tok, tmp_path, capsys):
    t_start = time.monotonic()
    with ServiceStack(tmp_path) as st:
        s = st.serve(
            tiny_qwen3,
            roles=("colocated", "prefill", "decode"),
            timeout_s=90,
            router_settings={"refresh_interval_s": 0.2},
            num_kv_blocks=KV_BLOCKS,
        )
        colocated, prefill, decode = s.pods
        router = s.router
        requests = draw_requests(s.model)
        t_ready = time.monotonic()
        outcomes, soak_s, peak = asyncio.run(soak(router, requests))
        idle_s = wait_idle(colocated, prefill, decode, router, timeout_s=20)

        # -- every answer is the engine's for its prompt, once ----------------------------
        llm = LLM(tiny_qwen3, num_kv_blocks=512)
        answered = [(req, out.answer) for req, out in zip(requests, outcomes) if out.answer]
        wants = dict.fromkeys(oracle_key(tok, req.body) for req, _ in answered)
        # one batch: the engine's tokens for a prompt do not depend on its batch (tests/engine)
        keys = list(wants)
        outs = llm.generate(
            [list(k[0]) for k in keys],
            [router_params(tok, max_tokens=m, temperature=t, seed=seed) for _, m, t, seed in keys],
        )
        wants = dict(zip(keys, outs))
        seen_ids: set[str] = set()
        for req, a in answered:
            key = oracle_key(tok, req.body)
            want, case = wants[key], f"request {req.i} ({req.kind}, seed {SEED})"
            assert len(a.ids) == 1 and not (a.ids & seen_ids), (case, a.ids)
            seen_ids |= a.ids
            assert a.finish_reasons == [want.finish_reason], (case, a.finish_reasons)
            assert a.text == tok.decode(want.token_ids), case
            assert a.prompt_tokens == len(key[0]), case
            assert a.completion_tokens == len(want.token_ids), case
            if a.logprob_tokens is not None:
                assert a.logprob_tokens == a.completion_tokens, case

        # -- what the clients did ---------------------------------------------------------
        assert peak >= N // 2  # a soak, not a queue: most requests were open at the same time
        by_kind = {k: [o for r, o in zip(requests, outcomes) if r.kind == k] for k in KINDS}
        n = {k: len(v) for k, v in by_kind.items()}
        assert all(o.answer is not None for k in ("stream", "whole", "raw") for o in by_kind[k])
        leaves = [
            (r.leave_after, o.left_after) for r, o in zip(requests, outcomes) if r.kind == "leave"
        ]
        assert all(want == got for want, got in leaves)  # each left mid-stream, where it meant to
        cancelled = sum(o.cancelled for o in by_kind["cancel"])

        # -- the router: each request counted once, none retried, none failed ---------------
        statuses = {}
        for key, v in router.metrics().items():
            if key.startswith("baton_router_requests_total{"):
                status = key.split('status="')[1].split('"')[0]
                statuses[status] = statuses.get(status, 0) + v
        assert statuses.get("400", 0) + statuses.get("404", 0) == n["bad"], statuses
        assert statuses.get("200", 0) + statuses.get("499", 0) == N - n["bad"], statuses
        assert statuses.get("200", 0) >= len(answered), statuses
        assert router.metric("baton_router_pod_retries_total") == 0
        served = [p.metric("baton_pod_requests_total") for p in (colocated, decode)]
        for p in (colocated, decode):
            assert p.metric("baton_pod_requests_total", status="error") == 0
            assert p.metric("baton_pod_requests_total", status="timeout") == 0
        # both serving pods took part, and the decode pod's prompts came from the prefill pod
        assert min(served) >= 1, served
        sent, received = prefill.transfer_stats(), decode.transfer_stats()
        transfers = {k[8:]: v for k, v in received.items() if k.startswith("outcome_")}
        preempted = [p.metric("baton_pod_preemptions") for p in (colocated, decode)]
        assert received.get("outcome_ok", 0) > 0 and sent["transfers_completed"] > 0
        # one UCX connection between the pair, however many transfers it carried
        assert sent["open_endpoints"] <= 1 and received["open_endpoints"] <= 1, (sent, received)

        # -- and the stack serves on, exactly ---------------------------------------------
        msgs = [
            {"role": "system", "content": SYSTEMS[0]},
            {"role": "user", "content": QUESTIONS[0]},
        ]
        r = s.client.chat.completions.create(
            model=s.model, messages=msgs, max_tokens=8, temperature=0
        )
        want = engine(llm, tok, [chat_ids(tok, msgs)], max_tokens=8)[0]
        assert r.choices[0].message.content == tok.decode(want.token_ids)
        wait_idle(colocated, prefill, decode, router, timeout_s=10)
    with capsys.disabled():
        print(
            f"\n[soak] seed {SEED}: {N} requests {n} in {soak_s:.1f} s, up to {peak} open at "
            f"once ({len(answered)} answered, "
            f"{cancelled} cancelled), idle {idle_s:.1f} s after; router statuses {statuses}, "
            f"requests per pod (colocated, decode) {served}, preemptions {preempted}, decode "
            f"pod's transfers {transfers}; stack up in {t_ready - t_start:.1f} s, "
            f"all {time.monotonic() - t_start:.1f} s"
        )
