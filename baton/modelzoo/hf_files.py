"""Writes the JSON side of a Hugging Face model directory the way published checkpoints have it.

transformers 5 saves rope settings only as `rope_parameters` (with `rope_theta` inside).
Published checkpoints (Qwen3, Llama 3.1, SmolLM2) and transformers 4.x use a top-level
`rope_theta` plus `rope_scaling`; 4.x reading a 5.x file finds no `rope_theta` and
silently falls back to 10000. Writing both keeps one file right for every reader;
transformers 5 reads the pair back into the same `rope_parameters` (tested).

transformers 5's tokenizer `save_pretrained` puts the chat template in a separate
`chat_template.jinja` and adds loader state (`is_local`, ...); the tokenizer_config.json
written here carries the template itself, as DESIGN.md's model directory asks.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_published_rope_keys(config: dict) -> dict:
    """Return `config` with `rope_theta` and `rope_scaling` derived from `rope_parameters`."""
    params = dict(config["rope_parameters"])
    out = dict(config)
    out["rope_theta"] = params.pop("rope_theta")
    out["rope_scaling"] = params if params.get("rope_type", "default") != "default" else None
    return out


def rewrite_config(path: Path, update: dict | None = None, drop: tuple[str, ...] = ()) -> None:
    """Add the published rope keys and `update` to the config.json at `path`, minus `drop`."""
    config = add_published_rope_keys(json.loads(path.read_text(encoding="utf-8")))
    config.update(update or {})
    for key in drop:
        config.pop(key, None)
    _write_json(path, config, sort_keys=True)


def write_tokenizer_config(
    dest: Path,
    *,
    chat_template: str,
    eos_token: str,
    pad_token: str,
    bos_token: str | None,
    unk_token: str | None,
    model_max_length: int,
) -> None:
    """Write tokenizer_config.json beside a tokenizer.json; drop any chat_template.jinja."""
    config = {
        # An alias of TokenizersBackend in transformers 5, the tokenizer.json class in 4.x.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "unk_token": unk_token,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }
    _write_json(dest / "tokenizer_config.json", config)
    # transformers 5 prefers the .jinja file over the JSON key; keep one source.
    (dest / "chat_template.jinja").unlink(missing_ok=True)


def make_readable(dest: Path) -> None:
    """Make the files in `dest` 0644: transformers writes model.safetensors 0600, and a model
    made by root at image build time must stay readable by the service's own user."""
    for path in dest.iterdir():
        if path.is_file():
            path.chmod(0o644)


def _write_json(path: Path, data: dict, sort_keys: bool = False) -> None:
    text = json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")
