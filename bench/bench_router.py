"""What the router itself costs (issue 23): the router alone in front of simulated pods that take
no model time (`baton decode --engine sim`, every timing term 0), on this machine's CPU.

Two measurements, each against the pods directly (their internal NDJSON API) and through one
router process (OpenAI SSE, `/v1/completions`, stream=true), with the same requests:

  ttft   open-loop arrivals at --rate new streamed requests/s for --seconds (8 output tokens
         each): client-side time to the first token, p50/p99. "Added" is the router's figure
         minus the pods' own.
  relay  --streams concurrent long streams (--relay-tokens output tokens each): output tokens
         per second that reach the client.
  floor  the ttft load against a bare FastAPI app on the same server (baton.drain.serve,
         httptools) that validates the same request model and answers the same SSE from memory
         (the first token, then the rest with the usage and [DONE]): what the web framework
         alone costs a streamed request here, the floor under the router's CPU per request.

Processes are started as `baton up` starts them (baton.launcher: a private Redis, pods, the
router, each with its log under --out-dir), every wait has a deadline, and every process is
stopped at the end, on error too. The load generator is a separate process with a minimal
HTTP/1.1 client on raw asyncio streams (keep-alive connections, chunked bodies), so that the
client's own cost stays small and out of the router's process.

    python bench/bench_router.py --out docs/results/router_cpu.json
    python bench/bench_router.py --workers 2 ...   # `baton router --workers N`, when it exists

With --profile, the router's event-loop thread runs under cProfile during each measured phase
through the router only (SIGUSR1 starts it, SIGUSR2 writes router-<phase>.prof under --out-dir),
and each phase's top functions (own CPU time) are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baton.launcher import Stack, free_port, start_redis  # noqa: E402

TOKEN = "bench-router"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4  # ~40 tokens


# -- the load generator (its own process) ------------------------------------------------------


class Conn:
    """One keep-alive HTTP/1.1 connection; `post` returns (ttft_s, total_s, body bytes)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: str) -> tuple[float, float, bytes]:
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(self.host, self.port)
        t0 = time.perf_counter()
        self.w.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n{headers}\r\n".encode() + body)
        head = await self.r.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        lower = head.lower()
        ttft = None
        chunks = []
        if b"transfer-encoding: chunked" in lower:
            while True:
                size = int((await self.r.readuntil(b"\r\n")).split(b";")[0], 16)
                data = await self.r.readexactly(size + 2)
                if size == 0:
                    break
                if ttft is None:
                    ttft = time.perf_counter() - t0
                chunks.append(data[:-2])
        else:
            n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            chunks.append(await self.r.readexactly(n))
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {b''.join(chunks)[:300]!r}")
        total = time.perf_counter() - t0
        return ttft if ttft is not None else total, total, b"".join(chunks)


class Pool:
    """Keep-alive connections per target, the most recently used first; one idle past IDLE_S
    is closed rather than reused (the server's keep-alive, uvicorn's 5 s, may be closing it
    just then: the request would meet a closed connection)."""

    IDLE_S = 4.0

    def __init__(self, targets: list[tuple[str, int]]):
        self.targets, self.free, self.turn = targets, {t: [] for t in targets}, 0

    async def post(self, path: str, body: bytes, headers: str, target=None):
        if target is None:
            target = self.targets[self.turn % len(self.targets)]
            self.turn += 1
        free = self.free[target]
        now = time.monotonic()
        while free and now - free[0][0] > self.IDLE_S:  # the oldest idle ones are at the bottom
            _, old = free.pop(0)
            if old.w is not None:
                old.w.close()
        conn = free.pop()[1] if free else Conn(*target)
        try:
            out = await conn.post(path, body, headers)
        except BaseException:
            if conn.w is not None:
                conn.w.close()
            raise
        free.append((time.monotonic(), conn))
        return out


def _request(kind: str, i: int, max_tokens: int, model: str, prompt_ids: list[int]) -> tuple[str, bytes]:
    if kind == "router":
        return "/v1/completions", json.dumps({
            # no temperature: the API's default, what users send (the sim's tokens ignore it anyway)
            "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()
    return "/internal/generate", json.dumps({
        "request_id": f"b{os.getpid()}-{i}-{time.monotonic_ns()}", "prompt_token_ids": prompt_ids,
        "sampling": {"max_tokens": max_tokens, "ignore_eos": True}}).encode()


def _count_tokens(kind: str, body: bytes) -> int:
    if kind == "router":  # the usage chunk at the end (stream_options.include_usage)
        for line in reversed(body.split(b"\n")):
            if line.startswith(b"data: {") and b'"usage":{' in line.replace(b" ", b""):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    return usage["completion_tokens"]
        raise RuntimeError(f"no usage in the stream: {body[-300:]!r}")
    return sum(len(json.loads(x)["token_ids"]) for x in body.split(b"\n") if x.strip())


async def _ttft_load(kind, targets, model, prompt_ids, rate, seconds, max_tokens) -> dict:
    pool = Pool(targets)
    headers = f"X-Baton-Token: {TOKEN}\r\n" if kind == "pods" else "Authorization: Bearer x\r\n"
    ttfts, errors, late = [], [], 0
    tasks = []

    async def one(i):
        path, body = _request(kind, i, max_tokens, model, prompt_ids)
        try:
            ttft, _, data = await asyncio.wait_for(pool.post(path, body, headers), 30)
            if _count_tokens(kind, data) != max_tokens:
                raise RuntimeError("short stream")
            ttfts.append(ttft)
        except Exception as e:  # counted and reported, not hidden
            errors.append(repr(e)[:200])

    t0 = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            late += 1  # the generator itself fell behind: the rate was not offered on time
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.wait(tasks, timeout=60)
    wall = time.perf_counter() - t0
    ttfts.sort()
    q = lambda p: round(ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))] * 1000, 3) if ttfts else None
    return {"requests": n, "ok": len(ttfts), "errors": len(errors), "first_errors": errors[:3],
            "offered_rate": rate, "achieved_rate": round(len(ttfts) / wall, 1), "late_sends": late,
            "ttft_ms_p50": q(0.5), "ttft_ms_p90": q(0.9), "ttft_ms_p99": q(0.99),
            "ttft_ms_mean": round(statistics.fmean(ttfts) * 1000, 3) if ttfts else None}


async def _relay_load(kind, targets, model, prompt_ids, streams, tokens) -> dict:
    pool = Pool(targets)
    headers = f"X-Baton-Token: {TOKEN}\r\n" if kind == "pods" else "Authorization: Bearer x\r\n"
    t0 = time.perf_counter()

    async def one(i):
        path, body = _request(kind, i, tokens, model, prompt_ids)
        _, _, data = await asyncio.wait_for(pool.post(path, body, headers), 300)
        return _count_tokens(kind, data)

    got = await asyncio.gather(*(one(i) for i in range(streams)))
    wall = time.perf_counter() - t0
    return {"streams": streams, "tokens": sum(got), "seconds": round(wall, 3),
            "tokens_per_s": round(sum(got) / wall, 1)}


def _client(conn, what: str, kw: dict) -> None:
    fn = _ttft_load if what == "ttft" else _relay_load
    try:
        conn.send(asyncio.run(fn(**kw)))
    except BaseException as e:
        conn.send({"error": repr(e)})


def run_client(what: str, **kw) -> dict:
    """The load in a separate process (spawned: nothing of this process's state)."""
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_client, args=(b, what, kw))
    p.start()
    if not a.poll(600):
        p.kill()
        raise RuntimeError(f"the {what} client gave no result within 600 s")
    out = a.recv()
    p.join(30)
    if "error" in out:
        raise RuntimeError(f"the {what} client failed: {out['error']}")
    return out


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process and its children (router workers)
    have used: what a request costs the router whatever else shares the machine's cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(cpu_s(int(c)) for c in children)


def _cpu(pids: int | tuple[int, ...]) -> float:
    return sum(cpu_s(p) for p in pids) if isinstance(pids, tuple) else cpu_s(pids)


def redis_counts(url: str | None) -> dict[str, int]:
    """Redis's own counters: connections accepted, commands run, EVALSHA calls (the index's
    scripts: the router's lookups and registry reads, the pods' events)."""
    if url is None:
        return {}
    import redis

    r = redis.Redis.from_url(url)
    try:
        stats, cmds = r.info("stats"), r.info("commandstats")
    finally:
        r.close()
    return {"connections": stats["total_connections_received"], "commands": stats["total_commands_processed"],
            "evalsha": cmds.get("cmdstat_evalsha", {}).get("calls", 0),
            "evalsha_us": cmds.get("cmdstat_evalsha", {}).get("usec", 0)}


def measured(what: str, procs: dict[str, int], units: int, unit: str, profile: int = 0,
             redis_url: str | None = None, **kw) -> dict:
    """run_client, and the CPU each process in `procs` spent per unit (request or token).
    `profile`: the pid of a router started with --profile, profiled during this phase only;
    `redis_url`: the Redis whose counters' growth over the phase is reported too."""
    before = {k: _cpu(pid) for k, pid in procs.items()}
    counts = redis_counts(redis_url)
    if profile:
        os.kill(profile, signal.SIGUSR1)
    try:
        out = run_client(what, **kw)
    finally:
        if profile:
            os.kill(profile, signal.SIGUSR2)
            time.sleep(1)  # the dump
    for k, pid in procs.items():
        used = _cpu(pid) - before[k]
        out[f"{k}_cpu_s"] = round(used, 3)
        out[f"{k}_cpu_us_per_{unit}"] = round(used / max(1, units) * 1e6, 1)
    if counts:
        out["redis"] = {k: v - counts[k] for k, v in redis_counts(redis_url).items()}
    return out


# -- the system under test -------------------------------------------------------------------------


def serve_floor(port: int) -> None:
    """The floor phase's server: FastAPI, the router's request model, SSE from memory."""
    from fastapi import FastAPI

    from baton.drain import Drain, StreamingResponse, serve
    from baton.router.protocol import CompletionRequest

    app = FastAPI()

    @app.get("/ready")
    async def ready():
        return {"ready": True}

    async def completions(req):
        n = req.max_tokens

        async def body():
            yield 'data: {"choices": [{"index": 0, "text": " t0", "finish_reason": null}]}\n\n'
            yield "".join([f'data: {{"choices": [{{"index": 0, "text": " t{i}", "finish_reason": null}}]}}\n\n'
                           for i in range(1, n)] + [
                f'data: {{"choices": [], "usage": {{"completion_tokens": {n}}}}}\n\ndata: [DONE]\n\n'])

        return StreamingResponse(body(), media_type="text/event-stream", watch_client=False)

    completions.__annotations__["req"] = CompletionRequest  # this module's annotations are strings
    app.post("/v1/completions")(completions)
    serve(app, Drain(), host="127.0.0.1", port=port, log_level="warning")


def start(stack: Stack, args, model: str) -> tuple[list[tuple[str, int]], tuple[str, int]]:
    from bench.bench_serving import use_redis

    py = [sys.executable, "-m", "baton.cli"]
    use_redis("auto")  # the installed redis-server, else the bundle (bench/bundle_redis.sh)
    redis_url = start_redis(stack)
    # the Redis password and the token through the environment, not argv (`ps` shows argv)
    secrets = {"BATON_REDIS_URL": redis_url, "BATON_INTERNAL_TOKEN": TOKEN}
    pods = []
    for i in range(args.pods):
        port = free_port()
        argv = py + ["decode", "--engine", "sim", "--model", model, "--port", str(port),
                     "--log-level", "warning", "--max-num-seqs", "1024",
                     "--num-kv-blocks", "16384", "--pod-id", f"sim-{i}"] + args.pod_arg
        pods.append((stack.spawn(f"pod-{i}", argv, f"http://127.0.0.1:{port}/ready", env=secrets), port))
    for child, _ in pods:
        stack.wait_ready(child, 120)
    rport = free_port()
    argv = py + ["router", "--model", model, "--port", str(rport), "--log-level", "warning"] + args.router_arg
    if args.profile:
        # the event loop's thread (signal handlers run there), in CPU time: wall time on a
        # shared machine says little. Each USR1..USR2 span is one phase's file.
        code = ("import cProfile, itertools, signal, sys, time; from baton.cli import main; "
                "p = [None]; n = itertools.count(); "
                "signal.signal(signal.SIGUSR1, lambda *a: (p.__setitem__(0, cProfile.Profile(time.thread_time)), "
                "p[0].enable())); "
                "signal.signal(signal.SIGUSR2, lambda *a: (p[0].disable(), "
                f"p[0].dump_stats({str(args.out_dir)!r} + f'/router-{{next(n)}}.prof'))); "
                "sys.exit(main(sys.argv[1:]))")
        argv = [sys.executable, "-c", code] + argv[3:]
    env = secrets | dict(kv.split("=", 1) for kv in args.router_env)
    router = stack.spawn("router", argv, f"http://127.0.0.1:{rport}/ready", env=env, stop_group=-1)
    stack.wait_ready(router, 120)
    args.redis_url = redis_url
    return [("127.0.0.1", p) for _, p in pods], ("127.0.0.1", rport), router.proc.pid, [c.proc.pid for c, _ in pods]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pods", type=int, default=2)
    p.add_argument("--rate", type=float, default=1000.0, help="new streamed requests per second (ttft)")
    p.add_argument("--seconds", type=float, default=5.0, help="length of the ttft load")
    p.add_argument("--ttft-tokens", type=int, default=8, help="output tokens per request in the ttft load")
    p.add_argument("--streams", type=int, default=32, help="concurrent streams (relay)")
    p.add_argument("--relay-tokens", type=int, default=2000, help="output tokens per stream (relay)")
    p.add_argument("--skip", default="", help="comma-separated: ttft, relay, pods (the direct baselines), floor")
    p.add_argument("--router-arg", action="append", default=[], help="extra router flag, e.g. --router-arg=--workers=2")
    p.add_argument("--pod-arg", action="append", default=[],
                   help="extra pod flag, e.g. --pod-arg=--sim-decode-step-s=0.005 (frames of one token)")
    p.add_argument("--router-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment of the router process only, e.g. PYTHONPATH=<dir with uvloop, httptools>")
    p.add_argument("--profile", action="store_true", help="run the router under cProfile; print its top functions")
    p.add_argument("--out", type=Path, default=None, help="write the results' JSON here")
    p.add_argument("--out-dir", type=Path, default=None, help="logs (default: a temporary directory)")
    p.add_argument("--model", default=None, help="model dir (config and tokenizer; sim pods load no "
                   "weights), default SmolLM2 (converted on first use)")
    p.add_argument("--serve-floor", type=int, default=0, help=argparse.SUPPRESS)  # the floor's server
    args = p.parse_args(argv)
    if args.serve_floor:
        serve_floor(args.serve_floor)
        return 0
    skip = set(filter(None, args.skip.split(",")))
    args.out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="bench-router-"))
    args.out_dir.mkdir(parents=True, exist_ok=True)

    from baton.engine.tokenizer import Tokenizer
    from baton.modelzoo.smollm2 import get_model

    model = args.model or str(get_model("smollm2"))
    prompt_ids = Tokenizer(model).encode(PROMPT, False)
    stack = Stack(args.out_dir)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_at_start": os.getloadavg()},
              "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        pods, router, router_pid, pod_pids = start(stack, args, model)
        # through the router, what the pods behind it spend too (all of them, per unit of the whole load)
        procs = {"router": router_pid, "pods": tuple(pod_pids)}
        prof = args.profile
        n_ttft = int(args.rate * args.seconds)
        n_relay = args.streams * args.relay_tokens
        name = Path(model).name
        common = dict(model=name, prompt_ids=prompt_ids)
        # warm up both paths (connections, the router's first tokenization, the pods' caches)
        run_client("ttft", kind="router", targets=[router], rate=50, seconds=1, max_tokens=4, **common)
        if "ttft" not in skip:
            if "pods" not in skip:
                result["ttft_pods"] = measured("ttft", {"pods": pod_pids[0]}, n_ttft // len(pods), "request",
                                               kind="pods", targets=pods, rate=args.rate, seconds=args.seconds,
                                               max_tokens=args.ttft_tokens, **common)
                print("pods  ", result["ttft_pods"], flush=True)
            result["ttft_router"] = measured("ttft", procs, n_ttft, "request", profile=prof and router_pid,
                                             redis_url=args.redis_url,
                                             kind="router", targets=[router],
                                             rate=args.rate, seconds=args.seconds, max_tokens=args.ttft_tokens,
                                             **common)
            print("router", result["ttft_router"], flush=True)
            if "ttft_pods" in result:
                a, b = result["ttft_router"], result["ttft_pods"]
                result["added_ttft_ms"] = {k: round(a[f"ttft_ms_{k}"] - b[f"ttft_ms_{k}"], 3)
                                           for k in ("p50", "p99") if a[f"ttft_ms_{k}"] and b[f"ttft_ms_{k}"]}
                print("added TTFT ms", result["added_ttft_ms"], flush=True)
        if "floor" not in skip:
            fport = free_port()
            floor = stack.spawn("floor", [sys.executable, str(Path(__file__).resolve()), "--serve-floor",
                                          str(fport)], f"http://127.0.0.1:{fport}/ready")
            stack.wait_ready(floor, 120)
            run_client("ttft", kind="router", targets=[("127.0.0.1", fport)], rate=50, seconds=1, max_tokens=4,
                       **common)
            result["ttft_floor"] = measured("ttft", {"floor": floor.proc.pid}, n_ttft, "request",
                                            kind="router", targets=[("127.0.0.1", fport)], rate=args.rate,
                                            seconds=args.seconds, max_tokens=args.ttft_tokens, **common)
            print("floor ", result["ttft_floor"], flush=True)
        if "relay" not in skip:
            if "pods" not in skip:
                result["relay_pods"] = measured("relay", {"pods": pod_pids[0]}, n_relay // len(pods), "token",
                                                kind="pods", targets=pods, streams=args.streams,
                                                tokens=args.relay_tokens, **common)
                print("relay pods  ", result["relay_pods"], flush=True)
            result["relay_router"] = measured("relay", procs, n_relay, "token", profile=prof and router_pid,
                                              kind="router", targets=[router],
                                              streams=args.streams, tokens=args.relay_tokens, **common)
            print("relay router", result["relay_router"], flush=True)
        # what one router process could take with a core of its own, from its CPU per unit
        if "ttft_router" in result:
            result["router_capacity_requests_per_s"] = round(1e6 / result["ttft_router"]["router_cpu_us_per_request"])
        if "relay_router" in result:
            result["router_capacity_tokens_per_s"] = round(1e6 / result["relay_router"]["router_cpu_us_per_token"])
    finally:
        stack.stop(grace_s=15)
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    if args.profile:
        import pstats

        for f in sorted(args.out_dir.glob("router-*.prof")):
            print(f"== {f} (phases in order: ttft, relay; those not skipped)")
            pstats.Stats(str(f)).sort_stats("tottime").print_stats(45)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
