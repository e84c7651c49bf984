"""What a pod refuses about a prompt's length, worded once (torch-free: the router checks it too).

The router refuses, before routing, any prompt every live pod would refuse, with the same
words the pod's engine uses; both call this function with the `max_model_len` the pod
publishes (the model's context capped by what the pod's KV cache holds).
"""

from __future__ import annotations


def prompt_length_error(prompt_len: int, max_model_len: int) -> str | None:
    """None when a prompt of `prompt_len` tokens leaves room to generate at least one token."""
    if prompt_len == 0:
        return "The prompt is empty."
    if prompt_len >= max_model_len:
        return (
            f"This model's maximum context length is {max_model_len} tokens. However, the prompt has "
            f"{prompt_len} tokens, and at least one token must be left to generate. "
            "Please reduce the length of the prompt."
        )
    return None
