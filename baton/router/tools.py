"""Tool calling: the request's tools in the prompt, and the model's tool-call text as OpenAI
`tool_calls` (whole, or streamed as deltas).

The prompt. A chat template that uses the `tools` variable (Qwen3's, Llama 3.x's) gets the
tools as transformers' `apply_chat_template(tools=...)` hands them over: the OpenAI tool
dicts, as sent. A template without it (SmolLM2's and other plain ChatML ones) gets the
default format, Hermes/Qwen2.5 style: a system block listing the functions as JSON inside
`<tools></tools>` and asking for `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
assistant `tool_calls` in the history render as those tags and `tool` messages as a user
turn of `<tool_response>` blocks, so the conversation reads back in the format the prompt
asked for. With a tools template, `function.arguments` (a JSON string in OpenAI's API) is
handed over as an object, as vLLM does: Llama's template writes it with `tojson`.

The parser, chosen from the template's text: one that mentions `<|python_tag|>` and not
`<tool_call>` is Llama 3.x's JSON format (the output is one or more `{"name": ...,
"parameters": {...}}` objects, `;`-separated, or plain text); every other template, and the
default format, is parsed for Hermes `<tool_call>` tags.

tool_choice: `none` leaves the tools out of the prompt and parses nothing (the model answers
in text, as OpenAI's does); `auto` parses what the model writes; `required` and a named
function are forced by the grammar (`SamplingParams.structured_output`, as vLLM does it):
`required` outputs a JSON array of `{"name", "arguments"}` objects (exactly one with
`parallel_tool_calls: false`), a named function outputs its arguments object. With
`parallel_tool_calls: false` and `auto`, only the first call is returned.

Streaming: text outside the calls streams as content as it comes (held back only while it
may be the start of a tag); a call goes out once its text is complete, as one delta with
its id, type and name and then its arguments (under `required`, each element of the array
as it completes), so the deltas assemble to exactly the non-streamed call (one code path: the
non-streamed answer is the same parser fed at once).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator, SchemaError

from baton.engine.tokenizer import Tokenizer
from baton.router.protocol import APIError, ChatCompletionRequest

HERMES, LLAMA3 = "hermes", "llama3"
FORCED_ARRAY, FORCED_NAMED = "required", "named"

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"

DEFAULT_TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools ask for; None from plan() when there is nothing to do."""

    tools: list[dict]  # the OpenAI tool dicts (validated)
    choice: str  # "auto", "required" or "named"
    name: str | None  # the named function
    parallel: bool
    fmt: str  # HERMES or LLAMA3: what the model writes under `auto`
    in_template: bool  # the template takes `tools=`; else the default format

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def structured_output(self) -> dict | None:
        """The grammar that forces the call(s) (SamplingParams.structured_output), or None."""
        if not self.forced:
            return None
        if self.choice == FORCED_NAMED:
            return {"type": "json_schema", "schema": _arguments_schema(self._function(self.name)),
                    "strict": True}
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t["function"]["name"]]},
                    "arguments": _arguments_schema(t["function"]),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        schema: dict[str, Any] = {
            "type": "array",
            "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
            "minItems": 1,
        }
        if not self.parallel:
            schema["maxItems"] = 1
        return {"type": "json_schema", "schema": schema, "strict": True}

    def parser(self) -> ToolCallParser:
        mode = {"auto": self.fmt, "required": FORCED_ARRAY, "named": FORCED_NAMED}[self.choice]
        return ToolCallParser(mode, self.name, max_calls=None if self.parallel else 1)

    def _function(self, name: str) -> dict:
        return next(t["function"] for t in self.tools if t["function"]["name"] == name)


def _arguments_schema(fn: dict) -> dict:
    # OpenAI: no `parameters` is a function that takes no arguments
    return fn.get("parameters") or {"type": "object", "properties": {}}


def parser_format(template: str | None) -> str:
    if template and PYTHON_TAG in template and CALL_OPEN not in template:
        return LLAMA3
    return HERMES


def plan(req: ChatCompletionRequest, tok: Tokenizer) -> ToolPlan | None:
    """The request's tool plan; APIError (400, naming the field) for what cannot be served."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice is only allowed when tools are given.",
                           param="tool_choice")
        return None
    names = [t["function"]["name"] for t in tools]
    for i, t in enumerate(tools):
        _check_parameters(t["function"].get("parameters"), f"tools[{i}].function.parameters")
        if names.index(t["function"]["name"]) != i:
            raise APIError(400, f"tools[{i}].function.name: {names[i]!r} is given twice.",
                           param=f"tools[{i}].function.name")
    if choice == "none":
        return None  # the model must not call: no tools in the prompt, nothing parsed
    name = None
    if choice is None or choice == "auto":
        kind = "auto"
    elif choice == "required":
        kind = FORCED_ARRAY
    else:
        kind, name = FORCED_NAMED, choice.function.name
        if name not in names:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among "
                           f"the tools ({', '.join(names)}).", param="tool_choice.function.name")
    if kind != "auto" and req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, "response_format cannot be combined with tool_choice "
                       f"{choice if isinstance(choice, str) else 'naming a function'}: both "
                       "constrain the output.", param="response_format")
    return ToolPlan(tools, kind, name, req.parallel_tool_calls is not False,
                    parser_format(tok.chat_template), tok.template_takes_tools)


def _check_parameters(params: dict | None, where: str) -> None:
    if params is None:
        return
    try:
        Draft202012Validator.check_schema(params)
    except SchemaError as e:
        raise APIError(400, f"{where} is not a valid JSON schema: {e.message}", param=where) from e
    if params.get("type", "object") != "object":
        raise APIError(400, f"{where} must be a JSON schema of type 'object' (the arguments), "
                       f"not {params['type']!r}.", param=where)


# -- the prompt ---------------------------------------------------------------------------------


def render(tok: Tokenizer, messages: list[dict], tool_plan: ToolPlan | None) -> str:
    """The prompt text for these messages (ChatMessage.template_dict()s) and tools; ValueError
    for a message the template or the tool format cannot take."""
    if tok.template_takes_tools:
        chat = [_with_argument_objects(m, i) for i, m in enumerate(messages)]
        tools = tool_plan.tools if tool_plan else None
        return tok.apply_chat_template(chat, add_generation_prompt=True, tools=tools)
    chat = _default_format(messages, tool_plan.tools if tool_plan else None)
    return tok.apply_chat_template(chat, add_generation_prompt=True)


def _calls_of(m: dict, index: int) -> list[tuple[str, Any]]:
    """messages[index]'s tool_calls as (name, arguments object); ValueError if malformed."""
    out = []
    calls = m.get("tool_calls")
    if not isinstance(calls, list):
        raise ValueError(f"messages[{index}].tool_calls must be a list")
    for i, call in enumerate(calls):
        where = f"messages[{index}].tool_calls[{i}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{where} must be {{\"type\": \"function\", \"function\": "
                             "{\"name\": ..., \"arguments\": ...}}")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}.function.arguments is not JSON: {e}") from None
        out.append((fn["name"], args))
    return out


def _with_argument_objects(m: dict, index: int) -> dict:
    if m.get("role") != "assistant" or not m.get("tool_calls"):
        return m
    calls = _calls_of(m, index)
    tool_calls = [
        {**c, "function": {**c["function"], "arguments": args}}
        for c, (_, args) in zip(m["tool_calls"], calls, strict=True)
    ]
    return {**m, "tool_calls": tool_calls}


def _default_format(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    out: list[dict] = []
    for index, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role == "assistant" and m.get("tool_calls"):
            blocks = [f"{CALL_OPEN}\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}"
                      f"\n{CALL_CLOSE}" for n, a in _calls_of(m, index)]
            text = "\n".join(([content] if content else []) + blocks)
            out.append({k: v for k, v in m.items() if k != "tool_calls"} | {"content": text})
        elif role == "tool":
            block = f"<tool_response>\n{content or ''}\n</tool_response>"
            if out and out[-1].get("_tool_responses"):  # consecutive results: one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_responses": True})
        else:
            out.append(dict(m))
    for m in out:
        m.pop("_tool_responses", None)
    if tools:
        block = DEFAULT_TOOLS_PROMPT.format(
            tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0].get("role") in ("system", "developer"):
            first = out[0].get("content") or ""
            out[0] = {**out[0], "content": f"{first}\n\n{block}" if first else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


# -- the output ---------------------------------------------------------------------------------


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as a string
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def message(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}

    def deltas(self, index: int) -> list[dict]:
        """The stream's deltas for this call: id, type and name first, then the arguments."""
        return [
            {"index": index, "id": self.id, "type": "function",
             "function": {"name": self.name, "arguments": ""}},
            {"index": index, "function": {"arguments": self.arguments}},
        ]


def _call(obj: Any, args_key: tuple[str, ...] = ("arguments",)) -> ToolCall | None:
    """A {"name": ..., "arguments": {...}} object as a ToolCall; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    key = next((k for k in args_key if k in obj), None)
    args = obj.get(key, {}) if key else {}
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """One choice's output text in (as it streams), content and tool calls out.

    feed(text, final) returns the content to send now and the tool-call deltas of the calls
    completed by this text; whatever the chunking, the content and calls are the same."""

    def __init__(self, mode: str, name: str | None = None, max_calls: int | None = None):
        self.mode, self.name, self.max_calls = mode, name, max_calls
        self.calls: list[ToolCall] = []
        self.content = ""
        self._buf = ""
        self._inside = False  # HERMES: between <tool_call> and </tool_call>
        self._json: bool | None = None  # LLAMA3: the output is JSON calls (None: not known yet)
        self._after_call = False  # whitespace right after a call is not content
        self._gap = ""  # the whitespace before the <tool_call> being read
        self._sep = False  # a call went by since the last content
        # FORCED_ARRAY: where the array's text is read to, what comes next, calls read
        self._pos, self._state, self._elements = 0, "open", 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        self._buf += text
        before = len(self.calls)
        out = {HERMES: self._hermes, LLAMA3: self._llama3}.get(self.mode, self._forced)(final)
        self.content += out
        deltas = [d for i in range(before, len(self.calls)) for d in self.calls[i].deltas(i)]
        return out, deltas

    def _add(self, call: ToolCall) -> None:
        if self.max_calls is None or len(self.calls) < self.max_calls:
            self.calls.append(call)

    def _hermes(self, final: bool) -> str:
        out: list[str] = []

        def text(t: str) -> None:
            # text after a call, with text before it: on a line of its own (the call's place)
            if t and self._sep:
                t = "\n" + t if self.content or any(out) else t
                self._sep = False
            out.append(t)

        while True:
            if self._inside:
                end = self._buf.find(CALL_CLOSE)
                if end < 0 and not final:
                    return "".join(out)
                body = self._buf if end < 0 else self._buf[:end]
                self._buf = "" if end < 0 else self._buf[end + len(CALL_CLOSE):]
                self._inside = False
                call = _json_call(body)
                if call is None:  # not a call after all: the text stays content
                    text(self._gap + CALL_OPEN + body + ("" if end < 0 else CALL_CLOSE))
                    self._after_call = False
                else:
                    self._add(call)
                    self._after_call = self._sep = True
                continue
            if self._after_call:
                self._buf = self._buf.lstrip()
                if not self._buf and not final:
                    return "".join(out)
                self._after_call = False
            start = self._buf.find(CALL_OPEN)
            if start >= 0:
                # whitespace that only separates text from a call is not content
                before = self._buf[:start].rstrip()
                self._gap = self._buf[len(before):start]
                text(before)
                self._buf = self._buf[start + len(CALL_OPEN):]
                self._inside = True
                continue
            if final:
                text(self._buf)
                self._buf = ""
                return "".join(out)
            keep = _held_back(self._buf)
            text(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return "".join(out)

    def _llama3(self, final: bool) -> str:
        if self._json is None:
            head = self._buf.lstrip()
            if not head and not final:
                return ""
            if head.startswith("{") or head.startswith(PYTHON_TAG):
                self._json = True
            elif PYTHON_TAG.startswith(head) and not final:
                return ""  # may still be the tag
            else:
                self._json = False
        if not self._json:
            out, self._buf = self._buf, ""
            return out
        if not final:
            return ""
        text = self._buf.strip().removeprefix(PYTHON_TAG)
        calls = _json_sequence(text, ("parameters", "arguments"))
        if calls is None:
            out, self._buf = self._buf, ""
            return out
        for c in calls:
            self._add(c)
        self._buf = ""
        return ""

    def _forced(self, final: bool) -> str:
        if self.mode == FORCED_ARRAY:
            return self._forced_array(final)
        # a named function: the output is its arguments object, complete only at the end
        if not final:
            return ""
        text, self._buf = self._buf, ""
        try:
            call = _call({"name": self.name, "arguments": json.loads(text)})
        except json.JSONDecodeError:
            call = None
        if call is None:
            return text  # cut short (max_tokens): what there is stays content
        self._add(call)
        return ""

    def _forced_array(self, final: bool) -> str:
        """`required`: a JSON array of calls; each is sent as soon as its object is complete.
        Cut short (max_tokens), the complete calls stand and the rest is dropped; with none
        complete, the text is content."""
        buf, dec = self._buf, json.JSONDecoder()
        while self._state in ("open", "elem", "sep"):
            pos = self._pos
            while pos < len(buf) and buf[pos].isspace():
                pos += 1
            if pos == len(buf):
                break
            ch = buf[pos]
            if self._state == "open":
                self._state, self._pos = ("elem", pos + 1) if ch == "[" else ("bad", pos)
            elif self._state == "sep":
                nxt = {",": "elem", "]": "done"}.get(ch, "bad")
                self._state, self._pos = nxt, pos + 1
            else:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    break  # not complete yet (or never: the end decides)
                call = _call(obj)
                if call is None:
                    self._state = "bad"
                    break
                self._add(call)
                self._elements += 1
                self._state, self._pos = "sep", end
        if not final:
            return ""
        text, self._buf = self._buf, ""
        return "" if self._elements else text


def _held_back(buf: str) -> int:
    """How many characters at the end of buf may be the start of <tool_call> (or whitespace
    before one, which is dropped if one follows)."""
    for k in range(min(len(buf), len(CALL_OPEN) - 1), 0, -1):
        if CALL_OPEN.startswith(buf[-k:]):
            rest = buf[:-k]
            return k + len(rest) - len(rest.rstrip())
    return len(buf) - len(buf.rstrip())


def _json_call(body: str) -> ToolCall | None:
    try:
        return _call(json.loads(body))
    except json.JSONDecodeError:
        return None


def _json_sequence(text: str, args_key: tuple[str, ...]) -> list[ToolCall] | None:
    """`{...}; {...}` (Llama 3.x's calls) as ToolCalls; None unless all of the text is calls."""
    dec, pos, calls = json.JSONDecoder(), 0, []
    while True:
        while pos < len(text) and (text[pos].isspace() or (calls and text[pos] == ";")):
            pos += 1
        if pos == len(text):
            return calls or None
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        call = _call(obj, args_key)
        if call is None:
            return None
        calls.append(call)
