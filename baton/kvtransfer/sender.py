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
    t.finish(first_token, first_logprob, top_logprobs)
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

Where each part lives: the send window (both bounds, CUDA readiness) in send_window.py, one
request's push and its coalescing in push.py, the connections per decode pod in
sender_connections.py, the staging pools in staging.py. This module ties them together.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from baton.kvtransfer import ucx_runtime
from baton.kvtransfer.layout import KVLayout
from baton.kvtransfer.push import LiveTransfers, OutgoingTransfer, PushContext
from baton.kvtransfer.send_window import SendWindow
from baton.kvtransfer.sender_connections import SenderConnections
from baton.kvtransfer.staging import SenderStaging

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
    secret: str = ""  # the shared secret the HELLO proves (internal_auth.ucx_proof); "": none


class KVSender:
    def __init__(self, settings: SenderSettings | None = None):
        self.settings = s = settings or SenderSettings()
        self._window = SendWindow(
            s.max_inflight_messages, s.max_inflight_bytes, s.push_block_timeout_s
        )
        self._connections = SenderConnections(s.pod_id, s.connect_timeout_s, s.secret)
        self._staging = SenderStaging(s.staging_idle_bytes)
        self._live = LiveTransfers()
        self._pushes: PushContext | None = None  # made by start(), on the loop
        self._closing = False
        self._acquired = False

    async def start(self) -> None:
        await ucx_runtime.acquire()
        self._acquired = True
        loop = asyncio.get_running_loop()
        self._window.start(loop)
        self._pushes = PushContext(
            loop, self.settings, self._window, self._connections, self._staging, self._live
        )

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
        if self._pushes is None or self._closing:
            raise RuntimeError("sender is not running")
        t = OutgoingTransfer(
            self._pushes,
            request_id,
            reservation_id,
            address,
            KVLayout(num_layers, layer_shape, dtype),
            min_message_bytes,
        )

        def start():
            if not self._live.add(t):
                t.fail("another transfer of this request is running", False)
                return
            t.start()

        self._pushes.loop.call_soon_threadsafe(start)
        return t

    def stats(self) -> dict[str, int]:
        pools = self._staging.pools()
        window = self._window
        return {
            "open_endpoints": self._connections.open_endpoints,
            "active_transfers": len(self._live),
            "inflight_bytes": window.inflight_bytes,
            "inflight_messages": window.inflight_messages,
            "inflight_messages_peak": window.inflight_messages_peak,
            "queued_messages": window.queued_messages,
            "staging_bytes_in_use": sum(p.bytes_in_use for p in pools),
            "staging_bytes_idle": sum(p.bytes_idle for p in pools),
            "staging_allocations": sum(p.allocations for p in pools),
            "bytes_sent": window.bytes_sent,
            "layers_sent": window.layers_sent,
            "messages_sent": window.messages_sent,
            "transfers_completed": self._live.completed,
            "transfers_failed": self._live.failed,
            "connect_failures": self._connections.connect_failures,
        }

    async def close(self) -> None:
        """Fail every live transfer, close every connection, wait for their sends to end."""
        if self._closing:
            return
        self._closing = True
        for t in self._live.all():
            t.fail("sender is shutting down", False)
        await self._connections.close("sender is shutting down")
        await self._window.close()
        self._staging.clear()
        if self._acquired:
            self._acquired = False
            ucx_runtime.release()
