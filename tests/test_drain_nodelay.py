"""drain.serve() answers kept-alive requests without Nagle's delay (issue 23).

serve() binds its socket before the app starts; a socket bound with protocol number 0 made
asyncio skip TCP_NODELAY on every accepted connection, so on a kept-alive connection each
response after the first waited ~40 ms (Nagle + the client's delayed ACK) for its last bytes.
"""

from __future__ import annotations

import http.client
import socket
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

_SERVER = textwrap.dedent("""
    import sys
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route
    from baton.drain import Drain, serve

    async def chunks(request):
        async def gen():
            yield b"a" * 100
            yield b"b" * 100
        return StreamingResponse(gen(), media_type="text/plain")

    serve(Starlette(routes=[Route("/", chunks)]), Drain(5), host="127.0.0.1",
          port=int(sys.argv[1]), log_level="warning")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the test server did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_kept_alive_responses_do_not_wait_for_nagle(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    try:
        times = []
        for _ in range(11):
            t = time.perf_counter()
            conn.request("GET", "/")
            resp = conn.getresponse()
            body = resp.read()
            times.append(time.perf_counter() - t)
            assert resp.status == 200 and body == b"a" * 100 + b"b" * 100
            assert not resp.will_close  # one connection throughout
    finally:
        conn.close()
    # the first request is not the case (quick-ack); Nagle's wait is a ~40 ms quantum
    median = statistics.median(times[1:])
    assert median < 0.025, f"kept-alive responses took {[round(x * 1000, 1) for x in times]} ms"
