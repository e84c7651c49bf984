"""Fixtures of tests/deploy: the compose file as Compose reads it, the rendered overlays."""

from __future__ import annotations

import pytest

from tests.deploy import compose_file, kustomize
from tests.deploy.layout import OVERLAYS


@pytest.fixture(scope="session")
def compose():
    return compose_file.load()


@pytest.fixture(scope="session")
def rendered():
    """overlay name -> its resources, as `kustomize build` renders them."""
    return {name: kustomize.build(path) for name, path in OVERLAYS.items()}
