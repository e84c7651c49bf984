"""Two real pods for the kvtransfer tests: this process (LocalSide) and a spawned peer.

ucxx binds to one event loop per process, so the local side runs its loop in a thread of
its own for the whole module. The peer is started once and restarted after a test kills it.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import threading
import time

import pytest

from baton.kvtransfer.receiver import KVReceiver, ReceiverSettings
from baton.kvtransfer.sender import KVSender, SenderSettings
from tests.kvtransfer import kv_peer


class LocalSide:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="kvtransfer-test-loop", daemon=True
        )
        self.thread.start()
        self.receiver = KVReceiver(ReceiverSettings(pod_id="local-decode", transfer_timeout_s=20))
        self.sender = KVSender(
            SenderSettings(pod_id="local-prefill", connect_timeout_s=3, min_message_bytes=0)
        )
        self.run(self.receiver.start())
        self.run(self.sender.start())

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args, **kw):
        """fn(*args, **kw) on the loop thread (receiver and sender state lives there)."""

        async def on_loop():
            return fn(*args, **kw)

        return self.run(on_loop())

    def expect(self, *args, **kw):
        return self.call(self.receiver.expect, *args, **kw)

    def receiver_stats(self) -> dict:
        return self.call(self.receiver.stats)

    def sender_stats(self) -> dict:
        return self.call(self.sender.stats)

    def wait_receiver_idle(self, timeout: float = 5.0) -> dict:
        """Stats once nothing is held: no reservation, no pending recv, no staging in use."""
        return _wait_for(self.receiver_stats, _receiver_idle, timeout)

    def wait_sender_idle(self, timeout: float = 5.0) -> dict:
        return _wait_for(self.sender_stats, _sender_idle, timeout)

    def close(self) -> None:
        self.run(self.sender.close())
        self.run(self.receiver.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _receiver_idle(s: dict) -> bool:
    return (
        s["active_reservations"] == 0 and s["pending_recvs"] == 0 and s["staging_bytes_in_use"] == 0
    )


def _sender_idle(s: dict) -> bool:
    return s["active_transfers"] == 0 and s["inflight_bytes"] == 0 and s["inflight_messages"] == 0


def _wait_for(get, ok, timeout):
    deadline = time.monotonic() + timeout
    while True:
        s = get()
        if ok(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.02)


class PeerDied(Exception):
    pass


class Peer:
    """The spawned pod. `call` runs a command there and returns its result."""

    def __init__(self):
        ctx = mp.get_context("spawn")  # never fork a process that has used ucxx
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=kv_peer.main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self._ids = itertools.count()
        self._replies: dict[int, tuple] = {}
        _, self.address, self.pid = self._read(timeout=60)

    def submit(self, name: str, **kw) -> int:
        cid = next(self._ids)
        self.conn.send((cid, name, kw))
        return cid

    def result(self, cid: int, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while cid not in self._replies:
            rid, status, value = self._read(deadline - time.monotonic())
            self._replies[rid] = (status, value)
        status, value = self._replies.pop(cid)
        if status != "ok":
            raise AssertionError(f"peer command failed:\n{value}")
        return value

    def call(self, name: str, timeout: float = 30, **kw):
        return self.result(self.submit(name, **kw), timeout)

    def _read(self, timeout: float):
        if not self.conn.poll(max(timeout, 0)):
            if not self.proc.is_alive():
                raise PeerDied(f"peer exited with {self.proc.exitcode}")
            raise TimeoutError(f"peer did not answer within {timeout:.1f}s")
        try:
            return self.conn.recv()
        except EOFError:
            raise PeerDied(f"peer exited with {self.proc.exitcode}") from None

    def wait_dead(self, timeout: float = 10) -> float:
        """Block until the process is gone; returns when (time.monotonic()) it was seen gone."""
        self.proc.join(timeout)
        assert not self.proc.is_alive(), "peer is still alive"
        return time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


@pytest.fixture(scope="module")
def local():
    side = LocalSide()
    yield side
    side.close()


@pytest.fixture(scope="module")
def _peers():
    held: list[Peer] = []
    yield held
    for p in held:
        p.close()


@pytest.fixture
def peer(_peers) -> Peer:
    """A live peer: the module's, or a fresh one if an earlier test killed it."""
    if not _peers or not _peers[-1].alive:
        _peers.append(Peer())
    return _peers[-1]
