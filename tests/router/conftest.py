import pytest

from baton.kvindex.hashing import model_identity, model_seed


@pytest.fixture(scope="session")
def model_dir(tiny_qwen3):
    return tiny_qwen3


@pytest.fixture(scope="session")
def model_seed_bytes(model_dir):
    return model_seed(model_identity(model_dir))
