"""The other pod in the kvtransfer tests: a spawned process with its own KVSender and KVReceiver.

The test process holds one side (`LocalSide` in conftest.py) and drives this one with
commands over a multiprocessing pipe. Both processes make layer data with `make_kv`, so each
side can check what the other sent. Kill scenarios end this process with SIGKILL from
inside: at a chosen layer, with no chance to say goodbye.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import traceback

import torch

from baton.kernels.reference import gather_kv
from baton.kvtransfer.errors import TransferFailed

SHAPE = (2, 64, 2, 32)  # [K/V, tokens, kv heads, head dim] of one layer
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float8_e4m3fn": torch.float8_e4m3fn}


def source_layer(seed: int, layer: int, shape, dtype: torch.dtype, block_size: int = 16):
    """One layer of a prefill pod's paged cache, the request's tokens in shuffled slots."""
    _, n, h, d = shape
    g = torch.Generator().manual_seed(seed * 1009 + layer)
    num_blocks = -(-n // block_size) + 3
    kv_layer = torch.randn(2, num_blocks, block_size, h, d, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:n]
    return kv_layer, slots


def make_kv(seed: int, layer: int, shape=SHAPE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Layer `layer` of request `seed`'s KV as the prefill gathers it: [2, n, Hkv, D]."""
    kv_layer, slots = source_layer(seed, layer, tuple(shape), dtype)
    return gather_kv(kv_layer, slots)


def main(conn) -> None:
    """Process entry point (multiprocessing spawn target)."""
    asyncio.run(_Peer(conn).run())


class _Peer:
    def __init__(self, conn):
        self.conn = conn
        self.send_lock = threading.Lock()
        self.expected: dict[str, dict] = {}
        self.custom_sender = None

    async def run(self) -> None:
        from baton.kvtransfer.receiver import KVReceiver, ReceiverSettings
        from baton.kvtransfer.sender import KVSender, SenderSettings

        self.loop = asyncio.get_running_loop()
        self.receiver = KVReceiver(ReceiverSettings(pod_id="peer-decode"))
        await self.receiver.start()
        self.sender = KVSender(
            SenderSettings(pod_id="peer-prefill", connect_timeout_s=3, min_message_bytes=0)
        )
        await self.sender.start()
        self.SenderSettings, self.KVSender = SenderSettings, KVSender
        self.reply(("ready", self.receiver.address, os.getpid()))
        while True:
            try:
                msg = await self.loop.run_in_executor(None, self.conn.recv)
            except EOFError:
                break
            if msg is None:
                break
            cid, name, kw = msg
            asyncio.ensure_future(self.dispatch(cid, name, kw))
        if self.custom_sender is not None:
            await self.custom_sender.close()
        await self.sender.close()
        await self.receiver.close()

    def reply(self, obj) -> None:
        with self.send_lock:
            self.conn.send(obj)

    async def dispatch(self, cid, name, kw) -> None:
        try:
            result = await getattr(self, "cmd_" + name)(**kw)
            self.reply((cid, "ok", result))
        except Exception:  # noqa: BLE001 - the test process reports it
            self.reply((cid, "error", traceback.format_exc()))

    async def cmd_stats(self):
        return {"sender": self.sender.stats(), "receiver": self.receiver.stats()}

    async def cmd_push(
        self,
        address,
        requests,
        num_layers,
        dtype="float32",
        shape=SHAPE,
        delay_s=0.0,
        kill_after=None,
        cancel_after=None,
        finish=True,
        settings=None,
        result_timeout=20.0,
    ):
        """Push `requests` ([(request_id, reservation_id, seed)]) interleaved layer by layer
        from a producer thread, as a prefill model loop would. Returns each one's outcome.
        `cancel_after`: the producer cancels every request after pushing that many layers."""
        sender = self.sender
        if settings is not None:
            # Kept open until the next such push: closing it at once would reset the
            # connection while the receiver may still be finishing what it received.
            if self.custom_sender is not None:
                await self.custom_sender.close()
            sender = self.custom_sender = self.KVSender(
                self.SenderSettings(pod_id="peer-prefill", **settings)
            )
            await sender.start()
        outcome = await self.loop.run_in_executor(
            None,
            _produce,
            sender,
            address,
            requests,
            num_layers,
            DTYPES[dtype],
            tuple(shape),
            delay_s,
            kill_after,
            cancel_after,
            finish,
            result_timeout,
        )
        # A failed transfer returns at once; its sends already submitted end when the
        # receiver drains them. The stats are read once they have.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
            sender.stats()[k] for k in ("inflight_messages", "inflight_bytes", "queued_messages")
        ):
            await asyncio.sleep(0.01)
        outcome["stats"] = sender.stats()
        return outcome

    async def cmd_expect(
        self,
        requests,
        num_layers,
        dtype="float32",
        shape=SHAPE,
        kill_after_layers=None,
        transfer_timeout_s=20.0,
    ):
        """Register reservations; the data is checked against make_kv as it lands."""
        dt = DTYPES[dtype]
        arrived = [0]
        for request_id, reservation_id, seed in requests:
            record = {"bad_layers": []}

            def on_layer(layer, kv, seed=seed, record=record):
                if not torch.equal(kv, make_kv(seed, layer, shape, dt)):
                    record["bad_layers"].append(layer)
                arrived[0] += 1
                if kill_after_layers is not None and arrived[0] >= kill_after_layers:
                    os.kill(os.getpid(), signal.SIGKILL)

            record["transfer"] = self.receiver.expect(
                request_id,
                reservation_id,
                num_layers,
                shape,
                dt,
                on_layer,
                transfer_timeout_s=transfer_timeout_s,
            )
            self.expected[request_id] = record

    async def cmd_raw_push(self, address, jobs, listen_s=1.0):
        """Speak the protocol by hand on one fresh connection and ignore every CANCEL: each
        job ([request_id, reservation_id, seed, num_layers]) sends PUSH_BEGIN, every layer and
        DONE, whatever the receiver says. Returns what the receiver said, after all payload
        sends completed. They complete only once the receiver has read them."""
        import ucxx

        from baton.kvtransfer import protocol
        from baton.kvtransfer.connection import Connection

        host, _, port = address.rpartition(":")
        conn = Connection(await ucxx.create_endpoint(host, int(port)), address)
        conn.send_control(protocol.Hello("raw-peer", "sender"))
        await asyncio.wait_for(conn.recv_control(), 5)
        nbytes = protocol.layer_nbytes(SHAPE, "float32")
        sends = []
        for request_id, reservation_id, seed, num_layers in jobs:
            conn.send_control(
                protocol.PushBegin(
                    request_id, reservation_id, num_layers, list(SHAPE), "float32", nbytes
                )
            )
            for layer in range(num_layers):
                seq = conn.next_seq()
                conn.send_control(protocol.Layer(request_id, seq, [layer], nbytes))
                payload = make_kv(seed, layer).contiguous().view(-1).view(torch.uint8).numpy()
                sends.append(conn.spawn(conn.send_payload(seq, payload)))
            conn.send_control(protocol.Done(request_id, seed))
        await asyncio.wait_for(asyncio.gather(*sends), 10)
        said = []
        try:
            while True:
                msg = await asyncio.wait_for(conn.recv_control(), listen_s)
                said.append(
                    [
                        type(msg).__name__,
                        getattr(msg, "request_id", None),
                        getattr(msg, "reason", None),
                    ]
                )
        except TimeoutError:
            pass
        await conn.close()
        return said

    async def cmd_wait(self, request_ids):
        out = {}
        for rid in request_ids:
            record = self.expected.pop(rid)
            try:
                done = await record["transfer"].wait()
                out[rid] = {
                    "ok": True,
                    "first_token": done.first_token,
                    "bad_layers": record["bad_layers"],
                }
            except TransferFailed as e:
                out[rid] = {"ok": False, "reason": getattr(e, "reason", repr(e))}
        return out


def _produce(
    sender,
    address,
    requests,
    num_layers,
    dtype,
    shape,
    delay_s,
    kill_after,
    cancel_after,
    finish,
    result_timeout,
):
    # a request is (id, reservation, seed) or (id, reservation, seed, its min_message_bytes)
    handles = {
        r[0]: sender.begin(r[0], r[1], address, num_layers, shape, dtype, *r[3:4]) for r in requests
    }
    seeds = {r[0]: r[2] for r in requests}
    refused = {rid: 0 for rid in handles}
    for layer in range(num_layers):
        for rid, h in handles.items():
            if not h.push_layer(layer, make_kv(seeds[rid], layer, shape, dtype)):
                refused[rid] += 1
        if kill_after is not None and layer + 1 == kill_after:
            time.sleep(0.3)  # let those layers reach the receiver
            os.kill(os.getpid(), signal.SIGKILL)
        if cancel_after is not None and layer + 1 == cancel_after:
            for h in handles.values():
                h.cancel("test: the sender gave up")
        if delay_s:
            time.sleep(delay_s)
    if finish:
        for rid, h in handles.items():
            h.finish(
                first_token=seeds[rid], first_logprob=-0.25, top_logprobs=[(seeds[rid], -0.25)]
            )
    results = {}
    for rid, h in handles.items():
        try:
            h.result(timeout=result_timeout)
            results[rid] = "ok"
        except (TransferFailed, TimeoutError) as e:
            results[rid] = getattr(e, "reason", repr(e))
    return {"results": results, "refused": refused}
