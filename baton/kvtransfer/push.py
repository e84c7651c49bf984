"""One request's push: its layers checked, small ones coalesced into messages, sent in order.

`OutgoingTransfer` is what `KVSender.begin()` returns (sender.py tells the whole story). Its
public methods are the producer's and are thread-safe; `start`, `submit` and `fail` are for
the sender's other parts, on the loop. The request's stream on its connection is PUSH_BEGIN,
then a LAYER header and payload per message, then DONE, or CANCEL when it fails.

What the transfers of one sender share comes in a `PushContext`: the send window
(send_window.py), the connections (sender_connections.py), the staging pools
(staging.py), and the registry of live transfers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from baton.kvtransfer import protocol
from baton.kvtransfer.connection import Connection, ConnectionLost
from baton.kvtransfer.errors import TransferFailed, outcome_future
from baton.kvtransfer.event_waiter import cuda_event
from baton.kvtransfer.layout import KVLayout
from baton.kvtransfer.send_window import Message, SendWindow
from baton.kvtransfer.sender_connections import SenderConnections
from baton.kvtransfer.staging import SenderStaging, StagingBuffer, StagingPool

if TYPE_CHECKING:
    from baton.kvtransfer.sender import SenderSettings

log = logging.getLogger(__name__)


class LiveTransfers:
    """The sender's running transfers by request id, and how many ended each way. Loop thread."""

    def __init__(self):
        self._by_request: dict[str, OutgoingTransfer] = {}
        self.completed = 0
        self.failed = 0

    def __len__(self) -> int:
        return len(self._by_request)

    def all(self) -> list[OutgoingTransfer]:
        return list(self._by_request.values())

    def add(self, t: OutgoingTransfer) -> bool:
        """False if another transfer of the same request is running."""
        if t.request_id in self._by_request:
            return False
        self._by_request[t.request_id] = t
        return True

    def ended(self, t: OutgoingTransfer, ok: bool) -> None:
        # only t itself: a second begin() refused for a request still pushing must not
        # take the running push out of the registry (close() would then not fail it)
        if self._by_request.get(t.request_id) is t:
            del self._by_request[t.request_id]
        if ok:
            self.completed += 1
        else:
            self.failed += 1


@dataclass(frozen=True)
class PushContext:
    """What every transfer of one sender shares."""

    loop: asyncio.AbstractEventLoop
    settings: SenderSettings
    window: SendWindow
    connections: SenderConnections
    staging: SenderStaging
    live: LiveTransfers


class _Group:
    """A staging buffer being filled with one request's consecutive small layers."""

    __slots__ = ("buf", "capacity", "layers", "pool", "stream")

    def __init__(self, buf: StagingBuffer, pool: StagingPool, capacity: int, stream):
        self.buf, self.pool, self.capacity, self.stream = buf, pool, capacity, stream
        self.layers: list[int] = []


class OutgoingTransfer:
    """One request's push. Made by `KVSender.begin()`; its methods are thread-safe."""

    def __init__(
        self,
        ctx: PushContext,
        request_id: str,
        reservation_id: str,
        address: str,
        layout: KVLayout,
        min_message_bytes: int | None = None,
    ):
        self._ctx = ctx
        # this push's coalescing threshold (default: the sender's)
        self.min_message_bytes = (
            ctx.settings.min_message_bytes if min_message_bytes is None else min_message_bytes
        )
        self.request_id = request_id
        self.reservation_id = reservation_id
        self.address = address
        self.layout = layout
        # Written by loop, read by any thread: the outcome.
        self.error: TransferFailed | None = None
        self._done = threading.Event()
        self._future = outcome_future(ctx.loop)
        # The producer's side: touched only by the thread that pushes, except _group, which
        # the loop drops (under _lock) when the transfer fails.
        self._lock = threading.Lock()
        self._pushed: set[int] = set()
        self._group: _Group | None = None
        self._finish_called = False
        self._cancel_called = False
        # The loop's side.
        self.conn: Connection | None = None
        self._unsent: list[Message] = []  # handed over, header not out yet (incl. backlog)
        self._done_msg: protocol.Done | None = None  # finish() called, DONE not sent yet
        self._pending = 0  # sends submitted and not completed
        self._stream_closed = False  # DONE or CANCEL went out
        self._timer: asyncio.TimerHandle | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def finish_called(self) -> bool:
        return self._finish_called

    @property
    def all_pushed(self) -> bool:
        return len(self._pushed) == self.layout.num_layers

    # Producer thread.

    def push_layer(self, layer_idx: int, kv: torch.Tensor) -> bool:
        """Queue one layer's KV (`layer_shape`, `dtype`). Returns False, keeping nothing, if
        the transfer has already failed or been cancelled. May block for backpressure."""
        if self._finish_called:
            raise RuntimeError(f"push_layer after finish() for request {self.request_id}")
        if not 0 <= layer_idx < self.layout.num_layers or layer_idx in self._pushed:
            raise ValueError(f"layer {layer_idx} is out of range or pushed twice")
        if tuple(kv.shape) != self.layout.layer_shape or kv.dtype != self.layout.dtype:
            raise ValueError(
                f"layer {layer_idx} is {tuple(kv.shape)} {kv.dtype}, "
                f"expected {self.layout.layer_shape} {self.layout.dtype}"
            )
        self._pushed.add(layer_idx)
        if self._stopped():
            self._drop_group()
            return False
        # UCX sends raw memory: a non-contiguous tensor would arrive as garbage, silently.
        flat = kv.contiguous().view(-1).view(torch.uint8)
        if self.layout.layer_nbytes >= self.min_message_bytes:
            event = None
            if flat.is_cuda:
                event = cuda_event()
                event.record()  # the caller's stream, where the layer was written
            return self._hand_over(Message(self, [layer_idx], flat, flat.numel(), event=event))
        return self._coalesce(layer_idx, flat)

    def _coalesce(self, layer_idx: int, flat: torch.Tensor) -> bool:
        n = self.layout.layer_nbytes
        with self._lock:
            if self._stopped():
                return False
            g = self._group
            if g is None:
                per_message = -(-self.min_message_bytes // n)
                capacity = min(
                    per_message,
                    max(1, self.layout.num_layers // 3),
                    self.layout.num_layers - len(self._pushed) + 1,
                )
                pool, stream = self._ctx.staging.for_device(flat.device)
                g = self._group = _Group(pool.acquire(capacity * n), pool, capacity, stream)
                if stream is not None:
                    # Should the pool ever drop it, torch's allocator must not hand it out
                    # before the side stream's copies into it have run.
                    g.buf.tensor.record_stream(stream)
            dst = g.buf.tensor[len(g.layers) * n : (len(g.layers) + 1) * n]
            if g.stream is not None:
                # After the caller's stream (which wrote the layer), off its critical path.
                g.stream.wait_stream(torch.cuda.current_stream(flat.device))
                with torch.cuda.stream(g.stream):
                    dst.copy_(flat, non_blocking=True)
                flat.record_stream(g.stream)  # the allocator keeps it until the copy ran
            else:
                dst.copy_(flat)
            g.layers.append(layer_idx)
            if len(g.layers) < g.capacity and len(self._pushed) < self.layout.num_layers:
                return True
            self._group = None
        event = None
        if g.stream is not None:
            event = cuda_event()
            event.record(g.stream)
        nbytes = len(g.layers) * n
        return self._hand_over(
            Message(self, g.layers, None, nbytes, pool=g.pool, staging=g.buf, event=event)
        )

    def _hand_over(self, msg: Message) -> bool:
        ctx = self._ctx
        if not ctx.window.reserve(msg, self):
            ctx.window.release(msg)
            if self.error is None:
                ctx.loop.call_soon_threadsafe(
                    self.fail,
                    f"push_layer blocked over {ctx.settings.push_block_timeout_s:g}s "
                    "for the in-flight byte budget",
                    True,
                )
            return False
        ctx.loop.call_soon_threadsafe(self._accept, msg)
        if msg.event is not None:
            ctx.window.watch(msg)
        return True

    def _stopped(self) -> bool:
        return self.error is not None or self._cancel_called

    def _drop_group(self) -> None:
        with self._lock:
            g, self._group = self._group, None
        if g is not None:
            # A copy into it may still be queued on the side stream. The pool hands it out
            # only for copies on that same stream, which run after it.
            g.pool.release(g.buf)

    def finish(
        self,
        first_token: int,
        first_logprob: float | None = None,
        top_logprobs: list[tuple[int, float]] | None = None,
    ) -> None:
        """Send DONE with the first token (and its logprobs), after every layer. Raises if
        layers are missing."""
        if self._finish_called:
            raise RuntimeError(f"finish() twice for request {self.request_id}")
        if self._stopped():
            self._drop_group()
            return  # nothing to finish: wait()/result() report why
        missing = set(range(self.layout.num_layers)) - self._pushed
        if missing:
            raise ValueError(f"finish() before layers {sorted(missing)} of {self.request_id}")
        self._finish_called = True
        done = protocol.Done(
            self.request_id,
            int(first_token),
            first_logprob,
            [list(p) for p in top_logprobs] if top_logprobs is not None else None,
        )
        self._ctx.loop.call_soon_threadsafe(self._finish, done)

    def cancel(self, reason: str = "cancelled by sender") -> None:
        """Stop pushing. The receiver fails its wait() with this reason."""
        self._cancel_called = True
        self._ctx.loop.call_soon_threadsafe(self.fail, reason, True)

    def result(self, timeout: float | None = None) -> None:
        """Block until every send completed (returns) or the transfer failed (raises)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"transfer of {self.request_id} still running after {timeout}s")
        if self.error is not None:
            raise self.error

    async def wait(self) -> None:
        """On the loop: like result(). Bounded by transfer_timeout_s."""
        await asyncio.shield(self._future)

    # Loop thread.

    def start(self) -> None:
        """Arm the transfer's deadline and connect; messages handed over meanwhile wait."""
        ctx = self._ctx
        self._timer = ctx.loop.call_later(
            ctx.settings.transfer_timeout_s,
            self.fail,
            f"not sent within {ctx.settings.transfer_timeout_s:g}s",
            True,
        )
        ctx.connections.spawn(self._connect())

    async def _connect(self) -> None:
        ctx = self._ctx
        try:
            conn = await ctx.connections.get(self.address)
        except TransferFailed as e:
            self.fail(e.reason, False)
            return
        if self.error is not None:
            return
        self.conn = conn
        ctx.connections.attach(conn, self)
        conn.send_control(
            protocol.PushBegin(
                self.request_id,
                self.reservation_id,
                self.layout.num_layers,
                list(self.layout.layer_shape),
                self.layout.dtype_name,
                self.layout.layer_nbytes,
            )
        )
        for msg in list(self._unsent):  # admit may submit, which takes msg off _unsent
            ctx.window.admit(msg)
        self._maybe_send_done()

    def _accept(self, msg: Message) -> None:
        """A message handed over by the producer. It waits here for the connection."""
        if self.error is not None or self._stream_closed:
            self._ctx.window.release(msg)
            return
        self._unsent.append(msg)
        if self.conn is not None:
            self._ctx.window.admit(msg)

    def submit(self, msg: Message) -> None:
        """Send the message's LAYER header and payload now (the window has room for it)."""
        conn = self.conn
        self._unsent.remove(msg)
        seq = conn.next_seq()
        conn.send_control(protocol.Layer(self.request_id, seq, msg.layers, msg.nbytes))
        self._pending += 1
        self._ctx.window.submitted()
        conn.spawn(self._send_payload(conn, seq, msg))
        self._maybe_send_done()

    async def _send_payload(self, conn: Connection, seq: int, msg: Message) -> None:
        sent = False
        try:
            await conn.send_payload(seq, msg.sendable())
            sent = True
        except ConnectionLost as e:
            self._ctx.connections.lost(conn, f"connection to receiver {self.address} lost: {e}")
        finally:
            self._ctx.window.send_ended(msg, sent)
            self._pending -= 1
            self._maybe_succeed()

    def _finish(self, done: protocol.Done) -> None:
        if self.error is not None or self._stream_closed:
            return
        self._done_msg = done
        self._maybe_send_done()

    def _maybe_send_done(self) -> None:
        """DONE goes on the control tag after the request's last LAYER header."""
        if (
            self._done_msg is None
            or self.conn is None
            or self._unsent
            or self._stream_closed
            or self.error is not None
        ):
            return
        self._stream_closed = True
        self._pending += 1
        task = self.conn.send_control(self._done_msg)
        task.add_done_callback(self._done_sent)

    def _done_sent(self, task: asyncio.Task) -> None:
        self._pending -= 1
        if task.cancelled() or task.exception() is not None:
            self._ctx.connections.lost(
                self.conn,
                f"connection to receiver {self.address} lost "
                f"sending DONE: {self.conn.close_reason}",
            )
        self._maybe_succeed()

    def _maybe_succeed(self) -> None:
        if self._stream_closed and self._pending == 0 and not self._future.done():
            self._settle(ok=True)
            self._future.set_result(None)

    def fail(self, reason: str, notify_receiver: bool) -> None:
        """End the transfer with `reason` (once); CANCEL tells the receiver if asked. Loop only."""
        if self._future.done():
            return
        self.error = TransferFailed(self.request_id, reason)
        self._settle(ok=False)
        self._future.set_exception(self.error)
        log.warning(
            "kvtransfer push of request %s to %s: %s", self.request_id, self.address, reason
        )
        # Messages whose header is not out are dropped; those submitted finish their send.
        unsent, self._unsent = self._unsent, []
        for msg in unsent:
            self._ctx.window.release(msg)
        self._drop_group()
        if (
            notify_receiver
            and self.conn is not None
            and not self.conn.closed
            and not self._stream_closed
        ):
            self.conn.send_control(protocol.Cancel(self.request_id, reason))
        self._stream_closed = True

    def _settle(self, ok: bool) -> None:
        ctx = self._ctx
        if self._timer is not None:
            self._timer.cancel()
        ctx.live.ended(self, ok)
        if self.conn is not None:
            ctx.connections.detach(self.conn, self.request_id)
        self._done.set()
        ctx.window.wake_blocked()  # a producer blocked on the budget sees the failure
