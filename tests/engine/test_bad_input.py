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


POISON_SEED = 666


def test_a_row_whose_logits_go_bad_fails_its_request_alone(tiny_qwen3, monkeypatch):
    """NaN logits in one request's row (injected) end that request with finish_reason
    "error"; the others in the same steps go on to their colocated answer, and every block
    comes back. A temperature of 1e-40 is greedy, not NaN."""
    from baton.engine import model_runner
    from baton.engine.engine import LLMEngine

    real = model_runner.sample_batch

    def poisoned(logits, st, penalties=None):
        bad_rows = st.seeds == POISON_SEED
        if bool(bad_rows.any()):
            logits = logits.clone()
            logits[bad_rows] = float("nan")
        return real(logits, st, penalties)

    prompts = [[5 + i, 77, 300 + i, 9] * 3 for i in range(3)]
    victims = [SamplingParams(max_tokens=20, temperature=0.8, seed=i, ignore_eos=True) for i in range(2)]
    want = LLM(tiny_qwen3).generate(prompts[:2], victims)
    monkeypatch.setattr(model_runner, "sample_batch", poisoned)
    engine = LLMEngine(tiny_qwen3)
    engine.add_request("a", prompts[0], victims[0])
    engine.add_request("tiny-t", prompts[2], SamplingParams(max_tokens=20, temperature=1e-40, ignore_eos=True))
    engine.add_request("b", prompts[1], victims[1])
    out: dict = {"a": [], "b": [], "tiny-t": []}
    reasons = {}
    for step in range(200):
        if step == 3:  # it joins mid-flight, and goes bad at its first token
            engine.add_request("bad", prompts[2], SamplingParams(max_tokens=20, seed=POISON_SEED))
            out["bad"] = []
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
            if o.finish_reason:
                reasons[o.request_id] = (o.finish_reason, o.error)
        if not engine.has_unfinished_requests():
            break
    assert reasons["bad"][0] == "error" and "not finite" in reasons["bad"][1] and out["bad"] == []
    assert [out["a"], out["b"]] == [w.token_ids for w in want]
    assert reasons["a"] == reasons["b"] == reasons["tiny-t"] == ("length", None)
    greedy = LLM(tiny_qwen3).generate([prompts[2]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    assert out["tiny-t"] == greedy[0].token_ids
    engine.block_manager.check_idle()
