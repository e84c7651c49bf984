"""Prefill-pod side: push one request's KV, layer by layer, to the decode pod that reserved it.

Threads. `KVSender` lives on the event loop that runs ucxx; `await sender.start()` there.
The prefill model loop runs on its own thread and drives a transfer through thread-safe
calls. Each call validates, starts any GPU copy it needs on a side stream, and hands the
work on. It never waits for the network or the GPU, except for backpressure::

    t = sender.begin(request_id, reservation_id, "10.0.0.7:13337", num_layers=36,
                     layer_shape=(2, n_tokens, 8, 128), dtype=torch.bfloat16)
    for layer in range(36):
        ...compute layer...
        t.push_layer(layer, gather_kv(kv_cache[layer], slots))   # returns at once
    t.finish(first_token, first_logprob, top_logprobs, generator_state)
    t.result(timeout=30)        # or `await t.wait()` on the loop; raises TransferFailed

The loop applies one transfer's calls in the order they were made (call_soon_threadsafe is
FIFO). `begin()` connects in the background. Pushes made before the connection is up wait,
in order, behind it.

The pipeline, per message (one message = one or a few layers of one request):

    model thread            waiter thread (CUDA)        event loop
    copy/record event  -->  wait for the event    -->   LAYER header + payload send, at most
                            (sleeps, no GIL)            `max_inflight_messages` in flight

- Coalescing. ucxx costs about 140 µs per message one at a time and 45 µs with 16 in flight
  (UCXX.md), so a 4 MiB message goes at a fraction of the link's rate. Layers smaller than
  `min_message_bytes` are copied into a pooled staging buffer, consecutive layers of one
  request back to back, until it holds `min_message_bytes` or the request's last layer. A
  message holds at most a third of the request's layers, so that most of the KV travels
  while later layers compute. The copy runs on a side stream, after the caller's stream, so
  it never delays the next layer's kernels. Layers of at least `min_message_bytes` go
  alone with no copy: the tensor pushed is sent as it is, and held until its send
  completes. A second copy of a big layer would spend the HBM bandwidth that the transfer
  itself needs. Never write into a pushed tensor (push a fresh gather_kv output).
- Staging buffers come from a pool (staging.py) and go back when their send completes, so
  UCX's registration and the peer's CUDA IPC mapping of them are reused.
- CUDA events. Each message records an event (blocking-sync: whoever waits sleeps instead of
  spinning) after the work that wrote it. One waiter thread per sender (event_waiter.py)
  waits for them in order and hands ready messages to the loop in batches. Nothing waits
  for the GPU on the loop or on the model thread.
- In flight. The loop keeps up to `max_inflight_messages` payload sends submitted to UCX at
  once, across all transfers, in the order messages became ready. ucxx runs in `thread`
  progress mode (ucx_runtime.py): its own C++ thread moves the data without the GIL, so a
  submitted send progresses while the model thread holds the GIL. Only submitting and
  completing need the loop.

Backpressure: bytes of messages handed over and not yet sent are bounded by
`max_inflight_bytes`, across all transfers. Handing a message over when that would go over
blocks the caller until sends complete (at most `push_block_timeout_s`, then the transfer
fails). Blocking the model thread is the only honest form of backpressure: the pushed
tensors are GPU memory that cannot be freed until they are on the wire. Size the budget so
that it rarely bites. A staging buffer that is still being filled is not in the budget (so
that many small requests interleaved layer by layer cannot wait on each other's unfinished
messages); there is at most one per live transfer, of at most `min_message_bytes`.

Failures: a dead receiver fails the pending sends with UCXConnectionResetError within tens of
ms. Every transfer on that connection then fails, and their buffers are released at once.
Later pushes are refused: push_layer returns False and keeps nothing. A CANCEL from the
receiver does the same for one transfer, which answers with its own CANCEL (the closing
message, see protocol.py). Connection set-up is bounded by `connect_timeout_s` (a port with
no listener fails in ms), and a whole transfer by `transfer_timeout_s`. A LAYER header goes
out together with its payload send, so once the header is out the payload is sent too, even
for a cancelled transfer: the receiver has posted a recv for it and drains it. Messages not
yet sent when a transfer fails are dropped, with their buffers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial

import torch

from baton.kvtransfer import protocol, ucx_runtime
from baton.kvtransfer.connection import Connection, ConnectionLost, create_endpoint
from baton.kvtransfer.errors import TransferFailed
from baton.kvtransfer.event_waiter import EventWaiter, cuda_event
from baton.kvtransfer.staging import StagingBuffer, StagingPool, size_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SenderSettings:
    pod_id: str = "prefill"
    connect_timeout_s: float = 5.0  # endpoint + HELLO round trip
    transfer_timeout_s: float = 60.0  # begin() until the last send completes
    max_inflight_bytes: int = 1 << 30  # handed over and not yet sent, all transfers together
    max_inflight_messages: int = 16  # payload sends UCX works on at once, all transfers together
    push_block_timeout_s: float = 30.0  # longest a push_layer may block on that budget
    min_message_bytes: int = 16 << 20  # coalesce smaller layers into messages of this size
    staging_idle_bytes: int = 256 << 20  # free staging buffers kept for reuse


class _Message:
    """One payload on its way: `layers` of one request, back to back in `payload`."""

    __slots__ = (
        "accepted",
        "budget",
        "done",
        "event",
        "layers",
        "nbytes",
        "payload",
        "pool",
        "ready",
        "staging",
        "transfer",
    )  # fmt: skip

    def __init__(self, transfer, layers, payload, nbytes, pool=None, staging=None, event=None):
        self.transfer: OutgoingTransfer = transfer
        self.layers: list[int] = layers
        self.payload: torch.Tensor | None = payload
        self.nbytes: int = nbytes
        self.budget = 0  # bytes of max_inflight_bytes it holds
        self.pool: StagingPool | None = pool
        self.staging: StagingBuffer | None = staging
        self.event = event
        self.ready = event is None  # its data is written (loop thread sets it for CUDA)
        self.accepted = False  # the loop took it into its transfer
        self.done = False  # sent or dropped; its buffer and budget are back

    def sendable(self):
        """What ucxx sends: CUDA tensors as they are, CPU ones as numpy (ep.send refuses them)."""
        if self.staging is not None:
            return self.staging.view(self.nbytes)
        return self.payload if self.payload.is_cuda else self.payload.numpy()


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
        sender: KVSender,
        request_id: str,
        reservation_id: str,
        address: str,
        num_layers: int,
        layer_shape: tuple[int, ...],
        dtype: torch.dtype,
        min_message_bytes: int | None = None,
    ):
        self._sender = sender
        # this push's coalescing threshold (default: the sender's)
        self.min_message_bytes = sender.settings.min_message_bytes if min_message_bytes is None else min_message_bytes
        self.request_id = request_id
        self.reservation_id = reservation_id
        self.address = address
        self.num_layers = num_layers
        self.layer_shape = tuple(layer_shape)
        self.dtype = dtype
        self.layer_nbytes = protocol.layer_nbytes(
            self.layer_shape, str(dtype).removeprefix("torch.")
        )
        # Written by loop, read by any thread: the outcome.
        self.error: TransferFailed | None = None
        self._done = threading.Event()
        self._future: asyncio.Future = sender._loop.create_future()
        self._future.add_done_callback(_retrieve)
        # The producer's side: touched only by the thread that pushes, except _group, which
        # the loop drops (under _lock) when the transfer fails.
        self._lock = threading.Lock()
        self._pushed: set[int] = set()
        self._group: _Group | None = None
        self._finish_called = False
        self._cancel_called = False
        # The loop's side.
        self.conn: Connection | None = None
        self._unsent: list[_Message] = []  # handed over, header not out yet (incl. backlog)
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
        return len(self._pushed) == self.num_layers

    # Producer thread.

    def push_layer(self, layer_idx: int, kv: torch.Tensor) -> bool:
        """Queue one layer's KV (`layer_shape`, `dtype`). Returns False, keeping nothing, if
        the transfer has already failed or been cancelled. May block for backpressure."""
        if self._finish_called:
            raise RuntimeError(f"push_layer after finish() for request {self.request_id}")
        if not 0 <= layer_idx < self.num_layers or layer_idx in self._pushed:
            raise ValueError(f"layer {layer_idx} is out of range or pushed twice")
        if tuple(kv.shape) != self.layer_shape or kv.dtype != self.dtype:
            raise ValueError(
                f"layer {layer_idx} is {tuple(kv.shape)} {kv.dtype}, "
                f"expected {self.layer_shape} {self.dtype}"
            )
        self._pushed.add(layer_idx)
        if self._stopped():
            self._drop_group()
            return False
        # UCX sends raw memory: a non-contiguous tensor would arrive as garbage, silently.
        flat = kv.contiguous().view(-1).view(torch.uint8)
        if self.layer_nbytes >= self.min_message_bytes:
            event = None
            if flat.is_cuda:
                event = cuda_event()
                event.record()  # the caller's stream, where the layer was written
            return self._hand_over(_Message(self, [layer_idx], flat, flat.numel(), event=event))
        return self._coalesce(layer_idx, flat)

    def _coalesce(self, layer_idx: int, flat: torch.Tensor) -> bool:
        s, n = self._sender, self.layer_nbytes
        with self._lock:
            if self._stopped():
                return False
            g = self._group
            if g is None:
                per_message = -(-self.min_message_bytes // n)
                capacity = min(
                    per_message,
                    max(1, self.num_layers // 3),
                    self.num_layers - len(self._pushed) + 1,
                )
                pool, stream = s._staging_for(flat.device)
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
            if len(g.layers) < g.capacity and len(self._pushed) < self.num_layers:
                return True
            self._group = None
        event = None
        if g.stream is not None:
            event = cuda_event()
            event.record(g.stream)
        nbytes = len(g.layers) * n
        return self._hand_over(
            _Message(self, g.layers, None, nbytes, pool=g.pool, staging=g.buf, event=event)
        )

    def _hand_over(self, msg: _Message) -> bool:
        s = self._sender
        budget = size_class(msg.nbytes) if msg.staging is not None else msg.nbytes
        if not s._take_budget(budget, self):
            s._release(msg)
            if self.error is None:
                s._loop.call_soon_threadsafe(
                    self._fail,
                    f"push_layer blocked over {s.settings.push_block_timeout_s:g}s "
                    "for the in-flight byte budget",
                    True,
                )
            return False
        msg.budget = budget
        s._loop.call_soon_threadsafe(self._accept, msg)
        if msg.event is not None:
            s._waiter().watch([msg.event], partial(s._on_event_done, msg))
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
        generator_state: bytes | None = None,
    ) -> None:
        """Send DONE with the first token (and the sampling generator's state after it),
        after every layer. Raises if layers are missing."""
        if self._finish_called:
            raise RuntimeError(f"finish() twice for request {self.request_id}")
        if self._stopped():
            self._drop_group()
            return  # nothing to finish: wait()/result() report why
        missing = set(range(self.num_layers)) - self._pushed
        if missing:
            raise ValueError(f"finish() before layers {sorted(missing)} of {self.request_id}")
        self._finish_called = True
        done = protocol.Done(
            self.request_id,
            int(first_token),
            first_logprob,
            [list(p) for p in top_logprobs] if top_logprobs is not None else None,
            generator_state,
        )
        self._sender._loop.call_soon_threadsafe(self._finish, done)

    def cancel(self, reason: str = "cancelled by sender") -> None:
        """Stop pushing. The receiver fails its wait() with this reason."""
        self._cancel_called = True
        self._sender._loop.call_soon_threadsafe(self._fail, reason, True)

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

    def _start(self) -> None:
        s = self._sender
        self._timer = s._loop.call_later(
            s.settings.transfer_timeout_s,
            self._fail,
            f"not sent within {s.settings.transfer_timeout_s:g}s",
            True,
        )
        s._spawn(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await self._sender._connection(self.address)
        except TransferFailed as e:
            self._fail(e.reason, False)
            return
        if self.error is not None:
            return
        self.conn = conn
        self._sender._by_conn.setdefault(conn, {})[self.request_id] = self
        conn.send_control(
            protocol.PushBegin(
                self.request_id,
                self.reservation_id,
                self.num_layers,
                list(self.layer_shape),
                str(self.dtype).removeprefix("torch."),
                self.layer_nbytes,
            )
        )
        for msg in list(self._unsent):  # _admit may submit, which takes msg off _unsent
            self._sender._admit(msg)
        self._maybe_send_done()

    def _accept(self, msg: _Message) -> None:
        """A message handed over by the producer. It waits here for the connection."""
        if self.error is not None or self._stream_closed:
            self._sender._release(msg)
            return
        self._unsent.append(msg)
        if self.conn is not None:
            self._sender._admit(msg)

    def _submit(self, msg: _Message) -> None:
        """Send the message's LAYER header and payload now (the sender's window has room)."""
        s, conn = self._sender, self.conn
        self._unsent.remove(msg)
        seq = conn.next_seq()
        conn.send_control(protocol.Layer(self.request_id, seq, msg.layers, msg.nbytes))
        self._pending += 1
        s._inflight_messages += 1
        s._inflight_messages_peak = max(s._inflight_messages_peak, s._inflight_messages)
        conn.spawn(self._send_payload(conn, seq, msg))
        self._maybe_send_done()

    async def _send_payload(self, conn: Connection, seq: int, msg: _Message) -> None:
        s = self._sender
        try:
            await conn.send_payload(seq, msg.sendable())
            s._bytes_sent += msg.nbytes
            s._layers_sent += len(msg.layers)
            s._messages_sent += 1
        except ConnectionLost as e:
            s._connection_lost(conn, f"connection to receiver {self.address} lost: {e}")
        finally:
            s._release(msg)
            s._inflight_messages -= 1
            self._pending -= 1
            s._pump()
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
            self._sender._connection_lost(
                self.conn,
                f"connection to receiver {self.address} lost "
                f"sending DONE: {self.conn.close_reason}",
            )
        self._maybe_succeed()

    def _maybe_succeed(self) -> None:
        if self._stream_closed and self._pending == 0 and not self._future.done():
            self._settle()
            self._future.set_result(None)
            self._sender._transfers_completed += 1

    def _fail(self, reason: str, notify_receiver: bool) -> None:
        if self._future.done():
            return
        self.error = TransferFailed(self.request_id, reason)
        self._settle()
        self._future.set_exception(self.error)
        self._sender._transfers_failed += 1
        log.warning(
            "kvtransfer push of request %s to %s: %s", self.request_id, self.address, reason
        )
        # Messages whose header is not out are dropped; those submitted finish their send.
        unsent, self._unsent = self._unsent, []
        for msg in unsent:
            self._sender._release(msg)
        self._drop_group()
        if (
            notify_receiver
            and self.conn is not None
            and not self.conn.closed
            and not self._stream_closed
        ):
            self.conn.send_control(protocol.Cancel(self.request_id, reason))
        self._stream_closed = True

    def _settle(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        s = self._sender
        s._active.pop(self.request_id, None)
        if self.conn is not None:
            s._by_conn.get(self.conn, {}).pop(self.request_id, None)
        self._done.set()
        with s._budget:
            s._budget.notify_all()  # a producer blocked on the budget sees the failure


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


class KVSender:
    def __init__(self, settings: SenderSettings | None = None):
        self.settings = settings or SenderSettings()
        if self.settings.max_inflight_messages < 1:
            raise ValueError("max_inflight_messages must be at least 1")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._conns: dict[str, asyncio.Task] = {}  # address -> task making its Connection
        self._by_conn: dict[Connection, dict[str, OutgoingTransfer]] = {}
        self._active: dict[str, OutgoingTransfer] = {}
        self._tasks: set[asyncio.Task] = set()
        self._budget = threading.Condition()
        self._inflight_bytes = 0
        self._ready: deque[_Message] = deque()  # ready to send, waiting for a window slot
        self._staging_lock = threading.Lock()
        self._pools: dict[torch.device, tuple[StagingPool, object]] = {}  # device -> (pool, stream)
        self._event_waiter: EventWaiter | None = None
        self._closing = False
        self._acquired = False
        self._inflight_messages = 0
        self._inflight_messages_peak = 0
        self._bytes_sent = 0
        self._layers_sent = 0
        self._messages_sent = 0
        self._transfers_completed = 0
        self._transfers_failed = 0
        self._connect_failures = 0

    async def start(self) -> None:
        await ucx_runtime.acquire()
        self._acquired = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def begin(
        self,
        request_id: str,
        reservation_id: str,
        address: str,
        num_layers: int,
        layer_shape: tuple[int, ...],
        dtype: torch.dtype,
        min_message_bytes: int | None = None,
    ) -> OutgoingTransfer:
        """Start pushing a request's KV into reservation `reservation_id` at `address`
        ("host:port" of the decode pod's receiver). Thread-safe; returns at once.
        `min_message_bytes` overrides the sender's coalescing threshold for this push."""
        if self._loop is None or self._closing:
            raise RuntimeError("sender is not running")
        t = OutgoingTransfer(
            self, request_id, reservation_id, address, num_layers, layer_shape, dtype,
            min_message_bytes,
        )

        def start():
            if request_id in self._active:
                t._fail("another transfer of this request is running", False)
                return
            self._active[request_id] = t
            t._start()

        self._loop.call_soon_threadsafe(start)
        return t

    def stats(self) -> dict[str, int]:
        with self._staging_lock:
            pools = [pool for pool, _ in self._pools.values()]
        return {
            "open_endpoints": len(self._by_conn),
            "active_transfers": len(self._active),
            "inflight_bytes": self._inflight_bytes,
            "inflight_messages": self._inflight_messages,
            "inflight_messages_peak": self._inflight_messages_peak,
            "queued_messages": sum(not m.done for m in self._ready),
            "staging_bytes_in_use": sum(p.bytes_in_use for p in pools),
            "staging_bytes_idle": sum(p.bytes_idle for p in pools),
            "staging_allocations": sum(p.allocations for p in pools),
            "bytes_sent": self._bytes_sent,
            "layers_sent": self._layers_sent,
            "messages_sent": self._messages_sent,
            "transfers_completed": self._transfers_completed,
            "transfers_failed": self._transfers_failed,
            "connect_failures": self._connect_failures,
        }

    async def close(self) -> None:
        """Fail every live transfer, close every connection, wait for their sends to end."""
        if self._closing:
            return
        self._closing = True
        for t in list(self._active.values()):
            t._fail("sender is shutting down", False)
        for conn in list(self._by_conn):
            await conn.close("sender is shutting down")
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._event_waiter is not None:
            await asyncio.to_thread(self._event_waiter.close)
        with self._staging_lock:
            for pool, _ in self._pools.values():
                pool.clear()
        if self._acquired:
            self._acquired = False
            ucx_runtime.release()

    # Staging and events, from the producer thread.

    def _staging_for(self, device: torch.device) -> tuple[StagingPool, object]:
        """The pool of coalescing buffers on `device`, and the side stream that fills them."""
        with self._staging_lock:
            entry = self._pools.get(device)
            if entry is None:
                stream = torch.cuda.Stream(device) if device.type == "cuda" else None
                entry = self._pools[device] = (
                    StagingPool(device, self.settings.staging_idle_bytes),
                    stream,
                )
            return entry

    def _waiter(self) -> EventWaiter:
        with self._staging_lock:
            if self._event_waiter is None:
                self._event_waiter = EventWaiter(self._loop, "kvtransfer-send-events")
            return self._event_waiter

    # The window, on the loop.

    def _on_event_done(self, msg: _Message) -> None:
        msg.ready = True
        if msg.accepted and not msg.done:
            self._ready.append(msg)
            self._pump()

    def _admit(self, msg: _Message) -> None:
        """Its transfer is connected: send it once its data is written and the window has room."""
        msg.accepted = True
        if msg.ready:
            self._ready.append(msg)
            self._pump()

    def _pump(self) -> None:
        while self._ready and self._inflight_messages < self.settings.max_inflight_messages:
            msg = self._ready.popleft()
            if not msg.done:
                msg.transfer._submit(msg)

    def _release(self, msg: _Message) -> None:
        """Give a message's buffer and budget back (once)."""
        if msg.done:
            return
        msg.done = True
        msg.payload = None  # a pushed layer goes back to torch's allocator here
        if msg.staging is not None:
            msg.pool.release(msg.staging)
            msg.staging = None
        if msg.budget:
            self._give_budget(msg.budget)

    # Budget, called from the producer thread (take) and the loop (give).

    def _take_budget(self, nbytes: int, t: OutgoingTransfer) -> bool:
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError(
                "push_layer may block for backpressure: call it from the model "
                "thread, not from the event loop"
            )
        deadline = time.monotonic() + self.settings.push_block_timeout_s
        with self._budget:
            # One message over the whole budget still goes when nothing else is in flight.
            while (
                self._inflight_bytes > 0
                and self._inflight_bytes + nbytes > self.settings.max_inflight_bytes
            ):
                left = deadline - time.monotonic()
                if t.error is not None or left <= 0:
                    return False
                self._budget.wait(left)
            if t.error is not None:
                return False
            self._inflight_bytes += nbytes
            return True

    def _give_budget(self, nbytes: int) -> None:
        with self._budget:
            self._inflight_bytes -= nbytes
            self._budget.notify_all()

    # Connections.

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _connection(self, address: str) -> Connection:
        """The open connection to `address`, made if needed. Raises TransferFailed."""
        task = self._conns.get(address)
        if task is None or (
            task.done()
            and (task.cancelled() or task.exception() is not None or task.result().closed)
        ):
            task = self._spawn(self._open(address))
            self._conns[address] = task
        # shield: one transfer giving up must not cancel a connect others share.
        return await asyncio.shield(task)

    async def _open(self, address: str) -> Connection:
        timeout = self.settings.connect_timeout_s
        deadline = time.monotonic() + timeout
        conn = None
        try:
            host, _, port = address.rpartition(":")
            conn = Connection(await create_endpoint(host, int(port), timeout), address)
            conn.send_control(protocol.Hello(self.settings.pod_id, "sender"))
            hello = await asyncio.wait_for(
                conn.recv_control(), max(deadline - time.monotonic(), 0.001)
            )
            if not isinstance(hello, protocol.Hello):
                raise protocol.ProtocolError(f"expected HELLO, got {type(hello).__name__}")
        except TimeoutError:
            reason = f"cannot connect to {address}: no answer within {timeout:g}s"
        except (ConnectionLost, protocol.ProtocolError, ValueError) as e:
            reason = f"cannot connect to {address}: {e}"
        except Exception as e:
            if not ucx_runtime.is_ucx_error(e):
                raise
            reason = f"cannot connect to {address}: {type(e).__name__}: {e}"
        else:
            conn.peer = f"{hello.pod_id}@{address}"
            self._by_conn[conn] = {}
            self._spawn(self._serve(conn))
            return conn
        self._connect_failures += 1
        if self._conns.get(address) is asyncio.current_task():
            del self._conns[address]
        if conn is not None:
            await conn.close(reason)
        raise TransferFailed("-", reason)

    async def _serve(self, conn: Connection) -> None:
        """Read what the receiver says: CANCELs and ERRORs."""
        try:
            while True:
                msg = await conn.recv_control()
                transfers = self._by_conn.get(conn, {})
                if isinstance(msg, protocol.Cancel):
                    t = transfers.get(msg.request_id)
                    if t is not None:
                        t._fail(f"cancelled by receiver: {msg.reason}", True)
                elif isinstance(msg, protocol.Error):
                    t = transfers.get(msg.request_id) if msg.request_id else None
                    if t is not None:
                        t._fail(f"receiver error: {msg.reason}", True)
                    else:
                        raise protocol.ProtocolError(f"receiver error: {msg.reason}")
                else:
                    raise protocol.ProtocolError(f"unexpected {type(msg).__name__} from a receiver")
        except (ConnectionLost, protocol.ProtocolError) as e:
            self._connection_lost(conn, f"connection to receiver {conn.peer} lost: {e}")

    def _connection_lost(self, conn: Connection, reason: str) -> None:
        """Fail every transfer on `conn` and close it (once)."""
        transfers = self._by_conn.pop(conn, None)
        if transfers is None:
            return
        for t in list(transfers.values()):
            t._fail(reason, False)
        for address, task in list(self._conns.items()):
            if (
                task.done()
                and not task.cancelled()
                and task.exception() is None
                and task.result() is conn
            ):
                del self._conns[address]
        self._spawn(conn.close(reason))
