"""Quick modes of the scale benches (bench/bench_index.py, bench/bench_routing_sim.py) against a
real redis-server each starts: what they report must add up exactly."""

from __future__ import annotations

import json

import pytest

from bench import bench_index, bench_routing_sim

pytestmark = pytest.mark.e2e


def test_index_bench_quick_adds_up(tmp_path):
    out = tmp_path / "index.json"
    res = bench_index.main(["--pods", "20", "--blocks", "20000", "--tenants", "10",
                            "--lookups", "5", "--churn-s", "0.2", "--out", str(out)])
    assert json.loads(out.read_text())["memory"] == res["memory"]
    mem = res["memory"]
    # 1,000 blocks a pod, exactly; keys: one blk set per distinct block, a heartbeat and a
    # reverse map per pod, and the pod set
    assert mem["entries"] == 20_000
    assert mem["keys"] == mem["distinct_blocks"] + 2 * 20 + 1
    assert 50 < mem["bytes_per_entry"] < 1000
    look = res["lookup"]
    assert all(v["old_and_new_agree"] for v in look.values())  # the new LOOKUP = the old one
    assert (look["cold"]["pods_hit"], look["cold"]["max_hit_blocks"]) == (0, 0)
    for shape in ("hot_prefix+conversation", "all_pods_hold_all"):
        assert (look[shape]["pods_hit"], look[shape]["max_hit_blocks"]) == (20, 512)
    assert look["conversation"]["max_hit_blocks"] == 512
    ev = res["events"]
    assert ev["events"] == ev["ticks"] * 2 * 64 * 20 and ev["ticks"] >= 1


def test_routing_sim_quick_redis_and_local_index_decide_alike(tmp_path):
    out = tmp_path / "sim.json"
    argv = ["--pods", "8", "--requests-per-pod", "4", "--workloads", "tenants", "hot"]
    res = bench_routing_sim.main([*argv, "--policies", *bench_routing_sim.SIM_POLICIES,
                                  "--out", str(out)])
    assert [(r["workload"], r["policy"]) for r in res] == [
        (w, p) for w in ("tenants", "hot") for p in bench_routing_sim.SIM_POLICIES]
    for r in res:
        assert r["requests"] == 32  # every request got its first token and finished
        assert r["index"] == ("redis" if r["policy"] in ("prefix", "affinity") else "local")
        assert 1 / 8 <= r["busiest_pod_request_share"] <= 1
    rr = {r["workload"]: r for r in res if r["policy"] == "round_robin"}
    assert all(r["busiest_pod_request_share"] == 4 / 32 for r in rr.values())
    # The 512-pod runs use the in-process index: it must lead to the very same decisions.
    local = bench_routing_sim.main([*argv, "--policies", "prefix", "--index", "local"])
    drop = ("index", "wall_s", "decide_ms_per_request")
    redis_runs = [r for r in res if r["policy"] == "prefix"]
    assert [{k: v for k, v in r.items() if k not in drop} for r in local] == [
        {k: v for k, v in r.items() if k not in drop} for r in redis_runs]
