"""Bad input raises a clear error, and leaves nothing queued or allocated."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from baton import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(tiny_qwen3)


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(tiny_qwen3, tmp_path):
    d = copy_model(tiny_qwen3, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'MambaForCausalLM'"):
        LLM(d)


def test_missing_tensor_is_named(tiny_qwen3, tmp_path):
    d = copy_model(tiny_qwen3, tmp_path / "m")
    weights = load_file(d / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors for: model\.layers\.1\.self_attn\.k_proj\.weight"):
        LLM(d)


def test_unexpected_tensor_is_named(tiny_qwen3, tmp_path):
    d = copy_model(tiny_qwen3, tmp_path / "m")
    weights = load_file(d / "model.safetensors")
    weights["model.layers.9.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"].clone()
    save_file(weights, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.9\.mlp\.up_proj\.weight"):
        LLM(d)


def test_not_a_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(tmp_path)


def test_prompt_longer_than_context(llm):
    n = llm.engine.max_model_len
    with pytest.raises(ValueError, match=f"the prompt has {n} tokens; this model's context is {n}"):
        llm.generate([[5] * n], SamplingParams(max_tokens=1))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("bad", [0, -3])
def test_max_tokens_below_one(bad):
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        SamplingParams(max_tokens=bad)


def test_empty_prompt_list(llm):
    with pytest.raises(ValueError, match="prompts is empty"):
        llm.generate([], SamplingParams())


def test_empty_prompt_and_bad_token(llm):
    with pytest.raises(ValueError, match="the prompt is empty"):
        llm.generate([[5, 6], []], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 10**6]], SamplingParams())
    assert not llm.engine.has_unfinished_requests()  # nothing half-queued
    llm.engine.block_manager.check_idle()


def test_unknown_option(tiny_qwen3):
    with pytest.raises(TypeError, match="unknown LLM option"):
        LLM(tiny_qwen3, blok_size=8)


def test_generation_stops_at_max_model_len(tiny_qwen3):
    llm = LLM(tiny_qwen3, max_model_len=40)
    out = llm.generate([[7] * 30], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"
