"""The engine on its own thread; the asyncio side talks to it through a queue.

The GPU loop never waits on the network and the event loop never waits on a model step:
requests, aborts and the remote-KV hand-off (reserve, receive a layer, complete, fall back)
go in through a thread-safe inbox and run between steps, so only this thread touches the
engine and its KV cache; each step's outputs come back to per-request asyncio queues in one
`call_soon_threadsafe`. KV events and load figures are copied out under a short lock after
each step, for the index publisher.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from baton.engine.engine import EngineStats, FirstToken, LLMEngine, RequestOutput
from baton.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

STALL_BACKLOG = 64  # outputs a request's queue holds unread before its stream counts as stalled


@dataclass
class EngineFailure:
    """Put on a request's queue when the engine could not serve it."""

    message: str


def _settle(fut: asyncio.Future, result, exc) -> None:
    if fut.done():
        return  # the caller gave up (cancelled)
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class EngineLoop:
    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop, stall_timeout_s: float = 0.0):
        self.engine = engine
        self.loop = loop
        # a stream whose reader stopped reading (STALL_BACKLOG outputs unread) for this long is
        # aborted and its KV freed; 0: never (issue 23: unread streams held a pod's KV for good)
        self.stall_timeout_s = stall_timeout_s
        self._stalled: dict[str, float] = {}  # request id -> when its backlog began (event loop)
        self._queued: frozenset[str] = frozenset()  # ids waiting for room in the batch (engine thread)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}  # touched on the event loop only
        self._lock = threading.Lock()
        self._stats: EngineStats = engine.stats()
        self._pending: dict[bytes, bool] = {}  # hash -> stored (True) / removed (False), net
        self._cleared = False
        self._cached: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.steps = 0
        self.step_seconds = 0.0
        # called on the engine thread with each finished step's kind and time (engine.last_step)
        self.on_step: Callable[[str, float], None] = lambda kind, seconds: None
        self.alive = False
        self._collect_events()

    # -- event-loop side ----------------------------------------------------------------
    def start(self) -> None:
        self.alive = True
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams, sink=None, **kw) -> asyncio.Queue:
        """Queue a request (kw: add_request's prefill_only, kv_start); its outputs arrive on
        the returned queue (`sink`: anything with an asyncio.Queue's put_nowait and qsize)."""
        q = self.attach(request_id, sink)
        self._inbox.put(("add", request_id, prompt, params, kw))
        return q

    def attach(self, request_id: str, sink=None) -> asyncio.Queue:
        """The queue a request's outputs go to (for requests that `reserve` KV from elsewhere)."""
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use on this pod")
        q = asyncio.Queue() if sink is None else sink
        self._queues[request_id] = q
        return q

    # the remote-KV hand-off of a decode pod (LLMEngine's methods of the same names)
    def reserve(self, request_id: str, prompt: list[int], params: SamplingParams) -> asyncio.Future:
        """-> Reservation | None (no room now)."""
        return self._call(LLMEngine.reserve_remote, (request_id, prompt, params), emit=False)

    def receive_layer(self, request_id: str, layer: int, kv) -> asyncio.Future:
        """-> the CUDA event after the layer's write into the reservation, or None (done)."""
        return self._call(LLMEngine.receive_layer, (request_id, layer, kv), emit=False)

    def complete(self, request_id: str, first: FirstToken | None = None) -> asyncio.Future:
        """The reservation's KV is in: the request joins the batch. With `first`, its output
        reaches the request's queue before the future settles and before any later step's."""
        return self._call(LLMEngine.complete_remote, (request_id, first), emit=True)

    def fall_back(self, request_id: str) -> asyncio.Future:
        """The transfer failed: drop what arrived and prefill here."""
        return self._call(LLMEngine.fallback_local, (request_id,), emit=False)

    def add(self, request_id: str, prompt: list[int], params: SamplingParams) -> asyncio.Future:
        """Queue a request attached earlier (no room to reserve: it is prefilled here)."""
        return self._call(LLMEngine.add_request, (request_id, prompt, params), emit=False)

    def run(self, fn, *args) -> asyncio.Future:
        """Run fn(engine, *args) on the engine thread between steps (tests, debugging)."""
        return self._call(fn, args, emit=False)

    def _call(self, fn, args: tuple, emit: bool) -> asyncio.Future:
        fut = self.loop.create_future()
        self._inbox.put(("call", fn, args, fut, emit))
        return fut

    def queued(self, request_id: str) -> bool:
        """The request waits for room in the batch (as of the last step): time queued is not
        time its tokens are late."""
        return request_id in self._queued

    def abort(self, request_id: str, notify: bool = False) -> None:
        """Stop the request; with `notify` (an abort from outside its stream), its stream also
        gets a last output with finish_reason "abort" instead of waiting for tokens that never come."""
        self._stalled.pop(request_id, None)
        q = self._queues.pop(request_id, None)
        if q is not None:
            self._inbox.put(("abort", request_id))
            if notify:
                q.put_nowait(RequestOutput(request_id, [], None, "abort", 0, 0))

    def release(self, request_id: str) -> None:
        """Forget a finished request's queue (its engine state is already gone)."""
        self._stalled.pop(request_id, None)
        self._queues.pop(request_id, None)

    @property
    def num_open_requests(self) -> int:
        return len(self._queues)

    def stats(self) -> EngineStats:
        with self._lock:
            return self._stats

    def state(self) -> dict:
        return asdict(self.stats())

    def drain_events(self) -> tuple[list[bytes], list[bytes], bool]:
        with self._lock:
            pending, cleared = self._pending, self._cleared
            self._pending, self._cleared = {}, False
        return [h for h, s in pending.items() if s], [h for h, s in pending.items() if not s], cleared

    def all_cached(self) -> list[bytes]:
        with self._lock:
            return list(self._cached)

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        now = time.monotonic()
        for rid, item in items:
            q = self._queues.get(rid)
            if q is None:
                continue
            q.put_nowait(item)
            if q.qsize() <= STALL_BACKLOG or not self.stall_timeout_s:
                self._stalled.pop(rid, None)
            elif now - self._stalled.setdefault(rid, now) > self.stall_timeout_s:
                log.warning("request %s: its stream was not read for %.0f s (%d outputs waiting); aborted",
                            rid, self.stall_timeout_s, q.qsize())
                self.abort(rid)  # frees its KV now; the stream ends with this error if it is ever read
                q.put_nowait(EngineFailure(f"the stream was not read for {self.stall_timeout_s:.0f} s"))

    # -- engine thread ------------------------------------------------------------------
    def _collect_events(self) -> None:
        ev = self.engine.drain_kv_events()
        stats = self.engine.stats()
        with self._lock:
            if ev.cleared:
                self._cleared, self._pending, self._cached = True, {}, set()
            for h in ev.removed:
                self._pending[h] = False
                self._cached.discard(h)
            for h in ev.stored:
                self._pending[h] = True
                self._cached.add(h)
            self._stats = stats
        self._queued = frozenset(seq.request_id for seq in self.engine.scheduler.waiting)

    def _handle(self, cmd, failed: list) -> None:
        if cmd[0] == "add":
            _, rid, prompt, params, kw = cmd
            try:
                self.engine.add_request(rid, prompt, params, **kw)
            except ValueError as e:
                failed.append((rid, EngineFailure(str(e))))
        elif cmd[0] == "call":
            _, fn, args, fut, emit = cmd
            try:
                result, exc = fn(self.engine, *args), None
            except Exception as e:  # handed to the caller, who decides
                result, exc = None, e
            if emit and result:
                self.loop.call_soon_threadsafe(self._deliver, [(o.request_id, o) for o in result])
            self.loop.call_soon_threadsafe(_settle, fut, result, exc)
        else:
            self.engine.abort_request(cmd[1])

    def _run(self) -> None:
        if self.engine.device.type == "cuda":
            import torch

            # the current CUDA device is per thread: Triton launches on it
            torch.cuda.set_device(self.engine.device)
        try:
            while not self._stop.is_set():
                failed: list = []
                idle = not self.engine.has_unfinished_requests()
                try:
                    cmd = self._inbox.get(timeout=0.5) if idle else self._inbox.get_nowait()
                except queue.Empty:
                    cmd = False
                while cmd:
                    self._handle(cmd, failed)
                    try:
                        cmd = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                outputs: list[RequestOutput] = []
                if self.engine.has_unfinished_requests():
                    t = time.perf_counter()
                    try:
                        outputs = self.engine.step()
                    except Exception as e:  # a failed step must not strand requests
                        log.exception("engine step failed; failing every request in flight")
                        for rid in list(self.engine.seqs):
                            self.engine.abort_request(rid)
                            failed.append((rid, EngineFailure(f"engine step failed: {e!r}")))
                    self.step_seconds += time.perf_counter() - t
                    self.steps += 1
                    if self.engine.last_step is not None:
                        self.on_step(*self.engine.last_step)
                self._collect_events()
                items = [(o.request_id, o) for o in outputs] + failed
                if items:
                    self.loop.call_soon_threadsafe(self._deliver, items)
        finally:
            self.alive = False
            for rid in list(self.engine.seqs):
                self.engine.abort_request(rid)
