"""The sampling defaults for the fields a request leaves out: the model's, then the operator's.

As vLLM does, the model directory's `generation_config.json` gives the defaults its
publishers recommend (temperature, top_p, top_k, min_p, repetition_penalty; its eos ids are
the engine's business), and `--default-sampling '{"temperature": 0.2}'` overrides them.
What neither gives is SamplingParams' own default (temperature 1.0, no cut, no penalty).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from baton.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# Read from generation_config.json: vLLM's list. HF writes only what differs from its own
# defaults, so a key that is absent means "not set", never HF's top_k=50.
MODEL_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# What the operator may set: the model's keys and OpenAI's penalties.
OPERATOR_KEYS = (*MODEL_KEYS, "presence_penalty", "frequency_penalty")


def parse_override(text: str | None) -> dict[str, float | int]:
    """--default-sampling's JSON object, checked; ValueError with a readable message."""
    if not text:
        return {}
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"default_sampling is not valid JSON ({e}): {text!r}") from None
    if not isinstance(d, dict):
        raise ValueError(
            f"default_sampling must be a JSON object like '{{\"temperature\": 0.2}}', got {text!r}")
    unknown = sorted(set(d) - set(OPERATOR_KEYS))
    if unknown:
        raise ValueError(f"default_sampling: unknown keys {unknown}; allowed: {', '.join(OPERATOR_KEYS)}")
    return _checked(d, "default_sampling")


def from_model(model_dir: Path) -> dict[str, float | int]:
    """The sampling defaults in the model's generation_config.json (none when it has none)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        gen = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    return _checked({k: gen[k] for k in MODEL_KEYS if gen.get(k) is not None}, str(path))


def effective(model_dir: Path, override: dict) -> dict[str, float | int]:
    """What each defaultable field is when a request omits it: SamplingParams' own, then the
    model's, then the operator's."""
    base = SamplingParams()
    d = {k: getattr(base, k) for k in OPERATOR_KEYS}
    model = from_model(model_dir)
    if model:
        log.info("sampling defaults from %s: %s", Path(model_dir) / "generation_config.json", model)
    return d | model | override


def _checked(d: dict, where: str) -> dict:
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{where}: {k} must be a number, got {v!r}")
        if k == "top_k" and not isinstance(v, int) and not float(v).is_integer():
            raise ValueError(f"{where}: top_k must be an integer, got {v!r}")
    d = {k: int(v) if k == "top_k" else float(v) for k, v in d.items()}
    try:
        SamplingParams(**d)  # its ranges, one place
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return d
