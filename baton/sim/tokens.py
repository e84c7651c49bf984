"""The simulated model's output: token ids that are a pure function of (prompt, seed,
position), never an end-of-sequence id (so a request runs to max_tokens or a stop token)."""

from __future__ import annotations

import hashlib

import numpy as np

_MASK = (1 << 64) - 1


def request_key(prompt: list[int], seed: int) -> int:
    """The 64-bit key a request's tokens derive from (computed once per request)."""
    h = hashlib.blake2b(np.asarray(prompt, dtype=np.int64).tobytes(), digest_size=8,
                        key=int(seed & _MASK).to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little")


def token_at(key: int, position: int, vocab_size: int, avoid: frozenset[int]) -> int:
    """The token at `position` (splitmix64 of key and position), skipping ids in `avoid`."""
    z = (key + (position + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    t = (z ^ (z >> 31)) % vocab_size
    while t in avoid:
        t = (t + 1) % vocab_size
    return t
