"""Tool calls (issue 22): tools in the prompt, the model's calls parsed into OpenAI `tool_calls`
(whole and streamed), `tool_choice` none/auto/required/named, and the 400s.

Rendering and parsing are plain functions, tested without a server. End to end: the official
`openai` client on the real SmolLM2 through a real pod and router, a call -> `tool` message ->
answer round trip with tool_choice="required" and with a named function (forced by the
grammar), and the streamed deltas assembling to the non-streamed call.
"""

from __future__ import annotations

import json
import shutil

import pytest

from baton.engine.tokenizer import Tokenizer
from baton.router import tools
from baton.router.protocol import APIError, ChatCompletionRequest
from baton.router.tools import FORCED_ARRAY, FORCED_NAMED, HERMES, LLAMA3, ToolCallParser
from tests.router.test_api import _assert_error, _post, stack, st  # noqa: F401 (fixtures)
from tests.stack import wait_idle

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "JST"]}},
            "required": ["zone"],
        },
    },
}
CALL_TEXT = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>\n'
)


def _req(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw})


def _parse(mode: str, text: str, sizes, **kw):
    """Feed text in chunks of the given sizes (the rest last); (content, calls, deltas)."""
    p, content, deltas, pos = ToolCallParser(mode, **kw), "", [], 0
    for n in sizes:
        out, d = p.feed(text[pos:pos + n])
        content, deltas, pos = content + out, deltas + d, pos + n
    out, d = p.feed(text[pos:], final=True)
    return content + out, [(c.name, c.arguments) for c in p.calls], deltas + d


def _assembled(deltas) -> list[tuple[str, str]]:
    calls: dict[int, list] = {}
    for d in deltas:
        if "id" in d:
            assert d["id"].startswith("call_") and d["type"] == "function"
            calls[d["index"]] = [d["function"]["name"], d["function"]["arguments"]]
        else:
            calls[d["index"]][1] += d["function"]["arguments"]
    return [tuple(calls[i]) for i in sorted(calls)]


# -- parsing -------------------------------------------------------------------------------------


def test_hermes_calls_and_content_whatever_the_chunking():
    want_calls = [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "CET"}')]
    whole = _parse(HERMES, CALL_TEXT, [])
    assert whole[:2] == ("Let me look.", want_calls)
    assert _assembled(whole[2]) == want_calls
    for size in (1, 2, 3, 5, 7, 11):  # every chunking of the stream gives the same answer
        got = _parse(HERMES, CALL_TEXT, [size] * (len(CALL_TEXT) // size))
        assert got[:2] == whole[:2] and _assembled(got[2]) == want_calls, size
    # plain text streams as it comes; only what may start a tag is held back
    p = ToolCallParser(HERMES)
    assert p.feed("Hello <tool") == ("Hello", [])
    assert p.feed("box> x", final=True) == (" <toolbox> x", [])


def test_hermes_text_that_is_not_a_call_stays_content():
    text = "a <tool_call>not json</tool_call> b <tool_call>{\"name\": 3}"
    assert _parse(HERMES, text, [4] * 12)[:2] == (text, [])
    # an unclosed last call that is complete JSON is a call (the stop token ended it)
    assert _parse(HERMES, '<tool_call>{"name": "f", "arguments": {}}', [3])[:2] == ("", [("f", "{}")])
    # text between and after calls is content too, a call's place a line break (the
    # whitespace around a call is not content)
    between = 'A <tool_call>{"name": "f"}</tool_call> B\n<tool_call>{"name": "g"}</tool_call>\n C'
    for size in (1, 2, 5, 100):
        assert _parse(HERMES, between, [size] * (len(between) // size))[:2] == (
            "A\nB\nC", [("f", "{}"), ("g", "{}")])
    # parallel_tool_calls=false: the first call only
    assert _parse(HERMES, CALL_TEXT, [], max_calls=1)[1] == [("get_weather", '{"city": "Paris"}')]


def test_llama3_json_calls():
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}; {"name": "f", "parameters": {}}'
    for sizes in ([], [1] * len(text)):
        got = _parse(LLAMA3, text, sizes)
        assert got[:2] == ("", [("get_weather", '{"city": "Lima"}'), ("f", "{}")])
    assert _parse(LLAMA3, '  {"name": "f", "parameters": {"x": [1]}}', [2])[1] == [("f", '{"x": [1]}')]
    assert _parse(LLAMA3, "It is {sunny}", [1] * 13)[:2] == ("It is {sunny}", [])
    assert _parse(LLAMA3, '{"name": "f", "parameters": {}} and text', [])[:2] == (
        '{"name": "f", "parameters": {}} and text', [])


def test_forced_outputs():
    arr = '[{"name": "get_weather", "arguments": {"city": "Tokyo"}}, {"name": "get_time", "arguments": {"zone": "JST"}}]'
    assert _parse(FORCED_ARRAY, arr, [5] * 10)[:2] == (
        "", [("get_weather", '{"city": "Tokyo"}'), ("get_time", '{"zone": "JST"}')])
    assert _parse(FORCED_NAMED, '{"zone": "UTC"}', [3], name="get_time")[:2] == (
        "", [("get_time", '{"zone": "UTC"}')])
    # each element is a call as soon as its object is complete
    p = ToolCallParser(FORCED_ARRAY)
    assert p.feed(arr[:40]) == ("", [])
    content, deltas = p.feed(arr[40:60])
    assert (content, _assembled(deltas)) == ("", [("get_weather", '{"city": "Tokyo"}')])
    # cut short by max_tokens: the complete calls stand; with none complete, the text is content
    assert _parse(FORCED_ARRAY, arr[:70], [])[:2] == ("", [("get_weather", '{"city": "Tokyo"}')])
    assert _parse(FORCED_ARRAY, arr[:30], [])[:2] == (arr[:30], [])
    assert _parse(FORCED_ARRAY, '{"name": "f"}', [])[:2] == ('{"name": "f"}', [])
    assert _parse(FORCED_NAMED, '{"zone": "U', [], name="get_time")[:2] == ('{"zone": "U', [])


def test_forcing_grammars():
    both = tools.ToolPlan([WEATHER, TIME], FORCED_ARRAY, None, False, HERMES, False)
    schema = both.structured_output()["schema"]
    assert schema["type"] == "array" and (schema["minItems"], schema["maxItems"]) == (1, 1)
    assert [c["properties"]["name"]["enum"] for c in schema["items"]["anyOf"]] == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][1]["properties"]["arguments"] == TIME["function"]["parameters"]
    named = tools.ToolPlan([WEATHER, TIME], FORCED_NAMED, "get_time", True, HERMES, False)
    assert named.structured_output() == {
        "type": "json_schema", "schema": TIME["function"]["parameters"], "strict": True}
    assert tools.ToolPlan([WEATHER], "auto", None, True, HERMES, False).structured_output() is None


# -- rendering -----------------------------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, clear"},
]


def test_default_format_for_a_template_without_tools(tiny_qwen3):
    tok = Tokenizer(tiny_qwen3)  # plain ChatML, as SmolLM2's
    assert not tok.template_takes_tools
    plan = tools.plan(_req(tools=[WEATHER]), tok)
    assert (plan.choice, plan.fmt, plan.in_template) == ("auto", HERMES, False)
    block = tools.DEFAULT_TOOLS_PROMPT.format(tools=json.dumps(WEATHER))
    assert tools.render(tok, HISTORY, plan) == (
        f"<|im_start|>system\n{block}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18 C, clear\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    # a system prompt keeps its text, the block follows; tool_choice none: no tools at all
    sys = [{"role": "system", "content": "Be brief."}, HISTORY[0]]
    assert tools.render(tok, sys, plan).startswith(f"<|im_start|>system\nBe brief.\n\n{block}<|im_end|>")
    assert tools.plan(_req(tools=[WEATHER], tool_choice="none"), tok) is None
    assert tools.render(tok, sys, None).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    # two calls in one turn, their two results: one user turn of two <tool_response> blocks
    two = [HISTORY[0], {"role": "assistant", "content": "Both.", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "warm"},
        {"role": "tool", "tool_call_id": "b", "content": "noon"}]
    assert tools.render(tok, two, None) == (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\nBoth.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n<|im_start|>user\n'
        "<tool_response>\nwarm\n</tool_response>\n<tool_response>\nnoon\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="arguments is not JSON"):
        bad = {**HISTORY[1], "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}
        tools.render(tok, [HISTORY[0], bad], plan)


# A template of the kind Qwen3's and Llama 3.x's are: it reads `tools` and writes tool calls
# and results itself (written here; no published template ships with the tests).
TOOLS_TEMPLATE = (
    "{%- if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
    "{%- for m in messages %}[{{ m.role }}]"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<|python_tag|>{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}{% endfor %}"
    "{%- else %}{{ m.content }}{% endif %}\n{% endfor %}"
    "{%- if add_generation_prompt %}[assistant]{% endif %}"
)


def test_a_tools_template_gets_the_tools(tiny_qwen3, tmp_path):
    d = tmp_path / "tools-model"
    shutil.copytree(tiny_qwen3, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": TOOLS_TEMPLATE}))
    tok = Tokenizer(d)
    assert tok.template_takes_tools
    plan = tools.plan(_req(tools=[WEATHER, TIME]), tok)
    assert (plan.fmt, plan.in_template) == (LLAMA3, True)  # <|python_tag|>, no <tool_call>
    # arguments reach the template as an object (its tojson writes it once, not a string)
    assert tools.render(tok, HISTORY, plan) == (
        "TOOLS: get_weather get_time[user]Weather in Paris?"  # trim_blocks eats the newlines
        '[assistant]<|python_tag|>get_weather{"city": "Paris"}[tool]18 C, clear[assistant]')
    assert tools.parser_format("{{ '<tool_call>' }} <|python_tag|>") == HERMES


# -- bad requests (fake pods: answered before any pod) --------------------------------------------

CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format"),
    ({"tools": [WEATHER], "messages": [HISTORY[0], {"role": "assistant", "tool_calls": [{"x": 1}]}]},
     "messages"),
])
def test_bad_tools_are_400_naming_the_field(st, extra, param):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    err = _assert_error(_post(st, CHAT, body), 400, param)
    assert param.split(".")[0].split("[")[0] in err["message"] or param == "tools", err


def test_tools_reach_the_prompt_and_the_grammar_the_pod(st):
    tool = {"type": "function", "function": {"name": "f"}}  # the tiny test model's context is short
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "tools": [tool], "tool_choice": "required", "parallel_tool_calls": False}
    r = _post(st, CHAT, body)
    assert r.status_code == 200, r.text
    sent = [b for p in st["pods"] for b in p.requests][-1]
    assert sent["sampling"]["structured_output"] == tools.ToolPlan(
        [tool], FORCED_ARRAY, None, False, HERMES, False).structured_output()
    assert '{"type": "function", "function": {"name": "f"}}' in st["tok"].decode(sent["prompt_token_ids"], False)
    # the fake pod does not follow the grammar: its text is no call, and stays content
    msg = r.json()["choices"][0]["message"]
    assert msg["content"] and "tool_calls" not in msg


# -- end to end on SmolLM2 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_served):  # tests/conftest.py: one SmolLM2 stack for the session
    yield smollm2_served
    wait_idle(*smollm2_served.pods, smollm2_served.router)  # this module's requests are all done


def _ask(s, messages, stream=False, max_tokens=40, **kw):
    return s.client.chat.completions.create(
        model=s.model, messages=messages, tools=[WEATHER, TIME], temperature=0,
        max_tokens=max_tokens, stream=stream, **kw)


QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def _round_trip(s, tok, choice, want: tuple[str, str]):
    """The forced call (SmolLM2, greedy), its result as a `tool` message, and the answer."""
    r = _ask(s, QUESTION, tool_choice=choice)
    c = r.choices[0]
    assert (c.finish_reason, c.message.content) == ("tool_calls", None), c
    (call,) = c.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, call.function.arguments) == want
    history = QUESTION + [c.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and clear."}]
    final = _ask(s, history, tool_choice="auto", max_tokens=3)
    answer = final.choices[0]
    assert answer.finish_reason == "length" and answer.message.content
    assert answer.message.tool_calls is None
    # the call and its result went back through the template, in the default format
    prompt = tools.render(tok, history, tools.plan(
        ChatCompletionRequest.model_validate({"model": "m", "messages": history, "tools": [WEATHER, TIME]}), tok))
    assert f'<tool_call>\n{{"name": "{want[0]}", "arguments": {want[1]}}}\n</tool_call>' in prompt
    assert "<tool_response>\n18 degrees and clear.\n</tool_response>" in prompt
    assert final.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))


@pytest.mark.e2e
@pytest.mark.xdist_group("smollm2")
def test_round_trip_required_and_named_and_the_stream(smol, smollm2):
    tok = Tokenizer(smollm2)
    _round_trip(smol, tok, "required", ("get_weather", '{"city": "Paris"}'))
    named = {"type": "function", "function": {"name": "get_time"}}
    _round_trip(smol, tok, named, ("get_time", '{"zone": "UTC"}'))
    # streamed: the deltas assemble to the non-streamed call
    deltas, finish, content = [], None, ""
    for chunk in _ask(smol, QUESTION, stream=True, tool_choice=named):
        for c in chunk.choices:
            deltas += [d.model_dump(exclude_none=True) for d in c.delta.tool_calls or []]
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert _assembled(deltas) == [("get_time", '{"zone": "UTC"}')]
    assert (finish, content) == ("tool_calls", "")


# A template that takes tools (Hermes style, as Qwen3's): short, for the tiny model's 256 tokens
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nCall <tool_call>{...}</tool_call>:"
    "{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def hermes_router(stack, tiny_qwen3, tmp_path_factory):
    """A router on a model whose template takes tools, over the fake pods of `stack`."""
    from baton.router.app import create_app
    from tests.router.fake_pod import ServerThread
    from tests.router.test_api import _ready, router_settings
    from tests.stack import wait_for

    d = tmp_path_factory.mktemp("hermes") / "model"
    shutil.copytree(tiny_qwen3, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": HERMES_TEMPLATE}))
    s = router_settings(d, [p.url for p in stack["pods"]])
    server = ServerThread(create_app(s), s.port).start()
    base = f"http://127.0.0.1:{s.port}"
    wait_for(lambda: _ready(base), "router ready", 10)
    yield base
    server.stop()


def test_auto_parses_what_the_model_writes_streamed_or_not(st, hermes_router):
    """`auto` through the router and the official client. The fake pod echoes the prompt from
    the seed's position, so a user message holding text and a call makes the pod 'write' them
    (then <|im_end|>: stop)."""
    import openai

    said = 'Sure. <tool_call>{"name": "f", "arguments": {"x": [1, 2]}}</tool_call>'
    base = dict(model="tiny", messages=[{"role": "user", "content": said}],
                tools=[{"type": "function", "function": {"name": "f"}}])
    client = openai.OpenAI(base_url=hermes_router + "/v1", api_key="x", max_retries=0, timeout=20)
    tok = st["tok"]

    def start_of_said(**kw) -> int:  # where the user's text begins in the prompt the pod got
        for p in st["pods"]:
            p.requests.clear()
        client.chat.completions.create(**base, max_tokens=1, **kw)
        (sent,) = [b for p in st["pods"] for b in p.requests]
        ids = sent["prompt_token_ids"]
        assert tok.decode(ids).startswith("system\nCall <tool_call>{...}</tool_call>: f") == ("tool_choice" not in kw)
        return next(i for i in range(len(ids)) if tok.decode(ids[i:]).startswith("Sure."))

    start = start_of_said()
    c = client.chat.completions.create(**base, seed=start).choices[0]
    assert (c.finish_reason, c.message.content) == ("tool_calls", "Sure."), c
    (call,) = c.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("f", '{"x": [1, 2]}')
    deltas, content, finish = [], "", None
    for chunk in client.chat.completions.create(**base, seed=start, stream=True):
        for ch in chunk.choices:
            deltas += [d.model_dump(exclude_none=True) for d in ch.delta.tool_calls or []]
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert (_assembled(deltas), content, finish) == ([("f", '{"x": [1, 2]}')], "Sure.", "tool_calls")
    # tool_choice none: no tools in the prompt; the same text is the answer, nothing parsed
    start = start_of_said(tool_choice="none")
    c = client.chat.completions.create(**base, tool_choice="none", seed=start).choices[0]
    assert (c.finish_reason, c.message.content, c.message.tool_calls) == ("stop", said, None)
