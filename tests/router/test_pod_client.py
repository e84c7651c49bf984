"""The router's own client for pods' generate streams (baton/router/pod_client.py), against
real simulated pods: the frames it reads equal the pod's NDJSON, connections are reused,
responses parse whatever the read boundaries, a dying pod is PodFailed, a 4xx is
PodRejected with the pod's JSON, every wait has a deadline, and a cancelled stream closes its
connection so that the pod aborts the request and frees its KV.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import httpx
import pytest

from baton.router.pod_client import (
    MSGPACK,
    NDJSON,
    PodConnections,
    PodFailed,
    PodRejected,
    PodStream,
    _Connection,
)
from tests.stack import ServiceStack, wait_for, wait_idle

pytestmark = pytest.mark.e2e

TOKEN = "pod-client"
HEADERS = {"X-Baton-Token": TOKEN}
PROMPT = list(range(5, 45))


@pytest.fixture(scope="module")
def pods(tmp_path_factory, tiny_qwen3):
    """One sim pod (2 ms a decode step); the module's last test kills it."""
    with ServiceStack(tmp_path_factory.mktemp("pod-client")) as st:
        pod = st.pod("decode", tiny_qwen3, engine="sim", internal_token=TOKEN, num_kv_blocks=512,
                     sim_decode_step_s=0.002)
        yield {"stack": st, "steady": pod}


def _body(rid: str, max_tokens: int = 24, prompt=PROMPT) -> dict:
    return {"request_id": rid, "prompt_token_ids": prompt,
            "sampling": {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}


def _ndjson(pod, body: dict) -> list[dict]:
    """The same call through httpx, as any other client makes it: NDJSON lines."""
    r = httpx.post(pod.url + "/internal/generate", json=body, headers=HEADERS, timeout=30, trust_env=False)
    assert r.status_code == 200 and r.headers["content-type"] == NDJSON, r.text
    return [json.loads(x) for x in r.text.splitlines() if x]


async def _read_all(stream: PodStream, timeout_s: float = 10) -> list[dict]:
    frames = []
    while (f := await stream.next(timeout_s)) is not None:
        frames.append(f)
    return frames


def _tokens(frames: list[dict]) -> list[int]:
    return [t for f in frames for t in f["token_ids"]]


def test_frames_equal_the_ndjson_and_connections_are_reused(pods):
    pod = pods["steady"]
    want = _ndjson(pod, _body("reference", 40))

    async def go():
        conns = PodConnections(HEADERS, 5)
        got = []
        for i in range(3):
            s = PodStream(conns, pod.url, _body(f"reuse-{i}", 40))
            await s.open(10)
            assert s.media_type == MSGPACK  # asked for, and answered
            got.append(await _read_all(s))
            await s.close()
        conns.close()
        return got, conns.opened

    got, opened = asyncio.run(go())
    assert opened == 1  # three streams, one after another, on one kept-alive connection
    for frames in got:
        assert _tokens(frames) == _tokens(want) and len(_tokens(want)) == 40
        # a frame holds the steps that were ready together: its fields are the NDJSON line's
        assert all(set(f) == set(want[0]) for f in frames)
        assert [f["finish_reason"] for f in frames] == [None] * (len(frames) - 1) + ["length"]
        assert frames[0]["num_prompt_tokens"] == len(PROMPT)


async def _raw_response(pod, accept: str, body: dict) -> bytes:
    """The pod's whole HTTP response to one generate call, as bytes off the socket."""
    r, w = await asyncio.open_connection("127.0.0.1", pod.port)
    payload = json.dumps(body).encode()
    w.write(f"POST /internal/generate HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n"
            f"X-Baton-Token: {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    data = await asyncio.wait_for(r.read(), 30)
    w.close()
    return data


class _Parser:
    """A connection's parser on a real (idle) transport, fed by hand: one response at a time."""

    async def __aenter__(self):
        self.a, self.b = socket.socketpair()
        loop = asyncio.get_running_loop()
        _, self.conn = await loop.create_connection(lambda: _Connection(PodConnections({}, 1), ("x", 0)),
                                                    sock=self.a)
        self.conn.transport.pause_reading()  # the bytes come from the test, not from the socket
        return self

    async def __aexit__(self, *exc):
        self.conn.close()
        self.b.close()

    def parse(self, raw: bytes, cuts: list[int]) -> tuple[list, bool, PodFailed | None]:
        """`raw` fed cut at `cuts`: (frames, whole response read, error)."""
        conn = self.conn
        conn.reset()
        conn.buf.clear()
        frames = []
        for lo, hi in zip([0] + cuts, cuts + [len(raw)]):
            conn.data_received(raw[lo:hi])
            while conn.frames:
                frames.append(conn.take())
        return frames, conn.state == 6, conn.error  # 6: _DONE


def test_sse_data_lines_parse_across_any_read_boundaries():
    """`baton bench` reads the router's SSE with this parser: data lines are the frames,
    wherever the reads and the HTTP chunks cut them; comments, other fields, blank lines and
    the closing [DONE] are not."""
    events = [{"id": "c", "choices": [{"index": 0, "text": t}]} for t in ("Hel", "lo\n\n", " wörld")]
    events.append({"id": "c", "choices": [], "usage": {"completion_tokens": 3}})
    sse = ": a comment\r\n\r\n" + "".join(f"data: {json.dumps(e, ensure_ascii=False)}\r\n\r\n"
                                             for e in events[:2])
    sse += "event: x\n" + "".join(f"data:{json.dumps(e)}\n\n" for e in events[2:]) + "data: [DONE]\n\n"
    body = sse.encode()
    http_chunks = [body[:7], body[7:50], body[50:]]  # HTTP chunks that cut lines too
    raw = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
           b"transfer-encoding: chunked\r\n\r\n"
           + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in http_chunks) + b"0\r\n\r\n")

    async def go():
        async with _Parser() as p:
            assert p.parse(raw, []) == (events, True, None)
            for cuts in [[i] for i in range(1, len(raw))] + [list(range(1, len(raw)))]:
                assert p.parse(raw, cuts) == (events, True, None), cuts

    asyncio.run(go())


@pytest.mark.parametrize("accept", [MSGPACK, NDJSON])
def test_responses_parse_across_any_read_boundaries(pods, accept):
    pod = pods["steady"]
    body = _body(f"raw-{accept}", 12)
    body["sampling"]["logprobs"] = 2  # floats and nested lists in the frames too
    want_tokens = _tokens(_ndjson(pod, {**body, "request_id": "raw-ref"}))

    async def go():
        raw = await _raw_response(pod, accept, body)
        assert b"transfer-encoding: chunked" in raw.lower() and raw.endswith(b"0\r\n\r\n")
        async with _Parser() as p:
            whole, done, error = p.parse(raw, [])
            assert done and error is None and _tokens(whole) == want_tokens
            rng = random.Random(0)
            splits = [[i] for i in range(1, len(raw))]  # every two-piece cut
            splits.append(list(range(1, len(raw))))  # one byte at a time
            splits += [sorted(rng.sample(range(1, len(raw)), rng.randint(2, 40))) for _ in range(50)]
            for cuts in splits:
                assert p.parse(raw, cuts) == (whole, True, None), cuts
            # a body cut short is never taken for a whole one
            for end in (len(raw) - 3, len(raw) - 7, len(raw) // 2):
                assert not p.parse(raw[:end], [])[1]

    asyncio.run(go())


def test_a_4xx_is_pod_rejected_with_the_pods_json(pods):
    pod = pods["steady"]

    async def go():
        conns = PodConnections(HEADERS, 5)
        with pytest.raises(PodRejected) as bad:
            await PodStream(conns, pod.url, _body("bad", prompt=[10**9])).open(10)
        # the error body was read whole: the connection carries the next request
        s = PodStream(conns, pod.url, _body("after-400", 4))
        await s.open(10)
        assert len(_tokens(await _read_all(s))) == 4
        await s.close()
        opened = conns.opened
        with pytest.raises(PodRejected) as unauthorized:
            await PodStream(PodConnections({"X-Baton-Token": "wrong"}, 5), pod.url, _body("tok")).open(10)
        conns.close()
        return bad.value, unauthorized.value, opened

    bad, unauthorized, opened = asyncio.run(go())
    assert bad.status == 400 and bad.body["error"]["type"] == "invalid_request_error"
    assert "outside the vocabulary" in bad.body["error"]["message"] and opened == 1
    assert unauthorized.status == 401 and unauthorized.body["error"]["type"] == "authentication_error"


def test_cancel_closes_the_connection_and_the_pod_aborts(pods):
    pod = pods["steady"]
    aborted = pod.metric("baton_pod_requests_total", status="abort")

    async def go():
        conns = PodConnections(HEADERS, 5)
        stream = PodStream(conns, pod.url, _body("cancelled", 100_000))

        async def job():  # what a router job does: read until cancelled, close in finally
            try:
                await stream.open(10)
                while await stream.next(10) is not None:
                    pass
            finally:
                await stream.close()

        task = asyncio.create_task(job())
        await asyncio.sleep(0.3)  # streaming by now (2 ms a step)
        running = json.loads((await asyncio.to_thread(pod.get, "/internal/state", headers=HEADERS)).text)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        idle = sum(len(v) for v in conns._idle.values())
        conns.close()
        return running, idle

    running, idle = asyncio.run(go())
    assert running["running"] == 1 and idle == 0  # the connection was closed, not kept
    wait_idle(pod, timeout_s=10)  # aborted there and its KV freed
    assert pod.metric("baton_pod_requests_total", status="abort") == aborted + 1


class _Silent:
    """A loopback server that accepts, reads, and answers with `reply` (then nothing more)."""

    def __init__(self, reply: bytes = b""):
        self.reply = reply

    async def __aenter__(self):
        async def handle(r, w):
            await r.read(1024)
            w.write(self.reply)
            await asyncio.sleep(30)

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()


def test_every_wait_has_a_deadline():
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-msgpack\r\ntransfer-encoding: chunked\r\n\r\n"

    async def go():
        conns = PodConnections(HEADERS, 5)
        async with _Silent() as quiet:  # no response at all
            s = PodStream(conns, quiet.url, _body("q"))
            t = time.monotonic()
            with pytest.raises(PodFailed, match="no response"):
                await s.open(0.3)
            no_head = time.monotonic() - t
            await s.close()
        async with _Silent(head) as stalled:  # a head, then no frame
            s = PodStream(conns, stalled.url, _body("s"))
            await s.open(5)
            t = time.monotonic()
            with pytest.raises(PodFailed, match="nothing within 0.3 s"):
                await s.next(0.3)
            no_frame = time.monotonic() - t
            await s.close()
        conns.close()
        return no_head, no_frame

    no_head, no_frame = asyncio.run(go())
    assert 0.25 < no_head < 2 and 0.25 < no_frame < 2


def test_a_pod_that_dies_mid_stream_is_pod_failed(pods):
    """Last in the module: it kills the pod."""
    pod = pods["steady"]

    async def go():
        conns = PodConnections(HEADERS, 5)
        s = PodStream(conns, pod.url, _body("doomed", 100_000))
        await s.open(10)
        assert (await s.next(10))["finish_reason"] is None
        await asyncio.to_thread(pods["stack"].kill, pod)
        deadline = time.monotonic() + 10
        with pytest.raises(PodFailed):
            while time.monotonic() < deadline:  # frames already read may come first
                assert (await s.next(10))["finish_reason"] is None
        await s.close()
        with pytest.raises(PodFailed, match="connecting"):  # and nothing listens there now
            await PodStream(conns, pod.url, _body("after")).open(5)
        conns.close()

    asyncio.run(go())
    wait_for(lambda: pod.child.proc.poll() is not None, "the killed pod exited", 5)


def test_a_kept_connection_the_pod_closed_is_replaced():
    """The pod closes an idle kept-alive connection as the router writes into it: the request
    goes once more on a new connection instead of failing (a raw loopback server: a real pod
    closes idle connections after 5 s, past the client's 3 s reuse limit)."""
    answer = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 28\r\n\r\n"
              b'{"error": {"message": "no"}}')
    assert len(answer.split(b"\r\n\r\n")[1]) == 28
    seen = []

    async def go():
        async def handle(r, w):
            seen.append(len(seen))
            await r.read(65536)
            w.write(answer)  # the first request on each connection is answered
            await w.drain()
            await r.read(65536)  # the next one is read and the connection closed unanswered
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        conns = PodConnections(HEADERS, 5)
        try:
            for _ in range(2):
                with pytest.raises(PodRejected) as e:
                    s = PodStream(conns, url, _body("x"))
                    try:
                        await s.open(5)
                    finally:
                        await s.close()
                assert e.value.status == 400 and e.value.body == {"error": {"message": "no"}}
        finally:
            conns.close()
            server.close()
        return conns.opened

    assert asyncio.run(go()) == 2 and seen == [0, 1]
