"""What `baton up` and `baton router` do with their flags before any process starts."""

from __future__ import annotations

import re

import pytest
from huggingface_hub import constants

from baton import cli, launcher
from tests.modelzoo.hf_cache import add_to_cache


def test_split_mode_without_ucxx_says_which_extra_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(launcher, "has_ucx", lambda: False)
    monkeypatch.setattr(launcher.tempfile, "mkdtemp", lambda **kw: pytest.fail("started something"))
    assert launcher.main(["--model", str(tmp_path), "--prefill", "1", "--decode", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'baton[ucx]'" in err


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, tiny_qwen3):
    home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("BATON_MODEL", raising=False)
    monkeypatch.delenv("BATON_SERVED_MODEL_NAME", raising=False)
    return add_to_cache(home, "acme/tiny-qwen3", tiny_qwen3)


@pytest.mark.parametrize("flag", [["--model", "acme/tiny-qwen3"], ["--model=acme/tiny-qwen3"]])
def test_the_router_gets_a_repo_id_as_a_directory_served_under_the_id(flag, hf_cache):
    got = cli._router_args(["--port", "1", *flag, "--policy", "prefix"])
    assert got == ["--port", "1", "--model", str(hf_cache), "--served-model-name", "acme/tiny-qwen3",
                   "--policy", "prefix"]


def test_the_router_keeps_a_directory_and_a_given_name(hf_cache, tiny_qwen3, monkeypatch):
    assert cli._router_args(["--model", str(tiny_qwen3)]) == ["--model", str(tiny_qwen3)]
    got = cli._router_args(["--model", "acme/tiny-qwen3", "--served-model-name", "mine"])
    assert got == ["--model", str(hf_cache), "--served-model-name", "mine"]
    monkeypatch.setenv("BATON_MODEL", "acme/tiny-qwen3")
    assert cli._router_args([]) == ["--model", str(hf_cache), "--served-model-name", "acme/tiny-qwen3"]


def test_up_passes_the_routers_defaults_on_as_router_flags(tiny_qwen3):
    from baton.router.settings import RouterSettings

    args = launcher.parse(["--default-sampling", '{"temperature": 0}', "--default-max-tokens", "64"])
    flags = launcher.router_flags(args)
    assert flags == ["--default-sampling", '{"temperature": 0}', "--default-max-tokens", "64"]
    s = RouterSettings.from_argv(["--model", str(tiny_qwen3), *flags])  # the router's own flag names
    assert (s.sampling_override, s.default_max_tokens) == ({"temperature": 0.0}, 64)
    assert launcher.router_flags(launcher.parse([])) == []  # unset: the router's default or BATON_* variable


def test_up_help_shows_every_default_and_the_variables(capsys, monkeypatch):
    import dataclasses

    from baton.router.settings import RouterSettings

    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal's width
    with pytest.raises(SystemExit):
        cli.main(["up", "--help"])
    out = capsys.readouterr().out
    # one entry per option: its flag line and the help lines under it
    blocks = re.split(r"\n(?=  -)", out.split("options:")[1].split("\n\n")[0])
    lines = [" ".join(block.split()) for block in blocks if block.strip()]
    undocumented = [line.split()[0] for line in lines if "(default: " not in line and "[env " not in line]
    assert len(lines) > 10 and undocumented == ["-h,"]
    assert [line for line in lines if line.count("(default:") > 1] == []
    router_default = {f.name: f.default for f in dataclasses.fields(RouterSettings)}["default_max_tokens"]
    (line,) = [line for line in lines if line.startswith("--default-max-tokens")]
    assert f"(default: {router_default}) [env BATON_DEFAULT_MAX_TOKENS]" in line
    assert "[env REDIS_URL]" in next(line for line in lines if line.startswith("--redis-url"))


def test_up_shows_the_conversions_stages_and_not_its_other_output(tmp_path, capsys):
    from baton.modelzoo.smollm2 import PROGRESS_PREFIX

    log = tmp_path / "get-model.log"
    log.write_text(f"{PROGRESS_PREFIX}converting ...\nLoading weights: 100%|###| 272/272\n"
                   f"{PROGRESS_PREFIX}wrote the float32 safetensors (3.0 s)\n{PROGRESS_PREFIX}half a")
    child = launcher.Child("get-model", proc=None, log=log)
    assert launcher.show_lines(child, PROGRESS_PREFIX, 0) == 3
    assert capsys.readouterr().out == "baton: converting ...\nbaton: wrote the float32 safetensors (3.0 s)\n"
    log.write_text(log.read_text() + " line\n/the/model/dir\n")
    assert launcher.show_lines(child, PROGRESS_PREFIX, 3) == 5
    assert capsys.readouterr().out == "baton: half a line\n"
