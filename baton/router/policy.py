"""Which pod gets a request: prefix-aware cost, round-robin or least-load, over plain data.

Prefix-aware cost of sending a prompt to a pod, in one unit, "prompt tokens of prefill work":

    cost = w_prefill * (prompt tokens - tokens of the prompt this pod already caches)
         + w_queue   * (pod's waiting_prefill_tokens + this router's in-flight prefill tokens to it)
         + w_decode  * running sequences * decode_tokens_per_seq

The lowest cost wins; ties go to a random one of them (several routers, each counting only its
own dispatches, would otherwise all pick the same idle pod). Pods whose load report is stale
(heartbeat gone) are never candidates. Because queued work is counted in the same unit as
uncached tokens, a hot prefix cached on one pod stops winning once that pod has more queued
prefill than recomputing the prefix elsewhere would cost: traffic spreads instead of piling up.
"least_load" is the same cost with no cache credit; it is also what "prefix" degrades to when
the index is unavailable (every cached prefix then counts as 0).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

POLICIES = ("prefix", "round_robin", "least_load")

# Reasons a decision reports (a metric label each).
PREFIX_HIT = "prefix_hit"  # the cheapest pod holds part of the prompt
SPREAD = "spread"  # another pod held more of the prompt, but its queue made it dearer
COLD = "cold"  # no live pod holds any of the prompt; picked by load
INDEX_DOWN = "index_unavailable"  # prefix policy without index data: load only
ROUND_ROBIN = "round_robin"
LEAST_LOAD = "least_load"
NO_POD = "no_live_pod"
ONLY_POD = "only_pod"  # prefix policy, one pod could take it: nothing to choose, no lookup


@dataclass(frozen=True)
class Weights:
    """The policy's knobs, defaulted here and nowhere else (settings read these defaults).

    prefill = 1: the unit: one prompt token the pod must compute.
    queue = 1: a token queued ahead of ours delays our first token as much as one of our own
        uncached tokens does, so they weigh the same.
    decode = 1 and decode_tokens_per_seq = 32: a running sequence takes a slot in every step
        the pod runs, ours included, and its KV reads slow each step; 32 tokens a sequence
        means a pod already decoding 32 sequences costs as much as recomputing a 1k-token
        prompt on an idle pod (roughly where batch growth starts to hurt per-step latency for
        8B-class models). Tune with bench/, not by feel.
    """

    prefill: float = 1.0
    queue: float = 1.0
    decode: float = 1.0
    decode_tokens_per_seq: float = 32.0


@dataclass(frozen=True)
class PodLoad:
    """One pod as the policy sees it for one request."""

    pod_id: str
    live: bool = True  # heartbeat present (or, without Redis, state polled recently)
    running: int = 0
    waiting: int = 0
    waiting_prefill_tokens: int = 0
    cached_tokens: int = 0  # leading tokens of this prompt the pod caches
    inflight_tokens: int = 0  # this router's dispatched, not yet prefilled, tokens to the pod


@dataclass(frozen=True)
class Decision:
    pod_id: str | None
    reason: str
    cost: float = 0.0
    cached_tokens: int = 0
    costs: dict[str, float] = field(default_factory=dict)  # every candidate's cost, for logs


def load_cost(pod: PodLoad, w: Weights) -> float:
    return (
        w.queue * (pod.waiting_prefill_tokens + pod.inflight_tokens)
        + w.decode * pod.running * w.decode_tokens_per_seq
    )


def prefix_cost(pod: PodLoad, prompt_tokens: int, w: Weights) -> float:
    uncached = max(prompt_tokens - pod.cached_tokens, 0)
    return w.prefill * uncached + load_cost(pod, w)


def _cheapest(costs: dict[str, float], rng: random.Random) -> str:
    best = min(costs.values())
    return rng.choice(sorted(p for p, c in costs.items() if c == best))


def choose(
    pods: list[PodLoad],
    prompt_tokens: int,
    policy: str = "prefix",
    weights: Weights = Weights(),
    *,
    rr_counter: int = 0,
    exclude: frozenset[str] | set[str] = frozenset(),
    index_ok: bool = True,
    rng: random.Random | None = None,
) -> Decision:
    """Pick a pod among the live ones not in `exclude` (pods that already failed this request).

    `rr_counter` is the caller's running count of round-robin picks; `index_ok` says whether
    `cached_tokens` came from the index (else they are all 0 and the reason says so).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    rng = rng or random.Random()
    live = sorted((p for p in pods if p.live and p.pod_id not in exclude), key=lambda p: p.pod_id)
    if not live:
        return Decision(None, NO_POD)
    by_id = {p.pod_id: p for p in live}

    if policy == "round_robin":
        pod = live[rr_counter % len(live)]
        return Decision(pod.pod_id, ROUND_ROBIN, cached_tokens=pod.cached_tokens)

    if policy == "least_load":
        costs = {p.pod_id: load_cost(p, weights) for p in live}
        pid = _cheapest(costs, rng)
        return Decision(pid, LEAST_LOAD, costs[pid], by_id[pid].cached_tokens, costs)

    costs = {p.pod_id: prefix_cost(p, prompt_tokens, weights) for p in live}
    pid = _cheapest(costs, rng)
    cached = by_id[pid].cached_tokens
    if len(live) == 1:
        reason = ONLY_POD
    elif not index_ok:
        reason = INDEX_DOWN
    elif cached > 0 and cached == max(p.cached_tokens for p in live):
        reason = PREFIX_HIT
    elif any(p.cached_tokens > cached for p in live):
        reason = SPREAD
    else:
        reason = COLD
    return Decision(pid, reason, costs[pid], cached, costs)
