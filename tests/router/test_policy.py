"""Routing policy on plain data: prefix preference, hot-prefix spreading, stale pods, the other policies."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from baton.router import policy
from baton.router.policy import PodLoad, Weights, choose, prefix_cost
from baton.router.settings import RouterSettings

W = Weights()


def test_longest_cached_prefix_wins_when_loads_are_equal():
    pods = [
        PodLoad("a", cached_tokens=0),
        PodLoad("b", cached_tokens=512),
        PodLoad("c", cached_tokens=256),
    ]
    d = choose(pods, 1000, "prefix", W)
    assert (d.pod_id, d.reason, d.cached_tokens) == ("b", policy.PREFIX_HIT, 512)
    assert d.costs == {"a": 1000, "b": 488, "c": 744}


def test_cost_formula_in_one_unit():
    p = PodLoad("a", running=3, waiting_prefill_tokens=100, cached_tokens=64, inflight_tokens=50)
    w = Weights(prefill=2.0, queue=0.5, decode=1.5, decode_tokens_per_seq=10)
    assert prefix_cost(p, 1000, w) == 2.0 * 936 + 0.5 * 150 + 1.5 * 3 * 10


def test_hot_prefix_spreads_once_the_first_pod_is_busy():
    # A hot 1000-token prefix sits on pod a; every request adds 100 new tokens. Dispatching
    # queues work on the chosen pod (what the router's in-flight count does), nothing finishes.
    prompt, cached = 1100, 1000
    pods = {"a": PodLoad("a", cached_tokens=cached), "b": PodLoad("b"), "c": PodLoad("c")}
    picks, reasons = [], []
    for _ in range(40):
        d = choose(list(pods.values()), prompt, "prefix", W, rng=random.Random(0))
        picks.append(d.pod_id)
        reasons.append(d.reason)
        p = pods[d.pod_id]
        pods[d.pod_id] = replace(p, inflight_tokens=p.inflight_tokens + prompt - p.cached_tokens)
        if d.pod_id != "a":  # the pod that recomputed the prefix now caches it too
            pods[d.pod_id] = replace(pods[d.pod_id], cached_tokens=cached)
    assert picks[:10] == ["a"] * 10  # cheap while a's queue is shorter than a full recompute
    assert set(picks) == {"a", "b", "c"}  # then the prefix spreads
    assert policy.SPREAD in reasons or policy.COLD in reasons
    counts = [picks.count(x) for x in "abc"]
    assert max(counts) - min(counts) <= 11  # and the load evens out


def test_queued_work_from_pods_and_running_sequences_count():
    pods = [PodLoad("a", cached_tokens=512, waiting_prefill_tokens=5000), PodLoad("b")]
    assert choose(pods, 1000, "prefix", W).pod_id == "b"
    pods = [PodLoad("a", cached_tokens=512, running=100), PodLoad("b")]
    assert choose(pods, 1000, "prefix", W).pod_id == "b"
    pods = [PodLoad("a", cached_tokens=512, running=2), PodLoad("b")]
    assert choose(pods, 1000, "prefix", W).pod_id == "a"


def test_stale_and_excluded_pods_are_never_picked():
    pods = [
        PodLoad("dead", live=False, cached_tokens=1000),
        PodLoad("slow", running=1000),
        PodLoad("x"),
    ]
    for pol in policy.POLICIES:
        for i in range(5):
            d = choose(pods, 1000, pol, W, rr_counter=i, exclude={"x"})
            assert d.pod_id == "slow"
    assert choose([PodLoad("dead", live=False)], 10, "prefix", W).reason == policy.NO_POD
    assert choose([PodLoad("a")], 10, "prefix", W, exclude={"a"}).pod_id is None


def test_round_robin_and_least_load():
    pods = [PodLoad("b"), PodLoad("a"), PodLoad("c", live=False)]
    assert [choose(pods, 10, "round_robin", W, rr_counter=i).pod_id for i in range(4)] == [
        "a",
        "b",
        "a",
        "b",
    ]
    pods = [PodLoad("a", cached_tokens=900, waiting_prefill_tokens=10), PodLoad("b")]
    d = choose(pods, 1000, "least_load", W)
    assert (d.pod_id, d.reason) == ("b", policy.LEAST_LOAD)  # cache ignored


def test_reasons_without_index_and_cold():
    pods = [PodLoad("a"), PodLoad("b", running=1)]
    assert choose(pods, 100, "prefix", W).reason == policy.COLD
    assert choose(pods, 100, "prefix", W, index_ok=False).reason == policy.INDEX_DOWN
    with pytest.raises(ValueError):
        choose(pods, 100, "fastest", W)


def test_ties_are_broken_at_random():
    pods = [PodLoad("a"), PodLoad("b"), PodLoad("c")]
    rng = random.Random(1)
    assert {choose(pods, 100, "prefix", W, rng=rng).pod_id for _ in range(60)} == {"a", "b", "c"}


def test_settings_defaults_come_from_policy_weights():
    s = RouterSettings(model="/m")
    assert s.weights == Weights()


pod_loads = st.builds(
    PodLoad,
    pod_id=st.sampled_from("abcdefgh"),
    live=st.booleans(),
    running=st.integers(0, 300),
    waiting=st.integers(0, 50),
    waiting_prefill_tokens=st.integers(0, 50_000),
    cached_tokens=st.integers(0, 4096),
    inflight_tokens=st.integers(0, 50_000),
)


@given(
    pods=st.lists(pod_loads, max_size=8, unique_by=lambda p: p.pod_id),
    prompt=st.integers(1, 4096),
    pol=st.sampled_from(policy.POLICIES),
    rr=st.integers(0, 100),
    exclude=st.sets(st.sampled_from("abcdefgh"), max_size=3),
)
def test_choice_is_a_live_candidate_of_least_cost(pods, prompt, pol, rr, exclude):
    d = choose(pods, prompt, pol, W, rr_counter=rr, exclude=exclude, rng=random.Random(0))
    candidates = [p for p in pods if p.live and p.pod_id not in exclude]
    if not candidates:
        assert d.pod_id is None and d.reason == policy.NO_POD
        return
    assert d.pod_id in {p.pod_id for p in candidates}
    if pol == "prefix":
        assert d.cost == min(prefix_cost(p, prompt, W) for p in candidates)
    if pol == "least_load":
        assert d.cost == min(policy.load_cost(p, W) for p in candidates)


def test_a_hot_prefix_burst_spreads_queued_work_evenly_over_all_pods():
    # 64 pods, a 2048-token hot prefix cached on "hot" only, and a burst of 200 requests
    # (prefix + 128 own tokens) inside one heartbeat interval: the router sees no pod's load
    # change except through its own in-flight counts, and no other pod caching the prefix.
    # A prefix-affine router would send all 200 to "hot". Ours weighs queued tokens against
    # uncached ones, so "hot" takes the cheap requests only while its queue stays within one
    # request's work of the others': 16 before any other pod gets one, 50 in all.
    prefix, own = 2048, 128
    pods = {f"p{i:02d}": PodLoad(f"p{i:02d}") for i in range(63)}
    pods["hot"] = PodLoad("hot", cached_tokens=prefix)
    picks = []
    rng = random.Random(0)
    for _ in range(200):
        d = choose(list(pods.values()), prefix + own, "prefix", W, rng=rng)
        picks.append(d.pod_id)
        p = pods[d.pod_id]
        pods[d.pod_id] = replace(p, inflight_tokens=p.inflight_tokens + prefix + own - p.cached_tokens)
    assert picks[:16] == ["hot"] * 16  # the 17th costs 17 * 128 = 2176 there too: a tie
    assert picks.count("hot") == 50
    others = [p.inflight_tokens for pid, p in pods.items() if pid != "hot"]
    assert set(others) == {2 * (prefix + own), 3 * (prefix + own)}  # every pod got 2 or 3
    assert max(others) - (prefix + own) <= pods["hot"].inflight_tokens <= max(others)
