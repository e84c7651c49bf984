"""Workloads, request bodies and arrival times: deterministic by seed, lengths as asked."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest

from baton.bench import workloads as wl
from baton.bench.payload import RequestOptions, chat_messages, completion_prompt, request_body
from baton.bench.runner import arrival_times
from baton.engine.tokenizer import Tokenizer

N = 24


def all_workloads(maker, seed):
    return {
        "random": wl.random_workload(N, seed, maker, (5, 40), (1, 9)),
        "shared-prefix": wl.shared_prefix_workload(N, seed, maker, tenants=3, system_tokens=50,
                                                   question_len=(4, 12), output_len=(2, 3)),
        "multi-turn": wl.multi_turn_workload(N, seed, maker, turns=5, input_len=(3, 8),
                                             output_len=(4, 4), system_tokens=7),
        "mixed": wl.mixed_workload(N, seed, maker, (100, 120), (2, 4), (5, 10), (30, 40),
                                   long_share=0.25),
    }


def test_same_seed_same_sessions_other_seed_others():
    maker = wl.PromptMaker()
    a, b, c = all_workloads(maker, 7), all_workloads(maker, 7), all_workloads(maker, 8)
    assert a == b
    for name in a:
        assert a[name] != c[name], name


def test_word_prompts_have_one_word_per_token_drawn():
    maker = wl.PromptMaker()
    for name, sessions in all_workloads(maker, 1).items():
        assert wl.request_count(sessions) == N, name
        for s in sessions:
            for t in s.turns:
                assert len(t.content.split()) == t.input_tokens
                assert set(t.content.split()) <= set(wl.WORDS)


def test_random_lengths_in_range():
    sessions = wl.random_workload(500, 3, wl.PromptMaker(), (5, 40), (1, 9))
    ins = [s.turns[0].input_tokens for s in sessions]
    outs = [s.turns[0].output_tokens for s in sessions]
    assert min(ins) == 5 and max(ins) == 40 and min(outs) == 1 and max(outs) == 9
    assert len({s.turns[0].content for s in sessions}) == 500


def test_shared_prefix_tenants():
    sessions = wl.shared_prefix_workload(30, 0, wl.PromptMaker(), tenants=3, system_tokens=50,
                                         question_len=(4, 4), output_len=(2, 2))
    assert Counter(s.tenant for s in sessions) == {0: 10, 1: 10, 2: 10}
    by_tenant = {}
    for s in sessions:
        by_tenant.setdefault(s.tenant, set()).add(s.system)
        assert len(s.system.split()) == 50 and s.turns[0].output_tokens == 2
    assert all(len(v) == 1 for v in by_tenant.values())  # one system prompt per tenant
    assert len({next(iter(v)) for v in by_tenant.values()}) == 3  # and tenants differ
    order = [s.tenant for s in sessions]
    assert order != sorted(order)  # interleaved, not tenant after tenant


def test_multi_turn_and_mixed_shapes():
    mt = wl.multi_turn_workload(13, 0, wl.PromptMaker(), turns=5)
    assert [len(s.turns) for s in mt] == [5, 5, 3]
    mixed = wl.mixed_workload(20, 0, wl.PromptMaker(), (100, 100), (2, 2), (5, 5), (30, 30),
                              long_share=0.25)
    kinds = Counter((s.turns[0].input_tokens, s.turns[0].output_tokens) for s in mixed)
    assert kinds == {(100, 2): 5, (5, 30): 15}


def test_parse_range():
    assert wl.parse_range("256") == (256, 256)
    assert wl.parse_range("128:512") == (128, 512)
    for bad in ("0", "9:3", "x"):
        with pytest.raises(ValueError):
            wl.parse_range(bad)


def test_exact_token_counts_with_a_tokenizer(tiny_qwen3):
    tok = Tokenizer(tiny_qwen3)
    ids_maker = wl.PromptMaker(tok, as_ids=True)
    text_maker = wl.PromptMaker(tok)
    for name, sessions in all_workloads(ids_maker, 2).items():
        for s in sessions:
            if s.system is not None:
                assert isinstance(s.system, tuple) and len(s.system) in (50, 7), name
            for t in s.turns:
                assert isinstance(t.content, tuple) and len(t.content) == t.input_tokens, name
                assert all(0 <= i < tok.vocab_size for i in t.content)
    assert all_workloads(ids_maker, 2) == all_workloads(ids_maker, 2)
    for name, sessions in all_workloads(text_maker, 2).items():
        for s in sessions:
            if s.system is not None:
                assert len(tok.encode(s.system, add_special_tokens=False)) in (50, 7), name
            for t in s.turns:
                assert len(tok.encode(t.content, add_special_tokens=False)) == t.input_tokens, name


def test_chat_bodies_carry_the_conversation():
    turns = (wl.Turn("hi there", 2, 5), wl.Turn("and then", 2, 6), wl.Turn("bye", 1, 7))
    s = wl.Session(0, turns, system="sys")
    assert chat_messages(s, 2, ["A0", "A1"]) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "A0"},
        {"role": "user", "content": "and then"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "bye"},
    ]
    body = request_body(RequestOptions("chat", "m", extra_body={"top_k": 3}), s, 1, ["A0"])
    # no temperature unless asked: the server's default applies, as for users' requests
    assert body == {"model": "m", "messages": chat_messages(s, 1, ["A0"]), "max_tokens": 6,
                    "stream": True, "stream_options": {"include_usage": True},
                    "ignore_eos": True, "top_k": 3}
    assert request_body(RequestOptions("chat", "m", temperature=0.0), s, 0, [])["temperature"] == 0.0
    assert "ignore_eos" not in request_body(RequestOptions("chat", "m", ignore_eos=False), s, 0, [])
    assert completion_prompt(s, 1, ["A0"]) == "sys\nhi there\nA0\nand then"


def test_completion_ids_concatenate_with_encoded_answers():
    s = wl.Session(0, (wl.Turn((5, 6), 2, 3), wl.Turn((7,), 1, 3)), system=(1, 2, 3))

    def encode(text):
        return [100 + len(w) for w in text.split()]

    assert completion_prompt(s, 0, []) == [1, 2, 3, 5, 6]
    assert completion_prompt(s, 1, ["ab abc"], encode) == [1, 2, 3, 5, 6, 102, 103, 7]
    with pytest.raises(TypeError):
        chat_messages(s, 0, [])


def test_arrival_times():
    assert arrival_times(3, float("inf"), 0) == [0.0, 0.0, 0.0]
    a = arrival_times(20000, 4.0, 1)
    assert a == arrival_times(20000, 4.0, 1) and a != arrival_times(20000, 4.0, 2)
    gaps = [y - x for x, y in zip([0.0] + a, a)]
    assert all(g > 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)  # exponential: sd == mean
    with pytest.raises(ValueError):
        arrival_times(1, 0.0, 0)
