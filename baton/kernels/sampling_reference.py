"""Plain-torch reference of the batched sampler: Philox noise, top-k/top-p/min-p, Gumbel-max.

`triton_sampling.py` must equal this, token for token, on the same inputs.

Randomness (the contract every pod shares, CPU or GPU): the noise behind token id i of a row
with 64-bit seed S sampling the token at sequence position p is Philox4x32-10, exactly as
Triton's `tl.randint4x(S, offset)` computes it with offset = p * 2**32 + i // 4:
  key     = (S mod 2**32, S >> 32)              (Triton's seed_lo, seed_hi)
  counter = (i // 4, p mod 2**32, 0, 0)          (offset_lo, offset_hi, 0, 0)
and output word i % 4 of the four. The seed goes into the key whole and (p, i) into the
counter rather than hashing (S, p) into the key: the map (S, p, i) -> (key, counter) is then
injective, so no two draws of any requests ever share their bits. One Philox call feeds four
tokens, which quarters the generator's cost over a 150k vocabulary. The word becomes a
uniform u in [0, 1) as `tl.rand` does (uint_to_uniform_float) and the Gumbel noise is
g = -log(-log(u)).

The token is argmax over the kept set of (x / T + g), lowest id on ties; the integers and u
are identical on every device; g goes through the device's float log, so two devices can
disagree only when two candidates' scores agree to within that log's rounding (~1e-7).

Kept set, all on s = x / T (after logit_bias and penalties), in vLLM's order:
  min_p: s >= max(s) + log(min_p)               (prob >= min_p * top prob)
  top_k: s >= the k-th largest s                (ties with the k-th value all stay)
  top_p: over what min_p and top_k kept, renormalised: keep i when the mass of tokens with
         s strictly above s_i is < top_p, so the top token always stays and a tie group at
         the boundary stays whole.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
# tl.rand's uint -> [0, 1) scale, as float32
_U_SCALE = torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * b) >> 32 and (a * b) mod 2**32 for a 32-bit constant a and uint32 values b held in
    int64. The product is < 2**64, so int64's wrapping multiply holds all its bits."""
    prod = b * a
    return (prod >> 32) & _M32, prod & _M32


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on uint32 values held in int64 tensors (broadcasting), as Triton's philox_impl."""
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def random_bits(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] uint32 words (in int64) behind each row's tokens: seeds [B] int64 (two's
    complement of the 64-bit seed), positions [B] int64. One Philox call per 4 tokens."""
    dev = seeds.device
    s = seeds.to(torch.int64)[:, None]
    k0, k1 = s & _M32, (s >> 32) & _M32
    c1 = positions.to(torch.int64)[:, None] & _M32
    quads = torch.arange((vocab_size + 3) // 4, device=dev, dtype=torch.int64)[None, :]
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    words = torch.stack(philox4x32(quads, c1, zero, zero, k0, k1), dim=-1)  # [B, quads, 4]
    return words.reshape(seeds.shape[0], -1)[:, :vocab_size]


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """uint32 words (in int64) -> float32 in [0, 1), bit for bit as Triton's uint_to_uniform_float."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * _U_SCALE.to(bits.device)


def gumbel(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    u = uniform(random_bits(seeds, positions, vocab_size))
    return -torch.log(-torch.log(u))


def kept_mask(s: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: the tokens that min_p, top_k and top_p keep (module docstring), on finite
    scaled logits s [B, V] float32."""
    B, V = s.shape
    m = s.max(dim=-1, keepdim=True).values
    t = torch.where(min_p[:, None] > 0, m + torch.log(min_p[:, None]), torch.full_like(m, float("-inf")))
    k = top_k.to(torch.int64)
    use_k = (k > 0) & (k < V)
    if bool(use_k.any()):
        kth = torch.sort(s, dim=-1, descending=True).values.gather(1, (k.clamp(1, V) - 1)[:, None])
        t = torch.where(use_k[:, None], torch.maximum(t, kth), t)
    kept = s >= t
    if bool((top_p < 1).any()):
        e = torch.where(kept, torch.exp(s - m), torch.zeros_like(s))
        z = e.sum(-1, keepdim=True)
        sv, order = torch.sort(s, dim=-1, descending=True)
        se = e.gather(1, order)
        excl = se.cumsum(-1) - se  # mass strictly before each sorted position
        # a tie group's mass above is that before its first member
        first = torch.searchsorted(-sv.contiguous(), -sv.contiguous(), side="left")
        above = excl.gather(1, first)
        keep_sorted = above < top_p[:, None] * z
        keep = torch.zeros_like(kept).scatter(1, order, keep_sorted)
        kept = kept & (keep | (top_p[:, None] >= 1))
    return kept


def sample_tokens(
    x: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, greedy_below: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B] int64 and bad [B] bool from processed logits x [B, V] (float32 or bf16).

    Rows with temperature < greedy_below take argmax(x) (lowest id on ties). A row is bad
    when its scaled logits hold a NaN or +inf, or nothing finite is left: its token is 0.
    """
    x = x.float()
    B, V = x.shape
    greedy = temperature < greedy_below
    scale = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    s = x / scale[:, None]
    bad = s.isnan().any(-1) | (s == float("inf")).any(-1) | (s.max(-1).values == float("-inf"))
    tokens = torch.argmax(x, dim=-1)
    if not bool(greedy.all()):
        s_ok = torch.where(bad[:, None], torch.zeros_like(s), s)  # keep the maths finite
        kept = kept_mask(s_ok, top_k, top_p, min_p)
        score = torch.where(kept, s_ok + gumbel(seeds, positions, V), torch.full_like(s, float("-inf")))
        tokens = torch.where(greedy, tokens, torch.argmax(score, dim=-1))
    return torch.where(bad, torch.zeros_like(tokens), tokens), bad


def apply_penalties(
    x: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor, presence: torch.Tensor,
    frequency: torch.Tensor, repetition: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties on float32 logits x [B, V]: counts [B, V] of each token in the output
    so far, in_prompt [B, V] bool. Repetition divides positive and multiplies negative logits
    of tokens seen in prompt or output; then frequency * count and presence * (count > 0) are
    subtracted. Neutral values (0, 0, 1) leave a row bit for bit as it was."""
    r = repetition[:, None]
    seen = in_prompt | (counts > 0)
    x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    c = counts.to(x.dtype)
    return x - frequency[:, None] * c - presence[:, None] * (counts > 0).to(x.dtype)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (float) with the tokens each row's packed bitmask [B, W] (int32, same
    device; bit t of a row: token t allowed, xgrammar's layout) does not allow set to -inf, in
    place; bits past V are ignored, columns past the bitmask's 32*W are disallowed. Rows of all
    ones are left as they are."""
    B, V = logits.shape
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(B, -1)
    if allowed.shape[1] >= V:
        allowed = allowed[:, :V]
    else:
        allowed = torch.nn.functional.pad(allowed, (0, V - allowed.shape[1]))
    return logits.masked_fill_(allowed == 0, float("-inf"))
