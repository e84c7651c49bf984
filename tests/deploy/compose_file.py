"""docker-compose.yml as Compose reads it: YAML merge keys, `${VAR}` interpolation, profiles.

Interpolation follows the Compose specification: `${VAR}`, `$VAR`, `${VAR:-default}` (unset or
empty), `${VAR-default}` (unset), `${VAR:?message}` / `${VAR?message}` (required), and `$$`
for a literal `$`. Only values are interpolated, never keys, as in Compose.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.deploy.layout import COMPOSE_FILE

_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?)(?P<arg>.*))?$", re.DOTALL)


def interpolate(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        b = _BRACED.match(m.group("braced"))
        if b is None:
            raise ValueError(f"invalid interpolation {m.group(0)!r}")
        name, op, arg = b.group("name"), b.group("op"), b.group("arg")
        value = env.get(name)
        if op == ":-":
            return value if value else interpolate(arg, env)
        if op == "-":
            return value if value is not None else interpolate(arg, env)
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise ValueError(f"required variable {name} is missing: {arg}")
        return value or ""

    return _VAR.sub(sub, text)


REQUIRED = "(required)"  # variables() says this of a `${VAR:?message}`: no default, must be set

# What a deployment must put in its .env (docs/DEPLOY.md): the tests use these values.
SECRETS = {"BATON_INTERNAL_TOKEN": "t0ken", "BATON_REDIS_PASSWORD": "redis-pw"}


def variables(path: Path = COMPOSE_FILE) -> dict[str, str | None]:
    """Every variable the file interpolates (in values, not comments), with its default
    (None when it has none)."""
    out: dict[str, str | None] = {}
    text = "\n".join(_strings(yaml.safe_load(path.read_text())))
    for m in _VAR.finditer(text):
        if m.group("named"):
            out.setdefault(m.group("named"), None)
        elif m.group("braced"):
            b = _BRACED.match(m.group("braced"))
            op = b.group("op")
            out[b.group("name")] = (b.group("arg") if op in (":-", "-") else
                                    REQUIRED if op in (":?", "?") else out.get(b.group("name")))
    return out


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)


def _interpolate_tree(node, env):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env) for k, v in node.items()}
    return node


def load(path: Path = COMPOSE_FILE, env: dict[str, str] | None = None) -> dict:
    """The file with merge keys resolved and every variable interpolated (defaults when
    `env` is empty: what a `docker compose` with no .env file and a clean shell sees)."""
    return _interpolate_tree(yaml.safe_load(path.read_text()), env or {})


@dataclass
class Service:
    name: str
    spec: dict = field(repr=False)

    @property
    def environment(self) -> dict[str, str]:
        env = self.spec.get("environment", {})
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env)
        return {k: str(v) for k, v in env.items()}

    @property
    def command(self) -> list[str]:
        return list(self.spec.get("command", []))

    @property
    def depends_on(self) -> dict[str, dict]:
        d = self.spec.get("depends_on", {})
        if isinstance(d, list):
            return {name: {"condition": "service_started"} for name in d}
        return d

    @property
    def dns_names(self) -> set[str]:
        """The names other containers resolve to this one: its own and its network aliases."""
        names = {self.name}
        for net in (self.spec.get("networks") or {}).values():
            names |= set((net or {}).get("aliases", []))
        return names

    @property
    def healthcheck_cmd(self) -> list[str] | None:
        hc = self.spec.get("healthcheck", {})
        if hc.get("disable"):
            return None
        return hc.get("test")


def services(model: dict, profiles: set[str]) -> dict[str, Service]:
    """The services `docker compose --profile P ...` starts: those with no profile, and those
    with one of the given profiles."""
    out = {}
    for name, spec in model["services"].items():
        own = set(spec.get("profiles", []))
        if not own or own & profiles:
            out[name] = Service(name, spec)
    return out


def profiles(model: dict) -> set[str]:
    return {p for spec in model["services"].values() for p in spec.get("profiles", [])}
