"""--model as people write it: a local directory, or a Hugging Face repo id found in the local
cache (built here by hand; no network), with one-line errors for what cannot be served."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from baton.modelzoo.resolve import check_supported, resolve_model
from tests.modelzoo.hf_cache import COMMIT, add_to_cache

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a test never reaches for the Hub
    return home


def test_a_directory_is_taken_as_it_is(tiny_qwen3):
    r = resolve_model(str(tiny_qwen3))
    assert r.path == Path(tiny_qwen3) and r.repo_id is None and r.name == Path(tiny_qwen3).name


def test_a_repo_id_comes_from_the_local_cache(hf_home, tiny_qwen3):
    add_to_cache(hf_home, "acme/tiny-qwen3", tiny_qwen3)
    r = resolve_model("acme/tiny-qwen3")
    assert r.path.name == COMMIT and (r.path / "config.json").is_file()
    assert r.repo_id == r.name == "acme/tiny-qwen3"
    check_supported(r.path)


def test_offline_and_not_cached_says_so_in_one_line(hf_home):
    with pytest.raises(FileNotFoundError) as e:
        resolve_model("acme/absent")
    assert "HF_HUB_OFFLINE" in str(e.value) and "\n" not in str(e.value)


def test_an_incomplete_cached_copy_is_not_served(hf_home, tiny_qwen3):
    """transformers' AutoConfig leaves config.json alone in the cache: no weights to serve."""
    add_to_cache(hf_home, "acme/config-only", tiny_qwen3, skip=("model.safetensors",))
    with pytest.raises(FileNotFoundError, match=r"incomplete .* no \*\.safetensors"):
        resolve_model("acme/config-only")


def test_neither_a_directory_nor_a_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face repo id"):
        resolve_model(str(tmp_path / "no" / "such" / "dir"))


def _unsupported(tiny_qwen3, dest: Path) -> Path:
    shutil.copytree(tiny_qwen3, dest)
    config = json.loads((dest / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_an_unsupported_architecture_names_the_supported_ones(tiny_qwen3, tmp_path):
    with pytest.raises(ValueError, match="unsupported architecture 'MambaForCausalLM'.*supported: Qwen3ForCausalLM"):
        check_supported(_unsupported(tiny_qwen3, tmp_path / "mamba"))


def _baton(args: list[str], env: dict, timeout_s: float = 120) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "baton.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "PYTHONPATH": path, **env})


@pytest.mark.e2e
def test_generate_serves_a_repo_id_from_the_cache(tiny_qwen3, tmp_path):
    home = tmp_path / "hf"
    add_to_cache(home, "acme/tiny-qwen3", tiny_qwen3)
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    t0 = time.monotonic()
    got = _baton(["generate", "--model", "acme/tiny-qwen3", "--max-tokens", "4", "--temperature", "0", "hi"], env)
    assert got.returncode == 0, got.stderr
    want = _baton(["generate", "--model", str(tiny_qwen3), "--max-tokens", "4", "--temperature", "0", "hi"], env)
    assert got.stdout == want.stdout and got.stdout.strip()
    print(f"two generate runs: {time.monotonic() - t0:.1f} s")


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["generate", "decode"])
def test_the_cli_prints_an_unsupported_architecture_as_one_line(command, tiny_qwen3, tmp_path):
    model = _unsupported(tiny_qwen3, tmp_path / "mamba")
    args = ["generate", "--model", str(model), "hi"] if command == "generate" else \
        ["decode", "--model", str(model), "--device", "cpu", "--port", "0"]
    r = _baton(args, {"HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"baton {command}: error: unsupported architecture 'MambaForCausalLM'")
    assert "Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM" in lines[0]
