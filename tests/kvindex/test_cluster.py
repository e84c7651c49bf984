"""The index sharded by pod over a real Redis Cluster (3 masters on loopback, made by redis-cli
--cluster create), against the same data in one Redis and a plain walk."""

from __future__ import annotations

import asyncio

import pytest
import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from baton.kvindex import schema
from baton.kvindex.connection import REDIS_ERRORS, ClusterURL, cluster_url, connect
from baton.kvindex.hashing import block_hashes
from baton.kvindex.index import KVIndex
from bench.bench_index import Cluster
from tests.kvindex.test_index import SEED, FakePod, publisher
from tests.stack import wait_for_async

P = schema.DEFAULT_PREFIX
CHAIN = block_hashes(list(range(16 * 100)), 16, SEED)  # 100 blocks


# -- URLs, tags and shards (no Redis) -----------------------------------------------------------

def test_cluster_url():
    assert cluster_url("redis://:pw@h:6379/0") is None
    assert cluster_url("redis+cluster://u:p%40w@10.0.0.1:7000,[::1]:7001/?shards=5") == ClusterURL(
        [("10.0.0.1", 7000), ("::1", 7001)], "u", "p@w", False, 5)
    assert cluster_url("rediss+cluster://:pw@h:1") == ClusterURL([("h", 1)], None, "pw", True, 16)
    for bad in ("redis+cluster://h:1/3", "redis+cluster://h", "redis+cluster://h:1?shards=0",
                "redis+cluster://h:1?shards=257", "redis+cluster://h:1?db=0"):
        with pytest.raises(ValueError):
            cluster_url(bad)


def test_each_shard_is_one_slot_in_its_slice_and_pods_spread():
    assert schema.shard_prefixes(P, None) == [P]  # one Redis: the layout without tags
    for n in (1, 3, 16, 256):
        prefixes = schema.shard_prefixes(P, n)
        assert len(set(prefixes)) == n
        for k, p in enumerate(prefixes):
            slot = key_slot(schema.pods_key(p).encode())
            # every key of the shard hashes to one slot, in the k-th of n equal slices
            keys = (schema.pod_key(p, "x"), schema.podblk_key(p, "x"), schema.blk_key(p, CHAIN[0]),
                    p + "lookup:scratch")
            assert {key_slot(key.encode()) for key in keys} == {slot}
            slots = REDIS_CLUSTER_HASH_SLOTS
            assert k * slots // n <= slot < (k + 1) * slots // n
    counts = [0] * 3
    for i in range(3000):
        counts[schema.shard_of(f"pod-{i}", 3)] += 1
    assert all(900 < c < 1100 for c in counts), counts
    assert schema.shard_of("pod-7", 3) == schema.shard_of("pod-7", 3)


# -- against a real cluster ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    c = Cluster(masters=3, shards=3, timeout_s=60)
    yield c
    c.stop()


@pytest.fixture
def nodes(cluster):
    clients = [redis.Redis(port=p, socket_timeout=5) for p in cluster.ports]
    for r in clients:
        r.flushall()
    yield clients
    for r in clients:
        r.close()


def _pods_per_shard(n_each: int, shards: int = 3) -> list[str]:
    ids: dict[int, list[str]] = {k: [] for k in range(shards)}
    i = 0
    while any(len(v) < n_each for v in ids.values()):
        k = schema.shard_of(f"pod-{i}", shards)
        if len(ids[k]) < n_each:
            ids[k].append(f"pod-{i}")
        i += 1
    return [p for k in range(shards) for p in ids[k]]


def _walk(pods: dict[str, FakePod], probe: list[bytes]) -> dict[str, int]:
    out = {}
    for pid, pod in pods.items():
        n = next((k for k, h in enumerate(probe) if h not in pod.cached), len(probe))
        if n:
            out[pid] = n
    return out


@pytest.mark.e2e
def test_a_nodes_keys_are_its_shards_slot_only(cluster, nodes):
    async def main():
        ids = _pods_per_shard(2)
        pods = {pid: FakePod(CHAIN[: 10 * (i + 1)]) for i, pid in enumerate(ids)}
        pubs = [publisher(cluster.url, pid, pod, ttl_s=60.0) for pid, pod in pods.items()]
        for p in pubs:
            await p.publish_once()
        prefixes = schema.shard_prefixes(P, 3)
        slot_of_shard = [key_slot(schema.pods_key(p).encode()) for p in prefixes]
        owner = {}  # slot -> node index, from the cluster itself
        for lo, hi, primary, *_ in nodes[0].execute_command("CLUSTER", "SLOTS"):
            port = primary[1]
            for k, s in enumerate(slot_of_shard):
                if lo <= s <= hi:
                    owner[s] = cluster.ports.index(port)
        assert sorted(owner.values()) == [0, 1, 2]  # three shards on three nodes
        for i, r in enumerate(nodes):
            keys = r.keys("*")
            k = next(k for k, s in enumerate(slot_of_shard) if owner[s] == i)
            assert keys and {key_slot(key) for key in keys} == {slot_of_shard[k]}
            assert all(key.decode().startswith(prefixes[k]) for key in keys)
            # its shard's pods, and only those, have their heartbeat and reverse map here
            mine = {pid for pid in ids if schema.shard_of(pid, 3) == k}
            assert {m.decode() for m in r.smembers(schema.pods_key(prefixes[k]))} == mine
            for pid in mine:
                assert r.scard(schema.podblk_key(prefixes[k], pid)) == len(pods[pid].cached)
                assert r.exists(schema.pod_key(prefixes[k], pid))
        for p in pubs:
            await p.stop()
        assert [r.dbsize() for r in nodes] == [0, 0, 0]  # deregistered: nothing left

    asyncio.run(main())


@pytest.mark.e2e
def test_lookup_merges_shards_like_one_redis_and_a_plain_walk(cluster, nodes, redis_server):
    async def main():
        ids = _pods_per_shard(4)
        depths = [0, 1, 2, 7, 31, 32, 33, 63, 64, 99, 100, 50]
        pods = {}
        for i, pid in enumerate(ids):
            held = set(CHAIN[: depths[i]]) | set(CHAIN[60 + i : 62 + i])  # gaps past the depth
            pods[pid] = FakePod(held)
        pods["dead"] = FakePod(CHAIN)
        pubs = [publisher(url, pid, pod, ttl_s=60.0)
                for url in (cluster.url, redis_server.url) for pid, pod in pods.items()]
        for p in pubs:
            await p.publish_once()
        for url in (cluster.url, redis_server.url):  # "dead": its heartbeat is gone, entries not
            r = connect(url, 5.0)
            shards = schema.shard_prefixes(P, 3 if url == cluster.url else None)
            prefix = shards[schema.shard_of("dead", 3)] if url == cluster.url else P
            assert await r.delete(schema.pod_key(prefix, "dead")) == 1
            await r.aclose()
        live = {pid: pod for pid, pod in pods.items() if pid != "dead"}
        sharded = KVIndex(cluster.url, timeout_s=5.0)
        single = KVIndex(redis_server.url, timeout_s=5.0)
        assert len(sharded.shards) == 3 and single.shards == [P]
        cold = block_hashes(list(range(5000, 5000 + 16 * 20)), 16, SEED)
        for probe in (CHAIN, CHAIN[:1], CHAIN[:40], CHAIN[1:], CHAIN[60:], cold, []):
            want = _walk(live, probe)
            a, b = await sharded.lookup(probe), await single.lookup(probe)
            assert a.hits == b.hits == want, len(probe)
            assert set(a.pods) == set(b.pods) == set(want)
            assert {k: (r.role, r.url, r.cached_blocks) for k, r in a.pods.items()} == {
                k: (r.role, r.url, r.cached_blocks) for k, r in b.pods.items()}
        assert set(await sharded.live_pods()) == set(await single.live_pods()) == set(live)
        assert 0 < len(_walk(live, CHAIN)) < len(live)  # some pods hit, some not
        for p in pubs:
            await p.stop(deregister=False)
        await sharded.close()
        await single.close()

    asyncio.run(main())


@pytest.mark.e2e
def test_dead_pods_entries_purged_from_their_shard(cluster, nodes):
    async def main():
        ids = _pods_per_shard(1)  # one pod on each shard
        dying = ids[1]
        pods = {pid: FakePod(CHAIN[:5]) for pid in ids}
        pubs = {pid: publisher(cluster.url, pid, pod, ttl_s=60.0) for pid, pod in pods.items()}
        for p in pubs.values():
            await p.publish_once()
        idxs = [KVIndex(cluster.url, timeout_s=5.0) for _ in range(2)]
        assert (await idxs[0].lookup(CHAIN)).hits == {pid: 5 for pid in ids}
        await pubs[dying].stop(deregister=False)  # crash: entries linger until the TTL and a sweep
        prefix = schema.shard_prefixes(P, 3)[schema.shard_of(dying, 3)]
        r = connect(cluster.url, 5.0)
        assert await r.pexpire(schema.pod_key(prefix, dying), 1)  # its TTL runs out now

        async def gone():
            return dying not in await idxs[0].live_pods()

        await wait_for_async(gone, "the dying pod's heartbeat expired", 5)
        assert (await idxs[0].lookup(CHAIN)).hits == {pid: 5 for pid in ids if pid != dying}
        assert await r.scard(schema.podblk_key(prefix, dying)) == 5
        results = await asyncio.gather(*(i.sweep(chunk=2) for i in idxs))  # two routers at once
        assert [p for res in results for p in res] == [dying]
        assert not await r.exists(schema.podblk_key(prefix, dying))
        assert not await r.sismember(schema.pods_key(prefix), dying)
        for h in CHAIN[:5]:
            assert not await r.exists(schema.blk_key(prefix, h))  # it was the shard's only holder
        for pid in ids:
            if pid != dying:
                p = schema.shard_prefixes(P, 3)[schema.shard_of(pid, 3)]
                assert await r.smembers(schema.blk_key(p, CHAIN[4])) == {pid.encode()}
        assert await idxs[1].sweep() == []
        await r.aclose()
        for pid in ids:
            if pid != dying:
                await pubs[pid].stop()
        for i in idxs:
            await i.close()

    asyncio.run(main())


@pytest.mark.e2e
def test_scripts_reloaded_after_the_nodes_lost_them(cluster, nodes):
    # A restarted or failed-over node has no scripts: a router's call loads them itself, and a
    # pod's tick fails once, after which its re-sync publishes everything again.
    async def main():
        ids = _pods_per_shard(1)
        pods = {pid: FakePod(CHAIN[:3]) for pid in ids}
        pubs = [publisher(cluster.url, pid, pod, timeout_s=2.0, max_backoff_s=0.2)
                for pid, pod in pods.items()]
        for p in pubs:
            p.start()
        idx = KVIndex(cluster.url, timeout_s=5.0)

        async def hits_are(n):
            return (await idx.lookup(CHAIN)).hits == {pid: n for pid in ids}

        await wait_for_async(lambda: hits_are(3), "3 blocks on every pod", 10)
        for r in nodes:
            r.script_flush()
        for pod in pods.values():
            pod.store(*CHAIN[3:6])
        await wait_for_async(lambda: hits_are(6), "6 blocks on every pod after SCRIPT FLUSH", 10)
        for p in pubs:
            await p.stop()
        await idx.close()

    asyncio.run(main())


@pytest.mark.e2e
def test_a_cluster_with_a_password():
    # Deployments require a Redis password (docs/SECURITY.md): the URL's goes to every node.
    c = Cluster(masters=3, shards=3, timeout_s=60, password="s3cret")
    try:
        async def main():
            ids = _pods_per_shard(1)
            pods = {pid: FakePod(CHAIN[:4]) for pid in ids}
            pubs = [publisher(c.url, pid, pod, ttl_s=60.0) for pid, pod in pods.items()]
            for p in pubs:
                await p.publish_once()
            idx = KVIndex(c.url, timeout_s=5.0)
            assert (await idx.lookup(CHAIN)).hits == {pid: 4 for pid in ids}
            wrong = KVIndex(c.url.replace("s3cret", "wrong"), timeout_s=5.0)
            with pytest.raises(REDIS_ERRORS):
                await wrong.lookup(CHAIN)
            for p in pubs:
                await p.stop()
            await idx.close()
            await wrong.close()

        asyncio.run(main())
    finally:
        c.stop()


def test_cluster_calls_are_bounded_when_no_node_answers():
    # No node reachable (refused) or a node that accepts and never answers: every call gives
    # up within its timeout with one of REDIS_ERRORS, which the router and pods fall back on.
    import socket
    import time

    from tests.stack import free_port

    async def main():
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen(8)
            for url in (f"redis+cluster://127.0.0.1:{free_port()}/?shards=3",
                        f"redis+cluster://127.0.0.1:{srv.getsockname()[1]}/?shards=3"):
                idx = KVIndex(url, timeout_s=0.3)
                pub = publisher(url, "a", FakePod(), timeout_s=0.3)
                t0 = time.monotonic()
                for call in (idx.lookup(CHAIN), idx.live_pods(), idx.sweep(), pub.publish_once()):
                    with pytest.raises(REDIS_ERRORS):
                        await call
                assert time.monotonic() - t0 < 4.0, url
                await idx.close()

    asyncio.run(main())


@pytest.mark.e2e
def test_router_and_sim_pods_on_a_cluster(cluster, nodes, tmp_path, tiny_qwen3):
    # The real services with --redis-url naming the cluster: pods register on their shards,
    # the router sees them all, and a repeated prompt is routed to the pod that caches it.
    from tests.stack import ServiceStack, wait_for

    token = "cluster"
    with ServiceStack(tmp_path) as st:
        pods = [st.pod("decode", tiny_qwen3, engine="sim", redis_url=cluster.url,
                       internal_token=token) for _ in range(3)]
        router = st.router(tiny_qwen3, redis_url=cluster.url, internal_token=token)
        wait_for(lambda: router.get("/ready").json().get("live_pods") == 3, "3 live pods", 20)
        client = router.client()
        model = client.models.list().data[0].id
        prompt = "the cluster holds the index " * 40
        first = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
        wait_for(lambda: _cached_somewhere(cluster.url), "the prompt's blocks indexed", 10)
        second = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0)
        assert second.choices[0].text == first.choices[0].text
        # every full block but the one holding the last prompt token (always computed)
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached == 16 * ((first.usage.prompt_tokens - 1) // 16)
        assert router.metric("baton_router_routing_decisions_total", policy="prefix",
                             reason="prefix_hit") == 1
        # each pod registered on its own shard, and only there
        want = [sorted(p.pod_id() for p in pods if schema.shard_of(p.pod_id(), 3) == k)
                for k in range(3)]
        assert _registered(cluster.url) == want


def _registered(url: str) -> list[list[str]]:
    async def read() -> list[list[str]]:
        r = connect(url, 5.0)
        try:
            return [sorted(m.decode() for m in await r.smembers(schema.pods_key(p)))
                    for p in schema.shard_prefixes(P, 3)]
        finally:
            await r.aclose()

    return asyncio.run(read())


def _cached_somewhere(url: str) -> bool:
    async def count() -> int:
        r = connect(url, 5.0)
        try:
            n = 0
            for p in schema.shard_prefixes(P, 3):
                for pid in await r.smembers(schema.pods_key(p)):
                    n += await r.scard(schema.podblk_key(p, pid.decode()))
            return n
        finally:
            await r.aclose()

    return asyncio.run(count()) > 0
