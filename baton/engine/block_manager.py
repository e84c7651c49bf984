"""KV blocks: allocation, ref counts, the hash -> block map of the prefix cache, LRU eviction.

A block with ref count 0 sits in the free queue, which doubles as the LRU of cached blocks
(vLLM v1's design): allocation takes from its head, evicting that block's hash; freeing a
sequence appends its blocks (last block first, so a chain's tail goes before its head),
and a block that holds no hash goes to the head, since nobody can reuse it.
Stored/removed hashes are recorded as KV events for the pod's index publisher.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from baton.engine.sequence import Sequence
from baton.kvindex.hashing import BlockHash, block_hashes, salted_seed


@dataclass
class KVEvents:
    stored: list[BlockHash] = field(default_factory=list)
    removed: list[BlockHash] = field(default_factory=list)
    cleared: bool = False


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, seed: BlockHash, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.seed = seed
        self.enable_caching = enable_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.hash_to_block: dict[BlockHash, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        # a fresh cache holds nothing: the pod announces that before anything else
        self.events = KVEvents(cleared=True)

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation can take (free or cached with ref count 0)."""
        return len(self.free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs to hold `num_tokens` tokens in total."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def update_hashes(self, seq: Sequence, num_blocks: int | None = None) -> None:
        """Extend seq.block_hashes to every full block of its tokens (or its first num_blocks:
        a token still on the device, PENDING in token_ids, must not be hashed)."""
        done = len(seq.block_hashes)
        want = seq.num_tokens // self.block_size if num_blocks is None else num_blocks
        if want > done:
            parent = seq.block_hashes[-1] if done else None
            tokens = seq.token_ids[: want * self.block_size]
            seed = salted_seed(self.seed, seq.params.cache_salt)  # tenants' caches stay apart
            seq.block_hashes += block_hashes(tokens, self.block_size, seed, done, parent)

    def prefix_hits(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of seq's tokens (at least one token is
        left to compute, so the step that computes it can sample)."""
        if not self.enable_caching:
            return []
        self.update_hashes(seq)
        hits = []
        for h in seq.block_hashes:
            b = self.hash_to_block.get(h)
            if b is None:
                break
            hits.append(b)
        if hits and len(hits) * self.block_size >= seq.num_tokens:
            hits.pop()
        return hits

    def admit_room(self, hits: list[int]) -> int:
        """Tokens a sequence admitted with these prefix hits could compute now."""
        reused_free = sum(1 for b in hits if self.ref_count[b] == 0)
        return (self.num_free_blocks - reused_free) * self.block_size

    # -- changes -------------------------------------------------------------------------
    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give a waiting sequence its cached prefix blocks."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for b in hits:
            if self.ref_count[b] == 0:
                del self.free[b]
            self.ref_count[b] += 1
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_registered_blocks = len(hits)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to hold `num_tokens` tokens; the caller checked room."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            b, _ = self.free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                del self.hash_to_block[h]
                self.block_hash[b] = None
                self.events.removed.append(h)
            self.ref_count[b] = 1
            seq.block_table.append(b)

    def register_computed(self, seq: Sequence) -> None:
        """Publish the hashes of blocks whose KV is now fully computed."""
        if not self.enable_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_registered_blocks:
            return
        self.update_hashes(seq, full)
        for i in range(seq.num_registered_blocks, full):
            h, b = seq.block_hashes[i], seq.block_table[i]
            if h not in self.hash_to_block and self.block_hash[b] is None:
                self.hash_to_block[h] = b
                self.block_hash[b] = h
                self.events.stored.append(h)
        seq.num_registered_blocks = full

    def free_seq(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):
            self.ref_count[b] -= 1
            assert self.ref_count[b] >= 0, f"block {b} freed twice"
            if self.ref_count[b] == 0:
                self.free[b] = None
                if self.block_hash[b] is None:
                    self.free.move_to_end(b, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def drain_events(self) -> KVEvents:
        ev, self.events = self.events, KVEvents()
        return ev

    def cached_hashes(self) -> list[BlockHash]:
        return list(self.hash_to_block)

    def check_idle(self) -> None:
        """With no sequence alive: every block free (cached or not) with ref count 0."""
        busy = [b for b, r in enumerate(self.ref_count) if r]
        if busy or len(self.free) != self.num_blocks:
            raise AssertionError(f"blocks still referenced: {busy[:10]} (free {len(self.free)}/{self.num_blocks})")
