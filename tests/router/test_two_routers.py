"""Two routers over one Redis and the same two colocated pods, and a router restarted mid-run
(CPU, tiny model, real processes: tests/stack.py).

The KV index lives in Redis, written by the pods: a prefix cached through router A is found by
router B, and a router process started after A is gone routes by prefix hit from its very first
request. Two prefixes sit on different pods (P1 where router A's first request landed, P2
cached on the other pod by a request straight to it, which no router saw), and each router is
asked for them in an order that a load-only or round-robin router would get wrong at least
once; a round-robin router over the same pods shows that it does.

Which pod served a request: the pods' request counters (one request at a time); what it
reused: the answer's usage.prompt_tokens_details.cached_tokens.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from baton.kvindex.hashing import model_identity, model_seed
from tests.oracle import random_prompt
from tests.stack import Service, ServiceStack, index_hits, wait_for, warm

pytestmark = pytest.mark.e2e

BLOCK = 16
PREFIX = 6 * BLOCK  # tokens of each shared prefix: 6 full blocks


def served(pods: list[Service]) -> list[float]:
    return [p.metric("baton_pod_requests_total") for p in pods]


def ask(router: Service, pods: list[Service], model: str, prompt: list[int]) -> tuple[int, int]:
    """(index of the pod that served `prompt` through `router`, cached tokens it reported)."""
    before = served(pods)
    r = router.client(timeout_s=30).completions.create(
        model=model, prompt=prompt, max_tokens=1, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    # a pod counts the request when its stream ends, which may be just after the router answers
    grew = wait_for(
        lambda: [i for i, (a, b) in enumerate(zip(served(pods), before)) if a > b],
        "a pod counted the request",
        5,
    )
    assert len(grew) == 1 and sum(served(pods)) == sum(before) + 1, (grew, before)
    return grew[0], r.usage.prompt_tokens_details.cached_tokens


def started(st: ServiceStack, model, redis_url: str, **settings) -> Service:
    """A new router process, once it sees both pods."""
    router = st.router(model, redis_url=redis_url, **settings)
    wait_for(lambda: router.get("/ready").json()["live_pods"] == 2, "the router sees both pods", 10)
    return router


def test_routers_share_the_index_and_a_restarted_router_hits_at_once(tiny_qwen3, tmp_path):
    seed = model_seed(model_identity(tiny_qwen3))
    p1, p2 = random_prompt(1, PREFIX), random_prompt(2, PREFIX)
    tail = iter(random_prompt(100 + i, 5) for i in range(100))  # a new 5-token ending each time
    with ServiceStack(tmp_path) as st, ThreadPoolExecutor(2) as ex:
        url = st.redis().url
        pods = st.pods(tiny_qwen3, ("colocated", "colocated"), redis_url=url, num_kv_blocks=512)
        ids = [p.pod_id() for p in pods]
        # routers start at once where the story allows: a start is seconds of imports
        router_a, router_b = ex.map(lambda _: started(st, tiny_qwen3, url), range(2))
        model = router_a.client().models.list().data[0].id

        def indexed(prefix: list[int], pod: int) -> bool:
            return index_hits(url, seed, prefix).get(ids[pod], 0) == PREFIX // BLOCK

        # Router A: P1 is new everywhere; it lands on some pod x, which publishes its blocks.
        x, cached = ask(router_a, pods, model, p1 + next(tail))
        y = 1 - x
        assert cached == 0
        wait_for(lambda: indexed(p1, x), "P1's blocks indexed for pod x", 5)
        # P2: cached on the other pod by a request straight to it (no router involved).
        warm(pods[y], p2)
        wait_for(lambda: indexed(p2, y), "P2's blocks indexed for pod y", 5)

        # Router B never served P1 or P2: each request goes where its prefix is, all of it reused.
        for prefix, pod in ((p1, x), (p1, x), (p2, y)):
            assert ask(router_b, pods, model, prefix + next(tail)) == (pod, PREFIX)
        assert router_b.metric("baton_router_routing_decisions_total", reason="prefix_hit") == 3

        # Router A goes away; a router started now knows nothing but what Redis holds, and hits
        # from its first request on (P2 first: the prefix router A never saw).
        # (The round-robin router below starts with it: it sends nothing until router C is done.)
        assert st.terminate(router_a) == 0
        rr_started = ex.submit(started, st, tiny_qwen3, url, policy="round_robin")
        router_c = started(st, tiny_qwen3, url)
        for prefix, pod in ((p2, y), (p2, y), (p1, x)):
            assert ask(router_c, pods, model, prefix + next(tail)) == (pod, PREFIX)
        assert router_c.metric("baton_router_routing_decisions_total", reason="prefix_hit") == 3
        assert router_c.metric("baton_router_requests_total", status="200") == 3

        # The checks above can fail: a round-robin router over the same pods and index sends
        # two P2 requests to different pods, and the one on pod x computes P2 again.
        rr = rr_started.result()
        got = [ask(rr, pods, model, p2 + next(tail)) for _ in range(2)]
        assert sorted(got) == sorted([(x, 0), (y, PREFIX)]), got
