"""A pod's writer into the index: heartbeat with load figures, KV events, full re-sync after outages."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from baton.kvindex import schema
from baton.kvindex.connection import REDIS_ERRORS, bounded, connect, shard_count

log = logging.getLogger(__name__)

# Hashes per APPLY/CLEAR call: a whole re-sync of a big cache must not block Redis for long.
CHUNK = 2000


@dataclass
class PodInfo:
    """The parts of a heartbeat that never change while the pod lives."""

    pod_id: str
    role: str
    url: str
    model: str
    ucx_address: str = ""
    block_size: int = 16
    max_model_len: int = 0  # 0: unknown (routers then fall back to the model's config)


def _unpack(events: Any) -> tuple[list[bytes], list[bytes], bool]:
    # A tuple (stored, removed, cleared) or an object with those attributes (engine's KVEvents).
    if isinstance(events, tuple):
        stored, removed, cleared = events
    else:
        stored, removed, cleared = events.stored, events.removed, events.cleared
    return list(stored), list(removed), bool(cleared)


class PodPublisher:
    """Keeps a pod's heartbeat and cached-block entries in Redis, and survives Redis outages.

    Callables (called on the event loop's thread; the caller makes them safe to call there):
      state()        -> dict with running, waiting, waiting_prefill_tokens, free_blocks,
                        total_blocks and optionally cached_blocks
      drain_events() -> (stored, removed, cleared) since the last call, net per hash
      all_cached()   -> every hash the pod holds now

    Every tick sends the events (removed, then stored) and the heartbeat: one pipeline on one
    Redis; in a cluster, calls one after another to the node of the pod's shard (schema.py).
    The pod is "in sync" only after it announced "cleared" and re-published all_cached();
    that happens on the first tick, after any Redis error, and whenever the heartbeat was
    found missing (Redis lost its data, or the pod stalled past the TTL and a router purged it).
    """

    def __init__(
        self,
        redis_url: str,
        info: PodInfo,
        state: Callable[[], dict],
        drain_events: Callable[[], Any],
        all_cached: Callable[[], list[bytes]],
        *,
        prefix: str = schema.DEFAULT_PREFIX,
        interval_s: float = 0.2,
        ttl_s: float = 3.0,
        timeout_s: float = 1.0,
        max_backoff_s: float = 5.0,
        secret: str | None = None,
    ):
        if ttl_s <= 2 * interval_s:
            raise ValueError("ttl_s must exceed two publish intervals, or live pods would flicker")
        schema.PodRecord(
            pod_id=info.pod_id, role=info.role, url=info.url, model=info.model
        )  # validates
        self.info = info
        self._state, self._drain, self._all_cached = state, drain_events, all_cached
        shards = shard_count(redis_url)  # None: one Redis; else this pod writes to its shard only
        self.prefix = schema.shard_prefixes(prefix, shards)[
            0 if shards is None else schema.shard_of(info.pod_id, shards)]
        self._keys = [schema.pods_key(self.prefix)]  # names the shard's slot (schema.py)
        self._cluster = shards is not None
        self.secret = secret or None  # signs every record (internal_auth.py); None: unsigned
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self.timeout_s, self.max_backoff_s = timeout_s, max_backoff_s
        self._r = connect(redis_url, timeout_s)
        self._apply = self._r.register_script(schema.APPLY)
        self._clear = self._r.register_script(schema.CLEAR)
        self._pod_key = schema.pod_key(self.prefix, info.pod_id)
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.synced = False
        self.errors = 0  # Redis errors seen (a metric for the pod)
        self.resyncs = 0  # full re-publications done

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> asyncio.Task:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name=f"publisher-{self.info.pod_id}")
        return self._task

    def poke(self) -> None:
        """Publish now instead of at the next interval (safe from any thread, e.g. after a step)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def stop(self, deregister: bool = True) -> None:
        """Stop publishing; with `deregister`, remove the heartbeat and entries right away
        so routers stop picking this pod before the TTL runs out."""
        if self._task is not None:
            # The flag, not only cancel(): Python 3.11's wait_for/timeout can swallow a cancel
            # that races a timeout, and a loop that missed it would run (and block us) forever.
            self._stopping = True
            self._wake.set()
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=2 * self.timeout_s + 1)
            self._task = None
        if deregister:
            try:
                await bounded(self._r.delete(self._pod_key), self.timeout_s)
                await self._clear_all(dead_only=True)
            except REDIS_ERRORS as e:
                log.warning(
                    "pod %s: could not deregister (routers will purge it): %r", self.info.pod_id, e
                )
        await self._r.aclose()

    # -- one tick ---------------------------------------------------------------------------

    def _record(self) -> str:
        s = self._state()
        now = time.time()
        rec = schema.PodRecord(
            pod_id=self.info.pod_id,
            role=self.info.role,
            url=self.info.url,
            model=self.info.model,
            ucx_address=self.info.ucx_address,
            block_size=self.info.block_size,
            max_model_len=self.info.max_model_len,
            running=int(s.get("running", 0)),
            waiting=int(s.get("waiting", 0)),
            waiting_prefill_tokens=int(s.get("waiting_prefill_tokens", 0)),
            free_blocks=int(s.get("free_blocks", 0)),
            total_blocks=int(s.get("total_blocks", 0)),
            cached_blocks=int(s.get("cached_blocks", 0)),
            ts=now,
            expires=now + self.ttl_s,
        )
        return (rec.signed(self.secret) if self.secret else rec).to_json()

    def _apply_args(self, stored: list[bytes], removed: list[bytes]) -> list[list]:
        """APPLY calls for these events, removed first, at most CHUNK hashes each."""
        rem = [h.hex() for h in removed]
        sto = [h.hex() for h in stored]
        calls = [[self.prefix, self.info.pod_id, len(c), *c]
                 for c in (rem[i : i + CHUNK] for i in range(0, len(rem), CHUNK))]
        return calls + [[self.prefix, self.info.pod_id, 0, *sto[i : i + CHUNK]]
                        for i in range(0, len(sto), CHUNK)]

    async def _send(self, stored: list[bytes], removed: list[bytes]) -> bytes | None:
        """The events, then the heartbeat; returns the heartbeat found in Redis before (None:
        missing). One pipeline on one Redis; in a cluster, one call after another (redis-py
        refuses scripts in a cluster pipeline), each sent to the node of this pod's shard."""
        record, ttl_ms = self._record(), int(self.ttl_s * 1000)
        if self._cluster:
            for args in self._apply_args(stored, removed):
                await self._apply(keys=self._keys, args=args)
            before = await self._r.set(self._pod_key, record, px=ttl_ms, get=True)
            await self._r.sadd(self._keys[0], self.info.pod_id)
            return before
        pipe = self._r.pipeline(transaction=False)
        for args in self._apply_args(stored, removed):
            await self._apply(keys=self._keys, args=args, client=pipe)
        pipe.set(self._pod_key, record, px=ttl_ms, get=True)
        pipe.sadd(self._keys[0], self.info.pod_id)
        return (await pipe.execute())[-2]

    async def _clear_all(self, dead_only: bool) -> None:
        while True:
            left = await bounded(
                self._clear(keys=self._keys,
                            args=[self.prefix, self.info.pod_id, CHUNK, "1" if dead_only else "0"]),
                self.timeout_s,
            )
            if left <= 0:
                return

    async def _resync(self) -> None:
        # Drain first, then snapshot: an event racing the snapshot shows up again in the next
        # drain, and APPLY is idempotent, so nothing is lost or left behind.
        self._drain()
        hashes = list(self._all_cached())
        # Heartbeat first, so no router's sweep purges what we are about to publish.
        await bounded(self._send([], []), self.timeout_s)
        await self._clear_all(dead_only=False)  # "all cleared": drop whatever a former life left
        await bounded(self._send(hashes, []), self.timeout_s + len(hashes) / 50_000)
        self.synced = True
        self.resyncs += 1
        log.info(
            "pod %s: index in sync (%d cached blocks published)", self.info.pod_id, len(hashes)
        )

    async def publish_once(self) -> None:
        """One tick: re-sync if needed, else publish the drained events and the heartbeat."""
        if not self.synced:
            await self._resync()
            return
        stored, removed, cleared = _unpack(self._drain())
        if cleared:
            await self._clear_all(dead_only=False)
        before = await bounded(
            self._send(stored, removed), self.timeout_s + (len(stored) + len(removed)) / 50_000
        )
        if before is None:  # SET ... GET found no heartbeat: our entries may be gone
            log.warning(
                "pod %s: heartbeat was missing in Redis; re-publishing everything", self.info.pod_id
            )
            self.synced = False
            await self._resync()

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self.publish_once()
                if failures:
                    log.info(
                        "pod %s: Redis is back after %d failed attempts", self.info.pod_id, failures
                    )
                failures = 0
                delay = self.interval_s
            except REDIS_ERRORS as e:
                self.errors += 1
                self.synced = False
                if failures == 0:
                    log.warning(
                        "pod %s: Redis unavailable (%r); retrying with backoff", self.info.pod_id, e
                    )
                failures += 1
                delay = min(self.max_backoff_s, self.interval_s * 2**failures) * random.uniform(
                    0.5, 1.0
                )
            except Exception:
                # A bug in a state/drain callable: keep the pod registered, say so loudly.
                self.errors += 1
                self.synced = False
                log.exception("pod %s: publishing failed", self.info.pod_id)
                delay = self.max_backoff_s
            if self._stopping:
                return
            self._wake.clear()
            # asyncio.wait, not wait_for: it never cancels or converts anything on timeout.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=delay)
            finally:
                waiter.cancel()
