"""The OpenAI request bodies the router accepts (pydantic, strict types) and the OpenAI error shape.

Nothing is silently ignored: a field is honoured, accepted by design (identifiers with no
generation semantics), or answered 400 naming it. Fields OpenAI defines that Baton does not
do are declared (null, or the value that asks for what Baton does anyway, passes: e.g.
`response_format: {"type": "text"}`, `store: false`); any other field is unknown and a 400
in OpenAI's own words ("Unrecognized request argument supplied: x").
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_N = 64
MAX_STOP = 16
MAX_LOGPROBS = 20
# A seed is OpenAI's int64; the engine takes any 64-bit pattern (seed + choice wraps there).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class APIError(Exception):
    """An error the client sees as OpenAI's {"error": {...}} with this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# The error type the API error handler (app.py) passes on with its message as it is.
NOT_SUPPORTED = "not_supported"


def not_supported(field: str, value: Any, planned: bool = False) -> PydanticCustomError:
    when = "not supported yet" if planned else "not supported by this server"
    return PydanticCustomError(
        NOT_SUPPORTED, "{what} is {when}.", {"what": _what(field, value), "when": when})


def _what(field: str, value: Any) -> str:
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return f"`{field}` of type {value['type']!r}"
    if isinstance(value, (bool, str, int, float)):
        return f"`{field}`={value!r}"
    return f"`{field}`"


_PROMPT_SHAPES = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def _check_prompt(v):
    """`prompt`'s four shapes, checked with a pass in C per list: pydantic's union collects one
    error per element for each shape a long list is not (seconds for a million token ids)."""
    if isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise ValueError(f"prompt must be {_PROMPT_SHAPES}")
    if not v:
        raise ValueError("prompt must not be empty")
    kinds = set(map(type, v))  # type(), not isinstance: strict, true is not a token id
    if kinds == {int} or kinds == {str}:
        return v
    if kinds == {list}:
        for p in v:
            if not p:
                raise ValueError("prompt must not be empty")
            if set(map(type, p)) != {int}:
                raise ValueError(f"prompt must be {_PROMPT_SHAPES}")
        return v
    raise ValueError(f"prompt must be {_PROMPT_SHAPES}")


def _lone_surrogate(x, path: tuple) -> tuple | None:
    """The path to the first string holding a lone surrogate, or None."""
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif isinstance(x, dict):
        for k, v in x.items():
            where = _lone_surrogate(k, path + (str(k),)) or _lone_surrogate(v, path + (str(k),))
            if where is not None:
                return where
    elif isinstance(x, list):
        if set(map(type, x)) <= {int, float, bool, type(None)}:
            return None  # token ids: nothing to check, one pass in C
        for i, v in enumerate(x):
            if isinstance(v, (str, dict, list)) and (where := _lone_surrogate(v, path + (str(i),))):
                return where
    return None


class _Strict(BaseModel):
    # Strict: "5" is not an int and true is not 1, as with OpenAI. Unknown fields are a 400: a
    # client asking for something Baton does not do must hear so, not get a 200 without it.
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    # OpenAI pads streamed chunks against length side channels when true; Baton does not
    include_obfuscation: bool | None = None

    @field_validator("include_obfuscation")
    @classmethod
    def _obfuscation(cls, v):
        if v:
            raise not_supported("stream_options.include_obfuscation", v)
        return v


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # checked in template_dict, by name
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    # Extra keys (name, tool_calls, tool_call_id, ...) go to the chat template untouched.
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def template_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            # Text-only: join the text parts, as vLLM does for models without vision.
            for p in self.content:
                if p.type != "text":
                    raise ValueError(f"content parts of type {p.type!r} are not supported (text only).")
                if p.model_extra:
                    raise ValueError(
                        f"text content parts take only `type` and `text`, not {sorted(p.model_extra)}.")
            d["content"] = "".join(p.text or "" for p in self.content)
        return d


class JSONSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the grammar always holds the output to the schema


class ResponseFormat(_Strict):
    """OpenAI's `response_format`: text, json_object or json_schema, constrained by the pod's
    grammar (baton/engine/grammar.py); a schema the grammar engine cannot take is the pod's 400,
    passed through."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_iff_json_schema(cls, v, info: ValidationInfo):
        if (info.data.get("type") == "json_schema") != (v is not None):
            raise ValueError("`json_schema` is required with type json_schema, and only with it")
        return v

    def structured_output(self) -> dict | None:
        """SamplingParams.structured_output for this format (None: free text)."""
        if self.type == "text":
            return None
        if self.type == "json_object" or self.json_schema.schema_ is None:
            return {"type": "json_object"}
        return {"type": "json_schema", "schema": self.json_schema.schema_, "strict": bool(self.json_schema.strict)}


class _SamplingFields(_Strict):
    """What both endpoints share. None: the field was not given; the server's default applies
    (the model's generation_config.json, the operator's --default-sampling, SamplingParams')."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # {token id (a string in JSON, as OpenAI sends it): bias in [-100, 100]}; SamplingParams checks
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = Field(None, validate_default=True)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted by design and not used: identifiers for the caller's own bookkeeping (OpenAI's
    # abuse monitoring); they carry no generation semantics.
    user: str | None = None
    # Extensions (vLLM's names and meanings)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # OpenAI's on chat; on completions too, as vLLM takes it
    response_format: ResponseFormat | None = None
    # vLLM's: mixed into the prompt's first block hash, so only requests with the same salt
    # share cached prefix blocks (and see them in cached_tokens)
    cache_salt: str | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data):
        # JSON may escape a lone surrogate ("\ud800"): no tokenizer or encoder takes it
        where = _lone_surrogate(data, ())
        if where is not None:
            raise ValueError(f"invalid Unicode (a lone surrogate) in `{'.'.join(where) or 'body'}`")
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments (tools.py checks)
    strict: bool | None = None  # the forced grammar is always strict; accepted either way


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class _FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: _FunctionName


# Fields OpenAI's chat API defines that Baton does not do, each with the values that ask for
# nothing beyond what Baton does (accepted), and whether it is planned (issue 22: structured
# outputs and tools). null is always accepted: OpenAI reads it as "not given".
_CHAT_NOT_DONE: dict[str, tuple[tuple, bool]] = {
    "audio": ((), False),
    "modalities": ((["text"],), False),
    "prediction": ((), False),
    "web_search_options": ((), False),
    "functions": ((), False),  # deprecated by OpenAI for tools
    "function_call": (("none",), False),
    "store": ((False,), False),  # nothing is stored: store=false is what Baton does
    "service_tier": ((), False),
    "reasoning_effort": ((), False),
    "verbosity": ((), False),
    "moderation": ((), False),
    "prompt_cache_retention": ((), False),
    "prompt_cache_options": ((), False),
}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Accepted by design, like `user`: the caller's tags and identifiers, and a cache-routing
    # hint (Baton routes by the prompt's own cached prefix); no generation semantics.
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # tools.py: in the prompt, parsed from the output, forced by the grammar
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    store: Any = None
    service_tier: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    moderation: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None

    @field_validator(*_CHAT_NOT_DONE)
    @classmethod
    def _not_done(cls, v, info: ValidationInfo):
        accepted, planned = _CHAT_NOT_DONE[info.field_name]
        if v is None or any(v == a and type(v) is type(a) for a in accepted):
            return v
        raise not_supported(info.field_name, v, planned)

    @property
    def output_limit(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    @property
    def pod_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: Annotated[
        str | list[str] | list[int] | list[list[int]],
        PlainValidator(_check_prompt, json_schema_input_type=str | list[str] | list[int] | list[list[int]]),
    ]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    # OpenAI's: generate best_of, return the n with the highest logprob. best_of == n returns
    # all of them, which is what Baton does; more is a 400.
    best_of: int | None = Field(None, ge=1)

    @field_validator("echo", "suffix")
    @classmethod
    def _off(cls, v, info: ValidationInfo):
        if v:  # echo: false and an empty suffix ask for what Baton does
            raise not_supported(info.field_name, v)
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info: ValidationInfo):
        n = info.data.get("n", 1)  # declared before best_of: validated already
        if v is None or v == n:
            return v
        if v < n:
            raise ValueError("best_of must be at least n")
        raise not_supported("best_of", v)

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    @property
    def pod_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a token-id list."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)
