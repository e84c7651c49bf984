"""A thread that waits for CUDA events and runs their callbacks on the event loop, in batches.

Both sides have GPU work whose end gates a network step: the sender may send a layer only
once the kernel that wrote it has finished, and the receiver may reuse a staging buffer only
once the scatter that reads it has finished. Waiting on the event loop (polling `query()`)
costs a wake-up per poll and the GIL each time. Waiting in a thread pool (the old way:
`run_in_executor(None, event.synchronize)` per layer) parks one thread per pending layer,
and a default CUDA event spins in `synchronize()`: 36 spinning threads took cores from the
model thread. So one thread per sender or receiver waits, on events made with
`torch.cuda.Event(blocking=True)` (cudaEventBlockingSync: the thread sleeps in the driver
and does not hold the GIL), in the order they were watched. Events of one stream complete
in that order anyway. Once the head is done it also takes every later entry whose events
are already done, and hands all their callbacks to the loop in one `call_soon_threadsafe`:
one loop wake-up per batch, not per layer.

Anything with `query()` and `synchronize()` is an event here, so tests use plain Python
fakes on machines without a GPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)


def is_event(obj) -> bool:
    return callable(getattr(obj, "query", None)) and callable(getattr(obj, "synchronize", None))


def cuda_event():
    """An event that sleeps rather than spins in synchronize()."""
    import torch

    return torch.cuda.Event(blocking=True)


class EventWaiter:
    def __init__(self, loop: asyncio.AbstractEventLoop, name: str):
        self._loop = loop
        self._name = name
        self._cv = threading.Condition()
        self._queue: deque[tuple[Sequence, Callable[[], None]]] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = 0  # loop wake-ups made; tests check that callbacks are batched

    def watch(self, events: Sequence, callback: Callable[[], None]) -> None:
        """Run `callback()` on the loop once every event in `events` has completed.
        Thread-safe. Callbacks run in the order they were watched."""
        with self._cv:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            self._queue.append((events, callback))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify()

    def wait(self, events: Sequence) -> asyncio.Future:
        """On the loop: a future that resolves once every event in `events` has completed."""
        fut = self._loop.create_future()

        def done():
            if not fut.done():
                fut.set_result(None)

        self.watch(events, done)
        return fut

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the callbacks already watched (their events must complete) have run.

        The thread is a daemon: a GPU that never completes an event does not keep the
        process alive, it only leaves this join to time out.
        """
        with self._cv:
            self._closed = True
            self._cv.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                head_events, _ = self._queue[0]
            for ev in head_events:
                ev.synchronize()  # releases the GIL while it sleeps
            with self._cv:
                ready = [self._queue.popleft()[1]]
                while self._queue and all(ev.query() for ev in self._queue[0][0]):
                    ready.append(self._queue.popleft()[1])
            self.batches += 1
            try:
                self._loop.call_soon_threadsafe(_run_all, ready)
            except RuntimeError:  # the loop is closed: nobody is left to call back
                log.warning("%s: event loop closed, %d callbacks dropped", self._name, len(ready))
                return


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    for cb in callbacks:
        try:
            cb()
        except Exception:  # one failing callback must not strand the others
            log.exception("kvtransfer event callback failed")
