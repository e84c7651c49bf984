"""The KV-block index at scale: Redis memory per block, LOOKUP latency, KV events ingested per second.

Simulated pods are in-process objects driving the real code paths against a real redis-server
this script starts: each pod owns a `PodPublisher` (heartbeat + batched APPLY of its stored and
removed hashes, one pipeline per tick, exactly as a pod publishes), and lookups go through the
router's own `KVIndex.lookup` (the LOOKUP script, one round trip, records parsed as the router
parses them).

What each pod caches (documented workload, all chains built like `hashing.block_hashes`
chains: each hash extends its parent, so prefixes are shared only where the tokens are):
  * one hot prefix of `--hot-blocks` blocks held by every pod (the worst case for LOOKUP:
    every pod is a candidate for every one of those blocks);
  * the system prompts of `--tenant-per-pod` of `--tenants` tenants (`--system-blocks` each),
    so each system prompt sits on about pods * tenant_per_pod / tenants pods;
  * the rest: the pod's own conversations, chains of up to `--prompt-tokens` tokens that
    extend one of its tenants' system prompts (held by that pod only).

Measured:
  * memory: INFO used_memory before/after the fill, per cached (pod, block) entry;
  * LOOKUP p50/p99 from the router's client for `--prompt-tokens`-token prompts, in four
    shapes (cold, a tenant conversation, the hot prefix + a conversation, a prompt entirely
    held by every pod), and Redis's own CPU per call (INFO commandstats) — the ceiling of
    lookups per second one Redis serves; and the registry read (every live pod's record) a
    router does once per refresh interval;
  * events/s: pods evict and store blocks (batched events, real publisher ticks); blocks
    stored + removed per wall second, and per second of Redis CPU (the single-Redis ceiling).

    python bench/bench_index.py                    # 1,000 pods, 10 M blocks (30-45 min on 2 shared cores)
    python bench/bench_index.py --quick            # 50 pods, 50k blocks (seconds; the test runs this)
    python bench/bench_index.py --shards 3 ...     # the index sharded by pod over a 3-master
                                                   # Redis Cluster this script starts (redis-cli)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baton.kvindex import schema  # noqa: E402
from baton.kvindex.connection import REDIS_ERRORS  # noqa: E402
from baton.kvindex.hashing import block_hashes, model_seed  # noqa: E402
from baton.kvindex.index import KVIndex  # noqa: E402
from baton.kvindex.publisher import PodInfo, PodPublisher  # noqa: E402

SEED = model_seed("bench-index")

# LOOKUP as it was before this bench (git show 0c9f003:baton/kvindex/schema.py): each block's
# holders walked with SMEMBERS in Lua. Kept here to measure old and new side by side.
OLD_LOOKUP = """
local p = ARGV[1]
local recs, cand, ncand = {}, {}, 0
for _, id in ipairs(redis.call('SMEMBERS', p .. 'pods')) do
  local rec = redis.call('GET', p .. 'pod:' .. id)
  if rec then
    recs[#recs + 1] = id
    recs[#recs + 1] = rec
    cand[id] = true
    ncand = ncand + 1
  end
end
local hits = {}
for i = 2, #ARGV do
  if ncand == 0 then break end
  local nxt, n = {}, 0
  for _, m in ipairs(redis.call('SMEMBERS', p .. 'blk:' .. ARGV[i])) do
    if cand[m] then
      nxt[m] = true
      n = n + 1
      hits[m] = i - 1
    end
  end
  cand, ncand = nxt, n
end
local out = {}
for id, k in pairs(hits) do
  out[#out + 1] = id
  out[#out + 1] = k
end
return {recs, out}
"""


def chain(parent: bytes, tag: bytes, n: int) -> list[bytes]:
    """n hashes extending `parent` (a stand-in for block_hashes over n blocks of distinct tokens:
    same 16-byte blake2b chain shape, without building 16 tokens per block in Python)."""
    out, prev = [], parent
    for i in range(n):
        prev = hashlib.blake2b(prev + tag + i.to_bytes(4, "little"), digest_size=16).digest()
        out.append(prev)
    return out


class SimPod:
    """The three callables a PodPublisher reads, over an insertion-ordered set (oldest first = LRU)."""

    def __init__(self, pod_id: str):
        self.pod_id = pod_id
        self.cached: dict[bytes, None] = {}
        self.stored: list[bytes] = []
        self.removed: list[bytes] = []

    def store(self, hs: list[bytes]) -> None:
        for h in hs:
            if h not in self.cached:
                self.cached[h] = None
                self.stored.append(h)

    def evict(self, n: int, keep: set[bytes]) -> None:
        victims = [h for h in self.cached if h not in keep][:n]
        for h in victims:
            del self.cached[h]
        self.removed += victims

    def state(self) -> dict:
        n = len(self.cached)
        return {"running": 3, "waiting": 1, "waiting_prefill_tokens": 512, "free_blocks": 1000,
                "total_blocks": n + 1000, "cached_blocks": n}

    def drain(self):
        out = (self.stored, self.removed, False)
        self.stored, self.removed = [], []
        return out

    def all_cached(self) -> list[bytes]:
        return list(self.cached)


class Redis:
    """A throwaway redis-server on a free loopback port (no persistence)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="bench-index-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind",
             "127.0.0.1", "--dir", self.dir, "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start within 10 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_cluster_port() -> int:
    """A free loopback port p whose cluster bus port p + 10000 is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 55_000:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10_000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


class Cluster:
    """A throwaway Redis Cluster: `masters` redis-servers with --cluster-enabled yes on loopback,
    joined by `redis-cli --cluster create` (no replicas), every step under a deadline; `url`
    names it with `shards` shards (baton/kvindex/connection.py). stop() ends every node and
    removes its files, also when starting failed half-way."""

    def __init__(self, masters: int = 3, shards: int = 3, timeout_s: float = 30.0,
                 password: str | None = None):
        self.password = password
        if masters == 2:
            raise ValueError("redis-cli --cluster create takes 3 masters or more (or 1 here)")
        self.dir = tempfile.mkdtemp(prefix="bench-index-cluster-")
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen] = []
        try:
            self._start(masters, timeout_s)
        except BaseException:
            self.stop()
            raise
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        auth = f":{password}@" if password else ""
        self.url = f"redis+cluster://{auth}{hosts}/?shards={shards}"

    def _start(self, masters: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        exe = shutil.which("redis-server") or "redis-server"
        for _ in range(masters):
            port = _free_cluster_port()
            while port in self.ports:
                port = _free_cluster_port()
            d = Path(self.dir) / str(port)
            d.mkdir()
            self.ports.append(port)
            self.procs.append(subprocess.Popen(
                [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no",
                 "--protected-mode", "no", "--loglevel", "warning",
                 *(["--requirepass", self.password, "--masterauth", self.password]
                   if self.password else [])],
                stdout=subprocess.DEVNULL))
        for port, proc in zip(self.ports, self.procs):
            while not _answers(port, self.password):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node on port {port} did not start")
                time.sleep(0.05)
        cli = shutil.which("redis-cli") or "redis-cli"
        if self.password:
            cli = [cli, "-a", self.password, "--no-auth-warning"]
        else:
            cli = [cli]
        # redis-cli --cluster create wants 3 masters at least; one node takes every slot itself
        create = [*cli, "-p", str(self.ports[0]), "cluster", "addslotsrange", "0", "16383"] \
            if masters == 1 else [*cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                                  "--cluster-replicas", "0", "--cluster-yes"]
        subprocess.run(create, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=max(deadline - time.monotonic(), 1))
        for port in self.ports:  # every node agrees the cluster is whole
            while True:
                out = subprocess.run([*cli, "-p", str(port), "cluster", "info"], capture_output=True,
                                     text=True, timeout=max(deadline - time.monotonic(), 1)).stdout
                if "cluster_state:ok" in out:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster not ok on port {port} after {timeout_s} s:\n{out}")
                time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)


def _answers(port: int, password: str | None = None) -> bool:
    """The server on `port` is up (with a password: it answers, if only that auth is needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG" if not password else b"-NOAUTH")
    except OSError:
        return False


async def info(nodes: list[aioredis.Redis]) -> dict:
    """INFO summed over the nodes (one, or a cluster's masters); node_cpu_s: each node's own."""
    out = {"used_memory": 0, "cpu_s": 0.0, "node_cpu_s": [], "evalsha": {"calls": 0, "usec": 0}}
    for r in nodes:
        mem, cpu, stats = await r.info("memory"), await r.info("cpu"), await r.info("commandstats")
        out["used_memory"] += mem["used_memory"]
        out["node_cpu_s"].append(cpu["used_cpu_user"] + cpu["used_cpu_sys"])
        ev = stats.get("cmdstat_evalsha", {"calls": 0, "usec": 0})
        out["evalsha"] = {k: out["evalsha"][k] + ev[k] for k in ("calls", "usec")}
    out["cpu_s"] = sum(out["node_cpu_s"])
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def tick_all(pubs: list[PodPublisher], parallel: int = 64, tries: int = 1) -> None:
    """One publish tick of every pod (at most `parallel` pipelines in flight); a pod whose tick
    fails tries again up to `tries` times in all (it then re-syncs, as a real pod does)."""
    sem = asyncio.Semaphore(parallel)

    async def one(p):
        for left in range(tries - 1, -1, -1):
            async with sem:
                try:
                    return await p.publish_once()
                except REDIS_ERRORS:
                    if not left:
                        raise
                    p.synced = False

    await asyncio.gather(*(one(p) for p in pubs))


async def run(a) -> dict:
    rng = random.Random(7)
    per_pod = a.blocks // a.pods
    bpp = a.prompt_tokens // a.block_size  # blocks per prompt
    hot = chain(SEED, b"hot", a.hot_blocks)
    tenants = [chain(SEED, b"tenant%d" % t, a.system_blocks) for t in range(a.tenants)]
    pods = [SimPod(f"pod-{i:04d}") for i in range(a.pods)]
    tenant_of = {p.pod_id: rng.sample(range(a.tenants), a.tenant_per_pod) for p in pods}
    convs: dict[str, list[list[bytes]]] = {}  # pod -> its conversations' full chains

    server = Cluster(masters=a.shards, shards=a.shards) if a.shards else Redis()
    ports = server.ports if a.shards else [server.port]
    nodes = [aioredis.Redis(host="127.0.0.1", port=port) for port in ports]
    r = nodes[0]
    pubs: list[PodPublisher] = []
    try:
        for p in pods:
            pubs.append(PodPublisher(
                server.url, PodInfo(p.pod_id, "colocated", f"http://{p.pod_id}:8000", "m",
                                    block_size=a.block_size),
                p.state, p.drain, p.all_cached, interval_s=1.0, ttl_s=600.0, timeout_s=30.0))
        before = await info(nodes)
        # first tick: each pod registers and syncs (nothing cached yet); 1,000 cluster clients
        # discovering the cluster at once can outlast a timeout on 2 shared cores: try again
        await tick_all(pubs, tries=3)
        empty = await info(nodes)

        # Fill in rounds of batched events, like pods warming up: every round each pod stores
        # one conversation (its tenant's system prompt + its own tail).
        t0 = time.monotonic()
        stored_total, k = 0, 0
        while stored_total < a.blocks:
            for p in pods:
                if len(p.cached) >= per_pod:
                    continue
                if not p.cached:
                    p.store(hot)
                    for t in tenant_of[p.pod_id]:
                        p.store(tenants[t])
                t = tenant_of[p.pod_id][k % a.tenant_per_pod]
                tail = chain(tenants[t][-1], p.pod_id.encode() + b"/%d" % k,
                             min(bpp - a.system_blocks, per_pod - len(p.cached)))
                p.store(tail)
                convs.setdefault(p.pod_id, []).append(tenants[t] + tail)
            k += 1
            await tick_all(pubs)
            stored_total = sum(len(p.cached) for p in pods)
        fill_s = time.monotonic() - t0
        full = await info(nodes)
        dbsize = sum([await n.dbsize() for n in nodes])
        entries = sum(len(p.cached) for p in pods)
        distinct = len({h for p in pods for h in p.cached})
        mem = {
            "pods": a.pods, "entries": entries, "distinct_blocks": distinct, "keys": dbsize,
            "shards": a.shards or 1, "used_memory_empty": empty["used_memory"], "used_memory_full": full["used_memory"],
            "bytes_per_entry": (full["used_memory"] - empty["used_memory"]) / entries,
            "bytes_per_distinct_block": (full["used_memory"] - empty["used_memory"]) / distinct,
            "fill_s": fill_s,
            "fill_entries_per_s": entries / fill_s,
            "fill_entries_per_redis_cpu_s": entries / max(full["cpu_s"] - empty["cpu_s"], 1e-9),
        }
        print(json.dumps({"memory": mem}), flush=True)

        # LOOKUP through the router's client, four prompt shapes.
        index = KVIndex(server.url, timeout_s=30.0)
        old = r.register_script(OLD_LOOKUP)
        p0 = pods[0]
        conv = next(c for c in convs[p0.pod_id] if len(c) == bpp)
        shapes = {
            "cold": block_hashes(list(range(a.prompt_tokens)), a.block_size, SEED),
            "conversation": conv,
            "hot_prefix+conversation": hot + conv[: bpp - len(hot)],
            "all_pods_hold_all": None,  # filled below: an 8k chain every pod caches
        }
        full_hot = chain(SEED, b"full-hot", bpp)
        for p in pods:
            p.store(full_hot)
        await tick_all(pubs)
        shapes["all_pods_hold_all"] = full_hot
        lookups = {}
        for name, ch in shapes.items():
            look = await index.lookup(ch)
            hits = sorted(look.hits.values())
            s0 = await info(nodes)
            lat = []
            for _ in range(a.lookups):
                t = time.perf_counter()
                await index.lookup(ch)
                lat.append((time.perf_counter() - t) * 1e3)
            s1 = await info(nodes)
            # per lookup, every shard's script together: time inside the scripts (wall time of
            # the command, which a descheduled server inflates) and the servers' CPU
            redis_us = (s1["evalsha"]["usec"] - s0["evalsha"]["usec"]) / a.lookups
            redis_cpu_ms = (s1["cpu_s"] - s0["cpu_s"]) / a.lookups * 1e3
            # the same prompt through the old script, raw (no record parsing), same conditions
            old_lat, old_us, old_depth = [None], None, None
            if not a.shards:  # (it knows one Redis only)
                old_args = [schema.DEFAULT_PREFIX, *(h.hex() for h in ch)]
                _, old_hits = await old(args=old_args)
                old_depth = {old_hits[j].decode(): int(old_hits[j + 1])
                             for j in range(0, len(old_hits), 2)}
                old_lat = []
                n_old = max(3, a.lookups // 10)
                for _ in range(n_old):
                    t = time.perf_counter()
                    await old(args=old_args)
                    old_lat.append((time.perf_counter() - t) * 1e3)
                s2 = await info(nodes)
                old_us = (s2["evalsha"]["usec"] - s1["evalsha"]["usec"]) / (n_old + 1)
            lookups[name] = {
                "chain_blocks": len(ch), "pods_hit": len(hits), "max_hit_blocks": max(hits, default=0),
                "records_returned": len(look.pods), "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
                "mean_ms": statistics.fmean(lat), "redis_us_per_call": redis_us,
                "redis_cpu_ms_per_lookup": redis_cpu_ms,
                "redis_ceiling_per_s": 1e6 / redis_us if redis_us else None,
                "old_script_p50_ms": pct(old_lat, 0.5), "old_script_redis_us_per_call": old_us,
                "old_and_new_agree": None if old_depth is None else old_depth == look.hits,
            }
            print(json.dumps({"lookup": {name: lookups[name]}}), flush=True)
        # The registry read each router does every refresh_interval_s (every live pod's record)
        s0, lat = await info(nodes), []
        for _ in range(a.lookups):
            t = time.perf_counter()
            live = await index.live_pods()
            lat.append((time.perf_counter() - t) * 1e3)
        s1 = await info(nodes)
        registry = {"live_pods": len(live), "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
                    "redis_us_per_call": (s1["evalsha"]["usec"] - s0["evalsha"]["usec"]) / a.lookups,
                    "redis_cpu_ms_per_call": (s1["cpu_s"] - s0["cpu_s"]) / a.lookups * 1e3}
        print(json.dumps({"registry": registry}), flush=True)
        t = time.perf_counter()
        for _ in range(20):
            block_hashes(list(range(a.prompt_tokens)), a.block_size, SEED)
        hash_ms = (time.perf_counter() - t) / 20 * 1e3
        await index.close()

        # Churn: every tick each pod evicts `--churn` LRU blocks and stores as many new ones.
        keep = set(hot) | set(full_hot) | {h for t in tenants for h in t}
        s0, t0, moved, ticks = await info(nodes), time.monotonic(), 0, 0
        while time.monotonic() - t0 < a.churn_s:
            for p in pods:
                p.evict(a.churn, keep)
                p.store(chain(tenants[tenant_of[p.pod_id][0]][-1], b"churn%d" % ticks
                              + p.pod_id.encode(), a.churn))
            await tick_all(pubs)
            moved += 2 * a.churn * len(pods)
            ticks += 1
        wall = time.monotonic() - t0
        s1 = await info(nodes)
        node_cpu = [b - c for b, c in zip(s1["node_cpu_s"], s0["node_cpu_s"])]
        events = {
            "ticks": ticks, "blocks_per_pod_tick": 2 * a.churn, "events": moved, "wall_s": wall,
            "events_per_s": moved / wall,
            "redis_cpu_s": s1["cpu_s"] - s0["cpu_s"],
            "events_per_redis_cpu_s": moved / max(s1["cpu_s"] - s0["cpu_s"], 1e-9),
            # the ceiling when each node has a core of its own: the busiest node sets it
            "node_cpu_s": node_cpu,
            "events_per_busiest_node_cpu_s": moved / max(max(node_cpu), 1e-9),
        }
        print(json.dumps({"events": events}), flush=True)
        ver = (await r.info("server"))["redis_version"]
        for pub in pubs:
            await pub.stop(deregister=False)
        pubs = []
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        return {"config": config, "redis_version": ver, "memory": mem, "lookup": lookups,
                "registry": registry, "router_hash_8k_prompt_ms": hash_ms, "events": events}
    finally:
        for pub in pubs:
            await pub.stop(deregister=False)
        for n in nodes:
            await n.aclose()
        server.stop()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--blocks", type=int, default=10_000_000, help="(pod, block) entries in all")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=8192)
    ap.add_argument("--hot-blocks", type=int, default=128, help="hot prefix every pod holds")
    ap.add_argument("--tenants", type=int, default=100)
    ap.add_argument("--tenant-per-pod", type=int, default=4)
    ap.add_argument("--system-blocks", type=int, default=64, help="blocks per tenant system prompt")
    ap.add_argument("--lookups", type=int, default=300)
    ap.add_argument("--churn", type=int, default=64, help="blocks evicted and stored per pod tick")
    ap.add_argument("--churn-s", type=float, default=20.0)
    ap.add_argument("--shards", type=int, default=0,
                    help="0: one redis-server; N: a Redis Cluster of N masters, the index in N shards")
    ap.add_argument("--quick", action="store_true", help="50 pods, 50k blocks, few lookups")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here")
    a = ap.parse_args(argv)
    if a.quick:
        a.pods, a.blocks, a.lookups, a.churn_s, a.tenants = 50, 50_000, 20, 0.5, 10
    res = asyncio.run(run(a))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
