"""`baton bench` stays torch-free, so it runs on any client machine."""

from __future__ import annotations

import subprocess
import sys


def test_bench_does_not_import_torch():
    code = ("import sys, baton.bench, baton.bench.cli, baton.bench.runner, baton.bench.results, "
            "baton.engine.tokenizer; sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0
