"""Disaggregated serving when things break mid-transfer, end to end (router, prefill pod and
decode pod as processes, real UCX on loopback, real Redis).

A push is cut off halfway deterministically: once the decode pod has the first layers of a
long prompt (8 layers, pushed while the next ones compute), the prefill pod is frozen with
SIGSTOP; then the test kills a pod or drops the client, and SIGCONTs what should go on.
Afterwards every block, reservation, staging buffer and in-flight byte is back on both sides.
"""

from __future__ import annotations

import random
import threading
import time

import openai
import pytest

from baton import LLM, SamplingParams
from tests.prefill_service.disagg_cluster import (
    Cluster,
    RawStream,
    decode_idle,
    gauge,
    prefill_idle,
    resume,
    stop_prefill_mid_push,
    transfer_stats,
    wait_for,
)
from tests.stack import ServiceStack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

LAYERS = 8
LONG = 1500  # tokens: the prefill pod computes for about 2 s on 2 CPU cores
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def outcome(svc, name: str) -> float:
    return gauge(svc, f'baton_pod_kv_transfers_total{{outcome="{name}"}}')


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models("qwen3", num_layers=LAYERS, hidden_size=128)


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    with ServiceStack(tmp_path_factory.mktemp("faults")) as st:
        yield Cluster(st, model, prefill_block_size=16, decode_block_size=8)


@pytest.fixture(scope="module")
def oracle(model):
    llm = LLM(model)
    return lambda prompts, params=GREEDY: [o.text for o in llm.generate(prompts, params)]


def prompt_of(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2048) for _ in range(n)]


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
    before_d, before_p = transfer_stats(d), transfer_stats(p)
    generated = gauge(d, "baton_pod_generation_tokens_total")
    stream: list[RawStream] = []
    stop_prefill_mid_push(d, p, LAYERS, lambda: stream.append(
        RawStream(cluster.router, cluster.model.name, prompt_of(1, LONG), max_tokens=64)))
    assert not stream[0].received_anything()
    stream[0].close()  # the client goes away while the prefill pod is frozen mid-push
    # the decode pod lets go at once: no reservation, no block, no open request
    wait_for(lambda: decode_idle(d), "decode pod idle after the client left", timeout_s=10)
    resume(p)
    # the prefill pod learns of the cancel, stops pushing and frees its blocks and staging
    after_p = wait_for(lambda: prefill_idle(p), "prefill pod idle after the cancel", timeout_s=30)
    assert after_p["transfers_failed"] - before_p["transfers_failed"] == 1
    assert after_p["transfers_completed"] == before_p["transfers_completed"]
    time.sleep(0.5)  # layers already on the wire are drained and dropped, never scattered
    after_d = wait_for(lambda: decode_idle(d), "decode pod idle")
    assert after_d["transfers_completed"] == before_d["transfers_completed"]
    assert gauge(d, "baton_pod_generation_tokens_total") == generated  # nothing decoded for nobody
    # both pods serve on, exactly
    short = prompt_of(2, 60)
    assert cluster.complete(short, GREEDY)[0] == oracle([short])[0]
    assert transfer_stats(d)["transfers_completed"] == before_d["transfers_completed"] + 1


def test_decode_pod_killed_mid_transfer_prefill_pod_drops_the_push(cluster, oracle):
    d, p = cluster.decode(), cluster.prefill()
    cluster.wait_routable()
    before_p = transfer_stats(p)
    call = Call(cluster, prompt_of(3, LONG))
    stop_prefill_mid_push(d, p, LAYERS, call.start)
    cluster.kill(d)
    resume(p)
    # the prefill pod finishes the layer it was computing, finds the receiver gone, and frees all
    after_p = wait_for(lambda: prefill_idle(p), "prefill pod idle after its decode pod died", timeout_s=30)
    assert after_p["transfers_failed"] - before_p["transfers_failed"] == 1
    assert after_p["active_transfers"] == after_p["inflight_bytes"] == 0
    call.join(60)
    assert not call.is_alive()
    # the only decode pod died before the first token: the client gets an error it can read
    assert isinstance(call.error, openai.APIStatusError) and call.error.status_code in (502, 503), call.error
    # a new decode pod gets KV from the same prefill pod
    d2 = cluster.decode()
    cluster.wait_routable()
    short = prompt_of(4, 300)
    assert cluster.complete(short, GREEDY)[0] == oracle([short])[0]
    assert transfer_stats(d2)["outcome_ok"] == 1
    wait_for(lambda: decode_idle(d2), "new decode pod idle")
    wait_for(lambda: prefill_idle(p), "prefill pod idle")


def test_prefill_pod_killed_mid_push_never_decodes_from_partial_kv(cluster, oracle):
    prompt = prompt_of(5, LONG)
    want = oracle([prompt])[0]
    d, p = cluster.decode(), cluster.prefill()
    cluster.wait_routable()
    failed, ok = outcome(d, "failed"), outcome(d, "ok")
    generated = gauge(d, "baton_pod_generation_tokens_total")
    call = Call(cluster, prompt)
    stop_prefill_mid_push(d, p, LAYERS, call.start)
    time.sleep(0.3)
    # holding 2 of 8 layers, the decode pod waits: it has generated nothing, runs nothing
    assert gauge(d, "baton_pod_generation_tokens_total") == generated
    assert gauge(d, "baton_pod_running_requests") == 0 and call.is_alive()
    cluster.kill(p)
    call.join(90)
    assert call.error is None, call.error
    assert call.result[0] == want  # the decode pod dropped what arrived and prefilled itself
    assert (outcome(d, "failed") - failed, outcome(d, "ok") - ok) == (1, 0)
    wait_for(lambda: decode_idle(d), "decode pod idle after the fallback")


def test_no_live_prefill_pod_decode_pod_prefills_itself(cluster, oracle):
    d, p = cluster.decode(), cluster.prefill()
    cluster.wait_routable()
    prompts = [prompt_of(6, 3), prompt_of(7, 40), prompt_of(8, 200)]
    want = oracle(prompts)
    cluster.kill(p)
    # right away the registry may still name the dead pod: the decode pod's call to it fails
    # and it prefills itself
    assert cluster.complete(prompts[0], GREEDY)[0] == want[0]
    wait_for(lambda: not cluster.registered(p), "the dead prefill pod's heartbeat expired", timeout_s=15)
    time.sleep(0.5)  # > two refreshes of the router's pod table
    before = transfer_stats(d)
    counts = [outcome(d, o) for o in ("ok", "failed", "local_hit", "no_room")]
    assert [text for text, _ in cluster.complete_many(prompts[1:], [GREEDY] * 2)] == want[1:]
    # the router named no prefill pod: nothing was reserved for, or received from, one
    assert [outcome(d, o) for o in ("ok", "failed", "local_hit", "no_room")] == counts
    assert transfer_stats(d)["bytes_received"] == before["bytes_received"]
    wait_for(lambda: decode_idle(d), "decode pod idle")
