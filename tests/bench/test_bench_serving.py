"""bench/bench_serving.py on the CPU: its padded tokenizer, and the --smoke run of the routing mode
(Redis bundled by bench/bundle_redis.sh, two pods, two routers, `baton bench`, archive)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "bench_serving.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_serving", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_model_dir_tokenizer_decodes_every_id_of_the_config(tmp_path):
    from baton.engine.tokenizer import Tokenizer

    bs = load_script()
    config = json.loads((REPO / "bench" / "configs" / "qwen3-8b" / "config.json").read_text())
    tok = Tokenizer(bs.make_model_dir(tmp_path / "m", config))
    assert tok.vocab_size == config["vocab_size"] == 151936
    # random weights sample any id: each one past the trained 2,048 must still stream text
    assert tok.decode([2048, 100000, 151935]) == " w2048 w100000 w151935"
    ids = tok.encode(" the people", add_special_tokens=False)
    assert ids and max(ids) < 2048  # prompts use the trained ids only


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="bundle_redis.sh copies the installed redis-server")
def test_smoke_routing_mode_with_bundled_redis(tmp_path):
    bundle = tmp_path / "redis-bundle"
    subprocess.run(["bash", str(REPO / "bench" / "bundle_redis.sh"), "--no-xz", str(bundle)], check=True,
                   timeout=60, capture_output=True)
    out, results = tmp_path / "work", tmp_path / "results"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--modes", "routing", "--redis", str(bundle),
                           "--out-dir", str(out), "--results", str(results)],
                          check=False, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((results / "serving-summary.json").read_text())
    assert summary["errors"] == {}
    assert summary["host"]["redis_server"] == str(bundle / "bin" / "redis-server")
    r = summary["modes"]["routing"]["results"]
    for policy in ("prefix", "round_robin"):
        assert (r[policy]["completed"], r[policy]["errors"]) == (24, 0)
        assert sum(r[policy]["requests_per_pod"].values()) == 24
    assert r["round_robin"]["requests_per_pod"] == {"colocated-0": 12, "colocated-1": 12}
    assert r["prefix"]["hit_rate"] > 0.3  # 4 tenants' 64-token system prompts over 24 requests
    with tarfile.open(results / "serving.tar.gz") as t:
        names = set(t.getnames())
    assert {"serving/serving-summary.json", "serving/routing/prefix.json", "serving/routing/round_robin.json",
            "serving/routing/plots/throughput.png", "serving/routing/colocated-0.log"} <= names
    assert not any(n.startswith("serving/model") for n in names)
    assert "routing: 2 colocated pods" in proc.stdout
