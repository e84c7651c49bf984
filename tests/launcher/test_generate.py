"""`baton generate` samples as the server does (the model's generation_config.json, then
SamplingParams' defaults; --temperature over both) and says what it did, one line a stage."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from baton import cli


def _generate(capsys, *args: str) -> tuple[str, list[str]]:
    assert cli.main(["generate", "--max-tokens", "3", "--raw", *args, "hello"]) == 0
    out, err = capsys.readouterr()
    return out, err.splitlines()


def test_generate_takes_the_models_defaults_and_says_which(tiny_qwen3, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="baton.engine.loader")
    model = tmp_path / "m"
    shutil.copytree(tiny_qwen3, model)
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps(gen | {"temperature": 0.6, "top_k": 20}))

    # one run shows both: top_k from the model's file, temperature from the flag over the file's
    out, err = _generate(capsys, "--model", str(model), "--temperature", "0", "--seed", "7")
    assert len(err) == 2, err  # one line per stage, with its time
    assert re.fullmatch(rf"baton generate: loaded {re.escape(str(model))} \(\d+\.\d s\)", err[0])
    assert re.fullmatch(r"baton generate: generated 3 tokens \(temperature 0, top_k 20; seed 7\) \(\d+\.\d s\)",
                        err[1])
    assert out.strip()
    # what a pod's log shows of its load (logging is configured there)
    (loaded,) = [r.getMessage() for r in caplog.records if r.name == "baton.engine.loader"]
    assert re.fullmatch(rf"loaded \d+ tensors \(\d+ MB\) from {re.escape(str(model))} in \d+\.\d s", loaded)


def test_generate_help_names_the_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    assert "the model's generation_config.json" in text and "(default: 64)" in text
