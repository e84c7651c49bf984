"""Model config (read from a Hugging Face config.json) and engine options.

One decoder serves Qwen3 (q/k norm), Qwen2/2.5 (qkv bias) and Llama 3.x (llama3 rope
scaling, SmolLM2 included); everything that differs between them is a field here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ARCHITECTURES = {
    "Qwen3ForCausalLM": dict(qk_norm=True, qkv_bias=False),
    "Qwen2ForCausalLM": dict(qk_norm=False, qkv_bias=True),
    "LlamaForCausalLM": dict(qk_norm=False, qkv_bias=False),
}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qk_norm: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]
    # an FP8 checkpoint (quantization_config quant_method "fp8"): its weight blocks, e.g.
    # (128, 128) as in Qwen3-8B-FP8; None for a bf16/float32 checkpoint
    fp8_weight_block: tuple[int, int] | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        d = Path(model_dir)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d} is not a model directory: no config.json")
        c = json.loads((d / "config.json").read_text())
        arch = (c.get("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r} in {d / 'config.json'}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        # transformers >= 5 writes rope settings as `rope_parameters`; older files use
        # `rope_theta` + `rope_scaling`.
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope type {rope_type!r} in {d / 'config.json'}")
        eos = c.get("eos_token_id")
        gen = d / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id", eos)
        eos_ids = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        heads = c["num_attention_heads"]
        quant = c.get("quantization_config") or {}
        fp8_block = None
        if quant:
            if quant.get("quant_method") != "fp8" or quant.get("activation_scheme", "dynamic") != "dynamic":
                raise ValueError(
                    f"unsupported quantization_config {quant} in {d / 'config.json'}; supported: "
                    "quant_method fp8 with block-wise weight_scale_inv and dynamic activations"
                )
            fp8_block = tuple(quant.get("weight_block_size") or ())
            if len(fp8_block) != 2:
                raise ValueError(
                    f"FP8 checkpoint {d} has no weight_block_size [rows, cols]: only block-wise "
                    "weight_scale_inv (as Qwen3-8B-FP8 ships) is supported"
                )
        return cls(
            architecture=arch,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            # attention_bias overrides the family default where a config states it
            qkv_bias=bool(c.get("attention_bias", ARCHITECTURES[arch]["qkv_bias"])),
            qk_norm=ARCHITECTURES[arch]["qk_norm"],
            fp8_weight_block=fp8_block,
        )

    def kv_layer_shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        """One layer's KV of `num_tokens` tokens as the hand-off moves it: [K|V, tokens, Hkv, D]."""
        return (2, num_tokens, self.num_kv_heads, self.head_dim)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def knob(default, help: str):
    """An engine option with its one line of documentation (pods turn each into a flag)."""
    return field(default=default, metadata={"help": help})


# The step's token budget when none is given, by device. On a GPU a larger budget batches
# more prompt tokens per step (the offline throughput rises with it, see PERFORMANCE.md);
# on a CPU a step of 2048 tokens already takes seconds, and a larger one only stalls decodes.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 16384, "cpu": 2048}
# Prompt tokens beside decodes on a GPU. With the decodes in their CUDA graph and the chunk in a
# prefill graph of its own, a step of 128 decodes and 1,024 prompt tokens costs ~1.8 decode
# steps (Qwen3-0.6B, H200), the whole budget's 16k tokens ~8. Served on the H200 (issue 23's
# load, docs/PERFORMANCE.md "Prompt tokens beside decodes"): without a cap ITL p99 was 4-6x
# TPOT p99; 512 made it 1.5-2.1x with TTFT p50 68-107 ms instead of 177-195 ms, for ~11% of the
# throughput and a longer TTFT tail (p99 ~1 s against 0.3 s); 1,024 sat at 2.0-2.35x. The
# offline API (engine/llm.py, OFFLINE_DEFAULTS) lifts the cap: nobody watches its streams.
DEFAULT_PREFILL_TOKENS_WHEN_DECODING: dict[str, int] = {"cuda": 512}


@dataclass
class EngineConfig:
    """Engine options: one name and one default each. Pods' settings inherit them."""

    block_size: int = knob(16, "tokens per KV block")
    num_kv_blocks: int | None = knob(None, "KV cache blocks (default: from memory)")
    kv_cache_bytes: int = knob(1 << 30, "KV cache bytes on CPU when num_kv_blocks is unset")
    gpu_memory_utilization: float = knob(0.85, "share of GPU memory the engine may use")
    max_num_seqs: int = knob(256, "most sequences in one running batch")
    # decode tokens + prefill chunks: a prompt longer than what is left of it is prefilled
    # in chunks over several steps
    max_num_batched_tokens: int | None = knob(
        None, "token budget of one engine step (default: 16384 on a GPU, 2048 on a CPU)")
    # A step that decodes takes at most this many prompt tokens besides, so running streams
    # stall for shorter steps while prompts arrive, in more of them. A step with nothing to
    # decode (a prefill pod; an idle batch) still takes the whole budget.
    max_prefill_tokens_when_decoding: int | None = knob(
        None, "prompt tokens in a step that also decodes (default: 512 on a GPU, the step's whole "
        "budget on a CPU; 0: the whole budget)")
    max_model_len: int | None = knob(None, "longest sequence (default: the model's, capped by the KV cache)")
    enable_prefix_caching: bool = knob(True, "reuse cached KV blocks across requests")
    device: str = knob("auto", "cuda, cuda:N, cpu or auto (cuda when available)")
    dtype: str = knob("auto", "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    cuda_graphs: bool = knob(True, "capture decode steps and prompt chunks (by token bucket) as CUDA graphs")
    split_mixed_steps: bool = knob(
        True, "in a step that decodes and prefills, run the decodes in their CUDA graph apart from the prompt chunks")
    async_scheduling: bool = knob(
        True, "launch step N+1 before reading step N's tokens back (the CPU prepares while the GPU computes)")
    seed: int | None = knob(None, "seed of the generator that draws seeds for requests that give none (default: unpredictable)")
    load_format: str = knob(
        "safetensors", "safetensors, or random (random weights of the config's shapes, for benchmarks)")
    kv_cache_dtype: Literal["auto", "fp8"] = knob(
        "auto", "auto (the model's dtype) or fp8 (e4m3, scale 1.0 per tensor: half the bytes of bf16)")
    quantization: Literal["none", "fp8"] = knob(
        "none", "fp8: quantize linear weights at load (per-channel e4m3, dynamic per-token "
        "activations); FP8 checkpoints are served in FP8 whatever this says")

    def batched_tokens(self, device_type: str) -> int:
        """The step's token budget on a device of this type."""
        return self.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS.get(device_type, 2048)

    def prefill_tokens_when_decoding(self, device_type: str) -> int:
        """Most prompt tokens in a step that also decodes, on a device of this type."""
        cap = self.max_prefill_tokens_when_decoding
        if cap is None:
            cap = DEFAULT_PREFILL_TOKENS_WHEN_DECODING.get(device_type)
        budget = self.batched_tokens(device_type)
        return min(cap, budget) if cap else budget  # 0: no cap
