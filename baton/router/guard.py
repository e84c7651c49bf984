"""What the router lets in before a handler runs: drain, API keys, body size and admission.

A pure ASGI middleware, not Starlette's BaseHTTPMiddleware, so that a streaming response
counts as in flight until its last byte: that count is what admission (max_inflight_requests)
limits and what a drain waits for. A body is read whole, within `body_timeout_s` (408 after),
before the request counts as in flight: a client trickling its body holds no slot. Per-request
limits that need the parsed body (n, max_tokens, prompts) are `check_limits`, called by the
handlers.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac

from fastapi.responses import JSONResponse

from baton.drain import RETRY_AFTER_S, Drain
from baton.router.protocol import APIError, error_body
from baton.router.settings import RouterSettings


# Open without a key: what load balancers and orchestrators probe. Everything else (the API,
# /metrics, /docs, /openapi.json) needs a key when keys are set.
OPEN_PATHS = frozenset({"/health", "/ready"})


class Guard:
    def __init__(self, app, settings: RouterSettings, drain: Drain):
        self.app, self.s, self.drain = app, settings, drain
        self.keys = [k.encode() for k in settings.api_keys]
        self.open_paths = OPEN_PATHS | ({"/metrics"} if settings.metrics_without_key else set())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if self.keys:
            key = self._key(scope)
            if key is None:
                await _reply(401, error_body(
                    "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                    code="invalid_api_key"))(scope, receive, send)
                return
            # the tenant, for --cache-salt-by-key: a digest, so the key itself goes nowhere
            scope.setdefault("state", {})["tenant"] = hashlib.blake2b(key, digest_size=16).hexdigest()
        if not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None and scope["method"] == "POST":
            body = await self._read_body(receive)
            if isinstance(body, JSONResponse):
                refusal = body
            else:
                receive = _replay(body, receive)
                refusal = self._refusal(scope)  # the state may have changed while it came in
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        self.drain.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.inflight -= 1

    async def _read_body(self, receive) -> bytes | JSONResponse:
        limit = self.s.max_body_bytes
        try:
            async with asyncio.timeout(self.s.body_timeout_s):  # no task, unlike 3.11's wait_for
                body = await _read_body(receive, limit)
        except TimeoutError:
            return _reply(408, error_body(
                f"The request body did not arrive within {self.s.body_timeout_s:g} s.",
                code="request_timeout"), close=True)
        if body is None:
            return _reply(413, error_body(
                f"The request body is larger than {limit} bytes.", code="request_too_large"),
                close=True)
        return body

    def _refusal(self, scope) -> JSONResponse | None:
        if self.drain.draining:
            return _reply(503, error_body(
                "The server is shutting down; retry on another replica.", "server_error",
                code="shutting_down"), retry=True)
        limit = self.s.max_inflight_requests
        if limit and scope["method"] == "POST" and self.drain.inflight >= limit:
            return _reply(429, error_body(
                f"Too many requests in flight (limit {limit}); retry later.", "rate_limit_error",
                code="too_many_requests"), retry=True)
        return None

    def _key(self, scope) -> bytes | None:
        """The request's API key if it is one of ours, else None."""
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = auth.partition(b" ")
        key = key.strip()
        # compare_digest against every key: the time taken says nothing about which is close
        ok = [hmac.compare_digest(key, k) for k in self.keys]
        return key if scheme.lower() == b"bearer" and any(ok) else None


def check_limits(settings: RouterSettings, req, prompts: int = 1) -> None:
    """400 for a request beyond the operator's limits (the parsed body's n, prompts and
    max_tokens)."""
    if req.n > settings.max_n:
        raise APIError(400, f"n must be at most {settings.max_n}.", param="n")
    if prompts > settings.max_prompts:
        raise APIError(400, f"A request may carry at most {settings.max_prompts} prompts, got {prompts}.",
                       param="prompt")
    if prompts * req.n > settings.max_choices:
        raise APIError(400, f"prompts x n must be at most {settings.max_choices}, got {prompts * req.n}.",
                       param="n")
    limit, asked = settings.max_tokens_limit, req.output_limit
    if limit and asked is not None and asked > limit:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"{param} must be at most {limit}.", param=param)


def _reply(status: int, body: dict, retry: bool = False, close: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else {}
    if close:  # the rest of the body is not read: the connection cannot carry another request
        headers["Connection"] = "close"
    return JSONResponse(body, status_code=status, headers=headers or None)


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes (0: no limit)."""
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunk = msg.get("body", b"")
        size += len(chunk)
        if limit and size > limit:
            return None
        chunks.append(chunk)
        if not msg.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive that hands the app the buffered body, then the client's later messages
    (the disconnect the handlers watch for)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
