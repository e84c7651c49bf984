"""Trust between services (issue 25, findings 5 and 6) on `baton up` as a user runs it, with its
defaults: split mode (one prefill, one decode pod) on the tiny model, real Redis, real UCX.

One stack for the module. `baton up` generates the internal token and the Redis password;
the test reads them where a local attacker could not: from the router's environment under
/proc (same user). A fake pod is an HTTP listener of this process that records every request.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
import redis

from baton.kvindex import schema
from tests.stack import children_of, environ_of, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
INTERNAL = [("GET", "/internal/state"), ("GET", "/internal/transfer_stats"), ("POST", "/internal/abort"),
            ("POST", "/internal/generate"), ("POST", "/internal/prefill")]


@dataclass
class Up:
    proc: subprocess.Popen
    run_dir: Path
    router: str
    model: str
    token: str
    redis_url: str
    pods: dict[str, str]  # role -> URL
    ucx_address: str  # the decode pod's, as registered
    argvs: list[list[str]]

    def auth(self) -> dict[str, str]:
        return {"X-Baton-Token": self.token}


@pytest.fixture(scope="module")
def up(tiny_qwen3, tmp_path_factory):
    log = tmp_path_factory.mktemp("up") / "up.log"
    env = {k: v for k, v in os.environ.items() if k not in ("BATON_INSECURE_INTERNAL", "BATON_INTERNAL_TOKEN")}
    env |= {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    argv = [sys.executable, "-m", "baton.cli", "up", "--model", str(tiny_qwen3), "--port", "0",
            "--prefill", "1", "--decode", "1", "--pod-arg=--device=cpu",
            "--pod-arg=--num-kv-blocks=512"]  # not the 1 GiB a tiny model's cache takes by default on a CPU
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        def ready():
            text = log.read_text(errors="replace")
            assert proc.poll() is None, f"baton up exited:\n{text}"
            return re.search(r"ready at (http://\S+)/v1", text)

        router = wait_for(ready, "baton up ready", 240, interval_s=0.5).group(1).replace("0.0.0.0", "127.0.0.1")
        run_dir = Path(re.search(r"logs in (\S+)\)", log.read_text()).group(1))
        kids = children_of(proc.pid)
        (router_pid,) = [p for p, a in kids.items() if "router" in a]
        renv = environ_of(router_pid)
        pods = {}
        for a in kids.values():
            if "baton.cli" in a and a[a.index("baton.cli") + 1] in ("decode", "prefill"):
                pods[a[a.index("baton.cli") + 1]] = f"http://127.0.0.1:{a[a.index('--port') + 1]}"
        r = redis.Redis.from_url(renv["BATON_REDIS_URL"])
        recs = [schema.PodRecord.from_json(r.get(schema.pod_key("baton:", m.decode())))
                for m in r.smembers(schema.pods_key("baton:"))]
        r.close()
        (ucx,) = [rec.ucx_address for rec in recs if rec.role == "decode"]
        model = httpx.get(router + "/v1/models", trust_env=False, timeout=10).json()["data"][0]["id"]
        yield Up(proc, run_dir, router, model, renv["BATON_INTERNAL_TOKEN"], renv["BATON_REDIS_URL"], pods, ucx,
                 list(kids.values()))
    finally:
        kids = children_of(proc.pid)
        proc.kill()  # its children get SIGKILL with it (parent-death signal): no orderly drain to wait for
        proc.wait(10)
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() and "Z" not in
                                 Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[:1]
                                 for p in kids), "baton up's children gone", 20, interval_s=0.1)


def test_baton_up_generates_the_secrets_and_keeps_them_out_of_argv(up):
    password = up.redis_url.split("//:", 1)[1].split("@", 1)[0]
    assert len(up.token) >= 40 and len(password) >= 40 and up.token != password
    for argv in up.argvs:  # what `ps` shows every local user
        assert not any(up.token in a or password in a for a in argv), argv
    for log in up.run_dir.glob("*.log"):  # nor the logs
        text = log.read_text(errors="replace")
        assert up.token not in text and password not in text, log
    host_port = up.redis_url.rsplit("@", 1)[1]
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(f"redis://{host_port}").ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(f"redis://:wrong@{host_port}").ping()
    assert redis.Redis.from_url(up.redis_url).ping()


def test_every_internal_call_without_the_token_is_refused(up):
    with httpx.Client(trust_env=False, timeout=10) as http:
        for url in up.pods.values():
            for method, path in INTERNAL:
                for headers in ({}, {"X-Baton-Token": "wrong"}, {"X-Baton-Token": ""}):
                    r = http.request(method, url + path, json={"request_id": "x"}, headers=headers)
                    assert r.status_code == 401, (url, path, r.text)
                    assert r.json()["error"]["type"] == "authentication_error"
            assert http.get(url + "/internal/state", headers=up.auth()).status_code == 200
            assert http.get(url + "/health").status_code == 200  # probes stay open


def test_a_pod_started_by_hand_without_a_token_refuses_internal_calls(tiny_qwen3):
    """The pod's own gate, in process (no model loaded: the gate answers before any handler)."""
    from fastapi.testclient import TestClient

    from baton.decode_service.app import create_app
    from baton.decode_service.settings import DecodeSettings

    closed = TestClient(create_app(DecodeSettings(model=str(tiny_qwen3), device="cpu")))
    r = closed.get("/internal/state")
    assert r.status_code == 403 and "--internal-token" in r.json()["error"]["message"]
    opened = TestClient(create_app(DecodeSettings(model=str(tiny_qwen3), device="cpu", insecure_internal=True)))
    assert opened.get("/internal/state").status_code == 503  # through the gate: the model is not loaded


class FakePod:
    """An HTTP listener that answers like a pod and records every request it gets."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict]] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                seen.append((self.command, self.path, dict(self.headers), self.rfile.read(n)))
                body = json.dumps({"token_ids": [1], "finish_reason": "stop", "num_cached_tokens": 0,
                                   "num_prompt_tokens": 1, "logprobs": None}).encode() + b"\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake(up):
    """A fake pod registered in Redis (as anyone who can write to it could): unsigned, forged,
    a real pod's signed record re-pointed at the fake, the same replayed under another id,
    and a malformed record. Removed afterwards."""
    pod = FakePod()
    r = redis.Redis.from_url(up.redis_url)
    real = {}
    for m in r.smembers("baton:pods"):
        rec = json.loads(r.get(schema.pod_key("baton:", m.decode())))
        real[rec["role"]] = rec
    lure = {"model": up.model, "running": 0, "waiting": 0, "free_blocks": 10_000, "total_blocks": 10_000,
            "block_size": 16, "max_model_len": 4096, "ts": time.time(), "expires": time.time() + 3600}
    fakes = {
        "fake-unsigned": {"pod_id": "fake-unsigned", "role": "decode", "url": pod.url,
                          "ucx_address": pod.url[7:], **lure},
        "fake-forged": {"pod_id": "fake-forged", "role": "prefill", "url": pod.url, **lure, "sig": "0" * 64},
        "fake-repointed": {**real["decode"], "pod_id": "fake-repointed", "url": pod.url},
        "fake-replayed": dict(real["prefill"]),  # valid signature, another pod's id
        "fake-colocated": {"pod_id": "fake-colocated", "role": "colocated", "url": pod.url, **lure},
    }
    for pod_id, rec in fakes.items():
        r.set(schema.pod_key("baton:", pod_id), json.dumps(rec))
    r.set(schema.pod_key("baton:", "bad"), "[1,2]")
    r.sadd("baton:pods", *fakes, "bad")
    try:
        yield pod
    finally:
        r.delete(*(schema.pod_key("baton:", p) for p in [*fakes, "bad"]))
        r.srem("baton:pods", *fakes, "bad")
        r.close()
        pod.close()


def test_a_fake_pod_in_redis_receives_nothing_and_a_bad_record_is_no_500(up, fake):
    client = openai.OpenAI(base_url=up.router + "/v1", api_key="-", timeout=60, max_retries=0)
    time.sleep(1.5)  # the router re-reads the registry every 0.5 s: the fakes are in it now
    for i in range(6):
        out = client.completions.create(model=up.model, prompt=f"my secret password is {i}", max_tokens=3,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3
    # The pods refuse to name the fake either, token or not.
    with httpx.Client(trust_env=False, timeout=60) as http:
        body = {"request_id": "to-fake", "prompt_token_ids": list(range(40)), "prefill": {"url": fake.url},
                "sampling": {"max_tokens": 2, "temperature": 0, "ignore_eos": True}}
        lines = [json.loads(x) for x in http.post(up.pods["decode"] + "/internal/generate", json=body,
                                                   headers=up.auth()).text.splitlines()]
        assert lines[-1]["finish_reason"] == "length" and sum(len(x["token_ids"]) for x in lines) == 2
        stats = http.get(up.pods["decode"] + "/internal/transfer_stats", headers=up.auth()).json()
        assert stats["outcome_refused_peer"] == 1
        body = {"request_id": "to-fake-ucx", "prompt_token_ids": list(range(40)), "kv_start": 0,
                "reservation_id": "r", "ucx_address": fake.url[7:]}
        r = http.post(up.pods["prefill"] + "/internal/prefill", json=body, headers=up.auth())
        assert r.status_code == 403 and r.json()["error"]["param"] == "ucx_address"
    assert fake.requests == []  # nothing at all: no prompt, no state poll, no token
    log = (up.run_dir / "router.log").read_text()
    for pod_id, why in [("bad", "not a JSON object"), ("fake-unsigned", "unsigned"),
                        ("fake-forged", "bad signature"), ("fake-repointed", "bad signature"),
                        ("fake-replayed", "record names pod"), ("fake-colocated", "unsigned")]:
        lines = [x for x in log.splitlines() if f"ignoring pod '{pod_id}'" in x]
        assert len(lines) == 1 and why in lines[0], (pod_id, lines)  # once, for every refresh since


def test_a_ucx_connection_without_the_proof_is_refused(up):
    import asyncio

    from tests.security.ucx_hello import main as hello

    stats = lambda: httpx.get(up.pods["decode"] + "/internal/transfer_stats", headers=up.auth(),  # noqa: E731
                              trust_env=False, timeout=10).json()
    before = stats()["auth_failures"]
    got = []
    asyncio.run(hello(up.ucx_address, ["wrong", "-", up.token], got.append))  # this process as the sender
    assert got[0].startswith("refused:") and got[1].startswith("refused:") and got[2] == "connected", got
    assert stats()["auth_failures"] == before + 2


def test_abort_ends_the_client_stream_at_once(up):
    client = openai.OpenAI(base_url=up.router + "/v1", api_key="-", timeout=30, max_retries=0)
    stream = client.completions.create(model=up.model, prompt="abort me", max_tokens=3500, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(c for c in chunks if c.choices and c.choices[0].text)
    r = httpx.post(up.pods["decode"] + "/internal/abort", json={"request_id": f"{first.id}-0"},
                   headers=up.auth(), trust_env=False, timeout=10)
    assert r.status_code == 200
    t0 = time.monotonic()
    rest = list(chunks)
    finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert finish == ["abort"], finish
    print(f"stream ended {time.monotonic() - t0:.2f} s after the abort")
