import pytest

from baton.kvindex.hashing import model_identity, model_seed


@pytest.fixture(scope="session")
def model_dir(tiny_qwen3):
    return tiny_qwen3


@pytest.fixture(scope="session")
def model_seed_bytes(model_dir):
    return model_seed(model_identity(model_dir))


@pytest.fixture(scope="session")
def smollm2_served(smollm2, tmp_path_factory):
    """Redis, one colocated pod and a router on the real SmolLM2, started once for the modules
    that ask it questions (tools, structured outputs; all in the smollm2 xdist group, so on one
    worker): a pod start is the expensive part. Idle again when they are done."""
    from tests.stack import ServiceStack, wait_idle

    with ServiceStack(tmp_path_factory.mktemp("smollm2-served")) as st:
        s = st.serve(smollm2, roles=("colocated",), timeout_s=120)
        yield s
        wait_idle(*s.pods, s.router)
