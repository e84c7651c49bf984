"""A real Baton stack on loopback for the bench's end-to-end tests: one colocated pod and the router.

Started as the operator starts them (`python -m baton.cli decode ...`, then the router's module),
on free ports, with a tiny random model. Nothing is skipped: a missing router fails the test
with a message saying so.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROUTER_MODULE = "baton.router.main"
READY_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


def _wait_ready(url: str, procs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"the {name} exited with {proc.returncode} while starting:\n{_tail(log)}")
        try:
            if httpx.get(url, timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    logs = "\n".join(f"--- {name} ---\n{_tail(log)}" for name, (_, log) in procs.items())
    pytest.fail(f"{url} not ready after {READY_TIMEOUT_S:g}s:\n{logs}")


@pytest.fixture(scope="session")
def baton_stack(tiny_qwen3, tmp_path_factory):
    """Base URL of a router in front of one colocated pod serving `tiny_qwen3`."""
    if importlib.util.find_spec(ROUTER_MODULE) is None:
        pytest.fail(f"{ROUTER_MODULE} is not importable: the bench e2e tests need the router "
                    f"(`python -m {ROUTER_MODULE} --model DIR --pods URL`)")
    logs = tmp_path_factory.mktemp("stack")
    model = str(tiny_qwen3)
    pod_port, router_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONUNBUFFERED"] = "1"
    commands = {
        "pod": [sys.executable, "-m", "baton.cli", "decode", "--model", model, "--port", str(pod_port),
                "--num-kv-blocks", "512", "--log-level", "warning"],
        "router": [sys.executable, "-m", ROUTER_MODULE, "--model", model, "--host", "127.0.0.1",
                   "--port", str(router_port), "--pods", f"http://127.0.0.1:{pod_port}",
                   "--log-level", "warning"],
    }
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        for name, cmd in commands.items():
            log = logs / f"{name}.log"
            with open(log, "wb") as f:
                procs[name] = (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log)
        base = f"http://127.0.0.1:{router_port}"
        _wait_ready(base + "/ready", procs)
        yield base
    finally:
        for proc, _ in reversed(procs.values()):
            proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
