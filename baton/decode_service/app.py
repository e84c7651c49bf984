"""The pod's HTTP service: the internal generate API the router calls, health, metrics.

Colocated mode: this pod prefills and decodes. The engine runs on its own thread
(EngineLoop); handlers only enqueue and stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from baton.decode_service.engine_loop import EngineFailure, EngineLoop
from baton.decode_service.metrics import PodMetrics
from baton.decode_service.settings import PodSettings
from baton.engine.sampling_params import SamplingParams

log = logging.getLogger("baton.pod")


class Sampling(BaseModel):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None


class GenerateRequest(BaseModel):
    request_id: str = Field(min_length=1, max_length=256)
    prompt_token_ids: list[int]
    sampling: Sampling = Field(default_factory=Sampling)


def error(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": None}}, status)


def build_engine(settings: PodSettings):
    from baton.engine.config import EngineConfig
    from baton.engine.engine import LLMEngine

    cfg = EngineConfig(
        block_size=settings.block_size, num_kv_blocks=settings.num_kv_blocks,
        kv_cache_bytes=settings.kv_cache_bytes, gpu_memory_utilization=settings.gpu_memory_utilization,
        max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
        max_model_len=settings.max_model_len, enable_prefix_caching=settings.enable_prefix_caching,
        device=settings.device, dtype=settings.dtype, cuda_graphs=settings.cuda_graphs,
    )
    return LLMEngine(settings.model, cfg)


def create_app(settings: PodSettings) -> FastAPI:
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = await asyncio.to_thread(build_engine, settings)
        loop = EngineLoop(engine, asyncio.get_running_loop())
        state["loop"] = loop
        state["metrics"] = PodMetrics(weakref.ref(loop), lambda: state.get("publisher"))
        loop.start()
        publisher = None
        if settings.redis_url:
            from baton.kvindex.publisher import PodInfo, PodPublisher

            publisher = PodPublisher(
                settings.redis_url,
                PodInfo(settings.pod_id, settings.role, settings.advertise_url,
                        settings.model_name or Path(settings.model).name, block_size=settings.block_size),
                loop.state, loop.drain_events, loop.all_cached,
                interval_s=settings.heartbeat_interval_s, ttl_s=settings.heartbeat_ttl_s,
            )
            publisher.start()
            state["publisher"] = publisher
        log.info("pod %s ready at %s", settings.pod_id, settings.advertise_url)
        try:
            yield
        finally:
            if publisher is not None:
                await publisher.stop(deregister=True)
            await asyncio.to_thread(loop.stop)

    app = FastAPI(title="baton pod", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        return error(400, f"invalid request: {first.get('msg', exc)}", param)

    @app.get("/health")
    async def health():
        loop = state.get("loop")
        if loop is not None and not loop.alive:
            return JSONResponse({"status": "engine loop stopped"}, 500)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        loop = state.get("loop")
        if loop is None or not loop.alive:
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ready", "pod_id": settings.pod_id}

    @app.get("/metrics")
    async def metrics():
        m = state.get("metrics")
        if m is None:
            return Response("", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/internal/state")
    async def pod_state():
        loop = state.get("loop")
        if loop is None:
            return error(503, "the pod is still loading its model", type_="service_unavailable")
        return loop.state()

    @app.post("/internal/abort")
    async def abort(body: dict):
        rid = body.get("request_id")
        if not isinstance(rid, str):
            return error(400, "request_id (string) is required", "request_id")
        state["loop"].abort(rid)
        return {"aborted": rid}

    @app.post("/internal/generate")
    async def generate(req: GenerateRequest):
        loop: EngineLoop | None = state.get("loop")
        if loop is None or not loop.alive:
            return error(503, "the pod is not ready", type_="service_unavailable")
        try:
            params = SamplingParams(**req.sampling.model_dump())
            loop.engine.validate(req.prompt_token_ids, params)
            q = loop.submit(req.request_id, req.prompt_token_ids, params)
        except ValueError as e:
            return error(400, str(e))
        m: PodMetrics = state["metrics"]
        return StreamingResponse(_stream(loop, m, req.request_id, q, settings.token_timeout_s),
                                 media_type="application/x-ndjson")

    app.state.baton = state
    return app


async def _stream(loop: EngineLoop, m: PodMetrics, rid: str, q: asyncio.Queue, timeout_s: float):
    """NDJSON lines of token ids until the request finishes; abort on any early exit."""
    start = last = time.perf_counter()
    first = True
    status = "abort"
    try:
        while True:
            try:
                item = await asyncio.wait_for(q.get(), timeout_s)
            except TimeoutError:
                status = "timeout"
                log.warning("request %s: no token for %.0f s, aborted", rid, timeout_s)
                yield json.dumps({"error": {"message": f"no token within {timeout_s} s", "type": "timeout"}}) + "\n"
                return
            if isinstance(item, EngineFailure):
                status = "error"
                yield json.dumps({"error": {"message": item.message, "type": "engine_error"}}) + "\n"
                return
            now = time.perf_counter()
            if first:
                m.ttft.observe(now - start)
                m.prompt_tokens.inc(item.num_prompt_tokens)
                m.cached_tokens.inc(item.num_cached_tokens)
                first = False
            else:
                m.itl.observe(now - last)
            last = now
            m.generation_tokens.inc(len(item.new_token_ids))
            yield json.dumps({
                "token_ids": item.new_token_ids, "logprobs": item.new_logprobs,
                "finish_reason": item.finish_reason, "num_cached_tokens": item.num_cached_tokens,
                "num_prompt_tokens": item.num_prompt_tokens,
            }) + "\n"
            if item.finish_reason:
                status = item.finish_reason
                m.e2e.observe(now - start)
                return
    finally:
        m.requests.labels(status=status).inc()
        if status in ("stop", "length"):
            loop.release(rid)
        else:  # client gone, timeout or error: free the request's blocks now
            loop.abort(rid)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from baton.settings import parse_settings

    settings = parse_settings(PodSettings, argv, "baton decode", "Start a decode (or colocated) pod.")
    if not settings.model:
        from baton.modelzoo.smollm2 import get_model

        settings.model = str(get_model("smollm2"))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=30)
    return 0
