"""Load generator for any OpenAI-compatible endpoint (`baton bench`): workloads, load modes, reports.

`main` imports the command's modules only when called, so importing `baton.bench` stays cheap.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from baton.bench.cli import main as _main

    return _main(argv)
