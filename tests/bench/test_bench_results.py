"""The results file's schema, the table, the plots and `compare`, on hand-made records."""

from __future__ import annotations

import json
import math

import pytest

from baton.bench import main, results
from baton.bench.metrics import RequestRecord, summarize

SUMMARY_KEYS = {
    "requests", "completed", "errors", "error_statuses", "duration_s", "prompt_tokens", "output_tokens",
    "cached_tokens", "prefix_cache_hit_rate", "request_throughput", "output_throughput",
    "total_token_throughput", "goodput", "slo_attainment", "slo_ttft_ms", "slo_tpot_ms", "usage_missing",
    "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms",
}
RECORD_KEYS = {
    "session", "turn", "start_s", "tenant", "turn_input_tokens", "max_tokens", "ok", "status", "error",
    "ttft_s", "e2e_s", "itl_s", "prompt_tokens", "output_tokens", "cached_tokens", "usage_missing", "tpot_s",
}
STATS_KEYS = {"mean", "p50", "p90", "p99"}


def check_schema(doc: dict) -> None:
    """What a results file must hold (also used on real runs by the e2e test)."""
    assert doc["schema"] == results.SCHEMA
    assert set(doc) == {"schema", "label", "created", "config", "points"}
    assert isinstance(doc["label"], str) and isinstance(doc["config"], dict)
    assert "api_key" not in doc["config"]
    for p in doc["points"]:
        assert set(p) == {"mode", "value", "seed", "planned_requests", "summary", "requests"}
        assert p["mode"] in ("rate", "concurrency")
        assert p["value"] == "inf" or isinstance(p["value"], float)
        assert set(p["summary"]) == SUMMARY_KEYS
        for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(p["summary"][k]) == STATS_KEYS
        assert p["summary"]["requests"] == len(p["requests"]) <= p["planned_requests"]
        for r in p["requests"]:
            assert set(r) == RECORD_KEYS


def make_doc(label: str, scale: float) -> dict:
    points = []
    for i, rate in enumerate((1.0, 2.0, math.inf)):
        recs = [RequestRecord(j, 0, start_s=0.1 * j, ok=True, status=200, ttft_s=scale * (0.1 + 0.01 * j),
                              e2e_s=scale * (0.5 + 0.01 * j), itl_s=[scale * 0.1] * 4, prompt_tokens=64,
                              output_tokens=5, cached_tokens=32 * (j % 2), max_tokens=5, turn_input_tokens=64)
                for j in range(6)]
        recs.append(RequestRecord(6, 0, status=500, error="boom", max_tokens=5))
        summary = summarize(recs, 3.0 / (i + 1), slo_ttft_ms=130, slo_tpot_ms=150)
        points.append(results.point_doc("rate", rate, 10 + i, 7, summary, recs))
    return results.results_doc(label, {"workload": "random"}, points)


def test_schema_and_round_trip(tmp_path):
    doc = make_doc("a", 1.0)
    check_schema(doc)
    results.save(doc, tmp_path / "sub" / "a.json")
    back = results.load(tmp_path / "sub" / "a.json")
    assert back == json.loads(json.dumps(doc))
    assert [results.point_value(p) for p in back["points"]] == [1.0, 2.0, math.inf]
    rec = RequestRecord.from_dict(back["points"][0]["requests"][0])
    assert rec.to_dict() == back["points"][0]["requests"][0]
    (tmp_path / "x.json").write_text('{"schema": "other"}')
    with pytest.raises(ValueError):
        results.load(tmp_path / "x.json")


def test_table_rows():
    lines = results.table([make_doc("first", 1.0), make_doc("second", 2.0)]).splitlines()
    assert len(lines) == 1 + 6
    assert lines[0].split()[:3] == ["label", "load", "ok/err"]
    # every number's unit is in its column's header
    assert [c for c in results.COLUMNS if c not in lines[0]] == []
    assert [c for c in results.COLUMNS[3:] if not c.endswith((" ms", "/s", "%"))] == []
    assert lines[1].split()[:6] == ["first", "rate", "1", "req/s", "6/1", "2.00"]
    assert lines[3].split()[:4] == ["first", "rate", "inf", "6/1"]
    assert "25.0" in lines[1].split()  # hit %: half the prompt cached for 3 of 6 requests
    doc = make_doc("c", 1.0)
    doc["points"][0]["mode"] = "concurrency"
    assert results.table([doc]).splitlines()[1].split()[:4] == ["c", "conc", "1", "6/1"]


def test_compare_writes_plots_and_table(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the `bench` extra)")
    for name, scale in (("a", 1.0), ("b", 2.0)):
        results.save(make_doc(name, scale), tmp_path / f"{name}.json")
    rc = main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
               "--labels", "prefix,round-robin", "--plot", str(tmp_path / "plots")])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[1:]] == ["prefix"] * 3 + ["round-robin"] * 3
    for png in ("latency.png", "throughput.png"):
        data = (tmp_path / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bad_arguments_are_errors_not_tracebacks(capsys):
    assert main(["--request-rate", "0", "--model", "m"]) == 2
    assert main(["--concurrency", "0", "--model", "m"]) == 2
    assert main(["--input-len", "9:3", "--model", "m", "--base-url", "http://127.0.0.1:9"]) == 2
    with pytest.raises(SystemExit):  # argparse's own usage error
        main(["--extra-body", "[1]", "--model", "m"])
    assert "error" in capsys.readouterr().err


def test_help_gives_every_default(capsys, monkeypatch):
    import re

    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    options = [" ".join(b.split()) for b in re.split(r"\n(?=  -)", out.split("options:")[1].split("examples:")[0])
               if b.strip().startswith("-")]
    assert "(default: random)" in out and "(default: 300.0)" in out
    # what has no default line: a switch, or an option unset unless given
    quiet = {o.split()[0] for o in options if "default" not in o}
    assert quiet == {"-h,", "--api-key", "--tokenizer", "--no-ignore-eos", "--extra-body", "--concurrency",
                     "--slo-ttft-ms", "--slo-tpot-ms", "--label", "--out", "--plot", "--no-progress"}
