"""Tiny random models of real architectures (Qwen3, Llama 3, Qwen2) as Hugging Face directories.

The directory holds what a published checkpoint holds: `config.json` (with both
transformers 5's `rope_parameters` and the published `rope_theta`/`rope_scaling`) and
`generation_config.json` written by transformers' own config class, `model.safetensors`
written by transformers' own model class, and a byte-level BPE `tokenizer.json` with a
`tokenizer_config.json` that carries a ChatML `chat_template`. Same arguments, same bytes.

The tokenizer is trained on `tiny_corpus.txt`, shipped beside this file: the first
~130 KB of the Python Language Reference topics in CPython 3.11.7's
`pydoc_data/topics.py` (PSF licence). Shipping the text rather than reading it from the
running interpreter keeps the tokenizer the same on every Python version.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from baton.modelzoo import hf_files

ARCHS = ("qwen3", "llama", "qwen2")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
ENDOFTEXT_ID, IM_END_ID = 0, 2

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = Path(__file__).with_name("tiny_corpus.txt")

# Weight scale. The engine's tests compare greedy token ids with transformers in float32,
# so the argmax must not hinge on float rounding. With transformers' default init
# (std 0.02) the top-2 logit gap is fine but every prompt decodes to one token repeated:
# the residual stream is the input embedding, and with tied embeddings the token's own
# logit wins. Embeddings (and lm_head) at std 1.0 and every other matrix at
# 3/sqrt(fan_in) let the layers move the stream. Measured on the default shapes, 8 models
# (qwen3 seeds 0-3, llama and qwen2 seeds 0-1), 8 ChatML prompts x 32 greedy tokens each
# (2048 steps): top-2 gap median 1.65, 10th percentile 0.23, 4.8% of steps under 0.1
# (float32 noise is ~1e-5), and 22-32 distinct tokens out of 32 for most prompts (the
# fewest: 8). Norm weights are 1 + N(0, 0.1) and the qwen2 qkv biases N(0, 0.5), so an
# engine that skips loading either gives different tokens.
EMBED_STD = 1.0
LINEAR_GAIN = 3.0
NORM_JITTER = 0.1
BIAS_STD = 0.5

# Llama 3.1's rope scaling, with the pretraining length set below max_position_embeddings
# as in the real model (8192 < 131072); transformers warns otherwise. For head_dim 32 and
# the default max_position_embeddings 4096 (original 2048) the three bands of llama3
# scaling -- kept, smoothed, divided by `factor` -- all hold some frequencies.
LLAMA_ROPE_THETA = 500000.0
QWEN_ROPE_THETA = 1000000.0


def make_tiny_model(
    dest: str | Path,
    arch: str = "qwen3",
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 128,
    vocab_size: int = 2048,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 4096,
) -> Path:
    """Write a random-weight model of `arch` into `dest` (created if needed) and return it."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials)")
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    config = _config(
        arch,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
    )
    _write_model(config, seed, dest)
    _write_tokenizer(vocab_size, max_position_embeddings, dest)
    hf_files.make_readable(dest)
    return dest


def _config(arch: str, **shape):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    ids = dict(bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID)
    if arch == "qwen3":
        rope = {"rope_type": "default", "rope_theta": QWEN_ROPE_THETA}
        return Qwen3Config(**shape, **ids, rope_parameters=rope, rms_norm_eps=1e-6)
    if arch == "qwen2":
        # Qwen2Config has no head_dim field, but Qwen2Attention reads `config.head_dim`
        # when present, and it is saved in config.json like any extra key.
        rope = {"rope_type": "default", "rope_theta": QWEN_ROPE_THETA}
        return Qwen2Config(**shape, **ids, rope_parameters=rope, rms_norm_eps=1e-6)
    original = min(8192, shape["max_position_embeddings"] // 2)
    rope = {
        "rope_type": "llama3",
        "rope_theta": LLAMA_ROPE_THETA,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original,
    }
    return LlamaConfig(**shape, **ids, rope_parameters=rope, rms_norm_eps=1e-5)


def _write_model(config, seed: int, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() lists a tied lm_head once, under embed_tokens.
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + NORM_JITTER * noise)
            elif "embed_tokens" in name or "lm_head" in name:
                param.copy_(EMBED_STD * noise)
            elif name.endswith(".bias"):
                param.copy_(BIAS_STD * noise)
            else:
                param.copy_(LINEAR_GAIN / param.shape[1] ** 0.5 * noise)
    # Chat turns end with <|im_end|>, raw text with <|endoftext|>: stop at either, as Qwen does.
    model.generation_config = GenerationConfig(
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
        pad_token_id=ENDOFTEXT_ID,
    )
    model.save_pretrained(dest)
    hf_files.rewrite_config(dest / "config.json")


def train_tokenizer(vocab_size: int):
    """Byte-level BPE with exactly `vocab_size` ids: 3 specials, 256 bytes, merges, padding.

    When the corpus runs out of merges (near 5,000 ids) the rest are `<|reserved_N|>`
    special tokens, as Llama 3 pads its vocabulary.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([CORPUS.read_text(encoding="utf-8")], trainer)
    short = vocab_size - tokenizer.get_vocab_size()
    if short > 0:
        first = tokenizer.get_vocab_size()
        tokenizer.add_special_tokens(
            [AddedToken(f"<|reserved_{i}|>", special=True) for i in range(first, first + short)]
        )
    assert tokenizer.get_vocab_size() == vocab_size, (tokenizer.get_vocab_size(), vocab_size)
    return tokenizer


def _write_tokenizer(vocab_size: int, max_position_embeddings: int, dest: Path) -> None:
    train_tokenizer(vocab_size).save(str(dest / "tokenizer.json"))
    # No BOS is prepended (bos_token null), as in Qwen's tokenizers.
    hf_files.write_tokenizer_config(
        dest,
        chat_template=CHATML_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=max_position_embeddings,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dest", type=Path, help="directory to write the model into")
    parser.add_argument("--arch", choices=ARCHS, default="qwen3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--intermediate-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument(
        "--untied", dest="tie_word_embeddings", action="store_false", help="separate lm_head"
    )
    parser.add_argument("--max-position-embeddings", type=int, default=4096)


def run(args: argparse.Namespace) -> int:
    path = make_tiny_model(
        args.dest,
        arch=args.arch,
        seed=args.seed,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size,
        tie_word_embeddings=args.tie_word_embeddings,
        max_position_embeddings=args.max_position_embeddings,
    )
    print(path)
    return 0
