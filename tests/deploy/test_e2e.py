"""The services started exactly as docker-compose.yml and k8s/ start them, then a chat request
through the router with the official `openai` client.

Commands and environment come from the files themselves (compose as Compose reads it; the
Deployments as kustomize renders them and the kubelet builds a container's environment). Only
what cannot hold on one machine without containers or GPUs is changed, each change listed in
LOOPBACK: addresses and ports (every service on 127.0.0.1, on free ports), the Redis URL (a
private redis-server), the model (a tiny random one instead of SmolLM2, so no init step), and
the device (cpu). Everything else -- roles, block size, policy, UCX port range, log level --
is what the files say.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import openai
import pytest

from tests.deploy import compose_file
from tests.deploy.k8s_objects import baton_deployments, container_env
from tests.deploy.layout import ROOT
from tests.stack import ServiceStack, free_port, launch, wait_for, wait_started

pytestmark = pytest.mark.e2e

HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
READY_TIMEOUT_S = 90


def loopback(env: dict[str, str], redis_url: str, model: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The environment with LOOPBACK's changes, and old port -> new port."""
    env = dict(env)
    ports = {}
    for key in ("BATON_PORT", "BATON_UCX_PORT"):
        if key in env:
            ports[env[key]] = str(free_port())
            env[key] = ports[env[key]]
    if env.get("BATON_HOST") in ("0.0.0.0", "127.0.0.1"):  # 127.0.0.1: k8s's $(POD_IP) below
        env["BATON_HOST"] = "127.0.0.1"
    if "BATON_ADVERTISE_URL" in env:  # http://$(POD_IP):PORT, with the pod IP as 127.0.0.1
        u = urlsplit(env["BATON_ADVERTISE_URL"])
        assert u.hostname == "127.0.0.1" and str(u.port) in ports, env["BATON_ADVERTISE_URL"]
        env["BATON_ADVERTISE_URL"] = urlunsplit(u._replace(netloc=f"127.0.0.1:{ports[str(u.port)]}"))
    if "BATON_REDIS_URL" in env:
        env["BATON_REDIS_URL"] = redis_url
    if "BATON_MODEL" in env:
        assert env["BATON_MODEL"].startswith("/models/")
        env["BATON_MODEL"] = str(model)
    if "BATON_DEVICE" in env:
        assert env["BATON_DEVICE"].startswith("cuda")
        env["BATON_DEVICE"] = "cpu"
    return env, ports


def _healthcheck():
    # the image's `baton-healthcheck`, loaded in-process (test_dockerfile runs it as a program)
    spec = importlib.util.spec_from_file_location("baton_healthcheck", HEALTHCHECK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def wait_healthy(child, url: str) -> None:
    """Run the health check the deployment file names until it passes."""
    check = _healthcheck()
    wait_started(child, lambda: check.main([url]) == 0, READY_TIMEOUT_S)


def wait_registered(redis_url: str, n: int) -> None:
    """Until n pods have a heartbeat in Redis, and the router has had time to see them."""
    import redis

    r = redis.Redis.from_url(redis_url)
    wait_for(lambda: len(r.keys("baton:pod:*")) >= n, "pods did not register", 30, interval_s=0.1)
    time.sleep(1.0)  # two of the router's refresh intervals


def chat(router_url: str, api_key: str = "none") -> None:
    with httpx.Client(trust_env=False, timeout=60) as http:
        client = openai.OpenAI(base_url=router_url + "/v1", api_key=api_key, http_client=http)
        model = client.models.list().data[0].id
        # longer than a few KV blocks, so a prefill pod has whole blocks to push
        prompt = "Explain what a paged KV cache is, and why prefix caching helps. " * 4
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.prompt_tokens > 32 and r.usage.completion_tokens >= 1


def kv_pushed(pod_url: str) -> float:
    text = httpx.get(pod_url + "/metrics", trust_env=False, timeout=10).text
    m = re.search(r'^baton_pod_kv_transfers_total\{outcome="ok"\} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
def clean_env(monkeypatch):
    # the services must get their settings from the deployment file, not from this shell
    import os

    for k in list(os.environ):
        if k.startswith("BATON_"):
            monkeypatch.delenv(k)


# The disaggregated stacks run with an API key and an internal token, as a deployment that
# sets them would: every hop (client -> router -> decode pod -> prefill pod) must carry them.
SECRETS = {"BATON_API_KEYS": "k1", "BATON_INTERNAL_TOKEN": "t0ken"}


@pytest.mark.parametrize("profile", ["colocated", "two-gpu"])
def test_compose_stack_answers_a_chat(profile, tiny_qwen3, tmp_path, clean_env):
    secure = profile == "two-gpu"
    compose = compose_file.load(env=compose_file.SECRETS | (SECRETS if secure else {}))  # as from a .env file
    svcs = compose_file.services(compose, {profile})
    image = compose["x-baton"]["image"]
    with ServiceStack(tmp_path) as st:
        redis = st.redis()
        started = {}  # compose name -> (child, health URL)
        pending = [n for n, s in svcs.items() if s.spec.get("image") == image and "entrypoint" not in s.spec]
        assert svcs["redis"].spec["image"].startswith("redis:") and "model" in svcs
        while pending:  # compose's order: a service starts once its dependencies are as it asks
            name = next(n for n in pending if all(
                d in ("redis", "model") or (d in started and c["condition"] == "service_healthy")
                for d, c in svcs[n].depends_on.items()))
            pending.remove(name)
            s = svcs[name]
            for dep, cond in s.depends_on.items():
                if dep in started and cond["condition"] == "service_healthy":
                    wait_healthy(*started[dep])
            env, ports = loopback(s.environment, redis.url, tiny_qwen3)
            child = launch(st.stack, name, [sys.executable, "-m", "baton.cli", *s.command], env)
            u = urlsplit(s.healthcheck_cmd[2])
            started[name] = (child, urlunsplit(u._replace(netloc=f"127.0.0.1:{ports[str(u.port)]}")))
        for child, url in started.values():  # `docker compose up --wait`
            wait_healthy(child, url)
        pods = [n for n in started if svcs[n].command[0] != "router"]
        if len(pods) > 1:  # the router must know the prefill pod too, not just one live pod
            wait_registered(redis.url, len(pods))
        base = {n: url.rsplit("/", 1)[0] for n, (_, url) in started.items()}
        chat(base["router"], SECRETS["BATON_API_KEYS"] if secure else "none")
        if secure:
            assert httpx.post(base["router"] + "/v1/completions", json={"prompt": "x"},
                              trust_env=False).status_code == 401
            assert httpx.get(base["decode"] + "/internal/state", trust_env=False).status_code in (401, 403)
            assert kv_pushed(base["decode"]) >= 1, "the prompt's KV did not come from the prefill pod"


def test_k8s_deployments_answer_a_chat(rendered, tiny_qwen3, tmp_path, clean_env):
    res = rendered["base"]
    with ServiceStack(tmp_path) as st:
        redis = st.redis()
        started = {}
        for role, d in baton_deployments(res).items():
            c = d["spec"]["template"]["spec"]["containers"][0]
            env = container_env(res, c, {"status.podIP": "127.0.0.1", "metadata.name": f"{role}-0"},
                                {"baton-secrets": {"internal-token": SECRETS["BATON_INTERNAL_TOKEN"],
                                                   "api-keys": SECRETS["BATON_API_KEYS"],
                                                   "redis-password": "redis-pw"}})
            env, ports = loopback(env, redis.url, tiny_qwen3)
            # the image's entrypoint is `baton`; the container gives its arguments
            child = launch(st.stack, role, [sys.executable, "-m", "baton.cli", *c["args"]], env)
            probe = c["readinessProbe"]["httpGet"]
            port = next(p["containerPort"] for p in c["ports"] if p["name"] == probe["port"])
            started[role] = (child, f"http://127.0.0.1:{ports[str(port)]}{probe['path']}")
        for child, url in started.values():
            wait_healthy(child, url)
        wait_registered(redis.url, 2)
        base = {n: url.rsplit("/", 1)[0] for n, (_, url) in started.items()}
        chat(base["router"], SECRETS["BATON_API_KEYS"])
        assert kv_pushed(base["decode"]) >= 1, "the prompt's KV did not come from the prefill pod"
