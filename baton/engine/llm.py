"""The offline API: `LLM(model_dir).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from pathlib import Path

from baton.engine.config import EngineConfig
from baton.engine.engine import LLMEngine
from baton.engine.sampling_params import SamplingParams
from baton.engine.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_cached_tokens: int
    logprobs: list[list[tuple[int, float]]] | None = None


# What the offline API changes from the engine's (serving) defaults: nobody watches a stream
# here, so a step that decodes takes as many prompt tokens as its budget allows (the serving
# default caps them on a GPU to keep streams smooth, at ~11% of the throughput).
OFFLINE_DEFAULTS = {"max_prefill_tokens_when_decoding": 0}


class LLM:
    """`LLM(model_dir, **options)`: options are EngineConfig fields (block_size, num_kv_blocks,
    max_num_batched_tokens, device, dtype, ...); OFFLINE_DEFAULTS where not given."""

    def __init__(self, model_dir: str | Path, **options):
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown LLM option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        self.engine = LLMEngine(model_dir, EngineConfig(**(OFFLINE_DEFAULTS | options)))
        self.tokenizer = Tokenizer(model_dir)
        self._ids = itertools.count()

    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[CompletionOutput]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        token_lists = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for toks, p in zip(token_lists, plist):  # all or nothing: check before queueing any
            self.engine.validate(toks, p)
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        outs = {rid: CompletionOutput(toks, [], "", "", 0, [] if p.logprobs is not None else None)
                for rid, toks, p in zip(ids, token_lists, plist)}
        for rid, toks, p in zip(ids, token_lists, plist):
            self.engine.add_request(rid, toks, p)
        try:
            while self.engine.has_unfinished_requests():
                for o in self.engine.step():
                    out = outs[o.request_id]
                    out.token_ids += o.new_token_ids
                    if o.new_logprobs is not None:
                        out.logprobs += o.new_logprobs
                    out.num_cached_tokens = o.num_cached_tokens
                    if o.finish_reason:
                        out.finish_reason = o.finish_reason
        finally:  # an exception (or Ctrl-C) mid-run must not strand blocks
            for rid in ids:
                self.engine.abort_request(rid)
        for out in outs.values():
            out.text = self.tokenizer.decode(out.token_ids)
        return [outs[rid] for rid in ids]
