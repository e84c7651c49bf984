"""baton/gc_pauses.py: every collection of the process lands in each registry's histogram, by
generation; freeze_startup moves what is alive to the permanent generation."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, generate_latest

from baton.gc_pauses import GCPauseCollector, freeze_startup


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_each_collection_is_counted_by_generation_in_every_registry():
    a, b = CollectorRegistry(), CollectorRegistry()
    a.register(GCPauseCollector("baton_test"))
    b.register(GCPauseCollector("baton_other"))
    before = _samples(a)
    gc.collect(2)
    gc.collect(2)
    gc.collect(1)
    after, other = _samples(a), _samples(b)
    count = 'baton_test_gc_pause_seconds_count{generation="%s"}'
    # the runtime may collect on its own in between: at least these, and both registries agree
    assert after[count % 2] - before[count % 2] >= 2
    assert after[count % 1] - before[count % 1] >= 1
    assert other['baton_other_gc_pause_seconds_count{generation="2"}'] == after[count % 2]
    assert after['baton_test_gc_pause_seconds_sum{generation="2"}'] > before['baton_test_gc_pause_seconds_sum{generation="2"}']
    # cumulative buckets end at the count
    assert after['baton_test_gc_pause_seconds_bucket{generation="2",le="+Inf"}'] == after[count % 2]
    assert after['baton_test_gc_pause_seconds_bucket{generation="2",le="0.0005"}'] <= after[count % 2]


def test_freeze_startup_moves_live_objects_out_of_collections():
    gc.unfreeze()
    try:
        keep = [[i] for i in range(1000)]  # tracked containers, alive now
        freeze_startup()
        assert gc.get_freeze_count() >= len(keep)
        assert not any(gc.is_tracked(x) and x in gc.get_objects(2) for x in keep[:3])
    finally:
        gc.unfreeze()
