"""The sender's registry of running pushes: a refused second push of a request leaves the
running one registered (so stats count it and close() fails it)."""

from __future__ import annotations

from types import SimpleNamespace

from baton.kvtransfer.push import LiveTransfers


def test_refused_duplicate_leaves_the_running_push_registered():
    live = LiveTransfers()
    running, duplicate = SimpleNamespace(request_id="r"), SimpleNamespace(request_id="r")
    assert live.add(running)
    assert not live.add(duplicate)
    live.ended(duplicate, ok=False)
    assert live.all() == [running] and live.failed == 1
    live.ended(running, ok=True)
    assert len(live) == 0 and live.completed == 1
