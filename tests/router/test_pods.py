"""What pods publish, as the router uses it: each pod's block size for hashing, its
max_model_len for refusing and routing, static pods' /ready (no Redis, no sockets)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import httpx
import pytest

from baton.engine.limits import prompt_length_error
from baton.kvindex.hashing import block_hashes
from baton.kvindex.index import Lookup
from baton.kvindex.schema import PodRecord
from baton.router.metrics import RouterMetrics
from baton.router.pods import PodTable, PodView
from baton.router.protocol import APIError
from baton.router.serving import Router
from baton.router.settings import RouterSettings

SEED = b"\1" * 16
PROMPT = list(range(100, 180))  # 80 tokens


class StubIndex:
    """An index that holds `cached[pod] = hashes` and counts lookups."""

    def __init__(self, records: dict[str, PodRecord], cached: dict[str, set[bytes]]):
        self.records, self.cached, self.chains = records, cached, []

    async def lookup(self, chain):
        self.chains.append(chain)
        hits = {}
        for pod, held in self.cached.items():
            n = 0
            while n < len(chain) and chain[n] in held:
                n += 1
            if n:
                hits[pod] = n
        return Lookup(dict(self.records), hits)

    async def live_pods(self):
        return dict(self.records)


def _rec(pod_id, block_size=16, max_model_len=0, role="colocated"):
    return PodRecord(pod_id=pod_id, role=role, url=f"http://{pod_id}", model="m",
                     block_size=block_size, max_model_len=max_model_len)


def _table(records, cached=None, pods=(), handler=None):
    s = RouterSettings(model="/m", pods=list(pods))
    index = StubIndex({r.pod_id: r for r in records}, cached or {}) if records else None
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler or (lambda r: httpx.Response(404))))
    t = PodTable(s, http, index, RouterMetrics(), "m", SEED)
    if index is not None:
        t._take_redis_pods(index.records)
    return t


def test_prompt_hashed_with_each_pods_block_size():
    a, b, c = _rec("a", 16), _rec("b", 32), _rec("c", 16)
    cached = {
        "a": set(block_hashes(PROMPT, 16, SEED)[:3]),  # 48 tokens
        "b": set(block_hashes(PROMPT, 32, SEED)[:2]),  # 64 tokens
        "c": set(block_hashes(PROMPT, 32, SEED)),  # a 32-token chain means nothing to c
    }
    t = _table([a, b, c], cached)
    decision, view = asyncio.run(t.pick(PROMPT, set()))
    assert decision.costs["a"] == len(PROMPT) - 48
    assert decision.costs["b"] == len(PROMPT) - 64
    assert decision.costs["c"] == len(PROMPT)
    assert view.record.pod_id == "b" and decision.cached_tokens == 64
    assert sorted(len(ch) for ch in t.index.chains) == [2, 5]  # once per distinct size


def test_one_lookup_when_every_pod_has_the_same_block_size():
    t = _table([_rec("a"), _rec("b")])
    asyncio.run(t.pick(PROMPT, set()))
    assert len(t.index.chains) == 1


def test_no_lookup_when_one_pod_could_take_it():
    """Nothing to choose: one live pod, the other already failed this request, or too small."""
    cached = {"a": set(block_hashes(PROMPT, 16, SEED))}
    t = _table([_rec("a")], cached)
    decision, view = asyncio.run(t.pick(PROMPT, set()))
    assert (view.record.pod_id, decision.reason, t.index.chains) == ("a", "only_pod", [])
    t = _table([_rec("a"), _rec("b"), _rec("small", max_model_len=100)], cached)
    decision, _ = asyncio.run(t.pick(PROMPT, {"b"}, total_len=500))
    assert (decision.pod_id, decision.reason, t.index.chains) == ("a", "only_pod", [])
    decision, _ = asyncio.run(t.pick(PROMPT, set(), total_len=500))  # a or b: look it up
    assert (decision.pod_id, decision.reason, len(t.index.chains)) == ("a", "prefix_hit", 1)


def test_only_pods_whose_max_model_len_fits():
    t = _table([_rec("small", max_model_len=100), _rec("big", max_model_len=1000), _rec("new")])
    assert t.max_model_len() == 1000
    seen = {asyncio.run(t.pick(PROMPT, set(), total_len=500))[0].pod_id for _ in range(30)}
    assert seen == {"big", "new"}  # "new" has not said (0): it may take it
    seen = {asyncio.run(t.pick(PROMPT, set(), total_len=100))[0].pod_id for _ in range(30)}
    assert seen == {"small", "big", "new"}


def test_static_pod_tells_block_size_and_max_model_len_in_ready():
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req.url.path)
        if req.url.path == "/ready":
            return httpx.Response(200, json={"status": "ready", "block_size": 32, "max_model_len": 2048})
        return httpx.Response(200, json={"running": 1})

    t = _table([], pods=["http://p:1"], handler=handler)
    asyncio.run(t.refresh())
    v = t.views["http://p:1"]
    assert v.live and (v.record.block_size, v.record.max_model_len) == (32, 2048)
    asyncio.run(t.refresh())  # described once while it stays live
    assert calls == ["/ready", "/internal/state", "/internal/state"]


def test_static_pod_still_loading_is_asked_again():
    ready = {"code": 503}

    def handler(req):
        if req.url.path == "/ready":
            return httpx.Response(ready["code"], json={"status": "ready", "block_size": 8, "max_model_len": 64})
        return httpx.Response(200, json={})

    t = _table([], pods=["http://p:1"], handler=handler)
    asyncio.run(t.refresh())
    v: PodView = t.views["http://p:1"]
    assert v.live and not v.described and v.record.max_model_len == 0
    ready["code"] = 200
    asyncio.run(t.refresh())
    assert v.described and (v.record.block_size, v.record.max_model_len) == (8, 64)


@pytest.fixture
def router(model_dir):
    r = Router(RouterSettings(model=str(model_dir)))
    r.pods = _table([_rec("a", max_model_len=300), _rec("b", max_model_len=200)])
    return r


def test_router_refuses_what_every_pod_refuses(router):
    with pytest.raises(APIError) as e:
        router.output_budget(300, None, "prompt")
    assert e.value.message == prompt_length_error(300, 300)
    assert (e.value.status, e.value.code, e.value.param) == (400, "context_length_exceeded", "prompt")
    assert router.output_budget(250, None, "prompt") == 50  # all the room the largest pod has
    with pytest.raises(APIError) as e:  # the prompt fits, prompt + max_tokens does not
        router.output_budget(250, 51, "prompt")
    assert e.value.code == "context_length_exceeded" and "you requested 301 tokens" in e.value.message


def test_router_context_before_pods_publish_and_under_a_cap(model_dir, router):
    assert router.max_model_len == 300
    router.s.max_model_len = 256
    assert router.max_model_len == 256
    fresh = Router(RouterSettings(model=str(model_dir)))
    assert fresh.max_model_len == fresh.config_max_model_len > 0  # no pod yet: config.json


class DownIndex(StubIndex):
    """An index whose every call times out (Redis overloaded or gone)."""

    async def live_pods(self):
        raise TimeoutError

    async def lookup(self, chain):
        raise TimeoutError


def test_a_pod_streaming_to_us_stays_live_while_the_registry_and_polls_fail():
    t = _table([_rec("a")], handler=lambda r: httpx.Response(503))  # state polls fail too
    t.index = DownIndex(t.index.records, {})
    v = t.views["a"]
    v.last_ok -= t.s.stale_after_s + 1  # the last registry read is old
    t.heard_from("a")  # ... but the pod just sent us a token
    asyncio.run(t.refresh())
    assert v.live and asyncio.run(t.pick(PROMPT, set()))[0].pod_id == "a"
    v.last_ok -= t.s.stale_after_s + 1  # and silence everywhere: dead
    asyncio.run(t.refresh())
    assert not v.live and asyncio.run(t.pick(PROMPT, set()))[1] is None


def test_a_pod_whose_record_redis_lost_stays_until_the_record_expires():
    """Redis restarted empty: the pods re-publish within a heartbeat; until then the router
    keeps serving them (it dropped them all before: 503 "No pod is ready")."""
    live = replace(_rec("a"), expires=time.time() + 3.0)
    t = _table([live, _rec("b")])  # b's record has no expiry (0): gone at once when missing
    t._take_redis_pods({})  # the registry read back empty
    assert set(t.views) == {"a"} and asyncio.run(t.pick(PROMPT, set()))[0].pod_id == "a"
    t.views["a"].last_ok -= t.s.stale_after_s + 1  # missing longer than stale_after_s: dead
    t._take_redis_pods({})
    assert not t.views
    t = _table([replace(live, expires=time.time() - 1)])  # expired: dead, as before
    t._take_redis_pods({})
    assert not t.views


def test_round_robin_turns_per_role_so_prefill_picks_do_not_pin_one_decode_pod():
    from baton.router.pods import PREFILL_ROLES

    t = _table([_rec("d1", role="decode"), _rec("d2", role="decode"), _rec("p", role="prefill")])
    t.s.policy = "round_robin"
    decode = []
    for _ in range(4):  # each request: a decode pick, then a prefill pick (as serving.py does)
        decode.append(asyncio.run(t.pick(PROMPT, set()))[0].pod_id)
        assert asyncio.run(t.pick(PROMPT, set(), PREFILL_ROLES))[0].pod_id == "p"
    assert decode == ["d1", "d2", "d1", "d2"]


def test_short_texts_tokenize_on_the_loop_long_ones_on_the_threads(router):
    """Same ids either way; only small texts (and chats without tools) stay on the event loop."""
    import threading

    from baton.router.serving import INLINE_TOKENIZE_BYTES

    seen = []  # the thread of each outermost call
    depth = threading.local()

    def recorded(fn):
        def call(*a, **k):
            if not getattr(depth, "n", 0):
                seen.append(threading.current_thread().name)
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return fn(*a, **k)
            finally:
                depth.n -= 1
        return call

    tok = router.tokenizer
    encode, encode_chat = tok.encode, tok.encode_chat
    tok.encode, tok.encode_chat = recorded(encode), recorded(encode_chat)
    short, long = "Hello there, world.", "Hello there, world. " * 40
    assert len(short.encode()) <= INLINE_TOKENIZE_BYTES < len(long.encode())
    loop_thread = threading.current_thread().name

    async def main():
        ids = [await router.encode(t, True) for t in (short, long)]
        msgs = [{"role": "user", "content": short}]
        render = lambda ms: tok.apply_chat_template(ms, add_generation_prompt=True)
        chats = [await router.chat_ids(msgs, render), await router.chat_ids(msgs, render, with_tools=True),
                 await router.chat_ids([{"role": "user", "content": long}], render),
                 # 200 characters, 400 bytes: counted in bytes, as a prompt is
                 await router.chat_ids([{"role": "user", "content": "é" * 200}], render)]
        return ids, chats

    ids, chats = asyncio.run(main())
    assert ids == [encode(short, True), encode(long, True)]
    assert chats[0] == chats[1] == encode_chat([{"role": "user", "content": short}])
    assert seen[0] == loop_thread and seen[2] == loop_thread  # the short text, the short chat
    assert seen[1] != loop_thread and seen[3] != loop_thread and seen[4] != loop_thread
    assert seen[5] != loop_thread
