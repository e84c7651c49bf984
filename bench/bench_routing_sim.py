"""Routing quality at scale by discrete-event simulation: simulated time, real policy decisions.

Every request is routed by the real `baton.router.policy.choose` over the same inputs the
router builds in `PodTable.pick`: each pod's load from its last heartbeat (published every
`--publish-s` of simulated time, so as stale as in production), the router's own in-flight
prefill tokens per pod (exact, released at the first token), and the prompt's cached prefix
per pod from the KV index. With `--index redis` (the default for 8 and 64 pods) the index is
the real one: every pod owns a `PodPublisher` that publishes its batched KV events and
heartbeat into a redis-server this script starts, and the router side calls
`KVIndex.lookup` (the LOOKUP script) for each request. With `--index local` (512 pods: the
Redis path would take real hours of CPU here, and its cost is what bench_index.py measures)
the same events feed an in-process dict with LOOKUP's semantics (leading blocks held, live
pods only), at the same publish ticks.

Pod timing model (one GPU running a chunked-prefill continuous-batching engine):
  * one engine iteration = one decode step for every running sequence + up to
    `--chunk` prompt tokens of the FIFO prefill queue;
  * iteration time = decode_step + prefill_tokens / prefill_tps, where
    decode_step = `--step-ms` + `--step-per-seq-ms` * batch + `--step-per-kctx-ms` * (context
    tokens of the batch / 1000): it grows with batch size and with context;
  * a request's first token comes at the end of the iteration that computes its last prompt
    token; it then decodes its output tokens one per iteration and leaves;
  * prefix cache: `--kv-blocks` blocks of `--block-size` tokens per pod, hashed as chains
    (`block_hashes`); a prompt's leading cached blocks are not computed; blocks are stored
    when computed and evicted least-recently-used beyond capacity (blocks of running
    sequences are not pinned: a simplification that favours no policy);
  * defaults: prefill 20,000 tok/s, decode step 8 ms + 0.05 ms/seq + 0.01 ms/1k ctx tokens,
    2,048-token chunks, 8,192 blocks of 16 tokens (131k tokens) per pod.

Workloads (arrivals Poisson at `--rate-per-pod` * pods requests/s; prompts are token ids):
  * tenants:   pods/2 (at least 8) tenants, Zipf(1.1) popularity, each with its own
               1,024-2,048-token system prompt; request = system prompt + 64-512 new tokens;
  * chat:      multi-turn sessions (requests/5.5 of them, 3-8 turns, 1-4 s think time): turn k's
               prompt = turn k-1's prompt + its answer + 64-256 new tokens, over a shared
               256-token system prompt;
  * hot:       90% of requests share one 2,048-token prefix + 64-256 own tokens; the rest
               are unrelated 1,024-token prompts. pod-000 starts with the hot prefix cached
               (it served it first): the case where a prefix-affine router piles everything
               onto that one pod.
Output 16-48 tokens each (decode load without spending the run on decode steps).

Reported per workload x policy x pod count: TTFT p50/p99 (arrival to first token, simulated
seconds), prefix-hit rate (prompt tokens the chosen pod had cached / prompt tokens), the
busiest pod's share of requests (1/pods is perfect balance) and the share of prompt tokens it
computed.

    python bench/bench_routing_sim.py --pods 8 64 512 --out docs/results/routing-sim.json --plots docs
    python bench/bench_routing_sim.py --quick      # 8 pods, few requests, local + Redis (the test)
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import random
import shutil
import statistics
import sys
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baton.kvindex.hashing import block_hashes, model_seed  # noqa: E402
from baton.router.policy import POLICIES, Decision, PodLoad, Weights, choose, load_cost  # noqa: E402

SIM_POLICIES = (*POLICIES, "affinity")

SEED = model_seed("routing-sim")
WORKLOADS = ("tenants", "chat", "hot")


@dataclass
class Model:
    prefill_tps: float = 20_000.0
    step_ms: float = 8.0
    step_per_seq_ms: float = 0.05
    step_per_kctx_ms: float = 0.01
    chunk: int = 2048
    kv_blocks: int = 8192
    block_size: int = 16

    def decode_step_s(self, batch: int, ctx_tokens: int) -> float:
        if batch == 0:
            return 0.0
        return (self.step_ms + self.step_per_seq_ms * batch
                + self.step_per_kctx_ms * ctx_tokens / 1000) / 1000


@dataclass
class Req:
    rid: int
    arrival: float
    prompt: list[int]
    out_len: int
    session: int = -1  # chat: the session whose next turn follows this one
    chain: list[bytes] = field(default_factory=list)
    pod: str = ""
    cached: int = 0  # prompt tokens the pod had cached
    left: int = 0  # prompt tokens still to compute
    decoded: int = 0
    first_token: float = -1.0
    claim: int = 0  # router in-flight tokens claimed


class Pod:
    """One simulated engine: FIFO prefill queue, running batch, block-level LRU prefix cache."""

    def __init__(self, pod_id: str, m: Model):
        self.id, self.m = pod_id, m
        self.cache: OrderedDict[bytes, None] = OrderedDict()
        self.stored: list[bytes] = []
        self.removed: list[bytes] = []
        self.queue: deque[Req] = deque()
        self.running: list[Req] = []
        self.busy = False  # an iteration is scheduled
        self.requests = 0
        self.computed_tokens = 0

    # -- the callables a PodPublisher reads -------------------------------------------------
    def state(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.queue),
                "waiting_prefill_tokens": sum(r.left for r in self.queue),
                "free_blocks": max(self.m.kv_blocks - len(self.cache), 0),
                "total_blocks": self.m.kv_blocks, "cached_blocks": len(self.cache)}

    def drain(self):
        out = (self.stored, self.removed, False)
        self.stored, self.removed = [], []
        return out

    def all_cached(self) -> list[bytes]:
        return list(self.cache)

    # -- engine -----------------------------------------------------------------------------
    def admit(self, r: Req) -> None:
        hit = 0
        for h in r.chain:
            if h not in self.cache:
                break
            self.cache.move_to_end(h)
            hit += 1
        r.cached = min(hit * self.m.block_size, len(r.prompt) - 1)
        r.left = len(r.prompt) - r.cached
        self.requests += 1
        self.computed_tokens += r.left
        self.queue.append(r)

    def _store(self, chain: list[bytes]) -> None:
        for h in chain:
            if h in self.cache:
                self.cache.move_to_end(h)
            else:
                self.cache[h] = None
                self.stored.append(h)
        while len(self.cache) > self.m.kv_blocks:
            h, _ = self.cache.popitem(last=False)
            self.removed.append(h)

    def iterate(self, now: float) -> tuple[float, list[Req], list[Req]]:
        """Run one iteration starting at `now`: (its duration, first tokens, finished)."""
        budget, firsts = self.m.chunk, []
        prefill_tokens = 0
        while self.queue and budget > 0:
            r = self.queue[0]
            take = min(r.left, budget)
            r.left -= take
            budget -= take
            prefill_tokens += take
            if r.left == 0:
                self.queue.popleft()
                firsts.append(r)
        ctx = sum(len(r.prompt) + r.decoded for r in self.running)
        dt = self.m.decode_step_s(len(self.running), ctx) + prefill_tokens / self.m.prefill_tps
        finished = []
        for r in self.running:
            r.decoded += 1
            if r.decoded >= r.out_len:
                finished.append(r)
        self.running = [r for r in self.running if r.decoded < r.out_len]
        for r in firsts:
            self._store(r.chain)
            r.decoded = 1
            if r.out_len > 1:
                self.running.append(r)
            else:
                finished.append(r)
        return dt, firsts, finished


class LocalIndex:
    """LOOKUP's semantics over an in-process dict, fed by the same batched events at the same
    ticks as the Redis index (for pod counts where Redis would cost real hours here)."""

    def __init__(self, pods: dict[str, Pod]):
        self.pods = pods
        self.holders: dict[bytes, set[str]] = {}
        self.records: dict[str, dict] = {}

    async def publish(self, now: float) -> None:
        for p in self.pods.values():
            stored, removed, _ = p.drain()
            for h in removed:
                s = self.holders.get(h)
                if s is not None:
                    s.discard(p.id)
                    if not s:
                        del self.holders[h]
            for h in stored:
                self.holders.setdefault(h, set()).add(p.id)
            self.records[p.id] = p.state()

    async def lookup(self, chain: list[bytes]) -> tuple[dict[str, dict], dict[str, int]]:
        hits: dict[str, int] = {}
        cand = None
        for i, h in enumerate(chain):
            s = self.holders.get(h, set())
            cand = set(s) if cand is None else cand & s
            if not cand:
                break
            for pid in cand:
                hits[pid] = i + 1
        return self.records, hits

    async def close(self) -> None:
        pass


class RedisIndex:
    """The real index: a PodPublisher per pod into a real redis-server; KVIndex.lookup per request."""

    def __init__(self, pods: dict[str, Pod], m: Model, workdir: Path):
        from bench.bench_index import Redis  # the same throwaway redis-server helper

        from baton.kvindex.index import KVIndex
        from baton.kvindex.publisher import PodInfo, PodPublisher

        self.server = Redis()
        self.pubs = [PodPublisher(
            self.server.url, PodInfo(p.id, "colocated", f"http://{p.id}", "sim", block_size=m.block_size),
            p.state, p.drain, p.all_cached, interval_s=1.0, ttl_s=3600.0, timeout_s=30.0)
            for p in pods.values()]
        self.index = KVIndex(self.server.url, timeout_s=30.0)

    async def publish(self, now: float) -> None:
        await asyncio.gather(*(p.publish_once() for p in self.pubs))

    async def lookup(self, chain: list[bytes]) -> tuple[dict[str, dict], dict[str, int]]:
        # every pod's load, as the router's periodic registry read has it (LOOKUP returns the
        # records of the pods it hits only)
        pods = await self.index.live_pods()
        look = await self.index.lookup(chain)
        recs = {pid: {"running": r.running, "waiting": r.waiting,
                      "waiting_prefill_tokens": r.waiting_prefill_tokens}
                for pid, r in (pods | look.pods).items()}
        return recs, look.hits

    async def close(self) -> None:
        for p in self.pubs:
            await p.stop(deregister=False)
        await self.index.close()
        self.server.stop()


# -- workloads ------------------------------------------------------------------------------

def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 50_000) for _ in range(n)]


class Workload:
    """Yields (arrival time, prompt, output length, session) in arrival order; chat sessions'
    next turns are scheduled when the previous turn finishes (think time after its answer)."""

    def __init__(self, name: str, pods: int, n: int, rate: float, seed: int):
        self.name, self.n, self.rate = name, n, rate
        self.rng = random.Random(seed)
        rng = self.rng
        if name == "tenants":
            k = max(8, pods // 2)
            self.systems = [_tokens(rng, rng.randrange(1024, 2049)) for _ in range(k)]
            w = [1 / (i + 1) ** 1.1 for i in range(k)]
            self.weights = [x / sum(w) for x in w]
        elif name == "chat":
            self.system = _tokens(rng, 256)
            self.sessions: dict[int, tuple[list[int], int]] = {}  # id -> (history, turns left)
            self.n_sessions = max(1, round(n / 5.5))  # 5.5 turns a session on average
        elif name == "hot":
            self.hot = _tokens(rng, 2048)
        else:
            raise ValueError(f"workload must be one of {WORKLOADS}")

    def first_arrivals(self) -> list[tuple[float, list[int], int, int]]:
        rng, t, out = self.rng, 0.0, []
        if self.name == "chat":
            # sessions start as a Poisson stream; their later turns come from follow_up()
            for s in range(self.n_sessions):
                t += rng.expovariate(self.rate / 5.5)  # 5.5 turns a session on average
                out.append((t, self._turn(s, None), rng.randrange(16, 49), s))
            return out
        for _ in range(self.n):
            t += rng.expovariate(self.rate)
            if self.name == "tenants":
                sysp = rng.choices(self.systems, self.weights)[0]
                prompt = sysp + _tokens(rng, rng.randrange(64, 513))
            elif rng.random() < 0.9:
                prompt = self.hot + _tokens(rng, rng.randrange(64, 257))
            else:
                prompt = _tokens(rng, 1024)
            out.append((t, prompt, rng.randrange(16, 49), -1))
        return out

    def _turn(self, s: int, answered: list[int] | None) -> list[int]:
        rng = self.rng
        if answered is None:
            self.sessions[s] = (self.system, rng.randrange(3, 9))
        hist, left = self.sessions[s]
        prompt = (answered if answered is not None else hist) + _tokens(rng, rng.randrange(64, 257))
        self.sessions[s] = (prompt, left - 1)
        return prompt

    def follow_up(self, r: Req, now: float) -> tuple[float, list[int], int, int] | None:
        if self.name != "chat" or r.session < 0:
            return None
        _, left = self.sessions[r.session]
        if left <= 0:
            return None
        answer = r.prompt + _tokens(self.rng, r.out_len)
        return (now + self.rng.uniform(1.0, 4.0), self._turn(r.session, answer),
                self.rng.randrange(16, 49), r.session)


# -- the simulation -------------------------------------------------------------------------

async def simulate(workload: str, policy: str, n_pods: int, a) -> dict:
    m = Model(a.prefill_tps, a.step_ms, a.step_per_seq_ms, a.step_per_kctx_ms, a.chunk,
              a.kv_blocks, a.block_size)
    pods = {f"pod-{i:03d}": Pod(f"pod-{i:03d}", m) for i in range(n_pods)}
    use_redis = a.index == "redis" or (a.index == "auto" and n_pods <= 64)
    index = RedisIndex(pods, m, Path(".")) if use_redis else LocalIndex(pods)
    wl = Workload(workload, n_pods, a.requests_per_pod * n_pods, a.rate_per_pod * n_pods, a.seed)
    w, rng = Weights(queue=a.queue_weight, decode_tokens_per_seq=a.decode_tokens_per_seq), random.Random(a.seed)
    inflight: dict[str, int] = {p: 0 for p in pods}
    events: list = []  # (time, seq, kind, payload)
    seq = 0

    def push(t, kind, payload):
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    if workload == "hot":
        pods["pod-000"]._store(block_hashes(wl.hot, m.block_size, SEED))
    for arr in wl.first_arrivals():
        push(arr[0], "arrive", arr)
    push(0.0, "publish", None)
    done: list[Req] = []
    rr, rid, decide_s = 0, 0, 0.0
    try:
        while events:
            now, _, kind, payload = heapq.heappop(events)
            if kind == "publish":
                await index.publish(now)
                if any(e[2] != "publish" for e in events):
                    push(now + a.publish_s, "publish", None)
            elif kind == "arrive":
                t, prompt, out_len, session = payload
                r = Req(rid, t, prompt, out_len, session)
                rid += 1
                r.chain = block_hashes(prompt, m.block_size, SEED)
                t0 = time.perf_counter()
                recs, hits = await index.lookup(r.chain) if policy in ("prefix", "affinity") else (index_records(index, pods), {})
                limit = len(prompt) - 1
                loads = [PodLoad(pid, running=rec["running"], waiting=rec["waiting"],
                                 waiting_prefill_tokens=rec["waiting_prefill_tokens"],
                                 cached_tokens=min(hits.get(pid, 0) * m.block_size, limit),
                                 inflight_tokens=inflight[pid])
                         for pid, rec in recs.items()]
                if policy == "affinity":
                    d = affinity(loads, w, rng)
                else:
                    d = choose(loads, len(prompt), policy, w, rr_counter=rr, rng=rng)
                decide_s += time.perf_counter() - t0
                rr += 1
                pod = pods[d.pod_id]
                r.pod, r.claim = pod.id, len(prompt) - d.cached_tokens
                inflight[pod.id] += r.claim
                pod.admit(r)
                if not pod.busy:
                    pod.busy = True
                    push(now, "iterate", pod.id)
            elif kind == "iterate":
                pod = pods[payload]
                if not pod.queue and not pod.running:
                    pod.busy = False
                    continue
                dt, firsts, finished = pod.iterate(now)
                push(now + dt, "tokens", (pod.id, firsts, finished))
            elif kind == "tokens":
                pid, firsts, finished = payload
                for r in firsts:
                    r.first_token = now
                    inflight[pid] -= r.claim
                for r in finished:
                    done.append(r)
                    nxt = wl.follow_up(r, now)
                    if nxt is not None:
                        push(nxt[0], "arrive", nxt)
                push(now, "iterate", pid)
    finally:
        await index.close()
    return summarize(done, pods, workload, policy, n_pods, use_redis, decide_s)


def affinity(loads: list[PodLoad], w: Weights, rng: random.Random) -> Decision:
    """The baseline a prefix-affine router uses (not ours): the longest cached prefix wins and
    load only breaks ties. Here only to show what piling onto one pod costs."""
    best = max(p.cached_tokens for p in loads)
    tied = [p for p in loads if p.cached_tokens == best]
    low = min(load_cost(p, w) for p in tied)
    pick = rng.choice(sorted(p.pod_id for p in tied if load_cost(p, w) == low))
    return Decision(pick, "affinity", cached_tokens=best)


def index_records(index, pods: dict[str, Pod]) -> dict[str, dict]:
    """Load-only policies read heartbeats without a chain (the router's live_pods view)."""
    if isinstance(index, LocalIndex):
        return index.records
    raise RuntimeError("unreachable: load-only runs use a LocalIndex snapshot")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summarize(done, pods, workload, policy, n_pods, use_redis, decide_s) -> dict:
    ttft = [r.first_token - r.arrival for r in done]
    prompt = sum(len(r.prompt) for r in done)
    cached = sum(r.cached for r in done)
    reqs = max(p.requests for p in pods.values())
    computed = sum(p.computed_tokens for p in pods.values())
    return {
        "workload": workload, "policy": policy, "pods": n_pods,
        "index": "redis" if use_redis else "local", "requests": len(done),
        "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
        "ttft_mean_ms": 1e3 * statistics.fmean(ttft),
        "prefix_hit_rate": cached / prompt,
        "busiest_pod_request_share": reqs / len(done),
        "busiest_pod_computed_share": max(p.computed_tokens for p in pods.values()) / computed,
        "fair_share": 1 / n_pods,
        "sim_s": max(r.first_token for r in done),
        "decide_ms_per_request": 1e3 * decide_s / len(done),
    }


async def run_all(a) -> list[dict]:
    out = []
    for n in a.pods:
        for wl in a.workloads:
            for pol in a.policies:
                t0 = time.monotonic()
                # load-only policies need no index: their runs use the local snapshot
                idx_saved = a.index
                if pol not in ("prefix", "affinity"):
                    a.index = "local"
                res = await simulate(wl, pol, n, a)
                a.index = idx_saved
                res["wall_s"] = time.monotonic() - t0
                print(json.dumps(res), flush=True)
                out.append(res)
    return out


def plot(results: list[dict], outdir: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    files = []
    metrics = [("ttft_p99_ms", "TTFT p99 (ms, log)"), ("prefix_hit_rate", "prefix-hit rate"),
               ("busiest_pod_request_share", "busiest pod's share of requests (log)")]
    wls = sorted({r["workload"] for r in results}, key=WORKLOADS.index)
    fig, axes = plt.subplots(len(metrics), len(wls), figsize=(4.2 * len(wls), 3.2 * len(metrics)),
                             squeeze=False)
    for j, wl in enumerate(wls):
        for i, (key, label) in enumerate(metrics):
            ax = axes[i][j]
            for pol in SIM_POLICIES:
                rows = sorted((r for r in results if r["workload"] == wl and r["policy"] == pol),
                              key=lambda r: r["pods"])
                if rows:
                    ax.plot([r["pods"] for r in rows], [r[key] for r in rows], marker="o", label=pol)
            if key == "busiest_pod_request_share":
                rows = sorted({r["pods"] for r in results if r["workload"] == wl})
                ax.plot(rows, [1 / n for n in rows], "k:", label="1/pods")
            ax.set_xscale("log", base=2)
            if key != "prefix_hit_rate":
                ax.set_yscale("log")
            ax.set_xlabel("pods")
            ax.set_title(f"{wl}: {label}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = outdir / "routing-sim.png"
    fig.savefig(path, dpi=110)
    files.append(str(path))
    return files


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pods", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=SIM_POLICIES,
                    help="ours, round-robin, least-load; 'affinity' is a prefix-affine baseline")
    ap.add_argument("--queue-weight", type=float, default=Weights().queue)
    ap.add_argument("--decode-tokens-per-seq", type=float, default=Weights().decode_tokens_per_seq)
    ap.add_argument("--index", choices=("auto", "redis", "local"), default="auto",
                    help="auto: the real Redis index up to 64 pods, the local one above")
    ap.add_argument("--requests-per-pod", type=int, default=40)
    ap.add_argument("--rate-per-pod", type=float, default=8.0, help="requests/s per pod")
    ap.add_argument("--publish-s", type=float, default=0.2, help="heartbeat + KV events interval")
    ap.add_argument("--prefill-tps", type=float, default=20_000.0)
    ap.add_argument("--step-ms", type=float, default=8.0)
    ap.add_argument("--step-per-seq-ms", type=float, default=0.05)
    ap.add_argument("--step-per-kctx-ms", type=float, default=0.01)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--kv-blocks", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="8 pods, 10 requests a pod")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plots", type=Path, default=None, help="write routing-sim.png here")
    a = ap.parse_args(argv)
    if a.quick:
        a.pods, a.requests_per_pod = [8], 10
    if a.index != "local" and shutil.which("redis-server") is None and min(a.pods) <= 64:
        raise SystemExit("redis-server is not installed (or pass --index local)")
    results = asyncio.run(run_all(a))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"config": {k: (str(v) if isinstance(v, Path) else v)
                                                for k, v in vars(a).items()},
                                     "results": results}, indent=1))
    if a.plots:
        plot(results, a.plots)
    return results


if __name__ == "__main__":
    main()
