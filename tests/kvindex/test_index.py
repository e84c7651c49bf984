"""The Redis index against a real redis-server: publishing, lookup, liveness, purge, outages."""

from __future__ import annotations

import asyncio
import random
import socket
import time

import pytest
import redis.asyncio as aioredis

from baton.kvindex import schema
from baton.kvindex.connection import REDIS_ERRORS
from baton.kvindex.hashing import block_hashes, model_seed
from baton.kvindex.index import KVIndex
from baton.kvindex.publisher import PodInfo, PodPublisher
from tests.stack import wait_for_async

pytestmark = pytest.mark.e2e
SEED = model_seed("test-model")
CHAIN = block_hashes(list(range(16 * 6)), 16, SEED)  # 6 blocks


class FakePod:
    """The callables a PodPublisher reads, over a plain set of cached hashes."""

    def __init__(self, cached=()):
        self.cached: set[bytes] = set(cached)
        self.stored: list[bytes] = []
        self.removed: list[bytes] = []
        self.cleared = False
        self.running = 0

    def store(self, *hs):
        self.cached.update(hs)
        self.stored += hs

    def remove(self, *hs):
        self.cached.difference_update(hs)
        self.removed += hs

    def state(self):
        return {
            "running": self.running,
            "waiting": 0,
            "waiting_prefill_tokens": 0,
            "free_blocks": 100,
            "total_blocks": 128,
            "cached_blocks": len(self.cached),
        }

    def drain(self):
        out = (self.stored, self.removed, self.cleared)
        self.stored, self.removed, self.cleared = [], [], False
        return out

    def all_cached(self):
        return sorted(self.cached)


def publisher(url, pod_id, pod, **kw):
    info = PodInfo(pod_id=pod_id, role="colocated", url=f"http://{pod_id}", model="m")
    kw.setdefault("interval_s", 0.05)
    kw.setdefault("ttl_s", 1.0)
    return PodPublisher(url, info, pod.state, pod.drain, pod.all_cached, **kw)


def test_longest_prefix_per_live_pod(redis_server):
    async def main():
        a, b = FakePod(), FakePod()
        pa, pb = publisher(redis_server.url, "a", a), publisher(redis_server.url, "b", b)
        idx = KVIndex(redis_server.url)
        a.store(*CHAIN[:4])
        b.store(CHAIN[0], CHAIN[1], CHAIN[3])  # a gap at block 2: only 2 leading blocks count
        for p in (pa, pb):
            await p.publish_once()  # first tick: cleared + full re-sync
        look = await idx.lookup(CHAIN)
        assert set(look.pods) == {"a", "b"} == set(await idx.live_pods())
        assert look.hits == {"a": 4, "b": 2}
        assert look.pods["a"].cached_blocks == 4 and look.pods["a"].role == "colocated"
        # Events: a evicts block 1; b caches block 2. Both apply within one tick each.
        a.remove(CHAIN[1])
        b.store(CHAIN[2])
        await pa.publish_once()
        await pb.publish_once()
        look = await idx.lookup(CHAIN)
        assert look.hits == {"a": 1, "b": 4}
        assert (await idx.lookup([])).hits == {}
        # An unrelated chain hits nobody.
        assert (await idx.lookup(block_hashes(list(range(100, 164)), 16, SEED))).hits == {}
        # "cleared" drops everything the pod had announced.
        b.cleared = True
        await pb.publish_once()
        assert (await idx.lookup(CHAIN)).hits == {"a": 1}
        # a pod that holds nothing of the chain is live, and not in the lookup's records
        assert set((await idx.lookup(CHAIN)).pods) == {"a"}
        assert set(await idx.live_pods()) == {"a", "b"}
        await pa.stop()
        await pb.stop()
        assert (await idx.lookup(CHAIN)).pods == {}
        assert await idx.live_pods() == {}
        await idx.close()

    asyncio.run(main())


def test_dead_pod_ignored_then_purged_idempotently(redis_server):
    async def main():
        a, b = FakePod(CHAIN[:3]), FakePod(CHAIN[:2])
        pa, pb = publisher(redis_server.url, "a", a, ttl_s=0.5), publisher(redis_server.url, "b", b)
        await pa.publish_once()
        await pb.publish_once()
        idxs = [KVIndex(redis_server.url) for _ in range(3)]
        assert (await idxs[0].lookup(CHAIN)).hits == {"a": 3, "b": 2}
        # a dies (no more heartbeats): once its TTL passes, lookups ignore it even before a purge.
        await wait_for_async(lambda: _gone(idxs[0], "a"), "pod a out of the live pods", 3)
        assert (await idxs[0].lookup(CHAIN)).hits == {"b": 2}
        r = aioredis.Redis.from_url(redis_server.url)
        assert await r.scard(schema.podblk_key(schema.DEFAULT_PREFIX, "a")) == 3
        # Three routers sweep at once: a is purged exactly, b untouched.
        results = await asyncio.gather(*(i.sweep(chunk=1) for i in idxs))
        assert {p for res in results for p in res} == {"a"}
        assert not await r.exists(schema.podblk_key(schema.DEFAULT_PREFIX, "a"))
        assert not await r.sismember(schema.pods_key(schema.DEFAULT_PREFIX), "a")
        for h in CHAIN[:2]:
            assert await r.smembers(schema.blk_key(schema.DEFAULT_PREFIX, h)) == {b"b"}
        assert not await r.exists(schema.blk_key(schema.DEFAULT_PREFIX, CHAIN[2]))
        assert await idxs[0].sweep() == []
        await pb.stop()
        await r.aclose()
        for i in idxs:
            await i.close()

    asyncio.run(main())


async def _gone(idx, pod_id):
    return pod_id not in await idx.live_pods()


def test_restarted_pod_announces_cleared(redis_server):
    async def main():
        old = FakePod(CHAIN[:5])
        p = publisher(redis_server.url, "a", old)
        await p.publish_once()
        await p.stop(deregister=False)  # crash: heartbeat and entries linger
        idx = KVIndex(redis_server.url)
        assert (await idx.lookup(CHAIN)).hits == {"a": 5}
        new = FakePod(CHAIN[:1])  # same pod id, fresh cache
        p2 = publisher(redis_server.url, "a", new)
        await p2.publish_once()
        assert (await idx.lookup(CHAIN)).hits == {"a": 1}
        r = aioredis.Redis.from_url(redis_server.url)
        assert await r.scard(schema.podblk_key(schema.DEFAULT_PREFIX, "a")) == 1
        await r.aclose()
        await p2.stop()
        await idx.close()

    asyncio.run(main())


def test_publisher_survives_redis_outage_and_republishes(redis_server):
    async def main():
        pod = FakePod(CHAIN[:2])
        p = publisher(redis_server.url, "a", pod, timeout_s=0.3, max_backoff_s=0.3)
        p.start()
        idx = KVIndex(redis_server.url, timeout_s=0.3)

        async def hits():
            try:
                return (await idx.lookup(CHAIN)).hits
            except REDIS_ERRORS:
                return None

        await wait_for_async(lambda: _eq(hits(), {"a": 2}), "a's 2 blocks indexed", 5)
        redis_server.stop()
        pod.store(*CHAIN[2:4])  # the pod keeps working while Redis is away
        await wait_for_async(lambda: _true(p.errors >= 2), "2 publish errors", 5)
        assert not p.synced
        t0 = time.monotonic()
        with pytest.raises(REDIS_ERRORS):
            await idx.lookup(CHAIN)
        assert time.monotonic() - t0 < 2.0  # bounded, not hanging
        redis_server.start()  # comes back empty
        await wait_for_async(lambda: _eq(hits(), {"a": 4}), "a's 4 blocks re-published", 5)
        assert p.resyncs >= 2 and p.synced
        await p.stop()
        await idx.close()

    asyncio.run(main())


def test_publisher_notices_lost_data_without_errors(redis_server):
    # FLUSHALL (or a purge after a stall) leaves the connection fine: the missing heartbeat tells.
    async def main():
        pod = FakePod(CHAIN[:3])
        p = publisher(redis_server.url, "a", pod)
        await p.publish_once()
        r = aioredis.Redis.from_url(redis_server.url)
        await r.flushall()
        await p.publish_once()
        idx = KVIndex(redis_server.url)
        assert (await idx.lookup(CHAIN)).hits == {"a": 3}
        await r.aclose()
        await p.stop()
        await idx.close()

    asyncio.run(main())


def test_calls_are_bounded_when_redis_hangs():
    # A listener that accepts and never answers: every call must give up within its timeout.
    async def main():
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen(8)
            url = f"redis://127.0.0.1:{srv.getsockname()[1]}/0"
            idx = KVIndex(url, timeout_s=0.2)
            t0 = time.monotonic()
            with pytest.raises(REDIS_ERRORS):
                await idx.lookup(CHAIN)
            with pytest.raises(REDIS_ERRORS):
                await idx.sweep()
            assert time.monotonic() - t0 < 2.0
            pod = FakePod()
            p = publisher(url, "a", pod, timeout_s=0.2)
            with pytest.raises(REDIS_ERRORS):
                await p.publish_once()
            await idx.close()

    asyncio.run(main())


async def _eq(aw, want):
    return (await aw) == want


async def _true(v):
    return v


def test_lookup_matches_a_plain_walk_over_many_pods_depths_and_gaps(redis_server):
    # The LOOKUP script gallops over spans of blocks (SINTERCARD on up to 256 keys); a plain
    # walk in Python is the oracle: per live pod, the leading blocks of the chain it holds.
    chain = block_hashes(list(range(16 * 600)), 16, SEED)  # 600 blocks: spans hit their cap
    rng = random.Random(3)

    async def main():
        pods = {}
        for i in range(30):
            depth = rng.choice([0, 1, 2, 63, 64, 65, 255, 256, 257, 599, 600, rng.randrange(600)])
            held = set(chain[:depth])
            held |= set(rng.sample(chain, 20))  # gaps: blocks past the pod's depth
            pods[f"p{i:02d}"] = FakePod(held)
        pods["all"] = FakePod(chain)
        pods["dead"] = FakePod(chain)
        pubs = [publisher(redis_server.url, pid, pod, ttl_s=120.0) for pid, pod in pods.items()]
        for p in pubs:
            await p.publish_once()
        r = aioredis.Redis.from_url(redis_server.url)
        await r.delete(schema.pod_key(schema.DEFAULT_PREFIX, "dead"))  # heartbeat gone
        idx = KVIndex(redis_server.url, timeout_s=5.0)
        for probe in (chain, chain[:1], chain[:300], chain[1:]):
            want = {}
            for pid, pod in pods.items():
                n = next((k for k, h in enumerate(probe) if h not in pod.cached), len(probe))
                if n and pid != "dead":
                    want[pid] = n
            look = await idx.lookup(probe)
            diff = {k: (look.hits.get(k), want.get(k)) for k in set(look.hits) | set(want)
                    if look.hits.get(k) != want.get(k)}
            assert diff == {}, (len(probe), probe[0] == chain[0], diff)
            assert set(look.pods) == set(want)  # the records of the live pods hit, only
        assert set(await idx.live_pods()) == set(pods) - {"dead"}
        assert await r.keys(f"{schema.DEFAULT_PREFIX}lookup:*") == []  # scratch set removed
        for p in pubs:
            await p.stop(deregister=False)
        await idx.close()
        await r.aclose()

    asyncio.run(main())


def test_router_costs_every_pod_as_with_all_records_in_the_lookup(redis_server):
    # LOOKUP returns the records of the pods it hits only; the router's periodic registry read
    # supplies the rest. Its costs for every pod must equal those from every live pod's record
    # (what LOOKUP used to return) and a plain walk's hits.
    import httpx

    from baton.router import policy
    from baton.router.metrics import RouterMetrics
    from baton.router.pods import PodTable
    from baton.router.settings import RouterSettings

    prompt = list(range(16 * 6 + 5))
    chain = block_hashes(prompt, 16, SEED)

    async def main():
        pods = {"a": FakePod(chain[:4]), "b": FakePod(chain[:2]), "c": FakePod(),
                "d": FakePod(chain)}
        pods["a"].running, pods["c"].running, pods["d"].running = 9, 1, 40  # d: all cached, busy
        pubs = [publisher(redis_server.url, pid, pod, ttl_s=60.0) for pid, pod in pods.items()]
        for p in pubs:
            await p.publish_once()
        idx = KVIndex(redis_server.url, timeout_s=5.0)
        async with httpx.AsyncClient() as http:
            table = PodTable(RouterSettings(model="/m"), http, idx, RouterMetrics(), "m", SEED)
            await table.refresh()
            decision, view = await table.pick(prompt, set())
        recs = await idx.live_pods()
        want = policy.choose([policy.PodLoad(
            pid, running=recs[pid].running, waiting=recs[pid].waiting,
            waiting_prefill_tokens=recs[pid].waiting_prefill_tokens,
            cached_tokens=min(16 * next((k for k, h in enumerate(chain) if h not in pod.cached),
                                        len(chain)), len(prompt) - 1))
            for pid, pod in pods.items()], len(prompt))
        assert decision.costs == want.costs and len(want.costs) == 4
        assert decision.pod_id == want.pod_id == view.record.pod_id == "b"
        for p in pubs:
            await p.stop()
        await idx.close()

    asyncio.run(main())
