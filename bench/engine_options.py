"""Engine options for a benchmark's pods and its offline engine alike, written once:
"NAME=VALUE,..." with NAME an EngineConfig field (max_prefill_tokens_when_decoding=2048,
split_mixed_steps=false)."""

from __future__ import annotations

from dataclasses import fields

from baton.engine.config import EngineConfig

NAMES = {f.name for f in fields(EngineConfig)}


def parse(text: str | None) -> dict:
    """The options as EngineConfig keyword arguments (true/false, integers, floats, else strings)."""
    out: dict = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, value = item.partition("=")
        if not sep or name not in NAMES:
            raise SystemExit(f"engine option {item!r}: expected NAME=VALUE with NAME one of {sorted(NAMES)}")
        low = value.lower()
        out[name] = True if low == "true" else False if low == "false" else _number(value)
    return out


def _number(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def flags(text: str | None) -> list[str]:
    """The same options as a pod's command-line flags."""
    argv: list[str] = []
    for name, value in parse(text).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv
