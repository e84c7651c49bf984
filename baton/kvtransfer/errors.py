"""A transfer's outcome as its users see it: `TransferFailed`, with a reason people can read, and
the future that carries it."""

from __future__ import annotations

import asyncio


class TransferFailed(Exception):
    """A KV transfer did not complete whole. Nothing it delivered may be used.

    `reason` is one line naming what went wrong (deadline, cancel, lost connection, ...).
    """

    def __init__(self, request_id: str, reason: str):
        super().__init__(f"KV transfer of request {request_id} failed: {reason}")
        self.request_id = request_id
        self.reason = reason


def outcome_future(loop: asyncio.AbstractEventLoop) -> asyncio.Future:
    """A future for one transfer's outcome. A failure that nobody awaits is not logged as
    'exception was never retrieved': the transfer has logged it already."""
    fut = loop.create_future()
    fut.add_done_callback(_retrieve)
    return fut


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()
