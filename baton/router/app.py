"""The router's HTTP face: OpenAI endpoints, health, readiness and metrics (FastAPI).

Handlers validate and tokenize, start one job per choice (serving.py) and answer with the
jobs' events shaped by responses.py, as one JSON body or as SSE. Never imports torch; from
baton.engine only torch-free modules (the tokenizer, sampling parameters, length limits).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from baton.drain import RETRY_AFTER_S, Drain, StreamingResponse
from baton.router.guard import Guard, check_limits
from baton.router import tools
from baton.router.pods import PREFILL_ROLES
from baton.router.protocol import (
    NOT_SUPPORTED,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
)
from baton.router.responses import CHAT, COMPLETIONS, GONE, Endpoint, Reply
from baton.router.serving import RequestClock, Router
from baton.router.settings import RouterSettings

log = logging.getLogger(__name__)


def create_app(settings: RouterSettings) -> FastAPI:
    router = Router(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="Baton router", lifespan=lifespan)
    _declare_400(app)
    app.state.router = router
    app.state.drain = drain = Drain(settings.drain_timeout_s)
    app.add_middleware(Guard, settings=settings, drain=drain)
    _add_error_handlers(app, router)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if drain.draining:  # load balancers stop sending while the requests in flight finish
            return JSONResponse({"ready": False, "draining": True}, status_code=503)
        live = len(router.pods.live()) if router.pods else 0
        prefill = len(router.pods.live(PREFILL_ROLES)) if router.pods else 0
        return JSONResponse(
            {"ready": live > 0, "live_pods": live, "live_prefill_pods": prefill}, status_code=200 if live else 503
        )

    @app.get("/metrics")
    async def metrics():
        return Response(router.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": router.model_name,
                    "object": "model",
                    "created": router.created,
                    "owned_by": "baton",
                    "max_model_len": router.max_model_len,
                    # what a request that omits them gets (chat; completions keep OpenAI's 16)
                    "default_max_tokens": settings.default_max_tokens or None,
                    "default_sampling": router.sampling_defaults,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        router.check_model(req.model)
        check_limits(settings, req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true.", param="top_logprobs")
        _check_stream_options(req)
        tool_plan = tools.plan(req, router.tokenizer)
        try:
            messages = [m.template_dict() for m in req.messages]
            # rendered and tokenized off the event loop; message content stays plain text
            prompt_ids = await router.chat_ids(
                messages, lambda ms: tools.render(router.tokenizer, ms, tool_plan),
                with_tools=tool_plan is not None)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        return await _respond(router, request, CHAT, req, [prompt_ids], tool_plan)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        router.check_model(req.model)
        given = req.prompts()
        check_limits(settings, req, prompts=len(given))
        _check_stream_options(req)
        prompts: list[list[int]] = []
        for p in given:
            if isinstance(p, str):
                ids = await router.encode(p, add_special_tokens=True)  # its size checked first
            else:
                ids = p
                router.check_ids(ids)
            prompts.append(ids)
        return await _respond(router, request, COMPLETIONS, req, prompts)

    return app


def _check_stream_options(req) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(
            400, "stream_options can only be set when stream is true.", param="stream_options"
        )


async def _respond(router: Router, request: Request, ep: Endpoint, req, prompts: list[list[int]],
                   tool_plan: tools.ToolPlan | None = None):
    """Run one job per choice and answer: the whole body, or SSE when `stream`."""
    forced = tool_plan.structured_output() if tool_plan else None
    jobs = router.jobs(req, prompts, ep.prompt_param, structured_output=forced,
                       tenant=getattr(request.state, "tenant", None))
    reply = Reply(ep, router.model_name, router.tokenizer, jobs, prompts, req.include_usage,
                  tool_plan)
    clock = RequestClock()
    queue: asyncio.Queue = asyncio.Queue()
    gate = asyncio.Semaphore(router.s.fan_out)  # this request's choices on pods at once
    tasks = [asyncio.create_task(router.run_job(reply.id, j, queue, clock, gate)) for j in jobs]
    tasks.append(asyncio.create_task(_watch_client(request, queue)))
    router.metrics.in_flight.inc()
    try:
        # Wait for the first event: an error before any token is a plain HTTP error, stream or not.
        first = await queue.get()
        if first[0] == "error":
            raise first[2]
    except BaseException:
        _cancel(tasks)
        router.metrics.in_flight.dec()
        raise
    if first is not GONE and req.stream:
        # the watcher's GONE ends the body's iteration: no listener of Starlette's beside it
        return StreamingResponse(
            _stream(router, reply, first, queue, tasks, clock),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
            watch_client=False,
        )
    try:
        if first is not GONE and await _drain(queue, first, len(jobs)):
            router.metrics.e2e.observe(time.monotonic() - clock.start)
            router.metrics.requests.labels(ep.name, "200").inc()
            return reply.body()
        router.metrics.requests.labels(ep.name, "499").inc()
        log.info("request %s: client went away; aborted at the pods", reply.id)
        return Response(status_code=499)
    finally:
        _cancel(tasks)
        router.metrics.in_flight.dec()


async def _stream(router: Router, reply: Reply, first, queue, tasks, clock) -> AsyncIterator[str]:
    try:
        async for chunk in reply.stream(first, queue):
            yield chunk
        if reply.status != "499":
            router.metrics.e2e.observe(time.monotonic() - clock.start)
    except asyncio.CancelledError:
        reply.status = "499"  # the client went away
        raise
    finally:
        _cancel(tasks)
        router.metrics.in_flight.dec()
        router.metrics.requests.labels(reply.ep.name, reply.status).inc()


async def _watch_client(request: Request, queue: asyncio.Queue) -> None:
    """Puts GONE on the request's queue when its client disconnects: whatever reads the queue
    (the first event's wait, the body's drain, the stream) ends there, and the request's
    finally cancels its jobs, which aborts them at the pods. One waiting task per request, in
    place of a poll (Starlette's is_disconnected: a cancel scope every 0.25 s) and Starlette's
    own task group with its listener beside each stream."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(GONE)


async def _drain(queue: asyncio.Queue, first, n_jobs: int) -> bool:
    """Consume job events until every job is done (True) or the client leaves (False);
    raises the first job error."""
    event, remaining = first, n_jobs
    while True:
        kind, _job, payload = event
        if kind == "error":
            raise payload
        if kind == "gone":
            return False
        if kind == "done":
            remaining -= 1
            if remaining == 0:
                return True
        event = await queue.get()


def _cancel(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        t.cancel()  # a job's finally closes its pod stream: the pod aborts the request


def _declare_400(app: FastAPI) -> None:
    """The OpenAPI document says what the server answers: a body it cannot take is a 400 in
    OpenAI's error shape (the handler below), not FastAPI's 422."""
    make = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = make()
            doc.setdefault("components", {}).setdefault("schemas", {})["Error"] = {
                "type": "object", "required": ["error"],
                "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
            }
            for ops in doc.get("paths", {}).values():
                for op in ops.values():
                    responses = op.get("responses", {})
                    if responses.pop("422", None) is not None:
                        responses["400"] = {"description": "Invalid request", "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for name in ("HTTPValidationError", "ValidationError"):
                doc["components"]["schemas"].pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def _add_error_handlers(app: FastAPI, router: Router) -> None:
    endpoints = {"/v1/chat/completions": CHAT.name, "/v1/completions": COMPLETIONS.name}

    def reply(request: Request, status: int, body: dict) -> JSONResponse:
        if request.url.path in endpoints:
            router.metrics.requests.labels(endpoints[request.url.path], str(status)).inc()
        # 429 and 503 (no pod ready, all failed) are worth a retry: say when
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return reply(request, e.status, e.body())

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg = f"Malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
            param = None
        elif first.get("type") == "extra_forbidden":  # OpenAI's words for an unknown field
            param = ".".join(loc)
            msg = f"Unrecognized request argument supplied: {param}"
        elif first.get("type") == NOT_SUPPORTED:  # a field OpenAI defines that Baton does not do
            msg, param = first["msg"], ".".join(loc)
        else:
            # Union types report one error per member; the first one names the field and the problem.
            msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
            param = loc[0] if loc else None
        return reply(request, 400, error_body(msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        r = reply(request, e.status_code, error_body(str(e.detail), kind))
        r.headers.update(e.headers or {})  # 405's Allow
        return r

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return reply(request, 500, error_body("internal server error", "server_error"))
