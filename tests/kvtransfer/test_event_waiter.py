"""The waiter thread that turns completed CUDA events into loop callbacks, on fake events."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from baton.kvtransfer.event_waiter import EventWaiter, is_event
from tests.kvtransfer.fake_event import FakeEvent


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_is_event():
    assert is_event(FakeEvent(0)) and not is_event(None) and not is_event(asyncio.sleep)


def test_callbacks_run_on_the_loop_in_order_once_their_events_complete():
    async def main():
        loop = asyncio.get_running_loop()
        waiter = EventWaiter(loop, "test-waiter")
        order, threads = [], set()
        events = [FakeEvent(), FakeEvent(), FakeEvent()]
        for i, ev in enumerate(events):
            waiter.watch(
                [ev] if i else [], lambda i=i: (order.append(i), threads.add(threading.get_ident()))
            )
        events[2].complete()  # done first, but waits behind 0 and 1
        await asyncio.sleep(0.05)
        assert order == [0]  # 0 has no event; 1 is pending and holds 2
        for ev in events:
            ev.complete()
        await waiter.wait([])
        assert order == [0, 1, 2]
        assert threads == {threading.get_ident()}  # the loop's thread, not the waiter's
        await asyncio.to_thread(waiter.close)

    run(main())


def test_a_pending_event_holds_its_callback_and_later_ones_until_it_completes():
    async def main():
        waiter = EventWaiter(asyncio.get_running_loop(), "test-waiter")
        slow = FakeEvent()
        fut = waiter.wait([slow])
        later = waiter.wait([FakeEvent(0)])
        await asyncio.sleep(0.1)
        assert not fut.done() and not later.done()
        slow.complete()
        await asyncio.gather(fut, later)
        await asyncio.to_thread(waiter.close)

    run(main())


def test_callbacks_whose_events_completed_together_run_in_one_loop_wake_up():
    async def main():
        waiter = EventWaiter(asyncio.get_running_loop(), "test-waiter")
        gate = FakeEvent()
        futs = [waiter.wait([gate])] + [waiter.wait([FakeEvent(0)]) for _ in range(20)]
        await asyncio.sleep(0.05)
        gate.complete()
        await asyncio.gather(*futs)
        assert waiter.batches == 1
        await asyncio.to_thread(waiter.close)

    run(main())


def test_a_failing_callback_does_not_strand_the_others(caplog):
    async def main():
        waiter = EventWaiter(asyncio.get_running_loop(), "test-waiter")
        ran = []
        gate = FakeEvent()
        waiter.watch([gate], lambda: 1 / 0)
        waiter.watch([], lambda: ran.append(1))
        gate.complete()
        await waiter.wait([])
        assert ran == [1]
        await asyncio.to_thread(waiter.close)

    run(main())
    assert "ZeroDivisionError" in caplog.text


def test_close_runs_what_was_watched_and_refuses_more():
    async def main():
        waiter = EventWaiter(asyncio.get_running_loop(), "test-waiter")
        fut = waiter.wait([FakeEvent(0.05)])
        started = time.monotonic()
        await asyncio.to_thread(waiter.close)
        assert time.monotonic() - started >= 0.04
        await asyncio.sleep(0)
        assert fut.done()
        with pytest.raises(RuntimeError, match="closed"):
            waiter.watch([], lambda: None)

    run(main())
