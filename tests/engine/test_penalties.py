"""Penalties through the whole engine (slots of token counts on the device, async scheduling,
batching, preemption): greedy token ids equal transformers' generate with the same penalties
as logits processors — HF's own repetition penalty, and OpenAI's presence/frequency penalties
written from their definition (over the generated tokens only)."""

from __future__ import annotations

import random

import torch

from baton import LLM, SamplingParams


class OpenAIPenalties:
    """logit[t] -= frequency * count(t in output) + presence * (count > 0)."""

    def __init__(self, frequency: float, presence: float, prompt_len: int):
        self.frequency, self.presence, self.prompt_len = frequency, presence, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def hf_penalised(model_dir, prompt: list[int], n: int, repetition: float, frequency: float, presence: float):
    from transformers import AutoModelForCausalLM, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(repetition),
                                 OpenAIPenalties(frequency, presence, len(prompt))])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
                             logits_processor=procs)
    return out[0, len(prompt):].tolist()


def test_penalised_greedy_equals_transformers(tiny_qwen3):
    rng = random.Random(3)
    # short, repetitive prompts: the penalties change the answer
    prompts = [[rng.randrange(3, 60) for _ in range(rng.randrange(5, 40))] for _ in range(3)]
    pens = [(1.3, 0.5, 0.4), (1.0, 1.2, 0.0), (0.8, 0.0, -0.5)]  # (repetition, frequency, presence)
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=r,
                             frequency_penalty=f, presence_penalty=p) for r, f, p in pens]
    want = [hf_penalised(tiny_qwen3, pr, 24, *pen) for pr, pen in zip(prompts, pens)]
    plain = LLM(tiny_qwen3).generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in plain] != want  # the penalties matter here
    # a small cache: sequences are preempted and come back to their slots' counts
    llm = LLM(tiny_qwen3, num_kv_blocks=20, block_size=4)
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == want
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.block_manager.check_idle()
    assert sorted(llm.engine._penalty_slots_free) == list(range(llm.engine.config.max_num_seqs))
