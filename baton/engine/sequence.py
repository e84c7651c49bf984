"""One request inside the engine: its tokens, its blocks and how far its KV is computed."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from baton.engine.sampling_params import SamplingParams


PENDING = -1  # placeholder token id of a token sampled on the device, not yet read back


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    REMOTE = "remote"  # blocks reserved, KV arriving from a prefill pod
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt, then output
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int
    seed: int = 0  # the randomness of the token at position p is a function of (seed, p) alone
    penalty_slot: int = -1  # penalised requests: the runner's token-count slot while running
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV sits in the cache
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache (first admission)
    block_hashes: list[bytes] = field(default_factory=list)  # of full blocks of token_ids
    num_registered_blocks: int = 0  # leading blocks whose hash the block manager has seen
    finish_reason: str | None = None
    num_preemptions: int = 0
    # prefill pods: compute the prompt's KV, push tokens [kv_start, end) per layer, sample one token
    prefill_only: bool = False
    kv_start: int = 0
    # >= 0 while the last token is still on the device: the row of the previous step's tokens
    # (token_ids holds PENDING there until the engine reads it back)
    pending: int = -1
    grammar: object | None = None  # structured outputs: its GrammarState (baton/engine/grammar.py)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_prefilling(self) -> bool:
        """More than one token's KV is still missing (the prompt, or a recompute)."""
        return self.num_tokens - self.num_computed_tokens > 1
