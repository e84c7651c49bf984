"""Which peers a pod may send a prompt to: the verified registry's pods of a role, plus static ones.

A decode pod's /internal/generate names the prefill pod to call (`prefill.url`), and a prefill
pod's /internal/prefill names the UCX address to push KV to. Both must be a pod that proved
who it is: a record in the registry whose signature verifies with the shared secret (see
internal_auth.py), or an address the operator listed. Without a secret (--insecure-internal)
nothing can be verified, and a registry check would be theatre (anyone who writes to Redis
registers anything): every peer is allowed, as every caller is.
"""

from __future__ import annotations

import logging
import time

from baton.kvindex.connection import REDIS_ERRORS
from baton.kvindex.index import KVIndex

log = logging.getLogger(__name__)


class Peers:
    def __init__(self, redis_url: str, secret: str, static_urls: list[str] = (), timeout_s: float = 1.0,
                 fresh_s: float = 1.0):
        self.secret = secret
        self.static_urls = {u.rstrip("/") for u in static_urls}
        self.index = KVIndex(redis_url, timeout_s=timeout_s, secret=secret) if redis_url and secret else None
        self.fresh_s = fresh_s
        self._urls: dict[str, set[str]] = {}  # role -> verified pods' URLs
        self._ucx: set[str] = set()  # verified decode pods' UCX addresses
        self._read_at = -1e9
        self.refused = 0  # peers refused (a metric for tests and operators)

    async def close(self) -> None:
        if self.index is not None:
            await self.index.close()

    async def _read(self) -> None:
        pods = await self.index.live_pods()
        urls: dict[str, set[str]] = {}
        for rec in pods.values():
            urls.setdefault(rec.role, set()).add(rec.url.rstrip("/"))
        self._urls = urls
        self._ucx = {rec.ucx_address for rec in pods.values() if rec.role == "decode" and rec.ucx_address}
        self._read_at = time.monotonic()

    async def _refresh(self, older_than_s: float) -> None:
        if self.index is not None and time.monotonic() - self._read_at > older_than_s:
            try:
                await self._read()
            except REDIS_ERRORS as e:
                # keep what was verified, and wait as long before the next try: a Redis
                # outage must not cost every request a Redis timeout
                self._read_at = time.monotonic()
                log.warning("cannot read the registry to verify a peer: %r", e)

    async def _allowed(self, known) -> bool:
        if not self.secret:
            return True
        await self._refresh(self.fresh_s)  # a pod that died is not trusted for long
        if not known():
            await self._refresh(0.05)  # a pod that registered since the last read
        if known():
            return True
        self.refused += 1
        return False

    async def url_allowed(self, url: str, role: str) -> bool:
        """`url` is a verified `role` pod's (or a static one)."""
        url = url.rstrip("/")
        return await self._allowed(lambda: url in self.static_urls or url in self._urls.get(role, ()))

    async def ucx_allowed(self, address: str) -> bool:
        """`address` is the UCX address a verified decode pod published."""
        return await self._allowed(lambda: address in self._ucx)
