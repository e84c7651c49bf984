"""One generate call to a pod's internal API (docs/CONTRACTS.md): open, read NDJSON lines, close.

Closing the stream before its last line is how the router aborts the request at the pod.
"""

from __future__ import annotations

import asyncio
import json

import httpx


class PodFailed(Exception):
    """The pod could not serve the call (unreachable, 5xx, broken stream, too slow)."""


class PodRejected(Exception):
    """The pod refused the request itself (HTTP 4xx): another pod would too; tell the client."""

    def __init__(self, status: int, body: dict):
        super().__init__(body.get("error", {}).get("message", f"HTTP {status}"))
        self.status, self.body = status, body


_TRANSPORT_ERRORS = (httpx.HTTPError, OSError, TimeoutError)
_END_TIMEOUT_S = 1.0  # for the end of a body whose last line has come


def _honour_cancel() -> None:
    """Raise if this task was cancelled while its wait_for finished anyway.

    Python 3.11's asyncio.wait_for returns the result when a cancel arrives just as the
    awaited thing completes, and the cancel is lost. A job whose client left then went on
    reading the pod's stream to the end: the pod generated every token nobody wanted.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class PodStream:
    def __init__(self, http: httpx.AsyncClient, url: str, body: dict):
        self.http, self.url, self.body = http, url, body
        self._resp: httpx.Response | None = None
        self._lines = None
        self._ended = False  # the pod sent its last line (one with a finish_reason)

    async def open(self, timeout_s: float) -> None:
        req = self.http.build_request("POST", f"{self.url}/internal/generate", json=self.body)
        try:
            self._resp = await asyncio.wait_for(self.http.send(req, stream=True), timeout_s)
        except _TRANSPORT_ERRORS as e:
            raise PodFailed(f"{self.url}: {e!r}") from e
        _honour_cancel()  # after self._resp is set: the caller's close() still closes it
        status = self._resp.status_code
        if status != 200:
            try:
                raw = await asyncio.wait_for(self._resp.aread(), timeout_s)
            except _TRANSPORT_ERRORS:
                raw = b""
            await self.close()
            if 400 <= status < 500:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"error": {"message": raw.decode(errors="replace") or f"HTTP {status}"}}
                raise PodRejected(status, body)
            raise PodFailed(f"{self.url}: HTTP {status}")
        self._lines = self._resp.aiter_lines()

    async def next(self, timeout_s: float) -> dict | None:
        """The next line's object, or None at the end of the stream."""
        while True:
            try:
                line = await asyncio.wait_for(anext(self._lines), timeout_s)
            except StopAsyncIteration:
                return None
            except _TRANSPORT_ERRORS as e:
                raise PodFailed(f"{self.url}: {e!r}") from e
            _honour_cancel()
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise PodFailed(f"{self.url}: bad line {line[:80]!r}") from e
                self._ended = obj.get("finish_reason") is not None
                return obj

    async def close(self) -> None:
        if self._resp is not None:
            resp, self._resp = self._resp, None
            try:
                if self._ended:
                    # only the body's end is left: read it, so that the connection goes back to
                    # the pool. Closed unread, it is dropped, and every request paid a new TCP
                    # connection to its pod (at 50 requests/s, connect timeouts and 503s)
                    await asyncio.wait_for(self._rest(), _END_TIMEOUT_S)
            except (*_TRANSPORT_ERRORS, PodFailed):
                pass  # the connection is closed below instead: nothing is lost but the reuse
            finally:
                await resp.aclose()

    async def _rest(self) -> None:
        async for line in self._lines:
            if line.strip():
                raise PodFailed(f"{self.url}: a line after the last one")
