"""Backpressure (issue 23): a client that stops reading its stream does not keep a pod
generating, does not grow the router's buffers, and does not delay anyone else's stream.

Real processes: Redis, one simulated pod (5 ms a decode step: streams take long enough to
stall) and a router. One client opens a stream of 16 choices (more bytes than every kernel
buffer on the way holds) on a socket with a tiny receive buffer and never reads it; other
clients stream through the official `openai` client meanwhile.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.stack import ServiceStack, wait_idle

pytestmark = pytest.mark.e2e

STALL_S = 2.0  # stream_stall_timeout_s of the router and the pod
STALLED_TOKENS = 4000  # per choice of the unread stream: >= 20 s of steps at 5 ms
STALLED_N = 16  # its choices: ~13 MB of SSE, past the kernel's socket buffers (4 MB at most)
TOKEN = "backpressure"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_qwen3):
    with ServiceStack(tmp_path_factory.mktemp("backpressure")) as st:
        yield st.serve(tiny_qwen3, roles=("colocated",), engine="sim", sim_decode_step_s=0.005,
                       num_kv_blocks=8192, stream_stall_timeout_s=STALL_S, internal_token=TOKEN,
                       router_settings={"stream_stall_timeout_s": STALL_S, "internal_token": TOKEN})


def _stream(served, prompt: str, max_tokens: int) -> tuple[str, list[float]]:
    """The text and the gaps between the chunks that carried text."""
    chunks = served.client.completions.create(model=served.model, prompt=prompt, max_tokens=max_tokens,
                                              temperature=0, stream=True)
    text, times = "", []
    for c in chunks:
        if c.choices and c.choices[0].text:
            text += c.choices[0].text
            times.append(time.monotonic())
    return text, [b - a for a, b in zip(times, times[1:])]


def _stalled_client(served) -> socket.socket:
    """A streamed request whose client never reads a byte of the answer."""
    host, port = "127.0.0.1", served.router.port
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel buffers little for it
    s.connect((host, port))
    body = json.dumps({"model": served.model, "prompt": "never read", "max_tokens": STALLED_TOKENS,
                       "n": STALLED_N, "temperature": 0, "stream": True}).encode()
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def test_a_client_that_never_reads_is_cut_off_and_delays_no_one(served):
    pod = served.pods[0]
    alone, _ = _stream(served, "Once upon a time", 100)
    stalled = _stalled_client(served)
    try:
        # the others stream at once, while the unread one fills every buffer on its way
        texts, gaps = [], []
        for _ in range(3):
            text, g = _stream(served, "Once upon a time", 100)
            texts.append(text)
            gaps += g
        assert texts == [alone] * 3  # token-exact, with or without the stalled stream beside them
        # an unread stream blocking anything would show as a gap of about STALL_S
        assert max(gaps) < STALL_S / 2, f"largest gap between chunks {max(gaps):.3f} s"
        # the unread choices are aborted at the pod and their KV freed while the client is still
        # connected, before their 4000 tokens could run (it takes ~10 s on 2 loaded cores to
        # fill the kernel's buffers, then STALL_S; without backpressure all 16 ran to the end)
        wait_idle(pod, timeout_s=45)
        assert pod.metric("baton_pod_requests_total", status="abort") == STALLED_N
        assert pod.metric("baton_pod_generation_tokens_total") < 4 * 100 + STALLED_N * STALLED_TOKENS
        # the router, holding only a bounded buffer for the stalled stream, answers everyone else
        assert _stream(served, "Once upon a time", 100)[0] == alone
    finally:
        stalled.close()
    wait_idle(served.router, timeout_s=10)
