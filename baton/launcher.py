"""`baton up`: Redis, the router and pods on this machine, as child processes.

Redis is the one named by REDIS_URL / --redis-url, else a private `redis-server` on a free
port. Each service's log goes to a file in the run directory. Ctrl-C (or SIGTERM) stops
every child: SIGTERM first, SIGKILL after a grace period. If any child dies, everything
stops and its log's tail is shown.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    ready_url: str | None = None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


@dataclass
class Stack:
    run_dir: Path
    children: list[Child] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], ready_url: str | None = None, env: dict | None = None) -> Child:
        log = self.run_dir / f"{name}.log"
        f = open(log, "wb")
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)  # Ctrl-C reaches us only; we stop children in order
        f.close()
        child = Child(name, proc, log, ready_url)
        self.children.append(child)
        return child

    def wait_ready(self, child: Child, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}:\n{child.tail()}")
            try:
                with urllib.request.urlopen(child.ready_url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{child.name} not ready after {timeout_s:.0f} s (log {child.log}):\n{child.tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        for c in reversed(self.children):  # router first, Redis last
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for c in self.children:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(5)

    def watch(self) -> Child | None:
        """Block until a child exits; return it."""
        while True:
            for c in self.children:
                if c.proc.poll() is not None:
                    return c
            time.sleep(0.5)


def start_redis(stack: Stack) -> str:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("no REDIS_URL given and no redis-server on PATH (apt-get install redis-server)")
    port = free_port()
    c = stack.spawn("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                              "--dir", str(stack.run_dir)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if c.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{c.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("redis-server did not answer within 10 s")


def parse(argv):
    p = argparse.ArgumentParser(prog="baton up", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: SmolLM2, converted on first run)")
    p.add_argument("--port", type=int, default=8000, help="the router's port (the only public one)")
    p.add_argument("--host", default="127.0.0.1", help="the router's address")
    p.add_argument("--pods", type=int, default=1, help="colocated pods (prefill + decode in one)")
    p.add_argument("--prefill", type=int, default=0, help="prefill pods (disaggregated mode)")
    p.add_argument("--decode", type=int, default=0, help="decode pods (disaggregated mode)")
    p.add_argument("--devices", default="auto",
                   help="comma-separated devices given to pods in turn (e.g. cuda:0,cuda:1); auto: each pod picks")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""), help="use this Redis [env REDIS_URL]")
    p.add_argument("--policy", default="prefix", choices=["prefix", "round_robin", "least_load"])
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds each service may take to start")
    p.add_argument("--pod-arg", action="append", default=[], help="extra flag passed to every pod, e.g. --pod-arg=--block-size=32")
    args = p.parse_args(argv)
    if (args.prefill > 0) != (args.decode > 0):
        p.error("disaggregated mode needs both --prefill N and --decode M")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.model is None:
        from baton.modelzoo.smollm2 import get_model

        args.model = str(get_model("smollm2"))
    run_dir = Path(tempfile.mkdtemp(prefix="baton-up-"))
    stack = Stack(run_dir)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    py = [sys.executable, "-m", "baton.cli"]
    devices = args.devices.split(",")
    try:
        redis_url = args.redis_url or start_redis(stack)
        pods = []
        roles = ([("prefill", "prefill")] * args.prefill + [("decode", "decode")] * args.decode) if args.decode \
            else [("decode", "colocated")] * args.pods
        for i, (cmd, role) in enumerate(roles):
            port = free_port()
            argv = py + [cmd, "--model", args.model, "--port", str(port), "--redis-url", redis_url,
                         "--device", devices[i % len(devices)]] + (["--role", role] if cmd == "decode" else [])
            pods.append(stack.spawn(f"{role}-{i}", argv + args.pod_arg, f"http://127.0.0.1:{port}/ready"))
        router = stack.spawn("router", py + ["router", "--model", args.model, "--host", args.host, "--port",
                                             str(args.port), "--redis-url", redis_url, "--policy", args.policy],
                             f"http://127.0.0.1:{args.port}/ready")
        print(f"baton: starting {len(pods)} pod(s) and the router (logs in {run_dir}) ...", flush=True)
        for c in pods + [router]:
            stack.wait_ready(c, args.ready_timeout)
        print(f"baton: ready at http://{args.host}:{args.port}/v1  (model {Path(args.model).name}; Ctrl-C stops)",
              flush=True)
        dead = stack.watch()
        print(f"baton: {dead.name} exited (code {dead.proc.returncode}); stopping. Its log:\n{dead.tail()}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nbaton: stopping ...", flush=True)
        return 0
    except RuntimeError as e:
        print(f"baton up: error: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
