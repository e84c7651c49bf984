"""One streaming OpenAI request, timed: SSE chunks in, a `RequestRecord` and the answer text out.

httpx rather than the openai client: the timing must start at the send and see each SSE
chunk as it arrives, without a client library's retries or parsing in between.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from baton.bench.metrics import RequestRecord

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


async def send(http: httpx.AsyncClient, url: str, body: dict, timeout_s: float,
               record: RequestRecord) -> str:
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
            async with http.stream("POST", url, json=body) as resp:
                record.status = resp.status_code
                if resp.status_code != 200:
                    raw = (await resp.aread()).decode("utf-8", "replace")
                    record.error = _error_message(raw)
                    return ""
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event: lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        record.error = _error_message(data)
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
    except TimeoutError:
        record.error = f"timeout after {timeout_s:g}s"
        return "".join(text)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
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
        err = json.loads(raw).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
    except (json.JSONDecodeError, AttributeError):
        msg = raw
    return str(msg or raw)[:_MAX_ERROR_CHARS]
