"""Percentiles, TPOT, throughputs, cache hit rate and goodput on hand-made records."""

from __future__ import annotations

import random

import numpy as np
import pytest

from baton.bench.client import chunk_text
from baton.bench.metrics import RequestRecord, percentile, summarize


def records():
    return [
        RequestRecord(0, 0, ok=True, status=200, ttft_s=0.1, e2e_s=1.1, itl_s=[0.1] * 10,
                      prompt_tokens=100, output_tokens=11, cached_tokens=50),
        RequestRecord(1, 0, ok=True, status=200, ttft_s=0.3, e2e_s=0.5, itl_s=[0.05] * 4,
                      prompt_tokens=200, output_tokens=5, cached_tokens=0),
        RequestRecord(2, 0, ok=True, status=200, ttft_s=0.2, e2e_s=0.2, itl_s=[],
                      prompt_tokens=100, output_tokens=1, cached_tokens=96),
        RequestRecord(3, 0, status=503, error="overloaded"),
        RequestRecord(4, 0, error="timeout after 5s"),
    ]


def test_percentile_matches_numpy_linear():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([7], 99) == 7 and percentile([], 50) is None
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 101):
        xs = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_tpot():
    r = records()
    assert r[0].tpot_s == pytest.approx(0.1)
    assert r[1].tpot_s == pytest.approx(0.05)
    assert r[2].tpot_s is None  # one token: no time per output token
    assert r[3].tpot_s is None


def test_summary_numbers():
    s = summarize(records(), duration_s=2.0, slo_ttft_ms=250, slo_tpot_ms=80)
    assert (s["requests"], s["completed"], s["errors"]) == (5, 3, 2)
    assert s["error_statuses"] == {"503": 1, "none": 1}
    assert (s["prompt_tokens"], s["output_tokens"], s["cached_tokens"]) == (400, 17, 146)
    assert s["prefix_cache_hit_rate"] == pytest.approx(0.365)
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(8.5)
    assert s["total_token_throughput"] == pytest.approx(208.5)
    assert s["ttft_ms"] == pytest.approx({"mean": 200.0, "p50": 200.0, "p90": 280.0, "p99": 298.0})
    assert s["tpot_ms"] == pytest.approx({"mean": 75.0, "p50": 75.0, "p90": 95.0, "p99": 99.5})
    assert s["itl_ms"] == pytest.approx({"mean": 1200.0 / 14, "p50": 100.0, "p90": 100.0, "p99": 100.0})
    assert s["e2e_ms"] == pytest.approx({"mean": 600.0, "p50": 500.0, "p90": 980.0, "p99": 1088.0})
    # within both SLOs: only record 2 (record 0's TPOT is 100 ms, record 1's TTFT 300 ms)
    assert s["goodput"] == pytest.approx(0.5)
    assert s["slo_attainment"] == pytest.approx(0.2)


def test_goodput_per_slo():
    assert summarize(records(), 2.0, slo_ttft_ms=250)["goodput"] == pytest.approx(1.0)  # records 0, 2
    assert summarize(records(), 2.0, slo_tpot_ms=80)["goodput"] == pytest.approx(1.0)  # records 1, 2
    assert summarize(records(), 2.0, slo_ttft_ms=1000, slo_tpot_ms=1000)["goodput"] == pytest.approx(1.5)
    s = summarize(records(), 2.0)
    assert s["goodput"] is None and s["slo_attainment"] is None


def test_empty_summary():
    s = summarize([], 0.0)
    assert s["completed"] == 0 and s["request_throughput"] == 0.0 and s["prefix_cache_hit_rate"] is None
    assert s["ttft_ms"] == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_chunk_text():
    assert chunk_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == ""
    assert chunk_text({"choices": [{"delta": {"content": "ab"}}]}) == "ab"
    assert chunk_text({"choices": [{"text": "cd"}]}) == "cd"
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""
