"""Block manager and scheduler invariants on plain data (no model)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from baton.engine.block_manager import BlockManager
from baton.engine.sampling_params import SamplingParams
from baton.engine.scheduler import Scheduler
from baton.engine.sequence import Sequence
from baton.kvindex.hashing import block_hashes, model_seed

SEED = model_seed("test")


def seq(tokens, i=0, max_tokens=4):
    return Sequence(f"r{i}", list(tokens), len(tokens), SamplingParams(max_tokens=max_tokens), i)


def compute(bm, s, n):
    """Pretend the model computed n tokens of s."""
    bm.allocate(s, s.num_computed_tokens + n)
    s.num_computed_tokens += n
    bm.register_computed(s)


def test_hits_share_blocks_and_ref_counts():
    bm = BlockManager(16, 4, SEED)
    a = seq(range(10))
    bm.admit(a, bm.prefix_hits(a))
    compute(bm, a, 10)  # blocks [0..3], [4..7] full; [8, 9] partial
    assert bm.num_cached_blocks == 2
    b = seq(list(range(8)) + [42, 43, 44], 1)
    hits = bm.prefix_hits(b)
    assert hits == a.block_table[:2]
    bm.admit(b, hits)
    assert b.num_computed_tokens == 8 and [bm.ref_count[x] for x in hits] == [2, 2]
    bm.free_seq(a)
    bm.free_seq(b)
    bm.check_idle()
    ev = bm.drain_events()
    assert ev.cleared and ev.stored == block_hashes(list(range(10)), 4, SEED) and not ev.removed


def test_full_hit_leaves_one_token_to_compute():
    bm = BlockManager(8, 4, SEED)
    a = seq(range(8))
    bm.admit(a, [])
    compute(bm, a, 8)
    bm.free_seq(a)
    b = seq(range(8), 1)
    assert len(bm.prefix_hits(b)) == 1  # the second block is recomputed to sample from it


def test_eviction_takes_oldest_and_reports_removed():
    bm = BlockManager(2, 4, SEED)
    a = seq(range(8))
    bm.admit(a, [])
    compute(bm, a, 8)
    bm.free_seq(a)
    bm.drain_events()
    b = seq(range(100, 104), 1)
    bm.admit(b, bm.prefix_hits(b))
    bm.allocate(b, 4)
    ev = bm.drain_events()
    # a's tail block goes first, so its head (the more shareable prefix) stays cached
    assert ev.removed == [a.block_hashes[1]] and bm.num_cached_blocks == 1


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    shared=st.integers(0, 20),
    num_blocks=st.integers(12, 40),
    budget=st.integers(1, 64),
    abort_at=st.integers(0, 30),
)
def test_scheduler_never_leaks_blocks(lens, shared, num_blocks, budget, abort_at):
    bs = 4
    bm = BlockManager(num_blocks, bs, SEED)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=budget)
    seqs = [seq(list(range(shared)) + [1000 + i] * n, i, max_tokens=5) for i, n in enumerate(lens)
            if shared + n < num_blocks * bs]  # the engine refuses longer prompts
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_work():
        steps += 1
        assert steps < 2000, "scheduler made no progress"
        out = sched.schedule()
        assert out.num_tokens <= budget
        assert out.scheduled or out.preempted
        for sc in out.scheduled:
            s, samples = sc.seq, sc.samples
            assert len(s.block_table) * bs >= s.num_computed_tokens + sc.num_new_tokens
            s.num_computed_tokens += sc.num_new_tokens
            bm.register_computed(s)
            if samples:
                s.token_ids.append(7)
                # the engine caps a sequence at the cache's size (max_model_len)
                if s.num_output_tokens >= s.params.max_tokens or s.num_tokens >= num_blocks * bs:
                    sched.finish(s, "length")
        if steps == abort_at and sched.running:
            sched.finish(sched.running[0], "abort")
        live = sum(len(s.block_table) for s in sched.running)
        assert live + bm.num_free_blocks >= num_blocks - sum(1 for r in bm.ref_count if r > 1)
    bm.check_idle()
