"""What the router lets in before a handler runs: drain, API keys, body size and admission.

A pure ASGI middleware, not Starlette's BaseHTTPMiddleware, so that a streaming response
counts as in flight until its last byte: that count is what admission (max_inflight_requests)
limits and what a drain waits for. Per-request limits that need the parsed body (n,
max_tokens) are `check_limits`, called by the handlers.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from baton.drain import RETRY_AFTER_S, Drain
from baton.router.protocol import APIError, error_body
from baton.router.settings import RouterSettings


class Guard:
    def __init__(self, app, settings: RouterSettings, drain: Drain):
        self.app, self.s, self.drain = app, settings, drain
        self.keys = [k.encode() for k in settings.api_keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        self.drain.inflight += 1
        try:
            if self.s.max_body_bytes and scope["method"] == "POST":
                body = await _read_body(receive, self.s.max_body_bytes)
                if body is None:
                    await _reply(413, error_body(
                        f"The request body is larger than {self.s.max_body_bytes} bytes.",
                        code="request_too_large"))(scope, receive, send)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            self.drain.inflight -= 1

    def _refusal(self, scope) -> JSONResponse | None:
        if self.drain.draining:
            return _reply(503, error_body(
                "The server is shutting down; retry on another replica.", "server_error",
                code="shutting_down"), retry=True)
        if self.keys and not self._authorized(scope):
            return _reply(401, error_body(
                "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                code="invalid_api_key"))
        limit = self.s.max_inflight_requests
        if limit and scope["method"] == "POST" and self.drain.inflight >= limit:
            return _reply(429, error_body(
                f"Too many requests in flight (limit {limit}); retry later.", "rate_limit_error",
                code="too_many_requests"), retry=True)
        return None

    def _authorized(self, scope) -> bool:
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = auth.partition(b" ")
        key = key.strip()
        # compare_digest against every key: the time taken says nothing about which is close
        ok = [hmac.compare_digest(key, k) for k in self.keys]
        return scheme.lower() == b"bearer" and any(ok)


def check_limits(settings: RouterSettings, req) -> None:
    """400 for a request beyond the operator's limits (the parsed body's n and max_tokens)."""
    if req.n > settings.max_n:
        raise APIError(400, f"n must be at most {settings.max_n}.", param="n")
    limit, asked = settings.max_tokens_limit, req.output_limit
    if limit and asked is not None and asked > limit:
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"{param} must be at most {limit}.", param=param)


def _reply(status: int, body: dict, retry: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    return JSONResponse(body, status_code=status, headers=headers)


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
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
