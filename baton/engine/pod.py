"""What every pod shares: engine settings, the engine on its thread, metrics, registration.

Both pod services (decode_service, prefill_service) build on this; they never import each
other. Settings follow baton/settings.py: flag, then BATON_* variable, then default.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from urllib.parse import urlparse
import weakref
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from baton import internal_auth
from baton.drain import RETRY_AFTER_S, Drain
from baton.settings import field

log = logging.getLogger("baton.pod")


@dataclass
class EngineSettings:
    model: str = field("", "model directory (default: the converted SmolLM2)")
    model_name: str = field("", "name served to clients (default: the directory's name)")
    host: str = field("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = field(8100, "HTTP port of the internal API")
    advertise_url: str = field("", "URL the router and other pods use to reach this pod (default http://HOST:PORT)")
    pod_id: str = field("", "unique pod id in the registry (default ROLE-HOSTNAME-PORT)")
    redis_url: str = field("", "Redis of the KV index and pod registry; empty: do not register")
    device: str = field("auto", "cuda, cuda:N, cpu or auto")
    dtype: str = field("auto", "auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    block_size: int = field(16, "tokens per KV block")
    num_kv_blocks: int | None = field(None, "KV cache blocks (default: from memory)")
    kv_cache_bytes: int = field(1 << 30, "KV cache bytes on CPU when num_kv_blocks is unset")
    gpu_memory_utilization: float = field(0.85, "share of GPU memory the pod may use")
    max_num_seqs: int = field(256, "most sequences in one running batch")
    max_num_batched_tokens: int = field(2048, "token budget of one engine step (prefill chunk size)")
    max_model_len: int | None = field(None, "longest sequence (default: the model's)")
    enable_prefix_caching: bool = field(True, "reuse cached KV blocks across requests")
    cuda_graphs: bool = field(True, "capture decode steps as CUDA graphs")
    async_scheduling: bool = field(True, "schedule step N+1 while step N runs (greedy decode steps)")
    heartbeat_interval_s: float = field(0.2, "seconds between index publications (heartbeat, KV events)")
    heartbeat_ttl_s: float = field(3.0, "seconds after which a silent pod counts as dead")
    log_level: str = field("info", "logging level")
    load_format: str = field("safetensors", "safetensors, or random (benchmarks of shapes without weights)")
    internal_token: str = field("", "shared secret peers must send as X-Baton-Token to /internal/*; empty: none")
    drain_timeout_s: float = field(30.0, "on SIGTERM, how long requests in flight may run before exit")

    ROLES = ("colocated", "decode", "prefill")

    def resolve(self, role: str) -> None:
        """Fill the defaults that depend on the machine and the role."""
        if not self.model:
            from baton.modelzoo.smollm2 import get_model

            self.model = str(get_model("smollm2"))
        if not self.pod_id:
            self.pod_id = f"{role}-{socket.gethostname()}-{self.port}"
        if not self.advertise_url:
            self.advertise_url = f"http://{self.advertise_host}:{self.port}"

    @property
    def advertise_host(self) -> str:
        """The host others reach this pod at (its UCX listener too): advertise_url's, if given."""
        if self.advertise_url:
            return urlparse(self.advertise_url).hostname or self.host
        return socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host

    def engine_config(self):
        from baton.engine.config import EngineConfig

        return EngineConfig(
            block_size=self.block_size, num_kv_blocks=self.num_kv_blocks, kv_cache_bytes=self.kv_cache_bytes,
            gpu_memory_utilization=self.gpu_memory_utilization, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching, device=self.device, dtype=self.dtype,
            cuda_graphs=self.cuda_graphs, async_scheduling=self.async_scheduling, load_format=self.load_format,
        )


class Sampling(BaseModel):
    """A request's sampling parameters on the internal APIs (router to decode pod, decode pod
    to prefill pod); SamplingParams checks the values."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None


def gpu_uuid(device) -> str | None:
    """The UUID of the GPU a pod runs on (two pods sharing a GPU see the same); None on CPU."""
    if device.type != "cuda":
        return None
    import torch

    return str(torch.cuda.get_device_properties(device).uuid)


def error(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": None}}, status)


class PodRuntime:
    """The engine loop, metrics and index publisher of one pod, started in the app's lifespan."""

    def __init__(self, settings: EngineSettings, role: str):
        self.settings, self.role = settings, role
        self.loop = None
        self.metrics = None
        self.publisher = None
        self.ucx_address = ""
        self.transfer = None  # the KVSender (prefill) or KVReceiver (decode), for metrics
        self.drain = Drain(settings.drain_timeout_s, on_start=self._leave_registry)

    async def _leave_registry(self) -> None:
        # draining: routers stop picking this pod now, not only once its heartbeat runs out
        if self.publisher is not None:
            await self.publisher.stop(deregister=True)

    async def start(self) -> None:
        from baton.engine.engine import LLMEngine
        from baton.engine.loop import EngineLoop
        from baton.engine.pod_metrics import PodMetrics

        import sys

        # The engine thread and the event loop (HTTP, UCX sends and receives) share the GIL;
        # Python's default 5 ms switch interval would hold a layer's push, or a received
        # layer's scatter, behind a whole model step. 0.5 ms keeps the network moving.
        sys.setswitchinterval(0.0005)
        s = self.settings
        engine = await asyncio.to_thread(LLMEngine, s.model, s.engine_config())
        self.loop = EngineLoop(engine, asyncio.get_running_loop())
        self.metrics = PodMetrics(weakref.ref(self.loop), lambda: self.publisher, lambda: self.transfer)
        self.loop.start()

    def register(self) -> None:
        """Start publishing heartbeat and KV events (after the UCX address is known)."""
        s = self.settings
        if not s.redis_url:
            return
        from baton.kvindex.publisher import PodInfo, PodPublisher

        self.publisher = PodPublisher(
            s.redis_url,
            PodInfo(s.pod_id, self.role, s.advertise_url, s.model_name or Path(s.model).name,
                    ucx_address=self.ucx_address, block_size=s.block_size),
            self.loop.state, self.loop.drain_events, self.loop.all_cached,
            interval_s=s.heartbeat_interval_s, ttl_s=s.heartbeat_ttl_s,
        )
        self.publisher.start()
        log.info("%s pod %s registered at %s", self.role, s.pod_id, s.advertise_url)

    async def stop(self) -> None:
        if self.publisher is not None:
            await self.publisher.stop(deregister=True)
        if self.loop is not None:
            await asyncio.to_thread(self.loop.stop)

    @property
    def ready(self) -> bool:
        return self.loop is not None and self.loop.alive


def add_common_routes(app: FastAPI, pod: PodRuntime) -> None:
    """/health, /ready, /metrics, /internal/state, /internal/abort, the 400 error shape, and
    the gate of /internal/* (token, drain)."""
    app.add_middleware(PodGate, token=pod.settings.internal_token, drain=pod.drain)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        return error(400, f"invalid request: {first.get('msg', exc)}", param)

    @app.get("/health")
    async def health():
        if pod.loop is not None and not pod.loop.alive:
            return JSONResponse({"status": "engine loop stopped"}, 500)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if pod.drain.draining:
            return JSONResponse({"status": "draining"}, 503)
        if not pod.ready:
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ready", "pod_id": pod.settings.pod_id, "role": pod.role}

    @app.get("/metrics")
    async def metrics():
        if pod.metrics is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(pod.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/internal/state")
    async def pod_state():
        if pod.loop is None:
            return error(503, "the pod is still loading its model", type_="service_unavailable")
        return pod.loop.state()

    @app.get("/internal/transfer_stats")
    async def transfer_stats():
        """The UCX data plane's counters and this pod's transfer outcomes (tests, debugging)."""
        stats = pod.transfer.stats() if pod.transfer is not None else {}
        return {**stats, **(pod.metrics.transfer_counts() if pod.metrics else {})}

    @app.post("/internal/abort")
    async def abort(body: dict):
        rid = body.get("request_id")
        if not isinstance(rid, str):
            return error(400, "request_id (string) is required", "request_id")
        if pod.loop is not None:
            pod.loop.abort(rid)
        return {"aborted": rid}


# The calls that start work on the engine: refused while draining, counted while they run.
_WORK_PATHS = ("/internal/generate", "/internal/prefill")


class PodGate:
    """ASGI middleware (so a stream counts as in flight until its last byte): /internal/*
    needs the shared token when one is set; new work is refused while the pod drains."""

    def __init__(self, app, token: str, drain: Drain):
        self.app, self.token, self.drain = app, token, drain

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/internal/"):
            await self.app(scope, receive, send)
            return
        if self.token:
            got = dict(scope["headers"]).get(internal_auth.HEADER.lower().encode())
            if not internal_auth.valid(self.token, got.decode("latin-1") if got else None):
                resp = error(401, f"missing or wrong {internal_auth.HEADER}", type_="authentication_error")
                await resp(scope, receive, send)
                return
        if path not in _WORK_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            resp = error(503, "the pod is shutting down", type_="service_unavailable")
            resp.headers["Retry-After"] = str(RETRY_AFTER_S)
            await resp(scope, receive, send)
            return
        self.drain.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.inflight -= 1


def serve(app: FastAPI, settings: EngineSettings) -> None:
    from baton.drain import serve as serve_draining

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve_draining(app, app.state.pod.drain, host=settings.host, port=settings.port,
                   log_level=settings.log_level, timeout_graceful_shutdown=30)
