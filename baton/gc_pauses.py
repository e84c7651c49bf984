"""Garbage-collection pauses of this process, as a Prometheus histogram.

A collection holds the GIL: while it runs, no stream of the process moves, and the engine
thread launches nothing. Services freeze what start-up made (`freeze_startup`), so that the
full collections that come while serving do not walk the hundreds of thousands of objects
torch, transformers and the web stack leave behind (issue 23: stutter in streams).
"""

from __future__ import annotations

import gc
import time

from prometheus_client.core import HistogramMetricFamily

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)

# No lock: a collection can start on any allocation, also one made while a lock is held, and
# the callback would then wait for that lock forever. Callbacks run with the GIL held, one
# collection at a time; a scrape reads a copy.
# generation -> cumulative bucket counts (BUCKETS, then +Inf) and the sum of seconds
_counts = {g: [0] * (len(BUCKETS) + 1) for g in range(3)}
_sums = dict.fromkeys(range(3), 0.0)
_started = [0.0]


def _callback(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    seconds = time.perf_counter() - _started[0]
    g = info["generation"]
    counts = _counts[g]
    _sums[g] += seconds
    for i, le in enumerate(BUCKETS):
        if seconds <= le:
            counts[i] += 1
    counts[-1] += 1


def _install() -> None:
    if _callback not in gc.callbacks:
        gc.callbacks.append(_callback)


class GCPauseCollector:
    """Register in a service's registry: `{prefix}_gc_pause_seconds` by generation, for the
    whole process (several registries in one process, as in tests, read the same counts)."""

    def __init__(self, prefix: str):
        self.name = f"{prefix}_gc_pause_seconds"
        _install()

    def collect(self):
        h = HistogramMetricFamily(self.name, "garbage-collection pauses of this process (the GIL held)",
                                  labels=["generation"])
        for g in range(3):
            counts = list(_counts[g])
            buckets = [(repr(le), counts[i]) for i, le in enumerate(BUCKETS)] + [("+Inf", counts[-1])]
            h.add_metric([str(g)], buckets, _sums[g])
        yield h


def freeze_startup() -> None:
    """Collect once, then move every object alive now to the permanent generation: start-up's
    modules, functions and model objects are never garbage, and later collections skip them."""
    gc.collect()
    gc.freeze()
