"""A stand-in for a CUDA event on machines without a GPU: `query()` and `synchronize()`."""

from __future__ import annotations

import threading


class FakeEvent:
    """Pending until complete(), or `delay` seconds after it is made (0: already complete)."""

    def __init__(self, delay: float | None = None):
        self._done = threading.Event()
        if delay is not None and delay <= 0:
            self._done.set()
        elif delay is not None:
            threading.Timer(delay, self._done.set).start()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()

    def complete(self) -> None:
        self._done.set()
