"""Driving one sweep point: sessions sent at Poisson arrival times or by N concurrent users.

Rate mode starts *sessions* at Poisson times (a single-turn workload: requests per second);
a session's later turns follow as soon as the previous answer is in. Concurrency mode keeps
N sessions in flight. Bounded everywhere: the workload holds the request count, no request
starts after `max_duration_s`, each request has its own timeout, and whatever still runs at
max_duration_s + timeout_s is cancelled and recorded as an error.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from baton.bench.client import Client, send
from baton.bench.metrics import RequestRecord
from baton.bench.payload import RequestOptions, request_body
from baton.bench.progress import Progress
from baton.bench.workloads import Session


@dataclass(frozen=True)
class Load:
    mode: str  # "rate" (sessions per second, math.inf = all at once) or "concurrency"
    value: float

    def __str__(self) -> str:
        if self.mode == "rate":
            return "rate=inf" if math.isinf(self.value) else f"rate={self.value:g}/s"
        return f"concurrency={self.value:g}"


@dataclass(frozen=True)
class Target:
    url: str  # the full endpoint URL, .../v1/chat/completions or .../v1/completions
    options: RequestOptions
    headers: dict
    timeout_s: float = 300.0
    http_client: str = "asyncio"  # or "httpx" (client.Client)


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Start offsets (seconds) of n Poisson arrivals at `rate` per second; all 0 for inf."""
    if rate <= 0:
        raise ValueError("request rate must be positive")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"{seed}:arrivals")
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


async def run_point(target: Target, sessions: list[Session], load: Load, seed: int,
                    max_duration_s: float, progress: Progress,
                    encode: Callable[[str], list[int]] | None = None) -> tuple[list[RequestRecord], float]:
    """Run `sessions` under `load`; returns every sent request's record and the wall time."""
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    deadline = t0 + max_duration_s
    async with Client(target.headers, target.timeout_s, target.http_client) as http:

        async def run_session(s: Session) -> None:
            answers: list[str] = []
            for k, turn in enumerate(s.turns):
                if time.perf_counter() >= deadline:
                    return
                body = request_body(target.options, s, k, answers, encode)
                rec = RequestRecord(session=s.id, turn=k, start_s=time.perf_counter() - t0, tenant=s.tenant,
                                    turn_input_tokens=turn.input_tokens,
                                    max_tokens=turn.output_tokens)
                records.append(rec)
                answer = await send(http, target.url, body, target.timeout_s, rec)
                progress.update(rec.ok)
                if not rec.ok:
                    return  # the conversation cannot go on without this answer
                answers.append(answer)

        if load.mode == "rate":
            tasks = await _dispatch_poisson(sessions, load.value, seed, t0, deadline, run_session)
        elif load.mode == "concurrency":
            queue = list(reversed(sessions))

            async def user() -> None:
                while queue and time.perf_counter() < deadline:
                    await run_session(queue.pop())

            tasks = [asyncio.create_task(user()) for _ in range(int(load.value))]
        else:
            raise ValueError(f"unknown load mode {load.mode!r}")

        if tasks:
            left = max(0.0, deadline - time.perf_counter()) + target.timeout_s + 1.0
            _, pending = await asyncio.wait(tasks, timeout=left)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    duration = time.perf_counter() - t0
    for r in records:
        if not r.ok and r.error is None:
            r.error = "cancelled at the point's deadline"
    return records, duration


async def _dispatch_poisson(sessions, rate, seed, t0, deadline, run_session) -> list[asyncio.Task]:
    tasks = []
    for s, at in zip(sessions, arrival_times(len(sessions), rate, seed)):
        delay = t0 + at - time.perf_counter()
        if t0 + at >= deadline:
            break
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(run_session(s)))
    return tasks
