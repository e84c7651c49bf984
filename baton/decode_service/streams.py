"""How a decode pod sends a request's tokens: one HTTP stream per request, or a channel.

`Feed` turns one request's engine outputs into frames (the metrics, the outputs that piled
up merged into one frame, how the request ended, freeing it after). Two ways to send them:

- `stream()`: the body of one `/internal/generate` response (NDJSON or msgpack), one request
  per connection. For anyone: curl, tests, older routers.
- `Channel`: `/internal/channel`, one connection per router for all of that router's requests
  on this pod. The router writes msgpack commands (`{"generate": body}`, `{"abort": id}`) into
  the request body as it goes; the pod writes ONE msgpack array of `[request_id, frame]` pairs
  per engine step into the response. Per request and per step, a stream costs the pod a task
  wake-up, Starlette's response path and a socket write under the engine thread's GIL, and the
  router a read and a parse; a channel costs that once per step (issue 23).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import msgpack

from baton.pod.engine_loop import EngineFailure, EngineLoop
from baton.pod.http import error_body
from baton.pod.metrics import PodMetrics

log = logging.getLogger("baton.decode")

CHECK_S = 1.0  # how often a channel looks for requests past token_timeout_s
_MAX_COMMAND = 64 * 1024 * 1024  # one generate command's bytes at most


class Feed:
    """One request's outputs as frames, and its end.

    add() takes an engine output (merged into the frame not yet taken), take() gives what is
    to be written, end() counts how the request ended and lets the engine forget it (or aborts
    it there, and cancels the KV transfer of a disaggregated request still receiving).
    """

    __slots__ = ("loop", "m", "rid", "task", "start", "last", "heard", "first", "status", "line", "failure",
                 "pending", "ended")

    def __init__(self, loop: EngineLoop, m: PodMetrics, rid: str):
        self.loop, self.m, self.rid = loop, m, rid
        self.task: asyncio.Future | None = None  # a disaggregated request's KV receive (run_work)
        self.start = self.last = self.heard = time.perf_counter()
        self.first = True
        self.status = "abort"  # until it ends otherwise
        self.line: dict | None = None  # tokens not yet taken
        self.failure: dict | None = None  # the last frame when it failed
        self.pending = 0  # outputs merged since the last take (the engine loop's stall check)
        self.ended = False

    def add(self, item) -> bool:
        """Merge one output; True when it was the request's last."""
        self.pending += 1
        self.heard = now = time.perf_counter()
        if isinstance(item, EngineFailure) or item.error:  # the engine failed it (it alone)
            self.status = "error"
            message = item.message if isinstance(item, EngineFailure) else item.error
            self.failure = {"error": {"message": message, "type": "engine_error"}}
            return True
        m = self.m
        if self.first:
            m.ttft.observe(now - self.start)
            m.prompt_tokens.inc(item.num_prompt_tokens)
            m.cached_tokens.inc(item.num_cached_tokens)
            self.first = False
        else:
            m.itl.observe(now - self.last)
        self.last = now
        m.generation_tokens.inc(len(item.new_token_ids))
        line = self.line
        if line is None:
            self.line = {"token_ids": list(item.new_token_ids),
                         "logprobs": None if item.new_logprobs is None else list(item.new_logprobs),
                         "finish_reason": item.finish_reason, "num_cached_tokens": item.num_cached_tokens,
                         "num_prompt_tokens": item.num_prompt_tokens}
        else:
            line["token_ids"] += item.new_token_ids
            if item.new_logprobs is not None:
                line["logprobs"] = (line["logprobs"] or []) + item.new_logprobs
            line["finish_reason"] = item.finish_reason
        if item.finish_reason:
            self.status = item.finish_reason
            m.e2e.observe(now - self.start)
            return True
        return False

    def timed_out(self, timeout_s: float) -> None:
        self.status = "timeout"
        log.warning("request %s: no token for %.0f s, aborted", self.rid, timeout_s)
        self.failure = {"error": {"message": f"no token within {timeout_s} s", "type": "timeout"}}

    def take(self) -> list[dict]:
        """The frames to write now: the merged tokens, then the error that ended it, if any."""
        out = [] if self.line is None else [self.line]
        if self.failure is not None:
            out.append(self.failure)
            self.failure = None
        self.line, self.pending = None, 0
        return out

    def end(self) -> None:
        """Once: count it; free what it holds (no await: this runs in cancelled code too)."""
        if self.ended:
            return
        self.ended = True
        self.m.requests.labels(status=self.status).inc()
        task, loop, rid = self.task, self.loop, self.rid
        if self.status in ("stop", "length"):
            loop.release(rid)
        elif task is not None and not task.done():
            # free the blocks only once the transfer is cancelled and no scatter still writes
            task.cancel()
            task.add_done_callback(lambda _: loop.abort(rid))
        else:  # client gone, timeout or error: free the request's blocks now
            loop.abort(rid)


def run_work(feed: Feed, sink, work: Callable[[], Awaitable]) -> None:
    """Start a disaggregated request's KV receive as a task of its own (cancelled by end());
    its failure reaches the request's outputs."""
    feed.task = task = asyncio.ensure_future(work())
    task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or sink.put_nowait(
        EngineFailure(f"receiving the prompt's KV failed: {t.exception()!r}")))


async def stream(feed: Feed, q: asyncio.Queue, timeout_s: float, encode):
    """The frames of one /internal/generate response until the request ends; aborted on any
    early exit (drain.StreamingResponse closes this once the client has gone)."""
    loop, rid = feed.loop, feed.rid
    try:
        while True:
            if q.empty():
                try:  # a timer, not wait_for's task per token
                    async with asyncio.timeout(timeout_s):
                        item = await q.get()
                except TimeoutError:
                    if loop.queued(rid):
                        continue  # waiting for room in the batch: only time running counts
                    feed.timed_out(timeout_s)
                    for frame in feed.take():
                        yield encode(frame)
                    return
            else:
                item = q.get_nowait()
            # Steps that came while the last frame was written go out as ONE frame (one write,
            # one parse in the router): under load a per-token write is what falls behind.
            done = feed.add(item)
            while not done and not q.empty():
                done = feed.add(q.get_nowait())
            for frame in feed.take():
                yield encode(frame)
            if done:
                return
    finally:
        feed.end()


class Refused(Exception):
    """A generate call the pod will not start: HTTP `status`, OpenAI-shaped `body`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = error_body(message, param, type_)


class _Sink:
    """Where the engine loop puts a channel request's outputs (an asyncio.Queue's two methods)."""

    __slots__ = ("channel", "feed")

    def __init__(self, channel: Channel, feed: Feed):
        self.channel, self.feed = channel, feed

    def put_nowait(self, item) -> None:
        self.channel.put(self.feed, item)

    def qsize(self) -> int:  # outputs not yet written: grows only while the router stops reading
        return self.feed.pending


# start(body, make_sink) -> (its Feed, its sink) once the request is on the engine; raises Refused
Starter = Callable[[dict, Callable[[Feed], object]], Awaitable[tuple]]


class Channel:
    """One router's connection for all its requests on this pod (an ASGI app per channel).

    Ends when the router closes it (every request still open on it is aborted), or when the
    pod drains and nothing is left on it. Every request started on it counts as in flight for
    the drain until it ends, as a stream's connection does.
    """

    def __init__(self, loop: EngineLoop, drain, start: Starter, timeout_s: float):
        self.loop, self.drain, self.start, self.timeout_s = loop, drain, start, timeout_s
        self.feeds: dict[str, Feed] = {}
        self.ready: dict[str, Feed] = {}  # feeds with frames to write, in order of readiness
        self.refusals: list[list] = []  # [request_id, error frame] of generates not started
        self.starting: dict[str, asyncio.Task] = {}
        self.wake = asyncio.Event()
        self.reading = True  # the router may still send commands
        self.disconnected = False  # the router went away
        self.broken = False  # the router sent what is not a command: the channel ends (its requests aborted)

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-msgpack")]})
        reader = asyncio.ensure_future(self._read(receive))
        reader.add_done_callback(self._reader_done)
        try:
            gone = await self._write(send)
        except OSError:  # the router's connection broke under a write
            gone = True
        finally:
            reader.cancel()
            for task in self.starting.values():
                task.cancel()
            for feed in list(self.feeds.values()):
                self._end(feed)
        if not gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _reader_done(self, task: asyncio.Task) -> None:
        self.reading = False
        if not task.cancelled() and task.exception() is not None:
            log.warning("channel: bad commands from the router (%r); closing it", task.exception())
            self.broken = True
        self.wake.set()

    async def _read(self, receive) -> None:
        # int map keys: logit_bias's token ids (JSON made them strings; SamplingParams takes both)
        unpacker = msgpack.Unpacker(max_buffer_size=_MAX_COMMAND, strict_map_key=False)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                return
            unpacker.feed(message.get("body", b""))
            for command in unpacker:
                self._command(command)
            if not message.get("more_body", False):
                return

    def _command(self, command) -> None:
        if not isinstance(command, dict):
            raise ValueError(f"a command that is not a map: {str(command)[:80]!r}")
        if "abort" in command:
            rid = command["abort"]
            task = self.starting.pop(rid, None)
            if task is not None:
                task.cancel()
            feed = self.feeds.get(rid)
            if feed is not None:
                self._end(feed)  # status "abort": the engine drops it, its blocks are freed
        elif "generate" in command:
            body = command["generate"]
            rid = body.get("request_id") if isinstance(body, dict) else None
            if not isinstance(rid, str) or rid in self.starting or rid in self.feeds:
                self._refuse(rid if isinstance(rid, str) else "", Refused(400, "a generate command needs a "
                             "request_id not in use on this channel", param="request_id"))
                return
            self.starting[rid] = asyncio.ensure_future(self._start(rid, body))
        else:
            raise ValueError(f"unknown command {sorted(command)[:4]!r}")

    async def _start(self, rid: str, body: dict) -> None:
        try:
            if self.drain.draining:
                raise Refused(503, "the pod is shutting down", "service_unavailable")
            feed, _ = await self.start(body, lambda f: _Sink(self, f))
            self.feeds[rid] = feed
            self.drain.inflight += 1
        except Refused as e:
            self._refuse(rid, e)
        except Exception as e:  # noqa: BLE001 — reported on the channel, the pod goes on
            log.exception("request %s: could not start", rid)
            self._refuse(rid, Refused(500, f"the pod could not start the request: {e!r}", "server_error"))
        finally:
            self.starting.pop(rid, None)

    def _refuse(self, rid: str, e: Refused) -> None:
        self.refusals.append([rid, {**e.body, "status": e.status}])
        self.wake.set()

    def put(self, feed: Feed, item) -> None:
        """An engine output for one of this channel's requests (on the event loop)."""
        if feed.ended:
            return
        done = feed.add(item)
        self.ready[feed.rid] = feed
        if done:
            self._end(feed)
        self.wake.set()

    def _end(self, feed: Feed) -> None:
        if self.feeds.pop(feed.rid, None) is not None:
            self.drain.inflight -= 1
        feed.end()

    def _expire(self) -> None:
        now = time.perf_counter()
        for feed in list(self.feeds.values()):
            if now - feed.heard > self.timeout_s:
                if self.loop.queued(feed.rid):
                    feed.heard = now  # waiting for room in the batch: only time running counts
                    continue
                feed.timed_out(self.timeout_s)
                self.ready[feed.rid] = feed
                self._end(feed)

    async def _write(self, send) -> bool:
        """Frames until the channel ends; True if the router went away."""
        check = time.monotonic() + CHECK_S
        while True:
            if self.disconnected or self.broken:
                return self.disconnected
            now = time.monotonic()
            if now >= check:  # also on a channel never idle for CHECK_S
                self._expire()
                check = now + CHECK_S
            if not self.ready and not self.refusals:
                if not self.feeds and not self.starting and (not self.reading or self.drain.draining):
                    return False
                self.wake.clear()
                try:
                    async with asyncio.timeout(check - now):
                        await self.wake.wait()
                except TimeoutError:
                    pass
                continue
            batch = self.refusals
            self.refusals = []
            for rid, feed in self.ready.items():
                for frame in feed.take():
                    batch.append([rid, frame])
            self.ready.clear()
            if batch:
                await send({"type": "http.response.body", "body": msgpack.packb(batch), "more_body": True})

