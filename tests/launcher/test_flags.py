"""What `baton up` and `baton router` do with their flags before any process starts."""

from __future__ import annotations

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
