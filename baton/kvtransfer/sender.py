"""Prefill-pod side: push one request's KV, layer by layer, to the decode pod that reserved it.

Threads. `KVSender` lives on the event loop that runs ucxx; `await sender.start()` there.
The prefill model loop runs on its own thread and drives a transfer through thread-safe
calls. Each call validates, records a CUDA event if needed, and hands the work to the loop
with `call_soon_threadsafe`. It never waits for the network, except for backpressure::

    t = sender.begin(request_id, reservation_id, "10.0.0.7:13337", num_layers=36,
                     layer_shape=(2, n_tokens, 8, 128), dtype=torch.bfloat16)
    for layer in range(36):
        ...compute layer...
        t.push_layer(layer, gather_kv(kv_cache[layer], slots))   # returns at once
    t.finish(first_token, first_logprob, top_logprobs)
    t.result(timeout=30)        # or `await t.wait()` on the loop; raises TransferFailed

The loop applies one transfer's calls in the order they were made (call_soon_threadsafe is
FIFO). `begin()` connects in the background. Pushes made before the connection is up wait,
in order, behind it.

Backpressure: bytes accepted by push_layer and not yet sent are bounded by
`max_inflight_bytes`, across all transfers. A push that would go over blocks its caller until
sends complete (at most `push_block_timeout_s`, then the transfer fails). Blocking the model
thread is the only honest form of backpressure: the pushed tensors are GPU memory that
cannot be freed until they are on the wire. Size the budget so that it rarely bites.

Batching: ucxx costs about 140 µs per message one at a time. Consecutive layers of one
request are therefore batched into one message (one torch.cat) until the batch holds
`min_message_bytes`, or the request's last layer is pushed. Layers big enough on their own go
out alone, with no copy.

CUDA: push_layer records an event on the caller's current stream. The loop waits for it
before UCX reads the tensor, so the gather kernel that produced it has finished. The tensor
is held until its send completes. Only then does the caching allocator get it back. Never
write into a pushed tensor (push a fresh gather_kv output, not a reused buffer).

Failures: a dead receiver fails the pending sends with UCXConnectionResetError within tens of
ms. Every transfer on that connection then fails, and their tensors are dropped at once.
Later pushes are refused: push_layer returns False and keeps nothing. A CANCEL from the
receiver does the same for one transfer, which answers with its own CANCEL (the closing
message, see protocol.py). Connection set-up is bounded by `connect_timeout_s` (a port with
no listener fails in ms), and a whole transfer by `transfer_timeout_s`. Once a LAYER header
is out, its payload is always sent, even for a cancelled transfer: the receiver has posted a
recv for it and drains it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import torch

from baton.kvtransfer import protocol, ucx_runtime
from baton.kvtransfer.connection import Connection, ConnectionLost, create_endpoint
from baton.kvtransfer.errors import TransferFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SenderSettings:
    pod_id: str = "prefill"
    connect_timeout_s: float = 5.0  # endpoint + HELLO round trip
    transfer_timeout_s: float = 60.0  # begin() until the last send completes
    max_inflight_bytes: int = 1 << 30  # pushed and not yet sent, all transfers together
    push_block_timeout_s: float = 30.0  # longest a push_layer may block on that budget
    min_message_bytes: int = 1 << 20  # batch consecutive small layers up to this size


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
    ):
        self._sender = sender
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
        # The producer's side: touched only by the thread that pushes.
        self._pushed: set[int] = set()
        self._batch: list[tuple[int, torch.Tensor]] = []
        self._batch_bytes = 0
        self._finish_called = False
        self._cancel_called = False
        # The loop's side.
        self.conn: Connection | None = None
        self._backlog: list = []  # calls made before the connection was up
        self._pending = 0  # sends submitted and not completed
        self._stream_closed = False  # DONE or CANCEL went out
        self._timer: asyncio.TimerHandle | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def failed(self) -> bool:
        return self.error is not None

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
        if self.error is not None or self._cancel_called:
            self._batch.clear()
            return False
        # UCX sends raw memory: a non-contiguous tensor would arrive as garbage, silently.
        flat = kv.contiguous().view(-1).view(torch.uint8)
        self._batch.append((layer_idx, flat))
        self._batch_bytes += flat.numel()
        if (
            self._batch_bytes >= self._sender.settings.min_message_bytes
            or len(self._pushed) == self.num_layers
        ):
            return self._flush()
        return True

    def finish(
        self,
        first_token: int,
        first_logprob: float | None = None,
        top_logprobs: list[tuple[int, float]] | None = None,
    ) -> None:
        """Send DONE with the first token, after every layer. Raises if layers are missing."""
        if self._finish_called:
            raise RuntimeError(f"finish() twice for request {self.request_id}")
        if self.error is not None or self._cancel_called:
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

    def _flush(self) -> bool:
        layers = [i for i, _ in self._batch]
        flats = [f for _, f in self._batch]
        self._batch = []
        self._batch_bytes = 0
        payload = flats[0] if len(flats) == 1 else torch.cat(flats)
        event = None
        if payload.is_cuda:
            event = torch.cuda.Event()
            event.record()
        nbytes = payload.numel()
        if not self._sender._take_budget(nbytes, self):
            if self.error is None:
                self._sender._loop.call_soon_threadsafe(
                    self._fail,
                    f"push_layer blocked over {self._sender.settings.push_block_timeout_s:g}s "
                    "for the in-flight byte budget",
                    True,
                )
            return False
        self._sender._loop.call_soon_threadsafe(self._send_layers, layers, payload, event, nbytes)
        return True

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
        backlog, self._backlog = self._backlog, []
        for fn, args in backlog:
            fn(*args)

    def _send_layers(self, layers: list[int], payload: torch.Tensor, event, nbytes: int) -> None:
        if self.error is not None or self._stream_closed:
            self._sender._give_budget(nbytes)
            return
        if self.conn is None:
            self._backlog.append((self._send_layers, (layers, payload, event, nbytes)))
            return
        seq = self.conn.next_seq()
        self.conn.send_control(protocol.Layer(self.request_id, seq, layers, nbytes))
        self._pending += 1
        self._sender._inflight_messages += 1
        self.conn.spawn(self._send_payload(self.conn, seq, layers, payload, event, nbytes))

    async def _send_payload(
        self,
        conn: Connection,
        seq: int,
        layers: list[int],
        payload: torch.Tensor,
        event,
        nbytes: int,
    ) -> None:
        s = self._sender
        try:
            if event is not None and not event.query():
                await s._loop.run_in_executor(None, event.synchronize)
            await conn.send_payload(seq, payload if payload.is_cuda else payload.numpy())
            s._bytes_sent += nbytes
            s._layers_sent += len(layers)
            s._messages_sent += 1
        except ConnectionLost as e:
            s._connection_lost(conn, f"connection to receiver {self.address} lost: {e}")
        finally:
            del payload  # the staging tensor goes back to its allocator here
            s._give_budget(nbytes)
            s._inflight_messages -= 1
            self._pending -= 1
            self._maybe_succeed()

    def _finish(self, done: protocol.Done) -> None:
        if self.error is not None or self._stream_closed:
            return
        if self.conn is None:
            self._backlog.append((self._finish, (done,)))
            return
        self._stream_closed = True
        self._pending += 1
        task = self.conn.send_control(done)
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
        for fn, args in self._backlog:
            if fn == self._send_layers:
                self._sender._give_budget(args[3])
        self._backlog.clear()
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._conns: dict[str, asyncio.Task] = {}  # address -> task making its Connection
        self._by_conn: dict[Connection, dict[str, OutgoingTransfer]] = {}
        self._active: dict[str, OutgoingTransfer] = {}
        self._tasks: set[asyncio.Task] = set()
        self._budget = threading.Condition()
        self._inflight_bytes = 0
        self._closing = False
        self._acquired = False
        self._inflight_messages = 0
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
    ) -> OutgoingTransfer:
        """Start pushing a request's KV into reservation `reservation_id` at `address`
        ("host:port" of the decode pod's receiver). Thread-safe; returns at once."""
        if self._loop is None or self._closing:
            raise RuntimeError("sender is not running")
        t = OutgoingTransfer(
            self, request_id, reservation_id, address, num_layers, layer_shape, dtype
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
        return {
            "open_endpoints": len(self._by_conn),
            "active_transfers": len(self._active),
            "inflight_bytes": self._inflight_bytes,
            "inflight_messages": self._inflight_messages,
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
        if self._acquired:
            self._acquired = False
            ucx_runtime.release()

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
