"""Tasks an owner starts and waits for when it closes: a connection's, the sender's, the receiver's.

Holding them also keeps asyncio from collecting a running task that nothing else refers to.
"""

from __future__ import annotations

import asyncio


class TaskSet:
    def __init__(self):
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        """Run `coro` as a task that wait() waits for."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait(self) -> None:
        """Until every task spawned so far has ended; their errors are theirs to report."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
