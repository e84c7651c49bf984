"""One contract, two engines: a pod on the real (tiny) model and a pod on the simulated
engine answer the same internal API the same way (issue 23). The router and the index only
ever see this surface, so a load test on sim pods exercises exactly what real pods serve.

Checked on both, with the same assertions: the registry record's fields, /ready and
/internal/state, the NDJSON stream's framing and finish reasons (and the same frames in
msgpack for a caller that asks for them, as the router does), prefix-cache hits reported
on a repeated prompt, KV events reaching the index in Redis, abort (by call and by a client
that goes away) freeing everything, and a bad request's OpenAI-shaped 400; and the same on a
channel (many requests on one connection, through the router's own client).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgpack
import pytest
import redis

from baton.kvindex import schema
from baton.kvindex.hashing import model_identity, model_seed
from baton.router.pod_client import PodChannels, PodConnections, PodFailed, PodRejected
from tests.stack import ServiceStack, index_hits, wait_for, wait_idle

pytestmark = pytest.mark.e2e

TOKEN = "contract-secret"
HEADERS = {"X-Baton-Token": TOKEN}
BLOCKS = 64  # both pods: the same cache size, so the same limits
PROMPT = list(range(5, 5 + 40))  # two full blocks of 16 and 8 tokens more


@pytest.fixture(scope="module")
def pods(tmp_path_factory, tiny_qwen3):
    with ServiceStack(tmp_path_factory.mktemp("contract")) as st:
        rs = st.redis()
        common = dict(redis_url=rs.url, internal_token=TOKEN, num_kv_blocks=BLOCKS, heartbeat_interval_s=0.1)
        with ThreadPoolExecutor(2) as ex:  # a start is mostly imports: both at once
            # the sim's steps take 10 ms: with free steps it ran a 1,000-token request to its
            # length limit before the abort tests' client could abort it or go away
            real, sim = ex.map(lambda kw: st.pod("decode", tiny_qwen3, **common, **kw),
                               ({}, {"engine": "sim", "sim_decode_step_s": 0.01}))
        yield {"real": real, "sim": sim, "redis": rs.url, "model": tiny_qwen3}


def _generate(pod, rid: str, prompt: list[int], **sampling) -> list[dict]:
    body = {"request_id": rid, "prompt_token_ids": prompt, "sampling": {"temperature": 0, **sampling}}
    r = httpx.post(pod.url + "/internal/generate", json=body, headers=HEADERS, timeout=60, trust_env=False)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in r.text.splitlines()]


@pytest.mark.parametrize("engine", ["real", "sim"])
def test_registration_record(pods, engine):
    pod = pods[engine]
    ready = pod.get("/ready").json()
    assert ready == {"status": "ready", "pod_id": ready["pod_id"], "role": "colocated", "block_size": 16,
                     "max_model_len": ready["max_model_len"]}
    r = redis.Redis.from_url(pods["redis"], socket_timeout=2)
    try:
        raw = wait_for(lambda: r.get(schema.pod_key(schema.DEFAULT_PREFIX, ready["pod_id"])), "heartbeat", 10)
    finally:
        r.close()
    rec = schema.PodRecord.from_json(raw, TOKEN)  # signed with the shared secret where pods sign
    assert (rec.pod_id, rec.role, rec.url, rec.block_size, rec.total_blocks) == (
        ready["pod_id"], "colocated", pod.url, 16, BLOCKS)
    assert rec.max_model_len == ready["max_model_len"] == pods["real"].get("/ready").json()["max_model_len"]
    assert rec.model == pods["model"].name
    # the same fields, whatever the engine
    other = pods["sim" if engine == "real" else "real"].get("/ready").json()["pod_id"]
    r = redis.Redis.from_url(pods["redis"], socket_timeout=2)
    try:
        other_raw = r.get(schema.pod_key(schema.DEFAULT_PREFIX, other))
    finally:
        r.close()
    assert set(json.loads(raw)) == set(json.loads(other_raw))


@pytest.mark.parametrize("engine", ["real", "sim"])
def test_state_shape(pods, engine):
    state = pods[engine].get("/internal/state", headers=HEADERS).json()
    assert set(state) == set(pods["real"].get("/internal/state", headers=HEADERS).json())
    assert state["total_blocks"] == BLOCKS and all(isinstance(v, int) for v in state.values())


@pytest.mark.parametrize("engine", ["real", "sim"])
def test_stream_framing_cache_hits_and_kv_events(pods, engine):
    pod = pods[engine]
    lines = _generate(pod, f"frame-{engine}", PROMPT, max_tokens=3, logprobs=1)
    # a line carries the tokens that were ready together (one or more); the last one ends it
    assert [x["finish_reason"] for x in lines] == [None] * (len(lines) - 1) + ["length"]
    tokens = [t for x in lines for t in x["token_ids"]]
    assert len(tokens) == 3 and all(x["token_ids"] for x in lines)
    for x in lines:
        assert set(x) == {"token_ids", "logprobs", "finish_reason", "num_cached_tokens", "num_prompt_tokens"}
        assert x["num_prompt_tokens"] == len(PROMPT)
        assert len(x["logprobs"]) == len(x["token_ids"])
        for tok, [(sampled, _), *top] in zip(x["token_ids"], x["logprobs"]):
            assert sampled == tok and len(top) == 1  # the sampled token's logprob, then the top one
    # the prompt's two full blocks are cached, published, and hit by the same prompt again
    seed = model_seed(model_identity(pods["model"]))
    pod_id = pod.pod_id()
    wait_for(lambda: index_hits(pods["redis"], seed, PROMPT).get(pod_id) == 2, "the prompt's blocks in the index", 10)
    again = _generate(pod, f"again-{engine}", PROMPT, max_tokens=3, logprobs=1)
    assert again[0]["num_cached_tokens"] == 32
    assert [t for x in again for t in x["token_ids"]] == tokens  # greedy: the same tokens


@pytest.mark.parametrize("engine", ["real", "sim"])
def test_msgpack_frames_when_asked(pods, engine):
    pod = pods[engine]
    body = {"request_id": f"mp-{engine}", "prompt_token_ids": PROMPT[:20],
            "sampling": {"temperature": 0, "max_tokens": 5, "logprobs": 1}}
    r = httpx.post(pod.url + "/internal/generate", json=body, headers=HEADERS | {"Accept": "application/x-msgpack"},
                   timeout=60, trust_env=False)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-msgpack"
    unpacker = msgpack.Unpacker()
    unpacker.feed(r.content)
    frames = list(unpacker)  # maps back to back
    assert unpacker.tell() == len(r.content)  # and nothing else
    lines = _generate(pod, f"nd-{engine}", PROMPT[:20], max_tokens=5, logprobs=1)
    assert [t for f in frames for t in f["token_ids"]] == [t for x in lines for t in x["token_ids"]]
    assert [f["finish_reason"] for f in frames] == [None] * (len(frames) - 1) + ["length"]
    for f in frames:
        assert set(f) == set(lines[0]) and len(f["logprobs"]) == len(f["token_ids"])
        assert all(isinstance(lp, float) for entry in f["logprobs"] for _, lp in entry)


@pytest.mark.parametrize("engine", ["real", "sim"])
def test_abort_frees_the_request(pods, engine):
    pod = pods[engine]
    body = {"request_id": f"abort-{engine}", "prompt_token_ids": [3, 4, 5],
            "sampling": {"temperature": 0, "max_tokens": 100000, "ignore_eos": True}}
    with httpx.stream("POST", pod.url + "/internal/generate", json=body, headers=HEADERS, timeout=30,
                      trust_env=False) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["finish_reason"] is None
        got = httpx.post(pod.url + "/internal/abort", json={"request_id": f"abort-{engine}"}, headers=HEADERS,
                         timeout=10, trust_env=False)
        assert got.json() == {"aborted": f"abort-{engine}"}
        wait_for(lambda: pod.get("/internal/state", headers=HEADERS).json()["running"] == 0, "aborted", 10)
    # a client that goes away mid-stream: the pod aborts the request itself
    body["request_id"] = f"gone-{engine}"
    with httpx.stream("POST", pod.url + "/internal/generate", json=body, headers=HEADERS, timeout=30,
                      trust_env=False) as r:
        assert json.loads(next(r.iter_lines()))["finish_reason"] is None
    wait_idle(pod, timeout_s=10)
    # counted when each stream's generator ends: an aborted stream's may end after the engine
    # has already let the request go (Starlette closes it once the client has gone)
    wait_for(lambda: pod.metric("baton_pod_requests_total", status="abort") >= 2, "both counted as aborts", 10)


@pytest.mark.parametrize("engine", ["real", "sim"])
def test_step_time_metric_by_kind(pods, engine):
    """baton_pod_engine_step_seconds: each step's time, by what it computed. A request alone is
    one prefill and decodes; a prompt arriving while another request decodes makes a mixed step."""
    pod = pods[engine]
    wait_idle(pod, timeout_s=10)

    def counts():
        return {k: pod.metric("baton_pod_engine_step_seconds_count", kind=k) for k in ("decode", "mixed", "prefill")}

    before = counts()
    _generate(pod, f"steps-{engine}", PROMPT[:20], max_tokens=12)
    wait_idle(pod, timeout_s=10)
    after = counts()
    # 11 gaps between 12 tokens (one more step may run: async scheduling drops its token)
    assert 11 <= after["decode"] - before["decode"] <= 12
    assert after["mixed"] == before["mixed"] and after["prefill"] == before["prefill"] + 1
    body = {"request_id": f"steps-long-{engine}", "prompt_token_ids": [3, 4, 5],
            "sampling": {"temperature": 0, "max_tokens": 100000, "ignore_eos": True}}
    with httpx.stream("POST", pod.url + "/internal/generate", json=body, headers=HEADERS, timeout=30,
                      trust_env=False) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the response, which aborts it
        assert json.loads(next(lines))["finish_reason"] is None  # it decodes now
        _generate(pod, f"steps-join-{engine}", PROMPT, max_tokens=2)
    wait_idle(pod, timeout_s=10)
    assert counts()["mixed"] >= after["mixed"] + 1
    text = pod.get("/metrics").text
    assert 'baton_pod_engine_step_seconds_bucket{kind="decode",le="0.004"}' in text


@pytest.mark.parametrize("engine", ["real", "sim"])
def test_bad_request_is_an_openai_error(pods, engine):
    body = {"request_id": "bad", "prompt_token_ids": [10**9], "sampling": {}}
    r = httpx.post(pods[engine].url + "/internal/generate", json=body, headers=HEADERS, timeout=10, trust_env=False)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "outside the vocabulary" in err["message"]


# -- channels: one connection for all of a router's requests (decode_service/streams.py) --------


async def _on_channel(pod, fn):
    """fn(channels) with the router's own channel client on `pod`; every connection closed after."""
    conns = PodConnections(HEADERS, 5.0)
    channels = PodChannels(conns)
    try:
        return await fn(channels)
    finally:
        channels.close()
        conns.close()
        await asyncio.sleep(0)


async def _frames(channels, url: str, rid: str, prompt: list[int], **sampling) -> list[dict]:
    s = channels.stream(url, {"request_id": rid, "prompt_token_ids": prompt,
                              "sampling": {"temperature": 0, **sampling}})
    await s.open(30)
    out = []
    try:
        while not out or out[-1].get("finish_reason") is None:
            out.append(await s.next(30))
    finally:
        await s.close()
    return out


@pytest.mark.parametrize("engine", ["real", "sim"])
def test_channel_carries_many_requests_token_exact(pods, engine):
    pod = pods[engine]
    prompts = [PROMPT[:20], PROMPT[3:30], list(range(100, 117))]
    alone = [[t for x in _generate(pod, f"alone-{engine}-{i}", p, max_tokens=6, logprobs=1) for t in x["token_ids"]]
             for i, p in enumerate(prompts)]

    async def run(channels):
        got = await asyncio.gather(*(_frames(channels, pod.url, f"ch-{engine}-{i}", p, max_tokens=6, logprobs=1)
                                     for i, p in enumerate(prompts)))
        return got, channels.pods.opened

    got, opened = asyncio.run(_on_channel(pod, run))
    assert opened == 1  # all three on one connection
    for frames, want in zip(got, alone):
        assert [t for f in frames for t in f["token_ids"]] == want  # greedy: as on a stream of its own
        assert [f["finish_reason"] for f in frames] == [None] * (len(frames) - 1) + ["length"]
        assert all(set(f) == {"token_ids", "logprobs", "finish_reason", "num_cached_tokens", "num_prompt_tokens"}
                   and len(f["logprobs"]) == len(f["token_ids"]) for f in frames)
    wait_idle(pod)


@pytest.mark.parametrize("engine", ["real", "sim"])
def test_channel_refuses_a_bad_request_alone(pods, engine):
    pod = pods[engine]

    async def run(channels):
        # int map keys on the wire (logit_bias), which msgpack refuses unless told
        good = asyncio.ensure_future(_frames(channels, pod.url, f"ok-{engine}", PROMPT[:10], max_tokens=4,
                                             logit_bias={7: 100}))
        bad = channels.stream(pod.url, {"request_id": f"bad-{engine}", "prompt_token_ids": [3, 4],
                                        "sampling": {"temperature": -1}})
        await bad.open(30)
        with pytest.raises(PodRejected) as e:
            await bad.next(30)
        await bad.close()
        return e.value, await good

    refused, frames = asyncio.run(_on_channel(pod, run))
    assert refused.status == 400 and "temperature" in refused.body["error"]["message"]
    assert refused.body["error"]["type"] == "invalid_request_error"
    tokens = [t for f in frames for t in f["token_ids"]]
    assert frames[-1]["finish_reason"] == "length" and len(tokens) == 4
    if engine == "real":  # the sim's tokens do not come from logits
        assert tokens == [7] * 4
    wait_idle(pod)


@pytest.mark.parametrize("engine", ["real", "sim"])
def test_channel_abort_and_loss_free_every_request(pods, engine):
    pod = pods[engine]
    aborts = pod.metric("baton_pod_requests_total", status="abort")
    long = {"temperature": 0, "max_tokens": 100000, "ignore_eos": True}

    async def run(channels):
        # closed before its end: the router sends an abort
        s = channels.stream(pod.url, {"request_id": f"cut-{engine}", "prompt_token_ids": [3, 4, 5], "sampling": long})
        await s.open(30)
        assert (await s.next(30))["finish_reason"] is None
        await s.close()
        await asyncio.to_thread(wait_for, lambda: pod.get("/internal/state", headers=HEADERS).json()["running"] == 0,
                                "aborted on the channel", 10)
        # the channel's connection breaks: every request still on it is aborted at the pod, and
        # fails at the router
        streams = [channels.stream(pod.url, {"request_id": f"lost-{engine}-{i}", "prompt_token_ids": [3, 4, 5 + i],
                                             "sampling": long}) for i in range(2)]
        for s in streams:
            await s.open(30)
            assert (await s.next(30))["finish_reason"] is None
        (ch,) = channels._open.values()
        ch.conn.close()
        for s in streams:
            with pytest.raises(PodFailed):
                while True:
                    await s.next(30)
            await s.close()

    asyncio.run(_on_channel(pod, run))
    wait_idle(pod, timeout_s=10)
    wait_for(lambda: pod.metric("baton_pod_requests_total", status="abort") >= aborts + 3, "three aborts counted", 10)
