"""A real Baton stack on loopback for the bench's end-to-end tests: one colocated pod and the router.

Started as the operator starts them (`python -m baton.cli decode ...`, then the router's module),
on free ports, with a tiny random model. Nothing is skipped: a missing router fails the test
with a message saying so.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.stack import ServiceStack, free_port, http_ok, launch, wait_started

ROUTER_MODULE = "baton.router.main"
READY_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")  # not session: idle, its pod and router still took CPU until the worker ended
def baton_stack(tiny_qwen3, tmp_path_factory):
    """Base URL of a router in front of one colocated pod serving `tiny_qwen3`."""
    if importlib.util.find_spec(ROUTER_MODULE) is None:
        pytest.fail(f"{ROUTER_MODULE} is not importable: the bench e2e tests need the router "
                    f"(`python -m {ROUTER_MODULE} --model DIR --pods URL`)")
    model = str(tiny_qwen3)
    pod_port, router_port = free_port(), free_port()
    pod_url, base = f"http://127.0.0.1:{pod_port}", f"http://127.0.0.1:{router_port}"
    with ServiceStack(tmp_path_factory.mktemp("stack")) as st:
        # both start at once; the router is ready once it sees the pod ready
        pod = launch(st.stack, "pod", [sys.executable, "-m", "baton.cli", "decode", "--model", model,
                                       "--port", str(pod_port), "--num-kv-blocks", "512", "--log-level", "warning"])
        router = launch(st.stack, "router", [sys.executable, "-m", ROUTER_MODULE, "--model", model,
                                             "--host", "127.0.0.1", "--port", str(router_port),
                                             "--pods", pod_url, "--log-level", "warning"])
        wait_started(pod, http_ok(pod_url + "/ready"), READY_TIMEOUT_S)
        wait_started(router, http_ok(base + "/ready"), READY_TIMEOUT_S)
        yield base
