"""Fixtures of tests/deploy: the compose file as Compose reads it, the rendered overlays."""

from __future__ import annotations

import pytest

from tests.deploy import compose_file, kustomize
from tests.deploy.layout import OVERLAYS


@pytest.fixture(scope="session")
def compose():
    """As Compose reads it with the required secrets in .env (and nothing else set)."""
    return compose_file.load(env=compose_file.SECRETS)


@pytest.fixture(scope="session")
def rendered():
    """overlay name -> its resources, as `kustomize build` renders them."""
    return {name: kustomize.build(path) for name, path in OVERLAYS.items()}
