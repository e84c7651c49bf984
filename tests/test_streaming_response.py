"""A streamed response's generator ends when its client goes away, not when the GC gets to it.

Starlette cancels the task that iterates the body once the client disconnects; a generator
suspended at its `yield` then kept its `finally` (free the request's KV, stop its pod streams)
for the garbage collector. CI caught it as an abort the pod counted seconds late, or never.
Driven through the ASGI interface, both ways a server reports a gone client: an
`http.disconnect` message (ASGI < 2.4, uvicorn's) and an OSError from `send` (ASGI >= 2.4).
"""

from __future__ import annotations

import asyncio
import gc

import pytest
from starlette.responses import StreamingResponse as StarlettesOwn

from baton.drain import StreamingResponse


async def _serve_until_gone(response_cls, spec_version: str) -> list[str]:
    events: list[str] = []
    sent_one = asyncio.Event()

    async def body():
        try:
            while True:
                yield b"token\n"  # suspended here while the chunk is written
                events.append("resumed")
        finally:
            events.append("finally")

    async def receive():
        await sent_one.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            if sent_one.is_set():
                if spec_version == "2.4":
                    raise OSError("the client is gone")
                await asyncio.sleep(3600)  # a write that never completes; cancelled on disconnect
            sent_one.set()
            await asyncio.sleep(0)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}
    response = response_cls(body())
    try:
        await asyncio.wait_for(response(scope, receive, send), 5)
    except Exception as e:  # ClientDisconnect under ASGI 2.4
        events.append(type(e).__name__)
    events.append("returned")
    return events


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_the_generator_is_closed_when_the_client_goes(spec_version):
    gc.disable()  # the GC must not be what closes it
    try:
        events = asyncio.run(_serve_until_gone(StreamingResponse, spec_version))
        assert events.index("finally") < events.index("returned"), events
        # and the check can fail: Starlette's own leaves the generator suspended
        own = asyncio.run(_serve_until_gone(StarlettesOwn, spec_version))
        assert "finally" not in own[:own.index("returned")], own
    finally:
        gc.enable()
