"""The push pipeline between two real processes: several messages in flight under a window,
small layers coalesced through pooled staging, buffers reused and none leaked, cancels from
either side while messages are in flight, and on_layer's GPU work (as events) holding the
receiver's buffers and its wait().

To get messages stuck in flight on CPU, the receiver is given room for two staging buffers
and an on_layer that holds each for a while: it stops reading LAYER headers, so it posts no
recv, and the sender's rendezvous sends (512 KiB each) cannot complete.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from baton.kvtransfer.errors import TransferFailed
from baton.kvtransfer.receiver import KVReceiver, ReceiverSettings
from baton.kvtransfer.sender import KVSender, SenderSettings
from baton.kvtransfer.staging import size_class
from tests.kvtransfer.fake_event import FakeEvent
from tests.kvtransfer.kv_peer import SHAPE, make_kv

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

F32 = torch.float32
BIG = (2, 1024, 2, 32)  # 512 KiB of float32 per layer
BIG_BYTES = torch.Size(BIG).numel() * 4
SMALL_BYTES = torch.Size(SHAPE).numel() * 4  # 32 KiB


def checker(seed, dtype=F32, shape=SHAPE, hold_s=0.0, then=None):
    """on_layer comparing each layer with the sender's; returns (fn, bad, arrived)."""
    bad, arrived = [], []

    def on_layer(layer, kv):
        if not torch.equal(kv, make_kv(seed, layer, shape, dtype)):
            bad.append(layer)
        arrived.append(layer)
        if then is not None:
            then(len(arrived))
        return asyncio.sleep(hold_s) if hold_s else None

    return on_layer, bad, arrived


def started(local, make):
    """make() on the local loop, then its start() there; returns it."""

    async def start():
        side = make()
        await side.start()
        return side

    return local.run(start())


def start_receiver(local, buffers: int, layer_bytes: int = BIG_BYTES) -> KVReceiver:
    max_staging = buffers * size_class(layer_bytes)
    return started(
        local, lambda: KVReceiver(ReceiverSettings(pod_id="narrow", max_staging_bytes=max_staging))
    )


def start_sender(local, **settings) -> KVSender:
    return started(local, lambda: KVSender(SenderSettings(**settings)))


def push_big(local, peer, rx, rid, seed, num_layers, on_layer, **push):
    """`rx` expects request `rid` (BIG layers, reservation "res-<rid>") and the peer pushes it.
    Returns the receiver's transfer and the peer's push outcome."""
    t = local.call(rx.expect, rid, f"res-{rid}", num_layers, BIG, F32, on_layer)
    out = peer.call(
        "push",
        address=rx.address,
        requests=[(rid, f"res-{rid}", seed)],
        num_layers=num_layers,
        shape=BIG,
        **push,
    )
    return t, out


def wait_idle(local, rx, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = local.call(rx.stats)
        idle = not (s["active_reservations"] or s["pending_recvs"] or s["staging_bytes_in_use"])
        if idle or time.monotonic() > deadline:
            assert idle, s
            return s
        time.sleep(0.02)


def assert_sender_idle(stats: dict) -> None:
    for key in (
        "active_transfers",
        "inflight_bytes",
        "inflight_messages",
        "queued_messages",
        "staging_bytes_in_use",
    ):
        assert stats[key] == 0, (key, stats)


@pytest.mark.parametrize("window", [1, 4])
def test_the_sender_keeps_up_to_its_window_of_messages_in_flight(local, peer, window):
    rx = start_receiver(local, buffers=2)
    try:
        on_layer, bad, _ = checker(500, shape=BIG, hold_s=0.1)
        t, out = push_big(
            local, peer, rx, "win", 500, 12, on_layer,
            settings={"min_message_bytes": 0, "max_inflight_messages": window},
        )
        assert out["results"]["win"] == "ok"
        local.run(t.wait())
        assert bad == []
        stats = out["stats"]
        # Sends pile up while the receiver holds its two buffers: exactly `window` at once.
        assert stats["inflight_messages_peak"] == window
        assert stats["messages_sent"] == 12 and stats["bytes_sent"] == 12 * BIG_BYTES
        assert_sender_idle(stats)
        wait_idle(local, rx)
    finally:
        local.run(rx.close())


def test_small_layers_coalesce_through_pooled_staging_and_arrive_whole(local, peer):
    """bf16 layers of 16 KiB, messages of 3 layers (a third of 10): 3 + 3 + 3 + 1."""
    num_layers, seed, rid = 10, 600, "coalesced"
    dt = torch.bfloat16
    layer_bytes = torch.Size(SHAPE).numel() * 2
    n = SHAPE[1]
    dst = torch.zeros(num_layers, 2, n // 8 + 2, 8, SHAPE[2], SHAPE[3], dtype=dt)
    slots = torch.randperm(dst.shape[2] * 8, generator=torch.Generator().manual_seed(3))[:n]
    from baton.kernels.reference import gather_kv, scatter_kv

    before = local.receiver_stats()
    t = local.expect(
        rid, "res-co", num_layers, SHAPE, dt, lambda layer, kv: scatter_kv(kv, dst[layer], slots)
    )
    out = peer.call(
        "push",
        address=local.receiver.address,
        requests=[(rid, "res-co", seed)],
        num_layers=num_layers,
        dtype="bfloat16",
        settings={"min_message_bytes": 8 * layer_bytes},
    )
    assert out["results"][rid] == "ok"
    assert local.run(t.wait()).first_token == seed
    for layer in range(num_layers):
        assert torch.equal(gather_kv(dst[layer], slots), make_kv(seed, layer, SHAPE, dt))
    after = local.wait_receiver_idle()
    assert after["messages_received"] - before["messages_received"] == 4
    assert after["layers_received"] - before["layers_received"] == num_layers
    assert after["bytes_received"] - before["bytes_received"] == num_layers * layer_bytes
    stats = out["stats"]
    assert stats["messages_sent"] == 4 and stats["layers_sent"] == num_layers
    assert 1 <= stats["staging_allocations"] <= 4
    assert_sender_idle(stats)


def test_a_push_can_coalesce_more_than_its_sender(local, peer):
    """begin(min_message_bytes=...) overrides the sender's threshold for one push (prefill
    pods use it for a decode pod on their own GPU): with layers sent alone by default, one
    push of 9 layers goes in messages of 3, its neighbour layer by layer."""
    num_layers = 9
    layer_bytes = torch.Size(SHAPE).numel() * 4
    seen: dict[str, list] = {"big": [], "alone": []}
    ts = {rid: local.expect(rid, f"res-{rid}", num_layers, SHAPE, F32,
                            lambda layer, kv, rid=rid, seed=seed: seen[rid].append(make_kv(seed, layer, SHAPE, F32).equal(kv)))
          for rid, seed in (("big", 700), ("alone", 701))}
    before = local.receiver_stats()
    out = peer.call(
        "push",
        address=local.receiver.address,
        requests=[("big", "res-big", 700, 4 * layer_bytes), ("alone", "res-alone", 701)],
        num_layers=num_layers,
        settings={"min_message_bytes": 0},
    )
    assert out["results"] == {"big": "ok", "alone": "ok"}
    for t in ts.values():
        local.run(t.wait())
    assert seen == {"big": [True] * num_layers, "alone": [True] * num_layers}
    after = local.wait_receiver_idle()
    assert after["messages_received"] - before["messages_received"] == 3 + 9
    assert out["stats"]["messages_sent"] == 3 + 9
    assert_sender_idle(out["stats"])


def test_staging_is_reused_and_nothing_leaks_over_many_transfers(local, peer):
    """6 rounds of 6 concurrent requests, 12 layers each, coalesced 4 to a message: 108
    messages through a handful of staging buffers, and all of them back at the end."""

    sender = start_sender(
        local,
        pod_id="local-coalescing",
        connect_timeout_s=3,
        min_message_bytes=4 * SMALL_BYTES,
        max_inflight_messages=4,
    )
    try:
        allocations = []
        for r in range(6):
            requests = [
                (f"reuse-{r}-{i}", f"res-reuse-{r}-{i}", 1000 + 10 * r + i) for i in range(6)
            ]
            peer.call("expect", requests=requests, num_layers=12)
            handles = {
                rid: sender.begin(rid, res, peer.address, 12, SHAPE, F32)
                for rid, res, _ in requests
            }
            for layer in range(12):
                for rid, _, seed in requests:
                    assert handles[rid].push_layer(layer, make_kv(seed, layer))
            for rid, _, seed in requests:
                handles[rid].finish(seed)
            for h in handles.values():
                h.result(timeout=20)
            got = peer.call("wait", request_ids=[rid for rid, _, _ in requests])
            for rid, _, seed in requests:
                assert got[rid] == {"ok": True, "first_token": seed, "bad_layers": []}
            allocations.append(local.call(sender.stats)["staging_allocations"])
        stats = local.call(sender.stats)
        assert stats["transfers_completed"] == 36 and stats["messages_sent"] == 36 * 3
        assert_sender_idle(stats)
        assert 0 < stats["staging_bytes_idle"] <= sender.settings.staging_idle_bytes
        # Reuse: later rounds need (almost) no new buffers, and far fewer than messages.
        assert allocations[-1] <= 18 and allocations[-1] - allocations[0] <= 6, allocations
        peer_rx = peer.call("stats")["receiver"]
        assert peer_rx["staging_bytes_in_use"] == 0 and peer_rx["pending_recvs"] == 0
    finally:
        local.run(sender.close())


def test_receiver_cancel_with_messages_in_flight_frees_both_sides(local, peer):
    rx = start_receiver(local, buffers=2)
    try:

        def cancel_at(count):
            if count == 2:
                rx.cancel("res-rxc", "test: client went away")

        on_layer, bad, arrived = checker(700, shape=BIG, hold_s=0.1, then=cancel_at)
        t, out = push_big(
            local, peer, rx, "rxc", 700, 16, on_layer,
            settings={"min_message_bytes": 0, "max_inflight_messages": 4},
        )
        assert out["results"]["rxc"] == "cancelled by receiver: test: client went away"
        with pytest.raises(TransferFailed, match="client went away"):
            local.run(t.wait())
        stats = out["stats"]
        # messages were in flight at the cancel: several at once, up to the cap (4) when the
        # sender posts them within the receiver's hold (a loaded clean-clone run reached 3)
        assert 2 <= stats["inflight_messages_peak"] <= 4
        assert stats["messages_sent"] < 16, "messages not yet sent are dropped"
        assert_sender_idle(stats)
        assert len(arrived) == 2 and bad == []  # drained payloads never reach on_layer
        after = wait_idle(local, rx)
        assert after["discarded_messages"] == stats["messages_sent"] - 2

        # The connection carries the next request whole.
        on_layer2, bad2, _ = checker(701, shape=BIG)
        t2, out2 = push_big(local, peer, rx, "rxc2", 701, 4, on_layer2)
        assert out2["results"]["rxc2"] == "ok"
        local.run(t2.wait())
        assert bad2 == []
        wait_idle(local, rx)
    finally:
        local.run(rx.close())


def test_sender_cancel_with_messages_in_flight_and_a_half_filled_group(local, peer):
    """Coalescing 2 layers to a message, the producer cancels after 5 layers: a message in
    flight, the fifth layer alone in an open staging buffer. Everything comes back."""
    rx = start_receiver(local, buffers=1, layer_bytes=2 * BIG_BYTES)
    try:
        on_layer, bad, arrived = checker(800, shape=BIG, hold_s=0.2)
        t, out = push_big(
            local, peer, rx, "txc", 800, 16, on_layer,
            cancel_after=5,
            delay_s=0.05,  # the connection is up before the cancel
            settings={"min_message_bytes": 2 * BIG_BYTES, "max_inflight_messages": 4},
        )
        assert out["results"]["txc"] == "test: the sender gave up"
        assert out["refused"]["txc"] == 11
        with pytest.raises(TransferFailed, match="cancelled by sender: test: the sender gave up"):
            local.run(t.wait())
        stats = out["stats"]
        # Message 1 (layers 0-1) fills the receiver's one buffer for 0.4 s; message 2 (2-3)
        # is in flight from then on, through the cancel (after layer 5, at about 0.25 s).
        assert stats["inflight_messages_peak"] == 1 and stats["messages_sent"] == 2
        assert stats["staging_allocations"] >= 2
        assert_sender_idle(stats)
        assert bad == [] and len(arrived) <= 4
        wait_idle(local, rx)
    finally:
        local.run(rx.close())


def test_a_failed_transfer_gives_its_open_staging_back_without_another_push(local, peer):
    """The engine may abort a request and never push again: its half-filled buffer must not
    wait for a push that never comes."""

    sender = start_sender(local, pod_id="local-open-group", min_message_bytes=4 * SMALL_BYTES)
    try:
        peer.call("expect", requests=[("open", "res-open", 900)], num_layers=12)
        h = sender.begin("open", "res-open", peer.address, 12, SHAPE, F32)
        assert h.push_layer(0, make_kv(900, 0))
        deadline = time.monotonic() + 5
        while local.call(lambda: h.conn) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert local.call(sender.stats)["staging_bytes_in_use"] > 0
        h.cancel("test: aborted")
        with pytest.raises(TransferFailed, match="aborted"):
            h.result(timeout=10)
        assert_sender_idle(local.call(sender.stats))
        got = peer.call("wait", request_ids=["open"])
        assert got["open"] == {"ok": False, "reason": "cancelled by sender: test: aborted"}
    finally:
        local.run(sender.close())


def test_on_layer_events_hold_the_buffer_and_the_wait_until_the_gpu_work_ends(local, peer):
    """on_layer returning an event (a scatter still running on the GPU): the layer is not
    received and its staging buffer not reused until the event completes."""
    events, check = [], checker(950)[0:2]
    on_check, bad = check

    def on_layer(layer, kv):
        on_check(layer, kv)
        ev = FakeEvent()
        events.append(ev)
        return ev

    before = local.receiver_stats()
    t = local.expect("evt", "res-evt", 6, SHAPE, F32, on_layer)
    out = peer.call(
        "push", address=local.receiver.address, requests=[("evt", "res-evt", 950)], num_layers=6
    )
    assert out["results"]["evt"] == "ok"  # the sender is done once the bytes are across
    deadline = time.monotonic() + 5
    while len(events) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(events) == 6
    time.sleep(0.1)
    mid = local.receiver_stats()
    assert not local.call(lambda: t.finished)
    assert mid["layers_received"] == before["layers_received"]
    assert mid["staging_bytes_in_use"] >= 6 * SMALL_BYTES  # held for the GPU work
    for ev in events:
        ev.complete()
    assert local.run(t.wait()).first_token == 950 and bad == []
    after = local.wait_receiver_idle()
    assert after["layers_received"] - before["layers_received"] == 6
