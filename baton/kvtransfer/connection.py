"""One UCX endpoint speaking the protocol: control frames on the endpoint's tag, payloads by seq.

Shared by both sides. The sender and the receiver add what each must do with a message.
Everything here runs on the ucxx event loop.

Control frames go out in the order `send_control` is called. Each send is its own task, and
asyncio starts tasks in creation order (FIFO `call_soon`). ucxx's `Endpoint.send` submits
the UCX request in the task's first step, before its first await. UCX keeps one endpoint's
sends with one tag in order, so the peer matches the frames in call order. Payloads do not
need that: each has its own tag (see protocol.py).

Control frames come in through `control_recvs` recvs posted at once, a ring of buffers read
in posting order. UCX matches a tag's incoming messages to its posted recvs in the order
they were posted, so frame k lands in ring slot k mod depth. With one recv posted, each
frame costs a round trip through ucxx's notifier thread and the loop before the next recv
is even posted: one LAYER header per wake-up, which capped the receiver at a few thousand
payloads a second. With several posted, the frames that arrived meanwhile are all read in
one wake-up. The receiver posts 16; the sender, which hears little, one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque

import numpy as np

from baton.kvtransfer import protocol
from baton.kvtransfer.tasks import TaskSet

log = logging.getLogger(__name__)


class ConnectionLost(Exception):
    """The endpoint failed or was closed. `cause` names the UCX error."""


class Connection:
    def __init__(self, ep, peer: str, control_recvs: int = 1):
        self.ep = ep
        self.peer = peer  # for log lines: "host:port" or the peer's pod id
        self.closed = False
        self.close_reason = ""
        self._control_depth = control_recvs
        self._control_ring: deque[tuple[np.ndarray, asyncio.Task]] = deque()
        self._next_seq = 0
        self._tasks = TaskSet()

    def next_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq

    def spawn(self, coro) -> asyncio.Task:
        """Run `coro` as a task that close() waits for."""
        return self._tasks.spawn(coro)

    def send_control(self, msg: protocol.Message) -> asyncio.Task:
        """Submit one control frame now. The task ends when UCX has sent it.

        A failed send closes the connection. The error also reaches whoever awaits the task.
        """
        frame = protocol.encode(msg)
        task = self.spawn(self.ep.send(frame))
        task.add_done_callback(self._check_send)
        return task

    def _check_send(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.mark_closed(f"control send failed: {_describe(task.exception())}")

    async def recv_control(self) -> protocol.Message:
        """The next control frame. Raises ConnectionLost, or ProtocolError on garbage.

        One reader at a time. A reader that gives up (a timeout) leaves the ring intact: the
        recv it waited for stays posted and the next call reads it.
        """
        if not self._control_ring:
            for _ in range(self._control_depth):
                self._post_control(np.empty(protocol.CONTROL_MAX_BYTES, dtype=np.uint8))
        buf, task = self._control_ring[0]
        try:
            await asyncio.shield(task)  # no suspension when it has already landed
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any UCX error ends the connection, see _describe
            raise self._lost(e) from e
        self._control_ring.popleft()
        msg = protocol.decode(buf)
        self._post_control(buf)
        return msg

    def _post_control(self, buf: np.ndarray) -> None:
        self._control_ring.append((buf, self.spawn(self.ep.recv(buf))))

    async def send_payload(self, seq: int, buf) -> None:
        try:
            await self.ep.send(buf, tag=seq)
        except Exception as e:
            raise self._lost(e) from e

    async def recv_payload(self, seq: int, buf) -> None:
        try:
            await self.ep.recv(buf, tag=seq)
        except Exception as e:
            raise self._lost(e) from e

    def _lost(self, e: BaseException) -> ConnectionLost:
        """A UCX error on this endpoint ends it: marked closed, and what the caller raises."""
        self.mark_closed(_describe(e))
        return ConnectionLost(self.close_reason)

    def mark_closed(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            log.info("kvtransfer connection to %s closed: %s", self.peer, reason)

    async def close(self, reason: str = "closed locally") -> None:
        """Abort the endpoint and wait for every task it spawned.

        Aborting fails the endpoint's pending requests, so the tasks end promptly, and only
        then are their buffers released. UCX never writes into memory we have freed.
        """
        self.mark_closed(reason)
        if self.ep is not None:
            self.ep.abort()
        await self._tasks.wait()


async def create_endpoint(host: str, port: int, timeout: float):
    """`ucxx.create_endpoint`, but a refused connection fails at once.

    ucxx 0.52 loses a race here. When nothing listens on the port, the endpoint error often
    arrives before the peer-info exchange posts its stream recv, and that recv then waits
    out the whole connect timeout (measured: 5 of 8 attempts ran to the timeout, the other 3
    failed in < 10 ms). So this does what ucxx.create_endpoint does, and also watches the
    endpoint's `alive` while the exchange runs. It needs ucxx internals; if those move, it
    falls back to the public call, which is slower to fail but still bounded by `timeout`.
    """
    import ucxx

    try:
        from ucxx._lib import libucxx as ucx_api
        from ucxx._lib_async.endpoint import Endpoint
        from ucxx._lib_async.exchange_peer_info import exchange_peer_info
        from ucxx._lib_async.utils import hash64bits

        ctx = ucxx.core._get_ctx()
    except (ImportError, AttributeError):
        return await asyncio.wait_for(
            ucxx.create_endpoint(host, port, connect_timeout=timeout), timeout
        )

    ctx.continuous_ucx_progress()
    ucx_ep = ucx_api.UCXEndpoint.create(ctx.worker, host, port, True)
    msg_tag = hash64bits("msg_tag", os.urandom(16), ucx_ep.handle)
    exchange = asyncio.ensure_future(
        exchange_peer_info(
            endpoint=ucx_ep, msg_tag=msg_tag, listener=False, connect_timeout=timeout
        )
    )
    deadline = time.monotonic() + timeout
    try:
        while not exchange.done():
            await asyncio.wait([exchange], timeout=0.01)
            if not exchange.done():
                if not ucx_ep.alive:
                    ucx_ep.raise_on_error()
                    raise ConnectionLost(f"{host}:{port} is not reachable")
                if time.monotonic() > deadline:
                    raise TimeoutError()
        peer_info = exchange.result()
    except BaseException:
        exchange.cancel()
        ucx_ep.close_blocking(period=10**8, max_attempts=1)
        raise
    return Endpoint(
        endpoint=ucx_ep, ctx=ctx, tags={"msg_send": peer_info["msg_tag"], "msg_recv": msg_tag}
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
