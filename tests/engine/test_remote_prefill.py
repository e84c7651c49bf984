"""Disaggregation inside the engine, without the network: a prefill engine's KV moved
layer by layer into a decode engine (other block size, own prefix hits) gives exactly
the colocated tokens, and the moved bytes equal what the decode engine computes itself."""

from __future__ import annotations

import random

import pytest
import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import FirstToken, LLMEngine
from baton.engine.sampling_params import SamplingParams
from baton.kernels import ops


def drain(engine: LLMEngine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


class Recorder:
    """A prefill engine's KVPush that keeps what it is given."""

    def __init__(self):
        self.layers: dict[int, torch.Tensor] = {}
        self.firsts: list[FirstToken] = []

    def push_layer(self, request_id: str, layer: int, kv: torch.Tensor) -> None:
        self.layers[layer] = kv.clone()

    def first_token(self, request_id: str, first: FirstToken) -> None:
        self.firsts.append(first)


class Forward:
    """A prefill engine's KVPush that writes each layer straight into a decode engine."""

    def __init__(self, decode: LLMEngine):
        self.decode = decode

    def push_layer(self, request_id: str, layer: int, kv: torch.Tensor) -> None:
        assert self.decode.receive_layer(request_id, layer, kv) is None  # CPU: written on return

    def first_token(self, request_id: str, first: FirstToken) -> None:
        pass


def prefill_remotely(p: LLMEngine, d: LLMEngine, rid: str, prompt: list[int], params: SamplingParams):
    """Reserve on d, prefill on p, scatter each pushed layer into d. Returns the reservation
    and the FirstToken p sampled (None when nothing travels)."""
    res = d.reserve_remote(rid, prompt, params)
    assert res is not None and res.end == len(prompt)
    if res.end - res.start == 1:  # the decode pod holds all but the last token: nothing travels
        return res, None
    layers, firsts = p.kv_push.layers, p.kv_push.firsts  # p's Recorder
    layers.clear()
    firsts.clear()
    p.add_request(rid, prompt, params, prefill_only=True, kv_start=res.start)
    outs = drain(p)
    assert len(firsts) == 1 and outs == {rid: [firsts[0].token]}  # one token, sampled on the prefill side
    assert sorted(layers) == list(range(p.model_cfg.num_layers))
    for layer, kv in layers.items():
        assert kv.shape[1] == res.end - res.start
        assert d.receive_layer(rid, layer, kv) is None
    return res, firsts[0]


def transfer(p: LLMEngine, d: LLMEngine, rid: str, prompt: list[int], params: SamplingParams) -> tuple[int, list[int]]:
    """prefill_remotely, then d takes the first token. Returns (tokens moved, tokens so far)."""
    res, first = prefill_remotely(p, d, rid, prompt, params)
    if first is None:
        assert d.complete_remote(rid) == []
        return 0, []
    [out] = d.complete_remote(rid, first)
    assert out.new_token_ids == [first.token] and out.finish_reason is None
    return res.end - res.start, [first.token]


@pytest.mark.parametrize("seeded", [False, True])
def test_disaggregated_equals_colocated(tiny_qwen3, seeded):
    rng = random.Random(1)
    system = [rng.randrange(3, 2048) for _ in range(40)]
    prompts = [system + [rng.randrange(3, 2048) for _ in range(n)] for n in (1, 9, 60, 130)]
    params = SamplingParams(max_tokens=12, temperature=0.8 if seeded else 0, seed=7, ignore_eos=True)

    colo = LLMEngine(tiny_qwen3, EngineConfig(block_size=16))
    for i, pr in enumerate(prompts):
        colo.add_request(f"r{i}", pr, params)
    want = drain(colo)

    p = LLMEngine(tiny_qwen3, EngineConfig(block_size=16, max_num_batched_tokens=48), Recorder())  # chunked on P
    d = LLMEngine(tiny_qwen3, EngineConfig(block_size=8))  # other block size and ids on D
    # D already holds the system prompt: only the rest travels
    d.add_request("warm", system + [5], SamplingParams(max_tokens=1, temperature=0))
    drain(d)
    done = {f"r{i}": transfer(p, d, f"r{i}", pr, params) for i, pr in enumerate(prompts)}
    # 40 = the system prompt, 5 blocks of 8; a prompt of 41 tokens leaves D one to compute
    assert [m for m, _ in done.values()] == [0 if len(pr) == 41 else len(pr) - 40 for pr in prompts]
    rest = drain(d)
    assert {rid: first + rest[rid] for rid, (_, first) in done.items()} == want
    p.block_manager.check_idle()
    d.block_manager.check_idle()


def test_moved_bytes_equal_local_kv(tiny_qwen3):
    prompt = [random.Random(2).randrange(3, 2048) for _ in range(77)]
    params = SamplingParams(max_tokens=1, temperature=0)
    d = LLMEngine(tiny_qwen3, EngineConfig(block_size=4, enable_prefix_caching=False))
    p = LLMEngine(tiny_qwen3, EngineConfig(block_size=16), kv_push=Forward(d))
    res = d.reserve_remote("x", prompt, params)
    p.add_request("x", prompt, params, prefill_only=True, kv_start=res.start)
    drain(p)
    got = torch.stack([ops.gather_kv(d.runner.kv_cache[l], res.slots) for l in range(d.model_cfg.num_layers)])
    d.abort_request("x")
    # the decode pod computes the same prompt itself
    d.add_request("y", prompt, SamplingParams(max_tokens=2, temperature=0))
    seq = d.seqs["y"]
    d.step()  # the whole prompt in one step; y stays alive, so its blocks stay put
    slots = d.runner.slots(seq, 0, res.end)
    mine = torch.stack([ops.gather_kv(d.runner.kv_cache[l], slots) for l in range(d.model_cfg.num_layers)])
    assert torch.equal(got, mine)


def test_failed_transfer_falls_back_to_local_prefill(tiny_qwen3):
    prompt = [random.Random(3).randrange(3, 2048) for _ in range(50)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    colo = LLMEngine(tiny_qwen3)
    colo.add_request("a", prompt, params)
    want = drain(colo)["a"]
    d = LLMEngine(tiny_qwen3, EngineConfig(block_size=16))
    res = d.reserve_remote("a", prompt, params)
    # half the layers arrive, as garbage, then the prefill pod dies
    d.receive_layer("a", 0, torch.randn(2, res.end - res.start, 2, 32))
    assert d.stats().receiving == 1
    assert d.fallback_local("a")
    assert drain(d)["a"] == want  # nothing that arrived was used
    d.block_manager.check_idle()
    assert d.block_manager.num_cached_blocks == len(prompt + want) // 16


def test_abort_while_receiving_frees_blocks(tiny_qwen3):
    d = LLMEngine(tiny_qwen3)
    d.reserve_remote("a", list(range(3, 100)), SamplingParams(max_tokens=4))
    assert d.stats().free_blocks < d.stats().total_blocks
    assert d.abort_request("a")
    assert not d.complete_remote("a")  # a late completion finds nothing
    d.block_manager.check_idle()


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=1, temperature=0, logprobs=3),
    SamplingParams(max_tokens=1, temperature=0.9, seed=11, logprobs=0),
])
def test_first_token_from_the_prefill_side_can_end_the_request(tiny_qwen3, params):
    """max_tokens 1: the prefill side's token is the whole answer, with the colocated
    logprobs, and the decode side frees everything at once."""
    prompt = [random.Random(4).randrange(3, 2048) for _ in range(37)]
    colo = LLMEngine(tiny_qwen3)
    colo.add_request("a", prompt, params)
    want = []
    while colo.has_unfinished_requests():  # with async scheduling, the next call returns it
        want += colo.step()
    [want] = want
    p, d = LLMEngine(tiny_qwen3, kv_push=Recorder()), LLMEngine(tiny_qwen3, EngineConfig(block_size=8))
    _, first = prefill_remotely(p, d, "a", prompt, params)
    [out] = d.complete_remote("a", first)
    assert (out.new_token_ids, out.new_logprobs, out.finish_reason) == (
        want.new_token_ids, want.new_logprobs, "length")
    assert not d.has_unfinished_requests()
    d.block_manager.check_idle()
    p.block_manager.check_idle()


def test_a_first_token_that_cannot_go_on_here_falls_back(tiny_qwen3):
    """A sampled request whose DONE carries a token outside the vocabulary is not continued
    from it: the decode side prefills itself and still gives the colocated tokens."""
    prompt = [random.Random(5).randrange(3, 2048) for _ in range(45)]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    colo = LLMEngine(tiny_qwen3)
    colo.add_request("a", prompt, params)
    want = drain(colo)["a"]
    p, d = LLMEngine(tiny_qwen3, kv_push=Recorder()), LLMEngine(tiny_qwen3)
    _, first = prefill_remotely(p, d, "a", prompt, params)
    assert d.complete_remote("a", FirstToken(10**9, first.logprobs)) is None
    assert d.fallback_local("a")
    assert drain(d)["a"] == want
    d.block_manager.check_idle()
