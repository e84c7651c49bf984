"""Router + a real redis-server + pods that publish their caches: prefix routing end to end,
serving through a Redis outage, and dead pods dropping out."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest
import redis

from baton.kvindex import schema
from baton.router.app import create_app
from baton.router.settings import RouterSettings
from tests.router.fake_pod import FakePod, ServerThread, start_pod
from tests.stack import RedisServer, free_port, wait_for

pytestmark = pytest.mark.e2e
PROMPT = "The quick brown fox jumps over the lazy dog. " * 6  # several full blocks


@pytest.fixture
def cluster(tmp_path, model_dir, model_seed_bytes):
    rs = RedisServer(tmp_path / "redis").start()
    pods = [
        FakePod(name=f"pod{i}", seed=model_seed_bytes, model="tiny", redis_url=rs.url, ttl_s=1.0)
        for i in range(2)
    ]
    pod_servers = [start_pod(p, free_port()) for p in pods]
    s = RouterSettings(
        model=str(model_dir),
        served_model_name="tiny",
        host="127.0.0.1",
        port=free_port(),
        redis_url=rs.url,
        refresh_interval_s=0.1,
        sweep_interval_s=0.3,
        redis_retry_s=0.3,
        redis_timeout_s=0.2,
        # while Redis is down the pods are polled over HTTP; on 2 loaded cores (xdist) a poll
        # of these in-process pods can take most of a second, and 1 s made them flicker dead
        stale_after_s=3.0,
        first_token_timeout_s=5,
        token_timeout_s=5,
    )
    router = ServerThread(create_app(s), s.port).start()
    base = f"http://127.0.0.1:{s.port}"
    wait_for(lambda: _live(base) == 2, "both pods live", 8)
    yield {
        "redis": rs,
        "pods": pods,
        "pod_servers": pod_servers,
        "base": base,
        "client": openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=20),
    }
    router.stop()
    for srv in pod_servers:
        srv.stop()
    rs.stop()


def _live(base):
    try:
        return httpx.get(base + "/ready", timeout=1).json()["live_pods"]
    except (httpx.HTTPError, ValueError):
        return -1


def _metric(base, name, **labels):
    text = httpx.get(base + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _served_by(pods):
    return [len(p.requests) for p in pods]


def _indexed(rs, pod):
    return (
        redis.Redis.from_url(rs.url).scard(schema.podblk_key(schema.DEFAULT_PREFIX, pod.name)) > 0
    )


def test_prefix_routing_follows_the_cache(cluster):
    c, pods = cluster["client"], cluster["pods"]
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    first = next(p for p in pods if p.requests)
    wait_for(lambda: _indexed(cluster["redis"], first), "prompt indexed", 8)
    for i in range(4):
        r = c.completions.create(model="tiny", prompt=PROMPT + f" and then {i}", max_tokens=2)
        assert r.usage.prompt_tokens_details.cached_tokens >= 32
    assert len(first.requests) == 5  # every repeat went where the prefix is cached
    assert (
        _metric(cluster["base"], "baton_router_routing_decisions_total", reason="prefix_hit") == 4
    )


def test_serves_through_redis_outage_and_recovers(cluster):
    c, pods, rs, base = cluster["client"], cluster["pods"], cluster["redis"], cluster["base"]
    c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    first = next(p for p in pods if p.requests)
    wait_for(lambda: _indexed(rs, first), "prompt indexed", 8)
    rs.stop()
    t0 = time.monotonic()
    for i in range(4):
        r = c.completions.create(model="tiny", prompt=f"{i} {PROMPT}", max_tokens=2)
        assert r.choices[0].finish_reason == "length"
    assert time.monotonic() - t0 < 8.0  # Redis trouble costs at most a short timeout per request
    assert _metric(base, "baton_router_redis_errors_total") >= 1
    assert _metric(base, "baton_router_routing_decisions_total", reason="index_unavailable") >= 1
    assert httpx.get(base + "/ready").status_code == 200  # pods still known, polled over HTTP
    rs.start()  # empty: the pods must re-publish everything
    wait_for(lambda: all(p.publisher.synced and p.publisher.resyncs >= 2 for p in pods), "pods re-synced", 8)
    wait_for(lambda: _indexed(rs, first), "prompt indexed again", 8)

    def routed_by_prefix():
        before = len(first.requests)
        r = c.completions.create(model="tiny", prompt=PROMPT + "!", max_tokens=1)
        hit = _metric(base, "baton_router_routing_decisions_total", reason="prefix_hit") >= 1
        return (
            hit and len(first.requests) > before and r.usage.prompt_tokens_details.cached_tokens > 0
        )

    wait_for(routed_by_prefix, "routed by prefix", 8)


def test_dead_pod_is_dropped_and_purged(cluster):
    c, pods, rs, base = cluster["client"], cluster["pods"], cluster["redis"], cluster["base"]
    c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    first = next(p for p in pods if p.requests)
    other = next(p for p in pods if p is not first)
    wait_for(lambda: _indexed(rs, first), "prompt indexed", 8)
    cluster["pod_servers"][pods.index(first)].stop()  # dies without deregistering
    wait_for(lambda: _live(base) == 1, "dead pod dropped", 8)  # its heartbeat expired
    wait_for(lambda: not _indexed(rs, first), "dead pod's entries purged", 8)  # a router sweep purged its entries
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens == 0 and len(other.requests) == 1
    assert re.search(r"baton_router_live_pods 1\.0", httpx.get(base + "/metrics").text)


def test_burst_spreads_over_a_decode_pod_and_a_colocated_pod(tmp_path, model_dir, model_seed_bytes):
    """A decode pod (KV pushed by a prefill pod) counts as one more running sequence from the
    moment a request is sent to it, not only once its heartbeat shows it running: a burst of
    distinct prompts does not all land on the decode pod that looked idle."""
    rs = RedisServer(tmp_path / "redis").start()
    roles = {"colo": "colocated", "dec": "decode", "pre": "prefill"}
    # heartbeats every 3 s: the whole burst is in flight before any heartbeat shows it
    pods = {n: FakePod(name=n, seed=model_seed_bytes, model="tiny", redis_url=rs.url, role=r, interval_s=3.0,
                       ttl_s=10.0) for n, r in roles.items()}
    for p in pods.values():
        p.first_token_delay_s = 1.0
    servers = [start_pod(p, free_port()) for p in pods.values()]
    s = RouterSettings(model=str(model_dir), served_model_name="tiny", host="127.0.0.1", port=free_port(),
                       redis_url=rs.url, refresh_interval_s=0.1, first_token_timeout_s=10, token_timeout_s=10)
    router = ServerThread(create_app(s), s.port).start()
    base = f"http://127.0.0.1:{s.port}"
    try:
        wait_for(lambda: _live(base) == 2 and httpx.get(base + "/ready").json()["live_prefill_pods"] == 1,
                 "pods live", 8)
        import concurrent.futures

        def send(i):
            body = {"model": "tiny", "prompt": f"{i} burst request number {i} " * 2, "max_tokens": 2}
            return httpx.post(base + "/v1/completions", json=body, timeout=30).status_code

        with concurrent.futures.ThreadPoolExecutor(24) as ex:
            assert list(ex.map(send, range(24))) == [200] * 24
        served = {n: len(p.requests) for n, p in pods.items()}
        assert served["pre"] == 0  # prefill pods never answer a client
        assert served["colo"] + served["dec"] == 24
        # the decode pod's cost rose by 32 per request in flight, the colocated pod's by its
        # prompt's ~20 tokens: both take a real share (before: the decode pod took all 24)
        assert min(served["colo"], served["dec"]) >= 6, served
        assert all(p["prefill"]["url"] == pods["pre"].url for p in pods["dec"].requests)
    finally:
        router.stop()
        for srv in servers:
            srv.stop()
        rs.stop()
