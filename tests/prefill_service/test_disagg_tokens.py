"""Disaggregated serving end to end: router + prefill pod + decode pod as processes, real UCX on
loopback, real Redis. The tokens equal the colocated engine's (baton.LLM, itself equal to
transformers) with prefix hits on the prefill pod, on the decode pod, on both and on neither;
only the decode pod's missing tokens travel, and the bytes that land are the bytes the
prefill engine computed. The pods use different block sizes (prefill 16, decode 8)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from baton import SamplingParams
from tests.oracle import random_prompt
from tests.prefill_service.disagg_cluster import GREEDY, kv_bytes_per_token
from tests.stack import Service, free_port, wait_idle

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

HITS = "baton_pod_prefix_cache_hit_tokens_total"


@pytest.fixture(scope="module")
def model(tiny_qwen3):
    return tiny_qwen3


def test_each_kind_of_prefix_hit_moves_only_the_missing_tokens(cluster, oracle, tiny_qwen3):
    """One request at a time, so each one's bytes are its own: decode hits D and prefill hits P
    known in advance; decode bytes_received grows by exactly (len - D) tokens of KV, or by none
    when D covers all but the last token (the decode pod computes that one itself)."""
    rng = random.Random(11)
    per_token = kv_bytes_per_token(tiny_qwen3)
    p_only, d_only, both, d_more, unaligned = (random_prompt(rng, n) for n in (48, 48, 48, 64, 40))
    cluster.warm_prefill(p_only)
    cluster.warm_decode(d_only)
    cluster.warm_prefill(both)
    cluster.warm_decode(both)
    cluster.warm_prefill(d_more[:32])  # the decode pod holds more of this prefix than the prefill pod
    cluster.warm_decode(d_more)
    cluster.warm_prefill(unaligned)  # 40 tokens: 2 blocks of 16 there, 5 blocks of 8 here
    cluster.warm_decode(unaligned)
    cases = [  # (name, prompt, decode hits, prefill hits)
        ("neither", random_prompt(rng, 37), 0, 0),
        ("prefill", p_only + random_prompt(rng, 21), 0, 48),
        ("decode", d_only + random_prompt(rng, 30), 48, 0),
        ("both", both + random_prompt(rng, 9), 48, 48),
        ("decode more", d_more + random_prompt(rng, 50), 64, 32),
        ("unaligned", unaligned + random_prompt(rng, 70), 40, 32),
        ("all but the last token on the decode pod", d_only + [99], 48, None),  # nothing travels
        ("one token", [rng.randrange(3, 2048)], 0, None),
    ]
    want = oracle([c[1] for c in cases], [GREEDY] * len(cases))
    d, p = cluster.decode(), cluster.prefill()
    for (name, prompt, d_hits, p_hits), text in zip(cases, want):
        t0, h0, c0 = d.transfer_stats(), p.metric(HITS), p.transfer_stats()
        got, usage = cluster.complete(prompt, GREEDY)
        t1, h1, c1 = d.transfer_stats(), p.metric(HITS), p.transfer_stats()
        assert got == text, name
        assert usage.prompt_tokens_details.cached_tokens == d_hits, name
        moved = 0 if p_hits is None else len(prompt) - d_hits
        assert t1["bytes_received"] - t0["bytes_received"] == moved * per_token, name
        assert c1["bytes_sent"] - c0["bytes_sent"] == moved * per_token, name
        if p_hits is None:  # no prefill pod asked: the decode pod had all it needed
            assert t1.get("outcome_local_hit", 0) - t0.get("outcome_local_hit", 0) == 1, name
            assert h1 == h0, name
        else:
            assert t1["outcome_ok"] - t0.get("outcome_ok", 0) == 1, name
            assert h1 - h0 == p_hits, name
    assert d.transfer_stats().get("outcome_failed", 0) == 0
    wait_idle(d, p, timeout_s=20)


def test_concurrent_mixed_batch_equals_colocated(cluster, oracle, tiny_qwen3):
    """16 concurrent requests of mixed lengths (greedy and seeded), four kinds of prefix hit."""
    rng = random.Random(12)
    per_token = kv_bytes_per_token(tiny_qwen3)
    p_only, d_only, both = (random_prompt(rng, 64) for _ in range(3))
    cluster.warm_prefill(p_only)
    cluster.warm_decode(d_only)
    cluster.warm_prefill(both)
    cluster.warm_decode(both)
    lengths = [1, 5, 17, 40, 90, 130, 200, 2]
    prompts, groups = [], []
    for i, n in enumerate(lengths * 2):
        group = ("neither", "prefill", "decode", "both")[i % 4]
        prefix = {"neither": [], "prefill": p_only, "decode": d_only, "both": both}[group]
        prompts.append(prefix + random_prompt(rng, n))
        groups.append(group)
    params = [SamplingParams(max_tokens=6 + i % 5, temperature=0.8, seed=100 + i, ignore_eos=True) if i % 3 == 0
              else SamplingParams(max_tokens=6 + i % 5, temperature=0, ignore_eos=True) for i in range(len(prompts))]
    want = oracle(prompts, params)
    d, p = cluster.decode(), cluster.prefill()
    t0, h0 = d.transfer_stats(), p.metric(HITS)
    results = cluster.complete_many(prompts, params)
    t1, h1 = d.transfer_stats(), p.metric(HITS)
    assert [text for text, _ in results] == want
    cached = [u.prompt_tokens_details.cached_tokens for _, u in results]
    for g, c in zip(groups, cached):
        assert c >= (64 if g in ("decode", "both") else 0)
    # every byte that landed is one the decode pod lacked, whatever the batch's order was
    moved = [len(pr) - 1 > c for pr, c in zip(prompts, cached)]  # else the decode pod computes the last token
    assert t1["bytes_received"] - t0["bytes_received"] == sum(
        (len(pr) - c) * per_token for pr, c, m in zip(prompts, cached, moved) if m)
    assert t1.get("outcome_failed", 0) == t0.get("outcome_failed", 0)
    assert t1["outcome_ok"] - t0.get("outcome_ok", 0) == sum(moved)
    # each prefill-pod request of the prefill/both groups started from the 64 cached tokens
    assert h1 - h0 >= 64 * sum(m for g, m in zip(groups, moved) if g in ("prefill", "both"))
    wait_idle(d, p, timeout_s=20)


@pytest.fixture(scope="module")
def dump_pod(cluster, tiny_qwen3) -> Service:
    """A decode pod (block size 8, no Redis: the router never sees it) that can read its KV back."""
    port = free_port()
    script = Path(__file__).with_name("kv_dump_pod.py")
    argv = [str(script), "--model", str(tiny_qwen3), "--port", str(port), "--role", "decode",
            "--ucx-port", "0", "--block-size", "8", "--device", "cpu"]
    return cluster.st.spawn(f"kv-dump-decode-{port}", argv, port, "decode", timeout_s=120)


def offline_kv(model, tokens: list[int]) -> torch.Tensor:
    """[L, 2, n, Hkv, D]: the KV the prefill pod computes for `tokens` (one step, block size 16)."""
    from baton.engine.config import EngineConfig
    from baton.engine.engine import LLMEngine
    from baton.kernels import ops

    e = LLMEngine(model, EngineConfig(block_size=16))
    e.add_request("x", tokens, SamplingParams(max_tokens=2, temperature=0))
    seq = e.seqs["x"]
    e.step()  # the whole prompt in one step, as on the prefill pod; x stays alive, so do its blocks
    slots = e.runner.slots(seq, 0, len(tokens))
    return torch.stack([ops.gather_kv(e.runner.kv_cache[i], slots) for i in range(e.model_cfg.num_layers)])


def read_kv(pod: Service, tokens: list[int]) -> torch.Tensor:
    r = httpx.post(pod.url + "/test/prompt_kv", json={"prompt_token_ids": tokens}, timeout=30, trust_env=False)
    assert r.status_code == 200, r.status_code
    shape = tuple(int(x) for x in r.headers["x-shape"].split(","))
    return torch.from_numpy(np.frombuffer(r.content, dtype=np.float32).copy()).view(shape)


@pytest.mark.parametrize("decode_hits", [0, 40])
def test_bytes_that_land_equal_the_prefill_engines(cluster, dump_pod, tiny_qwen3, decode_hits):
    """The decode pod's cache, read back after the request, holds bit for bit the KV that the
    prefill engine computes, in its own (smaller) blocks; what it had cached stays its own."""
    rng = random.Random(20 + decode_hits)
    prompt = random_prompt(rng, 96)  # KV of 96 tokens: 12 blocks of 8 on the decode pod
    if decode_hits:
        body = {"request_id": "warm", "prompt_token_ids": prompt[:decode_hits] + [7],
                "sampling": {"max_tokens": 1, "temperature": 0}}
        assert httpx.post(dump_pod.url + "/internal/generate", json=body, timeout=60, trust_env=False).status_code == 200
    p = cluster.prefill()
    before = dump_pod.transfer_stats()
    body = {"request_id": f"kv-{decode_hits}", "prompt_token_ids": prompt, "prefill": {"url": p.url},
            "sampling": {"max_tokens": 2, "temperature": 0, "ignore_eos": True}}
    r = httpx.post(dump_pod.url + "/internal/generate", json=body, timeout=60, trust_env=False)
    assert r.status_code == 200 and '"finish_reason": "length"' in r.text, r.text
    after = dump_pod.transfer_stats()
    assert after["outcome_ok"] - before.get("outcome_ok", 0) == 1
    assert after["bytes_received"] - before["bytes_received"] == (96 - decode_hits) * kv_bytes_per_token(tiny_qwen3)
    got = read_kv(dump_pod, prompt[:96])
    want = offline_kv(tiny_qwen3, prompt[:96])
    assert got.shape == want.shape
    diff = (got[:, :, decode_hits:] - want[:, :, decode_hits:]).abs().max().item()
    assert torch.equal(got[:, :, decode_hits:], want[:, :, decode_hits:]), f"max |difference| {diff}"
    wait_idle(dump_pod, timeout_s=20)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True),
    SamplingParams(max_tokens=7, temperature=0.8, top_k=50, seed=21, logprobs=2, ignore_eos=True),
    SamplingParams(max_tokens=1, temperature=1.0, seed=4, logprobs=0),
], ids=["greedy", "seeded", "one-token"])
def test_first_token_from_the_prefill_pod_equals_colocated(cluster, tiny_qwen3, params):
    """The prefill pod samples the first token with the request's parameters and sends it with
    its logprobs (no sampler state: the randomness is a function of seed and position): every
    token id and logprob the decode pod streams
    equals the colocated engine's, to the bit."""
    from dataclasses import asdict

    from baton.engine.engine import LLMEngine

    prompt = random_prompt(30 + params.max_tokens, 50)
    e = LLMEngine(tiny_qwen3)
    e.add_request("x", prompt, params)
    want_ids, want_lps = [], []
    while e.has_unfinished_requests():
        for o in e.step():
            want_ids += o.new_token_ids
            want_lps += [[list(p) for p in lp] for lp in o.new_logprobs]
    d, p = cluster.decode(), cluster.prefill()
    before = d.transfer_stats()
    body = {"request_id": f"lp-{params.max_tokens}", "prompt_token_ids": prompt, "prefill": {"url": p.url},
            "sampling": asdict(params)}
    r = httpx.post(d.url + "/internal/generate", json=body, timeout=60, trust_env=False)
    assert r.status_code == 200, r.text
    lines = [json.loads(ln) for ln in r.text.splitlines() if ln]
    assert d.transfer_stats()["outcome_ok"] - before.get("outcome_ok", 0) == 1
    assert [t for ln in lines for t in ln["token_ids"]] == want_ids
    assert [lp for ln in lines for lp in ln["logprobs"]] == want_lps
    wait_idle(d, p, timeout_s=20)
