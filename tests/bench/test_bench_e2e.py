"""`baton bench` against a real Baton stack (router + colocated pod, tiny model) on loopback."""

from __future__ import annotations

import json
from itertools import groupby, pairwise

import pytest

from baton.bench import main
from tests.bench.test_bench_results import check_schema

pytestmark = pytest.mark.e2e


def run_bench(tmp_path, argv: list[str]) -> tuple[int, dict]:
    out = tmp_path / "results.json"
    rc = main([*argv, "--out", str(out), "--no-progress", "--timeout", "30", "--max-duration", "30"])
    return rc, json.loads(out.read_text())


def test_shared_prefix_token_ids_rate_sweep(baton_stack, tiny_qwen3, tmp_path, capsys):
    rc, doc = run_bench(tmp_path, [
        "--base-url", baton_stack, "--endpoint", "completions", "--tokenizer", str(tiny_qwen3),
        "--workload", "shared-prefix", "--tenants", "2", "--system-tokens", "48", "--question-len", "4:12",
        "--output-len", "3:6", "--num-requests", "6", "--request-rate", "4,inf",
        "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--label", "e2e",
    ])
    assert rc == 0
    check_schema(doc)
    assert doc["label"] == "e2e" and [p["value"] for p in doc["points"]] == [4.0, "inf"]
    assert doc["config"]["model"] == tiny_qwen3.name  # from /v1/models
    for p in doc["points"]:
        s = p["summary"]
        assert (s["requests"], s["completed"], s["errors"]) == (6, 6, 0)
        assert s["goodput"] == pytest.approx(s["request_throughput"])  # SLOs nobody misses
        for r in p["requests"]:
            assert r["ok"] and r["status"] == 200 and not r["usage_missing"]
            assert r["prompt_tokens"] == 48 + r["turn_input_tokens"]  # token-id prompts: exact
            assert r["output_tokens"] == r["max_tokens"]  # ignore_eos
            assert 0 < r["ttft_s"] <= r["e2e_s"] and len(r["itl_s"]) <= r["output_tokens"] - 1
    # at 4 req/s a tenant's later requests find its 48-token system prompt (3 blocks) cached
    assert doc["points"][0]["summary"]["cached_tokens"] > 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("label") and len(table) == 3


def test_multi_turn_chat_through_the_baton_cli(baton_stack, tiny_qwen3, tmp_path):
    from baton.cli import main as baton_main

    out = tmp_path / "mt.json"
    rc = baton_main(["bench", "--base-url", baton_stack, "--tokenizer", str(tiny_qwen3),
                     "--workload", "multi-turn", "--turns", "3", "--input-len", "6", "--output-len", "4",
                     "--num-requests", "6", "--concurrency", "2", "--out", str(out), "--no-progress",
                     "--timeout", "30", "--max-duration", "30"])
    assert rc == 0
    doc = json.loads(out.read_text())
    check_schema(doc)
    reqs = doc["points"][0]["requests"]
    assert len(reqs) == 6 and all(r["ok"] and r["output_tokens"] == 4 for r in reqs)
    ordered = sorted(reqs, key=lambda r: (r["session"], r["turn"]))
    for _, turns in groupby(ordered, key=lambda r: r["session"]):
        prompts = [r["prompt_tokens"] for r in turns]
        assert len(prompts) == 3
        # each turn carries the previous answer (4 tokens) and 6 new user tokens, plus template
        assert all(b >= a + 10 for a, b in pairwise(prompts)), prompts


@pytest.mark.parametrize("client", ["asyncio", "httpx"])
def test_server_errors_are_recorded(baton_stack, tmp_path, capsys, client):
    rc, doc = run_bench(tmp_path, ["--base-url", baton_stack, "--model", "no-such-model", "--http-client", client,
                                   "--num-requests", "3", "--input-len", "4", "--output-len", "2",
                                   "--concurrency", "3"])
    assert rc == 1  # every request failed
    check_schema(doc)
    s = doc["points"][0]["summary"]
    assert s["completed"] == 0 and s["errors"] == 3 and s["error_statuses"] == {"404": 3}
    assert all("no-such-model" in r["error"] for r in doc["points"][0]["requests"])
    assert "failed" in capsys.readouterr().err


def test_duration_cap_and_request_timeout_bound_a_point(baton_stack, tmp_path):
    out = tmp_path / "capped.json"
    argv = ["--base-url", baton_stack, "--input-len", "4", "--output-len", "2", "--no-progress",
            "--out", str(out)]
    # 1 request/s for 40 planned requests, but nothing may start after 1.5 s (seed 0's arrivals:
    # 0.49 s, 1.88 s, ...)
    assert main([*argv, "--num-requests", "40", "--request-rate", "1", "--max-duration", "1.5"]) == 0
    p = json.loads(out.read_text())["points"][0]
    assert p["planned_requests"] == 40 and p["summary"]["requests"] == 1
    assert all(r["start_s"] < 1.5 for r in p["requests"])
    # a request timeout far below any real answer: every request fails, none hangs
    assert main([*argv, "--num-requests", "2", "--concurrency", "2", "--timeout", "0.001"]) == 1
    p = json.loads(out.read_text())["points"][0]
    assert [r["error"] for r in p["requests"]] == ["timeout after 0.001s"] * 2
    assert p["summary"]["error_statuses"] == {"none": 2}
