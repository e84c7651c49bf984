"""transformers' own greedy generate, the correctness anchor (float32, CPU, one prompt at a time).

Answers are kept for the session: several tests (each engine mode, a repeated prompt) ask for
the same prompt's tokens, and transformers' generate is most of what they cost.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def _model(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model_dir, prompt: list[int], max_new_tokens: int, stop_at_eos: bool) -> list[int]:
    """Generated ids; with stop_at_eos the model's eos ends generation (eos included)."""
    return list(_greedy(str(model_dir), tuple(prompt), max_new_tokens, stop_at_eos))


def hf_chat_inputs(tok, content: str) -> dict:
    """generate()'s inputs for one user message under the tokenizer's chat template."""
    return tok.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


@functools.cache
def _greedy(model_dir: str, prompt: tuple[int, ...], max_new_tokens: int, stop_at_eos: bool) -> tuple[int, ...]:
    model = _model(model_dir)
    kw = {} if stop_at_eos else {"eos_token_id": None}
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kw,
        )
    return tuple(out[0, len(prompt):].tolist())
