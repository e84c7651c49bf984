"""Prometheus metrics of a pod (one registry per app, so tests can run several pods)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from baton.gc_pauses import GCPauseCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# a decode step is a few ms: gaps between tokens need ms resolution to tell 2x a step from 4x
STEP_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04,
                0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 10)


class _EngineCollector:
    """Gauges read from the engine loop's snapshot at scrape time."""

    def __init__(self, loop_ref, publisher, transfer):
        self._loop_ref = loop_ref
        self._publisher = publisher
        self._transfer = transfer

    def collect(self):
        loop = self._loop_ref()
        if loop is None:
            return
        s = loop.stats()
        for name, doc, value in [
            ("baton_pod_running_requests", "sequences in the running batch", s.running),
            ("baton_pod_waiting_requests", "sequences waiting to be scheduled (queue depth)", s.waiting),
            ("baton_pod_waiting_prefill_tokens", "prompt tokens not yet prefilled", s.waiting_prefill_tokens),
            ("baton_pod_kv_blocks_total", "KV cache blocks", s.total_blocks),
            ("baton_pod_kv_blocks_free", "KV blocks an allocation can take (free or evictable)", s.free_blocks),
            ("baton_pod_kv_blocks_used", "KV blocks referenced by live sequences", s.total_blocks - s.free_blocks),
            ("baton_pod_kv_blocks_cached", "KV blocks holding a prefix-cache entry", s.cached_blocks),
            ("baton_pod_open_requests", "requests with an open stream on this pod", loop.num_open_requests),
            ("baton_pod_preemptions", "sequences preempted since start", loop.engine.scheduler.num_preemptions),
            ("baton_pod_engine_steps", "engine steps since start", loop.steps),
            ("baton_pod_redis_errors", "Redis errors of the index publisher since start",
             getattr(self._publisher(), "errors", 0)),
        ]:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        t = self._transfer()  # the pod's KVSender or KVReceiver, if it has one
        for key, value in (t.stats() if t is not None else {}).items():
            g = GaugeMetricFamily(f"baton_kvtransfer_{key}", f"kvtransfer {key.replace('_', ' ')} (since start or now)")
            g.add_metric([], value)
            yield g


class PodMetrics:
    def __init__(self, loop_ref, publisher=lambda: None, transfer=lambda: None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("baton_pod_requests", "requests by final status", ["status"], registry=r)
        self.ttft = Histogram("baton_pod_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("baton_pod_inter_token_latency_seconds", "time between tokens",
                             buckets=STEP_BUCKETS, registry=r)
        self.step_time = Histogram(
            "baton_pod_engine_step_seconds",
            "engine steps, from the previous step's tokens (back to back: what a running stream waits "
            "for a token) or from their launch (after a pause) to their own tokens, by what they "
            "computed: decode (one token a sequence), mixed (decodes and prompt tokens) or prefill",
            ["kind"], buckets=STEP_BUCKETS, registry=r)
        self.e2e = Histogram("baton_pod_e2e_latency_seconds", "arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("baton_pod_prompt_tokens", "prompt tokens received", registry=r)
        self.cached_tokens = Counter("baton_pod_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache", registry=r)
        self.generation_tokens = Counter("baton_pod_generation_tokens", "tokens generated", registry=r)
        self.transfers = Counter("baton_pod_kv_transfers", "KV transfers into this pod by outcome", ["outcome"], registry=r)
        self.kv_bytes_received = Counter("baton_pod_kv_bytes_received", "KV bytes received from prefill pods", registry=r)
        self.transfer_seconds = Histogram("baton_pod_kv_transfer_seconds", "reservation to last layer scattered",
                                          buckets=LATENCY_BUCKETS, registry=r)
        # where a disaggregated request's time to first token goes, on each side
        phase_buckets = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
        self.transfer_phase = Histogram(
            "baton_pod_kv_transfer_phase_seconds",
            "decode pods, per received request: reserve (arrival to blocks reserved), first_layer (reserved "
            "to the first layer in: the prefill pod's call and first layer), layers (first layer to every "
            "layer in and DONE), admit (DONE to the first token handed to the stream)",
            ["phase"], buckets=phase_buckets, registry=r)
        self.prefill_phase = Histogram(
            "baton_pod_prefill_phase_seconds",
            "prefill pods, per request: compute (call arrived to first token sampled: queue, prompt and "
            "pushes), send (first token sampled to every send complete)",
            ["phase"], buckets=phase_buckets, registry=r)
        r.register(_EngineCollector(loop_ref, publisher, transfer))
        r.register(GCPauseCollector("baton_pod"))

    def transfer_counts(self) -> dict:
        return {f"outcome_{s.labels['outcome']}": s.value for mf in self.transfers.collect()
                for s in mf.samples if s.name.endswith("_total")}
