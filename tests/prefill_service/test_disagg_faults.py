"""Disaggregated serving when things break mid-transfer, end to end (router, prefill pod and
decode pod as processes, real UCX on loopback, real Redis).

A push is cut off halfway deterministically: once the decode pod has the first layers of a
long prompt (8 layers, pushed while the next ones compute), the prefill pod is frozen with
SIGSTOP; then the test kills a pod or drops the client, and SIGCONTs what should go on.
Afterwards every block, reservation, staging buffer and in-flight byte is back on both sides.
"""

from __future__ import annotations

import threading
import time

import openai
import pytest

from baton import SamplingParams
from tests.oracle import random_prompt
from tests.prefill_service.disagg_cluster import (
    GREEDY,
    Cluster,
    RawStream,
    resume,
    stop_prefill_mid_push,
)
from tests.stack import wait_for, wait_idle

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

LAYERS = 8
LONG = 1500  # tokens: the prefill pod computes for about 2 s on 2 CPU cores


def outcome(svc, name: str) -> float:
    return svc.metric("baton_pod_kv_transfers_total", outcome=name)


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models("qwen3", num_layers=LAYERS, hidden_size=128)


class Call(threading.Thread):
    """cluster.complete() on a thread; .result or .error once joined."""

    def __init__(self, cluster: Cluster, prompt: list[int], params: SamplingParams = GREEDY):
        super().__init__(daemon=True)
        self.cluster, self.prompt, self.params = cluster, prompt, params
        self.result = self.error = None

    def run(self):
        try:
            self.result = self.cluster.complete(self.prompt, self.params)
        except Exception as e:  # noqa: BLE001 -- the test inspects it
            self.error = e


def test_client_abort_mid_transfer_frees_both_pods(cluster, oracle):
    d, p = cluster.decode(), cluster.prefill()
    cluster.wait_routable()
    before_d, before_p = d.transfer_stats(), p.transfer_stats()
    generated = d.metric("baton_pod_generation_tokens_total")
    stream: list[RawStream] = []
    stop_prefill_mid_push(d, p, LAYERS, lambda: stream.append(
        RawStream(cluster.router, cluster.model.name, random_prompt(1, LONG), max_tokens=64)))
    assert not stream[0].received_anything()
    stream[0].close()  # the client goes away while the prefill pod is frozen mid-push
    try:
        # the decode pod lets go at once: no reservation, no block, no open request. A payload
        # the sender was frozen in the middle of keeps its posted receive and staging buffer
        # (the stop can land between a layer's header and its bytes) until the sender goes on
        # or its connection dies: drained below, after the resume
        wait_idle(d, timeout_s=10, allow=("pending_recvs", "staging_bytes_in_use"))
    finally:
        resume(p)  # a failure here must not leave the prefill pod stopped for the next tests
    # the prefill pod learns of the cancel, stops pushing and frees its blocks and staging
    wait_idle(p, timeout_s=30)
    after_p = p.transfer_stats()
    assert after_p["transfers_failed"] - before_p["transfers_failed"] == 1
    assert after_p["transfers_completed"] == before_p["transfers_completed"]
    time.sleep(0.5)  # layers already on the wire are drained and dropped, never scattered
    wait_idle(d, timeout_s=20)
    after_d = d.transfer_stats()
    assert after_d["transfers_completed"] == before_d["transfers_completed"]
    assert d.metric("baton_pod_generation_tokens_total") == generated  # nothing decoded for nobody
    # both pods serve on, exactly
    short = random_prompt(2, 60)
    assert cluster.complete(short, GREEDY)[0] == oracle([short])[0]
    assert d.transfer_stats()["transfers_completed"] == before_d["transfers_completed"] + 1


def test_decode_pod_killed_mid_transfer_prefill_pod_drops_the_push(cluster, oracle):
    d, p = cluster.decode(), cluster.prefill()
    cluster.wait_routable()
    before_p = p.transfer_stats()
    call = Call(cluster, random_prompt(3, LONG))
    stop_prefill_mid_push(d, p, LAYERS, call.start)
    cluster.kill(d)
    resume(p)
    # the prefill pod finishes the layer it was computing, finds the receiver gone, and frees all
    wait_idle(p, timeout_s=30)
    after_p = p.transfer_stats()
    assert after_p["transfers_failed"] - before_p["transfers_failed"] == 1
    assert after_p["active_transfers"] == after_p["inflight_bytes"] == 0
    call.join(60)
    assert not call.is_alive()
    # the only decode pod died before the first token: the client gets an error it can read
    assert isinstance(call.error, openai.APIStatusError) and call.error.status_code in (502, 503), call.error
    # a new decode pod gets KV from the same prefill pod
    d2 = cluster.decode()
    cluster.wait_routable()
    short = random_prompt(4, 300)
    assert cluster.complete(short, GREEDY)[0] == oracle([short])[0]
    assert d2.transfer_stats()["outcome_ok"] == 1
    wait_idle(d2, p, timeout_s=20)


def test_prefill_pod_killed_mid_push_never_decodes_from_partial_kv(cluster, oracle):
    prompt = random_prompt(5, LONG)
    want = oracle([prompt])[0]
    d, p = cluster.decode(), cluster.prefill()
    cluster.wait_routable()
    failed, ok = outcome(d, "failed"), outcome(d, "ok")
    generated = d.metric("baton_pod_generation_tokens_total")
    call = Call(cluster, prompt)
    stop_prefill_mid_push(d, p, LAYERS, call.start)
    time.sleep(0.3)
    # holding 2 of 8 layers, the decode pod waits: it has generated nothing, runs nothing
    assert d.metric("baton_pod_generation_tokens_total") == generated
    assert d.metric("baton_pod_running_requests") == 0 and call.is_alive()
    cluster.kill(p)
    call.join(90)
    assert call.error is None, call.error
    assert call.result[0] == want  # the decode pod dropped what arrived and prefilled itself
    assert (outcome(d, "failed") - failed, outcome(d, "ok") - ok) == (1, 0)
    wait_idle(d, timeout_s=20)


def test_no_live_prefill_pod_decode_pod_prefills_itself(cluster, oracle):
    d, p = cluster.decode(), cluster.prefill()
    cluster.wait_routable()
    prompts = [random_prompt(6, 3), random_prompt(7, 40), random_prompt(8, 200)]
    want = oracle(prompts)
    cluster.kill(p)
    # right away the registry may still name the dead pod: the decode pod's call to it fails
    # and it prefills itself
    assert cluster.complete(prompts[0], GREEDY)[0] == want[0]
    wait_for(lambda: not cluster.registered(p), "the dead prefill pod's heartbeat expired", timeout_s=15)
    time.sleep(0.5)  # > two refreshes of the router's pod table
    before = d.transfer_stats()
    counts = [outcome(d, o) for o in ("ok", "failed", "local_hit", "no_room")]
    assert [text for text, _ in cluster.complete_many(prompts[1:], [GREEDY] * 2)] == want[1:]
    # the router named no prefill pod: nothing was reserved for, or received from, one
    assert [outcome(d, o) for o in ("ok", "failed", "local_hit", "no_room")] == counts
    assert d.transfer_stats()["bytes_received"] == before["bytes_received"]
    wait_idle(d, timeout_s=20)
