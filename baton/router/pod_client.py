"""One generate call to a pod's internal API (docs/CONTRACTS.md): open, read frames, close.

A small HTTP/1.1 client for this one call, on an asyncio Protocol, instead of httpx: the
router's hot path. httpx + httpcore + anyio + h11 cost the router more CPU per stream and per
token than everything else it does (a pool walk per request, a cancel scope per read, h11's
event machinery per chunk); this parses the response head, the chunked body and the frames
in one pass over each read. Connections are kept alive and reused per pod (`PodConnections`).

The router asks for msgpack frames (`Accept: application/x-msgpack`) and reads NDJSON lines
from a pod that answers with those instead; either way each frame becomes the same dict.
Closing the stream before its last frame closes its connection: that is how the router
aborts the request at the pod. Every wait has a deadline (connect, response head, each frame,
the body's end).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import deque
from urllib.parse import urlsplit

import msgpack

MSGPACK = "application/x-msgpack"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"  # `baton bench` reads the router's streams with this client too

_END_TIMEOUT_S = 1.0  # for the end of a body whose last frame has come
# A pod (uvicorn) closes a connection idle for 5 s; one idle this long is not reused, so a
# request is not written into a connection the pod is closing at that moment.
_IDLE_REUSE_S = 3.0
_MAX_IDLE_PER_POD = 64
_MAX_TARGETS = 4096  # pod URLs whose request heads are kept made
_PAUSE_FRAMES = 64  # frames read but not taken before reading from the socket pauses (backpressure)
_MAX_HEAD = 64 * 1024
_MAX_CHUNK = 64 * 1024 * 1024  # a frame past this is a broken pod, not a long answer
_MAX_ERROR_BODY = 1024 * 1024


class PodFailed(Exception):
    """The pod could not serve the call (unreachable, 5xx, broken stream, too slow).
    `status`/`body`: the HTTP answer when there was one (not 200, not 4xx)."""

    def __init__(self, message: str, status: int | None = None, body: bytes = b""):
        super().__init__(message)
        self.status, self.body = status, body


class PodRejected(Exception):
    """The pod refused the request itself (HTTP 4xx): another pod would too; tell the client."""

    def __init__(self, status: int, body: dict):
        super().__init__(body.get("error", {}).get("message", f"HTTP {status}"))
        self.status, self.body = status, body


# response states
_HEAD, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _LENGTH, _UNTIL_EOF, _DONE = range(7)


class _Wakeable:
    """A reader waiting, with a deadline, until something changes (a frame, the end, an error):
    one future and one timer per wait; the producer calls _wake()."""

    _waiter: asyncio.Future | None = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(True)

    async def wait(self, timeout_s: float) -> bool:
        """True when woken; False if timeout_s passed first."""
        fut = self._waiter = asyncio.get_running_loop().create_future()
        timer = fut.get_loop().call_later(timeout_s, _expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()
            self._waiter = None


class _Connection(_Wakeable, asyncio.Protocol):
    """One keep-alive connection to a pod and the response being read on it.

    data_received parses whatever arrived (head, chunk framing, frames) into `frames`;
    the reader waits on `_waiter` with a timer for its deadline. Reading pauses while
    _PAUSE_FRAMES frames wait to be taken, so a job that stops pulling leaves the pod's
    stream in the TCP buffers, as the router's backpressure wants.
    """

    def __init__(self, pool: PodConnections, key: tuple[str, int]):
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.in_pool = False
        self.buf = bytearray()
        self._paused = False
        self.reset()

    def reset(self) -> None:
        """Ready for the next response on this connection."""
        self.state = _HEAD
        self.got_bytes = False
        self.status = 0
        self.content_type = ""
        self.reusable = True
        self.left = 0  # bytes left of the current chunk, or of a Content-Length body
        self.frames: deque = deque()
        self.error: PodFailed | None = None
        self.body = bytearray()  # an NDJSON line's start, or a non-200 answer's body
        self._unpacker: msgpack.Unpacker | None = None
        self._fed = 0  # bytes given to the unpacker (its tell() must reach them at the end)
        self._lines: str | None = None  # "ndjson" or "sse": frames are lines (SSE: data lines)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # a frame is small and must go now (asyncio sets it for TCP too; say it here)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.state == _DONE or self.in_pool:
            self._fail("bytes after the end of a response")  # never reuse a confused connection
            return
        self.got_bytes = True
        self.buf += data
        try:
            self._parse()
        except (ValueError, msgpack.UnpackException) as e:
            self._fail(f"bad response: {e!r}")
            return
        if len(self.frames) >= _PAUSE_FRAMES and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._lost("the pod closed the connection")
        return False  # close our side too

    def connection_lost(self, exc) -> None:
        self._lost(f"connection lost ({exc!r})" if exc else "the pod closed the connection")

    # -- parsing ------------------------------------------------------------------------------

    def _parse(self) -> None:
        buf, pos = self.buf, 0
        while True:
            state = self.state
            if state == _CHUNK_SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if len(buf) - pos > 1024:
                        raise ValueError("chunk size line too long")
                    break
                size = int(buf[pos:end].split(b";", 1)[0], 16)
                if not 0 <= size <= _MAX_CHUNK:
                    raise ValueError(f"chunk of {size} bytes")
                pos = end + 2
                if size:
                    self.left, self.state = size, _CHUNK_DATA
                else:
                    self.state = _TRAILER
            elif state == _CHUNK_DATA:
                if len(buf) - pos < self.left + 2:
                    break
                end = pos + self.left
                if buf[end:end + 2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                self._feed(buf[pos:end])
                pos, self.state = end + 2, _CHUNK_SIZE
            elif state == _HEAD:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if len(buf) - pos > _MAX_HEAD:
                        raise ValueError("response head too long")
                    break
                self._head(bytes(buf[pos:end]))
                pos = end + 4
            elif state == _TRAILER:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                if end == pos:
                    self._finish()
                pos = end + 2  # a trailer field: skipped
            elif state == _LENGTH:
                n = min(self.left, len(buf) - pos)
                if n:
                    self._feed(buf[pos:pos + n])
                    pos += n
                    self.left -= n
                if self.left:
                    break
                self._finish()
            elif state == _UNTIL_EOF:
                if len(buf) > pos:
                    self._feed(buf[pos:])
                    pos = len(buf)
                break
            else:  # _DONE
                if len(buf) > pos:
                    raise ValueError("bytes after the end of the response")
                break
        if pos:
            del buf[:pos]

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ValueError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
        self.status = int(rest[:3])
        chunked, length, close = False, None, version == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = close or b"close" in value.lower()
            elif name == b"content-type":
                self.content_type = value.decode("latin-1").lower()
        if 100 <= self.status < 200:
            raise ValueError(f"unexpected interim response {self.status}")
        self.reusable = not close
        if self.status == 200:
            if self.content_type.startswith(MSGPACK):
                self._unpacker = msgpack.Unpacker(max_buffer_size=_MAX_CHUNK)
            else:
                self._lines = "sse" if self.content_type.startswith(SSE) else "ndjson"
        if chunked:
            self.state = _CHUNK_SIZE
        elif length is not None:
            self.left, self.state = length, _LENGTH
            if self.status != 200 and length > _MAX_ERROR_BODY:
                raise ValueError(f"an error body of {length} bytes")
        else:
            self.reusable, self.state = False, _UNTIL_EOF

    def _feed(self, data: bytearray) -> None:
        if self._unpacker is not None:
            self._unpacker.feed(data)
            self._fed += len(data)
            self.frames.extend(self._unpacker)
        elif self._lines:
            body = self.body
            if body:
                body += data
                data = bytes(body)
                body.clear()
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                self._line(data[start:end])
                start = end + 1
            if start < len(data):
                body += data[start:]
        else:
            self.body += data
            if len(self.body) > _MAX_ERROR_BODY:
                raise ValueError("error body too long")

    def _line(self, line) -> None:
        """One line of an NDJSON or SSE body: a frame, or nothing (blank lines; for SSE, lines
        other than data ones, and the `[DONE]` that ends an OpenAI stream before its body does)."""
        if self._lines == "ndjson":
            if line.strip():
                self.frames.append(json.loads(line))
        elif line[:5] == b"data:":
            data = line[5:].strip()
            if data != b"[DONE]":
                self.frames.append(json.loads(data))

    def _finish(self) -> None:
        self.state = _DONE
        if self._lines and self.body:
            self._line(bytes(self.body))
            self.body.clear()
        if self._unpacker is not None and self._unpacker.tell() != self._fed:
            raise ValueError("the body ends inside a frame")

    # -- state changes ------------------------------------------------------------------------

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = PodFailed(why)
        self.reusable = False
        self.close()
        self._wake()

    def _lost(self, why: str) -> None:
        self.closed = True
        if self.in_pool:
            self.pool._forget(self)
        elif self.state == _UNTIL_EOF:
            try:
                self._finish()
            except ValueError as e:
                self.error = PodFailed(f"bad response: {e!r}")
        elif self.state != _DONE and self.error is None:
            self.error = PodFailed(why)
        self._wake()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # -- the reader's side ----------------------------------------------------------------------

    def take(self):
        frame = self.frames.popleft()
        if self._paused and len(self.frames) <= _PAUSE_FRAMES // 2:
            self._paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()
        return frame


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(False)


class PodConnections:
    """Kept-alive connections to pods for generate streams, idle ones per pod.

    `headers`: sent with every request (the internal token). Each stream holds its own
    connection while it runs; a stream that ends cleanly (its body read to the end) gives it
    back for the next request to that pod.
    """

    def __init__(self, headers: dict[str, str], connect_timeout_s: float, path: str = "/internal/generate",
                 accept: str = f"{MSGPACK}, {NDJSON}"):
        self.connect_timeout_s = connect_timeout_s
        self.path, self.accept = path, accept  # `baton bench`: "" (URLs are endpoints) and SSE
        self._extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._targets: dict[str, tuple[tuple[str, int], bytes]] = {}
        self.opened = 0  # connections made so far (tests: reuse)

    def target(self, url: str) -> tuple[tuple[str, int], bytes]:
        """(host, port) and the request head up to Content-Length for `url` + our path."""
        t = self._targets.get(url)
        if t is None:
            if len(self._targets) >= _MAX_TARGETS:  # pods come and go: forget the old ones' heads
                self._targets.clear()
            key, head = self.head(url, self.path, "application/json", self.accept)
            t = self._targets[url] = (key, head + b"Content-Length: ")
        return t

    def head(self, url: str, path: str, content_type: str, accept: str) -> tuple[tuple[str, int], bytes]:
        """(host, port) and a POST's head for `url` + `path`, with our headers, up to the body's
        framing header (which the caller adds)."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise PodFailed(f"{url}: only http:// URLs are served")
        full = (parts.path.rstrip("/") + path) or "/"
        return (parts.hostname, parts.port or 80), (
            f"POST {full} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
            f"Accept: {accept}\r\n{self._extra}").encode("latin-1")

    async def get(self, key: tuple[str, int], fresh: bool = False) -> tuple[_Connection, bool]:
        """A connection to `key`: an idle one (reused: True) unless `fresh`, else a new one."""
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle and not fresh:
            conn = idle.pop()
            conn.in_pool = False
            if not conn.closed and now - conn.idle_since < _IDLE_REUSE_S:
                conn.reset()
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Connection(self, key), *key)
        except (OSError, TimeoutError) as e:
            raise PodFailed(f"connecting to {key[0]}:{key[1]}: {e!r}") from e
        self.opened += 1
        return conn, False

    def put(self, conn: _Connection) -> None:
        """Give back a connection whose response was read to its end."""
        if conn.closed or not conn.reusable or conn.state != _DONE or conn.frames or conn.error:
            conn.close()
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= _MAX_IDLE_PER_POD:
            idle.pop(0).close()  # the oldest
        conn.in_pool, conn.idle_since = True, time.monotonic()
        idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.key]  # a pod gone for good leaves nothing behind
        conn.in_pool = False

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.in_pool = False
                conn.close()
        self._idle.clear()


class PodStream:
    """One generate call: open() sends it and reads the head, next() the frames, close()
    ends it (the pod aborts the request unless its last frame came)."""

    def __init__(self, pods: PodConnections, url: str, body: dict):
        self.pods, self.url, self.body = pods, url, body
        self._conn: _Connection | None = None
        self._ended = False  # the pod sent its last frame (one with a finish_reason)
        self.media_type = ""  # what the server answered in: MSGPACK, NDJSON or SSE

    async def open(self, timeout_s: float) -> None:
        key, head = self.pods.target(self.url)
        payload = json.dumps(self.body).encode()
        request = head + str(len(payload)).encode() + b"\r\n\r\n" + payload
        deadline = time.monotonic() + timeout_s
        conn, reused = await self.pods.get(key)
        self._conn = conn
        conn.transport.write(request)
        await self._head(deadline)
        if conn.error is not None and reused and not conn.got_bytes:
            # the pod closed the idle connection as we wrote into it: once more on a new one
            conn.close()
            self._conn = conn = (await self.pods.get(key, fresh=True))[0]
            conn.transport.write(request)
            await self._head(deadline)
        if conn.error is not None:
            raise PodFailed(f"{self.url}: {conn.error}")
        if conn.status == 200:
            self.media_type = MSGPACK if conn._unpacker is not None else SSE if conn._lines == "sse" else NDJSON
            return
        while conn.state != _DONE and conn.error is None:
            if not await conn.wait(max(0.0, deadline - time.monotonic())):
                break
        raw, status = bytes(conn.body), conn.status
        await self.close()
        if 400 <= status < 500:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            if not isinstance(body, dict):
                body = {"error": {"message": raw.decode(errors="replace") or f"HTTP {status}"}}
            raise PodRejected(status, body)
        raise PodFailed(f"{self.url}: HTTP {status}", status, raw)

    async def _head(self, deadline: float) -> None:
        conn = self._conn
        while conn.state == _HEAD and conn.error is None:
            if not await conn.wait(max(0.0, deadline - time.monotonic())):
                raise PodFailed(f"{self.url}: no response within the deadline")

    async def next(self, timeout_s: float) -> dict | None:
        """The next frame's object, or None at the end of the stream."""
        conn = self._conn
        while not conn.frames:
            if conn.error is not None:
                raise PodFailed(f"{self.url}: {conn.error}")
            if conn.state == _DONE:
                return None
            if not await conn.wait(timeout_s):
                raise PodFailed(f"{self.url}: nothing within {timeout_s:g} s")
        obj = conn.take()
        if not isinstance(obj, dict):
            raise PodFailed(f"{self.url}: a frame that is not an object: {str(obj)[:80]!r}")
        self._ended = obj.get("finish_reason") is not None
        return obj

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._ended and conn.error is None:
                # only the body's end is left: wait for it, so that the connection can carry
                # the next request (closed unread, every request paid a new TCP connection)
                deadline = time.monotonic() + _END_TIMEOUT_S
                while conn.state != _DONE and conn.error is None and not conn.frames:
                    if not await conn.wait(max(0.0, deadline - time.monotonic())):
                        break
        finally:
            self.pods.put(conn)  # closes it unless it ended cleanly: the pod aborts the request


# -- channels: all of this router's requests on a pod over one connection -------------------------

_CHANNEL_PATH = "/internal/channel"
_CHANNEL_HEAD_S = 10.0  # from connecting to the channel's response head
_CHANNEL_WAIT_S = 5.0  # the reader's wait between checks for idleness
_CHANNEL_IDLE_S = 30.0  # a channel no request used this long is closed
_NO_CHANNEL_S = 60.0  # a pod without /internal/channel is served with one stream per request this long
_STREAM_BACKLOG = 64  # frames a request holds unread before new ones merge into the last one


class NoChannel(Exception):
    """The pod does not serve /internal/channel (an older pod): one stream per request."""


class PodChannels:
    """One channel per pod URL, opened at its first request (decode_service/streams.py has the
    pod's side and the wire format). Per engine step the pod writes one frame for all of this
    router's requests there, instead of one frame on each request's own connection."""

    def __init__(self, pods: PodConnections):
        self.pods = pods
        self._open: dict[str, PodChannel] = {}
        self._no_channel: dict[str, float] = {}  # url -> until when it gets per-request streams

    def stream(self, url: str, body: dict) -> ChannelStream | PodStream:
        """A generate call to `url`: on its channel, or its own stream for a pod without one."""
        until = self._no_channel.get(url)
        if until is not None:
            if time.monotonic() < until:
                return PodStream(self.pods, url, body)
            del self._no_channel[url]
        return ChannelStream(self, url, body)

    async def channel(self, url: str) -> PodChannel:
        ch = self._open.get(url)
        if ch is None or ch.closed:
            ch = self._open[url] = PodChannel(self, url)
        await asyncio.shield(ch.opened)  # raises PodFailed or NoChannel; the opener has a deadline
        return ch

    def no_channel(self, url: str) -> None:
        self._no_channel[url] = time.monotonic() + _NO_CHANNEL_S

    def _gone(self, ch: PodChannel) -> None:
        if self._open.get(ch.url) is ch:
            del self._open[ch.url]

    def close(self) -> None:
        for ch in list(self._open.values()):
            ch.task.cancel()
        self._open.clear()


class PodChannel:
    """One open channel: writes commands, reads the pod's batches and hands each frame to its
    request's ChannelStream. When it breaks, every request on it fails (the router retries those
    that had no token yet, as for a broken stream)."""

    def __init__(self, channels: PodChannels, url: str):
        self.channels, self.url = channels, url
        self.streams: dict[str, ChannelStream] = {}
        self.closed = False
        self.last_used = time.monotonic()
        self.conn: _Connection | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future = loop.create_future()
        self.opened.add_done_callback(lambda f: f.cancelled() or f.exception())  # always retrieved
        self.task = loop.create_task(self._run(), name=f"channel {url}")

    def send(self, command: dict) -> None:
        data = msgpack.packb(command)
        self.conn.transport.write(b"%x\r\n%b\r\n" % (len(data), data))  # one chunk of the request body

    async def _run(self) -> None:
        failure: Exception = PodFailed(f"{self.url}: the channel closed")
        try:
            await self._open()
            self.opened.set_result(None)
            await self._read()
        except (PodFailed, NoChannel) as e:
            failure = e if isinstance(e, PodFailed) else PodFailed(f"{self.url}: {e}")
            if not self.opened.done():
                self.opened.set_exception(e)
        except asyncio.CancelledError:
            if not self.opened.done():
                self.opened.set_exception(PodFailed(f"{self.url}: the router is stopping"))
            raise
        finally:
            self.closed = True
            self.channels._gone(self)
            if self.conn is not None:
                self.conn.close()
            for s in list(self.streams.values()):
                s.fail(failure)
            self.streams.clear()

    async def _open(self) -> None:
        pods = self.channels.pods
        key, head = pods.head(self.url, _CHANNEL_PATH, MSGPACK, MSGPACK)
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        deadline = time.monotonic() + _CHANNEL_HEAD_S
        self.conn = conn = (await pods.get(key, fresh=True))[0]  # its own: never pooled
        conn.transport.write(head)
        while conn.state == _HEAD and conn.error is None:
            if not await conn.wait(max(0.0, deadline - time.monotonic())):
                raise PodFailed(f"{self.url}: no answer to the channel within {_CHANNEL_HEAD_S:g} s")
        if conn.error is not None:
            raise conn.error
        if conn.status in (404, 405):
            self.channels.no_channel(self.url)
            raise NoChannel(f"HTTP {conn.status} for {_CHANNEL_PATH}")
        if conn.status != 200 or conn._unpacker is None:
            raise PodFailed(f"{self.url}: HTTP {conn.status} ({conn.content_type or 'no type'}) for a channel",
                            conn.status)

    async def _read(self) -> None:
        conn, streams = self.conn, self.streams
        while True:
            while conn.frames:
                batch = conn.take()
                if not isinstance(batch, list):
                    raise PodFailed(f"{self.url}: a channel frame that is not a list: {str(batch)[:80]!r}")
                for pair in batch:
                    s = streams.get(pair[0])
                    if s is not None:  # else: a request the router has let go
                        s.put(pair[1])
            if conn.error is not None:
                raise conn.error
            if conn.state == _DONE:
                raise PodFailed(f"{self.url}: the pod ended the channel")
            if not await conn.wait(_CHANNEL_WAIT_S) and not streams:
                if time.monotonic() - self.last_used > _CHANNEL_IDLE_S:
                    return  # idle: closed (the pod has nothing open on it)


class ChannelStream(_Wakeable):
    """One generate call on a pod's channel, with PodStream's open/next/close: open() sends the
    command, next() gives the request's frames as they come, close() before its last frame
    sends an abort (the pod frees the request)."""

    def __init__(self, channels: PodChannels, url: str, body: dict):
        self.channels, self.url, self.body = channels, url, body
        self.rid: str = body["request_id"]
        self.frames: deque = deque()
        self.error: PodFailed | None = None
        self._channel: PodChannel | None = None
        self._ended = False
        self._own: PodStream | None = None  # a pod without channels
        self.media_type = MSGPACK

    async def open(self, timeout_s: float) -> None:
        try:
            ch = await self.channels.channel(self.url)
        except NoChannel:
            self._own = PodStream(self.channels.pods, self.url, self.body)
            await self._own.open(timeout_s)
            self.media_type = self._own.media_type
            return
        if ch.closed:  # it broke while this request waited for it to open
            raise PodFailed(f"{self.url}: the channel closed")
        if self.rid in ch.streams:
            raise PodFailed(f"{self.url}: request id {self.rid!r} is already open on this channel")
        ch.streams[self.rid] = self
        self._channel = ch
        ch.send({"generate": self.body})

    def put(self, frame) -> None:
        frames = self.frames
        if not isinstance(frame, dict):
            self.fail(PodFailed(f"{self.url}: a frame that is not an object: {str(frame)[:80]!r}"))
            return
        last = frames[-1] if len(frames) >= _STREAM_BACKLOG else None
        if last is not None and "token_ids" in frame and "token_ids" in last and not last.get("finish_reason"):
            # its reader is behind (backpressure): hold tokens, not one object per step
            last["token_ids"] += frame["token_ids"]
            if frame.get("logprobs") is not None:
                last["logprobs"] = (last.get("logprobs") or []) + frame["logprobs"]
            last["finish_reason"] = frame.get("finish_reason")
        else:
            frames.append(frame)
        self._wake()

    def fail(self, error: PodFailed) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    async def next(self, timeout_s: float) -> dict | None:
        """The next frame's object (None never: a channel's request ends with its last frame)."""
        if self._own is not None:
            return await self._own.next(timeout_s)
        while not self.frames:
            if self.error is not None:
                raise self.error
            if not await self.wait(timeout_s):
                raise PodFailed(f"{self.url}: nothing within {timeout_s:g} s")
        frame = self.frames.popleft()
        status = frame.pop("status", None)
        if status is not None:  # the pod did not start the request
            self._ended = True
            if 400 <= status < 500:
                raise PodRejected(status, frame)
            raise PodFailed(f"{self.url}: HTTP {status}: {frame.get('error', {}).get('message', '')}", status)
        self._ended = frame.get("finish_reason") is not None or "error" in frame
        return frame

    async def close(self) -> None:
        if self._own is not None:
            await self._own.close()
            return
        ch, self._channel = self._channel, None
        if ch is None:
            return
        if ch.streams.get(self.rid) is self:
            del ch.streams[self.rid]
        ch.last_used = time.monotonic()
        if not self._ended and not ch.closed:
            ch.send({"abort": self.rid})
