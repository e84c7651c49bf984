"""Structured outputs in the engine (baton/engine/grammar.py): the grammar's bitmask allows
exactly the tokens it should, outputs obey their grammar and end with "stop" when it ends,
and async scheduling, chunked prefill, preemption and disaggregation change no token."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from baton.engine.config import EngineConfig
from baton.engine.engine import LLMEngine
from baton.engine.grammar import Grammars, bitmask_words
from baton.kernels.sampling_reference import apply_bitmask
from baton.engine.sampling_params import SamplingParams
from baton.engine.tokenizer import Tokenizer
from tests.engine.test_async_scheduling import drive
from tests.engine.test_remote_prefill import Recorder, drain, transfer

WORDS = ("yes", "no", "maybe")
CHOICE = {"type": "regex", "pattern": "(yes|no|maybe)"}
DIGITS = {"type": "ebnf", "grammar": 'root ::= "[" d ("," d)? ("," d)? "]"\nd ::= [0-9]'}
SCHEMA = {  # an enum, an array, a nested object, all required; short keys: few steps
    "type": "object",
    "properties": {
        "n": {"type": "string", "maxLength": 3},
        "c": {"enum": ["red", "green"]},
        "t": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2},
        "s": {"type": "object", "properties": {"w": {"type": "boolean"}}, "required": ["w"]},
    },
    "required": ["n", "c", "t", "s"],
}
JSON = {"type": "json_schema", "schema": SCHEMA, "strict": True}


def obeys(out: str, spec: dict) -> bool:
    if spec["type"] == "regex":
        return re.fullmatch(spec["pattern"], out) is not None
    if spec["type"] == "ebnf":
        return re.fullmatch(r"\[[0-9](,[0-9]){0,2}\]", out) is not None
    v = json.loads(out)
    return (list(v) == ["n", "c", "t", "s"] and isinstance(v["n"], str) and len(v["n"]) <= 3
            and v["c"] in ("red", "green") and len(v["t"]) <= 2
            and all(isinstance(t, int) and 0 <= t <= 9 for t in v["t"]) and list(v["s"]) == ["w"]
            and isinstance(v["s"]["w"], bool))


def workload(seed: int):
    """Grammar rows (greedy and seeded) beside a free row, prompts of several lengths."""
    rng = random.Random(seed)
    specs = [(CHOICE, 0.0), (DIGITS, 1.0), (JSON, 0.0), (None, 1.0), (CHOICE, 1.5), (CHOICE, 1.5)]
    reqs = []
    for i, (spec, temp) in enumerate(specs):
        prompt = [rng.randrange(3, 2048) for _ in range(rng.choice([3, 17, 40, 70]))]
        params = SamplingParams(max_tokens=48 if spec else 12, temperature=temp, seed=i, structured_output=spec)
        reqs.append((f"r{i}", prompt, params))
    return reqs


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    return Tokenizer(tiny_qwen3)


def test_bitmask_allows_exactly_the_grammars_tokens(tiny_qwen3, tok):
    # the logits are wider than the tokenizer's vocabulary (lm_head padding): never allowed
    V = tok.vocab_size + 40
    g = Grammars(tiny_qwen3, V, [0]).new_state(CHOICE)
    mask = torch.full((2, bitmask_words(V)), -1, dtype=torch.int32)
    g.fill(mask, 1)
    logits = torch.zeros(2, V)
    apply_bitmask(logits, mask)
    assert torch.all(logits[0] == 0)  # an all-ones row is untouched
    allowed = set(torch.nonzero(logits[1] == 0).flatten().tolist())
    want = {i for i in range(tok.vocab_size)
            if (s := tok.decode([i], skip_special_tokens=False)) and any(w.startswith(s) for w in WORDS)}
    assert allowed == want and all(i < tok.vocab_size for i in allowed)
    # after "ye" only "s" (and tokens starting with it) remain; at the end, only the stop token
    ye = tok.encode("ye", add_special_tokens=False)
    assert g.sync(ye) and not g.terminated
    assert g.sync(ye + tok.encode("s", add_special_tokens=False)) and not g.terminated
    g.fill(mask, 1)
    logits = torch.zeros(2, V)
    apply_bitmask(logits, mask)
    assert torch.nonzero(logits[1] == 0).flatten().tolist() == [0]
    # a shorter token list than accepted rebuilds the matcher; a token outside it is refused
    assert g.sync(tok.encode("n", add_special_tokens=False))
    assert not g.sync(tok.encode("nx", add_special_tokens=False)) and g.rejected is not None


@pytest.mark.parametrize("mode", [dict(), dict(num_kv_blocks=12, block_size=8, max_num_batched_tokens=16)],
                         ids=["plain", "preempting-chunked"])
def test_outputs_obey_under_async_scheduling_and_preemption(tiny_qwen3, tok, mode):
    """Each grammar row's output obeys its grammar and ends on the stop token with "stop"; the
    same tokens with async scheduling as without, and with preemption and chunked prefill as
    without. Step t+1's bitmask needs step t's token: under async scheduling the engine reads
    it back before it samples t+1 (a bitmask from the matcher's state before t would let a
    token the grammar forbids through: the request would fail)."""
    runs = {}
    for async_ in (False, True):
        engine = LLMEngine(tiny_qwen3, EngineConfig(async_scheduling=async_, **mode))
        out, reasons, deferred = drive(engine, workload(2), abort_after={"r1": 2})
        runs[async_] = out, reasons
        assert (deferred > 5) == async_
        # under async scheduling the bitmask rows come from the grammar worker (_grammar_ahead)
        assert (engine.grammar_rows_ahead > 10) == async_, engine.grammar_rows_ahead
        if "num_kv_blocks" in mode:
            assert engine.scheduler.num_preemptions > 0
    assert runs[True] == runs[False]
    out, reasons = runs[True]
    for rid, _, params in workload(2):
        spec = params.structured_output
        if spec is not None and rid != "r1":
            text = tok.decode(out[rid])
            assert reasons[rid] == "stop" and out[rid][-1] in engine.model_cfg.eos_token_ids, (rid, text)
            assert obeys(text, spec), (rid, text)
    assert reasons["r1"] == "abort" and reasons["r3"] == "length"
    assert {tok.decode(out[r]) for r in ("r0", "r4", "r5")} <= set(WORDS)


def test_disaggregated_equals_colocated(tiny_qwen3):
    """The prefill engine samples the first token under the grammar; the decode engine's
    matcher catches up from it and goes on exactly as a colocated engine."""
    reqs = [r for r in workload(3) if r[2].structured_output in (CHOICE, DIGITS)]
    colo = LLMEngine(tiny_qwen3, EngineConfig())
    for r in reqs:
        colo.add_request(*r)
    want = drain(colo)
    p = LLMEngine(tiny_qwen3, EngineConfig(), Recorder())
    d = LLMEngine(tiny_qwen3, EngineConfig())
    firsts = {rid: transfer(p, d, rid, prompt, params)[1] for rid, prompt, params in reqs}
    rest = drain(d)
    assert {rid: firsts[rid] + rest.get(rid, []) for rid in firsts} == want
    d.block_manager.check_idle()


def test_bad_grammars_are_value_errors_naming_the_part(tiny_qwen3):
    engine = LLMEngine(tiny_qwen3, EngineConfig())
    for spec, part in [
        ({"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "foo"}}}}, '"foo"'),
        ({"type": "regex", "pattern": "(?<=a)b"}, "Lookbehind"),
        ({"type": "ebnf", "grammar": "root ::= missing"}, '"missing"'),
    ]:
        with pytest.raises(ValueError, match=re.escape(part)):
            engine.validate([1, 2], SamplingParams(structured_output=spec))
    with pytest.raises(ValueError, match="structured_output type"):
        SamplingParams(structured_output={"type": "xml"})
