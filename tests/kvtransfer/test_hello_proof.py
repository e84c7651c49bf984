"""A receiver with a shared secret takes a connection only if its first message, the sender's
HELLO, proves the secret: over this receiver's address, recently, with a nonce never seen
before. Raw HELLOs over real UCX endpoints, on the module's loop (conftest.LocalSide)."""

from __future__ import annotations

import asyncio
import os
import time

from baton.internal_auth import ucx_proof
from baton.kvtransfer import protocol
from baton.kvtransfer.connection import Connection, ConnectionLost, create_endpoint
from baton.kvtransfer.receiver import KVReceiver, ReceiverSettings

SECRET = "shared"


def _hello(address: str, secret: str = SECRET, ts: float | None = None, nonce: bytes | None = None,
           signed_address: str | None = None) -> protocol.Hello:
    ts = time.time() if ts is None else ts
    nonce = os.urandom(16) if nonce is None else nonce
    proof = ucx_proof(secret, "sender", "p", signed_address or address, ts, nonce)
    return protocol.Hello("p", "sender", address, ts, nonce, proof)


async def _say(port: int, hello: protocol.Hello) -> str:
    """What the receiver answers a connection that opens with `hello`: its HELLO's proof
    checked ("welcome"), or "refused" (an ERROR, or the connection closed)."""
    conn = Connection(await create_endpoint("127.0.0.1", port, 3.0), "test")
    try:
        conn.send_control(hello)
        reply = await asyncio.wait_for(conn.recv_control(), 5)
        if isinstance(reply, protocol.Hello):
            want = ucx_proof(SECRET, "receiver", reply.pod_id, hello.address, 0.0, hello.nonce)
            return "welcome" if reply.proof == want else "bad receiver proof"
        return "refused"
    except ConnectionLost:
        return "refused"
    finally:
        await conn.close()


def test_only_a_fresh_hello_that_proves_the_secret_opens_a_connection(local):
    async def go():
        rx = KVReceiver(ReceiverSettings(pod_id="guarded", secret=SECRET))
        await rx.start()
        try:
            good = _hello(rx.address)
            said = {
                "good": await _say(rx.port, good),
                "replayed": await _say(rx.port, good),
                "wrong secret": await _say(rx.port, _hello(rx.address, secret="guess")),
                "no proof": await _say(rx.port, protocol.Hello("p", "sender")),
                "stale": await _say(rx.port, _hello(rx.address, ts=time.time() - 120)),
                "for another receiver": await _say(rx.port, _hello(
                    "10.9.9.9:1", signed_address="10.9.9.9:1")),
                "another good": await _say(rx.port, _hello(rx.address)),
            }
            return said, rx.stats()["auth_failures"]
        finally:
            await rx.close()

    said, failures = local.run(go())
    assert said == {"good": "welcome", "replayed": "refused", "wrong secret": "refused", "no proof": "refused",
                    "stale": "refused", "for another receiver": "refused", "another good": "welcome"}
    assert failures == 5
