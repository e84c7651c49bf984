"""The block manager on plain data (no model); the scheduler's invariants are in test_scheduler.py."""

from __future__ import annotations

from baton.engine.block_manager import BlockManager
from baton.engine.sampling_params import SamplingParams
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


def computed_and_freed(bm, tokens):
    """A sequence of `tokens` computed whole and ended: its full blocks stay cached, unreferenced."""
    s = seq(tokens)
    bm.admit(s, [])
    compute(bm, s, len(tokens))
    bm.free_seq(s)
    return s


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
    computed_and_freed(bm, range(8))
    b = seq(range(8), 1)
    assert len(bm.prefix_hits(b)) == 1  # the second block is recomputed to sample from it


def test_eviction_takes_oldest_and_reports_removed():
    bm = BlockManager(2, 4, SEED)
    a = computed_and_freed(bm, range(8))
    bm.drain_events()
    b = seq(range(100, 104), 1)
    bm.admit(b, bm.prefix_hits(b))
    bm.allocate(b, 4)
    ev = bm.drain_events()
    # a's tail block goes first, so its head (the more shareable prefix) stays cached
    assert ev.removed == [a.block_hashes[1]] and bm.num_cached_blocks == 1
