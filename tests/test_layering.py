"""The layering of DESIGN.md's table holds: import-linter's contracts (pyproject.toml) pass on
the tree, and fail once a wrong import is planted, so the check can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy's `baton` before the installed one
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
         "sys.exit(lint_imports_command())", "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_contracts_hold():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_planted_wrong_import_breaks_a_contract(tmp_path):
    shutil.copytree(ROOT / "baton", tmp_path / "baton", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    stop = tmp_path / "baton" / "router" / "stop.py"
    stop.write_text(stop.read_text() + "\n\ndef _planted():\n    from baton.engine import model_runner  # noqa\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0
    assert "the router takes from the engine only its torch-free modules BROKEN" in r.stdout
    assert "baton.router.stop -> baton.engine.model_runner" in r.stdout
