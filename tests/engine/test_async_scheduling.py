"""Async scheduling (step N+1 launched before step N's tokens are read) changes nothing a
request can see: same tokens, finish reasons, prefix-cache hashes and free blocks as the
engine that waits for every step, through eos, stop ids, sampling, preemption and aborts."""

from __future__ import annotations

import random

import pytest

from baton.engine.config import EngineConfig
from baton.engine.engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from baton.engine.sequence import PENDING
from baton.kvindex.hashing import block_hashes


def workload(vocab: int, seed: int):
    rng = random.Random(seed)
    reqs = []
    for i in range(12):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.choice([1, 5, 16, 33, 70, 150]))]
        if i % 4 == 3:  # sampled with a seed: runs ahead as greedy steps do
            params = SamplingParams(max_tokens=rng.randrange(1, 30), temperature=0.8, top_p=0.9, seed=i)
        else:
            params = SamplingParams(max_tokens=rng.randrange(1, 30), temperature=0)
        if i % 5 == 1:  # ends early on a stop id, maybe mid-flight
            params.stop_token_ids = [rng.randrange(3, vocab) for _ in range(400)]
        reqs.append((f"r{i}", prompt, params))
    return reqs


def drive(engine: LLMEngine, reqs, abort_after: dict[str, int] | None = None, stagger: bool = True):
    """Add requests over the first steps, abort some once they got a given number of tokens
    (the same tokens whether or not a step is in flight); outputs per request."""
    out: dict[str, list] = {rid: [] for rid, _, _ in reqs}
    reasons: dict[str, str] = {}
    pending = list(reqs)
    step = 0
    deferred = 0
    while pending or engine.has_unfinished_requests():
        for _ in range(2 if stagger else len(pending)):
            if pending:
                engine.add_request(*pending.pop(0))
        for o in engine.step():
            assert o.request_id not in reasons, f"{o.request_id} answered after it ended"
            out[o.request_id] += o.new_token_ids
            if o.finish_reason:
                reasons[o.request_id] = o.finish_reason
            elif len(out[o.request_id]) == (abort_after or {}).get(o.request_id):
                assert engine.abort_request(o.request_id)
                reasons[o.request_id] = "abort"
        deferred += engine._inflight is not None
        step += 1
    engine.block_manager.check_idle()
    for rid in out:
        assert PENDING not in out[rid]
    return out, reasons, deferred


@pytest.mark.parametrize("mode", [dict(), dict(num_kv_blocks=24, block_size=8), dict(max_num_batched_tokens=32)])
def test_async_equals_sync(tiny_qwen3, mode):
    runs = {}
    for async_ in (False, True):
        engine = LLMEngine(tiny_qwen3, EngineConfig(async_scheduling=async_, **mode))
        reqs = workload(2048, seed=3)
        out, reasons, deferred = drive(engine, reqs, abort_after={"r2": 3, "r8": 5})
        runs[async_] = (out, reasons, sorted(engine.cached_block_hashes()), engine.scheduler.num_preemptions)
        if async_:
            assert deferred > 5, "no step ran ahead"
        else:
            assert deferred == 0
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] == runs[False][1]
    # no placeholder ever hashed into the prefix cache: every cached block is one of the
    # requests' real tokens (which blocks stay cached depends on eviction timing)
    bs = EngineConfig(**mode).block_size
    real = {h for rid, prompt, _ in reqs for h in block_hashes(prompt + runs[True][0][rid], bs, engine.seed)}
    assert set(runs[True][2]) <= real and set(runs[False][2]) <= real
    if "num_kv_blocks" not in mode:  # nothing evicted: the same blocks
        assert runs[True][2] == runs[False][2]
    if "num_kv_blocks" in mode:
        assert runs[True][3] > 0  # the small cache did preempt


def test_tokens_of_sequences_match_their_outputs(tiny_qwen3):
    """Each sequence's token list ends with exactly its outputs: the dropped extra token of a
    sequence finished one step early never stays behind."""
    engine = LLMEngine(tiny_qwen3, EngineConfig())
    seqs = {}
    orig = engine._new_seq

    def keep(*a, **kw):
        seq = orig(*a, **kw)
        seqs[seq.request_id] = seq
        return seq

    engine._new_seq = keep
    out, reasons, _ = drive(engine, workload(2048, seed=9), stagger=False)
    for rid, seq in seqs.items():
        assert seq.output_token_ids == out[rid]
        assert reasons[rid] in ("stop", "length")
        if reasons[rid] == "length":
            assert len(out[rid]) == seq.params.max_tokens


@pytest.mark.parametrize("prefill_graphs", [False, True])
def test_split_mixed_steps_equal_one_pass(tiny_qwen3, prefill_graphs):
    """A step that decodes and prefills may run its decodes apart from its prompt chunks (on
    a GPU the decodes keep their CUDA graph), and prompt chunks may run padded to a token
    bucket (the prefill graphs' fixed inputs; on the CPU the same pass runs uncaptured): the
    same tokens, logprobs, penalties and logit_bias effects as one plain pass over the whole
    step, in every row order of the step."""
    runs = {}
    for split in (False, True):
        engine = LLMEngine(tiny_qwen3, EngineConfig(max_num_batched_tokens=48))
        engine.runner.split_mixed = split
        if split and prefill_graphs:
            engine.runner.use_prefill_passes()
            padded = []
            replay = engine.runner._replay_prefill
            engine.runner._replay_prefill = lambda *a, _r=replay: padded.append(_r(*a)) or padded[-1]
        reqs = workload(2048, seed=5)
        for i, (_, _, p) in enumerate(reqs):
            if i % 3 == 0:
                p.logprobs = 1 + i % 4  # several widths of top logprobs in one step
            if i % 4 == 1:  # strong penalties over many tokens: each missed count shows
                p.presence_penalty, p.frequency_penalty, p.max_tokens = 2.0, 2.0, 40
            if i == 6:
                p.logit_bias = {7: 5.0, 11: -100.0}
        splits = 0
        launch = engine.runner._launch_split

        def counted(*a, _launch=launch):
            nonlocal splits
            handle = _launch(*a)
            splits += handle is not None
            return handle

        engine.runner._launch_split = counted
        logprobs: dict[str, list] = {}
        orig_step = engine.step

        def step(_orig=orig_step):
            outs = _orig()
            for o in outs:
                logprobs.setdefault(o.request_id, []).extend(o.new_logprobs or [])
            return outs

        engine.step = step
        counted_tokens = []  # (penalty slot, token) of every count a penalised row got
        penalties = engine.runner.penalty_state()
        append = penalties.append

        def count(slots, tokens, _append=append):
            counted_tokens.extend(p for p in zip(slots.tolist(), tokens.tolist()) if p[0] != engine.runner.scratch_slot)
            return _append(slots, tokens)

        penalties.append = count
        out, reasons, _ = drive(engine, reqs)
        runs[split] = (out, reasons, logprobs, sorted(counted_tokens))
        if split:
            assert splits > 5, "no step was split"
            if prefill_graphs:
                assert sum(x is not None for x in padded) > 10, "no prompt chunk took a prefill graph's inputs"
        else:
            assert splits == 0
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] == runs[False][1]
    assert runs[True][3] == runs[False][3] and len(runs[True][3]) > 40  # every penalised token counted
    assert sum(len(rows) for rows in runs[True][2].values()) > 20  # logprobs were asked and given
    for rid, want in runs[False][2].items():
        got = runs[True][2][rid]
        assert [[t for t, _ in row] for row in got] == [[t for t, _ in row] for row in want]
        assert [v for row in got for _, v in row] == pytest.approx([v for row in want for _, v in row], abs=1e-4)

