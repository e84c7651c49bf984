"""Pods under issue 14's hardening: graceful drain on SIGTERM, and a disaggregated stack in which
every internal call carries the shared token (router -> pods, decode pod -> prefill pod)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from baton.router.pod_client import PodChannels, PodConnections, PodFailed
from tests.stack import ServiceStack

pytestmark = pytest.mark.e2e

TOKEN = "peer-secret"
AUTH = {"X-Baton-Token": TOKEN}


def _generate(request_id: str, max_tokens: int) -> dict:
    return {"request_id": request_id, "prompt_token_ids": [5, 6, 7, 8],
            "sampling": {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}}


def test_sigterm_drains_running_generate(tiny_qwen3, tmp_path):
    with ServiceStack(tmp_path) as st:
        pod = st.pod("decode", tiny_qwen3, internal_token=TOKEN, drain_timeout_s=20, num_kv_blocks=256)
        with httpx.Client(timeout=30, headers=AUTH) as http, \
                http.stream("POST", pod.url + "/internal/generate", json=_generate("long", 600)) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            next(lines)  # generating

            code: list[int] = []
            t0 = time.monotonic()
            killer = threading.Thread(target=lambda: code.append(st.terminate(pod, timeout_s=25)))
            killer.start()
            time.sleep(0.3)
            refused = http.post(pod.url + "/internal/generate", json=_generate("late", 2))
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["type"] == "service_unavailable"
            assert pod.get("/ready").status_code == 503
            assert pod.get("/health").status_code == 200
            assert killer.is_alive()

            last = None
            for line in lines:
                if line.strip():
                    last = json.loads(line)
            assert last is not None and last["finish_reason"] == "length"
        killer.join(25)
        assert code == [0]
        assert time.monotonic() - t0 < 20


def test_sigterm_drains_a_channel_and_exits(tiny_qwen3, tmp_path):
    """A channel (all of a router's requests on one connection) under drain: its running request
    finishes, a new one on it is refused with a 503 frame, and the pod ends the channel itself
    once nothing is left on it, so it exits at once and not at uvicorn's shutdown timeout."""
    with ServiceStack(tmp_path) as st:
        pod = st.pod("decode", tiny_qwen3, internal_token=TOKEN, drain_timeout_s=20, num_kv_blocks=256)

        async def run() -> tuple[list[int], float]:
            conns = PodConnections(AUTH, 5.0)
            channels = PodChannels(conns)
            try:
                s = channels.stream(pod.url, _generate("long", 600))
                await s.open(30)
                assert (await s.next(30))["finish_reason"] is None
                code: list[int] = []
                t0 = time.monotonic()
                killer = threading.Thread(target=lambda: code.append(st.terminate(pod, timeout_s=40)))
                killer.start()
                await asyncio.sleep(0.3)
                late = channels.stream(pod.url, _generate("late", 2))
                await late.open(30)
                with pytest.raises(PodFailed) as refused:
                    await late.next(30)
                assert refused.value.status == 503
                await late.close()
                last = None
                while last is None or last["finish_reason"] is None:
                    last = await s.next(30)
                assert last["finish_reason"] == "length"
                await s.close()  # the router keeps its side of the channel open
                await asyncio.to_thread(killer.join, 40)
                return code, time.monotonic() - t0
            finally:
                channels.close()
                conns.close()

        code, took = asyncio.run(run())
        assert code == [0]
        assert took < 15  # uvicorn's graceful shutdown would have waited 30 s for an open channel


def test_disaggregated_stack_with_internal_token(tiny_qwen3, tmp_path):
    with ServiceStack(tmp_path) as st:
        redis = st.redis()
        common = {"redis_url": redis.url, "internal_token": TOKEN}
        kv = {"num_kv_blocks": 512}  # not the 1 GiB a tiny model's cache takes by default on a CPU
        with ThreadPoolExecutor(2) as ex:  # the two pods start in parallel: half the wait
            prefill_f = ex.submit(st.pod, "prefill", tiny_qwen3, **common, **kv)
            decode_f = ex.submit(st.pod, "decode", tiny_qwen3, role="decode", **common, **kv)
            prefill, decode = prefill_f.result(), decode_f.result()
        router = st.router(tiny_qwen3, **common)
        for pod in (prefill, decode):
            assert pod.get("/internal/state").status_code == 401
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=60)
        deadline = time.monotonic() + 20  # the router sees both pods through Redis
        while router.get("/ready").json().get("live_pods", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        prompt = "The prefill pod computes this prompt's KV and pushes it to the decode pod. " * 4
        out = client.completions.create(model=tiny_qwen3.name, prompt=prompt, max_tokens=4, temperature=0)
        assert out.choices[0].finish_reason == "length"
        # the decode pod took the KV from the prefill pod: its call carried the token
        stats = decode.get("/internal/transfer_stats", headers=AUTH).json()
        assert prefill.get("/internal/transfer_stats", headers=AUTH).status_code == 200
        assert stats["transfers_completed"] >= 1, stats
