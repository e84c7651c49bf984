#!/usr/bin/env python3
"""The settings tables of docs/DEPLOY.md, generated from the services' settings classes.

    python deploy/settings_table.py            # print the tables
    python deploy/settings_table.py --write    # rewrite them in docs/DEPLOY.md
    python deploy/settings_table.py --check    # exit 1 if docs/DEPLOY.md is stale (a test runs this)

The tables sit between `<!-- settings:begin -->` and `<!-- settings:end -->`. A setting that
several services share (the model, Redis, the block size, ...) is explained once, in a shared
table, when its meaning is the same everywhere; otherwise in each service's table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "DEPLOY.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"

# subcommand -> its settings class (tests/deploy checks each against `baton SUBCOMMAND --help`)
SERVICES = {
    "router": "baton.router.settings:RouterSettings",
    "decode": "baton.decode_service.settings:DecodeSettings",
    "prefill": "baton.prefill_service.settings:PrefillSettings",
}

@dataclasses.dataclass
class Setting:
    service: str
    name: str
    default: object
    help: str

    @property
    def env(self) -> str:
        return "BATON_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def settings_class(service: str):
    module, _, name = SERVICES[service].partition(":")
    return getattr(importlib.import_module(module), name)


def settings(service: str) -> list[Setting]:
    cls = settings_class(service)
    out = []
    for f in dataclasses.fields(cls):  # every service's settings are baton.settings dataclasses
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(Setting(service, f.name, default, f.metadata.get("help", "")))
    return out


def _default(s: Setting) -> str:
    v = s.default
    if s.service == "router" and s.name == "model":
        return "(required)"
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return ",".join(v) or '""'
    if v == "":
        return '""'
    return str(v)


def _row(s: Setting) -> str:
    return f"| `{s.env}` | `{s.flag}` | `{_default(s)}` | {s.help} |"


def tables() -> str:
    by_service = {svc: {s.name: s for s in settings(svc)} for svc in SERVICES}
    # shared: in every service, same default and same help
    shared = [n for n in by_service["router"]
              if all(n in by_service[svc] for svc in SERVICES)
              and len({(_default(by_service[svc][n]), by_service[svc][n].help) for svc in SERVICES}) == 1]
    # the two pods share most of their settings
    pod_shared = [n for n in by_service["decode"] if n not in shared and n in by_service["prefill"]
                  and _default(by_service["decode"][n]) == _default(by_service["prefill"][n])
                  and by_service["decode"][n].help == by_service["prefill"][n].help]
    head = "| variable | flag | default | meaning |\n| --- | --- | --- | --- |"
    parts = []
    if shared:
        parts += ["#### Every service", "", head] + [_row(by_service["router"][n]) for n in shared] + [""]
    parts += ["#### Router (`baton router`)", "", head]
    parts += [_row(s) for n, s in by_service["router"].items() if n not in shared] + [""]
    parts += ["#### Both pods (`baton decode`, `baton prefill`)", "", head]
    parts += [_row(by_service["decode"][n]) for n in pod_shared] + [""]
    for svc, title in (("decode", "Decode or colocated pod only (`baton decode`)"), ("prefill", "Prefill pod only (`baton prefill`)")):
        parts += [f"#### {title}", "", head]
        parts += [_row(s) for n, s in by_service[svc].items() if n not in shared and n not in pod_shared] + [""]
    return "\n".join(parts).rstrip() + "\n"


def replace_section(doc: str, body: str) -> str:
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    return doc[:start] + "\n" + body + doc[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help=f"rewrite the tables in {DOC.relative_to(ROOT)}")
    g.add_argument("--check", action="store_true", help=f"exit 1 if {DOC.relative_to(ROOT)} is not current")
    args = p.parse_args(argv)
    body = tables()
    if not (args.write or args.check):
        print(body, end="")
        return 0
    doc = DOC.read_text()
    new = replace_section(doc, body)
    if args.check:
        if new != doc:
            print(f"{DOC.relative_to(ROOT)} is stale: run python deploy/settings_table.py --write", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
