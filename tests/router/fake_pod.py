"""A small real pod for router tests: the internal API of docs/CONTRACTS.md over a fake engine.

Output is deterministic: token i echoes prompt[(seed + i) % len(prompt)] (seed 0 when unset),
so tests know the text to expect; like an engine it stops at `eos_token_ids` unless the request
ignores EOS, and at max_model_len. It publishes its block size and max_model_len as a real pod
does (heartbeat and /ready) and refuses prompts it cannot take in a real pod's words. It keeps a fake prefix cache (full 16-token blocks of the
prompts it served) for `num_cached_tokens` and, given a Redis URL, publishes it through a real
`PodPublisher`. Knobs make it slow, fail or drop streams; it records what it saw.
"""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from baton.engine.limits import prompt_length_error
from baton.kvindex.hashing import block_hashes
from baton.kvindex.publisher import PodInfo, PodPublisher


class FakePod:
    def __init__(
        self,
        name: str = "pod",
        seed: bytes = b"\0" * 16,
        block_size: int = 16,
        redis_url: str | None = None,
        model: str = "model",
        ttl_s: float = 1.0,
        role: str = "colocated",  # decode / prefill: the registry's role (it still answers alone)
        interval_s: float = 0.05,  # heartbeat period
        max_model_len: int = 4096,
        eos_token_ids: tuple[int, ...] | list[int] = (),
    ):
        self.interval_s = interval_s
        self.max_model_len, self.eos_token_ids = max_model_len, set(eos_token_ids)
        self.name, self.seed, self.block_size, self.role = name, seed, block_size, role
        self.redis_url, self.model, self.ttl_s = redis_url, model, ttl_s
        self.port: int | None = None
        self.token_delay_s = 0.0
        self.first_token_delay_s = 0.0
        self.tokens_per_line = 1
        self.fail_next = 0  # answer HTTP 500 to this many requests
        self.drop_next = 0  # end this many streams before the first token
        self.requests: list[dict] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.cache: set[bytes] = set()
        self._stored: list[bytes] = []
        self.running = 0
        self.publisher: PodPublisher | None = None
        self.app = self._make_app()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _cached_tokens(self, ids: list[int]) -> int:
        n = 0
        for h in block_hashes(ids, self.block_size, self.seed):
            if h not in self.cache:
                break
            n += 1
        return min(n * self.block_size, max(len(ids) - 1, 0))

    def _remember(self, ids: list[int]) -> None:
        for h in block_hashes(ids, self.block_size, self.seed):
            if h not in self.cache:
                self.cache.add(h)
                self._stored.append(h)

    def _drain(self):
        out, self._stored = self._stored, []
        return out, [], False

    def state(self) -> dict:
        return {
            "running": self.running,
            "waiting": 0,
            "waiting_prefill_tokens": 0,
            "free_blocks": 1000,
            "total_blocks": 1024,
            "cached_blocks": len(self.cache),
        }

    def _make_app(self) -> FastAPI:
        pod = self
        app = FastAPI()

        @app.on_event("startup")
        async def startup():
            if pod.redis_url:
                info = PodInfo(
                    pod_id=pod.name,
                    role=pod.role,
                    url=pod.url,
                    model=pod.model,
                    block_size=pod.block_size,
                    max_model_len=pod.max_model_len,
                )
                pod.publisher = PodPublisher(
                    pod.redis_url,
                    info,
                    pod.state,
                    pod._drain,
                    lambda: sorted(pod.cache),
                    interval_s=pod.interval_s,
                    ttl_s=pod.ttl_s,
                    timeout_s=0.3,
                    max_backoff_s=0.3,
                )
                pod.publisher.start()

        @app.on_event("shutdown")
        async def shutdown():
            if pod.publisher is not None:
                await pod.publisher.stop(deregister=False)

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/ready")
        async def ready():
            return {"status": "ready", "pod_id": pod.name, "role": pod.role,
                    "block_size": pod.block_size, "max_model_len": pod.max_model_len}

        @app.get("/internal/state")
        async def state():
            return pod.state()

        @app.post("/internal/abort")
        async def abort(body: dict):
            pod.aborted.append(body["request_id"])
            return {}

        @app.post("/internal/generate")
        async def generate(body: dict, request: Request):
            pod.requests.append(body)
            s = body.get("sampling", {})
            ids = body.get("prompt_token_ids") or []
            refusal = prompt_length_error(len(ids), pod.max_model_len)
            if refusal or not isinstance(s.get("max_tokens"), int) or s["max_tokens"] < 1:
                return JSONResponse(
                    {
                        "error": {
                            "message": refusal or "bad request",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": None,
                        }
                    },
                    status_code=400,
                )
            if pod.fail_next > 0:
                pod.fail_next -= 1
                return JSONResponse({"detail": "boom"}, status_code=500)
            drop = pod.drop_next > 0
            if drop:
                pod.drop_next -= 1
            cached = pod._cached_tokens(ids)
            pod._remember(ids)
            return StreamingResponse(
                pod._stream(body, ids, s, cached, drop), media_type="application/x-ndjson"
            )

        return app

    async def _stream(self, body, ids, s, cached, drop):
        import json

        rid = body["request_id"]
        offset = s.get("seed") or 0
        stop_ids = set(s.get("stop_token_ids") or [])
        if not s.get("ignore_eos"):
            stop_ids |= self.eos_token_ids  # the engine's EOS check, not the router's
        room = min(s["max_tokens"], self.max_model_len - len(ids))
        k = s.get("logprobs")
        done = False
        self.running += 1
        try:
            if drop:
                return  # a 200 with no lines: broken before the first token
            await asyncio.sleep(self.first_token_delay_s)
            produced, batch, lps = 0, [], []
            while True:
                t = ids[(offset + produced) % len(ids)]
                produced += 1
                batch.append(t)
                if k is not None:
                    lps.append([[t, -0.5]] + [[(t + j + 1) % 500, -1.0 - j] for j in range(k)])
                finish = (
                    "stop" if t in stop_ids else ("length" if produced >= room else None)
                )
                if finish or len(batch) >= self.tokens_per_line:
                    line = {
                        "token_ids": batch,
                        "logprobs": lps if k is not None else None,
                        "finish_reason": finish,
                        "num_cached_tokens": cached,
                    }
                    yield json.dumps(line) + "\n"
                    batch, lps = [], []
                if finish:
                    done = True
                    self.finished.append(rid)
                    return
                await asyncio.sleep(self.token_delay_s)
        finally:
            self.running -= 1
            if not done and not drop:
                self.aborted.append(rid)


class ServerThread:
    """A uvicorn server for `app` on a loopback port, in a daemon thread."""

    def __init__(self, app, port: int):
        self.port = port
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout_s: float = 20.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise RuntimeError(f"server on port {self.port} did not stop within {timeout_s}s")


def start_pod(pod: FakePod, port: int) -> ServerThread:
    pod.port = port
    return ServerThread(pod.app, port).start()
