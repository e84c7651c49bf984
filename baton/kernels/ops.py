"""The facade: Triton kernels for CUDA tensors, plain-torch references elsewhere.

Set BATON_TRITON=0 to force the references on CUDA too (for comparisons and bisecting).
"""

from __future__ import annotations

import os

import torch

from baton.kernels import reference, sampling_reference

_TRITON_ON = os.environ.get("BATON_TRITON", "1") != "0"


def _impl(t: torch.Tensor):
    if _TRITON_ON and t.is_cuda:
        from baton.kernels import triton_ops

        return triton_ops
    return reference


def store_kv(k, v, kv_layer, slot_mapping):
    return _impl(kv_layer).store_kv(k, v, kv_layer, slot_mapping)


def gather_kv(kv_layer, slot_mapping):
    return _impl(kv_layer).gather_kv(kv_layer, slot_mapping)


def scatter_kv(buf, kv_layer, slot_mapping):
    return _impl(kv_layer).scatter_kv(buf, kv_layer, slot_mapping)


def prefill_attention(q, kv_layer, cu_seqlens_q, context_lens, block_tables, scale, max_q_len=None):
    if _impl(q) is reference:
        return reference.prefill_attention(q, kv_layer, cu_seqlens_q, context_lens, block_tables, scale)
    return _impl(q).prefill_attention(q, kv_layer, cu_seqlens_q, context_lens, block_tables, scale, max_q_len)


def decode_attention(q, kv_layer, context_lens, block_tables, scale):
    return _impl(q).decode_attention(q, kv_layer, context_lens, block_tables, scale)


def quantize_rows(x):
    """x [M, K] -> (FP8 x8, float32 scale [M, 1]) per row: reference.quantize_rows."""
    if _TRITON_ON and x.is_cuda:
        from baton.kernels import triton_quant

        return triton_quant.quantize_rows(x)
    return reference.quantize_rows(x)


def fp8_matmul(x8, x_scale, w8, w_scale, bias, out_dtype):
    """(x8 @ w8.T) * x_scale * w_scale (+ bias): reference.fp8_matmul; on CUDA torch._scaled_mm
    (FP8 tensor cores, row-wise scales)."""
    if x8.is_cuda:
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale[None, :], bias=bias,
                                out_dtype=out_dtype)
    return reference.fp8_matmul(x8, x_scale, w8, w_scale, bias, out_dtype)


def rms_norm(x, weight, eps):
    return _impl(x).rms_norm(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps):
    return _impl(x).fused_add_rms_norm(x, residual, weight, eps)


def rms_norm_fp8(x, residual, weight, eps):
    """(x8, scale, x + residual or None): rms_norm quantized per row, reference.rms_norm_fp8;
    on CUDA one kernel (the norm's output is never written in bf16)."""
    return _impl(x).rms_norm_fp8(x, residual, weight, eps)


def rotary_embedding(positions, q, k, cos_sin_cache):
    return _impl(q).rotary_embedding(positions, q, k, cos_sin_cache)


def silu_and_mul(x):
    return _impl(x).silu_and_mul(x)


def silu_and_mul_fp8(x):
    """(x8, scale): silu_and_mul quantized per row, reference.silu_and_mul_fp8; on CUDA one kernel."""
    return _impl(x).silu_and_mul_fp8(x)


def sample_tokens(x, temperature, top_k, top_p, min_p, seeds, positions, greedy_below, max_top_k=0):
    """Batched sampler over processed logits: (tokens [B] int64, bad [B] bool), no host sync.
    Semantics and the Philox mapping: sampling_reference's docstring. `max_top_k`: the batch's
    largest top_k, a hint (0: unknown or none)."""
    if _TRITON_ON and x.is_cuda:
        from baton.kernels import triton_sampling

        return triton_sampling.sample_tokens(
            x, temperature, top_k, top_p, min_p, seeds, positions, greedy_below, max_top_k)
    return sampling_reference.sample_tokens(x, temperature, top_k, top_p, min_p, seeds, positions, greedy_below)


def apply_bitmask(logits, bitmask):
    """logits [B, V] with what each row's packed token bitmask [B, W] forbids set to -inf, in
    place (structured outputs; semantics: sampling_reference.apply_bitmask)."""
    if _TRITON_ON and logits.is_cuda:
        from baton.kernels import triton_sampling

        return triton_sampling.apply_bitmask(logits, bitmask)
    return sampling_reference.apply_bitmask(logits, bitmask)


def apply_penalties(x, counts, in_prompt, presence, frequency, repetition):
    # elementwise torch on every device: a handful of passes over [B, V], only on steps that
    # have a penalised row; a fused Triton kernel is the next step if it shows in profiles
    return sampling_reference.apply_penalties(x, counts, in_prompt, presence, frequency, repetition)
