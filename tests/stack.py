"""Real services as processes for end-to-end tests: pods and routers started exactly as
`baton up` starts them (`python -m baton.cli ...`), on loopback, with a real Redis, and what
the tests read back from them (metrics, transfer stats, idleness).

    with ServiceStack(tmp_path) as st:
        s = st.serve(model, roles=("colocated", "colocated"))  # Redis, two pods, a router
        s.client.chat.completions.create(model=s.model, ...)   # the official client
        s.pods[0].metric("baton_pod_requests_total", status="abort")
        wait_idle(*s.pods, s.router)                           # nothing held anywhere
        st.kill(s.pods[0])                                     # SIGKILL, as a crash
Every service's log is in tmp_path; a service that fails to start raises with its log tail.

Every process a test starts goes through `launch` and `wait_started` (the services above, a
throwaway Redis, the bench's stack, the deployment files' commands), and every test that
polls uses `wait_for`.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import httpx
import openai
import redis

from baton.kvindex import schema
from baton.kvindex.hashing import block_hashes
from baton.launcher import Child, Stack, free_port  # tests take free_port from here

# The services import the baton of this checkout, whatever the working directory and whatever
# an editable install elsewhere points at.
ROOT = Path(__file__).resolve().parents[1]

# What a service holds while it works, and must give back: each figure is 0 when it is idle.
POD_LOAD = (
    "baton_pod_open_requests",
    "baton_pod_kv_blocks_used",  # referenced by live sequences; cached blocks do not count
    "baton_pod_running_requests",
    "baton_pod_waiting_requests",
)
TRANSFER_LOAD = (  # /internal/transfer_stats: a decode pod's receiver, a prefill pod's sender
    "active_reservations",
    "pending_recvs",
    "staging_bytes_in_use",
    "active_transfers",
    "inflight_bytes",
    "inflight_messages",
)
ROUTER_LOAD = ("baton_router_in_flight_requests",)


# -- starting processes ---------------------------------------------------------------------------


def launch(stack: Stack, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
    """Start `argv` (its log in the stack's directory) with this checkout's baton importable and
    no proxy between it and loopback."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    loopback = "127.0.0.1,localhost"
    base = {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "NO_PROXY": loopback, "no_proxy": loopback}
    return stack.spawn(name, argv, env=base | (env or {}))


def wait_started(child: Child, ready: Callable[[], bool], timeout_s: float) -> None:
    """Until ready() says so; raises with the log's tail if the child exits or time runs out."""

    def up() -> bool:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}:\n{child.tail()}")
        return ready()

    try:
        wait_for(up, f"{child.name} ready", timeout_s, interval_s=0.1)
    except AssertionError:
        raise RuntimeError(
            f"{child.name} not ready after {timeout_s:.0f} s (log {child.log}):\n{child.tail()}"
        ) from None


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness check: GET url answers 200."""

    def ok() -> bool:
        try:
            return httpx.get(url, timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    return ok


class RedisServer:
    """A throwaway `redis-server` on a loopback port. `stop()` then `start()` again (same port,
    data gone) is how tests simulate an outage."""

    def __init__(self, workdir: str | Path, port: int | None = None):
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self._stack: Stack | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stack = Stack(self.workdir)
        argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--save", "", "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"]
        child = launch(self._stack, "redis", argv)
        try:
            wait_started(child, self._answers, timeout_s)
        except RuntimeError:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._stack is not None:
            self._stack.stop(grace_s=timeout_s)
            self._stack = None

    def restart(self) -> None:
        self.stop()
        self.start()


# -- Baton's services -----------------------------------------------------------------------------


@dataclass
class Service:
    child: Child | None  # None: started by `baton up` (BatonUp), not by this process
    url: str
    port: int
    role: str = "colocated"  # router, colocated, decode or prefill
    headers: dict[str, str] | None = None  # sent with every get (BatonUp: its internal token)

    def get(self, path: str, **kw) -> httpx.Response:
        kw.setdefault("headers", self.headers)
        return httpx.get(self.url + path, timeout=10, trust_env=False, **kw)

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics as name -> value (labelled ones as name{labels})."""
        out = {}
        for line in self.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric(self, name: str, **labels) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
        total = 0.0
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    def transfer_stats(self) -> dict:
        return self.get("/internal/transfer_stats").json()

    def pod_id(self) -> str:
        return self.get("/ready").json()["pod_id"]

    def client(self, timeout_s: float = 60) -> openai.OpenAI:
        """The official client on this router (no retries: each call is one request)."""
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=timeout_s
        )


@dataclass
class Served:
    """A Redis, pods and a router over them (ServiceStack.serve, or BatonUp.served)."""

    redis: RedisServer | None  # None: `baton up`'s own
    pods: list[Service]
    router: Service
    client: openai.OpenAI
    model: str  # the name the router serves the model under


class ServiceStack:
    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stack = Stack(self.workdir)
        self._redis: list[RedisServer] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """SIGKILL every service's process group: a test that means an orderly stop (drain,
        deregistration) does it itself (terminate); a teardown's SIGTERM proved nothing and cost
        the pods' drain, ~2 s on an idle machine and 5-8 s on 2 loaded cores, per stack."""
        for c in self.stack.children:
            if c.proc.poll() is None:
                try:
                    os.killpg(c.proc.pid, signal.SIGKILL)  # its own session (Stack.spawn)
                except ProcessLookupError:
                    pass
        for c in self.stack.children:
            c.proc.wait(10)
        for r in self._redis:
            r.stop()

    def redis(self) -> RedisServer:
        r = RedisServer(self.workdir / f"redis{len(self._redis)}").start()
        self._redis.append(r)
        return r

    def spawn(self, name: str, argv: list[str], port: int, role: str, timeout_s: float) -> Service:
        """`python argv...` as a service answering on `port`; returns once /ready says 200."""
        url = f"http://127.0.0.1:{port}"
        child = launch(self.stack, name, [sys.executable] + argv)
        wait_started(child, http_ok(url + "/ready"), timeout_s)
        return Service(child, url, port, role)

    def pod(
        self, kind: str, model, name: str | None = None, timeout_s: float = 120, **settings
    ) -> Service:
        """kind: decode (role colocated unless role= says decode) or prefill. settings:
        any pod setting as a keyword (block_size=8 -> --block-size 8)."""
        port = settings.pop("port", None) or free_port()
        settings.setdefault("device", "cpu")
        role = "prefill" if kind == "prefill" else settings.get("role", "colocated")
        if role == "decode":
            settings.setdefault("ucx_port", 0)
        argv = ["-m", "baton.cli", kind, "--model", str(model), "--port", str(port)]
        argv += _flags(settings)
        return self.spawn(name or f"{kind}-{port}", argv, port, role, timeout_s)

    def pods(self, model, roles, **settings) -> list[Service]:
        """Pods of the given roles (colocated, decode, prefill), started at once: a start is
        mostly the model's load, so two pods take about as long as one."""

        def start(role: str) -> Service:
            if role == "prefill":
                return self.pod("prefill", model, **settings)
            return self.pod(
                "decode", model, **({"role": "decode"} if role == "decode" else {}), **settings
            )

        with ThreadPoolExecutor(len(roles)) as ex:
            return list(ex.map(start, roles))

    def router(self, model, name: str | None = None, timeout_s: float = 60, **settings) -> Service:
        port = settings.pop("port", None) or free_port()
        argv = ["-m", "baton.cli", "router", "--model", str(model)]
        argv += ["--host", "127.0.0.1", "--port", str(port)] + _flags(settings)
        return self.spawn(name or f"router-{port}", argv, port, "router", timeout_s)

    def serve(
        self,
        model,
        roles=("colocated", "colocated"),
        timeout_s: float = 60,
        router_settings: dict | None = None,
        **pod_settings,
    ) -> Served:
        """A Redis, pods of `roles` on it (pod_settings for each) and a router over them; the
        client's calls time out after timeout_s."""
        rs = self.redis()
        pods = self.pods(model, roles, redis_url=rs.url, **pod_settings)
        router = self.router(model, redis_url=rs.url, **(router_settings or {}))
        client = router.client(timeout_s)
        return Served(rs, pods, router, client, client.models.list().data[0].id)

    def kill(self, svc: Service) -> None:
        """Crash a service (SIGKILL: no clean-up, no deregistration)."""
        svc.child.proc.send_signal(signal.SIGKILL)
        svc.child.proc.wait(10)

    def terminate(self, svc: Service, timeout_s: float = 30) -> int:
        svc.child.proc.send_signal(signal.SIGTERM)
        return svc.child.proc.wait(timeout_s)


class BatonUp:
    """`python -m baton.cli up --port 0 FLAGS...` as a user starts it (its log in workdir), once
    it says it is ready: its pods and router as Services, carrying the internal token it made
    (read from the router's environment under /proc, as its user could). `kill()` is SIGKILL,
    as a crash: its children must follow it (they die with their parent)."""

    def __init__(self, workdir: str | Path, flags: tuple[str, ...] = (), timeout_s: float = 240):
        self._stack = Stack(Path(workdir))
        self.child = launch(self._stack, "up", [sys.executable, "-m", "baton.cli", "up", "--port", "0", *flags])
        ready = re.compile(r"ready at (http://\S+)/v1")
        wait_started(self.child, lambda: ready.search(self.child.log.read_text(errors="replace")), timeout_s)
        text = self.child.log.read_text(errors="replace")
        self.url = ready.search(text).group(1).replace("0.0.0.0", "127.0.0.1")
        self.run_dir = Path(re.search(r"logs in (\S+)\)", text).group(1))
        self.kids = children_of(self.child.proc.pid)
        (router_pid,) = [p for p, a in self.kids.items() if "baton.cli" in a and "router" in a]
        auth = {"X-Baton-Token": environ_of(router_pid)["BATON_INTERNAL_TOKEN"]}
        self.pods: list[Service] = []
        for argv in self.kids.values():
            if "baton.cli" in argv and argv[argv.index("baton.cli") + 1] in ("decode", "prefill"):
                port = int(argv[argv.index("--port") + 1])
                role = argv[argv.index("--role") + 1] if "--role" in argv else "prefill"
                self.pods.append(Service(None, f"http://127.0.0.1:{port}", port, role, auth))
        self.router = Service(None, self.url, int(self.url.rsplit(":", 1)[1]), "router", auth)

    def served(self, timeout_s: float = 60) -> Served:
        client = self.router.client(timeout_s)
        return Served(None, self.pods, self.router, client, client.models.list().data[0].id)

    def kill(self) -> None:
        """SIGKILL `baton up`; fails unless every process it started is gone within 10 s."""
        self.child.proc.kill()
        self.child.proc.wait(10)
        wait_for(lambda: not any(alive(p) for p in self.kids), "every child of baton up gone", 10)


def children_of(pid: int) -> dict[int, list[str]]:
    """pid -> argv of each process whose parent is `pid`."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out[int(d.name)] = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except (OSError, ValueError, IndexError):
                pass
    return out


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


# -- what tests wait for --------------------------------------------------------------------------


def wait_for(fn, what: str, timeout_s: float = 20.0, interval_s: float = 0.05):
    """fn()'s first truthy value, polled (at least once); fails the test with `what` after
    timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.1f} s (last: {last!r})")
        time.sleep(interval_s)


async def wait_for_async(
    fn: Callable[[], Awaitable], what: str, timeout_s: float = 20.0, interval_s: float = 0.05
):
    """wait_for on an event loop, for a condition that must be awaited."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = await fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.1f} s (last: {last!r})")
        await asyncio.sleep(interval_s)


def busy(svc: Service) -> dict[str, float]:
    """What a service still holds: the figures of POD_LOAD and TRANSFER_LOAD (a pod) or
    ROUTER_LOAD (a router) that are not 0."""
    m = svc.metrics()
    if svc.role == "router":
        held = {k: m[k] for k in ROUTER_LOAD}
    else:
        s = svc.transfer_stats()
        held = {k: m[k] for k in POD_LOAD} | {k: s[k] for k in TRANSFER_LOAD if k in s}
    return {k: v for k, v in held.items() if v}


def wait_idle(*services: Service, timeout_s: float = 10.0, allow: tuple[str, ...] = ()) -> float:
    """Seconds until no service holds anything (busy() empty for each, but for the figures
    named in `allow`); fails at the deadline with what each still holds."""
    t0 = time.monotonic()
    try:
        wait_for(lambda: not any(set(busy(s)) - set(allow) for s in services), "idle", timeout_s)
    except AssertionError:
        held = {f"{s.role} {s.url}": busy(s) for s in services}
        raise AssertionError(f"not idle within {timeout_s} s; still held: {held}") from None
    return time.monotonic() - t0


def warm(pod: Service, prefix: list[int]) -> None:
    """Cache `prefix` on a colocated or decode pod alone, no router involved: it prefills
    prefix + one token itself and generates one token."""
    body = {
        "request_id": f"warm-{time.monotonic_ns()}",
        "prompt_token_ids": prefix + [7],
        "sampling": {"max_tokens": 1, "temperature": 0},
    }
    r = httpx.post(pod.url + "/internal/generate", json=body, timeout=60, trust_env=False)
    assert r.status_code == 200 and '"finish_reason": "length"' in r.text, r.text


def index_hits(redis_url: str, seed: bytes, ids: list[int], block_size: int = 16) -> dict[str, int]:
    """pod id -> how many leading full blocks of `ids` the KV index in Redis says it holds
    (what a router's lookup reads, heartbeats aside)."""
    chain = block_hashes(ids, block_size, seed)
    r = redis.Redis.from_url(redis_url, socket_timeout=2)
    try:
        pipe = r.pipeline()
        for h in chain:
            pipe.smembers(schema.blk_key(schema.DEFAULT_PREFIX, h))
        holders = [{m.decode() for m in members} for members in pipe.execute()]
    finally:
        r.close()
    hits: dict[str, int] = {}
    for pod in set().union(*holders):
        hits[pod] = next((i for i, held in enumerate(holders) if pod not in held), len(holders))
    return hits
