"""One streaming OpenAI request, timed: SSE chunks in, a `RequestRecord` and the answer text out.

Not the openai client: the timing must start at the send and see each SSE chunk as it
arrives, without a client library's retries or parsing in between.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import httpx

from baton.bench.metrics import RequestRecord
from baton.router.pod_client import SSE, PodConnections, PodFailed, PodRejected, PodStream

_MAX_ERROR_CHARS = 500


def chunk_text(chunk: dict) -> str:
    """The output text a stream chunk carries (chat delta or completion text), or ""."""
    out = ""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        if delta is not None:
            out += (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        else:
            out += choice.get("text") or ""
    return out


class Client:
    """HTTP for `baton bench`: http:// URLs through the router's own small asyncio HTTP/1.1
    client (`baton/router/pod_client.py`, reading SSE), https:// (and `kind` "httpx") through
    httpx.

    Not httpx for plain HTTP because a benchmark's client must not be the limit it measures:
    httpx + httpcore + anyio + h11 cost ~125 µs of CPU per streamed chunk on the CPU machine
    (cProfile of `baton bench` at concurrency 128: most of it per-chunk machinery), so one
    client process topped out below what one GPU pod serves.
    """

    def __init__(self, headers: dict, timeout_s: float, kind: str = "asyncio"):
        self.headers, self.timeout_s, self.kind = headers, timeout_s, kind
        self.plain = PodConnections(headers, timeout_s, path="", accept=SSE)
        self._tls: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        self.plain.close()
        if self._tls is not None:
            await self._tls.aclose()

    async def chunks(self, url: str, body: dict) -> AsyncIterator[dict | None]:
        """None once the response head says 200, then the stream's chunks as objects (no
        `[DONE]`); raises `Refused` for another status."""
        if url.startswith("https://") or self.kind == "httpx":
            async for chunk in self._httpx_chunks(url, body):
                yield chunk
            return
        stream = PodStream(self.plain, url, body)
        try:
            try:
                await stream.open(self.timeout_s)
            except PodRejected as e:
                raise Refused(e.status, json.dumps(e.body)) from None
            except PodFailed as e:
                if e.status is None:
                    raise
                raise Refused(e.status, e.body.decode("utf-8", "replace")) from None
            yield None
            while (chunk := await stream.next(self.timeout_s)) is not None:
                yield chunk
        finally:
            await stream.close()

    async def _httpx_chunks(self, url: str, body: dict) -> AsyncIterator[dict | None]:
        if self._tls is None:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            # trust_env=False: a proxy from the environment must not sit between us and the server
            self._tls = httpx.AsyncClient(timeout=self.timeout_s, limits=limits, headers=self.headers,
                                          trust_env=False)
        async with self._tls.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                raise Refused(resp.status_code, (await resp.aread()).decode("utf-8", "replace"))
            yield None
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                yield json.loads(data)


class Refused(Exception):
    """The server answered with a status other than 200."""

    def __init__(self, status: int, raw: str):
        super().__init__(raw)
        self.status, self.raw = status, raw


async def send(client: Client, url: str, body: dict, timeout_s: float, record: RequestRecord) -> str:
    """Stream `body` to `url`, fill `record`'s outcome and timings; return the answer text.

    Never raises for a failed request: the failure is the record's `status`/`error`.
    """
    t0 = time.perf_counter()
    text: list[str] = []
    last: float | None = None
    chunks_with_text = 0
    usage = None
    try:
        async with asyncio.timeout(timeout_s):
            async with aclosing(client.chunks(url, body)) as chunks:
                async for chunk in chunks:
                    if chunk is None:
                        record.status = 200
                        continue
                    if "error" in chunk:
                        record.error = _message(chunk, str(chunk))
                        return "".join(text)
                    now = time.perf_counter()
                    if piece := chunk_text(chunk):
                        if last is None:
                            record.ttft_s = now - t0
                        else:
                            record.itl_s.append(now - last)
                        last = now
                        chunks_with_text += 1
                        text.append(piece)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
    except Refused as e:
        record.status = e.status
        record.error = _error_message(e.raw)
        return ""
    except TimeoutError:
        record.error = f"timeout after {timeout_s:g}s"
        return "".join(text)
    except (httpx.HTTPError, PodFailed, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]
        return "".join(text)
    record.e2e_s = time.perf_counter() - t0
    if usage is None:
        record.usage_missing = True
        record.output_tokens = chunks_with_text
    else:
        record.prompt_tokens = usage.get("prompt_tokens")
        record.output_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details") or {}
        record.cached_tokens = details.get("cached_tokens") or 0
    record.ok = True
    return "".join(text)


def _error_message(raw: str) -> str:
    try:
        return _message(json.loads(raw), raw)
    except json.JSONDecodeError:
        return raw[:_MAX_ERROR_CHARS]


def _message(obj, raw: str) -> str:
    """An OpenAI error body's message (`{"error": {"message": ...}}`), else `raw`; cut short."""
    err = obj.get("error") if isinstance(obj, dict) else None
    msg = err.get("message") if isinstance(err, dict) else err
    return str(msg or raw)[:_MAX_ERROR_CHARS]
