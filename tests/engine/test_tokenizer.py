"""baton.engine.tokenizer against transformers' AutoTokenizer (the oracle) on a model dir."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.engine.tokenizer import IncrementalDetokenizer, Tokenizer

# with SmolLM2 in the params: under xdist, on the worker that converts it (tests/conftest.py)
pytestmark = pytest.mark.xdist_group("smollm2")

SAMPLES = [
    "",
    "Hello world",
    "  leading and trailing  ",
    "Héllo wörld, ça va? 日本語 🎉🚀👍🏽",
    "<|im_start|>user\nhi<|im_end|>\n",
    "tabs\tand\nnewlines\n\n",
    "never seen: ⅏ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2+2? "}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello wörld 🎉"},
        {"role": "user", "content": "again"},
    ],
]


@pytest.fixture(scope="module", params=["tiny_qwen3", "smollm2"])
def model_dir(request):
    # The tiny model's tokenizer and ChatML template, and SmolLM2's real ones (49k vocab).
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("add_special", [True, False])
def test_encode_decode_match_transformers(tok, hf, text, add_special):
    ids = tok.encode(text, add_special_tokens=add_special)
    assert ids == hf.encode(text, add_special_tokens=add_special)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok, hf, messages, gen):
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert tok.apply_chat_template(messages, add_generation_prompt=gen) == want
    ids = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=gen, return_dict=False
    )
    assert tok.encode(want, add_special_tokens=False) == list(ids)


def test_chat_template_errors_and_none_keys(tok, tmp_path, model_dir):
    with pytest.raises(ValueError):
        tok.apply_chat_template([])
    # None-valued keys are dropped, as transformers does (OpenAI clients send them).
    a = tok.apply_chat_template([{"role": "user", "content": "x", "name": None}])
    assert a == tok.apply_chat_template([{"role": "user", "content": "x"}])
    # raise_exception inside a template becomes a ValueError.
    (tmp_path / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": "<|im_end|>",
                "chat_template": "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
                "{{ bos_token }}{{ eos_token }}{{ messages[0]['content'] }}",
            }
        )
    )
    t2 = Tokenizer(tmp_path)
    with pytest.raises(ValueError, match="user first"):
        t2.apply_chat_template([{"role": "assistant", "content": "x"}])
    assert t2.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_end|>x"
    # Sandboxed: no reaching into Python internals.
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": "{{ messages.__class__.__mro__ }}",
            }
        )
    )
    with pytest.raises(ValueError, match="unsafe"):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_eos_ids(tok, hf):
    assert hf.eos_token_id in tok.eos_token_ids
    gen = json.loads((tok.model_dir / "generation_config.json").read_text())["eos_token_id"]
    for i in gen if isinstance(gen, list) else [gen]:
        assert i in tok.eos_token_ids


def _stream(tok, ids, prompt=None, chunk=1):
    det = IncrementalDetokenizer(tok, prompt_ids=prompt)
    deltas = []
    for i in range(0, len(ids), chunk):
        d = det.push(ids[i : i + chunk])
        assert "\ufffd" not in d or "\ufffd" in tok.decode(ids)
        deltas.append(d)
    deltas.append(det.finish())
    return deltas


@pytest.mark.parametrize("text", SAMPLES)
def test_incremental_detokenizer_equals_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert "".join(_stream(tok, ids)) == tok.decode(ids)
    assert "".join(_stream(tok, ids, chunk=3)) == tok.decode(ids)
    prompt = tok.encode("Earlier text ", add_special_tokens=False)
    want = tok.decode(prompt + ids)[len(tok.decode(prompt)) :]
    assert "".join(_stream(tok, ids, prompt=prompt)) == want


def test_incremental_detokenizer_never_splits_multibyte(tok):
    # Byte-level BPE turns a rare character into several byte tokens; no delta may hold half of one.
    ids = tok.encode("𝔘𝔫𝔦 ⅏ 🎉", add_special_tokens=False)
    assert len(ids) > 4
    deltas = _stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "𝔘𝔫𝔦 ⅏ 🎉"


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_incremental_detokenizer_random_ids(tok, data):
    # Random ids (as a random-weight model emits): invalid UTF-8 included, specials skipped.
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    chunk = data.draw(st.integers(1, 4))
    assert "".join(_stream(tok, ids, chunk=chunk)) == tok.decode(ids)

