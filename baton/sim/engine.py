"""SimEngine: LLMEngine with the model replaced by SimRunner. The scheduler, block manager
(prefix cache of `num_kv_blocks` blocks, LRU eviction, KV events), request bookkeeping and
the remote-KV hand-off are the real engine's; pods drive it through the same EngineLoop."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.engine import KVPush, LLMEngine
from baton.engine.sampling_params import SamplingParams
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
        self._init_state(model_dir, num_blocks, "cpu", kv_push)
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
