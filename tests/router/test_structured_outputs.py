"""Structured outputs end to end (issue 22): the official openai client's
`chat.completions.parse` with pydantic models against the real SmolLM2 behind a router,
colocated and through a prefill pod + decode pod; json_schema and json_object outputs obey;
a schema the grammar engine cannot take is a 400 naming the part."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from enum import Enum

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.stack import ServiceStack, wait_idle

pytestmark = pytest.mark.e2e


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_millions: int = Field(ge=0, le=100)


class Mood(str, Enum):
    happy = "happy"
    sad = "sad"
    neutral = "neutral"


class Review(BaseModel):
    mood: Mood
    stars: int = Field(ge=1, le=5)


class Recipe(BaseModel):
    dish: str = Field(max_length=24)
    ingredients: list[str] = Field(max_length=3)


PROMPTS = [(City, f"Describe the city of {c} as JSON.") for c in ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Rome", "Delhi")]
PROMPTS += [(Review, f"Review: '{t}'. Give the mood and stars as JSON.") for t in (
    "I loved it", "Terrible food", "It was fine", "Best day ever", "Never again", "Okay I guess", "Wonderful staff")]
PROMPTS += [(Recipe, f"Give a short recipe for {d} as JSON.") for d in (
    "pancakes", "tea", "a salad", "toast", "soup", "an omelette", "rice")]

SCHEMA = {  # enums, a nested object, an array of objects, required fields
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 30},
        "genre": {"enum": ["drama", "comedy", "horror"]},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
        "director": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                                      "alive": {"type": "boolean"}},
                     "required": ["name", "alive"], "additionalProperties": False},
        "cast": {"type": "array", "items": {"type": "object", "properties": {"actor": {"type": "string", "maxLength": 30}},
                                            "required": ["actor"], "additionalProperties": False},
                 "minItems": 1, "maxItems": 2},
    },
    "required": ["title", "genre", "year", "director", "cast"],
    "additionalProperties": False,
}


def parse_all(client, model: str, prompts) -> list:
    """`parse` on every prompt at once (one batch on the pod). Async: the sync client's parse
    from several threads races in pydantic building the generic ParsedChatCompletion[cls]."""
    aclient = openai.AsyncOpenAI(base_url=client.base_url, api_key=client.api_key, timeout=client.timeout,
                                 max_retries=0)

    async def one(cls, prompt):
        r = await aclient.chat.completions.parse(model=model, messages=[{"role": "user", "content": prompt}],
                                                 response_format=cls, max_tokens=64, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "stop", (prompt, c.message.content)
        assert isinstance(c.message.parsed, cls), (prompt, c.message.content)
        return c.message.parsed

    async def all_():
        async with aclient:
            return await asyncio.gather(*(one(cls, prompt) for cls, prompt in prompts))

    return asyncio.run(all_())


@pytest.fixture(scope="module")
def smol(smollm2_served):
    return smollm2_served  # the session's SmolLM2 stack (tests/conftest.py): a pod start is ~1 min


@pytest.fixture(scope="module")
def parsed(smol):
    return parse_all(smol.client, smol.model, PROMPTS)


def test_parse_with_pydantic_models_gives_valid_objects(parsed):
    assert len(parsed) == len(PROMPTS) >= 20
    for (cls, _), obj in zip(PROMPTS, parsed):
        assert type(obj) is cls
        cls.model_validate(obj.model_dump())  # the constraints hold, not only the shape


def test_json_schema_with_enums_nested_objects_and_arrays_is_obeyed(smol):
    def one(prompt):
        r = smol.client.chat.completions.create(
            model=smol.model, messages=[{"role": "user", "content": prompt}], max_tokens=110, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "movie", "schema": SCHEMA,
                                                                              "strict": True}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        return json.loads(r.choices[0].message.content)

    jsonschema.validate(one("A horror film as JSON."), SCHEMA)


def test_json_object_output_parses(smol):
    prompts = ["Give a person's name and age in JSON.", "JSON for a book.",
               'Answer in JSON with the key "answer": what is 2 + 2?']

    def one(prompt):
        r = smol.client.chat.completions.create(
            model=smol.model, messages=[{"role": "user", "content": prompt}], max_tokens=60, temperature=0,
            response_format={"type": "json_object"})
        c = r.choices[0]
        # the grammar ended ("stop"): the text is a whole object; at the length limit it is cut
        assert c.finish_reason == "stop", c.message.content
        return json.loads(c.message.content)

    with ThreadPoolExecutor(len(prompts)) as ex:
        assert all(isinstance(o, dict) for o in ex.map(one, prompts))
    # /v1/completions takes response_format too (vLLM's extension)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = smol.client.completions.create(
        model=smol.model, prompt="Is the sky blue?", max_tokens=20, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].text
    assert list(json.loads(r.choices[0].text)) == ["ok"] and isinstance(json.loads(r.choices[0].text)["ok"], bool)


def test_a_schema_the_grammar_engine_cannot_take_is_a_400_naming_it(smol):
    bad = {"type": "object", "properties": {"when": {"type": "datetime"}}}
    with pytest.raises(openai.BadRequestError) as e:
        smol.client.chat.completions.create(
            model=smol.model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
    assert e.value.status_code == 400 and '"datetime"' in e.value.message, e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        smol.client.chat.completions.create(
            model=smol.model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"schema": {}}})
    assert e.value.status_code == 400 and e.value.body["param"].startswith("response_format"), e.value.body


def test_disaggregated_pods_give_the_colocated_objects(tiny_qwen3, tmp_path):
    """The prefill pod samples the first token under the grammar, the decode pod's matcher
    takes it and goes on: greedy, the same objects as a colocated pod (a tiny model: pods
    start fast; Review's schema is bounded, so even random weights end it)."""
    reviews = [p for p in PROMPTS if p[0] is Review][:4]
    got = {}
    for roles in (("colocated",), ("prefill", "decode")):
        with ServiceStack(tmp_path / "-".join(roles)) as st:
            s = st.serve(tiny_qwen3, roles=roles, timeout_s=120, num_kv_blocks=512)
            got[roles] = parse_all(s.client, s.model, reviews)
            if "decode" in roles:
                decode = next(p for p in s.pods if p.role == "decode")
                assert decode.transfer_stats().get("outcome_ok", 0) >= len(reviews)  # the KV really travelled
            wait_idle(*s.pods, s.router)
    assert got[("prefill", "decode")] == got[("colocated",)]
