"""Faults end to end on two real colocated pods (CPU): Redis going away and coming back, and
a pod that crashes.

One stack for the module (real redis-server, pods and router as processes, started as
`baton up` starts them, default settings: pod heartbeat TTL 3 s, router sweep every 5 s).
The Redis test runs first and leaves Redis up; the crash test kills a pod, so it runs last.
Every client call has a timeout, and every wait a deadline.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import redis

from baton.engine.tokenizer import Tokenizer
from baton.kvindex import schema
from baton.kvindex.hashing import model_identity, model_seed
from tests.stack import ServiceStack, index_hits, wait_for

pytestmark = pytest.mark.e2e

BLOCK = 16
TTL_S = 3.0  # the pods' heartbeat_ttl_s (default)
SWEEP_S = 5.0  # the router's sweep_interval_s (default)
P = schema.DEFAULT_PREFIX


@pytest.fixture(scope="module")
def stack(tiny_qwen3, tmp_path_factory):
    with ServiceStack(tmp_path_factory.mktemp("e2e-faults")) as st:
        s = st.serve(tiny_qwen3, timeout_s=30, num_kv_blocks=512)
        yield {
            **vars(s),
            "st": st,
            "ids": [p.pod_id() for p in s.pods],
            "tok": Tokenizer(tiny_qwen3),
            "seed": model_seed(model_identity(tiny_qwen3)),
        }


def prompt(i: int) -> str:
    return f"Request family {i}: " + "Assignment statements rebind names to values. " * 8


def complete(s, text: str, max_tokens: int = 2):
    return s["client"].completions.create(
        model=s["model"], prompt=text, max_tokens=max_tokens, temperature=0
    )


def holders(s, text: str) -> set[str]:
    """Pods the index says hold the first block of `text`'s prompt."""
    hits = index_hits(s["redis"].url, s["seed"], s["tok"].encode(text))
    return {pod for pod, n in hits.items() if n}


def test_redis_outage_load_only_then_prefix_routing_again(stack):
    s, rs, router = stack, stack["redis"], stack["router"]
    r = redis.Redis.from_url(rs.url, socket_timeout=2)
    complete(s, prompt(0))  # cached on one pod before the outage
    wait_for(lambda: holders(s, prompt(0)), "the first prompt's blocks in the index", 5)
    before_owner = holders(s, prompt(0))

    rs.stop()
    t0 = time.monotonic()
    for i in range(1, 7):
        out = complete(s, prompt(i))
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 2
    assert time.monotonic() - t0 < 15  # Redis trouble costs a short timeout, not a hang
    assert router.metric("baton_router_redis_errors_total") >= 1
    assert router.metric("baton_router_routing_decisions_total", reason="index_unavailable") >= 1
    assert router.get("/ready").status_code == 200  # the pods it knew, polled over HTTP

    rs.start()  # same port, no data: the pods must register and re-publish everything
    r = redis.Redis.from_url(rs.url, socket_timeout=2)
    t0 = time.monotonic()
    # (each pod's own blocks: load-only routing spreads the outage's prompts at random, and
    # all seven on one pod happens: nothing to re-publish for the other)
    wait_for(
        lambda: all(r.exists(schema.pod_key(P, i)) for i in s["ids"])
        and all(holders(s, prompt(i)) for i in range(7)),
        "both pods' heartbeats and every prompt's blocks back in Redis",
        15,
    )
    back = time.monotonic() - t0
    # what a pod cached before (and during) the outage is in the index again
    assert holders(s, prompt(0)) == before_owner
    assert all(holders(s, prompt(i)) for i in range(1, 7))

    # prefix routing again: every repeat goes where its prefix is cached
    hits = router.metric("baton_router_routing_decisions_total", reason="prefix_hit")
    wait_for(lambda: router.metric("baton_router_live_pods") == 2, "2 live pods", 5)
    time.sleep(1.5)  # the router retries the index redis_retry_s (1 s) after its last error
    for i in range(7):
        out = complete(s, prompt(i) + f" Again {i}.")
        assert out.usage.prompt_tokens_details.cached_tokens >= 4 * BLOCK, i
    assert router.metric("baton_router_routing_decisions_total", reason="prefix_hit") >= hits + 7
    print(f"\n[e2e faults] pods back in the index {back:.1f} s after Redis restarted")


def test_killed_pod_leaves_the_index_and_requests_go_to_the_other(stack):
    s, st, router = stack, stack["st"], stack["router"]
    pods, ids = s["pods"], s["ids"]
    r = redis.Redis.from_url(s["redis"].url, socket_timeout=2)
    text = prompt(100)
    counts = [p.metric("baton_pod_requests_total") for p in pods]
    complete(s, text)
    dead = next(i for i, p in enumerate(pods) if p.metric("baton_pod_requests_total") > counts[i])
    alive = 1 - dead
    wait_for(lambda: ids[dead] in holders(s, text), "the prompt's blocks in the index", 5)

    # long generations in flight while the pod dies: each must end (tokens or an error), none
    # hang. They share the prompt's cached prefix, so the first at least runs on that pod.
    def long_stream(i):
        t0 = time.monotonic()
        try:
            stream = s["client"].completions.create(
                model=s["model"],
                prompt=text + f" Long {i}.",
                max_tokens=600,  # seconds of tokens past the kill; the survivors run them all
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            n = sum(1 for _ in stream)
            return "done", n, time.monotonic() - t0
        except openai.APIError as e:
            return f"error: {type(e).__name__}", 0, time.monotonic() - t0

    generated = pods[dead].metric("baton_pod_generation_tokens_total")
    with ThreadPoolExecutor(4) as ex:
        flying = [ex.submit(long_stream, i) for i in range(4)]
        # a long request past its first token on the pod about to die (before its first token
        # the router rightly retries it elsewhere, and a loaded machine prefills slowly)
        wait_for(
            lambda: pods[dead].metric("baton_pod_running_requests") > 0
            and pods[dead].metric("baton_pod_generation_tokens_total") > generated + 4,
            "a long request streaming from the pod about to die",
            30,
        )
        st.kill(pods[dead])
        killed_at = time.monotonic()

        # right away, before the heartbeat expires: the router retries on the live pod
        before = pods[alive].metric("baton_pod_requests_total")
        for i in range(4):
            out = complete(s, text + f" After the crash {i}.")
            assert out.usage.completion_tokens == 2
        assert pods[alive].metric("baton_pod_requests_total") - before >= 4

        outcomes = [f.result(timeout=60) for f in flying]
    assert any(o[0].startswith("error") for o in outcomes)  # those on the dead pod say so
    assert all(o[2] < 60 for o in outcomes)

    wait_for(
        lambda: not r.exists(schema.pod_key(P, ids[dead])),
        "the dead pod's heartbeat key expired",
        killed_at + TTL_S + 2 - time.monotonic(),
    )
    gone = time.monotonic() - killed_at
    wait_for(
        lambda: (
            ids[dead] not in holders(s, text)
            and r.scard(schema.podblk_key(P, ids[dead])) == 0
            and not r.sismember(schema.pods_key(P), ids[dead])
        ),
        "the dead pod's entries purged",
        killed_at + TTL_S + SWEEP_S + 2 - time.monotonic(),
    )
    purged = time.monotonic() - killed_at
    wait_for(lambda: router.metric("baton_router_live_pods") == 1, "one live pod", 3)
    assert httpx.get(router.url + "/ready", timeout=5).json()["live_pods"] == 1
    # and the survivor serves everything, the dead pod's prefix included
    before = pods[alive].metric("baton_pod_requests_total")
    for i in range(3):
        assert complete(s, text + f" Later {i}.").usage.completion_tokens == 2
    assert pods[alive].metric("baton_pod_requests_total") - before == 3
    print(
        f"\n[e2e faults] killed pod: heartbeat gone after {gone:.1f} s, block entries purged "
        f"after {purged:.1f} s (TTL {TTL_S} s, sweep every {SWEEP_S} s); in-flight streams: "
        f"{[o[0] for o in outcomes]}"
    )
