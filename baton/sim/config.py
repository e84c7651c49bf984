"""The simulated engine's options: which engine a pod runs and the sim's timing model.

Timing model (one engine step; every term 0 by default, i.e. as fast as the CPU goes):

    step_s = prefill_tokens / sim_prefill_tokens_per_s               (0: free)
           + [decode rows > 0] * (sim_decode_step_s
                                  + sim_decode_per_seq_s * decode_rows
                                  + sim_decode_per_kctx_s * decode_context_tokens / 1000)

`prefill_tokens` are the prompt tokens the step computes (prefix-cache hits are not
computed, so a hit makes the first token come sooner, as on a real pod); a decode row is a
sequence that computes one token; its context is its length so far. The engine thread
sleeps for `step_s` (releasing the GIL), like a thread waiting on its GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from baton.settings import field


@dataclass
class SimConfig:
    engine: Literal["real", "sim"] = field(
        "real", "real (the model) or sim (simulated: timing model, deterministic tokens; baton/sim/)")
    sim_prefill_tokens_per_s: float = field(0.0, "sim: prompt tokens computed per second (0: no time)")
    sim_decode_step_s: float = field(0.0, "sim: fixed seconds of a step that decodes")
    sim_decode_per_seq_s: float = field(0.0, "sim: seconds a decode step adds per sequence in the batch")
    sim_decode_per_kctx_s: float = field(0.0, "sim: seconds a decode step adds per 1,000 tokens of context")

    def sim_config(self) -> "SimConfig":
        return SimConfig(**{f.name: getattr(self, f.name) for f in fields(SimConfig)})

    def step_seconds(self, prefill_tokens: int, decode_rows: int, decode_context: int) -> float:
        t = prefill_tokens / self.sim_prefill_tokens_per_s if self.sim_prefill_tokens_per_s > 0 else 0.0
        if decode_rows:
            t += (self.sim_decode_step_s + self.sim_decode_per_seq_s * decode_rows
                  + self.sim_decode_per_kctx_s * decode_context / 1000)
        return t
