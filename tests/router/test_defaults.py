"""Defaults for what a request omits (issue 24): the model's generation_config.json, the
operator's --default-sampling over it, and the max_tokens cap of requests that give none;
all of it reported in /v1/models."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from baton.engine.tokenizer import Tokenizer
from baton.router import defaults
from baton.router.app import create_app
from baton.router.settings import RouterSettings
from tests.router.fake_pod import FakePod, ServerThread, start_pod
from tests.router.test_api import chat_prompt, router_settings
from tests.stack import free_port, wait_for

MSG = [{"role": "user", "content": "hi"}]
GEN = {"bos_token_id": 0, "eos_token_id": [1, 0], "do_sample": True,
       "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1}


def model_with(tmp_path, base, generation: dict | None):
    """A copy of model dir `base` (links) whose generation_config.json is `generation`."""
    d = tmp_path / "model"
    d.mkdir(parents=True)
    for f in base.iterdir():
        if f.name != "generation_config.json":
            (d / f.name).symlink_to(f)
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps(generation))
    return d


# -- pure: reading and checking -------------------------------------------------------------------


def test_model_defaults_read_as_vllm_does(tmp_path, tiny_qwen3):
    d = model_with(tmp_path, tiny_qwen3, GEN)
    assert defaults.from_model(d) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                      "repetition_penalty": 1.1}
    got = defaults.effective(d, {"temperature": 0.2, "presence_penalty": 0.5})
    assert got == {"temperature": 0.2, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                   "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.0}
    # without sampling keys (the tiny model's own file): SamplingParams' defaults
    assert defaults.effective(tiny_qwen3, {})["temperature"] == 1.0


@pytest.mark.parametrize(
    "text,words",
    [
        ("{temperature: 0.2}", "not valid JSON"),
        ("[0.2]", "must be a JSON object"),
        ('{"temprature": 0.2}', "unknown keys ['temprature']"),
        ('{"temperature": "low"}', "temperature must be a number"),
        ('{"temperature": -1}', "temperature must be >= 0"),
        ('{"top_p": 0}', "top_p must be in (0, 1]"),
        ('{"top_k": 2.5}', "top_k must be an integer"),
    ],
)
def test_bad_operator_override_is_a_readable_start_error(tiny_qwen3, text, words, capsys):
    with pytest.raises(ValueError) as e:
        RouterSettings(model=str(tiny_qwen3), default_sampling=text)
    assert words in str(e.value) and "default_sampling" in str(e.value)
    with pytest.raises(SystemExit):  # the command line says the same and exits
        RouterSettings.from_argv(["--model", str(tiny_qwen3), "--default-sampling", text])
    assert words in capsys.readouterr().err


def test_bad_model_generation_config_is_named(tmp_path, tiny_qwen3):
    d = model_with(tmp_path, tiny_qwen3, {"temperature": -3})
    with pytest.raises(ValueError, match="generation_config.json: temperature must be >= 0"):
        defaults.from_model(d)


# -- through the router ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pod(tiny_qwen3):
    from baton.kvindex.hashing import model_identity, model_seed

    p = FakePod(seed=model_seed(model_identity(tiny_qwen3)), model="tiny")
    server = start_pod(p, free_port())
    yield p
    server.stop()


@pytest.fixture
def serve(pod, tmp_path, tiny_qwen3):
    """serve(generation, **settings) -> (openai client, base URL) of a router over `pod`."""
    servers = []

    def start(generation=GEN, **kw):
        model = model_with(tmp_path / str(len(servers)), tiny_qwen3, generation)
        s = router_settings(model, [pod.url], **kw)
        servers.append(ServerThread(create_app(s), s.port).start())
        base = f"http://127.0.0.1:{s.port}"
        wait_for(lambda: httpx.get(base + "/ready").status_code == 200, "router ready", 10)
        pod.requests.clear()
        return openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=20), base

    yield start
    for s in servers:
        s.stop()


def _sent(pod) -> dict:
    return pod.requests[-1]["sampling"]


def test_model_defaults_apply_when_omitted_and_yield_when_given(serve, pod):
    client, _ = serve()
    client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    s = _sent(pod)
    assert (s["temperature"], s["top_p"], s["top_k"], s["repetition_penalty"]) == (0.6, 0.95, 20, 1.1)
    client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2, temperature=0, top_p=1.0,
                                   extra_body={"top_k": 0, "repetition_penalty": 1.0})
    s = _sent(pod)
    assert (s["temperature"], s["top_p"], s["top_k"], s["repetition_penalty"]) == (0, 1.0, 0, 1.0)
    client.completions.create(model="tiny", prompt="hello", max_tokens=2)  # completions alike
    assert (_sent(pod)["temperature"], _sent(pod)["top_k"]) == (0.6, 20)


def test_operator_override_wins_over_the_model(serve, pod):
    client, base = serve(default_sampling='{"temperature": 0.2, "frequency_penalty": 0.3}')
    client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    s = _sent(pod)
    assert (s["temperature"], s["top_p"], s["frequency_penalty"]) == (0.2, 0.95, 0.3)
    client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2, temperature=0.9)
    assert _sent(pod)["temperature"] == 0.9
    model = httpx.get(base + "/v1/models").json()["data"][0]
    assert model["default_sampling"]["temperature"] == 0.2
    assert model["default_sampling"]["top_p"] == 0.95


def _long(n):
    return [{"role": "user", "content": "hello world " * n}]


def test_max_tokens_cap_for_requests_that_give_none(serve, pod, tiny_qwen3):
    client, base = serve(generation=None, default_max_tokens=10)
    client.chat.completions.create(model="tiny", messages=MSG, extra_body={"ignore_eos": True})
    assert _sent(pod)["max_tokens"] == 10
    # an explicit max_tokens may go past it, up to the context
    client.chat.completions.create(model="tiny", messages=MSG, max_tokens=200)
    assert _sent(pod)["max_tokens"] == 200
    client.chat.completions.create(model="tiny", messages=MSG, max_completion_tokens=50)
    assert _sent(pod)["max_tokens"] == 50
    client.completions.create(model="tiny", prompt="hello")  # OpenAI's 16 for completions
    assert _sent(pod)["max_tokens"] == 16
    # a prompt with less room left than the cap gets the room left
    tok = Tokenizer(tiny_qwen3)
    words = next(n for n in range(40, 60) if len(chat_prompt(tok, _long(n))) > 250)
    r = client.chat.completions.create(model="tiny", messages=_long(words))
    assert _sent(pod)["max_tokens"] == 256 - r.usage.prompt_tokens < 6
    model = httpx.get(base + "/v1/models").json()["data"][0]
    assert model["default_max_tokens"] == 10 and model["max_model_len"] == 256
    assert model["default_sampling"]["temperature"] == 1.0  # no generation_config.json


def test_models_report_the_defaults(serve, pod):
    client, base = serve()
    model = httpx.get(base + "/v1/models").json()["data"][0]
    assert model["default_max_tokens"] == 1024  # the documented default
    assert model["default_sampling"] == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                                         "repetition_penalty": 1.1, "presence_penalty": 0.0,
                                         "frequency_penalty": 0.0}
    assert client.models.list().data[0].id == "tiny"  # still what the openai client reads
    # with the cap off, the whole room is the default, as before
    client, base = serve(default_max_tokens=0)
    assert httpx.get(base + "/v1/models").json()["data"][0]["default_max_tokens"] is None
    client.chat.completions.create(model="tiny", messages=MSG, extra_body={"ignore_eos": True})
    assert _sent(pod)["max_tokens"] > 200


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")  # one conversion per run (tests/conftest.py)
def test_smollm2_defaults_are_its_publishers(smollm2):
    got = defaults.effective(smollm2, {})
    assert (got["temperature"], got["top_p"], got["top_k"]) == (0.2, 0.9, 0)
