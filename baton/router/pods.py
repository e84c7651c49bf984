"""The pods this router can use: discovery, liveness, load, its own in-flight work, and the pick.

Pods come from the Redis registry (heartbeats) and from a static URL list (--pods). Each pod
says what it takes: its KV block size and max_model_len, in its heartbeat record or (static
pods) its /ready JSON. With Redis up, a pod is live while its heartbeat exists (the registry
is read every refresh_interval_s), and each pick does one index lookup for the prompt's cached
prefix per pod (one per distinct block size, hashed with that size, when live pods differ),
which also brings fresh loads of the pods it hits. With Redis down (every call bounded by redis_timeout_s and
counted), the router keeps the pods it last saw, polls their /internal/state over HTTP, and
routes on load alone; it retries Redis after redis_retry_s. Static pods are always polled.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, replace

import httpx

from baton.kvindex.connection import REDIS_ERRORS
from baton.kvindex.hashing import block_hashes, salted_seed
from baton.kvindex.index import KVIndex
from baton.kvindex.schema import PodRecord
from baton.router import policy
from baton.router.metrics import RouterMetrics
from baton.router.settings import RouterSettings

log = logging.getLogger(__name__)

# Roles that serve a whole request through /internal/generate. A decode pod does so with the
# KV of a prefill pod the router names (policy.choose once per role), or prefills itself.
SERVING_ROLES = ("colocated", "decode")
PREFILL_ROLES = ("prefill",)


@dataclass
class PodView:
    record: PodRecord
    source: str  # "redis" or "static"
    last_ok: float  # monotonic time of the last good heartbeat read or state poll
    live: bool = True
    described: bool = False  # a static pod's /ready told its block size and max_model_len


@dataclass
class Dispatch:
    """One request's claim on a pod's prefill queue, as this router counts it."""

    pod_id: str
    tokens: int
    prefilled: bool = False


class PodTable:
    def __init__(
        self,
        settings: RouterSettings,
        http: httpx.AsyncClient,
        index: KVIndex | None,
        metrics: RouterMetrics,
        model_name: str,
        seed: bytes,
    ):
        self.s, self.http, self.index, self.metrics = settings, http, index, metrics
        self.model_name, self.seed = model_name, seed
        self.views: dict[str, PodView] = {}
        self.inflight: dict[str, int] = {}
        self._rr: dict[tuple[str, ...], int] = {}  # round-robin picks so far, per set of roles
        self._index_down_until = 0.0
        self._rng = random.Random()
        now = time.monotonic()
        for url in settings.pods:
            # Static pods start not live: the first state poll proves them.
            rec = PodRecord(pod_id=url, role="colocated", url=url, model=model_name)
            self.views[url] = PodView(rec, "static", now - 1e9, live=False)

    # -- Redis health -----------------------------------------------------------------------

    def index_usable(self) -> bool:
        return self.index is not None and time.monotonic() >= self._index_down_until

    def _index_failed(self, op: str, e: BaseException) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Python 3.11 can turn a cancel racing a timeout into the timeout; honour the cancel.
            raise asyncio.CancelledError from e
        self.metrics.redis_errors.labels(op).inc()
        if time.monotonic() >= self._index_down_until:
            log.warning(
                "Redis %s failed (%r): load-only routing for %.1fs", op, e, self.s.redis_retry_s
            )
        self._index_down_until = time.monotonic() + self.s.redis_retry_s

    def _take_redis_pods(self, pods: dict[str, PodRecord], complete: bool = True) -> None:
        """Records read from Redis: every live pod's (`complete`, a registry read), or some of
        them (a lookup returns only the pods it hit: fresher loads for those)."""
        now = time.monotonic()
        for pod_id, rec in pods.items():
            self.views[pod_id] = PodView(rec, "redis", now)
        if complete:
            # Heartbeat gone: the pod is dead -- once its record has expired too. A key gone
            # before that was lost by Redis (a restart, a flush): the pod re-publishes within a
            # heartbeat, and dropping it meanwhile answered every request 503 "No pod is ready".
            wall = time.time()
            gone = [p for p, v in self.views.items() if v.source == "redis" and p not in pods
                    and (wall >= v.record.expires or now - v.last_ok > self.s.stale_after_s)]
            for pod_id in gone:
                del self.views[pod_id]

    # -- background work --------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the registry (or, without Redis, poll pods over HTTP) and update liveness."""
        redis_ok = False
        if self.index is not None:
            try:
                self._take_redis_pods(await self.index.live_pods())
                redis_ok = True
                self._index_down_until = 0.0
            except REDIS_ERRORS as e:
                self._index_failed("refresh", e)
        polled = [v for v in self.views.values() if v.source == "static" or not redis_ok]
        await asyncio.gather(*(self._poll(v) for v in polled))
        now = time.monotonic()
        for v in polled:
            v.live = now - v.last_ok <= self.s.stale_after_s
        self.metrics.live_pods.set(len(self.live()))

    async def _poll(self, v: PodView) -> None:
        try:
            if v.source == "static" and not (v.live and v.described):
                await self._describe(v)  # (again after an outage: a restart may change them)
            r = await self.http.get(
                f"{v.record.url}/internal/state", timeout=self.s.connect_timeout_s
            )
            r.raise_for_status()
            s = r.json()
            v.record = replace(
                v.record,
                running=int(s.get("running", 0)),
                waiting=int(s.get("waiting", 0)),
                waiting_prefill_tokens=int(s.get("waiting_prefill_tokens", 0)),
                free_blocks=int(s.get("free_blocks", 0)),
                total_blocks=int(s.get("total_blocks", 0)),
            )
            v.last_ok = time.monotonic()
        except (httpx.HTTPError, OSError, ValueError, TypeError, AttributeError) as e:
            log.debug("state poll of %s failed: %r", v.record.url, e)

    async def _describe(self, v: PodView) -> None:
        """A static pod's block size and max_model_len, from its /ready (while it loads: not yet)."""
        v.described = False
        r = await self.http.get(f"{v.record.url}/ready", timeout=self.s.connect_timeout_s)
        if r.status_code != 200:
            return
        about = r.json()
        v.record = replace(
            v.record,
            block_size=int(about.get("block_size", v.record.block_size)),
            max_model_len=int(about.get("max_model_len", 0)),
        )
        v.described = True

    async def sweep(self) -> None:
        if not self.index_usable():
            return
        try:
            await self.index.sweep()
        except REDIS_ERRORS as e:
            self._index_failed("sweep", e)

    # -- picking ----------------------------------------------------------------------------

    def live(self, roles: tuple[str, ...] = SERVING_ROLES) -> list[PodView]:
        return [v for v in self.views.values() if v.live and self._serves(v.record, roles)]

    def _serves(self, rec: PodRecord, roles: tuple[str, ...] = SERVING_ROLES) -> bool:
        return rec.model == self.model_name and rec.role in roles

    def max_model_len(self) -> int:
        """The largest max_model_len a live serving pod publishes; 0 while none has."""
        return max((v.record.max_model_len for v in self.live()), default=0)

    async def pick(
        self,
        prompt_ids: list[int],
        exclude: set[str],
        roles: tuple[str, ...] = SERVING_ROLES,
        total_len: int = 0,
        salt: str | None = None,
    ) -> tuple[policy.Decision, PodView | None]:
        """The cheapest pod of `roles` that takes `total_len` tokens (prompt + output) for this
        prompt (policy.choose over their loads); `salt`: the request's cache salt."""
        hits: dict[str, int] = {}
        index_ok = self.index is None
        fit = [v for v in self.views.values() if self._serves(v.record, roles) and _takes(v.record, total_len)]
        # One pod that could take it: nothing to choose, so no lookup (a Redis round trip and,
        # on a busy router, a 100 ms timeout that counted as Redis down: issue 23's H200 runs).
        choices = sum(v.live and v.record.pod_id not in exclude for v in fit)
        if self.s.policy == "prefix" and self.index_usable() and choices > 1:
            hits, index_ok = await self._cached_blocks(prompt_ids, roles, salt)
        limit = max(len(prompt_ids) - 1, 0)  # the last prompt token is always computed
        loads = [
            policy.PodLoad(
                pod_id=v.record.pod_id,
                live=v.live,
                running=v.record.running,
                waiting=v.record.waiting,
                waiting_prefill_tokens=v.record.waiting_prefill_tokens,
                cached_tokens=min(hits.get(v.record.pod_id, 0) * v.record.block_size, limit),
                inflight_tokens=self.inflight.get(v.record.pod_id, 0),
            )
            for v in fit
        ]
        decision = policy.choose(
            loads,
            len(prompt_ids),
            self.s.policy,
            self.s.weights,
            rr_counter=self._rr.get(roles, 0),
            exclude=exclude,
            index_ok=index_ok,
            rng=self._rng,
        )
        if self.s.policy == "round_robin":  # a prefill pick must not move the decode pods' turn
            self._rr[roles] = self._rr.get(roles, 0) + 1
        self.metrics.decisions.labels(self.s.policy, decision.reason if roles is SERVING_ROLES
                                      else f"prefill_{decision.reason}").inc()
        return decision, (self.views.get(decision.pod_id) if decision.pod_id else None)

    async def _cached_blocks(
        self, prompt_ids: list[int], roles: tuple[str, ...], salt: str | None = None
    ) -> tuple[dict[str, int], bool]:
        """Leading blocks of the prompt each pod caches, counted in the pod's own block size
        (the prompt hashed once per distinct size), and whether the index answered."""
        hits: dict[str, int] = {}
        looked: set[int] = set()
        try:
            # a lookup may bring pods of a size not seen yet: look those up too
            while sizes := {v.record.block_size for v in self.views.values()
                            if self._serves(v.record, roles)} - looked:
                for size in sorted(sizes):
                    look = await self.index.lookup(block_hashes(prompt_ids, size, salted_seed(self.seed, salt)))
                    self._take_redis_pods(look.pods, complete=False)
                    looked.add(size)
                    hits |= {p: n for p, n in look.hits.items()
                             if p in look.pods and look.pods[p].block_size == size}
        except REDIS_ERRORS as e:
            self._index_failed("lookup", e)
            return {}, False
        return hits, True

    def heard_from(self, pod_id: str) -> None:
        """A pod answered one of our requests: it is alive whatever the registry said last.
        (Under load the router's own Redis and state polls can time out; a pod streaming
        tokens to us must not count as dead then, or every new request gets a 503.)"""
        v = self.views.get(pod_id)
        if v is not None:
            v.last_ok = time.monotonic()
            v.live = True

    # -- this router's own queued work ------------------------------------------------------

    def dispatch(self, pod_id: str, tokens: int) -> Dispatch:
        self.inflight[pod_id] = self.inflight.get(pod_id, 0) + tokens
        return Dispatch(pod_id, tokens)

    def prefilled(self, d: Dispatch) -> None:
        """The pod answered (first token, failure or abort): its prefill no longer waits."""
        if not d.prefilled:
            d.prefilled = True
            self.inflight[d.pod_id] -= d.tokens


def _takes(rec: PodRecord, total_len: int) -> bool:
    return rec.max_model_len == 0 or total_len <= rec.max_model_len  # 0: it has not said
