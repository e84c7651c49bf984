"""What the services really are, read from their code: the `baton` subcommands, the BATON_*
variables each one reads, its HTTP routes, default ports and metric names.

The deployment files are checked against these, never against a copy kept here, so renaming
a setting or a route fails tests/deploy instead of shipping a file that sets nothing.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re

# Each service's FastAPI app and settings class: (module of create_app, settings class path).
APPS = {
    "router": ("baton.router.app", "baton.router.settings:RouterSettings"),
    "decode": ("baton.decode_service.app", "baton.decode_service.settings:DecodeSettings"),
    "prefill": ("baton.prefill_service.app", "baton.prefill_service.settings:PrefillSettings"),
}


@functools.cache
def subcommands() -> frozenset[str]:
    from baton.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return frozenset(sub.choices)


@functools.cache
def help_text(subcommand: str) -> str:
    """`baton SUBCOMMAND --help`, run in this process through the real CLI."""
    from baton.cli import main

    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "400"  # argparse wraps help at the terminal width
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([subcommand, "--help"])
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return out.getvalue()


@functools.cache
def env_vars(subcommand: str) -> frozenset[str]:
    """The BATON_* variables `baton SUBCOMMAND` reads (as its --help lists them)."""
    names = frozenset(re.findall(r"env\s+(BATON_[A-Z0-9_]+)", help_text(subcommand)))
    if not names:
        raise AssertionError(f"`baton {subcommand} --help` lists no BATON_* variable:\n{help_text(subcommand)}")
    return names


def settings_class(subcommand: str):
    import importlib

    module, _, name = APPS[subcommand][1].partition(":")
    return getattr(importlib.import_module(module), name)


def default(subcommand: str, field_name: str):
    import dataclasses

    return next(f.default for f in dataclasses.fields(settings_class(subcommand)) if f.name == field_name)


@functools.cache
def routes(subcommand: str, model_dir: str) -> frozenset[tuple[str, str]]:
    """(method, path) of every route of the service's app (built, not started)."""
    import importlib

    app_module = importlib.import_module(APPS[subcommand][0])
    cls = settings_class(subcommand)
    settings = cls(model=model_dir, **({"device": "cpu"} if hasattr(cls, "device") else {}))
    app = app_module.create_app(settings)
    return frozenset((m, r.path) for r in app.routes for m in getattr(r, "methods", None) or ())


class _Zero:
    """Stands in for an engine loop when listing a pod's metrics: every attribute, call and
    difference is zero."""

    def __getattr__(self, name):
        return _Zero()

    def __call__(self, *a, **kw):
        return _Zero()

    def __sub__(self, other):
        return 0

    def __float__(self):
        return 0.0


@functools.cache
def metric_names() -> frozenset[str]:
    """Every sample name the router and the pods can expose (counter `x` as `x_total`, a
    histogram as its `_bucket`, `_sum` and `_count`), labelled or not, seen yet or not."""
    from baton.pod.metrics import PodMetrics
    from baton.router.metrics import RouterMetrics

    zero = _Zero()
    names = set()
    for registry in (RouterMetrics().registry, PodMetrics(lambda: zero).registry):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
            names |= {family.name + s for s in suffixes}
    return frozenset(names)
