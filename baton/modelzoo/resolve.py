"""Turns what a user passes as `--model` into a model directory: a local directory as it is, else
a Hugging Face repo id (`Qwen/Qwen3-0.6B`), found through huggingface_hub.

A repo id is looked up in the local Hugging Face cache first (HF_HOME / HF_HUB_CACHE, the
layout `models--org--name/snapshots/<rev>/` that `huggingface-cli download` and transformers
fill), and downloaded only when it is not there, or not whole, and the network may be used
(HF_HUB_OFFLINE unset). Only the files a model directory needs are fetched: configs,
tokenizer and safetensors weights, never .bin or GGUF copies of the same weights.

`check_supported` reads config.json and raises the engine's own one-line error for an
architecture the engine does not implement, before anything is loaded or started.

Torch-free: `baton router` resolves its model through here (baton/cli.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# What a model directory is made of (DESIGN.md "Model and weights"); *.json covers config,
# generation_config, tokenizer, tokenizer_config and the safetensors index.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local directory holding the model
    repo_id: str | None = None  # the Hugging Face id it came from; None for a local directory

    @property
    def name(self) -> str:
        """The name to serve it under: the repo id as people write it, else the directory's name."""
        return self.repo_id or self.path.resolve().name


def resolve_model(name: str) -> ResolvedModel:
    """A local directory, or a Hugging Face repo id from the cache or (network allowing) the Hub.
    Raises FileNotFoundError with one readable line when neither works."""
    local = Path(name).expanduser()
    if local.is_dir():
        return ResolvedModel(local)
    if local.exists():
        raise FileNotFoundError(f"{name} is a file; --model takes a model directory or a Hugging Face repo id")
    if not _REPO_ID.match(name):
        raise FileNotFoundError(f"{name}: no such directory, and not a Hugging Face repo id (org/name)")
    return ResolvedModel(_from_hub(name), repo_id=name)


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        cached = Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=MODEL_FILES))
    except LocalEntryNotFoundError:
        cached = None
    if cached is not None and not _missing(cached):
        return cached
    where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        what = f"incomplete in {where}: no {', '.join(_missing(cached))}" if cached else f"not in {where}"
        raise FileNotFoundError(f"{repo_id}: {what}, and HF_HUB_OFFLINE is set")
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        # one line: huggingface_hub's messages run over several
        reason = " ".join(str(e).split())[:300]
        raise FileNotFoundError(f"{repo_id}: not in {where}, and downloading it failed: {reason}") from None
    missing = _missing(path)
    if missing:
        raise FileNotFoundError(f"{repo_id} has no {', '.join(missing)}: not a model Baton can serve")
    return path


def _missing(d: Path) -> list[str]:
    """What a model directory lacks among the files the engine and the router need."""
    out = [f for f in ("config.json", "tokenizer.json") if not (d / f).is_file()]
    if not any(d.glob("*.safetensors")):
        out.append("*.safetensors")
    return out


def check_supported(model_dir: Path) -> None:
    """Raise ValueError (one line naming the supported architectures) if the engine cannot load
    this model's architecture; FileNotFoundError if it is no model directory."""
    from baton.engine.config import ModelConfig

    ModelConfig.from_dir(model_dir)
