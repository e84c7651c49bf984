"""Turns logits into tokens: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from baton.engine.sampling_params import SamplingParams


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: None, or [(sampled id, logprob), (top id, logprob), ...]
    logprobs: list[list[tuple[int, float]] | None]


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside top-k, then outside the smallest set whose mass reaches top-p."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # keep a token if the mass before it is below top_p (the top token always stays)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
    greedy: torch.Tensor | None = None,
) -> SampleResult:
    """logits [S, V] float32, one row per sequence that samples this step; `greedy`, their
    argmax when the caller has it already (the decode CUDA graphs compute it)."""
    tokens = (torch.argmax(logits, dim=-1) if greedy is None else greedy).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = _filter(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    logprobs: list = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:
        lp = torch.log_softmax(logits[want], dim=-1)
        for j, i in enumerate(want):
            k = params[i].logprobs
            chosen = [(tokens[i], float(lp[j, tokens[i]]))]
            if k:
                top = torch.topk(lp[j], k)
                chosen += list(zip(top.indices.tolist(), top.values.tolist()))
            logprobs[i] = chosen
    return SampleResult(tokens, logprobs)
