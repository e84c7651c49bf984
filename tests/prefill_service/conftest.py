"""Fixtures of the disaggregated end-to-end tests: one cluster (disagg_cluster.py) per module and
the offline engine as its oracle, both for the `model` fixture that each module names."""

from __future__ import annotations

import pytest

from baton import LLM
from tests.prefill_service.disagg_cluster import GREEDY, Cluster
from tests.stack import ServiceStack


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    with ServiceStack(tmp_path_factory.mktemp("disagg")) as st:
        yield Cluster(st, model, prefill_block_size=16, decode_block_size=8)


@pytest.fixture(scope="module")
def oracle(model):
    """texts(prompts, params): what the colocated engine generates (params: one or one each)."""
    llm = LLM(model)

    def texts(prompts: list[list[int]], params=GREEDY) -> list[str]:
        return [o.text for o in llm.generate(prompts, params)]

    return texts
