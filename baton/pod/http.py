"""The HTTP surface every pod shares: /health, /ready, /metrics, /internal/state, abort, the
OpenAI error shape, the gate of /internal/* (shared token, drain) and serving with drain."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import msgpack
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from baton import internal_auth
from baton.drain import RETRY_AFTER_S, Drain
from baton.engine.sampling_params import SamplingParams
from baton.pod.runtime import PodRuntime
from baton.pod.settings import PodSettings


def sampling_params(fields: dict) -> SamplingParams:
    """The request's SamplingParams, rebuilt from its wire form (dataclasses.asdict of the
    router's); ValueError names what is wrong."""
    try:
        return SamplingParams(**fields)
    except TypeError as e:  # an unknown field, or a value of the wrong type
        raise ValueError(f"invalid sampling parameters: {e}") from None


NDJSON = "application/x-ndjson"
MSGPACK = "application/x-msgpack"


def stream_format(accept: str | None) -> tuple[str, Callable[[dict], bytes]]:
    """The generate stream's media type and frame encoder for a caller's Accept header:
    msgpack maps back to back when it names application/x-msgpack (the router does: cheaper
    to write and to read), else one JSON object per line (anyone else, curl, the tests)."""
    if accept and MSGPACK in accept:
        return MSGPACK, msgpack.packb
    return NDJSON, _ndjson_line


def _ndjson_line(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def error_body(message: str, param: str | None = None, type_: str = "invalid_request_error") -> dict:
    """The OpenAI error shape a pod answers in (an HTTP body, or a channel's refusal frame)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}


def error(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, param, type_), status)


def add_common_routes(app: FastAPI, pod: PodRuntime) -> None:
    """/health, /ready, /metrics, /internal/state, /internal/abort, the 400 error shape, and
    the gate of /internal/* (token, drain)."""
    s = pod.settings
    app.add_middleware(PodGate, token=s.internal_token, drain=pod.drain,
                       open_=bool(s.insecure_internal and not s.internal_token))

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
        return {"status": "ready", "pod_id": pod.settings.pod_id, "role": pod.role, **pod.limits}

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
            pod.loop.abort(rid, notify=True)  # the request's stream ends now, finish_reason abort
        return {"aborted": rid}


# The calls that start work on the engine: refused while draining, counted while they run.
_WORK_PATHS = ("/internal/generate", "/internal/prefill")


class PodGate:
    """ASGI middleware (so a stream counts as in flight until its last byte): /internal/*
    needs the shared token; without one it is refused, unless the operator opened it
    (`open_`: --insecure-internal). New work is refused while the pod drains."""

    def __init__(self, app, token: str, drain: Drain, open_: bool = False):
        self.app, self.token, self.drain, self.open = app, token, drain, open_

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
        elif not self.open:
            resp = error(403, "this pod has no internal token: start it with --internal-token "
                         "(or --insecure-internal to serve /internal/* to anyone)", type_="authentication_error")
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


def serve(app: FastAPI, settings: PodSettings) -> None:
    from baton.drain import serve as serve_draining

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve_draining(app, app.state.pod.drain, host=settings.host, port=settings.port,
                   log_level=settings.log_level, timeout_graceful_shutdown=30)
