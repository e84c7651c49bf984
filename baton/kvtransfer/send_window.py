"""The sender's send window: messages from hand-over to sent, bounded in bytes and in sends at once.

Shared by every transfer of one `KVSender` (sender.py says why each bound exists):

- Bytes. A message holds `max_inflight_bytes` budget from the moment the producer hands it
  over until its send completes or it is dropped. `reserve()` blocks the producer while the
  budget is full, at most `push_block_timeout_s`.
- Readiness. A message with a CUDA event is ready once the event completes. The waiter
  thread (event_waiter.py) waits for it, off the loop, and marks it ready on the loop.
- Sends at once. Ready messages whose transfer is connected (`admit()`) queue in the order
  they became ready; at most `max_inflight_messages` payload sends are submitted to UCX at
  once, across all transfers. `pump()` hands the next ones to their transfer's `submit()`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import torch

from baton.kvtransfer.event_waiter import EventWaiter
from baton.kvtransfer.staging import StagingBuffer, StagingPool, size_class

if TYPE_CHECKING:
    from baton.kvtransfer.push import OutgoingTransfer


class Message:
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


class SendWindow:
    def __init__(self, max_messages: int, max_bytes: int, block_timeout_s: float):
        if max_messages < 1:
            raise ValueError("max_inflight_messages must be at least 1")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.block_timeout_s = block_timeout_s
        self._loop_thread: int | None = None
        self._event_waiter: EventWaiter | None = None
        self._budget = threading.Condition()
        self.inflight_bytes = 0
        self._ready: deque[Message] = deque()  # ready to send, waiting for a window slot
        self.inflight_messages = 0
        self.inflight_messages_peak = 0
        self.bytes_sent = 0
        self.layers_sent = 0
        self.messages_sent = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop that sends. Its thread may never block on the budget."""
        self._loop_thread = threading.get_ident()
        # Its thread starts only when the first CUDA message is watched.
        self._event_waiter = EventWaiter(loop, "kvtransfer-send-events")

    @property
    def queued_messages(self) -> int:
        return sum(not m.done for m in self._ready)

    # Producer thread.

    def reserve(self, msg: Message, transfer: OutgoingTransfer) -> bool:
        """Take the message's bytes from the budget, blocking while it is full. False, taking
        nothing, if `transfer` fails meanwhile or the wait runs past `block_timeout_s`."""
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError(
                "push_layer may block for backpressure: call it from the model "
                "thread, not from the event loop"
            )
        nbytes = size_class(msg.nbytes) if msg.staging is not None else msg.nbytes
        deadline = time.monotonic() + self.block_timeout_s
        with self._budget:
            # One message over the whole budget still goes when nothing else is in flight.
            while self.inflight_bytes > 0 and self.inflight_bytes + nbytes > self.max_bytes:
                left = deadline - time.monotonic()
                if transfer.failed or left <= 0:
                    return False
                self._budget.wait(left)
            if transfer.failed:
                return False
            self.inflight_bytes += nbytes
        msg.budget = nbytes
        return True

    def watch(self, msg: Message) -> None:
        """Mark the message ready on the loop once its CUDA event has completed."""
        self._event_waiter.watch([msg.event], lambda: self._on_event_done(msg))

    # Any thread.

    def wake_blocked(self) -> None:
        """A transfer failed: a producer blocked in reserve() for it returns now."""
        with self._budget:
            self._budget.notify_all()

    # Loop thread.

    def _on_event_done(self, msg: Message) -> None:
        msg.ready = True
        if msg.accepted and not msg.done:
            self._ready.append(msg)
            self.pump()

    def admit(self, msg: Message) -> None:
        """Its transfer is connected: send it once its data is written and the window has room."""
        msg.accepted = True
        if msg.ready:
            self._ready.append(msg)
            self.pump()

    def pump(self) -> None:
        while self._ready and self.inflight_messages < self.max_messages:
            msg = self._ready.popleft()
            if not msg.done:
                msg.transfer.submit(msg)

    def submitted(self) -> None:
        """A transfer submitted a payload send for a message that pump() gave it."""
        self.inflight_messages += 1
        self.inflight_messages_peak = max(self.inflight_messages_peak, self.inflight_messages)

    def send_ended(self, msg: Message, sent: bool) -> None:
        """A submitted payload send completed (`sent`) or failed: its slot and buffer are back."""
        if sent:
            self.bytes_sent += msg.nbytes
            self.layers_sent += len(msg.layers)
            self.messages_sent += 1
        self.release(msg)
        self.inflight_messages -= 1
        self.pump()

    def release(self, msg: Message) -> None:
        """Give a message's buffer and budget back (once)."""
        if msg.done:
            return
        msg.done = True
        msg.payload = None  # a pushed layer goes back to torch's allocator here
        if msg.staging is not None:
            msg.pool.release(msg.staging)
            msg.staging = None
        if msg.budget:
            with self._budget:
                self.inflight_bytes -= msg.budget
                self._budget.notify_all()

    async def close(self) -> None:
        """Wait for the events already watched, and stop the waiter thread."""
        if self._event_waiter is not None:
            await asyncio.to_thread(self._event_waiter.close)
