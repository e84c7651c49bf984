import argparse
import copy
import json
import math

import pytest
import tokenizers
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from baton.modelzoo import tiny
from baton.modelzoo.hf_files import add_published_rope_keys
from baton.modelzoo.tiny import make_tiny_model
from tests.engine.hf_reference import hf_chat_inputs

CLASSES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}
TEXTS = [
    "The \"if\" statement is used for conditional execution.",
    "def f(x):\n    return x ** 2  # tabs\tand  spaces ",
    "Ünïcödé “quotes” — 東京 🚀 Привет",
    "",
]


@pytest.fixture(scope="module")
def models(tiny_models):
    """arch -> the session's tiny model of that arch (the engine tests use the same ones)."""
    return {arch: tiny_models(arch) for arch in tiny.ARCHS}


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_files(models):
    for path in models.values():
        assert {p.name for p in path.iterdir()} == FILES


def test_same_seed_same_bytes(models, tmp_path):
    again = make_tiny_model(tmp_path / "again", arch="qwen3", seed=0)
    for name in FILES:
        assert (again / name).read_bytes() == (models["qwen3"] / name).read_bytes(), name
    other = make_tiny_model(tmp_path / "other", arch="qwen3", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_transformers_loads_and_generates(models, arch):
    path = models[arch]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(model).__name__ == CLASSES[arch]
    assert model.config.architectures == [CLASSES[arch]]
    tok = AutoTokenizer.from_pretrained(path)
    prompt = hf_chat_inputs(tok, "What is an assert statement?")
    n = prompt["input_ids"].shape[1]
    out = model.generate(
        **prompt, max_new_tokens=24, do_sample=False, min_new_tokens=24,
        output_scores=True, return_dict_in_generate=True,
    )
    new = out.sequences[0, n:].tolist()
    assert len(new) == 24
    assert len(set(new)) >= 8, new  # varied, not one token repeated
    gaps = torch.tensor([float(s[0].topk(2).values.diff().neg()) for s in out.scores])
    assert gaps.median() > 0.3, gaps  # greedy argmax is robust to float rounding


def test_state_dict_per_arch(models):
    qwen3, llama, qwen2 = (_tensors(models[a]) for a in ("qwen3", "llama", "qwen2"))
    assert "model.layers.0.self_attn.q_norm.weight" in qwen3
    assert "model.layers.0.self_attn.k_norm.weight" in qwen3
    assert not any(k.endswith(".bias") for k in qwen3 | llama)
    assert {"q_proj", "k_proj", "v_proj"} == {
        k.split(".")[-2] for k in qwen2 if k.endswith(".bias")
    }
    assert "lm_head.weight" not in qwen3  # tied
    for t in (qwen3, llama, qwen2):
        assert t["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)  # head_dim 32
        assert t["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 32, 64)  # GQA
        assert all(v.dtype == torch.float32 for v in t.values())
        norm = t["model.norm.weight"]
        assert not torch.equal(norm, torch.ones_like(norm))  # a skipped norm changes tokens


def test_untied(tmp_path):
    path = make_tiny_model(tmp_path / "m", tie_word_embeddings=False)
    t = _tensors(path)
    assert not torch.equal(t["lm_head.weight"], t["model.embed_tokens.weight"])
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is False


def test_tokenizer_round_trip(models):
    path = models["qwen3"]
    tok = AutoTokenizer.from_pretrained(path)
    raw = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    assert len(tok) == raw.get_vocab_size() == 2048
    assert AutoConfig.from_pretrained(path).vocab_size == 2048
    for i, special in enumerate(tiny.SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(special) == raw.token_to_id(special) == i
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == raw.encode(text).ids
        assert tok.decode(ids) == raw.decode(ids) == text
    assert tok("<|im_start|>user")["input_ids"][0] == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None  # nothing prepended
    assert tok.decode([1, 2, 0], skip_special_tokens=True) == ""


def test_chat_template(models):
    tok = AutoTokenizer.from_pretrained(models["llama"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == tok(text)["input_ids"] and ids.count(1) == 3 and ids.count(2) == 2
    config = json.loads((models["llama"] / "tokenizer_config.json").read_text())
    assert config["chat_template"] == tiny.CHATML_TEMPLATE


def test_generation_stops_at_either_eos(models):
    generation = json.loads((models["qwen3"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]
    assert json.loads((models["qwen3"] / "config.json").read_text())["eos_token_id"] == 2


def test_llama3_rope_scaling_applied(models):
    path = models["llama"]
    raw = json.loads((path / "config.json").read_text())
    assert raw["rope_scaling"]["rope_type"] == "llama3" and raw["rope_theta"] == 500000.0
    config = AutoConfig.from_pretrained(path)
    rope = config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert (rope["low_freq_factor"], rope["high_freq_factor"]) == (1.0, 4.0)
    assert rope["original_max_position_embeddings"] == 2048 < config.max_position_embeddings
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inv_freq = model.model.rotary_emb.inv_freq
    plain = 1.0 / 500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)
    ratio = (plain / inv_freq).tolist()
    kept = sum(math.isclose(r, 1.0, rel_tol=1e-5) for r in ratio)
    scaled = sum(math.isclose(r, 8.0, rel_tol=1e-5) for r in ratio)
    assert kept and scaled and kept + scaled < len(ratio)  # all three llama3 bands in use


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_published_rope_keys_read_back(models, arch):
    """transformers reads the published rope_theta/rope_scaling pair into the same rope."""
    config = json.loads((models[arch] / "config.json").read_text())
    legacy = {k: v for k, v in config.items() if k not in ("rope_parameters", "transformers_version")}
    cls = type(AutoConfig.for_model(config["model_type"]))
    # from_dict writes rope_theta into the rope_scaling dict it is given: hand it a copy.
    assert cls.from_dict(copy.deepcopy(legacy)).rope_parameters == config["rope_parameters"]
    assert add_published_rope_keys(config) == config


def test_vocab_padded_past_corpus():
    tok = tiny.train_tokenizer(6000)
    assert tok.get_vocab_size() == 6000
    assert tok.id_to_token(5999) == "<|reserved_5999|>"
    assert tok.decode([5999, 2]) == ""  # special, skipped


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        make_tiny_model(tmp_path, arch="gpt2")
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_model(tmp_path, vocab_size=100)


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    tiny.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "m"), "--arch", "qwen2", "--seed", "3", "--untied"])
    assert tiny.run(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is False
