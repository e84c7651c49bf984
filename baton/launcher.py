"""`baton up`: Redis, the router and pods on this machine, as child processes, supervised.

Redis is the one named by REDIS_URL / --redis-url, else a private `redis-server` on a free
port. Every listener gets a free port (pods' HTTP, decode pods' UCX, Redis); pods publish
theirs in the registry. Each service's log goes to a file in the run directory.

Secrets (docs/SECURITY.md): the internal token (BATON_INTERNAL_TOKEN if set, else a fresh
one) and the private Redis's password are generated here and reach the children through
their environment (BATON_INTERNAL_TOKEN, BATON_REDIS_URL), never their argv, so `ps` does not
show them; redis-server reads its configuration, `requirepass` included, from its stdin.

Supervision: a child that exits (a pod whose start-up failed, a crash) is noticed within a
fraction of a second, named, its log's tail shown, the rest stopped, and `baton up` exits 1.
Ctrl-C or SIGTERM (foreground or background) stops everything in order: the router, then
the pods (they drain and leave the registry), then Redis, which they need to leave it; a
second signal kills what is left at once. Children die with `baton up` whatever kills it
(SIGKILL, the OOM killer, a CI timeout): on Linux each is started with a parent-death signal.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import secrets
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

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ROUTER_GROUP, POD_GROUP, REDIS_GROUP = 0, 1, 2  # the order `baton up` stops them in

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """A preexec_fn that makes the child get SIGKILL when its parent dies (Linux), or None.

    The signal follows the thread that forked the child, not the process: spawn from a
    thread that lives as long as the supervisor (`baton up` spawns from its main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    ready_url: str | None = None
    stop_group: int = 0  # Stack.stop stops lower groups first, each before the next

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def answers(self, timeout_s: float = 0.5) -> bool:
        """Its ready URL says 200 now."""
        try:
            with urllib.request.urlopen(self.ready_url, timeout=timeout_s) as r:
                return r.status == 200
        except OSError:
            return False


@dataclass
class Stack:
    run_dir: Path
    children: list[Child] = field(default_factory=list)
    die_with_parent: bool = False  # children get SIGKILL when the spawning thread ends (Linux)

    def spawn(self, name: str, argv: list[str], ready_url: str | None = None, env: dict | None = None,
              stop_group: int = 0, stdin: bytes | None = None) -> Child:
        log = self.run_dir / f"{name}.log"
        f = open(log, "wb")
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                stdin=None if stdin is None else subprocess.PIPE,
                                start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
                                preexec_fn=_die_with_parent() if self.die_with_parent else None)
        f.close()
        if stdin is not None:  # e.g. a configuration with a password, kept out of argv
            proc.stdin.write(stdin)
            proc.stdin.close()
        child = Child(name, proc, log, ready_url, stop_group)
        self.children.append(child)
        return child

    def wait_ready(self, child: Child, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}:\n{child.tail()}")
            if child.answers(2):
                return
            time.sleep(0.3)
        raise RuntimeError(f"{child.name} not ready after {timeout_s:.0f} s (log {child.log}):\n{child.tail()}")

    def dead(self) -> Child | None:
        """A child that has exited, if any."""
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM each stop group in turn (lowest first), SIGKILL what outlives `grace_s`."""
        for group in sorted({c.stop_group for c in self.children}):
            members = [c for c in self.children if c.stop_group == group]
            for c in reversed(members):
                if c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for c in members:
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait(5)

    def kill(self) -> None:
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.kill()

    def watch(self) -> Child | None:
        """Block until a child exits; return it."""
        while True:
            dead = self.dead()
            if dead is not None:
                return dead
            time.sleep(0.5)


def start_redis(stack: Stack) -> str:
    """A private redis-server with a fresh password; its URL (password included)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("no REDIS_URL given and no redis-server on PATH (apt-get install redis-server)")
    port = free_port()
    password = secrets.token_urlsafe(32)  # URL-safe: it goes into the URL as it is
    config = (f"port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\ndir \"{stack.run_dir}\"\n"
              f"requirepass {password}\n")
    # "-": the configuration from stdin, so the password is in no argv (ps) and no file.
    # The last group to stop: pods leave the registry as they stop, and need Redis for it.
    c = stack.spawn("redis", [exe, "-"], stop_group=REDIS_GROUP, stdin=config.encode())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if c.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{c.tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"AUTH {password}\r\nPING\r\n".encode())
                if b"+PONG" in s.recv(64):
                    return f"redis://:{password}@127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("redis-server did not answer within 10 s")


def parse(argv):
    from baton.settings import DefaultsHelpFormatter

    p = argparse.ArgumentParser(prog="baton up", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter,
                                epilog="The router and the pods also read their BATON_* environment variables "
                                       "from this environment: `baton router --help`, `baton decode --help`, "
                                       "`baton prefill --help` list them with their defaults.")
    p.add_argument("--model", default=None,
                   help="model directory or Hugging Face repo id (default: SmolLM2, converted on first run)")
    p.add_argument("--port", type=int, default=8000, help="the router's port (the only public one); 0: any free")
    p.add_argument("--host", default="127.0.0.1", help="the router's address")
    p.add_argument("--pods", type=int, default=1, help="colocated pods (prefill + decode in one)")
    p.add_argument("--prefill", type=int, default=0, help="prefill pods (disaggregated mode)")
    p.add_argument("--decode", type=int, default=0, help="decode pods (disaggregated mode)")
    p.add_argument("--devices", default="auto",
                   help="comma-separated devices given to pods in turn (e.g. cuda:0,cuda:1); auto: each pod picks")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""), help="use this Redis (default: a private redis-server on a free port) [env REDIS_URL]")
    p.add_argument("--policy", default="prefix", choices=["prefix", "round_robin", "least_load"],
                   help="how the router picks pods")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds each service may take to start")
    p.add_argument("--stop-timeout", type=float, default=35.0,
                   help="seconds the router, then the pods, may take to drain before they are killed")
    p.add_argument("--pod-arg", action="append", default=[],
                   help="extra flag passed to every pod, e.g. --pod-arg=--block-size=32; repeatable (default: none)")
    # The router's, passed on when given (SUPPRESS: no "default: None"; unset, the router
    # takes its own default or its BATON_* variable from this environment).
    p.add_argument("--default-sampling", default=argparse.SUPPRESS, metavar="JSON",
                   help="the router's sampling defaults for fields a request omits, over the model's "
                        "generation_config.json, e.g. '{\"temperature\": 0.2}' (default: the model's) "
                        "[env BATON_DEFAULT_SAMPLING]")
    p.add_argument("--default-max-tokens", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="the router's max_tokens for a chat request that gives none; 0: all the room left "
                        "(default: 1024) [env BATON_DEFAULT_MAX_TOKENS]")
    args = p.parse_args(argv)
    if (args.prefill > 0) != (args.decode > 0):
        p.error("disaggregated mode needs both --prefill N and --decode M")
    return args


class Stopped(Exception):
    """SIGINT or SIGTERM asked `baton up` to stop."""


class Signals:
    """SIGINT and SIGTERM both ask for a stop; a second one kills every child at once.

    Installed explicitly for SIGINT too: a shell that is not interactive starts a background
    job (`baton up &` in a script) with SIGINT ignored, and Python keeps it ignored.
    """

    def __init__(self, stack: Stack):
        self.stack, self.received = stack, 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

        self.stopping = False  # set once the stack is being stopped, for whatever reason

    def _on_signal(self, signum, frame) -> None:
        self.received += 1
        if self.received > 1 or self.stopping:
            self.stack.kill()

    def check(self) -> None:
        if self.received:
            raise Stopped


def supervise(stack: Stack, signals: Signals, ready: list[Child] = (), timeout_s: float | None = None) -> None:
    """Until every child in `ready` answers (none: until a signal); raises RuntimeError naming a
    child that exits (with its log's tail) or one not ready within `timeout_s`."""
    waiting = list(ready)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        signals.check()
        dead = stack.dead()
        if dead is not None:
            raise RuntimeError(f"{dead.name} exited with code {dead.proc.returncode}; "
                               f"the end of its log ({dead.log}):\n{dead.tail()}")
        waiting = [c for c in waiting if not c.answers()]
        if ready and not waiting:
            return
        if deadline is not None and time.monotonic() > deadline:
            names = ", ".join(c.name for c in waiting)
            raise RuntimeError(f"{names} not ready after {timeout_s:.0f} s; the end of {waiting[0].name}'s log "
                               f"({waiting[0].log}):\n{waiting[0].tail()}")
        time.sleep(0.2)


def default_model(stack: Stack, signals: Signals, py: list[str]) -> str:
    """The converted SmolLM2, converted (the first time) in a child process: the conversion's
    ~800 MB would otherwise stay with `baton up` for as long as it runs."""
    from baton.modelzoo.smollm2 import PROGRESS_PREFIX

    print("baton: preparing SmolLM2 (converted once, ~30 s the first time) ...", flush=True)
    child = stack.spawn("get-model", py + ["get-model", "smollm2"])
    shown = 0
    while child.proc.poll() is None:
        signals.check()
        shown = show_lines(child, PROGRESS_PREFIX, shown)
        time.sleep(0.2)
    show_lines(child, PROGRESS_PREFIX, shown)
    stack.children.remove(child)
    if child.proc.returncode != 0:
        raise RuntimeError(f"converting SmolLM2 failed (code {child.proc.returncode}):\n{child.tail()}")
    return child.tail(1).strip()


def show_lines(child: Child, prefix: str, shown: int) -> int:
    """Print the child's finished log lines past the first `shown` that start with `prefix`
    (its progress, not its warnings), as `baton up`'s own; the count of lines seen."""
    try:
        lines = child.log.read_text(errors="replace").split("\n")[:-1]  # the last one may be partial
    except OSError:
        return shown
    for line in lines[shown:]:
        if line.startswith(prefix):
            print("baton: " + line[len(prefix):], flush=True)
    return len(lines)


def router_flags(args) -> list[str]:
    """`baton up`'s flags that are the router's, as router flags (those given only)."""
    flags = []
    for name in ("default_sampling", "default_max_tokens"):
        if hasattr(args, name):
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return flags


def has_ucx() -> bool:
    """ucxx is importable (prefill and decode pods need it; colocated ones do not)."""
    return importlib.util.find_spec("ucxx") is not None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.decode and not has_ucx():
        print("baton up: error: prefill/decode pods need ucxx: pip install 'baton[ucx]' (or ucxx-cu13)",
              file=sys.stderr)
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="baton-up-"))
    stack = Stack(run_dir, die_with_parent=True)
    signals = Signals(stack)
    py = [sys.executable, "-m", "baton.cli"]
    devices = args.devices.split(",")
    try:
        if args.model is None:
            model, name = default_model(stack, signals, py), []
            served = Path(model).name
        else:
            from baton.modelzoo.resolve import check_supported, resolve_model

            resolved = resolve_model(args.model)  # a download, if need be, happens once, here
            check_supported(resolved.path)
            model, served = str(resolved.path), resolved.name
            name = [served] if resolved.repo_id else []
        redis_url = args.redis_url or start_redis(stack)
        # Through the environment, not argv: `ps` shows every user the command lines.
        env = {"BATON_REDIS_URL": redis_url,
               "BATON_INTERNAL_TOKEN": os.environ.get("BATON_INTERNAL_TOKEN") or secrets.token_urlsafe(32)}
        pods = []
        roles = ([("prefill", "prefill")] * args.prefill + [("decode", "decode")] * args.decode) if args.decode \
            else [("decode", "colocated")] * args.pods
        for i, (cmd, role) in enumerate(roles):
            port = free_port()
            argv = py + [cmd, "--model", model, "--port", str(port), "--device", devices[i % len(devices)]]
            argv += ["--model-name", name[0]] if name else []
            argv += ["--role", role] if cmd == "decode" else []
            argv += ["--ucx-port", "0"] if role == "decode" else []  # any free port; published in the registry
            pods.append(stack.spawn(f"{role}-{i}", argv + args.pod_arg, f"http://127.0.0.1:{port}/ready",
                                    env=env, stop_group=POD_GROUP))
        port = args.port or free_port()
        router = stack.spawn("router", py + ["router", "--model", model, "--host", args.host, "--port", str(port),
                                             "--policy", args.policy]
                             + (["--served-model-name", name[0]] if name else []) + router_flags(args),
                             f"http://127.0.0.1:{port}/ready", env=env, stop_group=ROUTER_GROUP)
        print(f"baton: starting {len(pods)} pod(s) and the router (logs in {run_dir}) ...", flush=True)
        supervise(stack, signals, pods + [router], args.ready_timeout)
        print(f"baton: ready at http://{args.host}:{port}/v1  (model {served}; Ctrl-C stops)", flush=True)
        supervise(stack, signals)
        return 0  # not reached: supervise returns by raising
    except Stopped:
        print("\nbaton: stopping ...", flush=True)
        return 0
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"baton up: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        signals.stopping = True
        stack.stop(args.stop_timeout)
