"""SimRunner: ModelRunner's interface with no model. A step sleeps for the timing model's
time and samples tokens from baton.sim.tokens; KV lives in a cache one value wide per token
and layer, enough for prefill pods to push and decode pods to receive it over UCX."""

from __future__ import annotations

import time

import torch

from baton.engine.config import EngineConfig, ModelConfig
from baton.engine.model_runner import ModelRunner, StepTokens
from baton.engine.scheduler import ScheduledSeq
from baton.sim.config import SimConfig
from baton.sim.tokens import request_key, token_at


class _Done:
    """A step's handle whose tokens are on the host already (the engine never defers it)."""

    tokens = None

    def __init__(self, result: StepTokens | None):
        self._result = result

    def wait(self) -> StepTokens | None:
        return self._result


class SimRunner(ModelRunner):
    # slots(), write_kv() and after_kv_writes() are ModelRunner's own, on the small cache
    def __init__(self, model_cfg: ModelConfig, config: EngineConfig, num_blocks: int, sim: SimConfig):
        self.cfg, self.config, self.sim = model_cfg, config, sim
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.kv_dtype = self.dtype  # what travels between prefill and decode pods
        self.block_size = config.block_size
        self.num_blocks = num_blocks
        self._write_stream = None
        self._kv_cache: torch.Tensor | None = None
        self._keys: dict[str, int] = {}  # request id -> its token key, while it runs
        self._avoid = frozenset(model_cfg.eos_token_ids)
        self.steps_slept = 0.0

    @property
    def kv_cache(self) -> torch.Tensor:
        # made on first use: only pods that send or receive KV need it
        if self._kv_cache is None:
            c = self.cfg
            self._kv_cache = torch.zeros(c.num_layers, 2, self.num_blocks, self.block_size, c.num_kv_heads,
                                         c.head_dim, dtype=self.kv_dtype)
        return self._kv_cache

    def forget(self, request_id: str) -> None:
        self._keys.pop(request_id, None)

    def launch(self, batch: list[ScheduledSeq], prev_tokens=None, on_layer_done=None, token_mask=None) -> _Done:
        # prev_tokens: unused (no token is ever on a device); token_mask: never set (SimEngine
        # refuses structured outputs)
        prefill = decode_rows = context = 0
        for s in batch:
            if s.num_new_tokens == 1 and s.seq.num_computed_tokens >= s.seq.num_prompt_tokens:
                decode_rows += 1
                context += s.seq.num_computed_tokens + 1
            else:
                prefill += s.num_new_tokens
        t = self.sim.step_seconds(prefill, decode_rows, context)
        if t > 0:
            time.sleep(t)
            self.steps_slept += t
        if on_layer_done is not None:
            for layer in range(self.cfg.num_layers):
                on_layer_done(layer)
        rows = [s.seq for s in batch if s.samples]
        if not rows:
            return _Done(None)
        tokens, logprobs = [], []
        for seq in rows:
            key = self._keys.get(seq.request_id)
            if key is None:
                key = self._keys[seq.request_id] = request_key(seq.token_ids[: seq.num_prompt_tokens], seq.seed)
            tok = token_at(key, len(seq.token_ids), self.cfg.vocab_size, self._avoid)
            tokens.append(tok)
            k = seq.params.logprobs
            # the sampled token is the most likely one; the other top ids follow it
            logprobs.append(None if k is None else [(tok, 0.0)] + [
                ((tok + i) % self.cfg.vocab_size, -float(i)) for i in range(k)])
        return _Done(StepTokens(tokens, logprobs, [False] * len(rows)))

    def penalty_state(self):
        raise NotImplementedError("the simulated engine applies no penalties")
