"""Plain-torch reference implementations: the functions every Triton kernel must equal.

Layout shared by every op and by the engine's cache:
    kv_layer      [2, num_blocks, block_size, num_kv_heads, head_dim]   (K then V) of one layer
    slot_mapping  [n] int: slot = block_id * block_size + offset; a negative slot is skipped
    block_tables  [batch, max_blocks] int32, padded with any valid id (only the first
                  ceil(context_len / block_size) entries of a row are read)
    context_lens  [batch] int32: tokens of context of each sequence, new tokens included
Arithmetic is float32 whatever the storage dtype; outputs take the input's dtype.

FP8 KV cache (float8_e4m3fn): one scale per tensor, fixed at 1.0 (docs/PERFORMANCE.md, "FP8
(issue 26)", says why), so storing is a saturating cast (clamp to +-448, round to nearest
even) and reading is a plain upcast; attention reads FP8 K/V through the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in the cache's dtype; into FP8 by a saturating cast (torch's own cast turns values
    past 448 into NaN)."""
    if dtype == torch.float8_e4m3fn and x.dtype != dtype:
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 float8_e4m3fn, scale [M, 1] float32), x ~= x8 * scale: one scale a row
    (amax / 448, floored at 1e-12 so an all-zero row stays finite)."""
    xf = x.float()
    # amax times float32(1 / 448), spelled out: torch divides by a scalar that way on CUDA and
    # not on CPU, and the kernel must match both
    inv = torch.tensor(1.0 / FP8_MAX, dtype=torch.float32, device=x.device)
    scale = (xf.abs().amax(-1, keepdim=True) * inv).clamp_min(1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_matmul(x8, x_scale, w8, w_scale, bias, out_dtype):
    """(x8 @ w8.T) * x_scale * w_scale (+ bias) in float32: x8 [M, K], w8 [N, K] FP8, x_scale
    [M, 1], w_scale [N] float32 (per token, per output channel)."""
    y = (x8.float() * x_scale) @ (w8.float() * w_scale[:, None]).t()
    return (y if bias is None else y + bias.float()).to(out_dtype)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write rows k[i], v[i] ([n, Hkv, D]) into kv_layer at slot_mapping[i]."""
    flat = kv_layer.view(2, -1, kv_layer.shape[3], kv_layer.shape[4])
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    flat[0, slots] = to_cache_dtype(k[keep], kv_layer.dtype)
    flat[1, slots] = to_cache_dtype(v[keep], kv_layer.dtype)


def gather_kv(kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """The rows at slot_mapping as one contiguous buffer [2, n, Hkv, D]."""
    flat = kv_layer.view(2, -1, kv_layer.shape[3], kv_layer.shape[4])
    return flat[:, slot_mapping.long()].contiguous()


def scatter_kv(buf: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Inverse of gather_kv into a cache whose block size and block ids may differ."""
    store_kv(buf[0], buf[1], kv_layer, slot_mapping)


def _context(kv_layer: torch.Tensor, block_table: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    bs = kv_layer.shape[2]
    blocks = block_table[: (n + bs - 1) // bs].long()
    k = kv_layer[0, blocks].flatten(0, 1)[:n]
    v = kv_layer[1, blocks].flatten(0, 1)[:n]
    return k.float(), v.float()


def prefill_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Causal attention of new tokens over their whole context (cached prefix + new).

    q [T, Hq, D] holds the new tokens of each sequence back to back (cu_seqlens_q [B+1]);
    sequence i's new tokens are the last q_len of its context_lens[i] tokens, and their
    K/V are already stored in the cache.
    """
    out = torch.empty_like(q)
    group = q.shape[1] // kv_layer.shape[3]
    cu = cu_seqlens_q.tolist()
    for i, n in enumerate(context_lens.tolist()):
        qi = q[cu[i] : cu[i + 1]].float()
        q_len = qi.shape[0]
        k, v = _context(kv_layer, block_tables[i], n)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
        q_pos = torch.arange(n - q_len, n, device=q.device)[:, None]
        k_pos = torch.arange(n, device=q.device)[None, :]
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
        out[cu[i] : cu[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


def decode_attention(
    q: torch.Tensor, kv_layer: torch.Tensor, context_lens: torch.Tensor,
    block_tables: torch.Tensor, scale: float,
) -> torch.Tensor:
    """One query token per sequence (q [B, Hq, D]) over its context_lens[i] cached tokens."""
    B, Hq, D = q.shape
    Hkv, bs = kv_layer.shape[3], kv_layer.shape[2]
    group = Hq // Hkv
    max_blocks = block_tables.shape[1]
    k = kv_layer[0, block_tables.long()].reshape(B, max_blocks * bs, Hkv, D).float()
    v = kv_layer[1, block_tables.long()].reshape(B, max_blocks * bs, Hkv, D).float()
    qg = q.float().view(B, Hkv, group, D)
    scores = torch.einsum("bhgd,bkhd->bhgk", qg, k) * scale
    pad = torch.arange(max_blocks * bs, device=q.device)[None, :] >= context_lens[:, None]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    v = v.masked_fill(pad[:, :, None, None], 0.0)  # slots past the context hold anything, NaN included
    out = torch.einsum("bhgk,bkhd->bhgd", scores.softmax(-1), v)
    return out.reshape(B, Hq, D).to(q.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add fused into the norm."""
    s = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(s, weight, eps), s


def rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """rms_norm (the residual added first when given) quantized per row for an FP8 linear:
    (x8, scale [..., 1], x + residual or None), quantize_rows of the norm's output exactly."""
    if residual is None:
        out, summed = rms_norm(x, weight, eps), None
    else:
        out, summed = fused_add_rms_norm(x, residual, weight, eps)
    return *_quantize_last_dim(out), summed


def _quantize_last_dim(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows over x's last dimension whatever its leading ones: (x8, scale [..., 1])."""
    x8, scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    return x8.view(x.shape), scale.view(*x.shape[:-1], 1)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding; cos_sin_cache [max_pos, D] = cat(cos, sin) halves.

    q [T, Hq, D], k [T, Hkv, D]; returns new tensors.
    """
    cos, sin = cos_sin_cache[positions.long()].float().unsqueeze(1).chunk(2, dim=-1)

    def rot(x):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = cat(gate, up) -> silu(gate) * up [T, I]."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """silu_and_mul quantized per row for an FP8 linear: (x8 [..., I], scale [..., 1])."""
    return _quantize_last_dim(silu_and_mul(x))
