"""Starting the router: torch-free import, settings from flags and env, the app factory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from baton.router.settings import RouterSettings


# What the router may take from baton.engine: its torch-free modules (DESIGN.md's table).
TORCH_FREE_ENGINE = ("baton.engine.tokenizer", "baton.engine.sampling_params", "baton.engine.limits")


def test_router_import_leaves_torch_out():
    code = (
        "import sys, baton.router.app, baton.router.main; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
        f"or m.startswith(('baton.engine.', 'baton.kernels')) and m not in {TORCH_FREE_ENGINE!r}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_settings_flags_over_env_over_defaults(monkeypatch):
    monkeypatch.setenv("BATON_MODEL", "/env/model")
    monkeypatch.setenv("BATON_PODS", "http://a:1/, http://b:2")
    monkeypatch.setenv("BATON_POLICY", "round_robin")
    monkeypatch.setenv("BATON_W_QUEUE", "2.5")
    s = RouterSettings.from_argv(["--policy", "least_load", "--port", "9001"])
    assert (s.model, s.policy, s.port, s.w_queue) == ("/env/model", "least_load", 9001, 2.5)
    assert s.pods == ["http://a:1", "http://b:2"]
    assert s.weights.queue == 2.5 and s.redis_url is None
    s = RouterSettings.from_argv(
        ["--model", "/m", "--pods", "http://c:3", "--redis-url", "redis://r:6379/0"]
    )
    assert (s.model, s.pods, s.redis_url) == ("/m", ["http://c:3"], "redis://r:6379/0")
    with pytest.raises(SystemExit):
        RouterSettings.from_argv(["--policy", "fastest"])


def test_create_app_reads_the_model_dir(model_dir):
    from baton.router.app import create_app

    app = create_app(
        RouterSettings(model=str(model_dir), served_model_name="tiny", max_model_len=128)
    )
    router = app.state.router
    assert router.model_name == "tiny" and router.max_model_len == 128
    assert router.tokenizer.eos_token_ids
    default = create_app(RouterSettings(model=str(model_dir))).state.router
    assert default.model_name == model_dir.name and default.max_model_len > 128


def test_settings_errors_are_readable(monkeypatch, capsys):
    monkeypatch.setenv("BATON_MODEL", "/m")
    for argv, words in [
        (["--policy", "fastest"], "invalid choice: 'fastest'"),
        (["--retries", "-1"], "retries must be at least 0"),
        (["--max-n", "0"], "max_n must be between 1 and"),
        (["--port", "http"], "invalid int value: 'http'"),
    ]:
        with pytest.raises(SystemExit):
            RouterSettings.from_argv(argv)
        assert words in capsys.readouterr().err
    monkeypatch.setenv("BATON_POLICY", "fastest")
    with pytest.raises(SystemExit):
        RouterSettings.from_argv([])
    assert "BATON_POLICY: expected one of prefix, round_robin, least_load" in capsys.readouterr().err
    monkeypatch.delenv("BATON_POLICY")
    monkeypatch.delenv("BATON_MODEL")
    with pytest.raises(SystemExit):
        RouterSettings.from_argv([])
    assert "a model directory is required" in capsys.readouterr().err


def test_help_lists_every_setting_with_its_default_and_variable(capsys):
    import dataclasses

    from baton.cli import main

    with pytest.raises(SystemExit):
        main(["router", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in dataclasses.fields(RouterSettings):
        assert "--" + f.name.replace("_", "-") in text
        assert f"[env BATON_{f.name.upper()}]" in text
    assert "[env BATON_POLICY] (default: prefix)" in text
    assert "--block-size" not in text  # the pods publish it
