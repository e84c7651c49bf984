"""Open UCX connections to a KV receiver as a sender would, one per secret given, and report how
each went: `connected` or `refused: <why>`. On a loop of its own (ucxx binds to one loop at a
time; the last release lets another take it): asyncio.run(main(address, secrets, report)),
or python tests/security/ucx_hello.py HOST:PORT SECRET [SECRET ...] ("-" for no secret)."""

from __future__ import annotations

import asyncio
import sys

from baton.kvtransfer import ucx_runtime
from baton.kvtransfer.errors import TransferFailed
from baton.kvtransfer.sender_connections import SenderConnections


async def main(address: str, secrets: list[str], report=print) -> None:
    await ucx_runtime.acquire()
    try:
        for secret in secrets:
            conns = SenderConnections("intruder", 5.0, "" if secret == "-" else secret)
            try:
                await conns.get(address)
                report("connected")
            except TransferFailed as e:
                report(f"refused: {e}")
            finally:
                await conns.close("done")
    finally:
        ucx_runtime.release()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
