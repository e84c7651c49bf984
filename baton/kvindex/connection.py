"""Opening a Redis client (one Redis, or a Redis Cluster) whose every call is bounded in time,
and the errors that mean "Redis is unavailable".

A URL names one Redis as redis-py reads it (`redis://[[user]:password@]host:port/db`,
`rediss://...` for TLS), or a Redis Cluster by this scheme of ours (redis-py's own cluster
`from_url` takes one host only, and a scheme is how every service tells the two apart from the
one BATON_REDIS_URL they share):

    redis+cluster://[[user]:password@]host:port[,host:port...][/][?shards=N]
    rediss+cluster://...                          (TLS)

The hosts are startup nodes (any one that answers is enough; the client learns the rest).
`shards` (default 16, at most 256) is how many parts the index is split into, by pod
(schema.py): each shard is one hash slot, so one node; more shards than masters spread them
evenly. Every router and pod must use the same `shards`; changing it moves pods to other
shards and strands their old entries, so change it only with an empty index.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qs, unquote

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import RedisClusterException, RedisError

T = TypeVar("T")

# What a caller catches to fall back (router) or retry later (publisher). OSError covers
# refused connections that slip past redis-py's wrapping; TimeoutError is asyncio's;
# RedisClusterException (not a RedisError) is a cluster client that reaches no node.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
DEFAULT_SHARDS = 16
# CLIENT SETINFO's library version, read once: without it redis-py 8 reads its own package
# metadata for every new connection (importlib.metadata: ~2-15 ms of CPU each, and a router
# under load, whose timed-out connections are replaced, paid it again and again)
DRIVER = DriverInfo(lib_version=redis.__version__)
MAX_SHARDS = 256


@dataclass(frozen=True)
class ClusterURL:
    nodes: list[tuple[str, int]]
    username: str | None = None
    password: str | None = None
    tls: bool = False
    shards: int = DEFAULT_SHARDS


def cluster_url(url: str) -> ClusterURL | None:
    """The cluster `url` names, or None when it names one Redis. ValueError: a malformed one."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in CLUSTER_SCHEMES:
        return None
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ValueError(f"a Redis Cluster has database 0 only, not {path!r}")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    nodes = []
    for h in hosts.split(","):
        host, colon, port = h.strip().rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"cluster node {h!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    if set(params) - {"shards"}:
        raise ValueError(f"unknown cluster URL options {sorted(set(params) - {'shards'})}")
    shards = int(params.get("shards", [DEFAULT_SHARDS])[-1])
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be 1..{MAX_SHARDS}, got {shards}")
    return ClusterURL(nodes, username, password, CLUSTER_SCHEMES[scheme.lower()], shards)


def shard_count(url: str) -> int | None:
    """How many shards the index at `url` has: None for one Redis (no hash tags in its keys)."""
    c = cluster_url(url)
    return None if c is None else c.shards


# One immediate retry, of a broken connection only: it replaces a pooled connection that a Redis
# restart broke. Not after a timeout (redis-py's default retries those too, with backoff): a busy
# router's lookups that had already waited their 100 ms waited 100 ms more (issue 23).
_RETRY = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))


def connect(url: str, timeout_s: float) -> aioredis.Redis | RedisCluster:
    c = cluster_url(url)
    if c is None:
        return aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=_RETRY,
            driver_info=DRIVER,
        )
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in c.nodes],
        username=c.username,
        password=c.password,
        ssl=c.tls,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=_RETRY,
        driver_info=DRIVER,
    )


def redacted(url: str) -> str:
    """`url` fit for a log line: its password (redis://:PASSWORD@host) replaced by ***."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


async def bounded(aw: Awaitable[T], timeout_s: float) -> T:
    """Await `aw` for at most `timeout_s` (socket timeouts alone miss a retry's second wait)."""
    async with asyncio.timeout(timeout_s):
        return await aw


async def all_of(aws: Iterable[Awaitable[T]]) -> list[T]:
    """Every result, in order (one call per shard at once); on the first error the others are
    cancelled and that error is raised as it is (a TaskGroup would wrap it in a group)."""
    aws = list(aws)
    if len(aws) == 1:  # one Redis: no task to run it beside others
        return [await aws[0]]
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()  # a no-op for the finished ones
