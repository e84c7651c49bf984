"""SimEngine: LLMEngine with the model replaced by SimRunner. The scheduler, block manager
(prefix cache of `num_kv_blocks` blocks, LRU eviction, KV events), request bookkeeping and
the remote-KV hand-off are the real engine's; pods drive it through the same EngineLoop."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
from pathlib import Path

from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.engine import KVPush, LLMEngine
from baton.engine.grammar import Grammars
from baton.engine.sampling_params import SamplingParams
from baton.engine.block_manager import BlockManager
from baton.engine.scheduler import Scheduler
from baton.kvindex.hashing import model_identity, model_seed
from baton.sim.config import SimConfig
from baton.sim.runner import SimRunner

log = logging.getLogger(__name__)


class SimEngine(LLMEngine):
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, kv_push: KVPush | None = None,
                 sim: SimConfig | None = None):
        # no super().__init__: it loads the model; the fields below are its own
        self.config = config = config or EngineConfig()
        self.model_dir = str(model_dir)
        real = ModelConfig.from_dir(model_dir)  # vocabulary, eos ids, context: the model's
        # as many blocks as the real model's KV would have in the same bytes (or as given)
        num_blocks = config.num_kv_blocks or max(1, config.kv_cache_bytes // (
            real.kv_bytes_per_token(4) * config.block_size))
        # one value per token and layer travels between simulated prefill and decode pods
        self.model_cfg = dataclasses.replace(real, num_kv_heads=1, head_dim=1)
        max_len = config.max_model_len or real.max_position_embeddings
        self.runner = SimRunner(self.model_cfg, config, num_blocks, sim or SimConfig(engine="sim"))
        self.max_model_len = min(max_len, num_blocks * config.block_size)
        self.seed = model_seed(model_identity(model_dir))
        self.block_manager = BlockManager(num_blocks, config.block_size, self.seed, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.batched_tokens("cpu"))
        self.seqs = {}
        self.grammars = Grammars(self.model_dir, self.model_cfg.vocab_size, self.model_cfg.eos_token_ids)
        self.kv_push = kv_push
        self.reservations = {}
        self._penalty_slots_free = list(range(config.max_num_seqs))
        self._inflight = None
        self._arrival = itertools.count()
        self._seeds = random.Random(config.seed) if config.seed is not None else None
        log.info("simulated engine ready: %d KV blocks of %d tokens, max_model_len %d, timing %s",
                 num_blocks, config.block_size, self.max_model_len, self.runner.sim)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if params.structured_output is not None:
            raise ValueError("structured outputs are not supported by the simulated engine (--engine sim)")
        super().validate(prompt_token_ids, params)

    def _assign_penalty_slots(self, sched) -> None:
        pass  # no penalties: the sim's tokens do not depend on them

    def _end(self, seq, reason: str) -> None:
        self.runner.forget(seq.request_id)
        super()._end(seq, reason)
