"""Nothing silently ignored: every field of the `openai` package's request types, for both
endpoints, is honoured (it reaches the pod's SamplingParams or shapes the response) or
answered 400 naming it; unknown fields are a 400 in OpenAI's words (issue 22)."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from baton.engine.sampling_params import SamplingParams
from tests.router.test_api import _assert_error, _post, stack, st  # noqa: F401 (fixtures)

pytestmark = pytest.mark.e2e
MSG = [{"role": "user", "content": "hi"}]
CHAT, COMPL = "/v1/chat/completions", "/v1/completions"


def _sent(st) -> dict:
    """The SamplingParams the one request of a test sent to the pod (in their wire form)."""
    sent = [b["sampling"] for p in st["pods"] for b in p.requests]
    assert sent, "no request reached a pod"
    return sent[-1]


def _sampling(key, want):
    def check(st, body):
        assert _sent(st)[key] == want, (key, _sent(st)[key], want)

    return check


def _ok(st, body):  # accepted; nothing to see in the answer (by design, or checked elsewhere)
    assert body


def _choices(n):
    def check(st, body):
        assert [c["index"] for c in body["choices"]] == list(range(n))

    return check


def _chat_logprobs(st, body):
    assert body["choices"][0]["logprobs"]["content"]
    assert _sent(st)["logprobs"] == 0


def _usage_chunk(st, chunks):
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


# field -> (extra body, check(st, body)): honoured. `messages`/`prompt`/`model` are in every
# request. Each check looks at what reached the pod or at the answer.
HONOURED_BOTH = {
    "frequency_penalty": ({"frequency_penalty": 0.5}, _sampling("frequency_penalty", 0.5)),
    "presence_penalty": ({"presence_penalty": -0.5}, _sampling("presence_penalty", -0.5)),
    "logit_bias": ({"logit_bias": {"7": 10}}, _sampling("logit_bias", {"7": 10.0})),
    "max_tokens": ({"max_tokens": 3}, _sampling("max_tokens", 3)),
    "n": ({"n": 2}, _choices(2)),
    "seed": ({"seed": 9}, _sampling("seed", 9)),
    "stop": ({"stop": ["zz", "yy"]}, _ok),  # stop strings are the router's: test_api, test_stop
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, _usage_chunk),
    "temperature": ({"temperature": 0.3}, _sampling("temperature", 0.3)),
    "top_p": ({"top_p": 0.5}, _sampling("top_p", 0.5)),
    "user": ({"user": "someone"}, _ok),  # accepted by design: no generation semantics
}
TOOL = {"type": "function", "function": {"name": "f"}}  # short: the tiny model's context is 256


def _tools_in_prompt(st, body):
    sent = [b for p in st["pods"] for b in p.requests][-1]
    assert json.dumps(TOOL) in st["tok"].decode(sent["prompt_token_ids"], False)


def _one_call(st, body):  # the grammar that forces the call allows exactly one
    assert _sent(st)["structured_output"]["schema"]["maxItems"] == 1

HONOURED_CHAT = {
    **HONOURED_BOTH,
    "logprobs": ({"logprobs": True}, _chat_logprobs),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 2}, _sampling("logprobs", 2)),
    "max_completion_tokens": ({"max_completion_tokens": 2}, _sampling("max_tokens", 2)),
    "metadata": ({"metadata": {"team": "a"}}, _ok),
    "safety_identifier": ({"safety_identifier": "h1"}, _ok),
    "prompt_cache_key": ({"prompt_cache_key": "k"}, _ok),
    # the values that ask for what Baton does anyway
    "modalities": ({"modalities": ["text"]}, _ok),
    "response_format": ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"enum": [1]}}}},
                        _sampling("structured_output", {"type": "json_schema", "schema": {"enum": [1]}, "strict": False})),
    "store": ({"store": False}, _ok),
    "tool_choice": ({"tool_choice": "none"}, _ok),
    "tools": ({"tools": [TOOL]}, _tools_in_prompt),  # tests/router/test_tools.py: the rest
    "parallel_tool_calls": ({"tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False},
                            _one_call),
    "function_call": ({"function_call": "none"}, _ok),
}
HONOURED_COMPLETIONS = {
    **HONOURED_BOTH,
    "logprobs": ({"logprobs": 1}, _sampling("logprobs", 1)),
    "best_of": ({"n": 2, "best_of": 2}, _choices(2)),  # best_of == n: all of them
    "echo": ({"echo": False}, _ok),
    "suffix": ({"suffix": ""}, _ok),
}
# field -> a value a client sends for it that Baton does not do: 400 naming the field
REFUSED_CHAT = {
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": "auto",
    "store": True,
    "service_tier": "flex",
    "reasoning_effort": "low",
    "verbosity": "low",
    "moderation": {"model": "omni-moderation-latest"},
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"ttl": "24h"},
}
REFUSED_COMPLETIONS = {"echo": True, "suffix": "the end", "best_of": 3}


def _request(st, path, extra):
    base = {"model": "tiny", **({"messages": MSG} if path == CHAT else {"prompt": "hello there"})}
    body = {"max_tokens": 3, **base, **extra}
    if path == CHAT and "max_completion_tokens" in extra:
        body.pop("max_tokens")
    if not body.get("stream"):
        return _post(st, path, body)
    with httpx.stream("POST", st["base"] + path, json=body, timeout=10) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
        assert r.status_code == 200
    return [json.loads(x) for x in lines]


@pytest.mark.parametrize(
    "path,fields,honoured,refused",
    [
        (CHAT, chat_params.CompletionCreateParamsBase.__annotations__, HONOURED_CHAT, REFUSED_CHAT),
        (COMPL, completion_params.CompletionCreateParamsBase.__annotations__, HONOURED_COMPLETIONS,
         REFUSED_COMPLETIONS),
    ],
    ids=["chat", "completions"],
)
def test_every_openai_field_is_honoured_or_refused(st, path, fields, honoured, refused):
    walked = []
    for field in fields:
        if field in ("model", "messages", "prompt"):
            continue  # in every request below
        if field in honoured:
            for p in st["pods"]:
                p.requests.clear()
            extra, check = honoured[field]
            r = _request(st, path, extra)
            if isinstance(r, httpx.Response):
                assert r.status_code == 200, (field, r.text)
                r = r.json()
            check(st, r)
            walked.append(field)
        if field in refused or field not in honoured:
            # a field this table does not know (a newer openai) is refused all the same
            value = refused.get(field, "x")
            err = _assert_error(_request(st, path, {field: value}), 400, field)
            assert "not supported" in err["message"] or "Unrecognized" in err["message"], err
            walked.append(field)
    assert not {f for f in fields if f not in ("model", "messages", "prompt")} - set(walked)


@pytest.mark.parametrize("path", [CHAT, COMPL])
def test_unknown_fields_are_400_in_openai_words(st, path):
    base = {"model": "tiny", **({"messages": MSG} if path == CHAT else {"prompt": "hi"})}
    err = _assert_error(_post(st, path, {**base, "frobnicate": 1}), 400, "frobnicate")
    assert err["message"] == "Unrecognized request argument supplied: frobnicate"
    for options, param in (({"include_usage": True, "x": 1}, "stream_options.x"),
                           ({"include_obfuscation": True}, "stream_options.include_obfuscation")):
        _assert_error(_post(st, path, {**base, "stream": True, "stream_options": options}), 400, param)
    # null is "not given" for the fields OpenAI defines, as OpenAI reads it
    nulls = ({"tools": None, "response_format": None, "audio": None} if path == CHAT
             else {"suffix": None, "best_of": None})
    assert _post(st, path, {**base, **nulls, "max_tokens": 2}).status_code == 200


def test_non_text_content_parts_are_400(st):
    parts = [{"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    err = _assert_error(_post(st, CHAT, {"model": "tiny", "messages": [{"role": "user", "content": parts}]}),
                        400, "messages")
    assert "image_url" in err["message"]
    ok = [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]
    assert _post(st, CHAT, {"model": "tiny", "max_tokens": 2,
                            "messages": [{"role": "user", "content": ok}]}).status_code == 200


@pytest.mark.parametrize("path", [CHAT, COMPL])
def test_extensions_reach_the_pod(st, path):
    ext = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "ignore_eos": True, "stop_token_ids": [3]}
    r = _request(st, path, ext)
    assert r.status_code == 200, r.text
    sent = _sent(st)
    assert {k: sent[k] for k in ext} == ext
    assert dataclasses.asdict(SamplingParams(**sent)) == sent  # the pod rebuilds exactly this


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"logit_bias": {"7": 101}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),  # past the vocabulary
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"n": 2, "best_of": 1}, "best_of"),
    ],
)
def test_bad_sampling_values_are_400(st, extra, param):
    _assert_error(_request(st, COMPL, extra), 400, param)
    assert not any(p.requests for p in st["pods"])
