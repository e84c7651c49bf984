"""The wire format and the staging pool on plain data: no UCX, no second process."""

from __future__ import annotations

import msgpack
import pytest
import torch

from baton.kvtransfer import protocol
from baton.kvtransfer.staging import StagingPool, size_class

MESSAGES = [
    protocol.Hello("decode-0", "receiver"),
    protocol.PushBegin("req-1", "res-1", 36, [2, 1024, 8, 128], "bfloat16", 4 << 20),
    protocol.Layer("req-1", 7, [3, 4, 5], 3 * 4096),
    protocol.Done("req-1", 42),
    protocol.Done("req-1", 42, -0.5, [[42, -0.5], [7, -1.25]]),
    protocol.Cancel("req-1", "client went away"),
    protocol.Error("bad frame"),
    protocol.Error("bad layer", "req-1"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    assert protocol.decode(protocol.encode(msg)) == msg


def test_a_frame_decodes_from_the_front_of_a_larger_receive_buffer():
    """ucxx fills a larger buffer without saying how much it wrote: the prefix does."""
    buf = bytearray(protocol.CONTROL_MAX_BYTES)
    frame = protocol.encode(MESSAGES[2])
    buf[: len(frame)] = frame
    buf[len(frame) :] = b"\xc1" * (len(buf) - len(frame))  # not valid msgpack
    assert protocol.decode(buf) == MESSAGES[2]


def _frame(obj) -> bytes:
    body = msgpack.packb(obj)
    return len(body).to_bytes(4, "little") + body


@pytest.mark.parametrize(
    "frame, error",
    [
        (b"\x01\x00", "shorter than its length prefix"),
        ((100).to_bytes(4, "little") + b"abc", "says 100 bytes"),
        (_frame({"v": 2, "k": "CANCEL", "request_id": "r", "reason": "x"}), "protocol version 2"),
        (_frame({"v": 1, "k": "NOPE"}), "unknown message kind"),
        (_frame({"v": 1, "k": "CANCEL", "request_id": "r"}), "bad Cancel"),
        (_frame([1, 2, 3]), "not a map"),
        ((2).to_bytes(4, "little") + b"\xc1\xc1", "undecodable"),
    ],
)
def test_bad_frames_raise_protocol_error(frame, error):
    with pytest.raises(protocol.ProtocolError, match=error):
        protocol.decode(frame)


def test_fields_a_newer_peer_adds_are_ignored():
    frame = _frame({"v": 1, "k": "CANCEL", "request_id": "r", "reason": "x", "later": 1})
    assert protocol.decode(frame) == protocol.Cancel("r", "x")


def test_oversized_control_message_is_refused_at_encode():
    with pytest.raises(protocol.ProtocolError, match="over"):
        protocol.encode(protocol.Cancel("r", "x" * protocol.CONTROL_MAX_BYTES))


def test_layer_nbytes_matches_torch():
    for name in ("float32", "bfloat16", "float16"):
        t = torch.empty(2, 5, 3, 8, dtype=getattr(torch, name))
        assert protocol.layer_nbytes(t.shape, name) == t.numel() * t.element_size()
    with pytest.raises(protocol.ProtocolError):
        protocol.layer_nbytes([2], "complex64")


def test_size_classes_waste_at_most_a_quarter():
    for n in [1, 4096, 4097, 5000, 8191, 8192, 10**6, 3 * 2**20 + 1, 64 * 2**20]:
        c = size_class(n)
        assert c >= n and (n <= 4096 or c <= n * 1.25)


def test_staging_pool_reuses_buffers_and_bounds_what_it_keeps():
    pool = StagingPool("cpu", max_idle_bytes=3 * 65536)
    bufs = [pool.acquire(60000) for _ in range(4)]  # class 65536
    assert pool.allocations == 4 and pool.bytes_in_use == 4 * 65536
    for b in bufs:
        pool.release(b)
    assert pool.bytes_in_use == 0 and pool.bytes_idle == 3 * 65536  # the fourth was dropped
    again = pool.acquire(61000)  # same class: reused
    assert pool.allocations == 4 and pool.buffers_in_use == 1
    view = again.view(61000)
    assert view.nbytes == 61000  # numpy on CPU: what ucxx receives into, exact size
    view[:] = 7
    typed = again.typed(0, (2, 10), torch.float32)
    assert typed.shape == (2, 10) and typed.data_ptr() == again.tensor.data_ptr()
    pool.release(again)
    pool.clear()
    assert pool.bytes_idle == 0


def test_staging_pool_counts_stay_exact_across_threads():
    """The sender takes buffers on the model thread and gives them back on the loop."""
    import threading

    pool = StagingPool("cpu", max_idle_bytes=8 * 65536)
    taken: list = []
    lock = threading.Lock()

    def take():
        for _ in range(200):
            b = pool.acquire(60000)
            with lock:
                taken.append(b)

    def give():
        given = 0
        while given < 400:
            with lock:
                b = taken.pop() if taken else None
            if b is not None:
                pool.release(b)
                given += 1

    threads = [threading.Thread(target=take) for _ in range(2)] + [threading.Thread(target=give)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert pool.bytes_in_use == 0 and pool.buffers_in_use == 0
    assert pool.bytes_idle <= 8 * 65536 and pool.bytes_idle % 65536 == 0
