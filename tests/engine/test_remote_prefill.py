"""Disaggregation inside the engine, without the network: a prefill engine's KV moved
layer by layer into a decode engine (other block size, own prefix hits) gives exactly
the colocated tokens, and the moved bytes equal what the decode engine computes itself."""

from __future__ import annotations

import random

import pytest
import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from baton.kernels import ops


def drain(engine: LLMEngine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def transfer(p: LLMEngine, d: LLMEngine, rid: str, prompt: list[int], params: SamplingParams) -> int:
    """Reserve on d, prefill on p, scatter each pushed layer into d. Returns tokens moved."""
    res = d.reserve_remote(rid, prompt, params)
    assert res is not None
    if res.start == res.end:  # the decode pod holds all but the last token: nothing travels
        assert d.complete_remote(rid)
        return 0
    layers: dict[int, torch.Tensor] = {}
    p.kv_sink = lambda r, layer, kv: layers.__setitem__(layer, kv.clone())
    p.add_request(rid, prompt[: res.end], params, prefill_only=True, kv_start=res.start)
    outs = drain(p)
    assert outs == {rid: []}  # prefilled, nothing sampled on the prefill side
    assert sorted(layers) == list(range(p.model_cfg.num_layers))
    for layer, kv in layers.items():
        assert kv.shape[1] == res.end - res.start
        ops.scatter_kv(kv, d.runner.kv_cache[layer], res.slots)
    assert d.complete_remote(rid)
    return res.end - res.start


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

    p = LLMEngine(tiny_qwen3, EngineConfig(block_size=16, max_num_batched_tokens=48))  # chunked on P
    d = LLMEngine(tiny_qwen3, EngineConfig(block_size=8))  # other block size and ids on D
    # D already holds the system prompt: only the rest travels
    d.add_request("warm", system + [5], SamplingParams(max_tokens=1, temperature=0))
    drain(d)
    moved = [transfer(p, d, f"r{i}", pr, params) for i, pr in enumerate(prompts)]
    assert moved == [len(pr) - 1 - 40 for pr in prompts]  # 40 = the system prompt, 5 blocks of 8
    assert drain(d) == want
    p.block_manager.check_idle()
    d.block_manager.check_idle()


def test_moved_bytes_equal_local_kv(tiny_qwen3):
    prompt = [random.Random(2).randrange(3, 2048) for _ in range(77)]
    params = SamplingParams(max_tokens=1, temperature=0)
    p = LLMEngine(tiny_qwen3, EngineConfig(block_size=16))
    d = LLMEngine(tiny_qwen3, EngineConfig(block_size=4, enable_prefix_caching=False))
    res = d.reserve_remote("x", prompt, params)
    p.kv_sink = lambda r, layer, kv: ops.scatter_kv(kv, d.runner.kv_cache[layer], res.slots)
    p.add_request("x", prompt[: res.end], params, prefill_only=True, kv_start=res.start)
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
    ops.scatter_kv(torch.randn(2, res.end - res.start, 2, 32), d.runner.kv_cache[0], res.slots)
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
