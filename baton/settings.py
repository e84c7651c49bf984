"""Settings objects from CLI flags and environment variables, one rule for every service.

A service's settings are a dataclass; each field `some_knob` is read, in order of
precedence, from `--some-knob`, from `BATON_SOME_KNOB`, else the field's default. The
field's `metadata["help"]` is its one line of documentation (the README's settings table
is generated from the same place: `baton <service> --help`, which shows each default and
variable).

Types a field may have: str, int, float, bool (`--x`/`--no-x`; true/false, 1/0, yes/no,
on/off in the environment), `X | None` ("" or "none" is None), `Literal[...]` (the flag's
choices) and `list[str]` (comma-separated; blanks dropped). Checks that need more than the
type go in the dataclass's `__post_init__`, raising ValueError: the command line then exits
with that message and the usage line, as for a bad flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Literal, TypeVar

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


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _choices(tp) -> tuple | None:
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _converter(tp):
    """str -> the field's type; raises ValueError with a readable message."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        conv = _converter(inner)
        return lambda s: None if s.strip().lower() in ("", "none") else conv(s)
    if tp is bool:
        return _parse_bool
    if origin is list:
        return _split
    choices = _choices(tp)
    if choices is not None:

        def choice(s: str):
            if s not in choices:
                raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {s!r}")
            return s

        return choice
    return tp


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def parse_settings(cls: type[T], argv: list[str] | None, prog: str, description: str = "") -> T:
    """Build `cls` from argv and the environment; a bad value exits with a readable message."""
    hints = typing.get_type_hints(cls)
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        conv = _converter(tp)
        default = _default(f)
        env = env_name(f.name)
        if env in os.environ:
            try:
                default = conv(os.environ[env])
            except (ValueError, TypeError) as e:
                p.error(f"environment variable {env}: {e}")
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata.get('help', '')} [env {env}]"
        if tp is bool:
            p.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=help_)
        else:
            choices = _choices(tp)  # argparse checks a flag's choice and names them all
            p.add_argument(flag, dest=f.name, default=default, type=str if choices else _named(conv, tp),
                           help=help_, choices=choices, metavar=_metavar(tp))
    ns = p.parse_args(argv)
    try:
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
    except ValueError as e:
        p.error(str(e))


def _named(conv, tp):
    # argparse words a ValueError from `type` as "invalid <type's __name__> value: 'x'"
    def convert(s: str):
        return conv(s)

    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    convert.__name__ = getattr(tp, "__name__", "value")
    return convert


def _metavar(tp) -> str | None:
    if typing.get_origin(tp) is list:
        return "A,B,..."
    choices = _choices(tp)
    return "{" + ",".join(map(str, choices)) + "}" if choices else None


def field(default, help: str, **kw):
    """A settings field with its documentation."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def env_vars(cls) -> list[str]:
    return [env_name(f.name) for f in dataclasses.fields(cls)]


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """For hand-written parsers (`baton up`, `baton bench`): each flag's default after its help,
    unless the help says it already or there is none to say (unset, empty, a switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default in (None, "", [], {}, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"
