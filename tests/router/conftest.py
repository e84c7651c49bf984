import pytest

from baton.kvindex.hashing import model_identity, model_seed

_CLOSE_AFTER: dict[str, object] = {}  # test file -> what to call once its last test is torn down


@pytest.fixture(scope="session")
def model_dir(tiny_qwen3):
    return tiny_qwen3


@pytest.fixture(scope="session")
def model_seed_bytes(model_dir):
    return model_seed(model_identity(model_dir))


@pytest.fixture(scope="session")
def smollm2_served(smollm2, tmp_path_factory, request):
    """Redis, one colocated pod and a router on the real SmolLM2, started once for the modules
    that ask it questions (tools, structured outputs; all in the smollm2 xdist group, so on one
    worker): a pod start is the expensive part. Idle again when they are done, and stopped
    after the last test that asks for it (in run order), not at the session's end: idle, the
    pod and the router still take CPU (heartbeats, refreshes) from the tests after them."""
    from tests.stack import ServiceStack, wait_idle

    users = [_file(i) for i in request.session.items if "smollm2_served" in i.fixturenames]
    with ServiceStack(tmp_path_factory.mktemp("smollm2-served")) as st:
        s = st.serve(smollm2, roles=("colocated",), timeout_s=120)

        def done() -> None:
            try:
                wait_idle(*s.pods, s.router)
            finally:
                st.close()

        if users:
            _CLOSE_AFTER[users[-1]] = done
        yield s
        if _CLOSE_AFTER.pop(users[-1] if users else "", None) is not None:
            done()  # the last user did not run (deselected, or the session stopped early)


def _file(item) -> str:
    return item.nodeid.split("::")[0]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After a file's last test is torn down (its module's fixtures with it), what was waiting
    for that file: the SmolLM2 stack once the last file that asks for it is done."""
    try:
        return (yield)
    finally:
        if nextitem is None or _file(nextitem) != _file(item):
            close = _CLOSE_AFTER.pop(_file(item), None)
            if close is not None:
                close()
