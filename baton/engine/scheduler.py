"""Continuous batching: which sequences run this step, and how many tokens each.

One token budget per step (`max_num_batched_tokens`) covers decode tokens and prefill
chunks alike. Running sequences go first (decodes, then prefills in progress), then waiting
ones join while budget, sequence slots and blocks allow. A step that decodes takes at most
`max_prefill_tokens_when_decoding` prompt tokens, so that streams keep their pace while
prompts arrive. A prompt that does not fit what is left of the budget is prefilled in chunks
over several steps. When a running sequence needs
a block and none is free, the most recently admitted sequence is preempted: its blocks are
freed (they stay in the prefix cache) and it waits to be recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from baton.engine.block_manager import BlockManager
from baton.engine.sequence import Sequence, Status


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on
    # whether this step computes the sequence's last token, and so samples a token for it
    # (fixed when scheduled: the engine reads it after advancing num_computed_tokens)
    samples: bool = field(init=False)
    token_at: int = field(init=False, default=-1)  # index in token_ids of the token it samples

    def __post_init__(self) -> None:
        seq = self.seq
        self.samples = seq.num_computed_tokens + self.num_new_tokens == seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_decodes: int = 0  # scheduled rows of running sequences past their prompt (one token each)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def kind(self) -> str:
        """"decode" (every row a decode), "prefill" (prompt chunks only) or "mixed"."""
        if self.num_decodes == len(self.scheduled):
            return "decode"
        return "prefill" if self.num_decodes == 0 else "mixed"


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_tokens_when_decoding: int | None = None):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens_when_decoding = max_prefill_tokens_when_decoding or max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # since start, for metrics and tests

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def waiting_prefill_tokens(self) -> int:
        return sum(s.num_tokens - s.num_computed_tokens for s in self.waiting) + sum(
            s.num_tokens - s.num_computed_tokens for s in self.running if s.is_prefilling
        )

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        prefill = budget  # prompt tokens this step may take: less once it decodes
        scheduled: set[int] = set()
        order = [s for s in self.running if not s.is_prefilling] + [s for s in self.running if s.is_prefilling]
        for seq in order:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            if seq.is_prefilling:
                n = min(seq.num_tokens - seq.num_computed_tokens, budget, prefill)
                if n == 0:
                    break  # the decodes' step has taken its prompt tokens
            else:
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                prefill = self.max_prefill_tokens_when_decoding
            while self.bm.blocks_needed(seq, seq.num_computed_tokens + n) > self.bm.num_free_blocks:
                victim = next((s for s in reversed(self.running) if id(s) not in scheduled and s is not seq), None)
                self._preempt(victim or seq, out)
                if victim is None:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.bm.allocate(seq, seq.num_computed_tokens + n)
            out.scheduled.append(ScheduledSeq(seq, n))
            scheduled.add(id(seq))
            budget -= n
            if seq.is_prefilling:
                prefill -= n
            else:
                out.num_decodes += 1
        if out.preempted:
            return out  # memory is short: let running sequences finish before admitting more
        budget = min(budget, prefill)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.bm.prefix_hits(seq)
            # a chunk as large as budget and free blocks allow (the engine admits only
            # prompts that fit the whole cache, so an idle cache always takes a chunk)
            n = min(seq.num_tokens - len(hits) * self.bm.block_size, budget, self.bm.admit_room(hits))
            if n < 1:
                break
            self.waiting.popleft()
            self.bm.admit(seq, hits)
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            self.bm.allocate(seq, seq.num_computed_tokens + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.bm.free_seq(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def resume(self, seq: Sequence) -> None:
        """A sequence whose KV came from elsewhere (a prefill pod) joins the running batch."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def requeue(self, seq: Sequence) -> None:
        """A sequence not in either queue (its remote KV failed) frees its blocks and waits,
        first in line, to be computed here."""
        self.bm.free_seq(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (finished or aborted) wherever it is and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.bm.free_seq(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
