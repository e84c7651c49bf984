"""The one decoder: Qwen3 / Qwen2 / Llama as a plain nn.Module tree over a paged KV cache.

Attention metadata is passed explicitly (no global context). q/k/v and gate/up are
packed into one matmul each; `load_weights` splits Hugging Face tensors into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from baton.engine.config import ModelConfig
from baton.engine.quant import Fp8Rows
from baton.kernels import ops


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged cache (built by the model runner)."""

    slot_mapping: torch.Tensor  # [T] slot of each new token
    context_lens: torch.Tensor  # [B] context of each sequence, new tokens included
    block_tables: torch.Tensor  # [B, max_blocks]
    cu_seqlens_q: torch.Tensor | None  # [B+1]; None on a decode-only step
    max_q_len: int = 1

    @property
    def is_decode(self) -> bool:
        return self.cu_seqlens_q is None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None, fp8=False):
        """The norm of x (+ residual, then also returned); fp8: quantized per row for an FP8
        linear (quant.Fp8Rows), in one kernel."""
        if fp8:
            x8, scale, summed = ops.rms_norm_fp8(x, residual, self.weight, self.eps)
            rows = Fp8Rows(x8, scale, x.dtype)
            return rows if residual is None else (rows, summed)
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


def _takes_fp8(linear: nn.Module) -> bool:
    return getattr(linear, "takes_fp8", False)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.h * self.d, self.hkv * self.d
        self.scale = self.d**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, positions, x, kv_layer, meta: AttentionMetadata, cos_sin):
        T = (x.x8 if isinstance(x, Fp8Rows) else x).shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k, v = q.view(T, self.h, self.d), k.view(T, self.hkv, self.d), v.view(T, self.hkv, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = ops.rotary_embedding(positions, q, k, cos_sin)
        ops.store_kv(k, v, kv_layer, meta.slot_mapping)
        if meta.is_decode:
            o = ops.decode_attention(q, kv_layer, meta.context_lens, meta.block_tables, self.scale)
        else:
            o = ops.prefill_attention(
                q, kv_layer, meta.cu_seqlens_q, meta.context_lens, meta.block_tables, self.scale,
                meta.max_q_len,
            )
        return self.o_proj(o.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        h = self.gate_up_proj(x)
        if _takes_fp8(self.down_proj):
            return self.down_proj(Fp8Rows(*ops.silu_and_mul_fp8(h), h.dtype))
        return self.down_proj(ops.silu_and_mul(h))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, kv_layer, meta, cos_sin):
        fp8_attn, fp8_mlp = _takes_fp8(self.self_attn.qkv_proj), _takes_fp8(self.mlp.gate_up_proj)
        if residual is None:
            residual = x
            x = self.input_layernorm(x, fp8=fp8_attn)
        else:
            x, residual = self.input_layernorm(x, residual, fp8=fp8_attn)
        x = self.self_attn(positions, x, kv_layer, meta, cos_sin)
        x, residual = self.post_attention_layernorm(x, residual, fp8=fp8_mlp)
        return self.mlp(x), residual


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # the RoPE table [max positions, head_dim], float32 on the model's device: set by
        # whoever places the model there (the runner), not a buffer, so that casting the
        # model to bf16 never rounds it
        self.cos_sin: torch.Tensor | None = None

    def forward(
        self, input_ids, positions, kv_cache, meta: AttentionMetadata,
        on_layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Hidden states [T, hidden]. `on_layer_done(i)` runs once layer i's KV is in the
        cache (the prefill pod pushes that layer to the decode pod from there)."""
        x, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, kv_cache[i], meta, self.cos_sin)
            if on_layer_done is not None:
                on_layer_done(i)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return (hidden @ w.t()).float()


# Hugging Face tensor name suffix -> (our parameter, shard index within the packed parameter)
_PACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def hf_to_param(name: str, model: CausalLM) -> tuple[str, int | None]:
    """Map a Hugging Face tensor name to (our parameter name, packed shard or None)."""
    if name.startswith("model."):
        name = name[len("model."):]
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p in _PACKED:
            ours, shard = _PACKED[p]
            return ".".join(parts[:i] + [ours] + parts[i + 1 :]), shard
    return name, None


def shard_bounds(model: CausalLM, param: str, shard: int) -> tuple[int, int]:
    cfg = model.cfg
    if ".qkv_proj." in param or param.startswith("qkv_proj"):
        sizes = [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
    else:
        sizes = [cfg.intermediate_size, cfg.intermediate_size]
    start = sum(sizes[:shard])
    return start, start + sizes[shard]


def param_to_hf(name: str, shard: int | None) -> str:
    """The Hugging Face tensor name that fills (our parameter, shard): for error messages."""
    if shard is not None:
        for hf, (ours, i) in _PACKED.items():
            if i == shard and f".{ours}." in f".{name}":
                name = name.replace(ours, hf)
                break
    return name if name.startswith("lm_head") else "model." + name
