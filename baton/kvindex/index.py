"""The router's side of the index: live pods, longest cached prefix per pod, purging dead pods."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from baton import internal_auth
from baton.kvindex import schema
from baton.kvindex.connection import all_of, bounded, connect, shard_count

log = logging.getLogger(__name__)

# Parsed record versions kept between two registry reads (each read keeps only what it saw).
_PARSED_MAX = 50_000


@dataclass
class Lookup:
    pods: dict[str, schema.PodRecord] = field(default_factory=dict)  # the live pods hit, only
    hits: dict[str, int] = field(
        default_factory=dict
    )  # pod id -> leading blocks of the chain it holds


class KVIndex:
    """Reads the registry and block index. Every call raises one of REDIS_ERRORS on trouble,
    within `timeout_s`; the caller decides how to degrade. In a Redis Cluster each call runs
    on every shard at once and merges what they answer (schema.py).

    With `secret`, only records whose signature verifies count as pods (internal_auth.py);
    without, every well-formed record does. A record that is unusable (malformed, unsigned,
    forged, expired, or under another pod's id) is skipped, and logged once per pod and reason.
    """

    def __init__(self, url: str, prefix: str = schema.DEFAULT_PREFIX, timeout_s: float = 0.25,
                 secret: str | None = None):
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.secret = secret or None
        self.skipped: dict[str, str] = {}  # pod id -> why its record is skipped (logged once)
        self._r = connect(url, timeout_s)
        self.shards = schema.shard_prefixes(prefix, shard_count(url))
        self._lookup = self._r.register_script(schema.LOOKUP)
        self._registry = self._r.register_script(schema.REGISTRY)
        self._clear = self._r.register_script(schema.CLEAR)
        # Raw heartbeat -> parsed record, for the records the last registry read saw (and the
        # lookups since). A record changes only when its pod publishes (every 0.2 s), so with
        # many pods most reads re-parse almost none: parsing 1,000 records cost ~33 ms.
        self._parsed: dict[bytes, schema.PodRecord] = {}

    async def close(self) -> None:
        await self._r.aclose()

    async def lookup(self, chain: list[bytes]) -> Lookup:
        """One round trip: how many leading blocks of `chain` each live pod holds, and the
        records of the pods that hold any (every other pod's record: live_pods)."""
        hexes = [h.hex() for h in chain]
        answers = await bounded(all_of(
            self._lookup(keys=[schema.pods_key(p)], args=[p, *hexes]) for p in self.shards
        ), self.timeout_s)
        recs = [x for a in answers for x in a[0]]
        hits = [x for a in answers for x in a[1]]
        if len(self._parsed) > _PARSED_MAX:  # no registry read lately (none resets it)
            self._parsed = {}
        pods = self._records(recs, self._parsed)
        out = Lookup(pods)
        for i in range(0, len(hits), 2):
            pod_id = hits[i].decode()
            if pod_id in pods:  # not an unusable record's pod
                out.hits[pod_id] = int(hits[i + 1])
        return out

    async def live_pods(self) -> dict[str, schema.PodRecord]:
        """Every live pod's record (one round trip; what a router's periodic refresh reads)."""
        parsed: dict[bytes, schema.PodRecord] = {}
        answers = await bounded(all_of(
            self._registry(keys=[schema.pods_key(p)], args=[p]) for p in self.shards
        ), self.timeout_s)
        pods = self._records([x for a in answers for x in a], parsed)
        self._parsed = parsed  # only what this read saw: bounded by the live pods
        return pods

    def _records(self, recs: list[bytes], parsed: dict[bytes, schema.PodRecord]
                 ) -> dict[str, schema.PodRecord]:
        """[id, raw record, ...] -> the usable records by pod id; each raw version parsed (and
        its signature checked) once, found in self._parsed or added to `parsed`."""
        out: dict[str, schema.PodRecord] = {}
        now = time.time()
        for i in range(0, len(recs), 2):
            pod_id = recs[i].decode(errors="replace")
            raw = recs[i + 1]
            try:
                rec = self._parsed.get(raw)
                if rec is None:
                    rec = schema.PodRecord.from_json(raw, self.secret)
                parsed[raw] = rec
                # checked on every read, a parsed record reused or not
                if rec.pod_id != pod_id:
                    raise ValueError(f"record names pod {rec.pod_id!r}")
                if self.secret and internal_auth.expired(rec.expires, now):
                    raise ValueError("expired")
            except ValueError as e:
                if self.skipped.get(pod_id) != str(e):
                    self.skipped[pod_id] = str(e)
                    log.warning("ignoring pod %r: its registry record is unusable: %s", pod_id[:200], e)
                continue
            self.skipped.pop(pod_id, None)
            out[pod_id] = rec
        return out

    async def sweep(self, chunk: int = 1000) -> list[str]:
        """Purge every registered pod whose heartbeat is gone; returns the ids purged.

        Safe to run from several routers at once: each chunk re-checks the heartbeat and
        every removal is idempotent.
        """
        purged = []
        for p in self.shards:
            purged += await self._sweep_shard(p, chunk)
        return purged

    async def _sweep_shard(self, p: str, chunk: int) -> list[str]:
        registered = await bounded(self._r.smembers(schema.pods_key(p)), self.timeout_s)
        if not registered:
            return []
        ids = sorted(m.decode() for m in registered)
        alive = await bounded(self._r.mget([schema.pod_key(p, i) for i in ids]), self.timeout_s)
        purged = []
        for pod_id, rec in zip(ids, alive):
            if rec is not None:
                continue
            while True:
                left = await bounded(
                    self._clear(keys=[schema.pods_key(p)], args=[p, pod_id, chunk, "1"]),
                    self.timeout_s,
                )
                if left <= 0:
                    break
            if left == 0:
                purged.append(pod_id)
                log.info("purged the index entries of dead pod %s", pod_id)
        return purged
