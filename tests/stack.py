"""Real services as processes for end-to-end tests: pods and routers started exactly as
`baton up` starts them (`python -m baton.cli ...`), on loopback, with a real Redis.

    with ServiceStack(tmp_path) as st:
        redis = st.redis()                     # tests.redis_server.RedisServer
        d = st.pod("decode", model, role="decode", redis_url=redis.url)
        p = st.pod("prefill", model, redis_url=redis.url)
        r = st.router(model, redis_url=redis.url)
        client = openai.OpenAI(base_url=r.url + "/v1", api_key="x")
        ...
        st.kill(p)                             # SIGKILL, as a crash
Every service's log is in tmp_path; a service that fails to start raises with its log tail.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from baton.launcher import Child, Stack
from tests.redis_server import RedisServer, free_port


@dataclass
class Service:
    child: Child
    url: str
    port: int

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, trust_env=False, **kw)

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics as name -> value (labelled ones as name{labels})."""
        out = {}
        for line in self.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


class ServiceStack:
    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stack = Stack(self.workdir)
        self._redis: list[RedisServer] = []

    def __enter__(self) -> ServiceStack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.stack.stop(grace_s=15)
        for r in self._redis:
            r.stop()

    def redis(self) -> RedisServer:
        r = RedisServer(self.workdir / f"redis{len(self._redis)}").start()
        self._redis.append(r)
        return r

    def _start(self, name: str, argv: list[str], port: int, timeout_s: float) -> Service:
        url = f"http://127.0.0.1:{port}"
        child = self.stack.spawn(name, [sys.executable, "-m", "baton.cli"] + argv, url + "/ready")
        self.stack.wait_ready(child, timeout_s)
        return Service(child, url, port)

    def pod(self, kind: str, model, name: str | None = None, timeout_s: float = 120, **settings) -> Service:
        """kind: decode (role colocated unless role= says decode) or prefill. settings:
        any pod setting as a keyword (block_size=8 -> --block-size 8)."""
        port = settings.pop("port", None) or free_port()
        settings.setdefault("device", "cpu")
        if kind == "decode" and settings.get("role") == "decode":
            settings.setdefault("ucx_port", 0)
        argv = [kind, "--model", str(model), "--port", str(port)] + _flags(settings)
        return self._start(name or f"{kind}-{port}", argv, port, timeout_s)

    def router(self, model, name: str | None = None, timeout_s: float = 60, **settings) -> Service:
        port = settings.pop("port", None) or free_port()
        argv = ["router", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)] + _flags(settings)
        return self._start(name or f"router-{port}", argv, port, timeout_s)

    def kill(self, svc: Service) -> None:
        """Crash a service (SIGKILL: no clean-up, no deregistration)."""
        svc.child.proc.send_signal(signal.SIGKILL)
        svc.child.proc.wait(10)

    def terminate(self, svc: Service, timeout_s: float = 30) -> int:
        svc.child.proc.send_signal(signal.SIGTERM)
        return svc.child.proc.wait(timeout_s)


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out
