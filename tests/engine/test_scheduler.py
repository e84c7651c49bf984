"""The scheduler on plain data (no model): token budget, chunked prefill, preemption order,
prefix hits, and freeing on finish; hypothesis for the invariants every step must keep."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from baton.engine.block_manager import BlockManager
from baton.engine.sampling_params import SamplingParams
from baton.engine.scheduler import Scheduler
from baton.engine.sequence import Sequence, Status
from baton.kvindex.hashing import model_seed

SEED = model_seed("test")
BS = 4  # block size of every test here


def seq(tokens, i=0, max_tokens=4):
    return Sequence(f"r{i}", list(tokens), len(tokens), SamplingParams(max_tokens=max_tokens), i)


def make(num_blocks=32, max_num_seqs=8, budget=64):
    bm = BlockManager(num_blocks, BS, SEED)
    return bm, Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def run(sched, out, token=7):
    """What the engine does with a step's output: the KV is computed, and a sequence whose
    last token was computed gets a new token. Returns the sequences that sampled."""
    sampled = []
    for sc in out.scheduled:
        sc.seq.num_computed_tokens += sc.num_new_tokens
        sched.bm.register_computed(sc.seq)
        if sc.samples:
            sc.seq.token_ids.append(token)
            sampled.append(sc.seq)
    return sampled


def plan(out):
    return [(sc.seq.request_id, sc.num_new_tokens) for sc in out.scheduled]


# -- token budget ---------------------------------------------------------------------------------


def test_one_budget_covers_every_sequence_of_a_step():
    bm, sched = make(budget=16)
    for i in range(3):
        sched.add(seq(range(100 * i, 100 * i + 10), i))
    out = sched.schedule()
    # r0 whole, r1 the 6 tokens left of the budget, r2 waits: the budget is spent
    assert plan(out) == [("r0", 10), ("r1", 6)] and out.num_tokens == 16
    assert [s.request_id for s in sched.waiting] == ["r2"]
    assert [sc.samples for sc in out.scheduled] == [True, False]


def test_decodes_go_before_prefills_in_progress_and_new_prompts():
    bm, sched = make(budget=12)
    sched.add(seq(range(10), 0))
    sched.add(seq(range(100, 130), 1))
    run(sched, sched.schedule())  # r0 prefilled whole (10), r1 a first chunk of 2
    assert sched.running[0].request_id == "r0" and not sched.running[0].is_prefilling
    sched.add(seq(range(200, 210), 2))
    out = sched.schedule()
    # r0's one decode token first, then r1's chunk takes the rest; r2 gets nothing
    assert plan(out) == [("r0", 1), ("r1", 11)]
    assert [s.request_id for s in sched.waiting] == ["r2"]


def test_a_step_that_decodes_takes_few_prompt_tokens():
    """max_prefill_tokens_when_decoding: the whole budget for prompts while nothing decodes,
    the cap (chunks in progress and new prompts together) once something does."""
    bm = BlockManager(64, BS, SEED)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32, max_prefill_tokens_when_decoding=6)
    sched.add(seq(range(10), 0))
    sched.add(seq(range(100, 130), 1))
    out = sched.schedule()
    assert plan(out) == [("r0", 10), ("r1", 22)]  # nothing decodes yet: the whole budget
    assert out.kind == "prefill"
    run(sched, out)
    sched.add(seq(range(200, 210), 2))
    out = sched.schedule()
    assert plan(out) == [("r0", 1), ("r1", 6)]  # r0 decodes: r1's chunk is capped, r2 waits
    assert (out.kind, out.num_decodes) == ("mixed", 1)
    run(sched, out)
    out = sched.schedule()
    assert plan(out) == [("r0", 1), ("r1", 2), ("r2", 4)]  # r1's last 2, then r2's first 4
    run(sched, out)
    sched.finish(sched.running[0], "stop")
    sched.finish(sched.running[0], "stop")
    out = sched.schedule()
    assert plan(out) == [("r2", 6)]  # prefilling alone: whatever the prompt has left
    assert out.kind == "prefill"
    run(sched, out)
    out = sched.schedule()
    assert plan(out) == [("r2", 1)] and out.kind == "decode"


def test_max_num_seqs_caps_the_running_batch():
    bm, sched = make(max_num_seqs=2, budget=100)
    for i in range(3):
        sched.add(seq(range(100 * i, 100 * i + 5), i))
    out = sched.schedule()
    assert plan(out) == [("r0", 5), ("r1", 5)] and len(sched.waiting) == 1
    run(sched, out)
    sched.finish(sched.running[0], "stop")
    assert [r for r, _ in plan(sched.schedule())] == ["r1", "r2"]  # a slot came free


def test_no_work_no_output():
    bm, sched = make()
    assert not sched.has_work()
    out = sched.schedule()
    assert out.scheduled == [] and out.preempted == [] and out.num_tokens == 0


# -- chunked prefill ------------------------------------------------------------------------------


def test_long_prompt_is_prefilled_in_chunks_and_samples_on_the_last():
    bm, sched = make(budget=16)
    s = seq(range(40))
    sched.add(s)
    chunks, samples = [], []
    while s.num_computed_tokens < 40:
        out = sched.schedule()
        (sc,) = out.scheduled
        chunks.append(sc.num_new_tokens)
        samples.append(sc.samples)
        assert len(s.block_table) * BS >= s.num_computed_tokens + sc.num_new_tokens
        run(sched, out)
    assert chunks == [16, 16, 8] and samples == [False, False, True]
    assert s.num_output_tokens == 1 and not s.is_prefilling
    assert sched.waiting_prefill_tokens() == 0


def test_waiting_prefill_tokens_counts_waiting_and_unfinished_prompts():
    bm, sched = make(budget=16)
    sched.add(seq(range(40), 0))
    sched.add(seq(range(100, 110), 1))
    assert sched.waiting_prefill_tokens() == 50
    run(sched, sched.schedule())  # 16 of r0's 40
    assert sched.waiting_prefill_tokens() == 24 + 10


def test_a_chunk_is_cut_to_the_free_blocks():
    bm, sched = make(num_blocks=6, budget=64)
    sched.add(seq(range(12), 0))
    run(sched, sched.schedule())  # r0 holds 3 blocks and needs a 4th for its next token
    sched.add(seq(range(100, 120), 1))  # 5 blocks' worth
    out = sched.schedule()
    assert plan(out) == [("r0", 1), ("r1", 8)] and bm.num_free_blocks == 0


# -- preemption -----------------------------------------------------------------------------------


def fill(sched, lengths):
    """Sequences of these prompt lengths admitted and prefilled in one step (each now decoding)."""
    seqs = [seq(range(100 * i, 100 * i + n), i, max_tokens=50) for i, n in enumerate(lengths)]
    for s in seqs:
        sched.add(s)
    run(sched, sched.schedule())
    assert all(s.status is Status.RUNNING and not s.is_prefilling for s in seqs)
    return seqs


def test_the_most_recently_admitted_sequences_are_preempted_first():
    bm, sched = make(num_blocks=7, budget=64)
    # a and b each need a third block for their next token; c, d, e have room in their one
    a, b, c, d, e = fill(sched, [8, 8, 2, 2, 2])
    assert bm.num_free_blocks == 0
    sched.add(f := seq(range(900, 904), 9))
    out = sched.schedule()
    assert out.preempted == [e, d]  # a takes e's block, b takes d's
    assert plan(out) == [("r0", 1), ("r1", 1), ("r2", 1)]
    for s in (d, e):
        assert s.status is Status.WAITING and s.block_table == [] and s.num_computed_tokens == 0
        assert s.num_preemptions == 1
    assert sched.num_preemptions == 2
    # victims wait at the front, in admission order; a step that preempts admits nobody
    assert list(sched.waiting) == [d, e, f]
    for sc in out.scheduled:
        assert len(sc.seq.block_table) * BS >= sc.seq.num_computed_tokens + sc.num_new_tokens


def test_a_sequence_with_no_one_left_to_preempt_preempts_itself():
    bm, sched = make(num_blocks=5, budget=64)
    a, b = fill(sched, [8, 8])  # one block left: a takes it, then b has no victim but itself
    out = sched.schedule()
    assert plan(out) == [("r0", 1)] and out.preempted == [b] and b.status is Status.WAITING
    assert bm.num_free_blocks == 2 and sched.running == [a]


def test_a_preempted_sequence_is_recomputed_from_what_the_cache_kept():
    bm, sched = make(num_blocks=3, budget=64)
    a, c = fill(sched, [4, 8])  # c's two blocks are full and cached
    old = list(c.block_table)
    out = sched.schedule()
    assert out.preempted == [c]  # a's new block is c's tail block: that hash is evicted
    run(sched, out)
    sched.finish(a, "stop")
    out = sched.schedule()
    # c's head block is still cached: only the rest of its 9 tokens is recomputed
    assert plan(out) == [("r1", 5)] and c.block_table[0] == old[0]
    assert c.num_cached_tokens == 0  # what its first admission found stays


# -- prefix hits ----------------------------------------------------------------------------------


def test_a_prompt_with_a_cached_prefix_computes_only_the_rest():
    bm, sched = make(budget=64)
    a = seq(range(10), 0)
    sched.add(a)
    run(sched, sched.schedule())
    b = seq(list(range(8)) + [50, 51, 52], 1)  # shares a's first two full blocks
    sched.add(b)
    out = sched.schedule()
    assert plan(out) == [("r0", 1), ("r1", 3)]
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert [bm.ref_count[x] for x in b.block_table[:2]] == [2, 2]


def test_a_whole_prompt_in_the_cache_still_computes_its_last_token():
    bm, sched = make(budget=64)
    a = seq(range(8), 0)
    sched.add(a)
    run(sched, sched.schedule())
    sched.finish(a, "stop")
    b = seq(range(8), 1)
    sched.add(b)
    out = sched.schedule()
    # the last block is recomputed so the step can sample from it
    assert plan(out) == [("r1", 4)] and b.num_cached_tokens == 4 and out.scheduled[0].samples


def test_cached_free_blocks_count_against_room_when_admitting():
    bm, sched = make(num_blocks=4, budget=64)
    a = seq(range(8), 0)
    sched.add(a)
    run(sched, sched.schedule())
    sched.finish(a, "stop")  # a's 2 full blocks back in the free queue, still cached
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    b = seq(list(range(8)) + list(range(60, 72)), 1)  # 2 blocks hit, 12 tokens more = 3 blocks
    sched.add(b)
    out = sched.schedule()
    # reusing the 2 cached blocks leaves 2 to allocate: a chunk of 8 of the 12
    assert plan(out) == [("r1", 8)] and b.num_cached_tokens == 8


# -- finish ---------------------------------------------------------------------------------------


def test_finish_frees_blocks_wherever_the_sequence_is():
    bm, sched = make(num_blocks=8, max_num_seqs=1, budget=64)
    a, b = seq(range(10), 0), seq(range(100, 110), 1)
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())
    assert a.status is Status.RUNNING and b.status is Status.WAITING
    used = len(a.block_table)
    free_before = bm.num_free_blocks
    sched.finish(a, "stop")
    assert a.status is Status.FINISHED and a.finish_reason == "stop" and a.block_table == []
    assert bm.num_free_blocks == free_before + used and a not in sched.running
    sched.finish(b, "abort")  # still waiting
    assert b.status is Status.FINISHED and b.finish_reason == "abort" and not sched.waiting
    assert not sched.has_work()
    bm.check_idle()


def test_finishing_one_holder_of_a_shared_block_keeps_it_for_the_other():
    bm, sched = make(budget=64)
    a = seq(range(10), 0)
    sched.add(a)
    run(sched, sched.schedule())
    b = seq(list(range(8)) + [50], 1)
    sched.add(b)
    run(sched, sched.schedule())
    shared = b.block_table[:2]
    sched.finish(a, "stop")
    assert [bm.ref_count[x] for x in shared] == [1, 1]
    assert not any(x in bm.free for x in shared)
    sched.finish(b, "stop")
    bm.check_idle()


# -- invariants -----------------------------------------------------------------------------------


def check_invariants(bm: BlockManager, sched: Scheduler, out, budget: int, num_blocks: int) -> None:
    assert out.num_tokens <= budget
    assert len(sched.running) <= sched.max_num_seqs
    owners = [0] * num_blocks
    for s in sched.running:
        assert s.status is Status.RUNNING
        assert len(set(s.block_table)) == len(s.block_table), "a block twice in one table"
        for b in s.block_table:
            owners[b] += 1
    for s in sched.waiting:
        assert s.status is Status.WAITING and s.block_table == []
    for b in range(num_blocks):
        # a block's ref count is exactly how many live sequences hold it; a block held by
        # two sequences is a cached (hashed) one, and a held block is never up for allocation
        assert bm.ref_count[b] == owners[b], (b, bm.ref_count[b], owners[b])
        assert (b in bm.free) == (owners[b] == 0)
        if owners[b] > 1:
            assert bm.block_hash[b] is not None and bm.hash_to_block[bm.block_hash[b]] == b


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    shared=st.integers(0, 20),
    num_blocks=st.integers(12, 40),
    budget=st.integers(1, 64),
    max_num_seqs=st.integers(1, 4),
    abort_at=st.integers(0, 30),
)
def test_scheduler_never_leaks_or_double_owns_blocks(lens, shared, num_blocks, budget, max_num_seqs, abort_at):
    bm = BlockManager(num_blocks, BS, SEED)
    sched = Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    seqs = [seq(list(range(shared)) + [1000 + i] * n, i, max_tokens=5) for i, n in enumerate(lens)
            if shared + n < num_blocks * BS]  # the engine refuses longer prompts
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_work():
        steps += 1
        assert steps < 2000, "scheduler made no progress"
        out = sched.schedule()
        assert out.scheduled or out.preempted
        check_invariants(bm, sched, out, budget, num_blocks)
        for sc in out.scheduled:
            s, samples = sc.seq, sc.samples
            assert len(s.block_table) * BS >= s.num_computed_tokens + sc.num_new_tokens
            s.num_computed_tokens += sc.num_new_tokens
            bm.register_computed(s)
            if samples:
                s.token_ids.append(7)
                # the engine caps a sequence at the cache's size (max_model_len)
                if s.num_output_tokens >= s.params.max_tokens or s.num_tokens >= num_blocks * BS:
                    sched.finish(s, "length")
        if steps == abort_at and sched.running:
            sched.finish(sched.running[0], "abort")
        live = sum(len(s.block_table) for s in sched.running)
        assert live + bm.num_free_blocks >= num_blocks - sum(1 for r in bm.ref_count if r > 1)
    assert all(s.status is Status.FINISHED for s in seqs)
    bm.check_idle()


def test_prompt_tokens_beside_decodes_by_device():
    """max_prefill_tokens_when_decoding: 512 on a GPU by default (its prefill graphs make a
    small chunk cheap beside the decode graph), the whole budget on a CPU; 0 lifts the cap;
    never more than the step's budget."""
    from baton.engine.config import EngineConfig

    assert EngineConfig().prefill_tokens_when_decoding("cuda") == 512
    assert EngineConfig().prefill_tokens_when_decoding("cpu") == EngineConfig().batched_tokens("cpu") == 2048
    assert EngineConfig(max_prefill_tokens_when_decoding=0).prefill_tokens_when_decoding("cuda") == 16384
    assert EngineConfig(max_prefill_tokens_when_decoding=1024).prefill_tokens_when_decoding("cpu") == 1024
    assert EngineConfig(max_num_batched_tokens=300).prefill_tokens_when_decoding("cuda") == 300
    # the offline API (LLM) lifts it: no stream to keep smooth, throughput first
    from baton.engine.llm import OFFLINE_DEFAULTS

    assert EngineConfig(**OFFLINE_DEFAULTS).prefill_tokens_when_decoding("cuda") == 16384


def test_the_offline_api_takes_the_whole_budget_beside_decodes(tiny_qwen3):
    from baton.engine.llm import LLM

    assert LLM(tiny_qwen3).engine.config.max_prefill_tokens_when_decoding == 0
    assert LLM(tiny_qwen3, max_prefill_tokens_when_decoding=64).engine.scheduler.max_prefill_tokens_when_decoding == 64
