"""Settings objects from CLI flags and environment variables, one rule for every service.

A service's settings are a dataclass; each field `some_knob` is read, in order of
precedence, from `--some-knob`, from `BATON_SOME_KNOB`, else the field's default. The
field's `metadata["help"]` is its one line of documentation (the README's settings table
is generated from the same place: `baton <service> --help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import TypeVar

T = TypeVar("T")
ENV_PREFIX = "BATON_"


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (true/false), got {s!r}")


def _converter(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        conv = _converter(inner)
        return lambda s: None if s.strip().lower() in ("", "none") else conv(s)
    if tp is bool:
        return _parse_bool
    return tp


def parse_settings(cls: type[T], argv: list[str] | None, prog: str, description: str = "") -> T:
    """Build `cls` from argv and the environment; a bad value exits with a readable message."""
    hints = typing.get_type_hints(cls)
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    values = {}
    for f in dataclasses.fields(cls):
        conv = _converter(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        env = env_name(f.name)
        if env in os.environ:
            try:
                default = conv(os.environ[env])
            except ValueError as e:
                p.error(f"environment variable {env}: {e}")
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata.get('help', '')} [env {env}]"
        if hints[f.name] is bool:
            p.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=help_)
        else:
            p.add_argument(flag, dest=f.name, default=default, type=conv, help=help_)
    ns = p.parse_args(argv)
    for f in dataclasses.fields(cls):
        values[f.name] = getattr(ns, f.name)
    try:
        return cls(**values)
    except ValueError as e:
        p.error(str(e))


def field(default, help: str, **kw):
    """A settings field with its documentation."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def env_vars(cls) -> list[str]:
    return [env_name(f.name) for f in dataclasses.fields(cls)]
