"""The router's Prometheus metrics, in a registry of their own (one per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from baton.gc_pauses import GCPauseCollector

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# ms resolution where a decode step is (a few ms): 2x a step must read apart from 4x
_ITL = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
        0.25, 0.5, 1, 2.5)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "baton_router_requests", "Finished API requests", ["endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "baton_router_ttft_seconds", "Time to first token", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            "baton_router_itl_seconds",
            "Time between token batches from a pod",
            buckets=_ITL,
            registry=r,
        )
        self.e2e = Histogram(
            "baton_router_e2e_seconds", "Request latency, end to end", buckets=_LATENCY, registry=r
        )
        self.decisions = Counter(
            "baton_router_routing_decisions",
            "Pods picked, by policy and reason",
            ["policy", "reason"],
            registry=r,
        )
        self.redis_errors = Counter(
            "baton_router_redis_errors", "Redis calls that failed or timed out", ["op"], registry=r
        )
        self.pod_retries = Counter(
            "baton_router_pod_retries",
            "Pod attempts that failed before the first token",
            registry=r,
        )
        self.live_pods = Gauge("baton_router_live_pods", "Pods the router may route to", registry=r)
        r.register(GCPauseCollector("baton_router"))
        self.in_flight = Gauge(
            "baton_router_in_flight_requests", "Requests being served", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
