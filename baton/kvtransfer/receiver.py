"""Decode-pod side: a UCX listener that receives each request's KV layers into its reservation.

Use, on the event loop that runs ucxx (see ucx_runtime.py)::

    receiver = KVReceiver(ReceiverSettings(port=0), device="cuda")
    await receiver.start()                   # receiver.address -> "host:port" for the registry
    transfer = receiver.expect(request_id, reservation_id, num_layers=36,
                               layer_shape=(2, n_tokens, 8, 128), dtype=torch.bfloat16,
                               on_layer=scatter_into_my_blocks)
    first = await transfer.wait()            # protocol.Done, or raises TransferFailed
    ...
    transfer.cancel("client went away")      # sends CANCEL to the sender

`on_layer(layer_idx, kv)` gets each layer as a typed view of a pooled staging buffer, in
the sender's layout: shape `layer_shape` (gather_kv's [2, n, Hkv, D]), dtype `dtype`. Layers
arrive in whatever order they complete, not in layer order; a message may hold a few layers
(the sender coalesces small ones), and on_layer is called for each of them in turn before
the receiver waits for any. If on_layer starts asynchronous GPU work on the buffer (a
scatter_kv on a side stream), it returns what tells when that work is done:

- a CUDA event recorded after the work (best: `torch.cuda.Event(blocking=True)`). The
  receiver's waiter thread (event_waiter.py) waits for it, off the loop and without the
  GIL, and wakes the loop once per batch of completed messages;
- or an awaitable that resolves once the work is done.

The buffer is reused, and the layer counts as received, only after that; returning None
means the work was synchronous. on_layer runs on the loop thread; an exception from it
fails the transfer (the buffer still waits for the events already returned).

`wait()` returns only when every layer arrived whole, every on_layer's work finished, and
DONE arrived. Otherwise it raises TransferFailed, by the transfer's deadline at the latest:
set-up (expect to PUSH_BEGIN) and the whole transfer (expect to the end) both have one. On
failure the reservation entry goes at once. Staging buffers of recvs still in flight come
back when UCX finishes with them: when the payload lands (it is dropped), or when the
connection fails. Never before, because UCX may still be writing into them. A transfer
never hands out a partial result: the decode service frees the reservation's blocks and
must not decode from them.

Payloads that belong to no live reservation are read into a staging buffer and dropped. They
have to be received to keep the sender from stalling (see protocol.py). The sender's
connection stays usable for its other requests.

Staging is bounded by `max_staging_bytes` over all senders. Small payloads complete at the
sender as soon as UCX has buffered them (eager protocol), so the sender's in-flight budget
alone would not bound what the receiver holds.

Threads: everything here (expect, cancel, wait, stats, on_layer) runs on the loop thread.

Whether a PUSH_BEGIN, LAYER or DONE header fits its reservation is decided by the pure
functions of header_checks.py; this module acts on their answer.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from baton import internal_auth
from baton.kvtransfer import protocol, ucx_runtime
from baton.kvtransfer.connection import Connection, ConnectionLost
from baton.kvtransfer.errors import TransferFailed, outcome_future
from baton.kvtransfer.event_waiter import EventWaiter, is_event
from baton.kvtransfer.header_checks import check_done, check_layer, check_push_begin
from baton.kvtransfer.layout import KVLayout
from baton.kvtransfer.staging import StagingBuffer, StagingPool, size_class
from baton.kvtransfer.tasks import TaskSet

log = logging.getLogger(__name__)

CONTROL_RECVS = 16  # control frames read per wake-up at most (connection.py says why)

# Returns None, an awaitable, or a CUDA event (anything with query() and synchronize()).
OnLayer = Callable[[int, torch.Tensor], Awaitable[None] | object | None]


@dataclass(frozen=True)
class ReceiverSettings:
    port: int = 0  # 0: let UCX pick one; read it back from `KVReceiver.port`
    advertise_host: str = "127.0.0.1"  # the host part of `address`; the listener binds 0.0.0.0
    pod_id: str = "decode"
    setup_timeout_s: float = 10.0  # expect() until PUSH_BEGIN
    transfer_timeout_s: float = 60.0  # expect() until every layer and DONE
    hello_timeout_s: float = 5.0  # a new connection must say HELLO within this
    # Staging held at once, all senders together. Past it, reading the next payload header
    # waits for a buffer to come back, and the senders' rendezvous sends wait with it.
    max_staging_bytes: int = 2 << 30
    staging_idle_bytes: int = 1 << 30  # free staging kept for reuse
    # The shared secret a sender's HELLO must prove (internal_auth.ucx_proof); "": none asked.
    secret: str = ""


class _Dropped:
    """Marker for a request whose messages this connection must read and throw away."""


_DROPPED = _Dropped()


class IncomingTransfer:
    """One reservation waiting for one request's KV. Made by `KVReceiver.expect()`."""

    def __init__(
        self,
        receiver: KVReceiver,
        request_id: str,
        reservation_id: str,
        layout: KVLayout,
        on_layer: OnLayer,
    ):
        self._receiver = receiver
        self.request_id = request_id
        self.reservation_id = reservation_id
        self.layout = layout
        self.layer_nbytes = layout.layer_nbytes  # the decode pod counts bytes received with it
        self._on_layer = on_layer
        self._future = outcome_future(asyncio.get_running_loop())
        self.conn: Connection | None = None
        self.received: set[int] = set()
        self.in_flight: set[int] = set()  # layers whose payload recv or on_layer is running
        self.done_msg: protocol.Done | None = None
        self.error: TransferFailed | None = None
        self._timers: list[asyncio.TimerHandle] = []

    @property
    def finished(self) -> bool:
        return self._future.done()

    @property
    def filling(self) -> bool:
        """A sender's PUSH_BEGIN has claimed this reservation."""
        return self.conn is not None

    async def wait(self) -> protocol.Done:
        """DONE, once every layer is in. Raises TransferFailed. Bounded by the deadlines."""
        return await asyncio.shield(self._future)

    def cancel(self, reason: str = "cancelled by receiver") -> None:
        """Give up on this transfer: wait() raises, the sender gets CANCEL."""
        self._fail(reason, notify_sender=True)

    # The receiver calls these, on the loop thread.

    def _start_timers(self, setup_s: float, total_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers = [
            loop.call_later(setup_s, self._setup_deadline, setup_s),
            loop.call_later(total_s, self._total_deadline, total_s),
        ]

    def _setup_deadline(self, seconds: float) -> None:
        if self.conn is None:
            self._fail(f"no PUSH_BEGIN within {seconds:g}s of expect()", notify_sender=True)

    def _total_deadline(self, seconds: float) -> None:
        self._fail(
            f"not complete within {seconds:g}s: "
            f"{len(self.received)}/{self.layout.num_layers} layers, "
            f"DONE {'received' if self.done_msg else 'missing'}",
            notify_sender=True,
        )

    def _maybe_complete(self) -> None:
        if (
            self.done_msg is not None
            and not self.in_flight
            and len(self.received) == self.layout.num_layers
            and not self.finished
        ):
            self._settle()
            self._future.set_result(self.done_msg)
            self._receiver._transfers_completed += 1

    def _fail(self, reason: str, notify_sender: bool) -> None:
        if self.finished:
            return
        self.error = TransferFailed(self.request_id, reason)
        self._settle()
        self._future.set_exception(self.error)
        self._receiver._transfers_failed += 1
        log.warning(
            "kvtransfer request %s (reservation %s): %s",
            self.request_id,
            self.reservation_id,
            reason,
        )
        conn = self.conn
        if conn is not None and not conn.closed:
            requests = self._receiver._requests.get(conn)
            if requests is not None and requests.get(self.request_id) is self:
                # Later LAYERs are drained until the sender's closing DONE/CANCEL.
                requests[self.request_id] = _DROPPED
            if notify_sender:
                conn.send_control(protocol.Cancel(self.request_id, reason))

    def _settle(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        self._receiver._reservations.pop(self.reservation_id, None)


class KVReceiver:
    def __init__(
        self, settings: ReceiverSettings | None = None, device: torch.device | str = "cpu"
    ):
        self.settings = settings or ReceiverSettings()
        self.pool = StagingPool(device, self.settings.staging_idle_bytes)
        self._staging_freed = asyncio.Event()
        self._listener = None
        self._reservations: dict[str, IncomingTransfer] = {}
        # Per connection: request_id -> its transfer, or _DROPPED until its closing message.
        self._requests: dict[Connection, dict[str, IncomingTransfer | _Dropped]] = {}
        self._conn_tasks = TaskSet()
        self._event_waiter: EventWaiter | None = None
        self._closing = False
        self._acquired = False
        # Counters for /metrics; stats() adds the gauges.
        self._bytes_received = 0
        self._layers_received = 0
        self._messages_received = 0
        self._transfers_completed = 0
        self._transfers_failed = 0
        self._discarded_messages = 0
        self._discarded_bytes = 0
        self._pending_recvs = 0
        self._auth_failures = 0  # connections closed because their HELLO proved nothing
        self._nonces: dict[bytes, float] = {}  # HELLO nonces seen -> when they stop mattering

    async def start(self) -> None:
        await ucx_runtime.acquire()
        self._acquired = True
        # Its thread starts only when on_layer first returns a CUDA event.
        self._event_waiter = EventWaiter(asyncio.get_running_loop(), "kvtransfer-recv-events")
        import ucxx

        self._listener = ucxx.create_listener(self._on_connect, port=self.settings.port)

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def address(self) -> str:
        """What the sender connects to; the pod publishes it in the registry."""
        return f"{self.settings.advertise_host}:{self.port}"

    def expect(
        self,
        request_id: str,
        reservation_id: str,
        num_layers: int,
        layer_shape: tuple[int, ...],
        dtype: torch.dtype,
        on_layer: OnLayer,
        *,
        setup_timeout_s: float | None = None,
        transfer_timeout_s: float | None = None,
    ) -> IncomingTransfer:
        """Register a reservation for one request's KV. Call on the loop, before the sender
        learns the reservation id. Every layer is `layer_shape` of `dtype`."""
        if self._closing:
            raise RuntimeError("receiver is closed")
        if reservation_id in self._reservations:
            raise ValueError(f"reservation {reservation_id} is already expected")
        if num_layers <= 0:
            raise ValueError("num_layers must be positive")
        t = IncomingTransfer(
            self, request_id, reservation_id, KVLayout(num_layers, layer_shape, dtype), on_layer
        )
        self._reservations[reservation_id] = t
        t._start_timers(
            setup_timeout_s or self.settings.setup_timeout_s,
            transfer_timeout_s or self.settings.transfer_timeout_s,
        )
        return t

    def cancel(self, reservation_id: str, reason: str = "cancelled by receiver") -> bool:
        """Cancel by reservation id. False if no such transfer is live."""
        t = self._reservations.get(reservation_id)
        if t is None:
            return False
        t.cancel(reason)
        return True

    def stats(self) -> dict[str, int]:
        return {
            "open_endpoints": len(self._requests),
            "active_reservations": len(self._reservations),
            "pending_recvs": self._pending_recvs,
            "staging_bytes_in_use": self.pool.bytes_in_use,
            "staging_bytes_idle": self.pool.bytes_idle,
            "staging_allocations": self.pool.allocations,
            "bytes_received": self._bytes_received,
            "layers_received": self._layers_received,
            "messages_received": self._messages_received,
            "transfers_completed": self._transfers_completed,
            "transfers_failed": self._transfers_failed,
            "discarded_messages": self._discarded_messages,
            "discarded_bytes": self._discarded_bytes,
            "auth_failures": self._auth_failures,
        }

    async def close(self) -> None:
        """Fail every live transfer, close every connection, wait for their recvs to end."""
        if self._closing:
            return
        self._closing = True
        for t in list(self._reservations.values()):
            t._fail("receiver is shutting down", notify_sender=False)
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._requests):
            await conn.close("receiver is shutting down")
        await self._conn_tasks.wait()
        if self._event_waiter is not None:
            await asyncio.to_thread(self._event_waiter.close)
        self.pool.clear()
        if self._acquired:
            self._acquired = False
            ucx_runtime.release()

    # Connections.

    def _on_connect(self, ep) -> None:
        if self._closing:
            ep.abort()
            return
        conn = Connection(ep, peer="(new sender)", control_recvs=CONTROL_RECVS)
        self._requests[conn] = {}
        self._conn_tasks.spawn(self._serve(conn))

    async def _serve(self, conn: Connection) -> None:
        reason = "closed"
        try:
            hello = await asyncio.wait_for(conn.recv_control(), self.settings.hello_timeout_s)
            if not isinstance(hello, protocol.Hello):
                raise protocol.ProtocolError(f"expected HELLO, got {type(hello).__name__}")
            self._check_proof(hello)
            conn.peer = hello.pod_id
            conn.send_control(self._hello(hello))
            while True:
                msg = await conn.recv_control()
                if isinstance(msg, protocol.Layer):
                    await self._staging_room(msg.nbytes)
                self._handle(conn, msg)
        except ConnectionLost as e:
            reason = f"connection to sender {conn.peer} lost: {e}"
        except TimeoutError:
            reason = f"no HELLO within {self.settings.hello_timeout_s:g}s"
        except protocol.ProtocolError as e:
            reason = f"protocol error from {conn.peer}: {e}"
            if not conn.closed:
                conn.send_control(protocol.Error(str(e)))
        finally:
            for t in self._requests.pop(conn, {}).values():
                if isinstance(t, IncomingTransfer):
                    t._fail(reason, notify_sender=False)
            # Pending payload recvs fail once the endpoint is aborted; close() waits for
            # them, and they give their buffers back.
            await conn.close(reason)

    def _check_proof(self, hello: protocol.Hello) -> None:
        """Raise ProtocolError (the connection closes) unless the sender proved the secret:
        over this receiver's address, recently, with a nonce not seen before (no replay)."""
        secret = self.settings.secret
        if not secret:
            return
        now = time.time()
        problem = None
        if hello.address != self.address:
            problem = f"HELLO is for {str(hello.address)[:100]!r}, not {self.address}"
        elif not isinstance(hello.ts, int | float) or abs(now - hello.ts) > internal_auth.CLOCK_SKEW_S:
            problem = "HELLO is stale"
        elif not isinstance(hello.nonce, bytes) or len(hello.nonce) < 16 or hello.nonce in self._nonces:
            problem = "HELLO's nonce is missing or replayed"
        elif not isinstance(hello.proof, bytes) or not hmac.compare_digest(hello.proof, internal_auth.ucx_proof(
                secret, "sender", str(hello.pod_id), hello.address, hello.ts, hello.nonce)):
            problem = "HELLO does not prove the shared secret"
        if problem is not None:
            self._auth_failures += 1
            log.warning("kvtransfer: refused a connection: %s", problem)
            raise protocol.ProtocolError(f"authentication failed: {problem}")
        if len(self._nonces) > 10_000:  # forget nonces whose HELLO would be stale anyway
            self._nonces = {n: t for n, t in self._nonces.items() if t > now}
        self._nonces[hello.nonce] = now + 2 * internal_auth.CLOCK_SKEW_S

    def _hello(self, theirs: protocol.Hello) -> protocol.Hello:
        me = self.settings.pod_id
        if not self.settings.secret:
            return protocol.Hello(me, "receiver")
        proof = internal_auth.ucx_proof(self.settings.secret, "receiver", me, theirs.address, 0.0, theirs.nonce)
        return protocol.Hello(me, "receiver", proof=proof)

    def _handle(self, conn: Connection, msg: protocol.Message) -> None:
        requests = self._requests[conn]
        if isinstance(msg, protocol.Layer):
            self._on_layer_header(conn, requests, msg)
        elif isinstance(msg, protocol.PushBegin):
            self._on_push_begin(conn, requests, msg)
        elif isinstance(msg, protocol.Done):
            t = requests.pop(msg.request_id, None)
            if isinstance(t, IncomingTransfer):
                t.done_msg = msg
                problem = check_done(t.layout, t.received, t.in_flight)
                if problem is not None:
                    t._fail(problem, notify_sender=False)
                else:
                    t._maybe_complete()
        elif isinstance(msg, protocol.Cancel):
            t = requests.pop(msg.request_id, None)
            if isinstance(t, IncomingTransfer):
                t._fail(f"cancelled by sender: {msg.reason}", notify_sender=False)
        elif isinstance(msg, protocol.Error):
            log.warning(
                "kvtransfer sender %s reports: %s (request %s)",
                conn.peer,
                msg.reason,
                msg.request_id,
            )
            t = requests.get(msg.request_id) if msg.request_id else None
            if isinstance(t, IncomingTransfer):
                t._fail(f"sender error: {msg.reason}", notify_sender=False)
        else:
            raise protocol.ProtocolError(f"unexpected {type(msg).__name__} from a sender")

    async def _staging_room(self, nbytes: int) -> None:
        """Wait until `nbytes` more staging fits under max_staging_bytes (one message that is
        bigger than the cap on its own still goes, alone)."""
        need = size_class(nbytes)
        while (
            self.pool.bytes_in_use > 0
            and self.pool.bytes_in_use + need > self.settings.max_staging_bytes
        ):
            self._staging_freed.clear()
            await self._staging_freed.wait()

    def _on_push_begin(self, conn, requests, msg: protocol.PushBegin) -> None:
        t = self._reservations.get(msg.reservation_id)
        problem = check_push_begin(msg, t, request_open=msg.request_id in requests)
        if problem is None:
            t.conn = conn
            requests[msg.request_id] = t
            return
        requests[msg.request_id] = _DROPPED
        if t is not None and t.request_id == msg.request_id and t.conn is None:
            t.conn = conn  # so that the failure below reaches this sender
            t._fail(problem, notify_sender=True)
        else:
            log.info(
                "kvtransfer request %s from %s dropped: %s", msg.request_id, conn.peer, problem
            )
            conn.send_control(protocol.Cancel(msg.request_id, problem))

    def _on_layer_header(self, conn, requests, msg: protocol.Layer) -> None:
        t = requests.get(msg.request_id)
        if isinstance(t, IncomingTransfer):
            problem = check_layer(msg, t.layout, t.received, t.in_flight)
            if problem is not None:
                t._fail(problem, notify_sender=True)
                t = None
        else:
            t = None  # unknown, dropped or no PUSH_BEGIN: drain
        buf = self.pool.acquire(msg.nbytes)
        self._pending_recvs += 1
        if t is not None:
            t.in_flight.update(msg.layers)
        conn.spawn(self._receive_payload(conn, msg, buf, t))

    async def _receive_payload(
        self, conn: Connection, msg: protocol.Layer, buf: StagingBuffer, t: IncomingTransfer | None
    ) -> None:
        events: list = []  # GPU work on buf that on_layer started: buf waits for it
        try:
            try:
                await conn.recv_payload(msg.seq, buf.view(msg.nbytes))
            except ConnectionLost as e:
                if t is not None:
                    t._fail(f"connection to sender {conn.peer} lost: {e}", notify_sender=False)
                return
            self._messages_received += 1
            self._bytes_received += msg.nbytes
            if t is None or t.finished:
                self._discarded_messages += 1
                self._discarded_bytes += msg.nbytes
                return
            waits = []
            for k, layer in enumerate(msg.layers):
                kv = buf.typed(k * t.layout.layer_nbytes, t.layout.layer_shape, t.layout.dtype)
                try:
                    pending = t._on_layer(layer, kv)
                # A bug in the callback fails this transfer, not the pod.
                except Exception as e:  # noqa: BLE001
                    t._fail(f"on_layer({layer}) raised {type(e).__name__}: {e}", notify_sender=True)
                    break
                if is_event(pending):
                    events.append(pending)
                elif inspect.isawaitable(pending):
                    waits.append(pending)
                if t.finished:
                    break
            if events:
                waits.append(self._event_waiter.wait(events))
            if waits:
                results = await asyncio.gather(*waits, return_exceptions=True)
                events = []  # complete: the gather waited for them
                bad = next((r for r in results if isinstance(r, BaseException)), None)
                if bad is not None:
                    t._fail(f"on_layer's work raised {type(bad).__name__}: {bad}", True)
            if t.finished:
                return
            self._layers_received += len(msg.layers)
            t.received.update(msg.layers)
        finally:
            for ev in events:  # cancelled while the GPU still reads buf: wait here, briefly
                ev.synchronize()
            if t is not None:
                t.in_flight.difference_update(msg.layers)
            self._pending_recvs -= 1
            self.pool.release(buf)
            self._staging_freed.set()
            if t is not None and not t.finished:
                t._maybe_complete()
