"""The simulated engine alone (no sockets): the real engine's state, deterministic tokens,
a prefix cache of the set size with LRU eviction, and the timing model's accounting."""

from __future__ import annotations

import pytest

from baton.engine.engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from baton.kvindex.hashing import block_hashes
from baton.sim.config import SimConfig
from baton.sim.engine import SimEngine


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    cached: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
            cached[o.request_id] = o.num_cached_tokens
    run.cached = cached
    return out


@pytest.fixture(scope="module")
def model(tiny_qwen3):
    return tiny_qwen3


def test_the_sim_sets_every_field_the_real_engine_has(model):
    # SimEngine builds LLMEngine's state itself (without loading a model): a field the real
    # engine gains must be added there too, or the sim breaks at its first use
    real = LLMEngine(model)
    sim = SimEngine(model)
    assert set(vars(real)) <= set(vars(sim))
    assert (sim.model_cfg.vocab_size, sim.model_cfg.eos_token_ids) == (
        real.model_cfg.vocab_size, real.model_cfg.eos_token_ids)
    # what the pods read of the runner (the KV hand-off's shapes and dtype, the cache's size)
    for name in ("device", "dtype", "kv_dtype", "num_blocks", "block_size"):
        assert type(getattr(sim.runner, name)) is type(getattr(real.runner, name)), name
    assert sim.runner.kv_cache.dtype == sim.runner.kv_dtype


def test_tokens_are_a_function_of_prompt_and_seed(model):
    e = SimEngine(model)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    seeded = SamplingParams(max_tokens=6, temperature=1.0, seed=7)
    p, q = [5, 6, 7, 8], [5, 6, 7, 9]
    out = run(e, {"a": (p, greedy), "b": (p, greedy), "c": (p, seeded), "d": (q, greedy)})
    assert out["a"] == out["b"] == [1488, 252, 1044, 773, 1440, 1449]  # pinned: benchmarks compare runs
    assert out["c"] != out["a"] and out["d"] != out["a"]
    assert len(set(out["c"])) == 6 and not set(sum(out.values(), [])) & set(e.model_cfg.eos_token_ids)
    # the same request again, on another engine: the same tokens
    assert run(SimEngine(model), {"c": (p, seeded)})["c"] == out["c"]


def test_prefix_cache_of_the_set_size_evicts_least_recently_used(model):
    e = SimEngine(model, _config(num_kv_blocks=8))
    one = SamplingParams(max_tokens=1, temperature=0)
    prompts = {k: [i] * 33 for i, k in enumerate("abcd", start=3)}  # two full blocks each, and one token
    run(e, {"a": (prompts["a"], one)})
    run(e, {"b": (prompts["b"], one)})
    run(e, {"c": (prompts["c"], one)})  # 6 of 8 blocks hold a's, b's and c's prompts
    e.drain_kv_events()
    run(e, {"a2": (prompts["a"], one)})  # a is used again: b is now the least recent
    assert run.cached["a2"] == 32
    run(e, {"d": (prompts["d"], one)})  # needs 3 blocks: 2 free ones and b's oldest
    ev = e.drain_kv_events()
    assert len(ev.stored) == 2 and len(ev.removed) == 1
    assert set(ev.removed) < set(block_hashes(prompts["b"], 16, e.seed))
    assert e.stats().cached_blocks == 7 and e.stats().total_blocks == 8
    run(e, {"a3": (prompts["a"], one), "c2": (prompts["c"], one)})
    assert run.cached == {"a3": 32, "c2": 32}


def test_timing_model(model):
    sim = SimConfig(engine="sim", sim_prefill_tokens_per_s=1000, sim_decode_step_s=0.004,
                    sim_decode_per_seq_s=0.001, sim_decode_per_kctx_s=0.01)
    assert sim.step_seconds(500, 0, 0) == 0.5
    assert sim.step_seconds(0, 2, 3000) == pytest.approx(0.004 + 0.002 + 0.03)
    assert SimConfig().step_seconds(8000, 64, 10**6) == 0.0  # all zero: no time
    # (without async scheduling: with it, as on a GPU, the step after the last token also runs)
    e = SimEngine(model, _config(async_scheduling=False), sim=sim)
    run(e, {"a": ([1] * 10, SamplingParams(max_tokens=3, temperature=0))})
    # prefill of 10 tokens, then two decode steps of one sequence at context 11 and 12
    want = 0.01 + 2 * (0.004 + 0.001) + 0.01 * (11 + 12) / 1000
    assert e.runner.steps_slept == pytest.approx(want)


def test_structured_output_is_refused(model):
    with pytest.raises(ValueError, match="not supported by the simulated engine"):
        SimEngine(model).validate([1, 2], SamplingParams(structured_output={"type": "json_object"}))


def _config(**kw):
    from baton.engine.config import EngineConfig

    return EngineConfig(**kw)
