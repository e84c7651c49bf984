"""The sender's connections: one per decode pod address, opened on first use, shared by transfers.

Everything here runs on the loop. Opening one is an endpoint and a HELLO round trip, bounded
by `connect_timeout_s`; transfers to the same address wait on the same attempt. Once open, a
connection's task reads what the receiver says (CANCEL and ERROR for one of its transfers).
When the connection is lost, every transfer on it fails and the next transfer to that
address opens a new one.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from typing import TYPE_CHECKING

from baton import internal_auth
from baton.kvtransfer import protocol, ucx_runtime
from baton.kvtransfer.connection import Connection, ConnectionLost, create_endpoint
from baton.kvtransfer.errors import TransferFailed
from baton.kvtransfer.tasks import TaskSet

if TYPE_CHECKING:
    from baton.kvtransfer.push import OutgoingTransfer


class SenderConnections:
    def __init__(self, pod_id: str, connect_timeout_s: float, secret: str = ""):
        self.pod_id = pod_id
        self.connect_timeout_s = connect_timeout_s
        self.secret = secret
        self._conns: dict[str, asyncio.Task] = {}  # address -> task making its Connection
        self._by_conn: dict[Connection, dict[str, OutgoingTransfer]] = {}
        self._tasks = TaskSet()
        self.connect_failures = 0

    @property
    def open_endpoints(self) -> int:
        return len(self._by_conn)

    def spawn(self, coro) -> asyncio.Task:
        """Run `coro` as a task that close() waits for."""
        return self._tasks.spawn(coro)

    async def get(self, address: str) -> Connection:
        """The open connection to `address`, made if needed. Raises TransferFailed."""
        task = self._conns.get(address)
        if task is None or (
            task.done()
            and (task.cancelled() or task.exception() is not None or task.result().closed)
        ):
            task = self.spawn(self._open(address))
            self._conns[address] = task
        # shield: one transfer giving up must not cancel a connect others share.
        return await asyncio.shield(task)

    def attach(self, conn: Connection, transfer: OutgoingTransfer) -> None:
        """`transfer` goes over `conn`: the receiver's word about it reaches it, and so does
        the connection's loss."""
        self._by_conn.setdefault(conn, {})[transfer.request_id] = transfer

    def detach(self, conn: Connection, request_id: str) -> None:
        self._by_conn.get(conn, {}).pop(request_id, None)

    def lost(self, conn: Connection, reason: str) -> None:
        """Fail every transfer on `conn` and close it (once)."""
        transfers = self._by_conn.pop(conn, None)
        if transfers is None:
            return
        for t in list(transfers.values()):
            t.fail(reason, False)
        for address, task in list(self._conns.items()):
            if (
                task.done()
                and not task.cancelled()
                and task.exception() is None
                and task.result() is conn
            ):
                del self._conns[address]
        self.spawn(conn.close(reason))

    async def close(self, reason: str) -> None:
        """Close every connection and wait for every task made here."""
        for conn in list(self._by_conn):
            await conn.close(reason)
        await self._tasks.wait()

    async def _open(self, address: str) -> Connection:
        timeout = self.connect_timeout_s
        deadline = time.monotonic() + timeout
        conn = None
        try:
            host, _, port = address.rpartition(":")
            conn = Connection(await create_endpoint(host, int(port), timeout), address)
            conn.send_control(self._hello(address, nonce := os.urandom(16)))
            hello = await asyncio.wait_for(
                conn.recv_control(), max(deadline - time.monotonic(), 0.001)
            )
            if not isinstance(hello, protocol.Hello):
                raise protocol.ProtocolError(f"expected HELLO, got {type(hello).__name__}")
            if self.secret and not hmac.compare_digest(hello.proof, internal_auth.ucx_proof(
                    self.secret, "receiver", hello.pod_id, address, 0.0, nonce)):
                raise protocol.ProtocolError("the receiver did not prove the shared secret")
        except TimeoutError:
            reason = f"cannot connect to {address}: no answer within {timeout:g}s"
        except (ConnectionLost, protocol.ProtocolError, ValueError) as e:
            reason = f"cannot connect to {address}: {e}"
        except Exception as e:
            if not ucx_runtime.is_ucx_error(e):
                raise
            reason = f"cannot connect to {address}: {type(e).__name__}: {e}"
        else:
            conn.peer = f"{hello.pod_id}@{address}"
            self._by_conn[conn] = {}
            self.spawn(self._serve(conn))
            return conn
        self.connect_failures += 1
        if self._conns.get(address) is asyncio.current_task():
            del self._conns[address]
        if conn is not None:
            await conn.close(reason)
        raise TransferFailed("-", reason)

    def _hello(self, address: str, nonce: bytes) -> protocol.Hello:
        if not self.secret:
            return protocol.Hello(self.pod_id, "sender")
        ts = time.time()
        proof = internal_auth.ucx_proof(self.secret, "sender", self.pod_id, address, ts, nonce)
        return protocol.Hello(self.pod_id, "sender", address, ts, nonce, proof)

    async def _serve(self, conn: Connection) -> None:
        """Read what the receiver says: CANCELs and ERRORs."""
        try:
            while True:
                msg = await conn.recv_control()
                transfers = self._by_conn.get(conn, {})
                if isinstance(msg, protocol.Cancel):
                    t = transfers.get(msg.request_id)
                    if t is not None:
                        t.fail(f"cancelled by receiver: {msg.reason}", True)
                elif isinstance(msg, protocol.Error):
                    t = transfers.get(msg.request_id) if msg.request_id else None
                    if t is not None:
                        t.fail(f"receiver error: {msg.reason}", True)
                    else:
                        raise protocol.ProtocolError(f"receiver error: {msg.reason}")
                else:
                    raise protocol.ProtocolError(f"unexpected {type(msg).__name__} from a receiver")
        except (ConnectionLost, protocol.ProtocolError) as e:
            self.lost(conn, f"connection to receiver {conn.peer} lost: {e}")
