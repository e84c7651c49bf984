"""Opening a Redis client whose every call is bounded in time, and the errors that mean "Redis is unavailable"."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

T = TypeVar("T")

# What a caller catches to fall back (router) or retry later (publisher). OSError covers
# refused connections that slip past redis-py's wrapping; TimeoutError is asyncio's.
REDIS_ERRORS = (RedisError, OSError, TimeoutError)


def connect(url: str, timeout_s: float) -> aioredis.Redis:
    # One immediate retry only: it replaces a pooled connection that a Redis restart broke.
    # redis-py's default (3 retries with backoff) would multiply every timeout while Redis is down.
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )


def redacted(url: str) -> str:
    """`url` fit for a log line: its password (redis://:PASSWORD@host) replaced by ***."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


async def bounded(aw: Awaitable[T], timeout_s: float) -> T:
    """Await `aw` for at most `timeout_s` (socket timeouts alone miss a retry's second wait)."""
    async with asyncio.timeout(timeout_s):
        return await aw
