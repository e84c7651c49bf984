"""Graceful drain on SIGTERM, one rule for every service: refuse new work, finish what runs, exit 0.

uvicorn alone, on SIGTERM, closes its listener at once (new clients get "connection refused",
not an answer a load balancer or a retrying client understands), waits for open responses
up to its own timeout, and then re-raises the signal, so the process ends killed by SIGTERM
rather than with status 0. `DrainingServer` instead marks the service draining: its /ready
answers 503 and its gate answers new work with 503 + Retry-After, while the listener stays
open and the requests in flight (streams included) run to their end or to `timeout_s`. Only
then does uvicorn's own shutdown run (lifespan shutdown included). A second SIGTERM, or
SIGINT, is uvicorn's usual immediate shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable

import uvicorn
from starlette import responses

from baton.gc_pauses import freeze_startup

log = logging.getLogger("baton.drain")

STARTUP_FAILURE = 3  # the exit status uvicorn.run gives a failed start-up
RETRY_AFTER_S = 1  # what a refused client is told to wait (429, 503) before trying again
# uvicorn times out idle keep-alive connections but not a request's headers: a client that
# sends half a request line and waits held its connection forever (issue 25).
HEADER_TIMEOUT_S = 10.0
_POLL_S = 0.05


class StreamingResponse(responses.StreamingResponse):
    """Starlette's, plus: the body's generator is closed when the response ends, however it ends.

    When the client goes away, Starlette cancels the task that iterates the body. A generator
    suspended at its `yield` at that moment (most of a stream's life) is left as it is, and its
    `finally` (which frees the request's KV on a pod, and stops the pod streams in the router)
    ran only when the garbage collector reached it: seconds later, or never on an idle process.

    `watch_client=False`: the caller watches for the client's disconnect itself and ends the
    body then (the router: one watcher per request feeds its event queue), so no task group and
    disconnect listener of Starlette's run beside the stream (anyio cancel scopes: a tenth of a
    router's CPU per streamed request, issue 23).
    """

    def __init__(self, *args, watch_client: bool = True, **kw):
        super().__init__(*args, **kw)
        self.watch_client = watch_client

    async def __call__(self, scope, receive, send) -> None:
        try:
            if self.watch_client:
                await super().__call__(scope, receive, send)
            else:
                # a write to a closed connection: uvicorn drops it (or raises OSError, ASGI 2.4)
                try:
                    await self.stream_response(send)
                except OSError:
                    pass
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()  # no-op on a generator that has ended


class Drain:
    """The drain state of one service: the flag the gates read and the count they keep."""

    def __init__(self, timeout_s: float = 30.0, on_start: Callable[[], Awaitable[None]] | None = None):
        self.timeout_s = timeout_s
        self.on_start = on_start  # e.g. a pod leaving the registry, so routers stop picking it
        self.draining = False
        self.inflight = 0

    async def wait_idle(self) -> bool:
        """True once nothing is in flight; False if `timeout_s` passed first."""
        deadline = time.monotonic() + self.timeout_s
        while self.inflight > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:  # the app's start-up (a pod's engine) is done: its objects stay
            freeze_startup()

    def handle_exit(self, sig, frame) -> None:
        if sig != signal.SIGTERM or self.drain.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        # Runs as a signal handler on the loop's own thread: only flip state, schedule the rest.
        self.drain.draining = True
        self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        self._task = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        d = self.drain
        log.info("SIGTERM: draining %d request(s) in flight (up to %.0f s)", d.inflight, d.timeout_s)
        if d.on_start is not None:
            try:
                await asyncio.wait_for(d.on_start(), d.timeout_s)
            except Exception:  # leaving the registry late is no reason not to drain; say so
                log.exception("drain: on_start hook failed")
        if await d.wait_idle():
            log.info("drain: nothing in flight; shutting down")
        else:
            log.warning("drain: %d request(s) still in flight after %.0f s; cancelling them",
                        d.inflight, d.timeout_s)
            self.config.timeout_graceful_shutdown = 1
        self.should_exit = True


def serve(app, drain: Drain, header_timeout_s: float = HEADER_TIMEOUT_S, reuse_port: bool = False,
          **uvicorn_kw) -> None:
    """uvicorn.run(app, **uvicorn_kw), with drain on SIGTERM and a connection closed when its
    request's headers have not all come `header_timeout_s` after it opened or after its last
    response (blocks)."""
    uvicorn_kw.setdefault("http", "httptools")  # a dependency: not h11 (pyproject.toml says why)
    config = uvicorn.Config(app, **uvicorn_kw)
    config.load()
    config.http_protocol_class = _with_header_deadline(config.http_protocol_class, header_timeout_s)
    # Bind the port before the app starts: a pod's start-up opens UCX, whose transports
    # listen on ephemeral ports of their own and could take the one we were given.
    sock = _bind_reusing_port(config) if reuse_port else config.bind_socket()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # bind_socket leaves the protocol number 0, and asyncio turns TCP_NODELAY on for the
        # connections it accepts only when it reads IPPROTO_TCP there: without it every
        # kept-alive response after the first waited ~40 ms (Nagle + delayed ACK; issue 23)
        sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
    server = DrainingServer(config, drain)
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn (0.54 here) raises SystemExit(3) when start-up fails
        if server.started:
            raise
    if not server.started:
        # Start-up failed (uvicorn logged why). Exit now, non-zero, as uvicorn.run does: threads
        # the failed start left behind (ucxx's notifier is not a daemon) would keep the
        # process alive, and a supervisor waiting for it to be ready would wait out its timeout.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(STARTUP_FAILURE)


def _bind_reusing_port(config: uvicorn.Config) -> socket.socket:
    """The listening socket with SO_REUSEPORT: several processes bound to one port, and the
    kernel spreads new connections over them (`baton router --workers N`)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as e:
        log.error("cannot bind %s:%d: %s", config.host, config.port, e)
        sys.exit(STARTUP_FAILURE)
    sock.set_inheritable(True)
    return sock


def _with_header_deadline(protocol: type, timeout_s: float) -> type:
    """uvicorn's HTTP protocol class (h11 or httptools), closing a connection that has no
    request in progress `timeout_s` after it opened or after its last response completed:
    both set `cycle` once a request's headers are in."""

    class HeaderDeadline(protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._header_deadline)

        def _header_deadline(self) -> None:
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline
